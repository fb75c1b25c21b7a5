//! `VideoAutoencoderPipeline`'s `config.json`. The fixture's config spells out
//! the sub-models' hyper-parameters; the real checkpoint's only names them
//! (`VideoAutoencoderKL` pointing at the SDXL VAE, `VAE_Temporal_SD`), so absent
//! fields take the official values.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Open-Sora's `VideoAutoencoderKL` wrapping a diffusers `AutoencoderKL`;
/// defaults are those of the SDXL VAE (`pixart_sigma_sdxlvae_T5_diffusers/vae`).
#[derive(Clone, Debug, Deserialize)]
pub struct SpatialVaeConfig {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default = "d_rgb")]
    pub in_channels: usize,
    #[serde(default = "d_rgb")]
    pub out_channels: usize,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    #[serde(default = "d_two")]
    pub layers_per_block: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    /// Frames per call of the 2-D decoder (Open-Sora: 4). Does not change results.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
}

/// Open-Sora's `VAE_Temporal`. With `type` `VAE_Temporal_SD` (or absent) the
/// values are those `VAE_Temporal_SD` fixes; with `VAE_Temporal`, absent fields
/// take that class's own defaults (which differ: `temporal_downsample`
/// `(True, True, False)`).
#[derive(Clone, Debug, Deserialize)]
pub struct TemporalVaeConfig {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub in_out_channels: Option<usize>,
    pub latent_embed_dim: Option<usize>,
    pub embed_dim: Option<usize>,
    pub filters: Option<usize>,
    pub num_res_blocks: Option<usize>,
    pub channel_multipliers: Option<Vec<usize>>,
    pub temporal_downsample: Option<Vec<bool>>,
    pub num_groups: Option<usize>,
    pub activation_fn: Option<String>,
}

/// The temporal VAE's resolved hyper-parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemporalParams {
    pub in_out_channels: usize,
    pub latent_embed_dim: usize,
    pub embed_dim: usize,
    pub filters: usize,
    pub num_res_blocks: usize,
    pub channel_multipliers: Vec<usize>,
    pub temporal_downsample: Vec<bool>,
    pub num_groups: usize,
}

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    /// Frames per temporal micro-chunk (Open-Sora 1.2 inference: 17).
    #[serde(default)]
    pub micro_frame_size: Option<usize>,
    /// Used only when the checkpoint lacks the `shift`/`scale` buffers.
    #[serde(default)]
    pub shift: Option<serde_json::Value>,
    #[serde(default)]
    pub scale: Option<serde_json::Value>,
    #[serde(default = "d_spatial")]
    pub vae_2d: SpatialVaeConfig,
    #[serde(default = "d_temporal")]
    pub vae_temporal: TemporalVaeConfig,
}

fn d_rgb() -> usize {
    3
}
fn d_block_out() -> Vec<usize> {
    vec![128, 256, 512, 512]
}
fn d_two() -> usize {
    2
}
fn d_four() -> usize {
    4
}
fn d_32() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_true() -> bool {
    true
}
fn d_spatial() -> SpatialVaeConfig {
    serde_json::from_str("{}").expect("defaults parse")
}
fn d_temporal() -> TemporalVaeConfig {
    serde_json::from_str("{}").expect("defaults parse")
}

impl SpatialVaeConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(k) = &self.kind {
            if k != "VideoAutoencoderKL" {
                bail!("vae_2d.type is {k:?}; only \"VideoAutoencoderKL\" is supported");
            }
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.contains(&0) {
            bail!("vae_2d.block_out_channels {:?} must be non-empty and positive", self.block_out_channels);
        }
        if let Some(t) = &self.up_block_types {
            if t.len() != self.block_out_channels.len() {
                bail!("vae_2d.up_block_types has {} entries, block_out_channels {}", t.len(), self.block_out_channels.len());
            }
            if let Some(bad) = t.iter().find(|s| s.as_str() != "UpDecoderBlock2D") {
                bail!("vae_2d.up_block_types contains {bad:?}; only \"UpDecoderBlock2D\" is supported");
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            bail!("vae_2d.act_fn is {:?}; only \"silu\" is supported", self.act_fn);
        }
        if self.norm_num_groups == 0 {
            bail!("vae_2d.norm_num_groups must be positive");
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            bail!("vae_2d.block_out_channels entry {c} is not divisible by norm_num_groups {}", self.norm_num_groups);
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            bail!("vae_2d.latent_channels and out_channels must be positive");
        }
        if self.micro_batch_size == Some(0) {
            bail!("vae_2d.micro_batch_size must be positive");
        }
        Ok(())
    }

