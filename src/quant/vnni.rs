//! Pieces shared by the AVX-512 VNNI integer GEMMs ([`int8`](super::int8),
//! [`int4`](super::int4)): feature detection, the activation operand, where a
//! tile's results go, and the masked stores of the epilogues.
//!
//! Both GEMMs broadcast 4 consecutive int8 activations of one row (one 32-bit
//! element) as the *signed* operand of `vpdpbusd` and keep the weights, stored
//! unsigned (`w + 128` for int8, the nibble `q + 8` for int4), in registers as
//! its *unsigned* operand. The shift costs one per-row (per-group) correction,
//! `shift * sum_k a[m, k]`, and needs no copy of the activations.

use super::int8::QuantRows;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Output channels per block: one 512-bit register of int32 accumulators.
pub const NB: usize = 16;

/// Whether this CPU has AVX-512 (F, BW) with the VNNI int8 dot products.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Where a tile's results go: exact int32 accumulators, or dequantized f32
/// (each GEMM documents its order of operations).
#[derive(Clone, Copy)]
pub enum Out {
    I32(*mut i32),
    F32 { y: *mut f32, a_scale: *const f32, bias: *const f32 },
}
// SAFETY: the GEMMs' tasks write disjoint regions; the scale and bias pointers are read-only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// The activations as the GEMMs read them: rows of `width` bytes.
pub enum RowsOperand<'a> {
    /// `a.q` itself.
    Borrowed(&'a [i8]),
    /// A copy with zero padding to `width`.
    Padded(Vec<i8>),
    /// A copy in line-aligned memory, for AMX.
    Aligned(Vec<super::Line>),
}

impl RowsOperand<'_> {
    pub fn as_ptr(&self) -> *const i8 {
        match self {
            RowsOperand::Borrowed(r) => r.as_ptr(),
            RowsOperand::Padded(r) => r.as_ptr(),
            RowsOperand::Aligned(r) => r.as_ptr() as *const i8,
        }
    }
}

/// The activations as rows of `width` bytes (`width >= cols`, a multiple of 4):
/// borrowed when the rows already have that width (and, where AMX will read
/// them, are line-aligned), else copied with zero padding, into line-aligned
/// memory for AMX (one copy per product). Padding is exact: zero activations
/// add nothing, whatever the weight bytes.
pub fn rows_operand(a: &QuantRows, width: usize, amx: bool) -> RowsOperand<'_> {
    if width == a.cols && (!amx || (a.q.as_ptr() as usize).is_multiple_of(64)) {
        return RowsOperand::Borrowed(&a.q);
    }
    if amx {
        let mut v = super::lines(a.rows * width);
        copy_rows(a, width, &mut bytemuck::cast_slice_mut(&mut v)[..a.rows * width]);
        return RowsOperand::Aligned(v);
    }
    let mut p = vec![0i8; a.rows * width];
    copy_rows(a, width, &mut p);
    RowsOperand::Padded(p)
}

/// `a`'s rows into the zeroed rows of `width` bytes of `dst`.
fn copy_rows(a: &QuantRows, width: usize, dst: &mut [i8]) {
    dst.par_chunks_mut(width).zip(a.q.par_chunks(a.cols)).with_min_len(64).for_each(|(d, s)| d[..s.len()].copy_from_slice(s));
}

/// `shift * sum_{k in g} a[m, k]` for each row `m` and group `g` of `group`
/// inputs (`[rows, groups]`, wrapping: the GEMMs' results are exact modulo 2^32
/// and fit int32).
pub fn group_sums(a: &QuantRows, group: usize, shift: i32) -> Vec<i32> {
    let groups = a.cols.div_ceil(group);
    let mut s = vec![0i32; a.rows * groups];
    s.par_chunks_mut(groups * 64).zip(a.q.par_chunks(a.cols * 64)).for_each(|(s, rows)| rows_group_sums(rows, a.cols, group, shift, s));
    s
}

/// [`group_sums`] of one task's rows (`a`: rows of `cols` bytes, `group` a
/// multiple of 64 or all of `cols`) into `out`, on the calling thread.
pub fn group_sums_into(a: &[i8], cols: usize, group: usize, shift: i32, out: &mut Vec<i32>) {
    out.clear();
    out.resize(a.len() / cols * cols.div_ceil(group), 0);
    rows_group_sums(a, cols, group, shift, out);
}

/// [`row_group_sums`] of each row of `rows` (rows of `cols` bytes) into `sums`
/// (`cols.div_ceil(group)` per row), on AVX-512 where the groups allow it.
fn rows_group_sums(rows: &[i8], cols: usize, group: usize, shift: i32, sums: &mut [i32]) {
    let fast = (group.is_multiple_of(64) || group >= cols) && available();
    for (s, row) in sums.chunks_mut(cols.div_ceil(group)).zip(rows.chunks(cols)) {
        if fast {
            // SAFETY: VNNI implies AVX-512 F and BW; groups are whole 64-byte chunks or the row.
            unsafe { row_group_sums_avx512(row, group, shift, s) }
        } else {
            row_group_sums(row, group, shift, s)
        }
    }
}

/// [`row_group_sums`] 64 bytes at a time: `vpsadbw` of the bytes offset to
/// unsigned (`x ^ 0x80 = x + 128`), less 128 per byte. `group` is a multiple of
/// 64 or covers the row.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn row_group_sums_avx512(row: &[i8], group: usize, shift: i32, sums: &mut [i32]) {
    for (sg, chunk) in sums.iter_mut().zip(row.chunks(group)) {
        let mut acc = _mm512_setzero_si512();
        for part in chunk.chunks(64) {
            let mask: __mmask64 = if part.len() == 64 { !0 } else { (1u64 << part.len()) - 1 };
            let v = _mm512_maskz_loadu_epi8(mask, part.as_ptr());
            // Masked-off bytes are 0 ^ 0x80 = 128 too: subtracted with the rest below.
            acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_xor_si512(v, _mm512_set1_epi8(-128)), _mm512_setzero_si512()));
        }
        let total = _mm512_reduce_add_epi64(acc) - 128 * chunk.len().next_multiple_of(64) as i64;
        *sg = (total as i32).wrapping_mul(shift);
    }
}

crate::backend::cpu::simd::multiversion! {
fn row_group_sums(row: &[i8], group: usize, shift: i32, sums: &mut [i32]) {
    for (sg, chunk) in sums.iter_mut().zip(row.chunks(group)) {
        *sg = chunk.iter().map(|&x| x as i32).sum::<i32>().wrapping_mul(shift);
    }
}
}

/// Lanes of the 16-channel block starting at `ch0` that exist (`ch0 < n`).
#[inline(always)]
pub fn live_mask(n: usize, ch0: usize) -> __mmask16 {
    let live = (n - ch0).min(NB);
    if live == NB {
        0xFFFF
    } else {
        (1u16 << live) - 1
    }
}

/// Stores `v` to `y[row, ch0 ..]` (`y` is `[rows, n]`), adding `bias[ch0 ..]` if
/// there is one: the last step of both dequantizations.
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn store_f32(y: *mut f32, bias: *const f32, n: usize, row: usize, ch0: usize, mut v: __m512) {
    let mask = live_mask(n, ch0);
    if !bias.is_null() {
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias.add(ch0)));
    }
    _mm512_mask_storeu_ps(y.add(row * n + ch0), mask, v);
}
