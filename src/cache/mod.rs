//! Caching policies: which steps and blocks the sampler computes and which it
//! serves from earlier results. Each policy is a [`ForwardHooks`]; the
//! paper's HLC/SRAP and the peers' policies join `static:K` here.

use crate::backend::{Backend, CachedRef};
use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, StepAction, SubAction, SubModule};

pub mod accel;
pub mod adacache;
pub mod calibrate;
pub mod hlc;
pub mod pab;
pub mod replay;
pub mod srap;
pub mod teacache;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Relative L1 distance `sum |a - b| / sum |b|` of each of `parts` equal
/// row blocks (the guidance halves with `parts = 2`): one reduction on the
/// backend and one small read (on a GPU, the step's only host read).
pub fn divergence(be: &dyn Backend, a: &Tensor, b: &Tensor, parts: usize) -> Result<Vec<f32>> {
    Ok(divergence_of(&be.l1_distance(a, b, parts)?))
}

/// Relative L1 distances from `l1_distance`'s sums.
pub fn divergence_of(sums: &[(f32, f32)]) -> Vec<f32> {
    sums.iter().map(|(num, den)| num / den.max(1e-30)).collect()
}

/// How a policy stores the sub-module outputs it keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePrecision {
    /// As computed (f32 on the CPU, bf16 on the GPU).
    #[default]
    Native,
    /// int8 with one scale per row (token): a quarter of f32, half of bf16.
    Int8,
}

enum Kept {
    Native(Tensor),
    Int8 { q: Tensor, scales: Tensor },
}

impl CachePrecision {
    /// Bytes of one kept `[rows, channels]` output at `elem` bytes per computed value.
    pub fn tensor_bytes(self, rows: usize, channels: usize, elem: usize) -> usize {
        match self {
            CachePrecision::Native => rows * channels * elem,
            CachePrecision::Int8 => rows * (channels + 4),
        }
    }
}

/// The sub-module outputs a policy keeps across steps: the latest per block and
/// sub-module, before the gate.
#[derive(Default)]
pub struct SubCache {
    pub precision: CachePrecision,
    kept: HashMap<(BlockId, SubModule), Kept>,
}

impl SubCache {
    pub fn insert(&mut self, be: &dyn Backend, id: BlockId, sub: SubModule, output: Tensor) {
        let kept = match self.precision {
            CachePrecision::Native => Kept::Native(output),
            // A cache that cannot be quantized (an op error) stays as computed.
            CachePrecision::Int8 => match be.quantize_rows_i8(&output) {
                Ok((q, scales)) => Kept::Int8 { q, scales },
                Err(_) => Kept::Native(output),
            },
        };
        self.kept.insert((id, sub), kept);
    }
    pub fn get(&self, id: BlockId, sub: SubModule) -> Option<CachedRef<'_>> {
        self.kept.get(&(id, sub)).map(|k| match k {
            Kept::Native(t) => CachedRef::Native(t),
            Kept::Int8 { q, scales } => CachedRef::Int8 { q, scales },
        })
    }
    pub fn contains(&self, id: BlockId, sub: SubModule) -> bool {
        self.kept.contains_key(&(id, sub))
    }
    pub fn clear(&mut self) {
        self.kept.clear();
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| crate::tensor::byte_len(t.dtype(), t.numel());
        self.kept.values().map(|k| match k {
            Kept::Native(t) => size(t),
            Kept::Int8 { q, scales } => size(q) + size(scales),
        }).sum()
    }
}

/// `static:K`: compute every K-th step, reuse the last computed velocity in
/// between (the naive baseline every caching policy must beat).
pub struct StaticK {
    pub k: usize,
}

impl ForwardHooks for StaticK {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        // The first and the last step are always computed.
        if step.is_multiple_of(self.k) || step + 1 == steps {
            StepAction::Compute
        } else {
            StepAction::ReusePrevious
        }
    }
    /// Every computed step is the full forward.
    fn graph_key(&mut self, _step: usize, _steps: usize) -> Option<u64> {
        Some(0)
    }
}

/// The full computation (the reference every accelerated mode is judged against).
pub struct Reference;
impl ForwardHooks for Reference {
    fn graph_key(&mut self, _step: usize, _steps: usize) -> Option<u64> {
        Some(0)
    }
}

