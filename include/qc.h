/*
 * qc.h: libqc, the C API of quantcache (text-to-video with Open-Sora 1.2
 * models: T5 text encoder, STDiT3 diffusion transformer, rectified-flow
 * sampling, video VAE).
 *
 * Link with -lqc (libqc.so, or libqc.a plus the system libraries listed in
 * the README). An engine loads a model once and generates many times:
 *
 *     qc_engine *engine;
 *     if (qc_engine_create(NULL, NULL, &engine) != QC_OK) {
 *         fprintf(stderr, "%s\n", qc_last_error_message());
 *         return 1;
 *     }
 *     const char *prompt = "a red circle moving right";
 *     qc_result *video;
 *     if (qc_generate(engine, &prompt, 1, NULL, NULL, NULL, &video) == QC_OK) {
 *         const uint8_t *rgb = qc_result_data(video);  // [video][frame][height][width][rgb]
 *         ...
 *         qc_result_free(video);
 *     }
 *     qc_engine_destroy(engine);
 *
 * Conventions
 * - Functions returning int return QC_OK (0) or one of the QC_ERR_* codes
 *   below, and set this thread's error message (qc_last_error_message; ""
 *   after a success). On failure every out-pointer is set to NULL (when the
 *   out-pointer itself is not NULL).
 * - NULL handles, NULL strings, zero or negative sizes are rejected with
 *   QC_ERR_INVALID_ARGUMENT, never a crash. Destroy/free functions accept NULL.
 * - Strings are UTF-8 and NUL-terminated; libqc copies what it keeps.
 * - Threads: an engine generates for one thread at a time. qc_generate on an
 *   engine while another thread's qc_generate on it runs returns QC_ERR_BUSY
 *   (it does not wait); qc_engine_device and qc_engine_noise_shape may be
 *   called at any time. Distinct engines may be used on distinct threads at
 *   once. qc_engine_destroy must not run while another call on that engine
 *   does. Options, params and results are plain objects: use each from one
 *   thread at a time.
 * - Each engine computes on its own pool of worker threads
 *   (qc_options_set_threads); the calling thread waits in qc_generate.
 */
#ifndef QC_H
#define QC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this header's ABI; qc_abi_version() gives the library's. */
#define QC_ABI_VERSION 1

/* Status codes. */
#define QC_OK 0
/* A NULL pointer, a zero or negative size, an unknown name, a value out of range,
 * initial noise of the wrong size, a video the model cannot produce. */
#define QC_ERR_INVALID_ARGUMENT 1
/* A file or directory does not exist (or a file is where a directory is expected). */
#define QC_ERR_NOT_FOUND 2
/* The model directory's configs or weights are corrupt or do not fit together. */
#define QC_ERR_MODEL 3
/* No usable GPU for device "cuda", a GPU error, or GPU memory exhausted. */
#define QC_ERR_DEVICE 4
/* The progress callback returned nonzero: no result. */
#define QC_ERR_CANCELLED 5
/* The engine is in use by another thread. */
#define QC_ERR_BUSY 6
/* A bug in libqc (an internal panic was caught): please report the message. */
#define QC_ERR_INTERNAL 7

typedef struct qc_engine qc_engine;   /* a loaded model (opaque) */
typedef struct qc_options qc_options; /* how an engine is made (opaque) */
typedef struct qc_params qc_params;   /* one generation's settings (opaque) */
typedef struct qc_result qc_result;   /* the videos of one generation (opaque) */

/* Called after each denoising step with step = 1..steps. Return 0 to go on,
 * nonzero to cancel: qc_generate then stops promptly (no further step, no
 * decoding) and returns QC_ERR_CANCELLED. It runs on one of the engine's
 * worker threads while the caller of qc_generate waits; it must not call
 * functions on the same engine, and must not throw or longjmp. */
typedef int (*qc_progress_fn)(void *user, int step, int steps);

/* ---- library ---------------------------------------------------------- */

/* QC_ABI_VERSION of the library linked (compare with the header's). */
int qc_abi_version(void);

