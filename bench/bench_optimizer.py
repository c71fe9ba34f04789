"""The optimizer step on stories110m-size buffers, and what its finite check costs.

The AdamW pass also checks every parameter and Adam moment for NaN/inf, in the same loop.
Printed: the optimizer step as Optimizer.update runs it (grad-norm pass + AdamW pass, two
threads); what a separate check pass over the parameters and both moments would add
instead; and, with ``--against``, the AdamW loop of this build and of another build
(without the check) side by side.

    python bench/bench_optimizer.py
    python bench/bench_optimizer.py --against OTHER   # OTHER/anecy holds another build

``--against`` names a directory holding another built ``anecy`` package (for example a
checkout of an earlier commit after ``python setup.py build_ext --inplace``). Its ``_ops``
module is loaded beside this one, under a package name of its own, and both AdamW loops
(one thread) run in this one process, alternating step by step on identical copies of the
same buffers, so that the noise of a shared machine falls on both; printed are the
medians, their ratio, and whether the results are bit-identical.
"""
import argparse
import glob
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N_PARAMS = 109_529_856  # stories110m (ModelConfig.preset("stories110m").n_params)


def median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def optimizer_step(reps):
    from anecy import Model, ModelConfig
    engine = Model(ModelConfig.preset("tiny")).engine  # its worker thread runs half the work
    rng = np.random.default_rng(0)
    p = rng.standard_normal(N_PARAMS, dtype=np.float32) * np.float32(0.02)
    m, v = np.zeros_like(p), np.zeros_like(p)
    grads = np.empty_like(p)
    step = [0]

    def update():
        grads[:] = 1e-3  # adamw clears the gradients it reads
        step[0] += 1
        t = time.perf_counter()
        norm = engine.grad_sumsq(grads) ** 0.5
        engine.adamw(p, grads, m, v, N_PARAMS - 20_000, 3e-4, 0.9, 0.95, 1e-8, 0.1, step[0],
                     1.0 / max(norm, 1.0))
        return (time.perf_counter() - t) * 1e3

    update()  # faults the pages in
    step_ms = statistics.median(update() for _ in range(reps))
    separate_ms = median_ms(lambda: [engine.grad_sumsq(x) for x in (p, m, v)], reps)
    print(f"optimizer step on {N_PARAMS / 1e6:.1f}M parameters (grad norm + AdamW with its "
          f"fused finite check, two threads): median {step_ms:.1f} ms")
    print(f"  a separate finite-check pass over params, m and v would add {separate_ms:.1f} ms "
          f"({100 * separate_ms / step_ms:.0f}% of the step)")


def loop_side_by_side(other_dir, n=30_000_000, reps=15):
    """The single-thread AdamW loop of this build and of another, in this process."""
    from anecy._testing import py_adamw as ours
    tmp = tempfile.mkdtemp()
    try:  # the other build's _ops under a package name of its own
        os.mkdir(os.path.join(tmp, "anecy_other"))
        open(os.path.join(tmp, "anecy_other", "__init__.py"), "w").close()
        found = [so for so in glob.glob(os.path.join(other_dir, "anecy", "_ops.*"))
                 if so.endswith((".so", ".pyd"))]
        if not found:
            sys.exit(f"no built anecy/_ops module in {other_dir}")
        shutil.copy(found[0], os.path.join(tmp, "anecy_other"))
        sys.path.insert(0, tmp)
        theirs = importlib.import_module("anecy_other._ops").py_adamw
    finally:
        shutil.rmtree(tmp)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    a = (p, p * np.float32(0.05), np.zeros_like(p), np.zeros_like(p))
    b = tuple(x.copy() for x in a)
    times = {"this": [], "other": []}
    for step in range(1, reps + 1):
        order = [("this", ours, a), ("other", theirs, b)]
        for name, fn, bufs in order if step % 2 else order[::-1]:
            t = time.perf_counter()
            fn(*bufs, 3e-4, 0.9, 0.95, 1e-8, 0.1, step, 1.0, False)
            times[name].append((time.perf_counter() - t) * 1e3)
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"AdamW loop alone, one thread, {n / 1e6:.0f}M parameters, {reps - 1} steps each, "
          "alternating in one process:")
    print(f"  this build {med['this']:.1f} ms, other build {med['other']:.1f} ms, "
          f"ratio {med['this'] / med['other']:.3f}; results bit-identical: {same}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="DIR", help="another anecy build to compare with")
    ap.add_argument("--reps", type=int, default=7, help="timed steps (default 7)")
    args = ap.parse_args()
    optimizer_step(args.reps)
    if args.against:
        loop_side_by_side(os.path.abspath(args.against), reps=2 * args.reps + 1)


if __name__ == "__main__":
    main()
