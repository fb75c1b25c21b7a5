//! Prompt to video end to end against the official pipeline, and the
//! generate command's early checks.

mod common;

use qc::checkpoint::Checkpoint;
use qc::io::write_safetensors;
use qc::tensor::{rel_l2, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;

fn qc_run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qc-run")).args(args).env_remove("QC_MODEL_DIR").output().expect("qc-run starts");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "qc-run panicked: {stderr}");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// A model directory laid out as `generate --model` expects, made of the tiny fixture models.
fn tiny_model(root: &Path) -> PathBuf {
    let m = root.join("model");
    std::fs::create_dir(&m).unwrap();
    for (sub, fx) in [("stdit3", "stdit3-tiny"), ("t5", "t5-tiny"), ("tokenizer", "t5-tokenizer"), ("vae", "vae-tiny")] {
        std::os::unix::fs::symlink(common::fixture(fx), m.join(sub)).unwrap();
    }
    m
}

fn prompts() -> Vec<String> {
    let meta = Checkpoint::open_file(&common::fixture("pipeline-tiny-video.safetensors")).unwrap().metadata();
    serde_json::from_str(&meta["prompts"]).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_reproduces_the_official_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let rflow = Checkpoint::open_file(&common::fixture("rflow-tiny-video.safetensors")).unwrap();
    let noise = dir.path().join("z0.safetensors");
    write_safetensors(&noise, &[("z0".into(), rflow.load_f32("z0").unwrap())], None).unwrap();
    let out = dir.path().join("video.safetensors");
    let p = prompts();
    let mut args = vec!["generate", "--model", s(&model), "--init-noise", s(&noise), "--aes", "none", "--raw-prompt"];
    args.extend(["--frames", "17", "--height", "12", "--width", "16", "--steps", "6", "--cfg", "7.0", "--fps", "24", "--output", s(&out)]);
    for q in &p {
        args.extend(["--prompt", q.as_str()]);
    }
    let (ok, _, err) = qc_run(&args);
    assert!(ok, "{err}");
    assert!(err.contains("peak memory"), "the summary reports peak memory: {err}");

    let got = Checkpoint::open_file(&out).unwrap();
    let want = Checkpoint::open_file(&common::fixture("pipeline-tiny-video.safetensors")).unwrap();
    let e = rel_l2(got.load_f32("video").unwrap().f32().unwrap(), want.load_f32("video").unwrap().f32().unwrap());
    assert!(e < 1e-3, "video relative L2 {e:.3e}");
    let (g, w) = (got.load_any("frames_u8").unwrap(), want.load_any("frames_u8").unwrap());
    assert_eq!(g.shape(), w.shape());
    let (Storage::U8(g), Storage::U8(w)) = (g.storage(), w.storage()) else { panic!("frames_u8 must be uint8") };
    let worst = g.iter().zip(w).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(worst <= 1, "frames differ by {worst} levels");
    eprintln!("pipeline: video relative L2 {e:.2e}, worst frame difference {worst} level(s)");

    // The same run written as GIFs (one per prompt) and PNG frames.
    let gif = dir.path().join("clip.gif");
    let mut args2: Vec<&str> = args.clone();
    let n = args2.len();
    let pos = args2.iter().position(|a| *a == "--output").unwrap();
    args2[pos + 1] = s(&gif);
    assert_eq!(n, args2.len());
    let (ok, stdout, err) = qc_run(&args2);
    assert!(ok, "{err}");
    assert!(stdout.contains("clip-0.gif") && stdout.contains("clip-1.gif"), "{stdout}");
    assert!(dir.path().join("clip-1.gif").is_file());
}

#[test]
fn bad_generate_requests_fail_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("v.gif");
    let base = |extra: &[&str]| {
        let mut a = vec!["generate", "--prompt", "a red ball", "--frames", "17", "--height", "12", "--width", "16", "--steps", "1"];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = base(extra);
        let r: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        qc_run(&r)
    };
    // A model directory that does not exist.
    let (ok, _, err) = run(&["--model", "/nonexistent-model", "--output", s(&out)]);
    assert!(!ok && err.contains("/nonexistent-model"), "{err}");
    // Missing part.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::os::unix::fs::symlink(common::fixture("stdit3-tiny"), broken.join("stdit3")).unwrap();
    let (ok, _, err) = run(&["--model", s(&broken), "--output", s(&out)]);
    assert!(!ok && err.contains("t5"), "{err}");
    // Unwritable output.
    let (ok, _, err) = run(&["--model", s(&model), "--output", "/nonexistent-dir/v.gif"]);
    assert!(!ok && err.contains("/nonexistent-dir"), "{err}");
    // Geometry the VAE cannot produce.
    let (ok, _, err) = run(&["--model", s(&model), "--output", s(&out), "--frames", "0"]);
    assert!(!ok && err.contains("frames"), "{err}");
    let (ok, _, err) = run(&["--model", s(&model), "--output", s(&out), "--height", "1"]);
    assert!(!ok && err.contains("VAE cannot produce"), "{err}");
    // Tokenizer and T5 that do not belong together: a T5 with a smaller vocabulary.
    let t5 = dir.path().join("t5-small-vocab");
    std::fs::create_dir(&t5).unwrap();
    let cfg = std::fs::read_to_string(common::fixture("t5-tiny").join("config.json")).unwrap().replace("\"vocab_size\": 80", "\"vocab_size\": 40");
    std::fs::write(t5.join("config.json"), cfg).unwrap();
    std::os::unix::fs::symlink(common::fixture("t5-tiny").join("model.safetensors"), t5.join("model.safetensors")).unwrap();
    let (ok, _, err) = run(&["--model", s(&model), "--t5", s(&t5), "--output", s(&out)]);
    assert!(!ok && err.contains("do not belong together"), "{err}");
    // Wrong noise shape.
    let noise = dir.path().join("z0.safetensors");
    write_safetensors(&noise, &[("z0".into(), qc::tensor::Tensor::zeros(&[1, 4, 2, 6, 8]))], None).unwrap();
    let (ok, _, err) = run(&["--model", s(&model), "--output", s(&out), "--init-noise", s(&noise)]);
    assert!(!ok && err.contains("initial noise"), "{err}");
    assert!(!out.exists(), "nothing may be written on failure");
    // Unknown option values.
    let (ok, _, err) = run(&["--model", s(&model), "--output", s(&out), "--aes", "high"]);
    assert!(!ok && err.contains("--aes"), "{err}");
}

