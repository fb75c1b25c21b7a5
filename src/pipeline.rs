//! Prompt to video, as Open-Sora 1.2's inference script runs it: clean the
//! prompts, tokenize, T5-encode, sample the DiT with rectified flow and CFG,
//! decode with the video VAE. [`Plan::run`] loads each model for its stage and
//! drops it after, so at most one model's weights are in memory at a time;
//! [`LoadedModels`] holds them all for generating many times (the C API's
//! engine) through the same code ([`Plan::run_with`]).

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::model::stdit3::{ForwardHooks, Stdit3, Stdit3Config};
use crate::model::t5::{T5Config, T5Encoder};
use crate::model::vae::{VaeConfig, VideoVae};
use crate::quant::calibrate::Importance;
use crate::quant::preset::{quantize_blocks, QuantPreset, WeightStats};
use crate::rng::Rng;
use crate::sampler::rflow::{sample_with_progress, RflowConfig, VideoGeometry};
use crate::tensor::{Device, Tensor};
use crate::text::clean::{append_score, prepare_prompt};
use crate::text::tokenizer::T5Tokenizer;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where each part of the model lives. Without a VAE the model is pixel-space:
/// the DiT generates RGB frames in [-1, 1] directly.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    pub dit: PathBuf,
    pub t5: PathBuf,
    pub tokenizer: PathBuf,
    pub vae: Option<PathBuf>,
}

impl ModelPaths {
    /// `DIR/stdit3`, `DIR/t5`, `DIR/tokenizer`, and `DIR/vae` when it exists.
    pub fn in_dir(dir: &Path) -> Self {
        let vae = dir.join("vae");
        ModelPaths { dit: dir.join("stdit3"), t5: dir.join("t5"), tokenizer: dir.join("tokenizer"), vae: vae.exists().then_some(vae) }
    }

    fn check_exist(&self) -> Result<()> {
        for (what, p) in [("DiT (stdit3)", Some(&self.dit)), ("T5 text encoder", Some(&self.t5)), ("tokenizer", Some(&self.tokenizer)), ("VAE", self.vae.as_ref())] {
            if let Some(p) = p {
                if !p.is_dir() {
                    // NotFound, so callers (the C API) can tell a missing part from a broken one.
                    return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{what} directory {} does not exist", p.display())).into());
                }
            }
        }
        Ok(())
    }
}

/// Generation defaults a model directory may carry in `defaults.json`
/// (e.g. the frame size a small model was trained at); absent fields keep
/// Open-Sora 1.2's sample config.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    pub frames: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub steps: Option<usize>,
    pub cfg: Option<f32>,
    pub fps: Option<f32>,
    /// Open-Sora's resolution/length timestep transform; models trained without it
    /// (e.g. pixel-space ones with fewer than 17 frames, where it maps every step to 0) turn it off.
    pub timestep_transform: Option<bool>,
}

impl ModelDefaults {
    /// These defaults over Open-Sora 1.2's.
    pub fn options(&self) -> GenerateOptions {
        let o = GenerateOptions::default();
        GenerateOptions {
            frames: self.frames.unwrap_or(o.frames),
            height: self.height.unwrap_or(o.height),
            width: self.width.unwrap_or(o.width),
            steps: self.steps.unwrap_or(o.steps),
            cfg: self.cfg.unwrap_or(o.cfg),
            fps: self.fps.unwrap_or(o.fps),
            timestep_transform: self.timestep_transform.unwrap_or(o.timestep_transform),
            ..o
        }
    }
}

