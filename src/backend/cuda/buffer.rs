//! Tensor storage in device memory: a byte range of some device allocation,
//! the element type, and the stream that orders every access to it. Kernels
//! read these through `qc_dptr`s ([`DeviceBuffer::address`]).
//!
//! The allocation behind a buffer is shared (`Arc`) and freed when its last
//! buffer goes: a cudarc allocation ([`DeviceBuffer::upload`]), a block of the
//! CUDA backend's arena (returned to the arena's allocator, no driver call), or
//! a plain `cuMemAlloc` (weights uploaded once). A buffer may be a sub-range
//! of its allocation ([`DeviceBuffer::slice`]: zero-copy views such as a
//! `narrow` along dim 0). Buffers are values like the host vectors: cloning a
//! tensor shares the bytes, so code that writes into a buffer in place must
//! first make it unique ([`DeviceBuffer::is_unique`]; the CUDA backend copies
//! on write).

use super::arena::Arena;
use crate::tensor::DType;
use cudarc::driver::{result, sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

/// An allocation some [`DeviceBuffer`]s point into.
pub(crate) enum DeviceMem {
    /// Allocated by cudarc (freed by it on drop).
    Slice(CudaSlice<u8>),
    /// `bytes` at `offset` of an arena, given back to it on drop.
    Arena { arena: Arc<Arena>, offset: u64, bytes: u64 },
    /// `cuMemAlloc`ed by the CUDA backend (weights), `cuMemFree`d on drop.
    Raw { ctx: Arc<CudaContext>, ptr: u64, bytes: u64 },
}

impl DeviceMem {
    fn base(&self, stream: &CudaStream) -> u64 {
        match self {
            DeviceMem::Slice(s) => {
                let (p, _sync) = s.device_ptr(stream);
                p
            }
            DeviceMem::Arena { arena, offset, .. } => arena.base() + offset,
            DeviceMem::Raw { ptr, .. } => *ptr,
        }
    }

    fn len(&self) -> usize {
        match self {
            DeviceMem::Slice(s) => s.len(),
            DeviceMem::Arena { bytes, .. } | DeviceMem::Raw { bytes, .. } => *bytes as usize,
        }
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        match self {
            DeviceMem::Slice(_) => {}
            DeviceMem::Arena { arena, offset, bytes } => arena.release(*offset, *bytes),
            DeviceMem::Raw { ctx, ptr, bytes } => {
                if *bytes > 0 && ctx.bind_to_thread().is_ok() {
                    // SAFETY: ptr came from cuMemAlloc in this context and nothing refers to it
                    // any more (this is the last owner). cuMemFree waits for pending work using it.
                    let _ = unsafe { result::free_sync(*ptr) };
                }
            }
        }
    }
}

#[derive(Clone)]
pub struct DeviceBuffer {
    pub dtype: DType,
    mem: Arc<DeviceMem>,
    /// Byte range `offset .. offset + len` of `mem`.
    offset: usize,
    len: usize,
    pub stream: Arc<CudaStream>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({}, {} bytes)", self.dtype.name(), self.len)
    }
}

impl DeviceBuffer {
    /// Copies host bytes to a new device allocation on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, dtype: DType, host: &[u8]) -> Result<Self, String> {
        let bytes = stream.clone_htod(host).map_err(|e| format!("copy of {} bytes to the GPU failed: {e}", host.len()))?;
        let len = bytes.len();
        Ok(DeviceBuffer { dtype, mem: Arc::new(DeviceMem::Slice(bytes)), offset: 0, len, stream: stream.clone() })
    }

    /// The whole of `mem` as one buffer.
    pub(crate) fn from_mem(mem: DeviceMem, dtype: DType, stream: &Arc<CudaStream>) -> Self {
        let len = mem.len();
        DeviceBuffer { dtype, mem: Arc::new(mem), offset: 0, len, stream: stream.clone() }
    }

    /// Copies the bytes back to the host (synchronizes the stream).
    pub fn download(&self) -> Result<Vec<u8>, String> {
        let mut host = vec![0u8; self.len];
        if self.len == 0 {
            return Ok(host);
        }
        self.stream.context().bind_to_thread().map_err(|e| format!("cannot bind the CUDA context: {e}"))?;
        // SAFETY: the range lies inside a live allocation (checked at construction); the copy
        // is ordered after all earlier work on the buffer's stream, and the synchronize below
        // finishes it before `host` is used or dropped.
        unsafe { result::memcpy_dtoh_async(&mut host, self.address(), self.stream.cu_stream()) }
            .map_err(|e| format!("copy of {} bytes from the GPU failed: {e}", self.len))?;
        self.stream.synchronize().map_err(|e| format!("copy of {} bytes from the GPU failed: {e}", self.len))?;
        Ok(host)
    }

    /// The device address of the first byte, for kernel argument structs.
    pub fn address(&self) -> u64 {
        self.mem.base(&self.stream) + self.offset as u64
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// A view of `len` bytes at byte `offset` of this buffer, as `dtype` (no copy:
    /// it shares the allocation, so writing through either is seen by both).
    pub fn slice(&self, offset: usize, len: usize, dtype: DType) -> Result<Self, String> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(format!("device view [{offset}, {offset}+{len}) out of a {}-byte buffer", self.len));
        }
        Ok(DeviceBuffer { dtype, mem: self.mem.clone(), offset: self.offset + offset, len, stream: self.stream.clone() })
    }

    /// True when no other buffer shares this one's allocation, so writing into it
    /// in place changes no other tensor.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.mem) == 1 && Arc::weak_count(&self.mem) == 0
    }

    /// The raw stream handle (for comparing streams).
    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }
}
