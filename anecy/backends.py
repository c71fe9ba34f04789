"""Kernel executors behind one interface: ``cpu`` | ``sim`` | ``ane``.

``cpu`` runs everywhere. ``sim`` (the ANE's MIL programs run by a numpy interpreter)
and ``ane`` (the Apple Neural Engine itself) plug in behind the same Kernels interface.
"""
import sys

from .errors import BackendUnavailable, ConfigError

BACKENDS = ("cpu", "sim", "ane")


def available():
    """Backends this machine and this build can run, best first."""
    return ["cpu"]


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


def make_kernels(name):
    """A fresh Kernels object for a resolved backend name."""
    name = resolve(name)
    if name == "cpu":
        from ._engine import CpuKernels
        return CpuKernels()
    raise BackendUnavailable(_why_unavailable(name))
