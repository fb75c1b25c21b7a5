//! The quality harness: for a prompt set and seeds, generate with the
//! reference (full computation) and with each accelerated mode, compare, and
//! check that the videos still show what was asked.

use super::detector::detect;
use super::{compare, VideoMetrics};
use crate::backend::Backend;
use crate::cache::{policy, CacheCalibration, Counting};
use crate::io::write_atomic;
use crate::model::stdit3::ForwardHooks;
use crate::pipeline::{plan, GenerateOptions, ModelPaths};
use crate::quant::preset::{QuantPreset, PRESET_NAMES};
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::Path;

/// One prompt with the ground truth the detector checks.
#[derive(Clone, Debug, Deserialize)]
pub struct PromptCase {
    pub prompt: String,
    pub colour: String,
    pub direction: String,
}

pub fn read_cases(path: &Path) -> Result<Vec<PromptCase>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading prompt set {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of {{prompt, colour, direction}}", path.display()))
}

/// One generated video of one mode.
pub struct Run {
    pub case: usize,
    pub seed: u64,
    pub mode: String,
    pub metrics: VideoMetrics,
    pub follows_prompt: bool,
    pub blocks_computed: f64,
    pub dit_seconds: f64,
    /// Whole generation (text encoder, denoising, decoding), seconds.
    pub total_seconds: f64,
    /// Bits per weight of the DiT blocks' linear layers that a step reads (scales included).
    pub weight_bits: f64,
    /// Bytes the DiT blocks' linear weights hold (every timestep range's versions).
    pub weight_bytes: f64,
}

pub struct Summary {
    pub mode: String,
    pub runs: usize,
    pub psnr: f64,
    pub ssim: f64,
    pub mae: f64,
    pub temporal_ratio: f64,
    pub blocks_computed: f64,
    pub dit_seconds: f64,
    pub total_seconds: f64,
    pub weight_bits: f64,
    pub weight_bytes: f64,
    pub prompt_following: f64,
}

fn follows(video: &Tensor, case: &PromptCase) -> Result<bool> {
    let s = video.shape();
    let v = video.f32()?;
    Ok(match detect(v, s[2], s[3], s[4]) {
        Some(d) => d.colour == case.colour && d.direction == Some(case.direction.as_str()),
        None => false,
    })
}

/// A parsed mode: precision, whether the calibration's importance vectors are folded in, cache policy.
pub struct Mode {
    pub quant: QuantPreset,
    pub importance: bool,
    /// int8 Q K^T attention (`-qk8`).
    pub qk_int8: bool,
    /// Attention with bf16 operands (`-bf16`; `quantcache:*` too).
    pub attn_bf16: bool,
    /// `quantcache:*`: the quantized checkpoint's calibration it runs.
    pub accel: Option<std::sync::Arc<crate::quant::calibrate::Importance>>,
    pub hooks: Box<dyn ForwardHooks>,
}

/// A mode: a cache policy (`reference`, `hlc`, `srap`, `hlc+srap`, `teacache`, `pab`,
/// `adacache`, `static:K`; `NAME@THRESHOLD` sets its threshold, e.g. `hlc@0.3`), a quantization preset
/// (`w8a8`, `w4a8`, `w4a6`; with `-is` the importance vectors of the
/// calibration are folded in, e.g. `w4a6-is`, then `-qk8` for int8 Q K^T attention, then `-bf16`
/// for attention with bf16 operands, e.g. `w8a8-bf16`; `aigq`: the
/// calibration's plan), a preset and a policy joined
/// by `+` (`w8a8+static:2`), or `quantcache:fast` / `quantcache:quality` (`--accel`, from the
/// model's QuantCache calibration). `model_dir`: the model's directory (its cache calibration).
pub fn parse_mode(name: &str, model_dir: &Path) -> Result<Mode> {
    if let Some(preset) = crate::cache::accel::preset_name(name).ok().flatten() {
        let accel = crate::cache::accel::Accel::for_model(model_dir, preset)?;
        let runs = crate::cache::accel::run_options(accel.importance.clone(), &GenerateOptions::default());
        return Ok(Mode { quant: runs.quant, importance: false, qk_int8: runs.qk_int8, attn_bf16: runs.attn_bf16, accel: runs.importance, hooks: accel.policy()? });
    }
    let is_quant = |q: &str| {
        let q = q.strip_suffix("-bf16").unwrap_or(q);
        let q = q.strip_suffix("-qk8").unwrap_or(q);
        PRESET_NAMES.contains(&q.strip_suffix("-is").unwrap_or(q))
    };
    let (q, cache) = match name.split_once('+') {
        Some((q, c)) if is_quant(q) => (q, c),
        _ if is_quant(name) => (name, "reference"),
        _ => ("none", name),
    };
    let (q, attn_bf16) = match q.strip_suffix("-bf16") {
        Some(q) => (q, true),
        None => (q, false),
    };
    let (q, qk_int8) = match q.strip_suffix("-qk8") {
        Some(q) => (q, true),
        None => (q, false),
    };
    let (q, importance) = match q.strip_suffix("-is") {
        Some(q) => (q, true),
        None => (q, false),
    };
    ensure!(!(qk_int8 && attn_bf16), "mode {name:?}: -qk8 and -bf16 are two precisions of the same attention products");
    let quant = QuantPreset::parse(q)?;
    // aigq always reads the calibration (its plan and vectors).
    let importance = importance || quant == QuantPreset::Aigq;
    ensure!(!importance || quant != QuantPreset::None, "mode {name:?}: -is (importance vectors) needs a quantized preset");
    Ok(Mode { quant, importance, qk_int8, attn_bf16, accel: None, hooks: policy(cache, &CacheCalibration::for_model(model_dir)?)? })
}

