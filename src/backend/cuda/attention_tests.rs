//! GPU tests of `kernels/attention.cu` (qc_attention_d*_bf16 and, with a score
//! bias, qc_attention_bias_d*_bf16) and `kernels/attention_wide.cu`
//! (qc_attention_wide_d*_bf16, head dims above 128). Conventions as in
//! `gpu_tests.rs`: ignored by default (run by tools/gpu-check), fresh random
//! inputs, NaN-poisoned outputs, rel-L2 <= 1e-2 against an f64 reference
//! computed from the bf16-rounded inputs.
//!
//! Every case also checks the whole output buffer: each element the problem
//! addresses was written (finite), every other one still holds the poison
//! (nothing written outside the rows and heads, or into the ld padding).
//!
//! Under a CUDA tool (compute-sanitizer sets `CUDA_INJECTION64_PATH`) or with
//! `QC_GPU_TESTS_SMALL` set, the Open-Sora spatial case keeps its 3600 tokens
//! but uses 2 heads instead of 16, and the VAE's 720p frame (14400 positions)
//! shrinks to 2000, so that memcheck/racecheck stay quick.

use super::abi::*;
use super::gpu_tests::{check, gpu, q, Gpu, Rng};
use super::launch_cfg;
use crate::backend::{AttnSpec, Backend};
use crate::tensor::Tensor;
use rayon::prelude::*;

type Bf16 = u16;
const TOL: f64 = 1e-2;

fn small_run() -> bool {
    std::env::var_os("CUDA_INJECTION64_PATH").is_some() || std::env::var_os("QC_GPU_TESTS_SMALL").is_some()
}

/// Where a head-major row operand lives: element (row r, head h, dim d) is
/// `bufs[buf][off + r * ld + h * head_dim + d]`.
#[derive(Clone, Copy, Debug)]
struct Place {
    buf: usize,
    off: usize,
    ld: usize,
}

/// One attention launch, in the kernel's terms (see QcAttentionArgs).
#[derive(Clone, Debug)]
struct Problem {
    heads: usize,
    hd: usize,
    groups: usize,
    groups_inner: usize,
    q_len: usize,
    outer: usize,
    inner: usize,
    seq: usize,
    q: Place,
    k: Place,
    v: Place,
    /// Output place: `buf` is ignored (the output is its own poisoned buffer of `out_len` elements).
    o: Place,
    out_len: usize,
    /// Cross-attention key ranges (rows of k / v), or self-attention when None.
    ranges: Option<Vec<(usize, usize)>>,
    rope: Option<Vec<f32>>,
    scale: f32,
    /// Additive f32 score bias (the qc_attention_bias kernels), or None.
    bias: Option<ScoreBias>,
}

/// `v[h * head_stride + i * ld + j]` is added to the score of query i and key j of head h.
#[derive(Clone, Debug)]
struct ScoreBias {
    v: Vec<f32>,
    ld: usize,
    head_stride: usize,
}

impl Problem {
    /// Row R(g, i) of q / out (and of k / v in self-attention).
    fn row(&self, g: usize, i: usize) -> usize {
        (g / self.groups_inner) * self.outer + (g % self.groups_inner) * self.inner + i * self.seq
    }
    fn kv_rows(&self, g: usize) -> Vec<usize> {
        match &self.ranges {
            Some(r) => (r[g].0..r[g].1).collect(),
            None => (0..self.q_len).map(|j| self.row(g, j)).collect(),
        }
    }
    fn at(&self, p: Place, row: usize, h: usize) -> usize {
        p.off + row * p.ld + h * self.hd
    }
}

/// rotary_embedding_torch frequencies for a rotary dim of `dim`: 10000^(-2i/dim).
fn rope_freqs(dim: usize) -> Vec<f32> {
    (0..dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dim as f32)).collect()
}

/// GPT-J interleaved rotation at position `pos`, angles as PyTorch computes them (f32 product).
fn rotate(x: &mut [f64], pos: usize, freqs: &[f32]) {
    for (k, &f) in freqs.iter().enumerate() {
        let a = (pos as f32 * f) as f64;
        let (s, c) = a.sin_cos();
        let (x0, x1) = (x[2 * k], x[2 * k + 1]);
        x[2 * k] = x0 * c - x1 * s;
        x[2 * k + 1] = x1 * c + x0 * s;
    }
}

