//! cuBLASLt, the library baseline of `qc-bench gpu`, through cudarc's
//! dynamically loaded bindings: bf16 x bf16 -> bf16 (f32 accumulate) and
//! int8 x int8 -> int32 products in the engine's layout, optionally batched
//! with constant strides (the straightforward attention).
//!
//! Layout: row-major x `[m, k]` times w, where w is `[n, k]` (`w_nk`, the
//! engine's weights: x * w^T) or `[k, n]`, giving row-major d `[m, n]`. In
//! cuBLASLt's column-major terms that is d^T (n x m) = op(w) * x^T, with
//! op = T for `[n, k]` ("TN", the layout cuBLASLt's int8 kernels require) and
//! N for `[k, n]`.
//!
//! cudarc panics when the library is missing; [`Lt::open`] checks for it first
//! and turns any panic into an error, so the caller can print "not found".

use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// cublasOperation_t values (cublas_api.h; cudarc's cublasLt bindings only take them as integers).
const OP_N: i32 = 0;
const OP_T: i32 = 1;
/// Workspace offered to cuBLASLt's heuristic (what PyTorch gives it on Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// The element types of one product.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LtKind {
    /// bf16 inputs and output, f32 compute and scaling.
    Bf16,
    /// int8 inputs, int32 output, int32 compute and scaling.
    Int8,
}

/// A loaded cuBLASLt with one handle (on the calling thread's current CUDA context).
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    /// cublasLtGetVersion(), e.g. 130000 + ...
    pub version: usize,
}

fn err(what: &str) -> impl Fn(CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e}")
}