impl ModelDefaults {
    /// `dir/defaults.json`, or all-absent when there is none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("defaults.json");
        if !p.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

/// Settings of one generation; defaults are the official sample config.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub cfg: f32,
    pub fps: f32,
    /// Open-Sora's resolution/length timestep transform.
    pub timestep_transform: bool,
    /// Aesthetic score appended to each prompt; `None` appends nothing.
    pub aes: Option<f32>,
    /// Skip Open-Sora's caption cleaning (the score is still appended).
    pub raw_prompt: bool,
    pub seed: u64,
    /// `[B, C, T, h, w]` initial noise replacing the seeded noise.
    pub init_noise: Option<Tensor>,
    /// Precision of the DiT blocks' linear layers (quantized on load).
    pub quant: QuantPreset,
    /// Importance vectors folded into the quantized weights (`qc-run calibrate`).
    pub importance: Option<std::sync::Arc<Importance>>,
    /// The DiT's attention with int8 Q and K (`AttnSpec::qk_int8`).
    pub qk_int8: bool,
    /// The DiT's attention with bf16 operands (`AttnSpec::bf16`).
    pub attn_bf16: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { frames: 51, height: 240, width: 426, steps: 30, cfg: 7.0, fps: 24.0, timestep_transform: true, aes: Some(6.5), raw_prompt: false, seed: 42, init_noise: None, quant: QuantPreset::None, importance: None, qk_int8: false, attn_bf16: false }
    }
}

/// Progress reported while generating.
pub enum Event<'a> {
    Stage(&'a str),
    Step(usize, usize),
}

/// Time per stage and peak memory.
#[derive(Default, Debug)]
pub struct Report {
    pub stages: Vec<(String, f64)>,
    pub peak_rss_bytes: Option<u64>,
    pub prompts: Vec<String>,
    pub latent: [usize; 3],
    /// Storage of the DiT blocks' linear weights as run (after `--quant`).
    pub dit_weights: WeightStats,
    /// How the DiT blocks' linears ran: the `--quant` preset, or `aigq (quantized checkpoint)`.
    pub dit_precision: String,
}

/// The stage of [`Report::stages`] that loads the DiT (absent when the models were loaded before).
pub const STAGE_DIT_LOAD: &str = "loading the DiT";
/// The denoising loop alone (the DiT loaded).
pub const STAGE_DENOISE: &str = "denoising (STDiT3)";

impl Report {
    /// Seconds of the stages whose name starts with `prefix` (0 when none:
    /// folded from +0.0, since an empty float `sum()` is -0.0, which JSON shows).
    pub fn seconds(&self, prefix: &str) -> f64 {
        self.stages.iter().filter(|(n, _)| n.starts_with(prefix)).fold(0.0, |a, s| a + s.1)
    }
}

/// Memory the system can still give (Linux `MemAvailable`), if known.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's peak resident memory (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A model's parts checked together (directories, configs, tokenizer against
/// the T5 vocabulary, widths, the quantization settings) and its tokenizer
/// loaded; no weights loaded yet. Shared by the plans made from it.
pub struct ModelConfigs {
    paths: ModelPaths,
    /// The DiT directory loaded: `paths.dit`, or a quantized checkpoint's (`--quant aigq --calibration QDIR`).
    dit: PathBuf,
    dit_cfg: Stdit3Config,
    t5_cfg: T5Config,
    tokenizer: T5Tokenizer,
    vae_cfg: Option<VaeConfig>,
}

/// A checked plan: configs read and cross-checked, geometry derived; no weights loaded yet.
pub struct Plan {
    model: Arc<ModelConfigs>,
    frames: usize,
    decoded: (usize, usize),
    latent: [usize; 3],
    prompts: Vec<String>,
}

