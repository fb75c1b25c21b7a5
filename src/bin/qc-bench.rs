//! `qc-bench`: speed of the engine's kernels and of the DiT, as ratios and
//! rates measured in one run against baselines measured in the same run.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use qc::backend::cpu::gemm::{sgemm, MatRef};
use qc::backend::cpu::CpuBackend;
use qc::backend::{Activation, AttnSpec, Backend, Linear, LinearWeight};
use qc::model::stdit3::{DitInput, NoHooks, Stdit3, Stdit3Config, Stdit3Weights};
use qc::quant::int4;
use qc::quant::int8::{self, QMAX_A8};
use qc::quant::preset::{quantize_blocks, QuantPreset};
use qc::rng::Rng;
use qc::sampler::rflow::{sample, RflowConfig, VideoGeometry};
use qc::tensor::Tensor;
use std::path::PathBuf;
use std::time::Instant;

#[path = "qc_bench/cublaslt.rs"]
mod cublaslt;
#[path = "qc_bench/gpu.rs"]
mod gpu;
#[path = "qc_bench/schedule.rs"]
mod schedule;

#[derive(Parser)]
#[command(name = "qc-bench", version, about = "Benchmarks of the quantcache engine (CPU backend; `gpu`: the CUDA kernels)")]
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
    /// The same generation (prompt, noise, steps, threads) with the engine and with the demo
    /// model's own PyTorch sampler (tools/train-demo/sample_torch.py): times per stage and their ratio.
    Torch(TorchArgs),
    /// CUDA GPU 0: qc_gemm_bf16 / qc_gemm_w8a8 at the DiT's shapes next to cuBLASLt bf16 / int8,
    /// spatial and temporal attention next to a straightforward one, the copy bandwidth and
    /// tensor-core peaks measured in the same run; one step and the 30-step loop of the
    /// full-size DiT (random weights) at 240p and 720p in bf16 and W8A8. Without a usable GPU
    /// it says so and exits 1.
    Gpu(GpuArgs),
    /// Each caching mode's decisions on the demonstration model, replayed on a DiT of Open-Sora
    /// 1.2's width (random weights) and timed over the whole sampling loop against the full
    /// computation in the same run (--device cpu or cuda).
    Schedule(schedule::ScheduleArgs),
}

#[derive(Args)]
struct GpuArgs {
    /// Timed launches per kernel measurement (the median is reported; use at least 20).
    #[arg(long, default_value_t = 25)]
    reps: usize,
    /// Shorter run: M = 54,000 only, and a depth-4 DiT end to end.
    #[arg(long)]
    quick: bool,
    /// Also measure the whole 30-step loop at 720p (otherwise 30 x the measured step).
    #[arg(long)]
    full: bool,
}

