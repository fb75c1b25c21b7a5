//! Softmax attention, tiled over queries so the score matrix stays small:
//! each task computes `S = Q K^T` for a tile of queries of one head, the row
//! softmax in place, then `P V`, with GEMMs on strided views (no head transposes).

use super::gemm::{sgemm, MatRef};
use super::math;
use super::attention_direct::attend_direct;
use crate::backend::AttnSpec;
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

const Q_TILE: usize = 64;
/// Up to this many keys and this head dim a tile is computed directly (vectorized
/// over keys, then over the head dim); above either, by two GEMMs, whose packing
/// pays off then (measured: the demo's head dim 16 is ~2x faster direct, Open-Sora's
/// 72 is ~7% slower direct at the forward level).
const DIRECT_MAX_KEYS: usize = 128;
const DIRECT_MAX_HEAD_DIM: usize = 32;

/// One task's inputs: `tq` query rows and `lk` key/value rows of one head, rows `stride` apart.
pub(super) struct Tile<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    pub tq: usize,
    pub lk: usize,
    pub d: usize,
    pub scale: f32,
}

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>) -> Result<Tensor> {
    attention_on(q, k, v, spec, bias, amx_bf16())
}

/// Whether the bf16 attention may use AMX on this CPU.
fn amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::quant::amx::bf16_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`attention`], the bf16 tiles on AMX only where `amx` (tests run both kernels).
pub(super) fn attention_on(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>, amx: bool) -> Result<Tensor> {
    spec.check(q, k, v, bias)?;
    let (g, lq, h, d) = (spec.groups, spec.q_len, spec.heads, spec.head_dim);
    let bf16_tiles = spec.bf16 && bf16_kernel_fits(spec);
    if spec.bf16 && !bf16_tiles {
        // Without the kernel: the operands rounded to bf16, the f32 attention on them.
        let round = |t: &Tensor| -> Result<Tensor> { Tensor::from_f32(t.shape(), t.f32()?.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()) };
        return attention(&round(q)?, &round(k)?, &round(v)?, &AttnSpec { bf16: false, ..spec.clone() }, bias);
    }
    // AMX takes the bf16 tiles without a score bias (the DiT's) where the
    // packed keys fill a tile's 16 rows: below that (a cross-attention to 12
    // caption tokens, one head per task) its conversions cost more than its
    // products save (measured 0.87-0.92x the AVX-512 tile).
    let max_keys = spec.kv_ranges.iter().map(|(a, b)| b - a).max().unwrap_or(0);
    #[cfg(target_arch = "x86_64")]
    if amx && bf16_tiles && bias.is_none() && d <= super::attention_bf16::AMX_MAX_HEAD_DIM && max_keys <= super::attention_bf16::AMX_MAX_KEYS {
        let hp = super::attention_bf16::amx_heads(lq, h, max_keys);
        if hp * max_keys >= 16 {
            return attention_amx(q, k, v, spec, hp);
        }
    }
    let c = h * d;
    let bias_v = match bias {
        None => None,
        Some(b) => Some((b.f32()?, b.shape()[2])),
    };
    let (qs, ks, vs) = (q.f32()?, k.f32()?, v.f32()?);
    let mut out = super::zeroed(g * lq * c);
    let scale = spec.scale;
    let tiles = lq.div_ceil(Q_TILE);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..g * h * tiles).into_par_iter().for_each_init(Vec::new, |scratch, task| {
        let ptr = ptr;
        let (gi, rest) = (task / (h * tiles), task % (h * tiles));
        let (hi, ti) = (rest / tiles, rest % tiles);
        let (k0, k1) = spec.kv_ranges[gi];
        let lk = k1 - k0;
        let i0 = ti * Q_TILE;
        let tq = Q_TILE.min(lq - i0);
        if lk == 0 {
            return; // no keys: the output rows stay zero
        }
        let q_off = (gi * lq + i0) * c + hi * d;
        let kv_off = k0 * c + hi * d;
        let tile = Tile { q: &qs[q_off..], k: &ks[kv_off..], v: &vs[kv_off..], stride: c, tq, lk, d, scale };
        let bias_rows = bias_v.map(|(bv, bl)| (&bv[(hi * lq + i0) * bl..], bl));
        // SAFETY: this task alone writes rows i0..i0+tq, columns hi*d..(hi+1)*d of group gi.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(q_off), (tq - 1) * c + d) };
        if bf16_tiles {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `bf16_kernel_fits` checked the CPU and the head dim.
            unsafe {
                super::attention_bf16::attend_bf16(&tile, bias_rows, dst, scratch)
            };
        } else if lk <= DIRECT_MAX_KEYS && d <= DIRECT_MAX_HEAD_DIM {
            attend_direct(&tile, bias_rows, dst, scratch);
        } else {
            attend_gemm(&tile, bias_rows, dst, scratch);
        }
    });
    Tensor::from_f32(&[g * lq, c], out)
}

