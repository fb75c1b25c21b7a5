//! Attention over few keys with bf16 operands (AVX-512 BF16): Q, K, V and the
//! softmax's probabilities rounded to bf16 (round to nearest even), both
//! products as `vdpbf16ps` (two bf16 products per f32 lane, f32 accumulators),
//! the softmax in f32. The precision of the GPU's attention; half the
//! multiply instructions of the f32 tile ([`super::attention_direct`]).
//!
//! Layouts, in 32-bit pairs of bf16: `K` transposed as `[d / 2][lkp]` (the
//! pair `(k[j][2p], k[j][2p + 1])` at `[p][j]`), `V` as `[lkp / 2][d]` (the
//! pair `(v[2m][i], v[2m + 1][i])` at `[m][i]`), so that in both products the
//! 16 lanes are 16 keys or 16 channels and the broadcast operand is a pair of
//! one query's channels or of one row's probabilities.

use super::attention::{BiasRows, Tile};
use super::attention_direct::PAD_SCORE;
use std::arch::x86_64::*;

const LANES: usize = 16;

/// Whether this CPU has the AVX-512 BF16 dot products (detected once).
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512bf16"))
}

/// Whether a tile of head dim `d` runs here (whole 16-lane channel blocks).
pub fn fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(LANES)
}

/// Softmax attention of one tile with bf16 operands.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16 ([`available`]); `fits(t.d)`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")]
pub unsafe fn attend_bf16(t: &Tile, bias: BiasRows, dst: &mut [f32], scratch: &mut Vec<f32>) {
    let (lk, d, c) = (t.lk, t.d, t.stride);
    assert!(fits(d) && lk > 0 && t.k.len() >= (lk - 1) * c + d && t.v.len() >= (lk - 1) * c + d && t.q.len() >= (t.tq - 1) * c + d);
    let lkp = lk.div_ceil(LANES) * LANES;
    let (half_d, pairs) = (d / 2, lkp / 2);
    // Scratch, in 32-bit units: kt [d/2][lkp], vp [lkp/2][d], scores [8][lkp], pp [8][lkp/2], qp [8][d/2].
    let need = half_d * lkp + pairs * d + 8 * lkp + 8 * pairs + 8 * half_d;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (kt, rest) = scratch.split_at_mut(half_d * lkp);
    let (vp, rest) = rest.split_at_mut(pairs * d);
    let (scores, rest) = rest.split_at_mut(8 * lkp);
    let (pp, rest) = rest.split_at_mut(8 * pairs);
    let qp = &mut rest[..8 * half_d];
    let (kt, vp, pp, qp): (&mut [u32], &mut [u32], &mut [u32], &mut [u32]) =
        (bytemuck::cast_slice_mut(kt), bytemuck::cast_slice_mut(vp), bytemuck::cast_slice_mut(pp), bytemuck::cast_slice_mut(qp));

    // K: 16 keys x 16 channels at a time, converted (8 pairs per key) and transposed.
    for j0 in (0..lkp).step_by(LANES) {
        for d0 in (0..d).step_by(LANES) {
            let rows: [__m256i; LANES] = std::array::from_fn(|i| {
                let j = j0 + i;
                if j < lk {
                    bf16_row(t.k.as_ptr().add(j * c + d0))
                } else {
                    _mm256_setzero_si256()
                }
            });
            store_transposed(&rows, kt, lkp, d0 / 2, j0);
        }
    }
    // V: rows 2m and 2m + 1 interleaved, then converted (a missing odd row is
    // zero); only the pairs `P V` reads.
    for m in 0..lk.div_ceil(2) {
        for d0 in (0..d).step_by(LANES) {
            let row = |j: usize| if j < lk { _mm512_loadu_ps(t.v.as_ptr().add(j * c + d0)) } else { _mm512_setzero_ps() };
            _mm512_storeu_si512(vp.as_mut_ptr().add(m * d + d0) as *mut _, bf16_pairs(row(2 * m), row(2 * m + 1)));
        }
    }

    let mut r = 0;
    while r + 8 <= t.tq {
        rows::<8>(t, bias, dst, kt, vp, scores, pp, qp, lkp, r);
        r += 8;
    }
    if r + 4 <= t.tq {
        rows::<4>(t, bias, dst, kt, vp, scores, pp, qp, lkp, r);
        r += 4;
    }
    while r < t.tq {
        rows::<1>(t, bias, dst, kt, vp, scores, pp, qp, lkp, r);
        r += 1;
    }
}

