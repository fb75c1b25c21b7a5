//! `qc_options` (engine-wide settings, fixed at create) and `qc_params` (one
//! generation's settings), both made and set through functions so they can
//! grow without breaking the ABI.

use super::error::{guarded, status, Error, Result};
use super::{arg_mut, arg_str, out_ptr};
use crate::backend::select::DeviceChoice;
use crate::quant::preset::QuantPreset;
use std::ffi::{c_char, c_float, c_int};

/// Acceleration presets (`qc_options_set_accel`): each one sets the engine's
/// quantization and caching together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Nothing beyond the quant and cache options as set.
    None,
    /// `--accel quantcache:PRESET`: the model's QuantCache calibration (its
    /// quantized checkpoint and the preset's caching), as `qc-run` runs it.
    QuantCache(&'static str),
}

/// The acceleration preset called `name` (`qc-run generate --accel`'s names).
pub fn accel_from_name(name: &str) -> anyhow::Result<Accel> {
    Ok(crate::cache::accel::preset_name(name)?.map_or(Accel::None, Accel::QuantCache))
}

/// `qc_options`: how an engine is made.
#[derive(Clone, Debug)]
pub struct Options {
    pub device: DeviceChoice,
    /// CPU worker threads of the engine's own pool; 0 is one per core.
    pub threads: usize,
    pub quant: QuantPreset,
    /// A caching policy name as `crate::cache::policy_with` takes it; a new policy is made per generation.
    pub cache: String,
    /// Its threshold (`--cache-threshold`), checked at create; `None`: the policy's default.
    pub cache_threshold: Option<String>,
    pub accel: Accel,
}

impl Default for Options {
    fn default() -> Self {
        Options { device: DeviceChoice::Cpu, threads: 0, quant: QuantPreset::None, cache: "none".into(), cache_threshold: None, accel: Accel::None }
    }
}

/// `qc_params`: one generation's settings; `None` keeps the model's default.
#[derive(Clone, Debug, Default)]
pub struct Params {
    pub frames: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub steps: Option<usize>,
    pub cfg: Option<f32>,
    pub seed: Option<u64>,
    pub fps: Option<f32>,
    /// `Some(None)`: no aesthetic score appended.
    pub aes: Option<Option<f32>>,
    /// `[B, C, T, h, w]` initial noise, flat.
    pub init_noise: Option<Vec<f32>>,
}

fn positive(value: c_int, what: &str) -> Result<usize> {
    usize::try_from(value).ok().filter(|&v| v > 0).ok_or_else(|| Error::invalid(format!("{what} must be at least 1, got {value}")))
}

fn finite(value: c_float, what: &str) -> Result<f32> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::invalid(format!("{what} must be a finite number, got {value}")))
    }
}

/// Creates engine options with the defaults: device "cpu", one thread per core,
/// quant "none", cache "none", accel "none".
///
/// # Safety
/// `out` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn qc_options_create(out: *mut *mut Options) -> c_int {
    status("qc_options_create", || {
        // SAFETY: the caller passes NULL or a writable pointer slot.
        let out = unsafe { out_ptr(out, "out")? };
        *out = Box::into_raw(Box::default());
        Ok(())
    })
}

/// Frees options made by `qc_options_create`; NULL is a no-op.
///
/// # Safety
/// `options` is NULL or from `qc_options_create`, not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn qc_options_destroy(options: *mut Options) {
    guarded((), || {
        if !options.is_null() {
            // SAFETY: made by Box::into_raw in qc_options_create and destroyed once (the caller's promise).
            drop(unsafe { Box::from_raw(options) });
        }
    })
}

/// Sets one field of `options` from `f`.
///
/// # Safety
/// `options` is NULL or a live `qc_options`.
unsafe fn set_option(name: &str, options: *mut Options, f: impl FnOnce(&mut Options) -> Result<()>) -> c_int {
    status(name, || {
        // SAFETY: the caller passes NULL or a live qc_options.
        f(unsafe { arg_mut(options, "options")? })
    })
}

/// `device`: "cpu", "cuda" or "auto".
///
/// # Safety
/// `options` is NULL or a live `qc_options`; `device` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qc_options_set_device(options: *mut Options, device: *const c_char) -> c_int {
    // SAFETY: forwarded caller promises.
    unsafe {
        set_option("qc_options_set_device", options, |o| {
            o.device = DeviceChoice::parse(arg_str(device, "device")?).map_err(|e| Error::invalid(format!("{e:#}")))?;
            Ok(())
        })
    }
}