/// The bf16 attention on AMX ([`super::attention_bf16::attend_amx`]): tasks
/// of `hp` heads ([`super::attention_bf16::amx_heads`]) and as many groups
/// as fill [`super::attention_bf16::AMX_TASK_BLOCKS`] query blocks.
#[cfg(target_arch = "x86_64")]
fn attention_amx(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, hp: usize) -> Result<Tensor> {
    use super::attention_bf16::{attend_amx, AmxUnit, AMX_TASK_BLOCKS};
    let (g, lq, h, d) = (spec.groups, spec.q_len, spec.heads, spec.head_dim);
    let (c, hg, tiles) = (h * d, h / hp, lq.div_ceil(Q_TILE));
    let blocks_per_tile = lq.min(Q_TILE).div_ceil(16 / hp);
    let per_task = (AMX_TASK_BLOCKS / blocks_per_tile).max(1);
    let (qs, ks, vs) = (q.f32()?, k.f32()?, v.f32()?);
    let mut out = super::zeroed(g * lq * c);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..g.div_ceil(per_task) * hg * tiles).into_par_iter().for_each_init(Vec::new, |scratch, task| {
        let ptr = ptr;
        let (gc, rest) = (task / (hg * tiles), task % (hg * tiles));
        let (hi, ti) = (rest / tiles * hp, rest % tiles);
        let (i0, tq) = (ti * Q_TILE, Q_TILE.min(lq - ti * Q_TILE));
        let mut units: Vec<AmxUnit> = (gc * per_task..g.min((gc + 1) * per_task))
            .filter(|&gi| spec.kv_ranges[gi].1 > spec.kv_ranges[gi].0) // no keys: the rows stay zero
            .map(|gi| {
                let (k0, k1) = spec.kv_ranges[gi];
                let (q_off, kv_off) = ((gi * lq + i0) * c + hi * d, k0 * c + hi * d);
                let t = Tile { q: &qs[q_off..], k: &ks[kv_off..], v: &vs[kv_off..], stride: c, tq, lk: k1 - k0, d, scale: spec.scale };
                // SAFETY: this task alone writes rows i0..i0+tq, columns hi*d..(hi+hp)*d of its groups.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(q_off), (tq - 1) * c + hp * d) };
                AmxUnit { t, dst }
            })
            .collect();
        // SAFETY: the caller checked AMX-BF16 (`bf16_available`, or a test that did),
        // the head dim and the keys; `hp` divides 16 and h.
        unsafe { attend_amx(&mut units, hp, scratch) };
    });
    Tensor::from_f32(&[g * lq, c], out)
}

/// Whether every tile of `spec` runs the bf16 kernel: an AVX-512 BF16 CPU, a
/// head dim of whole 16-lane blocks, and key ranges the direct tiles take.
fn bf16_kernel_fits(spec: &AttnSpec) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::attention_bf16::available() && super::attention_bf16::fits(spec.head_dim) && spec.head_dim <= DIRECT_MAX_HEAD_DIM && spec.kv_ranges.iter().all(|(a, b)| b - a <= DIRECT_MAX_KEYS)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = spec;
        false
    }
}

/// Additive score bias rows for the tile's queries (`[tq, >= lk]`, rows `.1` apart).
pub(super) type BiasRows<'a> = Option<(&'a [f32], usize)>;

