//! Symmetric int8 formats and the CPU integer GEMM.
//!
//! The formulas are those of `kernels/qc_types.h` (`QcQuantizeArgs`,
//! `QcGemmI8Args`), with the same f32 operations in the same order, so the CPU
//! and the CUDA kernels produce the same int8 values, scales and int32
//! accumulators from the same inputs.
//!
//! - Activations: per token (row), `qmax` 127 (A8) or 31 (A6, held in int8).
//! - Weights: per output channel, always 127, with an optional per-input-channel
//!   importance / smoothing vector `s` folded in (`W'[n, k] = W[n, k] * s[k]`);
//!   its inverse then scales the activations as they are quantized.

use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Activation range of the A8 setting.
pub const QMAX_A8: i32 = 127;
/// Activation range of the paper's A6 setting (values in [-31, 31], stored as int8).
pub const QMAX_A6: i32 = 31;

crate::backend::cpu::simd::multiversion! {
/// Quantizes one row: writes `q` and returns its scale (`x'[k] ~ q[k] * scale`).
/// Compiled per instruction set: baseline x86-64 has no rounding instruction, so
/// `round_ties_even` would be a libm call per element.
pub fn quantize_row(x: &[f32], inv_smooth: Option<&[f32]>, qmax: i32, q: &mut [i8]) -> f32 {
    debug_assert_eq!(x.len(), q.len());
    // max |x'| in 16 lanes (max is exact in any order, so this equals a sequential fold).
    let mut lanes = [0f32; 16];
    let mut tail = 0f32;
    match inv_smooth {
        None => {
            let mut c = x.chunks_exact(16);
            for ch in &mut c {
                for i in 0..16 {
                    lanes[i] = lanes[i].max(ch[i].abs());
                }
            }
            tail = c.remainder().iter().fold(tail, |m, v| m.max(v.abs()));
        }
        Some(s) => {
            let (mut c, mut cs) = (x.chunks_exact(16), s.chunks_exact(16));
            for (ch, sh) in (&mut c).zip(&mut cs) {
                for i in 0..16 {
                    lanes[i] = lanes[i].max((ch[i] * sh[i]).abs());
                }
            }
            tail = c.remainder().iter().zip(cs.remainder()).fold(tail, |m, (v, sv)| m.max((v * sv).abs()));
        }
    }
    lanes[0] = lanes[0].max(tail);
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let qm = qmax as f32;
    let scale = amax / qm;
    let inv = if amax > 0.0 { qm / amax } else { 0.0 };
    match inv_smooth {
        None => {
            for (qk, &v) in q.iter_mut().zip(x) {
                *qk = (v * inv).round_ties_even().clamp(-qm, qm) as i8;
            }
        }
        Some(s) => {
            for ((qk, &v), &sv) in q.iter_mut().zip(x).zip(s) {
                *qk = ((v * sv) * inv).round_ties_even().clamp(-qm, qm) as i8;
            }
        }
    }
    scale
}
}

