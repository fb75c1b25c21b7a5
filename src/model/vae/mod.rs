//! Open-Sora 1.2's video VAE (decoder), computed exactly as
//! `VideoAutoencoderPipeline.decode` of Open-Sora v1.2.0 with diffusers 0.27.2:
//!
//! 1. `z * scale + shift` (the latent de-normalization buffers);
//! 2. the temporal VAE (`VAE_Temporal`, causal 3-D convolutions) on micro-chunks
//!    of `micro_frame_size / 4` latent frames (5 for 17 frames), each decoded
//!    with `min(17, frames left)` frames and cropped by its first
//!    `(4 - n % 4) % 4` frames;
//! 3. the spatial VAE (the SDXL `AutoencoderKL` decoder) frame by frame in
//!    micro-batches, on `x / 0.18215` (hard-coded, not the SDXL config's 0.13025).

mod config;
mod weights;

pub use config::{SpatialVaeConfig, TemporalParams, TemporalVaeConfig, VaeConfig};
pub use weights::{GroupNormWeights, MidAttention, ResBlock3d, Resnet2d, SpatialDecoderWeights, TemporalDecoderWeights, UpBlock2d, VaeWeights};

use crate::backend::conv::{ConvWeight, Pad3};
use crate::backend::{Activation, AttnSpec, Backend};
use crate::checkpoint::Checkpoint;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// The spatial latent scale Open-Sora's `VideoAutoencoderKL` divides by.
pub const SPATIAL_SCALE: f32 = 0.18215;
/// diffusers' resnets, attention and output norm.
const SPATIAL_EPS: f32 = 1e-6;
/// `nn.GroupNorm`'s default, used by the temporal VAE.
const TEMPORAL_EPS: f32 = 1e-5;

pub struct VideoVae {
    pub cfg: VaeConfig,
    pub temporal: TemporalParams,
    pub weights: VaeWeights,
    /// Frames per call of the spatial decoder (memory only; results do not depend on it).
    pub micro_batch: usize,
}

/// `CausalConv3d`'s padding: `kt - 1` zero frames before, `k / 2` on each spatial side.
fn causal(w: &ConvWeight) -> Pad3 {
    let [kt, kh, kw] = w.kernel;
    [[kt - 1, 0], [kh / 2, kh / 2], [kw / 2, kw / 2]]
}

