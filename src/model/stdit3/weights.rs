//! STDiT3 weights under their official names.

use super::config::Stdit3Config;
use crate::backend::Linear;
use crate::checkpoint::{Checkpoint, WeightLoader};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::quant::preset::QuantPreset;
use anyhow::Result;
use std::collections::BTreeMap;

#[derive(Clone)]
pub struct BlockWeights {
    /// `[6, C]`: shift/scale/gate of attention and MLP.
    pub scale_shift_table: Tensor,
    pub qkv: Linear,
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    pub proj: Linear,
    pub cross_q: Linear,
    pub cross_kv: Linear,
    pub cross_proj: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// The three sub-modules of a block (the granularity of AIGQ's precision plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubModule {
    SelfAttention,
    CrossAttention,
    Mlp,
}

impl BlockWeights {
    /// The block's linear layers with the sub-module each belongs to.
    pub fn linears_mut(&mut self) -> [(SubModule, &mut Linear); 7] {
        [
            (SubModule::SelfAttention, &mut self.qkv),
            (SubModule::SelfAttention, &mut self.proj),
            (SubModule::CrossAttention, &mut self.cross_q),
            (SubModule::CrossAttention, &mut self.cross_kv),
            (SubModule::CrossAttention, &mut self.cross_proj),
            (SubModule::Mlp, &mut self.fc1),
            (SubModule::Mlp, &mut self.fc2),
        ]
    }
}

#[derive(Clone)]
pub struct Stdit3Weights {
    /// Conv3d kernel as a linear map of each flattened patch `(c, pt, ph, pw)`.
    pub x_embedder: Linear,
    pub t_mlp: [Linear; 2],
    pub fps_mlp: [Linear; 2],
    pub t_block: Linear,
    pub y_proj: [Linear; 2],
    /// `[L, caption_channels]`: the null caption of classifier-free guidance.
    pub y_embedding: Tensor,
    pub rope_freqs: Vec<f32>,
    pub spatial: Vec<BlockWeights>,
    pub temporal: Vec<BlockWeights>,
    /// `[2, C]`: shift and scale of the final layer.
    pub final_scale_shift: Tensor,
    pub final_linear: Linear,
}

/// Where weights come from: a checkpoint, or random values for benchmarks.
trait Source {
    fn get(&mut self, name: &str, shape: &[usize]) -> Tensor;
    /// A linear layer's weight, in the checkpoint's own precision.
    fn get_linear(&mut self, name: &str, shape: &[usize]) -> Tensor {
        self.get(name, shape)
    }
    /// The layer `prefix` when the checkpoint stores it quantized.
    fn get_quantized(&mut self, _prefix: &str, _out: usize, _inp: usize) -> Option<Linear> {
        None
    }
}

/// A checkpoint; with `layers` (a quantized checkpoint's layout), the listed
/// layers are read in their quantized formats.
struct CheckpointSource<'a> {
    loader: WeightLoader<'a>,
    layers: Option<&'a BTreeMap<String, QuantPreset>>,
}

impl Source for CheckpointSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Tensor {
        self.loader.get(name, shape)
    }
    fn get_linear(&mut self, name: &str, shape: &[usize]) -> Tensor {
        self.loader.get_native(name, shape)
    }
    fn get_quantized(&mut self, prefix: &str, out: usize, inp: usize) -> Option<Linear> {
        let p = *self.layers?.get(prefix)?;
        let bias = self.loader.get(&format!("{prefix}.bias"), &[out]);
        match crate::quant::qdir::read_linear(self.loader.checkpoint(), prefix, p, out, inp, Some(bias.clone())) {
            Ok(l) => Some(l),
            Err(e) => {
                self.loader.problem(format!("{e:#}"));
                Some(Linear::new(Tensor::zeros(&[out, inp]), Some(bias)).expect("shapes match"))
            }
        }
    }
}

struct RandomSource(Rng);

impl Source for RandomSource {
    fn get(&mut self, _name: &str, shape: &[usize]) -> Tensor {
        // Scaled like a trained layer so activations stay O(1) through depth.
        let fan_in = if shape.len() >= 2 { shape[1..].iter().product::<usize>() } else { 1 };
        let s = 1.0 / (fan_in as f32).sqrt();
        let n = shape.iter().product();
        Tensor::from_f32(shape, (0..n).map(|_| self.0.normal() * s).collect()).expect("shape matches")
    }
}

fn linear(src: &mut dyn Source, prefix: &str, out: usize, inp: usize) -> Linear {
    if let Some(l) = src.get_quantized(prefix, out, inp) {
        return l;
    }
    let w = src.get_linear(&format!("{prefix}.weight"), &[out, inp]);
    let b = src.get(&format!("{prefix}.bias"), &[out]);
    Linear::new(w, Some(b)).expect("shapes checked by the loader")
}

