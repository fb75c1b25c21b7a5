//! Uniform precision presets (`--quant none|w8a8|w4a8|w4a6`): every linear
//! layer of every DiT block quantized the same way, on the fly from a float
//! checkpoint. The embedders, the timestep MLPs and the final layer stay in
//! full precision (they are a small share of the work and sensitive).

use super::int8::{QMAX_A6, QMAX_A8};
use crate::backend::{Linear, LinearWeight};
use super::calibrate::Importance;
use crate::model::stdit3::{BlockKind, Stdit3};
use anyhow::{anyhow, bail, ensure, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
        match self {
            QuantPreset::None => Ok(l.clone()),
            QuantPreset::W8A8 => l.to_int8(smooth, QMAX_A8),
            QuantPreset::W4A8 => l.to_int4(smooth, QMAX_A8),
            QuantPreset::W4A6 => l.to_int4(smooth, QMAX_A6),
            QuantPreset::Aigq => bail!("aigq is a per-sub-module plan, not one precision"),
        }
    }
}

/// Weight storage of the DiT blocks' linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightStats {
    pub values: usize,
    pub bytes: usize,
}

impl WeightStats {
    pub fn add(&mut self, l: &Linear) {
        let (n, k) = (l.out_features, l.in_features);
        self.values += n * k;
        self.bytes += match &l.weight {
            LinearWeight::F32(_) => 4 * n * k,
            LinearWeight::Half(_) => 2 * n * k,
            LinearWeight::Int8(q) => q.q.len() + 4 * q.scale.len(),
            LinearWeight::Int4(q) => q.packed.len() + 4 * q.scale.len(),
        };
    }

    /// Average bits per weight value, scales included.
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
        return quantize_planned(model, &|name| plan.get(unit_of(name)).copied().ok_or_else(|| anyhow!("the aigq plan has no entry for {}: it belongs to another model", unit_of(name))), importance);
    }
    quantize_planned(model, &|_| Ok(preset), importance)
}

/// Quantizes each block linear at the precision `choose` gives for its name.
pub fn quantize_planned(model: &mut Stdit3, choose: &dyn Fn(&str) -> Result<QuantPreset>, importance: Option<&Importance>) -> Result<WeightStats> {
    let mut stats = WeightStats::default();
    for (name, l) in block_linears(model) {
        let preset = choose(&name)?;
        if preset != QuantPreset::None {
            let smooth = importance.and_then(|imp| imp.get(&name, preset));
            if let Some(v) = smooth {
                ensure!(v.len() == l.in_features, "the importance vector of {name} has {} entries for {} inputs: the calibration belongs to another model", v.len(), l.in_features);
            }
            *l = preset.apply(l, smooth)?;
        }
        stats.add(l);
    }
    Ok(stats)
}

/// The official name of each block linear (`spatial_blocks.3.mlp.fc1`) with the layer.
pub fn block_linears(model: &mut Stdit3) -> Vec<(String, &mut Linear)> {
    const SLOTS: [&str; 7] = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2"];
    let mut out = Vec::new();
    for (kind, blocks) in [(BlockKind::Spatial, &mut model.w.spatial), (BlockKind::Temporal, &mut model.w.temporal)] {
        let prefix = match kind {
            BlockKind::Spatial => "spatial_blocks",
            BlockKind::Temporal => "temporal_blocks",
        };
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
