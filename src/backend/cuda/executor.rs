//! [`CudaBackend`]: the [`Backend`](crate::backend::Backend) of the DiT, the
//! sampler and the T5 encoder on one CUDA GPU, through the kernels of
//! `kernels/*.cu` (semantics in `kernels/qc_types.h`). The ops themselves are
//! in `executor_ops.rs` (`Backend`) and `conv_ops.rs` (`ConvOps`, the VAE's);
//! this file holds the backend's state, its memory and the helpers every op uses.
//!
//! # Data
//! - Activations live on the device in bf16 (as Open-Sora's bf16 inference
//!   keeps them); the sampler state `z`, the model output, modulation tables,
//!   embeddings' sinusoids and other small f32 things stay f32 on the device.
//!   Every op's output is a device tensor; it stays there until
//!   [`Tensor::to_cpu`]. Rule of thumb: layout ops (split, narrow, concat,
//!   gather, swap, select) keep the dtype; elementwise ops give f32 when all
//!   inputs are f32 and bf16 otherwise; linear layers and attention give bf16.
//! - Every op also accepts host tensors (uploading them, converted to the
//!   dtype it computes in), so the model code is the same as on the CPU, and
//!   device tensors of either float dtype (converted on the device).
//! - Tensors are values, as on the CPU: cloning one shares its device bytes, so
//!   the in-place ops (`linear_residual`'s residual, `qk_norm_rope`,
//!   `add_rows_broadcast`, `euler_step`) copy a shared buffer before writing
//!   (copy on write). A host tensor given to an in-place op becomes a device
//!   tensor.
//! - The caching policies' ops (kernels/cache.cu): `quantize_rows_i8` gives an
//!   int8 cache and f32 row scales in the arena, read back by `add_gated_i8`
//!   like any activation. `l1_distance` and `abs_sum` are the ops that return
//!   host values: two kernels (per-block partials, then one block summing them
//!   in f64; no atomics, so the sums are reproducible) and one download of
//!   `parts` pairs, which synchronizes the stream and is refused inside a CUDA
//!   graph capture like any download.
//!
//! # Weights
//! [`Backend::prepare_linear`] / [`Backend::prepare_tensor`] (called by
//! `Stdit3::prepare`, `T5Encoder::prepare` and `VideoVae::prepare` once after
//! loading; the VAE's convolutions likewise through
//! [`ConvOps::prepare_conv`](crate::backend::ConvOps::prepare_conv)) upload each
//! `Linear` weight once as bf16 (`LinearWeight::Half` holding a device tensor,
//! `[n, k]` as on the host) with its bias as f32, and norm weights / tables as
//! they are; int8 weights (`LinearWeight::Int8`) and int4 weights
//! (`LinearWeight::Int4`, reordered into qc_gemm_w4a8's layout on the way) are
//! uploaded into caches keyed by the `Arc`'s address that hold a clone of the
//! `Arc`, so the address cannot be reused by another weight while the entry lives. These uploads
//! are plain `cuMemAlloc`s outside the arena. A weight that was not prepared
//! still works: it is converted and uploaded at every use into the arena (a
//! one-line notice says so the first time), which is slow but correct.
//!
//! # Memory
//! Every op's output and temporaries come from one [`Arena`] allocated when
//! the backend is made ([`CudaBackend::with_arena_bytes`]; size it with
//! [`estimate_arena_bytes`](super::arena::estimate_arena_bytes) from the model
//! config and video shape), so nothing calls `cuMemAlloc` inside the
//! denoising loop. Running out gives an error that says how much was
//! needed and suggests a smaller video or `--device cpu`;
//! [`CudaBackend::arena_stats`] reports the peak.
//!
//! # Execution
//! One stream; every launch's return code is checked. Kernels run
//! asynchronously, so a fault inside one surfaces at the next synchronizing
//! call (a download); `QC_CUDA_SYNC=1` synchronizes after every launch to name
//! the failing kernel. The bf16 linear layers run qc_gemm_bf16_sm90 (wgmma)
//! on compute capability 9.0 and qc_gemm_bf16 elsewhere; `QC_GEMM=mma` or
//! [`CudaBackend::set_gemm_kernel`] picks qc_gemm_bf16 everywhere. Int8 and
//! int4 layers quantize their input per row (qc_quantize_rows_bf16, the
//! weight's smoothing vector and activation qmax) and run qc_gemm_w8a8 /
//! qc_gemm_w4a8.
//!
//! # Host fallbacks (documented, each logged once)
//! - Attention with a head dim the kernels do not cover: not a multiple of 8
//!   in 8..=512 (head dims above 128, e.g. the VAE mid-block's 512, run on the
//!   qc_attention_wide kernels), or above 128 with a score bias: download q, k,
//!   v (and the bias), CPU attention in f32, upload as bf16. Attention with an
//!   additive score bias (T5's relative positions) runs on the
//!   qc_attention_bias kernels for every head dim up to 128; only a biased one
//!   with scale 0 (which those kernels cannot express) falls back.
//!   Attention with `AttnSpec::qk_int8` runs qc_qk_mean_bf16, qc_quantize_qk_bf16
//!   and qc_attention_i8_dNN (Q and K int8 in arena temporaries); with a head dim
//!   those do not cover, the CPU's int8-QK attention.
//! - `pos_embed_2d` is computed on the host (once per size: cached on the device).
//! - Not fallbacks, but host work by design: T5's `[heads, L, L]` position bias
//!   is built on the host once per encode and uploaded once (`T5Encoder::encode`
//!   through `prepare_tensor`); token embeddings are gathered from the host
//!   table (`gather_rows`), only the prompt's rows uploaded.
//!
//! # CUDA graphs
//! The sampler runs each denoising step (the DiT forward on the CFG batch,
//! guidance, the Euler update) through a [`CudaStepGraphs`](super::CudaStepGraphs)
//! session (`Backend::step_graphs`; on unless `QC_CUDA_GRAPHS=0`,
//! [`CudaBackend::set_cuda_graphs`] or `qc-run --cuda-graphs off`; off under
//! `QC_CUDA_SYNC=1`). For each structure of step (the hooks' `graph_key`; a
//! step without one runs eagerly) the first step runs eagerly as the warm-up,
//! the second is captured on this backend's stream (`cuStreamBeginCapture_v2`,
//! thread-local mode; it is a non-blocking stream, so capture is allowed),
//! instantiated and launched, and later steps replay it (`cuGraphLaunch`):
//! `sampler::graphs` decides, [`GraphStats`](super::GraphStats) counts.
//! - Step inputs: while a step runs through the session, `timestep_embedding`
//!   and `euler_step` read values equal to the step's timesteps and step sizes
//!   from two fixed device buffers (outside the arena) that the session writes
//!   by `cuMemcpyHtoDAsync` before each step; other values they get (the fps)
//!   come from the small-array cache, which the warm-up filled. The latent is
//!   updated in place in its own arena block, the velocity written to the block
//!   the capture allocated for it (the session holds it).
//! - Nothing from the host inside a capture: host-to-device copies, device
//!   allocations, downloads (host fallbacks) and synchronizations are refused
//!   with an error, as are unprepared weights (uploaded at every use); the
//!   capture then fails, the step runs eagerly and so do the remaining steps
//!   (one line says why). The captured step has not run, so nothing is lost.
//! - Stable addresses: the arena hands out the same blocks for the same
//!   sequence of allocations, and a graph replays only while the arena has seen
//!   no allocation or free since its capture ([`Arena::changes`]): its
//!   temporaries are then still free and every block it reads still holds what
//!   it held. The latent and the velocity must also be unshared. Otherwise the
//!   step is captured again (or runs eagerly on the last step). Steps that only
//!   reuse the velocity run bound too, so they leave the arena as it was. A
//!   graph takes no arena memory: the arena's peak is that of the eager steps.
//! - Same kernels, same arguments: a replayed step gives the eager result bit
//!   for bit. The graph handles are destroyed with the session (RAII), at the
//!   end of the sampling run.

