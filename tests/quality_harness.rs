//! The quality harness end to end on the tiny fixture models.

mod common;

use std::path::Path;
use std::process::Command;

/// The tiny fixture models as a model directory, and a two-prompt set.
fn fixture_model(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let m = dir.join("model");
    std::fs::create_dir(&m).unwrap();
    for (sub, fx) in [("stdit3", "stdit3-tiny"), ("t5", "t5-tiny"), ("tokenizer", "t5-tokenizer"), ("vae", "vae-tiny")] {
        std::os::unix::fs::symlink(common::fixture(fx), m.join(sub)).unwrap();
    }
    std::fs::write(m.join("defaults.json"), r#"{"frames": 17, "height": 12, "width": 16, "steps": 4}"#).unwrap();
    let prompts = dir.join("prompts.json");
    std::fs::write(&prompts, r#"[{"prompt": "a red ball", "colour": "red", "direction": "right"}, {"prompt": "clouds", "colour": "blue", "direction": "left"}]"#).unwrap();
    (m, prompts)
}

fn quality(model: &Path, prompts: &Path, modes: &str, seeds: &str, out: &Path) -> std::process::Output {
    let p = |x: &Path| x.to_str().unwrap().to_string();
    Command::new(env!("CARGO_BIN_EXE_qc-bench")).args(["quality", "--model", &p(model), "--prompts", &p(prompts), "--modes", modes, "--seeds", seeds, "--out", &p(out)]).output().unwrap()
}

fn cell(row: &str, i: usize) -> f64 {
    let c = row.split('|').map(str::trim).nth(i + 1).unwrap();
    c.trim_end_matches(['%', 'x']).parse().unwrap_or_else(|_| panic!("column {i} of {row}"))
}

#[test]
fn quantized_modes_are_compared_with_full_precision() {
    let dir = tempfile::tempdir().unwrap();
    let (m, prompts) = fixture_model(dir.path());
    let out = dir.path().join("report");
    let res = quality(&m, &prompts, "w8a8,w4a8,w4a6,w8a8+static:2,w8a8-qk8,w8a8-bf16", "0", &out);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let md = std::fs::read_to_string(out.join("quality.md")).unwrap();
    let row = |mode: &str| md.lines().find(|l| l.starts_with(&format!("| {mode} |"))).unwrap_or_else(|| panic!("no {mode} row in {md}")).to_string();
    // Columns: mode, videos, PSNR, SSIM, MAE, temporal, blocks, weight bits, weight KiB, DiT time,
    // per step, speed-up, total time, speed-up, following.
    assert_eq!(cell(&row("reference"), 7), 32.0);
    let (w8, w4, w4a6) = (row("w8a8"), row("w4a8"), row("w4a6"));
    // int8: 8 bits plus one f32 scale per output channel; int4: 4 bits plus one per 64 inputs.
    assert!((8.0..9.0).contains(&cell(&w8, 7)) && (4.0..5.0).contains(&cell(&w4, 7)), "{w8}\n{w4}");
    // W8A8 stays close to full precision; 4-bit weights lose more; A6 more than A8.
    let (p8, p4, p46) = (cell(&w8, 2), cell(&w4, 2), cell(&w4a6, 2));
    assert!(p8 > 30.0 && p8 > p4 + 5.0 && p4 > p46 && p46 > 5.0, "PSNR w8a8 {p8}, w4a8 {p4}, w4a6 {p46}");
    assert_eq!(cell(&row("w8a8+static:2"), 6), 75.0);
    assert!(cell(&row("w8a8+static:2"), 2) < p8);
    // int8 Q K^T attention on top of w8a8: the same weights, a little more error.
    let qk = row("w8a8-qk8");
    assert_eq!((cell(&qk, 7), cell(&qk, 8)), (cell(&w8, 7), cell(&w8, 8)));
    assert!(cell(&qk, 2) > 25.0 && cell(&qk, 2) < p8 + 1.0, "{qk}");
    // bf16 attention operands on top of w8a8: the same weights, about w8a8's error.
    let bf = row("w8a8-bf16");
    assert_eq!((cell(&bf, 7), cell(&bf, 8)), (cell(&w8, 7), cell(&w8, 8)));
    assert!(cell(&bf, 2) > 25.0 && cell(&bf, 2) < p8 + 1.0 && cell(&bf, 2).is_finite(), "{bf}");
    let res = quality(&m, &prompts, "w8a8-qk8-bf16", "0", &out);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("-qk8 and -bf16"), "{err}");

    let res = quality(&m, &prompts, "aigq", "0", &out);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("calibrat"), "{err}");
}

#[test]
fn harness_reports_every_mode_and_writes_a_strip() {
    let dir = tempfile::tempdir().unwrap();
    let (m, prompts) = fixture_model(dir.path());
    let out = dir.path().join("report");
    let res = quality(&m, &prompts, "static:2,static:4", "0,1", &out);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let md = std::fs::read_to_string(out.join("quality.md")).unwrap();
    let row = |mode: &str| md.lines().find(|l| l.starts_with(&format!("| {mode} |"))).unwrap_or_else(|| panic!("no {mode} row in {md}")).to_string();
    // The reference is identical to itself and computes every block; static:2 computes 3 of 4 steps, static:4 2 of 4.
    assert!(row("reference").contains("| 4 | inf | 1.0000 | 0.0000 |") && row("reference").contains("| 100.0% |"), "{}", row("reference"));
    assert!(row("static:2").contains("| 75.0% |"), "{}", row("static:2"));
    assert!(row("static:4").contains("| 50.0% |"), "{}", row("static:4"));
    assert_eq!(md.lines().filter(|l| l.starts_with("| a red ball |")).count(), 6, "2 seeds x 3 modes");
    assert!(stdout.contains("static:4"));
    // Strip: 2 prompts x 3 modes rows of 17 frames, each 4x enlarged with 2-pixel gaps.
    let f = std::fs::File::open(out.join("strip.png")).unwrap();
    let info = png::Decoder::new(std::io::BufReader::new(f)).read_info().unwrap();
    let (w, h) = (info.info().width as usize, info.info().height as usize);
    assert_eq!((w, h), (17 * (16 * 4 + 2), 6 * (12 * 4 + 2) + 2 * 2));
}

/// `--repeat N` times each generation N times: the same videos and counts (the
/// first run's), so every quality column is the single run's; 0 is refused.
#[test]
fn repeated_runs_keep_the_first_runs_results() {
    let dir = tempfile::tempdir().unwrap();
    let (m, prompts) = fixture_model(dir.path());
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let run = |repeat: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_qc-bench")).args(["quality", "--model", &p(&m), "--prompts", &p(&prompts), "--modes", "w8a8+static:2", "--out", &p(out), "--repeat", repeat]).output().unwrap()
    };
    let (once, twice) = (dir.path().join("once"), dir.path().join("twice"));
    for (r, out) in [("1", &once), ("2", &twice)] {
        let res = run(r, out);
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    }
    let row = |out: &Path| {
        let md = std::fs::read_to_string(out.join("quality.md")).unwrap();
        let r = md.lines().find(|l| l.starts_with("| w8a8+static:2 |")).unwrap().to_string();
        // Mode to weight KiB: everything but the times.
        (1..=8).map(|i| cell(&r, i).to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(row(&once), row(&twice));
    let res = run("0", &dir.path().join("zero"));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("--repeat"), "{err}");
}
