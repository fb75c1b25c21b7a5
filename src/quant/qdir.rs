//! The quantized checkpoint: a model directory whose DiT holds the block
//! linears already quantized by an aigq plan (written by `qc-run calibrate
//! --budget`, loaded by `--model QDIR` without the float weights).
//!
//! `QDIR/stdit3/model.safetensors` holds every tensor of the float checkpoint
//! under its official name, except the weights of quantized block linears:
//! - int8 (w8a8): `NAME.weight` I8 `[N, K]`, `NAME.weight_scale` F32 `[N]`;
//! - int4 (w4a8, w4a6): `NAME.weight` U8 `[N, ceil(K / 2)]` (nibbles `q + 8`,
//!   the layout of `kernels/qc_types.h`), `NAME.weight_scale` F32 `[N, ceil(K / 64)]`;
//! - with an importance vector folded in: `NAME.input_scale_inv` F32 `[K]`
//!   (its inverse, which scales the activations as they are quantized).
//!
//! Timestep ranges whose precisions differ from the first range's are
//! *phases* (the model's per-range weight sets). A layer held at another
//! precision in some phase is stored once more per such precision under the
//! prefix `PRECISION.` (`w4a8.NAME.weight`, ...; a float one as
//! `none.NAME.weight` in the checkpoint's dtype); biases are shared. The
//! safetensors metadata says how to read it: `quantcache.format` (= [`FORMAT`]),
//! `quantcache.layers` (JSON: each quantized layer of the first range, `NAME`,
//! and each layer that phase `i` holds otherwise, `phase{i}.NAME`, -> its
//! precision), `quantcache.phases` (JSON: the timestep below which each phase
//! applies) and `quantcache.plan` (the plan, `quant.json`'s `"plan"`).

use super::int4::Int4Weight;
use super::int8::{Int8Weight, QMAX_A6, QMAX_A8};
use super::plan::Plan;
use super::preset::{linears_of, QuantPreset};
use crate::backend::{Linear, LinearWeight};
use crate::checkpoint::Checkpoint;
use crate::io::write_safetensors;
use crate::model::stdit3::{Phase, Stdit3};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const FORMAT: &str = "quantcache-quantized-stdit3-v1";
const FORMAT_KEY: &str = "quantcache.format";
const LAYERS_KEY: &str = "quantcache.layers";
const PHASES_KEY: &str = "quantcache.phases";
const PLAN_KEY: &str = "quantcache.plan";

/// The precision a linear layer is held at.
pub fn precision_of(l: &Linear) -> Result<QuantPreset> {
    Ok(match &l.weight {
        LinearWeight::F32(_) | LinearWeight::Half(_) => QuantPreset::None,
        LinearWeight::Int8(q) if q.act_qmax == QMAX_A8 => QuantPreset::W8A8,
        LinearWeight::Int4(q) if q.act_qmax == QMAX_A8 => QuantPreset::W4A8,
        LinearWeight::Int4(q) if q.act_qmax == QMAX_A6 => QuantPreset::W4A6,
        LinearWeight::Int8(_) => bail!("int8 weights with 6-bit activations are not one of the plan's precisions"),
        LinearWeight::Int4(q) => bail!("int4 weights with activation qmax {} are not one of the plan's precisions", q.act_qmax),
    })
}

/// How a quantized checkpoint's DiT is stored (its safetensors metadata).
#[derive(Clone, Debug)]
pub struct Layout {
    /// Stored layer (`spatial_blocks.0.attn.qkv`, `phase1.spatial_blocks.0.attn.qkv`) -> precision.
    pub layers: BTreeMap<String, QuantPreset>,
    /// Timestep below which phase `i + 1` applies, descending.
    pub phases: Vec<f32>,
    pub plan: Plan,
}

