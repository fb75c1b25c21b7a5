//! Row-wise normalizations and rotary embedding: portable loops (the
//! reference, compiled for each [`Level`](super::simd::Level)) and AVX-512
//! intrinsics. The portable loops' 16-lane arrays compiled to 128-bit pieces
//! and stack spills, at 4-8x the intrinsics' time for the demo's 64-wide rows
//! and 16-wide heads (measured).

use super::simd::{level, multiversion, Level};

/// Sum with 16 independent lanes so the loop vectorizes and rounding stays small.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += f(c[i]);
        }
    }
    let s: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    s + super::math::reduce16(acc, |a, b| a + b)
}

/// `LN(x) * (1 + scale) + shift` (no affine, biased variance), or plain LN.
pub fn layer_norm_row(x: &[f32], out: &mut [f32], eps: f32, modulation: Option<(&[f32], &[f32])>) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512.
        return unsafe { avx512::layer_norm_row(x, out, eps, modulation) };
    }
    layer_norm_row_portable(x, out, eps, modulation)
}

multiversion! {
fn layer_norm_row_portable(x: &[f32], out: &mut [f32], eps: f32, modulation: Option<(&[f32], &[f32])>) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    match modulation {
        None => out.iter_mut().zip(x).for_each(|(o, &v)| *o = (v - mean) * rstd),
        Some((shift, scale)) => {
            for (((o, &v), &sh), &sc) in out.iter_mut().zip(x).zip(shift).zip(scale) {
                *o = (v - mean) * rstd * (1.0 + sc) + sh;
            }
        }
    }
}
}

/// The rotary embedding of one position for head dim `d`, as two rows of `d`:
/// `cos` repeated for both values of each pair, then `sin` with the sign of
/// its use (`-sin` at even indices), so that `x' = x * cos + swap_pairs(x) * sin`.
pub fn rope_table(freqs: &[f32], seq_len: usize) -> Vec<f32> {
    let d = 2 * freqs.len();
    let mut t = vec![0f32; seq_len * 2 * d];
    for (p, row) in t.chunks_exact_mut(2 * d).enumerate() {
        let (cos, sin) = row.split_at_mut(d);
        for (k, &f) in freqs.iter().enumerate() {
            let (s, c) = (p as f32 * f).sin_cos();
            cos[2 * k..2 * k + 2].copy_from_slice(&[c, c]);
            sin[2 * k..2 * k + 2].copy_from_slice(&[-s, s]);
        }
    }
    t
}

/// Rows `first_row..` of Q or K (`rows` a whole number of rows of `c` values,
/// heads of `w.len()`): every head's RMS norm (LlamaRMSNorm, weight `w`), then,
/// with `rope = (table, seq_len)` from [`rope_table`], the rotary embedding
/// (rotary_embedding_torch 0.5.3: pairs (2k, 2k+1)) of position `row % seq_len`.
pub fn qk_norm_rope_rows(rows: &mut [f32], c: usize, first_row: usize, w: &[f32], eps: f32, rope: Option<(&[f32], usize)>) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512.
        return unsafe { avx512::qk_norm_rope_rows(rows, c, first_row, w, eps, rope) };
    }
    qk_norm_rope_rows_portable(rows, c, first_row, w, eps, rope)
}

/// [`qk_norm_rope_rows`] into `dst` (`rows * c` values) from rows read
/// elsewhere: output row `i` from `src(i)` (`c` values). The same values as
/// copying the rows into `dst` first; with AVX-512 the copy is left out (the
/// norm reads the source, writes the output).
pub fn qk_norm_rope_gather<'a>(dst: &mut [std::mem::MaybeUninit<f32>], c: usize, first_row: usize, src: impl Fn(usize) -> &'a [f32], w: &[f32], eps: f32, rope: Option<(&[f32], usize)>) {
    assert!(c > 0 && dst.len().is_multiple_of(c));
    let rows = dst.len() / c;
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // The kernel asks for each row once, in order.
        let row = |i: usize| {
            let r = src(i);
            assert!(r.len() >= c);
            r.as_ptr()
        };
        // SAFETY: AVX-512 checked; every source row holds `c` values (asserted)
        // and lies outside `dst` (a shared borrow cannot alias the exclusive
        // one); every value of `dst` is written.
        return unsafe { avx512::qk_norm_rope_from(dst.as_mut_ptr() as *mut f32, rows, c, first_row, row, w, eps, rope) };
    }
    for (i, d) in dst.chunks_mut(c).enumerate() {
        d.write_copy_of_slice(&src(i)[..c]);
    }
    // SAFETY: every value was written just above; MaybeUninit<f32> has f32's layout.
    let rows_f32 = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
    qk_norm_rope_rows_portable(rows_f32, c, first_row, w, eps, rope)
}

