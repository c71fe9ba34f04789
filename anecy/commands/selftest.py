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

from .. import __version__
from ..backends import ane_status
from ..config import ModelConfig
from ._args import non_negative_int

# The programs, milsim and coremltools are imported where they are used, inside run(): `anecy
# selftest --help` loads no compiled module.

HELP = "check the ten ANE programs with milsim, coremltools and (on a Mac) the ANE and Core ML"

# small configs only: coremltools const-folds in numpy's fp16, which has no fast matmul
PRESETS = ("tiny", "qwen3-tiny", "stories15m")


def add_arguments(parser):
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="model shape whose programs are checked (default tiny)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the random inputs (default 0)")


def run(args) -> int:
    cfg = ModelConfig.preset(args.preset)
    return selftest(cfg, args.preset, args.seed)


def _fmt(u):
    return "inf" if u == float("inf") else f"{u:.2g}"


def _table_line(cells):
    return "  ".join(f"{c:<12}" if j == 0 else f"{c:>11}" for j, c in enumerate(cells))


class _Paths:
    """The two Mac paths: set up once, each either a runner or the reason it is missing."""

    def __init__(self, cfg, ane_factory, predict, say):
        from .. import selftest_runners as runners
        self.unavailable, self.failed = [], []
        self.ane = self._start("ane", "the ane backend (private API)", ane_factory,
                               ane_status, lambda: runners.ane_runner(cfg, ane_factory), say)
        self.predict = self._start("coreml", "Core ML's public API (CPU_AND_NE)", predict,
                                   runners.coreml_prediction_status,
                                   lambda: predict or runners.coreml_predictor("CPU_AND_NE"),
                                   say)

    def _start(self, path, what, stand_in, status, make, say):
        """The runner of ``path`` (``make()``), or None after saying why it is missing or
        why it did not start. A stand-in (tests) is available wherever this runs."""
        from .. import coreml_check as cc
        from .. import selftest_runners as runners
        label = f"  {path:<12} {what}"
        ok, why = (True, "") if stand_in is not None else status()
        if not ok:
            say(f"{label}: unavailable: {why}")
            self.unavailable.append(path)
            return None
        try:
            runner = make()
        except Exception as e:   # noqa: BLE001 - a compile failure is a result to report
            say(f"{label}: FAILED: {cc._one_line(e)}")
            self.failed.append(path)
            return None
        say(f"{label}: runs (within {runners.DEVICE_ULPS:g} ulp of milsim)")
        return runner

    def run(self, path, kernel, x, package):
        if path == "ane":
            return self.ane(kernel, x)
        return self.predict(package, x)


def _check(kernel, cfg, x, workdir, paths, cols):
    """One kernel every way: (table row, problems, {path: ulp})."""
    from .. import coreml_check as cc
    from .. import mil, milsim
    from .. import selftest_runners as runners
    row = dict.fromkeys(cols, "-")
    row["kernel"] = kernel
    problems, ulps = [], {}
    prog = mil.generate(kernel, cfg)
    try:
        ref = milsim.run(prog, x)
    except milsim.MilError as e:
        ref = None
        problems.append(f"milsim rejects it: {e}")
    package = None
    try:
        res = cc.check_program(prog, cfg, None if ref is None else x, workdir, ref=ref)
        row["ops"], row["coremltools"], package = str(res.ops), "ok", res.package
        if res.value_ulps:
            ulps["coremltools"] = max(res.value_ulps.values())
            row["ulp"] = _fmt(ulps["coremltools"])
    except cc.CheckFailure as e:
        row["coremltools"] = "FAIL"
        problems.append(f"coremltools: {e.stage}: {e.detail}")
    out = {}
    for path in ("ane", "coreml"):
        if path in paths.unavailable or path in paths.failed:
            row[path] = "n/a"
            continue
        if path == "coreml" and package is None:
            continue
        try:
            out[path] = y = paths.run(path, kernel, x, package)
        except Exception as e:       # noqa: BLE001 - the device's error is the result
            row[path] = "FAIL"
            problems.append(f"{path}: {cc._one_line(e)}")
            continue
        if ref is None:
            row[path] = "ran"
            continue
        ulps[path] = max(cc.block_ulps(kernel, cfg, y, ref).values())
        row[path] = _fmt(ulps[path])
        if not ulps[path] <= runners.DEVICE_ULPS:
            row[path] += "!"
            problems.append(f"{path} differs from milsim by {_fmt(ulps[path])} ulp")
    if "ane~coreml" in cols and len(out) == 2:
        u = max(cc.block_ulps(kernel, cfg, out["ane"], out["coreml"]).values())
        row["ane~coreml"] = _fmt(u)
        if not u <= 2 * runners.DEVICE_ULPS:
            row["ane~coreml"] += "!"
            problems.append(f"ane and coreml differ by {_fmt(u)} ulp")
    return [row[c] for c in cols], problems, ulps


