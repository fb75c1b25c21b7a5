//! qc-run's debug subcommands end to end, and their handling of bad input.

mod common;

use qc::checkpoint::Checkpoint;
use qc::io::write_safetensors;
use qc::tensor::{rel_l2, Storage, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

fn qc_run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qc-run")).args(args).output().expect("qc-run starts");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "qc-run panicked: {stderr}");
    (out.status.success(), stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every tensor of a fixture file, for making altered copies.
fn load_all(path: &Path) -> Vec<(String, Tensor)> {
    let ck = Checkpoint::open_file(path).unwrap();
    let names: Vec<String> = ck.names().map(String::from).collect();
    names.into_iter().map(|n| { let t = ck.load_any(&n).unwrap(); (n, t) }).collect()
}

fn dit() -> PathBuf {
    common::fixture("stdit3-tiny")
}

#[test]
fn forward_and_sample_write_reference_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let fx = common::fixture("stdit3-tiny-forward-odd.safetensors");
    let (ok, err) = qc_run(&["forward", "--dit", s(&dit()), "--inputs", s(&fx), "--output", s(&out), "--trace"]);
    assert!(ok, "{err}");
    let (got, want) = (Checkpoint::open_file(&out).unwrap(), Checkpoint::open_file(&fx).unwrap());
    for name in ["out", "act.spatial.1", "act.final_layer"] {
        let e = rel_l2(got.load_f32(name).unwrap().f32().unwrap(), want.load_f32(name).unwrap().f32().unwrap());
        assert!(e < 1e-4, "{name}: {e}");
    }

    let fx = common::fixture("rflow-tiny-image.safetensors");
    let (ok, err) = qc_run(&["sample", "--dit", s(&dit()), "--inputs", s(&fx), "--output", s(&out)]);
    assert!(ok, "{err}");
    let got = Checkpoint::open_file(&out).unwrap();
    let want = Checkpoint::open_file(&fx).unwrap();
    let e = rel_l2(got.load_f32("z").unwrap().f32().unwrap(), want.load_f32("z").unwrap().f32().unwrap());
    assert!(e < 1e-3, "z: {e}");
    assert_eq!(got.load_f32("timesteps").unwrap().shape(), [4, 1]);

    // Overriding the steps changes the schedule length.
    let (ok, err) = qc_run(&["sample", "--dit", s(&dit()), "--inputs", s(&fx), "--output", s(&out), "--steps", "2", "--cfg", "1.0"]);
    assert!(ok, "{err}");
    assert_eq!(Checkpoint::open_file(&out).unwrap().load_f32("timesteps").unwrap().shape(), [2, 1]);
}

/// Runs `forward` on an altered copy of the forward fixture and expects a clean failure
/// whose message contains `expect`, with no output file left behind.
fn expect_forward_error(alter: impl FnOnce(&mut Vec<(String, Tensor)>), expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = load_all(&common::fixture("stdit3-tiny-forward.safetensors"));
    alter(&mut tensors);
    let inp = dir.path().join("in.safetensors");
    write_safetensors(&inp, &tensors, None).unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, err) = qc_run(&["forward", "--dit", s(&dit()), "--inputs", s(&inp), "--output", s(&out)]);
    assert!(!ok, "expected failure containing {expect:?}");
    assert!(err.contains(expect), "error should mention {expect:?}: {err}");
    assert!(!out.exists(), "no output may be written on failure");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary files may remain");
}

fn replace(tensors: &mut [(String, Tensor)], name: &str, t: Tensor) {
    tensors.iter_mut().find(|(n, _)| n == name).unwrap().1 = t;
}

#[test]
fn bad_inputs_are_reported_by_name() {
    expect_forward_error(|t| t.retain(|(n, _)| n != "timestep"), "`timestep`");
    expect_forward_error(|t| replace(t, "x", Tensor::zeros(&[2, 3, 3, 6, 8])), "latent x must be [B, 4");
    expect_forward_error(|t| replace(t, "y", Tensor::zeros(&[2, 1, 12, 40])), "captions y must be");
    expect_forward_error(|t| replace(t, "mask", Tensor::new(&[2, 5], Storage::I64(vec![1; 10])).unwrap()), "`mask`");
    expect_forward_error(
        |t| {
            let mut x = t.iter().find(|(n, _)| n == "x").unwrap().1.clone();
            x.f32_mut().unwrap()[17] = f32::NAN;
            replace(t, "x", x);
        },
        "`x` contains NaN",
    );
}

