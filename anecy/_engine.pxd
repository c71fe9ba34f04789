# The layer loop and the kernel-executor interface every backend implements.

from libc.stdint cimport uint32_t

from ._worker cimport DWWorker
from ._timeline cimport TraceTrack


cdef struct Dims:
    int D          # dim
    int H          # hidden_dim
    int L          # n_layers
    int n_heads
    int n_kv_heads
    int hd         # head_dim
    int Q          # n_heads * hd
    int K          # n_kv_heads * hd
    int S          # seq_len
    float eps
    float residual_scale
    bint qk_norm
    bint rope_half


# Pointers to one layer's tensors inside a flat buffer (weights, or their gradients).
cdef struct LayerParams:
    float* wq            # [Q, D]
    float* wk            # [K, D]
    float* wv            # [K, D]
    float* wo            # [D, Q]
    float* w1            # [H, D]  gate_proj
    float* w2            # [D, H]  down_proj
    float* w3            # [H, D]  up_proj
    float* attn_norm     # [D]
    float* ffn_norm      # [D]
    float* q_norm        # [hd] or NULL
    float* k_norm        # [hd] or NULL


# One layer's saved forward activations, all channel-first [C, S]. (Its q, k, v are part of
# the attention state its Kernels keep: see Kernels.)
cdef struct LayerActs:
    float* x_in          # [D, S]   layer input (residual stream)
    float* xnorm         # [D, S]
    float* q_raw         # [Q, S]   projections before QK-norm (QK-norm models only)
    float* k_raw         # [K, S]
    float* attn          # [Q, S]
    float* x2            # [D, S]   after the attention residual
    float* x2norm        # [D, S]
    float* h1            # [H, S]
    float* h3            # [H, S]
    float* gate          # [H, S]   silu(h1) * h3


# Backward buffers that dW jobs read; two sets alternate between layers so a set is
# rewritten only after the worker has finished the jobs of the layer before last.
cdef struct GradSet:
    float* dffn          # [D, S]
    float* dh1           # [H, S]
    float* dh3           # [H, S]
    float* do            # [D, S]
    float* dq            # [Q, S]   w.r.t. q_proj output
    float* dk            # [K, S]
    float* dv            # [K, S]


# The projections LoRA can adapt, by the engine's field names (model.layer_tensors).
cdef enum:
    SITE_WQ = 0
    SITE_WK = 1
    SITE_WV = 2
    SITE_WO = 3
    SITE_W1 = 4
    SITE_W3 = 5
    SITE_W2 = 6
    N_SITES = 7


# One LoRA adapter pair on a projection y = W0 x (+ scale * B (A x)), and what its forward
# keeps for its backward. Sites are indexed l * N_SITES + site (the enum in _engine.pyx); an
# unadapted site has A == NULL.
cdef struct LoraSite:
    const float* A       # [R, n_in]
    const float* B       # [n_out, R]
    float* dA            # [R, n_in]   gradients, in the flat buffer mirroring the adapters
    float* dB            # [n_out, R]
    float* u             # [R, S]      A x, kept from the forward
    float* v             # [R, S]      B^T dy, read by the dA job
    int R
    int n_in
    int n_out
    float scale
    # dropout on the adapter's input (cpu): this microstep's mask is a function of drop_key
    # (see _lowrank.h); drop_threshold 0 outside forward_backward, or with no dropout
    uint32_t drop_key
    uint32_t drop_threshold
    float keep_scale     # 1 / (1 - p)


# One zeroed allocation carved into buffers by a size table (see _engine.pyx).
cdef class Arena:
    cdef void* raw
    cdef readonly Py_ssize_t floats
    cdef int carve(self, list table) except -1


cdef class Kernels:
    """The ten matrix kernels of the layer loop (docs/ARCHITECTURE.md, section 4).
    Subclasses: CpuKernels (here), the sim and ane backends. Weights are read through
    `layers`, set by the Engine.

    The attention state. What passes only from one attention kernel to a later one stays
    in the backend, which owns it (cpu: fp32 buffers; sim/ane: fp16 Surfaces, or fp32
    round trips when the pass-throughs are off): sdpa_fwd(l) keeps layer l's q, k, v (cpu
    also its attention probabilities) for sdpa_bwd1(l) and sdpa_bwd2(l), and sdpa_bwd1(l)
    keeps probs and dprobs for sdpa_bwd2(l). The GQA repeat of k and v for the backward is
    the backend's too. The engine asks for kept state by passing KEPT (NULL) for those
    arguments, and so holds no fp32 q, k, v, probs or dprobs itself. A caller that passes
    its own arrays instead (tests, benchmarks) gets every output in fp32 and leaves the
    kept state alone."""
    cdef Dims d
    cdef LayerParams* layers
    cdef LoraSite* lora             # [L * N_SITES] or NULL (no adapters), set by the Engine
    cdef const float* rope_cos     # [hd/2, S]: the step's (positions 0..S-1, or the Engine's
    cdef const float* rope_sin     # table gathered at the step's position ids)
    cdef const int* key_start      # [S] first key each query attends, or NULL (causal from 0)
    cdef public double io_ms        # time spent packing/unpacking kernel I/O
    # the backend stages the merged weight W0 + scale * B A of every adapted projection
    # (sim, ane): its kernels compute no low-rank path, and the engine only A x and the
    # adapters' gradients; else (cpu) the kernels add the low-rank path (lora_fwd)
    cdef readonly bint merges_lora
    cdef TraceTrack* timeline      # NULL, or where the backend records its own work (the
                                   # Engine's main track, set by Engine.set_timeline)

    cdef void stage_weights(self) noexcept nogil
    # y += alpha * scale * B (A x) for an adapted site (keeping u = A x); nothing otherwise
    cdef void lora_fwd(self, int l, int site, const float* x, float* y,
                       float alpha) noexcept nogil
    # q, k, v: KEPT, or a caller's outputs
    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil
    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil
    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil
    cdef void ffn_bwd_w2t(self, int l, const float* dffn, float* dgate) noexcept nogil
    cdef void ffn_bwd_w13t(self, int l, const float* dh1, const float* dh3,
                           float* dx) noexcept nogil
    cdef void wot_bwd(self, int l, const float* dy, float* da) noexcept nogil
    # q, k_rep, v_rep: all KEPT (layer l's from sdpa_fwd(l)) or all given; probs, dprobs:
    # KEPT (for sdpa_bwd2(l)) or a caller's outputs
    cdef void sdpa_bwd1(self, int l, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil
    # probs, dprobs: KEPT (sdpa_bwd1(l)'s) or given; q, k_rep: KEPT (as for sdpa_bwd1) or given
    cdef void sdpa_bwd2(self, int l, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil
    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil
    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil
