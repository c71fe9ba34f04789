# cython: language_level=3
"""Test and benchmark entry points of the kernel backends.

- ``kernel_io`` / ``run_kernel`` / ``stage``: call one kernel of any bound Kernels (cpu,
  sim, ane) by name, without the GIL, as the engine does.
- ``pack_activations`` / ``unpack_outputs``: one half of a packed kernel call (the
  staging plan alone), to compare it with the numpy packing of ``anecy.kernel_layout``.
- ``NullAneKernel`` / ``PyAneKernel``: stand-ins for ``anecy._ane_runtime.AneKernel`` that
  replace only the program execution, so that ``AneKernels``' own code runs where there
  is no ANE: in C (returns at once, or after a set delay, or fails with a set message),
  or by calling a Python ``evaluate(request)`` with the GIL.
- ``hold_gil_until_calls``: hold the GIL in a busy loop until a Kernels object has run a
  number of calls, to show which backends need the GIL to make progress.
"""

import re

import numpy as np

from .kernel_layout import KERNEL_NAMES, KERNELS

from libc.string cimport strncpy
from posix.time cimport nanosleep, timespec

from ._engine cimport Kernels, Dims
from ._worker cimport now_ms
from ._ane_runtime cimport AneKernel, AneRequest, Evaluator, Surface
from ._packed cimport PackedKernels, MAX_ARGS
from ._packed import METHODS, WEIGHTED, _io


def _mil_name(str name):
    if name in KERNELS:
        return name
    if name in METHODS:
        return METHODS[name]
    raise KeyError(f"unknown kernel {name!r}; known: {', '.join(METHODS)}")


def kernel_io(Kernels k, str name):
    """(inputs, outputs) of kernel ``name`` (engine method name or MIL name) for a bound
    Kernels: lists of (array name, channels), every array being [channels, seq_len] fp32,
    in the order of the kernel method's arguments (names: the layout table's)."""
    return _io(k, _mil_name(name))


cdef int _pointers(dict a, list names, float** out) except -1:
    cdef float[:, ::1] mv
    for i, n in enumerate(names):
        v = a.get(n)
        if v is None:
            out[i] = NULL
        else:
            mv = v
            out[i] = &mv[0, 0]
    return 0


cdef dict _arrays(Kernels k, str kernel, dict arrays, bint with_outputs):
    cdef Dims d = k.d
    ins, outs = _io(k, kernel)
    if sorted(arrays) != sorted(n for n, _ in ins):
        raise TypeError(f"{kernel} takes inputs {[n for n, _ in ins]}, got {sorted(arrays)}")
    a = {}
    for n, c in ins:
        v = np.ascontiguousarray(arrays[n], dtype=np.float32)
        if v.shape != (c, d.S):
            raise ValueError(f"{kernel}: {n} must have shape {(c, d.S)}, got {v.shape}")
        a[n] = v
    if with_outputs:
        for n, c in outs:
            a[n] = np.zeros((c, d.S), np.float32)
    return a


def run_kernel(Kernels k, str name, int layer=0, **arrays):
    """Run kernel ``name`` of a bound Kernels ``k`` (layer ``layer``'s weights) on the given
    fp32 [channels, seq_len] inputs, without the GIL as the engine does; returns the
    outputs {name: fp32 array} (see kernel_io). Errors the kernels caught are raised."""
    if k.layers == NULL:
        raise RuntimeError("the Kernels object is not bound to an Engine")
    cdef Dims d = k.d
    if not 0 <= layer < d.L:
        raise IndexError(f"layer {layer} is outside [0, {d.L})")
    kernel = _mil_name(name)
    ins, outs = _io(k, kernel)
    a = _arrays(k, kernel, arrays, True)
    cdef float* p[MAX_ARGS]
    _pointers(a, [n for n, _ in ins] + [n for n, _ in outs], p)
    cdef int l = layer
    cdef int which = list(METHODS.values()).index(kernel)
    with nogil:
        if which == 0:
            k.sdpa_fwd(l, p[0], p[1], p[2], p[3], p[4], p[5], p[6])
        elif which == 1:
            k.wo_fwd(l, p[0], p[1])
        elif which == 2:
            k.ffn_fused(l, p[0], p[1], p[2], p[3], p[4], p[5])
        elif which == 3:
            k.ffn_bwd_w2t(l, p[0], p[1])
        elif which == 4:
            k.ffn_bwd_w13t(l, p[0], p[1], p[2])
        elif which == 5:
            k.wot_bwd(l, p[0], p[1])
        elif which == 6:
            k.sdpa_bwd1(p[0], p[1], p[2], p[3], p[4], p[5], p[6])
        elif which == 7:
            k.sdpa_bwd2(p[0], p[1], p[2], p[3], p[4], p[5])
        elif which == 8:
            k.q_bwd(l, p[0], p[1])
        elif which == 9:
            k.kv_bwd(l, p[0], p[1], p[2])
    k.raise_pending()
    return {n: a[n] for n, _ in outs}


def stage(Kernels k):
    """Call k.stage_weights() (the engine does this in Engine.stage_weights)."""
    with nogil:
        k.stage_weights()
    k.raise_pending()


def pack_activations(PackedKernels k, str name, int layer=0, **arrays):
    """Run only the activation half of kernel ``name``'s staging plan: the fp32 inputs
    converted into its input Surface (layer ``layer``'s; sdpaBwd1/2: the shared one)."""
    kernel = _mil_name(name)
    ins, _ = _io(k, kernel)
    a = _arrays(k, kernel, arrays, False)
    cdef float* p[MAX_ARGS]
    _pointers(a, [n for n, _ in ins], p)
    cdef int kid = KERNEL_NAMES.index(kernel), l = layer, rc
    with nogil:
        rc = k.pack_only(kid, l, p)
    if rc != 0:
        raise RuntimeError(f"{kernel}: could not lock the input Surface")


