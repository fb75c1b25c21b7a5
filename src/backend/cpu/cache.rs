//! The cache storage and divergence ops of the CPU backend
//! ([`Backend::quantize_rows_i8`](crate::backend::Backend::quantize_rows_i8),
//! `add_gated_i8`, `l1_distance`, `abs_sum`): caching policies keep sub-module
//! outputs across denoising steps as int8 with one scale per row, add them back
//! with the gate, and measure how fast features change between steps.

use super::{check_mod, chunk_rows, mod_vec, rows_of, simd, ROW_CHUNK_ELEMS};
use crate::backend::ModRef;
use crate::tensor::{DType, Storage, Tensor};
use anyhow::{anyhow, bail, ensure, Result};
use half::bf16;
use rayon::prelude::*;

/// Largest magnitude of a cached int8 value (symmetric, per row).
pub const CACHE_QMAX: f32 = 127.0;

/// Host data of an f32 or bf16 tensor.
#[derive(Clone, Copy)]
enum Floats<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Floats<'a> {
    fn of(t: &'a Tensor, what: &str) -> Result<Self> {
        match t.storage() {
            Storage::F32(v) => Ok(Floats::F32(&v[..])),
            Storage::BF16(v) => Ok(Floats::Bf16(v)),
            Storage::Cuda(_) => bail!("{what}: tensor is on the GPU; copy it to the CPU first"),
            _ => bail!("{what}: expected an f32 or bf16 tensor, got {}", t.dtype().name()),
        }
    }

    /// Elements `range` as f32: borrowed when f32, widened into `buf` when bf16.
    fn f32_range<'b>(self, range: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Floats::F32(v) => &v[range],
            Floats::Bf16(v) => {
                buf.resize(range.len(), 0.0);
                widen_bf16(&v[range], buf);
                buf
            }
        }
    }
}

simd::multiversion! {
/// `dst = src` widened to f32 (exact: the bf16 bits are the f32's high half).
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}
}

/// `1.5 * 2^23`: a whole number `r` in [-2^22, 2^22] added to it sits, exactly, in
/// the low mantissa bits of the sum.
const ROUNDER: f32 = 12_582_912.0;

/// `clamp(round(v / s), -127, 127)`, ties away from zero, NaN -> 0. Clamped before
/// rounding (the same result: 127 is whole), rounded from the exact fraction
/// `t - trunc(t)`, and converted through the bits of `r + ROUNDER`: plain
/// arithmetic, so the loop vectorizes (the compiler does each `as i32` on its own).
#[inline(always)]
fn quantize1(v: f32, s: f32) -> i8 {
    let t = v / s;
    let t = if t.is_nan() { 0.0 } else { t.clamp(-CACHE_QMAX, CACHE_QMAX) };
    let whole = t.trunc();
    let r = if (t - whole).abs() >= 0.5 { whole + 1f32.copysign(t) } else { whole };
    ((r + ROUNDER).to_bits() as i32 - ROUNDER.to_bits() as i32) as i8
}

simd::multiversion! {
/// One row: `s = max |y| / 127`, `q = quantize1(y, s)` (all zeros when `s` is 0); returns `s`.
fn quantize_row(y: &[f32], q: &mut [i8]) -> f32 {
    // 16 independent maxima so the loop vectorizes (max is exact: any order gives the same).
    let mut lanes = [0f32; 16];
    let mut chunks = y.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i].abs());
        }
    }
    let amax = chunks.remainder().iter().map(|v| v.abs()).chain(lanes).fold(0f32, f32::max);
    let s = amax / CACHE_QMAX;
    if amax == 0.0 {
        q.fill(0);
    } else {
        for (o, &v) in q.iter_mut().zip(y) {
            *o = quantize1(v, s);
        }
    }
    s
}
}

simd::multiversion! {
/// `x += g * (q * s)` over one row (the same f32 operations as `add_gated` on `q * s`).
fn add_dequantized_gated(x: &mut [f32], q: &[i8], s: f32, g: &[f32]) {
    for ((x, &q), &g) in x.iter_mut().zip(q).zip(g) {
        *x += g * (q as f32 * s);
    }
}
}

simd::multiversion! {
/// `x += q * s` over one row.
fn add_dequantized(x: &mut [f32], q: &[i8], s: f32) {
    for (x, &q) in x.iter_mut().zip(q) {
        *x += q as f32 * s;
    }
}
}

/// `(sum |a - b|, sum |b|)` in f64.
fn l1_sums(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "l1_sums: slices of different lengths");
    #[cfg(target_arch = "x86_64")]
    if simd::level() == simd::Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512 (F, DQ).
        return unsafe { l1_sums_avx512(a, b) };
    }
    l1_sums_portable(a, b)
}