/// Row-quantized activations `[rows, cols]` with one scale per row.
#[derive(Clone, Debug)]
pub struct QuantRows {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Quantizes every row of `x` (`[rows, cols]`) per token.
pub fn quantize_rows(x: &[f32], cols: usize, inv_smooth: Option<&[f32]>, qmax: i32) -> Result<QuantRows> {
    ensure!(cols > 0 && x.len() % cols == 0, "quantize: {} values are not rows of {cols}", x.len());
    ensure!(qmax == QMAX_A8 || qmax == QMAX_A6, "quantize: qmax must be {QMAX_A8} or {QMAX_A6}, got {qmax}");
    if let Some(s) = inv_smooth {
        ensure!(s.len() == cols, "quantize: smoothing vector has {} entries for {cols} columns", s.len());
    }
    let rows = x.len() / cols;
    let mut q = vec![0i8; x.len()];
    let mut scale = vec![0f32; rows];
    q.par_chunks_mut(cols).zip(x.par_chunks(cols)).zip(scale.par_iter_mut()).with_min_len(64).for_each(|((qr, xr), s)| {
        *s = quantize_row(xr, inv_smooth, qmax, qr);
    });
    Ok(QuantRows { q, scale, rows, cols })
}

/// Output channels per VNNI block: one 512-bit register of int32 accumulators.
const NB: usize = 16;

/// An int8 linear weight `[n, k]` with per-output-channel scales, plus the
/// layout the VNNI kernel reads: blocks of 16 channels x 4 consecutive k
/// (64 bytes, one register), channels padded to 16 and k to 4 with zeros.
#[derive(Clone, Debug)]
pub struct Int8Weight {
    /// Row-major `[n, k]` (the CUDA kernel's layout and the exact reference).
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub n: usize,
    pub k: usize,
    /// Inverse of the folded smoothing vector, applied to activations (`[k]`).
    pub inv_smooth: Option<Vec<f32>>,
    /// Activation range: [`QMAX_A8`] or [`QMAX_A6`].
    pub act_qmax: i32,
    packed: Vec<i8>,
    /// `sum_k q[n, k]`: the VNNI kernel multiplies unsigned `a + 128` and subtracts `128 * col_sum`.
    col_sum: Vec<i32>,
}

impl Int8Weight {
    /// Quantizes an f32 weight `[n, k]` per output channel, folding `smooth` (`[k]`) in first.
    pub fn quantize(w: &[f32], n: usize, k: usize, smooth: Option<&[f32]>, act_qmax: i32) -> Result<Self> {
        ensure!(n > 0 && k > 0 && w.len() == n * k, "int8 weight: {} values for [{n}, {k}]", w.len());
        ensure!(act_qmax == QMAX_A8 || act_qmax == QMAX_A6, "int8 weight: activation qmax must be {QMAX_A8} or {QMAX_A6}");
        if let Some(s) = smooth {
            ensure!(s.len() == k, "int8 weight: smoothing vector has {} entries for {k} inputs", s.len());
            ensure!(s.iter().all(|v| v.is_finite() && *v > 0.0), "int8 weight: smoothing factors must be positive and finite");
        }
        let mut q = vec![0i8; n * k];
        let mut scale = vec![0f32; n];
        q.par_chunks_mut(k).zip(w.par_chunks(k)).zip(scale.par_iter_mut()).for_each(|((qr, wr), s)| {
            *s = quantize_row(wr, smooth, QMAX_A8, qr);
        });
        let inv_smooth = smooth.map(|s| s.iter().map(|v| 1.0 / v).collect());
        Self::from_parts(q, scale, n, k, inv_smooth, act_qmax)
    }

    /// An already quantized weight (e.g. read from a quantized checkpoint).
    pub fn from_parts(q: Vec<i8>, scale: Vec<f32>, n: usize, k: usize, inv_smooth: Option<Vec<f32>>, act_qmax: i32) -> Result<Self> {
        ensure!(q.len() == n * k && scale.len() == n, "int8 weight: parts do not describe [{n}, {k}]");
        ensure!(q.iter().all(|&v| v != i8::MIN), "int8 weight: -128 is outside the symmetric range");
        let k4 = k.div_ceil(4);
        let blocks = n.div_ceil(NB);
        let mut packed = vec![0i8; blocks * k4 * NB * 4];
        for (ch, row) in q.chunks(k).enumerate() {
            let (b, c) = (ch / NB, ch % NB);
            for (kk, &v) in row.iter().enumerate() {
                packed[((b * k4 + kk / 4) * NB + c) * 4 + kk % 4] = v;
            }
        }
        let col_sum = q.chunks(k).map(|r| r.iter().map(|&v| v as i32).sum()).collect();
        Ok(Int8Weight { q, scale, n, k, inv_smooth, act_qmax, packed, col_sum })
    }
}

/// Whether this CPU has the AVX-512 VNNI int8 dot products the integer GEMMs use.
#[cfg(target_arch = "x86_64")]
pub(crate) fn vnni_available() -> bool {
    vnni::available()
}

/// `acc[m, n] = sum_k a[m, k] * w[n, k]` in exact int32 (`[rows, n]`).
pub fn gemm_i32(a: &QuantRows, w: &Int8Weight) -> Result<Vec<i32>> {
    ensure!(a.cols == w.k, "int8 gemm: activations have {} columns, weight expects {}", a.cols, w.k);
    ensure!(w.k < 1 << 17, "int8 gemm: k = {} could overflow int32 accumulators", w.k);
    let mut acc = vec![0i32; a.rows * w.n];
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        vnni::gemm(a, w, vnni::Out::I32(acc.as_mut_ptr()));
        return Ok(acc);
    }
    gemm_portable(a, w, &mut acc);
    Ok(acc)
}

