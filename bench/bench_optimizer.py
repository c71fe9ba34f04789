"""The optimizer step on stories110m-size buffers: grad-norm pass + AdamW pass (which also
checks every parameter and Adam moment for NaN/inf), as Trainer._update runs them.

    python bench/bench_optimizer.py                     # this build
    python bench/bench_optimizer.py --against OTHER     # and another build, side by side

``--against`` names a directory holding another built ``anecy`` package (for example a
checkout of an earlier commit after ``python setup.py build_ext --inplace``). Both builds
are timed in child processes that alternate, round after round, so that the noise of a
shared machine falls on both; the medians and their ratio are printed. Then the AdamW loop
alone (one thread) of both builds runs in this one process, alternating on identical
copies of the same buffers: the medians, their ratio, and whether the results are
bit-identical.
"""
import argparse
import glob
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

N_PARAMS = 109_529_856  # stories110m (ModelConfig.preset("stories110m").n_params)


def time_once(reps):
    from anecy import Model, ModelConfig
    engine = Model(ModelConfig.preset("tiny")).engine  # its worker thread runs half the work
    rng = np.random.default_rng(0)
    p = rng.standard_normal(N_PARAMS, dtype=np.float32) * np.float32(0.02)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    grads = rng.standard_normal(N_PARAMS, dtype=np.float32) * np.float32(1e-3)
    n_decay = N_PARAMS - 20_000
    times = []
    for step in range(1, reps + 2):
        grads_in = grads.copy()  # adamw clears the gradients it reads
        t = time.perf_counter()
        norm = engine.grad_sumsq(grads_in) ** 0.5
        engine.adamw(p, grads_in, m, v, n_decay, 3e-4, 0.9, 0.95, 1e-8, 0.1, step,
                     1.0 / max(norm, 1.0))
        if step > 1:  # the first pass faults the pages in
            times.append((time.perf_counter() - t) * 1e3)
    return times


def child(path, reps):
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(reps)], env=env,
                         capture_output=True, text=True, check=True, cwd=path)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loop_side_by_side(other_dir, n=30_000_000, reps=15):
    """The single-thread AdamW loop of this build and of another, in this process."""
    from anecy._ops import py_adamw as ours
    tmp = tempfile.mkdtemp()
    try:  # the other build's _ops under a package name of its own
        os.mkdir(os.path.join(tmp, "anecy_other"))
        open(os.path.join(tmp, "anecy_other", "__init__.py"), "w").close()
        for so in glob.glob(os.path.join(other_dir, "anecy", "_ops.*")):
            if so.endswith((".so", ".pyd")):
                shutil.copy(so, os.path.join(tmp, "anecy_other"))
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
          f"alternating in one process:")
    print(f"  this build median {med['this']:.1f} ms, other build {med['other']:.1f} ms, "
          f"ratio {med['this'] / med['other']:.3f}; results bit-identical: {same}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="DIR", help="another anecy build to time side by side")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per round (default 5)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(time_once(args.reps)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = {"this build": here}
    if args.against:
        sides["other build"] = os.path.abspath(args.against)
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, path in sides.items():
            times[name] += child(path, args.reps)
    print(f"optimizer step (grad norm + AdamW) on {N_PARAMS / 1e6:.1f}M parameters, "
          f"{args.rounds} rounds x {args.reps} steps per build")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in sides:
        print(f"  {name:12s} median {med[name]:7.1f} ms  (min {min(times[name]):.1f}, "
              f"max {max(times[name]):.1f})")
    if args.against:
        print(f"  ratio this/other: {med['this build'] / med['other build']:.3f}")
        loop_side_by_side(args.against)


if __name__ == "__main__":
    main()