#[derive(Args)]
struct TorchArgs {
    /// Model directory [default: $QC_MODEL_DIR, else the bundled demo model].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// The prompt.
    #[arg(long, default_value = "a red circle moving right")]
    prompt: String,
    /// Seed of the shared initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling steps [default: the model's defaults.json].
    #[arg(long)]
    steps: Option<usize>,
    /// Python with torch, safetensors and tokenizers (tools/train-demo/setup.sh makes one).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Timed repetitions of each side (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(Args)]
struct QualityArgs {
    /// Model directory (stdit3/, t5/, tokenizer/, optional vae/, defaults.json) [default: $QC_MODEL_DIR, else the bundled demo model].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// JSON list of {prompt, colour, direction} [default: tools/train-demo/heldout_prompts.json].
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Accelerated modes to compare with the reference, comma-separated: a cache policy (reference, hlc,
    /// hlc-separate-cfg, srap, hlc+srap, teacache, pab, adacache, static:K; NAME@T sets its --cache-threshold,
    /// e.g. hlc@0.3 or hlc+srap@0.3,0.1), quantcache:fast or quantcache:quality (--accel, from the model's
    /// QuantCache calibration),
    /// a quantization preset (w8a8, w4a8, w4a6, aigq; add -is to fold in the importance vectors of
    /// --calibration, e.g. w4a6-is, then -qk8 for int8 Q K^T attention, e.g. w8a8-is-qk8, then -bf16 for attention with bf16 operands, e.g. w8a8-bf16), or both joined
    /// by + (w8a8+static:2). aigq runs the plan of --calibration (its quantized checkpoint when it has one).
    #[arg(long, default_value = "static:2", value_delimiter = ',')]
    modes: Vec<String>,
    /// Calibration directory (qc-run calibrate) whose importance vectors the -is modes fold in.
    #[arg(long, value_name = "DIR")]
    calibration: Option<PathBuf>,
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
    /// Generate each video N times and keep its fastest DiT and total times (the
    /// video and counts are the first run's): on a shared machine other work only
    /// slows a run down, so the minimum is the least disturbed measure.
    #[arg(long, default_value_t = 1, value_name = "N")]
    repeat: usize,
    /// Also time each part of the DiT forward (norm + qkv, attention, projections, MLP, ...) inside the
    /// loop, per mode, in ms per forward with the reference's time over each mode's; added to quality.md.
    #[arg(long)]
    parts: bool,
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
    /// Quantization presets whose sampling step is timed against the f32 one, comma-separated
    /// (w8a8, w4a8, w4a6; none for no such rows). Every block linear is quantized; no importance vectors.
    #[arg(long, default_value = "w8a8,w4a8", value_delimiter = ',', value_parser = parse_quant)]
    quant: Vec<QuantPreset>,
    /// Python with PyTorch, for torch._int_mm and torch's f32 linear at the same shapes and thread count
    /// [default: ~/.cache/quantcache/train-venv/bin/python; without one those columns are skipped].
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
}

fn parse_quant(s: &str) -> Result<QuantPreset> {
    let p = QuantPreset::parse(s)?;
    anyhow::ensure!(p != QuantPreset::Aigq, "--quant aigq needs a calibrated model; qc-bench cpu times the uniform presets (w8a8, w4a8, w4a6)");
    Ok(p)
}

fn main() {
    let cli = Cli::parse();
    qc::run_main(cli.threads, || run(cli));
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Cpu(a)) => cpu(&a),
        Some(Command::Quality(a)) => quality(&a),
        Some(Command::Torch(a)) => torch(&a),
        Some(Command::Schedule(a)) => schedule::schedule(&a),
        Some(Command::Gpu(a)) => match qc::backend::cuda::probe() {
            Ok(_) => gpu::gpu(&gpu::GpuBenchArgs { reps: a.reps, quick: a.quick, full: a.full }),
            Err(why) => {
                // No GPU: the CPU kernels at scaled-down shapes, said so, and still a failure
                // (tools/gpu-check on a machine whose GPU is unusable must not look green).
                println!("# qc-bench gpu: no usable CUDA GPU ({why}): the CPU kernels at scaled-down shapes instead (qc-bench cpu --depth 1 --height 120 --width 212 --frames 17 --reps 1)\n");
                let scaled = CpuArgs { depth: 1, height: 120, width: 212, frames: 17, reps: 1, ..CpuArgs::parse_from_defaults() };
                cpu(&scaled)?;
                anyhow::bail!("qc-bench gpu: no usable CUDA GPU ({why}); only the CPU kernels were measured")
            }
        },
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
    println!("# qc-bench cpu: {} threads, {}, int8 GEMMs on {}", rayon::current_num_threads(), cpu_name(), int8_isa());
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
    let mut rates = Vec::new();
    for (name, k, nn) in [("qkv", c, 3 * c), ("proj", c, c), ("mlp.fc1", c, cfg.mlp_hidden()), ("mlp.fc2", cfg.mlp_hidden(), c)] {
        let x = Tensor::from_f32(&[rows, k], rng.normal_vec(rows * k))?;
        let lin = Linear::new(Tensor::from_f32(&[nn, k], rng.normal_vec(nn * k))?, Some(Tensor::zeros(&[nn])))?;
        let ops = 2.0 * (rows * k * nn) as f64 / 1e9;
        let secs = time(a.reps, || be.linear(&x, &lin, Activation::None))?;
        let gf = ops / secs;
        println!("| linear {name} | {rows}x{k}x{nn} | {:.1} ms | {gf:.0} | {:.0} |", secs * 1e3, 100.0 * gf / peak);
        let lin8 = lin.to_int8(None, QMAX_A8)?;
        let secs8 = time(a.reps, || be.linear(&x, &lin8, Activation::None))?;
        println!("| linear {name} W8A8 (incl. quantize) | {rows}x{k}x{nn} | {:.1} ms | {:.0} GOP/s | {:.2}x f32 |", secs8 * 1e3, ops / secs8, secs / secs8);
        let lin4 = lin.to_int4(None, QMAX_A8)?;
        let secs4 = time(a.reps, || be.linear(&x, &lin4, Activation::None))?;
        println!("| linear {name} W4A8 (incl. quantize) | {rows}x{k}x{nn} | {:.1} ms | {:.0} GOP/s | {:.2}x f32, {:.2}x W8A8 |", secs4 * 1e3, ops / secs4, secs / secs4, secs8 / secs4);
        // The integer GEMMs alone, as torch._int_mm is timed: int8 activations in
        // (quantized once), here with the dequantization and bias fused into the f32 output.
        let xq = int8::quantize_rows(x.f32()?, k, None, QMAX_A8)?;
        let bias = lin.bias.as_ref().map(|b| b.f32()).transpose()?;
        let mut y = vec![0f32; rows * nn];
        let (gemm8, gemm8_vnni, gemm4) = match (&lin8.weight, &lin4.weight) {
            (LinearWeight::Int8(w8), LinearWeight::Int4(w4)) => (
                time(a.reps, || int8::linear_f32(&xq, w8, bias, &mut y))?,
                without_amx(|| time(a.reps, || int8::linear_f32(&xq, w8, bias, &mut y))).transpose()?,
                time(a.reps, || int4::linear_f32(&xq, w4, bias, &mut y))?,
            ),
            _ => anyhow::bail!("to_int8 / to_int4 returned another weight format"),
        };
        rates.push(LinearRates { name, shape: (rows, k, nn), f32_gflops: gf, w8_gemm: ops / gemm8, w8_gemm_vnni: gemm8_vnni.map(|t| ops / t), w8_linear: ops / secs8, w4_gemm: ops / gemm4, w4_linear: ops / secs4 });
    }
    println!();
    library_comparison(a, &rates);
    println!();
    println!("| measurement | shape | time | GFLOP/s | % of peak |");
    println!("| --- | --- | ---: | ---: | ---: |");