/// Generates every case with the reference and each mode, each `repeat` times
/// (the fastest times kept); returns all runs (reference first) and, for the
/// image strip, the videos of the first `strip` cases.
pub fn run_all(
    be: &dyn Backend,
    model_dir: &Path,
    paths: &ModelPaths,
    base: &GenerateOptions,
    cases: &[PromptCase],
    seeds: &[u64],
    modes: &[String],
    strip: usize,
    repeat: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<Run>, Vec<Vec<Tensor>>)> {
    ensure!(!cases.is_empty() && !seeds.is_empty(), "the prompt set (--prompts, --limit) and the seed list (--seeds) must not be empty");
    ensure!(repeat > 0, "--repeat must be at least 1");
    for m in modes {
        ensure!(!parse_mode(m, model_dir)?.importance || base.importance.is_some(), "mode {m:?} folds in importance vectors: pass --calibration DIR (written by qc-run calibrate)");
    }
    let mut runs = Vec::new();
    let mut strips = Vec::new();
    let all_modes: Vec<String> = std::iter::once("reference".to_string()).chain(modes.iter().cloned()).collect();
    for (ci, case) in cases.iter().enumerate() {
        for &seed in seeds {
            let mut reference: Option<Tensor> = None;
            let mut row = Vec::new();
            for (mi, mode) in all_modes.iter().enumerate() {
                progress(&format!("{} [seed {seed}, {mode}]", case.prompt));
                crate::model::stdit3::timing::select(mi);
                // Each generation `repeat` times, its fastest times kept (interference on
                // a shared machine only slows a run down); the first run's video and counts.
                let mut first = None;
                let (mut dit_seconds, mut total_seconds) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..repeat {
                    let Mode { quant, importance, qk_int8, attn_bf16, accel, hooks: mut pol } = parse_mode(mode, model_dir)?;
                    let importance = if accel.is_some() { accel } else if importance { base.importance.clone() } else { None };
                    let opts = GenerateOptions { seed, quant, importance, qk_int8, attn_bf16, ..base.clone() };
                    let p = plan(paths, std::slice::from_ref(&case.prompt), &opts)?;
                    let mut counting = Counting::new(pol.as_mut(), p.blocks_per_forward());
                    let (video, report) = p.run(be, &opts, &mut counting, &mut |_| {})?;
                    counting.finish();
                    dit_seconds = dit_seconds.min(report.seconds(crate::pipeline::STAGE_DENOISE));
                    total_seconds = total_seconds.min(report.seconds(""));
                    if first.is_none() {
                        first = Some((video, counting.computed_fraction(), report));
                    }
                }
                let (video, blocks_computed, report) = first.expect("repeat is at least 1");
                let s = video.shape().to_vec();
                let shape = [s[1], s[2], s[3], s[4]];
                let metrics = match &reference {
                    None => compare(video.f32()?, video.f32()?, shape),
                    Some(r) => compare(r.f32()?, video.f32()?, shape),
                };
                runs.push(Run { case: ci, seed, mode: mode.clone(), metrics, follows_prompt: follows(&video, case)?, blocks_computed,
                    dit_seconds,
                    total_seconds,
                    weight_bits: report.dit_weights.step_bits,
                    weight_bytes: report.dit_weights.bytes as f64,
                });
                if ci < strip && seed == seeds[0] {
                    row.push(video.clone());
                }
                if reference.is_none() {
                    reference = Some(video);
                }
            }
            if !row.is_empty() {
                strips.push(row);
            }
        }
    }
    Ok((runs, strips))
}

