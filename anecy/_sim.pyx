# cython: language_level=3
"""The ``sim`` backend: the ANE's kernels run by the numpy MIL interpreter.

SimKernels packs exactly the fp16 input buffers the ANE would get (``anecy.mil``'s layout
table and packing helpers, shared with the ``ane`` backend), runs the generated MIL
programs through ``anecy.milsim`` and unpacks the fp16 results into the engine's fp32
buffers. It is slow; it exists so that the ANE path (layouts, packing, programs, fp16
numerics and loss scaling) runs on machines without an ANE.

Buffers: every weight-bearing kernel has one input buffer per layer, allocated in bind();
stage_weights() (called by the engine after each optimizer update or weight load) writes
their weight columns, and each kernel call rewrites only the activation columns. The two
weight-free attention-backward kernels share one buffer each across layers.

Errors: the kernel methods are ``noexcept nogil`` (the engine's layer loop has no way to
propagate an exception). Each one re-acquires the GIL and catches any exception raised
while packing, running or unpacking; the first one is kept (with the kernel and layer it
came from), and every output of that call and of every later call is filled with NaN
(a failed forward kernel makes the loss NaN, a failed backward kernel the gradients, so
the trainer's finite checks stop the run) until ``raise_pending()`` re-raises the kept
exception from Python; ``pending_error`` shows it without raising. After a failed
stage_weights() the kernels keep failing until a staging succeeds (they never run on
half-staged weights).
"""

import numpy as np

from . import mil
from .milsim import Interpreter

from ._engine cimport Kernels, Dims, LayerParams
from ._runtime cimport now_ms

# Kernels with weight columns (one input buffer per layer each), and the weight-free ones.
WEIGHTED = ("sdpaFwd", "woFwd", "ffnFused", "ffnBwdW2t", "ffnBwdW13t", "wotBwd", "qBwd",
            "kvBwd")
SHARED = ("sdpaBwd1", "sdpaBwd2")

# engine method name -> MIL kernel name
METHODS = {
    "sdpa_fwd": "sdpaFwd", "wo_fwd": "woFwd", "ffn_fused": "ffnFused",
    "ffn_bwd_w2t": "ffnBwdW2t", "ffn_bwd_w13t": "ffnBwdW13t", "wot_bwd": "wotBwd",
    "sdpa_bwd1": "sdpaBwd1", "sdpa_bwd2": "sdpaBwd2", "q_bwd": "qBwd", "kv_bwd": "kvBwd",
}

# MIL output name -> the engine's name for it, where they differ (see kernel_io)
_ENGINE_OUT = {"q_rope": "q", "k_rope": "k", "q_pre": "q_raw", "k_pre": "k_raw"}


cdef object _view(const float* p, Py_ssize_t rows, Py_ssize_t cols):
    """A numpy [rows, cols] float32 array over memory the engine owns (no copy), or None."""
    if p == NULL:
        return None
    cdef float[:, ::1] mv = <float[:rows, :cols]> (<float*> p)
    return np.asarray(mv)


cdef object _vec(const float* p, Py_ssize_t n):
    if p == NULL:
        return None
    cdef float[::1] mv = <float[:n]> (<float*> p)
    return np.asarray(mv)