    attention_int8_rows(&be, a.reps, &mut rng)?;

    // One forward (batch 1) and one sampling step (CFG pair) at real width.
    let model = Stdit3::new(cfg.clone(), Stdit3Weights::random(&cfg, 1)?);
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
    let mut model = model;
    let mut current = QuantPreset::None;
    for &preset in a.quant.iter().filter(|p| **p != QuantPreset::None) {
        // Each preset from the float weights: reload them if an earlier preset replaced them.
        if current != QuantPreset::None {
            model.w = Stdit3Weights::random(&model.cfg, 1)?;
        }
        quantize_blocks(&mut model, preset, None)?;
        current = preset;
        let qs = time(a.reps, || sample(&be, &model, &rf, &z0, &y, Some(&mask), &geo, &mut NoHooks, &mut |_, _| {}))?;
        println!("| sampling step, {} (every block linear) | {geo_s} | {:.0} ms | - | {:.2}x f32 |", preset.name(), qs * 1e3, secs / qs);
    }
    println!();
    println!("Extrapolated to depth 28 and 30 steps at this geometry: {:.0} s for the DiT on this CPU.", full);
    Ok(())
}

/// Attention with int8 Q and K (`AttnSpec::qk_int8`, quantization included) next to the
/// float attention: Open-Sora 1.2's 3600-token spatial attention (one group, 16 heads of 72)
/// and the demo model's three attentions (a CFG pair of 4 x 8 x 8 tokens, 4 heads of 16,
/// captions of 9 and 13 tokens). Inputs as after Open-Sora's q/k RMS norm: unit-variance q and
/// k per element, plus a per-channel key offset shared by all keys (std 2); v unit normal.
fn attention_int8_rows(be: &CpuBackend, reps: usize, rng: &mut Rng) -> Result<()> {
    let cases = [
        ("spatial, Open-Sora 720p frame", AttnSpec::dense(1, 3600, 3600, 16, 72)),
        ("spatial, demo", AttnSpec::dense(8, 64, 64, 4, 16)),
        ("temporal, demo", AttnSpec::dense(128, 4, 4, 4, 16)),
        ("cross, demo", AttnSpec::ragged(256, 4, 16, AttnSpec::ranges_from_offsets(&[0, 9, 22]))),
    ];
    for (what, spec) in cases {
        let c = spec.heads * spec.head_dim;
        let (rows, nk) = (spec.groups * spec.q_len, spec.kv_ranges.iter().map(|r| r.1).max().unwrap_or(0));
        let offset = rng.normal_vec(c);
        let q = Tensor::from_f32(&[rows, c], rng.normal_vec(rows * c))?;
        let k = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c).into_iter().enumerate().map(|(i, x)| x + 2.0 * offset[i % c]).collect())?;
        let v = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c))?;
        let int8 = AttnSpec { qk_int8: true, ..spec.clone() };
        let float_s = time(reps, || be.attention(&q, &k, &v, &spec, None))?;
        let int8_s = time(reps, || be.attention(&q, &k, &v, &int8, None))?;
        let err = qc::tensor::rel_l2(be.attention(&q, &k, &v, &int8, None)?.f32()?, be.attention(&q, &k, &v, &spec, None)?.f32()?);
        let flops = 4.0 * (spec.groups * spec.heads * spec.q_len) as f64 * (nk as f64 / spec.groups as f64) * spec.head_dim as f64;
        let shape = format!("{} x {} queries, {} heads x {}", spec.groups, spec.q_len, spec.heads, spec.head_dim);
        println!("| attention {what} (float) | {shape} | {:.2} ms | {:.0} | - |", float_s * 1e3, flops / float_s / 1e9);
        println!("| attention {what}, int8 QK (incl. quantize) | {shape} | {:.2} ms | {:.0} | {:.2}x float; rel L2 {err:.1e} vs float |", int8_s * 1e3, flops / int8_s / 1e9, float_s / int8_s);
    }
    Ok(())
}

