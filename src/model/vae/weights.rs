//! The decoder weights of `VideoAutoencoderPipeline` under their official
//! names: `spatial_vae.module.*` (diffusers `AutoencoderKL`), `temporal_vae.*`
//! (Open-Sora `VAE_Temporal`) and the `scale`/`shift` buffers. Encoder weights
//! are not loaded.

use super::config::{TemporalParams, VaeConfig};
use crate::backend::conv::ConvWeight;
use crate::backend::Linear;
use crate::checkpoint::{Checkpoint, WeightLoader};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::Result;

const SPATIAL: &str = "spatial_vae.module";
const TEMPORAL: &str = "temporal_vae";

/// Affine parameters of one `nn.GroupNorm`.
pub struct GroupNormWeights {
    pub weight: Tensor,
    pub bias: Tensor,
}

/// diffusers `ResnetBlock2D` without time embedding.
pub struct Resnet2d {
    pub norm1: GroupNormWeights,
    pub conv1: ConvWeight,
    pub norm2: GroupNormWeights,
    pub conv2: ConvWeight,
    /// 1x1 `conv_shortcut` when the channel count changes.
    pub shortcut: Option<ConvWeight>,
}

/// The mid block's single-head self-attention with its group norm.
pub struct MidAttention {
    pub norm: GroupNormWeights,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
}

/// diffusers `UpDecoderBlock2D`.
pub struct UpBlock2d {
    pub resnets: Vec<Resnet2d>,
    /// `Upsample2D` convolution (after nearest 2x), absent in the last block.
    pub upsample: Option<ConvWeight>,
}

/// `AutoencoderKL`'s `post_quant_conv` and `Decoder`.
pub struct SpatialDecoderWeights {
    pub post_quant_conv: Option<ConvWeight>,
    pub conv_in: ConvWeight,
    /// `mid_block.resnets.0` and `.1`.
    pub mid_resnets: Vec<Resnet2d>,
    pub mid_attention: Option<MidAttention>,
    pub up_blocks: Vec<UpBlock2d>,
    pub norm_out: GroupNormWeights,
    pub conv_out: ConvWeight,
}

/// Open-Sora's temporal `ResBlock` (causal 3-D convolutions without bias).
pub struct ResBlock3d {
    pub norm1: GroupNormWeights,
    pub conv1: ConvWeight,
    pub norm2: GroupNormWeights,
    pub conv2: ConvWeight,
    /// 1x1x1 `conv3` when the channel count changes.
    pub shortcut: Option<ConvWeight>,
}

/// `VAE_Temporal`'s `post_quant_conv` and `Decoder`.
pub struct TemporalDecoderWeights {
    pub post_quant_conv: ConvWeight,
    pub conv1: ConvWeight,
    pub res_blocks: Vec<ResBlock3d>,
    /// Indexed like the checkpoint: block `i` runs in the order `n-1, ..., 0`.
    pub block_res_blocks: Vec<Vec<ResBlock3d>>,
    /// `conv_blocks[i]` runs after block `i + 1` (depth-to-time by 2 follows); `None` is `nn.Identity`.
    pub conv_blocks: Vec<Option<ConvWeight>>,
    pub norm_out: GroupNormWeights,
    pub conv_out: ConvWeight,
}

pub struct VaeWeights {
    pub spatial: SpatialDecoderWeights,
    pub temporal: TemporalDecoderWeights,
    /// `[C]` latent de-normalization: `z * scale + shift`.
    pub scale: Tensor,
    pub shift: Tensor,
}

/// Where weights come from: a checkpoint, or random values for benchmarks.
trait Source {
    fn get(&mut self, name: &str, shape: &[usize]) -> Tensor;
    /// Whether `name` exists (to pick between the current and the deprecated attention names).
    fn has(&self, name: &str) -> bool;
    /// The stored shape of `name`, when the source has one.
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;
}

struct CheckpointSource<'a> {
    loader: WeightLoader<'a>,
    ck: &'a Checkpoint,
}

impl Source for CheckpointSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Tensor {
        self.loader.get(name, shape)
    }
    fn has(&self, name: &str) -> bool {
        self.ck.contains(name)
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.ck.shape(name).map(|s| s.to_vec())
    }
}

struct RandomSource(Rng);

impl Source for RandomSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if shape.len() >= 2 {
            // Scaled like a trained layer so activations stay O(1) through depth.
            let s = 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt();
            (0..n).map(|_| self.0.normal() * s).collect()
        } else if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name.ends_with("norm.weight") || name.ends_with("norm_out.weight") {
            (0..n).map(|_| 1.0 + 0.1 * self.0.normal()).collect()
        } else {
            (0..n).map(|_| 0.1 * self.0.normal()).collect()
        };
        Tensor::from_f32(shape, v).expect("shape matches")
    }
    fn has(&self, _name: &str) -> bool {
        true
    }
    fn shape_of(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }
}

