//! CPU implementations of the convolution-family ops.
//!
//! Convolutions run as im2col + GEMM over tiles of output positions: every
//! rayon task owns one tile (one sample, one output frame, a range of output
//! pixels), gathers the `[K, tile]` column matrix for it in a private buffer
//! of bounded size and multiplies it by the kernel, so memory stays bounded at
//! 720p whatever the channel count. Output frames whose kernel window reaches
//! into the zero padding along `t` (causal convolutions) skip those taps.

use super::gemm::{sgemm, MatRef};
use super::{act_in_place, CpuBackend};
use crate::backend::conv::{ConvOps, ConvWeight, Pad3};
use crate::backend::Activation;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

#[cfg(test)]
#[path = "conv_tests.rs"]
mod tests;

/// Floats of one task's column buffer (4 MB: the GEMM reads it while it is still in cache).
const COL_BUDGET: usize = 1 << 20;
/// Fewest output positions per task (below this the GEMM is too thin).
const MIN_TILE: usize = 128;
/// Elements per task in elementwise passes.
const ELEM_CHUNK: usize = 1 << 15;

/// A raw output pointer shared by tasks that write disjoint ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `off..off + len` must lie in the buffer and be written by no one else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, off: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// Geometry of one 3-D convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    cin: usize,
    cout: usize,
    /// Input sizes.
    t: usize,
    h: usize,
    w: usize,
    /// Kernel.
    kt: usize,
    kh: usize,
    kw: usize,
    /// Padding before along each dim.
    pt: usize,
    ph: usize,
    pw: usize,
    /// Output sizes.
    to: usize,
    ho: usize,
    wo: usize,
}

fn geometry(what: &str, x: &[usize], w: &ConvWeight, pad: Pad3) -> Result<Geom> {
    ensure!(x.len() == 5, "{what}: input must be [N, C, T, H, W], got {x:?}");
    ensure!(x[1] == w.in_channels, "{what}: input {x:?} has {} channels, the kernel expects {}", x[1], w.in_channels);
    let [kt, kh, kw] = w.kernel;
    let out = |size: usize, p: [usize; 2], k: usize, dim: &str| -> Result<usize> {
        let padded = size + p[0] + p[1];
        ensure!(padded >= k, "{what}: {dim} size {size} padded by {p:?} is smaller than the kernel ({k}) for input {x:?}");
        Ok(padded - k + 1)
    };
    Ok(Geom {
        n: x[0],
        cin: x[1],
        cout: w.out_channels,
        t: x[2],
        h: x[3],
        w: x[4],
        kt,
        kh,
        kw,
        pt: pad[0][0],
        ph: pad[1][0],
        pw: pad[2][0],
        to: out(x[2], pad[0], kt, "t")?,
        ho: out(x[3], pad[1], kh, "h")?,
        wo: out(x[4], pad[2], kw, "w")?,
    })
}

/// The kernel reordered to `[C_out, kt, C_in, kh, kw]`, so the taps of one
/// temporal offset are a contiguous range of each row.
fn pack_weight(w: &ConvWeight) -> Result<Vec<f32>> {
    let ws = w.weight.f32()?;
    let [kt, kh, kw] = w.kernel;
    if kt == 1 {
        return Ok(ws.to_vec());
    }
    let (cin, sp) = (w.in_channels, kh * kw);
    let mut out = vec![0f32; ws.len()];
    out.par_chunks_mut(cin * kt * sp).zip(ws.par_chunks(cin * kt * sp)).for_each(|(o, i)| {
        for c in 0..cin {
            for a in 0..kt {
                o[(a * cin + c) * sp..][..sp].copy_from_slice(&i[(c * kt + a) * sp..][..sp]);
            }
        }
    });
    Ok(out)
}

