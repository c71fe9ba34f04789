# The packed fp16 backends (sim, ane): staging plans and the kernel classes.

from libc.stdint cimport uint16_t

from ._engine cimport Kernels, Arena, LoraSite
from ._worker cimport DWWorker
from ._ane_runtime cimport SurfaceMem, Evaluator

cdef extern from "_fp16.h" nogil:
    void anecy_f32_to_f16(const float* src, uint16_t* dst, size_t n)
    void anecy_f16_to_f32(const uint16_t* src, float* dst, size_t n)
    void anecy_f32_to_f16_transposed(const float* src, uint16_t* dst, size_t rows,
                                     size_t cols, size_t ld32, size_t ld16)


cdef enum:
    OP_F16 = 0        # fp32 rows -> fp16 rows
    OP_F16_T = 1      # fp32 [cols, rows] (an HF weight) -> fp16 [rows, cols], transposed
    OP_ZERO = 2       # fp16 rows := 0
    OP_F32 = 3        # fp16 rows -> fp32 rows
    MAX_ARGS = 8      # pointer arguments of a kernel call (sdpa_fwd: 1 in, 6 out)
    # where a tensor of the attention state is kept
    KEPT_NONE = 0     # nowhere (not kept, or its kernel failed)
    KEPT_FP16 = 1     # in a Surface, where the next kernel copies or reads it
    KEPT_FP32 = 2     # in the backend's fp32 buffers (pass-throughs off, tracing)
    ERR_LEN = 1024
    # what raise_pending() raises for an error recorded in C
    ERR_RUNTIME = 0
    ERR_ANE = 1


cdef struct Move:
    int op
    int arg               # activations/outputs: index of the call's pointer argument; else -1
    const float* src      # weights: the engine's fp32 weight (moves with arg -1)
    Py_ssize_t off        # element offset of the block's first element in the Surface
    Py_ssize_t rows
    Py_ssize_t cols
    Py_ssize_t ld16       # Surface row stride (elements)
    Py_ssize_t ld32       # fp32 row stride (elements)
    const LoraSite* lora  # weights: the adapter of src (staged merged: W0 + s B A), or NULL


cdef struct Call:         # one kernel call: (kernel, layer)
    SurfaceMem* inp
    SurfaceMem* out
    Move* acts
    int n_acts
    Move* outs
    int n_outs
    Move* weights
    int n_weights
    Evaluator ev          # ane: how the program runs



cdef struct HoldSite:      # where one kernel call has q, k, v (k_rep, v_rep)
    int arg[3]            # the call's pointer argument index of each, -1 if absent
    Py_ssize_t off[3]     # element offset of each in the Surface


