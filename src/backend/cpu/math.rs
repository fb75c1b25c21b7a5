//! Branch-free transcendental functions that the compiler vectorizes in loops.
//! libm's `expf`/`tanhf` are scalar calls and dominate GELU/softmax time otherwise.

/// `e^x` with a relative error under 2e-7 for x in [-87, 88]; 0 below, +inf-safe above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a high part exact in f32 and a low correction (Cody-Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by adding and subtracting 1.5 * 2^23: plain arithmetic, so the
    // loop vectorizes (f32::round is a libm call on baseline x86-64).
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUNDER) - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf coefficients).
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits of n + 127 + 2^23 (n + 127 in 0..=254 sits in the low mantissa
    // bits): integer conversions would stop the loop from vectorizing.
    let bits = (n + (127.0 + 8_388_608.0)).to_bits() << 23;
    let scaled = e * f32::from_bits(bits);
    if x <= -87.0 {
        0.0
    } else {
        scaled
    }
}

use super::simd::multiversion;

multiversion! {
/// In place `row = exp(row - max(row))`; returns the sum.
pub fn softmax_numerators(row: &mut [f32]) -> f32 {
    softmax_numerators_inline(row)
}
}

/// [`softmax_numerators`] for callers that are themselves multiversioned. Reductions
/// run in 16 independent lanes and the exponentials in a separate pass, so both vectorize.
#[inline(always)]
pub fn softmax_numerators_inline(row: &mut [f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = chunks.remainder().iter().fold(reduce16(mx, f32::max), |a, &b| a.max(b));
    for x in row.iter_mut() {
        *x = exp(*x - m);
    }
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    chunks.remainder().iter().sum::<f32>() + reduce16(acc, |a, b| a + b)
}

/// `f` folded over 16 lanes as a tree (halves, quarters, ...): each level is one
/// shuffle and one vector op, where a left-to-right fold is 15 dependent scalar
/// ones, which dominated the softmax of short rows.
#[inline(always)]
pub fn reduce16(mut v: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            v[i] = f(v[i], v[i + w]);
        }
    }
    v[0]
}

/// tanh through `1 - 2 / (e^{2x} + 1)`; absolute error ~1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// GELU with the tanh approximation, as `nn.GELU(approximate="tanh")`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + tanh(K * (x + 0.044_715 * x * x * x)))
}

/// [`gelu_tanh`] over a slice with AVX-512, as `x * e / (e + 1)` with `e =
/// e^{2u}` (the same function: `(1 + tanh u) / 2 = 1 - 1 / (e + 1)`), the
/// reciprocal from `vrcp14ps` and one Newton step (relative error ~4e-9): the
/// division was half of the portable loop's time on Zen 4 (measured).
///
/// # Safety
/// The CPU must have AVX-512 (F, VL, BW, DQ) and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
pub unsafe fn gelu_tanh_avx512(v: &mut [f32]) {
    gelu_slice::<false>(v)
}

/// GELU over a slice, 16 lanes at a time (the tail masked): the exact
/// [`gelu_tanh_v`] or, with `FAST`, [`gelu_tanh_fast_v`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gelu_slice<const FAST: bool>(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let gelu = |x: __m512| if FAST { gelu_tanh_fast_v(x) } else { gelu_tanh_v(x) };
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        _mm512_storeu_ps(c.as_mut_ptr(), gelu(_mm512_loadu_ps(c.as_ptr())));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mask = (1u16 << rest.len()) - 1;
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, gelu(_mm512_maskz_loadu_ps(mask, rest.as_ptr())));
    }
}