impl Layout {
    /// The layout of `ck`, or `None` for a float checkpoint.
    pub fn of(ck: &Checkpoint) -> Result<Option<Self>> {
        let meta = ck.metadata();
        let Some(format) = meta.get(FORMAT_KEY) else { return Ok(None) };
        let file = ck.dir().join("model.safetensors").display().to_string();
        ensure!(format == FORMAT, "{file}: metadata {FORMAT_KEY} is {format:?}; this engine reads {FORMAT:?}");
        let field = |key: &str| -> Result<serde_json::Value> {
            let text = meta.get(key).ok_or_else(|| anyhow!("{file}: metadata {key} is missing"))?;
            serde_json::from_str(text).with_context(|| format!("{file}: metadata {key} is not valid JSON"))
        };
        let mut layers = BTreeMap::new();
        for (name, p) in field(LAYERS_KEY)?.as_object().ok_or_else(|| anyhow!("{file}: metadata {LAYERS_KEY} must be an object"))? {
            let p = p.as_str().ok_or_else(|| anyhow!("{file}: metadata {LAYERS_KEY}.{name} must be a precision name"))?;
            let preset = QuantPreset::parse(p).with_context(|| format!("{file}: metadata {LAYERS_KEY}.{name}"))?;
            ensure!(preset != QuantPreset::Aigq, "{file}: metadata {LAYERS_KEY}.{name} must be one precision");
            layers.insert(name.clone(), preset);
        }
        let phases: Vec<f32> = field(PHASES_KEY)?
            .as_array()
            .ok_or_else(|| anyhow!("{file}: metadata {PHASES_KEY} must be an array of timesteps"))?
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| anyhow!("{file}: metadata {PHASES_KEY} must hold numbers")))
            .collect::<Result<_>>()?;
        ensure!(phases.windows(2).all(|w| w[0] > w[1]), "{file}: metadata {PHASES_KEY} must be descending");
        let plan = Plan::from_json(&field(PLAN_KEY)?, &format!("{file}: metadata {PLAN_KEY}"))?;
        Ok(Some(Layout { layers, phases, plan }))
    }
}

/// Reads stored layer `stored` at `precision` as an `[out, inp]` linear with `bias`.
pub fn read_linear(ck: &Checkpoint, stored: &str, precision: QuantPreset, out: usize, inp: usize, bias: Option<Tensor>) -> Result<Linear> {
    let file = || ck.dir().join("model.safetensors").display().to_string();
    let expect = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = ck.load_any(name)?;
        ensure!(t.shape() == shape, "{}: tensor {name} has shape {:?}, expected {shape:?}", file(), t.shape());
        Ok(t)
    };
    let inv_smooth = match ck.contains(&format!("{stored}.input_scale_inv")) {
        true => Some(expect(&format!("{stored}.input_scale_inv"), &[inp])?.f32()?.to_vec()),
        false => None,
    };
    let weight = match precision {
        QuantPreset::None => return Linear::new(expect(&format!("{stored}.weight"), &[out, inp])?, bias),
        QuantPreset::W8A8 => {
            let q = match expect(&format!("{stored}.weight"), &[out, inp])?.storage() {
                crate::tensor::Storage::I8(v) => v.clone(),
                _ => bail!("{}: tensor {stored}.weight must be I8 for w8a8", file()),
            };
            let scale = expect(&format!("{stored}.weight_scale"), &[out])?.f32()?.to_vec();
            LinearWeight::Int8(Arc::new(Int8Weight::from_parts(q, scale, out, inp, inv_smooth, QMAX_A8).with_context(|| format!("{}: layer {stored}", file()))?))
        }
        QuantPreset::W4A8 | QuantPreset::W4A6 => {
            let packed = match expect(&format!("{stored}.weight"), &[out, inp.div_ceil(2)])?.storage() {
                crate::tensor::Storage::U8(v) => v.clone(),
                _ => bail!("{}: tensor {stored}.weight must be U8 (packed int4) for {}", file(), precision.name()),
            };
            let scale = expect(&format!("{stored}.weight_scale"), &[out, inp.div_ceil(super::int4::W4_GROUP)])?.f32()?.to_vec();
            let qmax = if precision == QuantPreset::W4A8 { QMAX_A8 } else { QMAX_A6 };
            LinearWeight::Int4(Arc::new(Int4Weight::from_parts(packed, scale, out, inp, inv_smooth, qmax).with_context(|| format!("{}: layer {stored}", file()))?))
        }
        QuantPreset::Aigq => bail!("{}: layer {stored}: aigq is not one precision", file()),
    };
    if let Some(b) = &bias {
        ensure!(b.shape() == [out], "{}: bias of {stored} must be [{out}]", file());
    }
    Ok(Linear { weight, bias, in_features: inp, out_features: out })
}