/// `threads`: CPU worker threads of the engine's own pool; 0 is one per core.
///
/// # Safety
/// `options` is NULL or a live `qc_options`.
#[no_mangle]
pub unsafe extern "C" fn qc_options_set_threads(options: *mut Options, threads: c_int) -> c_int {
    // SAFETY: forwarded caller promise.
    unsafe {
        set_option("qc_options_set_threads", options, |o| {
            o.threads = usize::try_from(threads).map_err(|_| Error::invalid(format!("threads must be 0 (one per core) or more, got {threads}")))?;
            Ok(())
        })
    }
}

/// `quant`: "none", "w8a8", "w4a8" or "w4a6".
///
/// # Safety
/// `options` is NULL or a live `qc_options`; `quant` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qc_options_set_quant(options: *mut Options, quant: *const c_char) -> c_int {
    // SAFETY: forwarded caller promises.
    unsafe {
        set_option("qc_options_set_quant", options, |o| {
            let preset = QuantPreset::parse(arg_str(quant, "quant")?).map_err(|e| Error::invalid(format!("{e:#}")))?;
            if preset == QuantPreset::Aigq {
                return Err(Error::invalid("quant \"aigq\" needs a calibration plan, which libqc does not take; a quantized checkpoint (qc-run calibrate --budget) runs as stored with quant \"none\""));
            }
            o.quant = preset;
            Ok(())
        })
    }
}

/// `cache`: a caching policy (`qc-run generate --cache`'s names).
///
/// # Safety
/// `options` is NULL or a live `qc_options`; `cache` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qc_options_set_cache(options: *mut Options, cache: *const c_char) -> c_int {
    // SAFETY: forwarded caller promises.
    unsafe {
        set_option("qc_options_set_cache", options, |o| {
            let name = arg_str(cache, "cache")?;
            crate::cache::policy_with(name, None, &Default::default(), Default::default()).map_err(|e| Error::invalid(format!("{e:#}")))?;
            o.cache = name.to_string();
            Ok(())
        })
    }
}

/// `threshold`: the caching policy's threshold as text (`--cache-threshold`), checked
/// against the policy at `qc_engine_create`; NULL restores the policy's default.
///
/// # Safety
/// `options` is NULL or a live `qc_options`; `threshold` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qc_options_set_cache_threshold(options: *mut Options, threshold: *const c_char) -> c_int {
    // SAFETY: forwarded caller promises.
    unsafe {
        set_option("qc_options_set_cache_threshold", options, |o| {
            o.cache_threshold = if threshold.is_null() { None } else { Some(arg_str(threshold, "threshold")?.to_string()) };
            Ok(())
        })
    }
}

/// `accel`: an acceleration preset ("none", "quantcache", "quantcache:fast", "quantcache:quality").
///
/// # Safety
/// `options` is NULL or a live `qc_options`; `accel` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qc_options_set_accel(options: *mut Options, accel: *const c_char) -> c_int {
    // SAFETY: forwarded caller promises.
    unsafe {
        set_option("qc_options_set_accel", options, |o| {
            o.accel = accel_from_name(arg_str(accel, "accel")?).map_err(|e| Error::invalid(format!("{e:#}")))?;
            Ok(())
        })
    }
}

/// Creates generation parameters, every one at the model's default.
///
/// # Safety
/// `out` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn qc_params_create(out: *mut *mut Params) -> c_int {
    status("qc_params_create", || {
        // SAFETY: the caller passes NULL or a writable pointer slot.
        let out = unsafe { out_ptr(out, "out")? };
        *out = Box::into_raw(Box::default());
        Ok(())
    })
}

/// Frees parameters made by `qc_params_create`; NULL is a no-op.
///
/// # Safety
/// `params` is NULL or from `qc_params_create`, not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn qc_params_destroy(params: *mut Params) {
    guarded((), || {
        if !params.is_null() {
            // SAFETY: made by Box::into_raw in qc_params_create and destroyed once (the caller's promise).
            drop(unsafe { Box::from_raw(params) });
        }
    })
}

/// Sets one field of `params` from `f`.
///
/// # Safety
/// `params` is NULL or a live `qc_params`.
unsafe fn set_param(name: &str, params: *mut Params, f: impl FnOnce(&mut Params) -> Result<()>) -> c_int {
    status(name, || {
        // SAFETY: the caller passes NULL or a live qc_params.
        f(unsafe { arg_mut(params, "params")? })
    })
}