/// The forward's parts ([`crate::model::stdit3::timing`]) of the reference
/// and each mode, in milliseconds per DiT forward (served steps run none),
/// each with the reference's time over the mode's; `totals` per mode,
/// reference first, as `run_all` selects them.
pub fn parts_markdown(modes: &[String], totals: &[crate::model::stdit3::timing::Totals]) -> String {
    use crate::model::stdit3::timing::{of, Part, PARTS};
    let all: Vec<&str> = std::iter::once("reference").chain(modes.iter().map(|m| m.as_str())).collect();
    let mut out = String::from("| part |");
    for m in &all[..totals.len().min(all.len())] {
        let _ = write!(out, " {m} (ms) |");
    }
    for m in all.iter().take(totals.len()).skip(1) {
        let _ = write!(out, " reference / {m} |");
    }
    out.push_str("\n| --- |");
    out.push_str(&" ---: |".repeat(2 * totals.len().saturating_sub(1) + 1));
    out.push('\n');
    let per_forward = |t: &crate::model::stdit3::timing::Totals, i: usize| {
        let forwards = of(t, Part::Forward).1.max(1) as f64;
        t[i].0 * 1e3 / forwards
    };
    for (i, (_, name)) in PARTS.iter().enumerate() {
        let _ = write!(out, "| {name} |");
        for t in totals {
            let _ = write!(out, " {:.3} |", per_forward(t, i));
        }
        for t in totals.iter().skip(1) {
            let (r, m) = (per_forward(&totals[0], i), per_forward(t, i));
            if m > 0.0 && r > 0.0 {
                let _ = write!(out, " {:.2}x |", r / m);
            } else {
                out.push_str(" - |");
            }
        }
        out.push('\n');
    }
    out
}

/// Per-mode means (PSNR over finite values; the reference is identical to itself).
pub fn summarize(runs: &[Run]) -> Vec<Summary> {
    let mut modes: Vec<String> = Vec::new();
    for r in runs {
        if !modes.contains(&r.mode) {
            modes.push(r.mode.clone());
        }
    }
    modes
        .into_iter()
        .map(|m| {
            let rs: Vec<&Run> = runs.iter().filter(|r| r.mode == m).collect();
            let n = rs.len() as f64;
            let mean = |f: &dyn Fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
            let finite: Vec<f64> = rs.iter().map(|r| r.metrics.psnr).filter(|p| p.is_finite()).collect();
            Summary {
                mode: m,
                runs: rs.len(),
                psnr: if finite.is_empty() { f64::INFINITY } else { finite.iter().sum::<f64>() / finite.len() as f64 },
                ssim: mean(&|r| r.metrics.ssim),
                mae: mean(&|r| r.metrics.mae),
                temporal_ratio: mean(&|r| r.metrics.temporal_ratio),
                blocks_computed: mean(&|r| r.blocks_computed),
                dit_seconds: mean(&|r| r.dit_seconds),
                total_seconds: mean(&|r| r.total_seconds),
                weight_bits: mean(&|r| r.weight_bits),
                weight_bytes: mean(&|r| r.weight_bytes),
                prompt_following: rs.iter().filter(|r| r.follows_prompt).count() as f64 / n,
            }
        })
        .collect()
}

