//! Writing results: safetensors files with the fixtures' tensor names, and
//! atomic file replacement (temp name, then rename) so a failure never leaves
//! a half-written output.

use crate::tensor::{Storage, Tensor};
use anyhow::{Context, Result};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

fn bytes_of(t: &Tensor) -> Result<(StDtype, Vec<u8>)> {
    Ok(match t.storage() {
        Storage::F32(v) => (StDtype::F32, bytemuck::cast_slice(&v[..]).to_vec()),
        Storage::F16(v) => (StDtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Storage::BF16(v) => (StDtype::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Storage::I8(v) => (StDtype::I8, bytemuck::cast_slice(v).to_vec()),
        Storage::I32(v) => (StDtype::I32, bytemuck::cast_slice(v).to_vec()),
        Storage::I64(v) => (StDtype::I64, bytemuck::cast_slice(v).to_vec()),
        Storage::U8(v) => (StDtype::U8, v.clone()),
        Storage::I4(_) => anyhow::bail!("packed i4 tensors are not written to safetensors files"),
        Storage::Cuda(_) => return bytes_of(&t.to_cpu()?),
    })
}

/// Serializes named tensors (and string metadata) into a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let raw: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| bytes_of(t).map(|(d, b)| (n.clone(), d, t.shape().to_vec(), b)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| anyhow::anyhow!("tensor {n}: {e}")))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| anyhow::anyhow!("serializing {}: {e}", path.display()))?;
    write_atomic(path, &bytes)
}
