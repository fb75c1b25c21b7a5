//! Row-wise normalizations and rotary embedding.

use super::simd::multiversion;

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
    let mut s: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    s += acc.iter().sum::<f32>();
    s
}

multiversion! {
/// `LN(x) * (1 + scale) + shift` (no affine, biased variance), or plain LN.
pub fn layer_norm_row(x: &[f32], out: &mut [f32], eps: f32, modulation: Option<(&[f32], &[f32])>) {
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

multiversion! {
/// LlamaRMSNorm: `w * x * rsqrt(mean(x^2) + eps)`.
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = lane_sum(x, |v| v * v) / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter_mut().zip(w).for_each(|(v, &ww)| *v = ww * (*v * r));
}
}

multiversion! {
/// rotary_embedding_torch 0.5.3: pairs (2k, 2k+1) rotated by the angle whose
/// `(cos, sin)` is `rot[k]` (`pos * freqs[k]`).
pub fn rope_in_place(x: &mut [f32], rot: &[(f32, f32)]) {
    for (pair, &(c, s)) in x.chunks_exact_mut(2).zip(rot) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = b * c + a * s;
    }
}
}