impl VideoVae {
    /// `dir/config.json` and `dir/model.safetensors` (or a sharded index).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = VaeConfig::from_dir(dir)?;
        let ck = Checkpoint::open_dir(dir)?;
        let weights = VaeWeights::load(&ck, &cfg)?;
        Self::from_parts(cfg, weights)
    }

    /// The given configuration with random weights (benchmarks).
    pub fn random(cfg: VaeConfig, seed: u64) -> Result<Self> {
        cfg.validate().context("unsupported VAE configuration")?;
        let weights = VaeWeights::random(&cfg, seed)?;
        Self::from_parts(cfg, weights)
    }

    fn from_parts(cfg: VaeConfig, weights: VaeWeights) -> Result<Self> {
        let temporal = cfg.vae_temporal.resolve()?;
        let micro_batch = cfg.vae_2d.micro_batch_size.unwrap_or(4);
        Ok(VideoVae { cfg, temporal, weights, micro_batch })
    }

    /// Uploads every weight to where `be` computes, once after loading (a
    /// no-op on the CPU backend); decoding works without it, slower.
    pub fn prepare(&mut self, be: &dyn Backend) -> Result<()> {
        let group_norm = |n: &mut GroupNormWeights| -> Result<()> {
            be.prepare_tensor(&mut n.weight)?;
            be.prepare_tensor(&mut n.bias)
        };
        let w = &mut self.weights;
        let s = &mut w.spatial;
        if let Some(c) = &mut s.post_quant_conv {
            be.prepare_conv(c)?;
        }
        be.prepare_conv(&mut s.conv_in)?;
        be.prepare_conv(&mut s.conv_out)?;
        group_norm(&mut s.norm_out)?;
        let mut resnets: Vec<&mut Resnet2d> = s.mid_resnets.iter_mut().collect();
        for ub in &mut s.up_blocks {
            resnets.extend(ub.resnets.iter_mut());
            if let Some(up) = &mut ub.upsample {
                be.prepare_conv(up)?;
            }
        }
        for r in resnets {
            group_norm(&mut r.norm1)?;
            group_norm(&mut r.norm2)?;
            be.prepare_conv(&mut r.conv1)?;
            be.prepare_conv(&mut r.conv2)?;
            if let Some(sc) = &mut r.shortcut {
                be.prepare_conv(sc)?;
            }
        }
        if let Some(a) = &mut s.mid_attention {
            group_norm(&mut a.norm)?;
            for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.out] {
                be.prepare_linear(l)?;
            }
        }
        let t = &mut w.temporal;
        be.prepare_conv(&mut t.post_quant_conv)?;
        be.prepare_conv(&mut t.conv1)?;
        be.prepare_conv(&mut t.conv_out)?;
        group_norm(&mut t.norm_out)?;
        for c in t.conv_blocks.iter_mut().flatten() {
            be.prepare_conv(c)?;
        }
        for rb in t.res_blocks.iter_mut().chain(t.block_res_blocks.iter_mut().flatten()) {
            group_norm(&mut rb.norm1)?;
            group_norm(&mut rb.norm2)?;
            be.prepare_conv(&mut rb.conv1)?;
            be.prepare_conv(&mut rb.conv2)?;
            if let Some(sc) = &mut rb.shortcut {
                be.prepare_conv(sc)?;
            }
        }
        Ok(())
    }

    /// Latent channels `z` must have.
    pub fn latent_channels(&self) -> usize {
        self.temporal.embed_dim
    }

    /// Latent frames of a `num_frames` video (`VideoAutoencoderPipeline.get_latent_size`).
    pub fn latent_frames(&self, num_frames: usize) -> usize {
        self.cfg.latent_frames(&self.temporal, num_frames)
    }

    /// Decodes `z` `[B, C, T, H, W]` into a video `[B, 3, num_frames, f H, f W]`
    /// (f = 8 for the real model) in about [-1, 1].
    pub fn decode(&self, be: &dyn Backend, z: &Tensor, num_frames: usize) -> Result<Tensor> {
        let s = z.shape().to_vec();
        ensure!(s.len() == 5, "VAE decode: z must be [B, C, T, H, W], got shape {s:?}");
        let c = self.latent_channels();
        ensure!(s[1] == c, "VAE decode: z has {} channels (shape {s:?}), the VAE expects {c}", s[1]);
        ensure!(s.iter().all(|&d| d > 0), "VAE decode: z has an empty dimension (shape {s:?})");
        z.f32().context("VAE decode: z")?;
        if let Some(i) = z.find_non_finite() {
            bail!("VAE decode: z contains a non-finite value (NaN or infinity) at flat index {i} of shape {s:?}");
        }
        ensure!(num_frames > 0, "VAE decode: num_frames must be positive");
        let want = self.latent_frames(num_frames);
        ensure!(
            s[2] == want,
            "VAE decode: z has {} latent frames (shape {s:?}) but num_frames {num_frames} corresponds to {want} (micro-chunks of {} frames)",
            s[2],
            self.cfg.micro_frame_size()
        );

        let w = &self.weights;
        let z = be.channel_affine(z, &w.scale, &w.shift)?;
        let m = self.cfg.micro_frame_size();
        let mz = self.temporal.latent_frames(m);
        let (h, wd) = (s[3], s[4]);
        let mut samples = Vec::with_capacity(s[0]);
        for b in 0..s[0] {
            let zb = be.narrow(&z, 0, b, 1)?;
            let mut frames = Vec::new();
            let (mut start, mut left) = (0, num_frames);
            while start < s[2] {
                let len = mz.min(s[2] - start);
                let n = m.min(left);
                let x = self.temporal_decode(be, &be.narrow(&zb, 2, start, len)?, n)?;
                // [1, C, n, h, w] -> n images [n, C, h, w].
                let imgs = be.swap_middle(&x, [1, c, n, h * wd])?.reshape(&[n, c, h, wd])?;
                let mut f0 = 0;
                while f0 < n {
                    let k = self.micro_batch.min(n - f0);
                    frames.push(self.spatial_decode(be, &be.narrow(&imgs, 0, f0, k)?)?);
                    f0 += k;
                }
                start += len;
                left -= n;
            }
            let refs: Vec<&Tensor> = frames.iter().collect();
            let video = be.concat(&refs)?; // [F, 3, H, W]
            let vs = video.shape().to_vec();
            let out = be.swap_middle(&video, [1, vs[0], vs[1], vs[2] * vs[3]])?;
            samples.push(out.reshape(&[1, vs[1], vs[0], vs[2], vs[3]])?);
        }
        let refs: Vec<&Tensor> = samples.iter().collect();
        be.concat(&refs)
    }

    /// `VAE_Temporal.decode` of one micro-chunk `[B, C, t, h, w]` into `n` frames.
    pub fn temporal_decode(&self, be: &dyn Backend, z: &Tensor, n: usize) -> Result<Tensor> {
        let w = &self.weights.temporal;
        let p = &self.temporal;
        let g = p.num_groups;
        let mut x = be.conv3d(z, &w.post_quant_conv, causal(&w.post_quant_conv))?;
        x = be.conv3d(&x, &w.conv1, causal(&w.conv1))?;
        for rb in &w.res_blocks {
            x = res_block3d(be, &x, rb, g)?;
        }
        for i in (0..p.channel_multipliers.len()).rev() {
            for rb in &w.block_res_blocks[i] {
                x = res_block3d(be, &x, rb, g)?;
            }
            if i > 0 {
                if let Some(cb) = &w.conv_blocks[i - 1] {
                    x = be.conv3d(&x, cb, causal(cb))?;
                    x = be.depth_to_time(&x, 2)?;
                }
            }
        }
        x = be.group_norm(&x, g, &w.norm_out.weight, &w.norm_out.bias, TEMPORAL_EPS, Activation::Silu)?;
        x = be.conv3d(&x, &w.conv_out, causal(&w.conv_out))?;
        let f = self.temporal.time_factor();
        let pad = (f - n % f) % f;
        let t = x.shape()[2];
        ensure!(t >= pad + n, "temporal VAE produced {t} frames, cannot crop {pad} and keep {n}");
        be.narrow(&x, 2, pad, t - pad)
    }

    /// `AutoencoderKL.decode(x / 0.18215)` of images `[N, C, h, w]`: `[N, 3, f h, f w]`.
    pub fn spatial_decode(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let w = &self.weights.spatial;
        let g = self.cfg.vae_2d.norm_num_groups;
        let c = x.shape()[1];
        let inv = Tensor::from_f32(&[c], vec![1.0 / SPATIAL_SCALE; c])?;
        let mut x = be.channel_affine(x, &inv, &Tensor::zeros(&[c]))?;
        if let Some(pq) = &w.post_quant_conv {
            x = be.conv2d(&x, pq, [0, 0])?;
        }
        x = be.conv2d(&x, &w.conv_in, [1, 1])?;
        x = resnet2d(be, &x, &w.mid_resnets[0], g)?;
        if let Some(a) = &w.mid_attention {
            x = mid_attention(be, &x, a, g)?;
        }
        x = resnet2d(be, &x, &w.mid_resnets[1], g)?;
        for ub in &w.up_blocks {
            for r in &ub.resnets {
                x = resnet2d(be, &x, r, g)?;
            }
            if let Some(up) = &ub.upsample {
                x = be.upsample_nearest2x(&x)?;
                x = be.conv2d(&x, up, [1, 1])?;
            }
        }
        x = be.group_norm(&x, g, &w.norm_out.weight, &w.norm_out.bias, SPATIAL_EPS, Activation::Silu)?;
        be.conv2d(&x, &w.conv_out, [1, 1])
    }
}

