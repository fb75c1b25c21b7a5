//! Attention over few keys and a small head dim, computed directly: `K`
//! transposed once per tile (zero-padded to whole 16-lane vectors), then blocks
//! of 8, 4 or 1 query rows, so that each loaded key or value vector feeds
//! independent accumulators held in registers (one row at a time, every FMA
//! waits on the previous one).
//!
//! The two products run as AVX-512 intrinsics where the CPU has it, else as
//! plain loops compiled for AVX2 + FMA or baseline x86-64. The loops are the
//! reference; they are not the AVX-512 path because LLVM's vectorizer turned
//! the 8-row block into gathers across rows there (16x slower, measured).

use super::attention::{BiasRows, Tile};
use super::math;
use super::simd::multiversion;

const LANES: usize = 16;

/// The two products of a block of `N` query rows starting at `r0`.
trait Products {
    /// `scores[n * lkp + j] = scale * q[r0 + n] . k[j]` for every padded key
    /// (`kt` is `K` transposed, `[d, lkp]`).
    fn scores<const N: usize>(t: &Tile, kt: &[f32], lkp: usize, r0: usize, scores: &mut [f32]);
    /// `dst[r0 + n][d0..d0 + 16] = inv[n] * sum_j scores[n * lkp + j] v[j][d0..d0 + 16]`.
    fn weighted_values<const N: usize>(t: &Tile, scores: &[f32], lkp: usize, inv: &[f32; N], r0: usize, d0: usize, dst: &mut [f32]);
    /// The largest and the total of 16 lanes.
    fn lanes_max(v: &[f32; LANES]) -> f32;
    fn lanes_sum(v: &[f32; LANES]) -> f32;
}

/// Plain loops over 16-element arrays, which LLVM keeps in vector registers.
struct Loops;

impl Products for Loops {
    #[inline(always)]
    fn scores<const N: usize>(t: &Tile, kt: &[f32], lkp: usize, r0: usize, scores: &mut [f32]) {
        let c = t.stride;
        for j0 in (0..lkp).step_by(LANES) {
            let mut acc = [[0f32; LANES]; N];
            for dd in 0..t.d {
                let kr = &kt[dd * lkp + j0..][..LANES];
                for (n, a) in acc.iter_mut().enumerate() {
                    let qv = t.q[(r0 + n) * c + dd];
                    for i in 0..LANES {
                        a[i] = qv.mul_add(kr[i], a[i]);
                    }
                }
            }
            for (n, a) in acc.iter().enumerate() {
                for (s, a) in scores[n * lkp + j0..][..LANES].iter_mut().zip(a) {
                    *s = a * t.scale;
                }
            }
        }
    }

    #[inline(always)]
    fn weighted_values<const N: usize>(t: &Tile, scores: &[f32], lkp: usize, inv: &[f32; N], r0: usize, d0: usize, dst: &mut [f32]) {
        let c = t.stride;
        let mut acc = [[0f32; LANES]; N];
        for j in 0..t.lk {
            let vr = &t.v[j * c + d0..][..LANES];
            for (n, a) in acc.iter_mut().enumerate() {
                let p = scores[n * lkp + j];
                for i in 0..LANES {
                    a[i] = p.mul_add(vr[i], a[i]);
                }
            }
        }
        for (n, a) in acc.iter().enumerate() {
            let o = &mut dst[(r0 + n) * c + d0..][..LANES];
            for i in 0..LANES {
                o[i] = a[i] * inv[n];
            }
        }
    }

    #[inline(always)]
    fn lanes_max(v: &[f32; LANES]) -> f32 {
        math::reduce16(*v, f32::max)
    }

    #[inline(always)]
    fn lanes_sum(v: &[f32; LANES]) -> f32 {
        math::reduce16(*v, |a, b| a + b)
    }
}

