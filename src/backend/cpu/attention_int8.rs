//! Attention with int8 Q and K (`AttnSpec::qk_int8`): Q and K quantized per
//! block of `QK_BLOCK` rows of one (group, head), K smoothed by its mean over
//! the group's keys, `S = Q K^T` in exact int32 (AVX-512 VNNI when the CPU has
//! it, plain integer loops otherwise), dequantized to f32 scores, then the
//! softmax and `P V` in f32 as in `attention.rs`.
//!
//! The formulas are those of `kernels/qc_types.h` (`QcQkMeanArgs`,
//! `QcQuantizeQkArgs`, `QcAttentionI8Args`) with the same f32 operations in
//! the same order, so from the same (bf16-representable) inputs this op and
//! the CUDA kernels hold the same int8 values, scales and int32 products.

use super::attention::Tile;
use super::attention_direct::{softmax_values_direct, PAD_SCORE};
use super::gemm::{sgemm, MatRef};
use super::math;
use crate::backend::cuda::abi;
use crate::backend::AttnSpec;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Rows of one (group, head) that share a scale (`QC_QK_BLOCK`); also this op's query tile.
pub const QK_BLOCK: usize = abi::QC_QK_BLOCK as usize;
const QMAX: f32 = 127.0;

/// The head dim padded to the int8 MMA's k-size (32): the row length of the quantized layout.
pub fn padded_head_dim(head_dim: usize) -> usize {
    head_dim.div_ceil(32) * 32
}

/// A quantized operand in the layout of `qc_types.h`: int8 `[groups, heads, rows_pad, dp]`
/// (padding 0) and f32 scales `[groups, heads, ceil(rows_pad / QK_BLOCK)]`. The GPU's
/// `rows_pad` is a multiple of `QK_BLOCK`; the CPU op pads rows only to whole vectors of
/// 16 keys (the same values and scales: a block's scale covers its real rows alone),
/// which for short sequences (a 4-frame temporal group) is a sixteenth of the bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantBlocks {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub rows_pad: usize,
    pub dp: usize,
}

impl QuantBlocks {
    /// The int8 rows of (group `g`, head `h`): `rows_pad` rows of `dp`.
    pub fn rows(&self, g: usize, h: usize, heads: usize) -> &[i8] {
        &self.q[(g * heads + h) * self.rows_pad * self.dp..][..self.rows_pad * self.dp]
    }

    /// The block scales of (group `g`, head `h`).
    pub fn scales(&self, g: usize, h: usize, heads: usize) -> &[f32] {
        let nb = self.rows_pad.div_ceil(QK_BLOCK);
        &self.scale[(g * heads + h) * nb..][..nb]
    }
}

/// Q and K of one attention, quantized (`QcQuantizeQkArgs`), and the key means
/// `[groups, heads, head_dim]` subtracted from K before quantizing.
#[derive(Clone, Debug)]
pub struct QuantQk {
    pub q: QuantBlocks,
    pub k: QuantBlocks,
    pub k_mean: Vec<f32>,
}

/// Row ranges of the queries of every group (consecutive `q_len` rows).
fn query_ranges(spec: &AttnSpec) -> Vec<(usize, usize)> {
    (0..spec.groups).map(|g| (g * spec.q_len, (g + 1) * spec.q_len)).collect()
}

impl QuantQk {
    /// Quantizes `q` `[groups * q_len, heads * head_dim]` and the keys of `k` in `spec.kv_ranges`.
    pub fn new(q: &[f32], k: &[f32], spec: &AttnSpec) -> Self {
        let (h, d) = (spec.heads, spec.head_dim);
        let c = h * d;
        let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
        let k_mean = key_mean(k, c, &spec.kv_ranges, h, d);
        QuantQk {
            q: quantize_blocks(q, c, &query_ranges(spec), h, d, None, spec.q_len.div_ceil(KEYS_PER_VEC) * KEYS_PER_VEC),
            k: quantize_blocks(k, c, &spec.kv_ranges, h, d, Some(&k_mean), max_len.div_ceil(KEYS_PER_VEC) * KEYS_PER_VEC),
            k_mean,
        }
    }
}