    /// Spatial upsampling factor of the decoder: 2 per up block but the last.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

impl TemporalVaeConfig {
    /// The hyper-parameters the official constructor would use.
    pub fn resolve(&self) -> Result<TemporalParams> {
        let sd = TemporalParams {
            in_out_channels: 4,
            latent_embed_dim: 4,
            embed_dim: 4,
            filters: 128,
            num_res_blocks: 4,
            channel_multipliers: vec![1, 2, 2, 4],
            temporal_downsample: vec![false, true, true],
            num_groups: 32,
        };
        let p = match self.kind.as_deref() {
            None | Some("VAE_Temporal_SD") => {
                // VAE_Temporal_SD fixes these; passing another value would be an error there.
                let fixed: [(&str, Option<String>, String); 7] = [
                    ("in_out_channels", self.in_out_channels.map(|v| v.to_string()), "4".into()),
                    ("latent_embed_dim", self.latent_embed_dim.map(|v| v.to_string()), "4".into()),
                    ("embed_dim", self.embed_dim.map(|v| v.to_string()), "4".into()),
                    ("filters", self.filters.map(|v| v.to_string()), "128".into()),
                    ("num_res_blocks", self.num_res_blocks.map(|v| v.to_string()), "4".into()),
                    ("channel_multipliers", self.channel_multipliers.as_ref().map(|v| format!("{v:?}")), format!("{:?}", sd.channel_multipliers)),
                    ("temporal_downsample", self.temporal_downsample.as_ref().map(|v| format!("{v:?}")), format!("{:?}", sd.temporal_downsample)),
                ];
                for (name, given, want) in fixed {
                    if let Some(g) = given {
                        if g != want {
                            bail!("vae_temporal.{name} is {g} but VAE_Temporal_SD fixes it to {want}");
                        }
                    }
                }
                TemporalParams { num_groups: self.num_groups.unwrap_or(32), ..sd }
            }
            Some("VAE_Temporal") => TemporalParams {
                in_out_channels: self.in_out_channels.unwrap_or(4),
                latent_embed_dim: self.latent_embed_dim.unwrap_or(4),
                embed_dim: self.embed_dim.unwrap_or(4),
                filters: self.filters.unwrap_or(128),
                num_res_blocks: self.num_res_blocks.unwrap_or(4),
                channel_multipliers: self.channel_multipliers.clone().unwrap_or(vec![1, 2, 2, 4]),
                temporal_downsample: self.temporal_downsample.clone().unwrap_or(vec![true, true, false]),
                num_groups: self.num_groups.unwrap_or(32),
            },
            Some(other) => bail!("vae_temporal.type is {other:?}; only \"VAE_Temporal_SD\" and \"VAE_Temporal\" are supported"),
        };
        if let Some(a) = &self.activation_fn {
            if a != "swish" {
                bail!("vae_temporal.activation_fn is {a:?}; only \"swish\" is supported");
            }
        }
        if p.channel_multipliers.is_empty() || p.channel_multipliers.contains(&0) {
            bail!("vae_temporal.channel_multipliers {:?} must be non-empty and positive", p.channel_multipliers);
        }
        if p.temporal_downsample.len() + 1 != p.channel_multipliers.len() {
            bail!(
                "vae_temporal.temporal_downsample has {} entries; {} channel_multipliers need one fewer",
                p.temporal_downsample.len(),
                p.channel_multipliers.len()
            );
        }
        if p.filters == 0 || p.num_res_blocks == 0 || p.in_out_channels == 0 || p.latent_embed_dim == 0 || p.embed_dim == 0 {
            bail!("vae_temporal: filters, num_res_blocks, in_out_channels, latent_embed_dim and embed_dim must be positive");
        }
        if p.num_groups == 0 {
            bail!("vae_temporal.num_groups must be positive");
        }
        for &m in &p.channel_multipliers {
            if (p.filters * m) % p.num_groups != 0 {
                bail!("vae_temporal: {} channels (filters {} x multiplier {m}) are not divisible by num_groups {}", p.filters * m, p.filters, p.num_groups);
            }
        }
        Ok(p)
    }
}

impl TemporalParams {
    /// Temporal upsampling factor of the decoder.
    pub fn time_factor(&self) -> usize {
        1 << self.temporal_downsample.iter().filter(|&&d| d).count()
    }