/// The names `policy` accepts.
pub const POLICY_NAMES: &str = "none, hlc, hlc-separate-cfg, srap, hlc+srap, teacache, pab, adacache, static:K";

/// Caching parameters fitted to a model (`cache.json` beside its checkpoint,
/// written by `qc-run calibrate --accel`): what policies read besides their threshold.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheCalibration {
    /// TeaCache's rescaling polynomial (highest power first), fitted on the model's own
    /// reference trajectories; without it the distances are not rescaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacache_coefficients: Option<Vec<f64>>,
    /// `--accel quantcache` presets (name -> settings), calibrated jointly with quantization.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub presets: std::collections::BTreeMap<String, AccelPreset>,
}

/// One `--accel quantcache` preset: a caching policy and its threshold, run on the
/// quantized checkpoint it is saved beside.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccelPreset {
    pub cache: String,
    pub threshold: String,
    /// What calibration measured with these settings on its prompts.
    pub psnr_db: f64,
    pub blocks_computed: f64,
}

impl CacheCalibration {
    pub const FILE: &'static str = "cache.json";

    /// `DIR/cache.json`, or the empty calibration when there is none.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// A model directory's: `DIR/cache.json`, else its QuantCache calibration's.
    pub fn for_model(dir: &std::path::Path) -> Result<Self> {
        if dir.join(Self::FILE).exists() {
            Self::from_dir(dir)
        } else {
            Self::from_dir(&accel::calibration_dir(dir))
        }
    }
}

/// Parses a threshold: a finite number in `range`.
fn threshold(policy: &str, text: &str, range: std::ops::RangeInclusive<f32>) -> Result<f32> {
    match text.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && range.contains(&v) => Ok(v),
        _ => bail!("--cache-threshold {text:?} for {policy}: expected a number in [{}, {}]", range.start(), range.end()),
    }
}

/// A caching policy by name, with `--cache-threshold` when given (each policy's
/// default otherwise) and the model's cache calibration:
/// - `none`: compute everything (no threshold);
/// - `hlc` (threshold: accumulated predicted change before a recomputation, default 0.2, in [0.001, 10]);
///   `hlc-separate-cfg`: the same, the guidance halves deciding separately;
/// - `srap` (threshold: relative contribution under which a block is skipped, default 0.1, in [0, 1]);
/// - `hlc+srap` (thresholds `HLC,SRAP`, or one for HLC with SRAP's default);
/// - `teacache` (threshold: accumulated rescaled distance, default 0.1, in [0.001, 10]);
/// - `pab` (threshold: the spatial broadcast range in steps, temporal 2x and cross-attention 3x it, default 2);
/// - `adacache` (threshold: multiplies the codebook's rate bounds, default 1, in [0.01, 100]);
/// - `static:K` (no threshold).
///
/// `precision`: how policies that keep sub-module outputs (hlc, pab, adacache) store them.
pub fn policy_with(name: &str, thresh: Option<&str>, calib: &CacheCalibration, precision: CachePrecision) -> Result<Box<dyn ForwardHooks>> {
    let no_threshold = |what: &str| -> Result<()> {
        match thresh {
            Some(t) => bail!("--cache-threshold {t:?}: {what} takes no threshold"),
            None => Ok(()),
        }
    };
    Ok(match name {
        "none" | "reference" => {
            no_threshold("--cache none")?;
            Box::new(Reference)
        }
        "hlc" | "hlc-separate-cfg" => {
            let mut h = hlc::Hlc::new(thresh.map_or(Ok(hlc::Hlc::DEFAULT_THRESHOLD), |t| threshold(name, t, 0.001..=10.0))?);
            h.separate_cfg = name == "hlc-separate-cfg";
            h.precision = precision;
            Box::new(h)
        }
        "srap" => Box::new(srap::Srap::new(thresh.map_or(Ok(srap::Srap::DEFAULT_THRESHOLD), |t| threshold(name, t, 0.0..=1.0))?)),
        "hlc+srap" => {
            let (h, s) = match thresh.map(|t| t.split_once(',').map_or((t, None), |(a, b)| (a, Some(b)))) {
                None => (hlc::Hlc::DEFAULT_THRESHOLD, srap::Srap::DEFAULT_THRESHOLD),
                Some((h, s)) => (threshold("hlc (in hlc+srap)", h, 0.001..=10.0)?, s.map_or(Ok(srap::Srap::DEFAULT_THRESHOLD), |s| threshold("srap (in hlc+srap)", s, 0.0..=1.0))?),
            };
            let mut caching = hlc::Hlc::new(h);
            caching.precision = precision;
            Box::new(Pruned { pruning: srap::Srap::new(s), caching })
        }
        "teacache" => {
            let t = thresh.map_or(Ok(teacache::TeaCache::DEFAULT_THRESHOLD), |t| threshold(name, t, 0.001..=10.0))?;
            Box::new(teacache::TeaCache::new(t, calib.teacache_coefficients.clone().unwrap_or_else(|| vec![1.0, 0.0])))
        }
        "pab" => {
            let mut p = pab::Pab::default();
            p.kept.precision = precision;
            if let Some(t) = thresh {
                let r = threshold(name, t, 1.0..=30.0)?;
                anyhow::ensure!(r.fract() == 0.0, "--cache-threshold {t:?} for pab: the spatial broadcast range is a whole number of steps");
                (p.spatial, p.temporal, p.cross) = (r as usize, 2 * r as usize, 3 * r as usize);
            }
            Box::new(p)
        }
        "adacache" => {
            let mut a = adacache::AdaCache::default();
            a.kept.precision = precision;
            if let Some(t) = thresh {
                let m = threshold(name, t, 0.01..=100.0)?;
                a.codebook.iter_mut().for_each(|c| c.0 *= m);
            }
            Box::new(a)
        }
        _ => match name.strip_prefix("static:") {
            Some(k) => match k.parse::<usize>() {
                Ok(k) if k >= 1 => {
                    no_threshold("static:K")?;
                    Box::new(StaticK { k })
                }
                _ => bail!("--cache {name:?}: K must be a positive integer"),
            },
            None => bail!("unknown caching policy {name:?}; known: {POLICY_NAMES}"),
        },
    })
}