/// Mean of every column of every head over each range's rows of `x` (rows `ld` apart),
/// summed per block of `QK_BLOCK` rows and then over the blocks, in order (`QcQkMeanArgs`).
pub fn key_mean(x: &[f32], ld: usize, ranges: &[(usize, usize)], heads: usize, d: usize) -> Vec<f32> {
    let mut mean = vec![0f32; ranges.len() * heads * d];
    mean.par_chunks_mut(d).enumerate().for_each(|(gh, m)| {
        let (g, h) = (gh / heads, gh % heads);
        let (r0, r1) = ranges[g];
        if r1 <= r0 {
            return;
        }
        let mut total = vec![0f32; d];
        for b0 in (r0..r1).step_by(QK_BLOCK) {
            let mut part = vec![0f32; d];
            for r in b0..(b0 + QK_BLOCK).min(r1) {
                part.iter_mut().zip(&x[r * ld + h * d..][..d]).for_each(|(p, v)| *p += v);
            }
            total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
        }
        let n = (r1 - r0) as f32;
        m.iter_mut().zip(&total).for_each(|(m, t)| *m = t / n);
    });
    mean
}

/// Quantizes each range's rows of `x` (rows `ld` apart) per (range, head, block of
/// `QK_BLOCK` rows), after subtracting `mean` `[ranges, heads, d]` when given.
pub fn quantize_blocks(x: &[f32], ld: usize, ranges: &[(usize, usize)], heads: usize, d: usize, mean: Option<&[f32]>, rows_pad: usize) -> QuantBlocks {
    let dp = padded_head_dim(d);
    let nb = rows_pad.div_ceil(QK_BLOCK);
    let mut q = vec![0i8; ranges.len() * heads * rows_pad * dp];
    let mut scale = vec![0f32; ranges.len() * heads * nb];
    if rows_pad == 0 {
        return QuantBlocks { q, scale, rows_pad, dp };
    }
    // One task per (range, head), its blocks in order (the last may be short when
    // `rows_pad` is not a multiple of QK_BLOCK).
    q.par_chunks_mut(rows_pad * dp).zip(scale.par_chunks_mut(nb)).enumerate().for_each(|(gh, (qh, sh))| {
        let (g, h) = (gh / heads, gh % heads);
        let (r0, r1) = ranges[g];
        let m = mean.map(|m| &m[gh * d..][..d]);
        for (b, (qb, s)) in qh.chunks_mut(QK_BLOCK * dp).zip(sh.iter_mut()).enumerate() {
            let first = r0 + b * QK_BLOCK;
            let rows = r1.saturating_sub(first).min(QK_BLOCK);
            *s = quantize_one_block(x, ld, first * ld + h * d, rows, d, dp, m, qb);
        }
    });
    QuantBlocks { q, scale, rows_pad, dp }
}

/// [`quantize_block`], 16 columns at a time where the CPU has AVX-512 (the same values).
#[allow(clippy::too_many_arguments)]
fn quantize_one_block(x: &[f32], ld: usize, off: usize, rows: usize, d: usize, dp: usize, mean: Option<&[f32]>, q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 && rows > 0 && off + (rows - 1) * ld + d <= x.len() && mean.is_none_or(|m| m.len() >= d) && q.len() >= rows * dp {
        // SAFETY: AVX-512 present; every row read lies in `x` (checked), the mean holds `d`
        // values and `q` the `rows` rows of `dp >= d` bytes written.
        return unsafe { quantize_block_avx512(x, ld, off, rows, d, dp, mean, q) };
    }
    quantize_block(x, ld, off, rows, d, dp, mean, q)
}

