"""``anecy bench``: what the ane backend does on this machine, in figures a user can share.

It runs ``anecy selftest`` (the ten programs every way this machine can), then times, on the
ane backend and on the cpu backend, for Stories110M (and Qwen3-0.6B with ``--all``): building
the model (compiling the ten programs, on ane), one training microstep (forward and backward
of one window over the whole vocabulary) and one optimizer update (AdamW and the weight
staging), each the median of ``--steps`` runs after a warm-up; and on ane each program's own
time (one evaluation, as bound, median of ``--steps``) and its packing and unpacking time per
microstep. It writes
the figures as JSON (``--out``: chip, macOS version and build, anecy's version, the load) and
prints one markdown table row per model to paste into an issue.

Off a Mac, or wherever the Neural Engine is unavailable, the ane backend's programs run on
the null device (``anecy._testing.NullAneKernel``: the program execution replaced by a
no-op), so its figures are the host's cost around an ANE that takes no time; every row and
the JSON say so.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time

from .. import __version__
from ._args import positive_int

HELP = ("time compile, a training microstep and an update on the ane and cpu backends, per "
        "program; write JSON and a markdown row to share")

SCHEMA = "anecy-bench-1"
NULL_DEVICE = "null device (no Neural Engine here: host cost only, not an ANE measurement)"


def add_arguments(parser):
    parser.add_argument("--all", action="store_true",
                        help="also Qwen3-0.6B (default: Stories110M only)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset and 2 timed runs: a fast check of the command")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="timed runs of each measurement, after one warm-up (default 3)")
    parser.add_argument("--out", metavar="PATH", default="anecy-bench.json",
                        help="the JSON file to write (default anecy-bench.json)")


def _median_ms(fn, steps):
    times = []
    for i in range(steps + 1):           # the first is a warm-up
        t = time.perf_counter()
        fn()
        if i:
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _window(cfg, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32),
            rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32))


def _measure(cfg, backend, steps):
    """{"compile_ms", "microstep_ms", "update_ms", "tokens_per_s"} of ``backend`` (and on
    ane "kernel_ms" and "io_ms_by_kernel"), one model at a time."""
    from .. import backends
    from .._packed import clear_compiled_programs
    from ..config import TrainConfig
    from ..kernel_layout import KERNEL_NAMES
    from ..model import Model
    from ..optimizer import Optimizer
    if backend == "ane":
        clear_compiled_programs()        # compiled here, and timed
    t = time.perf_counter()
    model = Model(cfg, backend=backend, seed=0)
    build_ms = 1e3 * (time.perf_counter() - t)
    kernels = model.engine.kernels
    x, y = _window(cfg)
    scale = backends.DEFAULT_LOSS_SCALE[backend]
    res = {"compile_ms": round(kernels.compile_ms, 3) if backend == "ane" else None,
           "build_ms": round(build_ms, 3)}
    io_before = kernels.io_by_kernel if backend == "ane" else None
    res["microstep_ms"] = round(_median_ms(lambda: model.forward_backward(x, y, scale),
                                           steps), 3)
    if backend == "ane":
        after = kernels.io_by_kernel
        runs = steps + 1
        res["io_ms_by_kernel"] = {k: [round((after[k][j] - io_before[k][j]) / runs, 4)
                                      for j in (0, 1)] for k in after}
        res["kernel_ms"] = {k: round(_median_ms(lambda k=k: kernels.execute(k, 0), steps), 4)
                            for k in KERNEL_NAMES}
    res["tokens_per_s"] = round(cfg.seq_len / (res["microstep_ms"] / 1e3), 1)
    opt = Optimizer(model, TrainConfig(), backend)

    def update():
        model.forward_backward(x, y, scale)   # gradients to update on (not timed below)
        t = time.perf_counter()
        opt.update(1, 1)
        return 1e3 * (time.perf_counter() - t)
    times = [update() for _ in range(steps + 1)][1:]
    res["update_ms"] = round(statistics.median(times), 3)
    return res


def _selftest(quiet_out):
    """(status, last line) of ``anecy selftest`` on the tiny preset."""
    from ..config import ModelConfig
    from ..coreml_check import load_coremltools
    from ..errors import BackendUnavailable
    from .selftest import selftest
    try:
        load_coremltools()
    except BackendUnavailable as e:      # coremltools missing: the figures still count
        return "skipped", str(e)
    rc = selftest(ModelConfig.preset("tiny"), "tiny", 0, out=quiet_out)
    lines = quiet_out.getvalue().strip().splitlines()
    return ("ok" if rc == 0 else "FAIL"), (lines[-1] if lines else "")


def markdown_header():
    return ("| chip | OS (build) | anecy | model | device | selftest | compile ms | "
            "ane microstep ms | cpu microstep ms | ane update ms | cpu update ms |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(report, entry) -> str:
    d, ane, cpu = report["device"], entry["ane"], entry["cpu"]
    device = "ANE" if report["ane_device"] == "ane" else "null device (host only)"
    return (f"| {d['chip']} | {d['os']} ({d['os_build']}) | {report['anecy']} | "
            f"{entry['preset']} | {device} | {report['selftest']['status']} | "
            f"{ane['compile_ms']:.0f} | {ane['microstep_ms']:.1f} | {cpu['microstep_ms']:.1f} | "
            f"{ane['update_ms']:.1f} | {cpu['update_ms']:.1f} |")


def bench(presets, steps, out_path, say=print) -> dict:
    """Run the selftest and the measurements; write ``out_path``; return the report."""
    from .. import backends
    from .._testing import NullAneKernel
    from ..ane_health import device
    from ..config import ModelConfig
    from ..fileio import atomic_write, check_writable
    check_writable(out_path, what="bench output")
    on_ane = backends.ane_status()[0]
    dev = device()
    say(f"anecy bench: {dev['chip']}, {dev['os']} ({dev['os_build']}), anecy {__version__}, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    if not on_ane:
        say(f"ane: {NULL_DEVICE}: {backends.ane_status()[1]}")
    say("selftest (tiny) ...")
    status, line = _selftest(io.StringIO())
    say(f"selftest: {status}: {line}")
    report = {"schema": SCHEMA, "anecy": __version__, "device": dev,
              "ane_device": "ane" if on_ane else "null",
              "note": "" if on_ane else NULL_DEVICE,
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": round(os.getloadavg()[0], 2), "steps": steps,
              "selftest": {"status": status, "result": line}, "models": []}
    for name in presets:
        cfg = ModelConfig.preset(name)
        # the whole vocabulary (no compaction), the same window on both backends
        entry = {"preset": name, "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size}
        for backend in ("ane", "cpu"):
            say(f"{name} on {backend} ...")
            if backend == "ane" and not on_ane:
                with backends.ane_stand_in(NullAneKernel):
                    entry[backend] = _measure(cfg, backend, steps)
            else:
                entry[backend] = _measure(cfg, backend, steps)
        report["models"].append(entry)
    rows = [markdown_row(report, e) for e in report["models"]]
    report["markdown"] = rows
    with atomic_write(out_path) as f:
        f.write((json.dumps(report, indent=1) + "\n").encode("utf-8"))
    say("")
    for e in report["models"]:
        ane = e["ane"]
        worst = max(ane["kernel_ms"], key=ane["kernel_ms"].get)
        say(f"{e['preset']}: ane microstep {ane['microstep_ms']:.1f} ms, cpu "
            f"{e['cpu']['microstep_ms']:.1f} ms; compile {ane['compile_ms']:.0f} ms; slowest "
            f"program {worst} {ane['kernel_ms'][worst]:.3f} ms"
            f"{'' if on_ane else ' (null device)'}")
    say(f"figures: {out_path}; paste this into an issue:")
    say(markdown_header())
    for r in rows:
        say(r)
    return report


def run(args) -> int:
    if args.quick:
        presets, steps = ["tiny"], min(args.steps, 2)
    else:
        presets = ["stories110m"] + (["qwen3-0.6b"] if args.all else [])
        steps = args.steps
    report = bench(presets, steps, args.out)
    return 0 if report["selftest"]["status"] != "FAIL" else 1
