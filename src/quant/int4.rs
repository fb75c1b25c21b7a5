//! Packed int4 weights (W4) with per-output-channel, per-group scales, and the
//! CPU W4A8 / W4A6 GEMM. The format and formulas are those of
//! `kernels/qc_types.h` ("W4 weights"):
//!
//! - `q[n, k]` in [-7, 7], stored two per byte as `q + 8`: byte `j` of row `n`
//!   holds `k = 2j` in its low nibble and `k = 2j + 1` in its high nibble (an
//!   odd `k` leaves the last high nibble 8, i.e. zero).
//! - One f32 scale per output channel and group of [`W4_GROUP`] consecutive
//!   inputs: `W'[n, k] ~ q[n, k] * scale[n, k / W4_GROUP]`, with `W' = W * s`
//!   when an importance / smoothing vector `s` is folded in (as for int8).
//! - Activations are quantized per token exactly as for W8A8
//!   ([`quantize_rows`](super::int8::quantize_rows), A8 or A6).
//! - Product: exact int32 per group, `acc[m, n, g] = sum_{k in g} a[m, k] q[n, k]`,
//!   then `y[m, n] = (fma over g = 0, 1, ... of acc * scale[n, g]) * a_scale[m] (+ bias[n])`.

use super::fused::{Finish, RowSource};
use super::int8::{QuantRows, QMAX_A6, QMAX_A8};
use crate::backend::cuda::abi;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Inputs per weight scale (`QC_W4_GROUP`: one int8 k-tile of the GPU GEMM; it
/// divides every Open-Sora input width, 1152 and 4608, and the demo model's 64 and 256).
pub const W4_GROUP: usize = abi::QC_W4_GROUP as usize;
/// Weight range (`QC_W4_QMAX`): symmetric, -8 unused.
pub const QMAX_W4: i32 = abi::QC_W4_QMAX as i32;
/// Output channels per VNNI block (one 512-bit register of int32).
const NB: usize = 16;

/// An int4 linear weight `[n, k]`; see the module documentation for the format.
#[derive(Clone, Debug)]
pub struct Int4Weight {
    /// `[n, groups]` f32.
    pub scale: Vec<f32>,
    pub n: usize,
    pub k: usize,
    pub groups: usize,
    /// Inverse of the folded smoothing vector, applied to activations (`[k]`).
    pub inv_smooth: Option<Vec<f32>>,
    /// Activation range: [`QMAX_A8`] or [`QMAX_A6`].
    pub act_qmax: i32,
    /// The VNNI kernel's layout: per block of 16 channels and 8 inputs, 64 bytes;
    /// byte `4c + j` holds input `8i + j` (low nibble) and `8i + 4 + j` (high
    /// nibble) of channel `c`, so the low nibbles are one `vpdpbusd` operand
    /// for inputs `8i .. 8i+3` and the high ones for `8i+4 .. 8i+7`. Padding is 8 (zero).
    /// The only copy of the values held: the documented row-major packing is
    /// rebuilt on demand ([`Int4Weight::packed`]).
    vnni: Vec<u8>,
    /// `scale` transposed to `[groups, n padded to 16]`, for 16-channel vector loads.
    scale_gn: Vec<f32>,
}

impl Int4Weight {
    /// Quantizes an f32 weight `[n, k]` per output channel and group, folding `smooth` (`[k]`) in first.
    pub fn quantize(
        w: &[f32],
        n: usize,
        k: usize,
        smooth: Option<&[f32]>,
        act_qmax: i32,
    ) -> Result<Self> {
        Self::quantize_weighted(w, n, k, smooth, act_qmax, None)
    }

    /// [`Int4Weight::quantize`], each group's clip chosen by the squared error
    /// weighted per input channel by `act_sq` (`[k]`, the mean square of the
    /// layer's input channels before smoothing): the error a weight adds to the
    /// output scales with its input's magnitude.
    pub fn quantize_weighted(
        w: &[f32],
        n: usize,
        k: usize,
        smooth: Option<&[f32]>,
        act_qmax: i32,
        act_sq: Option<&[f32]>,
    ) -> Result<Self> {
        if let Some(h) = act_sq {
            ensure!(
                h.len() == k && h.iter().all(|v| v.is_finite() && *v >= 0.0),
                "int4 weight: {} channel weights for {k} inputs, or some not finite and non-negative",
                h.len()
            );
        }
        // The smoothed weight W * s meets the input X / s: its channel weights are E[x^2] / s^2.
        let h: Option<Vec<f32>> = act_sq.map(|h| match smooth {
            Some(s) => h.iter().zip(s).map(|(h, s)| h / (s * s)).collect(),
            None => h.to_vec(),
        });
        ensure!(
            n > 0 && k > 0 && w.len() == n * k,
            "int4 weight: {} values for [{n}, {k}]",
            w.len()
        );
        if let Some(s) = smooth {
            ensure!(
                s.len() == k,
                "int4 weight: smoothing vector has {} entries for {k} inputs",
                s.len()
            );
            ensure!(
                s.iter().all(|v| v.is_finite() && *v > 0.0),
                "int4 weight: smoothing factors must be positive and finite"
            );
        }
        let groups = k.div_ceil(W4_GROUP);
        let mut q = vec![0i8; n * k];
        let mut scale = vec![0f32; n * groups];
        q.par_chunks_mut(k)
            .zip(w.par_chunks(k))
            .zip(scale.par_chunks_mut(groups))
            .for_each(|((qr, wr), sr)| {
                let mut xs = [0f32; W4_GROUP];
                for (g, s) in sr.iter_mut().enumerate() {
                    let r = g * W4_GROUP..((g + 1) * W4_GROUP).min(k);
                    let x = &mut xs[..r.len()];
                    match smooth {
                        Some(sm) => x.iter_mut().zip(&wr[r.clone()]).zip(&sm[r.clone()]).for_each(|((d, w), s)| *d = w * s),
                        None => x.copy_from_slice(&wr[r.clone()]),
                    }
                    *s = quantize_group_weighted(x, &mut qr[r.clone()], h.as_deref().map(|h| &h[r]));
                }
            });
        let inv_smooth = smooth.map(|s| s.iter().map(|v| 1.0 / v).collect());
        Self::from_parts(pack(&q, n, k), scale, n, k, inv_smooth, act_qmax)
    }

    /// An already quantized weight (e.g. read from a quantized checkpoint).
    pub fn from_parts(
        packed: Vec<u8>,
        scale: Vec<f32>,
        n: usize,
        k: usize,
        inv_smooth: Option<Vec<f32>>,
        act_qmax: i32,
    ) -> Result<Self> {
        let (kb, groups) = (k.div_ceil(2), k.div_ceil(W4_GROUP));
        ensure!(
            packed.len() == n * kb && scale.len() == n * groups,
            "int4 weight: parts do not describe [{n}, {k}] (groups of {W4_GROUP})"
        );
        ensure!(
            packed.iter().all(|&b| b & 0x0F != 0 && b >> 4 != 0),
            "int4 weight: nibble 0 (q = -8) is outside the symmetric range"
        );
        ensure!(
            k.is_multiple_of(2) || packed.chunks(kb).all(|r| r[kb - 1] >> 4 == 8),
            "int4 weight: the padding nibble of an odd row must be 8 (zero)"
        );
        ensure!(
            scale.iter().all(|s| s.is_finite() && *s >= 0.0),
            "int4 weight: scales must be finite and non-negative"
        );
        ensure!(
            act_qmax == QMAX_A8 || act_qmax == QMAX_A6,
            "int4 weight: activation qmax must be {QMAX_A8} or {QMAX_A6}"
        );
        if let Some(s) = &inv_smooth {
            ensure!(
                s.len() == k,
                "int4 weight: smoothing vector has {} entries for {k} inputs",
                s.len()
            );
        }
        let mut w = Int4Weight {
            scale,
            n,
            k,
            groups,
            inv_smooth,
            act_qmax,
            vnni: Vec::new(),
            scale_gn: Vec::new(),
        };
        let (blocks, k8) = (n.div_ceil(NB), groups * W4_GROUP / 8);
        let mut vnni = vec![0x88u8; blocks * k8 * 64];
        for ch in 0..n {
            let (b, c) = (ch / NB, ch % NB);
            for kk in 0..k {
                let b_in = packed[ch * kb + kk / 2];
                let nib = if kk % 2 == 0 { b_in & 0x0F } else { b_in >> 4 };
                let (i, r) = (kk / 8, kk % 8);
                let byte = &mut vnni[(b * k8 + i) * 64 + 4 * c + r % 4];
                *byte = if r < 4 {
                    (*byte & 0xF0) | nib
                } else {
                    (*byte & 0x0F) | nib << 4
                };
            }
        }
        let npad = blocks * NB;
        let mut scale_gn = vec![0f32; groups * npad];
        for ch in 0..n {
            for g in 0..groups {
                scale_gn[g * npad + ch] = w.scale[ch * groups + g];
            }
        }
        w.vnni = vnni;
        w.scale_gn = scale_gn;
        Ok(w)
    }

    fn nibble(&self, ch: usize, kk: usize) -> u8 {
        let k8 = self.groups * W4_GROUP / 8;
        let (r, c) = (kk % 8, ch % NB);
        let b = self.vnni[((ch / NB) * k8 + kk / 8) * 64 + 4 * c + r % 4];
        if r < 4 {
            b & 0x0F
        } else {
            b >> 4
        }
    }

    /// The documented packing: `[n, k.div_ceil(2)]` bytes, nibbles `q + 8` (an odd
    /// row's last high nibble 8), as quantized checkpoints store it and the CUDA
    /// backend uploads it.
    pub fn packed(&self) -> Vec<u8> {
        let kb = self.k.div_ceil(2);
        let mut out = vec![0x88u8; self.n * kb];
        out.par_chunks_mut(kb).enumerate().for_each(|(ch, row)| {
            for kk in 0..self.k {
                let nib = self.nibble(ch, kk);
                let b = &mut row[kk / 2];
                *b = if kk % 2 == 0 { (*b & 0xF0) | nib } else { (*b & 0x0F) | nib << 4 };
            }
        });
        out
    }

    /// The signed values `q[n, k]`, row-major (the exact reference's operand).
    pub fn unpack(&self) -> Vec<i8> {
        (0..self.n * self.k)
            .map(|i| self.nibble(i / self.k, i % self.k) as i8 - 8)
            .collect()
    }

    /// The dequantized weight `q * scale` (`[n, k]`, smoothing still folded in).
    pub fn dequantize(&self) -> Vec<f32> {
        self.unpack()
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                q as f32 * self.scale[(i / self.k) * self.groups + (i % self.k) / W4_GROUP]
            })
            .collect()
    }
}