/// `y = dequantize(gemm_i32(a, w)) (+ bias)`, `[rows, n]`: the same numbers as
/// [`gemm_i32`] then [`dequantize`], fused on VNNI (no int32 intermediate in memory).
pub fn linear_f32(a: &QuantRows, w: &Int8Weight, bias: Option<&[f32]>, y: &mut [f32]) -> Result<()> {
    ensure!(a.cols == w.k, "int8 gemm: activations have {} columns, weight expects {}", a.cols, w.k);
    ensure!(w.k < 1 << 17, "int8 gemm: k = {} could overflow int32 accumulators", w.k);
    ensure!(y.len() == a.rows * w.n, "int8 linear: output has {} values for [{}, {}]", y.len(), a.rows, w.n);
    if let Some(b) = bias {
        ensure!(b.len() == w.n, "int8 linear: bias has {} values for {} outputs", b.len(), w.n);
    }
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        vnni::gemm(a, w, vnni::Out::F32 { y: y.as_mut_ptr(), a_scale: a.scale.as_ptr(), bias });
        return Ok(());
    }
    let acc = gemm_i32(a, w)?;
    dequantize(&acc, a, w, bias, y);
    Ok(())
}

/// The reference: plain integer loops (vectorized by the compiler).
pub fn gemm_portable(a: &QuantRows, w: &Int8Weight, acc: &mut [i32]) {
    let (k, n) = (w.k, w.n);
    acc.par_chunks_mut(n).zip(a.q.par_chunks(k)).for_each(|(out, ar)| {
        for (o, wr) in out.iter_mut().zip(w.q.chunks(k)) {
            *o = ar.iter().zip(wr).map(|(&x, &y)| x as i32 * y as i32).sum();
        }
    });
}