cdef class SimKernels(Kernels):
    """Kernels executed as MIL programs by ``anecy.milsim`` on packed fp16 buffers."""
    cdef readonly object config
    cdef readonly object programs       # MIL kernel name -> milsim.Interpreter
    cdef object layer_bufs              # [layer] -> {kernel: fp16 [C, W] input buffer}
    cdef object shared_bufs             # {kernel: fp16 [C, W]} for sdpaBwd1/2
    cdef object layer_weights           # [layer] -> {kernel: {block: fp32 view of a weight}}
    cdef object _error                  # (exception, where) of the first failure, or None
    cdef bint _stale                    # the last stage_weights() failed
    cdef public double stage_ms         # time spent staging weights (not part of io_ms)
    cdef readonly long calls            # kernel calls run since bind
    cdef public object trace            # None, or a list: each call appends (MIL kernel
                                        # name, layer or -1, {input: copy}, {output: copy})
                                        # with the engine's names (kernel_io)

    def __init__(self):
        Kernels.__init__(self)
        self.config = None
        self._error = None
        self._stale = False
        self.stage_ms = 0.0
        self.calls = 0
        self.trace = None

    def bind(self, engine):
        """Dims, weights and RoPE tables (Kernels.bind), then: generate and check the ten
        programs once, allocate every input buffer, and view each layer's weights."""
        Kernels.bind(self, engine)
        cfg = engine.config
        self.config = cfg
        # Interpreter parses and type-checks each program (a bad one raises MilError here).
        self.programs = {k: Interpreter(mil.generate(k, cfg)) for k in mil.KERNEL_NAMES}
        cdef Dims d = self.d
        self.layer_bufs = [{k: mil.new_input_buffer(k, cfg) for k in WEIGHTED}
                           for _ in range(d.L)]
        self.shared_bufs = {k: mil.new_input_buffer(k, cfg) for k in SHARED}
        self.layer_weights = [self._weights_of(l) for l in range(d.L)]
        self._error = None
        self.calls = 0

    cdef object _weights_of(self, int l):
        """Every weight block of layer l's kernels, as views of the engine's fp32 weights
        in HF orientation (the layout table says how each is placed)."""
        cdef Dims d = self.d
        cdef LayerParams* w = &self.layers[l]
        wq, wk, wv = _view(w.wq, d.Q, d.D), _view(w.wk, d.K, d.D), _view(w.wv, d.K, d.D)
        wo = _view(w.wo, d.D, d.Q)
        w1, w2, w3 = _view(w.w1, d.H, d.D), _view(w.w2, d.D, d.H), _view(w.w3, d.H, d.D)
        sdpa = dict(Wq=wq, Wk=wk, Wv=wv)
        if d.qk_norm:
            sdpa.update(q_norm=_vec(w.q_norm, d.hd), k_norm=_vec(w.k_norm, d.hd))
        return {"sdpaFwd": sdpa, "woFwd": dict(Wo=wo), "ffnFused": dict(W1=w1, W3=w3, W2=w2),
                "ffnBwdW2t": dict(W2=w2), "ffnBwdW13t": dict(W1=w1, W3=w3),
                "wotBwd": dict(Wo=wo), "qBwd": dict(Wq=wq), "kvBwd": dict(Wk=wk, Wv=wv)}

    # -- errors -------------------------------------------------------------------------------
    @property
    def pending_error(self):
        """The first exception a kernel caught since the last raise_pending(), or None."""
        return None if self._error is None else self._error[0]

    def raise_pending(self):
        """Re-raise (once) the first exception caught inside a kernel method, with a note
        naming the kernel and layer. Call after every engine entry point that runs kernels
        (forward_backward, logits, stage_weights)."""
        if self._error is None:
            return
        exc, where = self._error
        self._error = None
        note = f"raised inside the sim backend's {where}"
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        raise exc

    cdef void _fail(self, object exc, str kernel, int layer, tuple outs):
        # Called with the GIL held, from inside an except clause: must not raise.
        try:
            if self._error is None:
                where = kernel if layer < 0 else f"{kernel} (layer {layer})"
                self._error = (exc, where)
            for o in outs:
                if o is not None:
                    o.fill(np.nan)
        except BaseException:
            pass

    # -- one kernel call ----------------------------------------------------------------------
    cdef void _run(self, str kernel, int l, dict acts, tuple out_names, tuple outs):
        """Pack acts into the kernel's buffer, run its program, unpack into outs (views of
        the engine's fp32 output buffers, in the order of out_names; None: not wanted)."""
        cdef double t0, t1, t2
        try:
            if self._stale:
                raise RuntimeError("the weights are not staged: the last stage_weights() "
                                   "failed")
            if self._error is not None:       # an earlier call failed: poison, do not run
                self._fail(None, kernel, l, outs)
                return
            buf = self.layer_bufs[l][kernel] if l >= 0 else self.shared_bufs[kernel]
            t0 = now_ms()
            mil.write_activations(kernel, self.config, buf, **acts)
            t1 = now_ms()
            y = self.programs[kernel].run(buf)
            t2 = now_ms()
            got = mil.unpack_output(kernel, self.config, y)
            for name, o in zip(out_names, outs):
                if o is not None:
                    np.copyto(o, got[name])
            self.io_ms += (t1 - t0) + (now_ms() - t2)
            self.calls += 1
            if self.trace is not None:
                self.trace.append((kernel, l, {n: a.copy() for n, a in acts.items()},
                                   {_ENGINE_OUT.get(n, n): o.copy()
                                    for n, o in zip(out_names, outs) if o is not None}))
        except BaseException as e:
            self._fail(e, kernel, l, outs)

    def _stage_all(self):
        cfg = self.config
        for l in range(self.d.L):
            bufs, weights = self.layer_bufs[l], self.layer_weights[l]
            for k in WEIGHTED:
                mil.stage_weights(k, cfg, bufs[k], **weights[k])

    cdef void stage_weights(self) noexcept nogil:
        cdef double t0 = now_ms()
        with gil:
            try:
                if self.config is not None:
                    self._stale = True
                    self._stage_all()
                    self._stale = False
            except BaseException as e:
                self._fail(e, "stage_weights", -1, ())
            self.stage_ms += now_ms() - t0

    # -- the ten kernels (DESIGN.md section 4) ------------------------------------------------
    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("sdpaFwd", l, {"xnorm": _view(xnorm, d.D, d.S)},
                      ("attn", "q_rope", "k_rope", "v", "q_pre", "k_pre"),
                      (_view(attn, d.Q, d.S), _view(q, d.Q, d.S), _view(k, d.K, d.S),
                       _view(v, d.K, d.S),
                       _view(q_raw, d.Q, d.S) if d.qk_norm else None,
                       _view(k_raw, d.K, d.S) if d.qk_norm else None))

    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("woFwd", l, {"attn": _view(attn, d.Q, d.S)}, ("o",),
                      (_view(o, d.D, d.S),))

    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("ffnFused", l,
                      {"x2norm": _view(x2norm, d.D, d.S), "x2": _view(x2, d.D, d.S)},
                      ("x_next", "h1", "h3", "gate"),
                      (_view(x_next, d.D, d.S), _view(h1, d.H, d.S), _view(h3, d.H, d.S),
                       _view(gate, d.H, d.S)))

    cdef void ffn_bwd_w2t(self, int l, const float* dffn, float* dgate) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("ffnBwdW2t", l, {"dffn": _view(dffn, d.D, d.S)}, ("dgate",),
                      (_view(dgate, d.H, d.S),))

    cdef void ffn_bwd_w13t(self, int l, const float* dh1, const float* dh3,
                           float* dx) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("ffnBwdW13t", l, {"dh1": _view(dh1, d.H, d.S), "dh3": _view(dh3, d.H, d.S)},
                      ("dx",), (_view(dx, d.D, d.S),))

    cdef void wot_bwd(self, int l, const float* dy, float* da) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("wotBwd", l, {"dy": _view(dy, d.D, d.S)}, ("da",), (_view(da, d.Q, d.S),))

    cdef void sdpa_bwd1(self, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* dv_rep, float* probs,
                        float* dprobs) noexcept nogil:
        cdef Dims d = self.d
        cdef Py_ssize_t P = <Py_ssize_t>d.n_heads * d.S
        with gil:
            self._run("sdpaBwd1", -1,
                      {"q": _view(q, d.Q, d.S), "k_rep": _view(k_rep, d.Q, d.S),
                       "v_rep": _view(v_rep, d.Q, d.S), "da": _view(da, d.Q, d.S)},
                      ("dv_rep", "probs", "dprobs"),
                      (_view(dv_rep, d.Q, d.S), _view(probs, P, d.S), _view(dprobs, P, d.S)))

    cdef void sdpa_bwd2(self, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil:
        cdef Dims d = self.d
        cdef Py_ssize_t P = <Py_ssize_t>d.n_heads * d.S
        with gil:
            self._run("sdpaBwd2", -1,
                      {"probs": _view(probs, P, d.S), "dprobs": _view(dprobs, P, d.S),
                       "q": _view(q, d.Q, d.S), "k_rep": _view(k_rep, d.Q, d.S)},
                      ("dq", "dk_rep"), (_view(dq, d.Q, d.S), _view(dk_rep, d.Q, d.S)))

    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("qBwd", l, {"dq": _view(dq, d.Q, d.S)}, ("dx",), (_view(dx, d.D, d.S),))

    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil:
        cdef Dims d = self.d
        with gil:
            self._run("kvBwd", l, {"dk": _view(dk, d.K, d.S), "dv": _view(dv, d.K, d.S)},
                      ("dx",), (_view(dx, d.D, d.S),))


# =========================================================================================
# Test entry points: call one kernel of any bound Kernels (cpu, sim, ...) by name
# =========================================================================================

def kernel_io(Kernels k, str name):
    """(inputs, outputs) of kernel `name` (engine method name or MIL name): lists of
    (array name, channels), every array being [channels, seq_len] fp32."""
    cdef Dims d = k.d
    name = _method_name(name)
    D, H, Q, K, P = d.D, d.H, d.Q, d.K, d.n_heads * d.S
    table = {
        "sdpa_fwd": ([("xnorm", D)],
                     [("attn", Q), ("q", Q), ("k", K), ("v", K)]
                     + ([("q_raw", Q), ("k_raw", K)] if d.qk_norm else [])),
        "wo_fwd": ([("attn", Q)], [("o", D)]),
        "ffn_fused": ([("x2norm", D), ("x2", D)], [("x_next", D), ("h1", H), ("h3", H),
                                                   ("gate", H)]),
        "ffn_bwd_w2t": ([("dffn", D)], [("dgate", H)]),
        "ffn_bwd_w13t": ([("dh1", H), ("dh3", H)], [("dx", D)]),
        "wot_bwd": ([("dy", D)], [("da", Q)]),
        "sdpa_bwd1": ([("q", Q), ("k_rep", Q), ("v_rep", Q), ("da", Q)],
                      [("dv_rep", Q), ("probs", P), ("dprobs", P)]),
        "sdpa_bwd2": ([("probs", P), ("dprobs", P), ("q", Q), ("k_rep", Q)],
                      [("dq", Q), ("dk_rep", Q)]),
        "q_bwd": ([("dq", Q)], [("dx", D)]),
        "kv_bwd": ([("dk", K), ("dv", K)], [("dx", D)]),
    }
    return table[name]


def _method_name(name):
    if name in METHODS:
        return name
    for m, k in METHODS.items():
        if k == name:
            return m
    raise KeyError(f"unknown kernel {name!r}; known: {', '.join(METHODS)}")


cdef float* _p(dict arrs, str name):
    cdef float[:, ::1] mv
    a = arrs.get(name)
    if a is None:
        return NULL
    mv = a
    return &mv[0, 0]


def run_kernel(Kernels k, str name, int layer=0, **arrays):
    """Run kernel `name` of a bound Kernels `k` (layer `layer`'s weights) on the given
    fp32 [channels, seq_len] inputs, without the GIL as the engine does; returns the
    outputs {name: fp32 array} (engine names, see kernel_io). Errors a SimKernels caught
    are re-raised."""
    if k.layers == NULL:
        raise RuntimeError("the Kernels object is not bound to an Engine")
    cdef Dims d = k.d
    if not 0 <= layer < d.L:
        raise IndexError(f"layer {layer} is outside [0, {d.L})")
    method = _method_name(name)
    ins, outs = kernel_io(k, method)
    if sorted(arrays) != sorted(n for n, _ in ins):
        raise TypeError(f"{method} takes inputs {[n for n, _ in ins]}, got {sorted(arrays)}")
    a = {}
    for n, c in ins:
        v = np.ascontiguousarray(arrays[n], dtype=np.float32)
        if v.shape != (c, d.S):
            raise ValueError(f"{method}: {n} must have shape {(c, d.S)}, got {v.shape}")
        a[n] = v
    for n, c in outs:
        a[n] = np.zeros((c, d.S), np.float32)
    cdef int l = layer
    cdef float *i0 = _p(a, ins[0][0])
    cdef float *i1 = _p(a, ins[1][0]) if len(ins) > 1 else NULL
    cdef float *i2 = _p(a, ins[2][0]) if len(ins) > 2 else NULL
    cdef float *i3 = _p(a, ins[3][0]) if len(ins) > 3 else NULL
    cdef float *o0 = _p(a, outs[0][0])
    cdef float *o1 = _p(a, outs[1][0]) if len(outs) > 1 else NULL
    cdef float *o2 = _p(a, outs[2][0]) if len(outs) > 2 else NULL
    cdef float *o3 = _p(a, outs[3][0]) if len(outs) > 3 else NULL
    cdef float *o4 = _p(a, outs[4][0]) if len(outs) > 4 else NULL
    cdef float *o5 = _p(a, outs[5][0]) if len(outs) > 5 else NULL
    cdef int which = list(METHODS).index(method)
    with nogil:
        if which == 0:
            k.sdpa_fwd(l, i0, o0, o1, o2, o3, o4, o5)
        elif which == 1:
            k.wo_fwd(l, i0, o0)
        elif which == 2:
            k.ffn_fused(l, i0, i1, o0, o1, o2, o3)
        elif which == 3:
            k.ffn_bwd_w2t(l, i0, o0)
        elif which == 4:
            k.ffn_bwd_w13t(l, i0, i1, o0)
        elif which == 5:
            k.wot_bwd(l, i0, o0)
        elif which == 6:
            k.sdpa_bwd1(i0, i1, i2, i3, o0, o1, o2)
        elif which == 7:
            k.sdpa_bwd2(i0, i1, i2, i3, o0, o1)
        elif which == 8:
            k.q_bwd(l, i0, o0)
        elif which == 9:
            k.kv_bwd(l, i0, i1, o0)
    if isinstance(k, SimKernels):
        k.raise_pending()
    return {n: a[n] for n, _ in outs}


def stage(Kernels k):
    """Call k.stage_weights() (the engine does this in Engine.stage_weights)."""
    with nogil:
        k.stage_weights()
    if isinstance(k, SimKernels):
        k.raise_pending()
