//! Embeddings and (un)patchify. Scalar arithmetic mirrors PyTorch's float32
//! order of operations, so sinusoid arguments round as the reference's do.

use crate::backend::PatchGrid;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

pub fn timestep_embedding(t: &[f32], dim: usize) -> Result<Tensor> {
    ensure!(dim >= 2, "timestep embedding dim {dim} too small");
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log * i as f32 / half as f32) as f64).exp() as f32).collect();
    let mut out = vec![0f32; t.len() * dim];
    for (row, &tv) in out.chunks_mut(dim).zip(t) {
        for (i, &f) in freqs.iter().enumerate() {
            let a = (tv * f) as f64;
            row[i] = a.cos() as f32;
            row[half + i] = a.sin() as f32;
        }
        // Odd dims end with a zero column, as the reference pads.
    }
    Tensor::from_f32(&[t.len(), dim], out)
}

/// `PositionEmbedding2D`: first half `[sin, cos]` of the column coordinate
/// (scaled by `base_size / w`), second half of the row coordinate (`base_size / h`),
/// both divided by `scale`; token `r * w + c`.
pub fn pos_embed_2d(h: usize, w: usize, dim: usize, scale: f32, base_size: f32) -> Result<Tensor> {
    ensure!(dim.is_multiple_of(4), "position embedding dim {dim} must be divisible by 4");
    ensure!(scale > 0.0 && scale.is_finite(), "position embedding scale {scale} must be positive");
    let half = dim / 2;
    let inv_freq: Vec<f32> = (0..half).step_by(2).map(|i| 1.0 / (10000f64.powf((i as f32 / half as f32) as f64) as f32)).collect();
    let row_pos: Vec<f32> = (0..h).map(|i| (i as f32 / scale) * (base_size / h as f32)).collect();
    let col_pos: Vec<f32> = (0..w).map(|i| (i as f32 / scale) * (base_size / w as f32)).collect();
    // Each coordinate's half row, once per coordinate rather than per token.
    let halves = |pos: &[f32]| -> Vec<f32> {
        pos.iter()
            .flat_map(|&p| {
                let a: Vec<f64> = inv_freq.iter().map(|&f| (p * f) as f64).collect();
                a.iter().map(|v| v.sin() as f32).chain(a.iter().map(|v| v.cos() as f32)).collect::<Vec<_>>()
            })
            .collect()
    };
    let (cols, rows) = (halves(&col_pos), halves(&row_pos));
    let mut out = vec![0f32; h * w * dim];
    for (tok, row) in out.chunks_mut(dim).enumerate() {
        let (r, c) = (tok / w, tok % w);
        let (first, second) = row.split_at_mut(half);
        first.copy_from_slice(&cols[c * half..][..half]);
        second.copy_from_slice(&rows[r * half..][..half]);
    }
    Tensor::from_f32(&[h * w, dim], out)
}

pub fn patchify(x: &Tensor, grid: &PatchGrid) -> Result<Tensor> {
    let (b, c, t, h, w) = (grid.batch, grid.channels, grid.t, grid.h, grid.w);
    ensure!(x.shape() == [b, c, t, h, w], "patchify: input {:?} is not [{b}, {c}, {t}, {h}, {w}]", x.shape());
    let [pt, ph, pw] = grid.patch;
    let [nt, nh, nw] = grid.tokens();
    let plen = grid.patch_len();
    let xs = x.f32()?;
    let mut out = vec![0f32; b * nt * nh * nw * plen];
    // Rows of a few values each: tasks of many rows (one per row cost more than the copies).
    out.par_chunks_mut(plen).enumerate().with_min_len(super::chunk_rows(plen)).for_each(|(tok, o)| {
        let bi = tok / (nt * nh * nw);
        let rest = tok % (nt * nh * nw);
        let (ti, hi, wi) = (rest / (nh * nw), (rest / nw) % nh, rest % nw);
        let mut idx = 0;
        for ci in 0..c {
            for a in 0..pt {
                for bb in 0..ph {
                    for cc in 0..pw {
                        let (tt, hh, ww) = (ti * pt + a, hi * ph + bb, wi * pw + cc);
                        o[idx] = if tt < t && hh < h && ww < w { xs[(((bi * c + ci) * t + tt) * h + hh) * w + ww] } else { 0.0 };
                        idx += 1;
                    }
                }
            }
        }
    });
    Tensor::from_f32(&[b * nt * nh * nw, plen], out)
}

pub fn unpatchify(x: &Tensor, grid: &PatchGrid, co: usize) -> Result<Tensor> {
    let (b, t, h, w) = (grid.batch, grid.t, grid.h, grid.w);
    let [pt, ph, pw] = grid.patch;
    let [nt, nh, nw] = grid.tokens();
    let plen = pt * ph * pw * co;
    ensure!(x.numel() == b * nt * nh * nw * plen, "unpatchify: input {:?} is not [{}, {plen}]", x.shape(), b * nt * nh * nw);
    let xs = x.f32()?;
    let mut out = vec![0f32; b * co * t * h * w];
    // One output row (b, c, t, h) at a time.
    out.par_chunks_mut(w.max(1)).enumerate().with_min_len(super::chunk_rows(w.max(1))).for_each(|(row, o)| {
        let hh = row % h;
        let tt = (row / h) % t;
        let ci = (row / (h * t)) % co;
        let bi = row / (h * t * co);
        let (ti, a) = (tt / pt, tt % pt);
        let (hi, bb) = (hh / ph, hh % ph);
        for (ww, v) in o.iter_mut().enumerate() {
            let (wi, cc) = (ww / pw, ww % pw);
            let tok = ((bi * nt + ti) * nh + hi) * nw + wi;
            *v = xs[tok * plen + ((a * ph + bb) * pw + cc) * co + ci];
        }
    });
    Tensor::from_f32(&[b, co, t, h, w], out)
}
