# cython: language_level=3
"""The packed fp16 backends: ``sim`` and ``ane``.

Both run the ANE's ten MIL programs (``anecy.mil``) on exactly the fp16 input Surfaces
the Apple Neural Engine reads, and differ in one thing only: what executes a program.

- ``SimKernels``: the numpy interpreter ``anecy.milsim`` (slow; it exists so that the
  ANE path -- layouts, staging, programs, fp16 numerics and loss scaling -- runs and is
  tested on machines without an ANE). It takes the GIL inside its executor only.
- ``AneKernels``: the Apple Neural Engine through the Objective-C shim, called from C
  with the GIL released (``anecy._ane_runtime.AneKernel.evaluator``).

Everything else is ``PackedKernels``, their common base, written once and run without
the GIL: the engine-facing kernel methods, the Surfaces, and the staging plans.

Staging plans. At bind time the layout table (``kernel_layout.KERNELS``, resolved by
``kernel_layout.layout``) is compiled into a plain C plan per kernel call (kernel, layer): a list of
moves, each a rectangle of fp32 rows (an engine buffer; for weights, the engine's HF-layout
weight, possibly transposed) and where it sits in the fp16 Surface (byte offset, rows,
columns, row strides). A kernel call locks its input Surface, converts its activation
blocks straight from the engine's buffers into it with the SIMD fp32->fp16 routines of
``_fp16.h`` (no temporaries), unlocks, executes, and converts the output blocks back
into the engine's buffers the same way. Weight staging (``stage_weights``, after each
optimizer update) runs the weight moves of every layer, split between this thread and
the engine's worker thread. No dict, numpy object or Python call is made per kernel.

The attention state (``Kernels``). What the CPU never reads stays fp16 where the layouts
allow it (``passthrough``, on by default), and is otherwise kept in fp32 buffers of this
backend; the engine passes KEPT (NULL) for it either way and holds none of it.

- probs and dprobs, from sdpaBwd1 to sdpaBwd2. The layout table puts them at the same rows
  of sdpaBwd1's output and of sdpaBwd2's input, so one Surface is both: sdpaBwd1's program
  writes them where sdpaBwd2's program reads them, and nothing is converted or copied (the
  host still unpacks dv_rep from the rows after them before sdpaBwd2's q and k_rep are
  packed over those rows).
- q, k, v, from sdpaFwd to sdpaBwd1/2. sdpaFwd has one output Surface per layer, so they
  stay there in fp16 until the backward, and sdpaBwd1/2 copy them into their input
  Surfaces, repeating k and v over each group of query heads as the programs read them.

Each kernel method reads as pack, execute, unpack; the three attention methods say, before
packing, where their kept tensors come from or go to. A caller's own arrays (tests,
``trace``) are converted as given, in fp32, and leave the kept state alone.

Buffers: every weight-bearing kernel has one input Surface per layer (its weight columns
staged by stage_weights(), its activation columns rewritten by each call); the two
weight-free attention-backward kernels share one input Surface each across layers; sdpaFwd
has one output Surface per layer (it holds that layer's q, k, v until the backward), every
other kernel one output Surface shared by the layers (unpacked before the next call), and
sdpaBwd1's is sdpaBwd2's input Surface.

Errors: the kernel methods are ``noexcept nogil`` (the engine's layer loop has no way to
propagate an exception). The first failure (a Surface that would not lock, a failed
evaluation with the shim's error text, an exception in the sim executor, unstaged
weights) is recorded with its kernel and layer, and every output of that call and of
every later call is filled with NaN (a failed forward kernel makes the loss NaN, a
failed backward kernel the gradients, so the trainer's finite checks stop the run) until
``raise_pending()`` raises it from Python; ``pending_error`` shows it without raising.
The kernels refuse to run until a stage_weights() has succeeded since bind().
"""

import os
import re

import numpy as np

from . import ane_health, mil
from .kernel_layout import KERNEL_NAMES, KERNELS, _size, input_shape, layout, output_shape
from .errors import ConfigError
from .milsim import Interpreter
from ._ane_runtime import AneError

from libc.stdint cimport uint16_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset, strncpy
from libc.math cimport NAN

from ._engine cimport (Kernels, Dims, LayerParams, Arena, LoraSite, N_SITES, SITE_WQ,
                       SITE_WK, SITE_WV, SITE_WO, SITE_W1, SITE_W2, SITE_W3)
from ._worker cimport now_ms, DWWorker
from ._timeline cimport (trace_event, EV_PACK, EV_COPY_HELD, EV_EXECUTE, EV_UNPACK,
                         EV_STAGE)
from ._ops cimport gqa_repeat
from ._ane_runtime cimport (Surface, SurfaceMem, surface_lock, surface_unlock, AneKernel,
                            AneRequest, Evaluator)


# =========================================================================================
# What the layout table says, in the forms the backends need (nothing here restates it)
# =========================================================================================

def _snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# Kernels with weight columns (one input Surface per layer each), and the weight-free ones.
WEIGHTED = tuple(k for k, spec in KERNELS.items()
                 if any(b.kind == "weight" for b in spec.inputs))
SHARED = tuple(k for k in KERNEL_NAMES if k not in WEIGHTED)
# Kernels with one output Surface per layer: sdpaFwd's keeps that layer's q, k, v in fp16
# until the backward's sdpaBwd1/2 read them (every other output Surface is shared).
LAYER_OUTPUT = ("sdpaFwd",)

# engine method name (Kernels.sdpa_fwd, ...) -> MIL kernel name
METHODS = {_snake(k): k for k in KERNEL_NAMES}

# The kernel ids the engine-facing methods use: each one's index in KERNEL_NAMES.
cdef int K_SDPA_FWD = KERNEL_NAMES.index("sdpaFwd")
cdef int K_WO_FWD = KERNEL_NAMES.index("woFwd")
cdef int K_FFN_FUSED = KERNEL_NAMES.index("ffnFused")
cdef int K_FFN_BWD_W2T = KERNEL_NAMES.index("ffnBwdW2t")
cdef int K_FFN_BWD_W13T = KERNEL_NAMES.index("ffnBwdW13t")
cdef int K_WOT_BWD = KERNEL_NAMES.index("wotBwd")
cdef int K_SDPA_BWD1 = KERNEL_NAMES.index("sdpaBwd1")
cdef int K_SDPA_BWD2 = KERNEL_NAMES.index("sdpaBwd2")
cdef int K_Q_BWD = KERNEL_NAMES.index("qBwd")
cdef int K_KV_BWD = KERNEL_NAMES.index("kvBwd")


def _act_blocks(str kernel, cfg):
    return [b for b in layout(kernel, cfg).inputs if b.kind == "act"]


# What stays fp16 between kernels (the pass-throughs): the blocks named here are never
# converted when the engine asks for them as KEPT. sdpaBwd1's PASSED outputs lie where
# sdpaBwd2 reads them (one Surface); sdpaFwd's HELD_OUT outputs stay in its per-layer
# Surface and are copied into the HELD_IN inputs (the same q, k, v in that order; k and v
# repeated over each group of query heads).
PASSED = ("probs", "dprobs")
HELD_OUT = ("q_rope", "k_rope", "v")
HELD_IN = {"sdpaBwd1": ("q", "k_rep", "v_rep"), "sdpaBwd2": ("q", "k_rep")}


def kept_fp16():
    """({MIL kernel: input blocks never converted}, {MIL kernel: outputs never converted})
    on the engine's path with both pass-throughs on."""
    ins = dict(HELD_IN)
    ins["sdpaBwd2"] = PASSED + ins["sdpaBwd2"]
    return ins, {"sdpaBwd1": PASSED, "sdpaFwd": HELD_OUT}


def _pass_through_args(cfg):
    """(sdpaBwd1's argument index of probs, sdpaBwd2's argument index of probs) when
    sdpaBwd1's output holds the PASSED blocks, in order, at the very rows (and row width)
    where sdpaBwd2's input holds them, so that one Surface can serve as both; else None."""
    outs = layout("sdpaBwd1", cfg).outputs
    ins = _act_blocks("sdpaBwd2", cfg)
    rows_out = {n: (row0, rows) for n, row0, rows in outs}
    rows_in = {b.name: (b.row0, b.rows) for b in ins}
    names_out, names_in = [n for n, _, _ in outs], [b.name for b in ins]
    if any(n not in rows_out or rows_out[n] != rows_in.get(n) for n in PASSED) \
            or input_shape("sdpaBwd2", cfg)[3] != cfg.seq_len \
            or output_shape("sdpaBwd1", cfg)[1] > input_shape("sdpaBwd2", cfg)[1]:
        return None
    i_out, i_in = names_out.index(PASSED[0]), names_in.index(PASSED[0])
    if tuple(names_out[i_out:i_out + 2]) != PASSED or tuple(names_in[i_in:i_in + 2]) != PASSED:
        return None
    return len(_act_blocks("sdpaBwd1", cfg)) + i_out, i_in


def _qkv_hold_layout(cfg):
    """Where sdpaFwd's output holds q, k, v (HELD_OUT) and where sdpaBwd1 and sdpaBwd2 read
    them (HELD_IN): for each kernel a list of three (argument index, element offset in the
    Surface), (-1, 0) where it reads none (sdpaBwd2's v); None if a layout does not hold
    them as whole rows of seq_len elements (the fp16 hold is then off)."""
    S = cfg.seq_len
    fwd = layout("sdpaFwd", cfg)
    n_acts = len(_act_blocks("sdpaFwd", cfg))
    names = [n for n, _, _ in fwd.outputs]
    if output_shape("sdpaFwd", cfg)[3] != S:
        return None
    site = []
    for n, rows in zip(HELD_OUT, (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)):
        if n not in names or fwd.outputs[names.index(n)][2] != rows:
            return None
        site.append((n_acts + names.index(n), fwd.outputs[names.index(n)][1] * S))
    sites = {"sdpaFwd": site}
    for k, reads in HELD_IN.items():
        if input_shape(k, cfg)[3] != S:
            return None
        by_name = {b.name: (i, b) for i, b in enumerate(_act_blocks(k, cfg))}
        site = []
        for n in reads:
            if n not in by_name:
                return None
            i, b = by_name[n]
            if b.rows != cfg.q_dim or b.cols != S or b.col0 != 0:
                return None
            site.append((i, b.row0 * S))
        sites[k] = site + [(-1, 0)] * (3 - len(site))
    return sites


# ANECY_SEPARATE_SURFACES=1: sdpaBwd1's output and sdpaBwd2's input get a Surface each, and
# probs/dprobs go between them through fp32 (for a device on which one IOSurface cannot be
# one request's output and another's input; unverified on hardware, see the README).
SEPARATE_SURFACES_ENV = "ANECY_SEPARATE_SURFACES"


# Smallest surface made: the ANEgpt fork reports that the ANE needs IOSurfaces of at least
# 49152 bytes, even for tiny tensors (unverified here; real models' tensors are far larger).
# The tensor sits at the start; the rest stays zero.
MIN_SURFACE_BYTES = 49152


def _fp16_surface(Py_ssize_t rows, Py_ssize_t cols):
    """A zeroed Surface holding an fp16 [rows, cols] tensor, and that view of it."""
    s = Surface(max(2 * rows * cols, MIN_SURFACE_BYTES))
    return s, s.array(np.float16, (rows, cols))


# =========================================================================================
# Staging plans: plain C
# =========================================================================================

cdef inline void f32_to_f16_rows(const float* src, uint16_t* dst, Py_ssize_t rows,
                                 Py_ssize_t cols, Py_ssize_t ld32,
                                 Py_ssize_t ld16) noexcept nogil:
    cdef Py_ssize_t r
    if ld32 == cols and ld16 == cols:
        anecy_f32_to_f16(src, dst, rows * cols)
        return
    for r in range(rows):
        anecy_f32_to_f16(src + r * ld32, dst + r * ld16, cols)


cdef inline void f16_to_f32_rows(const uint16_t* src, float* dst, Py_ssize_t rows,
                                 Py_ssize_t cols, Py_ssize_t ld16,
                                 Py_ssize_t ld32) noexcept nogil:
    cdef Py_ssize_t r
    if ld32 == cols and ld16 == cols:
        anecy_f16_to_f32(src, dst, rows * cols)
        return
    for r in range(rows):
        anecy_f16_to_f32(src + r * ld16, dst + r * ld32, cols)


cdef void zero_rows(uint16_t* dst, Py_ssize_t rows, Py_ssize_t cols,
                    Py_ssize_t ld16) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(rows):
        memset(dst + r * ld16, 0, cols * sizeof(uint16_t))


cdef int _set_site(HoldSite* site, list where) except -1:
    cdef int i
    for i in range(3):
        site.arg[i], site.off[i] = where[i]
    return 0


cdef void run_in_moves(const Move* m, int n, char* base, float** args) noexcept nogil:
    """Fill a locked input Surface: weight moves read m.src, activation moves args[m.arg]
    (skipped when NULL: that block is filled otherwise, e.g. passed through)."""
    cdef int i
    cdef const float* src
    cdef uint16_t* dst
    for i in range(n):
        dst = <uint16_t*>base + m[i].off
        if m[i].op == OP_ZERO:
            zero_rows(dst, m[i].rows, m[i].cols, m[i].ld16)
            continue
        src = m[i].src if m[i].arg < 0 else args[m[i].arg]
        if src == NULL:
            continue
        if m[i].op == OP_F16_T:
            anecy_f32_to_f16_transposed(src, dst, m[i].rows, m[i].cols, m[i].ld32, m[i].ld16)
        else:
            f32_to_f16_rows(src, dst, m[i].rows, m[i].cols, m[i].ld32, m[i].ld16)


cdef void run_out_moves(const Move* m, int n, const char* base, float** args) noexcept nogil:
    """Convert a locked output Surface into the call's fp32 outputs (NULL: not wanted)."""
    cdef int i
    for i in range(n):
        if args[m[i].arg] != NULL:
            f16_to_f32_rows(<const uint16_t*>base + m[i].off, args[m[i].arg], m[i].rows,
                            m[i].cols, m[i].ld16, m[i].ld32)


