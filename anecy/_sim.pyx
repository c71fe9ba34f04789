# cython: language_level=3
"""The packed fp16 backends: ``sim`` and ``ane``.

Both run the ANE's ten MIL programs (``anecy.mil``) on exactly the fp16 input buffers
the Apple Neural Engine reads, and differ in one thing only: what executes a program.

- ``SimKernels``: the numpy interpreter ``anecy.milsim`` (slow; it exists so that the
  ANE path -- layouts, packing, programs, fp16 numerics and loss scaling -- runs and is
  tested on machines without an ANE).
- ``AneKernels``: the Apple Neural Engine, through ``anecy._runtime.AneKernel`` (the
  Objective-C shim in ``anecy/objc``; macOS on Apple Silicon only).

Everything else is ``PackedKernels``, their common base, written once: the engine-facing
kernel methods, the per-layer input Surfaces and per-kernel output Surfaces
(``anecy._runtime.Surface``: IOSurfaces on macOS, aligned host buffers elsewhere, seen
through zero-copy numpy fp16 views), weight staging (``mil.stage_weights``), activation
packing (``mil.write_activations``), output unpacking (``mil.unpack_output``), the
``io_ms`` timing, the error capture and ``raise_pending``. A subclass supplies two
methods: ``compile_programs`` (called once, from ``bind``) and ``execute`` (run one
program from its input Surface into its output Surface).

Buffers: every weight-bearing kernel has one input Surface per layer, allocated in
bind(); stage_weights() (called by the engine after each optimizer update or weight
load) writes their weight columns, and each kernel call rewrites only the activation
columns. The two weight-free attention-backward kernels share one input Surface each
across layers, and every kernel has one output Surface (shared by the layers: it is
unpacked before the next call). CPU access to a Surface is bracketed by its lock().

Errors: the kernel methods are ``noexcept nogil`` (the engine's layer loop has no way to
propagate an exception). Each one re-acquires the GIL and catches any exception raised
while packing, running or unpacking; the first one is kept (with the kernel and layer it
came from), and every output of that call and of every later call is filled with NaN
(a failed forward kernel makes the loss NaN, a failed backward kernel the gradients, so
the trainer's finite checks stop the run) until ``raise_pending()`` re-raises the kept
exception from Python; ``pending_error`` shows it without raising. The kernels refuse to
run until a stage_weights() has succeeded since bind() (they never run on unstaged or
half-staged weights).
"""

import numpy as np

from . import mil
from .errors import ConfigError
from .milsim import Interpreter
from ._runtime import AneKernel, Surface

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


# Smallest surface made: the ANEgpt fork reports that the ANE needs IOSurfaces of at least
# 49152 bytes, even for tiny tensors (unverified here; real models' tensors are far larger).
# The tensor sits at the start; the rest stays zero.
MIN_SURFACE_BYTES = 49152


def _fp16_surface(Py_ssize_t rows, Py_ssize_t cols):
    """A zeroed Surface holding an fp16 [rows, cols] tensor, and that view of it."""
    s = Surface(max(2 * rows * cols, MIN_SURFACE_BYTES))
    return s, s.array(np.float16, (rows, cols))