/// AVX-512 intrinsics; only called from [`attend_direct_avx512`].
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Products for Avx512 {
    #[inline(always)]
    fn scores<const N: usize>(t: &Tile, kt: &[f32], lkp: usize, r0: usize, scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let (c, d) = (t.stride, t.d);
        // The pointer reads below stay inside these slices.
        assert!(kt.len() >= d * lkp && scores.len() >= N * lkp && t.q.len() >= (r0 + N - 1) * c + d);
        // SAFETY: AVX-512F is enabled in the only caller; offsets are checked above.
        unsafe {
            let scale = _mm512_set1_ps(t.scale);
            for j0 in (0..lkp).step_by(LANES) {
                let mut acc = [_mm512_setzero_ps(); N];
                for dd in 0..d {
                    let k = _mm512_loadu_ps(kt.as_ptr().add(dd * lkp + j0));
                    for (n, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*t.q.get_unchecked((r0 + n) * c + dd)), k, *a);
                    }
                }
                for (n, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(scores.as_mut_ptr().add(n * lkp + j0), _mm512_mul_ps(*a, scale));
                }
            }
        }
    }

    #[inline(always)]
    fn weighted_values<const N: usize>(t: &Tile, scores: &[f32], lkp: usize, inv: &[f32; N], r0: usize, d0: usize, dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let (c, lk) = (t.stride, t.lk);
        assert!(scores.len() >= N * lkp && lk <= lkp && t.v.len() >= (lk - 1) * c + d0 + LANES && dst.len() >= (r0 + N - 1) * c + d0 + LANES);
        // SAFETY: AVX-512F is enabled in the only caller; offsets are checked above.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); N];
            for j in 0..lk {
                let v = _mm512_loadu_ps(t.v.as_ptr().add(j * c + d0));
                for (n, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*scores.get_unchecked(n * lkp + j)), v, *a);
                }
            }
            for (n, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add((r0 + n) * c + d0), _mm512_mul_ps(*a, _mm512_set1_ps(inv[n])));
            }
        }
    }

    #[inline(always)]
    fn lanes_max(v: &[f32; LANES]) -> f32 {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512F is enabled in the only caller; `v` holds 16 lanes.
        unsafe { _mm512_reduce_max_ps(_mm512_loadu_ps(v.as_ptr())) }
    }

    #[inline(always)]
    fn lanes_sum(v: &[f32; LANES]) -> f32 {
        use std::arch::x86_64::*;
        // SAFETY: as in `lanes_max`.
        unsafe { _mm512_reduce_add_ps(_mm512_loadu_ps(v.as_ptr())) }
    }
}

