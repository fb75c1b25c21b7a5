//! Calibration, first part: activation statistics of every DiT block linear
//! over whole sampling trajectories of a prompt set, and the per-input-channel
//! importance (smoothing) vectors derived from them.
//!
//! A [`RecordingBackend`] runs the full-precision model on the CPU backend and
//! records, for every linear layer it is handed, the largest |x| of each input
//! channel, separately for each timestep range (`ranges` equal parts of the
//! trajectory: early high-noise steps see other activations than late ones).
//!
//! It also keeps a sample of input rows of every layer (a few rows of every
//! call, spread over the trajectory), on which the importance vectors are chosen
//! by measurement.
//!
//! Importance vector (SmoothQuant's migration): `s[k] = max|X[:, k]|^alpha /
//! max|W[:, k]|^(1 - alpha)` over all ranges. The weight is quantized as `W * s`
//! and the activations as `X / s`: input channels with outliers hand part of
//! their range to the weights, so per-token activation scales (8 or 6 bits)
//! keep precision for the other channels; but 4-bit weights have less range
//! to spare than 8-bit ones. So for every layer and every preset, `alpha` is
//! chosen among [`ALPHAS`] and "no vector" by the relative L2 error of the
//! quantized layer's output on the sampled rows against full precision.

use super::plan::{ranges_of_schedule, Plan};
use super::preset::{block_linears, quantize_plan, unit_of, QuantPreset, WeightStats};
use crate::backend::conv::{ConvWeight, Pad3};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Activation, AttnSpec, Backend, ConvOps, Linear, ModRef, PatchGrid, Rope};
use crate::checkpoint::Checkpoint;
use crate::io::write_safetensors;
use crate::model::stdit3::{BlockAction, BlockId, ForwardHooks, NoHooks, StepAction, Stdit3};
use crate::pipeline::{plan, GenerateOptions, ModelPaths};
use crate::rng::Rng;
use crate::sampler::rflow::{guidance_text, guided_velocity, sample, step_sizes, timesteps, RflowConfig, VideoGeometry};
use crate::tensor::Tensor;
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Migration strengths tried for every layer and preset.
pub const ALPHAS: [f32; 4] = [0.15, 0.3, 0.5, 0.7];
/// Input rows kept from each call of a layer, and at most in all.
const ROWS_PER_CALL: usize = 4;
const MAX_ROWS: usize = 1024;

/// Statistics of one linear layer's input.
#[derive(Clone, Debug)]
pub struct LinearStats {
    /// Official parameter name without `.weight`, e.g. `spatial_blocks.0.attn.qkv`.
    pub name: String,
    /// Per-input-channel max |x|, `[ranges][in_features]`.
    pub absmax: Vec<Vec<f32>>,
    /// Sampled input rows, `[rows * in_features]`.
    pub rows: Vec<f32>,
}

#[derive(Default)]
struct Seen {
    absmax: Vec<Vec<f32>>,
    rows: Vec<f32>,
    calls: usize,
}

/// Runs `inner` and records every linear layer's per-channel input maxima,
/// keyed by the layer's address (stable while the model is borrowed).
pub struct RecordingBackend<'a> {
    inner: &'a CpuBackend,
    range: AtomicUsize,
    ranges: usize,
    seen: Mutex<HashMap<usize, Seen>>,
}

impl<'a> RecordingBackend<'a> {
    pub fn new(inner: &'a CpuBackend, ranges: usize) -> Self {
        RecordingBackend { inner, range: AtomicUsize::new(0), ranges, seen: Mutex::new(HashMap::new()) }
    }

    fn record(&self, x: &Tensor, w: &Linear) -> Result<()> {
        let k = w.in_features;
        let xs = x.f32()?;
        let mut m = vec![0f32; k];
        for row in xs.chunks(k) {
            for (mm, v) in m.iter_mut().zip(row) {
                *mm = mm.max(v.abs());
            }
        }
        let range = self.range.load(Ordering::Relaxed);
        let mut seen = self.seen.lock().map_err(|_| anyhow!("calibration statistics lock poisoned"))?;
        let e = seen.entry(w as *const Linear as usize).or_insert_with(|| Seen { absmax: vec![vec![0f32; k]; self.ranges], ..Seen::default() });
        for (a, b) in e.absmax[range].iter_mut().zip(&m) {
            *a = a.max(*b);
        }
        // Evenly spaced rows, the offset moving from call to call.
        let n = xs.len() / k;
        let stride = (n / ROWS_PER_CALL).max(1);
        for i in 0..ROWS_PER_CALL.min(n) {
            if e.rows.len() / k < MAX_ROWS {
                let r = (i * stride + e.calls % stride) % n;
                e.rows.extend_from_slice(&xs[r * k..(r + 1) * k]);
            }
        }
        e.calls += 1;
        Ok(())
    }
}

