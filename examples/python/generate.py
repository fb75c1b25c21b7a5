#!/usr/bin/env python3
"""Text to video with libqc through ctypes (standard library only).

    python3 examples/python/generate.py [--lib libqc.so] [--model DIR] [--threads N]
        [--steps N] [--seed N] --output OUT.rgb PROMPT...

Loads the model once (the bundled demonstration model without --model), makes
one video per prompt and writes the pixels to OUT.rgb as raw uint8 RGB,
[video][frame][height][width][rgb]; prints "videos frames height width fps".
--lib defaults to $QC_LIB, else target/release/libqc.so of this repository.
"""

import argparse
import ctypes
import os
import sys

QC_OK = 0
QC_ABI_VERSION = 1
PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)


def load(path):
    """libqc with the signatures of include/qc.h that this example uses."""
    lib = ctypes.CDLL(path)
    p = ctypes.c_void_p
    sigs = {
        "qc_abi_version": (ctypes.c_int, []),
        "qc_last_error_message": (ctypes.c_char_p, []),
        "qc_options_create": (ctypes.c_int, [ctypes.POINTER(p)]),
        "qc_options_set_threads": (ctypes.c_int, [p, ctypes.c_int]),
        "qc_options_destroy": (None, [p]),
        "qc_engine_create": (ctypes.c_int, [ctypes.c_char_p, p, ctypes.POINTER(p)]),
        "qc_engine_device": (ctypes.c_char_p, [p]),
        "qc_engine_destroy": (None, [p]),
        "qc_params_create": (ctypes.c_int, [ctypes.POINTER(p)]),
        "qc_params_set_steps": (ctypes.c_int, [p, ctypes.c_int]),
        "qc_params_set_seed": (ctypes.c_int, [p, ctypes.c_uint64]),
        "qc_params_destroy": (None, [p]),
        "qc_generate": (ctypes.c_int, [p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, p, PROGRESS, p, ctypes.POINTER(p)]),
        "qc_result_count": (ctypes.c_size_t, [p]),
        "qc_result_frames": (ctypes.c_size_t, [p]),
        "qc_result_height": (ctypes.c_size_t, [p]),
        "qc_result_width": (ctypes.c_size_t, [p]),
        "qc_result_fps": (ctypes.c_float, [p]),
        "qc_result_size": (ctypes.c_size_t, [p]),
        "qc_result_data": (ctypes.POINTER(ctypes.c_uint8), [p]),
        "qc_result_free": (None, [p]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


class QcError(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    default_lib = os.environ.get("QC_LIB") or os.path.join(here, "..", "..", "target", "release", "libqc.so")
    ap.add_argument("--lib", default=default_lib)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--output", required=True)
    ap.add_argument("prompts", nargs="+")
    a = ap.parse_args()

    lib = load(a.lib)
    if lib.qc_abi_version() != QC_ABI_VERSION:
        sys.exit(f"libqc ABI {lib.qc_abi_version()}, this script expects {QC_ABI_VERSION}")

    def check(rc, what):
        if rc != QC_OK:
            raise QcError(f"{what}: error {rc}: {lib.qc_last_error_message().decode()}")

    options, engine, params, result = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    try:
        check(lib.qc_options_create(ctypes.byref(options)), "qc_options_create")
        if a.threads:
            check(lib.qc_options_set_threads(options, a.threads), "threads")
        model = a.model.encode() if a.model else None
        check(lib.qc_engine_create(model, options, ctypes.byref(engine)), "qc_engine_create")
        print("device:", lib.qc_engine_device(engine).decode(), file=sys.stderr)
        check(lib.qc_params_create(ctypes.byref(params)), "qc_params_create")
        if a.steps is not None:
            check(lib.qc_params_set_steps(params, a.steps), "steps")
        if a.seed is not None:
            check(lib.qc_params_set_seed(params, a.seed), "seed")

        @PROGRESS
        def progress(_user, step, steps):
            print(f"\rstep {step}/{steps}", end="\n" if step == steps else "", file=sys.stderr)
            return 0  # nonzero cancels

        prompts = (ctypes.c_char_p * len(a.prompts))(*[p.encode() for p in a.prompts])
        check(lib.qc_generate(engine, prompts, len(a.prompts), params, progress, None, ctypes.byref(result)), "qc_generate")
        data = ctypes.string_at(lib.qc_result_data(result), lib.qc_result_size(result))
        with open(a.output, "wb") as f:
            f.write(data)
        print(lib.qc_result_count(result), lib.qc_result_frames(result), lib.qc_result_height(result),
              lib.qc_result_width(result), f"{lib.qc_result_fps(result):g}")
    except QcError as e:
        sys.exit(str(e))
    finally:
        lib.qc_result_free(result)
        lib.qc_params_destroy(params)
        lib.qc_engine_destroy(engine)
        lib.qc_options_destroy(options)


if __name__ == "__main__":
    main()
