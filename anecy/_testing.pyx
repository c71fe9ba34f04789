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
- ``py_*``: the numeric loops of ``anecy._ops`` on numpy arrays (shapes checked here, so
  the loops never see a wrong one), the Accelerate versions of RMSNorm and
  softmax/CE (``_accel.h``) whatever the platform, and the LoRA adapters' rank-R loops
  (``_lowrank.h``) on either of their paths (``lowrank_choose``).
"""

import re

import numpy as np

from .kernel_layout import KERNEL_NAMES, KERNELS

from libc.stdint cimport uint16_t, uint32_t
from libc.string cimport strncpy
from posix.time cimport nanosleep, timespec

from ._engine cimport Kernels, Dims
from ._ops cimport (sgemm, rmsnorm_fwd, rmsnorm_bwd, rope_fwd, rope_bwd, swiglu_fwd, swiglu_bwd,
                    attention_fwd, attention_bwd1, attention_bwd2, gqa_repeat, gqa_reduce,
                    softmax_xent, embedding_fwd, embedding_bwd, adamw, sumsq)
from ._ops import _same_len
from ._worker cimport now_ms
from ._lowrank cimport (anecy_lowrank_choose, anecy_lowrank_path, anecy_lora_down,
                       anecy_lora_up, anecy_lora_back_out, anecy_lora_back_in)
from ._ane_runtime cimport AneKernel, AneRequest, Evaluator, Surface
from ._packed cimport PackedKernels, MAX_ARGS
from ._packed import METHODS, WEIGHTED, _io

cdef extern from "_accel.h" nogil:
    void anecy_accel_rmsnorm_fwd(const float* x, const float* w, float* y, int C, int S,
                                 float eps, float* scratch)
    void anecy_accel_rmsnorm_bwd(const float* x, const float* w, const float* dy, float* dx,
                                 float* dw, int C, int S, float eps, int accumulate,
                                 float* scratch)
    double anecy_accel_softmax_xent(float* logits, const int* targets, int S, int V,
                                    float grad_scale)

cdef extern from "_mathx.h" nogil:
    float anecy_expf(float x)


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
    """out[i] = the address of a[names[i]] (NULL where absent); every array must be named."""
    cdef float[:, ::1] mv
    if not set(a) <= set(names):
        raise AssertionError(f"arrays {sorted(set(a) - set(names))} are no argument")
    for i, n in enumerate(names):
        v = a.get(n)
        if v is None:
            out[i] = NULL
        else:
            mv = v
            out[i] = &mv[0, 0]
    return 0


cdef dict _arrays(Kernels k, str kernel, dict arrays, bint with_outputs, kept=()):
    cdef Dims d = k.d
    ins, outs = _io(k, kernel)
    ins = [(n, c) for n, c in ins if n not in kept]
    outs = [(n, c) for n, c in outs if n not in kept]
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


def run_kernel(Kernels k, str name, int layer=0, kept=(), **arrays):
    """Run kernel ``name`` of a bound Kernels ``k`` (layer ``layer``'s weights) on the given
    fp32 [channels, seq_len] inputs, without the GIL as the engine does; returns the
    outputs {name: fp32 array} (see kernel_io). The arrays named in ``kept`` are passed as
    KEPT, as the engine does (part of the kernels' attention state: not given, not
    returned); the others are the caller's own. Errors the kernels caught are raised."""
    if k.layers == NULL:
        raise RuntimeError("the Kernels object is not bound to an Engine")
    cdef Dims d = k.d
    if not 0 <= layer < d.L:
        raise IndexError(f"layer {layer} is outside [0, {d.L})")
    kernel = _mil_name(name)
    ins, outs = _io(k, kernel)
    kept = set(kept)
    if not kept <= {n for n, _ in ins + outs}:
        raise TypeError(f"{kernel} has no arrays {sorted(kept - {n for n, _ in ins + outs})}")
    ins = [(n, c) for n, c in ins if n not in kept]
    outs = [(n, c) for n, c in outs if n not in kept]
    a = _arrays(k, kernel, arrays, True, kept)
    cdef float* p[MAX_ARGS]
    cdef int l = layer
    # each kernel's arrays by name, in its method's argument order (the layout table's)
    if kernel == "sdpaFwd":
        _pointers(a, ["xnorm", "attn", "q_rope", "k_rope", "v", "q_pre", "k_pre"], p)
        with nogil:
            k.sdpa_fwd(l, p[0], p[1], p[2], p[3], p[4], p[5], p[6])
    elif kernel == "woFwd":
        _pointers(a, ["attn", "o"], p)
        with nogil:
            k.wo_fwd(l, p[0], p[1])
    elif kernel == "ffnFused":
        _pointers(a, ["x2norm", "x2", "x_next", "h1", "h3", "gate"], p)
        with nogil:
            k.ffn_fused(l, p[0], p[1], p[2], p[3], p[4], p[5])
    elif kernel == "ffnBwdW2t":
        _pointers(a, ["dffn", "dgate"], p)
        with nogil:
            k.ffn_bwd_w2t(l, p[0], p[1])
    elif kernel == "ffnBwdW13t":
        _pointers(a, ["dh1", "dh3", "dx"], p)
        with nogil:
            k.ffn_bwd_w13t(l, p[0], p[1], p[2])
    elif kernel == "wotBwd":
        _pointers(a, ["dy", "da"], p)
        with nogil:
            k.wot_bwd(l, p[0], p[1])
    elif kernel == "sdpaBwd1":
        _pointers(a, ["q", "k_rep", "v_rep", "da", "probs", "dprobs", "dv_rep"], p)
        with nogil:
            k.sdpa_bwd1(l, p[0], p[1], p[2], p[3], p[4], p[5], p[6])
    elif kernel == "sdpaBwd2":
        _pointers(a, ["probs", "dprobs", "q", "k_rep", "dq", "dk_rep"], p)
        with nogil:
            k.sdpa_bwd2(l, p[0], p[1], p[2], p[3], p[4], p[5])
    elif kernel == "qBwd":
        _pointers(a, ["dq", "dx"], p)
        with nogil:
            k.q_bwd(l, p[0], p[1])
    elif kernel == "kvBwd":
        _pointers(a, ["dk", "dv", "dx"], p)
        with nogil:
            k.kv_bwd(l, p[0], p[1], p[2])
    else:
        raise KeyError(f"run_kernel has no call for kernel {kernel!r}")
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


# -----------------------------------------------------------------------------------------
# The numeric loops of anecy._ops on numpy arrays (tests, benchmarks). Arrays are checked
# here, so the loops never see a wrong shape.
# -----------------------------------------------------------------------------------------

def py_sgemm(bint trans_a, bint trans_b, const float[:, ::1] A, const float[:, ::1] B,
             float alpha=1.0):
    """op(A) @ op(B) through the sgemm the engine uses."""
    cdef int M = A.shape[1] if trans_a else A.shape[0]
    cdef int K = A.shape[0] if trans_a else A.shape[1]
    cdef int KB = B.shape[1] if trans_b else B.shape[0]
    cdef int N = B.shape[0] if trans_b else B.shape[1]
    if K != KB:
        raise ValueError(f"inner dimensions differ: {K} and {KB}")
    out = np.zeros((M, N), np.float32)
    cdef float[:, ::1] C = out
    if M and N:
        sgemm(trans_a, trans_b, M, N, K, alpha, &A[0, 0], A.shape[1], &B[0, 0], B.shape[1], 0.0,
              &C[0, 0], N)
    return out


def py_rmsnorm_fwd(const float[:, ::1] x, const float[::1] w, float eps):
    if w.shape[0] != x.shape[0]:
        raise ValueError("weight length must equal the channel count")
    out = np.empty_like(np.asarray(x))
    cdef float[:, ::1] y = out
    cdef double[::1] scratch = np.empty(x.shape[1], np.float64)
    rmsnorm_fwd(&x[0, 0], &w[0], &y[0, 0], x.shape[0], x.shape[1], eps, &scratch[0])
    return out


def py_rmsnorm_bwd(const float[:, ::1] x, const float[::1] w, const float[:, ::1] dy, float eps):
    """Returns (dx, dw)."""
    if w.shape[0] != x.shape[0] or dy.shape[0] != x.shape[0] or dy.shape[1] != x.shape[1]:
        raise ValueError("rmsnorm_bwd: x, w and dy do not agree")
    dx_arr = np.empty_like(np.asarray(x))
    dw_arr = np.zeros(x.shape[0], np.float32)
    cdef float[:, ::1] dx = dx_arr
    cdef float[::1] dw = dw_arr
    cdef double[::1] scratch = np.empty(2 * x.shape[1], np.float64)
    rmsnorm_bwd(&x[0, 0], &w[0], &dy[0, 0], &dx[0, 0], &dw[0], x.shape[0], x.shape[1], eps, 0,
                &scratch[0])
    return dx_arr, dw_arr


def py_rope(float[:, ::1] x, int n_heads, const float[:, ::1] cos_t, const float[:, ::1] sin_t,
            bint half, bint backward=False):
    """Rotate x [n_heads*hd, S] in place."""
    cdef int hd = x.shape[0] // n_heads
    if hd * n_heads != x.shape[0] or hd % 2 or cos_t.shape[0] != hd // 2 \
            or cos_t.shape[1] != x.shape[1] or sin_t.shape[0] != cos_t.shape[0] \
            or sin_t.shape[1] != cos_t.shape[1]:
        raise ValueError("rope: shapes do not agree")
    if backward:
        rope_bwd(&x[0, 0], n_heads, hd, x.shape[1], &cos_t[0, 0], &sin_t[0, 0], half)
    else:
        rope_fwd(&x[0, 0], n_heads, hd, x.shape[1], &cos_t[0, 0], &sin_t[0, 0], half)


def py_swiglu_fwd(const float[::1] h1, const float[::1] h3):
    _same_len(h1, h3, "swiglu")
    out = np.empty(h1.shape[0], np.float32)
    cdef float[::1] g = out
    if h1.shape[0]:
        swiglu_fwd(&h1[0], &h3[0], &g[0], h1.shape[0])
    return out


def py_swiglu_bwd(const float[::1] h1, const float[::1] h3, const float[::1] dgate):
    _same_len(h1, h3, "swiglu")
    _same_len(h1, dgate, "swiglu")
    a = np.empty(h1.shape[0], np.float32)
    b = np.empty(h1.shape[0], np.float32)
    cdef float[::1] dh1 = a
    cdef float[::1] dh3 = b
    if h1.shape[0]:
        swiglu_bwd(&h1[0], &h3[0], &dgate[0], &dh1[0], &dh3[0], h1.shape[0])
    return a, b


cdef const int* _key_start(key_start, int S) except? NULL:
    """The address of a key_start array of S ints in [0, i] (NULL for None)."""
    cdef const int[::1] ks
    if key_start is None:
        return NULL
    ks = key_start
    if ks.shape[0] != S or any(not 0 <= ks[i] <= i for i in range(S)):
        raise ValueError("key_start must hold S ints with 0 <= key_start[i] <= i")
    return &ks[0]


def py_attention_fwd(const float[:, ::1] q, const float[:, ::1] k, const float[:, ::1] v,
                     int n_heads, int n_kv_heads, key_start=None):
    _check_heads(q.shape[0], n_heads, n_kv_heads)
    cdef int S = q.shape[1]
    cdef int hd = q.shape[0] // n_heads
    if k.shape[0] != n_kv_heads * hd or v.shape[0] != k.shape[0] \
            or k.shape[1] != S or v.shape[1] != S:
        raise ValueError("attention: shapes do not agree")
    out = np.empty_like(np.asarray(q))
    cdef float[:, ::1] o = out
    cdef float[::1] probs = np.empty(n_heads * S * S, np.float32)
    attention_fwd(&q[0, 0], &k[0, 0], &v[0, 0], &o[0, 0], n_heads, n_kv_heads, hd, S, &probs[0],
                  _key_start(key_start, S))
    return out


def py_attention_bwd(const float[:, ::1] q, const float[:, ::1] k_rep, const float[:, ::1] v_rep,
                     const float[:, ::1] da, int n_heads, key_start=None):
    """Returns (dq, dk_rep, dv_rep, probs, dprobs) for q, k_rep, v_rep, da of [n_heads*hd, S]."""
    _check_heads(q.shape[0], n_heads, n_heads)
    cdef int S = q.shape[1]
    cdef int hd = q.shape[0] // n_heads
    for shape in (k_rep.shape, v_rep.shape, da.shape):
        if shape[0] != q.shape[0] or shape[1] != S:
            raise ValueError("attention: shapes do not agree")
    shape = (q.shape[0], S)
    dq_a, dk_a, dv_a = (np.empty(shape, np.float32) for _ in range(3))
    p_a = np.empty((n_heads * S, S), np.float32)
    dp_a = np.empty((n_heads * S, S), np.float32)
    cdef float[:, ::1] dq = dq_a, dk = dk_a, dv = dv_a, p = p_a, dp = dp_a
    cdef float[::1] scratch = np.empty(S * S, np.float32)
    attention_bwd1(&q[0, 0], &k_rep[0, 0], &v_rep[0, 0], &da[0, 0], &dv[0, 0], &p[0, 0],
                   &dp[0, 0], n_heads, hd, S, 0, _key_start(key_start, S))
    attention_bwd2(&p[0, 0], &dp[0, 0], &q[0, 0], &k_rep[0, 0], &dq[0, 0], &dk[0, 0], n_heads,
                   hd, S, &scratch[0])
    return dq_a, dk_a, dv_a, p_a, dp_a


def _check_heads(rows, n_heads, n_kv_heads):
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads or rows % n_heads \
            or rows // n_heads == 0:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads "
                         f"({n_kv_heads} key/value heads)")


