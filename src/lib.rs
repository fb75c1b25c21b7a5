//! quantcache: a training-free accelerated inference engine for video
//! diffusion transformers (Open-Sora 1.2), with a CPU reference backend and
//! hand-written CUDA kernels.

pub mod backend;
pub mod cache;
pub mod capi;
pub mod checkpoint;
pub mod io;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod quant;
pub mod quality;
pub mod rng;
pub mod sampler;
pub mod tensor;
pub mod text;

/// The demonstration model shipped in the repository (`models/demo`): qc-run's
/// model when none is given, libqc's for a NULL model directory.
pub const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo");

/// Every CPU op allocates its output and frees its inputs' temporaries, dozens
/// of times per forward. glibc's malloc (even tuned to keep freed memory) cost
/// 5% of a quantized step in its own code; with mimalloc the demo's
/// `--accel quantcache:fast` loop ran 10% faster and the f32 one 3-4%
/// (interleaved, medians of 10 and 6 runs, 2026-11-29). In the library, so
/// that qc-run, qc-bench, libqc, the tests and the benches all run on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sizes the CPU worker pool (`--threads`); `None` keeps one thread per core.
pub fn set_threads(n: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = n {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| anyhow::anyhow!("configuring --threads: {e}"))?;
    }
    Ok(())
}

/// The binaries' `main`: sizes the worker pool, runs `f` on a pool worker (so each
/// op's parallel loop splits work by stealing instead of waking the pool from
/// outside, a futex round trip per op), prints an error and exits 1 on failure.
pub fn run_main(threads: Option<usize>, f: impl FnOnce() -> anyhow::Result<()> + Send) {
    if let Err(e) = set_threads(threads).and_then(|_| rayon::scope(|_| f())) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Version and build features: whether CUDA kernels are compiled in, and the
/// CPU features the backend uses.
pub fn build_info() -> String {
    let kernels = if backend::cuda::KERNELS_COMPILED { "compiled in (sm_80, sm_90a, compute_90 PTX)" } else { "not compiled (nvcc was absent at build time)" };
    let mut feats = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for (name, on) in [
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ("avx512bf16", std::arch::is_x86_feature_detected!("avx512bf16")),
        ("avx512vnni", std::arch::is_x86_feature_detected!("avx512vnni")),
        // Where the integer GEMMs and the bf16 attention use them (the CPU has
        // them, Linux granted the tile state, QC_AMX is not 0).
        ("amx-int8", quant::amx::available()),
        ("amx-bf16", quant::amx::bf16_available()),
    ] {
        if on {
            feats.push(name);
        }
    }
    format!(
        "quantcache {}\ncuda kernels: {kernels}\ncpu: {} threads, features: {}",
        env!("CARGO_PKG_VERSION"),
        rayon::current_num_threads(),
        if feats.is_empty() { "baseline".to_string() } else { feats.join(" ") }
    )
}
