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

use super::fused::{Finish, RowSource};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Activation range of the A8 setting.
pub const QMAX_A8: i32 = 127;
/// Activation range of the paper's A6 setting (values in [-31, 31], stored as int8).
pub const QMAX_A6: i32 = 31;

/// Quantizes one row: writes `q` and returns its scale (`x'[k] ~ q[k] * scale`).
pub fn quantize_row(x: &[f32], inv_smooth: Option<&[f32]>, qmax: i32, q: &mut [i8]) -> f32 {
    debug_assert_eq!(x.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if q.len() == x.len() && inv_smooth.is_none_or(|s| s.len() == x.len()) && crate::backend::cpu::simd::level() == crate::backend::cpu::simd::Level::Avx512 {
        // SAFETY: AVX-512 F present; the slices have equal lengths.
        return unsafe { quantize_row_avx512(x, inv_smooth, qmax, q) };
    }
    quantize_row_portable(x, inv_smooth, qmax, q)
}

crate::backend::cpu::simd::multiversion! {
/// [`quantize_row`] in plain Rust, compiled per instruction set: baseline x86-64
/// has no rounding instruction, so `round_ties_even` would be a libm call per element.
fn quantize_row_portable(x: &[f32], inv_smooth: Option<&[f32]>, qmax: i32, q: &mut [i8]) -> f32 {
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

/// [`quantize_row_portable`] in AVX-512 intrinsics, with the same operations:
/// `max_ps(|x'|, m)` keeps `m` for a NaN as `f32::max` does, and NaN products
/// quantize to 0 as Rust's saturating `as i8` does. (The compiler does not
/// vectorize the portable version's rounding and saturating conversion well:
/// at K = 4608 it cost a quarter of the GEMM's time.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(x: &[f32], inv_smooth: Option<&[f32]>, qmax: i32, q: &mut [i8]) -> f32 {
    let amax = row_amax_avx512(x, inv_smooth);
    let qm = qmax as f32;
    let scale = amax / qm;
    let inv = if amax > 0.0 { qm / amax } else { 0.0 };
    row_quantize_avx512(x, inv_smooth, inv, qm, q);
    scale
}

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::simd::lanes16 as tail_mask;

/// `x' = x (* inv_smooth)`, lanes `i..i + 16` (masked lanes 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_smoothed(x: &[f32], inv_smooth: Option<&[f32]>, i: usize, mask: u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
    match inv_smooth {
        None => v,
        Some(s) => _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, s.as_ptr().add(i))),
    }
}

/// The first pass: `max |x'|`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_amax_avx512(x: &[f32], inv_smooth: Option<&[f32]>) -> f32 {
    std::arch::x86_64::_mm512_reduce_max_ps(row_lane_max_avx512(x, inv_smooth))
}

/// [`row_amax_avx512`] before its last reduction: the maximum of each lane.
/// A NaN never enters (`max_ps` returns its second operand, the running maximum).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_lane_max_avx512(x: &[f32], inv_smooth: Option<&[f32]>) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let mut m = _mm512_setzero_ps();
    for i in (0..x.len()).step_by(16) {
        m = _mm512_max_ps(_mm512_abs_ps(load_smoothed(x, inv_smooth, i, tail_mask(x.len(), i))), m);
    }
    m
}

/// Row `i`'s lane in [`crate::backend::cpu::simd::reduce_vectors16`]'s result.
#[cfg(target_arch = "x86_64")]
const LANE_OF_ROW: [i32; 16] = {
    let mut r = [0; 16];
    let mut i = 0;
    while i < 16 {
        r[i] = crate::backend::cpu::simd::REDUCED_LANE[i] as i32;
        i += 1;
    }
    r
};

/// The second pass: `q = round(x' * inv)` in [-qm, qm].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_quantize_avx512(x: &[f32], inv_smooth: Option<&[f32]>, inv: f32, qm: f32, q: &mut [i8]) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let len = x.len();
    // Each lane's sum of the quantized values (masked-off lanes convert 0).
    let mut sums = _mm512_setzero_si512();
    let (vinv, lo, hi) = (_mm512_set1_ps(inv), _mm512_set1_ps(-qm), _mm512_set1_ps(qm));
    // With a finite `inv`, |x' * inv| <= qm (1 + 2^-24)^2 for every finite x', so
    // rounding alone lands in [-qm, qm] (the clamp is a no-op), and a NaN product
    // converts to i32::MIN, whose low byte (what `vpmovdb` keeps) is 0, as `as i8`
    // gives: half the operations. `inv` overflows only for rows under ~4e-37.
    let exact = inv.is_finite();
    for i in (0..len).step_by(16) {
        let mask = tail_mask(len, i);
        let v = _mm512_mul_ps(load_smoothed(x, inv_smooth, i, mask), vinv);
        let r = if exact {
            _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
        } else {
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let c = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
            _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), c)
        };
        // Narrowed in a register, then a plain store: `vpmovdb` straight to memory
        // (masked) was a third of this function on Zen 4 (measured).
        let bytes = _mm512_cvtepi32_epi8(r);
        // Summed as stored (a NaN's i32::MIN is stored as 0).
        sums = _mm512_add_epi32(sums, _mm512_cvtepi8_epi32(bytes));
        if mask == 0xFFFF {
            _mm_storeu_si128(q.as_mut_ptr().add(i) as *mut __m128i, bytes);
        } else {
            let mut tail_bytes = [0i8; 16];
            _mm_storeu_si128(tail_bytes.as_mut_ptr() as *mut __m128i, bytes);
            std::ptr::copy_nonoverlapping(tail_bytes.as_ptr(), q.as_mut_ptr().add(i), len - i);
        }
    }
    sums
}

