/*
 * generate.c: text to video with libqc.
 *
 *   generate [-m MODEL_DIR] [-t THREADS] [-s SEED] [-n STEPS] OUTPUT.rgb PROMPT...
 *
 * Loads the model once (the bundled demonstration model without -m), makes one
 * video per prompt and writes their pixels to OUTPUT.rgb as raw uint8 RGB,
 * [video][frame][height][width][rgb]; prints "videos frames height width fps"
 * on stdout. Build (from the repository root, after cargo build --release):
 *
 *   cc examples/c/generate.c -Iinclude -Ltarget/release -lqc -Wl,-rpath,$PWD/target/release -o generate
 */
#include <qc.h>

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int print_progress(void *user, int step, int steps) {
    (void)user;
    fprintf(stderr, "\rstep %d/%d", step, steps);
    if (step == steps) fputc('\n', stderr);
    return 0; /* nonzero would cancel */
}

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, qc_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    const char *model_dir = NULL;
    int threads = 0, steps = 0, opt;
    long long seed = -1;
    while ((opt = getopt(argc, argv, "m:t:s:n:")) != -1) {
        switch (opt) {
        case 'm': model_dir = optarg; break;
        case 't': threads = atoi(optarg); break;
        case 's': seed = atoll(optarg); break;
        case 'n': steps = atoi(optarg); break;
        default: goto usage;
        }
    }
    if (argc - optind < 2) goto usage;
    const char *output = argv[optind];
    const char *const *prompts = (const char *const *)&argv[optind + 1];
    size_t prompt_count = (size_t)(argc - optind - 1);

    if (qc_abi_version() != QC_ABI_VERSION) {
        fprintf(stderr, "libqc ABI %d, header %d\n", qc_abi_version(), QC_ABI_VERSION);
        return 1;
    }

    qc_options *options = NULL;
    if (qc_options_create(&options) != QC_OK) return fail("qc_options_create");
    if (threads > 0 && qc_options_set_threads(options, threads) != QC_OK) return fail("threads");
    qc_engine *engine = NULL;
    int rc = qc_engine_create(model_dir, options, &engine);
    qc_options_destroy(options);
    if (rc != QC_OK) return fail("qc_engine_create");
    fprintf(stderr, "device: %s\n", qc_engine_device(engine));

    qc_params *params = NULL;
    if (qc_params_create(&params) != QC_OK) return fail("qc_params_create");
    if (seed >= 0 && qc_params_set_seed(params, (uint64_t)seed) != QC_OK) return fail("seed");
    if (steps > 0 && qc_params_set_steps(params, steps) != QC_OK) return fail("steps");

    qc_result *result = NULL;
    rc = qc_generate(engine, prompts, prompt_count, params, print_progress, NULL, &result);
    qc_params_destroy(params);
    if (rc != QC_OK) {
        fail("qc_generate");
        qc_engine_destroy(engine);
        return 1;
    }

    FILE *f = fopen(output, "wb");
    size_t size = qc_result_size(result);
    if (!f || fwrite(qc_result_data(result), 1, size, f) != size || fclose(f) != 0) {
        perror(output);
        return 1;
    }
    printf("%zu %zu %zu %zu %g\n", qc_result_count(result), qc_result_frames(result), qc_result_height(result),
           qc_result_width(result), (double)qc_result_fps(result));
    qc_result_free(result);
    qc_engine_destroy(engine);
    return 0;

usage:
    fprintf(stderr, "usage: %s [-m MODEL_DIR] [-t THREADS] [-s SEED] [-n STEPS] OUTPUT.rgb PROMPT...\n", argv[0]);
    return 2;
}
