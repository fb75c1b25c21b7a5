/*
 * misuse.c: libqc's answers to bad calls (built and run by tests/capi.rs, under
 * valgrind when it is installed). Every call must return the documented code
 * and a message, and never crash.
 *
 *   misuse MODEL_DIR BROKEN_MODEL_DIR A_FILE THREADS
 *
 * MODEL_DIR: a model (the bundled demonstration model); BROKEN_MODEL_DIR: a
 * copy of it whose stdit3/config.json is not JSON; A_FILE: any existing
 * regular file; THREADS: worker threads per engine (1 under valgrind, where
 * idle workers' spinning is slow). Prints one line per failed check and
 * "N passed, M failed".
 */
#include <qc.h>

#include <math.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;

/* The call returned `want` and its message contains `needle`. */
static void expect(int line, const char *what, int got, int want, const char *needle) {
    const char *msg = qc_last_error_message();
    if (got == want && msg && strstr(msg, needle)) {
        passed++;
    } else {
        failed++;
        printf("FAIL line %d: %s: got %d (want %d), message \"%s\" (want it to contain \"%s\")\n", line, what, got,
               want, msg ? msg : "(NULL)", needle);
    }
}
#define EXPECT(call, want, needle) expect(__LINE__, #call, (call), (want), (needle))

static void check(int line, const char *what, int ok) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL line %d: %s\n", line, what);
    }
}
#define CHECK(cond) check(__LINE__, #cond, (cond))

/* Cancels at step `cancel_at`, counting calls. */
struct cancel_state {
    int calls, cancel_at;
};
static int cancel_progress(void *user, int step, int steps) {
    struct cancel_state *s = user;
    (void)steps;
    s->calls++;
    return step >= s->cancel_at;
}

/* Holds the first generation inside its first step's callback until the
 * main thread has tried the engine. */
struct busy_state {
    sem_t started, release;
};
static int busy_progress(void *user, int step, int steps) {
    struct busy_state *s = user;
    (void)steps;
    if (step == 1) {
        sem_post(&s->started);
        sem_wait(&s->release);
    }
    return 0;
}