cdef void fill_nan(const Move* m, int n, float** args) noexcept nogil:
    cdef int i
    cdef Py_ssize_t j, size
    cdef float* o
    for i in range(n):
        o = args[m[i].arg]
        if o != NULL:
            size = m[i].rows * m[i].ld32
            for j in range(size):
                o[j] = NAN


# Rows of an adapted weight merged at a time (the tile of stage_merged)
cdef enum:
    MERGE_ROWS = 64


cdef void stage_merged(const Move* m, char* base, float* scratch) noexcept nogil:
    """Stage an adapted weight merged, W0 + s B A, a tile of MERGE_ROWS of W's rows at a
    time through ``scratch`` (no merged copy is kept): each tile is W0's rows plus its
    rank-R update, then converted as the weight itself would be."""
    cdef const LoraSite* p = m.lora
    cdef Py_ssize_t r0, t, i, r, j, n_in = p.n_in
    cdef uint16_t* dst = <uint16_t*>base + m.off
    cdef float c
    cdef float* row
    cdef const float* a_row
    r0 = 0
    while r0 < p.n_out:
        t = MERGE_ROWS if p.n_out - r0 > MERGE_ROWS else p.n_out - r0
        memcpy(scratch, m.src + r0 * n_in, t * n_in * sizeof(float))
        # rank-R update of the tile as R axpys per row: both staging threads run this at
        # once, and BLAS called from two threads for products this small mostly waits
        for i in range(t):
            row = scratch + i * n_in
            for r in range(p.R):
                c = p.scale * p.B[(r0 + i) * p.R + r]
                a_row = p.A + r * n_in
                for j in range(n_in):
                    row[j] += c * a_row[j]
        if m.op == OP_F16_T:      # block [n_in, n_out] = W^T: the tile is columns r0..
            anecy_f32_to_f16_transposed(scratch, dst + r0, n_in, t, n_in, m.ld16)
        else:
            f32_to_f16_rows(scratch, dst + r0 * m.ld16, t, n_in, n_in, m.ld16)
        r0 += t


# Weight staging of a range of calls, on either thread.
cdef struct StageJob:
    Call** calls
    int first
    int last
    int failed            # index of the call whose input Surface would not lock, or -1
    float* scratch        # this thread's tile for merging adapted weights


cdef void stage_range(void* arg) noexcept nogil:
    cdef StageJob* job = <StageJob*>arg
    cdef int i, j
    cdef Call* c
    job.failed = -1
    for i in range(job.first, job.last):
        c = job.calls[i]
        if surface_lock(c.inp) != 0:
            if job.failed < 0:
                job.failed = i
            continue
        for j in range(c.n_weights):
            if c.weights[j].lora != NULL:
                stage_merged(&c.weights[j], c.inp.base, job.scratch)
            else:
                run_in_moves(&c.weights[j], 1, c.inp.base, NULL)
        surface_unlock(c.inp)


# =========================================================================================
# PackedKernels
# =========================================================================================