def py_gqa_repeat(const float[:, ::1] src, int n_heads, int n_kv_heads):
    _check_heads(src.shape[0] * (n_heads // max(n_kv_heads, 1)), n_heads, n_kv_heads)
    if src.shape[0] % n_kv_heads:
        raise ValueError(f"{src.shape[0]} rows do not split into {n_kv_heads} heads")
    cdef int S = src.shape[1]
    cdef int hd = src.shape[0] // n_kv_heads
    out = np.empty((n_heads * hd, S), np.float32)
    cdef float[:, ::1] dst = out
    gqa_repeat(&src[0, 0], &dst[0, 0], n_heads, n_kv_heads, hd, S)
    return out


def py_gqa_reduce(const float[:, ::1] src, int n_heads, int n_kv_heads):
    _check_heads(src.shape[0], n_heads, n_kv_heads)
    cdef int S = src.shape[1]
    cdef int hd = src.shape[0] // n_heads
    out = np.empty((n_kv_heads * hd, S), np.float32)
    cdef float[:, ::1] dst = out
    gqa_reduce(&src[0, 0], &dst[0, 0], n_heads, n_kv_heads, hd, S)
    return out


def py_softmax_xent(const float[:, ::1] logits, const int[::1] targets, float grad_scale=1.0):
    """Returns (summed loss, dlogits) for logits [S, V]."""
    cdef int S = logits.shape[0], V = logits.shape[1]
    if targets.shape[0] != S:
        raise ValueError("one target per row")
    for t in np.asarray(targets):
        if not 0 <= t < V:
            raise ValueError(f"target {t} outside [0, {V})")
    work = np.array(logits, np.float32, copy=True)
    cdef float[:, ::1] w = work
    cdef double loss = softmax_xent(&w[0, 0], &targets[0], S, V, grad_scale)
    return loss, work


# The Accelerate versions of RMSNorm and softmax/CE (_accel.h), called directly whatever the
# platform: on macOS over Accelerate itself (what rmsnorm_fwd & co. run there), elsewhere
# over _vdsp_portable.h, so that their algebra is tested against the portable loops.
def py_accel_rmsnorm_fwd(const float[:, ::1] x, const float[::1] w, float eps):
    if w.shape[0] != x.shape[0]:
        raise ValueError("weight length must equal the channel count")
    out = np.empty_like(np.asarray(x))
    cdef float[:, ::1] y = out
    cdef float[::1] scratch = np.empty(4 * x.shape[1], np.float32)
    anecy_accel_rmsnorm_fwd(&x[0, 0], &w[0], &y[0, 0], x.shape[0], x.shape[1], eps,
                            &scratch[0])
    return out


def py_accel_rmsnorm_bwd(const float[:, ::1] x, const float[::1] w, const float[:, ::1] dy,
                         float eps, float[:, ::1] dx_acc=None):
    """Returns (dx, dw); with dx_acc, dx is added to it (the accumulate mode)."""
    if w.shape[0] != x.shape[0] or dy.shape[0] != x.shape[0] or dy.shape[1] != x.shape[1]:
        raise ValueError("rmsnorm_bwd: x, w and dy do not agree")
    dx_arr = np.empty_like(np.asarray(x)) if dx_acc is None else np.asarray(dx_acc)
    dw_arr = np.zeros(x.shape[0], np.float32)
    cdef float[:, ::1] dx = dx_arr
    cdef float[::1] dw = dw_arr
    cdef float[::1] scratch = np.empty(4 * x.shape[1], np.float32)
    anecy_accel_rmsnorm_bwd(&x[0, 0], &w[0], &dy[0, 0], &dx[0, 0], &dw[0], x.shape[0],
                            x.shape[1], eps, dx_acc is not None, &scratch[0])
    return dx_arr, dw_arr


def py_accel_softmax_xent(const float[:, ::1] logits, const int[::1] targets,
                          float grad_scale=1.0):
    cdef int S = logits.shape[0], V = logits.shape[1]
    if targets.shape[0] != S or (S and not 0 <= np.min(targets) <= np.max(targets) < V):
        raise ValueError("one target in [0, V) per row")
    work = np.array(logits, np.float32, copy=True)
    cdef float[:, ::1] w = work
    cdef double loss = anecy_accel_softmax_xent(&w[0, 0], &targets[0], S, V, grad_scale)
    return loss, work


def py_embedding_fwd(const float[:, ::1] E, const int[::1] tokens):
    cdef int S = tokens.shape[0], D = E.shape[1]
    if np.any(np.asarray(tokens) < 0) or np.any(np.asarray(tokens) >= E.shape[0]):
        raise ValueError("token id outside the embedding table")
    out = np.empty((D, S), np.float32)
    cdef float[:, ::1] x = out
    embedding_fwd(&E[0, 0], &tokens[0], &x[0, 0], S, D)
    return out


def py_embedding_bwd(float[:, ::1] dE, const int[::1] tokens, const float[:, ::1] dx):
    if np.any(np.asarray(tokens) < 0) or np.any(np.asarray(tokens) >= dE.shape[0]) \
            or dx.shape[0] != dE.shape[1] or dx.shape[1] != tokens.shape[0]:
        raise ValueError("embedding_bwd: shapes or token ids do not agree")
    embedding_bwd(&dE[0, 0], &tokens[0], &dx[0, 0], tokens.shape[0], dE.shape[1])


def py_adamw(float[::1] p, float[::1] g, float[::1] m, float[::1] v, double lr,
             double beta1, double beta2, double eps, double weight_decay, long step,
             double grad_scale=1.0, bint zero_grad=False):
    """One AdamW update in place; zero_grad=True also clears g on the way. Returns True
    when a parameter or moment came out NaN or infinite."""
    _same_len(p, g, "adamw")
    _same_len(p, m, "adamw")
    _same_len(p, v, "adamw")
    if step < 1:
        raise ValueError("step counts from 1")
    cdef bint nonfinite = False
    if p.shape[0]:
        with nogil:
            nonfinite = adamw(&p[0], &g[0], &m[0], &v[0], p.shape[0], lr, beta1, beta2, eps,
                              weight_decay, step, grad_scale, zero_grad)
    return nonfinite


def py_expf(const float[::1] x):
    """anecy's vectorisable exp (as the softmax and SiLU loops use it)."""
    out = np.empty(x.shape[0], np.float32)
    cdef float[::1] y = out
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        y[i] = anecy_expf(x[i])
    return out


def py_sumsq(const float[::1] x):
    if x.shape[0] == 0:
        return 0.0
    return sumsq(&x[0], x.shape[0])


# -- the LoRA adapters' loops (_lowrank.h); dropout as (key, threshold, keep_scale) --------
def lowrank_choose(int avx2):
    """Run the loops below on AVX2 + FMA (1, where the CPU has them), the portable ones (0)
    or as the CPU decides (-1); returns the path now chosen."""
    anecy_lowrank_choose(avx2)
    return anecy_lowrank_path().decode()


def _lr_check(a, shape, what):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{what} is {tuple(a.shape)}, expected {tuple(shape)}")


def py_lora_down(const float[:, ::1] A, const float[:, ::1] x, uint32_t key=0,
                 uint32_t threshold=0, float keep_scale=1.0):
    """u[R, S] = A[R, n_in] drop(x[n_in, S])"""
    cdef int R = A.shape[0], n_in = A.shape[1], S = x.shape[1]
    _lr_check(x, (n_in, S), "x")
    out = np.empty((R, S), np.float32)
    cdef float[:, ::1] u = out
    anecy_lora_down(&A[0, 0], R, n_in, &x[0, 0], S, &u[0, 0], key, threshold, keep_scale)
    return out


def py_lora_up(const float[:, ::1] B, const float[:, ::1] u, float c, float[:, ::1] y):
    """y[n_out, S] += c * B[n_out, R] u[R, S], in place"""
    cdef int n_out = B.shape[0], R = B.shape[1], S = u.shape[1]
    _lr_check(u, (R, S), "u")
    _lr_check(y, (n_out, S), "y")
    anecy_lora_up(&B[0, 0], R, n_out, &u[0, 0], S, c, &y[0, 0])


def py_lora_back_out(const float[:, ::1] B, const float[:, ::1] dy, u, float c, dB):
    """v[R, S] = B^T dy (returned); dB[n_out, R] += c dy u^T, in place (dB None: v alone,
    and u, which may then be None, is not read)"""
    cdef int n_out = B.shape[0], R = B.shape[1], S = dy.shape[1]
    _lr_check(dy, (n_out, S), "dy")
    cdef const float[:, ::1] u_view
    cdef float[:, ::1] dB_view
    cdef const float* u_ptr = NULL
    cdef float* dB_ptr = NULL
    if dB is not None:
        u_view, dB_view = u, dB
        _lr_check(u_view, (R, S), "u")
        _lr_check(dB_view, (n_out, R), "dB")
        u_ptr, dB_ptr = &u_view[0, 0], &dB_view[0, 0]
    out = np.empty((R, S), np.float32)
    cdef float[:, ::1] v = out
    anecy_lora_back_out(&B[0, 0], R, n_out, &dy[0, 0], u_ptr, S, c, &v[0, 0], dB_ptr)
    return out


def py_lora_back_in(list A, const float[:, ::1] x, list v, float c, list dA, dx, list keys,
                    uint32_t threshold=0, float keep_scale=1.0):
    """For each site j (up to 3) reading x[n_in, S]: dA[j] += c v[j] drop_j(x)^T and, unless
    dx is None, dx += c keep_scale mask_j (A[j]^T v[j]); in place"""
    cdef int m = len(A), n_in = x.shape[0], S = x.shape[1], j
    if not 1 <= m <= 3 or not len(v) == len(dA) == len(keys) == m:
        raise ValueError("1 to 3 sites, each with A, v, dA and a key")
    cdef const float* a_of[3]
    cdef const float* v_of[3]
    cdef float* da_of[3]
    cdef int r_of[3]
    cdef uint32_t key_of[3]
    cdef const float[:, ::1] a_j
    cdef const float[:, ::1] v_j
    cdef float[:, ::1] da_j
    for j in range(m):
        a_j, v_j, da_j = A[j], v[j], dA[j]
        _lr_check(a_j, (a_j.shape[0], n_in), "A")
        _lr_check(v_j, (a_j.shape[0], S), "v")
        _lr_check(da_j, (a_j.shape[0], n_in), "dA")
        a_of[j], v_of[j], da_of[j] = &a_j[0, 0], &v_j[0, 0], &da_j[0, 0]
        r_of[j], key_of[j] = a_j.shape[0], keys[j]
    cdef float[:, ::1] dx_view
    cdef float* dx_ptr = NULL
    if dx is not None:
        dx_view = dx
        _lr_check(dx_view, (n_in, S), "dx")
        dx_ptr = &dx_view[0, 0]
    row = np.empty(S, np.float32)
    cdef float[::1] row_view = row
    anecy_lora_back_in(m, a_of, r_of, n_in, &x[0, 0], v_of, S, c, da_of, dx_ptr, &row_view[0],
                       key_of, threshold, keep_scale)
