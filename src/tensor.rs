//! A small tensor: a shape, an element type and storage.
//!
//! The storage is an enum so that device memory (CUDA) and packed quantized
//! formats slot in beside the CPU vectors without changing the callers.

use anyhow::{bail, Result};
use crate::backend::cuda::DeviceBuffer;
use half::{bf16, f16};
use memmap2::Mmap;
use std::sync::Arc;

/// Element types the engine knows. `I4` is two signed 4-bit values per byte
/// (low nibble first); its shape counts elements, not bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
    I4,
    I32,
    I64,
    U8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I4 => "i4",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

/// f32 data, owned, or read in place from a memory-mapped checkpoint (so a
/// float32 checkpoint's weights exist once in memory: the file's pages).
#[derive(Clone)]
pub enum F32Buf {
    Owned(Vec<f32>),
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
}

impl F32Buf {
    /// `len` floats at byte `offset` of `map`, or `None` if they are not 4-byte aligned.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>());
        (aligned && offset + 4 * len <= map.len()).then_some(F32Buf::Mapped { map, offset, len })
    }

    /// Owned data, copying mapped data first (copy on write).
    fn make_mut(&mut self) -> &mut Vec<f32> {
        if let F32Buf::Mapped { .. } = self {
            *self = F32Buf::Owned(self.to_vec());
        }
        match self {
            F32Buf::Owned(v) => v,
            F32Buf::Mapped { .. } => unreachable!("just made owned"),
        }
    }

    fn into_vec(self) -> Vec<f32> {
        match self {
            F32Buf::Owned(v) => v,
            F32Buf::Mapped { .. } => self.to_vec(),
        }
    }
}

impl std::ops::Deref for F32Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Buf::Owned(v) => v,
            F32Buf::Mapped { map, offset, len } => bytemuck::cast_slice(&map[*offset..*offset + 4 * *len]),
        }
    }
}

impl std::fmt::Debug for F32Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            F32Buf::Owned(v) => write!(f, "F32Buf::Owned({} floats)", v.len()),
            F32Buf::Mapped { len, .. } => write!(f, "F32Buf::Mapped({len} floats)"),
        }
    }
}

/// Where a tensor's bytes live: typed host vectors, or device memory.
#[derive(Clone, Debug)]
pub enum Storage {
    F32(F32Buf),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    /// Packed 4-bit pairs: `(len + 1) / 2` bytes.
    I4(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    /// Device memory of a CUDA GPU, any dtype.
    Cuda(DeviceBuffer),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

/// Bytes that `n` elements of `dtype` occupy.
pub fn byte_len(dtype: DType, n: usize) -> usize {
    match dtype {
        DType::F32 | DType::I32 => 4 * n,
        DType::F16 | DType::BF16 => 2 * n,
        DType::I8 | DType::U8 => n,
        DType::I4 => n.div_ceil(2),
        DType::I64 => 8 * n,
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn new(shape: &[usize], storage: Storage) -> Result<Self> {
        let n = numel(shape);
        let len = match &storage {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::I8(v) => v.len(),
            Storage::I4(v) => {
                if v.len() != n.div_ceil(2) {
                    bail!("packed i4 tensor of shape {shape:?} needs {} bytes, got {}", n.div_ceil(2), v.len());
                }
                n
            }
            Storage::I32(v) => v.len(),
            Storage::I64(v) => v.len(),
            Storage::U8(v) => v.len(),
            Storage::Cuda(d) => {
                let want = byte_len(d.dtype, n);
                if d.len_bytes() != want {
                    bail!("device tensor of shape {shape:?} ({}) needs {want} bytes, got {}", d.dtype.name(), d.len_bytes());
                }
                n
            }
        };
        if len != n {
            bail!("tensor of shape {shape:?} needs {n} elements, got {len}");
        }
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        Self::new(shape, Storage::F32(F32Buf::Owned(data)))
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), storage: Storage::F32(F32Buf::Owned(vec![0.0; numel(shape)])) }
    }

    /// True when the data is read in place from a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::F32(F32Buf::Mapped { .. }))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::I8(_) => DType::I8,
            Storage::I4(_) => DType::I4,
            Storage::I32(_) => DType::I32,
            Storage::I64(_) => DType::I64,
            Storage::U8(_) => DType::U8,
            Storage::Cuda(d) => d.dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self.storage {
            Storage::Cuda(_) => Device::Cuda,
            _ => Device::Cpu,
        }
    }

