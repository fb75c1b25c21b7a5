//! f32 matrix products through the `gemm` crate (AVX-512/AVX2/FMA kernels, rayon).

/// A strided read-only matrix: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), `a` is `m x k`, `b` is `k x n`,
/// `dst` row-major with row stride `dst_rs`. `threads` > 1 lets the GEMM split the work.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, dst: &mut [f32], dst_rs: usize, accumulate: bool, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |r: MatRef, rows: usize, cols: usize| (rows.max(1) - 1) * r.rs + (cols.max(1) - 1) * r.cs;
    assert!(k == 0 || (last(a, m, k) < a.data.len() && last(b, k, n) < b.data.len()), "sgemm operand out of bounds");
    assert!((m - 1) * dst_rs + n <= dst.len(), "sgemm destination out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: bounds checked above; the gemm crate reads/writes exactly the
    // described strided ranges.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn sgemm_matches_naive_on_strided_inputs() {
        let mut rng = Rng::new(7);
        for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (64, 48, 72), (130, 257, 33)] {
            let a = rng.normal_vec(m * k);
            let bt = rng.normal_vec(n * k); // b stored transposed: b(i,j) = bt[j*k + i]
            let mut c = vec![0.0; m * n];
            sgemm(m, n, k, MatRef { data: &a, rs: k, cs: 1 }, MatRef { data: &bt, rs: 1, cs: k }, &mut c, n, false, 2);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| a[i * k + p] as f64 * bt[j * k + p] as f64).sum();
                    assert!((c[i * n + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "({m},{n},{k}) at {i},{j}");
                }
            }
        }
    }
}