/// [`gelu_tanh_avx512`] on 16 lanes. `e = 2^y` with `y = 2u log2(e)`, from
/// `y`'s rounding `n` and a degree-6 polynomial of `y - n` in [-1/2, 1/2]
/// (relative error ~2e-7), scaled by `vscalefps`: 10 operations where the
/// portable [`exp`]'s separate multiplies and adds (Rust does not contract
/// them), clamps and integer tricks took 26, which made GELU a tenth of a W8A8
/// step on the demo (measured). `y` is capped at 100 so that `e + 1` keeps a
/// reciprocal (GELU(x) = x there); very negative `y` scales to 0 (GELU = 0).
///
/// # Safety
/// The CPU must have AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub unsafe fn gelu_tanh_v(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const K: f32 = 0.797_884_6;
    let set = _mm512_set1_ps;
    let x2 = _mm512_mul_ps(x, x);
    // y = 2 K log2(e) (x + 0.044715 x^3); `min_ps(100, y)` keeps a NaN.
    let inner = _mm512_fmadd_ps(_mm512_mul_ps(set(0.044_715), x2), x, x);
    let y = _mm512_min_ps(set(100.0), _mm512_mul_ps(set(2.0 * K * std::f32::consts::LOG2_E), inner));
    let e = exp2_v(y);
    let d = _mm512_add_ps(e, set(1.0));
    let r0 = _mm512_rcp14_ps(d);
    // r = r0 (2 - d r0)
    let r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, set(2.0)));
    _mm512_fnmadd_ps(x, r, x)
}

/// [`gelu_tanh`] to about 1e-4 relative, for the integer linears' outputs
/// (whose next consumer quantizes them to 8 bits or fewer, a step of 1/127 of
/// the row's largest value and more): [`gelu_tanh_fast_v`] over a slice. 15
/// operations a vector where [`gelu_tanh_avx512`] takes 19; it was two fifths
/// of a W8A8 MLP's time on the demo (measured).
///
/// # Safety
/// The CPU must have AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn gelu_tanh_fast_avx512(v: &mut [f32]) {
    gelu_slice::<true>(v)
}

/// [`gelu_tanh_v`] as `x e / (e + 1)` with the cheaper parts: `y = x (a + b
/// x^2)` (one multiply less), `2^f` by its degree-4 minimax polynomial on
/// [-1/2, 1/2] (relative error 2.6e-6), and the reciprocal from `vrcp14ps`
/// alone (relative error under 2^-14). `e / (e + 1)` rather than `1 - 1 / (e +
/// 1)` keeps that error relative where GELU is tiny (large negative `x`);
/// very negative `x` gives exactly 0 (`e` = 0).
///
/// # Safety
/// The CPU must have AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub unsafe fn gelu_tanh_fast_v(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const A: f32 = 2.0 * 0.797_884_6 * std::f32::consts::LOG2_E;
    let set = _mm512_set1_ps;
    // y = 2 K log2(e) (x + 0.044715 x^3), capped at 100 (`min_ps(100, y)` keeps a NaN).
    let y = _mm512_min_ps(set(100.0), _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(x, x), set(A * 0.044_715), set(A)), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
    let f = _mm512_sub_ps(y, n);
    let mut p = set(9.570_069e-3);
    for c in [5.591_781e-2, 2.402_474_5e-1, 6.931_218e-1, 9.999_993e-1] {
        p = _mm512_fmadd_ps(p, f, set(c));
    }
    let e = _mm512_scalef_ps(p, n);
    _mm512_mul_ps(x, _mm512_mul_ps(e, _mm512_rcp14_ps(_mm512_add_ps(e, set(1.0)))))
}

