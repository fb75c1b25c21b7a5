//! Calibration (`qc-run calibrate`) on the tiny fixture models: statistics,
//! importance vectors chosen by measured output error, the directory format.

mod common;

use qc::pipeline::{ModelDefaults, ModelPaths};
use qc::quant::calibrate::{allocate, collect_stats, Importance, PlanItem, FORMAT, PRESETS};
use qc::quant::plan::Plan;
use qc::quant::preset::{block_linears, quantize_blocks, QuantPreset, WeightStats};
use qc::model::stdit3::Stdit3;
use std::path::Path;
use std::process::Command;

fn fixture_model(dir: &Path) -> std::path::PathBuf {
    let m = dir.join("model");
    std::fs::create_dir(&m).unwrap();
    for (sub, fx) in [("stdit3", "stdit3-tiny"), ("t5", "t5-tiny"), ("tokenizer", "t5-tokenizer"), ("vae", "vae-tiny")] {
        std::os::unix::fs::symlink(common::fixture(fx), m.join(sub)).unwrap();
    }
    std::fs::write(m.join("defaults.json"), r#"{"frames": 17, "height": 12, "width": 16, "steps": 4}"#).unwrap();
    m
}

#[test]
fn statistics_and_importance_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture_model(dir.path());
    let paths = ModelPaths::in_dir(&m);
    let opts = ModelDefaults::from_dir(&m).unwrap().options();
    let prompts = vec!["a red ball".to_string(), "clouds over the sea".to_string()];
    let mut calls = 0;
    let stats = collect_stats(&paths, &prompts, &opts, &[0, 1], 2, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, 4, "2 prompts x 2 seeds");
    let mut dit = Stdit3::load(&paths.dit).unwrap();
    let names: Vec<String> = block_linears(&mut dit).into_iter().map(|(n, _)| n).collect();
    assert_eq!(stats.iter().map(|s| s.name.clone()).collect::<Vec<_>>(), names);
    assert!(names.contains(&"temporal_blocks.0.mlp.fc2".to_string()));
    for st in &stats {
        let k = st.absmax[0].len();
        assert_eq!(st.absmax.len(), 2);
        assert!(!st.rows.is_empty() && st.rows.len() % k == 0, "{}", st.name);
        // Every sampled row is bounded by the recorded maxima, and some row reaches them (up to the sampling).
        let amax: Vec<f32> = (0..k).map(|c| st.absmax.iter().fold(0f32, |m, r| m.max(r[c]))).collect();
        for row in st.rows.chunks(k) {
            assert!(row.iter().zip(&amax).all(|(v, m)| v.abs() <= *m), "{}", st.name);
        }
        assert!(amax.iter().all(|v| v.is_finite()) && amax.iter().any(|v| *v > 0.0), "{}", st.name);
    }

    let imp = Importance::choose(&mut dit, &stats, serde_json::json!({"format": FORMAT}), &mut |_, _| {}).unwrap();
    let layers = imp.meta["layers"].as_object().unwrap();
    assert_eq!(layers.len(), names.len());
    for (name, per) in layers {
        for p in PRESETS {
            let c = &per[p.name()];
            let (e, plain) = (c["rel_error"].as_f64().unwrap(), c["rel_error_plain"].as_f64().unwrap());
            assert!(e <= plain && e > 0.0, "{name} {}: {e} vs {plain}", p.name());
            assert_eq!(c["alpha"].is_null(), imp.get(name, p).is_none(), "{name}");
        }
    }
    // Some layer gains from a vector at 8 bits (the fixture's activations have uneven channels).
    assert!(names.iter().any(|n| imp.get(n, QuantPreset::W8A8).is_some()));

    // The directory round-trips; the vectors are used by quantize_blocks.
    let out = dir.path().join("calib");
    imp.write_dir(&stats, &out, &mut |_| Ok(())).unwrap();
    let back = Importance::from_dir(&out).unwrap();
    assert_eq!(back.vectors, imp.vectors);
    imp.write_dir(&stats, &out, &mut |_| Ok(())).unwrap(); // replacing an earlier calibration is fine
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')), "temporary directories left behind");
    let mut a = Stdit3::load(&paths.dit).unwrap();
    let mut b = Stdit3::load(&paths.dit).unwrap();
    let wa = quantize_blocks(&mut a, QuantPreset::W8A8, None).unwrap();
    let wb = quantize_blocks(&mut b, QuantPreset::W8A8, Some(&back)).unwrap();
    // The same int8 weights and scales, plus each folded vector's inverse (4 bytes per input).
    let vector_bytes: usize = block_linears(&mut Stdit3::load(&paths.dit).unwrap()).into_iter().filter(|(n, _)| back.get(n, QuantPreset::W8A8).is_some()).map(|(_, l)| 4 * l.in_features).sum();
    assert!(vector_bytes > 0);
    assert_eq!((wa.values, wa.bytes + vector_bytes), (wb.values, wb.bytes), "storage with and without vectors");
    assert!(quantize_blocks(&mut Stdit3::load(&paths.dit).unwrap(), QuantPreset::None, Some(&back)).is_err());

    // Not a calibration directory: refused, and left alone.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "x").unwrap();
    let err = imp.write_dir(&stats, &other, &mut |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("not a calibration directory"), "{err}");
    assert!(other.join("keep.txt").exists());
    let err = Importance::from_dir(&other).unwrap_err().to_string();
    assert!(err.contains("quant.json"), "{err}");
}