/// Row-quantized activations `[rows, cols]` with one scale per row.
#[derive(Clone, Debug)]
pub struct QuantRows {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

pub(super) fn check_quantize_args(cols: usize, inv_smooth: Option<&[f32]>, qmax: i32) -> Result<()> {
    ensure!(cols > 0, "quantize: rows of 0 columns");
    ensure!(qmax == QMAX_A8 || qmax == QMAX_A6, "quantize: qmax must be {QMAX_A8} or {QMAX_A6}, got {qmax}");
    if let Some(s) = inv_smooth {
        ensure!(s.len() == cols, "quantize: smoothing vector has {} entries for {cols} columns", s.len());
    }
    Ok(())
}

/// Quantizes `rows` rows of `cols` per token, each written by `produce(row,
/// buf)` into a per-worker scratch row just before it is quantized: the
/// producer op (layer norm + modulate) fused with the quantization, with no
/// full-size float intermediate. Same values as producing every row, then
/// [`quantize_rows`].
pub fn quantize_produced_rows(rows: usize, cols: usize, inv_smooth: Option<&[f32]>, qmax: i32, produce: impl Fn(usize, &mut [f32]) + Sync) -> Result<QuantRows> {
    check_quantize_args(cols, inv_smooth, qmax)?;
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0f32; rows];
    // A block of rows is produced into a scratch block (L1-sized at the demo's
    // widths), then quantized in one call.
    q.par_chunks_mut(cols * BLOCK_ROWS).zip(scale.par_chunks_mut(BLOCK_ROWS)).enumerate().for_each_init(
        || vec![0f32; cols * BLOCK_ROWS],
        |buf, (b, (qb, sb))| {
            let buf = &mut buf[..qb.len()];
            for (i, row) in buf.chunks_mut(cols).enumerate() {
                produce(b * BLOCK_ROWS + i, row);
            }
            quantize_block(buf, cols, inv_smooth, qmax, qb, sb, None);
        },
    );
    Ok(QuantRows { q, scale, rows, cols })
}

/// Rows per task of the activation quantization.
const BLOCK_ROWS: usize = 64;

/// Quantizes the rows of `x` (`[rows, cols]`) into `q` and `scale`: [`quantize_row`]
/// per row, with the AVX-512 version inlined into one loop (the rows are short
/// at the demo's widths: a call per row and its two dependent divisions stalled
/// where the inlined loop overlaps consecutive rows).
///
/// `sums`, when given, receives each row's sum of its quantized values (what
/// the integer kernels' shift correction needs), taken while the row is quantized.
pub(super) fn quantize_block(x: &[f32], cols: usize, inv_smooth: Option<&[f32]>, qmax: i32, q: &mut [i8], scale: &mut [f32], sums: Option<&mut [i32]>) {
    #[cfg(target_arch = "x86_64")]
    if inv_smooth.is_none_or(|s| s.len() == cols) && crate::backend::cpu::simd::level() == crate::backend::cpu::simd::Level::Avx512 {
        // SAFETY: AVX-512 F present; every row and the smoothing vector are `cols` long.
        return unsafe { quantize_block_avx512(x, cols, inv_smooth, qmax, q, scale, sums) };
    }
    for ((xr, qr), s) in x.chunks(cols).zip(q.chunks_mut(cols)).zip(scale.iter_mut()) {
        *s = quantize_row(xr, inv_smooth, qmax, qr);
    }
    if let Some(sums) = sums {
        for (s, qr) in sums.iter_mut().zip(q.chunks(cols)) {
            *s = qr.iter().map(|&v| v as i32).sum();
        }
    }
}

/// [`quantize_block`] 16 rows at a time: their maxima, then their scales and
/// reciprocals as two vector divisions (the same IEEE quotients as
/// [`quantize_row`]'s), then their values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(x: &[f32], cols: usize, inv_smooth: Option<&[f32]>, qmax: i32, q: &mut [i8], scale: &mut [f32], mut sums: Option<&mut [i32]>) {
    use std::arch::x86_64::*;
    let qm = qmax as f32;
    for (b, ((xb, qb), sb)) in x.chunks(cols * 16).zip(q.chunks_mut(cols * 16)).zip(scale.chunks_mut(16)).enumerate() {
        // The 16 rows' lane maxima reduced together (max is exact: the same
        // maxima as one row at a time), then put back in row order.
        let mut lanes = [_mm512_setzero_ps(); 16];
        for (l, xr) in lanes.iter_mut().zip(xb.chunks(cols)) {
            *l = row_lane_max_avx512(xr, inv_smooth);
        }
        let reduced = crate::backend::cpu::simd::reduce_vectors16(&lanes, |a, b| _mm512_max_ps(a, b));
        let order = _mm512_loadu_si512(LANE_OF_ROW.as_ptr() as *const _);
        let (va, vq) = (_mm512_permutexvar_ps(order, reduced), _mm512_set1_ps(qm));
        let mut amax = [0f32; 16];
        let mut inv = [0f32; 16];
        _mm512_storeu_ps(amax.as_mut_ptr(), _mm512_div_ps(va, vq));
        _mm512_storeu_ps(inv.as_mut_ptr(), _mm512_maskz_div_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(va, _mm512_setzero_ps()), vq, va));
        let mut lane_sums = [_mm512_setzero_si512(); 16];
        for ((((xr, qr), s), (&sc, &iv)), ls) in xb.chunks(cols).zip(qb.chunks_mut(cols)).zip(sb.iter_mut()).zip(amax.iter().zip(&inv)).zip(lane_sums.iter_mut()) {
            *ls = row_quantize_avx512(xr, inv_smooth, iv, qm, qr);
            *s = sc;
        }
        if let Some(sums) = sums.as_deref_mut() {
            // The 16 rows' sums reduced together, as integers (the reduction only
            // moves bits between lanes and adds), then put back in row order.
            let mut as_ps = [_mm512_setzero_ps(); 16];
            for (p, &v) in as_ps.iter_mut().zip(&lane_sums) {
                *p = _mm512_castsi512_ps(v);
            }
            let reduced = crate::backend::cpu::simd::reduce_vectors16(&as_ps, |a, b| _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b))));
            let mut row_sums = [0i32; 16];
            _mm512_storeu_si512(row_sums.as_mut_ptr() as *mut _, _mm512_permutexvar_epi32(order, _mm512_castps_si512(reduced)));
            sums[b * 16..][..sb.len()].copy_from_slice(&row_sums[..sb.len()]);
        }
    }
}