/// Defines `qc_params_set_NAME(params, value)` for a positive count.
macro_rules! count_setter {
    ($fn_name:ident, $field:ident) => {
        #[doc = concat!("Sets `", stringify!($field), "` (at least 1).")]
        ///
        /// # Safety
        /// `params` is NULL or a live `qc_params`.
        #[no_mangle]
        pub unsafe extern "C" fn $fn_name(params: *mut Params, value: c_int) -> c_int {
            // SAFETY: forwarded caller promise.
            unsafe {
                set_param(stringify!($fn_name), params, |p| {
                    p.$field = Some(positive(value, stringify!($field))?);
                    Ok(())
                })
            }
        }
    };
}

count_setter!(qc_params_set_frames, frames);
count_setter!(qc_params_set_height, height);
count_setter!(qc_params_set_width, width);
count_setter!(qc_params_set_steps, steps);

/// Sets the classifier-free guidance scale (finite).
///
/// # Safety
/// `params` is NULL or a live `qc_params`.
#[no_mangle]
pub unsafe extern "C" fn qc_params_set_cfg(params: *mut Params, cfg: c_float) -> c_int {
    // SAFETY: forwarded caller promise.
    unsafe {
        set_param("qc_params_set_cfg", params, |p| {
            p.cfg = Some(finite(cfg, "cfg")?);
            Ok(())
        })
    }
}

/// Sets frames per second (finite, positive).
///
/// # Safety
/// `params` is NULL or a live `qc_params`.
#[no_mangle]
pub unsafe extern "C" fn qc_params_set_fps(params: *mut Params, fps: c_float) -> c_int {
    // SAFETY: forwarded caller promise.
    unsafe {
        set_param("qc_params_set_fps", params, |p| {
            let fps = finite(fps, "fps")?;
            if fps <= 0.0 {
                return Err(Error::invalid(format!("fps must be positive, got {fps}")));
            }
            p.fps = Some(fps);
            Ok(())
        })
    }
}

/// Sets the seed of the initial noise.
///
/// # Safety
/// `params` is NULL or a live `qc_params`.
#[no_mangle]
pub unsafe extern "C" fn qc_params_set_seed(params: *mut Params, seed: u64) -> c_int {
    // SAFETY: forwarded caller promise.
    unsafe {
        set_param("qc_params_set_seed", params, |p| {
            p.seed = Some(seed);
            Ok(())
        })
    }
}

/// Appends " aesthetic score: SCORE." to each prompt when `append` is nonzero; none when 0.
///
/// # Safety
/// `params` is NULL or a live `qc_params`.
#[no_mangle]
pub unsafe extern "C" fn qc_params_set_aes(params: *mut Params, append: c_int, score: c_float) -> c_int {
    // SAFETY: forwarded caller promise.
    unsafe {
        set_param("qc_params_set_aes", params, |p| {
            p.aes = Some(if append != 0 { Some(finite(score, "aesthetic score")?) } else { None });
            Ok(())
        })
    }
}

/// Copies `count` floats of initial noise (`[B, C, T, h, w]`, checked at
/// generation); NULL with count 0 goes back to seeded noise.
///
/// # Safety
/// `params` is NULL or a live `qc_params`; `noise` is NULL or points to `count` readable floats.
#[no_mangle]
pub unsafe extern "C" fn qc_params_set_init_noise(params: *mut Params, noise: *const c_float, count: usize) -> c_int {
    // SAFETY: forwarded caller promise.
    unsafe {
        set_param("qc_params_set_init_noise", params, |p| {
            p.init_noise = match (noise.is_null(), count) {
                (true, 0) => None,
                (true, _) => return Err(Error::invalid(format!("noise is NULL but count is {count}"))),
                (false, 0) => return Err(Error::invalid("count is 0: pass NULL and 0 to use seeded noise")),
                (false, _) => {
                    if count > isize::MAX as usize / std::mem::size_of::<f32>() {
                        return Err(Error::invalid(format!("count {count} is larger than any array")));
                    }
                    // SAFETY: the caller promises `count` readable floats at `noise` (non-NULL, checked above).
                    Some(std::slice::from_raw_parts(noise, count).to_vec())
                }
            };
            Ok(())
        })
    }
}
