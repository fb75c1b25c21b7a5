//! `qc_engine` (a model loaded once on a backend, with its own worker pool),
//! `qc_generate` and `qc_result`.

use super::error::{guarded, status, Cancelled, Error, Result, QC_ERR_BUSY, QC_ERR_DEVICE, QC_ERR_INTERNAL, QC_ERR_INVALID_ARGUMENT, QC_ERR_MODEL, QC_ERR_NOT_FOUND};
use super::options::{Accel, Options, Params};
use super::{arg_ref, arg_str, out_ptr};
use crate::backend::cuda::DEFAULT_ARENA_BYTES;
use crate::backend::select::DeviceBackend;
use crate::output::{quantize_frames, rgb_frames};
use crate::pipeline::{Event, GenerateOptions, LoadedModels, ModelConfigs, ModelDefaults, ModelPaths};
use crate::tensor::Tensor;
use crate::cache::CacheCalibration;
use crate::quant::preset::QuantPreset;
use std::ffi::{c_char, c_float, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, TryLockError};

/// The most values (batch x 3 x frames x height x width) one generation may
/// produce: far above any real video (Open-Sora's 720p, 204 frames: 0.56 G),
/// low enough that a wrong size is an error rather than an allocation that
/// aborts the process.
const MAX_VIDEO_VALUES: usize = 1 << 32;

/// `qc_engine`: a model loaded once, generating on one thread at a time.
pub struct Engine {
    configs: Arc<ModelConfigs>,
    /// The model's generation defaults with the engine-wide settings (quantization).
    defaults: GenerateOptions,
    /// The caching policy of every generation: name, threshold, the model's cache calibration.
    cache: (String, Option<String>, CacheCalibration),
    pool: rayon::ThreadPool,
    /// The backend in words (`qc_engine_device`).
    device: CString,
    /// Held for the whole of a generation: the busy flag.
    state: Mutex<State>,
}

struct State {
    backend: DeviceBackend,
    models: LoadedModels,
}

// The handle is shared between threads by C callers; the compiler checks that this is sound.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Engine>();
};

/// `qc_result`: the videos of one generation as uint8 RGB, `[video][frame][height][width][rgb]`.
pub struct Generated {
    pub count: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub fps: f32,
    pub data: Vec<u8>,
}

/// A C progress callback and its user pointer.
#[derive(Clone, Copy)]
struct Progress {
    callback: Option<unsafe extern "C" fn(*mut c_void, c_int, c_int) -> c_int>,
    user: *mut c_void,
}

// SAFETY: the header documents that the callback runs on one of the engine's worker
// threads, so the caller makes `user` usable there; libqc only passes it back.
unsafe impl Send for Progress {}

impl Progress {
    /// Calls the callback after step `step` of `steps`; its nonzero return cancels.
    fn step(&self, step: usize, steps: usize) -> anyhow::Result<()> {
        let Some(cb) = self.callback else { return Ok(()) };
        let clamp = |v: usize| c_int::try_from(v).unwrap_or(c_int::MAX);
        // SAFETY: a callback the caller gave for this call, with its own user pointer.
        if unsafe { cb(self.user, clamp(step), clamp(steps)) } != 0 {
            return Err(Cancelled.into());
        }
        Ok(())
    }
}

