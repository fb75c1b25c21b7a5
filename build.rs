//! Build script for quantcache.
//!
//! 1. Always: bindgen on `kernels/qc_types.h` -> `$OUT_DIR/qc_types.rs` (the
//!    structs shared by the CUDA kernels and `src/backend/cuda`).
//! 2. If nvcc is found (env `NVCC`, else `$CUDA_HOME/bin/nvcc`, else
//!    `$CUDA_PATH/bin/nvcc`, else `nvcc` on `PATH`) and `QC_NO_CUDA` is not 1:
//!    compile every `kernels/*.cu` as ONE translation unit into
//!    `$OUT_DIR/qc_kernels.fatbin` (sm_80 + sm_90a SASS, compute_90 PTX), keep
//!    nvcc's/ptxas's resource report in the build output and in
//!    `$OUT_DIR/ptxas.log`, warn on register spills, and set
//!    `cfg(qc_cuda_kernels)`. Without nvcc: one warning, CPU-only build.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const NO_NVCC_WARNING: &str =
    "quantcache: nvcc not found (set NVCC or CUDA_HOME); building the CPU backend only";

/// nvcc flags besides input/output. Every kernel is built for A100 (sm_80),
/// H100/H200 with the arch-specific Hopper features (sm_90a), and carries
/// compute_90 PTX for anything newer.
const NVCC_FLAGS: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
    "-O3",
    "-std=c++17",
    "-Xptxas",
    "-v",
    "-lineinfo",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kernels_dir = manifest_dir.join("kernels");

    println!("cargo:rustc-check-cfg=cfg(qc_cuda_kernels)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "QC_NO_CUDA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let cu_files = list_kernel_sources(&kernels_dir);
    for f in &cu_files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    for entry in fs::read_dir(&kernels_dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("h" | "cuh")) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }

    generate_bindings(
        &kernels_dir.join("qc_types.h"),
        &out_dir.join("qc_types.rs"),
    );

    if env::var("QC_NO_CUDA").map(|v| v == "1").unwrap_or(false) {
        println!("cargo:warning=quantcache: QC_NO_CUDA=1; building the CPU backend only");
        return;
    }
    let nvcc = match find_nvcc() {
        Some(p) => p,
        None => {
            println!("cargo:warning={NO_NVCC_WARNING}");
            return;
        }
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());

    compile_fatbin(&nvcc, &kernels_dir, &cu_files, &out_dir);
    println!("cargo:rustc-cfg=qc_cuda_kernels");
}

/// Every `kernels/*.cu`, sorted (deterministic include order).
fn list_kernel_sources(kernels_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernels_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) == Some("cu"))
        .collect();
    v.sort();
    v
}

fn generate_bindings(header: &Path, out: &Path) {
    let bindings = bindgen::Builder::default()
        .header(header.to_str().expect("non-UTF-8 path to qc_types.h"))
        .clang_arg("-std=c11")
        // Only what qc_types.h itself declares (not <stdint.h>).
        .allowlist_file(".*qc_types\\.h")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .derive_partialeq(true)
        // The C comments are not Rust docs (indented lines would turn into doctests).
        .generate_comments(false)
        .layout_tests(true)
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "bindgen failed on {}: {e}\n(libclang is needed: apt-get install libclang-dev, \
                 or set LIBCLANG_PATH)",
                header.display()
            )
        });
    bindings
        .write_to_file(out)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// `NVCC`, else `$CUDA_HOME/bin/nvcc`, else `$CUDA_PATH/bin/nvcc`, else `nvcc` on PATH.
/// An explicit `NVCC` that is not an executable is a build error (not a silent CPU build).
fn find_nvcc() -> Option<PathBuf> {
    if let Some(v) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&v);
        if p.components().count() > 1 || p.is_absolute() {
            if is_executable(&p) {
                return Some(p);
            }
            panic!("NVCC={} is not an executable file", p.display());
        }
        // A bare name: look it up on PATH.
        return Some(
            search_path(&p).unwrap_or_else(|| panic!("NVCC={} was not found on PATH", p.display())),
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(root).join("bin").join("nvcc");
            if is_executable(&p) {
                return Some(p);
            }
        }
    }
    search_path(Path::new("nvcc"))
}