/// [`quantize_block`] on AVX-512: `max` ignores a NaN as `f32::max` does (`vmaxps`
/// returns its second operand), rounding is to nearest even, and a NaN product is
/// stored as 0 (what `as i8` gives).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn quantize_block_avx512(x: &[f32], ld: usize, off: usize, rows: usize, d: usize, dp: usize, mean: Option<&[f32]>, q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    // Column chunks of 16 and their lane masks, made on the fly (no allocation per block).
    let chunks = || (0..d).step_by(16).map(|c| (c, super::simd::lanes16(d, c)));
    let load = |r: usize, c: usize, m: __mmask16| {
        let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(off + r * ld + c));
        match mean {
            Some(mu) => _mm512_maskz_sub_ps(m, v, _mm512_maskz_loadu_ps(m, mu.as_ptr().add(c))),
            None => v,
        }
    };
    let mut vmax = _mm512_setzero_ps();
    for r in 0..rows {
        for (c, m) in chunks() {
            vmax = _mm512_max_ps(_mm512_abs_ps(load(r, c, m)), vmax);
        }
    }
    // The lanes' maximum, NaN-free: the same value as the scalar loop's.
    let amax = _mm512_reduce_max_ps(vmax);
    let scale = amax / QMAX;
    let inv = if amax > 0.0 { QMAX / amax } else { 0.0 };
    let (vinv, lo, hi) = (_mm512_set1_ps(inv), _mm512_set1_ps(-QMAX), _mm512_set1_ps(QMAX));
    for r in 0..rows {
        for (c, m) in chunks() {
            let v = _mm512_mul_ps(load(r, c, m), vinv);
            let rounded = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let clamped = _mm512_min_ps(_mm512_max_ps(rounded, lo), hi);
            let ints = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), clamped);
            _mm_mask_storeu_epi8(q.as_mut_ptr().add(r * dp + c) as *mut i8, m, _mm512_cvtepi32_epi8(ints));
        }
    }
    scale
}

super::simd::multiversion! {
/// One block: `rows` rows of `d` values at `x[off + r * ld ..]` into `q` (rows `dp` apart,
/// the rest of `q` left 0); returns the scale. Multiversioned for `round_ties_even`
/// (a libm call on baseline x86-64).
#[allow(clippy::too_many_arguments)]
fn quantize_block(x: &[f32], ld: usize, off: usize, rows: usize, d: usize, dp: usize, mean: Option<&[f32]>, q: &mut [i8]) -> f32 {
    let value = |r: usize, c: usize| match mean {
        Some(m) => x[off + r * ld + c] - m[c],
        None => x[off + r * ld + c],
    };
    let mut amax = 0f32;
    for r in 0..rows {
        for c in 0..d {
            amax = amax.max(value(r, c).abs());
        }
    }
    let scale = amax / QMAX;
    let inv = if amax > 0.0 { QMAX / amax } else { 0.0 };
    for r in 0..rows {
        for c in 0..d {
            q[r * dp + c] = (value(r, c) * inv).round_ties_even().clamp(-QMAX, QMAX) as i8;
        }
    }
    scale
}
}

/// `S = Q K^T` of every (group, head) in exact int32, `[groups, heads, q_len, max kv length]`
/// (entries past a group's keys 0): the integer products [`attention`] uses, for tests.
pub fn scores_i32(q: &Tensor, k: &Tensor, spec: &AttnSpec) -> Result<Vec<i32>> {
    spec.check(q, k, k, None)?;
    let qk = QuantQk::new(q.f32()?, k.f32()?, spec);
    let lens: Vec<usize> = spec.kv_ranges.iter().map(|r| r.1 - r.0).collect();
    let keys = Keys::new(&qk.k, spec.heads, &lens);
    let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
    let (h, lq) = (spec.heads, spec.q_len);
    let mut out = vec![0i32; spec.groups * h * lq * max_len];
    if out.is_empty() {
        return Ok(out);
    }
    out.par_chunks_mut(lq * max_len).enumerate().for_each(|(gh, o)| {
        let (g, hi) = (gh / h, gh % h);
        let lk = spec.kv_ranges[g].1 - spec.kv_ranges[g].0;
        let qr = qk.q.rows(g, hi, h);
        let mut s = Vec::new();
        for i0 in (0..lq).step_by(QK_BLOCK) {
            let tq = QK_BLOCK.min(lq - i0);
            keys.scores(gh, lk, &qr[i0 * qk.q.dp..][..tq * qk.q.dp], tq, &mut s);
            for r in 0..tq {
                o[(i0 + r) * max_len..][..lk].copy_from_slice(&s[r * lk..][..lk]);
            }
        }
    });
    Ok(out)
}

/// Up to this many keys and this head dim the softmax and `P V` are the float direct
/// kernel's (row blocks in registers); above either, row softmax and the GEMM (as in
/// `attention.rs`).
const DIRECT_MAX_KEYS: usize = 128;
const DIRECT_MAX_HEAD_DIM: usize = 32;

