"""Kernel executors behind one interface: ``cpu`` | ``sim`` | ``ane``.

``cpu`` runs everywhere. ``sim`` (the ANE's MIL programs run by a numpy interpreter)
and ``ane`` (the Apple Neural Engine itself) plug in behind the same Kernels interface.
"""
import sys

from .errors import BackendUnavailable, ConfigError

BACKENDS = ("cpu", "sim", "ane")


def available():
    """Backends this machine and this build can run, best first (``sim`` is never best:
    it is the ANE's programs run by a slow numpy interpreter, for testing)."""
    return ["cpu", "sim"]


def _why_unavailable(name):
    if name == "ane":
        if sys.platform != "darwin":
            return "the ane backend needs macOS on Apple Silicon; this machine runs " + sys.platform
        return "the ane backend is not part of this build"
    return f"the {name} backend is not part of this build"


def resolve(name):
    """Turn a user's choice (``auto`` or a backend name) into a backend this machine runs."""
    if name == "auto":
        return available()[0]
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name not in available():
        raise BackendUnavailable(_why_unavailable(name))
    return name


# fp16 backward gradients underflow without a loss scale; 4096 was measured to lose no
# gradient entries of the tiny and stories110m models while leaving ~500x headroom below
# fp16's maximum at initialisation (tests/test_sim.py prints the sweep).
DEFAULT_LOSS_SCALE = {"cpu": 1.0, "sim": 4096.0, "ane": 4096.0}


# Whether weight gradients go to the background worker. With an ANE the CPU is free
# while the kernels run, so the dW sgemms overlap them (the reference's design). On the
# cpu backend the BLAS already uses every core; a second BLAS caller only contends
# (measured on 2 cores, stories110m: forward+backward 1.0 s inline vs 1.15 s async).
DEFAULT_ASYNC_DW = {"cpu": False, "sim": True, "ane": True}


def make_kernels(name):
    """A fresh Kernels object for a resolved backend name."""
    name = resolve(name)
    if name == "cpu":
        from ._engine import CpuKernels
        return CpuKernels()
    if name == "sim":
        from ._sim import SimKernels
        return SimKernels()
    raise BackendUnavailable(_why_unavailable(name))
