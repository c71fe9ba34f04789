# The layer loop and the kernel-executor interface every backend implements.

from ._worker cimport DWWorker


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


# One layer's saved forward activations, all channel-first [C, S].
cdef struct LayerActs:
    float* x_in          # [D, S]   layer input (residual stream)
    float* xnorm         # [D, S]
    float* q_raw         # [Q, S]   projections before QK-norm (QK-norm models only)
    float* k_raw         # [K, S]
    float* q             # [Q, S]   after QK-norm and RoPE
    float* k             # [K, S]
    float* v             # [K, S]
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


cdef class Kernels:
    """The ten matrix kernels of the layer loop (docs/ARCHITECTURE.md, section 4).
    Subclasses: CpuKernels (here), the sim and ane backends. Weights are read through
    `layers`, set by the Engine."""
    cdef Dims d
    cdef LayerParams* layers
    cdef const float* rope_cos
    cdef const float* rope_sin
    cdef public double io_ms        # time spent packing/unpacking kernel I/O
    # The engine's own attention-probability buffers: what it passes to sdpa_bwd1 and on
    # to sdpa_bwd2, and never reads itself (a packed backend may leave them unwritten).
    cdef const float* engine_probs
    cdef const float* engine_dprobs
    # The engine's own q, k, v buffers of each layer, and its GQA-repeated k and v: what it
    # passes to sdpa_fwd and on to sdpa_bwd1/2. A backend that keeps layer l's q, k, v
    # itself (qkv_held) may leave them unwritten; the engine then skips the GQA repeat.
    cdef const float** engine_q     # [L]
    cdef const float** engine_k     # [L]
    cdef const float** engine_v     # [L]
    cdef const float* engine_k_rep
    cdef const float* engine_v_rep
    cdef object _engine_ptrs

    cdef bint qkv_held(self, int l) noexcept nogil
    cdef void stage_weights(self) noexcept nogil
    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil
    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil
    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil
    cdef void ffn_bwd_w2t(self, int l, const float* dffn, float* dgate) noexcept nogil
    cdef void ffn_bwd_w13t(self, int l, const float* dh1, const float* dh3,
                           float* dx) noexcept nogil
    cdef void wot_bwd(self, int l, const float* dy, float* da) noexcept nogil
    cdef void sdpa_bwd1(self, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil
    cdef void sdpa_bwd2(self, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil
    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil
    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil
