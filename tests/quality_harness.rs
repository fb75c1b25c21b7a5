//! The quality harness end to end on the tiny fixture models.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn harness_reports_every_mode_and_writes_a_strip() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for (sub, fx) in [("stdit3", "stdit3-tiny"), ("t5", "t5-tiny"), ("tokenizer", "t5-tokenizer"), ("vae", "vae-tiny")] {
        std::os::unix::fs::symlink(common::fixture(fx), m.join(sub)).unwrap();
    }
    std::fs::write(m.join("defaults.json"), r#"{"frames": 17, "height": 12, "width": 16, "steps": 4}"#).unwrap();
    let prompts = dir.path().join("prompts.json");
    std::fs::write(&prompts, r#"[{"prompt": "a red ball", "colour": "red", "direction": "right"}, {"prompt": "clouds", "colour": "blue", "direction": "left"}]"#).unwrap();
    let out = dir.path().join("report");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let res = Command::new(env!("CARGO_BIN_EXE_qc-bench"))
        .args(["quality", "--model", &p(&m), "--prompts", &p(&prompts), "--modes", "static:2,static:4", "--seeds", "0,1", "--out", &p(&out)])
        .output()
        .unwrap();
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
