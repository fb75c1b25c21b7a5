//! GPTQ rounding of 4-bit weights (Frantar et al., 2022): the columns of a
//! weight are quantized in order, and each column's rounding error is pushed
//! onto the columns not yet quantized through the inverse of the layer's input
//! second moments `H = X^T X / rows`, so that the *output* error on the
//! calibration inputs, not the weight error, is what rounding minimises. The
//! result is an ordinary [`Int4Weight`] (same format, scales and kernels);
//! only the chosen integers differ from rounding to nearest.
//!
//! It needs the layer's input rows, which exist during calibration: quantized
//! checkpoints (`qc-run calibrate --budget`) store GPTQ-rounded int4 layers,
//! while presets quantized on the fly round to nearest.

use super::int4::{pack, quantize_group_weighted, Int4Weight, W4_GROUP};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Dampening added to `H`'s diagonal, relative to its mean (GPTQ's default).
const DAMP: f64 = 0.01;

/// Quantizes `w` (`[n, k]`) to int4 per output channel and group as
/// [`Int4Weight::quantize_weighted`] does (importance vector `smooth` folded in,
/// group clips chosen by the error weighted by the inputs' mean squares), but
/// rounding by GPTQ on the input rows `x` (`[rows, k]`, before smoothing).
pub fn quantize_int4(w: &[f32], n: usize, k: usize, smooth: Option<&[f32]>, act_qmax: i32, x: &[f32]) -> Result<Int4Weight> {
    ensure!(n > 0 && k > 0 && w.len() == n * k, "gptq: {} weight values for [{n}, {k}]", w.len());
    ensure!(!x.is_empty() && x.len().is_multiple_of(k), "gptq: {} input values are not rows of {k}", x.len());
    if let Some(s) = smooth {
        ensure!(s.len() == k && s.iter().all(|v| v.is_finite() && *v > 0.0), "gptq: the smoothing vector must have {k} positive finite entries");
    }
    let s = |c: usize| smooth.map_or(1.0, |s| s[c] as f64);
    let rows = x.len() / k;
    // H of the smoothed inputs x / s.
    let mut h = vec![0f64; k * k];
    h.par_chunks_mut(k).enumerate().for_each(|(i, hr)| {
        for r in x.chunks(k) {
            let xi = r[i] as f64 / s(i);
            if xi != 0.0 {
                for (j, hj) in hr.iter_mut().enumerate() {
                    *hj += xi * (r[j] as f64 / s(j));
                }
            }
        }
        hr.iter_mut().for_each(|v| *v /= rows as f64);
    });
    let act_sq: Vec<f32> = (0..k).map(|i| h[i * k + i] as f32).collect();
    // Channels no input reaches: any value is exact; keep them out of the solve.
    let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    let damp = DAMP * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    for i in 0..k {
        h[i * k + i] += if dead[i] { 1.0 } else { damp };
    }
    let u = upper_cholesky_of_inverse(h, k)?;

    let groups = k.div_ceil(W4_GROUP);
    let mut q = vec![0i8; n * k];
    let mut scale = vec![0f32; n * groups];
    q.par_chunks_mut(k).zip(scale.par_chunks_mut(groups)).enumerate().for_each(|(row, (qr, sr))| {
        let mut wr: Vec<f64> = (0..k).map(|c| if dead[c] { 0.0 } else { w[row * k + c] as f64 * s(c) }).collect();
        let mut scratch = [0i8; W4_GROUP];
        for (g, sg) in sr.iter_mut().enumerate() {
            let cols = g * W4_GROUP..((g + 1) * W4_GROUP).min(k);
            let group: Vec<f32> = wr[cols.clone()].iter().map(|v| *v as f32).collect();
            *sg = quantize_group_weighted(&group, &mut scratch[..cols.len()], Some(&act_sq[cols.clone()]));
            let (sc, inv) = (*sg, if *sg > 0.0 { 1.0 / *sg } else { 0.0 });
            for c in cols {
                let v = wr[c] as f32;
                let qv = (v * inv).round_ties_even().clamp(-7.0, 7.0);
                qr[c] = qv as i8;
                let err = (wr[c] - (qv * sc) as f64) / u[c * k + c];
                for l in c + 1..k {
                    wr[l] -= err * u[c * k + l];
                }
            }
        }
    });
    let inv_smooth = smooth.map(|s| s.iter().map(|v| 1.0 / v).collect());
    Int4Weight::from_parts(pack(&q, n, k), scale, n, k, inv_smooth, act_qmax)
}

/// `U` upper triangular with `U^T U = H^{-1}` (`H` symmetric positive definite, `[k, k]`).
fn upper_cholesky_of_inverse(h: Vec<f64>, k: usize) -> Result<Vec<f64>> {
    // H = L L^T; H^{-1} = L^{-T} L^{-1}; then the upper factor of H^{-1}.
    let l = cholesky_lower(h, k)?;
    let mut linv = vec![0f64; k * k];
    for i in 0..k {
        linv[i * k + i] = 1.0 / l[i * k + i];
        for j in 0..i {
            let mut sum = 0f64;
            for m in j..i {
                sum += l[i * k + m] * linv[m * k + j];
            }
            linv[i * k + j] = -sum / l[i * k + i];
        }
    }
    // H^{-1} = Linv^T Linv.
    let mut hinv = vec![0f64; k * k];
    hinv.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            let start = i.max(j);
            *v = (start..k).map(|m| linv[m * k + i] * linv[m * k + j]).sum();
        }
    });
    let lo = cholesky_lower(hinv, k)?;
    // U = lo^T.
    let mut u = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            u[j * k + i] = lo[i * k + j];
        }
    }
    Ok(u)
}

