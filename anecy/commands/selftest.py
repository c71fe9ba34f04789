"""``anecy selftest``: run each of the ten ANE programs every way this machine can, on the
same inputs, and report whether they agree.

The ways: ``milsim`` (anecy's fp16 MIL interpreter, the reference here), ``coremltools``
(Apple's MIL builder re-checks the opset, every type, the blob files and the .mlpackage,
and const-folds the program to values compared with milsim's), and on a Mac with Apple
Silicon ``ane`` (the ane backend: the private-API ANE runtime anecy trains with) and
``coreml`` (the same program as an .mlpackage through Core ML's public API,
``MLModel(..., compute_units=CPU_AND_NE)``). A way that cannot run here gets a line
saying why. Exit status 0 when every way that ran agrees, 1 otherwise.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import __version__, mil, milsim
from .. import coreml_check as cc
from ..config import ModelConfig

HELP = "check the ten ANE programs with milsim, coremltools and (on a Mac) the ANE and Core ML"

# small configs only: coremltools const-folds in numpy's fp16, which has no fast matmul
PRESETS = ("tiny", "qwen3-tiny", "stories15m")


def add_arguments(parser):
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="model shape whose programs are checked (default tiny)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs (default 0)")


def run(args) -> int:
    cfg = ModelConfig.preset(args.preset)
    return selftest(cfg, args.preset, args.seed)


def _fmt(u):
    if u is None:
        return "-"
    if u == float("inf"):
        return "inf"
    return f"{u:.2g}"


def selftest(cfg, name: str, seed: int = 0, out=None, ane_factory=None, predict=None) -> int:
    """Print the report for ``cfg`` to ``out`` (stdout) and return the exit status.

    ``ane_factory`` and ``predict`` stand in for the private-API ANE kernel and Core ML's
    prediction (tests); with them the two Mac paths run anywhere."""
    out = out or sys.stdout

    def say(line=""):
        print(line, file=out, flush=True)

    t0 = time.perf_counter()
    ct = cc.load_coremltools()
    say(f"anecy selftest: preset {name} (dim {cfg.dim}, hidden {cfg.hidden_dim}, heads "
        f"{cfg.n_heads}/{cfg.n_kv_heads}, head_dim {cfg.head_dim}, seq_len {cfg.seq_len}"
        f"{', qk_norm' if cfg.qk_norm else ''}), seed {seed}")
    say(f"  anecy {__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
        f"coremltools {ct.__version__}, {platform.system()} {platform.release()} "
        f"{platform.machine()}")

    if ane_factory is not None:
        ane_ok, ane_why = True, ""
    else:
        ane_ok, ane_why = cc.ane_status()
    if predict is not None:
        cm_ok, cm_why = True, ""
    else:
        cm_ok, cm_why = cc.coreml_prediction_status()
    mac = "; the ANE paths need macOS on Apple Silicon"
    say("paths:")
    say("  milsim       anecy's fp16 MIL interpreter (the reference): runs")
    say(f"  coremltools  Apple's iOS18 opset: types, values, blobs, .mlpackage: runs "
        f"(within {cc.VALUE_ULPS:g} ulp of milsim)")
    run_ane = None
    setup_failures = []
    if ane_ok:
        try:
            run_ane = cc.ane_runner(cfg, ane_factory)
            say(f"  ane          the ane backend (private API): runs (within "
                f"{cc.DEVICE_ULPS:g} ulp of milsim)")
        except Exception as e:      # a compile failure is a result, not a crash
            say(f"  ane          the ane backend (private API): FAILED: {cc._one_line(e)}")
            setup_failures.append("ane")
    else:
        say(f"  ane          the ane backend (private API): unavailable: {ane_why}")
    if cm_ok:
        predict = predict or cc.coreml_predictor("CPU_AND_NE")
        say(f"  coreml       Core ML's public API (CPU_AND_NE): runs (within "
            f"{cc.DEVICE_ULPS:g} ulp of milsim)")
    else:
        say(f"  coreml       Core ML's public API (CPU_AND_NE): unavailable: {cm_why}")

    cols = ["kernel", "ops", "coremltools", "ulp", "ane", "coreml"]
    if run_ane is not None and cm_ok:
        cols.append("ane~coreml")
    say("")
    say("  ".join(f"{c:<12}" if i == 0 else f"{c:>11}" for i, c in enumerate(cols)))
    failed = []
    worst = {"coremltools": 0.0, "ane": 0.0, "coreml": 0.0}
    with tempfile.TemporaryDirectory(prefix="anecy-selftest-") as tmp:
        for i, kernel in enumerate(mil.KERNEL_NAMES):
            problems = []
            row = {c: "-" for c in cols}
            row["kernel"] = kernel
            x = cc.random_input(kernel, cfg, seed + i)
            prog = mil.generate(kernel, cfg)
            try:
                ref = milsim.run(prog, x)
            except milsim.MilError as e:
                ref = None
                problems.append(f"milsim rejects it: {e}")
            try:
                res = cc.check_program(prog, cfg, x if ref is not None else None,
                                       Path(tmp) / kernel, ref=ref)
                row["ops"] = str(res.ops)
                row["coremltools"] = "ok"
                if res.value_ulps:
                    u = max(res.value_ulps.values())
                    worst["coremltools"] = max(worst["coremltools"], u)
                    row["ulp"] = _fmt(u)
                package = res.package
            except cc.CheckFailure as e:
                row["coremltools"] = "FAIL"
                problems.append(f"coremltools: {e.stage}: {e.detail}")
                package = None
            dev = {}
            for path, ok, go in (("ane", run_ane is not None, run_ane),
                                 ("coreml", cm_ok and package is not None,
                                  lambda k, v, p=package: predict(p, v))):
                if not ok:
                    row[path] = "n/a" if path == "ane" or not cm_ok else "-"
                    continue
                try:
                    dev[path] = y = go(kernel, x)
                except Exception as e:
                    row[path] = "FAIL"
                    problems.append(f"{path}: {cc._one_line(e)}")
                    continue
                if ref is None:
                    row[path] = "ran"
                    continue
                u = max(cc.block_ulps(kernel, cfg, y, ref).values())
                worst[path] = max(worst[path], u)
                row[path] = _fmt(u)
                if not u <= cc.DEVICE_ULPS:
                    row[path] += "!"
                    problems.append(f"{path} differs from milsim by {_fmt(u)} ulp")
            if "ane~coreml" in cols and len(dev) == 2:
                u = max(cc.block_ulps(kernel, cfg, dev["ane"], dev["coreml"]).values())
                row["ane~coreml"] = _fmt(u)
                if not u <= 2 * cc.DEVICE_ULPS:
                    row["ane~coreml"] += "!"
                    problems.append(f"ane and coreml differ by {_fmt(u)} ulp")
            say("  ".join(f"{row[c]:<12}" if j == 0 else f"{row[c]:>11}"
                          for j, c in enumerate(cols)))
            for p in problems:
                say(f"    {kernel}: {p}")
            if problems:
                failed.append(kernel)

    ran = ["milsim", "coremltools"] + (["ane"] if run_ane is not None else []) + \
        (["coreml"] if cm_ok else [])
    say("")
    say("ulp: the largest difference from milsim over the kernel's output blocks, in fp16 "
        "ulps of each block's largest value")
    secs = time.perf_counter() - t0
    missing = "" if len(ran) == 4 else mac
    if failed or setup_failures:
        what = [f"{len(failed)} of {len(mil.KERNEL_NAMES)} kernels ({', '.join(failed)})"] \
            if failed else []
        what += [f"the {p} path did not start" for p in setup_failures]
        say(f"result: FAIL: {'; '.join(what)}; paths run: {', '.join(ran)}{missing} "
            f"({secs:.1f} s)")
        return 1
    worst_s = ", ".join(f"{p} {_fmt(worst[p])}" for p in ran[1:])
    say(f"result: OK: all {len(mil.KERNEL_NAMES)} kernels agree on {', '.join(ran)} "
        f"(worst ulp: {worst_s}){missing} ({secs:.1f} s)")
    return 0