/// A policy from a mode name `NAME`, `NAME@THRESHOLD`, either followed by
/// `/int8` (the quality harness's spelling of `--cache NAME --cache-threshold
/// THRESHOLD --cache-int8`).
pub fn policy(spec: &str, calib: &CacheCalibration) -> Result<Box<dyn ForwardHooks>> {
    let (spec, precision) = match spec.strip_suffix("/int8") {
        Some(s) => (s, CachePrecision::Int8),
        None => (spec, CachePrecision::Native),
    };
    let (name, thresh) = spec.split_once('@').map_or((spec, None), |(n, t)| (n, Some(t)));
    policy_with(name, thresh, calib, precision)
}

/// `hlc+srap`: SRAP prunes the blocks it finds redundant; HLC decides the steps
/// and, in the blocks that run, which sub-modules are served from its cache.
pub struct Pruned {
    pub pruning: srap::Srap,
    pub caching: hlc::Hlc,
}

impl ForwardHooks for Pruned {
    fn timestep(&mut self, t: f32) {
        self.caching.timestep(t);
        self.pruning.timestep(t);
    }
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        self.pruning.step_action(step, steps);
        self.caching.step_action(step, steps)
    }
    fn extrapolation_slope(&self) -> f32 {
        self.caching.extrapolation_slope()
    }
    fn block_action(&mut self, id: BlockId) -> BlockAction {
        self.pruning.block_action(id)
    }
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        self.caching.sub_action(id, sub)
    }
    fn store(&mut self, be: &dyn Backend, id: BlockId, sub: SubModule, output: Tensor) {
        self.caching.store(be, id, sub, output)
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<crate::backend::CachedRef<'_>> {
        self.caching.cached(id, sub)
    }
    fn cache_bytes(&self) -> usize {
        self.caching.cache_bytes()
    }
    fn cache_bytes_needed(&self, rows: usize, channels: usize, blocks: usize, elem: usize) -> usize {
        self.caching.cache_bytes_needed(rows, channels, blocks, elem)
    }
    fn wants_block_io(&self, id: BlockId) -> bool {
        self.pruning.wants_block_io(id)
    }
    /// Both policies' measures of the step in one read back.
    fn blocks_output(&mut self, be: &dyn Backend, _x: &mut Tensor) -> Result<()> {
        let mut sums = self.pruning.take_measures();
        let pruning = sums.len();
        sums.extend(self.caching.take_measures());
        let mut read = be.read_sums(&sums)?;
        let caching = read.split_off(pruning);
        self.pruning.apply_measures(read);
        self.caching.apply_measures(caching);
        Ok(())
    }
    fn block_io(&mut self, be: &dyn Backend, id: BlockId, input: &Tensor, output: &Tensor) {
        self.pruning.block_io(be, id, input, output)
    }
}

