"""The two Mac paths of ``anecy selftest``: running a kernel's program on the Neural Engine
through the ane backend (private API), and through Core ML's public prediction API.

Each path has a status, (usable, why not) (the ane's is ``anecy.backends.ane_status``),
and a runner: a function from a packed fp16 input to the program's fp16 output, which
``anecy.commands.selftest`` compares with milsim's output on the same input
(``anecy.coreml_check`` supplies the inputs, the ulp measure and coremltools). Off macOS
neither path runs; the tests run their code with stand-ins for the device.
"""

from __future__ import annotations

import sys

import numpy as np

from . import mil, milsim
from .backends import kernels_class
from .coreml_check import _quiet, load_coremltools
from .errors import BackendUnavailable
from .kernel_layout import layout

__all__ = ["DEVICE_ULPS", "CHAIN_ULPS", "coreml_prediction_status", "coreml_predictor",
           "ane_runner", "with_probs_of", "sdpa_backward_chain_reference"]

# A device (the ANE, or Core ML's prediction) against milsim. The sim backend's fp16 error
# against exact arithmetic is bounded by up to 16 U = 2^-7 of a block's largest value, i.e.
# 8-16 ulps (tests/fp16_bounds.py); an independent fp16 implementation held to the same
# bound can differ from milsim by twice that. Unverified on hardware.
DEVICE_ULPS = 32.0
# sdpaBwd1 -> sdpaBwd2 chained: sdpaBwd2 runs on sdpaBwd1's probs, each program within
# DEVICE_ULPS of milsim's, so the chain is held to twice that (selftest, the probe).
CHAIN_ULPS = 2 * DEVICE_ULPS


# =========================================================================================
# Core ML's public prediction API (macOS)
# =========================================================================================

def coreml_prediction_status():
    """(usable, why not) for running a package through Core ML's public API here."""
    if sys.platform != "darwin":
        return False, f"Core ML runs only on macOS (this is {sys.platform})"
    try:
        load_coremltools()
    except BackendUnavailable as e:
        return False, str(e)
    try:
        with _quiet():
            from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except ImportError as e:
        return False, f"coremltools has no Core ML bindings here ({e})"
    return True, ""


def coreml_predictor(compute_units: str = "CPU_AND_NE"):
    """A function (package path, fp16 input) -> fp16 output through
    ``coremltools.models.MLModel(..., compute_units=...)``. macOS only."""
    ct = load_coremltools()
    units = getattr(ct.ComputeUnit, compute_units)

    def predict(package, x):
        model = ct.models.MLModel(str(package), compute_units=units)
        spec = model.get_spec()
        name_in = spec.description.input[0].name
        name_out = spec.description.output[0].name
        y = model.predict({name_in: np.asarray(x, np.float16)})[name_out]
        return np.asarray(y).astype(np.float16)
    return predict


# =========================================================================================
# The ane backend (private API, macOS on Apple Silicon)
# =========================================================================================


def ane_runner(cfg, kernel_factory=None, share_surfaces=None):
    """A function (kernel, fp16 input [1, C, 1, W]) -> fp16 output [1, C', 1, S] that runs
    the ane backend's own compiled program on exactly that input: an ``AneKernels`` bound to
    a cpu Model of ``cfg`` (which gives it its Surfaces and compiles the ten programs once),
    the input written into the kernel's input Surface, then ``execute``. The input carries
    its weights, so nothing is staged. ``kernel_factory`` replaces the private-API
    ``AneKernel`` (tests); ``share_surfaces`` (default: as training decides) says whether
    sdpaBwd1's output Surface is sdpaBwd2's input."""
    from .model import Model
    AneKernels = kernels_class("ane")
    model = Model(cfg, backend="cpu", seed=0)
    kernels = AneKernels() if kernel_factory is None else AneKernels(kernel_factory)
    if share_surfaces is not None:
        kernels.share_surfaces = share_surfaces
    kernels.bind(model.engine)

    def run(kernel, x):
        lay = layout(kernel, cfg)
        src, dst = kernels.input_surface(kernel, 0), kernels.output_surface(kernel)
        with src:
            kernels.input_buffer(kernel, 0)[...] = np.asarray(x, np.float16).reshape(
                lay.in_shape[1], lay.in_shape[3])
        kernels.execute(kernel, 0)     # the ANE must not run on locked Surfaces
        with dst:
            y = np.array(kernels.output_buffer(kernel), np.float16)
        return y.reshape(lay.out_shape)

    def chain(x1, x2):
        """sdpaBwd1 on x1, then sdpaBwd2 on the probs/dprobs sdpaBwd1 left for it, with
        x2's q and k_rep packed around them, as training runs the two (their shared
        Surface: sdpaBwd1's output is sdpaBwd2's input); sdpaBwd2's fp16 output."""
        y1 = run("sdpaBwd1", x1)
        lay = layout("sdpaBwd2", cfg)
        x = with_probs_of(cfg, x2, y1).reshape(lay.in_shape[1], lay.in_shape[3])
        dst = kernels.input_surface("sdpaBwd2")
        shared = kernels.output_surface("sdpaBwd1") is dst
        buf = kernels.input_buffer("sdpaBwd2")
        with dst:
            for b in lay.inputs:
                if not (shared and b.name in ("probs", "dprobs")):
                    rows, cols = slice(b.row0, b.row0 + b.rows), slice(b.col0, b.col0 + b.cols)
                    buf[rows, cols] = x[rows, cols]
        kernels.execute("sdpaBwd2", 0)
        with kernels.output_surface("sdpaBwd2"):
            y = np.array(kernels.output_buffer("sdpaBwd2"), np.float16)
        return y.reshape(lay.out_shape)

    run.model = model        # the kernels view its weights: keep them alive with run
    run.kernels = kernels
    run.chain = chain
    return run


def with_probs_of(cfg, x2, y1) -> np.ndarray:
    """sdpaBwd2's packed input ``x2`` with its probs and dprobs replaced by those of
    sdpaBwd1's output ``y1``: what training feeds sdpaBwd2."""
    lay1, lay2 = layout("sdpaBwd1", cfg), layout("sdpaBwd2", cfg)
    S = cfg.seq_len
    out = np.asarray(y1, np.float16).reshape(lay1.out_shape[1], S)
    x = np.array(x2, np.float16).reshape(lay2.in_shape[1], lay2.in_shape[3])
    rows1 = {n: (r0, n_rows) for n, r0, n_rows in lay1.outputs}
    for b in lay2.inputs:
        if b.name in ("probs", "dprobs"):
            r0, n_rows = rows1[b.name]
            x[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols] = out[r0:r0 + n_rows]
    return x.reshape(lay2.in_shape)


def sdpa_backward_chain_reference(cfg, x1, x2) -> np.ndarray:
    """milsim's sdpaBwd1 on x1, then its sdpaBwd2 on with_probs_of(x2, that output)."""
    y1 = milsim.run(mil.generate("sdpaBwd1", cfg), x1)
    return milsim.run(mil.generate("sdpaBwd2", cfg), with_probs_of(cfg, x2, y1))