def unpack_outputs(PackedKernels k, str name, int layer=0):
    """Run only the output half of kernel ``name``'s staging plan: its output Surface (layer
    ``layer``'s for sdpaFwd) converted to fp32 arrays {name: [channels, seq_len]}."""
    kernel = _mil_name(name)
    ins, outs = _io(k, kernel)
    cdef Dims d = k.d
    a = {n: np.zeros((c, d.S), np.float32) for n, c in outs}
    cdef float* p[MAX_ARGS]
    _pointers(a, [None] * len(ins) + [n for n, _ in outs], p)
    if not 0 <= layer < d.L:
        raise IndexError(f"layer {layer} is outside [0, {d.L})")
    # sdpaBwd1/2 have one call (layer 0) in the plan
    cdef int kid = KERNEL_NAMES.index(kernel), l = layer if kernel in WEIGHTED else 0, rc
    with nogil:
        rc = k.unpack_only(kid, l, p)
    if rc != 0:
        raise RuntimeError(f"{kernel}: could not lock the output Surface")
    return a


def refuse_locks(Surface s, bint refuse=True):
    """Make every later lock of ``s`` fail (error paths of the staging plans)."""
    s.mem.refuse_lock = refuse


def hold_gil_until_calls(PackedKernels k, long calls, double timeout_s):
    """Spin, holding the GIL throughout, until ``k`` has run ``calls`` kernel calls or
    ``timeout_s`` seconds have passed; returns k.calls. A thread that needs the GIL to
    run a kernel call makes no progress meanwhile."""
    cdef double end = now_ms() + 1e3 * timeout_s
    while k.calls < calls and now_ms() < end:
        pass
    return k.calls


# -----------------------------------------------------------------------------------------
# Stand-ins for AneKernel: everything of the ane path runs except the program itself
# -----------------------------------------------------------------------------------------

cdef struct NullState:
    long delay_ns         # each evaluation sleeps this long (0: returns at once)
    long evaluations
    bint fail
    char message[256]


cdef int _null_evaluate(void* ctx, char* err, size_t err_len) noexcept nogil:
    cdef NullState* st = <NullState*>ctx
    cdef timespec ts
    st.evaluations += 1
    if st.delay_ns > 0:
        ts.tv_sec = st.delay_ns // 1000000000
        ts.tv_nsec = st.delay_ns % 1000000000
        nanosleep(&ts, NULL)
    if st.fail:
        strncpy(err, st.message, err_len - 1)
        err[err_len - 1] = 0
        return -1
    return 0


cdef AneRequest _request(AneKernel kernel, Surface input, Surface output):
    cdef AneRequest req = AneRequest.__new__(AneRequest)
    req.kernel = kernel
    req.input = input
    req.output = output
    return req


cdef class _StandInKernel(AneKernel):
    """What the stand-ins share: nothing is compiled, ``bind`` accepts host Surfaces, and
    an evaluator is handed out only for this kernel's own requests."""

    def __init__(self, text, blobs, name):
        self.name = str(name)

    def bind(self, Surface input not None, Surface output not None):
        return _request(self, input, output)

    cdef void _check_own(self, AneRequest request) except *:
        if request is None or request.kernel is not self:
            raise ValueError(f"{self.name}: the request was not made by this kernel's bind()")


cdef class NullAneKernel(_StandInKernel):
    """An AneKernel whose program execution, in C and without the GIL, does nothing (the
    output Surface keeps what it holds), optionally after ``delay_us`` microseconds, or
    fails with ``message`` when ``fail`` is set. Nothing is compiled."""
    cdef NullState state
    cdef readonly object text, blobs

    def __init__(self, text, blobs, name):
        _StandInKernel.__init__(self, text, blobs, name)
        self.text, self.blobs = text, blobs

    cdef Evaluator evaluator(self, AneRequest request) except *:
        cdef Evaluator ev
        self._check_own(request)
        ev.fn = _null_evaluate
        ev.ctx = &self.state
        return ev

    @property
    def evaluations(self):
        return self.state.evaluations

    @property
    def delay_us(self):
        return self.state.delay_ns / 1e3

    @delay_us.setter
    def delay_us(self, double us):
        self.state.delay_ns = <long>(us * 1e3)

    def fail_with(self, message):
        """Fail every later evaluation with ``message`` (None: succeed again)."""
        self.state.fail = message is not None
        if message is not None:
            strncpy(self.state.message, str(message).encode()[:255], 255)
            self.state.message[255] = 0


cdef int _py_evaluate(void* ctx, char* err, size_t err_len) noexcept nogil:
    with gil:
        try:
            request = <object>ctx
            request.kernel.evaluate(request)
            return 0
        except BaseException as e:
            strncpy(err, str(e).encode("utf-8", "replace")[:err_len - 1], err_len - 1)
            err[err_len - 1] = 0
            return -1


cdef class PyAneKernel(_StandInKernel):
    """An AneKernel whose program execution calls ``self.evaluate(request)`` from Python
    (taking the GIL); an exception's text becomes the evaluation's error text. Subclass
    it and define ``evaluate``; ``bind`` accepts host Surfaces."""

    cdef Evaluator evaluator(self, AneRequest request) except *:
        cdef Evaluator ev
        self._check_own(request)
        ev.fn = _py_evaluate
        ev.ctx = <void*>request
        return ev