fn res_block3d(be: &dyn Backend, x: &Tensor, w: &ResBlock3d, groups: usize) -> Result<Tensor> {
    let mut h = be.group_norm(x, groups, &w.norm1.weight, &w.norm1.bias, TEMPORAL_EPS, Activation::Silu)?;
    h = be.conv3d(&h, &w.conv1, causal(&w.conv1))?;
    h = be.group_norm(&h, groups, &w.norm2.weight, &w.norm2.bias, TEMPORAL_EPS, Activation::Silu)?;
    h = be.conv3d(&h, &w.conv2, causal(&w.conv2))?;
    match &w.shortcut {
        Some(sc) => be.add(&h, &be.conv3d(x, sc, causal(sc))?),
        None => be.add(&h, x),
    }
}

fn resnet2d(be: &dyn Backend, x: &Tensor, w: &Resnet2d, groups: usize) -> Result<Tensor> {
    let mut h = be.group_norm(x, groups, &w.norm1.weight, &w.norm1.bias, SPATIAL_EPS, Activation::Silu)?;
    h = be.conv2d(&h, &w.conv1, [1, 1])?;
    h = be.group_norm(&h, groups, &w.norm2.weight, &w.norm2.bias, SPATIAL_EPS, Activation::Silu)?;
    h = be.conv2d(&h, &w.conv2, [1, 1])?;
    match &w.shortcut {
        Some(sc) => be.add(&be.conv2d(x, sc, [0, 0])?, &h),
        None => be.add(x, &h),
    }
}

/// diffusers `Attention` with `AttnProcessor2_0` as the VAE mid block uses it:
/// one head over all `h w` positions of each image, group norm first, residual added.
fn mid_attention(be: &dyn Backend, x: &Tensor, w: &MidAttention, groups: usize) -> Result<Tensor> {
    let s = x.shape().to_vec();
    let (n, c, hw) = (s[0], s[1], s[2] * s[3]);
    let h = be.group_norm(x, groups, &w.norm.weight, &w.norm.bias, SPATIAL_EPS, Activation::None)?;
    let tokens = be.swap_middle(&h, [n, c, hw, 1])?.reshape(&[n * hw, c])?;
    let q = be.linear(&tokens, &w.q, Activation::None)?;
    let k = be.linear(&tokens, &w.k, Activation::None)?;
    let v = be.linear(&tokens, &w.v, Activation::None)?;
    let a = be.attention(&q, &k, &v, &AttnSpec::dense(n, hw, hw, 1, c), None)?;
    let o = be.linear(&a, &w.out, Activation::None)?;
    let o = be.swap_middle(&o, [n, hw, c, 1])?.reshape(&s)?;
    be.add(&o, x)
}