cdef class PackedKernels(Kernels):
    """The ten kernels as MIL programs on packed fp16 Surfaces: everything the sim and ane
    backends share. Subclasses define ``compile_programs`` and ``execute`` only."""
    cdef readonly str backend           # "sim" | "ane"
    cdef readonly object config
    cdef readonly object layer_surfaces  # [layer] -> {kernel: input Surface} (WEIGHTED)
    cdef readonly object shared_surfaces # {kernel: input Surface} (SHARED)
    cdef readonly object output_surfaces # {kernel: output Surface}, shared by the layers
    cdef object layer_bufs              # [layer] -> {kernel: fp16 [C, W] view of its Surface}
    cdef object shared_bufs             # {kernel: fp16 [C, W] view}
    cdef object out_bufs                # {kernel: fp16 [C', S] view}
    cdef object layer_weights           # [layer] -> {kernel: {block: fp32 view of a weight}}
    cdef object _error                  # (exception, where) of the first failure, or None
    cdef bint _stale                    # no stage_weights() has succeeded since bind()
    cdef public double stage_ms         # time spent staging weights (not part of io_ms)
    cdef readonly double compile_ms     # time bind() spent compiling the ten programs
    cdef readonly long calls            # kernel calls run since bind
    cdef public object trace            # None, or a list: each call appends (MIL kernel
                                        # name, layer or -1, {input: copy}, {output: copy})
                                        # with the engine's names (kernel_io)

    def __init__(self, str backend):
        if type(self) is PackedKernels:
            raise TypeError("PackedKernels is the sim and ane backends' common base; use "
                            "SimKernels or AneKernels")
        Kernels.__init__(self)
        self.backend = backend
        self.config = None
        self._error = None
        self._stale = True
        self.stage_ms = 0.0
        self.compile_ms = 0.0
        self.calls = 0
        self.trace = None

    def bind(self, engine):
        """Dims, weights and RoPE tables (Kernels.bind), then: generate the ten programs,
        allocate every input and output Surface, view each layer's weights, and compile
        the programs, once (``compile_ms``)."""
        Kernels.bind(self, engine)
        cfg = engine.config
        self.config = cfg
        cdef Dims d = self.d
        programs = {k: mil.generate(k, cfg) for k in mil.KERNEL_NAMES}
        self._stale = True
        self.layer_surfaces, self.layer_bufs = [], []
        for _ in range(d.L):
            pairs = {k: _fp16_surface(*mil.input_shape(k, cfg)[1::2]) for k in WEIGHTED}
            self.layer_surfaces.append({k: p[0] for k, p in pairs.items()})
            self.layer_bufs.append({k: p[1] for k, p in pairs.items()})
        pairs = {k: _fp16_surface(*mil.input_shape(k, cfg)[1::2]) for k in SHARED}
        self.shared_surfaces = {k: p[0] for k, p in pairs.items()}
        self.shared_bufs = {k: p[1] for k, p in pairs.items()}
        pairs = {k: _fp16_surface(*mil.output_shape(k, cfg)[1::2]) for k in mil.KERNEL_NAMES}
        self.output_surfaces = {k: p[0] for k, p in pairs.items()}
        self.out_bufs = {k: p[1] for k, p in pairs.items()}
        self.layer_weights = [self._weights_of(l) for l in range(d.L)]
        self._error = None
        self.calls = 0
        cdef double t0 = now_ms()
        self.compile_programs(programs)
        self.compile_ms = now_ms() - t0

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

    # -- what a subclass supplies -------------------------------------------------------------
    def compile_programs(self, programs):
        """Called once by bind(), after every Surface exists: make ``programs`` (MIL kernel
        name -> mil.MilProgram) runnable."""
        raise NotImplementedError

    def execute(self, str kernel, int layer):
        """Run ``kernel``'s program on ``input_surface(kernel, layer)`` and leave its result
        in ``output_surface(kernel)``. Neither Surface is locked when this is called."""
        raise NotImplementedError

    # -- the Surfaces -------------------------------------------------------------------------
    def input_surface(self, str kernel, int layer=-1):
        """The input Surface of ``kernel`` (layer ``layer``'s for a weight-bearing kernel;
        the shared one, layer -1, for sdpaBwd1/2)."""
        return self.layer_surfaces[layer][kernel] if kernel in WEIGHTED \
            else self.shared_surfaces[kernel]

    def input_buffer(self, str kernel, int layer=-1):
        """The fp16 [C, W] view of ``input_surface(kernel, layer)``."""
        return self.layer_bufs[layer][kernel] if kernel in WEIGHTED \
            else self.shared_bufs[kernel]

    def output_surface(self, str kernel):
        return self.output_surfaces[kernel]

    def output_buffer(self, str kernel):
        """The fp16 [C', S] view of ``output_surface(kernel)``."""
        return self.out_bufs[kernel]

    # -- packing, staging, unpacking ----------------------------------------------------------
    def stage_all(self):
        """Write every layer's weights into its input Surfaces (mil.stage_weights)."""
        cfg = self.config
        for l in range(self.d.L):
            surfaces, bufs, weights = (self.layer_surfaces[l], self.layer_bufs[l],
                                       self.layer_weights[l])
            for k in WEIGHTED:
                with surfaces[k]:
                    mil.stage_weights(k, cfg, bufs[k], **weights[k])

    def pack(self, str kernel, int layer, dict acts):
        """Write the activation columns of ``kernel``'s input (mil.write_activations)."""
        with self.input_surface(kernel, layer):
            mil.write_activations(kernel, self.config, self.input_buffer(kernel, layer), **acts)

    def unpack(self, str kernel, tuple out_names, tuple outs):
        """Copy ``kernel``'s output Surface (mil.unpack_output) into ``outs``, fp32 arrays
        in the order of ``out_names`` (None: not wanted)."""
        with self.output_surfaces[kernel]:
            got = mil.unpack_output(kernel, self.config, self.out_bufs[kernel])
        for name, o in zip(out_names, outs):
            if o is not None:
                np.copyto(o, got[name])

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
        note = f"raised inside the {self.backend} backend's {where}"
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
        """Pack acts into the kernel's input Surface, execute its program, unpack its output
        Surface into outs (views of the engine's fp32 output buffers, in the order of
        out_names; None: not wanted)."""
        cdef double t0, t1, t2
        try:
            if self._stale:
                raise RuntimeError("the weights are not staged: no stage_weights() has "
                                   "succeeded since bind() (or the last one failed)")
            if self._error is not None:       # an earlier call failed: poison, do not run
                self._fail(None, kernel, l, outs)
                return
            t0 = now_ms()
            self.pack(kernel, l, acts)
            t1 = now_ms()
            self.execute(kernel, l)
            t2 = now_ms()
            self.unpack(kernel, out_names, outs)
            self.io_ms += (t1 - t0) + (now_ms() - t2)
            self.calls += 1
            if self.trace is not None:
                self.trace.append((kernel, l, {n: a.copy() for n, a in acts.items()},
                                   {_ENGINE_OUT.get(n, n): o.copy()
                                    for n, o in zip(out_names, outs) if o is not None}))
        except BaseException as e:
            self._fail(e, kernel, l, outs)

    cdef void stage_weights(self) noexcept nogil:
        cdef double t0 = now_ms()
        with gil:
            try:
                if self.config is not None:
                    self._stale = True
                    self.stage_all()
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
# The two backends: what executes a program
# =========================================================================================