impl Engine {
    /// Loads the model in `model_dir` (the bundled demonstration model when `None`) as `options` say.
    pub fn create(model_dir: Option<&Path>, options: &Options) -> Result<Engine> {
        let dir = model_dir.map_or_else(|| PathBuf::from(crate::BUNDLED_MODEL), Path::to_path_buf);
        if !dir.exists() {
            return Err(Error::new(QC_ERR_NOT_FOUND, format!("model directory {} does not exist", dir.display())));
        }
        if !dir.is_dir() {
            return Err(Error::new(QC_ERR_NOT_FOUND, format!("model directory {} is a file, not a directory", dir.display())));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("qc-worker-{i}"))
            .build()
            .map_err(|e| Error::new(QC_ERR_INTERNAL, format!("starting {} worker threads: {e}", options.threads)))?;
        // Everything runs on the engine's pool: the process-wide one stays untouched.
        let (configs, defaults, device, state, cache) = pool.install(|| {
            let model = |e: anyhow::Error| Error::from_anyhow(QC_ERR_MODEL, e);
            let mut defaults = ModelDefaults::from_dir(&dir).map_err(model)?.options();
            defaults.quant = options.quant;
            let cache = match options.accel {
                Accel::None => (options.cache.clone(), options.cache_threshold.clone(), CacheCalibration::for_model(&dir).map_err(model)?),
                Accel::QuantCache(preset) => {
                    if options.quant != QuantPreset::None || options.cache != "none" || options.cache_threshold.is_some() {
                        return Err(Error::invalid("accel \"quantcache\" sets the quantization and the caching itself: leave quant, cache and cache threshold at their defaults"));
                    }
                    let accel = crate::cache::accel::Accel::for_model(&dir, preset).map_err(model)?;
                    accel.apply(&mut defaults);
                    (accel.preset.cache.clone(), Some(accel.preset.threshold.clone()), accel.calibration.clone())
                }
            };
            // A threshold that does not fit the policy is refused now, not at the first generation.
            crate::cache::policy_with(&cache.0, cache.1.as_deref(), &cache.2, Default::default()).map_err(|e| Error::invalid(format!("{e:#}")))?;
            let configs = Arc::new(ModelConfigs::check(&ModelPaths::in_dir(&dir), &defaults).map_err(model)?);
            let mut notice = String::new();
            // The GPU arena is sized for one video of the model's default size.
            let arena = || configs.plan(&[String::new()], &defaults).map_or(DEFAULT_ARENA_BYTES, |p| p.cuda_arena_bytes());
            let backend = DeviceBackend::new(options.device, |n| notice = n, arena).map_err(|e| Error::from_anyhow(QC_ERR_DEVICE, e))?;
            let models = LoadedModels::load(&configs, backend.get(), &defaults).map_err(model)?;
            let name = backend.get().name();
            let device = if notice.is_empty() { name } else { format!("{name}; {notice}") };
            let device = CString::new(device.replace('\0', " ")).unwrap_or_default();
            Ok((configs, defaults, device, State { backend, models }, cache))
        })?;
        Ok(Engine { configs, defaults, cache, pool, device, state: Mutex::new(state) })
    }

    /// The generation options of `params` for `prompts` videos, sizes checked.
    fn options(&self, params: &Params, prompts: usize) -> Result<GenerateOptions> {
        let d = &self.defaults;
        let mut opts = GenerateOptions {
            frames: params.frames.unwrap_or(d.frames),
            height: params.height.unwrap_or(d.height),
            width: params.width.unwrap_or(d.width),
            steps: params.steps.unwrap_or(d.steps),
            cfg: params.cfg.unwrap_or(d.cfg),
            fps: params.fps.unwrap_or(d.fps),
            seed: params.seed.unwrap_or(d.seed),
            aes: params.aes.unwrap_or(d.aes),
            ..d.clone()
        };
        let values = [prompts, 3, opts.frames, opts.height, opts.width].iter().try_fold(1usize, |a, &v| a.checked_mul(v)).filter(|&v| v <= MAX_VIDEO_VALUES);
        if values.is_none() {
            return Err(Error::invalid(format!("{prompts} videos of {} frames at {}x{} are more than libqc can hold ({MAX_VIDEO_VALUES} values)", opts.frames, opts.height, opts.width)));
        }
        if let Some(noise) = &params.init_noise {
            let shape = self.noise_shape(&opts, prompts)?;
            let want: usize = shape.iter().product();
            if noise.len() != want {
                return Err(Error::invalid(format!("initial noise has {} floats; {prompts} videos of {} frames at {}x{} need {shape:?} = {want}", noise.len(), opts.frames, opts.height, opts.width)));
            }
            opts.init_noise = Some(Tensor::from_f32(&shape, noise.clone()).map_err(|e| Error::from_anyhow(QC_ERR_INVALID_ARGUMENT, e))?);
        }
        Ok(opts)
    }

    /// The initial noise's shape `[B, C, T, h, w]` for `prompts` videos of `opts`.
    fn noise_shape(&self, opts: &GenerateOptions, prompts: usize) -> Result<[usize; 5]> {
        let latent = self.configs.latent_size(opts).map_err(|e| Error::from_anyhow(QC_ERR_INVALID_ARGUMENT, e))?;
        Ok(self.configs.noise_shape(prompts, latent))
    }

