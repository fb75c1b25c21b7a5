//! `qc-run`: run Open-Sora 1.2 models with quantcache, and the debug
//! subcommands that check the engine against reference outputs.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qc::backend::cpu::CpuBackend;
use qc::backend::cuda as qcuda;
use qc::backend::select::{DeviceBackend, DeviceChoice};
use qc::io::write_safetensors;
use qc::model::stdit3::inputs::{ForwardInputs, SampleInputs};
use qc::model::stdit3::{DitInput, NoHooks, Stdit3, Trace};
use qc::sampler::rflow::{sample, RflowConfig};
use qc::checkpoint::Checkpoint;
use qc::model::t5::T5Encoder;
use qc::model::vae::VideoVae;
use qc::pipeline::{plan, Event, GenerateOptions, ModelDefaults, ModelPaths};
use qc::quant::calibrate::Importance;
use qc::quant::preset::QuantPreset;
use qc::tensor::{Storage, Tensor};
use qc::text::clean::prepare_prompt;
use qc::text::tokenizer::T5Tokenizer;
use qc::BUNDLED_MODEL;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "qc-run", version, about = "Run Open-Sora 1.2 (STDiT3 + rectified flow) with the quantcache engine", args_override_self = true)]
struct Cli {
    /// Worker threads for the CPU backend (default: one per core).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One STDiT3 forward on the tensors of an inputs file; writes `out` (and `act.*` with --trace).
    Forward(ForwardArgs),
    /// Rectified-flow sampling with classifier-free guidance from given noise; writes `z` and `timesteps`.
    Sample(SampleArgs),
    /// Prompt to video: clean, tokenize, T5-encode, sample STDiT3 with rectified flow, VAE-decode, write.
    Generate(GenerateArgs),
    /// Calibrate quantization: run the full-precision model over whole sampling trajectories of a
    /// prompt set, record every DiT block linear's per-input-channel activation maxima per timestep
    /// range, and write the importance vectors (quant.json, importance.safetensors) to a directory.
    Calibrate(CalibrateArgs),
    /// Print prompts as Open-Sora 1.2 cleans them (aesthetic score appended, caption cleaning), one per line.
    CleanPrompt(CleanPromptArgs),
    /// Tokenize and T5-encode prompts as given (no cleaning); writes `input_ids`, `attention_mask`, `last_hidden_state`.
    EncodeText(EncodeTextArgs),
    /// VAE-decode latents: reads `z` [B,4,T,h,w] and `num_frames`, writes `video` [B,3,num_frames,H,W].
    Decode(DecodeArgs),
    /// Version, build features (CUDA kernels compiled in or not, CPU features) and the GPU, if any.
    Info,
}

/// An aesthetic score, or none.
#[derive(Clone, Copy, Debug)]
struct Aes(Option<f32>);

/// `--aes 6.5` or `--aes none`.
fn parse_aes(s: &str) -> Result<Aes, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Aes(None));
    }
    s.parse::<f32>().ok().filter(|v| v.is_finite()).map(|v| Aes(Some(v))).ok_or_else(|| format!("{s:?} is neither a number nor \"none\""))
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory holding stdit3/, t5/, tokenizer/ and optionally vae/ (without it the model is
    /// pixel-space) and defaults.json [default: $QC_MODEL_DIR, else the bundled demonstration model].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// STDiT3 directory, overriding MODEL/stdit3.
    #[arg(long, value_name = "DIR")]
    dit: Option<PathBuf>,
    /// T5 encoder directory, overriding MODEL/t5.
    #[arg(long, value_name = "DIR")]
    t5: Option<PathBuf>,
    /// Tokenizer directory (tokenizer.json or spiece.model), overriding MODEL/tokenizer.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// VAE directory, overriding MODEL/vae.
    #[arg(long, value_name = "DIR")]
    vae: Option<PathBuf>,
}

impl ModelArgs {
    /// The model directory in use, if any, and the part paths.
    fn paths(&self) -> Result<(Option<PathBuf>, ModelPaths)> {
        let all_parts = self.dit.is_some() && self.t5.is_some() && self.tokenizer.is_some();
        let base = self.model.clone().or_else(|| std::env::var_os("QC_MODEL_DIR").map(PathBuf::from)).or_else(|| {
            let bundled = PathBuf::from(BUNDLED_MODEL);
            (!all_parts && bundled.join("stdit3").is_dir()).then_some(bundled)
        });
        let mut paths = match &base {
            Some(b) => ModelPaths::in_dir(b),
            None if all_parts => ModelPaths { dit: PathBuf::new(), t5: PathBuf::new(), tokenizer: PathBuf::new(), vae: None },
            None => anyhow::bail!(
                "no model given and no bundled model at {BUNDLED_MODEL}: pass --model DIR (a directory with stdit3/, t5/, tokenizer/ and vae/), set QC_MODEL_DIR, or pass --dit, --t5, --tokenizer (and --vae)"
            ),
        };
        if let Some(p) = &self.dit {
            paths.dit = p.clone();
        }
        if let Some(p) = &self.t5 {
            paths.t5 = p.clone();
        }
        if let Some(p) = &self.tokenizer {
            paths.tokenizer = p.clone();
        }
        if let Some(p) = &self.vae {
            paths.vae = Some(p.clone());
        }
        Ok((base, paths))
    }
}

#[derive(Args)]
struct DeviceArgs {
    /// Where to compute: cpu, cuda (GPU 0, bf16 activations; its memory arena is sized from the
    /// model and video, or QC_CUDA_ARENA_MB) or auto (cuda when a GPU is usable, else cpu).
    #[arg(long, value_enum, default_value = "cpu", value_name = "cpu|cuda|auto")]
    device: DeviceChoice,
}