/// The markdown report: a summary per mode, then every video. `steps`: sampling steps per video.
pub fn markdown(runs: &[Run], cases: &[PromptCase], steps: usize) -> String {
    let sums = summarize(runs);
    let ref_time = sums.first().map_or(0.0, |s| s.dit_seconds);
    let ref_total = sums.first().map_or(0.0, |s| s.total_seconds);
    let mut out = String::new();
    let _ = writeln!(out, "| mode | videos | PSNR (dB) | SSIM | MAE | temporal ratio | blocks computed | DiT weight bits | DiT weights (KiB) | DiT time (s) | per step (ms) | speed-up | total (s) | speed-up | prompt following |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &sums {
        let psnr = if s.psnr.is_finite() { format!("{:.2}", s.psnr) } else { "inf".into() };
        let speed = if s.dit_seconds > 0.0 { ref_time / s.dit_seconds } else { f64::NAN };
        let total_speed = if s.total_seconds > 0.0 { ref_total / s.total_seconds } else { f64::NAN };
        let _ = writeln!(
            out,
            "| {} | {} | {psnr} | {:.4} | {:.4} | {:.3} | {:.1}% | {:.2} | {:.1} | {:.3} | {:.2} | {speed:.2}x | {:.3} | {total_speed:.2}x | {:.0}% |",
            s.mode,
            s.runs,
            s.ssim,
            s.mae,
            s.temporal_ratio,
            100.0 * s.blocks_computed,
            s.weight_bits,
            s.weight_bytes / 1024.0,
            s.dit_seconds,
            1000.0 * s.dit_seconds / steps.max(1) as f64,
            s.total_seconds,
            100.0 * s.prompt_following
        );
    }
    let _ = writeln!(out, "\n| prompt | seed | mode | PSNR | SSIM | MAE | temporal | follows |");
    let _ = writeln!(out, "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |");
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.4} | {:.4} | {:.3} | {} |",
            cases[r.case].prompt,
            r.seed,
            r.mode,
            r.metrics.psnr,
            r.metrics.ssim,
            r.metrics.mae,
            r.metrics.temporal_ratio,
            if r.follows_prompt { "yes" } else { "no" }
        );
    }
    out
}

/// A PNG: one band per case, one row per mode (reference first), frames left to right,
/// each pixel enlarged `scale` times, with a 2-pixel gap between rows and bands.
pub fn write_strip(path: &Path, strips: &[Vec<Tensor>], scale: usize) -> Result<()> {
    ensure!(!strips.is_empty() && !strips[0].is_empty(), "no videos for the image strip");
    let s = strips[0][0].shape();
    let (t, h, w) = (s[2], s[3], s[4]);
    let gap = 2;
    let (fw, fh) = (w * scale, h * scale);
    let width = t * (fw + gap);
    let rows: usize = strips.iter().map(|r| r.len()).sum();
    let height = rows * (fh + gap) + strips.len() * gap;
    let mut img = vec![255u8; width * height * 3];
    let mut y0 = 0;
    for band in strips {
        for video in band {
            let v = video.f32()?;
            for ti in 0..t {
                for y in 0..fh {
                    for x in 0..fw {
                        let (sy, sx) = (y / scale, x / scale);
                        let o = ((y0 + y) * width + ti * (fw + gap) + x) * 3;
                        for c in 0..3 {
                            let val = v[((c * t) + ti) * h * w + sy * w + sx];
                            img[o + c] = (((val.clamp(-1.0, 1.0) + 1.0) / 2.0) * 255.0 + 0.5) as u8;
                        }
                    }
                }
            }
            y0 += fh + gap;
        }
        y0 += gap;
    }
    write_atomic(path, &crate::output::png_bytes(&img, width, height)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::stdit3::timing::{Part, Totals, PARTS};

    /// Per forward: a part's seconds over the slot's forward count; the ratio is
    /// the reference's over the mode's, a dash where either ran none.
    #[test]
    fn parts_table_divides_by_each_modes_forwards() {
        let mut reference: Totals = [(0.0, 0); PARTS.len()];
        let mut mode = reference;
        reference[Part::Forward as usize] = (0.8, 100);
        reference[Part::NormQkv as usize] = (0.2, 600);
        mode[Part::Forward as usize] = (0.1, 25);
        mode[Part::NormQkv as usize] = (0.025, 150);
        mode[Part::CachedReuse as usize] = (0.001, 4);
        let md = parts_markdown(&["fast".to_string()], &[reference, mode]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| part | reference (ms) | fast (ms) | reference / fast |");
        assert_eq!(lines.len(), 2 + PARTS.len());
        assert!(lines.contains(&"| whole forward | 8.000 | 4.000 | 2.00x |"), "{md}");
        assert!(lines.contains(&"| norm + qkv linear | 2.000 | 1.000 | 2.00x |"), "{md}");
        assert!(lines.contains(&"| cached-residual reuse | 0.000 | 0.040 | - |"), "{md}");
    }
}
