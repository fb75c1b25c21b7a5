//! GPU test of kernels/baseline.cu (the row softmax of qc-bench's attention
//! baseline) against an f64 softmax of the same bf16 inputs: fresh random
//! rows at several widths (Open-Sora's 3600 spatial and 15 temporal keys
//! included), in place and out of place, NaN-poisoned outputs, padding
//! columns (ld > cols) left untouched.

use super::abi::*;
use super::gpu_tests::{check, gpu, q, Elem, Rng};
use super::launch_cfg;

fn softmax_f64(x: &[f32], rows: usize, ld: usize, cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &x[r * ld..r * ld + cols];
        let mx = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| v / s));
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn softmax_rows_bf16() {
    let g = gpu().expect("needs a CUDA GPU: run tools/gpu-check");
    let mut rng = Rng::new();
    for &(rows, cols, ld) in &[(1, 1, 1), (37, 15, 15), (300, 3600, 3600), (5, 4099, 4104), (2000, 72, 80)] {
        // Scores of a spread like scaled Q K^T (a few units), so the softmax is not flat.
        let x = q::<u16>(&rng.vec(rows * ld, 6.0));
        let want = softmax_f64(&x, rows, ld, cols);
        let launch = launch_cfg::per_row_threads(rows as i64, cols as i64);
        for in_place in [false, true] {
            let xd = g.up::<u16>(&x);
            let y = if in_place { None } else { Some(g.poisoned::<u16>(rows * ld)) };
            let y_addr = y.as_ref().map_or(g.addr(&xd, 0), |y| g.addr(y, 0));
            let args = QcSoftmaxArgs { x: g.addr(&xd, 0), y: y_addr, rows: rows as i64, ld: ld as i64, cols: cols as i32, ..Default::default() };
            g.run("qc_softmax_rows_bf16", launch, args);
            let got = g.down(y.as_ref().unwrap_or(&xd));
            let what = format!("softmax {rows}x{cols} (ld {ld}){}", if in_place { " in place" } else { "" });
            let body: Vec<f32> = got.chunks(ld).flat_map(|r| r[..cols].to_vec()).collect();
            check(&what, &body, &want, <u16 as Elem>::TOL);
            for (r, row) in got.chunks(ld).enumerate() {
                for (j, &v) in row[cols..].iter().enumerate() {
                    let untouched = if in_place { v.to_bits() == x[r * ld + cols + j].to_bits() } else { v.is_nan() };
                    assert!(untouched, "{what}: padding element ({r}, {}) was written", cols + j);
                }
            }
        }
    }
}
