//! Hugging Face style model directories: `config.json` plus `model.safetensors`
//! or a sharded `model.safetensors.index.json`, memory-mapped; tensors are
//! looked up by their official names and every problem is collected so that a
//! bad checkpoint is reported in one error naming each tensor.

use crate::tensor::{numel, F32Buf, Storage, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

/// The safetensors files of one model, mapped, with an index of all tensors.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: BTreeMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.is_file() {
            vec!["model.safetensors".into()]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        };
        let mut ck = Checkpoint { dir: dir.to_path_buf(), files: Vec::new(), entries: BTreeMap::new() };
        for name in shard_names {
            ck.add_file(&dir.join(name))?;
        }
        Ok(ck)
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut ck = Checkpoint { dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(), files: Vec::new(), entries: BTreeMap::new() };
        ck.add_file(path)?;
        Ok(ck)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is opened read-only; a concurrent truncation by another
        // process is the usual mmap caveat and not something a model loader guards.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
        let base = 8 + header_len;
        let fi = self.files.len();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            if base + e > mmap.len() {
                bail!("{}: tensor {name} extends past the end of the file (truncated?)", path.display());
            }
            if self.entries.contains_key(&name) {
                bail!("{}: tensor {name} appears in more than one shard", path.display());
            }
            self.entries.insert(name, Entry { file: fi, dtype: info.dtype, shape: info.shape.clone(), start: base + s, end: base + e });
        }
        self.files.push((path.to_path_buf(), Arc::new(mmap)));
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn file_of(&self, e: &Entry) -> &Path {
        &self.files[e.file].0
    }

    /// Loads a tensor as f32 from f32, f16 or bf16 storage. Aligned f32 data is
    /// not copied: the tensor reads the mapped file in place.
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| anyhow!("{}: missing tensor {name}", self.dir.display()))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let n = numel(&e.shape);
        let width = match e.dtype {
            StDtype::F32 => 4,
            StDtype::F16 | StDtype::BF16 => 2,
            other => bail!("{}: tensor {name} has dtype {other:?}; expected F32, F16 or BF16", self.file_of(e).display()),
        };
        if bytes.len() != n * width {
            bail!("{}: tensor {name} holds {} bytes, shape {:?} needs {}", self.file_of(e).display(), bytes.len(), e.shape, n * width);
        }
        if e.dtype == StDtype::F32 {
            if let Some(buf) = F32Buf::mapped(self.files[e.file].1.clone(), e.start, n) {
                return Tensor::new(&e.shape, Storage::F32(buf));
            }
        }
        let v: Vec<f32> = match e.dtype {
            StDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StDtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            _ => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        Tensor::from_f32(&e.shape, v)
    }

    /// Loads an f16 or bf16 tensor without widening it.
    pub fn load_half(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| anyhow!("{}: missing tensor {name}", self.dir.display()))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        if bytes.len() != numel(&e.shape) * 2 {
            bail!("{}: tensor {name} holds {} bytes, shape {:?} needs {}", self.file_of(e).display(), bytes.len(), e.shape, numel(&e.shape) * 2);
        }
        let storage = match e.dtype {
            StDtype::F16 => Storage::F16(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect()),
            StDtype::BF16 => Storage::BF16(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect()),
            other => bail!("{}: tensor {name} has dtype {other:?}, not F16 or BF16", self.file_of(e).display()),
        };
        Tensor::new(&e.shape, storage)
    }

    /// Loads any tensor in its own dtype (inputs files: masks are int64).
    pub fn load_any(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| anyhow!("{}: missing tensor {name}", self.file_list()))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let n = numel(&e.shape);
        let check = |w: usize| -> Result<()> {
            if bytes.len() != n * w {
                bail!("{}: tensor {name} holds {} bytes, shape {:?} needs {}", self.file_of(e).display(), bytes.len(), e.shape, n * w);
            }
            Ok(())
        };
        let storage = match e.dtype {
            StDtype::F32 | StDtype::F16 | StDtype::BF16 => return self.load_f32(name),
            StDtype::I64 => {
                check(8)?;
                Storage::I64(bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect())
            }
            StDtype::I32 => {
                check(4)?;
                Storage::I32(bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect())
            }
            StDtype::I8 => {
                check(1)?;
                Storage::I8(bytes.iter().map(|&b| b as i8).collect())
            }
            StDtype::U8 | StDtype::BOOL => {
                check(1)?;
                Storage::U8(bytes.to_vec())
            }
            other => bail!("{}: tensor {name} has unsupported dtype {other:?}", self.file_of(e).display()),
        };
        Tensor::new(&e.shape, storage)
    }

    /// Loads a tensor in the dtype it is stored in (f16 and bf16 stay half).
    pub fn load_native(&self, name: &str) -> Result<Tensor> {
        match self.entries.get(name).map(|e| e.dtype) {
            Some(StDtype::F16 | StDtype::BF16) => self.load_half(name),
            _ => self.load_any(name),
        }
    }

    fn file_list(&self) -> String {
        self.files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Safetensors metadata of the first file (`__metadata__`).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.files
            .first()
            .and_then(|(_, m)| safetensors::SafeTensors::read_metadata(m).ok())
            .and_then(|(_, meta)| meta.metadata().clone())
            .unwrap_or_default()
    }
}

/// Collects every problem while a model's weights are loaded, so the user sees
/// all missing or mis-shaped tensors at once.
pub struct WeightLoader<'a> {
    ck: &'a Checkpoint,
    problems: Vec<String>,
}

impl<'a> WeightLoader<'a> {
    pub fn new(ck: &'a Checkpoint) -> Self {
        WeightLoader { ck, problems: Vec::new() }
    }

    /// The tensor `name` as f32, which must have `shape`; on a problem, records
    /// it and returns zeros so loading can go on and report everything.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Tensor {
        match self.ck.entries.get(name) {
            None => self.problems.push(format!("missing tensor {name} (expected shape {shape:?})")),
            Some(e) if e.shape != shape => self.problems.push(format!("tensor {name} has shape {:?}, expected {shape:?}", e.shape)),
            Some(_) => match self.ck.load_f32(name) {
                Ok(t) => return t,
                Err(err) => self.problems.push(format!("{err}")),
            },
        }
        Tensor::zeros(shape)
    }

    /// Like [`WeightLoader::get`], but f16 and bf16 tensors keep their dtype
    /// (linear weights, widened one layer at a time when used).
    pub fn get_native(&mut self, name: &str, shape: &[usize]) -> Tensor {
        match self.ck.entries.get(name) {
            Some(e) if e.shape == shape && matches!(e.dtype, StDtype::F16 | StDtype::BF16) => match self.ck.load_half(name) {
                Ok(t) => t,
                Err(err) => {
                    self.problems.push(format!("{err}"));
                    Tensor::zeros(shape)
                }
            },
            _ => self.get(name, shape),
        }
    }

    /// Records a problem found by the caller (reported with the others by `finish`).
    pub fn problem(&mut self, message: String) {
        self.problems.push(message);
    }

    /// The checkpoint being read.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ck
    }

    /// Fails with one error listing every problem found.
    pub fn finish(self) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        bail!("checkpoint {} cannot be used ({} problems):\n  - {}", self.ck.dir.display(), self.problems.len(), self.problems.join("\n  - "))
    }
}