/// f64 reference for the query rows `i` of every group with `keep(i)`:
/// (index into the output buffer, value) pairs.
fn reference(p: &Problem, bufs: &[Vec<f32>], keep: &(dyn Fn(usize) -> bool + Sync)) -> Vec<(usize, f64)> {
    let hd = p.hd;
    (0..p.groups * p.heads)
        .into_par_iter()
        .flat_map_iter(|gh| {
            let (g, h) = (gh / p.heads, gh % p.heads);
            let rows = p.kv_rows(g);
            let load = |pl: Place, row: usize| -> Vec<f64> {
                let at = p.at(pl, row, h);
                bufs[pl.buf][at..at + hd].iter().map(|&x| x as f64).collect()
            };
            let keys: Vec<Vec<f64>> = rows
                .iter()
                .enumerate()
                .map(|(j, &r)| {
                    let mut k = load(p.k, r);
                    if let Some(f) = &p.rope {
                        rotate(&mut k, j, f);
                    }
                    k
                })
                .collect();
            let vals: Vec<Vec<f64>> = rows.iter().map(|&r| load(p.v, r)).collect();
            let mut out = Vec::new();
            for i in (0..p.q_len).filter(|&i| keep(i)) {
                let mut qv = load(p.q, p.row(g, i));
                if let Some(f) = &p.rope {
                    rotate(&mut qv, i, f);
                }
                let bias = |j: usize| p.bias.as_ref().map_or(0.0, |b| b.v[h * b.head_stride + i * b.ld + j] as f64);
                let s: Vec<f64> = keys
                    .iter()
                    .enumerate()
                    .map(|(j, k)| k.iter().zip(&qv).map(|(a, b)| a * b).sum::<f64>() * p.scale as f64 + bias(j))
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let base = p.at(p.o, p.row(g, i), h);
                for d in 0..hd {
                    let o = if rows.is_empty() {
                        0.0
                    } else {
                        e.iter().zip(&vals).map(|(w, v)| w * v[d]).sum::<f64>() / z
                    };
                    out.push((base + d, o));
                }
            }
            out
        })
        .collect()
}

/// Every output element the problem addresses.
fn covered(p: &Problem) -> Vec<bool> {
    let mut c = vec![false; p.out_len];
    for g in 0..p.groups {
        for i in 0..p.q_len {
            for h in 0..p.heads {
                let at = p.at(p.o, p.row(g, i), h);
                c[at..at + p.hd].iter_mut().for_each(|x| *x = true);
            }
        }
    }
    c
}

/// The kernel's output for `p` on `bufs` (bf16-rounded by the caller), launched
/// with `grid` blocks (None: launch_cfg's). `in_place`: out is q's own buffer.
fn launch(g: &Gpu, p: &Problem, bufs: &[Vec<f32>], grid: Option<u32>, in_place: bool) -> Vec<f32> {
    let dev: Vec<_> = bufs.iter().map(|b| g.up::<Bf16>(b)).collect();
    let dout = if in_place { None } else { Some(g.poisoned::<Bf16>(p.out_len)) };
    let out_slice = dout.as_ref().unwrap_or(&dev[p.q.buf]);
    let (starts, ends): (Vec<i32>, Vec<i32>) = match &p.ranges {
        Some(r) => r.iter().map(|&(a, b)| (a as i32, b as i32)).unzip(),
        None => (vec![0], vec![0]),
    };
    let (dstart, dend) = (g.up_raw(&starts), g.up_raw(&ends));
    let dfreqs = g.up_raw(p.rope.as_deref().unwrap_or(&[0.0f32][..]));
    let args = QcAttentionArgs {
        q: g.addr(&dev[p.q.buf], p.q.off),
        k: g.addr(&dev[p.k.buf], p.k.off),
        v: g.addr(&dev[p.v.buf], p.v.off),
        out: g.addr(out_slice, p.o.off),
        kv_start: if p.ranges.is_some() { g.addr(&dstart, 0) } else { 0 },
        kv_end: if p.ranges.is_some() { g.addr(&dend, 0) } else { 0 },
        rope_freqs: if p.rope.is_some() { g.addr(&dfreqs, 0) } else { 0 },
        ldq: p.q.ld as i64,
        ldk: p.k.ld as i64,
        ldv: p.v.ld as i64,
        ldo: p.o.ld as i64,
        outer_stride: p.outer as i64,
        inner_stride: p.inner as i64,
        seq_stride: p.seq as i64,
        groups: p.groups as i32,
        groups_inner: p.groups_inner as i32,
        q_len: p.q_len as i32,
        heads: p.heads as i32,
        head_dim: p.hd as i32,
        scale: p.scale,
    };
    let (auto_grid, block) = launch_cfg::attention(p.q_len as i64, p.heads as i64, p.groups as i64);
    let cfg = (grid.unwrap_or(auto_grid), block);
    match &p.bias {
        None if launch_cfg::attention_kernel(p.hd).is_none() => {
            let (name, hdp) = launch_cfg::attention_wide_kernel(p.hd).expect("head dim has a wide kernel");
            let ((auto_grid, gy, gz), block, shared) = launch_cfg::attention_wide(p.q_len as i64, p.heads as i64, p.groups as i64, hdp);
            // SAFETY: the buffers above hold every row the args describe.
            unsafe { g.module.launch_ext(name, (grid.unwrap_or(auto_grid), gy, gz), block, shared, &g.stream, &args) }.unwrap();
            g.stream.synchronize().unwrap();
        }
        None => g.run(kernel_name(p), cfg, args),
        Some(b) => {
            let dbias = g.up_raw(&b.v);
            let bias_args = QcAttentionBiasArgs {
                attn: args,
                bias: g.addr(&dbias, 0),
                bias_ld: b.ld as i64,
                bias_head_stride: b.head_stride as i64,
            };
            g.run(kernel_name(p), cfg, bias_args);
        }
    }
    g.down(out_slice)
}

