//! Tensor storage in device memory: raw bytes plus the element type, and the
//! copies between host and device. Kernels read these through `qc_dptr`s.

use crate::tensor::DType;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

#[derive(Clone)]
pub struct DeviceBuffer {
    pub dtype: DType,
    pub bytes: Arc<CudaSlice<u8>>,
    pub stream: Arc<CudaStream>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({}, {} bytes)", self.dtype.name(), self.bytes.len())
    }
}

impl DeviceBuffer {
    /// Copies host bytes to a new device allocation on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, dtype: DType, host: &[u8]) -> Result<Self, String> {
        let bytes = stream.clone_htod(host).map_err(|e| format!("copy of {} bytes to the GPU failed: {e}", host.len()))?;
        Ok(DeviceBuffer { dtype, bytes: Arc::new(bytes), stream: stream.clone() })
    }

    /// Copies the bytes back to the host (synchronizes the stream).
    pub fn download(&self) -> Result<Vec<u8>, String> {
        self.stream.clone_dtoh(self.bytes.as_ref()).map_err(|e| format!("copy of {} bytes from the GPU failed: {e}", self.bytes.len()))
    }

    /// The device address, for kernel argument structs.
    pub fn address(&self) -> u64 {
        let (ptr, _sync) = self.bytes.device_ptr(&self.stream);
        ptr
    }
}
