//! The T5 v1.1 encoder (`T5EncoderModel` of transformers 4.44.2), which
//! Open-Sora 1.2 runs in float32: gated-GELU feed-forward, RMS layer norms,
//! relative position buckets shared by all layers, no biases, unscaled attention.

use crate::backend::{Activation, AttnSpec, Backend, Linear};
use crate::checkpoint::{Checkpoint, WeightLoader};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub vocab_size: usize,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f32,
    #[serde(default = "d_ff_proj")]
    pub feed_forward_proj: String,
}

fn d_buckets() -> usize {
    32
}
fn d_max_distance() -> usize {
    128
}
fn d_eps() -> f32 {
    1e-6
}
fn d_ff_proj() -> String {
    "gated-gelu".into()
}

impl T5Config {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: T5Config = serde_json::from_str(&text).with_context(|| format!("parsing {} as a T5 config", path.display()))?;
        if cfg.feed_forward_proj != "gated-gelu" {
            bail!("{}: feed_forward_proj {:?} is not supported; T5 v1.1 uses \"gated-gelu\"", path.display(), cfg.feed_forward_proj);
        }
        if cfg.num_heads == 0 || cfg.d_kv == 0 || cfg.d_model == 0 || cfg.num_layers == 0 || cfg.relative_attention_num_buckets < 4 {
            bail!("{}: d_model, d_kv, num_heads, num_layers must be positive and relative_attention_num_buckets at least 4", path.display());
        }
        Ok(cfg)
    }
}

struct T5Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: Tensor,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

pub struct T5Encoder {
    pub cfg: T5Config,
    embed: Tensor,
    /// `[buckets, heads]`, from block 0; every layer reuses the bias it gives.
    rel_bias: Tensor,
    blocks: Vec<T5Block>,
    final_norm: Tensor,
}

/// transformers' `_relative_position_bucket`, bidirectional, in float32 as the reference computes it.
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> usize {
    let nb = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { nb } else { 0 };
    let rp = relative_position.abs();
    let max_exact = nb / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        let log_ratio = (rp as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (log_ratio * (nb - max_exact) as f32) as i64;
        bucket += large.min(nb - 1);
    }
    bucket as usize
}

