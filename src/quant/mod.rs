//! Quantization: integer weight and activation formats, and the CPU integer kernels.
//! (The policies that choose a precision per layer build on these.)

#[cfg(target_arch = "x86_64")]
pub mod amx;
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

/// 64 bytes on a cache line's boundary: packed weights and quantized rows are
/// held in these where AMX reads them, since a tile row that straddles two
/// lines costs two loads (measured: tile loads 7x slower from `malloc`'s
/// 16-byte-aligned buffers).
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// Zeroed lines holding at least `bytes` bytes.
pub fn lines(bytes: usize) -> Vec<Line> {
    vec![Line([0; 64]); bytes.div_ceil(64)]
}