/// Softmax attention with int8 Q and K (see the module doc); `spec.qk_int8` routes here.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>) -> Result<Tensor> {
    spec.check(q, k, v, None)?;
    ensure!(bias.is_none(), "attention: qk_int8 takes no score bias (use the float attention)");
    let (g, lq, h, d) = (spec.groups, spec.q_len, spec.heads, spec.head_dim);
    let c = h * d;
    let qk = QuantQk::new(q.f32()?, k.f32()?, spec);
    let lens: Vec<usize> = spec.kv_ranges.iter().map(|r| r.1 - r.0).collect();
    let keys = Keys::new(&qk.k, h, &lens);
    let vs = v.f32()?;
    let mut out = vec![0f32; g * lq * c];
    let tiles = lq.div_ceil(QK_BLOCK);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..g * h * tiles).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(s_i32, p), task| {
            let ptr = ptr;
            let (gh, ti) = (task / tiles, task % tiles);
            let (gi, hi) = (gh / h, gh % h);
            let (k0, k1) = spec.kv_ranges[gi];
            let lk = k1 - k0;
            if lk == 0 {
                return; // no keys: the output rows stay zero
            }
            let i0 = ti * QK_BLOCK;
            let tq = QK_BLOCK.min(lq - i0);
            keys.scores(gh, lk, &qk.q.rows(gi, hi, h)[i0 * qk.q.dp..][..tq * qk.q.dp], tq, s_i32);
            // f = (q_scale * scale) * k_scale per key block, then s = (float) S * f.
            let qf = qk.q.scales(gi, hi, h)[ti] * spec.scale;
            let off = (gi * lq + i0) * c + hi * d;
            // SAFETY: this task alone writes rows i0..i0+tq, columns hi*d..(hi+1)*d of group gi.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(off), (tq - 1) * c + d) };
            let v_head = &vs[k0 * c + hi * d..];
            let direct = lk <= DIRECT_MAX_KEYS && d <= DIRECT_MAX_HEAD_DIM;
            // The direct kernel takes rows padded to whole vectors of 16 keys.
            let lkp = if direct { lk.div_ceil(16) * 16 } else { lk };
            p.clear();
            p.resize(tq * lkp, PAD_SCORE);
            for (row, srow) in p.chunks_mut(lkp).zip(s_i32.chunks(lk)) {
                for ((rb, sb), &ks) in row[..lk].chunks_mut(QK_BLOCK).zip(srow.chunks(QK_BLOCK)).zip(qk.k.scales(gi, hi, h)) {
                    let f = qf * ks;
                    rb.iter_mut().zip(sb).for_each(|(x, &v)| *x = v as f32 * f);
                }
            }
            if direct {
                let tile = Tile { q: &[], k: &[], v: v_head, stride: c, tq, lk, d, scale: 1.0 };
                softmax_values_direct(&tile, p, lkp, dst);
            } else {
                let mut inv = [0f32; QK_BLOCK];
                for (r, row) in p.chunks_mut(lk).enumerate() {
                    inv[r] = 1.0 / math::softmax_numerators(row);
                }
                sgemm(tq, d, lk, MatRef { data: p, rs: lk, cs: 1 }, MatRef { data: v_head, rs: c, cs: 1 }, dst, c, false, 1);
                for (r, &iv) in inv.iter().enumerate().take(tq) {
                    dst[r * c..r * c + d].iter_mut().for_each(|x| *x *= iv);
                }
            }
        },
    );
    Tensor::from_f32(&[g * lq, c], out)
}

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Keys per VNNI block: one 512-bit register of int32 scores.
const KEYS_PER_VEC: usize = 16;

/// The quantized keys, plus (when the CPU has VNNI) every (group, head)'s keys in the
/// layout the VNNI kernel reads, built once per call: blocks of 16 keys x 4 consecutive
/// columns (64 bytes, one register), and each key's sum for the unsigned-shift
/// correction (`dpbusd` multiplies `u8 x i8`).
struct Keys<'a> {
    k: &'a QuantBlocks,
    #[cfg(target_arch = "x86_64")]
    vnni: Option<(Vec<i8>, Vec<i32>)>,
}