    /// Generates one video per prompt; `progress` is called after each denoising step.
    fn generate(&self, prompts: &[String], params: &Params, progress: Progress) -> Result<Generated> {
        let mut state = match self.state.try_lock() {
            Ok(s) => s,
            Err(TryLockError::WouldBlock) => return Err(Error::new(QC_ERR_BUSY, "the engine is generating on another thread: one engine runs one call at a time")),
            // A panic during an earlier call was caught there; the models are read-only while generating.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if prompts.is_empty() {
            return Err(Error::invalid("no prompt given (prompt_count is 0)"));
        }
        let opts = self.options(params, prompts.len())?;
        let plan = self.configs.plan(prompts, &opts).map_err(|e| Error::from_anyhow(QC_ERR_INVALID_ARGUMENT, e))?;
        let state = &mut *state;
        let (cache, threshold, calibration) = &self.cache;
        let on_gpu = state.backend.is_cuda();
        let policy = || crate::cache::policy_with(cache, threshold.as_deref(), calibration, Default::default());
        if let Some(available) = crate::pipeline::available_memory_bytes().filter(|_| !on_gpu) {
            let caches = plan.cache_bytes(policy().map_err(|e| Error::from_anyhow(QC_ERR_INTERNAL, e))?.as_ref(), 4);
            plan.check_host_memory(caches, cache, available).map_err(|e| Error::from_anyhow(QC_ERR_DEVICE, e))?;
        }
        let fps = opts.fps;
        let video = self.pool.install(move || -> anyhow::Result<Tensor> {
            let mut policy = policy()?;
            let (video, _) = plan.run_with(state.backend.get(), Some(&state.models), &opts, policy.as_mut(), &mut |e| match e {
                Event::Step(i, n) => progress.step(i, n),
                Event::Stage(_) => Ok(()),
            })?;
            Ok(video)
        });
        let video = video.map_err(|e| Error::from_anyhow(if on_gpu { QC_ERR_DEVICE } else { QC_ERR_INTERNAL }, e))?;
        let internal = |e: anyhow::Error| Error::from_anyhow(QC_ERR_INTERNAL, e);
        let frames = quantize_frames(&video).map_err(internal)?;
        let s = frames.shape().to_vec();
        let mut data = Vec::with_capacity(frames.numel());
        for b in 0..s[0] {
            for rgb in rgb_frames(&frames, b).map_err(internal)? {
                data.extend_from_slice(&rgb);
            }
        }
        Ok(Generated { count: s[0], frames: s[2], height: s[3], width: s[4], fps, data })
    }
}

/// Loads the model in `model_dir` (NULL: the bundled demonstration model) as `options` say (NULL: defaults).
///
/// # Safety
/// `model_dir` is NULL or a NUL-terminated path; `options` is NULL or a live `qc_options`;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qc_engine_create(model_dir: *const c_char, options: *const Options, out: *mut *mut Engine) -> c_int {
    status("qc_engine_create", || {
        // SAFETY: the caller's promises, checked for NULL by the helpers.
        let (out, dir, options) = unsafe {
            let out = out_ptr(out, "out")?;
            let dir = if model_dir.is_null() { None } else { Some(PathBuf::from(arg_str(model_dir, "model_dir")?)) };
            let options = if options.is_null() { Options::default() } else { arg_ref(options, "options")?.clone() };
            (out, dir, options)
        };
        *out = Box::into_raw(Box::new(Engine::create(dir.as_deref(), &options)?));
        Ok(())
    })
}

/// Frees an engine and its models; NULL is a no-op.
///
/// # Safety
/// `engine` is NULL or from `qc_engine_create`, not yet destroyed, and no other call on it is running.
#[no_mangle]
pub unsafe extern "C" fn qc_engine_destroy(engine: *mut Engine) {
    guarded((), || {
        if !engine.is_null() {
            // SAFETY: made by Box::into_raw in qc_engine_create, destroyed once, unused elsewhere (the caller's promise).
            drop(unsafe { Box::from_raw(engine) });
        }
    })
}

/// The backend the engine runs on, in words; NULL for a NULL engine.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[no_mangle]
pub unsafe extern "C" fn qc_engine_device(engine: *const Engine) -> *const c_char {
    // SAFETY: NULL or live (the caller's promise); the string lives as long as the engine.
    guarded(std::ptr::null(), || unsafe { engine.as_ref() }.map_or(std::ptr::null(), |e| e.device.as_ptr()))
}