use super::abi::*;
use super::arena::{device_oom_message, Arena, ArenaStats};
use super::buffer::{DeviceBuffer, DeviceMem};
use super::graph::{graphs_from_env, GraphStats, StepBinding};
use super::{launch_cfg, open_device, probe, GemmKernel, GpuInfo, KernelArgs, KernelModule};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Linear, LinearWeight, ModRef, RowGroups};
use crate::quant::int4::{Int4Weight, W4_GROUP};
use crate::quant::int8::Int8Weight;
use crate::tensor::{byte_len, DType, Storage, Tensor};
use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{result, CudaContext, CudaStream};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Arena size used when `QC_CUDA_ARENA_MB` is unset and no estimate is given.
pub const DEFAULT_ARENA_BYTES: u64 = 1 << 30;

/// The arena size `QC_CUDA_ARENA_MB` asks for, if set.
pub fn arena_bytes_from_env() -> Result<Option<u64>> {
    match std::env::var("QC_CUDA_ARENA_MB") {
        Err(_) => Ok(None),
        Ok(v) => {
            let mb: u64 = v.trim().parse().map_err(|_| anyhow!("QC_CUDA_ARENA_MB={v:?} is not a whole number of MiB"))?;
            ensure!(mb > 0, "QC_CUDA_ARENA_MB must be at least 1");
            Ok(Some(mb << 20))
        }
    }
}

/// An int8 weight on the device: `q` `[n, kq]` (rows zero-padded to `kq`, a
/// multiple of 16 as the W8A8 GEMM needs), per-channel `scale` `[n]`, and the
/// optional inverse smoothing vector `[k]`.
pub(crate) struct DevInt8 {
    pub q: DeviceBuffer,
    pub scale: DeviceBuffer,
    pub inv_smooth: Option<DeviceBuffer>,
    pub kq: usize,
}

/// An int4 weight on the device: `w` in qc_gemm_w4a8's layout `[n, kq / 2]`
/// bytes (k zero-padded to `kq`, whole groups of 64), per-channel-and-group
/// `scale` `[n, kq / 64]`, and the optional inverse smoothing vector `[k]`.
pub(crate) struct DevInt4 {
    pub w: DeviceBuffer,
    pub scale: DeviceBuffer,
    pub inv_smooth: Option<DeviceBuffer>,
    pub kq: usize,
}

/// Small device arrays keyed by their contents (or by a description of them):
/// group indices, key ranges, masks, RoPE frequencies, position embeddings.
/// Bounded: cleared when it grows past its limits.
#[derive(Default)]
struct SmallCache {
    map: HashMap<Vec<u8>, DeviceBuffer>,
    bytes: usize,
}

