//! Quantization: integer weight and activation formats, and the CPU integer kernels.
//! (The policies that choose a precision per layer build on these.)

pub mod calibrate;
pub mod fused;
pub mod gptq;
pub mod int4;
pub mod int8;
pub mod plan;
pub mod preset;
pub mod qdir;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni;
