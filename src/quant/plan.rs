//! The aigq plan: a precision for every block sub-module (self-attention,
//! cross-attention, MLP of each spatial and temporal block) in every timestep
//! range of the sampling trajectory.
//!
//! Ranges are equal parts of the calibration trajectory's steps, recorded as
//! timestep boundaries so that a run with another step count or schedule still
//! finds its range: range `r` holds the timesteps `t` with
//! `boundaries[r - 1] > t >= boundaries[r]` (range 0 the noisiest).

use super::preset::QuantPreset;
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Descending timesteps between consecutive ranges (`ranges - 1` of them).
    pub boundaries: Vec<f32>,
    /// Share of the calibration trajectory's steps in each range: the weights of
    /// the budget's average (a range's weights are read at each of its steps).
    pub step_fractions: Vec<f64>,
    /// `spatial_blocks.3.attn` -> the precision in each range.
    pub units: BTreeMap<String, Vec<QuantPreset>>,
}

/// Precisions from most to least precise (the order in which a plan steps down).
pub fn precision_rank(p: QuantPreset) -> usize {
    match p {
        QuantPreset::None => 0,
        QuantPreset::W8A8 => 1,
        QuantPreset::W4A8 => 2,
        QuantPreset::W4A6 => 3,
        QuantPreset::Aigq => 4,
    }
}

impl Plan {
    /// Every unit at `preset` in one range.
    pub fn uniform(units: impl IntoIterator<Item = String>, preset: QuantPreset) -> Self {
        Plan { boundaries: Vec::new(), step_fractions: vec![1.0], units: units.into_iter().map(|u| (u, vec![preset])).collect() }
    }

    pub fn ranges(&self) -> usize {
        self.boundaries.len() + 1
    }

    /// The range timestep `t` falls in.
    pub fn range_of(&self, t: f32) -> usize {
        range_of(&self.boundaries, t)
    }

    /// A timestep inside range `range` (its upper boundary is exclusive, its lower one inclusive).
    pub fn timestep_in(&self, range: usize) -> f32 {
        if range < self.boundaries.len() {
            self.boundaries[range]
        } else {
            self.boundaries.last().map_or(0.0, |b| b.min(0.0)) - 1.0
        }
    }

    /// The precision of sub-module `unit` in range `range`.
    pub fn precision(&self, unit: &str, range: usize) -> Result<QuantPreset> {
        let v = self.units.get(unit).ok_or_else(|| anyhow!("the aigq plan has no entry for {unit}: it belongs to another model"))?;
        v.get(range).copied().ok_or_else(|| anyhow!("the aigq plan of {unit} has {} ranges, not {}", v.len(), range + 1))
    }

    /// Precision of a block linear in range `range`. The cross-attention's key/value
    /// projection runs once per prompt, before the first step (the caption does not
    /// change along the trajectory), so it takes its sub-module's most precise choice.
    pub fn linear_precision(&self, linear: &str, range: usize) -> Result<QuantPreset> {
        let unit = super::preset::unit_of(linear);
        if linear.ends_with(".cross_attn.kv_linear") {
            let v = self.units.get(unit).ok_or_else(|| anyhow!("the aigq plan has no entry for {unit}: it belongs to another model"))?;
            return v.iter().copied().min_by_key(|p| precision_rank(*p)).ok_or_else(|| anyhow!("the aigq plan of {unit} is empty"));
        }
        self.precision(unit, range)
    }

    /// `quant.json`'s `"plan"` object.
    pub fn to_json(&self) -> serde_json::Value {
        let units: serde_json::Map<String, serde_json::Value> = self.units.iter().map(|(u, v)| (u.clone(), serde_json::json!(v.iter().map(|p| p.name()).collect::<Vec<_>>()))).collect();
        serde_json::json!({"timestep_boundaries": self.boundaries, "step_fractions": self.step_fractions, "units": units})
    }

    /// Reads `quant.json`'s `"plan"`; `file` names it in errors.
    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<Self> {
        let field = |name: &str| v.get(name).ok_or_else(|| anyhow!("{file}: field \"plan.{name}\" is missing"));
        let floats = |name: &str| -> Result<Vec<f64>> {
            let a = field(name)?.as_array().ok_or_else(|| anyhow!("{file}: field \"plan.{name}\" must be an array of numbers"))?;
            a.iter().map(|x| x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| anyhow!("{file}: field \"plan.{name}\" must hold finite numbers"))).collect()
        };
        let boundaries: Vec<f32> = floats("timestep_boundaries")?.into_iter().map(|x| x as f32).collect();
        ensure!(boundaries.windows(2).all(|w| w[0] > w[1]), "{file}: field \"plan.timestep_boundaries\" must be strictly descending");
        let step_fractions = floats("step_fractions")?;
        let ranges = boundaries.len() + 1;
        ensure!(step_fractions.len() == ranges, "{file}: field \"plan.step_fractions\" has {} entries for {ranges} ranges", step_fractions.len());
        ensure!(step_fractions.iter().all(|f| *f >= 0.0) && (step_fractions.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{file}: field \"plan.step_fractions\" must be non-negative and sum to 1");
        let obj = field("units")?.as_object().ok_or_else(|| anyhow!("{file}: field \"plan.units\" must be an object of sub-module -> precisions"))?;
        let mut units = BTreeMap::new();
        for (unit, list) in obj {
            let list = list.as_array().ok_or_else(|| anyhow!("{file}: plan.units.{unit} must be an array of precisions, one per range"))?;
            ensure!(list.len() == ranges, "{file}: plan.units.{unit} has {} precisions for {ranges} ranges", list.len());
            let mut v = Vec::with_capacity(ranges);
            for p in list {
                let name = p.as_str().ok_or_else(|| anyhow!("{file}: plan.units.{unit} must hold precision names"))?;
                let preset = QuantPreset::parse(name).with_context(|| format!("{file}: plan.units.{unit}"))?;
                ensure!(preset != QuantPreset::Aigq, "{file}: plan.units.{unit} must name precisions (none, w8a8, w4a8, w4a6), not aigq");
                v.push(preset);
            }
            units.insert(unit.clone(), v);
        }
        ensure!(!units.is_empty(), "{file}: field \"plan.units\" is empty");
        Ok(Plan { boundaries, step_fractions, units })
    }
}