/// `S = Q K^T` and `P V` through the GEMM, the softmax in between.
fn attend_gemm(t: &Tile, bias: BiasRows, dst: &mut [f32], scores: &mut Vec<f32>) {
    let (tq, lk, d, c) = (t.tq, t.lk, t.d, t.stride);
    scores.resize(tq * lk, 0.0);
    sgemm(tq, lk, d, MatRef { data: t.q, rs: c, cs: 1 }, MatRef { data: t.k, rs: 1, cs: c }, scores, lk, false, 1);
    let mut sums = [0f32; Q_TILE];
    for (r, row) in scores.chunks_mut(lk).enumerate() {
        match bias {
            None => row.iter_mut().for_each(|x| *x *= t.scale),
            Some((bv, bl)) => row.iter_mut().zip(&bv[r * bl..][..lk]).for_each(|(x, b)| *x = *x * t.scale + b),
        }
        sums[r] = math::softmax_numerators(row);
    }
    sgemm(tq, d, lk, MatRef { data: scores, rs: lk, cs: 1 }, MatRef { data: t.v, rs: c, cs: 1 }, dst, c, false, 1);
    for r in 0..tq {
        let inv = 1.0 / sums[r];
        dst[r * c..r * c + d].iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Straightforward f64 attention for one group/head.
    fn naive(q: &[f32], k: &[f32], v: &[f32], spec: &AttnSpec, bias: Option<&[f32]>, bias_len: usize) -> Vec<f32> {
        let (h, d) = (spec.heads, spec.head_dim);
        let c = h * d;
        let mut out = vec![0f32; spec.groups * spec.q_len * c];
        for g in 0..spec.groups {
            let (k0, k1) = spec.kv_ranges[g];
            for hi in 0..h {
                for i in 0..spec.q_len {
                    let qr = &q[(g * spec.q_len + i) * c + hi * d..][..d];
                    let s: Vec<f64> = (k0..k1)
                        .map(|j| {
                            let dot = qr.iter().zip(&k[j * c + hi * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                            dot * spec.scale as f64 + bias.map_or(0.0, |b| b[(hi * spec.q_len + i) * bias_len + j - k0] as f64)
                        })
                        .collect();
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
        let mut t5_like = AttnSpec::ragged(12, 3, 8, vec![(0, 7), (12, 24)]);
        t5_like.scale = 1.0;
        let cases = [
            (AttnSpec::dense(3, 5, 5, 2, 8), false),
            (AttnSpec::dense(2, 130, 130, 3, 16), false),
            (AttnSpec::dense(1, 70, 9, 4, 72), false),
            (AttnSpec::ragged(67, 2, 12, AttnSpec::ranges_from_offsets(&[0, 5, 17, 18])), false),
            (t5_like.clone(), true),
            (AttnSpec::dense(2, 70, 70, 2, 16), true),
            (AttnSpec::dense(2, 20, 150, 2, 8), true),
            (AttnSpec::dense(1, 3, 1, 1, 72), false),
        ];
        for (spec, with_bias) in cases {
            let c = spec.heads * spec.head_dim;
            let nk = spec.kv_ranges.iter().map(|r| r.1).max().unwrap();
            let bl = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap();
            let bias = with_bias.then(|| Tensor::from_f32(&[spec.heads, spec.q_len, bl], rng.normal_vec(spec.heads * spec.q_len * bl)).unwrap());
            let q = Tensor::from_f32(&[spec.groups * spec.q_len, c], rng.normal_vec(spec.groups * spec.q_len * c)).unwrap();
            let k = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c)).unwrap();
            let v = Tensor::from_f32(&[nk, c], rng.normal_vec(nk * c)).unwrap();
            let got = attention(&q, &k, &v, &spec, bias.as_ref()).unwrap();
            let want = naive(q.f32().unwrap(), k.f32().unwrap(), v.f32().unwrap(), &spec, bias.as_ref().map(|b| b.f32().unwrap()), bl);
            let err = crate::tensor::rel_l2(got.f32().unwrap(), &want);
            assert!(err < 1e-5, "{spec:?}: rel err {err}");
        }
    }
}