/// Quantizes every row of `x` (`[rows, cols]`) per token.
pub fn quantize_rows(x: &[f32], cols: usize, inv_smooth: Option<&[f32]>, qmax: i32) -> Result<QuantRows> {
    check_quantize_args(cols, inv_smooth, qmax)?;
    ensure!(x.len().is_multiple_of(cols), "quantize: {} values are not rows of {cols}", x.len());
    let rows = x.len() / cols;
    let mut q = vec![0i8; x.len()];
    let mut scale = vec![0f32; rows];
    q.par_chunks_mut(cols * BLOCK_ROWS).zip(x.par_chunks(cols * BLOCK_ROWS)).zip(scale.par_chunks_mut(BLOCK_ROWS)).for_each(|((qb, xb), sb)| {
        quantize_block(xb, cols, inv_smooth, qmax, qb, sb, None);
    });
    Ok(QuantRows { q, scale, rows, cols })
}

/// Output channels per block of the VNNI layout.
const NB: usize = 16;

/// An int8 linear weight `[n, k]` with per-output-channel scales, plus the
/// layout the VNNI kernel reads.
#[derive(Clone, Debug)]
pub struct Int8Weight {
    pub scale: Vec<f32>,
    pub n: usize,
    pub k: usize,
    /// Inverse of the folded smoothing vector, applied to activations (`[k]`).
    pub inv_smooth: Option<Vec<f32>>,
    /// Activation range: [`QMAX_A8`] or [`QMAX_A6`].
    pub act_qmax: i32,
    /// `q + 128` as unsigned bytes in blocks of 16 channels x 4 consecutive k
    /// (`[n / 16][k / 4][16][4]`, 64 bytes = one register per k-group), channels
    /// padded to 16 and k to 4 with 0 (so padding adds nothing whatever the
    /// activation bytes there). The only copy of the values held: the row-major
    /// form is rebuilt on demand ([`Int8Weight::row_major`]).
    packed: Vec<super::Line>,
    /// `scale` padded with zeros to whole blocks, for vector loads.
    scale_pad: Vec<f32>,
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

    /// An already quantized weight (e.g. read from a quantized checkpoint): `q`
    /// row-major `[n, k]`, `scale` `[n]`.
    pub fn from_parts(q: Vec<i8>, scale: Vec<f32>, n: usize, k: usize, inv_smooth: Option<Vec<f32>>, act_qmax: i32) -> Result<Self> {
        ensure!(n > 0 && k > 0, "int8 weight: empty shape [{n}, {k}]");
        ensure!(q.len() == n * k && scale.len() == n, "int8 weight: parts do not describe [{n}, {k}]");
        ensure!(q.iter().all(|&v| v != i8::MIN), "int8 weight: -128 is outside the symmetric range");
        ensure!(act_qmax == QMAX_A8 || act_qmax == QMAX_A6, "int8 weight: activation qmax must be {QMAX_A8} or {QMAX_A6}");
        if let Some(s) = &inv_smooth {
            ensure!(s.len() == k, "int8 weight: smoothing vector has {} entries for {k} inputs", s.len());
        }
        let (k4, blocks) = (k.div_ceil(4), n.div_ceil(NB));
        let mut packed = super::lines(blocks * k4 * NB * 4);
        bytemuck::cast_slice_mut::<_, u8>(&mut packed).par_chunks_mut(k4 * NB * 4).enumerate().for_each(|(b, blk)| {
            for (c, row) in q.chunks(k).skip(b * NB).take(NB).enumerate() {
                for (kk, &v) in row.iter().enumerate() {
                    blk[(kk / 4 * NB + c) * 4 + kk % 4] = (v as i16 + 128) as u8;
                }
            }
        });
        let mut scale_pad = scale.clone();
        scale_pad.resize(blocks * NB, 0.0);
        Ok(Int8Weight { scale, n, k, inv_smooth, act_qmax, packed, scale_pad })
    }

    /// The values `q[n, k]`, row-major (the CUDA kernel's layout, the exact
    /// reference's operand and what quantized checkpoints store).
    pub fn row_major(&self) -> Vec<i8> {
        let k4 = self.k.div_ceil(4);
        let packed: &[u8] = bytemuck::cast_slice(&self.packed);
        let mut q = vec![0i8; self.n * self.k];
        q.par_chunks_mut(self.k).enumerate().for_each(|(ch, row)| {
            let (b, c) = (ch / NB, ch % NB);
            for (kk, v) in row.iter_mut().enumerate() {
                *v = (packed[((b * k4 + kk / 4) * NB + c) * 4 + kk % 4] as i16 - 128) as i8;
            }
        });
        q
    }
}

