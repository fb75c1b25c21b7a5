//! Uniform precision presets (`--quant none|w8a8|w4a8|w4a6`): every linear
//! layer of every DiT block quantized the same way, on the fly from a float
//! checkpoint. The embedders, the timestep MLPs and the final layer stay in
//! full precision (they are a small share of the work and sensitive).

use super::int8::{QMAX_A6, QMAX_A8};
use crate::backend::{Linear, LinearWeight};
use super::calibrate::Importance;
use super::plan::Plan;
use super::qdir::precision_of;
use crate::model::stdit3::{BlockWeights, Phase, Stdit3};
use anyhow::{anyhow, bail, ensure, Result};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QuantPreset {
    /// Full precision (the checkpoint's weights).
    #[default]
    None,
    /// int8 weights per output channel, int8 activations per token.
    W8A8,
    /// int4 weights per output channel and group of 64 inputs, int8 activations.
    W4A8,
    /// int4 weights, activations in [-31, 31] (the paper's W4A6).
    W4A6,
    /// Each block sub-module at the precision of a calibrated plan (`qc-run calibrate --budget`).
    Aigq,
}

/// The names `--quant` accepts, in order.
pub const PRESET_NAMES: [&str; 5] = ["none", "w8a8", "w4a8", "w4a6", "aigq"];

impl QuantPreset {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "none" => QuantPreset::None,
            "w8a8" => QuantPreset::W8A8,
            "w4a8" => QuantPreset::W4A8,
            "w4a6" => QuantPreset::W4A6,
            "aigq" => QuantPreset::Aigq,
            _ => bail!("unknown --quant {name:?}; known: {}", PRESET_NAMES.join(", ")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantPreset::None => "none",
            QuantPreset::W8A8 => "w8a8",
            QuantPreset::W4A8 => "w4a8",
            QuantPreset::W4A6 => "w4a6",
            QuantPreset::Aigq => "aigq",
        }
    }

    /// The layer at this preset, with the importance vector `smooth` folded in
    /// (a float layer is returned unchanged by `None`).
    pub fn apply(self, l: &Linear, smooth: Option<&[f32]>) -> Result<Linear> {
        self.apply_weighted(l, smooth, None)
    }

    /// [`QuantPreset::apply_weighted`]; with the layer's calibration input rows
    /// `rows` (`[r, k]`), 4-bit weights are rounded by GPTQ on them.
    pub fn apply_calibrated(self, l: &Linear, smooth: Option<&[f32]>, act_sq: Option<&[f32]>, rows: Option<&[f32]>) -> Result<Linear> {
        let qmax = match self {
            QuantPreset::W4A8 => QMAX_A8,
            QuantPreset::W4A6 => QMAX_A6,
            _ => return self.apply_weighted(l, smooth, act_sq),
        };
        let Some(x) = rows else { return self.apply_weighted(l, smooth, act_sq) };
        let q = super::gptq::quantize_int4(&l.float_weight()?, l.out_features, l.in_features, smooth, qmax, x)?;
        Ok(Linear { weight: LinearWeight::Int4(std::sync::Arc::new(q)), bias: l.bias.clone(), in_features: l.in_features, out_features: l.out_features })
    }

    /// [`QuantPreset::apply`]; 4-bit weights choose their group clips by the error
    /// weighted by the inputs' per-channel mean squares `act_sq` when given.
    pub fn apply_weighted(self, l: &Linear, smooth: Option<&[f32]>, act_sq: Option<&[f32]>) -> Result<Linear> {
        match self {
            QuantPreset::None => Ok(l.clone()),
            QuantPreset::W8A8 => l.to_int8(smooth, QMAX_A8),
            QuantPreset::W4A8 => l.to_int4_weighted(smooth, QMAX_A8, act_sq),
            QuantPreset::W4A6 => l.to_int4_weighted(smooth, QMAX_A6, act_sq),
            QuantPreset::Aigq => bail!("aigq is a per-sub-module plan, not one precision"),
        }
    }
}

/// Weight storage of the DiT blocks' linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightStats {
    /// Weight values of the layers (each layer once).
    pub values: usize,
    /// Bytes held: a layer kept at two precisions for two timestep ranges counts twice.
    pub bytes: usize,
    /// Bits per weight value that a step reads, averaged over the trajectory's
    /// timestep ranges by their share of the steps (scales included; equals
    /// [`WeightStats::bits`] when one set of weights serves every step).
    pub step_bits: f64,
}

impl WeightStats {
    /// The block linears `model` holds for `plan`'s timestep ranges: every
    /// distinct layer version once, and the bits each range's steps read.
    pub fn of_model(model: &mut Stdit3, plan: &Plan) -> Result<WeightStats> {
        let mut held: HashMap<(String, QuantPreset), usize> = HashMap::new();
        let mut stats = WeightStats::default();
        for r in 0..plan.ranges() {
            let phase = model.phase_of(plan.timestep_in(r));
            let (spatial, temporal) = model.phase_blocks_mut(phase);
            let (mut bytes, mut values) = (0usize, 0usize);
            for (name, l) in linears_of(spatial, temporal) {
                let b = Self::bytes_of(l);
                bytes += b;
                values += l.out_features * l.in_features;
                held.entry((name, precision_of(l)?)).or_insert(b);
            }
            stats.values = values;
            stats.step_bits += plan.step_fractions[r] * 8.0 * bytes as f64 / values.max(1) as f64;
        }
        stats.bytes = held.values().sum();
        Ok(stats)
    }