cdef class SimKernels(PackedKernels):
    """The ``sim`` backend: each program run by ``anecy.milsim`` on the input Surface's
    fp16 view, its fp16 result copied into the output Surface."""
    cdef readonly object programs       # MIL kernel name -> milsim.Interpreter

    def __init__(self):
        PackedKernels.__init__(self, "sim")
        self.programs = None

    def compile_programs(self, programs):
        # Interpreter parses and type-checks each program (a bad one raises MilError here).
        self.programs = {k: Interpreter(p) for k, p in programs.items()}

    def execute(self, str kernel, int layer):
        src, dst = self.input_surface(kernel, layer), self.output_surface(kernel)
        with src, dst:
            y = self.programs[kernel].run(self.input_buffer(kernel, layer))
            out = self.output_buffer(kernel)
            np.copyto(out, y.reshape(out.shape))


# Compiled programs, shared by every AneKernels of the process: (factory, MIL text, blobs)
# -> AneKernel. The ANE leaks resources after about 119 compiles per process (DESIGN.md
# section 5), so models of the same shape compile their ten programs once between them.
_COMPILED = {}


def clear_compiled_programs():
    """Forget the process's compiled ANE programs (each is unloaded once no AneKernels
    still uses it). New models then compile again, counting towards the ANE's limit."""
    _COMPILED.clear()


def _compiled(factory, str kernel, program):
    key = (factory, program.text, tuple(sorted(program.blobs.items())))
    k = _COMPILED.get(key)
    if k is None:
        k = factory(program.text, program.blobs, kernel)
        _COMPILED[key] = k
    return k


cdef class AneKernels(PackedKernels):
    """The ``ane`` backend: each program compiled once (bind) and run by the Apple Neural
    Engine from the input Surface into the output Surface, through an AneRequest bound to
    that pair: one per layer for a weight-bearing kernel, one each for sdpaBwd1/2.

    ``kernel_factory`` (default ``anecy._runtime.AneKernel``) is called as
    ``factory(mil_text, blobs, name)`` and must return an object with AneKernel's
    ``bind(input, output)`` and ``evaluate(request)``; tests pass a stand-in to run this
    class's own code where there is no ANE."""
    # Released in this order, before the base's Surfaces: requests, then kernels (each
    # AneRequest also holds its AneKernel and Surfaces, so none can go before it).
    cdef readonly object requests       # [layer] -> {kernel: AneRequest} (WEIGHTED)
    cdef readonly object shared_requests  # {kernel: AneRequest} (SHARED)
    cdef readonly object compiled       # MIL kernel name -> AneKernel
    cdef readonly object kernel_factory

    def __init__(self, kernel_factory=None):
        PackedKernels.__init__(self, "ane")
        self.kernel_factory = AneKernel if kernel_factory is None else kernel_factory
        self.compiled = None
        self.requests = None
        self.shared_requests = None

    def compile_programs(self, programs):
        if self.d.S < 32:
            # the public reference found rows of a [1, C, 1, W] surface padded to 32
            # elements, so a narrower tensor would not be laid out as packed here
            raise ConfigError(f"the ane backend needs seq_len >= 32 (got {self.d.S}): the ANE "
                              f"pads surface rows to 32 elements")
        compiled = {k: _compiled(self.kernel_factory, k, p) for k, p in programs.items()}
        self.requests = [{k: compiled[k].bind(self.input_surface(k, l), self.output_surface(k))
                          for k in WEIGHTED} for l in range(self.d.L)]
        self.shared_requests = {k: compiled[k].bind(self.input_surface(k), self.output_surface(k))
                                for k in SHARED}
        self.compiled = compiled

    def execute(self, str kernel, int layer):
        request = self.requests[layer][kernel] if kernel in WEIGHTED \
            else self.shared_requests[kernel]
        self.compiled[kernel].evaluate(request)     # the GIL is released while it runs


# =========================================================================================
# Test entry points: call one kernel of any bound Kernels (cpu, sim, ane) by name
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
    outputs {name: fp32 array} (engine names, see kernel_io). Errors the kernels caught
    (sim, ane) are re-raised."""
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
    k.raise_pending()
    return {n: a[n] for n, _ in outs}


def stage(Kernels k):
    """Call k.stage_weights() (the engine does this in Engine.stage_weights)."""
    with nogil:
        k.stage_weights()
    k.raise_pending()