impl<'a> Keys<'a> {
    /// `lens[g]`: the number of keys of group g (rows past it are not packed).
    fn new(k: &'a QuantBlocks, heads: usize, lens: &[usize]) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let vnni = crate::quant::vnni::available().then(|| {
                let (rows, dp, k4) = (k.rows_pad, k.dp, k.dp / 4);
                let mut packed = vec![0i8; k.q.len()];
                let mut sums = vec![0i32; k.q.len() / dp];
                packed.par_chunks_mut(rows * dp).zip(sums.par_chunks_mut(rows)).zip(k.q.par_chunks(rows * dp)).enumerate().for_each(|(gh, ((pk, sm), src))| {
                    let used = lens[gh / heads].div_ceil(KEYS_PER_VEC);
                    // Block b of 16 keys: for each group of 4 columns, 16 keys' 4 bytes in key order.
                    for (b, (dst, keys)) in pk.chunks_mut(KEYS_PER_VEC * dp).zip(src.chunks(KEYS_PER_VEC * dp)).take(used).enumerate() {
                        for (l, key) in keys.chunks(dp).enumerate() {
                            for kk in 0..k4 {
                                dst[(kk * KEYS_PER_VEC + l) * 4..][..4].copy_from_slice(&key[kk * 4..][..4]);
                            }
                            sm[b * KEYS_PER_VEC + l] = key.iter().map(|&v| v as i32).sum();
                        }
                    }
                });
                (packed, sums)
            });
            Keys { k, vnni }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Keys { k }
    }

    /// `s[r * lk + j] = q_r . k_j` in exact int32 for the first `lk` keys of (group, head)
    /// `gh` and the `tq` query rows `q` (rows `dp` apart).
    fn scores(&self, gh: usize, lk: usize, q: &[i8], tq: usize, s: &mut Vec<i32>) {
        let (rows, dp) = (self.k.rows_pad, self.k.dp);
        s.clear();
        s.resize(tq * lk, 0);
        #[cfg(target_arch = "x86_64")]
        if let Some((packed, sums)) = &self.vnni {
            // SAFETY: vnni::available() checked the instruction sets; rows_pad (a multiple
            // of 16) covers lk rounded up to whole 16-key blocks.
            unsafe { vnni::scores(q, tq, dp, &packed[gh * rows * dp..][..rows * dp], &sums[gh * rows..][..rows], lk, s) };
            return;
        }
        scores_portable(q, tq, &self.k.q[gh * rows * dp..][..rows * dp], lk, dp, s);
    }
}

