"""Throughput of anecy's float32 <-> float16 conversion against numpy.

    python bench/bench_fp16.py [--n 16777216] [--repeat 9] [--module anecy._ops]

(from the repo root with anecy installed, or with PYTHONPATH=. after an
in-place build)

GB/s counts bytes read plus bytes written. All variants run round-robin within
each repeat, so machine noise hits them alike; the median is reported.
"numpy copyto" writes into a preallocated array as anecy does, so unlike
astype it pays no allocation and no first-touch page faults.
"""
import argparse
import importlib
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24, help="elements per conversion")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--module", default="anecy._ops", help="module providing f32_to_f16 etc.")
    args = ap.parse_args()
    ops = importlib.import_module(args.module)

    n = args.n
    x32 = (np.random.default_rng(0).standard_normal(n) * 100).astype(np.float32)
    x16 = x32.astype(np.float16)
    h16 = x16.view(np.uint16)
    out16 = np.empty(n, np.uint16)
    out32 = np.empty(n, np.float32)
    path = ops.fp16_path()

    dispatch = f"anecy dispatch ({path})"
    variants = {  # name: (f32 -> f16, f16 -> f32)
        dispatch: (lambda: ops.f32_to_f16(x32, out16), lambda: ops.f16_to_f32(h16, out32)),
        "anecy scalar": (lambda: ops.f32_to_f16(x32, out16, simd=False),
                         lambda: ops.f16_to_f32(h16, out32, simd=False)),
        "numpy astype": (lambda: x32.astype(np.float16), lambda: x16.astype(np.float32)),
        "numpy copyto": (lambda: np.copyto(out16.view(np.float16), x32, casting="same_kind"),
                         lambda: np.copyto(out32, x16)),
    }
    times = {(name, d): [] for name in variants for d in (0, 1)}
    for _ in range(args.repeat):
        for name, fns in variants.items():
            for d, fn in enumerate(fns):
                t = time.perf_counter()
                fn()
                times[name, d].append(time.perf_counter() - t)
    gbs = {k: n * 6 / np.median(v) / 1e9 for k, v in times.items()}

    print(f"n={n:,}, median of {args.repeat} runs, GB/s = (bytes read + written) / s")
    print(f"{'':30s}{'f32->f16':>10s}{'f16->f32':>10s}")
    for name in variants:
        print(f"{name:30s}{gbs[name, 0]:10.2f}{gbs[name, 1]:10.2f}")
    for ours, short in ((dispatch, path), ("anecy scalar", "scalar")):
        for ref in ("numpy astype", "numpy copyto"):
            a, b = (gbs[ours, d] / gbs[ref, d] for d in (0, 1))
            print(f"{'ratio ' + short + ' / ' + ref:30s}{a:9.2f}x{b:9.2f}x")


if __name__ == "__main__":
    main()
