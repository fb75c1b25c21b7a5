//! Shared by the integration tests: where the golden fixtures are.
#![allow(dead_code)]

use std::path::PathBuf;

/// `QC_FIXTURES`, else `../shared/fixtures` beside the repository.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("QC_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    let p = fixtures().join(name);
    assert!(p.exists(), "fixture {} not found (set QC_FIXTURES to the fixtures directory)", p.display());
    p
}