    /// Storage of a linear layer's weight, scales and folded importance vector included.
    pub fn bytes_of(l: &Linear) -> usize {
        let (n, k) = (l.out_features, l.in_features);
        match &l.weight {
            LinearWeight::F32(_) => 4 * n * k,
            LinearWeight::Half(_) => 2 * n * k,
            LinearWeight::Int8(q) => n * k + 4 * q.scale.len() + q.inv_smooth.as_ref().map_or(0, |v| 4 * v.len()),
            LinearWeight::Int4(q) => n * k.div_ceil(2) + 4 * q.scale.len() + q.inv_smooth.as_ref().map_or(0, |v| 4 * v.len()),
        }
    }

    /// Bits held per weight value, scales included.
    pub fn bits(&self) -> f64 {
        8.0 * self.bytes as f64 / self.values.max(1) as f64
    }
}

/// Quantizes every block linear of `model` with `preset` (for `aigq`, the
/// calibration's plan), folding in the layer's importance vector when
/// `importance` is given; returns the blocks' weight storage afterwards.
pub fn quantize_blocks(model: &mut Stdit3, preset: QuantPreset, importance: Option<&Importance>) -> Result<WeightStats> {
    ensure!(importance.is_none() || preset != QuantPreset::None, "importance vectors apply to a quantized preset (w8a8, w4a8, w4a6, aigq), not to full precision");
    if preset == QuantPreset::Aigq {
        let imp = importance.ok_or_else(|| anyhow!("--quant aigq needs --calibration DIR: a directory written by `qc-run calibrate --budget BITS`"))?;
        let plan = imp.plan.as_ref().ok_or_else(|| anyhow!("the calibration in {} has no aigq plan: run `qc-run calibrate --budget BITS`", imp.source))?;
        return quantize_plan(model, plan, importance);
    }
    let units: Vec<String> = block_linears(model).into_iter().map(|(n, _)| unit_of(&n).to_string()).collect();
    let plan = Plan::uniform(units, preset);
    quantize_plan(model, &plan, importance)
}

/// Quantizes each block linear at its plan's precision: range 0's choices
/// replace the weights in `model.w`, and each later range whose choices differ
/// from the previous one's becomes a [`Phase`] (its unchanged layers shared).
/// Returns the storage of every distinct layer version held, and the plan's
/// step-weighted average bits in [`WeightStats::step_bits`].
pub fn quantize_plan(model: &mut Stdit3, plan: &Plan, importance: Option<&Importance>) -> Result<WeightStats> {
    ensure!(model.phases.is_empty(), "the model already holds per-range weights");
    let (float_spatial, float_temporal) = (model.w.spatial.clone(), model.w.temporal.clone());
    let mut made: HashMap<(String, QuantPreset), Linear> = HashMap::new();
    let mut previous: Option<Vec<QuantPreset>> = None;
    for range in 0..plan.ranges() {
        let (mut spatial, mut temporal) = if range == 0 { (Vec::new(), Vec::new()) } else { (float_spatial.clone(), float_temporal.clone()) };
        let linears = if range == 0 { linears_of(&mut model.w.spatial, &mut model.w.temporal) } else { linears_of(&mut spatial, &mut temporal) };
        let mut chosen = Vec::with_capacity(linears.len());
        for (name, l) in linears {
            let preset = plan.linear_precision(&name, range)?;
            chosen.push(preset);
            let key = (name.clone(), preset);
            if !made.contains_key(&key) {
                let smooth = if preset == QuantPreset::None { None } else { importance.and_then(|imp| imp.get(&name, preset)) };
                if let Some(v) = smooth {
                    ensure!(v.len() == l.in_features, "the importance vector of {name} has {} entries for {} inputs: the calibration belongs to another model", v.len(), l.in_features);
                }
                let act_sq = importance.and_then(|imp| imp.act_sq(&name));
                let rows = importance.and_then(|imp| imp.rows(&name));
                made.insert(key.clone(), preset.apply_calibrated(l, smooth, act_sq, rows)?);
            }
            *l = made[&key].clone();
        }
        if range > 0 && previous.as_ref() != Some(&chosen) {
            model.phases.push(Phase { below: plan.boundaries[range - 1], spatial, temporal });
        }
        previous = Some(chosen);
    }
    WeightStats::of_model(model, plan)
}

/// The official name of each block linear (`spatial_blocks.3.mlp.fc1`) with the layer.
pub fn block_linears(model: &mut Stdit3) -> Vec<(String, &mut Linear)> {
    linears_of(&mut model.w.spatial, &mut model.w.temporal)
}

/// [`block_linears`] of one set of blocks.
pub fn linears_of<'a>(spatial: &'a mut [BlockWeights], temporal: &'a mut [BlockWeights]) -> Vec<(String, &'a mut Linear)> {
    const SLOTS: [&str; 7] = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2"];
    let mut out = Vec::new();
    for (prefix, blocks) in [("spatial_blocks", spatial), ("temporal_blocks", temporal)] {
        for (i, b) in blocks.iter_mut().enumerate() {
            for ((_, l), slot) in b.linears_mut().into_iter().zip(SLOTS) {
                out.push((format!("{prefix}.{i}.{slot}"), l));
            }
        }
    }
    out
}

/// The sub-module a block linear belongs to: `spatial_blocks.3.attn.qkv` ->
/// `spatial_blocks.3.attn` (likewise `.cross_attn`, `.mlp`): the unit of the aigq plan.
pub fn unit_of(linear: &str) -> &str {
    linear.rsplit_once('.').map_or(linear, |(u, _)| u)
}