impl T5Encoder {
    /// Loads `encoder.*` and the token embedding from a T5 directory (single or
    /// sharded safetensors); decoder tensors, if present, are ignored.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = T5Config::from_dir(dir)?;
        let ck = Checkpoint::open_dir(dir)?;
        let mut w = WeightLoader::new(&ck);
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let embed_name = if ck.contains("shared.weight") { "shared.weight" } else { "encoder.embed_tokens.weight" };
        let embed = w.get(embed_name, &[cfg.vocab_size, d]);
        let lin = |w: &mut WeightLoader, name: String, out: usize, inp: usize| Linear::new(w.get_native(&name, &[out, inp]), None);
        let mut blocks = Vec::new();
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            blocks.push(T5Block {
                attn_norm: w.get(&format!("{p}.0.layer_norm.weight"), &[d]),
                q: lin(&mut w, format!("{p}.0.SelfAttention.q.weight"), inner, d)?,
                k: lin(&mut w, format!("{p}.0.SelfAttention.k.weight"), inner, d)?,
                v: lin(&mut w, format!("{p}.0.SelfAttention.v.weight"), inner, d)?,
                o: lin(&mut w, format!("{p}.0.SelfAttention.o.weight"), d, inner)?,
                ff_norm: w.get(&format!("{p}.1.layer_norm.weight"), &[d]),
                wi_0: lin(&mut w, format!("{p}.1.DenseReluDense.wi_0.weight"), ff, d)?,
                wi_1: lin(&mut w, format!("{p}.1.DenseReluDense.wi_1.weight"), ff, d)?,
                wo: lin(&mut w, format!("{p}.1.DenseReluDense.wo.weight"), d, ff)?,
            });
        }
        let rel_bias = w.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", &[cfg.relative_attention_num_buckets, cfg.num_heads]);
        let final_norm = w.get("encoder.final_layer_norm.weight", &[d]);
        w.finish().with_context(|| format!("loading T5 encoder weights from {}", dir.display()))?;
        Ok(T5Encoder { cfg, embed, rel_bias, blocks, final_norm })
    }

    /// Moves the layers' weights to where `be` computes, once after loading (see
    /// [`Backend::prepare_linear`]). The token embedding and the position-bias table
    /// stay on the host: only the rows a prompt uses are gathered and moved, and the
    /// `[heads, L, L]` bias is built from the table per encode.
    pub fn prepare(&mut self, be: &dyn Backend) -> Result<()> {
        for b in &mut self.blocks {
            for l in [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.wi_0, &mut b.wi_1, &mut b.wo] {
                be.prepare_linear(l)?;
            }
            be.prepare_tensor(&mut b.attn_norm)?;
            be.prepare_tensor(&mut b.ff_norm)?;
        }
        be.prepare_tensor(&mut self.final_norm)
    }

    /// T5's RMS layer norm (weight, no mean subtraction, no bias).
    fn norm(&self, be: &dyn Backend, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        be.qk_norm_rope(&mut y, 1, w, self.cfg.layer_norm_epsilon, None)?;
        Ok(y)
    }

    /// The position bias `[heads, L, L]` (f32, on the host) every layer adds to its
    /// scores: `bias[h, i, j] = rel_bias[bucket(j - i), h]`. Built once per encode
    /// (a few milliseconds at 64 heads x 300 tokens); `encode` moves it to the
    /// backend's device once with `prepare_tensor`.
    fn position_bias(&self, l: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        let heads = cfg.num_heads;
        let table = self.rel_bias.f32()?;
        // One bucket per relative position j - i in (-l, l), at index j - i + l - 1.
        let buckets: Vec<usize> = (0..(2 * l).saturating_sub(1))
            .map(|r| relative_position_bucket(r as i64 - (l as i64 - 1), cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
            .collect();
        let mut bias = vec![0f32; heads * l * l];
        for (hi, head) in bias.chunks_mut(l * l).enumerate() {
            for (i, row) in head.chunks_mut(l).enumerate() {
                for (j, b) in row.iter_mut().enumerate() {
                    *b = table[buckets[j + l - 1 - i] * heads + hi];
                }
            }
        }
        Tensor::from_f32(&[heads, l, l], bias)
    }

    /// `last_hidden_state` `[B, L, d_model]` for token ids and attention mask, both `[B * L]`.
    /// The mask must be ones followed by zeros per sample, as the tokenizer pads.
    pub fn encode(&self, be: &dyn Backend, ids: &[i64], mask: &[i64], batch: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        ensure!(batch > 0 && !ids.is_empty() && ids.len().is_multiple_of(batch), "token ids ({}) do not split into {batch} prompts", ids.len());
        ensure!(mask.len() == ids.len(), "attention mask has {} entries, ids have {}", mask.len(), ids.len());
        let l = ids.len() / batch;
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {} entries", cfg.vocab_size);
        }
        let mut ranges = Vec::with_capacity(batch);
        for b in 0..batch {
            let row = &mask[b * l..(b + 1) * l];
            let len = row.iter().take_while(|&&m| m != 0).count();
            ensure!(row[len..].iter().all(|&m| m == 0), "attention mask of prompt {b} is not ones followed by zeros");
            ensure!(len > 0, "prompt {b} has no tokens (its attention mask is all zeros)");
            ranges.push((b * l, b * l + len));
        }
        let mut h = be.gather_rows(&self.embed, &ids.iter().map(|&i| i as usize).collect::<Vec<_>>())?;

        let mut bias = self.position_bias(l)?;
        be.prepare_tensor(&mut bias)?;
        let mut spec = AttnSpec::ragged(l, cfg.num_heads, cfg.d_kv, ranges);
        spec.scale = 1.0;

        for blk in &self.blocks {
            let n = self.norm(be, &h, &blk.attn_norm)?;
            let (q, k, v) = (be.linear(&n, &blk.q, Activation::None)?, be.linear(&n, &blk.k, Activation::None)?, be.linear(&n, &blk.v, Activation::None)?);
            let a = be.attention(&q, &k, &v, &spec, Some(&bias))?;
            be.linear_residual(&a, &blk.o, &mut h, None)?;
            let n = self.norm(be, &h, &blk.ff_norm)?;
            let gated = be.mul(&be.linear(&n, &blk.wi_0, Activation::GeluTanh)?, &be.linear(&n, &blk.wi_1, Activation::None)?)?;
            be.linear_residual(&gated, &blk.wo, &mut h, None)?;
        }
        self.norm(be, &h, &self.final_norm)?.reshape(&[batch, l, cfg.d_model])
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_transformers() {
        // transformers' _relative_position_bucket(bidirectional, 32, 128), evaluated in Python.
        let cases = [(0, 0), (1, 17), (-1, 1), (7, 23), (-7, 7), (8, 24), (-8, 8), (12, 25), (-20, 10), (40, 28), (-100, 15), (127, 31), (-500, 15), (1000, 31)];
        for (rp, want) in cases {
            assert_eq!(relative_position_bucket(rp, 32, 128), want, "relative position {rp}");
        }
    }
}