/// Keys (of all packed heads) the AMX tile takes, and its largest head dim.
pub const AMX_MAX_KEYS: usize = 128;
pub const AMX_MAX_HEAD_DIM: usize = 32;

/// Heads per AMX task for `q_len` queries among `heads`: as many as fill the
/// 16 lanes of a query block (a power of two dividing `heads`), so that the
/// temporal attention's few queries and keys do not leave the tiles empty.
pub fn amx_heads(q_len: usize, heads: usize, max_keys: usize) -> usize {
    let mut hp = 1;
    while heads.is_multiple_of(2 * hp) && 2 * hp * q_len.max(1) <= LANES && 2 * hp * max_keys <= AMX_MAX_KEYS {
        hp *= 2;
    }
    hp
}

/// Query blocks per AMX task.
pub const AMX_TASK_BLOCKS: usize = 4;

/// One unit of AMX work: a tile of queries of one group and `heads` heads,
/// and the rows its output goes to.
pub struct AmxUnit<'a> {
    pub t: Tile<'a>,
    pub dst: &'a mut [f32],
}

/// Softmax attention of some tiles on AMX, `heads` consecutive heads at once
/// (their channels `heads * d` wide in each tile, [`amx_heads`]), computed
/// transposed so that the softmax runs down columns, without horizontal
/// reductions: `S^T = K Q^T` (`tdpbf16ps`, the keys of every head packed as
/// rows, the queries of every head as lanes: blocks of `16 / heads`
/// queries), the products of different heads masked out of each lane's
/// softmax, then `O^T = V^T P^T` (`P` zero outside a lane's head, so one
/// product serves every head), transposed back into the unit's rows. Up to
/// four tile products are issued together ([`crate::quant::amx::Tiles::bf16_products`]),
/// so that their latencies overlap. The same definition as
/// [`attend_bf16`]: Q, K, V and the probabilities rounded to bf16, f32
/// accumulation (AMX flushes denormal operands to zero).
///
/// # Safety
/// [`crate::quant::amx::bf16_available`]; in every unit `d` a multiple of 16
/// up to [`AMX_MAX_HEAD_DIM`], the same `d`, stride and scale; `heads`
/// divides 16; `heads * lk <= AMX_MAX_KEYS`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")]
pub unsafe fn attend_amx(units: &mut [AmxUnit], heads: usize, scratch: &mut Vec<f32>) {
    use crate::quant::amx::{Bf16Job, Tiles};
    let Some(first) = units.first() else { return };
    let (d, c, scale) = (first.t.d, first.t.stride, first.t.scale);
    let width = (heads - 1) * d + d;
    let lkm = units.iter().map(|u| u.t.lk).max().unwrap_or(0);
    assert!(fits(d) && d <= AMX_MAX_HEAD_DIM && LANES.is_multiple_of(heads) && heads * lkm <= AMX_MAX_KEYS);
    for AmxUnit { t, dst } in units.iter() {
        assert!(t.d == d && t.stride == c && t.scale == scale && t.lk > 0 && t.tq > 0);
        let (lk, tq) = (t.lk, t.tq);
        assert!(t.k.len() >= (lk - 1) * c + width && t.v.len() >= (lk - 1) * c + width && t.q.len() >= (tq - 1) * c + width && dst.len() >= (tq - 1) * c + width);
    }
    // Lane l of a query block: head l >> shift, query l & (qb - 1) (heads divides 16).
    let qb = LANES / heads;
    let shift = qb.trailing_zeros();
    // Each head's keys padded to an even count, so that a pair of P^T rows
    // never spans two heads: packed key r = head * lks + key (the padding's K
    // and V rows zero, its probability 0). Key blocks of 16 (rows of S^T) and
    // chunks of 32 (k of P V), at most.
    let even = |lk: usize| lk.next_multiple_of(2);
    let nkm = heads * even(lkm);
    let (kbm, kcm) = (nkm.div_ceil(16), nkm.div_ceil(32));
    // Scratch in 64-byte lines. Per unit: K rows (32 bf16, zero-padded), V^T
    // (d rows of kcm * 32 bf16). Per query block: Q^T (16 rows of 16 pairs,
    // zero past d / 2), S^T, P^T (pairs of packed keys), O^T.
    let unit_lines = kbm * 16 + d * kcm;
    let slot_lines = 16 + kbm * 16 + kcm * 16 + d;
    // Every query block of every unit: (unit, first query, queries).
    let blocks: Vec<(usize, usize, usize)> = units.iter().enumerate().flat_map(|(u, au)| (0..au.t.tq).step_by(qb).map(move |i0| (u, i0, qb.min(au.t.tq - i0)))).collect();
    let slots0 = units.len() * unit_lines;
    let lines = slots0 + blocks.len() * slot_lines;
    if scratch.len() < lines * LANES + LANES {
        scratch.resize(lines * LANES + LANES, 0.0);
    }
    let base = scratch.as_mut_ptr();
    let base = base.add(base.align_offset(64));
    let line = |i: usize| base.add(i * LANES);
    let (ka, vt) = (|u: usize| u * unit_lines, |u: usize| u * unit_lines + kbm * 16);
    let slot = |s: usize| slots0 + s * slot_lines;
    let (qt, st) = (|s: usize| slot(s), |s: usize| slot(s) + 16);
    let (pt, ot) = (|s: usize| slot(s) + 16 + kbm * 16, |s: usize| slot(s) + 16 + kbm * 16 + kcm * 16);
    let zero = _mm512_setzero_ps();
    let vt_row = kcm * 32; // bf16

    // Each phase runs over every query block of the task before the next.
    // Q^T; pairs past d / 2 zero.
    for (s, &(u, i0, nq)) in blocks.iter().enumerate() {
        let t = &units[u].t;
        for d0 in (0..d).step_by(LANES) {
            let rows: [__m256i; LANES] = std::array::from_fn(|l| {
                let (h, i) = (l >> shift, l & (qb - 1));
                if i < nq {
                    bf16_row(t.q.as_ptr().add((i0 + i) * c + h * d + d0))
                } else {
                    _mm256_setzero_si256()
                }
            });
            store_transposed(&rows, std::slice::from_raw_parts_mut(line(qt(s)) as *mut u32, 16 * LANES), LANES, d0 / 2, 0);
        }
        for p in d / 2..16 {
            _mm512_store_ps(line(qt(s) + p), zero);
        }
    }
    for (u, AmxUnit { t, .. }) in units.iter().enumerate() {
        let (lk, lks) = (t.lk, even(t.lk));
        // K rows, zero past each head's keys and past the packed keys.
        for r in 0..kbm * 16 {
            _mm512_store_ps(line(ka(u) + r), zero);
        }
        for h in 0..heads {
            for j in 0..lk {
                let src = t.k.as_ptr().add(j * c + h * d);
                for d0 in (0..d).step_by(LANES) {
                    _mm256_storeu_si256(line(ka(u) + h * lks + j).add(d0 / 2) as *mut __m256i, bf16_row(src.add(d0)));
                }
            }
        }
        // V^T: row `dim`, column r (packed key), 16 x 16 blocks transposed.
        let nk = heads * lks;
        for r0 in (0..vt_row).step_by(LANES) {
            for d0 in (0..d).step_by(LANES) {
                if r0 >= nk {
                    for i in 0..LANES {
                        _mm256_storeu_si256((line(vt(u)) as *mut u16).add((d0 + i) * vt_row + r0) as *mut __m256i, _mm256_setzero_si256());
                    }
                    continue;
                }
                let mut rows: [__m512; LANES] = std::array::from_fn(|i| {
                    let (h, j) = ((r0 + i) / lks, (r0 + i) % lks);
                    if h < heads && j < lk { _mm512_loadu_ps(t.v.as_ptr().add(j * c + h * d + d0)) } else { zero }
                });
                transpose16(&mut rows);
                for (i, row) in rows.iter().enumerate() {
                    let at = (line(vt(u)) as *mut u16).add((d0 + i) * vt_row + r0);
                    _mm256_storeu_si256(at as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(*row)));
                }
            }
        }
    }
    let tiles = Tiles::new();
    let mut jobs = Vec::with_capacity(blocks.len() * kbm.max(d / LANES));
    for (s, &(u, _, _)) in blocks.iter().enumerate() {
        for b in 0..(heads * even(units[u].t.lk)).div_ceil(16) {
            jobs.push(Bf16Job { a: line(ka(u) + 16 * b) as *const u8, b: line(qt(s)) as *const u8, chunks: 1, out: line(st(s) + 16 * b) });
        }
    }
    tiles.bf16_products(&jobs, 64, 0, 0);
    let head_mask = |h: usize| -> __mmask16 { (((1u32 << qb) - 1) << (h * qb)) as __mmask16 };
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let (vscale, vscale2) = (_mm512_set1_ps(scale), _mm512_set1_ps(scale * std::f32::consts::LOG2_E));
    let mut inv = Vec::with_capacity(blocks.len());
    for (s, &(u, _, _)) in blocks.iter().enumerate() {
        let (lk, lks) = (units[u].t.lk, even(units[u].t.lk));
        // Lane-wise, its own head's score of key j.
        let score = |j: usize| {
            let mut x = _mm512_load_ps(line(st(s) + j));
            for h in 1..heads {
                x = _mm512_mask_mov_ps(x, head_mask(h), _mm512_load_ps(line(st(s) + h * lks + j)));
            }
            x
        };
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in 0..lk {
            mx = _mm512_max_ps(mx, _mm512_mul_ps(score(j), vscale));
        }
        // 2^(x * scale * log2 e - max * log2 e), two keys at a time, written
        // straight into P^T as pairs: row (h * lks + j) / 2, each lane's
        // probabilities kept only in its own head's rows.
        let mxl = _mm512_mul_ps(mx, log2e);
        let exp = |j: usize| if j < lk { super::math::exp2_v(_mm512_fmsub_ps(score(j), vscale2, mxl)) } else { zero };
        let mut sum = zero;
        for j in (0..lk).step_by(2) {
            let (e0, e1) = (exp(j), exp(j + 1));
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            for h in 0..heads {
                let m = head_mask(h);
                let pair = bf16_pairs(_mm512_maskz_mov_ps(m, e0), _mm512_maskz_mov_ps(m, e1));
                _mm512_store_si512(line(pt(s) + (h * lks + j) / 2) as *mut __m512i, pair);
            }
        }
        for m in heads * lks / 2..(heads * lks).div_ceil(32) * 16 {
            _mm512_store_ps(line(pt(s) + m), zero);
        }
        inv.push(_mm512_div_ps(_mm512_set1_ps(1.0), sum));
    }
    jobs.clear();
    for (s, &(u, _, _)) in blocks.iter().enumerate() {
        for d0 in (0..d).step_by(LANES) {
            let a = (line(vt(u)) as *const u16).add(d0 * vt_row) as *const u8;
            jobs.push(Bf16Job { a, b: line(pt(s)) as *const u8, chunks: (heads * even(units[u].t.lk)).div_ceil(32), out: line(ot(s) + d0) });
        }
    }
    tiles.bf16_products(&jobs, vt_row * 2, 64, 16 * 64);
    // O^T / sum, transposed back: lane l's row to its query and head.
    for (s, &(u, i0, nq)) in blocks.iter().enumerate() {
        let dst = units[u].dst.as_mut_ptr();
        for d0 in (0..d).step_by(LANES) {
            let mut rows: [__m512; LANES] = std::array::from_fn(|i| _mm512_mul_ps(_mm512_load_ps(line(ot(s) + d0 + i)), inv[s]));
            transpose16(&mut rows);
            for (l, row) in rows.iter().enumerate() {
                let (h, i) = (l >> shift, l & (qb - 1));
                if i < nq {
                    _mm512_storeu_ps(dst.add((i0 + i) * c + h * d + d0), *row);
                }
            }
        }
    }
}

