//! `qc-bench gpu`: the CUDA kernels and one denoising step on GPU 0, against
//! ceilings measured in the same run (device-to-device copy bandwidth, our
//! bf16 GEMM at 8192^3).
//!
//! Method (/work/.library/device/METHOD.md): CUDA events around each launch
//! on one stream, warm-up launches first, the median of `--reps` timed
//! launches; every input set is random (normal bf16, uniform int8, never
//! zeros) and, when one set is smaller than twice the H100's 50 MB L2, the
//! launches rotate among enough sets to exceed it.
//!
//! Without a usable GPU (no driver, no device, a CPU-only build) it prints one
//! line saying so and returns Ok: nothing here panics on a machine without CUDA.

use anyhow::{anyhow, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use qc::backend::cuda::{self as qcuda, abi::*, launch_cfg, CudaBackend, KernelModule};
use qc::backend::Linear;
use qc::model::stdit3::{NoHooks, Stdit3, Stdit3Config, Stdit3Weights};
use qc::rng::Rng;
use qc::sampler::rflow::{sample, RflowConfig, VideoGeometry};
use qc::tensor::Tensor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

/// What `qc-bench gpu` was asked for.
pub struct GpuBenchArgs {
    /// Timed launches per kernel measurement (the median is reported).
    pub reps: usize,
    /// M = 54,000 only and a depth-4 DiT for the end-to-end step.
    pub quick: bool,
}

/// Bytes one rotation of input sets must exceed: twice the H100's 50 MB L2.
const ROTATE_BYTES: usize = 100 << 20;
/// Untimed launches before each timed series.
const WARMUP: usize = 3;
/// Bytes of the random pattern the device buffers are tiled with.
const PATTERN_BYTES: usize = 32 << 20;

/// Raw device memory (cuMemAlloc), freed on drop.
struct DevMem {
    ptr: u64,
    ctx: Arc<CudaContext>,
}

impl DevMem {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| anyhow!("cannot bind the CUDA context: {e}"))?;
        // SAFETY: a plain allocation in the bound context.
        let ptr = unsafe { result::malloc_sync(bytes.max(256)) }
            .map_err(|e| anyhow!("cuMemAlloc of {:.1} MiB: {e}", bytes as f64 / (1u64 << 20) as f64))?;
        Ok(DevMem { ptr, ctx: ctx.clone() })
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_sync in this context; no launch uses it after the
            // benchmark's stream synchronized.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// The device, the kernels, one stream and two random patterns (bf16 normals and
/// uniform bytes) that new buffers are filled from.
struct Bench {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: KernelModule,
    bf16_pattern: DevMem,
    byte_pattern: DevMem,
    reps: usize,
}

fn bf16_bits(x: f32) -> u16 {
    // Round to nearest even (finite inputs).
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

impl Bench {
    fn new(reps: usize) -> Result<Self> {
        let ctx = qcuda::open_device(0).map_err(anyhow::Error::msg)?;
        let module = KernelModule::load(&ctx).map_err(anyhow::Error::msg)?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("cannot create a CUDA stream: {e}"))?;
        let mut rng = Rng::new(0x9b_e7c4);
        let normals: Vec<u16> = rng.normal_vec(PATTERN_BYTES / 2).into_iter().map(bf16_bits).collect();
        let bytes: Vec<u8> = (0..PATTERN_BYTES / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
        let bf16_pattern = DevMem::new(&ctx, PATTERN_BYTES)?;
        let byte_pattern = DevMem::new(&ctx, PATTERN_BYTES)?;
        // SAFETY: both buffers hold PATTERN_BYTES.
        unsafe {
            result::memcpy_htod_sync(bf16_pattern.ptr, &normals).map_err(|e| anyhow!("cuMemcpyHtoD: {e}"))?;
            result::memcpy_htod_sync(byte_pattern.ptr, &bytes).map_err(|e| anyhow!("cuMemcpyHtoD: {e}"))?;
        }
        Ok(Bench { ctx, stream, module, bf16_pattern, byte_pattern, reps: reps.max(1) })
    }

    /// A buffer of `bytes` tiled with a random pattern (`int8`: uniform bytes, else bf16
    /// normals); offsets shift per buffer so that no two buffers hold the same bytes.
    fn random(&self, bytes: usize, int8: bool, salt: usize) -> Result<DevMem> {
        let m = DevMem::new(&self.ctx, bytes)?;
        let pat = if int8 { &self.byte_pattern } else { &self.bf16_pattern };
        let mut off = 0usize;
        let mut src_off = (salt * 4099 * 16) % (PATTERN_BYTES / 2);
        while off < bytes {
            let n = (bytes - off).min(PATTERN_BYTES - src_off);
            // SAFETY: both ranges lie inside their allocations.
            unsafe { result::memcpy_dtod_sync(m.ptr + off as u64, pat.ptr + src_off as u64, n) }.map_err(|e| anyhow!("cuMemcpyDtoD: {e}"))?;
            off += n;
            src_off = 0;
        }
        Ok(m)
    }

    /// A buffer holding `v` (f32).
    fn upload_f32(&self, v: &[f32]) -> Result<DevMem> {
        let m = DevMem::new(&self.ctx, v.len() * 4)?;
        // SAFETY: m holds v.
        unsafe { result::memcpy_htod_sync(m.ptr, v) }.map_err(|e| anyhow!("cuMemcpyHtoD: {e}"))?;
        Ok(m)
    }

    /// Milliseconds of `launch(i)` (i = launch number, for rotating inputs), each timed
    /// with its own pair of CUDA events after WARMUP untimed launches; sorted.
    fn time_ms(&self, mut launch: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
        for i in 0..WARMUP {
            launch(i)?;
        }
        self.stream.synchronize().map_err(|e| anyhow!("warm-up failed: {e}"))?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut evs = Vec::with_capacity(self.reps);
        for _ in 0..self.reps {
            let a = self.ctx.new_event(flags).map_err(|e| anyhow!("cuEventCreate: {e}"))?;
            let b = self.ctx.new_event(flags).map_err(|e| anyhow!("cuEventCreate: {e}"))?;
            evs.push((a, b));
        }
        for (i, (a, b)) in evs.iter().enumerate() {
            a.record(&self.stream).map_err(|e| anyhow!("cuEventRecord: {e}"))?;
            launch(WARMUP + i)?;
            b.record(&self.stream).map_err(|e| anyhow!("cuEventRecord: {e}"))?;
        }
        self.stream.synchronize().map_err(|e| anyhow!("a timed launch failed: {e}"))?;
        let mut t = Vec::with_capacity(evs.len());
        for (a, b) in &evs {
            t.push(a.elapsed_ms(b).map_err(|e| anyhow!("cuEventElapsedTime: {e}"))? as f64);
        }
        t.sort_by(|x, y| x.total_cmp(y));
        Ok(t)
    }
}

fn median(t: &[f64]) -> f64 {
    t[t.len() / 2]
}

/// Input sets needed so that one rotation exceeds [`ROTATE_BYTES`].
fn sets_for(bytes_per_set: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes_per_set.max(1)).clamp(1, 16)
}

/// One GEMM problem's device buffers (one input set).
struct GemmSet {
    a: DevMem,
    w: DevMem,
    out: DevMem,
    a_scale: Option<DevMem>,
    w_scale: Option<DevMem>,
}

/// Median milliseconds (and the fastest) of qc_gemm_bf16 (`int8` false) or
/// qc_gemm_w8a8 on `m` x `k` -> `n` with a bias and no epilogue.
fn gemm_ms(b: &Bench, m: usize, k: usize, n: usize, int8: bool) -> Result<(f64, f64)> {
    let el = if int8 { 1 } else { 2 };
    let set_bytes = (m * k + n * k) * el + m * n * 2;
    let nsets = sets_for(set_bytes);
    let mut rng = Rng::new((m * 31 + k * 7 + n) as u64);
    let bias = b.upload_f32(&rng.normal_vec(n))?;
    let mut sets = Vec::with_capacity(nsets);
    for s in 0..nsets {
        let scales = |len: usize, rng: &mut Rng| -> Vec<f32> { (0..len).map(|_| 1e-3 * (1.0 + rng.uniform() as f32)).collect() };
        sets.push(GemmSet {
            a: b.random(m * k * el, int8, 2 * s)?,
            w: b.random(n * k * el, int8, 2 * s + 1)?,
            out: DevMem::new(&b.ctx, m * n * 2)?,
            a_scale: if int8 { Some(b.upload_f32(&scales(m, &mut rng))?) } else { None },
            w_scale: if int8 { Some(b.upload_f32(&scales(n, &mut rng))?) } else { None },
        });
    }
    let (grid, block, shared) = launch_cfg::gemm(m as i64, n as i64);
    let t = b.time_ms(|i| {
        let s = &sets[i % nsets];
        // SAFETY: a [m, k], w [n, k], out [m, n], scales [m] / [n] and bias [n] are
        // allocated above with exactly these sizes and leading dimensions.
        let r = unsafe {
            if int8 {
                let args = QcGemmI8Args {
                    a: s.a.ptr,
                    a_scale: s.a_scale.as_ref().map_or(0, |x| x.ptr),
                    w: s.w.ptr,
                    w_scale: s.w_scale.as_ref().map_or(0, |x| x.ptr),
                    bias: bias.ptr,
                    out: s.out.ptr,
                    m: m as i64,
                    n: n as i64,
                    k: k as i64,
                    lda: k as i64,
                    ldw: k as i64,
                    ldo: n as i64,
                    ldr: n as i64,
                    group_size: 1,
                    epilogue: QC_EPI_NONE as i32,
                    ..Default::default()
                };
                b.module.launch_ext("qc_gemm_w8a8", grid, block, shared, &b.stream, &args)
            } else {
                let args = QcGemmArgs {
                    a: s.a.ptr,
                    w: s.w.ptr,
                    bias: bias.ptr,
                    out: s.out.ptr,
                    m: m as i64,
                    n: n as i64,
                    k: k as i64,
                    lda: k as i64,
                    ldw: k as i64,
                    ldo: n as i64,
                    ldr: n as i64,
                    group_size: 1,
                    epilogue: QC_EPI_NONE as i32,
                    ..Default::default()
                };
                b.module.launch_ext("qc_gemm_bf16", grid, block, shared, &b.stream, &args)
            }
        };
        r.map_err(anyhow::Error::msg)
    })?;
    drop(sets);
    Ok((median(&t), t[0]))
}

/// Median milliseconds of one device-to-device copy of `bytes` (rotating destinations).
fn copy_ms(b: &Bench, bytes: usize) -> Result<f64> {
    let src = b.random(bytes, true, 0)?;
    let dst = DevMem::new(&b.ctx, bytes)?;
    let t = b.time_ms(|_| {
        // SAFETY: both buffers hold `bytes`.
        unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, b.stream.cu_stream()) }.map_err(|e| anyhow!("cuMemcpyDtoDAsync: {e}"))
    })?;
    Ok(median(&t))
}