#[test]
fn bad_model_directories_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::fixture("stdit3-tiny-forward.safetensors");
    let out = dir.path().join("out.safetensors");
    let run = |model: &Path| qc_run(&["forward", "--dit", s(model), "--inputs", s(&fx), "--output", s(&out)]);

    // Unsupported configurations name the field.
    let cfg_text = std::fs::read_to_string(dit().join("config.json")).unwrap();
    for (from, to, expect) in [("\"qk_norm\": true", "\"qk_norm\": false", "qk_norm"), ("\"patch_size\": [\n    1,\n    2,\n    2\n  ]", "\"patch_size\": [1, 0, 2]", "patch_size")] {
        assert!(cfg_text.contains(from), "fixture config layout changed: {from}");
        let m = dir.path().join(format!("model-{expect}"));
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("config.json"), cfg_text.replace(from, to)).unwrap();
        std::os::unix::fs::symlink(dit().join("model.safetensors"), m.join("model.safetensors")).unwrap();
        let (ok, err) = run(&m);
        assert!(!ok && err.contains(expect), "{err}");
    }

    // Missing and mis-shaped tensors are all listed in one error.
    let mut weights = load_all(&dit().join("model.safetensors"));
    weights.retain(|(n, _)| n != "spatial_blocks.1.mlp.fc2.weight" && n != "rope.freqs");
    replace(&mut weights, "t_block.1.bias", Tensor::zeros(&[100]));
    let m = dir.path().join("model-broken");
    std::fs::create_dir(&m).unwrap();
    std::fs::copy(dit().join("config.json"), m.join("config.json")).unwrap();
    write_safetensors(&m.join("model.safetensors"), &weights, None).unwrap();
    let (ok, err) = run(&m);
    assert!(!ok, "broken checkpoint accepted");
    for expect in ["spatial_blocks.1.mlp.fc2.weight", "rope.freqs", "t_block.1.bias has shape [100]", "3 problems"] {
        assert!(err.contains(expect), "error should mention {expect:?}: {err}");
    }

    // A truncated file is not a checkpoint.
    let m = dir.path().join("model-truncated");
    std::fs::create_dir(&m).unwrap();
    std::fs::copy(dit().join("config.json"), m.join("config.json")).unwrap();
    let bytes = std::fs::read(dit().join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = run(&m);
    assert!(!ok && err.contains("model.safetensors"), "{err}");

    // A directory without weights.
    let (ok, err) = run(dir.path());
    assert!(!ok && err.contains("config.json"), "{err}");
    let m = dir.path().join("model-no-weights");
    std::fs::create_dir(&m).unwrap();
    std::fs::copy(dit().join("config.json"), m.join("config.json")).unwrap();
    let (ok, err) = run(&m);
    assert!(!ok && err.contains("no model.safetensors"), "{err}");
    assert!(!out.exists());
}

#[test]
fn unknown_flags_are_rejected() {
    let (ok, err) = qc_run(&["forward", "--dit", "x", "--inputs", "y", "--output", "z", "--frobnicate"]);
    assert!(!ok && err.contains("--frobnicate"), "{err}");
}

#[test]
fn quantization_flag_is_checked() {
    let out = tempfile::tempdir().unwrap();
    let gif = out.path().join("v.gif");
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--quant", "w3a3", "--output", s(&gif)]);
    assert!(!ok && err.contains("--quant") && err.contains("w8a8, w4a8, w4a6"), "{err}");
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--quant", "aigq", "--output", s(&gif)]);
    assert!(!ok && err.contains("calibrat"), "{err}");
    assert!(!gif.exists());
}

#[test]
fn cuda_graphs_flag_is_documented_and_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_qc-run")).args(["generate", "--help"]).output().expect("qc-run starts");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && help.contains("--cuda-graphs <on|off>") && help.contains("QC_CUDA_GRAPHS=0"), "{help}");
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--output", "x.gif", "--cuda-graphs", "maybe"]);
    assert!(!ok && err.contains("--cuda-graphs"), "{err}");
}

/// `--report FILE.json` on the bundled demo model: the documented fields, each
/// consistent with the run (a full computation: every step and block computed).
/// `--output DIR` where DIR holds the user's files is refused before anything
/// runs, and the files stay: frames replace only an earlier run's frames.
#[test]
fn frames_output_never_deletes_a_users_directory() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("notes.txt");
    std::fs::write(&keep, b"mine").unwrap();
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--steps", "2", "--output", dir.path().to_str().unwrap()]);
    assert!(!ok && err.contains("\"notes.txt\"") && err.contains("give a new directory"), "{err}");
    assert_eq!(std::fs::read(&keep).unwrap(), b"mine");
    let frames = dir.path().join("frames");
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--steps", "2", "--output", frames.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--steps", "2", "--output", frames.to_str().unwrap()]);
    assert!(ok, "an earlier run's frames are replaced: {err}");
    assert_eq!(std::fs::read_dir(&frames).unwrap().count(), 8);
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--output", dir.path().join("clip.avi").to_str().unwrap()]);
    assert!(!ok && err.contains("unknown format \".avi\""), "{err}");
}