/// 16 f32 at `p`, rounded to bf16 (to nearest even).
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn bf16_row(p: *const f32) -> __m256i {
    std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(p)))
}

/// Two rows of 16 f32 as 16 bf16 pairs `(a[i], b[i])` (rounded to nearest even).
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn bf16_pairs(a: __m512, b: __m512) -> __m512i {
    let lo = _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), b);
    let hi = _mm512_permutex2var_ps(a, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), b);
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// Transposes a 16 x 16 block of f32 in registers: `rows[i][j]` becomes
/// `rows[j][i]` (pairs, then quads within 128-bit lanes, then the lanes).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(rows: &mut [__m512; LANES]) {
    let a: [__m512; LANES] = std::array::from_fn(|i| if i % 2 == 0 { _mm512_unpacklo_ps(rows[i], rows[i + 1]) } else { _mm512_unpackhi_ps(rows[i - 1], rows[i]) });
    // b[4g + k], 128-bit lane l: column 4l + k of rows 4g .. 4g + 4.
    let b: [__m512; LANES] = std::array::from_fn(|i| {
        let (g, k) = (i / 4 * 4, i % 4);
        let (x, y) = (_mm512_castps_pd(a[g + k / 2]), _mm512_castps_pd(a[g + 2 + k / 2]));
        _mm512_castpd_ps(if k % 2 == 0 { _mm512_unpacklo_pd(x, y) } else { _mm512_unpackhi_pd(x, y) })
    });
    for k in 0..4 {
        let (c0, c1) = (_mm512_shuffle_f32x4::<0x88>(b[k], b[4 + k]), _mm512_shuffle_f32x4::<0xDD>(b[k], b[4 + k]));
        let (d0, d1) = (_mm512_shuffle_f32x4::<0x88>(b[8 + k], b[12 + k]), _mm512_shuffle_f32x4::<0xDD>(b[8 + k], b[12 + k]));
        rows[k] = _mm512_shuffle_f32x4::<0x88>(c0, d0);
        rows[8 + k] = _mm512_shuffle_f32x4::<0xDD>(c0, d0);
        rows[4 + k] = _mm512_shuffle_f32x4::<0x88>(c1, d1);
        rows[12 + k] = _mm512_shuffle_f32x4::<0xDD>(c1, d1);
    }
}