/// Clipping ratios tried for each group's scale (1 = the plain `amax / 7`).
pub const W4_CLIPS: [f32; 7] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7];

/// Quantizes one group of (smoothed) weights to [-7, 7] and returns its scale
/// `clip * amax / 7`, the clip of [`W4_CLIPS`] with the least squared error:
/// with 7 levels a side, clipping the rare largest values buys finer steps for
/// all the others (ties keep the larger clip).
pub fn quantize_group(x: &[f32], q: &mut [i8]) -> f32 {
    quantize_group_weighted(x, q, None)
}

crate::backend::cpu::simd::multiversion! {
/// [`quantize_group`] with the squared error of value `i` weighted by `h[i]`.
/// Compiled for AVX2/AVX-512 too: on baseline x86-64 each `round_ties_even` is a
/// libm call, which made quantizing at load a tenth of a W4 run on the demo.
pub fn quantize_group_weighted(x: &[f32], q: &mut [i8], h: Option<&[f32]>) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let qm = QMAX_W4 as f32;
    let quant = |v: f32, inv: f32| (v * inv).round_ties_even().clamp(-qm, qm);
    let mut best = (f64::INFINITY, 0f32);
    for c in W4_CLIPS {
        let scale = c * amax / qm;
        let inv = qm / (c * amax);
        let err: f64 = match h {
            None => x.iter().map(|&v| ((quant(v, inv) * scale - v) as f64).powi(2)).sum(),
            Some(h) => x.iter().zip(h).map(|(&v, &hh)| hh as f64 * ((quant(v, inv) * scale - v) as f64).powi(2)).sum(),
        };
        if err < best.0 {
            best = (err, c);
        }
    }
    let (scale, inv) = (best.1 * amax / qm, qm / (best.1 * amax));
    for (qk, &v) in q.iter_mut().zip(x) {
        *qk = quant(v, inv) as i8;
    }
    scale
}
}

