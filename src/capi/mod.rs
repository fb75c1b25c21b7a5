//! libqc, the C ABI (`include/qc.h`, which documents every function): engines
//! that load a model once and generate videos many times.
//!
//! Every entry point runs inside `catch_unwind` (a panic becomes
//! `QC_ERR_INTERNAL`), checks its pointers and sizes, and reports failures as a
//! status code plus a thread-local message. Handles are opaque boxes. An
//! engine is used by one thread at a time: its state sits behind a try-lock
//! (the busy flag), so a second concurrent call gets `QC_ERR_BUSY` instead of a
//! data race; several engines may live in one process.

mod engine;
mod error;
mod options;

pub use engine::{Engine, Generated};
pub use error::{Cancelled, QC_ERR_BUSY, QC_ERR_CANCELLED, QC_ERR_DEVICE, QC_ERR_INTERNAL, QC_ERR_INVALID_ARGUMENT, QC_ERR_MODEL, QC_ERR_NOT_FOUND, QC_OK};
pub use options::{accel_from_name, Accel, Options, Params};

use error::{guarded, Error, Result};
use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::OnceLock;

/// The ABI version of `include/qc.h` (`QC_ABI_VERSION`); bumped on any incompatible change.
pub const ABI_VERSION: c_int = 1;

/// `out` as a writable slot, set to NULL so that a failed call leaves no stale handle.
///
/// # Safety
/// `out` is NULL or valid for writing a pointer.
unsafe fn out_ptr<'a, T>(out: *mut *mut T, what: &str) -> Result<&'a mut *mut T> {
    if out.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and writable (the caller's promise).
    let out = unsafe { &mut *out };
    *out = std::ptr::null_mut();
    Ok(out)
}

/// A handle argument, checked for NULL.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else uses during the call.
unsafe fn arg_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: the caller's promise.
    unsafe { p.as_mut() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// A read-only handle argument, checked for NULL.
///
/// # Safety
/// `p` is NULL or points to a live `T`.
unsafe fn arg_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: the caller's promise.
    unsafe { p.as_ref() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// A string argument: non-NULL, UTF-8.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's promise).
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// The `QC_ABI_VERSION` this library was built with.
#[no_mangle]
pub extern "C" fn qc_abi_version() -> c_int {
    ABI_VERSION
}

/// Version and build features (CUDA kernels compiled in or not, CPU features);
/// a static string.
#[no_mangle]
pub extern "C" fn qc_version() -> *const c_char {
    static VERSION: OnceLock<CString> = OnceLock::new();
    guarded(c"quantcache (version unavailable)".as_ptr(), || {
        VERSION
            .get_or_init(|| {
                // build_info counts the current pool's threads: ask a default-sized pool of our
                // own rather than start the process-wide one, which the host may want to configure.
                let info = rayon::ThreadPoolBuilder::new().build().map_or_else(|e| format!("quantcache {} ({e})", env!("CARGO_PKG_VERSION")), |pool| pool.install(crate::build_info));
                CString::new(info.replace('\0', " ")).unwrap_or_default()
            })
            .as_ptr()
    })
}

/// The message of this thread's last status-returning call ("" after a
/// success); valid until the next libqc call on this thread.
#[no_mangle]
pub extern "C" fn qc_last_error_message() -> *const c_char {
    error::last_error_ptr()
}