/// `kt[(p0 + p) * lkp + j0 + j] = rows[j][p]` for 16 rows of 8 pairs: a 16 x 8
/// transpose of 32-bit lanes in three rounds of 8 two-source permutes (the
/// scalar stores it replaces were a tenth of the tile).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_transposed(rows: &[__m256i; LANES], kt: &mut [u32], lkp: usize, p0: usize, j0: usize) {
    const A: [i32; 16] = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27];
    const B: [i32; 16] = [4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31];
    const C_LO: [i32; 16] = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
    const C_HI: [i32; 16] = [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31];
    const O_LO: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
    const O_HI: [i32; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31];
    let idx = |a: &[i32; 16]| _mm512_loadu_si512(a.as_ptr() as *const _);
    let (a, b, c_lo, c_hi, o_lo, o_hi) = (idx(&A), idx(&B), idx(&C_LO), idx(&C_HI), idx(&O_LO), idx(&O_HI));
    // z[i]: rows 2i and 2i + 1.
    let z: [__m512i; 8] = std::array::from_fn(|i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(rows[2 * i]), rows[2 * i + 1]));
    // Rows 4i..4i + 4 with pairs 0..4 (lane 4p + row) and pairs 4..8.
    let fours: [[__m512i; 4]; 2] = [
        std::array::from_fn(|i| _mm512_permutex2var_epi32(z[2 * i], a, z[2 * i + 1])),
        std::array::from_fn(|i| _mm512_permutex2var_epi32(z[2 * i], b, z[2 * i + 1])),
    ];
    for (half, x) in fours.iter().enumerate() {
        // Rows 0..8 and 8..16, two pairs each (lane 8p + row).
        let (lo0, hi0) = (_mm512_permutex2var_epi32(x[0], c_lo, x[1]), _mm512_permutex2var_epi32(x[0], c_hi, x[1]));
        let (lo1, hi1) = (_mm512_permutex2var_epi32(x[2], c_lo, x[3]), _mm512_permutex2var_epi32(x[2], c_hi, x[3]));
        for (k, (e0, e1)) in [(lo0, lo1), (hi0, hi1)].into_iter().enumerate() {
            for (m, sel) in [o_lo, o_hi].into_iter().enumerate() {
                let p = p0 + 4 * half + 2 * k + m;
                _mm512_storeu_si512(kt.as_mut_ptr().add(p * lkp + j0) as *mut _, _mm512_permutex2var_epi32(e0, sel, e1));
            }
        }
    }
}

