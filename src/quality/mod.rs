//! Quality of an accelerated video against the reference video of the same
//! engine: PSNR, SSIM, mean absolute error, temporal consistency; and a
//! prompt-following detector for the demonstration model's domain.

pub mod detector;
pub mod harness;

/// Metrics of one video `[3, T, H, W]` (values in about [-1, 1]) against its reference.
#[derive(Clone, Copy, Debug, Default)]
pub struct VideoMetrics {
    /// dB over pixel values mapped to [0, 1]; infinite for identical videos.
    pub psnr: f64,
    /// Mean SSIM over frames and channels (Gaussian window 11, sigma 1.5, shrunk for small frames).
    pub ssim: f64,
    /// Mean absolute error in [0, 1] pixel units.
    pub mae: f64,
    /// Mean frame-to-frame change of the video over that of the reference (1 = as much motion).
    pub temporal_ratio: f64,
}

fn to_unit(x: f32) -> f64 {
    ((x.clamp(-1.0, 1.0) as f64) + 1.0) / 2.0
}

/// Mean absolute change between consecutive frames of `[C, T, H, W]`.
pub fn temporal_change(v: &[f32], c: usize, t: usize, hw: usize) -> f64 {
    if t < 2 {
        return 0.0;
    }
    let mut sum = 0.0;
    for ci in 0..c {
        for ti in 1..t {
            let (a, b) = (&v[(ci * t + ti - 1) * hw..][..hw], &v[(ci * t + ti) * hw..][..hw]);
            sum += a.iter().zip(b).map(|(x, y)| (to_unit(*x) - to_unit(*y)).abs()).sum::<f64>();
        }
    }
    sum / (c * (t - 1) * hw) as f64
}

fn gaussian_window(size: usize, sigma: f64) -> Vec<f64> {
    let c = (size as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..size).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|x| x / s).collect()
}

/// SSIM of two `h x w` planes in [0, 1] (Wang et al. 2004, valid windows).
pub fn ssim_plane(a: &[f64], b: &[f64], h: usize, w: usize) -> f64 {
    let size = 11.min(h).min(w);
    let size = if size % 2 == 0 { size - 1 } else { size }.max(1);
    let g = gaussian_window(size, 1.5 * size as f64 / 11.0);
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mut total = 0.0;
    let mut n = 0;
    for y in 0..=h - size {
        for x in 0..=w - size {
            let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for (i, gi) in g.iter().enumerate() {
                for (j, gj) in g.iter().enumerate() {
                    let k = gi * gj;
                    let (p, q) = (a[(y + i) * w + x + j], b[(y + i) * w + x + j]);
                    ma += k * p;
                    mb += k * q;
                    saa += k * p * p;
                    sbb += k * q * q;
                    sab += k * p * q;
                }
            }
            let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            n += 1;
        }
    }
    total / n as f64
}

/// All metrics of `test` against `reference`, both `[C, T, H, W]`.
pub fn compare(reference: &[f32], test: &[f32], shape: [usize; 4]) -> VideoMetrics {
    let [c, t, h, w] = shape;
    assert_eq!(reference.len(), c * t * h * w, "reference does not have shape {shape:?}");
    assert_eq!(test.len(), reference.len(), "test and reference differ in size");
    let (mut se, mut ae) = (0.0, 0.0);
    for (r, x) in reference.iter().zip(test) {
        let d = to_unit(*r) - to_unit(*x);
        se += d * d;
        ae += d.abs();
    }
    let n = reference.len() as f64;
    let mse = se / n;
    let mut ssim = 0.0;
    for plane in 0..c * t {
        let a: Vec<f64> = reference[plane * h * w..][..h * w].iter().map(|&x| to_unit(x)).collect();
        let b: Vec<f64> = test[plane * h * w..][..h * w].iter().map(|&x| to_unit(x)).collect();
        ssim += ssim_plane(&a, &b, h, w);
    }
    let (tr, tt) = (temporal_change(reference, c, t, h * w), temporal_change(test, c, t, h * w));
    VideoMetrics {
        psnr: if mse == 0.0 { f64::INFINITY } else { 10.0 * (1.0 / mse).log10() },
        ssim: ssim / (c * t) as f64,
        mae: ae / n,
        temporal_ratio: if tr == 0.0 { if tt == 0.0 { 1.0 } else { f64::INFINITY } } else { tt / tr },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn identical_videos_are_perfect_and_noise_lowers_every_score() {
        let mut rng = Rng::new(2);
        let shape = [3, 4, 16, 16];
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * 0.4).collect();
        let m = compare(&v, &v, shape);
        assert!(m.psnr.is_infinite() && (m.ssim - 1.0).abs() < 1e-12 && m.mae == 0.0 && (m.temporal_ratio - 1.0).abs() < 1e-12);
        let small: Vec<f32> = v.iter().map(|x| x + rng.normal() * 0.01).collect();
        let big: Vec<f32> = v.iter().map(|x| x + rng.normal() * 0.2).collect();
        let (ms, mb) = (compare(&v, &small, shape), compare(&v, &big, shape));
        assert!(ms.psnr > mb.psnr && ms.ssim > mb.ssim && ms.mae < mb.mae, "{ms:?} vs {mb:?}");
        // Noise of std 0.01 in [-1, 1] units is 0.005 in [0, 1]: PSNR about 46 dB.
        assert!((ms.psnr - 46.0).abs() < 1.0, "{}", ms.psnr);
    }

    #[test]
    fn ssim_matches_a_hand_computed_case() {
        // Constant planes: SSIM = (2 ma mb + c1) / (ma^2 + mb^2 + c1).
        let (a, b) = (vec![0.5; 121], vec![0.25; 121]);
        let c1 = 0.0001;
        let want = (2.0 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1);
        assert!((ssim_plane(&a, &b, 11, 11) - want).abs() < 1e-12);
    }
}
