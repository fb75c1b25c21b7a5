//! CPU implementations of the convolution-family ops.

use super::CpuBackend;
use crate::backend::conv::ConvOps;

impl ConvOps for CpuBackend {}