/// Rows `r0..r0 + N`: scores, bias, softmax, `P V`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")]
#[inline]
unsafe fn rows<const N: usize>(t: &Tile, bias: BiasRows, dst: &mut [f32], kt: &[u32], vp: &[u32], scores: &mut [f32], pp: &mut [u32], qp: &mut [u32], lkp: usize, r0: usize) {
    let (lk, d, c) = (t.lk, t.d, t.stride);
    let (half_d, pairs) = (d / 2, lkp / 2);
    for n in 0..N {
        for d0 in (0..d).step_by(LANES) {
            _mm256_storeu_si256(qp.as_mut_ptr().add(n * half_d + d0 / 2) as *mut __m256i, bf16_row(t.q.as_ptr().add((r0 + n) * c + d0)));
        }
    }
    let scale = _mm512_set1_ps(t.scale);
    for j0 in (0..lkp).step_by(LANES) {
        let mut acc = [_mm512_setzero_ps(); N];
        for p in 0..half_d {
            let k: __m512bh = std::mem::transmute(_mm512_loadu_si512(kt.as_ptr().add(p * lkp + j0) as *const _));
            for (n, a) in acc.iter_mut().enumerate() {
                let q: __m512bh = std::mem::transmute(_mm512_set1_epi32(*qp.get_unchecked(n * half_d + p) as i32));
                *a = _mm512_dpbf16_ps(*a, q, k);
            }
        }
        for (n, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(scores.as_mut_ptr().add(n * lkp + j0), _mm512_mul_ps(*a, scale));
        }
    }
    for n in 0..N {
        let row = &mut scores[n * lkp..][..lkp];
        if let Some((bv, bl)) = bias {
            row.iter_mut().zip(&bv[(r0 + n) * bl..][..lk]).for_each(|(x, b)| *x += b);
        }
        row[lk..].iter_mut().for_each(|x| *x = PAD_SCORE);
    }
    // Softmax: each row's maximum, then its exponentials, summed in f32 and
    // stored as bf16 pairs of consecutive keys.
    let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); N];
    for j0 in (0..lkp).step_by(LANES) {
        for (n, m) in mx.iter_mut().enumerate() {
            *m = _mm512_max_ps(*m, _mm512_loadu_ps(scores.as_ptr().add(n * lkp + j0)));
        }
    }
    let mx = mx.map(|m| _mm512_set1_ps(_mm512_reduce_max_ps(m)));
    let mut sum = [_mm512_setzero_ps(); N];
    for j0 in (0..lkp).step_by(LANES) {
        for n in 0..N {
            let e = super::math::exp2_v(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(scores.as_ptr().add(n * lkp + j0)), mx[n]), _mm512_set1_ps(std::f32::consts::LOG2_E)));
            sum[n] = _mm512_add_ps(sum[n], e);
            let b = _mm512_cvtneps_pbh(e);
            _mm256_storeu_si256(pp.as_mut_ptr().add(n * pairs + j0 / 2) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(b));
        }
    }
    let inv = sum.map(|s| 1.0 / _mm512_reduce_add_ps(s));
    let used = lk.div_ceil(2);
    for d0 in (0..d).step_by(LANES) {
        let mut acc = [_mm512_setzero_ps(); N];
        for m in 0..used {
            let v: __m512bh = std::mem::transmute(_mm512_loadu_si512(vp.as_ptr().add(m * d + d0) as *const _));
            for (n, a) in acc.iter_mut().enumerate() {
                let p: __m512bh = std::mem::transmute(_mm512_set1_epi32(*pp.get_unchecked(n * pairs + m) as i32));
                *a = _mm512_dpbf16_ps(*a, p, v);
            }
        }
        for (n, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(dst.as_mut_ptr().add((r0 + n) * c + d0), _mm512_mul_ps(*a, _mm512_set1_ps(inv[n])));
        }
    }
}