fn check(a: &QuantRows, w: &Int8Weight) -> Result<()> {
    ensure!(a.cols == w.k, "int8 gemm: activations have {} columns, weight expects {}", a.cols, w.k);
    ensure!(a.q.len() == a.rows * a.cols && a.scale.len() == a.rows, "int8 gemm: activations do not describe [{}, {}]", a.rows, a.cols);
    ensure!(w.k < 1 << 17, "int8 gemm: k = {} could overflow int32 accumulators", w.k);
    Ok(())
}

/// `acc[m, n] = sum_k a[m, k] * w[n, k]` in exact int32 (`[rows, n]`).
pub fn gemm_i32(a: &QuantRows, w: &Int8Weight) -> Result<Vec<i32>> {
    check(a, w)?;
    let mut acc = vec![0i32; a.rows * w.n];
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() {
        kernel::gemm(a, w, super::vnni::Out::I32(acc.as_mut_ptr()), kernel::use_amx(w));
        return Ok(acc);
    }
    gemm_portable(a, w, &mut acc);
    Ok(acc)
}

/// `y = dequantize(gemm_i32(a, w)) (+ bias)`, `[rows, n]`: the same numbers as
/// [`gemm_i32`] then [`dequantize`], fused on VNNI (no int32 intermediate in memory).
pub fn linear_f32(a: &QuantRows, w: &Int8Weight, bias: Option<&[f32]>, y: &mut [f32]) -> Result<()> {
    check(a, w)?;
    ensure!(y.len() == a.rows * w.n, "int8 linear: output has {} values for [{}, {}]", y.len(), a.rows, w.n);
    if let Some(b) = bias {
        ensure!(b.len() == w.n, "int8 linear: bias has {} values for {} outputs", b.len(), w.n);
    }
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        kernel::gemm(a, w, super::vnni::Out::F32 { y: y.as_mut_ptr(), a_scale: a.scale.as_ptr(), bias }, kernel::use_amx(w));
        return Ok(());
    }
    let acc = gemm_i32(a, w)?;
    dequantize(&acc, a, w, bias, y);
    Ok(())
}

/// The activation quantization and [`linear_f32`] in one parallel loop, or
/// `None` where it does not apply (no VNNI, or weights too large for one task
/// to hold every column): each task quantizes its own rows into scratch and
/// multiplies them at once. The same numbers as [`quantize_rows`] (or
/// [`quantize_produced_rows`]) then [`linear_f32`]: at the demo's sizes the
/// separate quantization, shift sums and product each waited for both threads
/// (about 10 us of a 30 us linear).
///
/// `finish(first_row, out_rows)`, when given, runs in each task on its output
/// rows as soon as they are stored (an activation, a gated residual), while
/// they are in cache.
pub fn linear_rows_f32(x: RowSource, rows: usize, w: &Int8Weight, bias: Option<&[f32]>, finish: Option<&Finish>) -> Option<Result<Vec<f32>>> {
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() && kernel::fits_one_task(w) {
        return Some((|| {
            super::fused::check(x, rows, w.k, w.n, w.inv_smooth.as_deref(), w.act_qmax, bias)?;
            Ok(kernel::linear_rows(x, rows, w, bias, finish, kernel::use_amx(w)))
        })());
    }
    let _ = (x, rows, w, bias, finish);
    None
}

/// `f` on the fused path's stage for `w` over `rows` rows (for
/// [`fused::chain`](super::fused::chain)), or `None` where
/// [`linear_rows_f32`] would not apply.
pub fn with_stage<R>(w: &Int8Weight, bias: Option<&[f32]>, rows: usize, f: impl FnOnce(&super::fused::Stage) -> R) -> Option<Result<R>> {
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() && kernel::fits_one_task(w) {
        return Some((|| {
            // No rows yet: the arguments only.
            super::fused::check(RowSource::Rows(&[]), 0, w.k, w.n, w.inv_smooth.as_deref(), w.act_qmax, bias)?;
            let amx = kernel::use_amx(w);
            let task = kernel::task_kernel(w, bias, amx);
            Ok(f(&super::fused::Stage { layout: kernel::layout(w, rows, amx), kernel: &task }))
        })());
    }
    let _ = (w, bias, rows, f);
    None
}