/// The tensors that store `l`'s weight under `stored` (its float weight is
/// `float`, the checkpoint's tensor in its own dtype).
fn weight_tensors(stored: &str, l: &Linear, float: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let (n, k) = (l.out_features, l.in_features);
    let mut out = Vec::new();
    let inv = match &l.weight {
        LinearWeight::F32(_) | LinearWeight::Half(_) => {
            out.push((format!("{stored}.weight"), float.clone()));
            None
        }
        LinearWeight::Int8(q) => {
            out.push((format!("{stored}.weight"), Tensor::new(&[n, k], crate::tensor::Storage::I8(q.row_major()))?));
            out.push((format!("{stored}.weight_scale"), Tensor::from_f32(&[n], q.scale.clone())?));
            q.inv_smooth.as_ref()
        }
        LinearWeight::Int4(q) => {
            out.push((format!("{stored}.weight"), Tensor::new(&[n, k.div_ceil(2)], crate::tensor::Storage::U8(q.packed()))?));
            out.push((format!("{stored}.weight_scale"), Tensor::from_f32(&[n, q.groups], q.scale.clone())?));
            q.inv_smooth.as_ref()
        }
    };
    if let Some(v) = inv {
        out.push((format!("{stored}.input_scale_inv"), Tensor::from_f32(&[k], v.clone())?));
    }
    Ok(out)
}

/// Writes `model` (block linears quantized by `plan`, see [`super::preset::quantize_plan`])
/// as a DiT directory `dir` (`config.json` and `model.safetensors`), taking the
/// float tensors from the checkpoint in `float_dit`.
pub fn write_dit(model: &mut Stdit3, plan: &Plan, float_dit: &Path, dir: &Path) -> Result<()> {
    let ck = Checkpoint::open_dir(float_dit)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(float_dit.join("config.json"), dir.join("config.json")).with_context(|| format!("copying {}", float_dit.join("config.json").display()))?;
    let mut layers = BTreeMap::new();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut replaced = BTreeSet::new();
    let base: Vec<(String, Linear)> = linears_of(&mut model.w.spatial, &mut model.w.temporal).into_iter().map(|(n, l)| (n, l.clone())).collect();
    let mut base_precision = HashMap::new();
    for (name, l) in &base {
        let p = precision_of(l).with_context(|| format!("layer {name}"))?;
        base_precision.insert(name.clone(), p);
        if p != QuantPreset::None {
            tensors.extend(weight_tensors(name, l, &ck.load_native(&format!("{name}.weight"))?)?);
            layers.insert(name.clone(), p);
            replaced.insert(format!("{name}.weight"));
        }
    }
    let mut phases = Vec::new();
    for (i, phase) in model.phases.iter_mut().enumerate() {
        for (name, l) in linears_of(&mut phase.spatial, &mut phase.temporal) {
            let p = precision_of(l).with_context(|| format!("layer {name} of phase {}", i + 1))?;
            if p != base_precision[&name] {
                let version = format!("{}.{name}", p.name());
                if !tensors.iter().any(|(t, _)| t.starts_with(&format!("{version}."))) {
                    tensors.extend(weight_tensors(&version, l, &ck.load_native(&format!("{name}.weight"))?)?);
                }
                layers.insert(format!("phase{}.{name}", i + 1), p);
            }
        }
        phases.push(phase.below);
    }
    for name in ck.names().filter(|n| !replaced.contains(*n)).map(String::from).collect::<Vec<_>>() {
        tensors.push((name.clone(), ck.load_native(&name)?));
    }
    let layers_json: serde_json::Map<String, serde_json::Value> = layers.iter().map(|(n, p)| (n.clone(), serde_json::json!(p.name()))).collect();
    let meta = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        (LAYERS_KEY.to_string(), serde_json::Value::Object(layers_json).to_string()),
        (PHASES_KEY.to_string(), serde_json::json!(phases).to_string()),
        (PLAN_KEY.to_string(), plan.to_json().to_string()),
    ]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))
}