/// Rates of one DiT linear layer on our kernels (GFLOP/s, GOP/s).
struct LinearRates {
    name: &'static str,
    shape: (usize, usize, usize),
    f32_gflops: f64,
    w8_gemm: f64,
    /// The W8A8 GEMM on AVX-512 VNNI alone, where the CPU runs it on AMX.
    w8_gemm_vnni: Option<f64>,
    w8_linear: f64,
    w4_gemm: f64,
    w4_linear: f64,
}

/// Times torch._int_mm (int8 `[m, k] x [k, n]` -> int32) and torch's f32 linear at
/// each `MxKxN` argument with the given threads; prints `shape <mxkxn> <int_mm s> <f32 s>`
/// lines (medians), or `error <why>` when torch does not import.
const TORCH_GEMM_SCRIPT: &str = r#"
import sys, time
try:
    import torch
except Exception as e:
    print("error", e)
    sys.exit(0)
threads, reps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
print("version", torch.__version__, flush=True)

def median(f):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]

torch.manual_seed(0)
with torch.no_grad():
    for spec in sys.argv[3:]:
        m, k, n = map(int, spec.split("x"))
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
        x, w = torch.randn(m, k), torch.randn(n, k)
        t_int = median(lambda: torch._int_mm(a, b))
        t_f32 = median(lambda: torch.nn.functional.linear(x, w))
        print("shape", spec, t_int, t_f32, flush=True)