#[test]
fn clean_prompt_prints_one_line_per_prompt() {
    let (ok, stdout, err) = qc_run(&["clean-prompt", "--prompt", "A Cat!", "--prompt", "two", "--aes", "none"]);
    assert!(ok, "{err}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let (ok, stdout, _) = qc_run(&["clean-prompt", "--prompt", "A Cat"]);
    assert!(ok && stdout.contains("aesthetic score: 6.5"), "{stdout}");
    assert_eq!(qc::text::clean::append_score("A Cat!", Some(7.0)), "A Cat! aesthetic score: 7.0.");
    assert_eq!(qc::text::clean::append_score("x aesthetic score: 5.0.", Some(7.0)), "x aesthetic score: 5.0.");
}

#[test]
fn encode_text_and_decode_subcommands_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t5.safetensors");
    let io = Checkpoint::open_file(&common::fixture("t5-tiny-io.safetensors")).unwrap();
    let p: Vec<String> = serde_json::from_str(&io.metadata()["prompts"]).unwrap();
    let (t5, tok) = (common::fixture("t5-tiny"), common::fixture("t5-tokenizer"));
    let mut args = vec!["encode-text", "--t5", s(&t5), "--tokenizer", s(&tok), "--max-length", "12", "--output", s(&out)];
    for q in &p {
        args.extend(["--prompt", q.as_str()]);
    }
    let (ok, _, err) = qc_run(&args);
    assert!(ok, "{err}");
    let got = Checkpoint::open_file(&out).unwrap();
    assert_eq!(got.load_any("input_ids").unwrap().to_i64().unwrap(), io.load_any("input_ids").unwrap().to_i64().unwrap());
    let e = rel_l2(got.load_f32("last_hidden_state").unwrap().f32().unwrap(), io.load_f32("last_hidden_state").unwrap().f32().unwrap());
    assert!(e < 1e-4, "last_hidden_state {e}");

    let fx = common::fixture("vae-tiny-decode.safetensors");
    let out = dir.path().join("video.safetensors");
    let (ok, _, err) = qc_run(&["decode", "--vae", s(&common::fixture("vae-tiny")), "--inputs", s(&fx), "--output", s(&out)]);
    assert!(ok, "{err}");
    let want = Checkpoint::open_file(&fx).unwrap().load_f32("video").unwrap();
    let e = rel_l2(Checkpoint::open_file(&out).unwrap().load_f32("video").unwrap().f32().unwrap(), want.f32().unwrap());
    assert!(e < 1e-4, "video {e}");
}