/// Sets the recording backend's timestep range at every step, and otherwise
/// computes everything (the full-precision trajectory).
struct RangeHooks<'a, 'b> {
    be: &'a RecordingBackend<'b>,
}

impl ForwardHooks for RangeHooks<'_, '_> {
    fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
        self.be.range.store(step * self.be.ranges / steps, Ordering::Relaxed);
        StepAction::Compute
    }
    fn block_action(&mut self, _id: BlockId) -> BlockAction {
        BlockAction::Compute
    }
}

impl ConvOps for RecordingBackend<'_> {
    fn conv2d(&self, x: &Tensor, w: &ConvWeight, pad: [usize; 2]) -> Result<Tensor> {
        self.inner.conv2d(x, w, pad)
    }
    fn conv3d(&self, x: &Tensor, w: &ConvWeight, pad: Pad3) -> Result<Tensor> {
        self.inner.conv3d(x, w, pad)
    }
    fn group_norm(&self, x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f32, act: Activation) -> Result<Tensor> {
        self.inner.group_norm(x, groups, weight, bias, eps, act)
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.upsample_nearest2x(x)
    }
    fn depth_to_time(&self, x: &Tensor, s: usize) -> Result<Tensor> {
        self.inner.depth_to_time(x, s)
    }
    fn channel_affine(&self, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        self.inner.channel_affine(x, scale, shift)
    }
}

impl Backend for RecordingBackend<'_> {
    fn name(&self) -> String {
        format!("{} recording activation statistics", self.inner.name())
    }
    fn prepare_linear(&self, w: &mut Linear) -> Result<()> {
        self.inner.prepare_linear(w)
    }
    fn prepare_tensor(&self, t: &mut Tensor) -> Result<()> {
        self.inner.prepare_tensor(t)
    }
    fn linear(&self, x: &Tensor, w: &Linear, act: Activation) -> Result<Tensor> {
        self.record(x, w)?;
        self.inner.linear(x, w, act)
    }
    fn linear_residual(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<()> {
        self.record(x, w)?;
        self.inner.linear_residual(x, w, residual, gate)
    }
    fn layer_norm_modulate(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>) -> Result<Tensor> {
        self.inner.layer_norm_modulate(x, eps, modulation)
    }
    fn add_gated(&self, x: &mut Tensor, y: &Tensor, gate: Option<ModRef>) -> Result<()> {
        self.inner.add_gated(x, y, gate)
    }
    fn quantize_rows_i8(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner.quantize_rows_i8(y)
    }
    fn add_gated_i8(&self, x: &mut Tensor, q: &Tensor, scales: &Tensor, gate: Option<ModRef>) -> Result<()> {
        self.inner.add_gated_i8(x, q, scales, gate)
    }
    fn l1_distance(&self, a: &Tensor, b: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
        self.inner.l1_distance(a, b, parts)
    }
    fn abs_sum(&self, a: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
        self.inner.abs_sum(a, parts)
    }
    fn qk_norm_rope(&self, x: &mut Tensor, heads: usize, weight: &Tensor, eps: f32, rope: Option<Rope>) -> Result<()> {
        self.inner.qk_norm_rope(x, heads, weight, eps, rope)
    }
    fn split_last(&self, x: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
        self.inner.split_last(x, parts)
    }
    fn swap_middle(&self, x: &Tensor, dims: [usize; 4]) -> Result<Tensor> {
        self.inner.swap_middle(x, dims)
    }
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>) -> Result<Tensor> {
        self.inner.attention(q, k, v, spec, bias)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.inner.mul(a, b)
    }
    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.silu(x)
    }
    fn modulation_table(&self, table: &Tensor, emb: &Tensor) -> Result<Tensor> {
        self.inner.modulation_table(table, emb)
    }
    fn concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        self.inner.concat(parts)
    }
    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.inner.narrow(x, dim, start, len)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.inner.add(a, b)
    }
    fn add_rows_broadcast(&self, x: &mut Tensor, rows_table: &Tensor) -> Result<()> {
        self.inner.add_rows_broadcast(x, rows_table)
    }
    fn select_rows(&self, pick_a: &[bool], group_size: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.inner.select_rows(pick_a, group_size, a, b)
    }
    fn gather_rows(&self, x: &Tensor, indices: &[usize]) -> Result<Tensor> {
        self.inner.gather_rows(x, indices)
    }
    fn timestep_embedding(&self, t: &[f32], dim: usize) -> Result<Tensor> {
        self.inner.timestep_embedding(t, dim)
    }
    fn pos_embed_2d(&self, h: usize, w: usize, dim: usize, scale: f32, base_size: f32) -> Result<Tensor> {
        self.inner.pos_embed_2d(h, w, dim, scale, base_size)
    }
    fn patchify(&self, x: &Tensor, grid: &PatchGrid) -> Result<Tensor> {
        self.inner.patchify(x, grid)
    }
    fn unpatchify(&self, x: &Tensor, grid: &PatchGrid, out_channels: usize) -> Result<Tensor> {
        self.inner.unpatchify(x, grid, out_channels)
    }
    fn guidance(&self, cond: &Tensor, uncond: &Tensor, scale: f32) -> Result<Tensor> {
        self.inner.guidance(cond, uncond, scale)
    }
    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        self.inner.axpby(a, x, b, y)
    }
    fn euler_step(&self, z: &mut Tensor, v: &Tensor, dt: &[f32]) -> Result<()> {
        self.inner.euler_step(z, v, dt)
    }
}