const SMALL_CACHE_ENTRIES: usize = 256;
const SMALL_CACHE_BYTES: usize = 32 << 20;

/// The CUDA backend: see the module notes.
pub struct CudaBackend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) module: KernelModule,
    pub(crate) arena: Arc<Arena>,
    gpu: GpuInfo,
    pub(crate) cpu: CpuBackend,
    int8: Mutex<HashMap<usize, (Arc<Int8Weight>, Arc<DevInt8>)>>,
    int4: Mutex<HashMap<usize, (Arc<Int4Weight>, Arc<DevInt4>)>>,
    small: Mutex<SmallCache>,
    notes: Mutex<HashSet<&'static str>>,
    pub(crate) sync_each_launch: bool,
    poison: std::sync::atomic::AtomicBool,
    /// CUDA graphs for the denoising step on or off.
    pub(crate) graphs_on: std::sync::atomic::AtomicBool,
    pub(crate) graph_stats: Mutex<GraphStats>,
    /// The step inputs of a step running through a graph session.
    pub(crate) binding: Mutex<Option<StepBinding>>,
    /// A stream capture is under way: host transfers and synchronizations are refused.
    capturing: std::sync::atomic::AtomicBool,
    /// The bf16 GEMM of the linear layers: qc_gemm_bf16_sm90 when true.
    gemm_wgmma: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({}, arena {})", self.gpu, self.arena.stats())
    }
}

/// `(rows, cols)` of a tensor viewed as rows of its last dimension.
pub(crate) fn rows_of(x: &Tensor) -> (usize, usize) {
    let c = *x.shape().last().unwrap_or(&1);
    (if c == 0 { 0 } else { x.numel() / c }, c)
}

/// The bytes of a host tensor, without copying.
pub(crate) fn host_slice(t: &Tensor) -> Option<&[u8]> {
    Some(match t.storage() {
        Storage::F32(v) => bytemuck::cast_slice(&v[..]),
        Storage::F16(v) => bytemuck::cast_slice(v),
        Storage::BF16(v) => bytemuck::cast_slice(v),
        Storage::I8(v) => bytemuck::cast_slice(v),
        Storage::I4(v) | Storage::U8(v) => v,
        Storage::I32(v) => bytemuck::cast_slice(v),
        Storage::I64(v) => bytemuck::cast_slice(v),
        Storage::Cuda(_) => return None,
    })
}

/// `v` rounded to bf16 (nearest even, as the kernels' casts).
pub(crate) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.par_iter().with_min_len(1 << 14).map(|&x| bf16::from_f32(x)).collect()
}

/// The dtype a float op computes in: f32 when every input is f32 (on the host or
/// the device), bf16 otherwise.
pub(crate) fn float_dtype(inputs: &[&Tensor]) -> DType {
    if inputs.iter().all(|t| t.dtype() == DType::F32) {
        DType::F32
    } else {
        DType::BF16
    }
}

fn kernel_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("no CUDA kernel computes in {}", other.name()),
    }
}