/// `2^y` on 16 lanes: `2^f` for `f = y - round(y)` in [-1/2, 1/2] by its
/// degree-6 Taylor polynomial (relative error under 2e-7 there), scaled by
/// `2^round(y)` with `vscalefps` (0 for very negative `y`, infinity above 128).
///
/// # Safety
/// The CPU must have AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub unsafe fn exp2_v(y: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
    let f = _mm512_sub_ps(y, n);
    // (ln 2)^i / i!, i = 6 .. 0.
    let mut p = _mm512_set1_ps(1.540_353e-4);
    for c in [1.333_355_8e-3, 9.618_129e-3, 5.550_411e-2, 2.402_265e-1, 6.931_472e-1, 1.0] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
    }

    /// `exp2_v` against f64 over the range the softmax and GELU use, and its limits.
    #[test]
    fn exp2_v_is_accurate() {
        if crate::backend::cpu::simd::level() != crate::backend::cpu::simd::Level::Avx512 {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (0..48_000).map(|i| -120.0 + i as f32 * 0.005).collect();
        xs.resize(xs.len().next_multiple_of(16), 0.0);
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: level() is Avx512 (with FMA); 16 lanes in and out.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(got.as_mut_ptr(), exp2_v(_mm512_loadu_ps(c.as_ptr())));
            }
            for (&x, &g) in c.iter().zip(&got) {
                let want = (x as f64).exp2();
                assert!((g as f64 - want).abs() <= 4e-7 * want, "2^{x} = {g}, want {want}");
            }
        }
        let mut got = [0f32; 16];
        // SAFETY: as above.
        unsafe {
            use std::arch::x86_64::*;
            _mm512_storeu_ps(got.as_mut_ptr(), exp2_v(_mm512_setr_ps(-1e30, -200.0, 200.0, f32::NAN, 0.0, 1.0, -1.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)));
        }
        assert_eq!(&got[..3], &[0.0, 0.0, f32::INFINITY]);
        assert!(got[3].is_nan());
        assert_eq!(&got[4..8], &[1.0, 2.0, 0.5, 1024.0]);
    }

    /// The fast GELU within 1.2e-4 of the value (plus 1e-6 absolute) on a fine
    /// grid and at the extremes, exactly 0 far left, NaN kept.
    #[test]
    fn fast_gelu_is_close_and_exact_at_the_ends() {
        if crate::backend::cpu::simd::level() != crate::backend::cpu::simd::Level::Avx512 {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (0..24_003).map(|i| -12.0 + i as f32 * 0.001).collect();
        xs.extend([-100.0, -88.0, -20.0, 20.0, 88.0, 100.0, 1e30, -f32::MAX, 0.0, 1e-30, -1e-30]);
        let mut got = xs.clone();
        // SAFETY: level() is Avx512 (with FMA).
        unsafe { gelu_tanh_fast_avx512(&mut got) };
        let mut worst = 0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            let xd = x as f64;
            let want = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            let want = if want.is_finite() { want } else { if x > 0.0 { xd } else { 0.0 } };
            let err = (g as f64 - want).abs() / (1e-2 + want.abs());
            worst = worst.max(err);
            assert!((g as f64 - want).abs() <= 1.2e-4 * want.abs() + 1e-6, "fast gelu({x}) = {g}, want {want}");
        }
        assert!(worst > 1e-7, "the fast GELU is the exact one? worst {worst}");
        for x in [-100.0f32, -20.0, -f32::MAX] {
            let mut v = [x];
            // SAFETY: as above.
            unsafe { gelu_tanh_fast_avx512(&mut v) };
            assert_eq!(v[0], 0.0, "fast gelu({x})");
        }
        let mut v = [f32::NAN, 1.0];
        // SAFETY: as above.
        unsafe { gelu_tanh_fast_avx512(&mut v) };
        assert!(v[0].is_nan());
    }

    #[test]
    fn gelu_avx512_matches_reference() {
        if crate::backend::cpu::simd::level() != crate::backend::cpu::simd::Level::Avx512 {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        // Every 0.001 over [-12, 12] plus extremes, in a length with a remainder.
        let mut xs: Vec<f32> = (0..24_003).map(|i| -12.0 + i as f32 * 0.001).collect();
        xs.extend([-100.0, -88.0, 88.0, 100.0, f32::MAX, -f32::MAX, 0.0]);
        let mut got = xs.clone();
        // SAFETY: level() is Avx512.
        unsafe { gelu_tanh_avx512(&mut got) };
        for (&x, &g) in xs.iter().zip(&got) {
            let xd = x as f64;
            let want = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            let want = if want.is_finite() { want } else { if x > 0.0 { xd } else { 0.0 } };
            assert!((g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "gelu({x}) = {g}, want {want}");
        }
    }

    #[test]
    fn gelu_and_silu_match_reference() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let g = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            assert!((gelu_tanh(x) as f64 - g).abs() < 1e-6 * (1.0 + g.abs()), "gelu({x})");
            let s = xd / (1.0 + (-xd).exp());
            assert!((silu(x) as f64 - s).abs() < 1e-6 * (1.0 + s.abs()), "silu({x})");
            x += 0.01;
        }
    }
}