/// Packs signed values `[n, k]` in [-7, 7] two per byte (the documented layout).
pub fn pack(q: &[i8], n: usize, k: usize) -> Vec<u8> {
    let kb = k.div_ceil(2);
    let mut out = vec![0x88u8; n * kb];
    for (orow, qrow) in out.chunks_mut(kb).zip(q.chunks(k)) {
        for (kk, &v) in qrow.iter().enumerate() {
            let nib = (v + 8) as u8;
            let b = &mut orow[kk / 2];
            *b = if kk % 2 == 0 {
                (*b & 0xF0) | nib
            } else {
                (*b & 0x0F) | nib << 4
            };
        }
    }
    out
}

fn check(a: &QuantRows, w: &Int4Weight) -> Result<()> {
    ensure!(
        a.cols == w.k,
        "int4 gemm: activations have {} columns, weight expects {}",
        a.cols,
        w.k
    );
    ensure!(
        a.q.len() == a.rows * a.cols && a.scale.len() == a.rows,
        "int4 gemm: activations do not describe [{}, {}]",
        a.rows,
        a.cols
    );
    Ok(())
}

/// Exact per-group int32 products `acc[m, n, g]` (`[rows, n, groups]`).
pub fn gemm_groups_i32(a: &QuantRows, w: &Int4Weight) -> Result<Vec<i32>> {
    check(a, w)?;
    let mut acc = vec![0i32; a.rows * w.n * w.groups];
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() {
        kernel::gemm(a, w, super::vnni::Out::I32(acc.as_mut_ptr()), false);
        return Ok(acc);
    }
    gemm_portable(a, w, &mut acc);
    Ok(acc)
}

/// `y = dequantize(gemm_groups_i32(a, w)) (+ bias)`, `[rows, n]`, fused on VNNI.
pub fn linear_f32(
    a: &QuantRows,
    w: &Int4Weight,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check(a, w)?;
    ensure!(
        y.len() == a.rows * w.n,
        "int4 linear: output has {} values for [{}, {}]",
        y.len(),
        a.rows,
        w.n
    );
    if let Some(b) = bias {
        ensure!(
            b.len() == w.n,
            "int4 linear: bias has {} values for {} outputs",
            b.len(),
            w.n
        );
    }
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        kernel::gemm(
            a,
            w,
            super::vnni::Out::F32 {
                y: y.as_mut_ptr(),
                a_scale: a.scale.as_ptr(),
                bias,
            },
            kernel::use_amx(),
        );
        return Ok(());
    }
    let mut acc = vec![0i32; a.rows * w.n * w.groups];
    gemm_portable(a, w, &mut acc);
    dequantize(&acc, a, w, bias, y);
    Ok(())
}

/// The activation quantization and [`linear_f32`] in one parallel loop
/// (`quant::fused`), or `None` where it does not apply (no VNNI, or weights
/// too large for one task to hold every column); the same numbers as
/// `int8::quantize_rows` then [`linear_f32`].
pub fn linear_rows_f32(x: RowSource, rows: usize, w: &Int4Weight, bias: Option<&[f32]>, finish: Option<&Finish>) -> Option<Result<Vec<f32>>> {
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() && kernel::fits_one_task(w) {
        return Some(super::fused::check(x, rows, w.k, w.n, w.inv_smooth.as_deref(), w.act_qmax, bias).map(|_| kernel::linear_rows(x, rows, w, bias, finish, kernel::use_amx())));
    }
    let _ = (x, rows, w, bias, finish);
    None
}

/// `f` on the fused path's stage for `w` over `rows` rows (for
/// [`fused::chain`](super::fused::chain)), or `None` where
/// [`linear_rows_f32`] would not apply.
pub fn with_stage<R>(w: &Int4Weight, bias: Option<&[f32]>, rows: usize, f: impl FnOnce(&super::fused::Stage) -> R) -> Option<Result<R>> {
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() && kernel::fits_one_task(w) {
        return Some((|| {
            // No rows yet: the arguments only.
            super::fused::check(RowSource::Rows(&[]), 0, w.k, w.n, w.inv_smooth.as_deref(), w.act_qmax, bias)?;
            let amx = kernel::use_amx();
            let task = kernel::task_kernel(w, bias, amx);
            Ok(f(&super::fused::Stage { layout: kernel::layout(w, rows, amx), kernel: &task }))
        })());
    }
    let _ = (w, bias, rows, f);
    None
}

/// The reference: plain integer loops over the unpacked weight.
pub fn gemm_portable(a: &QuantRows, w: &Int4Weight, acc: &mut [i32]) {
    let (k, n, g) = (w.k, w.n, w.groups);
    let q = w.unpack();
    acc.par_chunks_mut(n * g)
        .zip(a.q.par_chunks(k))
        .for_each(|(out, ar)| {
            for (o, wr) in out.chunks_mut(g).zip(q.chunks(k)) {
                for (gi, og) in o.iter_mut().enumerate() {
                    let r = gi * W4_GROUP..((gi + 1) * W4_GROUP).min(k);
                    *og = ar[r.clone()]
                        .iter()
                        .zip(&wr[r])
                        .map(|(&x, &y)| x as i32 * y as i32)
                        .sum();
                }
            }
        });
}

/// `y[m, n] = (fma over g of acc[m, n, g] * scale[n, g]) * a_scale[m] (+ bias[n])`,
/// the documented order.
pub fn dequantize(
    acc: &[i32],
    a: &QuantRows,
    w: &Int4Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, g) = (w.n, w.groups);
    out.par_chunks_mut(n)
        .zip(acc.par_chunks(n * g))
        .zip(a.scale.par_iter())
        .for_each(|((o, accr), &sa)| {
            for (j, (o, accg)) in o.iter_mut().zip(accr.chunks(g)).enumerate() {
                let s = accg
                    .iter()
                    .zip(&w.scale[j * g..(j + 1) * g])
                    .fold(0f32, |s, (&v, &ws)| (v as f32).mul_add(ws, s));
                let y = s * sa;
                *o = bias.map_or(y, |b| y + b[j]);
            }
        });
}

