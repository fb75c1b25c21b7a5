//! `qc-bench`: speed of the engine's kernels and of the DiT, as ratios and
//! rates measured in one run against baselines measured in the same run.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use qc::backend::cpu::gemm::{sgemm, MatRef};
use qc::backend::cpu::CpuBackend;
use qc::backend::{Activation, Backend, Linear};
use qc::model::stdit3::{DitInput, NoHooks, Stdit3, Stdit3Config, Stdit3Weights};
use qc::rng::Rng;
use qc::sampler::rflow::{sample, RflowConfig, VideoGeometry};
use qc::tensor::Tensor;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "qc-bench", version, about = "Benchmarks of the quantcache engine (CPU backend)")]
struct Cli {
    /// Worker threads (default: one per core).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// CPU: machine peak (large f32 GEMM), GEMM at the DiT's shapes, one STDiT3 forward and one sampling step.
    Cpu(CpuArgs),
    /// Quality of accelerated modes against the full computation: PSNR, SSIM, MAE, temporal
    /// consistency, blocks computed, DiT time and prompt following; writes quality.md and strip.png.
    Quality(QualityArgs),
}

#[derive(Args)]
struct QualityArgs {
    /// Model directory (stdit3/, t5/, tokenizer/, optional vae/, defaults.json) [default: $QC_MODEL_DIR, else the bundled demo model].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// JSON list of {prompt, colour, direction} [default: tools/train-demo/heldout_prompts.json].
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Accelerated modes to compare with the reference, comma-separated (reference, static:K).
    #[arg(long, default_value = "static:2", value_delimiter = ',')]
    modes: Vec<String>,
    /// Seeds, comma-separated.
    #[arg(long, default_value = "0", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Use only the first N prompts.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Prompts shown in the image strip.
    #[arg(long, default_value_t = 4)]
    strip: usize,
    /// Output directory for quality.md and strip.png.
    #[arg(long, default_value = "quality-report", value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args, Clone)]
struct CpuArgs {
    /// DiT depth (spatial+temporal block pairs); the real model has 28.
    #[arg(long, default_value_t = 2)]
    depth: usize,
    /// Video height in pixels (latent = /8); 240 with width 426 is Open-Sora's 240p.
    #[arg(long, default_value_t = 240)]
    height: usize,
    /// Video width in pixels.
    #[arg(long, default_value_t = 426)]
    width: usize,
    /// Video frames (17 -> 5 latent frames, 51 -> 15).
    #[arg(long, default_value_t = 17)]
    frames: usize,
    /// Caption tokens per prompt (of the 300 T5 positions).
    #[arg(long, default_value_t = 32)]
    text_tokens: usize,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    qc::set_threads(cli.threads)?;
    match cli.command {
        Some(Command::Cpu(a)) => cpu(&a),
        Some(Command::Quality(a)) => quality(&a),
        None => cpu(&CpuArgs::parse_from_defaults()),
    }
}

impl CpuArgs {
    fn parse_from_defaults() -> Self {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            a: CpuArgs,
        }
        Wrap::parse_from(["qc-bench"]).a
    }
}

/// Median seconds of `reps` runs after one warm-up run.
fn time<T>(reps: usize, f: impl FnMut() -> Result<T>) -> Result<f64> {
    Ok(times(reps, f)?[reps.max(1) / 2])
}

/// Sorted seconds of `reps` runs after one warm-up run.
fn times<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<Vec<f64>> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::hint::black_box(f()?);
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v)
}

