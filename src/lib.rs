//! quantcache: a training-free accelerated inference engine for video
//! diffusion transformers (Open-Sora 1.2), with a CPU reference backend and
//! hand-written CUDA kernels.

pub mod backend;
pub mod checkpoint;
pub mod io;
pub mod model;
pub mod rng;
pub mod sampler;
pub mod tensor;