#[derive(Args)]
struct GraphArgs {
    /// With --device cuda: "on" captures one denoising step as a CUDA graph and replays it
    /// for the other steps (same result, bit for bit; less launch overhead), "off" launches
    /// every kernel of every step [default: on; the environment variable QC_CUDA_GRAPHS=0 turns it off].
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    cuda_graphs: Option<String>,
}

/// What qc-run prints and sets on the backend `--device` chose.
trait CliBackend {
    /// Applies `--cuda-graphs` (CUDA only; without the flag the backend follows QC_CUDA_GRAPHS).
    fn set_graphs(&self, g: &GraphArgs);
    /// Prints the GPU arena's peak use and what CUDA graphs did (CUDA only).
    fn report(&self);
}

impl CliBackend for DeviceBackend {
    fn set_graphs(&self, g: &GraphArgs) {
        if let (DeviceBackend::Cuda(b), Some(v)) = (self, &g.cuda_graphs) {
            b.set_cuda_graphs(v == "on");
        }
    }

    fn report(&self) {
        if let DeviceBackend::Cuda(b) = self {
            eprintln!("GPU arena: {}", b.arena_stats());
            let g = b.graph_stats();
            if g != Default::default() {
                eprintln!("CUDA graphs: {g}");
            }
        }
    }
}

/// Prints the backend's notice (the GPU and its arena, or the fallback to the CPU).
fn notice(line: String) {
    eprintln!("{line}");
}