fn conv(src: &mut dyn Source, prefix: &str, shape: &[usize], bias: bool) -> ConvWeight {
    let w = src.get(&format!("{prefix}.weight"), shape);
    let b = bias.then(|| src.get(&format!("{prefix}.bias"), &[shape[0]]));
    ConvWeight::new(w, b).expect("shapes checked by the loader")
}

fn norm(src: &mut dyn Source, prefix: &str, c: usize) -> GroupNormWeights {
    GroupNormWeights { weight: src.get(&format!("{prefix}.weight"), &[c]), bias: src.get(&format!("{prefix}.bias"), &[c]) }
}

fn linear(src: &mut dyn Source, prefix: &str, out: usize, inp: usize) -> Linear {
    let w = src.get(&format!("{prefix}.weight"), &[out, inp]);
    let b = src.get(&format!("{prefix}.bias"), &[out]);
    Linear::new(w, Some(b)).expect("shapes checked by the loader")
}

fn resnet2d(src: &mut dyn Source, prefix: &str, cin: usize, cout: usize) -> Resnet2d {
    Resnet2d {
        norm1: norm(src, &format!("{prefix}.norm1"), cin),
        conv1: conv(src, &format!("{prefix}.conv1"), &[cout, cin, 3, 3], true),
        norm2: norm(src, &format!("{prefix}.norm2"), cout),
        conv2: conv(src, &format!("{prefix}.conv2"), &[cout, cout, 3, 3], true),
        shortcut: (cin != cout).then(|| conv(src, &format!("{prefix}.conv_shortcut"), &[cout, cin, 1, 1], true)),
    }
}

fn mid_attention(src: &mut dyn Source, prefix: &str, c: usize) -> MidAttention {
    // diffusers >= 0.14 names; older checkpoints use query/key/value/proj_attn.
    let current = !src.has(&format!("{prefix}.query.weight")) || src.has(&format!("{prefix}.to_q.weight"));
    let [q, k, v, o] = if current { ["to_q", "to_k", "to_v", "to_out.0"] } else { ["query", "key", "value", "proj_attn"] };
    MidAttention {
        norm: norm(src, &format!("{prefix}.group_norm"), c),
        q: linear(src, &format!("{prefix}.{q}"), c, c),
        k: linear(src, &format!("{prefix}.{k}"), c, c),
        v: linear(src, &format!("{prefix}.{v}"), c, c),
        out: linear(src, &format!("{prefix}.{o}"), c, c),
    }
}