/// Output positions per task: within the column budget, small enough to give
/// every thread work, never more than one output plane.
fn tile_len(k: usize, planes: usize, plane: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_budget = (COL_BUDGET / k.max(1)).max(MIN_TILE);
    let by_tasks = (planes * plane).div_ceil(2 * threads).max(MIN_TILE);
    by_budget.min(by_tasks).min(plane).max(1)
}

/// Fills `dst` (one im2col row: output positions `p0..p0 + dst.len()` of a plane
/// `wo` wide) from the input plane `src` (`h x w`) for kernel tap `(i, j)`.
#[allow(clippy::too_many_arguments)]
fn fill_row(dst: &mut [f32], src: &[f32], g: &Geom, p0: usize, i: usize, j: usize) {
    let mut p = p0;
    let end = p0 + dst.len();
    let mut d = 0;
    while p < end {
        let (oy, ox0) = (p / g.wo, p % g.wo);
        let seg = (g.wo - ox0).min(end - p);
        let out = &mut dst[d..d + seg];
        let iy = oy + i;
        if iy < g.ph || iy - g.ph >= g.h {
            out.fill(0.0);
        } else {
            let row = &src[(iy - g.ph) * g.w..][..g.w];
            // Input column of output column ox is ox + j - pw, valid in [pw - j, w + pw - j).
            let lo = (g.pw.saturating_sub(j)).clamp(ox0, ox0 + seg);
            let hi = (g.w + g.pw).saturating_sub(j).clamp(lo, ox0 + seg);
            out[..lo - ox0].fill(0.0);
            out[lo - ox0..hi - ox0].copy_from_slice(&row[lo + j - g.pw..hi + j - g.pw]);
            out[hi - ox0..].fill(0.0);
        }
        p += seg;
        d += seg;
    }
}

fn conv_forward(what: &str, x: &Tensor, w: &ConvWeight, pad: Pad3) -> Result<Tensor> {
    let g = geometry(what, x.shape(), w, pad)?;
    let xs = x.f32()?;
    let wp = pack_weight(w)?;
    let bias = match &w.bias {
        Some(b) => Some(b.f32()?),
        None => None,
    };
    let (in_plane, plane) = (g.h * g.w, g.ho * g.wo);
    let (in_vol, out_vol) = (g.t * in_plane, g.to * plane);
    let ktap = g.kh * g.kw;
    let kfull = g.kt * g.cin * ktap;
    let mut out = vec![0f32; g.n * g.cout * out_vol];
    if out.is_empty() {
        return Tensor::from_f32(&[g.n, g.cout, g.to, g.ho, g.wo], out);
    }
    // A pointwise kernel without padding multiplies the input in place: no im2col.
    let pointwise = kfull == g.cin && pad.iter().all(|p| p == &[0, 0]);
    let tile = if pointwise { tile_len(1, g.n * g.to, plane).max(1024.min(plane)) } else { tile_len(kfull, g.n * g.to, plane) };
    let tiles = plane.div_ceil(tile);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..g.n * g.to * tiles).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(col, acc): &mut (Vec<f32>, Vec<f32>), task| {
            let (nn, rest) = (task / (g.to * tiles), task % (g.to * tiles));
            let (ot, ti) = (rest / tiles, rest % tiles);
            let p0 = ti * tile;
            let len = tile.min(plane - p0);
            acc.clear();
            acc.resize(g.cout * len, 0.0);
            let x_n = &xs[nn * g.cin * in_vol..][..g.cin * in_vol];
            if pointwise {
                let b = MatRef { data: &x_n[ot * plane + p0..], rs: in_vol, cs: 1 };
                sgemm(g.cout, len, g.cin, MatRef { data: &wp, rs: kfull, cs: 1 }, b, acc, len, false, 1);
            } else {
                // Temporal taps whose input frame ot + a - pt lies inside the video.
                let a0 = g.pt.saturating_sub(ot).min(g.kt);
                let a1 = (g.t + g.pt).saturating_sub(ot).clamp(a0, g.kt);
                if a1 > a0 {
                    let kv = (a1 - a0) * g.cin * ktap;
                    col.resize(kv * len, 0.0);
                    col.par_chunks_mut(len * ktap).enumerate().for_each(|(r, rows)| {
                        let (a, c) = (a0 + r / g.cin, r % g.cin);
                        let src = &x_n[(c * g.t + ot + a - g.pt) * in_plane..][..in_plane];
                        for (tap, dst) in rows.chunks_mut(len).enumerate() {
                            fill_row(dst, src, &g, p0, tap / g.kw, tap % g.kw);
                        }
                    });
                    let a = MatRef { data: &wp[a0 * g.cin * ktap..], rs: kfull, cs: 1 };
                    sgemm(g.cout, len, kv, a, MatRef { data: col, rs: len, cs: 1 }, acc, len, false, 1);
                }
            }
            for co in 0..g.cout {
                let b = bias.map_or(0.0, |b| b[co]);
                // SAFETY: output row (nn, co, ot), positions p0..p0+len belong to this task alone.
                let dst = unsafe { ptr.slice(((nn * g.cout + co) * g.to + ot) * plane + p0, len) };
                dst.iter_mut().zip(&acc[co * len..][..len]).for_each(|(d, s)| *d = s + b);
            }
        },
    );
    Tensor::from_f32(&[g.n, g.cout, g.to, g.ho, g.wo], out)
}