/* Version and build features (CUDA kernels compiled in or not, CPU features),
 * several lines; a static string, never NULL. */
const char *qc_version(void);

/* The message of this thread's last int-returning call: "" after a success.
 * Valid until the next libqc call on this thread; never NULL. */
const char *qc_last_error_message(void);

/* ---- engine options --------------------------------------------------- */

/* Creates options with the defaults: device "cpu", threads 0 (one per core),
 * quant "none", cache "none", accel "none". Free with qc_options_destroy. */
int qc_options_create(qc_options **out);

/* Frees options (an engine made from them keeps its own copy). NULL: no-op. */
void qc_options_destroy(qc_options *options);

/* "cpu" (the reference backend), "cuda" (GPU 0, bf16 activations; without a
 * usable GPU qc_engine_create fails with QC_ERR_DEVICE) or "auto" (the GPU when
 * one is usable, else the CPU; qc_engine_device says which). With "cuda" the
 * GPU memory for activations is one arena sized at create for one video of
 * the model's default size (environment QC_CUDA_ARENA_MB overrides it); a
 * larger generation fails with QC_ERR_DEVICE. */
int qc_options_set_device(qc_options *options, const char *device);

/* Worker threads of the engine's own CPU pool; 0 = one per core. */
int qc_options_set_threads(qc_options *options, int threads);

/* Precision of the DiT blocks' linear layers, quantized at create:
 * "none", "w8a8", "w4a8" or "w4a6". A quantized checkpoint directory
 * (qc-run calibrate --budget) runs as stored with "none". */
int qc_options_set_quant(qc_options *options, const char *quant);

/* Caching policy used by every generation (a fresh policy each time), as
 * qc-run generate --cache names them: "none", "hlc", "hlc-separate-cfg",
 * "srap", "hlc+srap", "teacache", "pab", "adacache" or "static:K" (K >= 1). */
int qc_options_set_cache(qc_options *options, const char *cache);

/* The caching policy's threshold as text, as qc-run generate --cache-threshold
 * takes it (e.g. "0.3", or "0.3,0.1" for hlc+srap); checked against the policy
 * by qc_engine_create (QC_ERR_INVALID_ARGUMENT). NULL: the policy's default. */
int qc_options_set_cache_threshold(qc_options *options, const char *threshold);

/* Acceleration preset (sets quantization, caching and the attention's bf16
 * operands together): "none",
 * "quantcache" (= "quantcache:fast") or "quantcache:quality": the model's
 * QuantCache calibration (its quantized checkpoint and jointly calibrated cache
 * thresholds, from qc-run calibrate --accel; model_dir/quantcache/ of a float
 * model; the bundled model ships one). Leave quant and cache at "none" with it
 * (else qc_engine_create fails with QC_ERR_INVALID_ARGUMENT); a model without a
 * calibration fails with QC_ERR_MODEL. */
int qc_options_set_accel(qc_options *options, const char *accel);

/* ---- engine ----------------------------------------------------------- */

/* Loads the model in model_dir (a directory with stdit3/, t5/, tokenizer/,
 * optionally vae/ and defaults.json) once: tokenizer, T5, DiT and VAE.
 * model_dir NULL: the bundled demonstration model (models/demo of the source
 * tree libqc was built from; $QC_MODEL_DIR is not read). options NULL:
 * defaults. Errors: QC_ERR_NOT_FOUND (model_dir or a part missing, or a file),
 * QC_ERR_MODEL, QC_ERR_DEVICE, QC_ERR_INVALID_ARGUMENT (out NULL). */
int qc_engine_create(const char *model_dir, const qc_options *options, qc_engine **out);

/* Frees the engine and its models. NULL: no-op. */
void qc_engine_destroy(qc_engine *engine);

/* The backend the engine computes on, in words (e.g. "cpu (4 threads)", or
 * with device "auto" and no GPU the reason); valid while the engine lives.
 * NULL for a NULL engine. */
const char *qc_engine_device(const qc_engine *engine);

/* The shape [B, C, T, h, w] initial noise must have for prompt_count videos
 * with params (NULL: the model's defaults), written to shape[0..4]: the
 * count to pass to qc_params_set_init_noise is their product. */