    /// Latent frames of `frames` video frames (`VAE_Temporal.get_latent_size`).
    pub fn latent_frames(&self, frames: usize) -> usize {
        frames.div_ceil(self.time_factor())
    }
}

impl VaeConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: VaeConfig = serde_json::from_str(&text).with_context(|| format!("parsing {} as a VideoAutoencoderPipeline config", path.display()))?;
        cfg.validate().with_context(|| format!("{}: unsupported VAE configuration", path.display()))?;
        Ok(cfg)
    }

    /// The real `hpcai-tech/OpenSora-VAE-v1.2` hyper-parameters (benchmarks with random weights).
    pub fn opensora_v1_2() -> Self {
        let mut c: VaeConfig = serde_json::from_str("{}").expect("defaults parse");
        c.vae_2d.micro_batch_size = Some(4);
        c
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "VideoAutoencoderPipeline" {
                bail!("model_type is {t:?}; only \"VideoAutoencoderPipeline\" is supported");
            }
        }
        if self.micro_frame_size == Some(0) {
            bail!("micro_frame_size must be positive");
        }
        self.vae_2d.validate()?;
        let t = self.vae_temporal.resolve()?;
        if t.in_out_channels != self.vae_2d.latent_channels {
            bail!("vae_temporal.in_out_channels {} differs from vae_2d.latent_channels {}", t.in_out_channels, self.vae_2d.latent_channels);
        }
        for (name, v) in [("shift", &self.shift), ("scale", &self.scale)] {
            if let Some(v) = v {
                self.channel_values(v).with_context(|| format!("field {name}"))?;
            }
        }
        Ok(())
    }

    /// Latent frames of a `num_frames` video (`VideoAutoencoderPipeline.get_latent_size`):
    /// whole micro-chunks, then the remainder padded to the temporal factor.
    pub fn latent_frames(&self, t: &TemporalParams, num_frames: usize) -> usize {
        let m = self.micro_frame_size();
        let rem = num_frames % m;
        (num_frames / m) * t.latent_frames(m) + if rem > 0 { t.latent_frames(rem) } else { 0 }
    }

    /// Latent channels of `z`.
    pub fn latent_channels(&self) -> Result<usize> {
        Ok(self.vae_temporal.resolve()?.embed_dim)
    }

    /// Latent `[T, H, W]` of a video, as `get_latent_size` computes it: pixel sizes are
    /// divided by the spatial factor rounding down (Open-Sora's 240p width 426 decodes
    /// 424 pixels wide). Sizes that leave no latent pixel or frame are errors.
    pub fn latent_size(&self, frames: usize, height: usize, width: usize) -> Result<[usize; 3]> {
        let f = self.vae_2d.scale_factor();
        if frames == 0 {
            bail!("frames must be at least 1");
        }
        if height < f || width < f {
            bail!("height and width must be at least {f} pixels (the VAE's spatial factor), got {height}x{width}");
        }
        Ok([self.latent_frames(&self.vae_temporal.resolve()?, frames), height / f, width / f])
    }

    /// Pixel size the decoder produces for a requested size (multiples of the spatial factor).
    pub fn decoded_size(&self, height: usize, width: usize) -> (usize, usize) {
        let f = self.vae_2d.scale_factor();
        (height / f * f, width / f * f)
    }

    /// Frames per temporal micro-chunk: the config's, else 17 as Open-Sora 1.2's inference passes.
    pub fn micro_frame_size(&self) -> usize {
        self.micro_frame_size.unwrap_or(17)
    }

    /// A `shift`/`scale` value: a number (every channel) or one number per latent channel.
    pub fn channel_values(&self, v: &serde_json::Value) -> Result<Vec<f32>> {
        let c = self.vae_temporal.resolve()?.embed_dim;
        if let Some(x) = v.as_f64() {
            return Ok(vec![x as f32; c]);
        }
        let arr = v.as_array().ok_or_else(|| anyhow::anyhow!("expected a number or a list of {c} numbers, got {v}"))?;
        let vals: Option<Vec<f32>> = arr.iter().map(|x| x.as_f64().map(|f| f as f32)).collect();
        match vals {
            Some(vals) if vals.len() == c => Ok(vals),
            _ => bail!("expected a number or a list of {c} numbers, got {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hpcai-tech/OpenSora-VAE-v1.2`'s config only names the sub-models.
    #[test]
    fn real_config_takes_official_defaults() {
        let text = r#"{"architectures": ["VideoAutoencoderPipeline"], "model_type": "VideoAutoencoderPipeline",
            "cal_loss": false, "freeze_vae_2d": false, "from_pretrained": null, "micro_frame_size": 17,
            "scale": [3.85, 2.32, 2.33, 3.06], "shift": [-0.1, 0.34, 0.27, 0.98],
            "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                       "subfolder": "vae", "micro_batch_size": 4, "local_files_only": false},
            "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": null}}"#;
        let cfg: VaeConfig = serde_json::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.vae_2d.block_out_channels, [128, 256, 512, 512]);
        assert_eq!((cfg.vae_2d.layers_per_block, cfg.vae_2d.norm_num_groups, cfg.vae_2d.latent_channels), (2, 32, 4));
        assert_eq!(cfg.vae_2d.scale_factor(), 8);
        let t = cfg.vae_temporal.resolve().unwrap();
        assert_eq!(t.filters, 128);
        assert_eq!(t.num_res_blocks, 4);
        assert_eq!(t.channel_multipliers, [1, 2, 2, 4]);
        assert_eq!(t.temporal_downsample, [false, true, true]);
        assert_eq!((t.num_groups, t.latent_embed_dim, t.embed_dim), (32, 4, 4));
        assert_eq!(t.time_factor(), 4);
        assert_eq!((t.latent_frames(17), t.latent_frames(9), t.latent_frames(1)), (5, 3, 1));
        assert_eq!(cfg.channel_values(cfg.scale.as_ref().unwrap()).unwrap(), [3.85, 2.32, 2.33, 3.06]);
    }

    #[test]
    fn unsupported_values_name_the_field() {
        let bad = [
            (r#"{"vae_temporal": {"type": "VAE_Temporal_SD", "filters": 64}}"#, "filters"),
            (r#"{"vae_temporal": {"type": "VAE_Temporal", "temporal_downsample": [true]}}"#, "temporal_downsample"),
            (r#"{"vae_2d": {"block_out_channels": [128, 250]}}"#, "norm_num_groups"),
            (r#"{"micro_frame_size": 0}"#, "micro_frame_size"),
            (r#"{"model_type": "AutoencoderKL"}"#, "model_type"),
            (r#"{"scale": [1.0, 2.0]}"#, "scale"),
        ];
        for (text, field) in bad {
            let cfg: VaeConfig = serde_json::from_str(text).unwrap();
            let msg = format!("{:#}", cfg.validate().expect_err(text));
            assert!(msg.contains(field), "{text}: {msg}");
        }
        // The plain class keeps its own default (True, True, False).
        let cfg: VaeConfig = serde_json::from_str(r#"{"vae_temporal": {"type": "VAE_Temporal"}}"#).unwrap();
        assert_eq!(cfg.vae_temporal.resolve().unwrap().temporal_downsample, [true, true, false]);
    }
}