fn cpu(a: &CpuArgs) -> Result<()> {
    let be = CpuBackend::new();
    let mut rng = Rng::new(0);
    println!("# qc-bench cpu: {} threads, {}", rayon::current_num_threads(), cpu_name());
    println!();

    // Machine peak: a large square f32 product through the GEMM crate.
    let n = 2048;
    let (x, y) = (rng.normal_vec(n * n), rng.normal_vec(n * n));
    let mut z = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    // The peak is the best of a few runs: this machine's clock varies between runs.
    let secs = times(a.reps + 2, || {
        sgemm(n, n, n, MatRef { data: &x, rs: n, cs: 1 }, MatRef { data: &y, rs: n, cs: 1 }, &mut z, n, false, threads);
        Ok(())
    })?[0];
    let peak = 2.0 * (n * n * n) as f64 / secs / 1e9;
    println!("| measurement | shape | time | GFLOP/s | % of peak |");
    println!("| --- | --- | ---: | ---: | ---: |");
    println!("| peak: f32 GEMM (gemm crate) | {n}x{n}x{n} | {:.1} ms | {peak:.0} | 100 |", secs * 1e3);

    // The DiT's linear layers at this geometry (CFG batch of 2).
    let cfg = Stdit3Config::xl2_with_depth(a.depth);
    let c = cfg.hidden_size;
    let (lt, lh, lw) = (latent_frames(a.frames), a.height.div_ceil(8), a.width.div_ceil(8));
    let (t, s) = (lt, lh.div_ceil(2) * lw.div_ceil(2));
    let rows = 2 * t * s;
    for (name, k, nn) in [("qkv", c, 3 * c), ("proj", c, c), ("mlp.fc1", c, cfg.mlp_hidden()), ("mlp.fc2", cfg.mlp_hidden(), c)] {
        let x = Tensor::from_f32(&[rows, k], rng.normal_vec(rows * k))?;
        let lin = Linear::new(Tensor::from_f32(&[nn, k], rng.normal_vec(nn * k))?, Some(Tensor::zeros(&[nn])))?;
        let secs = time(a.reps, || be.linear(&x, &lin, Activation::None))?;
        let gf = 2.0 * (rows * k * nn) as f64 / secs / 1e9;
        println!("| linear {name} | {rows}x{k}x{nn} | {:.1} ms | {gf:.0} | {:.0} |", secs * 1e3, 100.0 * gf / peak);
    }

    // One forward (batch 1) and one sampling step (CFG pair) at real width.
    let model = Stdit3 { w: Stdit3Weights::random(&cfg, 1)?, cfg };
    let mk = |b: usize, rng: &mut Rng| Tensor::from_f32(&[b, 4, lt, lh, lw], rng.normal_vec(b * 4 * lt * lh * lw));
    let (l, cc) = (model.cfg.model_max_length, model.cfg.caption_channels);
    let y = Tensor::from_f32(&[1, 1, l, cc], rng.normal_vec(l * cc))?;
    let mask: Vec<i64> = (0..l).map(|i| (i < a.text_tokens) as i64).collect();
    let text = model.encode_text(&be, &y, Some(&mask), &mut NoHooks)?;
    let x = mk(1, &mut rng)?;
    let inp = DitInput { x: &x, timestep: &[500.0], fps: &[24.0], height: a.height as f32, width: a.width as f32, x_mask: None };
    let secs = time(a.reps, || model.forward(&be, &inp, &text, &mut NoHooks))?;
    let flops = model.forward_flops(1, t, s, a.text_tokens);
    let gf = flops / secs / 1e9;
    let geo_s = format!("{}x{}x{} px, depth {}, {} tokens", a.frames, a.height, a.width, a.depth, t * s);
    println!("| STDiT3 forward (B=1) | {geo_s} | {:.0} ms | {gf:.0} | {:.0} |", secs * 1e3, 100.0 * gf / peak);

    let x2 = mk(2, &mut rng)?;
    let y2 = be.concat(&[&y, &y])?;
    let text2 = model.encode_text(&be, &y2, Some(&mask), &mut NoHooks)?;
    let inp2 = DitInput { x: &x2, timestep: &[500.0, 500.0], fps: &[24.0], height: a.height as f32, width: a.width as f32, x_mask: None };
    let secs = time(a.reps, || model.forward(&be, &inp2, &text2, &mut NoHooks))?;
    let gf = model.forward_flops(2, t, s, 2 * a.text_tokens) / secs / 1e9;
    println!("| STDiT3 forward (B=2, a CFG pair) | {geo_s} | {:.0} ms | {gf:.0} | {:.0} |", secs * 1e3, 100.0 * gf / peak);
    let z0 = mk(1, &mut rng)?;
    let geo = VideoGeometry { height: vec![a.height as f32], width: vec![a.width as f32], num_frames: vec![a.frames as f32], fps: vec![24.0] };
    let rf = RflowConfig { num_steps: 1, ..RflowConfig::default() };
    let secs = time(a.reps, || sample(&be, &model, &rf, &z0, &y, Some(&mask), &geo, &mut NoHooks, &mut |_, _| {}))?;
    let flops = model.forward_flops(2, t, s, 2 * a.text_tokens);
    let gf = flops / secs / 1e9;
    println!("| sampling step (CFG pair, incl. text prep) | {geo_s} | {:.0} ms | {gf:.0} | {:.0} |", secs * 1e3, 100.0 * gf / peak);
    let full = secs * 28.0 / a.depth as f64 * 30.0;
    println!();
    println!("Extrapolated to depth 28 and 30 steps at this geometry: {:.0} s for the DiT on this CPU.", full);
    Ok(())
}

fn latent_frames(frames: usize) -> usize {
    if frames <= 1 {
        1
    } else {
        // VAE 1.2: 17 frames -> 5 latent frames per chunk, remainders rounded up as the temporal VAE pads.
        let chunks = frames / 17;
        let rest = frames % 17;
        chunks * 5 + if rest > 0 { 1 + (rest.saturating_sub(1)).div_ceil(4) } else { 0 }
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

fn quality(a: &QualityArgs) -> Result<()> {
    use qc::pipeline::{ModelDefaults, ModelPaths};
    use qc::quality::harness;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = a.model.clone().or_else(|| std::env::var_os("QC_MODEL_DIR").map(PathBuf::from)).unwrap_or_else(|| root.join("models/demo"));
    anyhow::ensure!(dir.is_dir(), "model directory {} does not exist (pass --model)", dir.display());
    let prompts = a.prompts.clone().unwrap_or_else(|| root.join("tools/train-demo/heldout_prompts.json"));
    let mut cases = harness::read_cases(&prompts)?;
    if let Some(n) = a.limit {
        cases.truncate(n);
    }
    let base = ModelDefaults::from_dir(&dir)?.options();
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("creating {}: {e}", a.out.display()))?;
    let be = CpuBackend::new();
    let paths = ModelPaths::in_dir(&dir);
    let total = cases.len() * a.seeds.len() * (a.modes.len() + 1);
    let mut done = 0;
    let (runs, strips) = harness::run_all(&be, &paths, &base, &cases, &a.seeds, &a.modes, a.strip, &mut |what| {
        done += 1;
        eprint!("\r[{done}/{total}] {what:<80}");
    })?;
    eprintln!();
    let md = harness::markdown(&runs, &cases);
    qc::io::write_atomic(&a.out.join("quality.md"), md.as_bytes())?;
    if !strips.is_empty() {
        harness::write_strip(&a.out.join("strip.png"), &strips, 4)?;
    }
    let summary: String = md.lines().take_while(|l| !l.is_empty()).collect::<Vec<_>>().join("\n");
    println!("# qc-bench quality: {} prompts x {} seeds, {} steps, cfg {}, model {}\n\n{summary}", cases.len(), a.seeds.len(), base.steps, base.cfg, dir.display());
    println!("\nwrote {} and {}", a.out.join("quality.md").display(), a.out.join("strip.png").display());
    Ok(())
}