#[test]
fn model_defaults_apply_unless_flags_override_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    std::fs::write(model.join("defaults.json"), r#"{"frames": 17, "height": 12, "width": 16, "steps": 2, "cfg": 3.0, "fps": 8, "timestep_transform": false}"#).unwrap();
    let out = dir.path().join("v.safetensors");
    let (ok, _, err) = qc_run(&["generate", "--model", s(&model), "--prompt", "a red ball", "--output", s(&out)]);
    assert!(ok, "{err}");
    let video = Checkpoint::open_file(&out).unwrap().load_f32("video").unwrap();
    assert_eq!(video.shape(), [1, 3, 17, 12, 16]);
    // Flags win over defaults.json; --upscale enlarges the written frames.
    let (ok, _, err) = qc_run(&["generate", "--model", s(&model), "--prompt", "a red ball", "--frames", "1", "--upscale", "3", "--output", s(&out)]);
    assert!(ok, "{err}");
    assert_eq!(Checkpoint::open_file(&out).unwrap().load_f32("video").unwrap().shape(), [1, 3, 1, 36, 48]);
    std::fs::write(model.join("defaults.json"), r#"{"frame": 17}"#).unwrap();
    let (ok, _, err) = qc_run(&["generate", "--model", s(&model), "--prompt", "a red ball", "--output", s(&out)]);
    assert!(!ok && err.contains("defaults.json"), "{err}");
}

/// The denoising stage times the loop alone: a run that loads the DiT reports the
/// load as a stage of its own, and a run on loaded models has none.
#[test]
fn the_denoising_stage_leaves_out_loading_the_dit() {
    use qc::backend::cpu::CpuBackend;
    use qc::model::stdit3::NoHooks;
    use qc::pipeline::{LoadedModels, ModelConfigs, ModelDefaults, ModelPaths, STAGE_DENOISE, STAGE_DIT_LOAD};
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let paths = ModelPaths::in_dir(&demo);
    let opts = qc::pipeline::GenerateOptions { steps: 2, ..ModelDefaults::from_dir(&demo).unwrap().options() };
    let be = CpuBackend::new();
    let prompt = ["a red circle moving right".to_string()];
    let configs = std::sync::Arc::new(ModelConfigs::check(&paths, &opts).unwrap());
    let names = |r: &qc::pipeline::Report| r.stages.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
    let (loading, r) = configs.plan(&prompt, &opts).unwrap().run(&be, &opts, &mut NoHooks, &mut |_| {}).unwrap();
    assert!(names(&r).contains(&STAGE_DIT_LOAD.to_string()) && names(&r).contains(&STAGE_DENOISE.to_string()), "{:?}", names(&r));
    assert!(r.seconds(STAGE_DIT_LOAD) > 0.0 && r.seconds("") >= r.seconds(STAGE_DIT_LOAD) + r.seconds(STAGE_DENOISE));
    let models = LoadedModels::load(&configs, &be, &opts).unwrap();
    let (loaded, r) = configs.plan(&prompt, &opts).unwrap().run_with(&be, Some(&models), &opts, &mut NoHooks, &mut |_| Ok(())).unwrap();
    assert!(!names(&r).contains(&STAGE_DIT_LOAD.to_string()) && r.seconds(STAGE_DENOISE) > 0.0, "{:?}", names(&r));
    assert_eq!(loading.f32().unwrap(), loaded.f32().unwrap());
}

/// The host-memory check refuses exactly what exceeds the memory given, the
/// activations' count growing with the request, and names the cache when the
/// cache alone is too large.
#[test]
fn host_memory_check_compares_the_count_with_the_memory_given() {
    use qc::pipeline::{ModelDefaults, ModelPaths};
    let demo = Path::new(qc::BUNDLED_MODEL);
    let paths = ModelPaths::in_dir(demo);
    let defaults = ModelDefaults::from_dir(demo).unwrap().options();
    let plan_of = |frames, side| qc::pipeline::plan(&paths, &["a red circle".to_string()], &qc::pipeline::GenerateOptions { frames, height: side, width: side, ..defaults.clone() }).unwrap();
    let (small, large) = (plan_of(8, 16), plan_of(16, 64));
    let need = small.host_activation_bytes();
    assert!(large.host_activation_bytes() > need && need > 0);
    small.check_host_memory(0, "none", need).unwrap();
    let e = small.check_host_memory(0, "none", need - 1).unwrap_err().to_string();
    assert!(e.contains("1 video of 8 frames at 16x16") && e.contains("--frames") && !e.contains("--cache"), "{e}");
    small.check_host_memory(10, "hlc", need + 10).unwrap();
    let e = small.check_host_memory(10, "hlc", need + 9).unwrap_err().to_string();
    assert!(e.contains("activations and --cache hlc's caches"), "{e}");
    let e = small.check_host_memory(need, "hlc", need - 1).unwrap_err().to_string();
    assert!(e.starts_with("--cache hlc: its caches need"), "{e}");
}