/// `y[m, n] = ((float) acc * a_scale[m]) * w_scale[n] (+ bias[n])`, the documented
/// dequantization order.
pub fn dequantize(acc: &[i32], a: &QuantRows, w: &Int8Weight, bias: Option<&[f32]>, out: &mut [f32]) {
    let n = w.n;
    out.par_chunks_mut(n).zip(acc.par_chunks(n)).zip(a.scale.par_iter()).with_min_len(16).for_each(|((o, accr), &sa)| {
        for (j, (o, &v)) in o.iter_mut().zip(accr).enumerate() {
            let y = (v as f32 * sa) * w.scale[j];
            *o = match bias {
                Some(b) => y + b[j],
                None => y,
            };
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Int8Weight, QuantRows, NB};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Rows per micro-tile and 16-channel blocks per micro-tile.
    const MR: usize = 8;
    const NC: usize = 3;
    /// Rows and channels handed to one task.
    const TASK_ROWS: usize = 64;
    const TASK_BLOCKS: usize = 9;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// Where a tile's results go: exact int32 accumulators, or dequantized f32
    /// (`((float) acc * a_scale[m]) * w_scale[n] + bias[n]`, the documented order).
    #[derive(Clone, Copy)]
    pub enum Out {
        I32(*mut i32),
        F32 { y: *mut f32, a_scale: *const f32, bias: *const f32 },
    }
    // SAFETY: tasks write disjoint regions (see `gemm`); the scale/bias pointers are read-only.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    pub fn gemm(a: &QuantRows, w: &Int8Weight, out: Out) {
        let (m, n, k) = (a.rows, w.n, w.k);
        let k4 = k.div_ceil(4);
        // Activations shifted to unsigned (`a + 128`), rows padded to whole 4-byte groups.
        let mut au = vec![128u8; m * k4 * 4];
        au.par_chunks_mut(k4 * 4).zip(a.q.par_chunks(k)).for_each(|(d, s)| {
            for (dd, &v) in d.iter_mut().zip(s) {
                *dd = (v as i16 + 128) as u8;
            }
        });
        let blocks = n.div_ceil(NB);
        let row_tasks = m.div_ceil(TASK_ROWS);
        let col_tasks = blocks.div_ceil(TASK_BLOCKS);
        (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
            let out = out;
            let (rt, ct) = (t / col_tasks, t % col_tasks);
            let (r0, r1) = (rt * TASK_ROWS, ((rt + 1) * TASK_ROWS).min(m));
            let (b0, b1) = (ct * TASK_BLOCKS, ((ct + 1) * TASK_BLOCKS).min(blocks));
            // SAFETY: VNNI presence checked by the caller; the task writes only rows
            // r0..r1 x channels of blocks b0..b1, disjoint from every other task.
            unsafe { tile(&au, k4, w, r0, r1, b0, b1, out, n) };
        });
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(au: &[u8], k4: usize, w: &Int8Weight, r0: usize, r1: usize, b0: usize, b1: usize, out: Out, n: usize) {
        let mut r = r0;
        while r < r1 {
            let mr = MR.min(r1 - r);
            let mut b = b0;
            while b < b1 {
                let nc = NC.min(b1 - b);
                match (mr, nc) {
                    (MR, NC) => micro::<MR, NC>(au, k4, w, r, b, out, n),
                    (MR, c) => (0..c).for_each(|i| micro::<MR, 1>(au, k4, w, r, b + i, out, n)),
                    (rows, c) => (0..rows).for_each(|ri| (0..c).for_each(|i| micro::<1, 1>(au, k4, w, r + ri, b + i, out, n))),
                }
                b += nc;
            }
            r += mr;
        }
    }

    /// `R` rows x `C` blocks of 16 channels, accumulated over all of k in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn micro<const R: usize, const C: usize>(au: &[u8], k4: usize, w: &Int8Weight, r: usize, b: usize, out: Out, n: usize) {
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let wp = w.packed.as_ptr();
        let ap = au.as_ptr();
        for kk in 0..k4 {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(wp.add(((b + c) * k4 + kk) * NB * 4) as *const _);
            }
            for (ri, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32((ap.add((r + ri) * k4 * 4 + kk * 4) as *const i32).read_unaligned());
                for (c, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbusd_epi32(*a, x, wv[c]);
                }
            }
        }
        for (ri, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let ch0 = (b + c) * NB;
                let mut lanes = [0i32; NB];
                _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, *a);
                let row = r + ri;
                for (l, &v) in lanes.iter().enumerate().take(n.saturating_sub(ch0).min(NB)) {
                    let (ch, acc) = (ch0 + l, v - 128 * w.col_sum[ch0 + l]);
                    match out {
                        Out::I32(p) => *p.add(row * n + ch) = acc,
                        Out::F32 { y, a_scale, bias } => {
                            let v = (acc as f32 * *a_scale.add(row)) * w.scale[ch];
                            *y.add(row * n + ch) = if bias.is_null() { v } else { v + *bias.add(ch) };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn scalar_reference(a: &QuantRows, w: &Int8Weight) -> Vec<i32> {
        let mut out = vec![0i32; a.rows * w.n];
        for m in 0..a.rows {
            for n in 0..w.n {
                let mut s = 0i64;
                for k in 0..w.k {
                    s += a.q[m * w.k + k] as i64 * w.q[n * w.k + k] as i64;
                }
                out[m * w.n + n] = s as i32;
            }
        }
        out
    }

    #[test]
    fn integer_gemm_is_exact() {
        let mut rng = Rng::new(42);
        for &(m, n, k) in &[(1, 1, 1), (3, 17, 6), (5, 15, 36), (4, 64, 64), (77, 65, 72), (9, 200, 1152), (130, 48, 256), (2, 33, 4608)] {
            let x = rng.normal_vec(m * k);
            let wf = rng.normal_vec(n * k);
            let a = quantize_rows(&x, k, None, QMAX_A8).unwrap();
            let w = Int8Weight::quantize(&wf, n, k, None, QMAX_A8).unwrap();
            let want = scalar_reference(&a, &w);
            assert_eq!(gemm_i32(&a, &w).unwrap(), want, "dispatched kernel, {m}x{n}x{k}");
            let mut port = vec![0; m * n];
            gemm_portable(&a, &w, &mut port);
            assert_eq!(port, want, "portable kernel, {m}x{n}x{k}");
        }
    }

    #[test]
    fn extreme_values_stay_exact() {
        // All +-127: the largest products, checking the unsigned-shift correction.
        let (m, n, k) = (6, 40, 4608);
        let a = QuantRows { q: (0..m * k).map(|i| if i % 3 == 0 { -127 } else { 127 }).collect(), scale: vec![1.0; m], rows: m, cols: k };
        let w = Int8Weight::from_parts((0..n * k).map(|i| if i % 5 == 0 { 127 } else { -127 }).collect(), vec![1.0; n], n, k, None, QMAX_A8).unwrap();
        assert_eq!(gemm_i32(&a, &w).unwrap(), scalar_reference(&a, &w));
    }

    #[test]
    fn quantization_follows_the_documented_formulas() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 1.0 / 254.0];
        let mut q = [0i8; 5];
        let s = quantize_row(&x, None, QMAX_A8, &mut q);
        assert_eq!(s, 1.0 / 127.0);
        // 0.5 * 127 = 63.5 rounds to even (64); 1/254 * 127 = 0.5 rounds to 0.
        assert_eq!(q, [64, -127, 32, 0, 0]);
        let s6 = quantize_row(&x, None, QMAX_A6, &mut q);
        assert_eq!(s6, 1.0 / 31.0);
        assert_eq!(q, [16, -31, 8, 0, 0]); // 15.5 -> 16, 7.75 -> 8
        assert_eq!(quantize_row(&[0.0; 4], None, QMAX_A8, &mut q[..4]), 0.0);
        assert_eq!(&q[..4], &[0; 4]);
        // Smoothing divides the activations before the range is taken.
        let s = quantize_row(&[2.0, 4.0], Some(&[0.5, 0.25]), QMAX_A8, &mut q[..2]);
        assert_eq!((s, &q[..2]), (1.0 / 127.0, &[127i8, 127][..]));
        assert!(quantize_rows(&[1.0; 6], 4, None, QMAX_A8).is_err());
        assert!(quantize_rows(&[1.0; 8], 4, None, 100).is_err());
    }

    #[test]
    fn dequantized_product_is_close_to_float() {
        let mut rng = Rng::new(7);
        let (m, n, k) = (33, 48, 256);
        let x = rng.normal_vec(m * k);
        let wf = rng.normal_vec(n * k);
        let smooth: Vec<f32> = (0..k).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        for sm in [None, Some(&smooth[..])] {
            let w = Int8Weight::quantize(&wf, n, k, sm, QMAX_A8).unwrap();
            let a = quantize_rows(&x, k, w.inv_smooth.as_deref(), w.act_qmax).unwrap();
            let acc = gemm_i32(&a, &w).unwrap();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let mut y = vec![0f32; m * n];
            dequantize(&acc, &a, &w, Some(&bias), &mut y);
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k).map(|j| x[r * k + j] as f64 * wf[c * k + j] as f64).sum::<f64>() as f32 + bias[c]
                })
                .collect();
            let mut fused = vec![0f32; m * n];
            linear_f32(&a, &w, Some(&bias), &mut fused).unwrap();
            assert_eq!(fused, y, "fused dequantization differs from gemm_i32 + dequantize");
            let err = crate::tensor::rel_l2(&y, &want);
            assert!(err < 2e-2, "W8A8 relative error {err} (smoothing {})", sm.is_some());
        }
    }
}