    /// Raw little-endian bytes of host storage.
    fn host_bytes(&self) -> Result<Vec<u8>> {
        Ok(match &self.storage {
            Storage::F32(v) => bytemuck::cast_slice(&v[..]).to_vec(),
            Storage::F16(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::BF16(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::I8(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::I4(v) | Storage::U8(v) => v.clone(),
            Storage::I32(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::I64(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::Cuda(_) => bail!("tensor is already on the GPU"),
        })
    }

    /// A copy in device memory on `stream`.
    pub fn to_cuda(&self, stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Tensor> {
        let buf = DeviceBuffer::upload(stream, self.dtype(), &self.host_bytes()?).map_err(anyhow::Error::msg)?;
        Tensor::new(&self.shape, Storage::Cuda(buf))
    }

    /// A host copy of a device tensor (a clone for host tensors).
    pub fn to_cpu(&self) -> Result<Tensor> {
        let Storage::Cuda(d) = &self.storage else { return Ok(self.clone()) };
        let b = d.download().map_err(anyhow::Error::msg)?;
        let storage = match d.dtype {
            DType::F32 => Storage::F32(F32Buf::Owned(bytemuck::pod_collect_to_vec(&b))),
            DType::F16 => Storage::F16(bytemuck::pod_collect_to_vec(&b)),
            DType::BF16 => Storage::BF16(bytemuck::pod_collect_to_vec(&b)),
            DType::I8 => Storage::I8(bytemuck::pod_collect_to_vec(&b)),
            DType::I4 => Storage::I4(b),
            DType::I32 => Storage::I32(bytemuck::pod_collect_to_vec(&b)),
            DType::I64 => Storage::I64(bytemuck::pod_collect_to_vec(&b)),
            DType::U8 => Storage::U8(b),
        };
        Tensor::new(&self.shape, storage)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Replaces the data by `storage` holding as many elements (the CUDA backend's
    /// in-place ops move a host tensor to the device, or copy a shared buffer, this way).
    pub fn set_storage(&mut self, storage: Storage) -> Result<()> {
        *self = Tensor::new(&self.shape, storage)?;
        Ok(())
    }

    /// Size of dimension `i`, counting from the end when negative.
    pub fn dim(&self, i: isize) -> usize {
        let idx = if i < 0 { self.shape.len() as isize + i } else { i };
        self.shape[idx as usize]
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            bail!("cannot reshape {:?} to {shape:?}", self.shape);
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    pub fn f32(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(&v[..]),
            Storage::Cuda(_) => bail!("tensor is on the GPU; copy it to the CPU first"),
            _ => bail!("expected an f32 tensor, got {}", self.dtype().name()),
        }
    }

    pub fn f32_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::F32(v) => Ok(v.make_mut()),
            Storage::Cuda(_) => bail!("tensor is on the GPU; copy it to the CPU first"),
            _ => bail!("expected an f32 tensor"),
        }
    }

    pub fn into_f32(self) -> Result<Vec<f32>> {
        match self.storage {
            Storage::F32(v) => Ok(v.into_vec()),
            _ => bail!("expected an f32 tensor, got {}", self.dtype().name()),
        }
    }

    /// Converts any floating or integer tensor to f32 (a copy unless already f32).
    pub fn to_f32(&self) -> Result<Tensor> {
        let v: Vec<f32> = match &self.storage {
            Storage::F32(v) => v.to_vec(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::I8(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::I32(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::I64(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::U8(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::I4(_) => bail!("packed i4 tensors are dequantized by their GEMM, not converted"),
            Storage::Cuda(_) => return self.to_cpu()?.to_f32(),
        };
        Tensor::from_f32(&self.shape, v)
    }

    /// Integer view of an integer or integral-valued float tensor (masks, lengths).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        Ok(match &self.storage {
            Storage::I64(v) => v.clone(),
            Storage::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Storage::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Storage::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Storage::F32(v) => v.iter().map(|&x| x as i64).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32() as i64).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32() as i64).collect(),
            Storage::I4(_) => bail!("packed i4 tensors have no integer view"),
            Storage::Cuda(_) => return self.to_cpu()?.to_i64(),
        })
    }

    /// The first non-finite value's flat index, if any.
    pub fn find_non_finite(&self) -> Option<usize> {
        match &self.storage {
            Storage::F32(v) => v.iter().position(|x| !x.is_finite()),
            Storage::F16(v) => v.iter().position(|x| !x.is_finite()),
            Storage::BF16(v) => v.iter().position(|x| !x.is_finite()),
            _ => None,
        }
    }
}

/// `||a - b|| / ||b||`, the error measure of the fixtures.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_l2 on slices of different lengths");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Host -> device -> host keeps every byte, for each dtype (skipped without a GPU).
    #[test]
    #[ignore = "needs a CUDA GPU: run tools/gpu-check"]
    fn cuda_round_trip() {
        let ctx = crate::backend::cuda::open_device(0).expect("a CUDA device (this test is for tools/gpu-check)");
        let stream = ctx.default_stream();
        let mut rng = Rng::new(9);
        let v = rng.normal_vec(1001);
        let cases = [
            Tensor::from_f32(&[7, 143], v.clone()).unwrap(),
            Tensor::new(&[1001], Storage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())).unwrap(),
            Tensor::new(&[1001], Storage::I8(v.iter().map(|&x| (x * 40.0) as i8).collect())).unwrap(),
            Tensor::new(&[1001], Storage::I4(vec![0x5a; 501])).unwrap(),
        ];
        for t in cases {
            let d = t.to_cuda(&stream).unwrap();
            assert_eq!(d.device(), Device::Cuda);
            assert_eq!(d.dtype(), t.dtype());
            let back = d.to_cpu().unwrap();
            assert_eq!(back.host_bytes().unwrap(), t.host_bytes().unwrap());
        }
    }

    #[test]
    fn shapes_and_lengths_are_checked() {
        assert!(Tensor::from_f32(&[2, 3], vec![0.0; 5]).is_err());
        assert!(Tensor::new(&[3], Storage::I4(vec![0; 1])).is_err());
        assert!(Tensor::new(&[3], Storage::I4(vec![0; 2])).is_ok());
        assert!(Tensor::zeros(&[2, 3]).reshape(&[3, 2]).is_ok());
        assert!(Tensor::zeros(&[2, 3]).reshape(&[4, 2]).is_err());
        let mut t = Tensor::zeros(&[4]);
        t.f32_mut().unwrap()[2] = f32::NAN;
        assert_eq!(t.find_non_finite(), Some(2));
    }
}