/// Median milliseconds of qc_attention_d80_bf16, spatial self-attention over `groups`
/// groups of `len` tokens, `heads` heads of `head_dim` (q, k, v slices of one qkv buffer).
fn attention_ms(b: &Bench, groups: usize, len: usize, heads: usize, head_dim: usize) -> Result<f64> {
    let (name, _) = launch_cfg::attention_kernel(head_dim).ok_or_else(|| anyhow!("no attention kernel for head dim {head_dim}"))?;
    let c = heads * head_dim;
    let rows = groups * len;
    let set_bytes = rows * 4 * c * 2;
    let nsets = sets_for(set_bytes);
    let mut sets = Vec::with_capacity(nsets);
    for s in 0..nsets {
        sets.push((b.random(rows * 3 * c * 2, false, s)?, DevMem::new(&b.ctx, rows * c * 2)?));
    }
    let (grid, block) = launch_cfg::attention(len as i64, heads as i64, groups as i64);
    let t = b.time_ms(|i| {
        let (qkv, out) = &sets[i % nsets];
        let args = QcAttentionArgs {
            q: qkv.ptr,
            k: qkv.ptr + (c * 2) as u64,
            v: qkv.ptr + (2 * c * 2) as u64,
            out: out.ptr,
            kv_start: 0,
            kv_end: 0,
            rope_freqs: 0,
            ldq: 3 * c as i64,
            ldk: 3 * c as i64,
            ldv: 3 * c as i64,
            ldo: c as i64,
            outer_stride: len as i64,
            inner_stride: 0,
            seq_stride: 1,
            groups: groups as i32,
            groups_inner: 1,
            q_len: len as i32,
            heads: heads as i32,
            head_dim: head_dim as i32,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        // SAFETY: qkv is [rows, 3C] and out [rows, C], as the args describe.
        unsafe { b.module.launch(name, grid, block, &b.stream, &args) }.map_err(anyhow::Error::msg)
    })?;
    Ok(median(&t))
}

/// Runs `f`, turning an error or a panic into a message.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
        )),
    }
}

