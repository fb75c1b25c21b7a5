//! `STDiT3Config` as Open-Sora 1.2 writes it in `config.json`; absent fields
//! take the class defaults (those of STDiT3-XL/2).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
pub struct Stdit3Config {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_depth")]
    pub depth: usize,
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_patch")]
    pub patch_size: Vec<usize>,
    #[serde(default = "d_true")]
    pub pred_sigma: bool,
    #[serde(default = "d_caption")]
    pub caption_channels: usize,
    #[serde(default = "d_max_len")]
    pub model_max_length: usize,
    #[serde(default = "d_true")]
    pub qk_norm: bool,
    #[serde(default = "d_sq")]
    pub input_sq_size: f64,
    #[serde(default)]
    pub skip_y_embedder: bool,
}

fn d_hidden() -> usize {
    1152
}
fn d_depth() -> usize {
    28
}
fn d_heads() -> usize {
    16
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_in_channels() -> usize {
    4
}
fn d_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn d_true() -> bool {
    true
}
fn d_caption() -> usize {
    4096
}
fn d_max_len() -> usize {
    300
}
fn d_sq() -> f64 {
    512.0
}

impl Stdit3Config {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Stdit3Config = serde_json::from_str(&text).with_context(|| format!("parsing {} as an STDiT3 config", path.display()))?;
        cfg.validate().with_context(|| format!("{}: unsupported STDiT3 configuration", path.display()))?;
        Ok(cfg)
    }

    /// STDiT3-XL/2 with another depth (benchmarks at real width).
    pub fn xl2_with_depth(depth: usize) -> Self {
        let mut c: Stdit3Config = serde_json::from_str("{}").expect("defaults parse");
        c.depth = depth;
        c
    }

    /// Rejects what the engine does not implement, naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "STDiT3" {
                bail!("model_type is {t:?}; only \"STDiT3\" is supported");
            }
        }
        if !self.qk_norm {
            bail!("qk_norm=false is not supported (Open-Sora 1.2 uses qk_norm=true)");
        }
        // Open-Sora 1.2 uses [1, 2, 2]; other sizes (e.g. the demo model's [2, 2, 2]) follow the same code.
        if self.patch_size.len() != 3 || self.patch_size.contains(&0) {
            bail!("patch_size {:?} must be three positive sizes [t, h, w]", self.patch_size);
        }
        if self.skip_y_embedder {
            bail!("skip_y_embedder=true is not supported");
        }
        if self.hidden_size == 0 || self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            bail!("hidden_size {} is not divisible by num_heads {}", self.hidden_size, self.num_heads);
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head dim {} must be even for rotary embeddings", self.head_dim());
        }
        if !self.hidden_size.is_multiple_of(4) {
            bail!("hidden_size {} must be divisible by 4 for the 2D position embedding", self.hidden_size);
        }
        if self.in_channels == 0 || self.depth == 0 || self.caption_channels == 0 || self.model_max_length == 0 {
            bail!("in_channels, depth, caption_channels and model_max_length must be positive");
        }
        if !(self.mlp_ratio > 0.0) || !(self.input_sq_size > 0.0) {
            bail!("mlp_ratio and input_sq_size must be positive");
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    pub fn out_channels(&self) -> usize {
        if self.pred_sigma {
            self.in_channels * 2
        } else {
            self.in_channels
        }
    }

    /// Outputs of the final linear per token.
    pub fn patch_len_out(&self) -> usize {
        self.patch_size.iter().product::<usize>() * self.out_channels()
    }

    pub fn patch(&self) -> [usize; 3] {
        [self.patch_size[0], self.patch_size[1], self.patch_size[2]]
    }
}
