//! The debug input files of `qc-run forward` / `qc-run sample`: safetensors with
//! the fixtures' tensor names, validated with errors that name the tensor.

use crate::checkpoint::Checkpoint;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Inputs of one DiT forward (`stdit3-tiny-forward*.safetensors`).
pub struct ForwardInputs {
    pub x: Tensor,
    pub timestep: Vec<f32>,
    pub y: Tensor,
    pub mask: Option<Vec<i64>>,
    pub fps: Vec<f32>,
    pub height: Vec<f32>,
    pub width: Vec<f32>,
    pub x_mask: Option<Vec<bool>>,
}

/// Inputs of a sampling run (`rflow-tiny-*.safetensors`) and the file's metadata.
pub struct SampleInputs {
    pub z0: Tensor,
    pub y: Tensor,
    pub mask: Option<Vec<i64>>,
    pub height: Vec<f32>,
    pub width: Vec<f32>,
    pub num_frames: Vec<f32>,
    pub fps: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

struct Reader {
    ck: Checkpoint,
    path: String,
}

impl Reader {
    fn open(path: &Path) -> Result<Self> {
        let ck = Checkpoint::open_file(path).with_context(|| format!("reading inputs {}", path.display()))?;
        Ok(Reader { ck, path: path.display().to_string() })
    }

    fn tensor(&self, name: &str, rank: usize) -> Result<Tensor> {
        if !self.ck.contains(name) {
            bail!("{}: missing input tensor `{name}`", self.path);
        }
        let t = self.ck.load_any(name).with_context(|| format!("{}: reading `{name}`", self.path))?;
        if t.shape().len() != rank {
            bail!("{}: `{name}` must have {rank} dimensions, got shape {:?}", self.path, t.shape());
        }
        if let Some(i) = t.find_non_finite() {
            bail!("{}: `{name}` contains NaN or infinity (flat index {i})", self.path);
        }
        Ok(t)
    }

    fn f32_tensor(&self, name: &str, rank: usize) -> Result<Tensor> {
        self.tensor(name, rank)?.to_f32()
    }

    /// A per-sample vector of `batch` entries (or 1, broadcast).
    fn per_sample(&self, name: &str, batch: usize) -> Result<Vec<f32>> {
        let v = self.f32_tensor(name, 1)?.into_f32()?;
        ensure!(v.len() == batch || v.len() == 1, "{}: `{name}` has {} entries, expected {batch} (one per sample)", self.path, v.len());
        Ok(if v.len() == 1 { vec![v[0]; batch] } else { v })
    }

    fn optional_mask(&self, batch: usize, len: usize) -> Result<Option<Vec<i64>>> {
        if !self.ck.contains("mask") {
            return Ok(None);
        }
        let m = self.tensor("mask", 2)?;
        ensure!(m.shape()[1] == len && batch.is_multiple_of(m.shape()[0]), "{}: `mask` has shape {:?}, expected [{batch}, {len}]", self.path, m.shape());
        let v = m.to_i64()?;
        ensure!(v.iter().all(|&x| x == 0 || x == 1), "{}: `mask` must hold 0 or 1", self.path);
        Ok(Some(v))
    }

    fn captions(&self, batch: usize) -> Result<Tensor> {
        let y = self.f32_tensor("y", 4)?;
        ensure!(y.shape()[0] == batch && y.shape()[1] == 1, "{}: `y` has shape {:?}, expected [{batch}, 1, L, C]", self.path, y.shape());
        Ok(y)
    }
}

impl ForwardInputs {
    pub fn read(path: &Path) -> Result<Self> {
        let r = Reader::open(path)?;
        let x = r.f32_tensor("x", 5)?;
        let b = x.shape()[0];
        let y = r.captions(b)?;
        let mask = r.optional_mask(b, y.shape()[2])?;
        let x_mask = if r.ck.contains("x_mask") {
            let m = r.tensor("x_mask", 2)?;
            ensure!(m.shape() == [b, x.shape()[2]], "{}: `x_mask` has shape {:?}, expected [{b}, {}]", r.path, m.shape(), x.shape()[2]);
            Some(m.to_i64()?.into_iter().map(|v| v != 0).collect())
        } else {
            None
        };
        Ok(ForwardInputs {
            timestep: r.per_sample("timestep", b)?,
            fps: r.per_sample("fps", b)?,
            height: r.per_sample("height", b)?,
            width: r.per_sample("width", b)?,
            x,
            y,
            mask,
            x_mask,
        })
    }
}

impl SampleInputs {
    /// The per-sample video geometry the sampler conditions on.
    pub fn geometry(&self) -> crate::sampler::rflow::VideoGeometry {
        crate::sampler::rflow::VideoGeometry { height: self.height.clone(), width: self.width.clone(), num_frames: self.num_frames.clone(), fps: self.fps.clone() }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let r = Reader::open(path)?;
        let z0 = r.f32_tensor("z0", 5)?;
        let b = z0.shape()[0];
        let y = r.captions(b)?;
        let mask = r.optional_mask(b, y.shape()[2])?;
        Ok(SampleInputs {
            height: r.per_sample("height", b)?,
            width: r.per_sample("width", b)?,
            num_frames: r.per_sample("num_frames", b)?,
            fps: r.per_sample("fps", b)?,
            metadata: r.ck.metadata(),
            z0,
            y,
            mask,
        })
    }
}