/// `--quant` and `--calibration` against the DiT; returns the DiT directory to
/// load. A quantized checkpoint (`qc-run calibrate --budget` output) runs as
/// stored, given as `--model QDIR` or, on its float model, as `--quant aigq
/// --calibration QDIR`; its directory's `quant.json` plan must be the one its
/// tensors were written with.
fn check_quantization(paths: &ModelPaths, opts: &GenerateOptions) -> Result<PathBuf> {
    let stored = opts.importance.as_ref().filter(|_| opts.quant == QuantPreset::Aigq).and_then(|imp| imp.quantized_dit.clone());
    if let Some(qdit) = &stored {
        let read = |d: &Path| -> Result<serde_json::Value> {
            let f = d.join("config.json");
            serde_json::from_str(&std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?).with_context(|| format!("{}: not valid JSON", f.display()))
        };
        ensure!(read(qdit)? == read(&paths.dit)?, "--calibration: the quantized DiT in {} has another config.json than {}: it belongs to another model", qdit.display(), paths.dit.display());
    }
    let dit = stored.unwrap_or_else(|| paths.dit.clone());
    let layout = crate::quant::qdir::Layout::of(&Checkpoint::open_dir(&dit)?)?;
    let Some(layout) = layout else {
        if opts.quant == QuantPreset::Aigq {
            let imp = opts.importance.as_ref().ok_or_else(|| anyhow!("--quant aigq needs --calibration DIR (written by `qc-run calibrate --budget BITS`) or a quantized --model QDIR"))?;
            ensure!(imp.plan.is_some(), "--calibration {}: no aigq plan in its quant.json (calibrate with --budget BITS)", imp.source);
        }
        return Ok(dit);
    };
    if dit == paths.dit {
        ensure!(
            matches!(opts.quant, QuantPreset::None | QuantPreset::Aigq) && opts.importance.is_none(),
            "{} is a quantized checkpoint (an aigq plan): it runs as stored; leave out --quant {} and --calibration",
            paths.dit.display(),
            opts.quant.name()
        );
    }
    if let Some(qdir) = dit.parent() {
        let qj = qdir.join(crate::quant::calibrate::QUANT_JSON);
        if qj.is_file() {
            let imp = Importance::from_dir(qdir)?;
            let plan = imp.plan.ok_or_else(|| anyhow!("{}: field \"plan\" is missing, but {} holds quantized weights", qj.display(), dit.display()))?;
            ensure!(plan == layout.plan, "{}: field \"plan\" disagrees with the plan the tensors in {} were written with", qj.display(), dit.display());
        }
    }
    Ok(dit)
}

/// Everything that can be checked before heavy work: directories, configs,
/// tokenizer vs T5 vocabulary, geometry the VAE can produce, noise shape.
pub fn plan(paths: &ModelPaths, prompts: &[String], opts: &GenerateOptions) -> Result<Plan> {
    ensure!(!prompts.is_empty(), "no prompt given");
    Arc::new(ModelConfigs::check(paths, opts)?).plan(prompts, opts)
}

impl ModelConfigs {
    /// The model-wide part of [`plan`]: everything but the prompts and the video's geometry.
    pub fn check(paths: &ModelPaths, opts: &GenerateOptions) -> Result<Self> {
        paths.check_exist()?;
        let dit_cfg = Stdit3Config::from_dir(&paths.dit)?;
        let t5_cfg = T5Config::from_dir(&paths.t5)?;
        let vae_cfg = paths.vae.as_deref().map(VaeConfig::from_dir).transpose()?;
        let tokenizer = T5Tokenizer::from_dir(&paths.tokenizer)?;
        ensure!(
            tokenizer.vocab_size() <= t5_cfg.vocab_size,
            "tokenizer {} has {} tokens but the T5 encoder {} embeds only {}: they do not belong together",
            paths.tokenizer.display(),
            tokenizer.vocab_size(),
            paths.t5.display(),
            t5_cfg.vocab_size
        );
        ensure!(
            t5_cfg.d_model == dit_cfg.caption_channels,
            "T5 width {} does not match the DiT's caption_channels {}",
            t5_cfg.d_model,
            dit_cfg.caption_channels
        );
        let latent_c = match &vae_cfg {
            Some(v) => v.latent_channels()?,
            None => 3,
        };
        ensure!(
            latent_c == dit_cfg.in_channels,
            "{} {latent_c} channels but the DiT has in_channels {}",
            if vae_cfg.is_some() { "the VAE's latents have" } else { "without a VAE (pixel space) frames are RGB:" },
            dit_cfg.in_channels
        );
        let dit = check_quantization(paths, opts)?;
        Ok(ModelConfigs { paths: paths.clone(), dit, dit_cfg, t5_cfg, tokenizer, vae_cfg })
    }