/// 16 floats a round, widened to two f64 vectors each, into four
/// accumulators per sum (the compiler's version of the portable loop spilled
/// and permuted: 4% of an HLC step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn l1_sums_avx512(a: &[f32], b: &[f32]) -> (f64, f64) {
    use std::arch::x86_64::*;
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_pd(); 8];
    let mut i = 0;
    while i < n {
        let m = simd::lanes16(n, i);
        let (x, y) = (_mm512_maskz_loadu_ps(m, ap.add(i)), _mm512_maskz_loadu_ps(m, bp.add(i)));
        let halves = [(_mm512_castps512_ps256(x), _mm512_castps512_ps256(y)), (_mm512_extractf32x8_ps::<1>(x), _mm512_extractf32x8_ps::<1>(y))];
        // Alternate accumulator sets between rounds: two dependency chains per half.
        let set = (i / 16) % 2 * 4;
        for (h, (x, y)) in halves.into_iter().enumerate() {
            let (x, y) = (_mm512_cvtps_pd(x), _mm512_cvtps_pd(y));
            acc[set + h] = _mm512_add_pd(acc[set + h], _mm512_abs_pd(_mm512_sub_pd(x, y)));
            acc[set + 2 + h] = _mm512_add_pd(acc[set + 2 + h], _mm512_abs_pd(y));
        }
        i += 16;
    }
    let sum = |k: [usize; 4]| k.iter().map(|&k| _mm512_reduce_add_pd(acc[k])).sum::<f64>();
    (sum([0, 1, 4, 5]), sum([2, 3, 6, 7]))
}

simd::multiversion! {
/// The portable [`l1_sums`]: 8 independent lanes, so the loop vectorizes.
fn l1_sums_portable(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut d, mut m) = ([0f64; 8], [0f64; 8]);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            let (x, y) = (x[i] as f64, y[i] as f64);
            d[i] += (x - y).abs();
            m[i] += y.abs();
        }
    }
    for (&x, &y) in ra.iter().zip(rb) {
        d[0] += (x as f64 - y as f64).abs();
        m[0] += (y as f64).abs();
    }
    (d.iter().sum(), m.iter().sum())
}
}

simd::multiversion! {
/// `(sum |a|, sum a^2)` in f64 (8 independent lanes).
fn abs_sq_sums(a: &[f32]) -> (f64, f64) {
    let (mut s, mut q) = ([0f64; 8], [0f64; 8]);
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for i in 0..8 {
            let x = x[i] as f64;
            s[i] += x.abs();
            q[i] += x * x;
        }
    }
    for &x in ra {
        let x = x as f64;
        s[0] += x.abs();
        q[0] += x * x;
    }
    (s.iter().sum(), q.iter().sum())
}
}

/// See [`Backend::quantize_rows_i8`](crate::backend::Backend::quantize_rows_i8).
pub fn quantize_rows_i8(y: &Tensor) -> Result<(Tensor, Tensor)> {
    let data = Floats::of(y, "quantize_rows_i8")?;
    let (rows, c) = rows_of(y);
    let mut q = vec![0i8; rows * c];
    let mut s = vec![0f32; rows];
    if rows > 0 && c > 0 {
        let per = chunk_rows(c);
        q.par_chunks_mut(per * c).zip(s.par_chunks_mut(per)).enumerate().for_each(|(task, (qb, sb))| {
            let mut buf = Vec::new();
            for (i, (qr, sr)) in qb.chunks_mut(c).zip(sb.iter_mut()).enumerate() {
                let r = task * per + i;
                *sr = quantize_row(data.f32_range(r * c..(r + 1) * c, &mut buf), qr);
            }
        });
    }
    Ok((Tensor::new(y.shape(), Storage::I8(q))?, Tensor::from_f32(&[rows], s)?))
}

/// The checks of `add_gated_i8` shared by both backends: `(rows, cols)` of `x`.
pub(crate) fn check_add_gated_i8(x: &Tensor, q: &Tensor, scales: &Tensor) -> Result<(usize, usize)> {
    ensure!(q.dtype() == DType::I8, "add_gated_i8: the cache q must be i8, got {}", q.dtype().name());
    ensure!(scales.dtype() == DType::F32, "add_gated_i8: the scales must be f32, got {}", scales.dtype().name());
    ensure!(x.numel() == q.numel() && x.shape().last() == q.shape().last(), "add_gated_i8: x {:?} and q {:?} do not hold the same rows", x.shape(), q.shape());
    let (rows, n) = rows_of(x);
    ensure!(scales.numel() == rows, "add_gated_i8: {} scales {:?} for {rows} rows", scales.numel(), scales.shape());
    Ok((rows, n))
}