/// The plain integer loops (vectorized by the compiler).
fn scores_portable(q: &[i8], tq: usize, k: &[i8], lk: usize, dp: usize, s: &mut [i32]) {
    for r in 0..tq {
        let qr = &q[r * dp..][..dp];
        for (j, o) in s[r * lk..][..lk].iter_mut().enumerate() {
            *o = qr.iter().zip(&k[j * dp..][..dp]).map(|(&a, &b)| a as i32 * b as i32).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::KEYS_PER_VEC as NB;
    use std::arch::x86_64::*;

    /// Query rows and 16-key blocks per micro-tile (16 accumulators + 4 key registers).
    const MR: usize = 4;
    const NC: usize = 4;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn scores(q: &[i8], tq: usize, dp: usize, packed: &[i8], sums: &[i32], lk: usize, s: &mut [i32]) {
        // Queries shifted to unsigned (`q + 128`); the key sums undo the shift.
        let qu: Vec<u8> = q[..tq * dp].iter().map(|&v| (v as i16 + 128) as u8).collect();
        let blocks = lk.div_ceil(NB);
        let mut r = 0;
        while r < tq {
            let mr = MR.min(tq - r);
            let mut b = 0;
            while b < blocks {
                let nc = NC.min(blocks - b);
                match (mr, nc) {
                    (MR, NC) => micro::<MR, NC>(&qu, dp, packed, sums, r, b, lk, s),
                    (MR, c) => (0..c).for_each(|i| micro::<MR, 1>(&qu, dp, packed, sums, r, b + i, lk, s)),
                    (rows, c) => (0..rows).for_each(|ri| (0..c).for_each(|i| micro::<1, 1>(&qu, dp, packed, sums, r + ri, b + i, lk, s))),
                }
                b += nc;
            }
            r += mr;
        }
    }

    /// `R` query rows x `C` blocks of 16 keys over the whole padded head dim.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const R: usize, const C: usize>(qu: &[u8], dp: usize, packed: &[i8], sums: &[i32], r: usize, b: usize, lk: usize, s: &mut [i32]) {
        let k4 = dp / 4;
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let (kp, qp) = (packed.as_ptr(), qu.as_ptr());
        for kk in 0..k4 {
            let mut kv = [_mm512_setzero_si512(); C];
            for (c, v) in kv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(kp.add(((b + c) * k4 + kk) * NB * 4) as *const _);
            }
            for (ri, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32((qp.add((r + ri) * dp + kk * 4) as *const i32).read_unaligned());
                for (c, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbusd_epi32(*a, x, kv[c]);
                }
            }
        }
        for (ri, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let j0 = (b + c) * NB;
                let corr = _mm512_slli_epi32::<7>(_mm512_loadu_si512(sums.as_ptr().add(j0) as *const _));
                let v = _mm512_sub_epi32(*a, corr);
                let dst = s.as_mut_ptr().add((r + ri) * lk + j0);
                let n = lk - j0;
                if n >= NB {
                    _mm512_storeu_si512(dst as *mut _, v);
                } else {
                    _mm512_mask_storeu_epi32(dst, (1u16 << n) - 1, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The scalar reference of the integer products, from the quantized blocks.
    fn reference_scores(qk: &QuantQk, spec: &AttnSpec) -> Vec<i32> {
        let (h, lq, d) = (spec.heads, spec.q_len, spec.head_dim);
        let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
        let mut out = vec![0i32; spec.groups * h * lq * max_len];
        for g in 0..spec.groups {
            let lk = spec.kv_ranges[g].1 - spec.kv_ranges[g].0;
            for hi in 0..h {
                let (qr, kr) = (qk.q.rows(g, hi, h), qk.k.rows(g, hi, h));
                for i in 0..lq {
                    for j in 0..lk {
                        let mut acc = 0i64;
                        for c in 0..d {
                            acc += qr[i * qk.q.dp + c] as i64 * kr[j * qk.k.dp + c] as i64;
                        }
                        out[((g * h + hi) * lq + i) * max_len + j] = acc as i32;
                    }
                }
            }
        }
        out
    }

    fn random(rng: &mut Rng, rows: usize, cols: usize, offset: f32) -> Tensor {
        let v: Vec<f32> = rng.normal_vec(rows * cols).into_iter().enumerate().map(|(i, x)| x + offset * ((i % cols) as f32 * 0.37).sin()).collect();
        Tensor::from_f32(&[rows, cols], v).unwrap()
    }

    fn cases() -> Vec<AttnSpec> {
        let mut v = vec![
            AttnSpec::dense(3, 5, 5, 2, 8),
            AttnSpec::dense(2, 130, 130, 3, 16),
            AttnSpec::dense(1, 70, 9, 4, 72),
            AttnSpec::dense(2, 65, 200, 2, 72),
            AttnSpec::ragged(67, 2, 72, AttnSpec::ranges_from_offsets(&[0, 5, 17, 17, 100])),
            AttnSpec::ragged(40, 2, 40, vec![(3, 90), (0, 30)]),
            AttnSpec::dense(1, 3, 1, 1, 128),
            // The direct kernel's shapes (the demo's spatial and cross attention),
            // with a group without keys.
            AttnSpec::dense(2, 64, 64, 2, 16),
            AttnSpec::ragged(21, 2, 32, AttnSpec::ranges_from_offsets(&[0, 12, 12, 40])),
        ];
        v.iter_mut().for_each(|s| s.qk_int8 = true);
        v
    }

    /// The AVX-512 block quantizer gives the scalar one's bytes and scale, with
    /// NaN, infinities, exact halves (ties to even) and a mean, at several shapes.
    #[test]
    fn vector_block_quantizer_equals_the_scalar_one() {
        if crate::backend::cpu::simd::level() != crate::backend::cpu::simd::Level::Avx512 {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        let mut rng = Rng::new(9);
        for (rows, d, ld) in [(1, 8, 8), (4, 16, 64), (64, 16, 64), (37, 72, 144), (5, 128, 130), (64, 40, 40)] {
            for special in 0..3 {
                let mut x = rng.normal_vec((rows - 1) * ld + d + 3);
                match special {
                    1 => {
                        // The block starts at x[2].
                        x[3] = f32::NAN;
                        x[4] = 127.0 / 2.0;
                        x[2 + d / 2] = -2.5;
                    }
                    2 => x[2 + d - 1] = f32::INFINITY,
                    _ => {}
                }
                let mean = rng.normal_vec(d);
                for m in [None, Some(&mean[..])] {
                    let dp = d.div_ceil(32) * 32;
                    let (mut qs, mut qv) = (vec![0i8; rows * dp], vec![0i8; rows * dp]);
                    let want = quantize_block(&x, ld, 2, rows, d, dp, m, &mut qs);
                    let got = quantize_one_block(&x, ld, 2, rows, d, dp, m, &mut qv);
                    assert_eq!((got.to_bits(), &qv), (want.to_bits(), &qs), "rows {rows}, d {d}, case {special}");
                }
            }
        }
    }

    /// The CPU op's rows padded to 16 hold the same int8 values and block scales
    /// as the GPU's layout padded to whole blocks of `QK_BLOCK` rows.
    #[test]
    fn short_padding_keeps_the_block_layouts_values() {
        let mut rng = Rng::new(8);
        for spec in cases() {
            let (h, d) = (spec.heads, spec.head_dim);
            let c = h * d;
            let nk = spec.kv_ranges.iter().map(|r| r.1).max().unwrap();
            let q = random(&mut rng, spec.groups * spec.q_len, c, 0.0);
            let k = random(&mut rng, nk, c, 3.0);
            let qk = QuantQk::new(q.f32().unwrap(), k.f32().unwrap(), &spec);
            let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap();
            let gpu_q = quantize_blocks(q.f32().unwrap(), c, &query_ranges(&spec), h, d, None, spec.q_len.div_ceil(QK_BLOCK) * QK_BLOCK);
            let gpu_k = quantize_blocks(k.f32().unwrap(), c, &spec.kv_ranges, h, d, Some(&qk.k_mean), max_len.div_ceil(QK_BLOCK) * QK_BLOCK);
            for (cpu, gpu, rows) in [(&qk.q, &gpu_q, spec.q_len), (&qk.k, &gpu_k, max_len)] {
                assert!(cpu.rows_pad % 16 == 0 && cpu.rows_pad < rows + 16, "{spec:?}");
                for g in 0..spec.groups {
                    for hi in 0..h {
                        let n = rows * cpu.dp;
                        assert_eq!(cpu.rows(g, hi, h)[..n], gpu.rows(g, hi, h)[..n], "{spec:?}");
                        assert!(cpu.rows(g, hi, h)[n..].iter().all(|&v| v == 0));
                        assert_eq!(cpu.scales(g, hi, h), gpu.scales(g, hi, h), "{spec:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn integer_scores_are_exact() {
        let mut rng = Rng::new(5);
        for spec in cases() {
            let c = spec.heads * spec.head_dim;
            let nk = spec.kv_ranges.iter().map(|r| r.1).max().unwrap();
            let q = random(&mut rng, spec.groups * spec.q_len, c, 0.0);
            let k = random(&mut rng, nk, c, 3.0);
            let qk = QuantQk::new(q.f32().unwrap(), k.f32().unwrap(), &spec);
            assert_eq!(scores_i32(&q, &k, &spec).unwrap(), reference_scores(&qk, &spec), "{spec:?}");
            let (h, d) = (spec.heads, spec.head_dim);
            let mut port = Vec::new();
            for g in 0..spec.groups {
                let lk = spec.kv_ranges[g].1 - spec.kv_ranges[g].0;
                for hi in 0..h {
                    let (qr, kr) = (qk.q.rows(g, hi, h), qk.k.rows(g, hi, h));
                    port.resize(spec.q_len * lk, 0);
                    scores_portable(qr, spec.q_len, kr, lk, qk.q.dp, &mut port);
                    for i in 0..spec.q_len {
                        let want: Vec<i32> = (0..lk).map(|j| (0..d).map(|cc| qr[i * qk.q.dp + cc] as i32 * kr[j * qk.k.dp + cc] as i32).sum()).collect();
                        assert_eq!(&port[i * lk..][..lk], &want[..], "portable kernel, {spec:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_values_stay_exact() {
        // Every value +-127 at the largest head dim: the largest products, and the
        // unsigned-shift correction of the VNNI kernel at its extremes.
        let spec = AttnSpec { qk_int8: true, ..AttnSpec::dense(1, 70, 70, 1, 128) };
        let q = Tensor::from_f32(&[70, 128], (0..70 * 128).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect()).unwrap();
        let k = Tensor::from_f32(&[70, 128], (0..70 * 128).map(|i| if i % 5 == 0 { 1.0 } else { -1.0 } * if i % 128 == 0 { 1.0 } else { 2.0 }).collect()).unwrap();
        let qk = QuantQk::new(q.f32().unwrap(), k.f32().unwrap(), &spec);
        assert!(qk.q.q.iter().all(|&v| v == 127 || v == -127 || v == 0));
        assert_eq!(scores_i32(&q, &k, &spec).unwrap(), reference_scores(&qk, &spec));
    }

    #[test]
    fn quantization_follows_the_documented_formulas() {
        // One group of 3 keys, one head of dim 2: the mean, then one block scale.
        let x = [1.0f32, 10.0, 3.0, 10.0, 5.0, 10.5];
        let mean = key_mean(&x, 2, &[(0, 3)], 1, 2);
        assert_eq!(mean, vec![3.0, 30.5 / 3.0]);
        let b = quantize_blocks(&x, 2, &[(0, 3)], 1, 2, Some(&mean), QK_BLOCK);
        assert_eq!((b.dp, b.rows_pad), (32, QK_BLOCK));
        let amax = 2.0f32;
        assert_eq!(b.scale, vec![amax / 127.0]);
        let inv = 127.0 / amax;
        let want = |v: f32| (v * inv).round_ties_even() as i8;
        assert_eq!(&b.q[..2], &[want(1.0 - 3.0), want(10.0 - mean[1])]);
        assert_eq!(&b.q[32..34], &[0, want(10.0 - mean[1])]);
        assert_eq!(&b.q[64..66], &[127, want(10.5 - mean[1])]);
        assert!(b.q[2..32].iter().chain(&b.q[96..]).all(|&v| v == 0), "padding must be 0");
        // An empty range: scale 0, all zeros, mean 0.
        let e = quantize_blocks(&x, 2, &[(1, 1)], 1, 2, None, QK_BLOCK);
        assert!(e.scale == vec![0.0] && e.q.iter().all(|&v| v == 0));
        assert_eq!(key_mean(&x, 2, &[(1, 1)], 1, 2), vec![0.0, 0.0]);
    }

    #[test]
    fn close_to_float_attention() {
        let mut rng = Rng::new(9);
        for spec in cases() {
            let c = spec.heads * spec.head_dim;
            let nk = spec.kv_ranges.iter().map(|r| r.1).max().unwrap();
            let q = random(&mut rng, spec.groups * spec.q_len, c, 0.0);
            // Keys with a large common offset: what the smoothing is for.
            let k = random(&mut rng, nk, c, 4.0);
            let v = random(&mut rng, nk, c, 0.0);
            let got = attention(&q, &k, &v, &spec, None).unwrap();
            let want = super::super::attention::attention(&q, &k, &v, &AttnSpec { qk_int8: false, ..spec.clone() }, None).unwrap();
            let err = crate::tensor::rel_l2(got.f32().unwrap(), want.f32().unwrap());
            assert!(err < 2e-2, "{spec:?}: rel err {err}");
        }
        let spec = AttnSpec { qk_int8: true, ..AttnSpec::dense(1, 4, 4, 1, 8) };
        let t = Tensor::from_f32(&[4, 8], vec![0.5; 32]).unwrap();
        let bias = Tensor::from_f32(&[1, 4, 4], vec![0.0; 16]).unwrap();
        assert!(attention(&t, &t, &t, &spec, Some(&bias)).is_err(), "a score bias must be refused");
    }
}