pub fn gpu(a: &GpuBenchArgs) -> Result<()> {
    let info = match qcuda::probe() {
        Ok(i) => i,
        Err(why) => {
            println!("qc-bench gpu: no usable CUDA GPU ({why}); nothing measured.");
            return Ok(());
        }
    };
    println!("# qc-bench gpu: {info}");
    println!();
    println!(
        "First measurements (no earlier GPU run to compare with). CUDA events per launch, {WARMUP} warm-up launches, median of {} timed ones; random inputs (bf16 normals, uniform int8), rotated among enough sets to exceed {} MB; {}.",
        a.reps.max(1),
        ROTATE_BYTES >> 20,
        if a.quick { "--quick: M = 54,000 only, depth-4 DiT" } else { "full run" }
    );
    println!();
    let b = match guarded(|| Bench::new(a.reps)) {
        Ok(b) => b,
        Err(e) => {
            println!("qc-bench gpu: cannot set up the benchmark on {} ({e}); nothing measured.", info.name);
            return Ok(());
        }
    };

    println!("| measurement | shape | median | rate | note |");
    println!("| --- | --- | ---: | ---: | --- |");
    // Ceiling 1: device memory bandwidth.
    let copy_bytes = 1usize << 30;
    match guarded(|| copy_ms(&b, copy_bytes)) {
        Ok(ms) => println!(
            "| ceiling: cuMemcpyDtoD | 1 GiB | {ms:.3} ms | {:.0} GB/s | bytes read + written |",
            2.0 * copy_bytes as f64 / (ms * 1e-3) / 1e9
        ),
        Err(e) => println!("| ceiling: cuMemcpyDtoD | 1 GiB | - | - | FAILED: {e} |"),
    }
    // Ceiling 2: our bf16 GEMM on a large square problem (the fastest launch).
    let sq = 8192;
    let ceiling = match guarded(|| gemm_ms(&b, sq, sq, sq, false)) {
        Ok((ms, best)) => {
            let tf = 2.0 * (sq as f64).powi(3) / (best * 1e-3) / 1e12;
            println!(
                "| ceiling: qc_gemm_bf16 | {sq}^3 | {ms:.3} ms | {tf:.0} TFLOP/s | fastest launch {best:.3} ms ({:.0} TFLOP/s at the median) |",
                2.0 * (sq as f64).powi(3) / (ms * 1e-3) / 1e12
            );
            Some(tf)
        }
        Err(e) => {
            println!("| ceiling: qc_gemm_bf16 | {sq}^3 | - | - | FAILED: {e} |");
            None
        }
    };
    // TODO(cuBLASLt baseline): cudarc 0.19 has a `cublaslt` feature (dynamic loading of
    // libcublasLt.so.13; PyTorch's wheels ship it under site-packages/nvidia/cu13/lib, which
    // tools/gpu-check would add to LD_LIBRARY_PATH). Add it to Cargo.toml, check
    // `cudarc::cublaslt::sys::is_culib_present()` (or catch the loader's panic) so the binary
    // still runs where the library is absent, and time cublasLtMatmul bf16 (f32 compute) and
    // int8 (i32 compute) at 8192^3 and at the DiT shapes below, next to our kernels.
    println!("| cuBLASLt baseline | - | - | - | not implemented yet |");

    // The DiT's linear layers.
    let c = 1152;
    let ms_list: &[usize] = if a.quick { &[54_000] } else { &[54_000, 108_000] };
    let pct = |tf: f64| ceiling.map_or(String::new(), |cl| format!(", {:.0}% of the bf16 ceiling", 100.0 * tf / cl));
    for &m in ms_list {
        for (what, k, n) in [("qkv", c, 3 * c), ("proj", c, c), ("mlp.fc1", c, 4 * c), ("mlp.fc2", 4 * c, c)] {
            let shape = format!("{m}x{k}->{n} ({what})");
            let flops = 2.0 * (m * k * n) as f64;
            let bf = match guarded(|| gemm_ms(&b, m, k, n, false)) {
                Ok((ms, _)) => {
                    let tf = flops / (ms * 1e-3) / 1e12;
                    println!("| qc_gemm_bf16 | {shape} | {ms:.3} ms | {tf:.0} TFLOP/s | bias, no epilogue{} |", pct(tf));
                    Some(ms)
                }
                Err(e) => {
                    println!("| qc_gemm_bf16 | {shape} | - | - | FAILED: {e} |");
                    None
                }
            };
            match guarded(|| gemm_ms(&b, m, k, n, true)) {
                Ok((ms, _)) => {
                    let to = flops / (ms * 1e-3) / 1e12;
                    let up = bf.map_or("-".to_string(), |bms| format!("{:.2}x", bms / ms));
                    println!("| qc_gemm_w8a8 | {shape} | {ms:.3} ms | {to:.0} TOP/s | {up} over bf16 (activations already int8: quantization not included) |");
                }
                Err(e) => println!("| qc_gemm_w8a8 | {shape} | - | - | FAILED: {e} |"),
            }
        }
    }

    // Spatial attention: 2 samples (a CFG pair) x 15 frames of 3600 tokens, 16 heads of 72.
    let (groups, len, heads, hd) = (2 * 15, 3600, 16, 72);
    let shape = format!("{groups} groups x {len} tokens, {heads} heads x {hd}");
    match guarded(|| attention_ms(&b, groups, len, heads, hd)) {
        Ok(ms) => {
            let tf = 4.0 * (groups * heads) as f64 * (len as f64).powi(2) * hd as f64 / (ms * 1e-3) / 1e12;
            let r = ceiling.map_or(String::new(), |cl| format!("{:.2} of the bf16 GEMM ceiling; ", tf / cl));
            println!("| qc_attention_d80_bf16 spatial | {shape} | {ms:.3} ms | {tf:.0} TFLOP/s | {r}flops 4*g*h*L^2*d at d = {hd} (kernel pads to 80) |");
        }
        Err(e) => println!("| qc_attention_d80_bf16 spatial | {shape} | - | - | FAILED: {e} |"),
    }
    drop(b);

    // End to end: one denoising step (a CFG pair forward + update).
    let depth = if a.quick { 4 } else { 28 };
    if let Err(e) = guarded(|| end_to_end(depth)) {
        println!("| denoising step | depth {depth} | - | - | FAILED: {e} |");
    }
    println!();
    println!("All numbers above are first measurements of this code on this device: nothing here has been checked against an earlier run.");
    Ok(())
}