/// The AVX-512 VNNI GEMM: micro-tiles of [`MR`](kernel::MR) rows x
/// [`NC`](kernel::NC) blocks of 16 channels. Per 8 inputs one 64-byte load per
/// block gives two `vpdpbusd` operands (low nibbles: inputs 0-3, high: 4-7);
/// each group's exact int32 sums get the shift correction and are folded into
/// f32 sums (one fma per group, kept on the stack) as the group ends. That fma
/// shares the two pipes of `vpdpbusd` (the unpacking and conversions do not):
/// 1 in 16 of their slots, the price of the per-group scales.
#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::super::fused::{self, Finish, RowSource};
    use super::super::vnni::{self, Out, NB};
    use super::super::{amx, lines, Line};
    use super::{Int4Weight, QuantRows, W4_GROUP};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    pub const MR: usize = 7;
    pub const NC: usize = 3;
    /// Rows of one task, at most.
    const TASK_ROWS: usize = 98;
    /// Weight bytes of one task: its blocks stay in the core's L2 while the
    /// next tasks (the same blocks, the following rows) reuse them.
    const TASK_WEIGHT_BYTES: usize = 192 << 10;

    /// The same on AMX (as the int8 GEMM's): each task widens its blocks to
    /// int8 once, in twice these bytes.
    const AMX_TASK_WEIGHT_BYTES: usize = 512 << 10;

    /// Rows of one task for `m` rows: [`TASK_ROWS`], fewer when that would
    /// leave each thread under about four tasks (as the int8 GEMM's); whole AMX
    /// macro tiles (32 rows) where AMX runs.
    fn task_rows(m: usize, amx: bool) -> usize {
        let unit = if amx { 2 * amx::TILE_ROWS } else { MR };
        m.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(unit).clamp(unit, TASK_ROWS / unit * unit)
    }

    /// Whether AMX runs the dequantized products (every k is whole groups of 64).
    pub fn use_amx() -> bool {
        amx::available()
    }

    /// What every micro-tile reads.
    struct Operands {
        /// Signed activations, rows of `lda = groups * W4_GROUP` bytes (zero padding).
        a: *const i8,
        lda: usize,
        /// `-8 * sum_{k in g} a[m, k]` per row and group (`[rows, groups]`): the
        /// nibbles are `q + 8`, so this corrects each group's sum.
        start: *const i32,
        w: *const u8,
        groups: usize,
        /// `scale` transposed to `[groups, n padded to 16]`.
        scale_gn: *const f32,
        n: usize,
        /// Whole 16-row tiles of dequantized products on AMX.
        amx: bool,
    }
    // SAFETY: `Operands` only travels inside `gemm`'s scope, read-only.
    unsafe impl Sync for Operands {}

    /// The whole product; the dequantized one on AMX where `amx` (see [`use_amx`]).
    pub fn gemm(a: &QuantRows, w: &Int4Weight, out: Out, amx: bool) {
        let amx = amx && matches!(out, Out::F32 { .. });
        let m = a.rows;
        let lda = w.groups * W4_GROUP;
        let rows = vnni::rows_operand(a, lda, amx);
        let start = vnni::group_sums(a, W4_GROUP, -8);
        let blocks = w.n.div_ceil(NB);
        let weight_bytes = if amx { AMX_TASK_WEIGHT_BYTES } else { TASK_WEIGHT_BYTES };
        let task_blocks = (weight_bytes / (lda / 2 * NB * NC)).max(1) * NC;
        let task_rows = task_rows(m, amx);
        let (row_tasks, col_tasks) = (m.div_ceil(task_rows), blocks.div_ceil(task_blocks));
        let op = Operands { a: rows.as_ptr(), lda, start: start.as_ptr(), w: w.vnni.as_ptr(), groups: w.groups, scale_gn: w.scale_gn.as_ptr(), n: w.n, amx };
        let op = &op;
        // Consecutive tasks share their weight blocks and step through the rows.
        (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
            let (ct, rt) = (t / row_tasks, t % row_tasks);
            let (r0, r1) = (rt * task_rows, ((rt + 1) * task_rows).min(m));
            let (b0, b1) = (ct * task_blocks, ((ct + 1) * task_blocks).min(blocks));
            // SAFETY: VNNI presence checked by the caller; the operands outlive the
            // loop; the task writes only rows r0..r1 x the channels of blocks
            // b0..b1, disjoint from every other task.
            unsafe { tile(op, r0, r1, b0, b1, out) };
        });
    }

    /// Whether one task's weight budget holds every column of `w` (the fused path's condition).
    pub fn fits_one_task(w: &Int4Weight) -> bool {
        let lda = w.groups * W4_GROUP;
        w.n.div_ceil(NB) <= (TASK_WEIGHT_BYTES / (lda / 2 * NB * NC)).max(1) * NC
    }

    /// See [`super::linear_rows_f32`]: [`gemm`] on each task's own quantized rows.
    pub fn linear_rows(x: RowSource, rows: usize, w: &Int4Weight, bias: Option<&[f32]>, finish: Option<&Finish>, amx: bool) -> Vec<f32> {
        fused::rows(x, rows, &layout(w, rows, amx), finish, &task_kernel(w, bias, amx))
    }

    /// The fused product's shape for `rows` rows of `w`.
    pub fn layout(w: &Int4Weight, rows: usize, amx: bool) -> fused::Layout<'_> {
        fused::Layout { k: w.k, lda: w.groups * W4_GROUP, n: w.n, task_rows: task_rows(rows, amx), inv_smooth: w.inv_smooth.as_deref(), qmax: w.act_qmax, row_sums: false }
    }

    /// What each fused task runs on its quantized rows.
    pub fn task_kernel<'a>(w: &'a Int4Weight, bias: Option<&'a [f32]>, amx: bool) -> impl Fn(fused::Task) + Sync + 'a {
        let blocks = w.n.div_ceil(NB);
        move |t: fused::Task| {
            vnni::group_sums_into(t.a, t.lda, W4_GROUP, -8, t.sums);
            let op = Operands { a: t.a.as_ptr(), lda: t.lda, start: t.sums.as_ptr(), w: w.vnni.as_ptr(), groups: w.groups, scale_gn: w.scale_gn.as_ptr(), n: w.n, amx };
            let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
            // SAFETY: VNNI checked by the caller; the operands live through the call;
            // `t.y` is the task's own `t.m` rows, all of which the tile writes.
            unsafe { tile(&op, 0, t.m, 0, blocks, Out::F32 { y: t.y, a_scale: t.scale.as_ptr(), bias }) };
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile(op: &Operands, r0: usize, r1: usize, b0: usize, b1: usize, out: Out) {
        // AMX takes whole 16-row tiles of the dequantized product; VNNI the rest.
        let r_amx = match out {
            Out::F32 { y, a_scale, bias } if op.amx => {
                let r_amx = r0 + (r1 - r0) / amx::TILE_ROWS * amx::TILE_ROWS;
                if r_amx > r0 {
                    amx_tile(op, r0, r_amx, b0, b1, y, a_scale, bias);
                }
                r_amx
            }
            _ => r0,
        };
        let mut b = b0;
        while b < b1 {
            let nc = NC.min(b1 - b);
            let mut r = r_amx;
            while r < r1 {
                let mr = if r1 - r >= MR { MR } else { 1 };
                match (mr, nc) {
                    (MR, NC) => micro::<MR, NC>(op, r, b, out),
                    (MR, c) => (0..c).for_each(|i| micro::<MR, 1>(op, r, b + i, out)),
                    (_, NC) => micro::<1, NC>(op, r, b, out),
                    (_, c) => (0..c).for_each(|i| micro::<1, 1>(op, r, b + i, out)),
                }
                r += mr;
            }
            b += nc;
        }
    }

    thread_local! {
        /// Each worker's blocks widened to int8 for AMX, kept across calls.
        static WIDENED: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    }

    /// f32 sums of a macro tile (32 rows x 32 channels).
    #[repr(C, align(64))]
    struct Sums([[f32; 32]; 32]);

    /// Rows `r0 .. r1` (whole tiles) x blocks `b0 .. b1` dequantized on AMX: the
    /// blocks widened to int8 once (the nibbles `q + 8`, 16 k-groups of a block
    /// and group per 1 KiB B tile), then per macro tile of 32 rows x 2 blocks
    /// and per group, the group's exact int32 products from the tiles and the
    /// VNNI kernel's documented f32 steps on them.
    #[allow(clippy::too_many_arguments)]
    unsafe fn amx_tile(op: &Operands, r0: usize, r1: usize, b0: usize, b1: usize, y: *mut f32, a_scale: *const f32, bias: *const f32) {
        WIDENED.with(|cell| {
            // A task never runs inside another on the same thread; a fresh buffer otherwise.
            let mut fresh = Vec::new();
            let mut held = cell.try_borrow_mut();
            let buf = match held.as_deref_mut() {
                Ok(b) => b,
                Err(_) => &mut fresh,
            };
            // SAFETY: as for `amx_tile`, whose caller checked AVX-512 VNNI and AMX.
            unsafe { amx_products(op, r0, r1, b0, b1, y, a_scale, bias, buf) }
        })
    }

    /// [`amx_tile`] with its widening buffer.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn amx_products(op: &Operands, r0: usize, r1: usize, b0: usize, b1: usize, y: *mut f32, a_scale: *const f32, bias: *const f32, buf: &mut Vec<Line>) {
        const TILE_BYTES: usize = amx::TILE_ROWS * amx::TILE_K;
        let (groups, n) = (op.groups, op.n);
        let npad = n.div_ceil(NB) * NB;
        let wb = op.lda / 8 * 64;
        let bytes = (b1 - b0) * groups * TILE_BYTES;
        if buf.len() * 64 < bytes {
            *buf = lines(bytes);
        }
        let wide = buf.as_mut_ptr() as *mut u8;
        // Each 64 bytes of the VNNI layout hold two k-groups of 16 channels:
        // the low nibbles, then the high ones, are consecutive B-tile rows,
        // widened to the signed values (`nibble - 8`) so that the products
        // need no shift correction.
        let (low, eight) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(8));
        for u in 0..(b1 - b0) * groups * W4_GROUP / 8 {
            let v = _mm512_loadu_si512(op.w.add(b0 * wb + u * 64) as *const _);
            _mm512_store_si512(wide.add(u * 128) as *mut _, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
            _mm512_store_si512(wide.add(u * 128 + 64) as *mut _, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<4>(v), low), eight));
        }
        let tiles = amx::Tiles::new();
        let mut res = amx::Results([[0; 32]; 32]);
        let mut sum = Sums([[0.0; 32]; 32]);
        for (r, rt, b, ct) in amx::macro_tiles(r0, r1, b0, b1) {
            let rows = rt * amx::TILE_ROWS;
            for row in sum.0.iter_mut().take(rows) {
                row.fill(0.0);
            }
            for g in 0..groups {
                let (a, w) = (op.a.add(r * op.lda + g * W4_GROUP), wide.add(((b - b0) * groups + g) * TILE_BYTES) as *const u8);
                tiles.run_sized::<true>(rt, ct, a, op.lda, w, groups * TILE_BYTES, 0, 1, &mut res);
                let scale = op.scale_gn.add(g * npad + b * NB);
                let sc = [_mm512_loadu_ps(scale), _mm512_loadu_ps(scale.add(NB * (ct - 1)))];
                for (acc, s) in res.0.iter().zip(sum.0.iter_mut()).take(rows) {
                    for (c, &scale) in sc.iter().enumerate().take(ct) {
                        let v = _mm512_load_si512(acc[c * NB..].as_ptr() as *const _);
                        let prev = _mm512_load_ps(s[c * NB..].as_ptr());
                        _mm512_store_ps(s[c * NB..].as_mut_ptr(), _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), scale, prev));
                    }
                }
            }
            for (ri, s) in sum.0.iter().take(rows).enumerate() {
                let sa = _mm512_set1_ps(*a_scale.add(r + ri));
                for c in 0..ct {
                    vnni::store_f32(y, bias, n, r + ri, (b + c) * NB, _mm512_mul_ps(_mm512_load_ps(s[c * NB..].as_ptr()), sa));
                }
            }
        }
    }

    /// Rows `r .. r + R` x blocks `b .. b + C`. Dequantization in the documented
    /// order: `(fma over g = 0, 1, ... of acc * scale[n, g]) * a_scale[m] (+ bias[n])`.
    /// Each group's end touches the accumulators only at constant indices (the
    /// loops unroll), so they stay in registers and the f32 sums go to the stack;
    /// one loop over all groups lets the out-of-order core overlap a group's
    /// epilogue with the next group's products.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn micro<const R: usize, const C: usize>(op: &Operands, r: usize, b: usize, out: Out) {
        let (n, groups) = (op.n, op.groups);
        let npad = n.div_ceil(NB) * NB;
        let low = _mm512_set1_epi8(0x0F);
        // Bytes per block: 64 per 8 inputs.
        let wb = op.lda / 8 * 64;
        let mut wp = op.w.add(b * wb);
        let mut ap = op.a.add(r * op.lda);
        let mut sum = [[_mm512_setzero_ps(); C]; R];
        // Per-group int32 results on their way to `Out::I32`.
        let mut exact = [[_mm512_setzero_si512(); C]; R];
        for g in 0..groups {
            let mut acc = [[_mm512_setzero_si512(); C]; R];
            for _ in 0..W4_GROUP / 8 {
                for half in 0..2 {
                    let mut wv = [_mm512_setzero_si512(); C];
                    for (c, v) in wv.iter_mut().enumerate() {
                        let bytes = _mm512_loadu_si512(wp.add(c * wb) as *const _);
                        *v = if half == 0 { _mm512_and_si512(bytes, low) } else { _mm512_and_si512(_mm512_srli_epi16::<4>(bytes), low) };
                    }
                    for (ri, row) in acc.iter_mut().enumerate() {
                        let x = _mm512_set1_epi32((ap.add(ri * op.lda + half * 4) as *const i32).read_unaligned());
                        for (a, &wc) in row.iter_mut().zip(&wv) {
                            *a = _mm512_dpbusd_epi32(*a, wc, x);
                        }
                    }
                }
                wp = wp.add(64);
                ap = ap.add(8);
            }
            let scale = op.scale_gn.add(g * npad + b * NB);
            for (ri, ((row, srow), erow)) in acc.iter().zip(sum.iter_mut()).zip(exact.iter_mut()).enumerate() {
                let start = _mm512_set1_epi32(*op.start.add((r + ri) * groups + g));
                for (c, ((a, s), e)) in row.iter().zip(srow.iter_mut()).zip(erow.iter_mut()).enumerate() {
                    let v = _mm512_add_epi32(*a, start);
                    match out {
                        Out::I32(_) => *e = v,
                        Out::F32 { .. } => *s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(scale.add(c * NB)), *s),
                    }
                }
            }
            if let Out::I32(o) = out {
                for (ri, erow) in exact.iter().enumerate() {
                    for (c, e) in erow.iter().enumerate() {
                        let ch0 = (b + c) * NB;
                        let mut lanes = [0i32; NB];
                        _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, *e);
                        for (l, &x) in lanes.iter().enumerate().take(n - ch0) {
                            *o.add(((r + ri) * n + ch0 + l) * groups + g) = x;
                        }
                    }
                }
            }
        }
        if let Out::F32 { y, a_scale, bias } = out {
            for (ri, row) in sum.iter().enumerate() {
                let sa = _mm512_set1_ps(*a_scale.add(r + ri));
                for (c, s) in row.iter().enumerate() {
                    vnni::store_f32(y, bias, n, r + ri, (b + c) * NB, _mm512_mul_ps(*s, sa));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int8::quantize_rows;

    /// The fused int4 linear gives the bits of quantizing everything, then
    /// [`linear_f32`], from rows and from a producer; large weights decline.
    #[test]
    fn fused_linear_equals_quantize_then_linear() {
        if !crate::quant::vnni::available() {
            return;
        }
        let mut rng = crate::rng::Rng::new(22);
        for (rows, k, n) in [(1, 64, 16), (5, 17, 50), (37, 100, 192), (513, 64, 192), (300, 256, 64)] {
            let wf = rng.normal_vec(n * k);
            let smooth: Vec<f32> = (0..k).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect();
            let bias = rng.normal_vec(n);
            let x = rng.normal_vec(rows * k);
            for (qmax, sm, b) in [(QMAX_A8, None, None), (QMAX_A6, Some(&smooth[..]), Some(&bias[..]))] {
                let w = Int4Weight::quantize(&wf, n, k, sm, qmax).unwrap();
                let a = quantize_rows(&x, k, w.inv_smooth.as_deref(), qmax).unwrap();
                let mut want = vec![0f32; rows * n];
                linear_f32(&a, &w, b, &mut want).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let got = linear_rows_f32(RowSource::Rows(&x), rows, &w, b, None).expect("small weights take the fused path").unwrap();
                assert_eq!(bits(&got), bits(&want), "rows {rows}, k {k}, n {n}, from rows");
                let produce = |r: usize, out: &mut [f32]| out.copy_from_slice(&x[r * k..(r + 1) * k]);
                let got = linear_rows_f32(RowSource::Produced(&produce), rows, &w, b, None).unwrap().unwrap();
                assert_eq!(bits(&got), bits(&want), "rows {rows}, k {k}, n {n}, produced");
                for amx in kernels() {
                    let got = kernel::linear_rows(RowSource::Rows(&x), rows, &w, b, None, amx);
                    assert_eq!(bits(&got), bits(&want), "rows {rows}, k {k}, n {n}, amx {amx}");
                    assert_eq!(bits(&linear_with(&a, &w, b, amx)), bits(&want), "rows {rows}, k {k}, n {n}, whole product, amx {amx}");
                }
            }
        }
        let big = Int4Weight::quantize(&vec![0.5; 1152 * 4608], 4608, 1152, None, QMAX_A8).unwrap();
        assert!(linear_rows_f32(RowSource::Rows(&[0.0; 1152]), 1, &big, None, None).is_none());
    }
    use crate::rng::Rng;

    /// The x86 kernels this CPU runs: VNNI (`false`) and, where the CPU has
    /// it, AMX (`true`), so both are checked whatever the dispatch picks.
    fn kernels() -> Vec<bool> {
        match crate::quant::vnni::available() {
            true => [false].into_iter().chain(crate::quant::amx::available().then_some(true)).collect(),
            false => Vec::new(),
        }
    }

    /// The dequantized product on the kernel `amx` picks.
    fn linear_with(a: &QuantRows, w: &Int4Weight, bias: Option<&[f32]>, amx: bool) -> Vec<f32> {
        let mut y = vec![f32::NAN; a.rows * w.n];
        let out = crate::quant::vnni::Out::F32 { y: y.as_mut_ptr(), a_scale: a.scale.as_ptr(), bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()) };
        kernel::gemm(a, w, out, amx);
        y
    }

    fn scalar_reference(a: &QuantRows, w: &Int4Weight) -> Vec<i32> {
        let q = w.unpack();
        let mut acc = vec![0i32; a.rows * w.n * w.groups];
        for m in 0..a.rows {
            for n in 0..w.n {
                for kk in 0..w.k {
                    acc[(m * w.n + n) * w.groups + kk / W4_GROUP] +=
                        a.q[m * w.k + kk] as i32 * q[n * w.k + kk] as i32;
                }
            }
        }
        acc
    }

    fn random_case(
        rng: &mut Rng,
        m: usize,
        n: usize,
        k: usize,
        qmax: i32,
        smooth: bool,
    ) -> (QuantRows, Int4Weight, Vec<f32>, Vec<f32>) {
        let x = rng.normal_vec(m * k);
        let wf: Vec<f32> = rng.normal_vec(n * k).iter().map(|v| v * 0.05).collect();
        let s: Option<Vec<f32>> =
            smooth.then(|| (0..k).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect());
        let w = Int4Weight::quantize(&wf, n, k, s.as_deref(), qmax).unwrap();
        let a = quantize_rows(&x, k, w.inv_smooth.as_deref(), qmax).unwrap();
        (a, w, x, wf)
    }

    #[test]
    fn the_vnni_layout_is_the_only_copy_and_round_trips() {
        for (n, k) in [(1, 1), (5, 7), (16, 64), (17, 130)] {
            let q: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 3) % 15) as i8 - 7).collect();
            let packed = pack(&q, n, k);
            let w = Int4Weight::from_parts(packed.clone(), vec![0.25; n * k.div_ceil(W4_GROUP)], n, k, None, QMAX_A8).unwrap();
            assert_eq!(w.packed(), packed, "[{n}, {k}]");
            assert_eq!(w.unpack(), q, "[{n}, {k}]");
        }
    }

    #[test]
    fn packing_follows_the_documented_layout() {
        let q: Vec<i8> = vec![-7, 7, 0, 3, -1];
        let p = pack(&q, 1, 5);
        assert_eq!(p, vec![0x01 | 0xF0, 0x08 | 0xB0, 0x07 | 0x80]);
        let w = Int4Weight::from_parts(p, vec![0.5], 1, 5, None, QMAX_A8).unwrap();
        assert_eq!(w.unpack(), q);
        assert_eq!(w.dequantize(), vec![-3.5, 3.5, 0.0, 1.5, -0.5]);
    }

    #[test]
    fn weight_quantization_is_per_channel_and_group() {
        let mut rng = Rng::new(3);
        let (n, k) = (5, 150);
        let wf = rng.normal_vec(n * k);
        let w = Int4Weight::quantize(&wf, n, k, None, QMAX_A8).unwrap();
        assert_eq!(w.groups, 3);
        let q = w.unpack();
        for ch in 0..n {
            for g in 0..3 {
                let r = g * 64..((g + 1) * 64).min(k);
                let amax = wf[ch * k..][r.clone()]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                // The scale is clip * amax / 7 for the clip with the least squared error,
                // which is never worse than the plain amax / 7; unclipped values are
                // within half a step, clipped ones at +-7.
                let sc = w.scale[ch * 3 + g];
                let clip = W4_CLIPS.iter().find(|&&c| c * amax / 7.0 == sc).unwrap_or_else(|| panic!("scale {sc} of amax {amax}"));
                let sq = |scale: f32, qv: &dyn Fn(usize) -> f32| r.clone().map(|kk| ((qv(kk) * scale - wf[ch * k + kk]) as f64).powi(2)).sum::<f64>();
                let plain = |kk: usize| (wf[ch * k + kk] * 7.0 / amax).round_ties_even().clamp(-7.0, 7.0);
                assert!(sq(sc, &|kk| q[ch * k + kk] as f32) <= sq(amax / 7.0, &plain), "ch {ch} group {g}: clip {clip}");
                for kk in r.clone() {
                    let v = wf[ch * k + kk];
                    if v.abs() <= 7.0 * sc {
                        assert!((q[ch * k + kk] as f32 * sc - v).abs() <= sc * 0.5 + 1e-6, "ch {ch} k {kk}");
                    } else {
                        assert_eq!(q[ch * k + kk], 7 * v.signum() as i8);
                    }
                }
            }
        }
        // Some group of normals gains from clipping.
        assert!(w.scale.iter().enumerate().any(|(i, &sc)| {
            let (ch, g) = (i / 3, i % 3);
            let amax = wf[ch * k..][g * 64..((g + 1) * 64).min(k)].iter().fold(0f32, |m, v| m.max(v.abs()));
            sc < amax / 7.0
        }));
    }

    #[test]
    fn group_products_are_exact() {
        let mut rng = Rng::new(11);
        for &(m, n, k, qmax, smooth) in &[
            (1, 1, 1, QMAX_A8, false),
            (7, 17, 63, QMAX_A8, true),
            (13, 35, 130, QMAX_A6, false),
            (50, 48, 256, QMAX_A8, true),
            (9, 64, 1152, QMAX_A8, false),
            // Rows past one task (98) with single-row tails, channels not a multiple
            // of 16 or 48, k in whole groups (activations borrowed) or not.
            (203, 200, 1152, QMAX_A8, false),
            (15, 33, 4608, QMAX_A6, true),
            (8, 129, 200, QMAX_A8, false),
        ] {
            let (a, w, _, _) = random_case(&mut rng, m, n, k, qmax, smooth);
            let want = scalar_reference(&a, &w);
            assert_eq!(
                gemm_groups_i32(&a, &w).unwrap(),
                want,
                "VNNI/dispatched {m}x{n}x{k}"
            );
            let mut portable = vec![0; want.len()];
            gemm_portable(&a, &w, &mut portable);
            assert_eq!(portable, want, "portable {m}x{n}x{k}");
        }
    }

    #[test]
    fn fused_linear_matches_the_documented_dequantization() {
        let mut rng = Rng::new(12);
        // For AMX: single tiles and a VNNI tail (19 rows), an odd block count
        // (40 channels), macro tiles with a 16-row tile (101 rows).
        for &(m, n, k) in &[(5, 3, 64), (19, 40, 200), (64, 96, 1152), (101, 200, 4608), (250, 130, 256)] {
            let (a, w, _, _) = random_case(&mut rng, m, n, k, QMAX_A8, false);
            let bias = rng.normal_vec(n);
            let acc = scalar_reference(&a, &w);
            let mut want = vec![0f32; m * n];
            dequantize(&acc, &a, &w, Some(&bias), &mut want);
            for amx in kernels() {
                assert_eq!(linear_with(&a, &w, Some(&bias), amx), want, "{m}x{n}x{k}, amx {amx}");
            }
            let mut got = vec![f32::NAN; m * n];
            linear_f32(&a, &w, Some(&bias), &mut got).unwrap();
            assert_eq!(
                got, want,
                "{m}x{n}x{k}: the fused path must round exactly like the reference"
            );
            let mut nob = vec![0f32; m * n];
            linear_f32(&a, &w, None, &mut nob).unwrap();
            for ((g, nb), j) in got.iter().zip(&nob).zip((0..m * n).map(|i| i % n)) {
                assert_eq!(*g, nb + bias[j]);
            }
        }
    }

    #[test]
    fn extreme_values_stay_exact() {
        // All +-127 against +-7: the largest products and shift corrections.
        let (m, n, k) = (41, 40, 4608);
        let a = QuantRows {
            q: (0..m * k).map(|i| if i % 3 == 0 { -127 } else { 127 }).collect(),
            scale: vec![1.0; m],
            rows: m,
            cols: k,
        };
        let q: Vec<i8> = (0..n * k).map(|i| if i % 5 == 0 { 7 } else { -7 }).collect();
        let w = Int4Weight::from_parts(pack(&q, n, k), vec![1.0; n * k / W4_GROUP], n, k, None, QMAX_A8).unwrap();
        let acc = scalar_reference(&a, &w);
        assert_eq!(gemm_groups_i32(&a, &w).unwrap(), acc);
        let mut want = vec![0f32; m * n];
        dequantize(&acc, &a, &w, None, &mut want);
        for amx in kernels() {
            assert_eq!(linear_with(&a, &w, None, amx), want, "amx {amx}");
        }
    }

    #[test]
    fn product_equals_the_dequantized_operands_and_is_close_to_float() {
        let mut rng = Rng::new(13);
        let (m, n, k) = (16, 32, 512);
        for smooth in [false, true] {
            let (a, w, x, wf) = random_case(&mut rng, m, n, k, QMAX_A8, smooth);
            let mut y = vec![0f32; m * n];
            linear_f32(&a, &w, None, &mut y).unwrap();
            let wd = w.dequantize();
            let (mut num, mut den, mut num_q) = (0f64, 0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k)
                        .map(|kk| x[i * k + kk] as f64 * wf[j * k + kk] as f64)
                        .sum();
                    let rq: f64 = (0..k)
                        .map(|kk| {
                            a.q[i * k + kk] as f64 * a.scale[i] as f64 * wd[j * k + kk] as f64
                        })
                        .sum();
                    num += (y[i * n + j] as f64 - r).powi(2);
                    num_q += (y[i * n + j] as f64 - rq).powi(2);
                    den += r * r;
                }
            }
            // Against the dequantized operands: only f32 rounding.
            assert!(
                (num_q / den).sqrt() < 1e-5,
                "smooth {smooth}: {} vs dequantized operands",
                (num_q / den).sqrt()
            );
            // Against the float product: 4-bit weights (7 levels a side per group of 64
            // normals) lose about 10%; the test's uneven smoothing vector costs more.
            let rel = (num / den).sqrt();
            let bound = if smooth { 0.3 } else { 0.15 };
            assert!(
                rel < bound && rel > 0.02,
                "smooth {smooth}: relative L2 error {rel}"
            );
        }
    }

    #[test]
    fn bad_parts_are_rejected() {
        assert!(
            Int4Weight::from_parts(vec![0x80], vec![1.0], 1, 2, None, QMAX_A8).is_err(),
            "nibble 0"
        );
        assert!(
            Int4Weight::from_parts(vec![0x88], vec![1.0, 1.0], 1, 2, None, QMAX_A8).is_err(),
            "scale count"
        );
        assert!(
            Int4Weight::from_parts(vec![0x98], vec![1.0], 1, 1, None, QMAX_A8).is_err(),
            "odd padding"
        );
        assert!(
            Int4Weight::from_parts(vec![0x88], vec![f32::NAN], 1, 2, None, QMAX_A8).is_err(),
            "NaN scale"
        );
        assert!(
            Int4Weight::quantize(&[1.0, 2.0], 1, 2, None, 5).is_err(),
            "qmax"
        );
        let mut rng = Rng::new(1);
        let (a, w, _, _) = random_case(&mut rng, 2, 3, 64, QMAX_A8, false);
        let (b, _, _, _) = random_case(&mut rng, 2, 3, 32, QMAX_A8, false);
        assert!(gemm_groups_i32(&b, &w).is_err());
        assert!(linear_f32(&a, &w, Some(&[0.0]), &mut [0.0; 6]).is_err());
    }
}