cdef class PackedKernels(Kernels):
    cdef readonly str backend           # "sim" | "ane"
    cdef readonly object config
    cdef readonly object layer_surfaces  # [layer] -> {kernel: input Surface} (WEIGHTED)
    cdef readonly object shared_surfaces # {kernel: input Surface} (SHARED)
    cdef readonly object output_surfaces # {kernel: output Surface}, shared by the layers
    cdef readonly object layer_output_surfaces  # [layer] -> {kernel: output Surface} (sdpaFwd)
    cdef object layer_out_bufs          # [layer] -> {kernel: fp16 [C', S] view}
    cdef object layer_bufs              # [layer] -> {kernel: fp16 [C, W] view of its Surface}
    cdef object shared_bufs             # {kernel: fp16 [C, W] view}
    cdef object out_bufs                # {kernel: fp16 [C', S] view}
    # the plan: calls[kernel id * L + layer] (layer 0 for SHARED), all moves in one array
    cdef Call* plan
    cdef Move* moves
    cdef Call** weighted_calls          # the calls with weight moves, layer by layer
    cdef int n_weighted_calls
    cdef DWWorker worker                # the engine's: takes half of the weight staging
    cdef float* merge_scratch           # [2, MERGE_ROWS, max(D, H, Q)]: one tile per thread
    cdef Arena merge_arena
    cdef bint bound
    cdef bint stale                     # no stage_weights() has succeeded since bind()
    # What stays fp16 between kernels (see the module docstring): sdpaBwd1's output Surface
    # is sdpaBwd2's input Surface (pass_ok), sdpaFwd's per-layer output Surface holds that
    # layer's q, k, v where sdpaBwd1/2 can copy them from (hold_ok)
    cdef bint _passthrough              # use both when the layouts allow (off: fp32 round trips)
    cdef public bint share_surfaces     # read by bind(): sdpaBwd1's output is sdpaBwd2's input
    cdef bint pass_ok                   # the layouts allow the probs pass-through
    cdef bint hold_ok                   # the layouts allow the fp16 hold of q, k, v
    cdef HoldSite hold_fwd, hold_bwd1, hold_bwd2
    # The attention state (Kernels): where each kept tensor is, KEPT_NONE/FP16/FP32
    cdef int* qkv_kept                  # [L] layer l's q, k, v, kept by sdpa_fwd(l)
    cdef int probs_kept                 # probs/dprobs, kept by sdpa_bwd1(probs_layer)
    cdef int probs_layer
    cdef int rep_layer                  # the layer k_rep32/v_rep32 hold (-1: none)
    cdef Arena fp32_state               # the fp32 round trips' buffers (allocated when needed)
    cdef float* q32                     # [L, Q, S]
    cdef float* k32                     # [L, K, S]
    cdef float* v32                     # [L, K, S]
    cdef float* k_rep32                 # [Q, S]
    cdef float* v_rep32                 # [Q, S]
    cdef float* probs32                 # [n_heads*S, S]
    cdef float* dprobs32                # [n_heads*S, S]
    cdef readonly long held_calls       # sdpaBwd1/2 calls that read the held q, k, v
    # the first error since the last raise_pending()
    cdef bint failed
    cdef int err_kernel, err_layer, err_kind
    cdef char err_text[ERR_LEN]
    cdef object err_exc                 # a Python exception (sim executor), or None
    cdef bint tracing
    cdef object _trace
    cdef public double stage_ms         # time spent staging weights (not part of io_ms)
    cdef double io_in_ms[16]            # io_ms by kernel id: packing, unpacking (cumulative)
    cdef double io_out_ms[16]
    cdef readonly double compile_ms     # time bind() spent compiling the ten programs
    cdef readonly long calls            # kernel calls run since bind
    cdef readonly long passed_through   # sdpaBwd2 calls whose probs came surface to surface

    cdef void _compile_plan(self) except *
    cdef void _bind_hold(self, cfg) except *
    cdef int _need_fp32_state(self) except -1
    cdef object _weight_sources(self, int l)
    cdef size_t _adapter(self, str block, int l, tuple shape) except? 0
    cdef int _put(self, int i, list moves) except -1
    cdef int _execute(self, Call* c, int kid, int layer) noexcept nogil
    cdef void _fail_c(self, int kid, int layer, int kind, const char* text) noexcept nogil
    cdef void _fail_exc(self, int kid, int layer, object exc)
    cdef str _where(self)
    cdef object _pending(self)
    # one kernel call: _start, _pack, _exec, _unpack (each False after a failure, the
    # call's outputs then NaN); _run is the four in a row
    cdef Call* _call(self, int kid, int layer) noexcept nogil
    cdef bint _start(self, Call* c, int kid, int layer, float** args) noexcept nogil
    cdef bint _pack(self, Call* c, int kid, int layer, float** args) noexcept nogil
    cdef bint _exec(self, Call* c, int kid, int layer, float** args) noexcept nogil
    cdef bint _unpack(self, Call* c, int kid, int layer, float** args) noexcept nogil
    cdef void _run(self, int kid, int layer, float** args) noexcept nogil
    # the attention state
    cdef bint _keeps_fp16(self) noexcept nogil
    cdef int _kept_qkv(self, int kid, int l, float** q, float** k_rep,
                       float** v_rep) noexcept nogil
    cdef bint _copy_held(self, Call* c, int kid, int l, HoldSite* site,
                         float** args) noexcept nogil
    cdef void _trace_inputs(self, int kid, int layer, float** args)
    cdef void _trace_outputs(self, int kid, float** args)
    cdef int pack_only(self, int kid, int layer, float** args) noexcept nogil
    cdef int unpack_only(self, int kid, int layer, float** args) noexcept nogil

cdef class SimKernels(PackedKernels):
    cdef readonly object programs       # MIL kernel name -> milsim.Interpreter


cdef class AneKernels(PackedKernels):
    # Released before the base's Surfaces: requests hold their AneKernel and Surfaces.
    cdef readonly object requests       # [layer] -> {kernel: AneRequest} (WEIGHTED)
    cdef readonly object shared_requests  # {kernel: AneRequest} (SHARED)
    cdef readonly object compiled       # MIL kernel name -> AneKernel
    cdef readonly object kernel_factory