/// The range of timestep `t` for descending `boundaries`.
pub fn range_of(boundaries: &[f32], t: f32) -> usize {
    boundaries.iter().take_while(|&&b| t < b).count()
}

/// Boundaries and step shares of `ranges` equal parts of a schedule's steps
/// (`timesteps` descending, one per step): each boundary lies halfway between
/// the last timestep of one range and the first of the next.
pub fn ranges_of_schedule(timesteps: &[f32], ranges: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    let steps = timesteps.len();
    ensure!(ranges >= 1 && ranges <= steps, "--ranges {ranges}: the timestep ranges must be between 1 and the number of steps (--steps {steps})");
    let range_of_step = |i: usize| i * ranges / steps;
    let mut boundaries = Vec::new();
    let mut counts = vec![0usize; ranges];
    for i in 0..steps {
        counts[range_of_step(i)] += 1;
        if i + 1 < steps && range_of_step(i + 1) != range_of_step(i) {
            let (a, b) = (timesteps[i], timesteps[i + 1]);
            ensure!(a > b, "the schedule's timesteps must descend to be split into ranges ({a} then {b})");
            boundaries.push(0.5 * (a + b));
        }
    }
    Ok((boundaries, counts.iter().map(|&c| c as f64 / steps as f64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_a_schedule_and_find_timesteps() {
        let ts: Vec<f32> = (0..30).map(|i| 1000.0 * (1.0 - i as f32 / 30.0)).collect();
        let (b, f) = ranges_of_schedule(&ts, 3).unwrap();
        assert_eq!(b.len(), 2);
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-12 && f.iter().all(|x| (x - 1.0 / 3.0).abs() < 1e-12));
        // Every step of the schedule lands in the range calibration recorded it under.
        for (i, &t) in ts.iter().enumerate() {
            assert_eq!(range_of(&b, t), i * 3 / 30, "step {i} t {t}");
        }
        assert_eq!(range_of(&b, 1000.0), 0);
        let plan = Plan { boundaries: b.clone(), step_fractions: f.clone(), units: BTreeMap::new() };
        for r in 0..3 {
            assert_eq!(plan.range_of(plan.timestep_in(r)), r);
        }
        assert_eq!(range_of(&b, 0.0), 2);
        assert!(ranges_of_schedule(&ts, 0).is_err() && ranges_of_schedule(&ts, 31).is_err());
        let (b1, f1) = ranges_of_schedule(&ts, 1).unwrap();
        assert!(b1.is_empty() && f1 == vec![1.0]);
    }

    #[test]
    fn plan_round_trips_and_rejects_bad_fields() {
        let mut units = BTreeMap::new();
        units.insert("spatial_blocks.0.attn".to_string(), vec![QuantPreset::W8A8, QuantPreset::W4A6]);
        units.insert("spatial_blocks.0.cross_attn".to_string(), vec![QuantPreset::W4A8, QuantPreset::None]);
        let p = Plan { boundaries: vec![500.0], step_fractions: vec![0.5, 0.5], units };
        let back = Plan::from_json(&p.to_json(), "q.json").unwrap();
        assert_eq!(back, p);
        assert_eq!(p.linear_precision("spatial_blocks.0.cross_attn.kv_linear", 0).unwrap(), QuantPreset::None);
        assert_eq!(p.linear_precision("spatial_blocks.0.cross_attn.q_linear", 0).unwrap(), QuantPreset::W4A8);
        assert_eq!(p.linear_precision("spatial_blocks.0.attn.qkv", 1).unwrap(), QuantPreset::W4A6);
        assert!(p.precision("temporal_blocks.0.mlp", 0).unwrap_err().to_string().contains("another model"));
        let mut j = p.to_json();
        j["units"]["spatial_blocks.0.attn"] = serde_json::json!(["w8a8"]);
        assert!(Plan::from_json(&j, "q.json").unwrap_err().to_string().contains("plan.units.spatial_blocks.0.attn has 1 precisions for 2 ranges"));
        let mut j = p.to_json();
        j["units"]["spatial_blocks.0.attn"] = serde_json::json!(["w8a8", "int3"]);
        assert!(format!("{:#}", Plan::from_json(&j, "q.json").unwrap_err()).contains("int3"));
        let mut j = p.to_json();
        j["step_fractions"] = serde_json::json!([0.5, 0.6]);
        assert!(Plan::from_json(&j, "q.json").unwrap_err().to_string().contains("step_fractions"));
    }
}
