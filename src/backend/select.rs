//! Choosing the backend: the CPU, the CUDA GPU, or the GPU when one is usable
//! (`qc-run --device`, the C API's `qc_options_set_device`).

use super::cpu::CpuBackend;
use super::cuda::{self as qcuda, CudaBackend};
use super::Backend;
use anyhow::{anyhow, Result};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The CPU backend (the reference).
    Cpu,
    /// The CUDA backend on GPU 0 (bf16 activations); an error when no GPU is usable.
    Cuda,
    /// The GPU when one is usable, else the CPU with a one-line notice.
    Auto,
}

impl DeviceChoice {
    /// `cpu`, `cuda` or `auto`.
    pub fn parse(name: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(name, false).map_err(|_| anyhow!("unknown device {name:?}; known: cpu, cuda, auto"))
    }
}

/// The backend a [`DeviceChoice`] gave.
pub enum DeviceBackend {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl DeviceBackend {
    /// The backend for `choice`; `arena_bytes` sizes the CUDA arena (unless
    /// QC_CUDA_ARENA_MB is set). `notice` receives one line for a person: the GPU
    /// and its arena, or why `auto` runs on the CPU. A `cuda` choice without a
    /// usable GPU is an error, never a panic.
    pub fn new(choice: DeviceChoice, notice: impl FnOnce(String), arena_bytes: impl FnOnce() -> u64) -> Result<Self> {
        match choice {
            DeviceChoice::Cpu => Ok(DeviceBackend::Cpu(CpuBackend::new())),
            DeviceChoice::Cuda => {
                qcuda::probe().map_err(|why| anyhow!("device cuda: no usable CUDA GPU ({why}); use the cpu or auto device"))?;
                Self::cuda(notice, arena_bytes())
            }
            DeviceChoice::Auto => match qcuda::probe() {
                Ok(_) => Self::cuda(notice, arena_bytes()),
                Err(why) => {
                    notice(format!("note: no usable CUDA GPU ({why}): running on the CPU"));
                    Ok(DeviceBackend::Cpu(CpuBackend::new()))
                }
            },
        }
    }

    /// The CUDA backend with an arena of `arena_bytes` (or QC_CUDA_ARENA_MB).
    fn cuda(notice: impl FnOnce(String), arena_bytes: u64) -> Result<Self> {
        let bytes = qcuda::arena_bytes_from_env()?.unwrap_or(arena_bytes);
        let be = CudaBackend::with_arena_bytes(bytes)?;
        notice(format!("device: {} (arena {:.0} MiB)", be.gpu(), bytes as f64 / (1u64 << 20) as f64));
        Ok(DeviceBackend::Cuda(Box::new(be)))
    }

    pub fn get(&self) -> &dyn Backend {
        match self {
            DeviceBackend::Cpu(b) => b,
            DeviceBackend::Cuda(b) => b.as_ref(),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, DeviceBackend::Cuda(_))
    }
}
