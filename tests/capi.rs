//! libqc from C and Python: the C example (linked against libqc.so and
//! libqc.a) and the ctypes example generate the bundled model's video byte for
//! byte as `qc-run generate` writes it; the C misuse program (under valgrind
//! when it is installed) checks the answers to bad calls.

use qc::checkpoint::Checkpoint;
use qc::tensor::Storage;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PROMPTS: [&str; 2] = ["a red circle moving right", "a blue square moving up on a white background"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding libqc.so and libqc.a built from these sources: this test
/// executable's own `target/PROFILE/deps/` (`cargo test` builds every crate type of
/// the library there but copies none up to `target/PROFILE/`, as `cargo build` does).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("target/PROFILE/deps").to_path_buf();
    for lib in ["libqc.so", "libqc.a"] {
        assert!(deps.join(lib).is_file(), "{} not found: cargo builds it with the tests (crate-type cdylib and staticlib)", deps.join(lib).display());
    }
    deps
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// Compiles `source` with the system C compiler against libqc: `shared` links libqc.so
/// (found at run time through an rpath), else libqc.a and the system libraries it needs.
fn cc(source: &str, exe: &Path, shared: bool) {
    let lib = lib_dir();
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O1"]).arg("-I").arg(root().join("include")).arg(root().join(source)).arg("-o").arg(exe);
    if shared {
        cmd.arg(format!("-L{}", lib.display())).arg("-lqc").arg(format!("-Wl,-rpath,{}", lib.display()));
    } else {
        cmd.arg(lib.join("libqc.a")).args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
    }
    cmd.args(["-lpthread", "-lm"]);
    run(&mut cmd);
}

/// `qc-run generate`'s `frames_u8` for the bundled model, as `[video][frame][height][width][rgb]`.
fn qc_run_frames(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let out = dir.join("qc-run.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qc-run"));
    cmd.args(["--threads", "2", "generate", "--model"]).arg(root().join("models/demo")).arg("--output").arg(&out).args(extra);
    for p in PROMPTS {
        cmd.args(["--prompt", p]);
    }
    run(&mut cmd);
    let frames = Checkpoint::open_file(&out).unwrap().load_any("frames_u8").unwrap();
    let s = frames.shape().to_vec();
    let Storage::U8(data) = frames.storage() else { panic!("frames_u8 is not uint8") };
    let (b, c, t, h, w) = (s[0], s[1], s[2], s[3], s[4]);
    let mut rgb = vec![0u8; data.len()];
    for (i, &v) in data.iter().enumerate() {
        let (x, y, f, ch, v_i) = (i % w, i / w % h, i / (w * h) % t, i / (w * h * t) % c, i / (w * h * t * c));
        rgb[(((v_i * t + f) * h + y) * w + x) * 3 + ch] = v;
    }
    assert_eq!(b, PROMPTS.len());
    rgb
}

#[test]
fn c_example_generates_what_qc_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let want = qc_run_frames(dir.path(), &[]);
    for shared in [true, false] {
        let exe = dir.path().join(if shared { "generate-shared" } else { "generate-static" });
        cc("examples/c/generate.c", &exe, shared);
        let raw = dir.path().join("c.rgb");
        let out = run(Command::new(&exe).args(["-t", "2"]).arg(&raw).args(PROMPTS).env_remove("QC_MODEL_DIR"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2 8 16 16 8", "videos frames height width fps");
        assert!(std::fs::read(&raw).unwrap() == want, "the C example's frames (linked {}) differ from qc-run's", if shared { "shared" } else { "static" });
    }
}

#[test]
fn c_example_follows_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let want = qc_run_frames(dir.path(), &["--steps", "5", "--seed", "7"]);
    let exe = dir.path().join("generate");
    cc("examples/c/generate.c", &exe, true);
    let raw = dir.path().join("c.rgb");
    let model = root().join("models/demo");
    run(Command::new(&exe).args(["-t", "2", "-n", "5", "-s", "7", "-m"]).arg(&model).arg(&raw).args(PROMPTS));
    assert!(std::fs::read(&raw).unwrap() == want, "frames differ from qc-run's at --steps 5 --seed 7");
}

#[test]
fn python_example_generates_what_qc_run_writes() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("note: python3 is not on PATH: examples/python/generate.py not tested");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = qc_run_frames(dir.path(), &[]);
    let raw = dir.path().join("py.rgb");
    let out = run(Command::new("python3")
        .arg(root().join("examples/python/generate.py"))
        .arg("--lib")
        .arg(lib_dir().join("libqc.so"))
        .args(["--threads", "2", "--output"])
        .arg(&raw)
        .args(PROMPTS));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2 8 16 16 8");
    assert!(std::fs::read(&raw).unwrap() == want, "the Python example's frames differ from qc-run's");
}

#[test]
fn misuse_gets_codes_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("misuse");
    cc("tests/c/misuse.c", &exe, true);
    // A copy of the demo model whose DiT config is not JSON.
    let broken = dir.path().join("broken-model");
    for part in ["stdit3", "t5", "tokenizer"] {
        std::fs::create_dir_all(broken.join(part)).unwrap();
        for f in std::fs::read_dir(root().join("models/demo").join(part)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, broken.join(part).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(broken.join("stdit3/config.json"), "{").unwrap();
    let args = [root().join("models/demo"), broken, root().join("README.md")];
    let out = run(Command::new(&exe).args(&args).arg("2"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");

    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("note: valgrind is not on PATH: tests/c/misuse.c not run under memcheck");
        return;
    }
    // One worker per engine: under valgrind's serialised threads idle workers' spinning is slow.
    let out = run(Command::new("valgrind")
        .args(["-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"])
        .arg(format!("--suppressions={}", root().join("tests/c/valgrind.supp").display()))
        .arg(&exe)
        .args(&args)
        .arg("1"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn header_and_library_name_the_same_functions() {
    let Ok(out) = Command::new("nm").args(["-D", "--defined-only"]).arg(lib_dir().join("libqc.so")).output() else {
        println!("note: nm is not on PATH: the exported symbols are not compared with include/qc.h");
        return;
    };
    let exported: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().nth(2)).filter(|s| s.starts_with("qc_")).map(String::from).collect();
    // Every `qc_name(` in the header, declarations and the functions its comments name.
    let header = std::fs::read_to_string(root().join("include/qc.h")).unwrap();
    let mut declared = std::collections::BTreeSet::new();
    for (i, _) in header.match_indices("qc_") {
        let name: String = header[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if header[i + name.len()..].starts_with('(') {
            declared.insert(name);
        }
    }
    assert_eq!(exported, declared, "libqc.so's exported functions vs include/qc.h's");
}