    /// The per-request part of [`plan`]: prompts, sampling settings, geometry, initial noise.
    pub fn plan(self: &Arc<Self>, prompts: &[String], opts: &GenerateOptions) -> Result<Plan> {
        ensure!(!prompts.is_empty(), "no prompt given");
        ensure!(opts.steps > 0, "--steps must be at least 1");
        // Open-Sora's transform scales time by sqrt(floor(frames / 17) * 5): 0 below 17 frames,
        // which makes the first step's timestep 0 / 0.
        ensure!(
            !opts.timestep_transform || opts.frames == 1 || opts.frames >= 17,
            "--frames {}: Open-Sora's timestep transform is undefined below 17 frames (it divides 0 by 0 at the first step); use at least 17 frames, 1 for an image, or --timestep-transform off",
            opts.frames
        );
        ensure!(opts.cfg.is_finite(), "--cfg must be finite, got {}", opts.cfg);
        ensure!(opts.fps.is_finite() && opts.fps > 0.0, "--fps must be positive and finite, got {}", opts.fps);
        let latent = self.latent_size(opts)?;
        if let Some(z) = &opts.init_noise {
            let want = self.noise_shape(prompts.len(), latent);
            ensure!(z.shape() == want, "initial noise z0 has shape {:?}; {} prompts of {} frames at {}x{} need {want:?}", z.shape(), prompts.len(), opts.frames, opts.height, opts.width);
            if let Some(i) = z.find_non_finite() {
                bail!("initial noise z0 contains NaN or infinity (flat index {i})");
            }
        }
        let prompts = prompts.iter().map(|p| if opts.raw_prompt { append_score(p, opts.aes) } else { prepare_prompt(p, opts.aes) }).collect();
        let decoded = self.vae_cfg.as_ref().map_or((opts.height, opts.width), |v| v.decoded_size(opts.height, opts.width));
        Ok(Plan { model: self.clone(), frames: opts.frames, latent, prompts, decoded })
    }

    /// The latent `[T, h, w]` of a video of `opts`' frames and size.
    pub fn latent_size(&self, opts: &GenerateOptions) -> Result<[usize; 3]> {
        match &self.vae_cfg {
            Some(v) => v.latent_size(opts.frames, opts.height, opts.width).with_context(|| format!("the VAE cannot produce {} frames of {}x{} pixels", opts.frames, opts.height, opts.width)),
            None => {
                ensure!(opts.frames > 0 && opts.height > 0 && opts.width > 0, "frames, height and width must be positive, got {} frames of {}x{}", opts.frames, opts.height, opts.width);
                Ok([opts.frames, opts.height, opts.width])
            }
        }
    }

    /// The initial noise's shape `[B, C, T, h, w]` for `prompts` videos of latent `latent`.
    pub fn noise_shape(&self, prompts: usize, latent: [usize; 3]) -> [usize; 5] {
        [prompts, self.dit_cfg.in_channels, latent[0], latent[1], latent[2]]
    }

    /// The T5 encoder, loaded and prepared on `be`.
    fn load_t5(&self, be: &dyn Backend) -> Result<T5Encoder> {
        let mut t5 = T5Encoder::load(&self.paths.t5)?;
        t5.prepare(be)?;
        Ok(t5)
    }

    /// The DiT at `opts`' precision, prepared on `be`.
    fn load_dit(&self, be: &dyn Backend, opts: &GenerateOptions) -> Result<LoadedDit> {
        let mut dit = Stdit3::load(&self.dit)?;
        let (weights, precision) = match dit.stored_plan.clone() {
            Some(stored) => {
                crate::quant::qdir::check_plan(&mut dit, &stored, &self.dit.display().to_string())?;
                (WeightStats::of_model(&mut dit, &stored)?, "aigq (quantized checkpoint)".to_string())
            }
            None => (quantize_blocks(&mut dit, opts.quant, opts.importance.as_deref())?, opts.quant.name().to_string()),
        };
        dit.qk_int8 = opts.qk_int8;
        dit.attn_bf16 = opts.attn_bf16;
        dit.prepare(be)?;
        Ok(LoadedDit { model: dit, weights, precision })
    }
}