int qc_engine_noise_shape(const qc_engine *engine, const qc_params *params, size_t prompt_count, size_t shape[5]);

/* ---- generation parameters ---------------------------------------------- */

/* Creates parameters, each at the model's default (its defaults.json, else
 * Open-Sora 1.2's: 51 frames of 240x426, 30 steps, cfg 7.0, fps 24, seed 42,
 * aesthetic score 6.5 appended). Free with qc_params_destroy. */
int qc_params_create(qc_params **out);

/* Frees parameters. NULL: no-op. */
void qc_params_destroy(qc_params *params);

/* Frames per video (1 makes an image), height and width in pixels, sampling
 * steps: each at least 1. Whether the model can produce the size is checked
 * by qc_generate. */
int qc_params_set_frames(qc_params *params, int frames);
int qc_params_set_height(qc_params *params, int height);
int qc_params_set_width(qc_params *params, int width);
int qc_params_set_steps(qc_params *params, int steps);

/* Classifier-free guidance scale (finite). */
int qc_params_set_cfg(qc_params *params, float cfg);

/* Frames per second (finite, > 0): conditions the DiT and is the result's fps. */
int qc_params_set_fps(qc_params *params, float fps);

/* Seed of the initial noise (libqc's generator, as qc-run's --seed). */
int qc_params_set_seed(qc_params *params, uint64_t seed);

/* append nonzero: " aesthetic score: SCORE." is appended to each prompt
 * (finite score); 0: nothing is appended. */
int qc_params_set_aes(qc_params *params, int append, float score);

/* Initial noise replacing the seeded noise: count floats in [B, C, T, h, w]
 * order (see qc_engine_noise_shape), copied. NULL and 0 go back to the seed. */
int qc_params_set_init_noise(qc_params *params, const float *noise, size_t count);

/* ---- generation --------------------------------------------------------- */

/* Generates one video per prompt (prompt_count >= 1, each prompt non-NULL;
 * prompts are cleaned as Open-Sora cleans them). params NULL: defaults.
 * progress may be NULL; user is passed to it as given. On QC_OK *out holds
 * the videos: free with qc_result_free. Errors: QC_ERR_INVALID_ARGUMENT,
 * QC_ERR_BUSY, QC_ERR_CANCELLED, QC_ERR_DEVICE (GPU error or memory; on the
 * CPU, a generation whose estimated memory exceeds what the system has
 * available, refused before it starts), QC_ERR_INTERNAL. */
int qc_generate(qc_engine *engine, const char *const *prompts, size_t prompt_count, const qc_params *params,
                qc_progress_fn progress, void *user, qc_result **out);

/* ---- result ------------------------------------------------------------- */

/* Videos (one per prompt), frames per video, height, width, channels (3).
 * Each returns 0 for NULL. */
size_t qc_result_count(const qc_result *result);
size_t qc_result_frames(const qc_result *result);
size_t qc_result_height(const qc_result *result);
size_t qc_result_width(const qc_result *result);
size_t qc_result_channels(const qc_result *result);

/* Frames per second of the videos; 0 for NULL. */
float qc_result_fps(const qc_result *result);

/* The pixels as uint8 RGB, laid out [video][frame][height][width][rgb]:
 * pixel (v, f, y, x) channel c is at
 * (((v * frames + f) * height + y) * width + x) * 3 + c. Values are
 * Open-Sora's: floor(clamp((x + 1) / 2, 0, 1) * 255 + 0.5), exactly as
 * qc-run's outputs (frames_u8 of its .safetensors).
 * Valid until qc_result_free; NULL for NULL. */
const uint8_t *qc_result_data(const qc_result *result);

/* Bytes at qc_result_data: count * frames * height * width * 3; 0 for NULL. */
size_t qc_result_size(const qc_result *result);

/* Frees a result. NULL: no-op. A result does not depend on its engine: it
 * stays valid after qc_engine_destroy until freed. */
void qc_result_free(qc_result *result);

#ifdef __cplusplus
}
#endif

#endif /* QC_H */