impl CudaBackend {
    /// A backend on GPU 0 with an activation arena of `bytes` (see
    /// [`estimate_arena_bytes`](super::arena::estimate_arena_bytes)). Fails with a
    /// clear message when there is no usable GPU (never panics).
    pub fn with_arena_bytes(bytes: u64) -> Result<Self> {
        let gpu = probe().map_err(|e| anyhow!("no usable CUDA GPU: {e}"))?;
        let ctx = open_device(0).map_err(anyhow::Error::msg)?;
        let module = KernelModule::load(&ctx).map_err(anyhow::Error::msg)?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("cannot create a CUDA stream: {e}"))?;
        let arena = Arena::new(&ctx, bytes).map_err(anyhow::Error::msg)?;
        let sync_each_launch = std::env::var("QC_CUDA_SYNC").is_ok_and(|v| v == "1");
        let graphs_on = graphs_from_env()?;
        let gemm = GemmKernel::from_env(gpu.compute_capability).map_err(anyhow::Error::msg)?;
        Ok(CudaBackend {
            ctx,
            stream,
            module,
            arena,
            gpu,
            cpu: CpuBackend::new(),
            int8: Mutex::new(HashMap::new()),
            int4: Mutex::new(HashMap::new()),
            small: Mutex::new(SmallCache::default()),
            notes: Mutex::new(HashSet::new()),
            sync_each_launch,
            poison: std::sync::atomic::AtomicBool::new(std::env::var("QC_CUDA_POISON").is_ok_and(|v| v == "1")),
            graphs_on: std::sync::atomic::AtomicBool::new(graphs_on),
            graph_stats: Mutex::new(GraphStats::default()),
            binding: Mutex::new(None),
            capturing: std::sync::atomic::AtomicBool::new(false),
            gemm_wgmma: std::sync::atomic::AtomicBool::new(gemm == GemmKernel::Wgmma),
        })
    }

    /// A backend with `QC_CUDA_ARENA_MB` MiB of arena, else [`DEFAULT_ARENA_BYTES`].
    pub fn new() -> Result<Self> {
        Self::with_arena_bytes(arena_bytes_from_env()?.unwrap_or(DEFAULT_ARENA_BYTES))
    }

    /// The GPU this backend runs on.
    pub fn gpu(&self) -> &GpuInfo {
        &self.gpu
    }

    /// The bf16 GEMM the linear layers use: [`GemmKernel::from_env`] at
    /// construction (wgmma on H100/H200 unless `QC_GEMM=mma`), or what
    /// [`CudaBackend::set_gemm_kernel`] chose since.
    pub fn gemm_kernel(&self) -> GemmKernel {
        if self.gemm_wgmma.load(std::sync::atomic::Ordering::Relaxed) {
            GemmKernel::Wgmma
        } else {
            GemmKernel::Mma
        }
    }

    /// Switches the bf16 GEMM of the following linear layers (to compare
    /// both); an error when `kernel` cannot run on this GPU.
    pub fn set_gemm_kernel(&self, kernel: GemmKernel) -> Result<()> {
        let cc = self.gpu.compute_capability;
        ensure!(kernel.runs_on(cc), "{} needs compute capability 9.0; this GPU is {}.{}", kernel.kernel_name(), cc.0, cc.1);
        self.gemm_wgmma.store(kernel == GemmKernel::Wgmma, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The stream every op is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Capacity, current and peak use of the activation arena.
    pub fn arena_stats(&self) -> ArenaStats {
        self.arena.stats()
    }

    /// Starts a new peak measurement of the arena.
    pub fn reset_arena_peak(&self) {
        self.arena.reset_peak();
    }

    /// Waits for every queued op; reports a fault of any of them.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("a synchronization")?;
        self.stream.synchronize().map_err(|e| anyhow!("a CUDA kernel failed: {e}"))
    }

    /// A device copy of `t` with the same dtype and shape (in the arena).
    pub fn upload(&self, t: &Tensor) -> Result<Tensor> {
        let b = self.dev(t, t.dtype())?;
        let b = if matches!(t.storage(), Storage::Cuda(_)) { self.copy_buf(&b)? } else { b };
        Tensor::new(t.shape(), Storage::Cuda(b))
    }

    /// The keys noted so far (host fallbacks, unprepared weights), sorted (for the GPU tests).
    #[cfg(all(test, qc_cuda_kernels))]
    pub(crate) fn notes(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.notes.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Prints `msg` to stderr the first time `key` is noted.
    pub(crate) fn note_once(&self, key: &'static str, msg: impl FnOnce() -> String) {
        let mut n = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        if n.insert(key) {
            eprintln!("note: {}", msg());
        }
    }

    /// Marks a stream capture as under way (or over).
    pub(crate) fn set_capturing(&self, on: bool) {
        self.capturing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// An error while a step is being captured: `what` (a host transfer or a
    /// synchronization) cannot be part of a graph, so the capture fails and the
    /// step runs eagerly instead.
    pub(crate) fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("{what} inside the captured step");
        }
        Ok(())
    }

    // ------------------------------------------------------------ memory

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("cannot bind the CUDA context: {e}"))
    }

    /// A new arena block for `numel` elements of `dtype` (uninitialized, or all bytes
    /// 0xFF, a NaN in f32 and bf16, in poison mode).
    pub(crate) fn alloc(&self, dtype: DType, numel: usize) -> Result<DeviceBuffer> {
        let mem = self.arena.alloc(byte_len(dtype, numel) as u64).map_err(anyhow::Error::new)?;
        let b = DeviceBuffer::from_mem(mem, dtype, &self.stream);
        if self.poison.load(std::sync::atomic::Ordering::Relaxed) && b.len_bytes() > 0 {
            self.bind()?;
            // SAFETY: b's own bytes; ordered on the stream.
            unsafe { result::memset_d8_async(b.address(), 0xFF, b.len_bytes(), self.stream.cu_stream()) }.map_err(|e| anyhow!("cuMemsetD8Async: {e}"))?;
        }
        Ok(b)
    }

    /// Poison mode (for tests; also `QC_CUDA_POISON=1`): every new output block is
    /// filled with NaN first, so an element an op fails to write shows up.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A new arena block of `numel` zeros.
    pub(crate) fn zeros(&self, dtype: DType, numel: usize) -> Result<DeviceBuffer> {
        let b = self.alloc(dtype, numel)?;
        self.memset0(&b)?;
        Ok(b)
    }

    pub(crate) fn memset0(&self, b: &DeviceBuffer) -> Result<()> {
        if b.len_bytes() == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the range is b's own bytes; ordered on the stream.
        unsafe { result::memset_d8_async(b.address(), 0, b.len_bytes(), self.stream.cu_stream()) }.map_err(|e| anyhow!("cuMemsetD8Async: {e}"))
    }

    /// Copies `bytes` bytes from device address `src` to `dst` on the stream.
    pub(crate) fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: callers pass ranges inside live buffers; ordered on the stream.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(|e| anyhow!("cuMemcpyDtoDAsync of {bytes} bytes: {e}"))
    }

    /// Copies host data to device address `dst` on the stream. From pageable memory
    /// the driver stages the data before returning, so `data` may be dropped after.
    pub(crate) fn copy_h2d<T: bytemuck::Pod>(&self, dst: u64, data: &[T]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture("a host-to-device copy")?;
        self.bind()?;
        // SAFETY: dst has room for data (callers allocate it so); ordered on the stream.
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }.map_err(|e| anyhow!("copy of {} bytes to the GPU: {e}", std::mem::size_of_val(data)))
    }

    /// An arena copy of host data as `dtype` (whose element size must match `T`'s).
    pub(crate) fn upload_slice<T: bytemuck::Pod>(&self, dtype: DType, data: &[T]) -> Result<DeviceBuffer> {
        let bytes = std::mem::size_of_val(data);
        let b = self.arena.alloc(bytes as u64).map_err(anyhow::Error::new)?;
        let b = DeviceBuffer::from_mem(b, dtype, &self.stream);
        self.copy_h2d(b.address(), data)?;
        Ok(b)
    }

    /// A `cuMemAlloc`ed copy of host data outside the arena (weights).
    pub(crate) fn upload_raw<T: bytemuck::Pod>(&self, dtype: DType, data: &[T], what: &str) -> Result<DeviceBuffer> {
        let bytes = std::mem::size_of_val(data);
        self.refuse_in_capture("a device allocation")?;
        self.bind()?;
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: a plain allocation in the bound context, owned by the DeviceMem below.
            unsafe { result::malloc_sync(bytes) }.map_err(|e| anyhow!(device_oom_message(what, bytes as u64, &self.ctx, &e.to_string())))?
        };
        let b = DeviceBuffer::from_mem(DeviceMem::Raw { ctx: self.ctx.clone(), ptr, bytes: bytes as u64 }, dtype, &self.stream);
        self.copy_h2d(ptr, data)?;
        Ok(b)
    }

    /// A fresh arena copy of a device buffer.
    pub(crate) fn copy_buf(&self, b: &DeviceBuffer) -> Result<DeviceBuffer> {
        self.sync_foreign(b)?;
        let mem = self.arena.alloc(b.len_bytes() as u64).map_err(anyhow::Error::new)?;
        let out = DeviceBuffer::from_mem(mem, b.dtype, &self.stream);
        self.copy_d2d(out.address(), b.address(), b.len_bytes())?;
        Ok(out)
    }

    /// Waits for the stream of a buffer made outside this backend (e.g. by
    /// `Tensor::to_cuda` on another stream) before this backend's stream reads it.
    pub(crate) fn sync_foreign(&self, b: &DeviceBuffer) -> Result<()> {
        if b.cu_stream() != self.stream.cu_stream() {
            self.refuse_in_capture("waiting for another stream")?;
            b.stream.synchronize().map_err(|e| anyhow!("waiting for another CUDA stream: {e}"))?;
        }
        Ok(())
    }

    /// Host data of `t` converted to `want` (f32 or bf16 targets convert; other targets must match).
    fn upload_host(&self, t: &Tensor, want: DType) -> Result<DeviceBuffer> {
        if t.dtype() == want {
            let bytes = host_slice(t).ok_or_else(|| anyhow!("tensor is not on the host"))?;
            return self.upload_slice(want, bytes);
        }
        match want {
            DType::F32 => {
                let v = t.to_f32()?;
                self.upload_slice(DType::F32, v.f32()?)
            }
            DType::BF16 => match t.storage() {
                Storage::F32(v) => self.upload_slice(DType::BF16, &to_bf16(v)),
                _ => {
                    let v = t.to_f32()?;
                    self.upload_slice(DType::BF16, &to_bf16(v.f32()?))
                }
            },
            other => bail!("cannot convert a {} tensor to {} for the GPU", t.dtype().name(), other.name()),
        }
    }

    /// `t` on the device as `want`: the tensor's own buffer when it already is
    /// (shared, not copied), else an upload or a cast into a fresh arena block.
    pub(crate) fn dev(&self, t: &Tensor, want: DType) -> Result<DeviceBuffer> {
        let b = match t.storage() {
            Storage::Cuda(b) => b,
            _ => return self.upload_host(t, want),
        };
        self.sync_foreign(b)?;
        if b.dtype == want {
            return Ok(b.clone());
        }
        let n = t.numel();
        match (b.dtype, want) {
            (DType::F32, DType::BF16) | (DType::BF16, DType::F32) => {
                let out = self.alloc(want, n)?;
                let name = if want == DType::BF16 { "qc_cast_f32_bf16" } else { "qc_cast_bf16_f32" };
                if n > 0 {
                    self.run(name, launch_cfg::flat(n as i64, byte_len(b.dtype, 1)), QcUnaryArgs { x: b.address(), y: out.address(), n: n as i64 })?;
                }
                Ok(out)
            }
            _ => {
                self.refuse_in_capture("a device-to-host copy (dtype conversion)")?;
                let host = t.to_cpu()?;
                self.upload_host(&host, want)
            }
        }
    }

    /// As [`Self::dev`], 16-byte aligned (views at odd offsets are copied).
    pub(crate) fn dev_aligned(&self, t: &Tensor, want: DType) -> Result<DeviceBuffer> {
        let b = self.dev(t, want)?;
        if b.address() % 16 == 0 {
            Ok(b)
        } else {
            self.copy_buf(&b)
        }
    }

    /// The buffer of `t` as `want`, owned by `t` alone and 16-byte aligned, for
    /// an op that writes into it in place: a shared buffer is copied first, a
    /// host tensor uploaded, another dtype converted; `t` then holds the result.
    pub(crate) fn own(&self, t: &mut Tensor, want: DType) -> Result<DeviceBuffer> {
        if let Storage::Cuda(b) = t.storage() {
            if b.dtype == want && b.is_unique() && b.address() % 16 == 0 && b.cu_stream() == self.stream.cu_stream() {
                return Ok(b.clone());
            }
        }
        let fresh = match t.storage() {
            Storage::Cuda(b) if b.dtype == want => self.copy_buf(b)?,
            _ => {
                let b = self.dev(t, want)?;
                // dev() shares t's buffer only when it already has dtype `want` (handled above).
                b
            }
        };
        t.set_storage(Storage::Cuda(fresh.clone()))?;
        Ok(fresh)
    }

    /// A device tensor over `buf`.
    pub(crate) fn tensor(&self, shape: &[usize], buf: DeviceBuffer) -> Result<Tensor> {
        Tensor::new(shape, Storage::Cuda(buf))
    }

    /// A small device array cached by `key` (a tag plus its contents or a description),
    /// made by `make` on a miss.
    pub(crate) fn cached(&self, key: Vec<u8>, make: impl FnOnce() -> Result<DeviceBuffer>) -> Result<DeviceBuffer> {
        {
            let c = self.small.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = c.map.get(&key) {
                return Ok(b.clone());
            }
        }
        let b = make()?;
        let mut c = self.small.lock().unwrap_or_else(|p| p.into_inner());
        if c.map.len() >= SMALL_CACHE_ENTRIES || c.bytes + b.len_bytes() > SMALL_CACHE_BYTES {
            c.map.clear();
            c.bytes = 0;
        }
        c.bytes += b.len_bytes();
        c.map.insert(key, b.clone());
        Ok(b)
    }

    /// An int32 array on the device, cached by contents.
    pub(crate) fn i32_array(&self, tag: u8, v: &[i32]) -> Result<DeviceBuffer> {
        let mut key = vec![b'i', tag];
        key.extend_from_slice(bytemuck::cast_slice(v));
        self.cached(key, || self.upload_slice(DType::I32, v))
    }

    /// An f32 array on the device, cached by contents.
    pub(crate) fn f32_array(&self, tag: u8, v: &[f32]) -> Result<DeviceBuffer> {
        let mut key = vec![b'f', tag];
        key.extend_from_slice(bytemuck::cast_slice(v));
        self.cached(key, || self.upload_slice(DType::F32, v))
    }

    /// `RowGroups`' table entries on the device, or `None` when entry `g` is group
    /// `g` (the kernels' default `e = row / group_size`).
    pub(crate) fn group_index(&self, groups: &RowGroups) -> Result<Option<DeviceBuffer>> {
        if groups.index.iter().enumerate().all(|(g, &e)| g == e) {
            return Ok(None);
        }
        let v: Vec<i32> = groups.index.iter().map(|&e| i32::try_from(e)).collect::<Result<_, _>>().map_err(|_| anyhow!("row group entry too large"))?;
        Ok(Some(self.i32_array(b'g', &v)?))
    }

    // ------------------------------------------------------------ launches

    /// Launches `name` on the stream (one-struct kernels, 1-D grid).
    pub(crate) fn run<A: KernelArgs>(&self, name: &str, (grid, block): (u32, u32), args: A) -> Result<()> {
        // SAFETY: every caller builds `args` from live buffers sized for the accesses the
        // kernel makes (kernels/qc_types.h), with the kernel's dtypes.
        unsafe { self.module.launch(name, grid, block, &self.stream, &args) }.map_err(anyhow::Error::msg)?;
        self.after_launch(name)
    }

    /// Launches `name` with a 3-D grid and dynamic shared memory (the GEMMs).
    pub(crate) fn run_ext<A: KernelArgs>(&self, name: &str, (grid, block, shared): ((u32, u32, u32), u32, u32), args: A) -> Result<()> {
        // SAFETY: as in run().
        unsafe { self.module.launch_ext(name, grid, block, shared, &self.stream, &args) }.map_err(anyhow::Error::msg)?;
        self.after_launch(name)
    }

    /// The bf16 GEMM `args` with [`CudaBackend::gemm_kernel`] (qc_gemm_bf16
    /// where the wgmma kernel does not take the problem).
    pub(crate) fn run_gemm_bf16(&self, args: QcGemmArgs) -> Result<()> {
        // SAFETY: as in run().
        let ran = unsafe { self.module.launch_gemm_bf16(self.gemm_kernel(), &self.stream, &args) }.map_err(anyhow::Error::msg)?;
        self.after_launch(ran.kernel_name())
    }

    /// qc_gemm_w4a8 with `args` (its requirements checked first).
    pub(crate) fn run_gemm_w4a8(&self, args: QcGemmW4Args) -> Result<()> {
        // SAFETY: as in run().
        unsafe { self.module.launch_gemm_w4a8(&self.stream, &args) }.map_err(anyhow::Error::msg)?;
        self.after_launch("qc_gemm_w4a8")
    }

    pub(crate) fn after_launch(&self, name: &str) -> Result<()> {
        if self.sync_each_launch {
            self.stream.synchronize().map_err(|e| anyhow!("{name} failed on the GPU: {e}"))?;
        }
        Ok(())
    }

    /// `y[r * ldy + y_col + j] = x[s(r) * ldx + x_col + j]` for `r < rows`, `j < cols`,
    /// counted in elements of `dtype` (any dtype of 2, 4 or 8 bytes: a bit-exact copy),
    /// `s(r)` = `index[r]`, the row map of `swap = (b, c)` (qc_copy_rows), or `r`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_rows(&self, dtype: DType, x: u64, y: u64, rows: usize, cols: usize, ld: (usize, usize), col: (usize, usize), index: u64, swap: Option<(usize, usize)>) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (name, unit) = match byte_len(dtype, 1) {
            _ if dtype == DType::I4 => bail!("layout ops on packed i4 tensors are not supported"),
            2 => ("qc_copy_rows_bf16", 1),
            4 => ("qc_copy_rows_f32", 1),
            8 => ("qc_copy_rows_f32", 2),
            _ => bail!("layout ops on {} tensors are not supported on the GPU", dtype.name()),
        };
        let (swap_b, swap_c) = swap.unwrap_or((0, 0));
        let cols_u = cols * unit;
        ensure!(cols_u <= i32::MAX as usize, "row of {cols} elements too long for qc_copy_rows");
        let args = QcCopyRowsArgs {
            x,
            y,
            index,
            rows: rows as i64,
            ldx: (ld.0 * unit) as i64,
            ldy: (ld.1 * unit) as i64,
            x_col: (col.0 * unit) as i64,
            y_col: (col.1 * unit) as i64,
            swap_b: swap_b as i64,
            swap_c: swap_c as i64,
            cols: cols_u as i32,
            _pad: 0,
        };
        let elem = if unit == 2 || byte_len(dtype, 1) == 4 { 4 } else { 2 };
        self.run(name, launch_cfg::rows(rows as i64, cols_u as i64, elem), args)
    }

    // ------------------------------------------------------------ weights

    /// A `Linear` weight on the device as bf16 `[n, k]` (16-byte aligned): the
    /// prepared device tensor, or a per-call conversion (see the module notes).
    pub(crate) fn weight_bf16(&self, w: &Linear) -> Result<DeviceBuffer> {
        let t = match &w.weight {
            LinearWeight::F32(t) | LinearWeight::Half(t) => t,
            LinearWeight::Int8(_) | LinearWeight::Int4(_) => bail!("quantized weight where a bf16 one was expected"),
        };
        ensure!(t.numel() == w.out_features * w.in_features, "linear weight {:?} is not [{}, {}]", t.shape(), w.out_features, w.in_features);
        if t.device() == crate::tensor::Device::Cpu {
            self.note_once("unprepared-linear", || {
                "a linear layer's weight is on the host: it is uploaded at every use (call the model's prepare() with the CUDA backend once after loading)".to_string()
            });
        }
        self.dev_aligned(t, DType::BF16)
    }

    /// An int8 weight on the device, uploaded on first use and cached (see the module notes).
    pub(crate) fn weight_int8(&self, q: &Arc<Int8Weight>) -> Result<Arc<DevInt8>> {
        let key = Arc::as_ptr(q) as usize;
        if let Some((_, d)) = self.int8.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(d.clone());
        }
        let (n, k) = (q.n, q.k);
        let kq = k.next_multiple_of(16);
        let rows = q.row_major();
        let padded: Vec<i8> = if kq == k {
            rows
        } else {
            let mut p = vec![0i8; n * kq];
            p.par_chunks_mut(kq).zip(rows.par_chunks(k)).for_each(|(d, s)| d[..k].copy_from_slice(s));
            p
        };
        let d = Arc::new(DevInt8 {
            q: self.upload_raw(DType::I8, &padded, "an int8 weight")?,
            scale: self.upload_raw(DType::F32, &q.scale, "int8 weight scales")?,
            inv_smooth: q.inv_smooth.as_ref().map(|s| self.upload_raw(DType::F32, s, "a smoothing vector")).transpose()?,
            kq,
        });
        self.int8.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (q.clone(), d.clone()));
        Ok(d)
    }

    /// An int4 weight on the device in qc_gemm_w4a8's layout, uploaded on first use
    /// and cached like the int8 ones (see the module notes).
    pub(crate) fn weight_int4(&self, q: &Arc<Int4Weight>) -> Result<Arc<DevInt4>> {
        let key = Arc::as_ptr(q) as usize;
        if let Some((_, d)) = self.int4.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(d.clone());
        }
        let (w, kq) = super::w4_device_layout(&q.packed(), q.n, q.k).map_err(anyhow::Error::msg)?;
        ensure!(q.scale.len() == q.n * (kq / W4_GROUP), "int4 weight: {} scales for [{}, {}] in groups of {W4_GROUP}", q.scale.len(), q.n, q.k);
        let d = Arc::new(DevInt4 {
            w: self.upload_raw(DType::U8, &w, "an int4 weight")?,
            scale: self.upload_raw(DType::F32, &q.scale, "int4 weight scales")?,
            inv_smooth: q.inv_smooth.as_ref().map(|s| self.upload_raw(DType::F32, s, "a smoothing vector")).transpose()?,
            kq,
        });
        self.int4.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (q.clone(), d.clone()));
        Ok(d)
    }

    /// Uploads a linear layer once (the `Backend::prepare_linear` of this backend).
    pub(crate) fn prepare_linear_impl(&self, l: &mut Linear) -> Result<()> {
        let (n, k) = (l.out_features, l.in_features);
        match &l.weight {
            LinearWeight::Int8(q) => {
                self.weight_int8(q)?;
            }
            LinearWeight::Int4(q) => {
                self.weight_int4(q)?;
            }
            LinearWeight::F32(t) | LinearWeight::Half(t) => {
                let on_device_bf16 = matches!(t.storage(), Storage::Cuda(b) if b.dtype == DType::BF16);
                if !on_device_bf16 {
                    let buf = match t.storage() {
                        Storage::F32(v) => self.upload_raw(DType::BF16, &to_bf16(v), "a linear weight")?,
                        Storage::BF16(v) => self.upload_raw(DType::BF16, v, "a linear weight")?,
                        Storage::F16(v) => {
                            let w: Vec<bf16> = v.par_iter().map(|x: &f16| bf16::from_f32(x.to_f32())).collect();
                            self.upload_raw(DType::BF16, &w, "a linear weight")?
                        }
                        _ => {
                            let w = t.to_f32()?;
                            self.upload_raw(DType::BF16, &to_bf16(w.f32()?), "a linear weight")?
                        }
                    };
                    l.weight = LinearWeight::Half(Tensor::new(&[n, k], Storage::Cuda(buf))?);
                }
            }
        }
        if let Some(b) = &mut l.bias {
            if b.device() == crate::tensor::Device::Cpu || b.dtype() != DType::F32 {
                let v = b.to_f32()?;
                *b = Tensor::new(b.shape(), Storage::Cuda(self.upload_raw(DType::F32, v.f32()?, "a bias")?))?;
            }
        }
        Ok(())
    }

    /// Uploads a weight tensor once, as it is (the `Backend::prepare_tensor` of this backend).
    pub(crate) fn prepare_tensor_impl(&self, t: &mut Tensor) -> Result<()> {
        if t.device() == crate::tensor::Device::Cuda {
            return Ok(());
        }
        let bytes = host_slice(t).ok_or_else(|| anyhow!("tensor is not on the host"))?;
        let buf = self.upload_raw(t.dtype(), bytes, "a weight")?;
        t.set_storage(Storage::Cuda(buf))
    }

    /// `t` on the host as f32 (a download for device tensors; borrowed when it already is).
    pub(crate) fn host_f32<'a>(&self, t: &'a Tensor) -> Result<std::borrow::Cow<'a, Tensor>> {
        match t.storage() {
            Storage::F32(_) => Ok(std::borrow::Cow::Borrowed(t)),
            Storage::Cuda(b) => {
                self.refuse_in_capture("a device-to-host copy (host fallback)")?;
                self.sync_foreign(b)?;
                Ok(std::borrow::Cow::Owned(t.to_cpu()?.to_f32()?))
            }
            _ => Ok(std::borrow::Cow::Owned(t.to_f32()?)),
        }
    }

    /// Kernel-name suffix for a float dtype.
    pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
        kernel_suffix(dtype)
    }

    /// The device table of a modulation reference, checked as the CPU backend does:
    /// `(f32 table [entries, chunks, c], chunks)`.
    pub(crate) fn mod_table(&self, m: &ModRef, rows: usize, c: usize, what: &str) -> Result<(DeviceBuffer, usize)> {
        let s = m.table.shape();
        ensure!(s.len() == 3 && s[2] == c && m.chunk < s[1], "{what}: modulation table {s:?} does not fit chunk {} of width {c}", m.chunk);
        ensure!(m.groups.rows() == rows, "{what}: row groups cover {} rows, tensor has {rows}", m.groups.rows());
        ensure!(m.groups.group_size > 0 || rows == 0, "{what}: row groups of size 0");
        ensure!(m.groups.index.iter().all(|&e| e < s[0]), "{what}: row group entry out of range of table {s:?}");
        Ok((self.dev(m.table, DType::F32)?, s[1]))
    }

    /// A gate operand `gate[e(r), c]` on the device (`QC_EPI_GATED_RESIDUAL`, `qc_gated_residual`):
    /// the table and group index uploaded, and their addresses (0 without a gate).
    pub(crate) fn gate_operand(&self, gate: Option<&ModRef>, rows: usize, n: usize, what: &str) -> Result<GateOperand> {
        let Some(g) = gate else { return Ok(GateOperand { addr: 0, stride: 0, group_index: 0, group_size: 1, _buffers: None }) };
        let (table, chunks) = self.mod_table(g, rows, n, what)?;
        let gi = self.group_index(g.groups)?;
        Ok(GateOperand {
            addr: table.address() + (g.chunk * n * 4) as u64,
            stride: chunks * n,
            group_index: gi.as_ref().map_or(0, |b| b.address()),
            group_size: g.groups.group_size,
            _buffers: Some((table, gi)),
        })
    }
}

/// A gate on the device (see [`CudaBackend::gate_operand`]); holds its buffers until launched.
pub(crate) struct GateOperand {
    pub addr: u64,
    pub stride: usize,
    pub group_index: u64,
    pub group_size: usize,
    _buffers: Option<(DeviceBuffer, Option<DeviceBuffer>)>,
}