#[cfg(test)]
mod tests {
    use super::super::attention::{attention, attention_on};
    use crate::backend::AttnSpec;
    use crate::rng::Rng;
    use crate::tensor::{rel_l2, Tensor};

    fn bf(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f32() as f64
    }

    /// The bf16 attention's definition in f64: Q, K, V rounded to bf16, exact
    /// scores (plus the bias), the softmax's numerators rounded to bf16 for `P V`
    /// and summed unrounded for the normalization (`round_p` false: not rounded).
    fn reference(q: &[f32], k: &[f32], v: &[f32], spec: &AttnSpec, bias: Option<(&[f32], usize)>, round_p: bool) -> Vec<f32> {
        let (h, d) = (spec.heads, spec.head_dim);
        let c = h * d;
        let mut out = vec![0f32; spec.groups * spec.q_len * c];
        for (g, &(k0, k1)) in spec.kv_ranges.iter().enumerate().filter(|(_, r)| r.1 > r.0) {
            // Without keys: zero rows.
            for hi in 0..h {
                for i in 0..spec.q_len {
                    let qr = &q[(g * spec.q_len + i) * c + hi * d..][..d];
                    let s: Vec<f64> = (k0..k1)
                        .map(|j| {
                            let dot: f64 = qr.iter().zip(&k[j * c + hi * d..][..d]).map(|(&a, &b)| bf(a) * bf(b)).sum();
                            (dot as f32 * spec.scale) as f64 + bias.map_or(0.0, |(b, bl)| b[(hi * spec.q_len + i) * bl + j - k0] as f64)
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for dd in 0..d {
                        let o: f64 = (k0..k1).zip(&e).map(|(j, &p)| if round_p { bf(p as f32) } else { p } * bf(v[j * c + hi * d + dd])).sum();
                        out[(g * spec.q_len + i) * c + hi * d + dd] = (o / z) as f32;
                    }
                }
            }
        }
        out
    }

    /// On an AVX-512 BF16 CPU the kernels compute the definition (key counts
    /// under, at and over one 16-lane block, odd ones, row blocks of 8, 4 and 1,
    /// ragged ranges, a score bias, head dims 16 and 32), the AVX-512 one and,
    /// where the CPU has AMX-BF16, the AMX one (without a bias, 16 packed keys
    /// or more; 1, 2, 4 or 8
    /// heads per task, query blocks of 16 / heads, partial ones, up to 4
    /// groups per task with different key counts, 128 keys); elsewhere,
    /// and for head dims the kernels do not take, the rounded operands go
    /// through the f32 attention. All stay within bf16's precision of the f32
    /// attention.
    #[test]
    fn bf16_attention_computes_its_definition() {
        let mut rng = Rng::new(21);
        let cases = [
            (AttnSpec::dense(3, 5, 5, 2, 16), false),
            (AttnSpec::dense(2, 70, 70, 2, 16), true),
            (AttnSpec::dense(2, 70, 70, 2, 16), false),
            (AttnSpec::dense(1, 13, 16, 1, 32), false),
            (AttnSpec::ragged(67, 2, 16, AttnSpec::ranges_from_offsets(&[0, 5, 17, 18])), false),
            (AttnSpec::dense(2, 9, 33, 3, 16), true),
            (AttnSpec::dense(2, 9, 33, 3, 16), false),
            (AttnSpec::dense(2, 6, 7, 2, 8), false),
            (AttnSpec::dense(1, 20, 150, 1, 16), false),
            (AttnSpec::dense(1, 20, 128, 1, 32), false),
            (AttnSpec::dense(6, 4, 4, 4, 16), false),
            (AttnSpec::dense(5, 3, 5, 8, 16), false),
            (AttnSpec::dense(3, 2, 3, 8, 16), false),
            (AttnSpec::dense(4, 5, 9, 2, 32), false),
            (AttnSpec::ragged(40, 4, 16, AttnSpec::ranges_from_offsets(&[0, 20, 27, 47])), false),
            (AttnSpec::ragged(3, 4, 16, AttnSpec::ranges_from_offsets(&[0, 5, 6, 14, 20, 29])), false),
            // A group without keys (its rows zero) between ragged odd ones.
            (AttnSpec::ragged(20, 2, 16, AttnSpec::ranges_from_offsets(&[0, 7, 7, 19, 30])), false),
        ];
        let kernels: &[bool] = if crate::quant::amx::bf16_available() { &[false, true] } else { &[false] };
        for ((spec, with_bias), &amx) in cases.iter().flat_map(|case| kernels.iter().map(move |amx| (case, amx))) {
            let (spec, with_bias) = (spec.clone(), *with_bias);
            let c = spec.heads * spec.head_dim;
            let nk = spec.kv_ranges.iter().map(|r| r.1).max().unwrap();
            let bl = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap();
            let q = Tensor::from_f32(&[spec.groups * spec.q_len, c], rng.normal_vec(spec.groups * spec.q_len * c)).unwrap();
            let k = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c).iter().map(|x| 2.0 * x).collect()).unwrap();
            let v = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c)).unwrap();
            let bias = with_bias.then(|| Tensor::from_f32(&[spec.heads, spec.q_len, bl], rng.normal_vec(spec.heads * spec.q_len * bl)).unwrap());
            let bias_ref = bias.as_ref().map(|b| (b.f32().unwrap(), bl));
            let bf16 = AttnSpec { bf16: true, ..spec.clone() };
            let got = attention_on(&q, &k, &v, &bf16, bias.as_ref(), amx).unwrap();
            let kernel = super::available() && super::fits(spec.head_dim) && spec.head_dim <= 32 && bl <= 128;
            let want = reference(q.f32().unwrap(), k.f32().unwrap(), v.f32().unwrap(), &spec, bias_ref, kernel);
            let err = rel_l2(got.f32().unwrap(), &want);
            // A few probabilities round to the other bf16 neighbour after the kernel's
            // exponential (2e-7 off): 1e-5 here, where unrounded ones would be 8e-4 off.
            assert!(err < 2e-5, "{spec:?} (kernel {kernel}, amx {amx}): {err:.2e} from the definition");
            let float = attention(&q, &k, &v, &spec, bias.as_ref()).unwrap();
            let err = rel_l2(got.f32().unwrap(), float.f32().unwrap());
            assert!(err < 1.5e-2, "{spec:?}: {err:.2e} from the f32 attention");
        }
    }
}