/// Wraps a policy and counts the denoising steps that run the DiT and the
/// DiT block evaluations it lets happen (a block counts when at least one of
/// its sub-modules is computed), against those a full computation would have done. The policy's graph keys pass through, so CUDA graphs still
/// replay: a replayed step calls no hook inside the forward, so it is counted
/// as the eager step of the same key was (same key, same blocks: the
/// [`ForwardHooks::graph_key`] contract).
pub struct Counting<'a> {
    pub inner: &'a mut dyn ForwardHooks,
    pub steps_computed: usize,
    pub blocks_computed: usize,
    pub blocks_total: usize,
    pub blocks_per_forward: usize,
    /// The graph key of the step in progress and the blocks it computed so far.
    step: Option<(Option<u64>, usize)>,
    /// A block the policy computes whose sub-modules have not yet computed anything
    /// (a block whose sub-modules are all reused or skipped is not a block evaluation).
    block_open: bool,
    /// Blocks computed by the last eager step of each graph key.
    per_key: std::collections::HashMap<u64, usize>,
    /// The most memory the policy's caches held ([`ForwardHooks::cache_bytes`]).
    pub cache_peak_bytes: usize,
    /// Steps that ran the DiT on the conditional half only.
    pub steps_conditional: usize,
    /// When set, every decision is recorded here, step by step (see [`replay`]).
    pub schedule: Option<Vec<replay::StepRecord>>,
}

impl<'a> Counting<'a> {
    pub fn new(inner: &'a mut dyn ForwardHooks, blocks_per_forward: usize) -> Self {
        Counting { inner, steps_computed: 0, blocks_computed: 0, blocks_total: 0, blocks_per_forward, step: None, block_open: false, per_key: Default::default(), cache_peak_bytes: 0, steps_conditional: 0, schedule: None }
    }

    /// Fraction of block evaluations actually computed.
    pub fn computed_fraction(&self) -> f64 {
        if self.blocks_total == 0 {
            return 1.0;
        }
        self.blocks_computed as f64 / self.blocks_total as f64
    }

    /// Closes the step in progress: a keyed step that called no block hook was replayed.
    fn close_step(&mut self) {
        if let Some((key, blocks)) = self.step.take() {
            match key {
                Some(k) if blocks == 0 => self.blocks_computed += self.per_key.get(&k).copied().unwrap_or(0),
                Some(k) => {
                    self.per_key.insert(k, blocks);
                }
                None => {}
            }
        }
    }

    /// The counts once sampling is over (closes the last step).
    pub fn finish(&mut self) {
        self.close_step();
    }
}