def _chain(cfg, seed, paths, say) -> bool:
    """sdpaBwd1 then sdpaBwd2 on the ane as training runs them: sdpaBwd2 reads the
    probabilities sdpaBwd1 wrote into the Surface the two share (no copy; unverified on
    hardware until this passes), against the same chain in milsim. True if they agree."""
    from .. import coreml_check as cc
    from .. import selftest_runners as runners
    from .._packed import SEPARATE_SURFACES_ENV
    chain_ulps = runners.CHAIN_ULPS
    x1 = cc.random_input("sdpaBwd1", cfg, seed + 100)
    x2 = cc.random_input("sdpaBwd2", cfg, seed + 101)
    label = "chain        sdpaBwd1 -> sdpaBwd2 through their shared Surface (ane)"
    try:
        y = paths.ane.chain(x1, x2)
    except Exception as e:       # noqa: BLE001 - the device's error is the result
        say(f"{label}: FAIL: {cc._one_line(e)}; training with {SEPARATE_SURFACES_ENV}=1 "
            "gives the two a Surface each")
        return False
    u = max(cc.block_ulps("sdpaBwd2", cfg, y,
                          runners.sdpa_backward_chain_reference(cfg, x1, x2)).values())
    if u <= chain_ulps:
        say(f"{label}: {_fmt(u)} ulp of milsim's chain (within {chain_ulps:g})")
        return True
    say(f"{label}: FAIL: {_fmt(u)} ulp from milsim's chain (more than {chain_ulps:g}); "
        f"training with {SEPARATE_SURFACES_ENV}=1 gives the two a Surface each")
    return False


def selftest(cfg, name: str, seed: int = 0, out=None, ane_factory=None, predict=None) -> int:
    """Print the report for ``cfg`` to ``out`` (stdout) and return the exit status.

    ``ane_factory`` (for ``AneKernels``) and ``predict`` (package, input -> output) stand
    in for the private-API ANE kernel and Core ML's prediction (tests); with them the two
    Mac paths run anywhere."""
    import numpy as np

    from .. import coreml_check as cc
    from ..kernel_layout import KERNEL_NAMES
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
    say("paths:")
    say("  milsim       anecy's fp16 MIL interpreter (the reference): runs")
    say(f"  coremltools  Apple's iOS18 opset: types, values, blobs, .mlpackage: runs "
        f"(within {cc.VALUE_ULPS:g} ulp of milsim)")
    paths = _Paths(cfg, ane_factory, predict, say)
    ran = ["milsim", "coremltools"] + [p for p in ("ane", "coreml")
                                       if p not in paths.unavailable + paths.failed]
    cols = ["kernel", "ops", "coremltools", "ulp", "ane", "coreml"]
    if "ane" in ran and "coreml" in ran:
        cols.append("ane~coreml")
    say("")
    say(_table_line(cols))
    failed, worst = [], dict.fromkeys(ran[1:], 0.0)
    with tempfile.TemporaryDirectory(prefix="anecy-selftest-") as tmp:
        for i, kernel in enumerate(KERNEL_NAMES):
            x = cc.random_input(kernel, cfg, seed + i)
            row, problems, ulps = _check(kernel, cfg, x, Path(tmp) / kernel, paths, cols)
            say(_table_line(row))
            for p in problems:
                say(f"    {kernel}: {p}")
            if problems:
                failed.append(kernel)
            for p, u in ulps.items():
                worst[p] = max(worst[p], u)
    chain_failed = paths.ane is not None and not _chain(cfg, seed, paths, say)
    say("")
    say("ulp: the largest difference from milsim over the kernel's output blocks, in fp16 "
        "ulps of each block's largest value")
    if not paths.unavailable:
        note = ""
    elif sys.platform != "darwin":
        note = "; the ANE paths need macOS on Apple Silicon"
    else:
        note = f"; not available here: {', '.join(paths.unavailable)}"
    secs = time.perf_counter() - t0
    if failed or paths.failed or chain_failed:
        what = [f"{len(failed)} of {len(KERNEL_NAMES)} kernels ({', '.join(failed)})"] \
            if failed else []
        what += [f"the {p} path did not start" for p in paths.failed]
        what += ["the ane's sdpaBwd1 -> sdpaBwd2 chain"] if chain_failed else []
        say(f"result: FAIL: {'; '.join(what)}; paths run: {', '.join(ran)}{note} "
            f"({secs:.1f} s)")
        return 1
    worst_s = ", ".join(f"{p} {_fmt(u)}" for p, u in worst.items())
    say(f"result: OK: all {len(KERNEL_NAMES)} kernels agree on {', '.join(ran)} "
        f"(worst ulp: {worst_s}){note} ({secs:.1f} s)")
    return 0