/// The kernel that runs `p` (head dims above 128 without a bias: the wide kernels).
fn kernel_name(p: &Problem) -> &'static str {
    let k = if p.bias.is_some() {
        launch_cfg::attention_bias_kernel(p.hd)
    } else {
        launch_cfg::attention_kernel(p.hd).or_else(|| launch_cfg::attention_wide_kernel(p.hd))
    };
    k.expect("head dim has a kernel").0
}

/// Runs `p` and checks it: rel-L2 over the query rows with `keep(i)`, and the
/// whole output buffer for written / untouched elements. Returns the output.
fn run_case(
    g: &Gpu,
    what: &str,
    p: &Problem,
    bufs: &[Vec<f32>],
    keep: &(dyn Fn(usize) -> bool + Sync),
    grid: Option<u32>,
) -> Vec<f32> {
    let out = launch(g, p, bufs, grid, false);
    let what = format!(
        "{what}: groups {} q_len {} heads {} hd {} ({})",
        p.groups,
        p.q_len,
        p.heads,
        p.hd,
        kernel_name(p)
    );
    let cov = covered(p);
    for (i, (&o, &c)) in out.iter().zip(&cov).enumerate() {
        if c {
            assert!(o.is_finite(), "{what}: output element {i} not written (or not finite): {o}");
        } else {
            assert!(o.is_nan(), "{what}: element {i} outside the output was written: {o}");
        }
    }
    let r = reference(p, bufs, keep);
    let got: Vec<f32> = r.iter().map(|&(i, _)| out[i]).collect();
    let want: Vec<f64> = r.iter().map(|&(_, v)| v).collect();
    check(&what, &got, &want, TOL);
    out
}

fn all(_: usize) -> bool {
    true
}

/// Self-attention over `groups` consecutive sequences of `q_len` rows (the
/// spatial layout: group g = rows g*q_len ..), q/k/v as column slices of one
/// fused `[rows, 3C]` buffer (`fused`) or three `[rows, C]` buffers; out
/// `[rows, ldo]` with `ldo = C + out_pad`.
fn spatial(rng: &mut Rng, groups: usize, q_len: usize, heads: usize, hd: usize, fused: bool, out_pad: usize, amp: f32) -> (Problem, Vec<Vec<f32>>) {
    let c = heads * hd;
    let rows = groups * q_len;
    let (bufs, qp, kp, vp) = if fused {
        let b = q::<Bf16>(&rng.vec(rows * 3 * c, amp));
        let pl = |i| Place { buf: 0, off: i * c, ld: 3 * c };
        (vec![b], pl(0), pl(1), pl(2))
    } else {
        let b: Vec<Vec<f32>> = (0..3).map(|_| q::<Bf16>(&rng.vec(rows * c, amp))).collect();
        let pl = |i| Place { buf: i, off: 0, ld: c };
        (b, pl(0), pl(1), pl(2))
    };
    let ldo = c + out_pad;
    let p = Problem {
        heads,
        hd,
        groups,
        groups_inner: 1,
        q_len,
        outer: q_len,
        inner: 0,
        seq: 1,
        q: qp,
        k: kp,
        v: vp,
        o: Place { buf: 0, off: 0, ld: ldo },
        out_len: rows * ldo,
        ranges: None,
        rope: None,
        scale: 1.0 / (hd as f32).sqrt(),
        bias: None,
    };
    (p, bufs)
}

/// Temporal self-attention with RoPE: B samples of T frames of S tokens, rows
/// frame-major ((b*T + t)*S + s) in a fused qkv buffer; group = (b, s), sequence = t.
fn temporal(rng: &mut Rng, b: usize, t: usize, s: usize, heads: usize, hd: usize) -> (Problem, Vec<Vec<f32>>) {
    let c = heads * hd;
    let rows = b * t * s;
    let buf = q::<Bf16>(&rng.vec(rows * 3 * c, 2.0));
    let pl = |i| Place { buf: 0, off: i * c, ld: 3 * c };
    let p = Problem {
        heads,
        hd,
        groups: b * s,
        groups_inner: s,
        q_len: t,
        outer: t * s,
        inner: 1,
        seq: s,
        q: pl(0),
        k: pl(1),
        v: pl(2),
        o: Place { buf: 0, off: 0, ld: c },
        out_len: rows * c,
        ranges: None,
        rope: Some(rope_freqs(hd)),
        scale: 1.0 / (hd as f32).sqrt(),
        bias: None,
    };
    (p, vec![buf])
}