/// The phases of a quantized checkpoint: the base blocks with every layer
/// stored under the phase's prefix replaced. Fails on a stored layer that
/// names no layer of this model (a checkpoint of another architecture).
pub fn load_phases(ck: &Checkpoint, layout: &Layout, model: &Stdit3) -> Result<Vec<Phase>> {
    let file = ck.dir().join("model.safetensors").display().to_string();
    let mut known = BTreeSet::new();
    let (mut spatial, mut temporal) = (model.w.spatial.clone(), model.w.temporal.clone());
    for (name, _) in linears_of(&mut spatial, &mut temporal) {
        known.insert(name);
    }
    let mut versions: HashMap<String, Linear> = HashMap::new();
    let mut phases = Vec::new();
    for (i, &below) in layout.phases.iter().enumerate() {
        let (mut spatial, mut temporal) = (model.w.spatial.clone(), model.w.temporal.clone());
        for (name, l) in linears_of(&mut spatial, &mut temporal) {
            let listed = format!("phase{}.{name}", i + 1);
            if let Some(&p) = layout.layers.get(&listed) {
                let version = format!("{}.{name}", p.name());
                if !versions.contains_key(&version) {
                    let v = read_linear(ck, &version, p, l.out_features, l.in_features, l.bias.clone())?;
                    versions.insert(version.clone(), v);
                }
                *l = versions[&version].clone();
                known.insert(listed);
            }
        }
        phases.push(Phase { below, spatial, temporal });
    }
    if let Some(unknown) = layout.layers.keys().find(|n| !known.contains(*n)) {
        bail!("{file}: metadata {LAYERS_KEY} lists {unknown}, which this STDiT3 ({} blocks of width {}) with {} phases does not have: the checkpoint belongs to another architecture", model.cfg.depth, model.cfg.hidden_size, layout.phases.len());
    }
    Ok(phases)
}

/// Checks that `model` (loaded from a quantized checkpoint) holds, in every
/// timestep range of `plan` (the directory's `quant.json`), the precisions the
/// plan names; `file` names `quant.json` in the error.
pub fn check_plan(model: &mut Stdit3, plan: &Plan, file: &str) -> Result<()> {
    for r in 0..plan.ranges() {
        let phase = model.phase_of(plan.timestep_in(r));
        let (spatial, temporal) = model.phase_blocks_mut(phase);
        for (name, l) in linears_of(spatial, temporal) {
            let want = plan.linear_precision(&name, r).with_context(|| format!("{file}: plan"))?;
            let have = precision_of(l)?;
            ensure!(want == have, "{file}: field \"plan.units\" gives {} in timestep range {r} as {}, but the checkpoint's tensors hold it as {}", super::preset::unit_of(&name), want.name(), have.name());
        }
    }
    Ok(())
}

/// Makes `qdir` a model directory: `t5`, `tokenizer` and `vae` (when the model
/// has one) as symbolic links to the float model's components (relative when
/// they share an ancestor with `qdir`'s parent, so a moved tree keeps working;
/// T5-XXL alone is 9 GB, not worth copying), and `defaults.json` copied from
/// `model_dir` when it has one.
pub fn link_components(paths: &crate::pipeline::ModelPaths, model_dir: Option<&Path>, qdir: &Path) -> Result<()> {
    let parent = qdir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).canonicalize().with_context(|| format!("resolving the parent of {}", qdir.display()))?;
    for (name, target) in [("t5", Some(&paths.t5)), ("tokenizer", Some(&paths.tokenizer)), ("vae", paths.vae.as_ref())] {
        let Some(target) = target else { continue };
        let abs = target.canonicalize().with_context(|| format!("resolving {}", target.display()))?;
        let link = qdir.join(name);
        symlink(&relative_to(&parent, &abs), &link).with_context(|| format!("linking {} to {}", link.display(), abs.display()))?;
    }
    if let Some(d) = model_dir.map(|d| d.join("defaults.json")).filter(|p| p.is_file()) {
        std::fs::copy(&d, qdir.join("defaults.json")).with_context(|| format!("copying {}", d.display()))?;
    }
    Ok(())
}

/// `target` as seen from a link inside a directory of `base` (both absolute):
/// `../`s up to their common ancestor, then down; `target` itself when they share only the root.
fn relative_to(base: &Path, target: &Path) -> std::path::PathBuf {
    let (b, t): (Vec<_>, Vec<_>) = (base.components().collect(), target.components().collect());
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    if common <= 1 {
        return target.to_path_buf();
    }
    // The link sits one level below `base` (inside the QDIR).
    let mut rel = std::path::PathBuf::from("..");
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "quantized checkpoints link the float model's components, which needs a Unix file system"))
}