/// One RFLOW step (CFG pair forward, guidance, Euler update, caption preparation
/// included) at 240p, 51 frames (latent 15 x 30 x 53), random weights of the real
/// width at `depth`, in bf16 and then with every block linear in W8A8.
fn end_to_end(depth: usize) -> Result<()> {
    let cfg = Stdit3Config::xl2_with_depth(depth);
    let latent = [15usize, 30, 53];
    let (height, width, frames, text_tokens) = (240.0f32, 426.0f32, 51.0f32, 32usize);
    let reps = 3;
    let t0 = Instant::now();
    let w = Stdit3Weights::random(&cfg, 1)?;
    let q = qc::quant::int8::QMAX_A8;
    let int8: Vec<Vec<Linear>> = w
        .spatial
        .iter()
        .chain(w.temporal.iter())
        .map(|bw| [&bw.qkv, &bw.proj, &bw.cross_q, &bw.cross_kv, &bw.cross_proj, &bw.fc1, &bw.fc2].iter().map(|l| l.to_int8(None, q)).collect::<Result<Vec<_>>>())
        .collect::<Result<_>>()?;
    let setup_host = t0.elapsed().as_secs_f64();
    // The estimate plus a quarter (the W8A8 run's int8 activations are not measured yet);
    // the peak actually used is reported.
    let arena = qcuda::arena_bytes_from_env()?.unwrap_or_else(|| qcuda::estimate_arena_bytes(&cfg, 2, latent, cfg.model_max_length) * 5 / 4);
    let be = CudaBackend::with_arena_bytes(arena)?;
    let mut model = Stdit3 { w, cfg };
    let t1 = Instant::now();
    model.prepare(&be)?;
    be.synchronize()?;
    let upload = t1.elapsed().as_secs_f64();

    let mut rng = Rng::new(7);
    let (l, cc) = (model.cfg.model_max_length, model.cfg.caption_channels);
    let y = Tensor::from_f32(&[1, 1, l, cc], rng.normal_vec(l * cc))?;
    let mask: Vec<i64> = (0..l).map(|i| (i < text_tokens) as i64).collect();
    let cin = model.cfg.in_channels;
    let z0 = Tensor::from_f32(&[1, cin, latent[0], latent[1], latent[2]], rng.normal_vec(cin * latent.iter().product::<usize>()))?;
    let geo = VideoGeometry { height: vec![height], width: vec![width], num_frames: vec![frames], fps: vec![24.0] };
    let rf = RflowConfig { num_steps: 1, ..RflowConfig::default() };
    let step = |model: &Stdit3| -> Result<f64> {
        let mut v = Vec::new();
        for i in 0..=reps {
            be.synchronize()?;
            let t = Instant::now();
            let out = sample(&be, model, &rf, &z0, &y, Some(&mask), &geo, &mut NoHooks, &mut |_, _| {})?;
            be.synchronize()?;
            drop(out);
            if i > 0 {
                v.push(t.elapsed().as_secs_f64());
            }
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[v.len() / 2])
    };
    let geo_s = format!("240p 51 frames (latent 15x30x53), depth {depth}{}, {text_tokens} caption tokens", if depth < 28 { " (--quick: not the full 28)" } else { "" });
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let full = |s: f64| if depth < 28 { format!("~{:.1} s for 30 steps at depth 28 (linear extrapolation)", s * 30.0 * 28.0 / depth as f64) } else { format!("~{:.1} s for 30 steps", s * 30.0) };

    be.reset_arena_peak();
    let secs = step(&model)?;
    let st = be.arena_stats();
    println!(
        "| denoising step bf16 (CFG pair + update, wall clock) | {geo_s} | {secs:.3} s | - | peak arena {:.1} MiB of {:.1} MiB; {}; host weights {setup_host:.0} s, upload {upload:.0} s |",
        mib(st.peak),
        mib(st.capacity),
        full(secs)
    );

    // W8A8: every block linear (qkv, proj, cross q/kv/proj, fc1, fc2) through Linear::to_int8.
    let blocks = model.w.spatial.iter_mut().chain(model.w.temporal.iter_mut());
    for (bw, q8) in blocks.zip(int8) {
        let mut it = q8.into_iter();
        for l in [&mut bw.qkv, &mut bw.proj, &mut bw.cross_q, &mut bw.cross_kv, &mut bw.cross_proj, &mut bw.fc1, &mut bw.fc2] {
            *l = it.next().expect("seven linears per block");
        }
    }
    model.prepare(&be)?;
    be.synchronize()?;
    be.reset_arena_peak();
    let secs8 = step(&model)?;
    let st = be.arena_stats();
    println!(
        "| denoising step W8A8 (every block linear int8) | {geo_s} | {secs8:.3} s | {:.2}x bf16 | peak arena {:.1} MiB; {} |",
        secs / secs8,
        mib(st.peak),
        full(secs8)
    );
    Ok(())
}