/// Runs the full-precision model over the whole sampling trajectory of every
/// prompt (one at a time, `seeds` noises each) and returns the statistics of
/// every block linear, in [`block_linears`] order.
pub fn collect_stats(paths: &ModelPaths, prompts: &[String], opts: &GenerateOptions, seeds: &[u64], ranges: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<LinearStats>> {
    ensure!(!prompts.is_empty(), "calibration needs at least one prompt");
    ensure!(!seeds.is_empty(), "calibration needs at least one seed");
    ensure!(ranges >= 1 && ranges <= opts.steps, "--ranges {ranges}: the timestep ranges must be between 1 and the number of steps (--steps {})", opts.steps);
    let cpu = CpuBackend::new();
    let rec = RecordingBackend::new(&cpu, ranges);
    let mut dit = Stdit3::load(plan(paths, &prompts[..1], opts)?.dit_dir())?;
    dit.prepare(&cpu)?;
    let total = prompts.len() * seeds.len();
    for (i, prompt) in prompts.iter().enumerate() {
        let text = PromptText::encode(&cpu, paths, prompt, opts)?;
        for (j, &seed) in seeds.iter().enumerate() {
            text.trajectory(&rec, &dit, opts, seed, &mut RangeHooks { be: &rec }).with_context(|| format!("calibration prompt {prompt:?}"))?;
            progress(i * seeds.len() + j + 1, total);
        }
    }
    let mut seen = rec.seen.into_inner().map_err(|_| anyhow!("calibration statistics lock poisoned"))?;
    block_linears(&mut dit)
        .into_iter()
        .map(|(name, l)| {
            let e = seen.remove(&(l as *const Linear as usize)).ok_or_else(|| anyhow!("calibration: {name} was never run"))?;
            Ok(LinearStats { name, absmax: e.absmax, rows: e.rows })
        })
        .collect()
}

/// The importance vector of one linear layer from its input maxima (over all
/// ranges) and its float weight `[n, k]`: `max|X_k|^alpha / max|W_k|^(1 - alpha)`,
/// with both maxima floored at 1e-5 so that dead channels stay finite.
pub fn importance_vector(stats: &LinearStats, w: &[f32], k: usize, alpha: f32) -> Vec<f32> {
    let mut wmax = vec![0f32; k];
    for row in w.chunks(k) {
        for (m, v) in wmax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    (0..k)
        .map(|kk| {
            let xmax = stats.absmax.iter().fold(0f32, |m, r| m.max(r[kk])).max(1e-5);
            xmax.powf(alpha) / wmax[kk].max(1e-5).powf(1.0 - alpha)
        })
        .collect()
}

/// Relative L2 error of `layer` at `preset` (with `smooth` folded in) against
/// the float layer, on the sampled rows `x` (`[rows, k]`).
fn output_error(be: &CpuBackend, layer: &Linear, x: &Tensor, reference: &[f32], preset: QuantPreset, smooth: Option<&[f32]>, act_sq: &[f32]) -> Result<f64> {
    let q = preset.apply_calibrated(layer, smooth, Some(act_sq), Some(x.f32()?))?;
    let y = be.linear(x, &q, Activation::None)?;
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in y.f32()?.iter().zip(reference) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    Ok((num / den.max(1e-30)).sqrt())
}

/// The choice made for one layer at one preset.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Choice {
    /// `None`: no importance vector (it did not lower the error).
    pub alpha: Option<f32>,
    pub rel_error: f64,
    pub rel_error_plain: f64,
}

/// The importance vectors of every block linear for each quantized preset, by
/// `NAME.importance.PRESET`, with the calibration's description (`quant.json`).
#[derive(Clone, Debug)]
pub struct Importance {
    pub vectors: HashMap<String, Vec<f32>>,
    /// Per block linear, the mean square of each input channel over the sampled
    /// rows (`NAME.act_sq_mean`): the weights of the 4-bit clip search.
    pub act_sq: HashMap<String, Vec<f32>>,
    /// Per block linear, the sampled input rows, during calibration only (not
    /// written): 4-bit layers are rounded by GPTQ on them when present.
    pub rows: HashMap<String, Vec<f32>>,
    pub meta: serde_json::Value,
    /// The DiT of the quantized checkpoint this directory holds (`stdit3/`), if any.
    pub quantized_dit: Option<std::path::PathBuf>,
    /// The aigq plan (`quant.json` `"plan"`): a precision per block sub-module and timestep range.
    pub plan: Option<Plan>,
    /// Where it was read from (for messages).
    pub source: String,
}

/// File names inside a calibration directory.
pub const QUANT_JSON: &str = "quant.json";
pub const IMPORTANCE_FILE: &str = "importance.safetensors";
/// Suffix of the input channels' mean squares in [`IMPORTANCE_FILE`].
const ACT_SQ_SUFFIX: &str = ".act_sq_mean";
/// `quant.json`'s format tag.
pub const FORMAT: &str = "quantcache-calibration";
/// The presets importance vectors are chosen for.
pub const PRESETS: [QuantPreset; 3] = [QuantPreset::W8A8, QuantPreset::W4A8, QuantPreset::W4A6];

impl Importance {
    pub fn key(name: &str, preset: QuantPreset) -> String {
        format!("{name}.importance.{}", preset.name())
    }

    /// For every block linear and preset, the importance vector (or none) with the
    /// least output error on the sampled rows; `meta` gains the choices (`"layers"`).
    pub fn choose(model: &mut Stdit3, stats: &[LinearStats], mut meta: serde_json::Value, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let be = CpuBackend::new();
        let mut vectors = HashMap::new();
        let mut act_sq = HashMap::new();
        let mut layer_rows = HashMap::new();
        let mut layers = serde_json::Map::new();
        let linears = block_linears(model);
        let total = linears.len();
        for (li, (name, l)) in linears.into_iter().enumerate() {
            let st = stats.iter().find(|s| s.name == name).ok_or_else(|| anyhow!("calibration statistics lack {name}"))?;
            let k = l.in_features;
            ensure!(st.absmax.iter().all(|r| r.len() == k) && st.rows.len() % k == 0 && !st.rows.is_empty(), "calibration statistics of {name} do not fit [{}, {k}]", l.out_features);
            let w = l.float_weight().with_context(|| format!("calibration: {name}"))?;
            let x = Tensor::from_f32(&[st.rows.len() / k, k], st.rows.clone())?;
            let reference = be.linear(&x, l, Activation::None)?.f32()?.to_vec();
            let mut sq = vec![0f64; k];
            for row in st.rows.chunks(k) {
                for (a, v) in sq.iter_mut().zip(row) {
                    *a += (*v as f64).powi(2);
                }
            }
            let rows = (st.rows.len() / k) as f64;
            let sq: Vec<f32> = sq.iter().map(|v| (v / rows) as f32).collect();
            let candidates: Vec<(f32, Vec<f32>)> = ALPHAS.iter().map(|&a| (a, importance_vector(st, &w, k, a))).collect();
            let mut per_preset = serde_json::Map::new();
            for preset in PRESETS {
                let plain = output_error(&be, l, &x, &reference, preset, None, &sq)?;
                let mut best = Choice { alpha: None, rel_error: plain, rel_error_plain: plain };
                for (a, v) in &candidates {
                    let e = output_error(&be, l, &x, &reference, preset, Some(v), &sq)?;
                    if e < best.rel_error {
                        best = Choice { alpha: Some(*a), rel_error: e, rel_error_plain: plain };
                    }
                }
                if let Some(a) = best.alpha {
                    let v = &candidates.iter().find(|c| c.0 == a).expect("chosen among the candidates").1;
                    vectors.insert(Self::key(&name, preset), v.clone());
                }
                per_preset.insert(preset.name().to_string(), serde_json::to_value(&best)?);
            }
            layers.insert(name.clone(), serde_json::Value::Object(per_preset));
            act_sq.insert(name.clone(), sq);
            layer_rows.insert(name, st.rows.clone());
            progress(li + 1, total);
        }
        meta["layers"] = serde_json::Value::Object(layers);
        Ok(Importance { vectors, act_sq, rows: layer_rows, meta, plan: None, source: "this calibration".into(), quantized_dit: None })
    }

    /// The input channels' mean squares of block linear `name`.
    pub fn act_sq(&self, name: &str) -> Option<&[f32]> {
        self.act_sq.get(name).map(|v| v.as_slice())
    }

    /// The sampled input rows of block linear `name` (during calibration).
    pub fn rows(&self, name: &str) -> Option<&[f32]> {
        self.rows.get(name).map(|v| v.as_slice())
    }

    /// The vector for `name` at `preset`, if the calibration chose one.
    pub fn get(&self, name: &str, preset: QuantPreset) -> Option<&[f32]> {
        self.vectors.get(&Self::key(name, preset)).map(|v| v.as_slice())
    }

    /// Writes `dir` (`quant.json`, and `importance.safetensors` with
    /// `NAME.importance.PRESET` `[k]`, `NAME.act_absmax` `[ranges, k]` and `NAME.act_sq_mean` `[k]`) through a
    /// temporary directory renamed at the end, so a failure leaves no half-written
    /// directory. `fill` adds more to the temporary directory before the rename (a
    /// quantized checkpoint's DiT and components). An earlier calibration directory
    /// is replaced; any other existing path is refused.
    pub fn write_dir(&self, stats: &[LinearStats], dir: &Path, fill: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
        if dir.exists() {
            ensure!(dir.join(QUANT_JSON).is_file(), "{} exists and is not a calibration directory (no {QUANT_JSON}): refusing to overwrite it", dir.display());
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dir.file_name().with_context(|| format!("{} is not a directory path", dir.display()))?.to_string_lossy().to_string();
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let result = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut tensors = Vec::new();
            for st in stats {
                let k = st.absmax.first().map_or(0, |r| r.len());
                tensors.push((format!("{}.act_absmax", st.name), Tensor::from_f32(&[st.absmax.len(), k], st.absmax.concat())?));
            }
            let mut names: Vec<&String> = self.act_sq.keys().collect();
            names.sort();
            for name in names {
                let v = &self.act_sq[name];
                tensors.push((format!("{name}{ACT_SQ_SUFFIX}"), Tensor::from_f32(&[v.len()], v.clone())?));
            }
            let mut keys: Vec<&String> = self.vectors.keys().collect();
            keys.sort();
            for key in keys {
                let v = &self.vectors[key];
                tensors.push((key.clone(), Tensor::from_f32(&[v.len()], v.clone())?));
            }
            write_safetensors(&tmp.join(IMPORTANCE_FILE), &tensors, None)?;
            std::fs::write(tmp.join(QUANT_JSON), serde_json::to_string_pretty(&self.meta)? + "\n")?;
            fill(&tmp)?;
            if dir.exists() {
                std::fs::rename(dir, &old)?;
            }
            std::fs::rename(&tmp, dir)?;
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.with_context(|| format!("writing calibration directory {}", dir.display()))
    }

    /// Reads a calibration directory written by [`Importance::write_dir`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let qj = dir.join(QUANT_JSON);
        let text = std::fs::read_to_string(&qj).with_context(|| format!("{} is not a calibration directory: cannot read {}", dir.display(), qj.display()))?;
        let meta: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", qj.display()))?;
        ensure!(meta.get("format").and_then(|f| f.as_str()) == Some(FORMAT), "{}: field \"format\" must be {FORMAT:?}", qj.display());
        let file = dir.join(IMPORTANCE_FILE);
        let ck = Checkpoint::open_file(&file)?;
        let mut vectors = HashMap::new();
        let mut act_sq = HashMap::new();
        for key in ck.names().filter(|n| n.ends_with(ACT_SQ_SUFFIX)).map(String::from).collect::<Vec<_>>() {
            let v = ck.load_f32(&key)?.f32()?.to_vec();
            ensure!(v.iter().all(|x| x.is_finite() && *x >= 0.0), "{}: {key} must be non-negative and finite", file.display());
            act_sq.insert(key.trim_end_matches(ACT_SQ_SUFFIX).to_string(), v);
        }
        for key in ck.names().filter(|n| n.contains(".importance.")).map(String::from).collect::<Vec<_>>() {
            let v = ck.load_f32(&key)?.f32()?.to_vec();
            ensure!(v.iter().all(|x| x.is_finite() && *x > 0.0), "{}: {key} must be positive and finite", file.display());
            vectors.insert(key, v);
        }
        let plan = match meta.get("plan") {
            None | Some(serde_json::Value::Null) => None,
            Some(p) => Some(Plan::from_json(p, &qj.display().to_string())?),
        };
        let dit = dir.join("stdit3");
        let quantized_dit = dit.join("model.safetensors").is_file().then_some(dit);
        Ok(Importance { vectors, act_sq, rows: HashMap::new(), meta, plan, source: dir.display().to_string(), quantized_dit })
    }
}

/// Precisions the aigq plan chooses from, most precise first.
pub const PLAN_CHOICES: [QuantPreset; 4] = [QuantPreset::None, QuantPreset::W8A8, QuantPreset::W4A8, QuantPreset::W4A6];

/// One decision of the allocation: a block sub-module in some timestep ranges
/// (the cross-attention decides once for the whole trajectory: its keys and
/// values are projected once per prompt, before the first step).
#[derive(Clone, Debug)]
pub struct PlanItem {
    /// `spatial_blocks.3.attn`, ...
    pub unit: String,
    /// The timestep ranges this decision covers.
    pub ranges: Vec<usize>,
    /// Weight values of the sub-module's linears.
    pub values: usize,
    /// Share of the trajectory's steps in `ranges`.
    pub step_fraction: f64,
    /// Storage bits of the sub-module at each of [`PLAN_CHOICES`], scales and
    /// importance vectors included (full precision as the checkpoint holds it).
    pub bits: [f64; 4],
    /// Relative L2 change of the final latent at each choice (0 at full precision).
    pub sensitivity: [f64; 4],
}

/// Storage bits of layer `l`'s weight at `preset`, scales included (full
/// precision as the checkpoint holds it: f32 or bf16).
fn storage_bits(preset: QuantPreset, l: &Linear) -> f64 {
    let (n, k) = (l.out_features, l.in_features);
    let bytes = match preset {
        QuantPreset::W8A8 => n * k + 4 * n,
        QuantPreset::W4A8 | QuantPreset::W4A6 => n * k.div_ceil(2) + 4 * n * k.div_ceil(super::int4::W4_GROUP),
        QuantPreset::None | QuantPreset::Aigq => WeightStats::bytes_of(l),
    };
    8.0 * bytes as f64
}

/// One prompt's caption input, token mask and latent size.
struct PromptText {
    y: Tensor,
    mask: Vec<i64>,
    latent: [usize; 3],
}

impl PromptText {
    fn encode(be: &dyn Backend, paths: &ModelPaths, prompt: &str, opts: &GenerateOptions) -> Result<Self> {
        let p = plan(paths, &[prompt.to_string()], opts)?;
        let (y, mask) = p.encode_text(be)?;
        Ok(PromptText { y, mask, latent: p.latent() })
    }

    /// The whole sampling trajectory from the noise of `seed`; returns the final latent.
    fn trajectory(&self, be: &dyn Backend, dit: &Stdit3, opts: &GenerateOptions, seed: u64, hooks: &mut dyn ForwardHooks) -> Result<Tensor> {
        let [lt, lh, lw] = self.latent;
        let c = dit.cfg.in_channels;
        let z0 = Tensor::from_f32(&[1, c, lt, lh, lw], Rng::new(seed).normal_vec(c * lt * lh * lw))?;
        let (rf, geo) = schedule(opts);
        Ok(sample(be, dit, &rf, &z0, &self.y, Some(&self.mask), &geo, hooks, &mut |_, _| {})?.0)
    }
}

/// The sampler settings and video geometry of `opts` for one sample.
fn schedule(opts: &GenerateOptions) -> (RflowConfig, VideoGeometry) {
    let rf = RflowConfig { num_steps: opts.steps, cfg_scale: opts.cfg, use_timestep_transform: opts.timestep_transform, ..RflowConfig::default() };
    let geo = VideoGeometry { height: vec![opts.height as f32], width: vec![opts.width as f32], num_frames: vec![opts.frames as f32], fps: vec![opts.fps] };
    (rf, geo)
}

/// Boundaries and step shares of `ranges` equal parts of `opts`'s sampling schedule.
pub fn schedule_ranges(opts: &GenerateOptions, ranges: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    let (rf, geo) = schedule(opts);
    let ts: Vec<f32> = timesteps(&rf, &geo)?.into_iter().map(|t| t[0]).collect();
    ranges_of_schedule(&ts, ranges)
}

/// The allocation's decisions for `model`'s sub-modules over timestep ranges
/// with step shares `fractions`, with their storage at each choice (scales and
/// `importance`'s vectors included).
fn plan_items(model: &mut Stdit3, fractions: &[f64], importance: &Importance) -> Vec<PlanItem> {
    let mut items: Vec<PlanItem> = Vec::new();
    for (name, l) in block_linears(model) {
        let unit = unit_of(&name).to_string();
        let mut bits = [0f64; 4];
        for (b, p) in bits.iter_mut().zip(PLAN_CHOICES) {
            // A folded importance vector is stored (inverted) beside the weight.
            let vector = if importance.get(&name, p).is_some() { 32.0 * l.in_features as f64 } else { 0.0 };
            *b = storage_bits(p, l) + vector;
        }
        let whole = unit.ends_with(".cross_attn");
        let decisions: Vec<Vec<usize>> = if whole { vec![(0..fractions.len()).collect()] } else { (0..fractions.len()).map(|r| vec![r]).collect() };
        for ranges in decisions {
            match items.iter_mut().find(|it| it.unit == unit && it.ranges == ranges) {
                Some(it) => {
                    it.values += l.out_features * l.in_features;
                    for (a, b) in it.bits.iter_mut().zip(bits) {
                        *a += b;
                    }
                }
                None => {
                    let step_fraction = ranges.iter().map(|&r| fractions[r]).sum();
                    items.push(PlanItem { unit: unit.clone(), ranges, values: l.out_features * l.in_features, step_fraction, bits, sensitivity: [0.0; 4] });
                }
            }
        }
    }
    items
}

/// The plan giving each item the choice `level[i]` (an index into [`PLAN_CHOICES`]).
fn plan_of(items: &[PlanItem], level: &[usize], boundaries: &[f32], fractions: &[f64]) -> Plan {
    let mut units: BTreeMap<String, Vec<QuantPreset>> = BTreeMap::new();
    for (it, &l) in items.iter().zip(level) {
        let v = units.entry(it.unit.clone()).or_insert_with(|| vec![QuantPreset::None; fractions.len()]);
        for &r in &it.ranges {
            v[r] = PLAN_CHOICES[l];
        }
    }
    Plan { boundaries: boundaries.to_vec(), step_fractions: fractions.to_vec(), units }
}

/// One prompt's full-precision trajectory: the latent each step started from,
/// the guided velocity it computed there, and each step's Euler step size.
struct Reference {
    zs: Vec<Tensor>,
    vs: Vec<Vec<f32>>,
    dts: Vec<f32>,
    /// Sum of squares of the final latent.
    energy: f64,
}

impl PromptText {
    /// The trajectory of `dit` from the noise of `seed`, step by step as the sampler runs it.
    fn reference(&self, be: &dyn Backend, dit: &Stdit3, opts: &GenerateOptions, seed: u64) -> Result<Reference> {
        let [lt, lh, lw] = self.latent;
        let c = dit.cfg.in_channels;
        let mut z = Tensor::from_f32(&[1, c, lt, lh, lw], Rng::new(seed).normal_vec(c * lt * lh * lw))?;
        let (rf, geo) = schedule(opts);
        let ts = timesteps(&rf, &geo)?;
        let text = guidance_text(be, dit, &self.y, Some(&self.mask), &mut NoHooks)?;
        let (mut zs, mut vs, mut dts) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..ts.len() {
            let v = guided_velocity(be, dit, &text, &z, &[ts[i][0]; 2], &geo, rf.cfg_scale, &mut NoHooks)?;
            let dt = step_sizes(&ts, i, rf.num_timesteps);
            zs.push(z.clone());
            be.euler_step(&mut z, &v, &dt)?;
            vs.push(v.f32()?.to_vec());
            dts.push(dt[0]);
        }
        let energy = z.f32()?.iter().map(|v| (*v as f64).powi(2)).sum();
        Ok(Reference { zs, vs, dts, energy })
    }

    /// How far `dit`'s velocities move the latent, against the reference's, at
    /// the reference's own latents of steps `steps` (teacher forcing: no
    /// compounding along the trajectory, so decisions add up): the sum over
    /// those steps of `|dt * (v' - v)|^2`, relative to the final latent's energy.
    fn displacement(&self, be: &dyn Backend, dit: &Stdit3, opts: &GenerateOptions, r: &Reference, steps: &[(usize, f64)]) -> Result<f64> {
        let (rf, geo) = schedule(opts);
        let ts = timesteps(&rf, &geo)?;
        let text = guidance_text(be, dit, &self.y, Some(&self.mask), &mut NoHooks)?;
        let mut sum = 0f64;
        for &(i, weight) in steps {
            let v = guided_velocity(be, dit, &text, &r.zs[i], &[ts[i][0]; 2], &geo, rf.cfg_scale, &mut NoHooks)?;
            let d = r.dts[i] as f64;
            sum += weight * v.f32()?.iter().zip(&r.vs[i]).map(|(a, b)| (d * (*a as f64 - *b as f64)).powi(2)).sum::<f64>();
        }
        Ok(sum / r.energy.max(1e-30))
    }
}

/// Sensitivity of every allocation decision (a block sub-module in its timestep
/// ranges) at every quantized choice of [`PLAN_CHOICES`] down to `lowest` (an
/// index into it; the choices below stay unmeasured, NaN): with only that
/// sub-module quantized (with its importance vectors) and only in those ranges,
/// how far its guided velocities move the latent at the full-precision
/// trajectory's steps of those ranges ([`PromptText::displacement`]), averaged
/// over `prompts` (seed `seed`). No gradients: one forward per step of the
/// decision's ranges, per choice and prompt. With `step_weights` (a caching
/// schedule's, [`crate::cache::calibrate::serving_weights`]) each step's
/// displacement is weighted, and steps of weight 0 (served from the cache, never
/// computed) are not measured.
#[allow(clippy::too_many_arguments)]
pub fn measure_sensitivity(paths: &ModelPaths, prompts: &[String], opts: &GenerateOptions, seed: u64, ranges: usize, importance: &Importance, step_weights: Option<&[f64]>, lowest: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<(Vec<PlanItem>, Vec<f32>, Vec<f64>)> {
    ensure!(step_weights.is_none_or(|w| w.len() == opts.steps), "step weights for {} steps, calibration runs {}", step_weights.map_or(0, |w| w.len()), opts.steps);
    ensure!(!prompts.is_empty(), "sensitivity needs at least one prompt");
    ensure!((1..PLAN_CHOICES.len()).contains(&lowest), "sensitivity: the lowest precision must be one of the quantized choices");
    let (boundaries, fractions) = schedule_ranges(opts, ranges)?;
    let be = CpuBackend::new();
    let mut base = Stdit3::load(plan(paths, &prompts[..1], opts)?.dit_dir())?;
    base.prepare(&be)?;
    let texts: Vec<PromptText> = prompts.iter().map(|p| PromptText::encode(&be, paths, p, opts)).collect::<Result<_>>()?;
    let references: Vec<Reference> = texts.iter().map(|t| t.reference(&be, &base, opts, seed)).collect::<Result<_>>()?;
    let mut items = plan_items(&mut base, &fractions, importance);
    let total = items.len() * lowest;
    for it in &mut items {
        it.sensitivity[lowest + 1..].fill(f64::NAN);
    }
    for i in 0..items.len() {
        let steps: Vec<(usize, f64)> = (0..opts.steps)
            .filter(|s| items[i].ranges.contains(&(s * ranges / opts.steps)))
            .map(|s| (s, step_weights.map_or(1.0, |w| w[s])))
            .filter(|s| s.1 > 0.0)
            .collect();
        for c in 1..=lowest {
            let mut level = vec![0; items.len()];
            level[i] = c;
            let mut dit = base.clone();
            quantize_plan(&mut dit, &plan_of(&items, &level, &boundaries, &fractions), Some(importance))?;
            let mut sum = 0f64;
            for (t, r) in texts.iter().zip(&references) {
                sum += t.displacement(&be, &dit, opts, r, &steps)?;
            }
            items[i].sensitivity[c] = sum / prompts.len() as f64;
            progress(i * lowest + c, total);
        }
    }
    Ok((items, boundaries, fractions))
}

/// The aigq allocation: every decision starts at full precision; while the
/// step-weighted average storage bits per weight (scales included) exceed
/// `budget`, the decision whose next step down [`PLAN_CHOICES`] (down to
/// `lowest`, an index into it) costs the least sensitivity per bit saved steps
/// down (a step that saves no bits, w4a8 to w4a6, is taken only when it
/// measured less sensitive). Returns the plan and its bits.
pub fn allocate(items: &[PlanItem], boundaries: &[f32], fractions: &[f64], budget: f64, lowest: usize) -> Result<(Plan, f64)> {
    ensure!(!items.is_empty(), "aigq: no sub-modules to allocate");
    ensure!((1..PLAN_CHOICES.len()).contains(&lowest), "aigq: the lowest precision must be one of the quantized choices");
    // One set of weights' values (every item of a unit covers its values once per range).
    let total: f64 = items.iter().map(|it| it.values as f64 * it.step_fraction).sum();
    let last = lowest;
    let bits = |level: &[usize]| items.iter().zip(level).map(|(it, &l)| it.bits[l] * it.step_fraction).sum::<f64>() / total;
    // The fewest bits: each decision at its smallest choice down to `lowest` (w4a6 stores as w4a8).
    let least: Vec<usize> = items.iter().map(|it| (1..=last).min_by(|&a, &b| it.bits[a].total_cmp(&it.bits[b])).unwrap_or(1)).collect();
    let (lo, hi) = (bits(&least), bits(&vec![0; items.len()]));
    ensure!(budget.is_finite() && budget >= lo - 1e-9, "--budget {budget}: no allocation can meet it; reachable average weight bits (scales included) are {lo:.2} to {hi:.2}");
    let mut level = vec![0usize; items.len()];
    while bits(&level) > budget + 1e-9 {
        let best = (0..items.len())
            .filter(|&i| level[i] < last)
            .filter_map(|i| {
                let (l, x) = (level[i], &items[i]);
                let saved = (x.bits[l] - x.bits[l + 1]) * x.step_fraction;
                let cost = x.sensitivity[l + 1] - x.sensitivity[l];
                match saved > 0.0 {
                    true => Some((i, cost.max(0.0) / saved)),
                    false => (cost < 0.0).then_some((i, 0.0)),
                }
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((i, _)) => level[i] += 1,
            None => break,
        }
    }
    Ok((plan_of(items, &level, boundaries, fractions), bits(&level)))
}