cdef class PackedKernels(Kernels):
    """The ten kernels as MIL programs on packed fp16 Surfaces: everything the sim and ane
    backends share. Subclasses define ``compile_programs`` and ``_execute`` only."""

    def __init__(self, str backend):
        if type(self) is PackedKernels:
            raise TypeError("PackedKernels is the sim and ane backends' common base; use "
                            "SimKernels or AneKernels")
        Kernels.__init__(self)
        self.backend = backend
        self.config = None
        self.err_exc = None
        self.stale = True
        self._passthrough = True
        self.qkv_kept = NULL
        # one Surface for sdpaBwd1's output and sdpaBwd2's input, unless the environment
        # asks for separate ones (a way around a device that would not allow it)
        self.share_surfaces = os.environ.get(SEPARATE_SURFACES_ENV, "") != "1"
        self.stage_ms = 0.0
        self.compile_ms = 0.0
        self.calls = 0
        self._trace = None

    def __dealloc__(self):
        free(self.qkv_kept)
        free(self.plan)
        free(self.moves)
        free(self.weighted_calls)

    @property
    def trace(self):
        """None, or a list: each kernel call appends (MIL kernel name, layer or -1,
        {input: fp32 copy}, {output: fp32 copy}) with the names of kernel_io. Tracing
        takes the GIL on every call and turns the fp16 pass-throughs off (for calls made
        while it is on)."""
        return self._trace

    @trace.setter
    def trace(self, value):
        if value is not None and self.bound:
            self._need_fp32_state()
        self._trace = value
        self.tracing = value is not None

    @property
    def passthrough(self):
        """Whether the attention state stays fp16 where the layouts allow it (off: it makes
        fp32 round trips through this backend's buffers, with the same results)."""
        return self._passthrough

    @passthrough.setter
    def passthrough(self, bint on):
        if not on and self.bound:
            self._need_fp32_state()
        self._passthrough = on

    def bind(self, engine):
        """Dims, weights and RoPE tables (Kernels.bind), then: generate the ten programs,
        allocate every input and output Surface, compile the staging plans and the
        programs (``compile_ms``)."""
        Kernels.bind(self, engine)
        cfg = engine.config
        self.config = cfg
        self.worker = engine.worker
        cdef Dims d = self.d
        self.merges_lora = True
        self.merge_arena = Arena()
        self.merge_arena.carve([(<uintptr_t>&self.merge_scratch,
                                 2 * MERGE_ROWS * max(d.D, d.H, d.Q) if self.lora != NULL
                                 else 0)])
        programs = {k: mil.generate(k, cfg) for k in KERNEL_NAMES}
        self.stale = True
        self.bound = False
        self.layer_surfaces, self.layer_bufs = [], []
        for _ in range(d.L):
            pairs = {k: _fp16_surface(*input_shape(k, cfg)[1::2]) for k in WEIGHTED}
            self.layer_surfaces.append({k: p[0] for k, p in pairs.items()})
            self.layer_bufs.append({k: p[1] for k, p in pairs.items()})
        pairs = {k: _fp16_surface(*input_shape(k, cfg)[1::2]) for k in SHARED}
        self.shared_surfaces = {k: p[0] for k, p in pairs.items()}
        self.shared_bufs = {k: p[1] for k, p in pairs.items()}
        self.layer_output_surfaces, self.layer_out_bufs = [], []
        for _ in range(d.L):
            pairs = {k: _fp16_surface(*output_shape(k, cfg)[1::2]) for k in LAYER_OUTPUT}
            self.layer_output_surfaces.append({k: p[0] for k, p in pairs.items()})
            self.layer_out_bufs.append({k: p[1] for k, p in pairs.items()})
        pairs = {k: _fp16_surface(*output_shape(k, cfg)[1::2]) for k in KERNEL_NAMES
                 if k not in LAYER_OUTPUT}
        passing = _pass_through_args(cfg) if self.share_surfaces else None
        if passing not in (None, (4, 0)):   # the argument slots sdpa_bwd1/2 keep them at
            raise AssertionError(f"sdpaBwd1/2 hold probs at arguments {passing}, not (4, 0)")
        self.pass_ok = passing is not None
        if self.pass_ok:
            # sdpaBwd1 writes its probs/dprobs where sdpaBwd2 reads them: one Surface
            s = self.shared_surfaces["sdpaBwd2"]
            pairs["sdpaBwd1"] = (s, s.array(np.float16, output_shape("sdpaBwd1", cfg)[1::2]))
        self.output_surfaces = {k: p[0] for k, p in pairs.items()}
        self.out_bufs = {k: p[1] for k, p in pairs.items()}
        self._bind_hold(cfg)
        self._compile_plan()
        self.fp32_state = None
        if not (self.pass_ok and self.hold_ok and self._passthrough) or self.tracing:
            self._need_fp32_state()
        self.err_exc = None
        self.failed = False
        self.probs_kept, self.probs_layer, self.rep_layer = KEPT_NONE, -1, -1
        self.calls = 0
        self.passed_through = 0
        memset(self.io_in_ms, 0, sizeof(self.io_in_ms))
        memset(self.io_out_ms, 0, sizeof(self.io_out_ms))
        cdef double t0 = now_ms()
        self.compile_programs(programs)
        self.compile_ms = now_ms() - t0
        self.bound = True

    cdef void _bind_hold(self, cfg) except *:
        sites = _qkv_hold_layout(cfg)
        self.hold_ok = sites is not None
        self.held_calls = 0
        free(self.qkv_kept)
        self.qkv_kept = <int*>calloc(self.d.L, sizeof(int))
        if self.qkv_kept == NULL:
            raise MemoryError()
        if not self.hold_ok:
            return
        _set_site(&self.hold_fwd, sites["sdpaFwd"])
        _set_site(&self.hold_bwd1, sites["sdpaBwd1"])
        _set_site(&self.hold_bwd2, sites["sdpaBwd2"])

    cdef int _need_fp32_state(self) except -1:
        """Allocate the fp32 round trips' buffers, once (they are needed only when the
        attention state cannot, or is not to, stay fp16)."""
        if self.fp32_state is not None:
            return 0
        cdef Dims d = self.d
        cdef Py_ssize_t S = d.S, square = <Py_ssize_t>d.n_heads * S * S
        arena = Arena()
        arena.carve([(<uintptr_t>&self.q32, d.L * d.Q * S), (<uintptr_t>&self.k32, d.L * d.K * S),
                     (<uintptr_t>&self.v32, d.L * d.K * S), (<uintptr_t>&self.k_rep32, d.Q * S),
                     (<uintptr_t>&self.v_rep32, d.Q * S), (<uintptr_t>&self.probs32, square),
                     (<uintptr_t>&self.dprobs32, square)])
        self.fp32_state = arena
        return 0

    @property
    def holds_qkv(self):
        """Per layer: whether its q, k, v are kept in fp16 in sdpaFwd's output Surface of
        that layer for the backward (never converted to fp32)."""
        return [self.qkv_kept[l] == KEPT_FP16 for l in range(self.d.L)]

    # -- compiling the plan -------------------------------------------------------------------
    cdef object _weight_sources(self, int l):
        """Block name -> the engine's fp32 weight of layer l, in HF orientation."""
        cdef LayerParams* w = &self.layers[l]
        return {"Wq": <size_t>w.wq, "Wk": <size_t>w.wk, "Wv": <size_t>w.wv,
                "Wo": <size_t>w.wo, "W1": <size_t>w.w1, "W2": <size_t>w.w2,
                "W3": <size_t>w.w3, "q_norm": <size_t>w.q_norm, "k_norm": <size_t>w.k_norm}

    cdef size_t _adapter(self, str block, int l, tuple shape) except? 0:
        """The LoraSite of weight block ``block`` of layer l (0: not adapted); the block must
        be the whole weight, of ``shape`` [out, in]."""
        sites = {"Wq": SITE_WQ, "Wk": SITE_WK, "Wv": SITE_WV, "Wo": SITE_WO, "W1": SITE_W1,
                 "W2": SITE_W2, "W3": SITE_W3}
        if self.lora == NULL or l < 0 or block not in sites:
            return 0
        cdef LoraSite* p = &self.lora[l * N_SITES + <int>sites[block]]
        if p.A == NULL:
            return 0
        if shape != (p.n_out, p.n_in):
            raise AssertionError(f"{block}: a block of shape {shape} is not the whole adapted "
                                 f"weight ({p.n_out}, {p.n_in})")
        return <size_t>p

    cdef void _compile_plan(self) except *:
        cdef Dims d = self.d
        cfg = self.config
        specs = []      # (call index, kernel, layer, act moves, output moves, weight moves)
        for kid, k in enumerate(KERNEL_NAMES):
            lay = layout(k, cfg)
            _, C, _, W = lay.in_shape
            _, _, _, S = lay.out_shape
            acts = [(OP_F16, a, 0, b.row0 * W + b.col0, b.rows, b.cols, W, b.cols)
                    for a, b in enumerate(x for x in lay.inputs if x.kind == "act")]
            outs = [(OP_F32, len(acts) + a, 0, off * S, n, S, S, S)
                    for a, (_, off, n) in enumerate(lay.outputs)]
            if len(acts) + len(outs) > MAX_ARGS:
                raise AssertionError(f"{k}: more than {MAX_ARGS} arguments")
            for l in (range(d.L) if k in WEIGHTED else (-1,)):
                src = self._weight_sources(l) if l >= 0 else {}
                weights = []
                for b in lay.inputs:
                    at = b.row0 * W + b.col0
                    if b.kind == "pad":
                        weights.append((OP_ZERO, -1, 0, at, b.rows, b.cols, W, 0))
                    elif b.kind == "weight":
                        p = src[b.name]
                        if b.place == "T":        # block [rows, cols] = W^T, W is [cols, rows]
                            weights.append((OP_F16_T, -1, p, at, b.rows, b.cols, W, b.rows,
                                            self._adapter(b.name, l, (b.cols, b.rows))))
                        elif b.place == "vec":    # the whole column block belongs to it
                            weights.append((OP_ZERO, -1, 0, b.col0, C, b.cols, W, 0))
                            weights.append((OP_F16, -1, p, at, b.rows, b.cols, W, b.cols))
                        else:
                            weights.append((OP_F16, -1, p, at, b.rows, b.cols, W, b.cols,
                                            self._adapter(b.name, l, (b.rows, b.cols))))
                specs.append((kid * d.L + max(l, 0), k, l, acts, outs, weights))
        free(self.plan)
        free(self.moves)
        free(self.weighted_calls)
        self.plan = <Call*>calloc(len(KERNEL_NAMES) * d.L, sizeof(Call))
        n_moves = sum(len(a) + len(o) + len(w) for _, _, _, a, o, w in specs)
        self.moves = <Move*>calloc(n_moves, sizeof(Move))
        self.weighted_calls = <Call**>calloc(len(specs), sizeof(Call*))
        if self.plan == NULL or self.moves == NULL or self.weighted_calls == NULL:
            raise MemoryError()
        cdef int i = 0, ci
        cdef Call* c
        self.n_weighted_calls = 0
        by_layer = sorted(specs, key=lambda s: (s[2], s[0]))
        for ci, k, l, acts, outs, weights in by_layer:
            c = &self.plan[ci]
            c.inp = &(<Surface>self.input_surface(k, l)).mem
            c.out = &(<Surface>self.output_surface(k, max(l, 0))).mem
            c.acts = &self.moves[i]
            c.n_acts = len(acts)
            i = self._put(i, acts)
            c.outs = &self.moves[i]
            c.n_outs = len(outs)
            i = self._put(i, outs)
            c.weights = &self.moves[i]
            c.n_weights = len(weights)
            i = self._put(i, weights)
            if weights:
                self.weighted_calls[self.n_weighted_calls] = c
                self.n_weighted_calls += 1
    cdef int _put(self, int i, list moves) except -1:
        cdef Move* m
        for move in moves:
            op, arg, src, off, rows, cols, ld16, ld32 = move[:8]
            m = &self.moves[i]
            m.op, m.arg, m.src = op, arg, <const float*><size_t>src
            m.lora = <const LoraSite*><size_t>(move[8] if len(move) > 8 else 0)
            m.off, m.rows, m.cols, m.ld16, m.ld32 = off, rows, cols, ld16, ld32
            i += 1
        return i

    # -- what a subclass supplies -------------------------------------------------------------
    def compile_programs(self, programs):
        """Called once by bind(), after every Surface and the plan exist: make ``programs``
        (MIL kernel name -> mil.MilProgram) runnable."""
        raise NotImplementedError

    cdef int _execute(self, Call* c, int kid, int layer) noexcept nogil:
        """Run the program of kernel ``kid`` from c.inp into c.out (neither locked); 0, or
        -1 after recording the error (_fail_c or _fail_exc)."""
        return -1

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

    def output_surface(self, str kernel, int layer=0):
        """The output Surface of ``kernel``: layer ``layer``'s for sdpaFwd (each layer's
        keeps that layer's q, k, v for the backward); the one the layers share for the
        others (``layer`` is then ignored)."""
        return self.layer_output_surfaces[layer][kernel] if kernel in LAYER_OUTPUT \
            else self.output_surfaces[kernel]

    def output_buffer(self, str kernel, int layer=0):
        """The fp16 [C', S] view of ``output_surface(kernel, layer)``."""
        return self.layer_out_bufs[layer][kernel] if kernel in LAYER_OUTPUT \
            else self.out_bufs[kernel]

    # -- errors -------------------------------------------------------------------------------
    cdef void _fail_c(self, int kid, int layer, int kind, const char* text) noexcept nogil:
        if self.failed:
            return
        self.failed = True
        self.err_kernel, self.err_layer, self.err_kind = kid, layer, kind
        strncpy(self.err_text, text, ERR_LEN - 1)
        self.err_text[ERR_LEN - 1] = 0

    cdef void _fail_exc(self, int kid, int layer, object exc):
        # with the GIL, from an except clause: must not raise
        if self.failed:
            return
        self.failed = True
        self.err_kernel, self.err_layer, self.err_kind = kid, layer, ERR_RUNTIME
        self.err_text[0] = 0
        self.err_exc = exc

    cdef str _where(self):
        if self.err_kernel < 0:
            return "stage_weights"
        k = KERNEL_NAMES[self.err_kernel]
        return k if self.err_layer < 0 else f"{k} (layer {self.err_layer})"

    cdef object _pending(self):
        if not self.failed:
            return None
        if self.err_exc is not None:
            return self.err_exc
        text = (<bytes>self.err_text).decode("utf-8", "replace")
        if self.err_kind == ERR_ANE:
            e = AneError(f"{self._where()}: ANE evaluation failed: {text}")
            e.stage, e.kernel, e.layer = "evaluate", KERNEL_NAMES[self.err_kernel], self.err_layer
            return e
        return RuntimeError(text)

    @property
    def io_by_kernel(self):
        """{MIL kernel name: (packing ms, unpacking ms)} summed over every call since bind:
        where ``io_ms`` goes."""
        return {k: (self.io_in_ms[i], self.io_out_ms[i])
                for i, k in enumerate(KERNEL_NAMES)}

    @property
    def pending_error(self):
        """The first error a kernel met since the last raise_pending(), or None."""
        return self._pending()

    def raise_pending(self):
        """Raise (once) the first error met inside a kernel method, with a note naming the
        kernel and layer. Call after every engine entry point that runs kernels
        (forward_backward, logits, stage_weights)."""
        exc = self._pending()
        if exc is None:
            return
        note = f"raised inside the {self.backend} backend's {self._where()}"
        self.failed = False
        self.err_exc = None
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        raise exc

    # -- weight staging -----------------------------------------------------------------------
    cdef void stage_weights(self) noexcept nogil:
        cdef double t1, t0 = now_ms()
        cdef StageJob mine, theirs
        if not self.bound:
            return
        self.stale = True
        # the first half of the layers on the worker, the rest here
        theirs.calls = mine.calls = self.weighted_calls
        theirs.scratch = self.merge_scratch
        mine.scratch = self.merge_scratch \
            + <Py_ssize_t>MERGE_ROWS * max(self.d.D, self.d.H, self.d.Q)
        theirs.first, theirs.last = 0, self.n_weighted_calls // 2
        mine.first, mine.last = theirs.last, self.n_weighted_calls
        self.worker.submit_call(stage_range, &theirs)
        stage_range(&mine)
        self.worker.wait_all()
        if theirs.failed >= 0 or mine.failed >= 0:
            self._fail_c(-1, -1, ERR_RUNTIME,
                         b"could not lock an input Surface to stage the weights")
        else:
            self.stale = False
        t1 = now_ms()
        if self.timeline != NULL:
            trace_event(self.timeline, t0, t1, EV_STAGE, -1, 0, 0)
        self.stage_ms += t1 - t0

    def stage_all(self):
        """Stage every layer's weights (what stage_weights() does for the engine)."""
        with nogil:
            self.stage_weights()
        self.raise_pending()

    # -- one kernel call ----------------------------------------------------------------------
    # args holds the call's activation pointers then its output pointers, in the layout
    # table's order; NULL: a block filled otherwise (packing) or not wanted (unpacking).
    cdef Call* _call(self, int kid, int layer) noexcept nogil:
        return &self.plan[kid * self.d.L + (layer if layer >= 0 else 0)]

    cdef bint _start(self, Call* c, int kid, int layer, float** args) noexcept nogil:
        """Whether the call may run: no earlier call failed, the weights are staged."""
        if self.failed:                  # an earlier call failed: poison, do not run
            fill_nan(c.outs, c.n_outs, args)
            return False
        if self.stale:
            self._fail_c(kid, layer, ERR_RUNTIME,
                         b"the weights are not staged: no stage_weights() has succeeded "
                         b"since bind() (or the last one failed)")
            fill_nan(c.outs, c.n_outs, args)
            return False
        return True

    cdef bint _pack(self, Call* c, int kid, int layer, float** args) noexcept nogil:
        """Convert the activation arguments into the call's input Surface."""
        cdef double t0, t1
        if self.tracing:
            with gil:
                self._trace_inputs(kid, layer, args)
        t0 = now_ms()
        if surface_lock(c.inp) != 0:
            self._fail_c(kid, layer, ERR_RUNTIME, b"could not lock the input Surface")
            fill_nan(c.outs, c.n_outs, args)
            return False
        run_in_moves(c.acts, c.n_acts, c.inp.base, args)
        surface_unlock(c.inp)
        t1 = now_ms()
        if self.timeline != NULL:
            trace_event(self.timeline, t0, t1, EV_PACK, layer, 0, 0)
        t0 = t1 - t0
        self.io_ms += t0
        self.io_in_ms[kid] += t0
        return True

    cdef bint _exec(self, Call* c, int kid, int layer, float** args) noexcept nogil:
        cdef double t0 = now_ms() if self.timeline != NULL else 0.0
        if self._execute(c, kid, layer) != 0:
            fill_nan(c.outs, c.n_outs, args)
            return False
        if self.timeline != NULL:
            trace_event(self.timeline, t0, now_ms(), EV_EXECUTE, layer, 0, 0)
        return True

    cdef bint _unpack(self, Call* c, int kid, int layer, float** args) noexcept nogil:
        """Convert the call's output Surface into the output arguments."""
        cdef double t1, t0 = now_ms()
        if surface_lock(c.out) != 0:
            self._fail_c(kid, layer, ERR_RUNTIME, b"could not lock the output Surface")
            fill_nan(c.outs, c.n_outs, args)
            return False
        run_out_moves(c.outs, c.n_outs, c.out.base, args)
        surface_unlock(c.out)
        t1 = now_ms()
        if self.timeline != NULL:
            trace_event(self.timeline, t0, t1, EV_UNPACK, layer, 0, 0)
        t0 = t1 - t0
        self.io_ms += t0
        self.io_out_ms[kid] += t0
        self.calls += 1
        if self.tracing:
            with gil:
                self._trace_outputs(kid, args)
        return True

    cdef void _run(self, int kid, int layer, float** args) noexcept nogil:
        cdef Call* c = self._call(kid, layer)
        if self._start(c, kid, layer, args) and self._pack(c, kid, layer, args) \
                and self._exec(c, kid, layer, args):
            self._unpack(c, kid, layer, args)

    # -- the attention state ------------------------------------------------------------------
    cdef bint _keeps_fp16(self) noexcept nogil:
        """Whether kept tensors stay fp16 (else they go through the fp32 buffers)."""
        return self._passthrough and not self.tracing

    cdef int _kept_qkv(self, int kid, int l, float** q, float** k_rep,
                       float** v_rep) noexcept nogil:
        """Where sdpaBwd1/2 of layer l find the q, k, v that sdpa_fwd(l) kept. KEPT_FP16:
        in its output Surface (q, k_rep, v_rep stay NULL; _copy_held fills them in);
        KEPT_FP32: q, k_rep, v_rep point at the fp32 buffers, k and v repeated over each
        group of query heads; KEPT_NONE after recording the error (none kept)."""
        cdef Dims d = self.d
        cdef int kept = self.qkv_kept[l]
        if kept == KEPT_NONE:
            self._fail_c(kid, l, ERR_RUNTIME, b"no sdpa_fwd of this layer kept its q, k, v")
        elif kept == KEPT_FP32:
            q[0] = self.q32 + <Py_ssize_t>l * d.Q * d.S
            if d.n_heads == d.n_kv_heads:
                k_rep[0] = self.k32 + <Py_ssize_t>l * d.K * d.S
                v_rep[0] = self.v32 + <Py_ssize_t>l * d.K * d.S
                return kept
            if self.rep_layer != l:
                gqa_repeat(self.k32 + <Py_ssize_t>l * d.K * d.S, self.k_rep32, d.n_heads,
                           d.n_kv_heads, d.hd, d.S)
                gqa_repeat(self.v32 + <Py_ssize_t>l * d.K * d.S, self.v_rep32, d.n_heads,
                           d.n_kv_heads, d.hd, d.S)
                self.rep_layer = l
            k_rep[0], v_rep[0] = self.k_rep32, self.v_rep32
        return kept

    cdef bint _copy_held(self, Call* c, int kid, int l, HoldSite* site,
                         float** args) noexcept nogil:
        """Copy layer l's q, k, v from its sdpaFwd output Surface into this call's input
        Surface at `site` (sdpaBwd2 reads no v), k and v repeated over each group of query
        heads (GQA) as the programs read them."""
        cdef Dims d = self.d
        cdef SurfaceMem* src = self._call(K_SDPA_FWD, l).out
        cdef Py_ssize_t block = <Py_ssize_t>d.hd * d.S
        cdef int ratio = d.n_heads // d.n_kv_heads
        cdef const uint16_t* held
        cdef uint16_t* dst
        cdef int i, h
        cdef double t1, t0 = now_ms()
        if surface_lock(c.inp) != 0:
            self._fail_c(kid, l, ERR_RUNTIME, b"could not lock the input Surface")
            fill_nan(c.outs, c.n_outs, args)
            return False
        if surface_lock(src) != 0:
            surface_unlock(c.inp)
            self._fail_c(kid, l, ERR_RUNTIME, b"could not lock sdpaFwd's output Surface")
            fill_nan(c.outs, c.n_outs, args)
            return False
        held, dst = <const uint16_t*>src.base, <uint16_t*>c.inp.base
        memcpy(dst + site.off[0], held + self.hold_fwd.off[0],
               <Py_ssize_t>d.Q * d.S * sizeof(uint16_t))
        for i in range(1, 3):
            if site.arg[i] < 0:
                continue
            for h in range(d.n_heads):
                memcpy(dst + site.off[i] + h * block,
                       held + self.hold_fwd.off[i] + (h // ratio) * block,
                       block * sizeof(uint16_t))
        surface_unlock(src)
        surface_unlock(c.inp)
        self.held_calls += 1
        t1 = now_ms()
        if self.timeline != NULL:
            trace_event(self.timeline, t0, t1, EV_COPY_HELD, l, 0, 0)
        t0 = t1 - t0
        self.io_ms += t0
        self.io_in_ms[kid] += t0
        return True

    cdef void _trace_inputs(self, int kid, int layer, float** args):
        try:
            ins, _ = _io(self, KERNEL_NAMES[kid])
            self._trace.append((KERNEL_NAMES[kid], layer,
                                {n: _copy(args[i], c, self.d.S) for i, (n, c) in
                                 enumerate(ins)}, {}))
        except BaseException as e:
            self._fail_exc(kid, layer, e)

    cdef void _trace_outputs(self, int kid, float** args):
        try:
            ins, outs = _io(self, KERNEL_NAMES[kid])
            got = self._trace[len(self._trace) - 1][3]
            for i, (n, c) in enumerate(outs):
                if args[len(ins) + i] != NULL:
                    got[n] = _copy(args[len(ins) + i], c, self.d.S)
        except BaseException as e:
            self._fail_exc(kid, -1, e)

    # -- testing hooks: one half of a call ----------------------------------------------------
    cdef int pack_only(self, int kid, int layer, float** args) noexcept nogil:
        """Convert the activation arguments into the call's input Surface (no execute)."""
        cdef Call* c = &self.plan[kid * self.d.L + (layer if layer >= 0 else 0)]
        if surface_lock(c.inp) != 0:
            return -1
        run_in_moves(c.acts, c.n_acts, c.inp.base, args)
        surface_unlock(c.inp)
        return 0

    cdef int unpack_only(self, int kid, int layer, float** args) noexcept nogil:
        """Convert kernel kid's output Surface (layer ``layer``'s for sdpaFwd) into the output
        arguments."""
        cdef Call* c = &self.plan[kid * self.d.L + layer]
        if surface_lock(c.out) != 0:
            return -1
        run_out_moves(c.outs, c.n_outs, c.out.base, args)
        surface_unlock(c.out)
        return 0

    # -- the ten kernels (docs/ARCHITECTURE.md): pack, execute, unpack --------------------------
    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil:
        cdef Dims d = self.d
        cdef Call* c = self._call(K_SDPA_FWD, l)
        cdef int keep = KEPT_NONE
        cdef float* a[MAX_ARGS]
        self.qkv_kept[l] = KEPT_NONE     # until this call has run
        if self.rep_layer == l:
            self.rep_layer = -1
        if q == NULL:                    # KEPT: left in the output Surface, or unpacked to fp32
            keep = KEPT_FP16 if self.hold_ok and self._keeps_fp16() else KEPT_FP32
            if keep == KEPT_FP32:
                q = self.q32 + <Py_ssize_t>l * d.Q * d.S
                k = self.k32 + <Py_ssize_t>l * d.K * d.S
                v = self.v32 + <Py_ssize_t>l * d.K * d.S
        a[0], a[1], a[2], a[3], a[4] = <float*>xnorm, attn, q, k, v
        a[5], a[6] = q_raw, k_raw
        if self._start(c, K_SDPA_FWD, l, a) and self._pack(c, K_SDPA_FWD, l, a) \
                and self._exec(c, K_SDPA_FWD, l, a) and self._unpack(c, K_SDPA_FWD, l, a):
            self.qkv_kept[l] = keep

    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1] = <float*>attn, o
        self._run(K_WO_FWD, l, a)

    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1], a[2], a[3], a[4], a[5] = <float*>x2norm, <float*>x2, x_next, h1, h3, gate
        self._run(K_FFN_FUSED, l, a)

    cdef void ffn_bwd_w2t(self, int l, const float* dffn, float* dgate) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1] = <float*>dffn, dgate
        self._run(K_FFN_BWD_W2T, l, a)

    cdef void ffn_bwd_w13t(self, int l, const float* dh1, const float* dh3,
                           float* dx) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1], a[2] = <float*>dh1, <float*>dh3, dx
        self._run(K_FFN_BWD_W13T, l, a)

    cdef void wot_bwd(self, int l, const float* dy, float* da) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1] = <float*>dy, da
        self._run(K_WOT_BWD, l, a)

    cdef void sdpa_bwd1(self, int l, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil:
        cdef Call* c = self._call(K_SDPA_BWD1, -1)
        cdef int held = KEPT_NONE
        cdef int keep = KEPT_NONE
        cdef float* a[MAX_ARGS]
        a[0], a[1], a[2], a[3] = <float*>q, <float*>k_rep, <float*>v_rep, <float*>da
        a[4], a[5], a[6] = probs, dprobs, dv_rep
        self.probs_kept = KEPT_NONE      # this call's output overwrites them
        if not self._start(c, K_SDPA_BWD1, -1, a):
            return
        if q == NULL:                    # KEPT: layer l's, from sdpa_fwd(l)
            held = self._kept_qkv(K_SDPA_BWD1, l, &a[0], &a[1], &a[2])
            if held == KEPT_NONE:
                fill_nan(c.outs, c.n_outs, a)
                return
        if probs == NULL:                # KEPT: left where sdpaBwd2 reads them, or in fp32
            keep = KEPT_FP16 if self.pass_ok and self._keeps_fp16() else KEPT_FP32
            if keep == KEPT_FP32:
                a[4], a[5] = self.probs32, self.dprobs32
        if self._pack(c, K_SDPA_BWD1, -1, a) \
                and (held != KEPT_FP16 or self._copy_held(c, K_SDPA_BWD1, l, &self.hold_bwd1, a)) \
                and self._exec(c, K_SDPA_BWD1, -1, a) and self._unpack(c, K_SDPA_BWD1, -1, a):
            self.probs_kept, self.probs_layer = keep, l

    cdef void sdpa_bwd2(self, int l, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil:
        cdef Call* c = self._call(K_SDPA_BWD2, -1)
        cdef int held = KEPT_NONE
        cdef float* unused
        cdef float* a[MAX_ARGS]
        a[0], a[1], a[2], a[3] = <float*>probs, <float*>dprobs, <float*>q, <float*>k_rep
        a[4], a[5] = dq, dk_rep
        if not self._start(c, K_SDPA_BWD2, -1, a):
            return
        if probs == NULL:                # KEPT: sdpa_bwd1(l)'s
            if self.probs_kept == KEPT_NONE or self.probs_layer != l:
                self._fail_c(K_SDPA_BWD2, l, ERR_RUNTIME,
                             b"no sdpa_bwd1 of this layer kept its probs and dprobs")
                fill_nan(c.outs, c.n_outs, a)
                return
            if self.probs_kept == KEPT_FP32:
                a[0], a[1] = self.probs32, self.dprobs32
            else:                        # already in place: sdpaBwd1 wrote this very Surface
                self.passed_through += 1
        elif self.probs_kept == KEPT_FP16:
            self.probs_kept = KEPT_NONE  # the caller's probs overwrite the kept ones
        if q == NULL:                    # KEPT: layer l's, from sdpa_fwd(l)
            held = self._kept_qkv(K_SDPA_BWD2, l, &a[2], &a[3], &unused)
            if held == KEPT_NONE:
                fill_nan(c.outs, c.n_outs, a)
                return
        if self._pack(c, K_SDPA_BWD2, -1, a) \
                and (held != KEPT_FP16 or self._copy_held(c, K_SDPA_BWD2, l, &self.hold_bwd2, a)) \
                and self._exec(c, K_SDPA_BWD2, -1, a):
            self._unpack(c, K_SDPA_BWD2, -1, a)

    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1] = <float*>dq, dx
        self._run(K_Q_BWD, l, a)

    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil:
        cdef float* a[MAX_ARGS]
        a[0], a[1], a[2] = <float*>dk, <float*>dv, dx
        self._run(K_KV_BWD, l, a)

cdef object _copy(const float* p, Py_ssize_t rows, Py_ssize_t cols):
    if p == NULL:
        return None
    cdef float[:, ::1] mv = <float[:rows, :cols]> (<float*> p)
    return np.array(mv, copy=True)


def _io(Kernels k, str kernel):
    """(inputs, outputs) of MIL kernel ``kernel`` for k's dimensions, from the layout
    table: lists of (name, channels), each array being fp32 [channels, seq_len]."""
    cdef Dims d = k.d
    spec = KERNELS[kernel]
    syms = dict(D=d.D, H=d.H, Q=d.Q, K=d.K, S=d.S, P=d.n_heads * d.S, HD=d.hd)
    present = lambda when: when == "" or (when == "qk_norm" and d.qk_norm)
    C = _size(spec.channels, syms)
    ins = [(b.name, _size(b.size, syms) if spec.packing == "channels" else C)
           for b in spec.inputs if b.kind == "act" and present(b.when)]
    outs = [(o.name, _size(o.size, syms)) for o in spec.outputs if present(o.when)]
    return ins, outs


# =========================================================================================
# The two backends: what executes a program
# =========================================================================================

cdef class SimKernels(PackedKernels):
    """The ``sim`` backend: each program run by ``anecy.milsim`` on the input Surface's
    fp16 view, its fp16 result copied into the output Surface (with the GIL, inside this
    executor only)."""

    def __init__(self):
        PackedKernels.__init__(self, "sim")
        self.programs = None

    def compile_programs(self, programs):
        # Interpreter parses and type-checks each program (a bad one raises MilError here).
        self.programs = {k: Interpreter(p) for k, p in programs.items()}

    cdef int _execute(self, Call* c, int kid, int layer) noexcept nogil:
        cdef int rc = 0
        if surface_lock(c.inp) != 0:
            self._fail_c(kid, layer, ERR_RUNTIME, b"could not lock the input Surface")
            return -1
        if surface_lock(c.out) != 0:
            surface_unlock(c.inp)
            self._fail_c(kid, layer, ERR_RUNTIME, b"could not lock the output Surface")
            return -1
        with gil:
            try:
                k = KERNEL_NAMES[kid]
                y = self.programs[k].run(self.input_buffer(k, layer))
                out = self.output_buffer(k, max(layer, 0))
                np.copyto(out, y.reshape(out.shape))
            except BaseException as e:
                self._fail_exc(kid, layer, e)
                rc = -1
        surface_unlock(c.out)
        surface_unlock(c.inp)
        return rc


# Compiled programs, shared by every AneKernels of the process: (factory, MIL text, blobs)
# -> AneKernel. The ANE leaks resources after about 119 compiles per process, so models of
# the same shape compile their ten programs once between them.
_COMPILED = {}


def clear_compiled_programs():
    """Forget the process's compiled ANE programs (each is unloaded once no AneKernels
    still uses it). New models then compile again, counting towards the ANE's limit."""
    _COMPILED.clear()


def _compiled(factory, str kernel, program, cfg):
    key = (factory, program.text, tuple(sorted(program.blobs.items())))
    k = _COMPILED.get(key)
    if k is None:
        ane_health.spend_compile(kernel)        # refuses a compile past the ANE's budget
        try:
            k = factory(program.text, program.blobs, kernel)
        except AneError as e:
            raise ane_health.failure("compile and load", kernel, -1, cfg, e) from None
        if not isinstance(k, AneKernel):
            raise TypeError(f"kernel_factory returned {type(k).__name__}, not an AneKernel")
        _COMPILED[key] = k
    return k


def _request(PackedKernels kernels, program, str kernel, int layer):
    """``program`` bound to ``kernel``'s Surfaces of ``layer`` (-1: the layers' shared
    ones); a failure names the kernel, layer, shapes and machine (ane_health.failure)."""
    try:
        return program.bind(kernels.input_surface(kernel, max(layer, 0)),
                            kernels.output_surface(kernel, max(layer, 0)))
    except AneError as e:
        raise ane_health.failure("bind", kernel, layer, kernels.config, e) from None


cdef class AneKernels(PackedKernels):
    """The ``ane`` backend: each program compiled once (bind) and run by the Apple Neural
    Engine from the input Surface into the output Surface, through an AneRequest bound to
    that pair: one per layer for a weight-bearing kernel, one each for sdpaBwd1/2. The
    kernel methods evaluate through the shim in C, without the GIL.

    ``kernel_factory`` (default ``anecy._ane_runtime.AneKernel``) is called as
    ``factory(mil_text, blobs, name)`` and must return an AneKernel (or a subclass: tests
    and benchmarks pass stand-ins that replace only the program execution)."""
    def __init__(self, kernel_factory=None):
        PackedKernels.__init__(self, "ane")
        from ._ane_runtime import AneKernel as default_factory
        self.kernel_factory = default_factory if kernel_factory is None else kernel_factory
        self.compiled = None
        self.requests = None
        self.shared_requests = None

    def compile_programs(self, programs):
        cdef Dims d = self.d
        cdef int kid
        if d.S < 32:
            # the public reference found rows of a [1, C, 1, W] surface padded to 32
            # elements, so a narrower tensor would not be laid out as packed here
            raise ConfigError(f"the ane backend needs seq_len >= 32 (got {d.S}): the ANE "
                              f"pads surface rows to 32 elements")
        compiled = {k: _compiled(self.kernel_factory, k, p, self.config)
                    for k, p in programs.items()}
        requests = [{k: _request(self, compiled[k], k, l) for k in WEIGHTED} for l in range(d.L)]
        shared = {k: _request(self, compiled[k], k, -1) for k in SHARED}
        for kid, k in enumerate(KERNEL_NAMES):
            for l in (range(d.L) if k in WEIGHTED else (0,)):
                req = requests[l][k] if k in WEIGHTED else shared[k]
                self.plan[kid * d.L + l].ev = (<AneKernel>compiled[k]).evaluator(req)
        self.requests, self.shared_requests, self.compiled = requests, shared, compiled

    def execute(self, str kernel, int layer=0):
        """Run ``kernel``'s program once on its Surfaces as they are (layer ``layer``'s input
        for a weight-bearing kernel), with no packing or unpacking: for checks that write
        the input Surface themselves (``anecy selftest``). Raises AneError on failure."""
        if self.compiled is None:
            raise RuntimeError("the ane backend is not bound to an Engine")
        if not 0 <= layer < self.d.L:
            raise IndexError(f"layer {layer} is outside [0, {self.d.L})")
        cdef int kid = KERNEL_NAMES.index(kernel)
        cdef Call* c = &self.plan[kid * self.d.L + (layer if kernel in WEIGHTED else 0)]
        cdef char err[ERR_LEN]
        cdef int rc
        err[0] = 0
        with nogil:
            rc = c.ev.fn(c.ev.ctx, err, ERR_LEN)
        if rc != 0:
            raise AneError(f"{kernel}: ANE evaluation failed: "
                           f"{err.decode('utf-8', 'replace') or '(no reason given)'}")

    cdef int _execute(self, Call* c, int kid, int layer) noexcept nogil:
        cdef char err[ERR_LEN]
        err[0] = 0
        if c.ev.fn(c.ev.ctx, err, ERR_LEN) != 0:
            if err[0] == 0:
                strncpy(err, b"(no reason given)", ERR_LEN)
            self._fail_c(kid, layer, ERR_ANE, err)
            return -1
        return 0
