//! `--accel quantcache`: AIGQ + HLC + SRAP together, from a quantized checkpoint
//! whose `cache.json` holds presets calibrated jointly with its quantization
//! (`qc-run calibrate --accel`). A float model directory finds its QuantCache
//! calibration in `DIR/quantcache/` (the bundled demonstration model ships one).

use super::{policy_with, AccelPreset, CacheCalibration};
use crate::model::stdit3::ForwardHooks;
use crate::quant::calibrate::{Importance, QUANT_JSON};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The names `--accel` accepts.
pub const ACCEL_NAMES: &str = "none, quantcache (= quantcache:fast), quantcache:fast, quantcache:quality";

/// The QuantCache preset `--accel NAME` asks for (`None` for `none`).
pub fn preset_name(accel: &str) -> Result<Option<&'static str>> {
    Ok(match accel {
        "none" => None,
        "quantcache" | "quantcache:fast" => Some("fast"),
        "quantcache:quality" => Some("quality"),
        _ => bail!("unknown acceleration preset {accel:?} (--accel); known: {ACCEL_NAMES}"),
    })
}

/// Where a model's QuantCache calibration lives: the directory itself when it is
/// a quantized checkpoint, else its `quantcache/` sub-directory.
pub fn calibration_dir(model_dir: &Path) -> PathBuf {
    if model_dir.join(QUANT_JSON).is_file() {
        model_dir.to_path_buf()
    } else {
        model_dir.join("quantcache")
    }
}

/// `opts` as QuantCache runs them (`--accel`, and the caching half of its
/// calibration): the quantized checkpoint's plan and importance vectors, and
/// the attention with bf16 operands.
pub fn run_options(importance: Arc<Importance>, opts: &crate::pipeline::GenerateOptions) -> crate::pipeline::GenerateOptions {
    crate::pipeline::GenerateOptions { quant: crate::quant::preset::QuantPreset::Aigq, importance: Some(importance), attn_bf16: true, qk_int8: false, ..opts.clone() }
}

/// What `--accel quantcache:PRESET` runs: the quantized checkpoint (its plan and
/// importance vectors) and the preset's caching settings.
pub struct Accel {
    pub dir: PathBuf,
    pub importance: Arc<Importance>,
    pub preset: AccelPreset,
    pub calibration: CacheCalibration,
}

impl Accel {
    pub fn for_model(model_dir: &Path, preset: &str) -> Result<Self> {
        let dir = calibration_dir(model_dir);
        let hint = || format!("--accel quantcache: {} has no QuantCache calibration (run `qc-run calibrate --prompts FILE --budget BITS --accel --output {}`)", model_dir.display(), dir.display());
        if !dir.join(QUANT_JSON).is_file() || !dir.join(CacheCalibration::FILE).is_file() {
            bail!("{}", hint());
        }
        let importance = Importance::from_dir(&dir).with_context(hint)?;
        anyhow::ensure!(importance.quantized_dit.is_some() && importance.plan.is_some(), "{}: {} holds no quantized checkpoint (calibrate with --budget)", hint(), dir.display());
        let calibration = CacheCalibration::from_dir(&dir)?;
        let preset = calibration.presets.get(preset).cloned().ok_or_else(|| anyhow::anyhow!("{}: no preset {preset:?} (it has: {:?})", dir.join(CacheCalibration::FILE).display(), calibration.presets.keys().collect::<Vec<_>>()))?;
        Ok(Accel { dir, importance: Arc::new(importance), preset, calibration })
    }

    /// What the preset runs besides caching ([`run_options`]), set on `opts`.
    pub fn apply(&self, opts: &mut crate::pipeline::GenerateOptions) {
        *opts = run_options(self.importance.clone(), opts);
    }

    /// A fresh caching policy of the preset (one per sampling run).
    pub fn policy(&self) -> Result<Box<dyn ForwardHooks>> {
        policy_with(&self.preset.cache, Some(&self.preset.threshold), &self.calibration, super::CachePrecision::Native)
    }
}