fn block(src: &mut dyn Source, prefix: &str, cfg: &Stdit3Config) -> BlockWeights {
    let (c, d, m) = (cfg.hidden_size, cfg.head_dim(), cfg.mlp_hidden());
    BlockWeights {
        scale_shift_table: src.get(&format!("{prefix}.scale_shift_table"), &[6, c]),
        qkv: linear(src, &format!("{prefix}.attn.qkv"), 3 * c, c),
        q_norm: src.get(&format!("{prefix}.attn.q_norm.weight"), &[d]),
        k_norm: src.get(&format!("{prefix}.attn.k_norm.weight"), &[d]),
        proj: linear(src, &format!("{prefix}.attn.proj"), c, c),
        cross_q: linear(src, &format!("{prefix}.cross_attn.q_linear"), c, c),
        cross_kv: linear(src, &format!("{prefix}.cross_attn.kv_linear"), 2 * c, c),
        cross_proj: linear(src, &format!("{prefix}.cross_attn.proj"), c, c),
        fc1: linear(src, &format!("{prefix}.mlp.fc1"), m, c),
        fc2: linear(src, &format!("{prefix}.mlp.fc2"), c, m),
    }
}

fn build(src: &mut dyn Source, cfg: &Stdit3Config) -> Result<Stdit3Weights> {
    let c = cfg.hidden_size;
    let [pt, ph, pw] = cfg.patch();
    let patch_len = cfg.in_channels * pt * ph * pw;
    let xw = src.get("x_embedder.proj.weight", &[c, cfg.in_channels, pt, ph, pw]).reshape(&[c, patch_len])?;
    let xb = src.get("x_embedder.proj.bias", &[c]);
    let freq = 256;
    Ok(Stdit3Weights {
        x_embedder: Linear::new(xw, Some(xb))?,
        t_mlp: [linear(src, "t_embedder.mlp.0", c, freq), linear(src, "t_embedder.mlp.2", c, c)],
        fps_mlp: [linear(src, "fps_embedder.mlp.0", c, freq), linear(src, "fps_embedder.mlp.2", c, c)],
        t_block: linear(src, "t_block.1", 6 * c, c),
        y_proj: [linear(src, "y_embedder.y_proj.fc1", c, cfg.caption_channels), linear(src, "y_embedder.y_proj.fc2", c, c)],
        y_embedding: src.get("y_embedder.y_embedding", &[cfg.model_max_length, cfg.caption_channels]),
        rope_freqs: src.get("rope.freqs", &[cfg.head_dim() / 2]).into_f32()?,
        spatial: (0..cfg.depth).map(|i| block(src, &format!("spatial_blocks.{i}"), cfg)).collect(),
        temporal: (0..cfg.depth).map(|i| block(src, &format!("temporal_blocks.{i}"), cfg)).collect(),
        final_scale_shift: src.get("final_layer.scale_shift_table", &[2, c]),
        final_linear: linear(src, "final_layer.linear", pt * ph * pw * cfg.out_channels(), c),
    })
}

impl BlockWeights {
    pub(crate) fn prepare(&mut self, be: &dyn crate::backend::Backend) -> Result<()> {
        for l in [&mut self.qkv, &mut self.proj, &mut self.cross_q, &mut self.cross_kv, &mut self.cross_proj, &mut self.fc1, &mut self.fc2] {
            be.prepare_linear(l)?;
        }
        for t in [&mut self.scale_shift_table, &mut self.q_norm, &mut self.k_norm] {
            be.prepare_tensor(t)?;
        }
        Ok(())
    }
}

impl Stdit3Weights {
    /// Moves every weight to where `be` computes, once after loading (a no-op on the CPU;
    /// the CUDA backend uploads them, linear layers as bf16).
    pub fn prepare(&mut self, be: &dyn crate::backend::Backend) -> Result<()> {
        let [t0, t1] = &mut self.t_mlp;
        let [f0, f1] = &mut self.fps_mlp;
        let [y0, y1] = &mut self.y_proj;
        for l in [&mut self.x_embedder, t0, t1, f0, f1, &mut self.t_block, y0, y1, &mut self.final_linear] {
            be.prepare_linear(l)?;
        }
        for t in [&mut self.y_embedding, &mut self.final_scale_shift] {
            be.prepare_tensor(t)?;
        }
        for b in self.spatial.iter_mut().chain(self.temporal.iter_mut()) {
            b.prepare(be)?;
        }
        Ok(())
    }

    /// Every expected tensor, checked for presence and shape; one error lists all
    /// problems. `layers`: the quantized layers of a quantized checkpoint.
    pub fn load(ck: &Checkpoint, cfg: &Stdit3Config, layers: Option<&BTreeMap<String, QuantPreset>>) -> Result<Self> {
        let mut src = CheckpointSource { loader: WeightLoader::new(ck), layers };
        let w = build(&mut src, cfg)?;
        src.loader.finish()?;
        Ok(w)
    }

    /// Random weights with the real layout, for benchmarks at sizes no fixture has.
    pub fn random(cfg: &Stdit3Config, seed: u64) -> Result<Self> {
        let mut w = build(&mut RandomSource(Rng::new(seed)), cfg)?;
        // RoPE frequencies as rotary_embedding_torch initializes them (theta 10000).
        let d = cfg.head_dim();
        w.rope_freqs = (0..d / 2).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32)).collect();
        Ok(w)
    }
}