#[test]
fn calibrate_command_checks_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture_model(dir.path());
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qc-run")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        (out.status.success(), err)
    };
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let out = dir.path().join("calib");
    let (ok, err) = run(&["calibrate", "--model", m.to_str().unwrap(), "--prompts", empty.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok && err.contains("empty.txt") && err.contains("no prompt"), "{err}");
    assert!(!out.exists());
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red ball\n").unwrap();
    let (ok, err) = run(&["calibrate", "--model", m.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--output", out.to_str().unwrap(), "--ranges", "9"]);
    assert!(!ok && err.contains("ranges"), "{err}");
    // --lowest: checked before any trajectory runs.
    let base = ["calibrate", "--model", m.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--output", out.to_str().unwrap()];
    let (ok, err) = run(&[&base[..], &["--budget", "9", "--lowest", "w2a2"]].concat());
    assert!(!ok && err.contains("--lowest \"w2a2\"") && err.contains("w8a8, w4a8 or w4a6"), "{err}");
    let (ok, err) = run(&[&base[..], &["--lowest", "w8a8"]].concat());
    assert!(!ok && err.contains("--lowest") && err.contains("--budget"), "{err}");
    let (ok, err) = run(&[&base[..], &["--budget", "6", "--lowest", "w8a8"]].concat());
    assert!(!ok && err.contains("--budget 6") && err.contains("a little above 8 (w8a8 everywhere"), "{err}");
    assert!(!out.exists());
    let (ok, err) = run(&["calibrate", "--model", m.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("quant.json")).unwrap()).unwrap();
    assert_eq!(meta["format"], FORMAT);
    assert_eq!(meta["prompts"][0], "a red ball");
    // generate with the calibration at w8a8; without a quantized preset it is refused.
    let gif = dir.path().join("v.gif");
    let (ok, err) = run(&["generate", "--model", m.to_str().unwrap(), "--prompt", "a red ball", "--quant", "w8a8", "--calibration", out.to_str().unwrap(), "--output", gif.to_str().unwrap()]);
    assert!(ok && gif.exists(), "{err}");
    let (ok, err) = run(&["generate", "--model", m.to_str().unwrap(), "--prompt", "a red ball", "--calibration", out.to_str().unwrap(), "--output", gif.to_str().unwrap()]);
    assert!(!ok && err.contains("--calibration"), "{err}");
}

#[test]
fn allocation_meets_the_budget_at_the_least_sensitivity() {
    // Three one-range decisions of 100 values (bits per value 16 / 8 / 4 / 4 for simplicity):
    // b is cheap to quantize, c is sensitive.
    let item = |name: &str, s8: f64, s4: f64, s46: f64| PlanItem { unit: name.into(), ranges: vec![0], values: 100, step_fraction: 1.0, bits: [1600.0, 800.0, 400.0, 400.0], sensitivity: [0.0, s8, s4, s46] };
    let items = vec![item("a", 0.01, 0.2, 0.2), item("b", 0.001, 0.01, 0.05), item("c", 0.5, 0.9, 1.0)];
    let get = |plan: &Plan, u: &str| plan.precision(u, 0).unwrap();
    let (plan, bits) = allocate(&items, &[], &[1.0], 16.0, 3).unwrap();
    assert_eq!(bits, 16.0);
    assert!(plan.units.values().all(|p| p == &vec![QuantPreset::None]));
    // 12 bits on average: b steps down first (least sensitivity per bit), then a; c keeps 16 bits.
    let (plan, bits) = allocate(&items, &[], &[1.0], 12.0, 3).unwrap();
    assert!((bits - 32.0 / 3.0).abs() < 1e-9, "{bits}");
    assert_eq!((get(&plan, "a"), get(&plan, "b"), get(&plan, "c")), (QuantPreset::W8A8, QuantPreset::W8A8, QuantPreset::None));
    // 8 bits: b goes on to 4 bits (0.009 more over 400 bits), then a (0.19 over 400), before c
    // leaves bf16 (0.5 over 800).
    let (plan, bits) = allocate(&items, &[], &[1.0], 8.0, 3).unwrap();
    assert_eq!(bits, 8.0);
    assert_eq!((get(&plan, "a"), get(&plan, "b"), get(&plan, "c")), (QuantPreset::W4A8, QuantPreset::W4A8, QuantPreset::None));
    let err = allocate(&items, &[], &[1.0], 3.0, 3).unwrap_err().to_string();
    assert!(err.contains("4.00 to 16.00"), "{err}");
    // Down to w8a8 only: 8 bits is w8a8 everywhere, the least reachable; b's cheaper 4-bit step is not taken.
    let (plan, bits) = allocate(&items, &[], &[1.0], 8.0, 1).unwrap();
    assert_eq!(bits, 8.0);
    assert!(plan.units.values().all(|p| p == &vec![QuantPreset::W8A8]), "{plan:?}");
    let (plan, _) = allocate(&items, &[], &[1.0], 32.0 / 3.0, 1).unwrap();
    assert_eq!((get(&plan, "a"), get(&plan, "b"), get(&plan, "c")), (QuantPreset::W8A8, QuantPreset::W8A8, QuantPreset::None));
    let err = allocate(&items, &[], &[1.0], 6.0, 1).unwrap_err().to_string();
    assert!(err.contains("8.00 to 16.00"), "{err}");
    assert!(allocate(&items, &[], &[1.0], 8.0, 0).is_err());

    // Two timestep ranges, the first holding 3/4 of the steps: saving bits there counts three
    // times as much, so the same unit steps down in range 0 first when it is as sensitive there.
    let r = |range: usize, frac: f64, s8: f64| PlanItem { unit: "u".into(), ranges: vec![range], values: 100, step_fraction: frac, bits: [1600.0, 800.0, 400.0, 400.0], sensitivity: [0.0, s8, 1.0, 1.0] };
    let items = vec![r(0, 0.75, 0.1), r(1, 0.25, 0.1)];
    let (plan, bits) = allocate(&items, &[500.0], &[0.75, 0.25], 13.0, 3).unwrap();
    assert_eq!(plan.units["u"], vec![QuantPreset::W8A8, QuantPreset::None]);
    assert!((bits - (0.75 * 8.0 + 0.25 * 16.0)).abs() < 1e-9, "{bits}");
}

#[test]
fn aigq_plan_is_written_applied_and_loaded_as_a_quantized_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture_model(dir.path());
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red ball\nclouds\n").unwrap();
    let out = dir.path().join("qdir");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_qc-run")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        (o.status.success(), err)
    };
    let (ms, ps, os) = (m.to_str().unwrap(), prompts.to_str().unwrap(), out.to_str().unwrap());
    let (ok, err) = run(&["calibrate", "--model", ms, "--prompts", ps, "--output", os, "--budget", "2"]);
    assert!(!ok && err.contains("the fewest average weight bits are a little above 4 (w4a8 everywhere"), "{err}");
    let (ok, err) = run(&["calibrate", "--model", ms, "--prompts", ps, "--output", os, "--budget", "nan"]);
    assert!(!ok && err.contains("--budget must be a number of bits per weight, got NaN"), "{err}");
    let (ok, err) = run(&["calibrate", "--model", ms, "--prompts", ps, "--output", os, "--budget", "6", "--sensitivity-prompts", "1", "--ranges", "2"]);
    assert!(ok && err.contains("aigq plan"), "{err}");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("quant.json")).unwrap()).unwrap();
    let units = meta["plan"]["units"].as_object().unwrap();
    assert_eq!(units.len(), 2 * 2 * 3, "the fixture has 2 spatial + 2 temporal blocks of 3 sub-modules: {units:?}");
    assert!(units.values().all(|v| v.as_array().unwrap().len() == 2), "two timestep ranges");
    // The cross-attention decides once for the whole trajectory.
    assert!(units.iter().filter(|(u, _)| u.ends_with("cross_attn")).all(|(_, v)| v[0] == v[1]));
    assert!(meta["plan_bits"].as_f64().unwrap() <= 6.0);
    let decisions = meta["sensitivity"]["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2 * 2 * (2 * 2 + 1), "self-attention and MLP per range, cross-attention once");
    assert!(decisions.iter().all(|d| d["sensitivity"]["w4a8"].as_f64().unwrap() > 0.0 && d["sensitivity"]["w8a8"].as_f64().unwrap() > 0.0 && d["sensitivity"]["none"] == 0.0));
    let imp = Importance::from_dir(&out).unwrap();
    let plan = imp.plan.clone().unwrap();
    assert_eq!(plan.ranges(), 2);
    let mut dit = Stdit3::load(&m.join("stdit3")).unwrap();
    let w = quantize_blocks(&mut dit, QuantPreset::Aigq, Some(&imp)).unwrap();
    assert!(w.step_bits > 4.0 && w.step_bits <= 6.0 + 1e-9, "{}", w.step_bits);
    assert!((w.step_bits - meta["plan_bits"].as_f64().unwrap()).abs() < 0.05, "the plan's bits are what the model reads: {} vs {}", w.step_bits, meta["plan_bits"]);

    // The directory is a quantized checkpoint: smaller, and it generates the same video as
    // quantizing the float model on the fly with the same plan.
    let (qsize, fsize) = (std::fs::metadata(out.join("stdit3/model.safetensors")).unwrap().len(), std::fs::metadata(m.join("stdit3/model.safetensors")).unwrap().len());
    assert!(qsize < fsize, "{qsize} vs {fsize}");
    let mut loaded = Stdit3::load(&out.join("stdit3")).unwrap();
    assert_eq!(loaded.stored_plan.as_ref(), Some(&plan));
    assert_eq!(loaded.phases.len(), dit.phases.len());
    assert_eq!(WeightStats::of_model(&mut loaded, &plan).unwrap(), w);
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    let (ok, err) = run(&["generate", "--model", ms, "--prompt", "a red ball", "--quant", "aigq", "--calibration", os, "--output", a.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, err) = run(&["generate", "--model", os, "--prompt", "a red ball", "--output", b.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "quantized checkpoint and on-the-fly quantization differ");
    let (ok, err) = run(&["generate", "--model", os, "--prompt", "a red ball", "--quant", "w8a8", "--output", b.to_str().unwrap()]);
    assert!(!ok && err.contains("quantized checkpoint") && err.contains("--quant w8a8"), "{err}");

    // A quant.json whose plan disagrees with the tensors.
    let text = std::fs::read_to_string(out.join("quant.json")).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&text).unwrap();
    let first = edited["plan"]["units"].as_object().unwrap().keys().next().unwrap().clone();
    let flip = if edited["plan"]["units"][&first][0] == "w8a8" { "w4a8" } else { "w8a8" };
    edited["plan"]["units"][&first][0] = serde_json::json!(flip);
    std::fs::write(out.join("quant.json"), serde_json::to_string(&edited).unwrap()).unwrap();
    let (ok, err) = run(&["generate", "--model", os, "--prompt", "a red ball", "--output", b.to_str().unwrap()]);
    assert!(!ok && err.contains("quant.json") && err.contains("plan"), "{err}");
    std::fs::write(out.join("quant.json"), text).unwrap();
    // A quantized checkpoint for another architecture (one block fewer).
    let cfg_path = out.join("stdit3/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    c["depth"] = serde_json::json!(1);
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let err = format!("{:#}", Stdit3::load(&out.join("stdit3")).err().expect("a depth-1 config must not load the depth-2 checkpoint"));
    assert!(err.contains("model.safetensors") && err.contains("another architecture"), "{err}");
    std::fs::write(&cfg_path, cfg).unwrap();

    // A calibration without a plan is refused for aigq.
    let plain = dir.path().join("plain");
    let (ok, err) = run(&["calibrate", "--model", ms, "--prompts", ps, "--output", plain.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(!plain.join("stdit3").exists(), "no plan, no quantized checkpoint");
    let gif = dir.path().join("v.gif");
    let (ok, err) = run(&["generate", "--model", ms, "--prompt", "a red ball", "--quant", "aigq", "--calibration", plain.to_str().unwrap(), "--output", gif.to_str().unwrap()]);
    assert!(!ok && err.contains("no aigq plan"), "{err}");
}