fn spatial(src: &mut dyn Source, cfg: &VaeConfig) -> SpatialDecoderWeights {
    let s = &cfg.vae_2d;
    let boc = &s.block_out_channels;
    let top = *boc.last().expect("validated non-empty");
    let lat = s.latent_channels;
    let d = format!("{SPATIAL}.decoder");
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    let mut up_blocks = Vec::new();
    for (i, &out) in rev.iter().enumerate() {
        let prev = if i == 0 { rev[0] } else { rev[i - 1] };
        let resnets = (0..s.layers_per_block + 1).map(|j| resnet2d(src, &format!("{d}.up_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { out }, out)).collect();
        let upsample = (i + 1 < rev.len()).then(|| conv(src, &format!("{d}.up_blocks.{i}.upsamplers.0.conv"), &[out, out, 3, 3], true));
        up_blocks.push(UpBlock2d { resnets, upsample });
    }
    SpatialDecoderWeights {
        post_quant_conv: s.use_post_quant_conv.then(|| conv(src, &format!("{SPATIAL}.post_quant_conv"), &[lat, lat, 1, 1], true)),
        conv_in: conv(src, &format!("{d}.conv_in"), &[top, lat, 3, 3], true),
        mid_resnets: (0..2).map(|j| resnet2d(src, &format!("{d}.mid_block.resnets.{j}"), top, top)).collect(),
        mid_attention: s.mid_block_add_attention.then(|| mid_attention(src, &format!("{d}.mid_block.attentions.0"), top)),
        up_blocks,
        norm_out: norm(src, &format!("{d}.conv_norm_out"), boc[0]),
        conv_out: conv(src, &format!("{d}.conv_out"), &[s.out_channels, boc[0], 3, 3], true),
    }
}

fn res_block3d(src: &mut dyn Source, prefix: &str, cin: usize, cout: usize) -> ResBlock3d {
    ResBlock3d {
        norm1: norm(src, &format!("{prefix}.norm1"), cin),
        conv1: conv(src, &format!("{prefix}.conv1.conv"), &[cout, cin, 3, 3, 3], false),
        norm2: norm(src, &format!("{prefix}.norm2"), cout),
        conv2: conv(src, &format!("{prefix}.conv2.conv"), &[cout, cout, 3, 3, 3], false),
        shortcut: (cin != cout).then(|| conv(src, &format!("{prefix}.conv3.conv"), &[cout, cin, 1, 1, 1], false)),
    }
}

fn temporal(src: &mut dyn Source, p: &TemporalParams) -> TemporalDecoderWeights {
    let d = format!("{TEMPORAL}.decoder");
    let nb = p.channel_multipliers.len();
    let top = p.filters * p.channel_multipliers[nb - 1];
    let mut block_res_blocks: Vec<Vec<ResBlock3d>> = (0..nb).map(|_| Vec::new()).collect();
    let mut conv_blocks: Vec<Option<ConvWeight>> = (0..nb - 1).map(|_| None).collect();
    let mut prev = top;
    for i in (0..nb).rev() {
        let f = p.filters * p.channel_multipliers[i];
        for j in 0..p.num_res_blocks {
            block_res_blocks[i].push(res_block3d(src, &format!("{d}.block_res_blocks.{i}.{j}"), prev, f));
            prev = f;
        }
        if i > 0 && p.temporal_downsample[i - 1] {
            conv_blocks[i - 1] = Some(conv(src, &format!("{d}.conv_blocks.{}.conv", i - 1), &[prev * 2, prev, 3, 3, 3], true));
        }
    }
    let bottom = p.filters * p.channel_multipliers[0];
    TemporalDecoderWeights {
        post_quant_conv: conv(src, &format!("{TEMPORAL}.post_quant_conv.conv"), &[p.latent_embed_dim, p.embed_dim, 1, 1, 1], true),
        conv1: conv(src, &format!("{d}.conv1.conv"), &[top, p.latent_embed_dim, 3, 3, 3], true),
        res_blocks: (0..p.num_res_blocks).map(|j| res_block3d(src, &format!("{d}.res_blocks.{j}"), top, top)).collect(),
        block_res_blocks,
        conv_blocks,
        norm_out: norm(src, &format!("{d}.norm1"), bottom),
        conv_out: conv(src, &format!("{d}.conv_out.conv"), &[p.in_out_channels, bottom, 3, 3, 3], true),
    }
}

/// The `scale` or `shift` buffer (`[1, C, 1, 1, 1]`, any shape of `C` values, or a
/// 0-d scalar when the config gave one number), else the config's values, as `[C]`.
fn buffer(src: &mut dyn Source, cfg: &VaeConfig, name: &str, c: usize, default: f32) -> Result<Tensor> {
    if src.has(name) {
        let shape = match src.shape_of(name) {
            Some(s) if s.is_empty() || s.iter().product::<usize>() == c => s,
            _ => vec![1, c, 1, 1, 1],
        };
        let t = src.get(name, &shape);
        let v = t.to_f32()?.into_f32()?;
        let v = if v.len() == 1 { vec![v[0]; c] } else { v };
        return Tensor::from_f32(&[c], v);
    }
    let given = if name == "scale" { &cfg.scale } else { &cfg.shift };
    let v = match given {
        Some(v) => cfg.channel_values(v)?,
        None => vec![default; c],
    };
    Tensor::from_f32(&[c], v)
}

fn build(src: &mut dyn Source, cfg: &VaeConfig) -> Result<VaeWeights> {
    let p = cfg.vae_temporal.resolve()?;
    Ok(VaeWeights {
        spatial: spatial(src, cfg),
        temporal: temporal(src, &p),
        scale: buffer(src, cfg, "scale", p.embed_dim, 1.0)?,
        shift: buffer(src, cfg, "shift", p.embed_dim, 0.0)?,
    })
}

impl VaeWeights {
    /// Every decoder tensor, checked for presence and shape; one error lists all problems.
    pub fn load(ck: &Checkpoint, cfg: &VaeConfig) -> Result<Self> {
        let mut src = CheckpointSource { loader: WeightLoader::new(ck), ck };
        let w = build(&mut src, cfg)?;
        src.loader.finish()?;
        Ok(w)
    }

    /// Random weights with the real layout, for benchmarks at sizes no fixture has.
    pub fn random(cfg: &VaeConfig, seed: u64) -> Result<Self> {
        let mut src = RandomSource(Rng::new(seed));
        let mut w = build(&mut src, cfg)?;
        let c = w.scale.numel();
        // The official de-normalization, so latents of unit variance decode to the usual range.
        if c == 4 {
            w.scale = Tensor::from_f32(&[4], vec![3.85, 2.32, 2.33, 3.06])?;
            w.shift = Tensor::from_f32(&[4], vec![-0.10, 0.34, 0.27, 0.98])?;
        }
        Ok(w)
    }
}