/// A result tensor on the host as f32 (GPU activations are bf16 on the device).
fn host_f32(t: Tensor) -> Result<Tensor> {
    if t.device() == qc::tensor::Device::Cuda || t.dtype() != qc::tensor::DType::F32 {
        t.to_cpu()?.to_f32()
    } else {
        Ok(t)
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// A prompt; repeat for a batch of videos.
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// A file with one prompt per line (empty lines skipped), added after --prompt.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    #[command(flatten)]
    models: ModelArgs,
    /// Number of video frames [default: the model's defaults.json, else 51, Open-Sora's "2s"; 1 makes an image].
    #[arg(long)]
    frames: Option<usize>,
    /// Video height in pixels [default: defaults.json, else 240 (with width 426: Open-Sora's 240p 9:16)].
    #[arg(long)]
    height: Option<usize>,
    /// Video width in pixels [default: defaults.json, else 426].
    #[arg(long)]
    width: Option<usize>,
    /// Sampling steps [default: defaults.json, else 30].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale [default: defaults.json, else 7.0].
    #[arg(long)]
    cfg: Option<f32>,
    /// Frames per second: conditions the DiT and sets the playback rate [default: defaults.json, else 24].
    #[arg(long)]
    fps: Option<f32>,
    /// Open-Sora's resolution/length timestep transform, "on" or "off" [default: defaults.json, else on].
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    timestep_transform: Option<String>,
    /// Enlarge the written frames by this integer factor (nearest neighbour), for small models' videos.
    #[arg(long, default_value_t = 1, value_name = "N")]
    upscale: usize,
    /// Aesthetic score appended to each prompt (" aesthetic score: 6.5."), or "none".
    #[arg(long, default_value = "6.5", value_parser = parse_aes, value_name = "SCORE|none")]
    aes: Aes,
    /// Use the prompts exactly as given: no caption cleaning (the aesthetic score is still appended unless --aes none).
    #[arg(long)]
    raw_prompt: bool,
    /// Seed of the initial noise (this engine's generator; it does not reproduce torch.randn).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Safetensors file whose `z0` [B,4,T,h,w] replaces the seeded noise, to reproduce a reference run exactly.
    #[arg(long, value_name = "FILE")]
    init_noise: Option<PathBuf>,
    /// Precision of the DiT blocks' linear layers, quantized on load from the float checkpoint:
    /// none (full precision), w8a8 (int8 weights per output channel, int8 activations per token),
    /// w4a8 (int4 weights per output channel and group of 64 inputs, int8 activations),
    /// w4a6 (int4 weights, activations in [-31, 31]); aigq (each block sub-module at the precision of the
    /// plan in --calibration, from `qc-run calibrate --budget`).
    /// Embedders and the final layer stay in full precision. A quantized checkpoint (`--model QDIR`
    /// from `qc-run calibrate --budget`) runs as stored: leave --quant out.
    #[arg(long, default_value = "none", value_name = "none|w8a8|w4a8|w4a6|aigq", value_parser = parse_quant)]
    quant: QuantPreset,
    /// Fused dequant-attention: the DiT's self- and cross-attention compute Q K^T with Q and K
    /// quantized to int8 (per block of 64 rows, K mean-smoothed), exact int32 products.
    #[arg(long)]
    qk_int8: bool,
    /// The DiT's self- and cross-attention with bf16 operands: Q, K, V and the softmax's
    /// probabilities rounded to bf16, products accumulated in f32 (the GPU attention's precision).
    /// On a CPU with AVX-512 BF16 the products run as `vdpbf16ps` (head dims of whole 16-channel
    /// blocks, up to 32, and up to 128 keys), elsewhere the rounded operands go through the f32
    /// attention. `--accel quantcache` turns it on.
    #[arg(long)]
    attn_bf16: bool,
    /// Caching policy: none (compute every step and block); hlc (Hierarchical Latent Caching: after
    /// each computed step the blocks' measured rate of change decides how many steps are served by
    /// extrapolating the last two computed velocities, along their line at min(1, 0.2 / threshold)
    /// of its slope, and which slow blocks reuse their cached
    /// sub-module outputs at the next computed step); hlc-separate-cfg (the same, the guidance halves
    /// deciding separately); srap (blocks whose output barely differs from their input are skipped);
    /// hlc+srap (both); teacache (accumulated rescaled change of the first block's modulated input;
    /// under the threshold the block stack's cached residual is reused); pab (Pyramid Attention
    /// Broadcast: spatial attention reused 1 step in 2, temporal 3 in 4, cross 5 in 6, mid-trajectory);
    /// adacache (block 0's attention change picks from a codebook how many steps reuse every
    /// sub-module's output); static:K (compute every K-th step, reuse the last velocity in between).
    #[arg(long, default_value = "none", value_name = "POLICY")]
    cache: String,
    /// The --cache policy's threshold [defaults: hlc 0.2 (accumulated predicted relative change, 0.001-10),
    /// srap 0.1 (relative contribution under which a block is skipped, 0-1), hlc+srap "HLC,SRAP",
    /// teacache 0.1 (accumulated rescaled distance, 0.001-10), pab 2 (spatial broadcast range in steps;
    /// temporal 2x, cross 3x), adacache 1 (multiplies the codebook's rate bounds)]. Larger is faster.
    #[arg(long, value_name = "T")]
    cache_threshold: Option<String>,
    /// Keep the cached sub-module outputs of hlc, hlc+srap, pab and adacache in int8 with one scale
    /// per token (a quarter of the f32 memory on the CPU, half of bf16 on the GPU), dequantized inside
    /// the reuse op.
    #[arg(long)]
    cache_int8: bool,
    /// Acceleration: none, or quantcache (AIGQ + HLC + SRAP from the model's QuantCache calibration:
    /// its quantized checkpoint and jointly calibrated cache thresholds; `DIR/quantcache/` of a float
    /// model, or a quantized --model QDIR written by `qc-run calibrate --accel`) with preset fast (the
    /// default: the most speed at a mean PSNR >= 30 dB on the calibration prompts, for 28 dB on
    /// others) or quality (>= 34 dB, for 32). Replaces --quant, --cache and --cache-threshold, and
    /// runs the attention with bf16 operands (--attn-bf16).
    #[arg(long, default_value = "none", value_name = "none|quantcache|quantcache:fast|quantcache:quality")]
    accel: String,
    /// Also write a JSON report to FILE.json: seconds per stage (`stages_s`: text, denoise, decode,
    /// write, total), `peak_memory_bytes`, `steps_computed` of `steps`, `block_evals` (`computed`,
    /// `possible`), and the run's settings (see the README's "The report file").
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Calibration directory (from `qc-run calibrate`) whose per-input-channel importance vectors are
    /// folded into the --quant weights (activations divided by them as they are quantized).
    #[arg(long, value_name = "DIR")]
    calibration: Option<PathBuf>,
    /// Output: NAME.mp4 (needs ffmpeg on PATH), NAME.gif, NAME.safetensors (`video` float and `frames_u8`),
    /// NAME.png (videos of one frame), or a directory of PNG frames (a name without an extension; an
    /// existing directory is replaced only when empty or holding an earlier run's frames alone). Several
    /// prompts give NAME-0.gif, NAME-1.gif, ...
    #[arg(long, value_name = "PATH")]
    output: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    graphs: GraphArgs,
}

#[derive(Args)]
struct CleanPromptArgs {
    /// A prompt; repeat for several.
    #[arg(long, value_name = "TEXT", required = true)]
    prompt: Vec<String>,
    /// Aesthetic score appended before cleaning, or "none".
    #[arg(long, default_value = "6.5", value_parser = parse_aes, value_name = "SCORE|none")]
    aes: Aes,
}

#[derive(Args)]
struct EncodeTextArgs {
    /// T5 encoder directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    t5: PathBuf,
    /// Tokenizer directory (tokenizer.json).
    #[arg(long, value_name = "DIR")]
    tokenizer: PathBuf,
    /// A prompt, used as given; repeat for a batch.
    #[arg(long, value_name = "TEXT", required = true)]
    prompt: Vec<String>,
    /// Tokens per prompt after padding/truncation (Open-Sora 1.2 uses 300).
    #[arg(long, default_value_t = 300)]
    max_length: usize,
    /// Where to write the tensors (safetensors); written atomically.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct DecodeArgs {
    /// VAE directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    vae: PathBuf,
    /// Safetensors file with `z` [B,4,T,h,w] and `num_frames` (frames to produce).
    #[arg(long, value_name = "FILE")]
    inputs: PathBuf,
    /// Where to write `video` (safetensors); written atomically.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
}

#[derive(Args)]
struct ForwardArgs {
    /// STDiT3 model directory (config.json + model.safetensors or a sharded index), as on Hugging Face.
    #[arg(long, value_name = "DIR")]
    dit: PathBuf,
    /// Safetensors file with `x` [B,4,T,H,W], `timestep` [B], `y` [B,1,L,C], `fps`, `height`, `width` [B],
    /// and optionally `mask` [B,L] (caption lengths) and `x_mask` [B,T] (conditioning frames).
    #[arg(long, value_name = "FILE")]
    inputs: PathBuf,
    /// Where to write the result (safetensors); written atomically.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Also write the intermediates `act.x_embedder`, `act.t_block`, `act.y_embedder`,
    /// `act.spatial.N`, `act.temporal.N`, `act.final_layer`.
    #[arg(long)]
    trace: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct SampleArgs {
    /// STDiT3 model directory (config.json + model.safetensors or a sharded index).
    #[arg(long, value_name = "DIR")]
    dit: PathBuf,
    /// Safetensors file with `z0` [B,4,T,H,W] initial noise, `y` [B,1,L,C] T5 captions, `mask` [B,L],
    /// and per-sample `height`, `width`, `num_frames`, `fps` (pixel sizes and frame count of the video).
    #[arg(long, value_name = "FILE")]
    inputs: PathBuf,
    /// Where to write `z` (the final latent) and `timesteps` [steps,B]; written atomically.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Sampling steps [default: the inputs file's `num_sampling_steps` metadata, else 30].
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// Classifier-free guidance scale [default: the file's `cfg_scale` metadata, else 7.0].
    #[arg(long, value_name = "S")]
    cfg: Option<f32>,
    /// Disable the resolution/length-dependent timestep transform (on by default, as in Open-Sora 1.2;
    /// also off when the file's `use_timestep_transform` metadata is "false").
    #[arg(long)]
    no_timestep_transform: bool,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    graphs: GraphArgs,
}

fn main() {
    let cli = Cli::parse();
    qc::run_main(cli.threads, || run(cli));
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Forward(a) => forward(a),
        Command::Sample(a) => sample_cmd(a),
        Command::Generate(a) => generate(a),
        Command::Calibrate(a) => calibrate(a),
        Command::CleanPrompt(a) => {
            for p in &a.prompt {
                println!("{}", prepare_prompt(p, a.aes.0));
            }
            Ok(())
        }
        Command::EncodeText(a) => encode_text(a),
        Command::Decode(a) => decode(a),
        Command::Info => {
            println!("{}", qc::build_info());
            match qc::backend::cuda::probe() {
                Ok(gpu) => println!("gpu: {gpu}"),
                Err(why) => println!("gpu: none ({why}); using the CPU backend"),
            }
            Ok(())
        }
    }
}

fn forward(a: ForwardArgs) -> Result<()> {
    let mut model = Stdit3::load(&a.dit)?;
    let inp = ForwardInputs::read(&a.inputs)?;
    let xs = inp.x.shape().to_vec();
    let dev = DeviceBackend::new(a.device.device, notice, || {
        let mut bytes = qcuda::estimate_arena_bytes(&model.cfg, xs[0], [xs[2], xs[3], xs[4]], inp.y.shape()[2]);
        if a.trace {
            // Every block's output is kept for the trace: one residual stream each.
            let [pt, ph, pw] = model.cfg.patch();
            let rows = xs[0] * xs[2].div_ceil(pt) * xs[3].div_ceil(ph) * xs[4].div_ceil(pw);
            bytes += ((2 * model.cfg.depth + 4) * rows * model.cfg.hidden_size * 2) as u64;
        }
        bytes
    })?;
    let be = dev.get();
    model.prepare(be)?;
    let mut trace = Trace::default();
    let mut none = NoHooks;
    let hooks: &mut dyn qc::model::stdit3::ForwardHooks = if a.trace { &mut trace } else { &mut none };
    let text = model.encode_text(be, &inp.y, inp.mask.as_deref(), hooks).with_context(|| format!("{}", a.inputs.display()))?;
    let d = DitInput { x: &inp.x, timestep: &inp.timestep, fps: &inp.fps, height: inp.height[0], width: inp.width[0], x_mask: inp.x_mask.as_deref() };
    let out = model.forward(be, &d, &text, hooks).with_context(|| format!("{}", a.inputs.display()))?;
    let mut tensors = vec![("out".to_string(), out)];
    tensors.extend(trace.tensors);
    if dev.is_cuda() {
        tensors = tensors.into_iter().map(|(n, t)| host_f32(t).map(|t| (n, t))).collect::<Result<_>>()?;
    }
    dev.report();
    write_safetensors(&a.output, &tensors, None)?;
    eprintln!("wrote {} ({} tensors)", a.output.display(), tensors.len());
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> Result<()> {
    let mut model = Stdit3::load(&a.dit)?;
    let inp = SampleInputs::read(&a.inputs)?;
    let zs = inp.z0.shape().to_vec();
    // Classifier-free guidance runs the DiT on twice the samples.
    let dev = DeviceBackend::new(a.device.device, notice, || qcuda::estimate_arena_bytes(&model.cfg, 2 * zs[0], [zs[2], zs[3], zs[4]], inp.y.shape()[2]))?;
    dev.set_graphs(&a.graphs);
    let be = dev.get();
    model.prepare(be)?;
    let meta = |k: &str| inp.metadata.get(k).cloned();
    let parse = |k: &str| -> Result<Option<f64>> {
        meta(k).map(|v| v.parse::<f64>().with_context(|| format!("{}: metadata {k}={v:?} is not a number", a.inputs.display()))).transpose()
    };
    let mut cfg = RflowConfig::default();
    cfg.num_steps = match a.steps {
        Some(s) => s,
        None => parse("num_sampling_steps")?.map(|v| v as usize).unwrap_or(cfg.num_steps),
    };
    anyhow::ensure!(cfg.num_steps > 0, "--steps must be at least 1");
    cfg.cfg_scale = match a.cfg {
        Some(s) => s,
        None => parse("cfg_scale")?.map(|v| v as f32).unwrap_or(cfg.cfg_scale),
    };
    anyhow::ensure!(cfg.cfg_scale.is_finite(), "--cfg must be a finite number");
    cfg.num_timesteps = parse("num_timesteps")?.map(|v| v as f32).unwrap_or(cfg.num_timesteps);
    cfg.use_timestep_transform = !a.no_timestep_transform && meta("use_timestep_transform").as_deref() != Some("false");
    let geo = inp.geometry();

    let bar = ProgressBar::new(cfg.num_steps as u64);
    bar.set_style(ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let (z, ts) = sample(be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut NoHooks, &mut |i, _| bar.set_position(i as u64))
        .with_context(|| format!("{}", a.inputs.display()))?;
    let z = host_f32(z)?;
    bar.finish_and_clear();
    dev.report();
    let b = inp.z0.shape()[0];
    let ts_t = Tensor::from_f32(&[ts.len(), b], ts.concat())?;
    let meta_out = HashMap::from([
        ("num_sampling_steps".to_string(), cfg.num_steps.to_string()),
        ("cfg_scale".to_string(), cfg.cfg_scale.to_string()),
        ("use_timestep_transform".to_string(), cfg.use_timestep_transform.to_string()),
    ]);
    write_safetensors(&a.output, &[("z".into(), z), ("timesteps".into(), ts_t)], Some(meta_out))?;
    eprintln!("wrote {} ({} steps, cfg {})", a.output.display(), cfg.num_steps, cfg.cfg_scale);
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(f) = &a.prompt_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading --prompt-file {}", f.display()))?;
        prompts.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
    }
    anyhow::ensure!(!prompts.is_empty(), "no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE");
    let (model_dir, paths) = a.models.paths()?;
    let defaults = match &model_dir {
        Some(d) => ModelDefaults::from_dir(d)?,
        None => ModelDefaults::default(),
    };
    anyhow::ensure!((1..=16).contains(&a.upscale), "--upscale must be between 1 and 16");
    let init_noise = match &a.init_noise {
        Some(p) => Some(Checkpoint::open_file(p).and_then(|c| c.load_f32("z0")).with_context(|| format!("--init-noise {}", p.display()))?),
        None => None,
    };
    let base = defaults.options();
    let opts = GenerateOptions {
        frames: a.frames.unwrap_or(base.frames),
        height: a.height.unwrap_or(base.height),
        width: a.width.unwrap_or(base.width),
        steps: a.steps.unwrap_or(base.steps),
        cfg: a.cfg.unwrap_or(base.cfg),
        fps: a.fps.unwrap_or(base.fps),
        timestep_transform: a.timestep_transform.as_deref().map_or(base.timestep_transform, |v| v == "on"),
        aes: a.aes.0,
        raw_prompt: a.raw_prompt,
        seed: a.seed,
        init_noise,
        quant: a.quant,
        importance: a.calibration.as_deref().map(Importance::from_dir).transpose()?.map(std::sync::Arc::new),
        qk_int8: a.qk_int8,
        attn_bf16: a.attn_bf16,
    };
    qc::output::check_writable(&a.output, opts.frames)?;
    anyhow::ensure!(opts.importance.is_none() || opts.quant != QuantPreset::None, "--calibration needs a quantized --quant (w8a8, w4a8, w4a6, aigq)");
    anyhow::ensure!(!(a.qk_int8 && a.attn_bf16), "--qk-int8 and --attn-bf16 are two precisions of the same attention products: give one");
    anyhow::ensure!(!(a.qk_int8 && a.accel != "none"), "--accel {} runs the attention with bf16 operands: leave --qk-int8 out", a.accel);
    let mut opts = opts;
    let mut accel_cache: Option<(String, String)> = None;
    let mut policy = match qc::cache::accel::preset_name(&a.accel)? {
        None => {
            let calib = model_dir.as_deref().map(qc::cache::CacheCalibration::for_model).transpose()?.unwrap_or_default();
            let precision = if a.cache_int8 { qc::cache::CachePrecision::Int8 } else { qc::cache::CachePrecision::Native };
            qc::cache::policy_with(&a.cache, a.cache_threshold.as_deref(), &calib, precision).with_context(|| format!("--cache {}", a.cache))?
        }
        Some(preset) => {
            for (set, flag) in [(opts.quant != QuantPreset::None, "--quant"), (a.cache != "none", "--cache"), (a.cache_threshold.is_some(), "--cache-threshold"), (a.calibration.is_some(), "--calibration"), (a.cache_int8, "--cache-int8")] {
                anyhow::ensure!(!set, "--accel {} sets the quantization and the caching itself: leave {flag} out", a.accel);
            }
            let dir = model_dir.as_deref().ok_or_else(|| anyhow::anyhow!("--accel {} needs a model directory (--model DIR), not separate --dit/--t5/--tokenizer", a.accel))?;
            let accel = qc::cache::accel::Accel::for_model(dir, preset)?;
            eprintln!("accel: quantcache:{preset} from {} ({} at {}; aigq plan {:.2} bits)", accel.dir.display(), accel.preset.cache, accel.preset.threshold, accel.importance.meta["plan_bits"].as_f64().unwrap_or(f64::NAN));
            accel.apply(&mut opts);
            accel_cache = Some((accel.preset.cache.clone(), accel.preset.threshold.clone()));
            accel.policy()?
        }
    };
    if let Some(r) = &a.report {
        anyhow::ensure!(r.extension().is_some_and(|e| e == "json"), "--report {}: the report is JSON, name it FILE.json", r.display());
        let dir = r.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        anyhow::ensure!(dir.is_dir() && !r.is_dir(), "--report {}: directory {} does not exist, or the path is a directory", r.display(), dir.display());
        let probe = dir.join(format!(".qc-report-test-{}", std::process::id()));
        std::fs::write(&probe, b"").with_context(|| format!("--report {}: {} is not writable", r.display(), dir.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    let t_all = std::time::Instant::now();
    let plan = plan(&paths, &prompts, &opts)?;
    for p in plan.prompts() {
        eprintln!("prompt: {p}");
    }
    if plan.decoded_size() != (opts.height, opts.width) {
        let (h, w) = plan.decoded_size();
        eprintln!("note: the VAE decodes whole latent pixels: the video will be {h}x{w}");
    }
    // The GPU keeps the caches in its arena, bf16; the CPU on the heap, f32.
    let (cuda_cache, cpu_cache) = (plan.cache_bytes(policy.as_ref(), 2), plan.cache_bytes(policy.as_ref(), 4));
    let dev = DeviceBackend::new(a.device.device, notice, || plan.cuda_arena_bytes() + cuda_cache)?;
    if let Some(avail) = qc::pipeline::available_memory_bytes().filter(|_| !dev.is_cuda()) {
        plan.check_host_memory(cpu_cache, &a.cache, avail)?;
    }
    dev.set_graphs(&a.graphs);
    let be = dev.get();
    let bar = ProgressBar::new(opts.steps as u64);
    bar.set_style(ProgressStyle::with_template("{msg:>14} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let mut counting = qc::cache::Counting::new(policy.as_mut(), plan.blocks_per_forward());
    let (video, report) = plan.run(be, &opts, &mut counting, &mut |e| match e {
        Event::Stage(name) => {
            bar.set_message(name.to_string());
            bar.tick();
        }
        Event::Step(i, _) => bar.set_position(i as u64),
    })?;
    bar.finish_and_clear();
    dev.report();
    let t = std::time::Instant::now();
    let video = if a.upscale > 1 { qc::output::upscale_nearest(&video, a.upscale)? } else { video };
    let written = qc::output::write_video(&a.output, &video, opts.fps)?;
    let write_s = t.elapsed().as_secs_f64();
    let s = video.shape();
    eprintln!("video: {} x {} frames of {}x{} (latent {:?})", s[0], s[2], s[3], s[4], report.latent);
    for (name, secs) in &report.stages {
        eprintln!("  {name:<22} {secs:>8.2} s");
    }
    eprintln!("  {:<22} {write_s:>8.2} s", "write");
    if let Some(b) = report.peak_rss_bytes {
        eprintln!("  peak memory            {:>8.2} GiB", b as f64 / (1u64 << 30) as f64);
    }
    let w = report.dit_weights;
    eprintln!("  DiT block weights      {:>8.2} MiB ({}, {:.2} bits per weight read per step, {:.2} held)", w.bytes as f64 / (1u64 << 20) as f64, report.dit_precision, w.step_bits, w.bits());
    counting.finish();
    if let Some(path) = &a.report {
        let stage = |prefix: &str| report.seconds(prefix);
        let json = serde_json::json!({
            "stages_s": {"text": stage("text encoder"), "denoise": stage(qc::pipeline::STAGE_DIT_LOAD) + stage("denoising"), "decode": stage("VAE decode"), "write": write_s, "total": t_all.elapsed().as_secs_f64()},
            "peak_memory_bytes": report.peak_rss_bytes,
            "steps": opts.steps,
            "steps_computed": counting.steps_computed,
            "block_evals": {"computed": counting.blocks_computed, "possible": counting.blocks_total},
            "cache_peak_bytes": counting.cache_peak_bytes,
            "steps_conditional_only": counting.steps_conditional,
            "cache": accel_cache.as_ref().map_or(a.cache.as_str(), |c| c.0.as_str()),
            "cache_threshold": accel_cache.as_ref().map(|c| c.1.as_str()).or(a.cache_threshold.as_deref()),
            "accel": a.accel,
            "cache_int8": a.cache_int8,
            "device": be.name(),
            "prompts": report.prompts,
            "latent": report.latent,
            "seed": opts.seed,
            "quant": report.dit_precision,
            "attention": if opts.attn_bf16 { "bf16" } else if opts.qk_int8 { "int8 q k" } else { "f32" },
            "dit_weight_bits_per_step": w.step_bits,
            "dit_weight_bytes": w.bytes,
            "outputs": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
        qc::io::write_atomic(path, (serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
    }
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

#[derive(Args)]
struct CalibrateArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Calibration prompts, one per line (blank lines ignored).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Output directory (written to a temporary name, then renamed; an earlier calibration there is replaced).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Sampling steps of each trajectory [default: the model's defaults.json, else 30].
    #[arg(long)]
    steps: Option<usize>,
    /// Noise seeds per prompt, comma-separated.
    #[arg(long, default_value = "0", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Timestep ranges the statistics are kept for (equal parts of the trajectory).
    #[arg(long, default_value_t = 3)]
    ranges: usize,
    /// Also plan aigq: measure every block sub-module's sensitivity at w8a8 and w4a8 and choose a
    /// precision per sub-module (bf16, w8a8 or w4a8) so that the average bits per weight, scales
    /// included (bf16 = 16, w8a8 ~ 8, w4a8 ~ 4.5), are at most BITS at the least total sensitivity.
    /// Without it only importance vectors are written.
    #[arg(long, value_name = "BITS")]
    budget: Option<f64>,
    /// The lowest precision the aigq plan may give a sub-module (w8a8, w4a8 or w4a6); the choices
    /// below are neither measured nor chosen. On a CPU, where 4-bit weights run slower than 8-bit
    /// ones, `--lowest w8a8` keeps the plan at the fast precisions (the budget then reaches down to
    /// w8a8 everywhere).
    /// [default: w4a6]
    #[arg(long, value_name = "PRECISION")]
    lowest: Option<String>,
    /// Prompts (the first N of --prompts) whose trajectories measure the sensitivities.
    #[arg(long, default_value_t = 2, value_name = "N")]
    sensitivity_prompts: usize,
    /// Also calibrate `--accel quantcache` jointly (needs --budget): the sensitivities are weighted by
    /// HLC's caching schedule on the full-precision model (a served step is never quantized; a computed
    /// step's error is carried over the steps it serves), then hlc+srap thresholds are measured with the
    /// quantized checkpoint running against the full-precision videos and the presets fast (the largest
    /// threshold up to which every one reaches 30 dB mean PSNR on the prompts) and quality (34 dB), each plain hlc where
    /// SRAP skipped nothing at its threshold (the same videos without its measurements), written to QDIR/cache.json,
    /// with TeaCache's rescaling polynomial fitted on the full-precision trajectories.
    #[arg(long)]
    accel: bool,
}

fn calibrate(a: CalibrateArgs) -> Result<()> {
    use qc::quant::calibrate::{collect_stats, FORMAT, PLAN_CHOICES};
    // Checked before the trajectories run (minutes): the lowest precision the plan may choose.
    anyhow::ensure!(a.lowest.is_none() || a.budget.is_some(), "--lowest limits the aigq plan: give --budget BITS too");
    let lowest = match a.lowest.as_deref() {
        None => PLAN_CHOICES.len() - 1,
        Some(name) => PLAN_CHOICES.iter().skip(1).position(|p| p.name() == name).map(|i| i + 1).ok_or_else(|| anyhow::anyhow!("--lowest {name:?}: not a quantized plan choice (w8a8, w4a8 or w4a6)"))?,
    };
    if let Some(budget) = a.budget {
        // The exact reachable range needs the model's shapes (allocate checks it); nothing is below 4 bits (8 at w8a8).
        let (floor, at) = if PLAN_CHOICES[lowest] == qc::quant::preset::QuantPreset::W8A8 { (8, "w8a8") } else { (4, "w4a8") };
        anyhow::ensure!(budget.is_finite(), "--budget must be a number of bits per weight, got {budget}");
        anyhow::ensure!(budget >= floor as f64, "--budget {budget}: no allocation can meet it; the fewest average weight bits are a little above {floor} ({at} everywhere, its scales included), the most 16 (bf16)");
    }
    let text = std::fs::read_to_string(&a.prompts).with_context(|| format!("reading --prompts {}", a.prompts.display()))?;
    let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    anyhow::ensure!(!prompts.is_empty(), "--prompts {}: no prompt in the file", a.prompts.display());
    let (model_dir, paths) = a.models.paths()?;
    let defaults = match &model_dir {
        Some(d) => ModelDefaults::from_dir(d)?,
        None => ModelDefaults::default(),
    };
    let mut opts = defaults.options();
    opts.steps = a.steps.unwrap_or(opts.steps);
    let total = (prompts.len() * a.seeds.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} trajectories [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let t = std::time::Instant::now();
    let stats = collect_stats(&paths, &prompts, &opts, &a.seeds, a.ranges, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let mut dit = Stdit3::load(&paths.dit)?;
    let meta = serde_json::json!({
        "format": FORMAT,
        "version": 1,
        "model": paths.dit.display().to_string(),
        "prompts": prompts,
        "seeds": a.seeds,
        "steps": opts.steps,
        "cfg": opts.cfg,
        "ranges": a.ranges,
        "importance": "s[k] = max|x_k|^alpha / max|w_k|^(1 - alpha) (x over every token, step and range); per layer and preset the alpha (or none) with the least relative L2 output error on the sampled rows",
        "alphas": qc::quant::calibrate::ALPHAS,
    });
    let bar = ProgressBar::new(stats.len() as u64);
    bar.set_style(ProgressStyle::with_template("choosing importance vectors {bar:30} {pos}/{len} layers [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let mut imp = Importance::choose(&mut dit, &stats, meta, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    if let Some(budget) = a.budget {
        use qc::quant::calibrate::{allocate, measure_sensitivity};
        anyhow::ensure!(a.sensitivity_prompts >= 1, "--sensitivity-prompts must be at least 1");
        // The exact reachable range needs the model's shapes (allocate checks it); nothing is below 4 bits.
        let sp = &prompts[..a.sensitivity_prompts.min(prompts.len())];
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template("measuring sensitivity {bar:30} {pos}/{len} trajectories [{elapsed_precise}<{eta_precise}]").expect("valid template"));
        let weights = match a.accel {
            true => Some(qc::cache::calibrate::serving_weights(&CpuBackend::new(), &paths, sp, &opts, qc::cache::hlc::Hlc::DEFAULT_THRESHOLD)?),
            false => None,
        };
        let (items, boundaries, fractions) = measure_sensitivity(&paths, sp, &opts, a.seeds[0], a.ranges, &imp, weights.as_deref(), lowest, &mut |i, n| {
            bar.set_length((n * sp.len()) as u64);
            bar.set_position((i * sp.len()) as u64)
        })?;
        bar.finish_and_clear();
        let (plan, bits) = allocate(&items, &boundaries, &fractions, budget, lowest)?;
        let measured: Vec<serde_json::Value> = items
            .iter()
            .map(|it| {
                let per_choice: serde_json::Map<String, serde_json::Value> = PLAN_CHOICES.iter().zip(it.sensitivity).map(|(p, s)| (p.name().to_string(), serde_json::json!(s))).collect();
                let bits: serde_json::Map<String, serde_json::Value> = PLAN_CHOICES.iter().zip(it.bits).map(|(p, b)| (p.name().to_string(), serde_json::json!(b / it.values as f64))).collect();
                serde_json::json!({"unit": it.unit, "ranges": it.ranges, "weights": it.values, "bits": bits, "sensitivity": per_choice})
            })
            .collect();
        imp.meta["budget"] = serde_json::json!(budget);
        imp.meta["lowest"] = serde_json::json!(PLAN_CHOICES[lowest].name());
        imp.meta["plan_bits"] = serde_json::json!(bits);
        imp.meta["sensitivity"] = serde_json::json!({"measure": "relative L2 change of the final latent when only this sub-module is quantized, only in these timestep ranges", "prompts": sp, "seed": a.seeds[0], "decisions": measured, "step_weights": weights});
        imp.meta["plan"] = plan.to_json();
        let mut counts = [0usize; 4];
        for v in plan.units.values() {
            for p in v {
                counts[PLAN_CHOICES.iter().position(|c| c == p).unwrap_or(0)] += 1;
            }
        }
        eprintln!(
            "aigq plan: {bits:.2} average weight bits per step, scales included (budget {budget}); sub-module x range decisions: {} bf16, {} w8a8, {} w4a8, {} w4a6",
            counts[0], counts[1], counts[2], counts[3]
        );
        imp.plan = Some(plan);
    }
    // With a plan, the directory is also a quantized checkpoint (--model QDIR).
    let mut quantized = match imp.plan.clone() {
        Some(plan) => {
            let mut dit = Stdit3::load(&paths.dit)?;
            let w = qc::quant::preset::quantize_plan(&mut dit, &plan, Some(&imp))?;
            imp.meta["weights"] = serde_json::json!({"block_linear_values": w.values, "bytes_held": w.bytes, "bits_held": w.bits(), "bits_per_step": w.step_bits});
            Some((dit, plan))
        }
        None => None,
    };
    anyhow::ensure!(!a.accel || a.budget.is_some(), "--accel calibrates a quantized checkpoint: give --budget BITS");
    imp.write_dir(&stats, &a.output, &mut |tmp| match quantized.as_mut() {
        Some((dit, plan)) => {
            qc::quant::qdir::write_dit(dit, plan, &paths.dit, &tmp.join("stdit3"))?;
            qc::quant::qdir::link_components(&paths, model_dir.as_deref(), tmp)?;
            if a.accel {
                calibrate_accel(&paths, tmp, &prompts, &opts)?;
            }
            Ok(())
        }
        None => Ok(()),
    })?;
    if quantized.is_some() {
        let size = |d: &std::path::Path| std::fs::metadata(d.join("model.safetensors")).map(|m| m.len()).unwrap_or(0);
        eprintln!("quantized checkpoint: {} (DiT {:.2} MiB, float {:.2} MiB): run it with --model {}", a.output.display(), size(&a.output.join("stdit3")) as f64 / 1048576.0, size(&paths.dit) as f64 / 1048576.0, a.output.display());
    }
    eprintln!("calibrated {} block linears over {total} trajectories of {} steps in {:.1} s", stats.len(), opts.steps, t.elapsed().as_secs_f64());
    println!("{}", a.output.display());
    Ok(())
}

/// The caching half of `calibrate --accel`: TeaCache's polynomial and the
/// quantcache presets, measured with the quantized checkpoint in `qdir`
/// (still the temporary directory) running; written to `qdir/cache.json`.
fn calibrate_accel(paths: &ModelPaths, qdir: &std::path::Path, prompts: &[String], opts: &GenerateOptions) -> Result<()> {
    use qc::cache::{calibrate, CacheCalibration};
    let be = CpuBackend::new();
    let mut calib = CacheCalibration { teacache_coefficients: Some(calibrate::fit_teacache(&be, paths, prompts, opts)?), ..Default::default() };
    let importance = std::sync::Arc::new(qc::quant::calibrate::Importance::from_dir(qdir)?);
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("choosing cache thresholds {bar:30} {pos}/{len} videos [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let measured = calibrate::choose_presets(&be, paths, importance, prompts, opts, &mut calib, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    for m in &measured {
        eprintln!("  {} @ {:<10} PSNR {:>6.2} dB, blocks computed {:>5.1}%", m.cache, m.threshold, m.psnr_db, 100.0 * m.blocks_computed);
    }
    for (name, p) in &calib.presets {
        eprintln!("quantcache:{name}: {} @ {} ({:.2} dB, {:.1}% of block evaluations on the calibration prompts)", p.cache, p.threshold, p.psnr_db, 100.0 * p.blocks_computed);
    }
    std::fs::write(qdir.join(CacheCalibration::FILE), serde_json::to_string_pretty(&calib)? + "\n").with_context(|| format!("writing {}", qdir.join(CacheCalibration::FILE).display()))
}

fn parse_quant(s: &str) -> Result<QuantPreset> {
    QuantPreset::parse(s)
}

fn encode_text(a: EncodeTextArgs) -> Result<()> {
    let tok = T5Tokenizer::from_dir(&a.tokenizer)?;
    let mut t5 = T5Encoder::load(&a.t5)?;
    let dev = DeviceBackend::new(a.device.device, notice, || qcuda::estimate_t5_arena_bytes(t5.cfg.d_model, t5.cfg.d_ff, a.prompt.len() * a.max_length))?;
    let be = dev.get();
    t5.prepare(be)?;
    anyhow::ensure!(tok.vocab_size() <= t5.cfg.vocab_size, "tokenizer has {} tokens but the T5 encoder embeds only {}", tok.vocab_size(), t5.cfg.vocab_size);
    anyhow::ensure!(a.max_length > 0, "--max-length must be at least 1");
    let refs: Vec<&str> = a.prompt.iter().map(|s| s.as_str()).collect();
    let (ids, mask) = tok.encode_batch(&refs, a.max_length)?;
    let b = refs.len();
    let hidden = host_f32(t5.encode(be, &ids, &mask, b)?)?;
    dev.report();
    let shape = [b, a.max_length];
    write_safetensors(
        &a.output,
        &[
            ("input_ids".into(), Tensor::new(&shape, Storage::I64(ids))?),
            ("attention_mask".into(), Tensor::new(&shape, Storage::I64(mask))?),
            ("last_hidden_state".into(), hidden),
        ],
        Some(HashMap::from([("prompts".to_string(), serde_json::to_string(&a.prompt)?), ("max_length".to_string(), a.max_length.to_string())])),
    )?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

fn decode(a: DecodeArgs) -> Result<()> {
    let be = CpuBackend::new();
    let vae = VideoVae::load(&a.vae)?;
    let inputs = Checkpoint::open_file(&a.inputs).with_context(|| format!("reading inputs {}", a.inputs.display()))?;
    let z = inputs.load_f32("z").with_context(|| format!("{}", a.inputs.display()))?;
    let n = inputs.load_any("num_frames").with_context(|| format!("{}", a.inputs.display()))?.to_i64()?;
    anyhow::ensure!(n.len() == 1 && n[0] > 0, "{}: `num_frames` must hold one positive number", a.inputs.display());
    let video = vae.decode(&be, &z, n[0] as usize).with_context(|| format!("{}", a.inputs.display()))?;
    write_safetensors(&a.output, &[("video".into(), video)], None)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