"#;

/// PyTorch's seconds (torch._int_mm, f32 linear) per shape, with its version; `Err` says why there are none.
fn torch_gemm_times(python: &std::path::Path, threads: usize, reps: usize, shapes: &[(usize, usize, usize)]) -> std::result::Result<(String, Vec<(f64, f64)>), String> {
    if !python.is_file() {
        return Err(format!("no Python at {} (pass --python)", python.display()));
    }
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(TORCH_GEMM_SCRIPT)
        .arg(threads.to_string())
        .arg(reps.max(1).to_string())
        .args(shapes.iter().map(|(m, k, n)| format!("{m}x{k}x{n}")))
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("{} failed: {}", python.display(), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
    }
    let (mut version, mut times) = (String::new(), Vec::new());
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["error", ..] => return Err(format!("PyTorch does not import in {}: {}", python.display(), f[1..].join(" "))),
            ["version", v] => version = v.to_string(),
            ["shape", _, ti, tf] => times.push((ti.parse().map_err(|_| format!("bad timing line: {line}"))?, tf.parse().map_err(|_| format!("bad timing line: {line}"))?)),
            _ => {}
        }
    }
    if times.len() != shapes.len() {
        return Err(format!("the PyTorch script timed {} of {} shapes", times.len(), shapes.len()));
    }
    Ok((version, times))
}

