//! Prompt following on the demonstration domain (one saturated shape over a
//! grey background, `tools/train-demo/data.py`): the shape's dominant colour
//! and its motion direction, read from the pixels and scored against the caption.

/// The demonstration data's colour palette (RGB in [0, 1]), as `data.py` renders it.
pub const PALETTE: [(&str, [f32; 3]); 6] = [
    ("red", [1.0, 0.1, 0.1]),
    ("green", [0.1, 0.9, 0.1]),
    ("blue", [0.15, 0.3, 1.0]),
    ("yellow", [1.0, 0.95, 0.1]),
    ("purple", [0.7, 0.15, 0.95]),
    ("cyan", [0.1, 0.95, 0.95]),
];

pub const DIRECTIONS: [&str; 4] = ["right", "left", "up", "down"];

/// Pixels less saturated than this are background (the backgrounds are grey).
const MIN_SATURATION: f32 = 0.25;

#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub colour: &'static str,
    /// None when the shape does not move measurably.
    pub direction: Option<&'static str>,
}

/// Colour and direction of the shape in a video `[3, T, H, W]` with values in [-1, 1].
/// None when no shape is visible.
pub fn detect(v: &[f32], t: usize, h: usize, w: usize) -> Option<Detection> {
    let hw = h * w;
    let px = |c: usize, ti: usize, p: usize| (v[(c * t + ti) * hw + p].clamp(-1.0, 1.0) + 1.0) / 2.0;
    let mut rgb_sum = [0f64; 3];
    let mut weight_sum = 0f64;
    let mut centroids = Vec::new();
    for ti in 0..t {
        let (mut cx, mut cy, mut cw) = (0f64, 0f64, 0f64);
        for p in 0..hw {
            let rgb = [px(0, ti, p), px(1, ti, p), px(2, ti, p)];
            let sat = rgb.iter().cloned().fold(f32::MIN, f32::max) - rgb.iter().cloned().fold(f32::MAX, f32::min);
            if sat < MIN_SATURATION {
                continue;
            }
            let wt = sat as f64;
            for c in 0..3 {
                rgb_sum[c] += wt * rgb[c] as f64;
            }
            weight_sum += wt;
            cx += wt * (p % w) as f64;
            cy += wt * (p / w) as f64;
            cw += wt;
        }
        if cw > 0.0 {
            centroids.push((ti as f64, cx / cw, cy / cw));
        }
    }
    if weight_sum == 0.0 || centroids.is_empty() {
        return None;
    }
    let mean = [rgb_sum[0] / weight_sum, rgb_sum[1] / weight_sum, rgb_sum[2] / weight_sum];
    let colour = PALETTE
        .iter()
        .min_by(|a, b| {
            let d = |c: &[f32; 3]| (0..3).map(|i| (c[i] as f64 - mean[i]).powi(2)).sum::<f64>();
            d(&a.1).total_cmp(&d(&b.1))
        })
        .map(|(n, _)| *n)
        .expect("palette is not empty");
    // Least-squares slope of the centroid over time, per axis.
    let slope = |sel: fn(&(f64, f64, f64)) -> f64| {
        let n = centroids.len() as f64;
        let mt = centroids.iter().map(|c| c.0).sum::<f64>() / n;
        let mv = centroids.iter().map(sel).sum::<f64>() / n;
        let num: f64 = centroids.iter().map(|c| (c.0 - mt) * (sel(c) - mv)).sum();
        let den: f64 = centroids.iter().map(|c| (c.0 - mt).powi(2)).sum();
        if den == 0.0 {
            0.0
        } else {
            num / den
        }
    };
    let (sx, sy) = (slope(|c| c.1), slope(|c| c.2));
    // Less than a twentieth of a pixel per frame is no motion.
    let direction = if sx.abs().max(sy.abs()) < 0.05 {
        None
    } else if sx.abs() >= sy.abs() {
        Some(if sx > 0.0 { "right" } else { "left" })
    } else {
        Some(if sy > 0.0 { "down" } else { "up" })
    };
    Some(Detection { colour, direction })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A square of `rgb` moving by (dx, dy) pixels per frame over a grey background.
    fn clip(rgb: [f32; 3], dx: i32, dy: i32, bg: f32) -> Vec<f32> {
        let (t, h, w) = (8, 16, 16);
        let mut v = vec![bg * 2.0 - 1.0; 3 * t * h * w];
        for ti in 0..t {
            let (x0, y0) = (4 + dx * ti as i32, 4 + dy * ti as i32);
            for y in y0..y0 + 4 {
                for x in x0..x0 + 4 {
                    if (0..16).contains(&x) && (0..16).contains(&y) {
                        for c in 0..3 {
                            v[(c * t + ti) * h * w + (y * 16 + x) as usize] = rgb[c] * 2.0 - 1.0;
                        }
                    }
                }
            }
        }
        v
    }

    #[test]
    fn finds_colour_and_direction() {
        for (name, rgb) in PALETTE {
            for (dir, dx, dy) in [("right", 1, 0), ("left", -1, 0), ("up", 0, -1), ("down", 0, 1)] {
                for bg in [0.08, 0.92] {
                    let d = detect(&clip(rgb, dx, dy, bg), 8, 16, 16).expect("a shape");
                    assert_eq!((d.colour, d.direction), (name, Some(dir)), "{name} {dir} on {bg}");
                }
            }
        }
        assert_eq!(detect(&clip([1.0, 0.1, 0.1], 0, 0, 0.08), 8, 16, 16).unwrap().direction, None);
        assert!(detect(&vec![0.0; 3 * 8 * 256], 8, 16, 16).is_none());
    }
}