/// A generation far beyond the machine's memory is refused at once, naming
/// the flags to change, with nothing written; so is a cache that cannot fit.
#[test]
fn generation_larger_than_memory_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("huge.gif");
    let o = out.to_str().unwrap();
    let start = std::time::Instant::now();
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle", "--frames", "64", "--height", "100000", "--width", "100000", "--output", o]);
    assert!(!ok && err.contains("GiB of memory for their activations") && err.contains("--height") && err.contains("1 video of 64 frames at 100000x100000"), "{err}");
    let (ok, err) = qc_run(&["generate", "--prompt", "a", "--prompt", "b", "--frames", "32", "--height", "3000", "--width", "3000", "--cache", "hlc", "--output", o]);
    assert!(!ok && err.contains("--cache hlc: its caches need") && err.contains("--cache-int8"), "{err}");
    assert!(start.elapsed().as_secs() < 60, "refused only after {:?}", start.elapsed());
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "something was written");
}

#[test]
fn generate_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let (gif, report) = (dir.path().join("v.gif"), dir.path().join("r.json"));
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle moving right", "--steps", "6", "--output", s(&gif), "--report", s(&report)]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let f = |path: &[&str]| path.iter().fold(&r, |v, k| &v[*k]).as_f64().unwrap_or_else(|| panic!("{path:?} in {r}"));
    let (text, denoise, decode, total) = (f(&["stages_s", "text"]), f(&["stages_s", "denoise"]), f(&["stages_s", "decode"]), f(&["stages_s", "total"]));
    // +0 exactly: an empty float sum is -0.0, which the JSON would show.
    assert!(text > 0.0 && denoise > 0.0 && decode.to_bits() == 0, "the demo model has no VAE: {r}");
    assert!(total >= text + denoise + f(&["stages_s", "write"]), "{r}");
    assert!(f(&["peak_memory_bytes"]) > 1e6, "{r}");
    assert_eq!((f(&["steps"]), f(&["steps_computed"])), (6.0, 6.0));
    // The demo DiT has 3 spatial and 3 temporal blocks.
    assert_eq!((f(&["block_evals", "computed"]), f(&["block_evals", "possible"])), (36.0, 36.0));
    assert_eq!(r["outputs"][0].as_str().unwrap(), s(&gif));
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--output", s(&gif), "--report", s(&dir.path().join("r.txt"))]);
    assert!(!ok && err.contains("--report") && err.contains("FILE.json"), "{err}");
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--output", s(&gif), "--report", "/nonexistent/r.json"]);
    assert!(!ok && err.contains("--report"), "{err}");
}

/// `--cache`: a policy by name; an unknown one is refused before any work.
#[test]
fn cache_flag_selects_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (gif, report) = (dir.path().join("v.gif"), dir.path().join("r.json"));
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle moving right", "--cache", "static:2", "--output", s(&gif), "--report", s(&report)]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // The demo's 30 steps: steps 0, 2, ..., 28 and the last one computed.
    assert_eq!((r["steps"].as_u64(), r["steps_computed"].as_u64()), (Some(30), Some(16)));
    assert_eq!((r["block_evals"]["computed"].as_u64(), r["block_evals"]["possible"].as_u64()), (Some(16 * 6), Some(30 * 6)));
    assert_eq!(r["cache_peak_bytes"].as_u64(), Some(0), "static:2 keeps velocities, no sub-module outputs");
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle moving right", "--cache", "pab", "--output", s(&gif), "--report", s(&report)]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // pab keeps both attentions of each of the 6 blocks: [2 x 256 tokens, 64] f32 each.
    assert_eq!(r["cache_peak_bytes"].as_u64(), Some(6 * 2 * 512 * 64 * 4), "{r}");
    // In int8 with a scale per token: 64 + 4 bytes a row.
    let (ok, err) = qc_run(&["generate", "--prompt", "a red circle moving right", "--cache", "pab", "--cache-int8", "--output", s(&gif), "--report", s(&report)]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["cache_peak_bytes"].as_u64(), Some(6 * 2 * 512 * (64 + 4)), "{r}");
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--cache", "magic", "--output", s(&gif)]);
    assert!(!ok && err.contains("--cache") && err.contains("hlc, hlc-separate-cfg, srap, hlc+srap, teacache, pab, adacache, static:K"), "{err}");
}