/// The initial noise's shape `[B, C, T, h, w]` for `prompt_count` videos with `params` (NULL: defaults).
///
/// # Safety
/// `engine` is NULL or a live engine; `params` is NULL or a live `qc_params`; `shape` is NULL or
/// points to 5 writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn qc_engine_noise_shape(engine: *const Engine, params: *const Params, prompt_count: usize, shape: *mut usize) -> c_int {
    status("qc_engine_noise_shape", || {
        // SAFETY: the caller's promises, checked for NULL.
        let (engine, params) = unsafe { (arg_ref(engine, "engine")?, if params.is_null() { Params::default() } else { arg_ref(params, "params")?.clone() }) };
        if shape.is_null() {
            return Err(Error::invalid("shape is NULL"));
        }
        if prompt_count == 0 {
            return Err(Error::invalid("prompt_count is 0"));
        }
        // Noise is not checked here: only its shape is asked for.
        let got = engine.noise_shape(&engine.options(&Params { init_noise: None, ..params }, prompt_count)?, prompt_count)?;
        // SAFETY: non-NULL and 5 writable size_t (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(shape, 5) }.copy_from_slice(&got);
        Ok(())
    })
}

/// Generates one video per prompt.
///
/// # Safety
/// `engine` is NULL or a live engine; `prompts` is NULL or points to `prompt_count` pointers,
/// each NULL or a NUL-terminated string; `params` is NULL or a live `qc_params`; `progress`
/// is NULL or a function callable from another thread with `user`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qc_generate(
    engine: *mut Engine,
    prompts: *const *const c_char,
    prompt_count: usize,
    params: *const Params,
    progress: Option<unsafe extern "C" fn(*mut c_void, c_int, c_int) -> c_int>,
    user: *mut c_void,
    out: *mut *mut Generated,
) -> c_int {
    status("qc_generate", || {
        // SAFETY: the caller's promises, checked for NULL and sizes by the helpers.
        let (out, engine, texts, params) = unsafe {
            let out = out_ptr(out, "out")?;
            let engine = arg_ref(engine, "engine")?;
            if prompts.is_null() {
                return Err(Error::invalid("prompts is NULL"));
            }
            if prompt_count == 0 {
                return Err(Error::invalid("prompt_count is 0"));
            }
            if prompt_count > isize::MAX as usize / std::mem::size_of::<*const c_char>() {
                return Err(Error::invalid(format!("prompt_count {prompt_count} is larger than any array")));
            }
            let texts = std::slice::from_raw_parts(prompts, prompt_count)
                .iter()
                .enumerate()
                .map(|(i, &p)| arg_str(p, &format!("prompts[{i}]")).map(String::from))
                .collect::<Result<Vec<String>>>()?;
            let params = if params.is_null() { Params::default() } else { arg_ref(params, "params")?.clone() };
            (out, engine, texts, params)
        };
        let result = engine.generate(&texts, &params, Progress { callback: progress, user })?;
        *out = Box::into_raw(Box::new(result));
        Ok(())
    })
}