multiversion! {
fn qk_norm_rope_rows_portable(rows: &mut [f32], c: usize, first_row: usize, w: &[f32], eps: f32, rope: Option<(&[f32], usize)>) {
    let d = w.len();
    for (i, r) in rows.chunks_exact_mut(c).enumerate() {
        for h in r.chunks_exact_mut(d) {
            let ms = lane_sum(h, |v| v * v) / d as f32;
            let rs = 1.0 / (ms + eps).sqrt();
            h.iter_mut().zip(w).for_each(|(v, &ww)| *v = ww * (*v * rs));
            if let Some((table, seq_len)) = rope {
                let (cos, sin) = table[((first_row + i) % seq_len) * 2 * d..][..2 * d].split_at(d);
                for k in (0..d).step_by(2) {
                    let (a, b) = (h[k], h[k + 1]);
                    h[k] = a * cos[k] + b * sin[k];
                    h[k + 1] = b * cos[k + 1] + a * sin[k + 1];
                }
            }
        }
    }
}
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::simd::lanes16 as mask;
    use super::super::simd::{reduce_vectors16, REDUCED_LANE};

    /// Sum of `f(x)` over `x[..len]` (masked lanes contribute 0).
    #[inline(always)]
    unsafe fn sum(x: *const f32, len: usize, f: impl Fn(__mmask16, __m512) -> __m512) -> f32 {
        _mm512_reduce_add_ps(lane_sums(x, len, f))
    }

    /// [`sum`] before its last reduction: each lane's sum.
    #[inline(always)]
    unsafe fn lane_sums(x: *const f32, len: usize, f: impl Fn(__mmask16, __m512) -> __m512) -> __m512 {
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < len {
            let m = mask(len, i);
            acc = _mm512_add_ps(acc, f(m, _mm512_maskz_loadu_ps(m, x.add(i))));
            i += 16;
        }
        acc
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub unsafe fn layer_norm_row(x: &[f32], out: &mut [f32], eps: f32, modulation: Option<(&[f32], &[f32])>) {
        let n = x.len();
        assert!(out.len() >= n && modulation.is_none_or(|(sh, sc)| sh.len() >= n && sc.len() >= n));
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        let mean = sum(xp, n, |_, v| v) / n as f32;
        let vmean = _mm512_set1_ps(mean);
        let var = sum(xp, n, |m, v| {
            let d = _mm512_maskz_sub_ps(m, v, vmean);
            _mm512_mul_ps(d, d)
        }) / n as f32;
        let vrstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = mask(n, i);
            // The portable loop's operations in its order: equal results.
            let mut y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xp.add(i)), vmean), vrstd);
            if let Some((shift, scale)) = modulation {
                let sc = _mm512_add_ps(one, _mm512_maskz_loadu_ps(m, scale.as_ptr().add(i)));
                y = _mm512_add_ps(_mm512_mul_ps(y, sc), _mm512_maskz_loadu_ps(m, shift.as_ptr().add(i)));
            }
            _mm512_mask_storeu_ps(op.add(i), m, y);
            i += 16;
        }
    }

    /// The heads (runs of `d` values) are normalized 16 at a time: their sums of
    /// squares reduced together ([`reduce_vectors16`], bit for bit `_mm512_reduce_add_ps`'s sums) and their scales in one vector
    /// division. One head at a time, the reduction's and the scalar square
    /// root's latencies were most of the op (4 heads of 16 per row at the demo's
    /// width; the same values, bit for bit).
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub unsafe fn qk_norm_rope_rows(rows: &mut [f32], c: usize, first_row: usize, w: &[f32], eps: f32, rope: Option<(&[f32], usize)>) {
        assert!(c > 0 && rows.len().is_multiple_of(c));
        let rp = rows.as_mut_ptr();
        qk_norm_rope_from(rp, rows.len() / c, c, first_row, |i| rp.add(i * c) as *const f32, w, eps, rope)
    }

    /// [`qk_norm_rope_rows`] of `rows` rows of `c` values at `dst`, row `i` read
    /// from `src(i)` (which may be `dst`'s own row: each head is read, then written).
    ///
    /// # Safety
    /// AVX-512; `dst` holds `rows * c` writable values, each `src(i)` `c` readable ones.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub unsafe fn qk_norm_rope_from(dst: *mut f32, rows: usize, c: usize, first_row: usize, src: impl Fn(usize) -> *const f32, w: &[f32], eps: f32, rope: Option<(&[f32], usize)>) {
        let d = w.len();
        assert!(d > 0 && (rope.is_none() || d.is_multiple_of(2)) && c.is_multiple_of(d));
        if let Some((table, seq_len)) = rope {
            assert!(seq_len > 0 && table.len() >= seq_len * 2 * d);
        }
        let (heads_per_row, heads) = (c / d, rows * c / d);
        // Each head's source and rotation follow the row counters: no division
        // per head (two per head were a third of the op at the demo's width).
        let rotation = |row: usize| rope.map(|(table, seq_len)| table.as_ptr().add(((first_row + row) % seq_len) * 2 * d));
        let (mut row, mut in_row) = (0, 0);
        let (mut row_src, mut row_rot) = if rows > 0 { (src(0), rotation(0)) } else { (std::ptr::null(), None) };
        let mut g = 0;
        while g < heads {
            let n = 16.min(heads - g);
            let mut from = [std::ptr::null::<f32>(); 16];
            let mut rot = [None; 16];
            for i in 0..n {
                from[i] = row_src.add(in_row * d);
                rot[i] = row_rot;
                in_row += 1;
                if in_row == heads_per_row && row + 1 < rows {
                    (in_row, row) = (0, row + 1);
                    (row_src, row_rot) = (src(row), rotation(row));
                }
            }
            let mut acc = [_mm512_setzero_ps(); 16];
            for (a, &hp) in acc.iter_mut().zip(&from).take(n) {
                *a = lane_sums(hp, d, |_, v| _mm512_mul_ps(v, v));
            }
            let ms = _mm512_div_ps(reduce_vectors16(&acc, |a, b| _mm512_add_ps(a, b)), _mm512_set1_ps(d as f32));
            let mut scale = [0f32; 16];
            _mm512_storeu_ps(scale.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_sqrt_ps(_mm512_add_ps(ms, _mm512_set1_ps(eps)))));
            for i in 0..n {
                scale_rotate(from[i], dst.add((g + i) * d), d, w, _mm512_set1_ps(scale[REDUCED_LANE[i]]), rot[i]);
            }
            g += n;
        }
    }

    /// One head from `hp` to `out`: `w * (x * rs)`, then the rotation from `rot` (cos, then sin) if any.
    #[inline(always)]
    unsafe fn scale_rotate(hp: *const f32, out: *mut f32, d: usize, w: &[f32], rs: __m512, rot: Option<*const f32>) {
        let mut j = 0;
        while j < d {
            let m = mask(d, j);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w.as_ptr().add(j)), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, hp.add(j)), rs));
            let v = match rot {
                None => v,
                Some(t) => {
                    // Pairs never straddle a vector: `d` and 16 are even.
                    let swapped = _mm512_permute_ps::<0b10_11_00_01>(v);
                    let (cos, sin) = (_mm512_maskz_loadu_ps(m, t.add(j)), _mm512_maskz_loadu_ps(m, t.add(d + j)));
                    _mm512_add_ps(_mm512_mul_ps(v, cos), _mm512_mul_ps(swapped, sin))
                }
            };
            _mm512_mask_storeu_ps(out.add(j), m, v);
            j += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The AVX-512 rows against the portable loops, at widths with and without
    /// a partial vector, with and without modulation and rope.
    #[test]
    fn avx512_matches_portable() {
        if level() != Level::Avx512 {
            eprintln!("no AVX-512 on this CPU: only the portable loops run");
            return;
        }
        let mut rng = Rng::new(11);
        for c in [64, 72, 1152, 40, 3] {
            let x: Vec<f32> = rng.normal_vec(c).iter().map(|v| 3.0 * v + 0.5).collect();
            let (sh, sc) = (rng.normal_vec(c), rng.normal_vec(c));
            for m in [None, Some((&sh[..], &sc[..]))] {
                let (mut want, mut got) = (vec![0f32; c], vec![0f32; c]);
                layer_norm_row_portable(&x, &mut want, 1e-6, m);
                // SAFETY: level() is Avx512.
                unsafe { avx512::layer_norm_row(&x, &mut got, 1e-6, m) };
                let err = crate::tensor::rel_l2(&got, &want);
                assert!(err < 1e-6, "layer norm c {c}: relative L2 {err}");
            }
        }
        for (d, heads, seq_len, rows) in [(16, 4, 4, 9), (72, 3, 5, 11), (32, 2, 1, 3), (6, 2, 3, 4)] {
            let c = d * heads;
            let x = rng.normal_vec(rows * c);
            let w = rng.normal_vec(d);
            let freqs: Vec<f32> = (0..d / 2).map(|k| 10000f32.powf(-2.0 * k as f32 / d as f32)).collect();
            let table = rope_table(&freqs, seq_len);
            for rope in [None, Some((&table[..], seq_len))] {
                let (mut want, mut got) = (x.clone(), x.clone());
                qk_norm_rope_rows_portable(&mut want, c, 2, &w, 1e-6, rope);
                // SAFETY: level() is Avx512.
                unsafe { avx512::qk_norm_rope_rows(&mut got, c, 2, &w, 1e-6, rope) };
                let err = crate::tensor::rel_l2(&got, &want);
                assert!(err < 1e-6, "qk norm d {d}: relative L2 {err}");
            }
        }
    }

    /// 16 heads at a time give each head's values of one head at a time, bit for
    /// bit: `simd::reduce_vectors16`'s lanes are `_mm512_reduce_add_ps` of each vector, in `simd::REDUCED_LANE`'s places.
    #[test]
    fn heads_normalized_together_match_one_at_a_time() {
        if level() != Level::Avx512 {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        let mut rng = Rng::new(12);
        // Heads of 16 (one vector), 72 (a partial one), 6; head counts not multiples of 16.
        for (d, heads, rows) in [(16, 4, 9), (72, 3, 11), (6, 2, 5), (16, 1, 37)] {
            let c = d * heads;
            let x: Vec<f32> = rng.normal_vec(rows * c).iter().map(|v| 5.0 * v).collect();
            let w = rng.normal_vec(d);
            let mut got = x.clone();
            // SAFETY: level() is Avx512.
            unsafe { avx512::qk_norm_rope_rows(&mut got, c, 0, &w, 1e-6, None) };
            for (h, (xs, gs)) in x.chunks(d).zip(got.chunks(d)).enumerate() {
                // SAFETY: as above; the loads are masked to the head.
                let total = unsafe {
                    let mut acc = _mm512_setzero_ps();
                    for j in (0..d).step_by(16) {
                        let m = crate::backend::cpu::simd::lanes16(d, j);
                        let v = _mm512_maskz_loadu_ps(m, xs.as_ptr().add(j));
                        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
                    }
                    _mm512_reduce_add_ps(acc)
                };
                let rs = 1.0 / (total / d as f32 + 1e-6).sqrt();
                for (j, (&v, &g)) in xs.iter().zip(gs).enumerate() {
                    assert_eq!(g.to_bits(), (w[j] * (v * rs)).to_bits(), "d {d}, head {h}, value {j}");
                }
            }
        }
    }

    /// Normalizing from rows elsewhere equals copying them in, then normalizing in place.
    #[test]
    fn gathered_rows_equal_copied_ones() {
        let mut rng = Rng::new(13);
        for (d, heads, rows) in [(16, 4, 9), (72, 2, 5)] {
            let c = d * heads;
            let src = rng.normal_vec(rows * 3 * c);
            let w = rng.normal_vec(d);
            let freqs: Vec<f32> = (0..d / 2).map(|k| 10000f32.powf(-2.0 * k as f32 / d as f32)).collect();
            let table = rope_table(&freqs, 3);
            // Output row i from the middle third of source row rows - 1 - i.
            let row = |i: usize| &src[(rows - 1 - i) * 3 * c + c..][..c];
            let mut want: Vec<f32> = (0..rows).flat_map(|i| row(i).to_vec()).collect();
            qk_norm_rope_rows(&mut want, c, 1, &w, 1e-6, Some((&table, 3)));
            let mut got = vec![std::mem::MaybeUninit::new(f32::NAN); rows * c];
            qk_norm_rope_gather(&mut got, c, 1, row, &w, 1e-6, Some((&table, 3)));
            // SAFETY: initialized above.
            let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(got, want, "d {d}");
        }
    }

    /// The rope table rotates each pair by `pos * freq`, as `(a, b) -> (a cos - b sin, b cos + a sin)`.
    #[test]
    fn rope_rotates_pairs() {
        let freqs = [0.5f32, 0.1];
        let table = rope_table(&freqs, 3);
        let x = [1.0f32, 2.0, -3.0, 0.5];
        let w = [1.0f32; 4];
        let mut got = x.to_vec();
        // Norm first: compare against the rotation of the normed row.
        let rs = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-6).sqrt();
        qk_norm_rope_rows(&mut got, 4, 2, &w, 1e-6, Some((&table, 3)));
        for (k, &f) in freqs.iter().enumerate() {
            let (s, c) = (2.0 * f).sin_cos();
            let (a, b) = (x[2 * k] * rs, x[2 * k + 1] * rs);
            assert!((got[2 * k] - (a * c - b * s)).abs() < 1e-6 && (got[2 * k + 1] - (b * c + a * s)).abs() < 1e-6, "pair {k}: {got:?}");
        }
    }
}
