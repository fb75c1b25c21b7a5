//! `qc-run`: run Open-Sora 1.2 models with quantcache, and the debug
//! subcommands that check the engine against reference outputs.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qc::backend::cpu::CpuBackend;
use qc::io::write_safetensors;
use qc::model::stdit3::inputs::{ForwardInputs, SampleInputs};
use qc::model::stdit3::{DitInput, NoHooks, Stdit3, Trace};
use qc::sampler::rflow::{sample, RflowConfig, VideoGeometry};
use qc::tensor::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "qc-run", version, about = "Run Open-Sora 1.2 (STDiT3 + rectified flow) with the quantcache engine")]
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
    /// Version, build features (CUDA kernels compiled in or not, CPU features) and the GPU, if any.
    Info,
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
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("configuring --threads")?;
    }
    match cli.command {
        Command::Forward(a) => forward(a),
        Command::Sample(a) => sample_cmd(a),
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
    let be = CpuBackend::new();
    let model = Stdit3::load(&a.dit)?;
    let inp = ForwardInputs::read(&a.inputs)?;
    let mut trace = Trace::default();
    let mut none = NoHooks;
    let hooks: &mut dyn qc::model::stdit3::ForwardHooks = if a.trace { &mut trace } else { &mut none };
    let text = model.encode_text(&be, &inp.y, inp.mask.as_deref(), hooks).with_context(|| format!("{}", a.inputs.display()))?;
    let d = DitInput { x: &inp.x, timestep: &inp.timestep, fps: &inp.fps, height: inp.height[0], width: inp.width[0], x_mask: inp.x_mask.as_deref() };
    let out = model.forward(&be, &d, &text, hooks).with_context(|| format!("{}", a.inputs.display()))?;
    let mut tensors = vec![("out".to_string(), out)];
    tensors.extend(trace.tensors);
    write_safetensors(&a.output, &tensors, None)?;
    eprintln!("wrote {} ({} tensors)", a.output.display(), tensors.len());
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> Result<()> {
    let be = CpuBackend::new();
    let model = Stdit3::load(&a.dit)?;
    let inp = SampleInputs::read(&a.inputs)?;
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
    let geo = VideoGeometry { height: inp.height.clone(), width: inp.width.clone(), num_frames: inp.num_frames.clone(), fps: inp.fps.clone() };

    let bar = ProgressBar::new(cfg.num_steps as u64);
    bar.set_style(ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let (z, ts) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut NoHooks, &mut |i, _| bar.set_position(i as u64))
        .with_context(|| format!("{}", a.inputs.display()))?;
    bar.finish_and_clear();
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