/// Our integer GEMMs against our f32 GEMM and, where PyTorch is found, against
/// torch._int_mm (oneDNN; AMX where the CPU has it) and torch's f32 linear at the
/// same shapes and thread count, measured in this run.
fn library_comparison(a: &CpuArgs, rates: &[LinearRates]) {
    let threads = rayon::current_num_threads();
    let python = a.python.clone().unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/quantcache/train-venv/bin/python"));
    let shapes: Vec<_> = rates.iter().map(|r| r.shape).collect();
    let torch = torch_gemm_times(&python, threads, a.reps, &shapes);
    match &torch {
        Ok((v, _)) => println!("Integer GEMMs (GOP/s) next to f32 (GFLOP/s), ours and PyTorch {v}'s, {threads} threads. GEMM: int8 activations in, dequantized f32 + bias out; linear: f32 in, incl. per-token quantization (what the DiT runs)."),
        Err(why) => println!("Integer GEMMs (GOP/s) next to our f32 GEMM (GFLOP/s), {threads} threads. PyTorch not found: {why}; no library columns."),
    }
    println!();
    println!("| layer | shape | f32 | W8A8 GEMM | W8A8 GEMM, VNNI only | W8A8 linear | W4A8 GEMM | W4A8 linear | torch f32 | torch._int_mm | W8A8 GEMM / f32 | W8A8 GEMM / _int_mm | W4A8 GEMM / _int_mm |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, r) in rates.iter().enumerate() {
        let (m, k, n) = r.shape;
        let ops = 2.0 * (m * k * n) as f64 / 1e9;
        let (tf, ti, q8, q4) = match &torch {
            Ok((_, t)) => {
                let (int_mm, f32) = (ops / t[i].0, ops / t[i].1);
                (format!("{f32:.0}"), format!("{int_mm:.0}"), format!("{:.2}x", r.w8_gemm / int_mm), format!("{:.2}x", r.w4_gemm / int_mm))
            }
            Err(_) => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let vnni = r.w8_gemm_vnni.map_or("- (no AMX)".into(), |v| format!("{v:.0}"));
        println!(
            "| {} | {m}x{k}x{n} | {:.0} | {:.0} | {vnni} | {:.0} | {:.0} | {:.0} | {tf} | {ti} | {:.2}x | {q8} | {q4} |",
            r.name, r.f32_gflops, r.w8_gemm, r.w8_linear, r.w4_gemm, r.w4_linear, r.w8_gemm / r.f32_gflops
        );
    }
}

/// `f()` with the int8 GEMMs kept off AMX, where they would run on it (`None`
/// on CPUs without AMX): the VNNI kernel's rate beside AMX's, in the same run.
fn without_amx<T>(f: impl FnOnce() -> T) -> Option<T> {
    #[cfg(target_arch = "x86_64")]
    if qc::quant::amx::available() {
        qc::quant::amx::set_enabled(false);
        let r = f();
        qc::quant::amx::set_enabled(true);
        return Some(r);
    }
    let _ = f;
    None
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

/// What the W8A8 GEMM runs on here.
fn int8_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if qc::quant::amx::available() {
            return "AMX (edge rows on AVX-512 VNNI)";
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            return "AVX-512 VNNI";
        }
    }
    "portable loops"
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
    let mut base = ModelDefaults::from_dir(&dir)?.options();
    if let Some(c) = &a.calibration {
        base.importance = Some(std::sync::Arc::new(qc::quant::calibrate::Importance::from_dir(c)?));
    }
    let be = CpuBackend::new();
    let paths = ModelPaths::in_dir(&dir);
    let total = cases.len() * a.seeds.len() * (a.modes.len() + 1);
    let mut done = 0;
    if a.parts {
        qc::model::stdit3::timing::start();
    }
    let result = harness::run_all(&be, &dir, &paths, &base, &cases, &a.seeds, &a.modes, a.strip, a.repeat, &mut |what| {
        done += 1;
        eprint!("\r[{done}/{total}] {what:<80}");
    });
    let parts = qc::model::stdit3::timing::stop();
    let (runs, strips) = result?;
    eprintln!();
    // Made once the runs succeeded: a refused mode leaves no empty directory behind.
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("creating {}: {e}", a.out.display()))?;
    let mut md = harness::markdown(&runs, &cases, base.steps);
    if a.parts {
        md = format!("{md}\n## Time per part of the DiT forward\n\n{}", harness::parts_markdown(&a.modes, &parts));
    }
    qc::io::write_atomic(&a.out.join("quality.md"), md.as_bytes())?;
    if !strips.is_empty() {
        harness::write_strip(&a.out.join("strip.png"), &strips, 4)?;
    }
    let summary: String = md.lines().take_while(|l| !l.is_empty()).collect::<Vec<_>>().join("\n");
    println!("# qc-bench quality: {} prompts x {} seeds, {} steps, cfg {}, model {}\n\n{summary}", cases.len(), a.seeds.len(), base.steps, base.cfg, dir.display());
    if a.parts {
        println!("\n{}", harness::parts_markdown(&a.modes, &parts));
    }
    println!("\nwrote {} and {}", a.out.join("quality.md").display(), a.out.join("strip.png").display());
    Ok(())
}