fn search_path(name: &Path) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn compile_fatbin(nvcc: &Path, kernels_dir: &Path, cu_files: &[PathBuf], out_dir: &Path) {
    // One translation unit, so that every kernel lands in one module.
    let mut all =
        String::from("// Generated by build.rs: every kernels/*.cu in one translation unit.\n");
    for f in cu_files {
        let abs = fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        writeln!(all, "#include \"{}\"", abs.display()).unwrap();
    }
    let all_cu = out_dir.join("qc_all.cu");
    fs::write(&all_cu, all).expect("write qc_all.cu");
    let fatbin = out_dir.join("qc_kernels.fatbin");
    let _ = fs::remove_file(&fatbin);

    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS)
        .arg(format!("-I{}", kernels_dir.display()))
        .arg("-fatbin")
        .arg("-o")
        .arg(&fatbin)
        .arg(&all_cu);
    let cmdline = format!("{cmd:?}");
    println!("quantcache: {cmdline}");
    let t0 = Instant::now();
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
    let secs = t0.elapsed().as_secs_f64();
    let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&output.stderr));

    // The full report goes to the build script's stdout (kept by cargo in
    // target/*/build/quantcache-*/output) and to $OUT_DIR/ptxas.log.
    for line in log.lines() {
        if line.starts_with("cargo:") {
            println!(" {line}"); // never a cargo directive
        } else {
            println!("{line}");
        }
    }
    let _ = fs::write(out_dir.join("ptxas.log"), format!("$ {cmdline}\n{log}"));

    if !output.status.success() {
        panic!(
            "nvcc failed ({}) compiling the CUDA kernels:\n{log}",
            output.status
        );
    }
    if !fatbin.is_file() {
        panic!("nvcc succeeded but wrote no {}", fatbin.display());
    }
    println!(
        "quantcache: compiled {} kernel files in {secs:.1} s",
        cu_files.len()
    );

    let report = parse_ptxas_report(&log);
    let _ = fs::write(
        out_dir.join("qc_kernel_entries.txt"),
        report.entries.join("\n") + "\n",
    );
    if !report.spills.is_empty() {
        println!(
            "cargo:warning=quantcache: register spills in CUDA kernels (see {}): {}",
            out_dir.join("ptxas.log").display(),
            report.spills.join("; ")
        );
    }
    for line in log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning"))
    {
        println!("cargo:warning=nvcc: {line}");
    }
}

struct PtxasReport {
    /// Sorted, deduplicated kernel entry points ptxas compiled.
    entries: Vec<String>,
    /// "kernel (arch): N bytes spill stores, M bytes spill loads" for each spilling kernel.
    spills: Vec<String>,
}

/// Parses `-Xptxas -v` output: "Compiling entry function 'NAME' for 'sm_XX'"
/// followed (a few lines later) by "N bytes stack frame, S bytes spill
/// stores, L bytes spill loads".
fn parse_ptxas_report(log: &str) -> PtxasReport {
    let mut entries = Vec::new();
    let mut spills = Vec::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("?");
            entries.push(name.clone());
            current = Some(format!("{name} ({arch})"));
        } else if line.contains("spill stores") {
            let stores = number_before(line, "bytes spill stores");
            let loads = number_before(line, "bytes spill loads");
            if stores != 0 || loads != 0 {
                let who = current.clone().unwrap_or_else(|| "?".into());
                spills.push(format!(
                    "{who}: {stores} bytes spill stores, {loads} bytes spill loads"
                ));
            }
        }
    }
    entries.sort();
    entries.dedup();
    PtxasReport { entries, spills }
}

/// The integer right before `marker` in `line` (0 if none).
fn number_before(line: &str, marker: &str) -> u64 {
    line.split(marker)
        .next()
        .and_then(|head| {
            head.split(|c: char| !c.is_ascii_digit())
                .rfind(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .filter(|_| line.contains(marker))
        .unwrap_or(0)
}