/// Cross-attention: groups of `q_len` query rows ([groups*q_len, C]) against
/// ragged key ranges of a fused kv buffer `[tokens, 2C]` (k = cols 0..C, v = C..2C).
fn cross(rng: &mut Rng, q_len: usize, heads: usize, hd: usize, ranges: Vec<(usize, usize)>) -> (Problem, Vec<Vec<f32>>) {
    let c = heads * hd;
    let groups = ranges.len();
    let tokens = ranges.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let qb = q::<Bf16>(&rng.vec(groups * q_len * c, 2.0));
    let kv = q::<Bf16>(&rng.vec(tokens * 2 * c, 2.0));
    let p = Problem {
        heads,
        hd,
        groups,
        groups_inner: 1,
        q_len,
        outer: q_len,
        inner: 0,
        seq: 1,
        q: Place { buf: 0, off: 0, ld: c },
        k: Place { buf: 1, off: 0, ld: 2 * c },
        v: Place { buf: 1, off: c, ld: 2 * c },
        o: Place { buf: 0, off: 0, ld: c },
        out_len: groups * q_len * c,
        ranges: Some(ranges),
        rope: None,
        scale: 1.0 / (hd as f32).sqrt(),
        bias: None,
    };
    (p, vec![qb, kv])
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_spatial_open_sora() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // 2 frames of 3600 tokens (a 60 x 60 patch grid), 16 heads of 72: q/k/v slices of one qkv buffer.
    let heads = if small_run() { 2 } else { 16 };
    let (p, bufs) = spatial(&mut rng, 2, 3600, heads, 72, true, 0, 2.0);
    // The reference on every 4th query row and on the whole last (partial) tile.
    run_case(&g, "spatial open-sora", &p, &bufs, &|i| i % 4 == 1 || i >= 3584, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_demo_size() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // The demo model: 64 tokens, 4 heads of 16, 16 groups; separate q, k, v.
    let (p, bufs) = spatial(&mut rng, 16, 64, 4, 16, false, 0, 2.0);
    run_case(&g, "demo", &p, &bufs, &all, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_odd_lengths_and_head_dims() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // q_len tails around the 64-row query tile and the 64- (32-) key tile, every kernel,
    // padded head dims (8 -> 16, 24 -> 32, 40 -> 64, 72 -> 80, 88/96 -> 128), out rows
    // with 8 padding columns that must stay untouched.
    let hds = [72usize, 16, 8, 24, 40, 64, 80, 88, 128];
    let mut k = 0;
    for q_len in [1usize, 7, 65, 129, 200] {
        for _ in 0..2 {
            let hd = hds[k % hds.len()];
            k += 1;
            let groups = 1 + (q_len + k) % 3;
            let (p, bufs) = spatial(&mut rng, groups, q_len, 3, hd, k % 2 == 0, 8, 2.0);
            run_case(&g, "odd lengths", &p, &bufs, &all, None);
        }
    }
    for hd in [32usize, 96, 112] {
        let (p, bufs) = spatial(&mut rng, 2, 77, 2, hd, true, 0, 2.0);
        run_case(&g, "head dims", &p, &bufs, &all, None);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_temporal_rope() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // Strided groups over (b, s), sequence over t, RoPE on t: B = 2, S = 37.
    for (t, hd, heads) in [(8usize, 72usize, 4usize), (30, 72, 16), (8, 16, 4), (30, 16, 2)] {
        let (p, bufs) = temporal(&mut rng, 2, t, 37, heads, hd);
        run_case(&g, "temporal rope", &p, &bufs, &all, None);
    }
    // Longer sequences (several key tiles, rotation of every tile) on the 64-wide kernel.
    let (p, bufs) = temporal(&mut rng, 1, 150, 5, 2, 64);
    run_case(&g, "temporal rope long", &p, &bufs, &all, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_rope_matches_rope_kernel() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // Fused RoPE == qc_rope_bf16 in place, then attention without RoPE (same bf16 roundings).
    let (p, bufs) = temporal(&mut rng, 2, 30, 37, 4, 72);
    let fused = launch(&g, &p, &bufs, None, false);
    let c = p.heads * p.hd;
    let dqkv = g.up::<Bf16>(&bufs[0]);
    let dfreqs = g.up_raw(p.rope.as_ref().unwrap());
    // Frame-major rows (b*T + t)*S + s: batch b, position t, S rows apart, qkv rows 3C wide.
    let (b, t, s) = (2usize, 30usize, 37usize);
    for part in 0..2 {
        let args = QcRopeArgs {
            x: g.addr(&dqkv, part * c),
            freqs: g.addr(&dfreqs, 0),
            batch: b as i64,
            batch_stride: (t * s * 3 * c) as i64,
            seq_stride: (s * 3 * c) as i64,
            head_stride: p.hd as i64,
            seq: t as i32,
            heads: p.heads as i32,
            head_dim: p.hd as i32,
            _pad: 0,
        };
        // One rope row per (b, t) covers one token s only: run it for every s.
        for si in 0..s {
            let a = QcRopeArgs { x: g.addr(&dqkv, part * c + si * 3 * c), ..args };
            g.run("qc_rope_bf16", launch_cfg::per_row_threads((b * t) as i64, (p.heads * p.hd / 2) as i64), a);
        }
    }
    let rotated = g.down(&dqkv);
    let plain = Problem { rope: None, ..p.clone() };
    let unfused = launch(&g, &plain, &[rotated], None, false);
    let want: Vec<f64> = unfused.iter().map(|&x| x as f64).collect();
    // The same bf16 inputs to the same kernel code: equal up to nothing but accumulation order (none).
    check("fused rope vs qc_rope + attention", &fused, &want, 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_cross_ragged() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // Caption lengths 1..300 with an empty range, contiguous as TextCond packs them.
    let lens = [1usize, 0, 300, 17, 64, 65, 120, 2];
    let mut offsets = vec![0usize];
    for l in lens {
        offsets.push(offsets.last().unwrap() + l);
    }
    let ranges = AttnSpec::ranges_from_offsets(&offsets);
    for (q_len, hd) in [(74usize, 72usize), (200, 16)] {
        let (p, bufs) = cross(&mut rng, q_len, 3, hd, ranges.clone());
        let out = run_case(&g, "cross ragged", &p, &bufs, &all, None);
        // The empty group's rows are exactly zero.
        let c = p.heads * p.hd;
        assert!(out[q_len * c..2 * q_len * c].iter().all(|&x| x == 0.0), "empty kv range: output not zero");
    }
    // Ranges in any order, overlapping and with gaps (kv_start/kv_end are free).
    let (p, bufs) = cross(&mut rng, 33, 2, 72, vec![(50, 90), (0, 300), (10, 11), (200, 200), (5, 70)]);
    run_case(&g, "cross free ranges", &p, &bufs, &all, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_large_scores() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for (hd, q_len) in [(72usize, 200usize), (16, 130)] {
        // Inputs x8, and keys growing along the sequence, so that the running max
        // rises from key tile to key tile (the rescaling of O and l is exercised).
        let (p, mut bufs) = spatial(&mut rng, 2, q_len, 3, hd, false, 0, 8.0);
        let c = p.heads * hd;
        for r in 0..2 * q_len {
            let f = 1.0 + (r % q_len) as f32 / 64.0;
            for x in &mut bufs[1][r * c..(r + 1) * c] {
                *x = q::<Bf16>(&[*x * f])[0];
            }
        }
        let out = run_case(&g, "large scores", &p, &bufs, &all, None);
        assert!(out.iter().all(|x| x.is_finite()));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_grid_stride_and_in_place() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // Fewer blocks than work items: each block runs several (tile, head, group) items,
    // reusing its shared memory; also a cross case with an empty group in the mix.
    let (p, bufs) = spatial(&mut rng, 5, 150, 3, 72, true, 8, 2.0);
    run_case(&g, "grid stride 7", &p, &bufs, &all, Some(7));
    let (p, bufs) = spatial(&mut rng, 3, 100, 2, 16, true, 0, 2.0);
    run_case(&g, "grid stride 1", &p, &bufs, &all, Some(1));
    let (p, bufs) = cross(&mut rng, 70, 2, 40, vec![(0, 5), (5, 5), (5, 150)]);
    run_case(&g, "grid stride 2 cross", &p, &bufs, &all, Some(2));

    // out == q (each block reads its query rows before writing them): the output
    // replaces q in the fused buffer and k, v stay as they were.
    let (p, bufs) = spatial(&mut rng, 2, 130, 3, 72, true, 0, 2.0);
    let c = p.heads * p.hd;
    let in_place = Problem { o: p.q, out_len: bufs[0].len(), ..p.clone() };
    let out = launch(&g, &in_place, &bufs, None, true);
    let r = reference(&in_place, &bufs, &all);
    let got: Vec<f32> = r.iter().map(|&(i, _)| out[i]).collect();
    let want: Vec<f64> = r.iter().map(|&(_, v)| v).collect();
    check("in place (out = q)", &got, &want, TOL);
    for row in 0..2 * 130 {
        for j in c..3 * c {
            let i = row * 3 * c + j;
            assert_eq!(out[i].to_bits(), bufs[0][i].to_bits(), "in place: k/v element {i} changed");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_matches_cpu_backend() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let cpu = crate::backend::cpu::CpuBackend::new();
    let tensor = |v: &[f32], rows: usize, c: usize| Tensor::from_f32(&[rows, c], v.to_vec()).unwrap();
    // Dense self-attention (spatial layout, separate q, k, v) ...
    let (p, bufs) = spatial(&mut rng, 3, 100, 4, 72, false, 0, 2.0);
    let c = p.heads * p.hd;
    let gpu_out = launch(&g, &p, &bufs, None, false);
    let spec = AttnSpec::dense(p.groups, p.q_len, p.q_len, p.heads, p.hd);
    let rows = p.groups * p.q_len;
    let cpu_out = cpu
        .attention(&tensor(&bufs[0], rows, c), &tensor(&bufs[1], rows, c), &tensor(&bufs[2], rows, c), &spec, None)
        .unwrap();
    let want: Vec<f64> = cpu_out.f32().unwrap().iter().map(|&x| x as f64).collect();
    check("vs CPU backend, dense", &gpu_out, &want, TOL);

    // ... and ragged cross-attention with an empty range (k, v split out of the fused kv).
    let offsets = [0usize, 40, 40, 257, 300];
    let (p, bufs) = cross(&mut rng, 90, 2, 72, AttnSpec::ranges_from_offsets(&offsets));
    let c = p.heads * p.hd;
    let gpu_out = launch(&g, &p, &bufs, None, false);
    let tokens = 300;
    let split = |part: usize| -> Vec<f32> {
        (0..tokens).flat_map(|t| bufs[1][t * 2 * c + part * c..t * 2 * c + (part + 1) * c].to_vec()).collect()
    };
    let spec = AttnSpec::ragged(p.q_len, p.heads, p.hd, AttnSpec::ranges_from_offsets(&offsets));
    let cpu_out = cpu
        .attention(
            &tensor(&bufs[0], p.groups * p.q_len, c),
            &tensor(&split(0), tokens, c),
            &tensor(&split(1), tokens, c),
            &spec,
            None,
        )
        .unwrap();
    let want: Vec<f64> = cpu_out.f32().unwrap().iter().map(|&x| x as f64).collect();
    check("vs CPU backend, ragged", &gpu_out, &want, TOL);
}

// ------------------------------------------------------------------ score bias (T5)

/// `p` with an f32 score bias of `amp`-uniform values, rows `ld = max kv len + ld_pad`
/// apart and heads `q_len * ld + head_pad` apart (padding that must never be read
/// into a score: it holds huge values), and scale `scale`.
fn with_bias(rng: &mut Rng, p: &Problem, amp: f32, ld_pad: usize, head_pad: usize, scale: f32) -> Problem {
    let max_kv = (0..p.groups).map(|g| p.kv_rows(g).len()).max().unwrap_or(0);
    let ld = max_kv + ld_pad;
    let head_stride = p.q_len * ld + head_pad;
    let mut v = vec![1e30f32; p.heads * head_stride];
    for h in 0..p.heads {
        for i in 0..p.q_len {
            let row = h * head_stride + i * ld;
            v[row..row + max_kv].copy_from_slice(&rng.vec(max_kv, amp));
        }
    }
    Problem { bias: Some(ScoreBias { v, ld, head_stride }), scale, ..p.clone() }
}

/// T5's layout: B prompts padded to L tokens, rows b*L.. of separate q, k, v
/// `[B*L, C]` buffers, each prompt attending to its first `lens[b]` keys (the
/// padding left out through the key ranges, every query row still computed).
fn t5_layout(rng: &mut Rng, l: usize, lens: &[usize], heads: usize, hd: usize, amp: f32) -> (Problem, Vec<Vec<f32>>) {
    let ranges: Vec<(usize, usize)> = lens.iter().enumerate().map(|(b, &n)| (b * l, b * l + n)).collect();
    let c = heads * hd;
    let rows = lens.len() * l;
    let bufs: Vec<Vec<f32>> = (0..3).map(|_| q::<Bf16>(&rng.vec(rows * c, amp))).collect();
    let pl = |i| Place { buf: i, off: 0, ld: c };
    let p = Problem {
        heads,
        hd,
        groups: lens.len(),
        groups_inner: 1,
        q_len: l,
        outer: l,
        inner: 0,
        seq: 1,
        q: pl(0),
        k: pl(1),
        v: pl(2),
        o: Place { buf: 0, off: 0, ld: c },
        out_len: rows * c,
        ranges: Some(ranges),
        rope: None,
        scale: 1.0,
        bias: None,
    };
    (p, bufs)
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_bias_t5_xxl() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // T5-XXL: 64 heads of 64, 300 tokens, unscaled scores plus a position bias of
    // T5's magnitude; one full prompt and one of 123 tokens padded to 300.
    let heads = if small_run() { 8 } else { 64 };
    let (p, bufs) = t5_layout(&mut rng, 300, &[300, 123], heads, 64, 0.5);
    let p = with_bias(&mut rng, &p, 8.0, 0, 0, 1.0);
    run_case(&g, "t5-xxl bias", &p, &bufs, &all, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_bias_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // The tiny T5 fixture (4 heads of 8, 12 tokens, prompts of 5 and 12), the demo
    // T5 (16), and every other kernel; prompt lengths around the key tiles, an empty
    // one; bias rows and heads with padding that must not be read.
    let cases: [(usize, &[usize], usize, usize); 7] = [
        (12, &[5, 12], 4, 8),
        (12, &[12, 1, 7], 4, 16),
        (77, &[77, 0, 33], 3, 32),
        (130, &[64, 130, 65], 2, 64),
        (129, &[129, 100], 2, 72),
        (40, &[33, 40], 2, 128),
        (1, &[1], 3, 40),
    ];
    for (k, (l, lens, heads, hd)) in cases.into_iter().enumerate() {
        let (p, bufs) = t5_layout(&mut rng, l, lens, heads, hd, 1.0);
        let p = with_bias(&mut rng, &p, 4.0, k % 3, 5 * (k % 2), if k % 2 == 0 { 1.0 } else { 1.0 / (hd as f32).sqrt() });
        let out = run_case(&g, "bias", &p, &bufs, &all, None);
        if let Some(e) = lens.iter().position(|&n| n == 0) {
            let c = heads * hd;
            assert!(out[e * l * c..(e + 1) * l * c].iter().all(|&x| x == 0.0), "empty kv range: output not zero");
        }
    }
    // Self-attention layout (no key ranges) with a bias, separate and fused qkv, and
    // fewer blocks than work items.
    let (p, bufs) = spatial(&mut rng, 3, 100, 2, 64, true, 8, 1.0);
    let p = with_bias(&mut rng, &p, 4.0, 2, 0, 1.0);
    run_case(&g, "bias self-attention", &p, &bufs, &all, None);
    run_case(&g, "bias grid stride 5", &p, &bufs, &all, Some(5));
    let (p, bufs) = temporal(&mut rng, 2, 30, 5, 2, 16);
    let p = with_bias(&mut rng, &p, 4.0, 0, 3, 0.25);
    run_case(&g, "bias with rope", &p, &bufs, &all, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_zero_bias_matches_unbiased_kernel() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // A zero bias adds exactly nothing: the biased kernels' outputs are bit-identical.
    for hd in [8usize, 64, 72, 128] {
        let (p, bufs) = t5_layout(&mut rng, 90, &[90, 31], 2, hd, 1.0);
        let plain = launch(&g, &p, &bufs, None, false);
        let mut biased = with_bias(&mut rng, &p, 0.0, 1, 0, 1.0);
        biased.bias.as_mut().unwrap().v.iter_mut().for_each(|x| *x = 0.0);
        let out = launch(&g, &biased, &bufs, None, false);
        for (i, (a, b)) in out.iter().zip(&plain).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "hd {hd}: element {i}: zero bias {a}, no bias {b}");
        }
    }
}

// ------------------------------------------------------------------ wide heads (the VAE)

/// The VAE mid-block's attention at 720p: one frame of 90 x 160 = 14400 latent
/// positions, one head of 512 (qc_attention_wide_d512_bf16), against the f64
/// reference on every 61st query row and the whole last (partial) tile.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_wide_vae_720p_frame() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let q_len = if small_run() { 2000 } else { 14400 };
    let (p, bufs) = spatial(&mut rng, 1, q_len, 1, 512, false, 0, 2.0);
    let tail = q_len / 64 * 64;
    run_case(&g, "vae 720p frame", &p, &bufs, &|i| i % 61 == 3 || i >= tail, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_wide_odd_lengths_and_head_dims() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // q_len tails around the 64-row query tile, the 32-key (d512) and 64-key (d256) tiles
    // and the 16-row blocks; head dims padded inside both kernels (136, 200 -> 256;
    // 264, 384, 504 -> 512) and exact (256, 512); several groups (frames) and heads;
    // out rows with 8 padding columns that must stay untouched.
    let hds = [512usize, 264, 136, 256, 384, 504, 200];
    let mut k = 0;
    for q_len in [1usize, 7, 16, 17, 33, 65, 129, 200] {
        let hd = hds[k % hds.len()];
        k += 1;
        let groups = 1 + (q_len + k) % 3;
        let heads = 1 + k % 2;
        let (p, bufs) = spatial(&mut rng, groups, q_len, heads, hd, k % 2 == 0, 8, 2.0);
        run_case(&g, "wide odd lengths", &p, &bufs, &all, None);
    }
    // The decoder's micro-batch of 4 frames at a small latent (12 x 20 positions).
    let (p, bufs) = spatial(&mut rng, 4, 240, 1, 512, false, 0, 2.0);
    run_case(&g, "wide vae micro-batch", &p, &bufs, &all, None);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_wide_ranges_scores_grid_stride_in_place() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // Ragged key ranges with an empty one (zero rows) and ranges of 1, 31, 33, 300 keys.
    let lens = [31usize, 0, 300, 1, 33];
    let mut offsets = vec![0usize];
    for l in lens {
        offsets.push(offsets.last().unwrap() + l);
    }
    for hd in [512usize, 256] {
        let (p, bufs) = cross(&mut rng, 70, 1, hd, AttnSpec::ranges_from_offsets(&offsets));
        let out = run_case(&g, "wide cross ragged", &p, &bufs, &all, None);
        assert!(out[70 * hd..2 * 70 * hd].iter().all(|&x| x == 0.0), "empty kv range: output not zero");
        // Fewer blocks than work items: each block runs several items, reusing its shared memory.
        run_case(&g, "wide cross grid stride 2", &p, &bufs, &all, Some(2));
    }
    // Strided groups (the temporal layout, without RoPE).
    let (p, bufs) = temporal(&mut rng, 2, 40, 3, 1, 512);
    run_case(&g, "wide strided groups", &Problem { rope: None, ..p }, &bufs, &all, None);
    // Large scores with keys growing along the sequence: the running max rises from key
    // tile to key tile, so O and l are rescaled.
    let q_len = 150;
    let (p, mut bufs) = spatial(&mut rng, 2, q_len, 1, 512, false, 0, 4.0);
    for r in 0..2 * q_len {
        let f = 1.0 + (r % q_len) as f32 / 32.0;
        for x in &mut bufs[1][r * 512..(r + 1) * 512] {
            *x = q::<Bf16>(&[*x * f])[0];
        }
    }
    let out = run_case(&g, "wide large scores", &p, &bufs, &all, Some(3));
    assert!(out.iter().all(|x| x.is_finite()));
    // out == q in a fused qkv buffer: each block reads its query rows before writing them.
    let (p, bufs) = spatial(&mut rng, 2, 100, 1, 512, true, 0, 2.0);
    let in_place = Problem { o: p.q, out_len: bufs[0].len(), ..p.clone() };
    let out = launch(&g, &in_place, &bufs, None, true);
    let r = reference(&in_place, &bufs, &all);
    let got: Vec<f32> = r.iter().map(|&(i, _)| out[i]).collect();
    let want: Vec<f64> = r.iter().map(|&(_, v)| v).collect();
    check("wide in place (out = q)", &got, &want, TOL);
    for row in 0..2 * 100 {
        for j in 512..3 * 512 {
            let i = row * 3 * 512 + j;
            assert_eq!(out[i].to_bits(), bufs[0][i].to_bits(), "wide in place: k/v element {i} changed");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn attention_wide_matches_narrow_kernels() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // Head dims both families take: the wide kernels against the narrow ones on the same
    // bf16 inputs: the same roundings, but other key tiles (so other running maxima and
    // bf16-rounded probabilities) and summation orders: close, not equal.
    for (hd, q_len) in [(128usize, 150usize), (72, 77), (8, 33)] {
        let (p, bufs) = spatial(&mut rng, 2, q_len, 2, hd, true, 0, 2.0);
        let narrow = launch(&g, &p, &bufs, None, false);
        for (name, hdp) in [("qc_attention_wide_d256_bf16", 256usize), ("qc_attention_wide_d512_bf16", 512)] {
            let out = g.poisoned::<Bf16>(p.out_len);
            let dev = g.up::<Bf16>(&bufs[0]);
            let c = p.heads * hd;
            let args = QcAttentionArgs {
                q: g.addr(&dev, 0),
                k: g.addr(&dev, c),
                v: g.addr(&dev, 2 * c),
                out: g.addr(&out, 0),
                ldq: 3 * c as i64,
                ldk: 3 * c as i64,
                ldv: 3 * c as i64,
                ldo: c as i64,
                outer_stride: q_len as i64,
                seq_stride: 1,
                groups: 2,
                groups_inner: 1,
                q_len: q_len as i32,
                heads: p.heads as i32,
                head_dim: hd as i32,
                scale: p.scale,
                ..Default::default()
            };
            let (grid, block, shared) = launch_cfg::attention_wide(q_len as i64, p.heads as i64, 2, hdp);
            // SAFETY: dev is the [2 q_len, 3C] qkv buffer and out [2 q_len, C], as the args describe.
            unsafe { g.module.launch_ext(name, grid, block, shared, &g.stream, &args) }.unwrap();
            g.stream.synchronize().unwrap();
            let want: Vec<f64> = narrow.iter().map(|&x| x as f64).collect();
            check(&format!("{name} vs {} at hd {hd}", kernel_name(&p)), &g.down(&out), &want, 5e-3);
        }
    }
}