impl ForwardHooks for Counting<'_> {
    fn timestep(&mut self, t: f32) {
        self.inner.timestep(t)
    }
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        let a = self.inner.sub_action(id, sub);
        if let Some(s) = self.schedule.as_mut().and_then(|s| s.last_mut()) {
            s.subs.insert((id, sub), a);
        }
        if self.block_open && matches!(a, SubAction::Compute | SubAction::ComputeAndStore) {
            self.block_open = false;
            self.blocks_computed += 1;
            if let Some((_, n)) = &mut self.step {
                *n += 1;
            }
        }
        a
    }
    fn store(&mut self, be: &dyn Backend, id: BlockId, sub: SubModule, output: Tensor) {
        self.inner.store(be, id, sub, output);
        self.cache_peak_bytes = self.cache_peak_bytes.max(self.inner.cache_bytes());
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<crate::backend::CachedRef<'_>> {
        self.inner.cached(id, sub)
    }
    fn wants_block_io(&self, id: BlockId) -> bool {
        self.inner.wants_block_io(id)
    }
    fn block_io(&mut self, be: &dyn Backend, id: BlockId, input: &Tensor, output: &Tensor) {
        self.inner.block_io(be, id, input, output)
    }
    fn wants_modulated_input(&self) -> bool {
        self.inner.wants_modulated_input()
    }
    fn blocks_input(&mut self, be: &dyn Backend, x: &Tensor, modulated: Option<&Tensor>) {
        self.inner.blocks_input(be, x, modulated)
    }
    fn blocks_output(&mut self, be: &dyn Backend, x: &mut Tensor) -> Result<()> {
        self.inner.blocks_output(be, x)?;
        self.cache_peak_bytes = self.cache_peak_bytes.max(self.inner.cache_bytes());
        Ok(())
    }
    fn cache_bytes(&self) -> usize {
        self.inner.cache_bytes()
    }
    fn cache_bytes_needed(&self, rows: usize, channels: usize, blocks: usize, elem: usize) -> usize {
        self.inner.cache_bytes_needed(rows, channels, blocks, elem)
    }
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        self.close_step();
        self.blocks_total += self.blocks_per_forward;
        // The sampler computes a step that has nothing to reuse yet.
        let a = match self.inner.step_action(step, steps) {
            _ if step == 0 => StepAction::Compute,
            a => a,
        };
        match a {
            StepAction::Compute => {
                self.steps_computed += 1;
                self.step = Some((None, 0));
            }
            // Half the rows through every block: half the block evaluations.
            StepAction::ComputeConditional => {
                self.steps_conditional += 1;
                self.blocks_computed += self.blocks_per_forward / 2;
            }
            StepAction::ReusePrevious | StepAction::Extrapolate => {}
        }
        if let Some(s) = self.schedule.as_mut() {
            s.push(replay::StepRecord { action: Some(a), slope: Some(self.inner.extrapolation_slope()), ..Default::default() });
        }
        a
    }
    fn extrapolation_slope(&self) -> f32 {
        self.inner.extrapolation_slope()
    }
    fn block_action(&mut self, id: BlockId) -> BlockAction {
        let a = self.inner.block_action(id);
        self.block_open = a == BlockAction::Compute;
        if let Some(s) = self.schedule.as_mut().and_then(|s| s.last_mut()) {
            s.blocks.insert(id, a);
        }
        a
    }
    fn observe(&mut self, name: &str, value: &Tensor) {
        self.inner.observe(name, value)
    }
    fn wants_trace(&self) -> bool {
        self.inner.wants_trace()
    }
    fn graph_key(&mut self, step: usize, steps: usize) -> Option<u64> {
        let key = self.inner.graph_key(step, steps);
        if let Some((k, _)) = &mut self.step {
            *k = key;
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_k_computes_every_kth_and_the_last_step() {
        let mut p = StaticK { k: 3 };
        let computed: Vec<usize> = (0..8).filter(|&i| p.step_action(i, 8) == StepAction::Compute).collect();
        assert_eq!(computed, vec![0, 3, 6, 7]);
        let c = CacheCalibration::default();
        assert!(policy("static:0", &c).is_err() && policy("magic", &c).is_err() && policy("static:2", &c).is_ok());
    }

    /// The sampler's hook calls for 7 steps of static:3 with CUDA graphs: computed steps 0, 3
    /// and 6; step 0 runs eagerly (4 blocks), step 3 is a replay (no block hook), step 6 (the
    /// last) eagerly again. Every computed step counts its 4 blocks.
    #[test]
    fn counting_sees_replayed_steps() {
        let mut inner = StaticK { k: 3 };
        let mut c = Counting::new(&mut inner, 4);
        let id = BlockId { kind: crate::model::stdit3::BlockKind::Spatial, index: 0 };
        for step in 0..7 {
            if c.step_action(step, 7) == StepAction::Compute {
                assert_eq!(c.graph_key(step, 7), Some(0));
                if step != 3 {
                    for _ in 0..4 {
                        c.block_action(id);
                        for sub in [SubModule::SelfAttention, SubModule::CrossAttention, SubModule::Mlp] {
                            c.sub_action(id, sub);
                        }
                    }
                }
            }
        }
        c.finish();
        assert_eq!((c.steps_computed, c.blocks_computed, c.blocks_total), (3, 12, 28));
    }

    /// An int8 cache keeps a quarter of the f32 bytes and gives back the values within half
    /// a step of each row's scale, both when added by the reuse op and as a tensor (what HLC
    /// measures against); a native cache gives them back exactly.
    #[test]
    fn int8_sub_cache_round_trips_within_its_scales() {
        let be = crate::backend::cpu::CpuBackend::new();
        let id = BlockId { kind: crate::model::stdit3::BlockKind::Spatial, index: 0 };
        let mut rng = crate::rng::Rng::new(9);
        for (rows, c) in [(3usize, 8usize), (17, 64), (2, 1152)] {
            let y = Tensor::from_f32(&[rows, c], rng.normal_vec(rows * c)).unwrap();
            let mut native = SubCache::default();
            let mut int8 = SubCache { precision: CachePrecision::Int8, ..Default::default() };
            native.insert(&be, id, SubModule::Mlp, y.clone());
            int8.insert(&be, id, SubModule::Mlp, y.clone());
            assert_eq!((native.bytes(), int8.bytes()), (rows * c * 4, rows * (c + 4)));
            assert_eq!(native.get(id, SubModule::Mlp).unwrap().values(&be, &y).unwrap().f32().unwrap(), y.f32().unwrap());
            let back = int8.get(id, SubModule::Mlp).unwrap().values(&be, &y).unwrap();
            let mut added = Tensor::zeros(&[rows, c]);
            int8.get(id, SubModule::Mlp).unwrap().add_gated(&be, &mut added, None).unwrap();
            assert_eq!(added.f32().unwrap(), back.f32().unwrap());
            for (r, (got, want)) in back.f32().unwrap().chunks(c).zip(y.f32().unwrap().chunks(c)).enumerate() {
                let half_step = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0 / 2.0;
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() <= half_step * 1.001 + 1e-7, "{rows}x{c} row {r}: {g} vs {w}");
                }
            }
        }
    }

    /// A block whose sub-modules are all reused (or skipped) is not a block evaluation;
    /// one computed sub-module makes it one.
    #[test]
    fn counting_counts_blocks_that_compute_something() {
        struct Reusing(bool);
        impl ForwardHooks for Reusing {
            fn sub_action(&mut self, _id: BlockId, sub: SubModule) -> SubAction {
                if self.0 && sub == SubModule::Mlp { SubAction::Compute } else { SubAction::Reuse }
            }
        }
        let id = BlockId { kind: crate::model::stdit3::BlockKind::Temporal, index: 1 };
        for (mlp, want) in [(false, 0), (true, 1)] {
            let mut inner = Reusing(mlp);
            let mut c = Counting::new(&mut inner, 1);
            c.step_action(0, 1);
            c.block_action(id);
            for sub in [SubModule::SelfAttention, SubModule::CrossAttention, SubModule::Mlp] {
                c.sub_action(id, sub);
            }
            c.finish();
            assert_eq!((c.blocks_computed, c.blocks_total), (want, 1));
        }
        // What a policy says it will keep matches what it keeps (pab: both attentions of each block).
        let p = pab::Pab::default();
        assert_eq!(p.cache_bytes_needed(4, 8, 1, 4), 2 * 4 * 8 * 4);
        assert_eq!(CachePrecision::Int8.tensor_bytes(4, 8, 4), 4 * (8 + 4));
        // Kept outputs: the latest per sub-module, their peak in bytes.
        let mut inner = pab::Pab::default();
        let mut c = Counting::new(&mut inner, 1);
        let be = crate::backend::cpu::CpuBackend::new();
        c.store(&be, id, SubModule::Mlp, Tensor::zeros(&[4, 8]));
        c.store(&be, id, SubModule::Mlp, Tensor::zeros(&[4, 8]));
        c.store(&be, id, SubModule::SelfAttention, Tensor::zeros(&[2, 8]));
        assert_eq!(c.cache_peak_bytes, 4 * (32 + 16));
    }
}