/// The VAE in `dir`, loaded and prepared on `be`.
fn load_vae(dir: &Path, be: &dyn Backend) -> Result<VideoVae> {
    let mut vae = VideoVae::load(dir)?;
    vae.prepare(be)?;
    Ok(vae)
}

/// The DiT as loaded for a run, and how its block linears are stored.
struct LoadedDit {
    model: Stdit3,
    weights: WeightStats,
    precision: String,
}

/// Every model of a [`ModelConfigs`] loaded and prepared on one backend, to
/// generate many times without loading again ([`Plan::run_with`]); the
/// model-wide settings of `GenerateOptions` (quant, importance, qk_int8, attn_bf16) are
/// fixed at load.
pub struct LoadedModels {
    t5: T5Encoder,
    dit: LoadedDit,
    vae: Option<VideoVae>,
    quant: QuantPreset,
    importance: Option<Arc<Importance>>,
    qk_int8: bool,
    attn_bf16: bool,
}

impl LoadedModels {
    /// Loads T5, the DiT (quantized as `opts` says) and the VAE, prepared on `be`.
    pub fn load(model: &ModelConfigs, be: &dyn Backend, opts: &GenerateOptions) -> Result<Self> {
        Ok(LoadedModels {
            t5: model.load_t5(be)?,
            dit: model.load_dit(be, opts)?,
            vae: model.paths.vae.as_deref().map(|dir| load_vae(dir, be)).transpose()?,
            quant: opts.quant,
            importance: opts.importance.clone(),
            qk_int8: opts.qk_int8,
            attn_bf16: opts.attn_bf16,
        })
    }

    /// Refuses options whose model-wide settings differ from those the models were loaded with.
    fn check_options(&self, opts: &GenerateOptions) -> Result<()> {
        let same_importance = match (&self.importance, &opts.importance) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        ensure!(
            self.quant == opts.quant && same_importance && self.qk_int8 == opts.qk_int8 && self.attn_bf16 == opts.attn_bf16,
            "the loaded models were quantized as {} (qk_int8 {}, attn_bf16 {}); this run asks for {} (qk_int8 {}, attn_bf16 {}) or other importance vectors: load them again",
            self.quant.name(),
            self.qk_int8,
            self.attn_bf16,
            opts.quant.name(),
            opts.qk_int8,
            opts.attn_bf16
        );
        Ok(())
    }
}

impl Plan {
    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    pub fn latent(&self) -> [usize; 3] {
        self.latent
    }

    /// True when the model has no VAE (the DiT generates pixels).
    pub fn pixel_space(&self) -> bool {
        self.model.vae_cfg.is_none()
    }

    /// The VAE's configuration (none for a pixel-space model).
    pub fn vae_config(&self) -> Option<&VaeConfig> {
        self.model.vae_cfg.as_ref()
    }

    /// Bytes of GPU memory for activations the CUDA backend's arena needs for this plan:
    /// the larger of the denoising stage (T5, then the DiT on the CFG batch) and the VAE
    /// decode, which runs after the DiT's activations are freed.
    pub fn cuda_arena_bytes(&self) -> u64 {
        use crate::backend::cuda::{estimate_arena_bytes, estimate_t5_arena_bytes, estimate_vae_arena_bytes};
        let (dit, t5, b) = (&self.model.dit_cfg, &self.model.t5_cfg, self.prompts.len());
        let denoise = estimate_arena_bytes(dit, 2 * b, self.latent, dit.model_max_length) + estimate_t5_arena_bytes(t5.d_model, t5.d_ff, b * dit.model_max_length);
        let (h, w) = self.decoded;
        let vae = self.vae_config().map_or(0, |v| estimate_vae_arena_bytes(v, b, self.frames, h, w));
        denoise.max(vae)
    }

    /// Host bytes a CPU generation of this plan needs for its activations
    /// (weights apart): the GPU arena's count, which bounds the CPU's f32 peak
    /// as well, the CPU fusing per task what the GPU keeps whole (measured
    /// peaks, weights included: 0.57-0.76 of the count for the demonstration
    /// model from 8x64x64 to 32x256x256; 0.60-0.74 for the fixtures' tiny
    /// model with its VAE at 17x256x256 and 17x512x512).
    pub fn host_activation_bytes(&self) -> u64 {
        self.cuda_arena_bytes()
    }

