//! Softmax attention, tiled over queries so the score matrix stays small:
//! each task computes `S = Q K^T` for a tile of queries of one head, the row
//! softmax in place, then `P V`, with GEMMs on strided views (no head transposes).

use super::gemm::{sgemm, MatRef};
use super::math;
use crate::backend::AttnSpec;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

const Q_TILE: usize = 64;

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor> {
    let (g, lq, h, d) = (spec.groups, spec.q_len, spec.heads, spec.head_dim);
    let c = h * d;
    ensure!(q.shape().last() == Some(&c) && q.numel() == g * lq * c, "attention: q {:?} is not [{} x {lq}, {c}]", q.shape(), g);
    ensure!(k.shape() == v.shape(), "attention: k {:?} and v {:?} differ", k.shape(), v.shape());
    ensure!(spec.kv_offsets.len() == g + 1, "attention: {} kv offsets for {g} groups", spec.kv_offsets.len());
    ensure!(spec.kv_offsets.windows(2).all(|w| w[0] <= w[1]), "attention: kv offsets must not decrease");
    ensure!(k.shape().last() == Some(&c) && spec.kv_offsets[g] * c <= k.numel(), "attention: k {:?} too small for offsets up to {}", k.shape(), spec.kv_offsets[g]);
    let (qs, ks, vs) = (q.f32()?, k.f32()?, v.f32()?);
    let mut out = vec![0f32; g * lq * c];
    let scale = 1.0 / (d as f32).sqrt();
    let tiles = lq.div_ceil(Q_TILE);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..g * h * tiles).into_par_iter().for_each_init(Vec::new, |scores, task| {
        let ptr = ptr;
        let (gi, rest) = (task / (h * tiles), task % (h * tiles));
        let (hi, ti) = (rest / tiles, rest % tiles);
        let (k0, k1) = (spec.kv_offsets[gi], spec.kv_offsets[gi + 1]);
        let lk = k1 - k0;
        let i0 = ti * Q_TILE;
        let tq = Q_TILE.min(lq - i0);
        if lk == 0 {
            return; // no keys: the output rows stay zero
        }
        let q_off = (gi * lq + i0) * c + hi * d;
        let kv_off = k0 * c + hi * d;
        scores.resize(tq * lk, 0.0);
        sgemm(tq, lk, d, MatRef { data: &qs[q_off..], rs: c, cs: 1 }, MatRef { data: &ks[kv_off..], rs: 1, cs: c }, scores, lk, false, 1);
        let mut sums = [0f32; Q_TILE];
        for (r, row) in scores.chunks_mut(lk).enumerate() {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
            let mut s = 0f32;
            for x in row.iter_mut() {
                *x = math::exp(*x * scale - m);
                s += *x;
            }
            sums[r] = s;
        }
        // SAFETY: this task alone writes rows i0..i0+tq, columns hi*d..(hi+1)*d of group gi.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(q_off), (tq - 1) * c + d) };
        sgemm(tq, d, lk, MatRef { data: scores, rs: lk, cs: 1 }, MatRef { data: &vs[kv_off..], rs: c, cs: 1 }, dst, c, false, 1);
        for r in 0..tq {
            let inv = 1.0 / sums[r];
            dst[r * c..r * c + d].iter_mut().for_each(|x| *x *= inv);
        }
    });
    Tensor::from_f32(&[g * lq, c], out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Straightforward f64 attention for one group/head.
    fn naive(q: &[f32], k: &[f32], v: &[f32], spec: &AttnSpec) -> Vec<f32> {
        let (h, d) = (spec.heads, spec.head_dim);
        let c = h * d;
        let mut out = vec![0f32; spec.groups * spec.q_len * c];
        for g in 0..spec.groups {
            let (k0, k1) = (spec.kv_offsets[g], spec.kv_offsets[g + 1]);
            for hi in 0..h {
                for i in 0..spec.q_len {
                    let qr = &q[(g * spec.q_len + i) * c + hi * d..][..d];
                    let s: Vec<f64> = (k0..k1).map(|j| qr.iter().zip(&k[j * c + hi * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (d as f64).sqrt()).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for dd in 0..d {
                        let o: f64 = (k0..k1).zip(&e).map(|(j, w)| w * v[j * c + hi * d + dd] as f64).sum::<f64>() / z;
                        out[(g * spec.q_len + i) * c + hi * d + dd] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_dense_and_ragged() {
        let mut rng = Rng::new(11);
        let cases = [
            AttnSpec::dense(3, 5, 5, 2, 8),
            AttnSpec::dense(2, 130, 130, 3, 16),
            AttnSpec::dense(1, 70, 9, 4, 72),
            AttnSpec { groups: 3, q_len: 67, heads: 2, head_dim: 12, kv_offsets: vec![0, 5, 17, 18] },
        ];
        for spec in cases {
            let c = spec.heads * spec.head_dim;
            let nk = spec.kv_offsets[spec.groups];
            let q = Tensor::from_f32(&[spec.groups * spec.q_len, c], rng.normal_vec(spec.groups * spec.q_len * c)).unwrap();
            let k = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c)).unwrap();
            let v = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c)).unwrap();
            let got = attention(&q, &k, &v, &spec).unwrap();
            let want = naive(q.f32().unwrap(), k.f32().unwrap(), v.f32().unwrap(), &spec);
            let err = crate::tensor::rel_l2(got.f32().unwrap(), &want);
            assert!(err < 1e-5, "{spec:?}: rel err {err}");
        }
    }
}
