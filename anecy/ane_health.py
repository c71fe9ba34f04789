"""What the ane backend does before it trusts the hardware, and when the hardware disagrees.

- ``device()``: the chip and the macOS version and build, named in every failure and in
  ``anecy bench``'s results.
- The compile budget: the ANE leaks resources after about 119 compiles in one process
  (maderix/ANE's README; mechramc/Orion's docs/ane_constraints.md, #5). Every program handed
  to a compiler is counted (``spend_compile``), and the one that would go past
  ``COMPILE_BUDGET`` is refused with one line instead of risking a process that fails later.
- ``AneFailure``: a program that failed to compile, load (bind) or evaluate, with the kernel,
  layer, shapes, chip and macOS version in its one line. It is an AnecyError, so the command
  line prints that line and exits with status 2 (``--backend ane``); with ``--backend auto``
  the trainer says it and continues on the cpu backend (``build_model``, ``fall_back``).
- The shared-surface probe: anecy binds one IOSurface as sdpaBwd1's output and sdpaBwd2's
  input, which nobody has verified on hardware. When the ane backend starts on a Mac it runs
  one sdpaBwd1 -> sdpaBwd2 chain through the shared Surface and the same chain with a
  Surface each, on the same inputs, and holds them to the bound ``anecy selftest`` holds the
  chain to. If they disagree (or the shared chain fails), training uses a Surface each (what
  ``ANECY_SEPARATE_SURFACES=1`` does) after one line saying so. The result is cached per
  chip and macOS build in a small JSON file (``cache_path()``), so the probe runs once.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .errors import BackendUnavailable

__all__ = ["COMPILE_BUDGET", "AneFailure", "device", "spend_compile", "compiles_spent",
           "failure", "cache_path", "probe_shared_surface", "shared_surface_ok",
           "build_model", "fall_back"]

# ~119 compiles per process leak the ANE (maderix/ANE README "Limitations"; Orion #5).
COMPILE_BUDGET = 119
# Where the probe results live; ANECY_CACHE_DIR overrides (tests, shared machines).
CACHE_ENV = "ANECY_CACHE_DIR"
CACHE_FILE = "ane_probes.json"
# The probe's model shape: the smallest preset the ane backend runs (seq_len >= 32).
PROBE_PRESET = "tiny"
PROBE_KEY = "shared_surface"
# Device keys whose failed probe this process has already said (one line each).
_SAID = set()


class AneFailure(BackendUnavailable):
    """A program the Apple Neural Engine would not compile, load or evaluate, or a compile
    past the budget. ``stage``, ``kernel`` and ``layer`` (-1: every layer) say where."""

    def __init__(self, message, stage="", kernel="", layer=-1):
        super().__init__(message)
        self.stage, self.kernel, self.layer = stage, kernel, layer


# =========================================================================================
# The machine
# =========================================================================================

_DEVICE = None


def _sysctl(name):
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def device() -> dict:
    """{"chip", "os", "os_build"}: on a Mac the chip's name (``Apple M2 Max``), the macOS
    version and build; elsewhere the machine and system."""
    global _DEVICE
    if _DEVICE is None:
        if sys.platform == "darwin":
            _DEVICE = {"chip": _sysctl("machdep.cpu.brand_string") or platform.machine(),
                       "os": f"macOS {platform.mac_ver()[0] or '?'}",
                       "os_build": _sysctl("kern.osversion") or "?"}
        else:
            _DEVICE = {"chip": f"{platform.machine()} (no Neural Engine)",
                       "os": f"{platform.system()} {platform.release()}",
                       "os_build": platform.version()[:60]}
    return dict(_DEVICE)


def _where():
    d = device()
    return f"{d['chip']}, {d['os']} ({d['os_build']})"


# =========================================================================================
# The compile budget
# =========================================================================================

_SPENT = [0]


def compiles_spent() -> int:
    """Programs handed to a compiler in this process (stand-ins included)."""
    return _SPENT[0]


def spend_compile(kernel: str) -> None:
    """Count one compile of ``kernel``; refuse the one past COMPILE_BUDGET."""
    if _SPENT[0] >= COMPILE_BUDGET:
        raise AneFailure(f"compiling {kernel} would be compile {_SPENT[0] + 1} of this "
                         f"process, past the ANE's budget of about {COMPILE_BUDGET} (it leaks "
                         "resources beyond it); start a new process", "compile", kernel)
    _SPENT[0] += 1


# =========================================================================================
# Failures
# =========================================================================================

def failure(stage: str, kernel: str, layer: int, cfg, error) -> AneFailure:
    """The AneFailure of ``kernel`` (at ``layer``, -1 for every layer) that failed to
    ``stage`` (compile, load, evaluate), naming its shapes and this machine."""
    from .kernel_layout import input_shape, output_shape
    where = "every layer" if layer is None or layer < 0 else f"layer {layer}"
    shapes = ""
    if cfg is not None and kernel:
        fmt = lambda s: "[" + ",".join(str(int(n)) for n in s) + "]"   # noqa: E731
        shapes = (f", input {fmt(input_shape(kernel, cfg))} -> output "
                  f"{fmt(output_shape(kernel, cfg))}")
    why = " ".join(str(error).split())[:300] or type(error).__name__
    return AneFailure(f"the ane backend could not {stage} {kernel or 'a program'} ({where}"
                      f"{shapes}) on {_where()}: {why}", stage, kernel, layer)


def _from_error(e, cfg):
    """An AneFailure for any error the ane backend raised (an evaluation's AneError
    carries the kernel and layer that ``raise_pending`` names)."""
    if isinstance(e, AneFailure):
        return e
    return failure(getattr(e, "stage", "run"), getattr(e, "kernel", ""),
                   getattr(e, "layer", -1), cfg, e)


def build_model(make, backend_choice: str, backend: str, cfg, log):
    """(model, backend): ``make(backend)``; when the ane backend fails to start (a
    program that does not compile or load) under ``--backend auto``, one line and the cpu
    backend; under ``--backend ane``, the AneFailure (one line, exit status 2)."""
    from ._ane_runtime import AneError
    if backend != "ane":
        return make(backend), backend
    try:
        return make("ane"), "ane"
    except (AneError, AneFailure) as e:
        err = _from_error(e, cfg)
        if backend_choice != "auto":
            raise err from None
        log(f"{err}; training continues on the cpu backend")
        return make("cpu"), "cpu"


def fall_back(trainer, error) -> None:
    """An evaluation on the ANE failed during a microstep: under ``--backend auto``, say so
    in one line and move the model to the cpu backend (the gradients of the accumulation in
    progress, poisoned by the failure, are dropped); under ``--backend ane``, raise the
    AneFailure. No checkpoint is written either way by this call."""
    err = _from_error(error, trainer.model.config)
    if trainer.tc.backend != "auto":
        raise err from None
    trainer.log(f"{err}; training continues on the cpu backend")
    trainer.model.switch_backend("cpu")
    trainer.backend = "cpu"
    trainer.pending = 0


# =========================================================================================
# The shared-surface probe
# =========================================================================================

def cache_path() -> Path:
    """The probe cache: ``$ANECY_CACHE_DIR/ane_probes.json``, else the user cache
    directory (``~/Library/Caches/anecy`` on macOS, ``$XDG_CACHE_HOME/anecy`` or
    ``~/.cache/anecy`` elsewhere)."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / CACHE_FILE
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "anecy" / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "anecy" / CACHE_FILE