/// Seconds of `text encoding`, `DiT loop` printed by sample_torch.py.
fn parse_torch_times(out: &str) -> Option<(f64, f64)> {
    let line = out.lines().rev().find(|l| l.starts_with("text encoding"))?;
    let num = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.trim_start().split('s').next()?.trim().parse().ok()
    };
    Some((num("text encoding")?, num("DiT loop")?))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn torch(a: &TorchArgs) -> Result<()> {
    use qc::checkpoint::Checkpoint;
    use qc::model::stdit3::NoHooks;
    use qc::pipeline::{plan, ModelDefaults, ModelPaths};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = a.model.clone().or_else(|| std::env::var_os("QC_MODEL_DIR").map(PathBuf::from)).unwrap_or_else(|| root.join("models/demo"));
    anyhow::ensure!(dir.is_dir(), "model directory {} does not exist (pass --model)", dir.display());
    let python = a.python.clone().unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/quantcache/train-venv/bin/python"));
    anyhow::ensure!(python.is_file(), "no Python at {} (run tools/train-demo/setup.sh or pass --python)", python.display());
    let script = root.join("tools/train-demo/sample_torch.py");
    let mut opts = ModelDefaults::from_dir(&dir)?.options();
    if let Some(s) = a.steps {
        opts.steps = s;
    }
    let paths = ModelPaths::in_dir(&dir);
    anyhow::ensure!(paths.vae.is_none(), "the PyTorch comparison covers pixel-space models (no vae/) only");
    let tmp = std::env::temp_dir().join(format!("qc-bench-torch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let noise_path = tmp.join("z0.safetensors");
    let c = qc::model::stdit3::Stdit3Config::from_dir(&paths.dit)?.in_channels;
    let n = c * opts.frames * opts.height * opts.width;
    let z0 = Tensor::from_f32(&[1, c, opts.frames, opts.height, opts.width], Rng::new(a.seed).normal_vec(n))?;
    qc::io::write_safetensors(&noise_path, &[("z0".into(), z0.clone())], None)?;
    opts.init_noise = Some(z0);
    let threads = rayon::current_num_threads();

    let be = CpuBackend::new();
    let (mut e_text, mut e_dit, mut video) = (Vec::new(), Vec::new(), None);
    for _ in 0..a.reps.max(1) + 1 {
        let p = plan(&paths, std::slice::from_ref(&a.prompt), &opts)?;
        let (v, report) = p.run(&be, &opts, &mut NoHooks, &mut |_| {})?;
        e_text.push(report.seconds("text encoder"));
        e_dit.push(report.seconds(qc::pipeline::STAGE_DENOISE));
        video = Some(v);
    }
    // The first run warms caches and page mappings; drop it as the median's outlier guard.
    e_text.remove(0);
    e_dit.remove(0);

    let out_path = tmp.join("torch.safetensors");
    let (mut t_text, mut t_dit) = (Vec::new(), Vec::new());
    for _ in 0..a.reps.max(1) + 1 {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args(["--model", dir.to_str().unwrap_or_default(), "--prompt", &a.prompt, "--steps", &opts.steps.to_string()])
            .args(["--timestep-transform", if opts.timestep_transform { "on" } else { "off" }, "--threads", &threads.to_string()])
            .arg("--init-noise")
            .arg(&noise_path)
            .arg("--output")
            .arg(&out_path)
            .output()
            .map_err(|e| anyhow::anyhow!("running {}: {e}", python.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "sample_torch.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let (tt, td) = parse_torch_times(&text).ok_or_else(|| anyhow::anyhow!("sample_torch.py printed no timings: {text}"))?;
        t_text.push(tt);
        t_dit.push(td);
    }
    t_text.remove(0);
    t_dit.remove(0);
    let torch_video = Checkpoint::open_file(&out_path)?.load_f32("video")?;
    let err = qc::tensor::rel_l2(video.as_ref().expect("ran at least once").f32()?, torch_video.f32()?);
    let _ = std::fs::remove_dir_all(&tmp);

    let (et, ed, tt, td) = (median(e_text), median(e_dit), median(t_text), median(t_dit));
    println!("# qc-bench torch: \"{}\", {} steps, {} threads, model {}", a.prompt, opts.steps, threads, dir.display());
    println!();
    println!("| stage | engine (s) | PyTorch (s) | engine speed-up |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| text encoder (tokenize + T5) | {et:.3} | {tt:.3} | {:.2}x |", tt / et);
    println!("| DiT sampling loop | {ed:.3} | {td:.3} | {:.2}x |", td / ed);
    println!("| whole generation | {:.3} | {:.3} | {:.2}x |", et + ed, tt + td, (tt + td) / (et + ed));
    println!();
    println!("Same noise and prompt: engine vs PyTorch video relative L2 {err:.2e} (pixel space, no decoder stage).");
    println!("Engine stage times include loading that stage's model (memory-mapped); PyTorch's exclude it.");
    Ok(())
}