/// Defines a `qc_result` accessor returning `$default` for NULL.
macro_rules! result_getter {
    ($(#[$doc:meta])* $fn_name:ident -> $ty:ty, $default:expr, |$r:ident| $value:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// `result` is NULL or a live `qc_result`.
        #[no_mangle]
        pub unsafe extern "C" fn $fn_name(result: *const Generated) -> $ty {
            // SAFETY: NULL or live (the caller's promise).
            guarded($default, || unsafe { result.as_ref() }.map_or($default, |$r| $value))
        }
    };
}

result_getter!(
    /// Videos in the result (one per prompt); 0 for NULL.
    qc_result_count -> usize, 0, |r| r.count);
result_getter!(
    /// Frames per video; 0 for NULL.
    qc_result_frames -> usize, 0, |r| r.frames);
result_getter!(
    /// Frame height in pixels; 0 for NULL.
    qc_result_height -> usize, 0, |r| r.height);
result_getter!(
    /// Frame width in pixels; 0 for NULL.
    qc_result_width -> usize, 0, |r| r.width);
result_getter!(
    /// Channels per pixel: 3 (RGB); 0 for NULL.
    qc_result_channels -> usize, 0, |_r| 3);
result_getter!(
    /// Frames per second of the videos; 0 for NULL.
    qc_result_fps -> c_float, 0.0, |r| r.fps);
result_getter!(
    /// Bytes of pixel data (count x frames x height x width x 3); 0 for NULL.
    qc_result_size -> usize, 0, |r| r.data.len());
result_getter!(
    /// The pixels, `[video][frame][height][width][rgb]` uint8; NULL for NULL.
    qc_result_data -> *const u8, std::ptr::null(), |r| r.data.as_ptr());

/// Frees a result; NULL is a no-op.
///
/// # Safety
/// `result` is NULL or from `qc_generate`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qc_result_free(result: *mut Generated) {
    guarded((), || {
        if !result.is_null() {
            // SAFETY: made by Box::into_raw in qc_generate and freed once (the caller's promise).
            drop(unsafe { Box::from_raw(result) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::probe;
    use crate::capi::options::accel_from_name;
    use crate::capi::QC_ERR_CANCELLED;
    use crate::backend::select::DeviceChoice;
    use crate::tensor::rel_l2;

    fn engine(device: DeviceChoice) -> Result<Engine> {
        Engine::create(None, &Options { device, threads: 2, ..Options::default() })
    }

    fn no_progress() -> Progress {
        Progress { callback: None, user: std::ptr::null_mut() }
    }

    #[test]
    fn without_a_gpu_cuda_is_a_device_error_and_auto_runs_on_the_cpu() {
        let Err(why) = probe() else {
            println!("note: a GPU is usable here: the no-GPU answers are not tested");
            return;
        };
        let e = engine(DeviceChoice::Cuda).err().expect("device cuda without a GPU must fail");
        assert_eq!(e.code, QC_ERR_DEVICE, "{}", e.message);
        assert!(e.message.contains("no usable CUDA GPU") && e.message.contains(&why), "{}", e.message);
        let auto = engine(DeviceChoice::Auto).unwrap_or_else(|e| panic!("{}", e.message));
        let device = auto.device.to_string_lossy();
        assert!(device.starts_with("cpu") && device.contains("no usable CUDA GPU"), "{device}");
    }

    /// Held models give the frames `plan().run()` (qc-run's path, each model loaded for its stage) gives.
    #[test]
    fn engine_matches_a_run_that_loads_per_stage() {
        use crate::pipeline::plan;
        let e = engine(DeviceChoice::Cpu).unwrap_or_else(|e| panic!("{}", e.message));
        let prompts = ["a red circle moving right".to_string()];
        let params = Params { steps: Some(4), seed: Some(3), ..Params::default() };
        let got = e.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message));
        let opts = e.options(&params, 1).unwrap_or_else(|e| panic!("{}", e.message));
        let paths = ModelPaths::in_dir(Path::new(crate::BUNDLED_MODEL));
        let (video, _) = e.pool.install(|| plan(&paths, &prompts, &opts).unwrap().run(&crate::backend::cpu::CpuBackend::new(), &opts, &mut crate::model::stdit3::NoHooks, &mut |_| {})).unwrap();
        let frames = quantize_frames(&video).unwrap();
        let want: Vec<u8> = rgb_frames(&frames, 0).unwrap().concat();
        assert!(got.data == want, "the engine's frames differ from plan().run()'s");

        // Cancelled at step 2: stopped there, and the engine still generates.
        let mut calls = 0;
        unsafe extern "C" fn cancel_at_2(user: *mut c_void, step: c_int, _steps: c_int) -> c_int {
            // SAFETY: `user` is the test's `calls` counter, alive for the call.
            unsafe { *(user as *mut i32) += 1 };
            (step >= 2) as c_int
        }
        let cancel = Progress { callback: Some(cancel_at_2), user: (&mut calls as *mut i32).cast() };
        assert_eq!(e.generate(&prompts, &params, cancel).err().map(|e| e.code), Some(QC_ERR_CANCELLED));
        assert_eq!(calls, 2);
        assert!(e.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message)).data == want);
    }

    /// accel quantcache runs the bundled model's QuantCache calibration as qc-run's
    /// `--accel quantcache` does (the same quantized checkpoint and policy, so the
    /// same frames as `plan().run()` with them); it refuses quant or cache set beside
    /// it, and a cache threshold that does not fit the policy is refused at create.
    #[test]
    fn accel_quantcache_runs_the_models_calibration() {
        use crate::pipeline::plan;
        let options = Options { threads: 2, accel: accel_from_name("quantcache").unwrap(), ..Options::default() };
        let e = Engine::create(None, &options).unwrap_or_else(|e| panic!("{}", e.message));
        let prompts = ["a blue square moving up".to_string()];
        let params = Params { seed: Some(5), ..Params::default() };
        let got = e.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message));
        let accel = crate::cache::accel::Accel::for_model(Path::new(crate::BUNDLED_MODEL), "fast").unwrap();
        let mut opts = e.options(&params, 1).unwrap_or_else(|e| panic!("{}", e.message));
        accel.apply(&mut opts);
        let paths = ModelPaths::in_dir(Path::new(crate::BUNDLED_MODEL));
        let (video, _) = e.pool.install(|| plan(&paths, &prompts, &opts).unwrap().run(&crate::backend::cpu::CpuBackend::new(), &opts, accel.policy().unwrap().as_mut(), &mut |_| {})).unwrap();
        let want: Vec<u8> = rgb_frames(&quantize_frames(&video).unwrap(), 0).unwrap().concat();
        assert!(got.data == want, "accel quantcache through libqc differs from the pipeline run with its calibration");
        let both = Options { quant: QuantPreset::W8A8, ..options.clone() };
        let err = Engine::create(None, &both).err().expect("quant beside accel must be refused");
        assert!(err.code == QC_ERR_INVALID_ARGUMENT && err.message.contains("leave quant, cache"), "{}", err.message);
        let bad = Options { threads: 2, cache: "hlc".into(), cache_threshold: Some("99".into()), ..Options::default() };
        let err = Engine::create(None, &bad).err().expect("a threshold out of range must be refused");
        assert!(err.code == QC_ERR_INVALID_ARGUMENT && err.message.contains("[0.001, 10]"), "{}", err.message);
        assert!(accel_from_name("turbo").is_err());
    }

    /// The demo model on the GPU through the engine: close to the CPU engine's
    /// frames (bf16 activations: the pipeline tolerance of the executor tests),
    /// the same bytes when generated again on the same engine (models, arena and
    /// CUDA graphs reused), and a generation too large for the arena refused
    /// with QC_ERR_DEVICE or done, never a crash.
    #[test]
    #[ignore = "needs a CUDA GPU: run tools/gpu-check"]
    fn cuda_engine_generates_what_the_cpu_engine_does() {
        let gpu = engine(DeviceChoice::Cuda).unwrap_or_else(|e| panic!("{}", e.message));
        let cpu = engine(DeviceChoice::Cpu).unwrap_or_else(|e| panic!("{}", e.message));
        assert!(gpu.device.to_string_lossy().starts_with("cuda"), "{:?}", gpu.device);
        let prompts = ["a red ball moving left".to_string(), "a green triangle moving down".to_string()];
        let params = Params { steps: Some(10), seed: Some(7), ..Params::default() };
        let g = gpu.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message));
        let c = cpu.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!((g.count, g.frames, g.height, g.width), (c.count, c.frames, c.height, c.width));
        let to_f32 = |d: &[u8]| d.iter().map(|&v| v as f32 / 127.5 - 1.0).collect::<Vec<f32>>();
        let err = rel_l2(&to_f32(&g.data), &to_f32(&c.data));
        eprintln!("libqc demo, 10 steps, 2 prompts: GPU vs CPU frames rel err {err:.2e}");
        assert!(err < 5e-2, "GPU vs CPU frames: relative L2 error {err:.3e}");
        let again = gpu.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message));
        assert!(again.data == g.data, "a second generation on the same GPU engine differs");

        let large = Params { height: Some(512), width: Some(512), steps: Some(2), ..params.clone() };
        match gpu.generate(&prompts, &large, no_progress()) {
            Ok(v) => eprintln!("512x512 fit the arena ({} bytes of frames)", v.data.len()),
            Err(e) => assert_eq!(e.code, QC_ERR_DEVICE, "{}", e.message),
        }
        let after = gpu.generate(&prompts, &params, no_progress()).unwrap_or_else(|e| panic!("{}", e.message));
        assert!(after.data == g.data, "the GPU engine differs after a refused generation");
    }
}