/// See [`Backend::add_gated_i8`](crate::backend::Backend::add_gated_i8).
pub fn add_gated_i8(x: &mut Tensor, q: &Tensor, scales: &Tensor, gate: Option<ModRef>) -> Result<()> {
    let (rows, n) = check_add_gated_i8(x, q, scales)?;
    let qv: &[i8] = match q.storage() {
        Storage::I8(v) => v,
        _ => bail!("add_gated_i8: the cache q is on the GPU; copy it to the CPU first"),
    };
    let sv = scales.f32().map_err(|e| anyhow!("add_gated_i8: scales: {e}"))?;
    if let Some(g) = &gate {
        check_mod(g, rows, n, "add_gated_i8")?;
    }
    let xs = x.f32_mut().map_err(|e| anyhow!("add_gated_i8: x: {e}"))?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    match gate {
        None => xs.par_chunks_mut(n).zip(qv.par_chunks(n)).zip(sv.par_iter()).with_min_len(chunk_rows(n)).for_each(|((xr, qr), &s)| add_dequantized(xr, qr, s)),
        Some(g) => {
            let table = g.table.f32()?;
            let gs = g.groups.group_size;
            xs.par_chunks_mut(n).zip(qv.par_chunks(n)).zip(sv.par_iter()).enumerate().with_min_len(chunk_rows(n)).for_each(|(row, ((xr, qr), &s))| {
                add_dequantized_gated(xr, qr, s, mod_vec(&g, table, g.groups.index[row / gs], n));
            });
        }
    }
    Ok(())
}

/// Elements per part of `t` split into `parts` equal parts of its leading dimension.
pub(crate) fn part_len(t: &Tensor, parts: usize, what: &str) -> Result<usize> {
    ensure!(parts >= 1, "{what}: parts must be at least 1");
    let rows = *t.shape().first().ok_or_else(|| anyhow!("{what}: a scalar tensor has no rows to split"))?;
    ensure!(rows % parts == 0, "{what}: {rows} rows (leading dimension of {:?}) do not split into {parts} equal parts", t.shape());
    Ok(t.numel() / parts)
}

/// Per part, the f64 sums of `f` over fixed chunks of `ROW_CHUNK_ELEMS` elements
/// added in chunk order: the same result for any thread count.
fn part_sums(len: usize, parts: usize, f: impl Fn(std::ops::Range<usize>, &mut Vec<f32>, &mut Vec<f32>) -> (f64, f64) + Sync) -> Vec<(f32, f32)> {
    // Every part's chunks in one parallel loop (one fork-join, not one per part).
    let chunks = len.div_ceil(ROW_CHUNK_ELEMS);
    let partials: Vec<(f64, f64)> = (0..parts * chunks)
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(ba, bb), j| {
                let (p, i) = (j / chunks, j % chunks);
                let start = p * len + i * ROW_CHUNK_ELEMS;
                f(start..(start + ROW_CHUNK_ELEMS).min((p + 1) * len), ba, bb)
            },
        )
        .collect();
    partials
        .chunks(chunks.max(1))
        .map(|c| c.iter().fold((0f64, 0f64), |(x, y), &(u, v)| (x + u, y + v)))
        .map(|(x, y)| (x as f32, y as f32))
        .chain(std::iter::repeat((0.0, 0.0)))
        .take(parts)
        .collect()
}

/// See [`Backend::l1_distance`](crate::backend::Backend::l1_distance).
pub fn l1_distance(a: &Tensor, b: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
    ensure!(a.shape() == b.shape(), "l1_distance: shapes {:?} and {:?} differ", a.shape(), b.shape());
    let len = part_len(a, parts, "l1_distance")?;
    let (da, db) = (Floats::of(a, "l1_distance: a")?, Floats::of(b, "l1_distance: b")?);
    Ok(part_sums(len, parts, |r, ba, bb| l1_sums(da.f32_range(r.clone(), ba), db.f32_range(r, bb))))
}

/// See [`Backend::abs_sum`](crate::backend::Backend::abs_sum).
pub fn abs_sum(a: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
    let len = part_len(a, parts, "abs_sum")?;
    let da = Floats::of(a, "abs_sum")?;
    Ok(part_sums(len, parts, |r, ba, _| abs_sq_sums(da.f32_range(r, ba))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both versions of `l1_sums` against the sums in f64 term by term, on lengths with
    /// every tail and on values of very different magnitudes.
    #[test]
    fn l1_sums_match_the_f64_sums() {
        let mut rng = crate::rng::Rng::new(11);
        for n in [0, 1, 7, 15, 16, 17, 31, 32, 33, 100, 1000, 4099] {
            let a: Vec<f32> = rng.normal_vec(n).iter().enumerate().map(|(i, v)| v * 10f32.powi(i as i32 % 7 - 3)).collect();
            let b: Vec<f32> = rng.normal_vec(n);
            let want = a.iter().zip(&b).fold((0f64, 0f64), |(d, m), (&x, &y)| (d + (x as f64 - y as f64).abs(), m + (y as f64).abs()));
            for (name, got) in [("dispatched", l1_sums(&a, &b)), ("portable", l1_sums_portable(&a, &b))] {
                for (g, w) in [(got.0, want.0), (got.1, want.1)] {
                    assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{name}, n = {n}: {g} against {w}");
                }
            }
        }
    }
}