    /// Bytes `policy`'s caches hold at most over this plan's forwards, at `elem`
    /// bytes per value (4: the CPU's f32; 2: the GPU's bf16).
    pub fn cache_bytes(&self, policy: &dyn ForwardHooks, elem: usize) -> u64 {
        let (rows, channels) = self.forward_rows();
        policy.cache_bytes_needed(rows, channels, self.blocks_per_forward(), elem) as u64
    }

    /// Refuses, before anything runs, a CPU generation whose activations and
    /// caching policy's caches (`cache_bytes`, for the policy `cache_flag`
    /// names) exceed `available` bytes: an error naming what to change rather
    /// than a process the system kills part-way.
    pub fn check_host_memory(&self, cache_bytes: u64, cache_flag: &str, available: u64) -> Result<()> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if cache_bytes > available {
            let (rows, channels) = self.forward_rows();
            bail!(
                "--cache {cache_flag}: its caches need {:.2} GiB ({rows} tokens x {channels} channels per kept output, f32) and {:.2} GiB of memory is available: use --cache-int8, fewer or smaller frames, or another policy",
                gib(cache_bytes),
                gib(available)
            );
        }
        let need = self.host_activation_bytes().saturating_add(cache_bytes);
        if need > available {
            let (h, w) = self.decoded;
            bail!(
                "{} of {} frames at {h}x{w} need about {:.2} GiB of memory for their activations{} and {:.2} GiB is available: ask for fewer or smaller frames (--frames, --height, --width) or fewer prompts",
                if self.prompts.len() == 1 { "1 video".to_string() } else { format!("{} videos", self.prompts.len()) },
                self.frames,
                gib(need),
                if cache_bytes > 0 { format!(" and --cache {cache_flag}'s caches") } else { String::new() },
                gib(available)
            );
        }
        Ok(())
    }

    /// Height and width the VAE will decode (the request rounded down to its pixel grid).
    pub fn decoded_size(&self) -> (usize, usize) {
        self.decoded
    }

    /// Token rows of one DiT forward (both guidance halves) and the hidden width:
    /// the shape of each sub-module output a caching policy keeps.
    pub fn forward_rows(&self) -> (usize, usize) {
        let dit = &self.model.dit_cfg;
        let tokens: usize = self.latent.iter().zip(dit.patch()).map(|(n, p)| n.div_ceil(p)).product();
        (2 * self.prompts.len() * tokens, dit.hidden_size)
    }

    /// DiT block evaluations in one forward (spatial + temporal blocks).
    pub fn blocks_per_forward(&self) -> usize {
        2 * self.model.dit_cfg.depth
    }

    /// The prompts through the tokenizer and T5: the DiT's caption input `[B, 1, L, C]`
    /// and the token mask (`[B * L]`, 1 for real tokens).
    pub fn encode_text(&self, be: &dyn Backend) -> Result<(Tensor, Vec<i64>)> {
        self.encode_text_with(be, &self.model.load_t5(be)?)
    }

    fn encode_text_with(&self, be: &dyn Backend, t5: &T5Encoder) -> Result<(Tensor, Vec<i64>)> {
        let m = &self.model;
        let (b, l) = (self.prompts.len(), m.dit_cfg.model_max_length);
        let refs: Vec<&str> = self.prompts.iter().map(|s| s.as_str()).collect();
        let (ids, mask) = m.tokenizer.encode_batch(&refs, l)?;
        let y = t5.encode(be, &ids, &mask, b)?;
        Ok((y.reshape(&[b, 1, l, m.dit_cfg.caption_channels])?, mask))
    }

    /// The DiT directory this plan loads.
    pub fn dit_dir(&self) -> &Path {
        &self.model.dit
    }

    /// Runs every stage, sampling under `hooks` (a caching policy, or none); returns the decoded video `[B, 3, frames, H, W]` in about [-1, 1].
    pub fn run(self, be: &dyn Backend, opts: &GenerateOptions, hooks: &mut dyn ForwardHooks, progress: &mut dyn FnMut(Event)) -> Result<(Tensor, Report)> {
        self.run_with(be, None, opts, hooks, &mut |e| {
            progress(e);
            Ok(())
        })
    }

    /// [`Plan::run`] with `models` loaded once (by [`LoadedModels::load`] on `be`, with
    /// the same model-wide options), or with `None` each model loaded for its stage and
    /// dropped after it. An error `progress` returns stops the run and is returned
    /// (how a caller cancels: it is checked after each stage starts and each step).
    pub fn run_with(&self, be: &dyn Backend, models: Option<&LoadedModels>, opts: &GenerateOptions, hooks: &mut dyn ForwardHooks, progress: &mut dyn FnMut(Event) -> Result<()>) -> Result<(Tensor, Report)> {
        if let Some(m) = models {
            m.check_options(opts)?;
        }
        let mut report = Report { prompts: self.prompts.clone(), latent: self.latent, ..Report::default() };
        let b = self.prompts.len();
        let timed = |name: &str, report: &mut Report, t: Instant| report.stages.push((name.to_string(), t.elapsed().as_secs_f64()));

        progress(Event::Stage("text encoder"))?;
        let t = Instant::now();
        let (y, mask) = match models {
            Some(m) => self.encode_text_with(be, &m.t5)?,
            None => self.encode_text(be)?,
        };
        timed("text encoder (T5)", &mut report, t);

        progress(Event::Stage("denoising"))?;
        // Loaded (and quantized) outside the loop's timing: the loop's speed is what
        // the accelerated modes are measured by, and a loaded engine loads once.
        let loaded;
        let dit = match models {
            Some(m) => &m.dit,
            None => {
                let t = Instant::now();
                loaded = self.model.load_dit(be, opts)?;
                timed(STAGE_DIT_LOAD, &mut report, t);
                &loaded
            }
        };
        let t = Instant::now();
        let [lt, lh, lw] = self.latent;
        let in_channels = self.model.dit_cfg.in_channels;
        let z0 = match &opts.init_noise {
            Some(z) => z.clone(),
            None => {
                let mut rng = Rng::new(opts.seed);
                Tensor::from_f32(&[b, in_channels, lt, lh, lw], rng.normal_vec(b * in_channels * lt * lh * lw))?
            }
        };
        let z = {
            report.dit_weights = dit.weights;
            report.dit_precision = dit.precision.clone();
            let rf = RflowConfig { num_steps: opts.steps, cfg_scale: opts.cfg, use_timestep_transform: opts.timestep_transform, ..RflowConfig::default() };
            let geo = VideoGeometry { height: vec![opts.height as f32; b], width: vec![opts.width as f32; b], num_frames: vec![opts.frames as f32; b], fps: vec![opts.fps; b] };
            sample_with_progress(be, &dit.model, &rf, &z0, &y, Some(&mask), &geo, hooks, &mut |i, n| progress(Event::Step(i, n)))?.0
        };
        // A latent on the GPU comes back to the host here (which also waits for the
        // GPU, so the stage's time is complete; the VAE checks it there), then
        // the VAE runs on the same backend.
        let z = if z.device() == Device::Cuda { z.to_cpu()?.to_f32()? } else { z };
        timed(STAGE_DENOISE, &mut report, t);

        let video = match &self.model.paths.vae {
            None => z,
            Some(dir) => {
                progress(Event::Stage("VAE decode"))?;
                let t = Instant::now();
                let loaded;
                let vae = match models.and_then(|m| m.vae.as_ref()) {
                    Some(vae) => vae,
                    None => {
                        loaded = load_vae(dir, be)?;
                        &loaded
                    }
                };
                let video = vae.decode(be, &z, opts.frames)?;
                // The video comes back to the host as f32 (bf16 on the GPU).
                let video = if video.device() == Device::Cuda { video.to_cpu()?.to_f32()? } else { video };
                timed("VAE decode", &mut report, t);
                video
            }
        };
        report.peak_rss_bytes = peak_rss_bytes();
        Ok((video, report))
    }
}
