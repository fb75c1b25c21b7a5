//! `qc-bench schedule`: each caching mode's decisions, recorded on the
//! demonstration model, replayed on a DiT of Open-Sora 1.2's width (random
//! weights) and timed over the whole sampling loop against the full computation
//! in the same run. The speed a mode would have at full width with the schedule
//! it chose on the small model (the decisions themselves depend on the weights,
//! so this is labelled as such).

use anyhow::{Context, Result};
use clap::Args;
use qc::backend::select::{DeviceBackend, DeviceChoice};
use qc::cache::replay::Replay;
use qc::cache::Counting;
use qc::model::stdit3::{ForwardHooks, NoHooks, Stdit3, Stdit3Config, Stdit3Weights};
use qc::pipeline::{plan, ModelDefaults, ModelPaths};
use qc::quality::harness::parse_mode;
use qc::quant::preset::{quantize_blocks, QuantPreset};
use qc::rng::Rng;
use qc::sampler::rflow::{sample, RflowConfig, VideoGeometry};
use qc::tensor::Tensor;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct ScheduleArgs {
    /// Modes as `qc-bench quality` names them (a cache policy, NAME@THRESHOLD, quantcache:fast, ...).
    #[arg(long, value_delimiter = ',', default_value = "hlc,hlc@0.3,hlc+srap@0.3,teacache@0.2,adacache,pab,static:2,quantcache:fast,quantcache:quality")]
    modes: Vec<String>,
    /// The prompt the demonstration model's schedules are recorded on.
    #[arg(long, default_value = "a red circle moving right")]
    prompt: String,
    /// Demonstration model directory [default: the bundled one].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Depth (block pairs) of the full-width DiT; the real model has 28.
    #[arg(long, default_value_t = 2)]
    depth: usize,
    /// Video of the full-width run (pixels; latent = /8, 17 frames -> 5 latent frames).
    #[arg(long, default_value_t = 17)]
    frames: usize,
    #[arg(long, default_value_t = 120)]
    height: usize,
    #[arg(long, default_value_t = 212)]
    width: usize,
    /// Precision of every block linear at full width for the modes that quantize (their
    /// aigq plan is the small model's; w4a8 is its most frequent choice and slower than w8a8 here).
    #[arg(long, default_value = "w4a8", value_parser = QuantPreset::parse)]
    quant_as: QuantPreset,
    /// Where the full-width model runs.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
}

pub fn schedule(a: &ScheduleArgs) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = a.model.clone().unwrap_or_else(|| root.join("models/demo"));
    let paths = ModelPaths::in_dir(&dir);
    let demo_opts = ModelDefaults::from_dir(&dir)?.options();
    let demo_depth = Stdit3Config::from_dir(&paths.dit)?.depth;
    let cpu = qc::backend::cpu::CpuBackend::new();

    let cfg = Stdit3Config::xl2_with_depth(a.depth);
    let mut rng = Rng::new(0);
    let lt = if a.frames <= 1 { 1 } else { a.frames.div_ceil(17) * 5 };
    let (lh, lw) = (a.height.div_ceil(8), a.width.div_ceil(8));
    let dev = DeviceBackend::new(a.device, |n| eprintln!("note: {n}"), || qc::backend::cuda::estimate_arena_bytes(&cfg, 2, [lt, lh, lw], cfg.model_max_length) * 2)?;
    let be = dev.get();
    let z0 = Tensor::from_f32(&[1, 4, lt, lh, lw], rng.normal_vec(4 * lt * lh * lw))?;
    let (l, cc) = (cfg.model_max_length, cfg.caption_channels);
    let y = Tensor::from_f32(&[1, 1, l, cc], rng.normal_vec(l * cc))?;
    let mask: Vec<i64> = (0..l).map(|i| (i < 32) as i64).collect();
    let geo = VideoGeometry { height: vec![a.height as f32], width: vec![a.width as f32], num_frames: vec![a.frames as f32], fps: vec![24.0] };
    let rf = RflowConfig { num_steps: demo_opts.steps, use_timestep_transform: false, ..RflowConfig::default() };
    let weights = || Stdit3Weights::random(&cfg, 1);
    let mut float = Stdit3::new(cfg.clone(), weights()?);
    float.prepare(be)?;
    let mut quantized = Stdit3::new(cfg.clone(), weights()?);
    quantize_blocks(&mut quantized, a.quant_as, None)?;
    quantized.prepare(be)?;

    let run = |model: &Stdit3, hooks: &mut dyn ForwardHooks| -> Result<f64> {
        let t = Instant::now();
        sample(be, model, &rf, &z0, &y, Some(&mask), &geo, hooks, &mut |_, _| {})?;
        Ok(t.elapsed().as_secs_f64())
    };
    println!("# qc-bench schedule: {} steps; schedules recorded on {} (\"{}\"), replayed on a DiT of Open-Sora 1.2's width with random weights: depth {}, {}x{}x{} px ({} tokens), {}", demo_opts.steps, dir.display(), a.prompt, a.depth, a.frames, a.height, a.width, lt * lh.div_ceil(2) * lw.div_ceil(2), be.name());
    println!();
    println!("| mode | steps computed | blocks computed | full-width loop (s) | speed-up |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let reference = run(&float, &mut NoHooks)?;
    println!("| reference (f32) | {0}/{0} | 100.0% | {reference:.2} | 1.00x |", demo_opts.steps);
    for mode in &a.modes {
        let m = parse_mode(mode, &dir).with_context(|| format!("mode {mode:?}"))?;
        let mut hooks = m.hooks;
        let opts = qc::pipeline::GenerateOptions { seed: 0, quant: m.quant, importance: m.accel.clone(), qk_int8: m.qk_int8, attn_bf16: m.attn_bf16, ..demo_opts.clone() };
        let p = plan(&paths, std::slice::from_ref(&a.prompt), &opts)?;
        let blocks = p.blocks_per_forward();
        let mut counting = Counting::new(hooks.as_mut(), blocks);
        counting.schedule = Some(Vec::new());
        p.run(&cpu, &opts, &mut counting, &mut |_| {})?;
        counting.finish();
        let steps = counting.schedule.take().unwrap_or_default();
        let model = if m.quant == QuantPreset::None { &float } else { &quantized };
        let secs = run(model, &mut Replay::new(steps, demo_depth, a.depth))?;
        let label = if m.quant == QuantPreset::None { mode.clone() } else { format!("{mode} (block linears {})", a.quant_as.name()) };
        println!("| {label} | {}/{} | {:.1}% | {secs:.2} | {:.2}x |", counting.steps_computed, demo_opts.steps, 100.0 * counting.computed_fraction(), reference / secs);
    }
    Ok(())
}