/// Softmax attention of one tile, scores computed directly (see the module doc).
pub(super) fn attend_direct(t: &Tile, bias: BiasRows, dst: &mut [f32], scratch: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512F.
        return unsafe { attend_direct_avx512(t, bias, dst, scratch) };
    }
    attend_direct_loops(t, bias, dst, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn attend_direct_avx512(t: &Tile, bias: BiasRows, dst: &mut [f32], scratch: &mut Vec<f32>) {
    attend::<Avx512>(t, bias, dst, scratch)
}

/// The softmax and `P V` of a tile whose scores are given (`t.q` and `t.k` are
/// not read): `scores` holds the `t.tq` rows, each padded with [`PAD_SCORE`] to
/// `lkp` (a multiple of 16) and overwritten. The attention with int8 Q and K
/// computes its scores from int32 products and ends here.
pub(super) fn softmax_values_direct(t: &Tile, scores: &mut [f32], lkp: usize, dst: &mut [f32]) {
    assert!(lkp.is_multiple_of(LANES) && lkp >= t.lk && scores.len() >= t.tq * lkp);
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512F.
        return unsafe { softmax_values_avx512(t, scores, lkp, dst) };
    }
    softmax_values_loops(t, scores, lkp, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn softmax_values_avx512(t: &Tile, scores: &mut [f32], lkp: usize, dst: &mut [f32]) {
    softmax_values_blocks::<Avx512>(t, scores, lkp, dst)
}

multiversion! {
fn softmax_values_loops(t: &Tile, scores: &mut [f32], lkp: usize, dst: &mut [f32]) {
    softmax_values_blocks::<Loops>(t, scores, lkp, dst)
}
}

/// [`softmax_values`] over the tile's rows in blocks of 8, 4 and 1.
#[inline(always)]
fn softmax_values_blocks<P: Products>(t: &Tile, scores: &mut [f32], lkp: usize, dst: &mut [f32]) {
    let mut r = 0;
    while r + 8 <= t.tq {
        softmax_values::<P, 8>(t, &mut scores[r * lkp..], lkp, r, dst);
        r += 8;
    }
    if r + 4 <= t.tq {
        softmax_values::<P, 4>(t, &mut scores[r * lkp..], lkp, r, dst);
        r += 4;
    }
    while r < t.tq {
        softmax_values::<P, 1>(t, &mut scores[r * lkp..], lkp, r, dst);
        r += 1;
    }
}

multiversion! {
fn attend_direct_loops(t: &Tile, bias: BiasRows, dst: &mut [f32], scratch: &mut Vec<f32>) {
    attend::<Loops>(t, bias, dst, scratch)
}
}

#[inline(always)]
fn attend<P: Products>(t: &Tile, bias: BiasRows, dst: &mut [f32], scratch: &mut Vec<f32>) {
    let (lk, d, c) = (t.lk, t.d, t.stride);
    let lkp = lk.div_ceil(LANES) * LANES;
    scratch.clear();
    scratch.resize(d * lkp + 8 * lkp, 0.0);
    let (kt, scores) = scratch.split_at_mut(d * lkp);
    // Row by row of `kt`: contiguous stores, strided loads (the other order's
    // scattered stores were 14% of the tile).
    for (dd, kt_row) in kt.chunks_exact_mut(lkp).enumerate() {
        for (j, kv) in kt_row[..lk].iter_mut().enumerate() {
            *kv = t.k[j * c + dd];
        }
    }
    let mut r = 0;
    while r + 8 <= t.tq {
        rows::<P, 8>(t, bias, dst, kt, scores, r);
        r += 8;
    }
    if r + 4 <= t.tq {
        rows::<P, 4>(t, bias, dst, kt, scores, r);
        r += 4;
    }
    while r < t.tq {
        rows::<P, 1>(t, bias, dst, kt, scores, r);
        r += 1;
    }
}

/// Rows `r0..r0 + N`: scaled scores, bias, softmax, then `P V` into `dst`.
#[inline(always)]
fn rows<P: Products, const N: usize>(t: &Tile, bias: BiasRows, dst: &mut [f32], kt: &[f32], scores: &mut [f32], r0: usize) {
    let (lk, d) = (t.lk, t.d);
    let lkp = kt.len() / d;
    P::scores::<N>(t, kt, lkp, r0, scores);
    for n in 0..N {
        let row = &mut scores[n * lkp..][..lkp];
        if let Some((bv, bl)) = bias {
            row.iter_mut().zip(&bv[(r0 + n) * bl..][..lk]).for_each(|(x, b)| *x += b);
        }
        // Padding keys score far below any real one: their exponentials are 0, and
        // the softmax runs over whole vectors.
        row[lk..].iter_mut().for_each(|x| *x = PAD_SCORE);
    }
    softmax_values::<P, N>(t, scores, lkp, r0, dst);
}

/// A padding key's score: its exponential is 0.
pub(super) const PAD_SCORE: f32 = -1e30;

/// Rows `r0..r0 + N` from their scores (`scores[n * lkp..]`, padded with
/// [`PAD_SCORE`] to `lkp`, a multiple of 16): softmax, then `P V` into `dst`.
#[inline(always)]
fn softmax_values<P: Products, const N: usize>(t: &Tile, scores: &mut [f32], lkp: usize, r0: usize, dst: &mut [f32]) {
    let (lk, d, c) = (t.lk, t.d, t.stride);
    let inv = softmax_rows::<P, N>(&mut scores[..N * lkp], lkp);
    let full_d = d / LANES * LANES;
    for d0 in (0..full_d).step_by(LANES) {
        P::weighted_values::<N>(t, scores, lkp, &inv, r0, d0, dst);
    }
    for n in 0..N {
        let p = &scores[n * lkp..][..lk];
        for dd in full_d..d {
            dst[(r0 + n) * c + dd] = p.iter().enumerate().map(|(j, &p)| p * t.v[j * c + dd]).sum::<f32>() * inv[n];
        }
    }
}

/// In place `row = exp(row - max(row))` for the `N` rows of `scores` (each `lkp`
/// long, a multiple of [`LANES`]); returns each row's `1 / sum`. The rows'
/// maxima, exponentials and sums are interleaved: one row at a time, each phase
/// waits on the last (the exponential is a chain of ~20 dependent vector ops).
#[inline(always)]
fn softmax_rows<P: Products, const N: usize>(scores: &mut [f32], lkp: usize) -> [f32; N] {
    let mut mx = [[f32::NEG_INFINITY; LANES]; N];
    for j0 in (0..lkp).step_by(LANES) {
        for (n, m) in mx.iter_mut().enumerate() {
            for (m, &x) in m.iter_mut().zip(&scores[n * lkp + j0..][..LANES]) {
                *m = m.max(x);
            }
        }
    }
    let mut row_max = [0f32; N];
    for (m, lanes) in row_max.iter_mut().zip(&mx) {
        *m = P::lanes_max(lanes);
    }
    for (n, row) in scores.chunks_exact_mut(lkp).enumerate() {
        for x in row.iter_mut() {
            *x = math::exp(*x - row_max[n]);
        }
    }
    let mut sums = [[0f32; LANES]; N];
    for j0 in (0..lkp).step_by(LANES) {
        for (n, s) in sums.iter_mut().enumerate() {
            for (s, &x) in s.iter_mut().zip(&scores[n * lkp + j0..][..LANES]) {
                *s += x;
            }
        }
    }
    // Not `array::map`: its closure stays an outlined call per row, 6% of a demo
    // step with the portable tree (measured); the AVX-512 reductions inline.
    let mut inv = [0f32; N];
    for (i, lanes) in inv.iter_mut().zip(&sums) {
        *i = 1.0 / P::lanes_sum(lanes);
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Both products give the same tile as each other on every row-block size
    /// and on padded key counts (the full attention is checked in `attention`).
    #[test]
    fn avx512_matches_loops() {
        if super::super::simd::level() != super::super::simd::Level::Avx512 {
            eprintln!("no AVX-512 on this CPU: only the loops run");
            return;
        }
        let mut rng = Rng::new(5);
        for (tq, lk, d, with_bias) in [(13, 5, 16, false), (8, 64, 16, true), (4, 17, 32, false), (21, 128, 24, true), (1, 1, 16, false)] {
            let c = 3 * d;
            let (q, k, v) = (rng.normal_vec(tq * c), rng.normal_vec(lk * c), rng.normal_vec(lk * c));
            let bias = rng.normal_vec(tq * (lk + 3));
            let t = Tile { q: &q[d..], k: &k[d..], v: &v[d..], stride: c, tq, lk, d, scale: 0.3 };
            let b = with_bias.then_some((&bias[..], lk + 3));
            let (mut want, mut got) = (vec![0f32; tq * c], vec![0f32; tq * c]);
            attend_direct_loops(&t, b, &mut want, &mut Vec::new());
            // SAFETY: level() is Avx512.
            unsafe { attend_direct_avx512(&t, b, &mut got, &mut Vec::new()) };
            let err = crate::tensor::rel_l2(&got, &want);
            assert!(err < 1e-6, "tq {tq} lk {lk} d {d}: relative L2 {err}");
        }
    }
}
