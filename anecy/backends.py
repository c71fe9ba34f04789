"""Kernel executors behind one interface: ``cpu`` | ``sim`` | ``ane``.

``cpu`` runs everywhere. ``sim`` (the ANE's MIL programs run by a numpy interpreter)
and ``ane`` (the Apple Neural Engine itself, macOS on Apple Silicon) plug in behind the
same Kernels interface and share all of their packing code (anecy._packed.PackedKernels).
"""

from contextlib import contextmanager

from .errors import BackendUnavailable, ConfigError

BACKENDS = ("cpu", "sim", "ane")


# The ane backend's program executor when it is not the Neural Engine: None (the private
# API's AneKernel), or a stand-in such as anecy._testing.NullAneKernel, with which the ane
# backend's host side runs anywhere (``anecy bench`` off a Mac, benchmarks, tests).
_ANE_STAND_IN = [None]


@contextmanager
def ane_stand_in(factory):
    """Inside the block, ``ane`` is available and its programs run on ``factory`` (called
    as AneKernel is: ``factory(mil_text, blobs, name)``), not on the Neural Engine."""
    saved = _ANE_STAND_IN[0]
    _ANE_STAND_IN[0] = factory
    try:
        yield
    finally:
        _ANE_STAND_IN[0] = saved


def available():
    """Backends this machine and this build can run: ``cpu`` and ``sim`` everywhere, then
    ``ane`` where the Apple Neural Engine is usable (anecy._ane_runtime.ane_available()).
    ``resolve("auto")`` picks ``ane`` when it is listed, else ``cpu``; ``sim`` (the ANE's
    programs run by a slow numpy interpreter, for testing) is never picked by ``auto``."""
    names = ["cpu", "sim"]
    if _ANE_STAND_IN[0] is not None or ane_status()[0]:
        names.append("ane")
    return names


def ane_status():
    """(usable, why not) for the Apple Neural Engine in this process: the one check, read by
    ``available`` and by ``anecy selftest``."""
    from ._ane_runtime import ane_available
    return ane_available()


def _why_unavailable(name):
    if name == "ane":
        ok, why = ane_status()
        if not ok:
            return f"the ane backend is unavailable: {why}"
        return "the ane backend is not part of this build"
    return f"the {name} backend is not part of this build"


def resolve(name):
    """Turn a user's choice (``auto`` or a backend name) into a backend this machine runs."""
    if name == "auto":
        return "ane" if "ane" in available() else "cpu"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name not in available():
        raise BackendUnavailable(_why_unavailable(name))
    return name


# fp16 backward gradients underflow without a loss scale; 4096 was measured to lose no
# gradient entries of the tiny and stories110m models while leaving ~500x headroom below
# fp16's maximum at initialisation (tests/test_sim.py prints the sweep).
DEFAULT_LOSS_SCALE = {"cpu": 1.0, "sim": 4096.0, "ane": 4096.0}
# Unless a static scale is asked for, the fp16 backends start there and adjust the scale as
# PyTorch's GradScaler does (halved on overflow, doubled after a run of clean updates).
DYNAMIC_LOSS_SCALE = {"cpu": False, "sim": True, "ane": True}


# Whether weight gradients go to the background worker. With an ANE the CPU is free
# while the kernels run, so the dW sgemms overlap them (the reference's design). On the
# cpu backend the BLAS already uses every core; a second BLAS caller only contends
# (measured on 2 cores, stories110m: forward+backward 1.0 s inline vs 1.15 s async).
DEFAULT_ASYNC_DW = {"cpu": False, "sim": True, "ane": True}


def kernels_class(name):
    """The Kernels class of backend ``name``, whether or not this machine can run it: the
    one place that knows which module holds each."""
    if name == "cpu":
        from ._engine import CpuKernels
        return CpuKernels
    if name == "sim":
        from ._packed import SimKernels
        return SimKernels
    if name == "ane":
        from ._packed import AneKernels
        return AneKernels
    raise BackendUnavailable(_why_unavailable(name))


def make_kernels(name):
    """A fresh Kernels object for a resolved backend name. The ane backend's first start on
    a chip and macOS build probes what anecy assumes of the hardware (anecy.ane_health)."""
    name = resolve(name)
    if name == "ane":
        from .ane_health import start
        stand_in = _ANE_STAND_IN[0]
        return start(kernels_class(name)() if stand_in is None
                     else kernels_class(name)(kernel_factory=stand_in))
    return kernels_class(name)()