def _device_key():
    d = device()
    return f"{d['chip']} | {d['os_build']}"


def _read_cache() -> dict:
    from .jsonio import loads
    try:
        data = loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}          # missing or unreadable: probe again, and rewrite it
    return data if isinstance(data, dict) else {}


def _write_cache(entry: dict) -> None:
    from .fileio import atomic_write
    path = cache_path()
    data = _read_cache()
    data.setdefault(_device_key(), {})[PROBE_KEY] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write((json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    except OSError:
        pass               # an unwritable cache costs a probe per start, nothing else


def probe_shared_surface(kernel_factory=None, seed: int = 0) -> dict:
    """Run sdpaBwd1 -> sdpaBwd2 through their shared Surface and with a Surface each on
    the same inputs (the ``tiny`` shapes); {"ok", "ulp", "bound", "why"}: ok when both
    ran and agree within the chain bound of ``anecy selftest``; "decided" is False when
    the separate-surface chain (the reference: the path training falls back to) could not
    run, so the result says nothing about sharing and is not cached."""
    from . import coreml_check as cc
    from . import selftest_runners as runners
    from .config import ModelConfig
    cfg = ModelConfig.preset(PROBE_PRESET)
    bound = runners.CHAIN_ULPS
    x1 = cc.random_input("sdpaBwd1", cfg, seed + 100)
    x2 = cc.random_input("sdpaBwd2", cfg, seed + 101)
    try:
        separate = runners.ane_runner(cfg, kernel_factory, share_surfaces=False).chain(x1, x2)
    except Exception as e:    # noqa: BLE001 - the device's error is the result
        return {"ok": False, "ulp": None, "bound": bound, "decided": False,
                "why": f"the separate-surface chain failed: {cc._one_line(e)}"}
    try:
        shared = runners.ane_runner(cfg, kernel_factory, share_surfaces=True).chain(x1, x2)
    except Exception as e:    # noqa: BLE001
        return {"ok": False, "ulp": None, "bound": bound, "decided": True,
                "why": f"the shared-surface chain failed: {cc._one_line(e)}"}
    u = max(cc.block_ulps("sdpaBwd2", cfg, shared, separate).values())
    ok = bool(u <= bound)
    why = "" if ok else (f"the shared-surface chain differs from the separate-surface one "
                         f"by {u:.3g} ulp (more than {bound:g})")
    return {"ok": ok, "ulp": None if u == float("inf") else float(u), "bound": bound,
            "decided": True, "why": why}


def shared_surface_ok(kernel_factory=None, log=print) -> bool:
    """Whether sdpaBwd1's output Surface may be sdpaBwd2's input on this chip and macOS
    build: the cached probe result, or a new probe (then cached). False is said in one
    line (once per process); training then gives the two a Surface each."""
    key = _device_key()
    entry = _read_cache().get(key, {}).get(PROBE_KEY)
    if not (isinstance(entry, dict) and isinstance(entry.get("ok"), bool)):
        t0 = time.perf_counter()
        entry = probe_shared_surface(kernel_factory)
        entry.update(anecy=__version__, seconds=round(time.perf_counter() - t0, 3),
                     when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if not entry.pop("decided"):  # the ANE ran neither chain: the model's own compile
            return False              # will fail and say why; nothing is learnt or cached
        _write_cache(entry)
    if not entry["ok"] and key not in _SAID:
        _SAID.add(key)
        log(f"ane: one Surface shared by sdpaBwd1 and sdpaBwd2 failed its probe on "
            f"{_where()} ({entry.get('why') or 'no reason recorded'}); training gives the "
            f"two a Surface each (as ANECY_SEPARATE_SURFACES=1 does; result cached in "
            f"{cache_path()})")
    return entry["ok"]



def _on_hardware(kernels) -> bool:
    """Whether ``kernels`` will run on the Neural Engine itself (the real shim and the
    private-API AneKernel, not a stand-in executor)."""
    from ._ane_runtime import SHIM_COMPILED, AneKernel
    return bool(SHIM_COMPILED) and kernels.kernel_factory is AneKernel


def start(kernels, log=print):
    """Prepare a new AneKernels before it is bound: on the Neural Engine itself, trust the
    shared Surface only if its probe passed on this chip and macOS build."""
    from ._packed import SEPARATE_SURFACES_ENV
    if os.environ.get(SEPARATE_SURFACES_ENV, "") == "1":
        kernels.share_surfaces = False
    elif _on_hardware(kernels):
        kernels.share_surfaces = shared_surface_ok(kernels.kernel_factory, log)
    return kernels
