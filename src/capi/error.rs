//! Status codes, the thread-local error message, and the wrapper every entry
//! point runs in (no panic crosses the C boundary).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub const QC_OK: c_int = 0;
pub const QC_ERR_INVALID_ARGUMENT: c_int = 1;
pub const QC_ERR_NOT_FOUND: c_int = 2;
pub const QC_ERR_MODEL: c_int = 3;
pub const QC_ERR_DEVICE: c_int = 4;
pub const QC_ERR_CANCELLED: c_int = 5;
pub const QC_ERR_BUSY: c_int = 6;
pub const QC_ERR_INTERNAL: c_int = 7;

/// A failed call: its status code and message.
#[derive(Debug)]
pub struct Error {
    pub code: c_int,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(code: c_int, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(QC_ERR_INVALID_ARGUMENT, message)
    }

    /// An error of the library: `code`, unless its causes say more precisely what
    /// happened (a cancelled run, a missing file, the GPU's memory arena full).
    pub fn from_anyhow(code: c_int, e: anyhow::Error) -> Self {
        let code = if e.chain().any(|c| c.is::<Cancelled>()) {
            QC_ERR_CANCELLED
        } else if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)) {
            QC_ERR_NOT_FOUND
        } else if e.chain().any(|c| c.is::<crate::backend::cuda::ArenaOom>()) {
            QC_ERR_DEVICE
        } else {
            code
        };
        Error::new(code, format!("{e:#}"))
    }
}

/// What a progress callback's nonzero return turns into inside the pipeline.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled by the progress callback")
    }
}

impl std::error::Error for Cancelled {}

thread_local! {
    /// The message of this thread's last status-returning call ("" after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message holding a NUL byte (from a path, say) would end early: show it as U+FFFD.
    let c = CString::new(message.replace('\0', "\u{fffd}")).unwrap_or_default();
    LAST_ERROR.with(|m| *m.borrow_mut() = c);
}

/// This thread's last error message; valid until the next libqc call on this thread.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}

/// Runs a status-returning entry point `name`: its error, or a panic caught
/// here, becomes a status code and this thread's message.
pub fn status(name: &str, f: impl FnOnce() -> Result<()>) -> c_int {
    let (code, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => (QC_OK, String::new()),
        Ok(Err(e)) => (e.code, format!("{name}: {}", e.message)),
        Err(payload) => (QC_ERR_INTERNAL, format!("{name}: internal error (a bug in libqc, please report it): {}", panic_text(payload.as_ref()))),
    };
    set_last_error(&message);
    code
}

/// Runs an entry point that returns no status (a destroy, an accessor): a
/// panic is caught and `fallback` returned.
pub fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_message() -> String {
        // SAFETY: the pointer is this thread's message, read before any other call.
        unsafe { CStr::from_ptr(last_error_ptr()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        assert_eq!(status("qc_test", || panic!("boom")), QC_ERR_INTERNAL);
        assert!(last_message().contains("qc_test: internal error") && last_message().contains("boom"), "{}", last_message());
        assert_eq!(guarded(7, || -> i32 { panic!("boom") }), 7);
        assert_eq!(status("qc_test", || Ok(())), QC_OK);
        assert_eq!(last_message(), "");
    }

    #[test]
    fn causes_choose_the_code() {
        let cancelled = anyhow::Error::new(Cancelled).context("sampling");
        assert_eq!(Error::from_anyhow(QC_ERR_INTERNAL, cancelled).code, QC_ERR_CANCELLED);
        let missing = anyhow::Error::new(std::io::Error::new(std::io::ErrorKind::NotFound, "config.json")).context("reading the DiT");
        let e = Error::from_anyhow(QC_ERR_MODEL, missing);
        assert_eq!((e.code, e.message.as_str()), (QC_ERR_NOT_FOUND, "reading the DiT: config.json"));
        assert_eq!(Error::from_anyhow(QC_ERR_MODEL, anyhow::anyhow!("bad tensor")).code, QC_ERR_MODEL);
        assert_eq!(status("qc_test", || Err(Error::invalid("x\0y"))), QC_ERR_INVALID_ARGUMENT);
        assert_eq!(last_message(), "qc_test: x\u{fffd}y");
    }
}