impl Lt {
    /// Loads the library and creates a handle; `Err` says why not (absent from the
    /// loader path, or a failure or panic inside it). The CUDA context must be current.
    pub fn open() -> Result<Self, String> {
        let r = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: only tries dlopen on cudarc's candidate names.
            if !unsafe { sys::is_culib_present() } {
                return Err("no libcublasLt on the loader path (LD_LIBRARY_PATH); PyTorch's wheels ship it under site-packages/nvidia/cu13/lib".to_string());
            }
            // SAFETY: the library is present; cublasLtGetVersion takes no arguments.
            let version = unsafe { sys::cublasLtGetVersion() };
            let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e}"))?;
            Ok(Lt { handle, version })
        }));
        match r {
            Ok(r) => r,
            Err(p) => Err(format!(
                "loading it panicked: {}",
                p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
            )),
        }
    }

    /// A product plan (descriptors and the heuristic's first algorithm) for
    /// `batch` products of x `[m, k]` and w (`[n, k]` if `w_nk`, else `[k, n]`)
    /// into d `[m, n]`, all dense row-major, batch `i` at element offsets
    /// `i * strides.0` (x), `.1` (w), `.2` (d); d = alpha * x w.
    #[allow(clippy::too_many_arguments)]
    pub fn plan(&self, kind: LtKind, m: usize, n: usize, k: usize, w_nk: bool, batch: usize, strides: (usize, usize, usize), alpha: f32) -> Result<Plan> {
        if kind == LtKind::Int8 && !w_nk {
            bail!("cuBLASLt's int8 products need w as [n, k] (the TN layout)");
        }
        let (in_t, out_t, compute, scale_t) = match kind {
            LtKind::Bf16 => (sys::cudaDataType::CUDA_R_16BF, sys::cudaDataType::CUDA_R_16BF, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F),
            LtKind::Int8 => (sys::cudaDataType::CUDA_R_8I, sys::cudaDataType::CUDA_R_32I, sys::cublasComputeType_t::CUBLAS_COMPUTE_32I, sys::cudaDataType::CUDA_R_32I),
        };
        let mut p = Plan { desc: std::ptr::null_mut(), layouts: [std::ptr::null_mut(); 3], pref: std::ptr::null_mut(), algo: None, kind, alpha };
        p.desc = lt::create_matmul_desc(compute, scale_t).map_err(err("matmul descriptor"))?;
        let op_a = if w_nk { OP_T } else { OP_N };
        // SAFETY: the descriptor was just created; the value is a 4-byte cublasOperation_t.
        unsafe {
            lt::set_matmul_desc_attribute(p.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op_a as *const i32 as *const c_void, 4).map_err(err("TRANSA"))?;
            lt::set_matmul_desc_attribute(p.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N as *const i32 as *const c_void, 4).map_err(err("TRANSB"))?;
        }
        // Column-major: A = w (k x n, ld k, if w_nk; else n x k, ld n), B = x^T (k x m, ld k),
        // D = d^T (n x m, ld n).
        let a = if w_nk { (k, n, k) } else { (n, k, n) };
        let dims = [(in_t, a, strides.1), (in_t, (k, m, k), strides.0), (out_t, (n, m, n), strides.2)];
        for (slot, (ty, (rows, cols, ld), stride)) in p.layouts.iter_mut().zip(dims) {
            *slot = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map_err(err("matrix layout"))?;
            if batch > 1 {
                let count = i32::try_from(batch).map_err(|_| anyhow!("cuBLASLt batch of {batch} exceeds i32"))?;
                let stride = stride as i64;
                // SAFETY: the layout was just created; the values are an int32 and an int64.
                unsafe {
                    lt::set_matrix_layout_attribute(*slot, sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count as *const i32 as *const c_void, 4).map_err(err("batch count"))?;
                    lt::set_matrix_layout_attribute(*slot, sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride as *const i64 as *const c_void, 8).map_err(err("batch stride"))?;
                }
            }
        }
        p.pref = lt::create_matmul_pref().map_err(err("preference"))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: every object was created above and is alive.
        let heur = unsafe {
            lt::set_matmul_pref_attribute(p.pref, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8).map_err(err("workspace preference"))?;
            lt::get_matmul_algo_heuristic(self.handle, p.desc, p.layouts[0], p.layouts[1], p.layouts[2], p.layouts[2], p.pref)
        }
        .map_err(|e| anyhow!("cuBLASLt has no algorithm for {kind:?} {m}x{k}->{n} (batch {batch}): {e}"))?;
        p.algo = Some(heur.algo);
        Ok(p)
    }

    /// Queues `plan` on `stream`: d = alpha * x w (device addresses; `workspace` holds
    /// [`WORKSPACE_BYTES`]).
    ///
    /// # Safety
    /// x, w and d must hold the batches `plan` describes; `stream` belongs to the current context.
    pub unsafe fn run(&self, plan: &Plan, x: u64, w: u64, d: u64, workspace: u64, stream: cudarc::driver::sys::CUstream) -> Result<()> {
        let (alpha_f, beta_f) = (plan.alpha, 0.0f32);
        let (alpha_i, beta_i) = (plan.alpha as i32, 0i32);
        let (alpha, beta) = match plan.kind {
            LtKind::Bf16 => (&alpha_f as *const f32 as *const c_void, &beta_f as *const f32 as *const c_void),
            LtKind::Int8 => (&alpha_i as *const i32 as *const c_void, &beta_i as *const i32 as *const c_void),
        };
        let algo = plan.algo.as_ref().map_or(std::ptr::null(), |a| a as *const _);
        let [la, lb, ld] = plan.layouts;
        lt::matmul(
            self.handle,
            plan.desc,
            alpha,
            beta,
            w as *const c_void,
            la,
            x as *const c_void,
            lb,
            d as *const c_void,
            ld,
            d as *mut c_void,
            ld,
            algo,
            workspace as *mut c_void,
            WORKSPACE_BYTES,
            stream as sys::cudaStream_t,
        )
        .map_err(err("matmul"))
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in open, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Descriptors of one product shape ([`Lt::plan`]).
pub struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// A (w), B (x^T), C = D (d^T).
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    pref: sys::cublasLtMatmulPreference_t,
    algo: Option<sys::cublasLtMatmulAlgo_t>,
    kind: LtKind,
    alpha: f32,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each object was created by plan (or is null) and is destroyed once.
        unsafe {
            if !self.pref.is_null() {
                let _ = lt::destroy_matmul_pref(self.pref);
            }
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wherever it runs (with or without the library or a GPU), opening cuBLASLt
    /// answers Ok or a message; it never panics.
    #[test]
    fn open_never_panics() {
        match Lt::open() {
            Ok(lt) => assert!(lt.version > 0),
            Err(why) => assert!(!why.is_empty()),
        }
    }
}