/// The portable kernel (no VNNI): plain integer loops, vectorized by the compiler.
pub fn gemm_portable(a: &QuantRows, w: &Int8Weight, acc: &mut [i32]) {
    let (k, n) = (w.k, w.n);
    let wq = w.row_major();
    acc.par_chunks_mut(n).zip(a.q.par_chunks(k)).for_each(|(out, ar)| {
        for (o, wr) in out.iter_mut().zip(wq.chunks(k)) {
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

/// The AVX-512 VNNI GEMM: micro-tiles of [`MR`](kernel::MR) rows x [`NC`](kernel::NC)
/// blocks of 16 channels accumulate over all of k in 24 registers (per 4-byte
/// k-group: 4 weight loads, 6 activation broadcasts, 24 `vpdpbusd`), then the
/// shift correction and the dequantization run on the registers and store.
/// Where AMX is available and k is a multiple of 64, whole 16-row tiles run on
/// AMX instead ([`amx`](super::amx)), with the same epilogue.
#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::super::amx;
    use super::super::fused::{self, Finish, RowSource};
    use super::super::vnni::{self, Out, NB};
    use super::{Int8Weight, QuantRows};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    pub const MR: usize = 6;
    pub const NC: usize = 4;
    /// Rows of one task, at most.
    const TASK_ROWS: usize = 96;

    /// Rows of one task for `m` rows: [`TASK_ROWS`], fewer when that would
    /// leave each thread under about four tasks (the demo's 512 rows made 6
    /// tasks of 96 for 2 threads, and the last one's wait showed); whole AMX
    /// macro tiles (32 rows) where AMX runs, whole micro-tiles otherwise.
    fn task_rows(m: usize, amx: bool) -> usize {
        let unit = if amx { 2 * amx::TILE_ROWS } else { MR };
        m.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(unit).clamp(unit, TASK_ROWS)
    }

    /// Whether AMX runs this product: available, and k whole 64-byte chunks.
    pub fn use_amx(w: &Int8Weight) -> bool {
        w.k.is_multiple_of(amx::TILE_K) && amx::available()
    }
    /// Weight bytes of one task: its blocks stay in the core's L2 while the
    /// next tasks (the same blocks, the following rows) reuse them.
    const TASK_WEIGHT_BYTES: usize = 192 << 10;
    /// The same on AMX, whose tiles stream the weights faster: more columns per
    /// task re-read each task's rows fewer times (qkv at Open-Sora's width 1.3x
    /// faster than with 192 KiB; the weights and rows still fit a 2 MiB L2).
    const AMX_TASK_WEIGHT_BYTES: usize = 1 << 20;
    /// Rows of one task on AMX: one macro tile, whose rows stay near the core
    /// while the task's weight blocks stream past (shared, in L2, with the next
    /// tasks). At Open-Sora's shapes 1.2-1.45x faster than 96 rows (best of 12
    /// interleaved, two runs), 64 rows in between.
    const AMX_TASK_ROWS: usize = 2 * amx::TILE_ROWS;

    /// What every micro-tile reads.
    struct Operands {
        /// Signed activations, rows of `lda` bytes (a multiple of 4, zero padding).
        a: *const i8,
        lda: usize,
        /// `128 * sum_k a[m, k]` per row: the weights are stored as `w + 128`.
        corr: *const i32,
        w: *const u8,
        k4: usize,
        scale: *const f32,
        n: usize,
        /// Whole 16-row tiles on AMX (k a multiple of 64, AMX available).
        amx: bool,
    }

    /// The whole product, on AMX where `amx` (see [`use_amx`]).
    pub fn gemm(a: &QuantRows, w: &Int8Weight, out: Out, amx: bool) {
        let (m, n) = (a.rows, w.n);
        let k4 = w.k.div_ceil(4);
        let rows = vnni::rows_operand(a, k4 * 4, amx);
        let corr = vnni::group_sums(a, w.k, 128);
        let blocks = n.div_ceil(NB);
        let weight_bytes = if amx { AMX_TASK_WEIGHT_BYTES } else { TASK_WEIGHT_BYTES };
        let task_blocks = (weight_bytes / (k4 * 64 * NC)).max(1) * NC;
        let task_rows = if amx { AMX_TASK_ROWS } else { task_rows(m, false) };
        let (row_tasks, col_tasks) = (m.div_ceil(task_rows), blocks.div_ceil(task_blocks));
        let op = Operands { a: rows.as_ptr(), lda: k4 * 4, corr: corr.as_ptr(), w: w.packed.as_ptr() as *const u8, k4, scale: w.scale_pad.as_ptr(), n, amx };
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

    // SAFETY (for the raw pointers below): `Operands` only travels inside `gemm`'s scope.
    unsafe impl Sync for Operands {}

    /// Whether one task's weight budget holds every column of `w` (the fused path's condition).
    pub fn fits_one_task(w: &Int8Weight) -> bool {
        let k4 = w.k.div_ceil(4);
        w.n.div_ceil(NB) <= (TASK_WEIGHT_BYTES / (k4 * 64 * NC)).max(1) * NC
    }

    /// See [`super::linear_rows_f32`]: tasks of [`task_rows`] rows, each producing
    /// (or reading), quantizing and multiplying its rows into its part of the output.
    pub fn linear_rows(x: RowSource, rows: usize, w: &Int8Weight, bias: Option<&[f32]>, finish: Option<&Finish>, amx: bool) -> Vec<f32> {
        fused::rows(x, rows, &layout(w, rows, amx), finish, &task_kernel(w, bias, amx))
    }

    /// The fused product's shape for `rows` rows of `w`.
    pub fn layout(w: &Int8Weight, rows: usize, amx: bool) -> fused::Layout<'_> {
        fused::Layout { k: w.k, lda: w.k.div_ceil(4) * 4, n: w.n, task_rows: task_rows(rows, amx), inv_smooth: w.inv_smooth.as_deref(), qmax: w.act_qmax, row_sums: true }
    }

    /// What each fused task runs on its quantized rows.
    pub fn task_kernel<'a>(w: &'a Int8Weight, bias: Option<&'a [f32]>, amx: bool) -> impl Fn(fused::Task) + Sync + 'a {
        let k4 = w.k.div_ceil(4);
        let blocks = w.n.div_ceil(NB);
        move |t: fused::Task| {
            // The shift correction from the quantizer's row sums (zero padding adds nothing).
            t.sums.iter_mut().for_each(|s| *s = s.wrapping_mul(128));
            let op = Operands { a: t.a.as_ptr(), lda: t.lda, corr: t.sums.as_ptr(), w: w.packed.as_ptr() as *const u8, k4, scale: w.scale_pad.as_ptr(), n: w.n, amx };
            let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
            // SAFETY: VNNI checked by the caller; the operands live through the call;
            // `t.y` is the task's own `t.m` rows, all of which the tile writes.
            unsafe { tile(&op, 0, t.m, 0, blocks, Out::F32 { y: t.y, a_scale: t.scale.as_ptr(), bias }) };
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile(op: &Operands, r0: usize, r1: usize, b0: usize, b1: usize, out: Out) {
        // AMX takes whole 16-row tiles; VNNI the rows left over.
        let r_amx = if op.amx { r0 + (r1 - r0) / amx::TILE_ROWS * amx::TILE_ROWS } else { r0 };
        if r_amx > r0 {
            amx_tile(op, r0, r_amx, b0, b1, out);
        }
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

    /// Rows `r0 .. r1` (whole tiles) x blocks `b0 .. b1` on AMX: macro tiles of
    /// 32 rows x 2 blocks (16-row and 1-block ones at the edges) over all of k,
    /// then the VNNI kernel's epilogue on the stored int32 results.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn amx_tile(op: &Operands, r0: usize, r1: usize, b0: usize, b1: usize, out: Out) {
        let tiles = amx::Tiles::new();
        let mut res = amx::Results([[0; 32]; 32]);
        let (wb, chunks) = (op.k4 * NB * 4, op.k4 * 4 / amx::TILE_K);
        for (r, rt, b, ct) in amx::macro_tiles(r0, r1, b0, b1) {
            tiles.run_sized::<false>(rt, ct, op.a.add(r * op.lda), op.lda, op.w.add(b * wb), wb, amx::TILE_K * 16, chunks, &mut res);
            for (ri, row) in res.0.iter().take(rt * amx::TILE_ROWS).enumerate() {
                for c in 0..ct {
                    store(op, r + ri, (b + c) * NB, _mm512_loadu_si512(row[c * NB..].as_ptr() as *const _), out);
                }
            }
        }
    }

    /// Rows `r .. r + R` x blocks `b .. b + C`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn micro<const R: usize, const C: usize>(op: &Operands, r: usize, b: usize, out: Out) {
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let wb = op.k4 * NB * 4;
        let mut wp = op.w.add(b * wb);
        let mut ap = op.a.add(r * op.lda);
        for _ in 0..op.k4 {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(wp.add(c * wb) as *const _);
            }
            for (ri, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32((ap.add(ri * op.lda) as *const i32).read_unaligned());
                for (a, &wc) in row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbusd_epi32(*a, wc, x);
                }
            }
            wp = wp.add(NB * 4);
            ap = ap.add(4);
        }
        for (ri, row) in acc.iter().enumerate() {
            for (c, &a) in row.iter().enumerate() {
                store(op, r + ri, (b + c) * NB, a, out);
            }
        }
    }

    /// The epilogue of row `m`, channels `ch0 .. ch0 + 16` from their shifted
    /// sums `acc`: the shift correction, then the dequantization in the documented
    /// order, `((float) acc * a_scale[m]) * w_scale[n] (+ bias[n])`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn store(op: &Operands, m: usize, ch0: usize, acc: __m512i, out: Out) {
        let v = _mm512_sub_epi32(acc, _mm512_set1_epi32(*op.corr.add(m)));
        match out {
            Out::I32(p) => _mm512_mask_storeu_epi32(p.add(m * op.n + ch0), vnni::live_mask(op.n, ch0), v),
            Out::F32 { y, a_scale, bias } => {
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(*a_scale.add(m)));
                vnni::store_f32(y, bias, op.n, m, ch0, _mm512_mul_ps(f, _mm512_loadu_ps(op.scale.add(ch0))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::vnni;
    use crate::rng::Rng;

    /// The fused linear (each task quantizes and multiplies its rows) gives the
    /// same bits as quantizing everything, then [`linear_f32`], from rows and
    /// from a producer; weights too large for one task decline.
    #[test]
    fn fused_linear_equals_quantize_then_linear() {
        if !crate::quant::vnni::available() {
            return;
        }
        let mut rng = Rng::new(21);
        for (rows, k, n) in [(1, 64, 16), (5, 17, 50), (37, 100, 192), (513, 64, 192), (300, 256, 64), (97, 256, 1)] {
            let wf = rng.normal_vec(n * k);
            let smooth: Vec<f32> = (0..k).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect();
            let bias = rng.normal_vec(n);
            let mut x = rng.normal_vec(rows * k);
            x[k / 2] = f32::NAN;
            for (qmax, sm, b) in [(QMAX_A8, None, None), (QMAX_A6, Some(&smooth[..]), Some(&bias[..]))] {
                let w = Int8Weight::quantize(&wf, n, k, sm, qmax).unwrap();
                let a = quantize_rows(&x, k, w.inv_smooth.as_deref(), qmax).unwrap();
                let mut want = vec![0f32; rows * n];
                linear_f32(&a, &w, b, &mut want).unwrap();
                let got = linear_rows_f32(RowSource::Rows(&x), rows, &w, b, None).expect("small weights take the fused path").unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "rows {rows}, k {k}, n {n}, from rows");
                let produce = |r: usize, out: &mut [f32]| out.copy_from_slice(&x[r * k..(r + 1) * k]);
                let got = linear_rows_f32(RowSource::Produced(&produce), rows, &w, b, None).unwrap().unwrap();
                assert_eq!(bits(&got), bits(&want), "rows {rows}, k {k}, n {n}, produced");
                for amx in each_kernel(k) {
                    let got = kernel::linear_rows(RowSource::Rows(&x), rows, &w, b, None, amx);
                    assert_eq!(bits(&got), bits(&want), "rows {rows}, k {k}, n {n}, amx {amx}");
                }
            }
        }
        let big = Int8Weight::quantize(&vec![0.5; 1152 * 4608], 4608, 1152, None, QMAX_A8).unwrap();
        assert!(linear_rows_f32(RowSource::Rows(&[0.0; 1152]), 1, &big, None, None).is_none());
    }

    /// The x86 kernels this CPU runs for reduction length `k`: VNNI (`false`)
    /// and AMX (`true`), so both are checked where the CPU has AMX, whatever
    /// the dispatch picks.
    fn each_kernel(k: usize) -> Vec<bool> {
        let mut kernels = Vec::new();
        if vnni::available() {
            kernels.push(false);
            if k.is_multiple_of(64) && crate::quant::amx::available() {
                kernels.push(true);
            }
        }
        kernels
    }

    fn scalar_reference(a: &QuantRows, w: &Int8Weight) -> Vec<i32> {
        let wq = w.row_major();
        let mut out = vec![0i32; a.rows * w.n];
        for m in 0..a.rows {
            for n in 0..w.n {
                let mut s = 0i64;
                for k in 0..w.k {
                    s += a.q[m * w.k + k] as i64 * wq[n * w.k + k] as i64;
                }
                out[m * w.n + n] = s as i32;
            }
        }
        out
    }

    #[test]
    fn the_packed_weight_is_the_only_copy_and_round_trips() {
        let mut rng = Rng::new(11);
        for (n, k) in [(1, 1), (7, 5), (16, 64), (33, 130)] {
            let q: Vec<i8> = (0..n * k).map(|_| ((rng.uniform() * 255.0) as i32 - 127).clamp(-127, 127) as i8).collect();
            let w = Int8Weight::from_parts(q.clone(), vec![0.5; n], n, k, None, QMAX_A8).unwrap();
            assert_eq!(w.row_major(), q, "[{n}, {k}]");
            // Held: the padded VNNI copy and the scales, about one byte per value.
            assert!(w.packed.len() * 64 <= n.div_ceil(16) * 16 * k.div_ceil(4) * 4);
        }
    }

    #[test]
    fn integer_gemm_is_exact() {
        let mut rng = Rng::new(42);
        // Odd rows, rows past one task (96) with a tail of single rows, k not a
        // multiple of 4 (padded copy) or 64, channels not a multiple of 16 or 64;
        // for AMX, rows in whole macro tiles (32), a 16-row tile and a VNNI tail,
        // an odd number of channel blocks.
        for &(m, n, k) in &[(1, 1, 1), (3, 17, 6), (5, 15, 36), (4, 64, 64), (77, 65, 72), (9, 200, 1152), (130, 48, 256), (2, 33, 4608), (203, 200, 1153), (97, 129, 1030), (31, 1152, 100), (13, 7, 4608), (16, 16, 64), (64, 192, 64), (53, 40, 128), (250, 130, 1152)] {
            let x = rng.normal_vec(m * k);
            let wf = rng.normal_vec(n * k);
            let a = quantize_rows(&x, k, None, QMAX_A8).unwrap();
            let w = Int8Weight::quantize(&wf, n, k, None, QMAX_A8).unwrap();
            let want = scalar_reference(&a, &w);
            assert_eq!(gemm_i32(&a, &w).unwrap(), want, "dispatched kernel, {m}x{n}x{k}");
            for amx in each_kernel(k) {
                let mut acc = vec![0; m * n];
                kernel::gemm(&a, &w, vnni::Out::I32(acc.as_mut_ptr()), amx);
                assert_eq!(acc, want, "amx {amx}, {m}x{n}x{k}");
            }
            let mut port = vec![0; m * n];
            gemm_portable(&a, &w, &mut port);
            assert_eq!(port, want, "portable kernel, {m}x{n}x{k}");
        }
    }

    #[test]
    fn extreme_values_stay_exact() {
        // All +-127: the largest products, checking the unsigned-shift correction.
        let (m, n, k) = (38, 40, 4608);
        let a = QuantRows { q: (0..m * k).map(|i| if i % 3 == 0 { -127 } else { 127 }).collect(), scale: vec![1.0; m], rows: m, cols: k };
        let w = Int8Weight::from_parts((0..n * k).map(|i| if i % 5 == 0 { 127 } else { -127 }).collect(), vec![1.0; n], n, k, None, QMAX_A8).unwrap();
        let want = scalar_reference(&a, &w);
        assert_eq!(gemm_i32(&a, &w).unwrap(), want);
        for amx in each_kernel(k) {
            let mut acc = vec![0; m * n];
            kernel::gemm(&a, &w, vnni::Out::I32(acc.as_mut_ptr()), amx);
            assert_eq!(acc, want, "amx {amx}");
        }
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
    fn fused_dequantization_matches_the_reference_order() {
        let mut rng = Rng::new(8);
        for &(m, n, k) in &[(1, 5, 3), (7, 37, 100), (101, 200, 1152), (12, 1152, 64)] {
            let a = quantize_rows(&rng.normal_vec(m * k), k, None, QMAX_A8).unwrap();
            let w = Int8Weight::quantize(&rng.normal_vec(n * k), n, k, None, QMAX_A8).unwrap();
            let bias = rng.normal_vec(n);
            for b in [None, Some(&bias[..])] {
                let mut want = vec![0f32; m * n];
                dequantize(&scalar_reference(&a, &w), &a, &w, b, &mut want);
                let mut got = vec![f32::NAN; m * n];
                linear_f32(&a, &w, b, &mut got).unwrap();
                assert_eq!(got, want, "{m}x{n}x{k}, bias {}", b.is_some());
            }
        }
    }

    #[test]
    fn vector_quantization_equals_the_portable_one() {
        let mut rng = Rng::new(9);
        for len in [1, 15, 16, 17, 100, 1152, 4611] {
            let mut x: Vec<f32> = rng.normal_vec(len).iter().map(|v| v * 3.0).collect();
            let s: Vec<f32> = (0..len).map(|i| 0.25 + (i % 9) as f32 * 0.3).collect();
            // Ties at the rounding points, zeros and (for the longer rows) non-finite values.
            x[0] = 0.0;
            if len > 20 {
                (x[3], x[5], x[7]) = (f32::NAN, -0.0, 1e30);
            }
            for qmax in [QMAX_A8, QMAX_A6] {
                for sm in [None, Some(&s[..])] {
                    let (mut q1, mut q2) = (vec![0i8; len], vec![1i8; len]);
                    let s1 = quantize_row(&x, sm, qmax, &mut q1);
                    let s2 = quantize_row_portable(&x, sm, qmax, &mut q2);
                    assert_eq!((s1.to_bits(), &q1), (s2.to_bits(), &q2), "len {len} qmax {qmax} smooth {}", sm.is_some());
                }
            }
        }
        let ties: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.5).chain([127.0]).collect();
        let (mut q1, mut q2) = (vec![0i8; ties.len()], vec![0i8; ties.len()]);
        assert_eq!(quantize_row(&ties, None, QMAX_A8, &mut q1), quantize_row_portable(&ties, None, QMAX_A8, &mut q2));
        assert_eq!(q1, q2);
        // Rows so small that qmax / amax overflows (the general loop), or just does not.
        for amax in [1e-39f32, 1e-37, 4e-37, 1e-30] {
            let x: Vec<f32> = (0..40).map(|i| amax * ((i % 7) as f32 - 3.0) / 3.0).collect();
            for qmax in [QMAX_A8, QMAX_A6] {
                let (mut q1, mut q2) = (vec![0i8; 40], vec![1i8; 40]);
                let (s1, s2) = (quantize_row(&x, None, qmax, &mut q1), quantize_row_portable(&x, None, qmax, &mut q2));
                assert_eq!((s1.to_bits(), &q1), (s2.to_bits(), &q2), "amax {amax} qmax {qmax}");
            }
        }
        for v in [f32::INFINITY, f32::NAN] {
            let x = [1.0, v, -2.0];
            let (mut q1, mut q2) = ([0i8; 3], [0i8; 3]);
            let (s1, s2) = (quantize_row(&x, None, QMAX_A8, &mut q1), quantize_row_portable(&x, None, QMAX_A8, &mut q2));
            assert_eq!((s1.to_bits(), q1), (s2.to_bits(), q2), "{v}");
        }
    }

    /// The block path (16 rows' scales and reciprocals as vector divisions) gives
    /// every row what `quantize_row` gives it: rows of zeros, tiny, huge and
    /// non-finite values, row counts past whole blocks, tails of columns; the
    /// row sums taken on the way.
    #[test]
    fn quantizing_rows_in_blocks_equals_row_by_row() {
        let mut rng = Rng::new(17);
        for (rows, cols) in [(1, 5), (37, 70), (130, 64), (16, 16)] {
            let mut x: Vec<f32> = rng.normal_vec(rows * cols).iter().map(|v| v * 2.0).collect();
            let s: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
            if rows > 10 {
                x[cols..2 * cols].iter_mut().for_each(|v| *v = 0.0);
                x[2 * cols..3 * cols].iter_mut().enumerate().for_each(|(i, v)| *v = 1e-38 * (i % 3) as f32);
                x[3 * cols + 1] = f32::NAN;
                x[4 * cols] = f32::INFINITY;
                x[5 * cols + 2] = 3e38;
            }
            for qmax in [QMAX_A8, QMAX_A6] {
                for sm in [None, Some(&s[..])] {
                    let got = quantize_rows(&x, cols, sm, qmax).unwrap();
                    let produced = quantize_produced_rows(rows, cols, sm, qmax, |r, buf| buf.copy_from_slice(&x[r * cols..][..cols])).unwrap();
                    // The sums taken while quantizing are those of the stored bytes.
                    let (mut q, mut scale, mut sums) = (vec![0i8; rows * cols], vec![0f32; rows], vec![i32::MAX; rows]);
                    quantize_block(&x, cols, sm, qmax, &mut q, &mut scale, Some(&mut sums));
                    let want_sums: Vec<i32> = got.q.chunks(cols).map(|r| r.iter().map(|&v| v as i32).sum()).collect();
                    assert_eq!((&q, &sums), (&got.q, &want_sums), "[{rows}, {cols}] qmax {qmax}: row sums");
                    for r in 0..rows {
                        let mut want = vec![0i8; cols];
                        let sc = quantize_row(&x[r * cols..][..cols], sm, qmax, &mut want);
                        for a in [&got, &produced] {
                            assert_eq!((a.scale[r].to_bits(), &a.q[r * cols..][..cols]), (sc.to_bits(), &want[..]), "[{rows}, {cols}] row {r} qmax {qmax}");
                        }
                    }
                }
            }
        }
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