/// `--cache-threshold` and `--accel`: thresholds in range, for policies that have one;
/// quantcache from the bundled model's calibration, alone.
#[test]
fn cache_thresholds_and_accel_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (gif, report) = (dir.path().join("v.gif"), dir.path().join("r.json"));
    let read = || -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap() };
    let prompt = "a red circle moving right";
    for policy in ["hlc", "hlc+srap", "teacache"] {
        let (ok, err) = qc_run(&["generate", "--prompt", prompt, "--cache", policy, "--cache-threshold", "0.3", "--output", s(&gif), "--report", s(&report)]);
        assert!(ok, "{policy}: {err}");
        let r = read();
        let (computed, possible) = (r["block_evals"]["computed"].as_u64().unwrap(), r["block_evals"]["possible"].as_u64().unwrap());
        assert!(computed < possible / 2 && computed > 0, "{policy}: {r}");
        assert_eq!((r["cache"].as_str(), r["cache_threshold"].as_str()), (Some(policy), Some("0.3")), "{r}");
    }
    let (ok, err) = qc_run(&["generate", "--prompt", prompt, "--accel", "quantcache", "--output", s(&gif), "--report", s(&report)]);
    assert!(ok, "{err}");
    let r = read();
    assert!(r["quant"].as_str().unwrap().starts_with("aigq") && r["accel"].as_str() == Some("quantcache") && r["attention"].as_str() == Some("bf16"), "{r}");
    assert!(r["block_evals"]["computed"].as_u64().unwrap() < r["block_evals"]["possible"].as_u64().unwrap() / 2, "{r}");
    for (args, expect) in [
        (vec!["--cache", "hlc", "--cache-threshold", "99"], "expected a number in [0.001, 10]"),
        (vec!["--cache", "hlc", "--cache-threshold", "fast"], "--cache-threshold \"fast\""),
        (vec!["--cache", "static:2", "--cache-threshold", "0.3"], "static:K takes no threshold"),
        (vec!["--cache-threshold", "0.3"], "--cache none takes no threshold"),
        (vec!["--cache", "pab", "--cache-threshold", "2.5"], "whole number of steps"),
        (vec!["--accel", "turbo"], "unknown acceleration preset \"turbo\" (--accel)"),
        (vec!["--accel", "quantcache", "--quant", "w8a8"], "leave --quant out"),
        (vec!["--accel", "quantcache:quality", "--cache", "pab"], "leave --cache out"),
        (vec!["--qk-int8", "--attn-bf16"], "--qk-int8 and --attn-bf16 are two precisions"),
        (vec!["--accel", "quantcache", "--qk-int8"], "leave --qk-int8 out"),
    ] {
        let mut all = vec!["generate", "--prompt", "x", "--output", s(&gif)];
        all.extend(args.iter());
        let (ok, err) = qc_run(&all);
        assert!(!ok && err.contains(expect), "{args:?}: {err}");
    }
    // A float model without a QuantCache calibration.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    for part in ["stdit3", "t5", "tokenizer", "defaults.json"] {
        std::os::unix::fs::symlink(demo.join(part), bare.join(part)).unwrap();
    }
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--model", s(&bare), "--accel", "quantcache", "--output", s(&gif)]);
    assert!(!ok && err.contains("has no QuantCache calibration") && err.contains("qc-run calibrate"), "{err}");
    // A cache larger than the machine: refused before sampling, with what it needs
    // (64 frames of 1024x1024: 16.8 M token rows, 3 x 6 kept outputs of 64 f32 each: 72 GiB).
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--cache", "hlc", "--frames", "64", "--height", "1024", "--width", "1024", "--output", s(&gif)]);
    assert!(!ok && err.contains("--cache hlc: its caches need 72.00 GiB") && err.contains("--cache-int8"), "{err}");
}

/// `qc-bench gpu` without a GPU: it says so, measures the CPU kernels at
/// scaled-down shapes instead, and fails (so that a device check cannot look green).
#[test]
fn bench_gpu_without_a_gpu_runs_the_cpu_kernels_scaled_down() {
    if qc::backend::cuda::probe().is_ok() {
        eprintln!("skipped: a CUDA device is present");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_qc-bench")).args(["gpu"]).output().expect("qc-bench starts");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("no usable CUDA GPU") && stdout.contains("scaled-down") && stdout.contains("sampling step"), "{stdout}");
}

/// Open-Sora's timestep transform below 17 frames: refused up front, naming the flags.
#[test]
fn timestep_transform_needs_17_frames() {
    let dir = tempfile::tempdir().unwrap();
    let gif = dir.path().join("v.gif");
    let (ok, err) = qc_run(&["generate", "--prompt", "x", "--frames", "9", "--timestep-transform", "on", "--output", s(&gif)]);
    assert!(!ok && err.contains("--frames 9") && err.contains("--timestep-transform off"), "{err}");
    assert!(!gif.exists());
}