/// `sum` and `sum of squares about mean` of a slice in f64, in parallel blocks.
fn mean_var(x: &[f32]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let sum: f64 = x.par_chunks(ELEM_CHUNK).map(|c| lanes_f64(c, |v| v)).sum();
    let mean = sum / n;
    let ss: f64 = x.par_chunks(ELEM_CHUNK).map(|c| lanes_f64(c, |v| (v - mean) * (v - mean))).sum();
    (mean, ss / n)
}

/// Sum of `f(x)` in f64 with 8 independent lanes (vectorizes).
#[inline]
fn lanes_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += f(c[i] as f64);
        }
    }
    chunks.remainder().iter().map(|&v| f(v as f64)).sum::<f64>() + acc.iter().sum::<f64>()
}

impl ConvOps for CpuBackend {
    fn conv2d(&self, x: &Tensor, w: &ConvWeight, pad: [usize; 2]) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() == 4, "conv2d: input must be [N, C, H, W], got {s:?}");
        ensure!(w.kernel[0] == 1, "conv2d: kernel {:?} is 3-D", w.kernel);
        let x5 = x.clone().reshape(&[s[0], s[1], 1, s[2], s[3]])?;
        let y = conv_forward("conv2d", &x5, w, [[0, 0], [pad[0], pad[0]], [pad[1], pad[1]]])?;
        let o = y.shape().to_vec();
        y.reshape(&[o[0], o[1], o[3], o[4]])
    }

    fn conv3d(&self, x: &Tensor, w: &ConvWeight, pad: Pad3) -> Result<Tensor> {
        conv_forward("conv3d", x, w, pad)
    }

    fn group_norm(&self, x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f32, act: Activation) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() >= 2, "group_norm: input must be [N, C, ...], got {s:?}");
        let (n, c) = (s[0], s[1]);
        ensure!(groups > 0 && c % groups == 0, "group_norm: {c} channels of {s:?} do not split into {groups} groups");
        ensure!(weight.numel() == c && bias.numel() == c, "group_norm: weight {:?} and bias {:?} must hold {c} values", weight.shape(), bias.shape());
        let (xs, ws, bs) = (x.f32()?, weight.f32()?, bias.f32()?);
        let sp = xs.len().checked_div(n * c).unwrap_or(0);
        let gsize = (c / groups) * sp;
        let stats: Vec<(f64, f64)> = (0..n * groups).into_par_iter().map(|i| mean_var(&xs[i * gsize..][..gsize])).collect();
        let mut out = vec![0f32; xs.len()];
        if sp == 0 {
            return Tensor::from_f32(s, out);
        }
        let per = (ELEM_CHUNK / sp).max(1) * sp;
        out.par_chunks_mut(per).zip(xs.par_chunks(per)).enumerate().for_each(|(blk, (o, i))| {
            let first = blk * per / sp;
            for (k, (op, ip)) in o.chunks_mut(sp).zip(i.chunks(sp)).enumerate() {
                let plane = first + k;
                let ch = plane % c;
                let (mean, var) = stats[(plane / c) * groups + ch / (c / groups)];
                let rstd = 1.0 / (var + eps as f64).sqrt();
                let a = (rstd * ws[ch] as f64) as f32;
                let b = (bs[ch] as f64 - mean * rstd * ws[ch] as f64) as f32;
                op.iter_mut().zip(ip).for_each(|(o, &v)| *o = v * a + b);
                act_in_place(op, act);
            }
        });
        Tensor::from_f32(s, out)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() >= 2, "upsample_nearest2x: input must have at least 2 dims, got {s:?}");
        let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
        let xs = x.f32()?;
        let mut shape = s.to_vec();
        let r = shape.len();
        shape[r - 2] = 2 * h;
        shape[r - 1] = 2 * w;
        let mut out = vec![0f32; xs.len() * 4];
        if w > 0 {
            // Output row `r` of all planes (2h rows each) reads input row `(r / 2h) * h + (r % 2h) / 2`.
            out.par_chunks_mut(2 * w).enumerate().for_each(|(row, o)| {
                let (plane, oy) = (row / (2 * h), row % (2 * h));
                let src = &xs[(plane * h + oy / 2) * w..][..w];
                for (pair, &v) in o.chunks_exact_mut(2).zip(src) {
                    pair[0] = v;
                    pair[1] = v;
                }
            });
        }
        Tensor::from_f32(&shape, out)
    }

    fn depth_to_time(&self, x: &Tensor, s: usize) -> Result<Tensor> {
        let sh = x.shape();
        ensure!(sh.len() == 5, "depth_to_time: input must be [N, C, T, H, W], got {sh:?}");
        ensure!(s > 0 && sh[1].is_multiple_of(s), "depth_to_time: {} channels of {sh:?} are not a multiple of {s}", sh[1]);
        let (n, c, t, plane) = (sh[0], sh[1] / s, sh[2], sh[3] * sh[4]);
        let xs = x.f32()?;
        let mut out = vec![0f32; xs.len()];
        if plane > 0 {
            // Output plane (nn, cc, tt * s + i) <- input plane (nn, cc * s + i, tt).
            out.par_chunks_mut(plane).enumerate().for_each(|(idx, o)| {
                let (nc, ts) = (idx / (t * s), idx % (t * s));
                let (nn, cc) = (nc / c, nc % c);
                let (tt, i) = (ts / s, ts % s);
                o.copy_from_slice(&xs[((nn * c * s + cc * s + i) * t + tt) * plane..][..plane]);
            });
        }
        Tensor::from_f32(&[n, c, t * s, sh[3], sh[4]], out)
    }

    fn channel_affine(&self, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        ensure!(s.len() >= 2, "channel_affine: input must be [N, C, ...], got {s:?}");
        let c = s[1];
        ensure!(scale.numel() == c && shift.numel() == c, "channel_affine: scale {:?} and shift {:?} must hold {c} values for {s:?}", scale.shape(), shift.shape());
        let (xs, a, b) = (x.f32()?, scale.f32()?, shift.f32()?);
        let sp = xs.len().checked_div(s[0] * c).unwrap_or(0);
        let mut out = vec![0f32; xs.len()];
        if sp > 0 {
            out.par_chunks_mut(sp).zip(xs.par_chunks(sp)).enumerate().for_each(|(plane, (o, i))| {
                let ch = plane % c;
                o.iter_mut().zip(i).for_each(|(o, &v)| *o = v * a[ch] + b[ch]);
            });
        }
        Tensor::from_f32(s, out)
    }
}
