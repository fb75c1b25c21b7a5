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
    keep_freed_memory();
    if let Err(e) = set_threads(threads).and_then(|_| rayon::scope(|_| f())) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Every CPU op allocates its output. By default glibc maps blocks over 128 KiB
/// fresh and returns freed heap tops to the OS, so each op page-faults its
/// output in again (~10% of a small model's time); keep freed memory instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
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