/// The lower Cholesky factor of a symmetric positive definite `[k, k]` matrix.
fn cholesky_lower(mut a: Vec<f64>, k: usize) -> Result<Vec<f64>> {
    for j in 0..k {
        let d = a[j * k + j] - (0..j).map(|m| a[j * k + m] * a[j * k + m]).sum::<f64>();
        ensure!(d > 0.0 && d.is_finite(), "gptq: the input second moments are not positive definite (column {j})");
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let v = (a[i * k + j] - (0..j).map(|m| a[i * k + m] * a[j * k + m]).sum::<f64>()) / d;
            a[i * k + j] = v;
        }
    }
    for i in 0..k {
        for j in i + 1..k {
            a[i * k + j] = 0.0;
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int8::QMAX_A8;
    use crate::rng::Rng;

    /// |X W'^T - X W^T| / |X W^T| over the rows `x`.
    fn output_error(x: &[f32], w: &[f32], q: &Int4Weight, n: usize, k: usize) -> f64 {
        let deq = q.dequantize();
        let inv = q.inv_smooth.clone().unwrap_or_else(|| vec![1.0; k]);
        let (mut num, mut den) = (0f64, 0f64);
        for r in x.chunks(k) {
            for o in 0..n {
                let exact: f64 = (0..k).map(|c| r[c] as f64 * w[o * k + c] as f64).sum();
                let got: f64 = (0..k).map(|c| r[c] as f64 * inv[c] as f64 * deq[o * k + c] as f64).sum();
                num += (got - exact).powi(2);
                den += exact.powi(2);
            }
        }
        (num / den).sqrt()
    }

    #[test]
    fn cholesky_of_inverse_inverts() {
        let mut rng = Rng::new(3);
        let k = 9;
        let a: Vec<f64> = (0..k * k).map(|_| rng.normal() as f64).collect();
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = (0..k).map(|m| a[i * k + m] * a[j * k + m]).sum::<f64>() + if i == j { 0.5 } else { 0.0 };
            }
        }
        let u = upper_cholesky_of_inverse(h.clone(), k).unwrap();
        // U^T U H = I.
        for i in 0..k {
            for j in 0..k {
                let v: f64 = (0..k).map(|m| (0..k).map(|p| u[p * k + i] * u[p * k + m]).sum::<f64>() * h[m * k + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8, "{i} {j} {v}");
            }
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0);
            }
        }
        assert!(cholesky_lower(vec![1.0, 2.0, 2.0, 1.0], 2).is_err());
    }

    #[test]
    fn gptq_lowers_the_output_error_on_correlated_inputs() {
        let mut rng = Rng::new(7);
        for (n, k, rows) in [(24, 64, 300), (16, 130, 400), (8, 256, 600)] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
            // Inputs with a few strong shared directions and uneven channel scales, as activations have.
            let basis: Vec<f32> = (0..4 * k).map(|_| rng.normal()).collect();
            let chan: Vec<f32> = (0..k).map(|c| if c % 17 == 0 { 6.0 } else { 0.5 + (c % 5) as f32 * 0.3 }).collect();
            let x: Vec<f32> = (0..rows)
                .flat_map(|_| {
                    let coef: Vec<f32> = (0..4).map(|_| rng.normal()).collect();
                    let noise: Vec<f32> = (0..k).map(|_| rng.normal() * 0.3).collect();
                    (0..k).map(|c| chan[c] * ((0..4).map(|b| coef[b] * basis[b * k + c]).sum::<f32>() + noise[c])).collect::<Vec<_>>()
                })
                .collect();
            let smooth: Vec<f32> = chan.iter().map(|c| c.sqrt()).collect();
            for sm in [None, Some(smooth.as_slice())] {
                let rtn = Int4Weight::quantize(&w, n, k, sm, QMAX_A8).unwrap();
                let g = quantize_int4(&w, n, k, sm, QMAX_A8, &x).unwrap();
                let (e_rtn, e_g) = (output_error(&x, &w, &rtn, n, k), output_error(&x, &w, &g, n, k));
                assert!(e_g < 0.85 * e_rtn, "[{n}, {k}] smooth {}: gptq {e_g} vs nearest {e_rtn}", sm.is_some());
                assert!(g.unpack().iter().all(|v| (-7..=7).contains(v)));
            }
        }
        // A channel no input reaches is quantized to zero, not left undefined.
        let (n, k) = (4, 64);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let x: Vec<f32> = (0..50 * k).map(|i| if i % k == 3 { 0.0 } else { ((i * 31) % 11) as f32 - 5.0 }).collect();
        let g = quantize_int4(&w, n, k, None, QMAX_A8, &x).unwrap();
        assert!(g.unpack().chunks(k).all(|r| r[3] == 0));
        assert!(quantize_int4(&w, n, k, None, QMAX_A8, &x[..10]).is_err());
    }
}