struct job {
    qc_engine *engine;
    const qc_params *params;
    qc_progress_fn progress;
    void *user;
    int rc;
    size_t bytes;
};
static void *run_job(void *arg) {
    struct job *j = arg;
    const char *prompt = "a blue square moving up";
    qc_result *r = NULL;
    j->rc = qc_generate(j->engine, &prompt, 1, j->params, j->progress, j->user, &r);
    j->bytes = qc_result_size(r);
    qc_result_free(r);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL_DIR BROKEN_MODEL_DIR A_FILE THREADS\n", argv[0]);
        return 2;
    }
    const char *model_dir = argv[1], *broken_dir = argv[2], *a_file = argv[3];
    int threads = atoi(argv[4]);
    char part_dir[4096];
    snprintf(part_dir, sizeof part_dir, "%s/stdit3", model_dir);
    CHECK(qc_abi_version() == QC_ABI_VERSION);
    CHECK(strstr(qc_version(), "quantcache") != NULL);

    /* Destroy and free functions take NULL; accessors of NULL give 0. */
    qc_result_free(NULL);
    qc_engine_destroy(NULL);
    qc_options_destroy(NULL);
    qc_params_destroy(NULL);
    CHECK(qc_result_count(NULL) == 0 && qc_result_size(NULL) == 0 && qc_result_data(NULL) == NULL);
    CHECK(qc_engine_device(NULL) == NULL);

    /* Options. */
    EXPECT(qc_options_create(NULL), QC_ERR_INVALID_ARGUMENT, "out is NULL");
    qc_options *options = NULL;
    EXPECT(qc_options_create(&options), QC_OK, "");
    EXPECT(qc_options_set_quant(NULL, "w8a8"), QC_ERR_INVALID_ARGUMENT, "options is NULL");
    EXPECT(qc_options_set_quant(options, NULL), QC_ERR_INVALID_ARGUMENT, "quant is NULL");
    EXPECT(qc_options_set_quant(options, "int3"), QC_ERR_INVALID_ARGUMENT, "unknown --quant \"int3\"");
    EXPECT(qc_options_set_quant(options, "aigq"), QC_ERR_INVALID_ARGUMENT, "calibration");
    EXPECT(qc_options_set_cache(options, "sometimes"), QC_ERR_INVALID_ARGUMENT, "unknown caching policy \"sometimes\"");
    EXPECT(qc_options_set_cache(options, "static:0"), QC_ERR_INVALID_ARGUMENT, "positive integer");
    EXPECT(qc_options_set_accel(options, "warp"), QC_ERR_INVALID_ARGUMENT, "unknown acceleration preset \"warp\"");
    EXPECT(qc_options_set_device(options, "tpu"), QC_ERR_INVALID_ARGUMENT, "unknown device \"tpu\"");
    EXPECT(qc_options_set_threads(options, -1), QC_ERR_INVALID_ARGUMENT, "threads");
    EXPECT(qc_options_set_accel(options, "none"), QC_OK, "");
    EXPECT(qc_options_set_cache(options, "static:2"), QC_OK, "");
    EXPECT(qc_options_set_cache(options, "none"), QC_OK, "");
    EXPECT(qc_options_set_threads(options, threads), QC_OK, "");

    /* Engine creation. */
    qc_engine *engine = (qc_engine *)options; /* must be overwritten with NULL on failure */
    EXPECT(qc_engine_create(model_dir, options, NULL), QC_ERR_INVALID_ARGUMENT, "out is NULL");
    EXPECT(qc_engine_create("/nonexistent/qc-model", options, &engine), QC_ERR_NOT_FOUND, "does not exist");
    CHECK(engine == NULL);
    EXPECT(qc_engine_create(a_file, options, &engine), QC_ERR_NOT_FOUND, "is a file, not a directory");
    CHECK(engine == NULL);
    /* A model part's directory given as the model: its parts are missing. */
    EXPECT(qc_engine_create(part_dir, options, &engine), QC_ERR_NOT_FOUND, "DiT (stdit3) directory");
    CHECK(engine == NULL);
    EXPECT(qc_engine_create(broken_dir, options, &engine), QC_ERR_MODEL, "config.json");
    CHECK(engine == NULL);
    EXPECT(qc_engine_create(model_dir, options, &engine), QC_OK, "");
    CHECK(engine != NULL);
    CHECK(strstr(qc_engine_device(engine), "cpu") != NULL);
    qc_options_destroy(options); /* the engine keeps its own copy */

    /* Parameters. */
    qc_params *params = NULL;
    EXPECT(qc_params_create(NULL), QC_ERR_INVALID_ARGUMENT, "out is NULL");
    EXPECT(qc_params_create(&params), QC_OK, "");
    EXPECT(qc_params_set_frames(params, 0), QC_ERR_INVALID_ARGUMENT, "frames must be at least 1, got 0");
    EXPECT(qc_params_set_steps(params, -3), QC_ERR_INVALID_ARGUMENT, "steps must be at least 1, got -3");
    EXPECT(qc_params_set_height(NULL, 16), QC_ERR_INVALID_ARGUMENT, "params is NULL");
    EXPECT(qc_params_set_fps(params, 0.0f), QC_ERR_INVALID_ARGUMENT, "fps must be positive");
    EXPECT(qc_params_set_cfg(params, NAN), QC_ERR_INVALID_ARGUMENT, "cfg must be a finite number");
    EXPECT(qc_params_set_init_noise(params, NULL, 5), QC_ERR_INVALID_ARGUMENT, "noise is NULL but count is 5");
    EXPECT(qc_params_set_steps(params, 3), QC_OK, "");

    /* Noise shape: the demonstration model is pixel space, 8 frames of 16x16. */
    size_t shape[5] = {0};
    EXPECT(qc_engine_noise_shape(engine, params, 0, shape), QC_ERR_INVALID_ARGUMENT, "prompt_count is 0");
    EXPECT(qc_engine_noise_shape(engine, params, 2, NULL), QC_ERR_INVALID_ARGUMENT, "shape is NULL");
    EXPECT(qc_engine_noise_shape(engine, params, 2, shape), QC_OK, "");
    CHECK(shape[0] == 2 && shape[1] == 3 && shape[2] == 8 && shape[3] == 16 && shape[4] == 16);

    /* Generation: bad arguments. */
    const char *prompt = "a red circle moving right";
    const char *with_null[2] = {prompt, NULL};
    qc_result *result = (qc_result *)params; /* must be overwritten with NULL on failure */
    EXPECT(qc_generate(NULL, &prompt, 1, params, NULL, NULL, &result), QC_ERR_INVALID_ARGUMENT, "engine is NULL");
    CHECK(result == NULL);
    EXPECT(qc_generate(engine, &prompt, 1, params, NULL, NULL, NULL), QC_ERR_INVALID_ARGUMENT, "out is NULL");
    EXPECT(qc_generate(engine, NULL, 1, params, NULL, NULL, &result), QC_ERR_INVALID_ARGUMENT, "prompts is NULL");
    EXPECT(qc_generate(engine, &prompt, 0, params, NULL, NULL, &result), QC_ERR_INVALID_ARGUMENT, "prompt_count is 0");
    EXPECT(qc_generate(engine, with_null, 2, params, NULL, NULL, &result), QC_ERR_INVALID_ARGUMENT, "prompts[1] is NULL");
    float noise[7] = {0};
    EXPECT(qc_params_set_init_noise(params, noise, 7), QC_OK, "");
    EXPECT(qc_generate(engine, &prompt, 1, params, NULL, NULL, &result), QC_ERR_INVALID_ARGUMENT, "initial noise has 7 floats");
    CHECK(result == NULL);
    EXPECT(qc_params_set_init_noise(params, NULL, 0), QC_OK, "");
    qc_params *odd = NULL;
    EXPECT(qc_params_create(&odd), QC_OK, "");
    EXPECT(qc_params_set_frames(odd, 2000000000), QC_OK, "");
    EXPECT(qc_generate(engine, &prompt, 1, odd, NULL, NULL, &result), QC_ERR_INVALID_ARGUMENT, "more than libqc can hold");
    /* Within libqc's limit but over a terabyte of activations: refused before it starts. */
    EXPECT(qc_params_set_frames(odd, 64), QC_OK, "");
    EXPECT(qc_params_set_height(odd, 4000), QC_OK, "");
    EXPECT(qc_params_set_width(odd, 4000), QC_OK, "");
    EXPECT(qc_generate(engine, &prompt, 1, odd, NULL, NULL, &result), QC_ERR_DEVICE, "GiB of memory for their activations");
    CHECK(result == NULL);
    qc_params_destroy(odd);

    /* A progress callback that cancels at step 2: no result, stopped there. */
    struct cancel_state cs = {0, 2};
    EXPECT(qc_generate(engine, &prompt, 1, params, cancel_progress, &cs, &result), QC_ERR_CANCELLED, "cancelled");
    CHECK(result == NULL);
    CHECK(cs.calls == 2);

    /* A second generation on an engine that is generating: QC_ERR_BUSY, then both usable. */
    struct busy_state bs;
    sem_init(&bs.started, 0, 0);
    sem_init(&bs.release, 0, 0);
    struct job first = {engine, params, busy_progress, &bs, -1, 0};
    pthread_t t;
    pthread_create(&t, NULL, run_job, &first);
    sem_wait(&bs.started);
    EXPECT(qc_generate(engine, &prompt, 1, params, NULL, NULL, &result), QC_ERR_BUSY, "another thread");
    CHECK(result == NULL);
    sem_post(&bs.release);
    pthread_join(t, NULL);
    CHECK(first.rc == QC_OK && first.bytes == 8 * 16 * 16 * 3);
    sem_destroy(&bs.started);
    sem_destroy(&bs.release);

    /* The engine still works, and a message is cleared by a success. */
    EXPECT(qc_generate(engine, &prompt, 1, params, NULL, NULL, &result), QC_OK, "");
    CHECK(strcmp(qc_last_error_message(), "") == 0);
    CHECK(qc_result_count(result) == 1 && qc_result_frames(result) == 8 && qc_result_height(result) == 16 &&
          qc_result_width(result) == 16 && qc_result_channels(result) == 3 && qc_result_size(result) == 8 * 16 * 16 * 3);
    qc_result_free(result);

    /* Two engines in one process, generating at the same time on two threads. */
    qc_engine *second = NULL;
    EXPECT(qc_options_create(&options), QC_OK, "");
    EXPECT(qc_options_set_threads(options, threads), QC_OK, "");
    EXPECT(qc_engine_create(model_dir, options, &second), QC_OK, "");
    qc_options_destroy(options);
    struct job a = {engine, params, NULL, NULL, -1, 0}, b = {second, params, NULL, NULL, -1, 0};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, run_job, &a);
    pthread_create(&tb, NULL, run_job, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK(a.rc == QC_OK && b.rc == QC_OK && a.bytes == b.bytes && a.bytes > 0);
    qc_engine_destroy(second);

    qc_params_destroy(params);
    qc_engine_destroy(engine);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
