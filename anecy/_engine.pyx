# cython: language_level=3
"""The training step: one forward and backward pass of a Llama-family model.

The layer loop is written once, here, and runs without the GIL. Matrix work goes
through a Kernels object (cpu here; sim and ane elsewhere); everything between the
kernels (norms, residuals, SwiGLU and RoPE backward, GQA reduce, classifier,
cross-entropy, embedding) is shared. Weight gradients are queued on a DWWorker.
Every buffer is allocated once, in Engine.__init__. The data flow of a step is in
docs/ARCHITECTURE.md, section 2 (One training step); the buffer layouts in section 3."""

import numpy as np

from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from ._ops cimport (sgemm, rmsnorm_fwd, rmsnorm_bwd, rope_fwd, rope_bwd, swiglu_fwd, swiglu_bwd,
                    attention_fwd, attention_bwd1, attention_bwd2, gqa_repeat, gqa_reduce,
                    softmax_xent, embedding_fwd, embedding_bwd, scale_copy, add_scaled,
                    adamw, sumsq)
from ._worker cimport DWWorker, GemmJob, now_ms
from ._timeline cimport (TraceTrack, trace_event, EV_SECTION, EV_SDPA_FWD, EV_WO_FWD,
                         EV_FFN_FUSED, EV_FFN_BWD_W2T, EV_FFN_BWD_W13T, EV_WOT_BWD,
                         EV_SDPA_BWD1, EV_SDPA_BWD2, EV_Q_BWD, EV_KV_BWD, EV_LORA_BWD,
                         EV_EMBEDDING, EV_DW_SUBMIT, EV_DW_INLINE, EV_FORWARD, EV_BACKWARD,
                         EV_GRAD_NORM, EV_ADAMW)
from ._ops import rope_tables
from .timers import ENGINE_TIMERS

from ._lowrank cimport (anecy_drop_hash, anecy_lowrank_path, anecy_lora_down, anecy_lora_up,
                       anecy_lora_back_out, anecy_lora_back_in)

# which loops the adapters' rank-R products run ("avx2+fma" or "portable")
LOWRANK_PATH = anecy_lowrank_path().decode()

# Timer slots, in the order of timers.ENGINE_TIMERS (the names Engine.timings() reports).
cdef enum:
    T_KERNELS = 0
    T_RMS = 1
    T_CLASSIFIER = 2
    T_ELEMENTWISE = 3
    T_DW_WAIT = 4
    T_DW = 5
    N_TIMERS = 6

assert ENGINE_TIMERS.index("kernels") == T_KERNELS and ENGINE_TIMERS.index("rms") == T_RMS \
    and ENGINE_TIMERS.index("classifier") == T_CLASSIFIER \
    and ENGINE_TIMERS.index("elementwise") == T_ELEMENTWISE \
    and ENGINE_TIMERS.index("dw_wait") == T_DW_WAIT and ENGINE_TIMERS.index("dw") == T_DW \
    and len(ENGINE_TIMERS) == N_TIMERS

# What the engine passes for an argument that is part of the kernels' attention state
# (see Kernels): the backend keeps it.
cdef float* KEPT = NULL


cdef float* _ptr(arr):
    """Address of a C-contiguous float32 array (checked once, at set-up)."""
    cdef float[::1] flat = arr.reshape(-1)
    return &flat[0]


cdef class Arena:
    """One zeroed allocation carved into buffers by a size table: a list of (address of a
    float* field, floats); each buffer starts on a 64-byte boundary, a size of 0 leaves
    its field NULL."""

    def __cinit__(self):
        self.raw = NULL

    cdef int carve(self, list table) except -1:
        cdef Py_ssize_t at = 0, n
        cdef float* base
        for _, n in table:
            at += (n + 15) // 16 * 16
        self.floats = at
        self.raw = calloc(at + 16, sizeof(float))
        if self.raw == NULL:
            raise MemoryError()
        base = <float*>((<uintptr_t>self.raw + 63) // 64 * 64)
        at = 0
        for field, n in table:
            (<float**><uintptr_t>field)[0] = base + at if n else NULL
            at += (n + 15) // 16 * 16
        return 0

    def __dealloc__(self):
        free(self.raw)


cdef class Kernels:
    def __init__(self):
        if type(self) is Kernels:
            raise TypeError("Kernels is an interface; use a backend's subclass")

    def raise_pending(self):
        """Re-raise an error a kernel met without the GIL (backends that can fail)."""

    def bind(self, Engine engine):
        """Called once by the Engine: dimensions, weights and RoPE tables."""
        self.d = engine.d
        self.layers = engine.weights
        self.lora = engine.lora
        self.rope_cos = _ptr(engine.rope_cos)
        self.rope_sin = _ptr(engine.rope_sin)
        self.key_start = NULL

    cdef void stage_weights(self) noexcept nogil:
        pass

    cdef void lora_fwd(self, int l, int site, const float* x, float* y,
                       float alpha) noexcept nogil:
        # u[R,S] = A @ drop(x); y[out,S] += alpha * scale * B @ u (rank-sized products only,
        # in the loops of _lowrank.h: through a threaded BLAS these thin products mostly wait)
        if self.lora == NULL:
            return
        cdef LoraSite* p = &self.lora[l * N_SITES + site]
        if p.A == NULL:
            return
        cdef int S = self.d.S
        anecy_lora_down(p.A, p.R, p.n_in, x, S, p.u, p.drop_key,
                        p.drop_threshold, p.keep_scale)
        anecy_lora_up(p.B, p.R, p.n_out, p.u, S, alpha * p.scale, y)

    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil:
        pass
    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil:
        pass
    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil:
        pass
    cdef void ffn_bwd_w2t(self, int l, const float* dffn, float* dgate) noexcept nogil:
        pass
    cdef void ffn_bwd_w13t(self, int l, const float* dh1, const float* dh3,
                           float* dx) noexcept nogil:
        pass
    cdef void wot_bwd(self, int l, const float* dy, float* da) noexcept nogil:
        pass
    cdef void sdpa_bwd1(self, int l, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil:
        pass
    cdef void sdpa_bwd2(self, int l, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil:
        pass
    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil:
        pass
    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil:
        pass


cdef class CpuKernels(Kernels):
    """fp32 kernels: BLAS sgemm plus the fused _ops loops.

    Its attention state: each layer's q, k, v and attention probabilities from its
    sdpa_fwd, so the backward does not recompute the probabilities (the ANE programs
    recompute them, having no such memory); the GQA-repeated k, v and the dprobs of the
    last sdpa_bwd1 (for sdpa_bwd2). A caller's own arrays get scratch of their own."""
    cdef float* q                # [L, Q, S]
    cdef float* k                # [L, K, S]
    cdef float* v                # [L, K, S]
    cdef float* probs            # [L, n_heads*S, S]
    cdef float* k_rep            # [Q, S]   layer l's k, v repeated by sdpa_bwd1(l) (GQA)
    cdef float* v_rep            # [Q, S]
    cdef float* dprobs           # [n_heads*S, S]   sdpa_bwd1's, for sdpa_bwd2
    cdef float* given_probs      # [n_heads*S, S]   probabilities of a caller's q, k, v
    cdef const float* bwd_probs  # the probabilities sdpa_bwd1 used last (a layer's or given_probs)
    cdef float* scores           # [S, S]
    cdef double* norm_scratch    # [2S]
    cdef Arena arena

    def bind(self, Engine engine):
        Kernels.bind(self, engine)
        d = engine.d
        cdef Py_ssize_t S = d.S, L = d.L, square = <Py_ssize_t>d.n_heads * S * S
        gqa = d.n_heads != d.n_kv_heads
        self.arena = Arena()
        self.arena.carve([
            (<uintptr_t>&self.q, L * d.Q * S), (<uintptr_t>&self.k, L * d.K * S),
            (<uintptr_t>&self.v, L * d.K * S), (<uintptr_t>&self.probs, L * square),
            (<uintptr_t>&self.k_rep, d.Q * S if gqa else 0),
            (<uintptr_t>&self.v_rep, d.Q * S if gqa else 0),
            (<uintptr_t>&self.dprobs, square), (<uintptr_t>&self.given_probs, square),
            (<uintptr_t>&self.scores, S * S), (<uintptr_t>&self.norm_scratch, 4 * S)])
        self.bwd_probs = self.probs

    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil:
        cdef Dims d = self.d
        cdef LayerParams* w = &self.layers[l]
        cdef int h
        cdef Py_ssize_t block = <Py_ssize_t>d.hd * d.S
        cdef float* probs = self.given_probs
        if q == NULL:            # KEPT: layer l's attention state
            q = self.q + <Py_ssize_t>l * d.Q * d.S
            k = self.k + <Py_ssize_t>l * d.K * d.S
            v = self.v + <Py_ssize_t>l * d.K * d.S
            probs = self.probs + <Py_ssize_t>l * d.n_heads * d.S * d.S
        # with QK-norm the raw projections are kept for its backward
        cdef float* q_out = q_raw if d.qk_norm else q
        cdef float* k_out = k_raw if d.qk_norm else k
        sgemm(0, 0, d.Q, d.S, d.D, 1.0, w.wq, d.D, xnorm, d.S, 0.0, q_out, d.S)
        sgemm(0, 0, d.K, d.S, d.D, 1.0, w.wk, d.D, xnorm, d.S, 0.0, k_out, d.S)
        sgemm(0, 0, d.K, d.S, d.D, 1.0, w.wv, d.D, xnorm, d.S, 0.0, v, d.S)
        # adapters act on the projections, before QK-norm and RoPE
        self.lora_fwd(l, SITE_WQ, xnorm, q_out, 1.0)
        self.lora_fwd(l, SITE_WK, xnorm, k_out, 1.0)
        self.lora_fwd(l, SITE_WV, xnorm, v, 1.0)
        if d.qk_norm:
            for h in range(d.n_heads):
                rmsnorm_fwd(q_raw + h * block, w.q_norm, q + h * block, d.hd, d.S, d.eps,
                            self.norm_scratch)
            for h in range(d.n_kv_heads):
                rmsnorm_fwd(k_raw + h * block, w.k_norm, k + h * block, d.hd, d.S, d.eps,
                            self.norm_scratch)
        rope_fwd(q, d.n_heads, d.hd, d.S, self.rope_cos, self.rope_sin, d.rope_half)
        rope_fwd(k, d.n_kv_heads, d.hd, d.S, self.rope_cos, self.rope_sin, d.rope_half)
        attention_fwd(q, k, v, attn, d.n_heads, d.n_kv_heads, d.hd, d.S, probs, self.key_start)

    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil:
        cdef Dims d = self.d
        sgemm(0, 0, d.D, d.S, d.Q, 1.0, self.layers[l].wo, d.Q, attn, d.S, 0.0, o, d.S)
        self.lora_fwd(l, SITE_WO, attn, o, 1.0)

    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil:
        cdef Dims d = self.d
        cdef LayerParams* w = &self.layers[l]
        cdef Py_ssize_t n = <Py_ssize_t>d.D * d.S
        sgemm(0, 0, d.H, d.S, d.D, 1.0, w.w1, d.D, x2norm, d.S, 0.0, h1, d.S)
        sgemm(0, 0, d.H, d.S, d.D, 1.0, w.w3, d.D, x2norm, d.S, 0.0, h3, d.S)
        self.lora_fwd(l, SITE_W1, x2norm, h1, 1.0)
        self.lora_fwd(l, SITE_W3, x2norm, h3, 1.0)
        swiglu_fwd(h1, h3, gate, <Py_ssize_t>d.H * d.S)
        memcpy(x_next, x2, n * sizeof(float))
        sgemm(0, 0, d.D, d.S, d.H, d.residual_scale, w.w2, d.H, gate, d.S, 1.0, x_next, d.S)
        self.lora_fwd(l, SITE_W2, gate, x_next, d.residual_scale)

    cdef void ffn_bwd_w2t(self, int l, const float* dffn, float* dgate) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.H, d.S, d.D, 1.0, self.layers[l].w2, d.H, dffn, d.S, 0.0, dgate, d.S)

    cdef void ffn_bwd_w13t(self, int l, const float* dh1, const float* dh3,
                           float* dx) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.D, d.S, d.H, 1.0, self.layers[l].w1, d.D, dh1, d.S, 0.0, dx, d.S)
        sgemm(1, 0, d.D, d.S, d.H, 1.0, self.layers[l].w3, d.D, dh3, d.S, 1.0, dx, d.S)

    cdef void wot_bwd(self, int l, const float* dy, float* da) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.Q, d.S, d.D, 1.0, self.layers[l].wo, d.Q, dy, d.S, 0.0, da, d.S)

    cdef void sdpa_bwd1(self, int l, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil:
        cdef Dims d = self.d
        cdef Py_ssize_t square = <Py_ssize_t>d.n_heads * d.S * d.S
        cdef bint kept = q == NULL
        if kept:                 # layer l's q, k, v and the probabilities of its forward
            self._repeat_kv(l)
            q, k_rep, v_rep = self._q(l), self._k_rep(l), self._v_rep(l)
            self.bwd_probs = self.probs + l * square
        else:
            self.bwd_probs = self.given_probs
        attention_bwd1(q, k_rep, v_rep, da, dv_rep, <float*>self.bwd_probs, self.dprobs,
                       d.n_heads, d.hd, d.S, kept, self.key_start)
        if probs != NULL:        # a caller's outputs
            memcpy(probs, self.bwd_probs, square * sizeof(float))
        if dprobs != NULL:
            memcpy(dprobs, self.dprobs, square * sizeof(float))

    cdef void sdpa_bwd2(self, int l, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil:
        if probs == NULL:        # sdpa_bwd1(l)'s
            probs, dprobs = self.bwd_probs, self.dprobs
        if q == NULL:            # layer l's, k as sdpa_bwd1(l) repeated it
            q, k_rep = self._q(l), self._k_rep(l)
        attention_bwd2(probs, dprobs, q, k_rep, dq, dk_rep, self.d.n_heads, self.d.hd, self.d.S,
                       self.scores)

    # layer l's kept q, k, v; with GQA, k and v repeated over each group of query heads
    cdef inline const float* _q(self, int l) noexcept nogil:
        return self.q + <Py_ssize_t>l * self.d.Q * self.d.S

    cdef inline const float* _k_rep(self, int l) noexcept nogil:
        return self.k_rep if self.k_rep != NULL else self.k + <Py_ssize_t>l * self.d.K * self.d.S

    cdef inline const float* _v_rep(self, int l) noexcept nogil:
        return self.v_rep if self.v_rep != NULL else self.v + <Py_ssize_t>l * self.d.K * self.d.S

    cdef inline void _repeat_kv(self, int l) noexcept nogil:
        cdef Dims d = self.d
        if self.k_rep != NULL:
            gqa_repeat(self.k + <Py_ssize_t>l * d.K * d.S, self.k_rep, d.n_heads, d.n_kv_heads,
                       d.hd, d.S)
            gqa_repeat(self.v + <Py_ssize_t>l * d.K * d.S, self.v_rep, d.n_heads, d.n_kv_heads,
                       d.hd, d.S)

    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.D, d.S, d.Q, 1.0, self.layers[l].wq, d.D, dq, d.S, 0.0, dx, d.S)

    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.D, d.S, d.K, 1.0, self.layers[l].wk, d.D, dk, d.S, 0.0, dx, d.S)
        sgemm(1, 0, d.D, d.S, d.K, 1.0, self.layers[l].wv, d.D, dv, d.S, 1.0, dx, d.S)


cdef inline uint64_t _splitmix64(uint64_t x) noexcept nogil:
    # splitmix64's finaliser: a bijective 64-bit mix, for the dropout keys of the sites
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline GemmJob dw_job(int M, int N, int S, const float* dy, bint dy_by_position,
                           const float* x, float* dW) noexcept nogil:
    # dW[M, N] += dy @ x[N, S]^T: the weight gradient of y = W x over S positions, where dy
    # is [M, S] channel-first, or [S, M] when dy_by_position (the classifier's dlogits)
    cdef GemmJob j
    j.call = NULL
    j.arg = NULL
    j.trans_a = dy_by_position
    j.trans_b = 1
    j.M = M
    j.N = N
    j.K = S
    j.alpha = 1.0
    j.A = dy
    j.lda = M if dy_by_position else S
    j.B = x
    j.ldb = S
    j.beta = 1.0
    j.C = dW
    j.ldc = N
    return j


cdef struct SumSlice:
    const float* x
    Py_ssize_t n
    double result


cdef void _sumsq_call(void* arg) noexcept nogil:
    cdef SumSlice* s = <SumSlice*>arg
    s.result = sumsq(s.x, s.n)


cdef struct AdamSlice:
    float* p
    float* g
    float* m
    float* v
    Py_ssize_t n
    double lr, beta1, beta2, eps, weight_decay, grad_scale
    long step
    bint nonfinite


cdef void _adamw_call(void* arg) noexcept nogil:
    cdef AdamSlice* a = <AdamSlice*>arg
    a.nonfinite = False
    if a.n:
        a.nonfinite = adamw(a.p, a.g, a.m, a.v, a.n, a.lr, a.beta1, a.beta2, a.eps,
                            a.weight_decay, a.step, a.grad_scale, 1)


cdef class Engine:
    """Owns the activation and scratch buffers of one model and runs its steps.

    params/grads are the model's flat fp32 buffers; `views` maps HF-style names to
    numpy views into them (how the Model lays them out is its business)."""
    cdef readonly object config
    cdef Dims d
    cdef LayerParams* weights
    cdef LayerParams* grads          # all NULL when the base is frozen (LoRA)
    cdef LayerActs* acts
    cdef LoraSite* lora              # [L * N_SITES] or NULL: the adapters (see LoraSite)
    cdef float* lora_row             # [S] a dropped row of x for the adapters' backward
    cdef uint32_t drop_threshold     # the adapters' dropout (set_lora_dropout): 0 for none
    cdef float keep_scale            # 1 / (1 - p)
    cdef readonly double lora_dropout    # p
    cdef int lowest_trained          # the backward stops at this layer
    cdef GradSet sets[2]
    cdef long set_ticket[2]
    cdef readonly Kernels kernels
    cdef readonly DWWorker worker
    cdef readonly bint async_dw      # dW sgemms on the worker (else inline, timed as "dw")
    cdef readonly object rope_cos, rope_sin
    cdef object _keep                # the weight views and classifier rows pointed into
    cdef Arena arena                 # every buffer below and in acts and sets

    cdef float* embed
    cdef float* dembed
    cdef float* final_norm
    cdef float* dfinal_norm
    cdef float* cls_w                # classifier rows [V, D] (lm_head, embedding or a compact copy)
    cdef float* cls_g
    cdef int V
    cdef int vocab_size

    cdef float* x_final              # [D, S]
    cdef float* xf_norm              # [D, S]
    cdef float* logit_buf            # [S, V] -> dlogits in place
    cdef float* g                    # [D, S] gradient of the residual stream
    cdef float* o                    # [D, S]
    cdef float* dgate                # [H, S]
    cdef float* dx2norm              # [D, S]
    cdef float* da                   # [Q, S]
    cdef float* dk_rep               # [Q, S]
    cdef float* dv_rep               # [Q, S]
    cdef float* dq_rot               # [Q, S] gradient w.r.t. q after QK-norm
    cdef float* dk_rot               # [K, S]
    cdef float* dxnorm               # [D, S]
    cdef float* dxnorm_kv            # [D, S]
    cdef double* norm_scratch        # [2S]
    # A step's layout (set_layout): per-position loss weights, RoPE position ids and the
    # first key of each query (packed examples); each NULL when the step has none.
    cdef float* weight_buf           # [S]
    cdef int* key_start_buf          # [S]
    cdef float* step_cos             # [hd/2, S] the RoPE tables gathered at the position ids
    cdef float* step_sin             # [hd/2, S]
    cdef int* scored                 # [S] the positions of nonzero weight, in order
    cdef float* xf_scored            # [D, S] xf_norm's scored columns (n_scored of them used)
    cdef float* dxf_scored           # [D, S] their gradient
    cdef const float* loss_w         # weight_buf, or NULL: every position, weight 1/S
    cdef int n_scored
    cdef double timers[N_TIMERS]
    cdef double clock                # when the section being timed began
    # Recording (set_timeline): the main thread's track, or NULL; when the last recorded
    # piece of a section ended (a section's kernel calls and dW submissions are recorded
    # one by one inside it); the Timeline owning the tracks
    cdef TraceTrack* timeline
    cdef double lap_clock
    cdef object _timeline
    cdef readonly long steps

    def __cinit__(self):
        self.weights = NULL
        self.grads = NULL
        self.acts = NULL
        self.lora = NULL
        self.timeline = NULL

    def __init__(self, config, views, grad_views, Kernels kernels, bint async_dw=True,
                 adapters=None, adapter_grads=None):
        """grad_views None freezes the base: no weight gradient is computed (every gradient
        pointer NULL). adapters (an anecy.lora.LoraAdapters) add their low-rank paths to the
        projections they adapt; their gradients go to adapter_grads, a flat fp32 buffer
        laid out as adapters.params."""
        cfg = config
        self.config = cfg
        cdef Dims d
        d.D, d.H, d.L = cfg.dim, cfg.hidden_dim, cfg.n_layers
        d.n_heads, d.n_kv_heads, d.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d.Q, d.K, d.S = cfg.q_dim, cfg.kv_dim, cfg.seq_len
        d.eps, d.residual_scale = cfg.norm_eps, cfg.residual_scale
        d.qk_norm, d.rope_half = cfg.qk_norm, cfg.rope_style == "half"
        self.d = d
        self.vocab_size = cfg.vocab_size
        L = d.L
        self.weights = <LayerParams*>calloc(L, sizeof(LayerParams))
        self.grads = <LayerParams*>calloc(L, sizeof(LayerParams))
        self.acts = <LayerActs*>calloc(L, sizeof(LayerActs))
        if self.weights == NULL or self.grads == NULL or self.acts == NULL:
            raise MemoryError()
        # tensor names come from the model's layout table (imported here: model imports us)
        from .model import EMBEDDING, FINAL_NORM, classifier_name, layer_names
        for l in range(L):
            names = layer_names(cfg, l)
            self._bind_layer(&self.weights[l], views, names)
            if grad_views is not None:
                self._bind_layer(&self.grads[l], grad_views, names)
        self._keep = [(views, grad_views, adapters, adapter_grads)]
        self.embed = _ptr(views[EMBEDDING])
        self.final_norm = _ptr(views[FINAL_NORM])
        self.cls_w = _ptr(views[classifier_name(cfg)])
        if grad_views is not None:
            self.dembed = _ptr(grad_views[EMBEDDING])
            self.dfinal_norm = _ptr(grad_views[FINAL_NORM])
            self.cls_g = _ptr(grad_views[classifier_name(cfg)])
        self.V = cfg.vocab_size
        self.lowest_trained = 0
        if adapters is not None:
            self._bind_adapters(adapters, adapter_grads)
            if grad_views is None:   # nothing below the lowest adapted layer learns
                self.lowest_trained = min(l for l, _ in adapters.pairs)
        self.arena = Arena()
        self.arena.carve(self._size_table())
        self.set_ticket[0] = self.set_ticket[1] = 0
        self.rope_cos, self.rope_sin = rope_tables(d.hd, d.S, cfg.rope_theta)
        self.loss_w = NULL
        self.kernels = kernels
        # the worker thread always exists: it also runs the optimizer's second half
        self.worker = DWWorker()
        self.async_dw = async_dw
        kernels.bind(self)
        self.reset_timers()

    cdef list _size_table(self):
        """Every buffer of the step: (address of its pointer, floats); each is [rows, S]."""
        cdef Dims d = self.d
        cdef Py_ssize_t D = d.D, H = d.H, Q = d.Q, K = d.K, S = d.S
        cdef LayerActs* a
        cdef GradSet* gs
        qk = 1 if d.qk_norm else 0
        table = []
        for l in range(d.L):         # saved for the backward
            a = &self.acts[l]
            table += [(<uintptr_t>&a.x_in, D * S), (<uintptr_t>&a.xnorm, D * S),
                      (<uintptr_t>&a.q_raw, qk * Q * S), (<uintptr_t>&a.k_raw, qk * K * S),
                      (<uintptr_t>&a.attn, Q * S), (<uintptr_t>&a.x2, D * S),
                      (<uintptr_t>&a.x2norm, D * S), (<uintptr_t>&a.h1, H * S),
                      (<uintptr_t>&a.h3, H * S), (<uintptr_t>&a.gate, H * S)]
        for i in range(2):           # read by dW jobs: two sets, alternating between layers
            gs = &self.sets[i]
            table += [(<uintptr_t>&gs.dffn, D * S), (<uintptr_t>&gs.dh1, H * S),
                      (<uintptr_t>&gs.dh3, H * S), (<uintptr_t>&gs.do, D * S),
                      (<uintptr_t>&gs.dq, Q * S), (<uintptr_t>&gs.dk, K * S),
                      (<uintptr_t>&gs.dv, K * S)]
        table += [(<uintptr_t>&self.x_final, D * S), (<uintptr_t>&self.xf_norm, D * S),
                  (<uintptr_t>&self.logit_buf, S * self.vocab_size),
                  (<uintptr_t>&self.g, D * S), (<uintptr_t>&self.o, D * S),
                  (<uintptr_t>&self.dgate, H * S), (<uintptr_t>&self.dx2norm, D * S),
                  (<uintptr_t>&self.da, Q * S), (<uintptr_t>&self.dk_rep, Q * S),
                  (<uintptr_t>&self.dv_rep, Q * S), (<uintptr_t>&self.dq_rot, Q * S),
                  (<uintptr_t>&self.dk_rot, K * S), (<uintptr_t>&self.dxnorm, D * S),
                  (<uintptr_t>&self.dxnorm_kv, D * S),
                  (<uintptr_t>&self.norm_scratch, 4 * S),   # 2S doubles
                  (<uintptr_t>&self.weight_buf, S), (<uintptr_t>&self.key_start_buf, S), (<uintptr_t>&self.scored, S),
                  (<uintptr_t>&self.step_cos, d.hd // 2 * S),
                  (<uintptr_t>&self.step_sin, d.hd // 2 * S),
                  (<uintptr_t>&self.xf_scored, D * S), (<uintptr_t>&self.dxf_scored, D * S)]
        cdef LoraSite* p
        if self.lora != NULL:        # per adapted site: u = A x and v = B^T dy, [R, S] each
            table.append((<uintptr_t>&self.lora_row, S))
            for i in range(d.L * N_SITES):
                p = &self.lora[i]
                table += [(<uintptr_t>&p.u, p.R * S), (<uintptr_t>&p.v, p.R * S)]
        return table

    def __dealloc__(self):
        free(self.weights)
        free(self.grads)
        free(self.acts)
        free(self.lora)

    def _bind_adapters(self, adapters, adapter_grads):
        """Point a LoraSite at each adapted projection's A and B and their gradients."""
        from .lora import LoraAdapters
        if not isinstance(adapters, LoraAdapters):
            raise TypeError("adapters must be an anecy.lora.LoraAdapters")
        if not isinstance(adapter_grads, np.ndarray) or adapter_grads.dtype != np.float32 \
                or adapter_grads.shape != adapters.params.shape \
                or not adapter_grads.flags.c_contiguous:
            raise ValueError("adapter_grads must be a float32 buffer shaped like the adapters")
        sites = {"wq": SITE_WQ, "wk": SITE_WK, "wv": SITE_WV, "wo": SITE_WO, "w1": SITE_W1,
                 "w3": SITE_W3, "w2": SITE_W2}
        self.lora = <LoraSite*>calloc(self.d.L * N_SITES, sizeof(LoraSite))
        if self.lora == NULL:
            raise MemoryError()
        cdef LoraSite* p
        cdef float* base = _ptr(adapters.params)
        cdef float* gbase = _ptr(adapter_grads)
        cdef Py_ssize_t off_a, off_b
        for (l, field), (ta, tb) in adapters.pairs.items():
            p = &self.lora[<int>l * N_SITES + <int>sites[field]]
            off_a, off_b = ta.offset, tb.offset
            p.A = base + off_a
            p.B = base + off_b
            p.dA = gbase + off_a
            p.dB = gbase + off_b
            p.R, p.n_in, p.n_out = ta.shape[0], ta.shape[1], tb.shape[0]
            p.scale = adapters.scale
            p.keep_scale = 1.0

    cdef void _bind_layer(self, LayerParams* p, views, names) except *:
        """Point p's fields at the views named by model.layer_names (field -> HF name)."""
        p.wq = _ptr(views[names["wq"]])
        p.wk = _ptr(views[names["wk"]])
        p.wv = _ptr(views[names["wv"]])
        p.wo = _ptr(views[names["wo"]])
        p.w1 = _ptr(views[names["w1"]])
        p.w2 = _ptr(views[names["w2"]])
        p.w3 = _ptr(views[names["w3"]])
        p.attn_norm = _ptr(views[names["attn_norm"]])
        p.ffn_norm = _ptr(views[names["ffn_norm"]])
        if self.d.qk_norm:
            p.q_norm = _ptr(views[names["q_norm"]])
            p.k_norm = _ptr(views[names["k_norm"]])

    # -- classifier rows -----------------------------------------------------------------
    def set_classifier(self, weight, grad):
        """Point the classifier at rows [V', D] (vocab compaction) and their gradient buffer
        (None when the base is frozen)."""
        if grad is not None and weight.shape != grad.shape:
            raise ValueError("classifier weight and grad must have one shape")
        if weight.ndim != 2 or weight.shape[1] != self.d.D \
                or not 0 < weight.shape[0] <= self.vocab_size:
            raise ValueError("classifier weight and grad must both be [V, dim] with V <= vocab_size")
        self._keep.append((weight, grad))
        self.cls_w = _ptr(weight)
        self.cls_g = _ptr(grad) if grad is not None else NULL
        self.V = weight.shape[0]

    @property
    def active_vocab(self):
        return self.V

    # -- timers --------------------------------------------------------------------------
    def reset_timers(self):
        memset(self.timers, 0, sizeof(self.timers))
        self.kernels.io_ms = 0.0
        self.steps = 0

    def timings(self):
        """Cumulative milliseconds per component since reset_timers()."""
        out = {name: self.timers[i] for i, name in enumerate(ENGINE_TIMERS)}
        out["io"] = self.kernels.io_ms
        out["kernels"] -= self.kernels.io_ms  # kernel time net of its own I/O
        return out

    def set_timeline(self, timeline):
        """Record every section, kernel call and dW job on ``timeline`` (an
        anecy._timeline.Timeline) from now on; None stops recording."""
        cdef size_t main = 0, worker = 0
        if timeline is not None:
            main, worker = timeline.track_addresses()
        with nogil:
            self.worker.wait_all()
            self.worker.set_timeline(<TraceTrack*>worker)
        self.timeline = self.kernels.timeline = <TraceTrack*>main
        self._timeline = timeline

    def stage_weights(self):
        """Call after the weights change (optimizer update, load)."""
        with nogil:
            self.kernels.stage_weights()
        self.kernels.raise_pending()

    # -- the step ------------------------------------------------------------------------
    def _check_ids(self, ids, name, limit):
        arr = np.ascontiguousarray(ids, dtype=np.int32)
        if arr.ndim != 1 or arr.shape[0] != self.d.S:
            raise ValueError(f"{name} must be a 1-D array of seq_len={self.d.S} ids, "
                             f"got shape {np.shape(ids)}")
        if arr.size and (arr.min() < 0 or arr.max() >= limit):
            raise ValueError(f"{name} holds ids outside [0, {limit})")
        return arr

    def set_layout(self, weights=None, positions=None, segment_starts=None):
        """The layout of the steps that follow (each argument [S], or None for the plain one):
        `weights` the loss weight of each position (0: not scored; the classifier runs only
        at the others), `positions` the RoPE position of each (< S; several examples in one
        window restart theirs at 0), `segment_starts` the first position each query may
        attend (its example's start; None: 0). Only the cpu backend takes positions and
        segment starts: the sim and ane programs compile the causal mask and the RoPE
        tables."""
        cdef Dims d = self.d
        cdef Py_ssize_t S = d.S, half = d.hd // 2, i, s
        cdef float[::1] w
        cdef int[::1] pos, ks
        cdef const float[:, ::1] cos_t, sin_t
        if (positions is not None or segment_starts is not None) \
                and not isinstance(self.kernels, CpuKernels):
            raise ValueError("position ids and segment starts need the cpu backend (the sim "
                             "and ane programs compile the causal mask and the RoPE tables)")
        self.loss_w = NULL
        self.kernels.rope_cos = _ptr(self.rope_cos)
        self.kernels.rope_sin = _ptr(self.rope_sin)
        self.kernels.key_start = NULL
        if weights is not None:
            arr = np.ascontiguousarray(weights, np.float32)
            if arr.shape != (S,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"weights must be {S} finite non-negative floats")
            w = arr
            self.n_scored = 0
            for s in range(S):
                self.weight_buf[s] = w[s]
                if w[s] != 0.0:
                    self.scored[self.n_scored] = <int>s
                    self.n_scored += 1
            self.loss_w = self.weight_buf
        if positions is not None:
            pos = self._check_ids(positions, "positions", S)
            cos_t, sin_t = self.rope_cos, self.rope_sin
            for i in range(half):
                for s in range(S):
                    self.step_cos[i * S + s] = cos_t[i, pos[s]]
                    self.step_sin[i * S + s] = sin_t[i, pos[s]]
            self.kernels.rope_cos = self.step_cos
            self.kernels.rope_sin = self.step_sin
        if segment_starts is not None:
            ks = self._check_ids(segment_starts, "segment_starts", S)
            for s in range(S):
                if ks[s] > s:
                    raise ValueError("segment_starts[i] must be <= i")
                self.key_start_buf[s] = ks[s]
            self.kernels.key_start = self.key_start_buf

    def forward_backward(self, tokens, targets, float loss_scale=1.0, weights=None,
                         positions=None, segment_starts=None):
        """The loss sum_s w_s CE_s of one sequence (weights w: the given ones, else 1/S
        each, the mean); its gradient (times loss_scale) is added to grads. Targets index
        the classifier rows (compact ids when compaction is on); those of positions of
        weight 0 are not read. positions, segment_starts: see set_layout."""
        cdef int[::1] tok = self._check_ids(tokens, "tokens", self.vocab_size)
        cdef int[::1] tgt = self._targets(targets, weights)
        cdef double loss, t0, t1
        self.set_layout(weights, positions, segment_starts)
        self._arm_dropout(self.drop_threshold)      # training only: loss() and logits() keep x
        try:
            with nogil:
                t0 = now_ms()
                self._forward(&tok[0])
                t1 = now_ms()
                loss = self._backward(&tok[0], &tgt[0], loss_scale)
                if self.timeline != NULL:
                    trace_event(self.timeline, t0, t1, EV_FORWARD, -1, 0, 0)
                    trace_event(self.timeline, t1, now_ms(), EV_BACKWARD, -1, 0, 0)
        finally:
            self._arm_dropout(0)
        self.kernels.raise_pending()
        self.steps += 1
        return loss if self.loss_w != NULL else loss / self.d.S

    def loss(self, tokens, targets, weights=None, positions=None, segment_starts=None):
        """forward_backward's loss (the same softmax_xent), forward only: its gradient is
        left in the logit buffer unused."""
        cdef int[::1] tok = self._check_ids(tokens, "tokens", self.vocab_size)
        cdef int[::1] tgt = self._targets(targets, weights)
        cdef double loss
        self.set_layout(weights, positions, segment_starts)
        with nogil:
            self._forward(&tok[0])
            if self.loss_w == NULL:
                loss = softmax_xent(self.logit_buf, &tgt[0], self.d.S, self.V, 1.0) / self.d.S
            else:
                loss = self._scored_xent(&tgt[0], 0.0)
        self.kernels.raise_pending()
        return loss

    def logits(self, tokens, positions=None, segment_starts=None):
        """Logits [S, V] of one sequence (V = the classifier rows in use)."""
        cdef int[::1] tok = self._check_ids(tokens, "tokens", self.vocab_size)
        self.set_layout(None, positions, segment_starts)
        with nogil:
            self._forward(&tok[0])
        self.kernels.raise_pending()
        out = np.empty((self.d.S, self.V), np.float32)
        cdef float[:, ::1] dst = out
        memcpy(&dst[0, 0], self.logit_buf, <Py_ssize_t>self.d.S * self.V * sizeof(float))
        return out

    # -- the adapters' dropout -------------------------------------------------------------
    def set_lora_dropout(self, double p, key=0):
        """Dropout with probability p on each adapter's input in the forward_backward calls
        that follow (PEFT's lora_dropout; loss() and logits() never drop), until the next
        call; p 0 turns it off. Each site's mask is a function of (key, layer, site) only:
        give a new key each microstep (the trainer derives it from its seed and the
        microstep's number, so a resumed run draws the same masks)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {p!r}")
        if p > 0 and self.lora == NULL:
            raise ValueError("LoRA dropout needs adapters")
        if p > 0 and self.kernels.merges_lora:
            raise ValueError("LoRA dropout needs the cpu backend: the sim and ane kernels run "
                             "the merged weight W0 + s B A, which cannot drop the adapter's "
                             "input alone")
        self.lora_dropout = p
        # the threshold of a 32-bit hash below which an element is dropped
        self.drop_threshold = <uint32_t>min(round(p * 2.0 ** 32), 2 ** 32 - 1) if p > 0 else 0
        if p > 0 and self.drop_threshold == 0:
            self.drop_threshold = 1
        self.keep_scale = <float>(1.0 / (1.0 - p))
        cdef uint64_t k = <uint64_t>(int(key) & 0xFFFFFFFFFFFFFFFF)
        cdef int i
        if self.lora != NULL:
            for i in range(self.d.L * N_SITES):
                self.lora[i].drop_key = <uint32_t>(_splitmix64(k ^ _splitmix64(<uint64_t>i + 1))
                                                   >> 32)

    def _arm_dropout(self, uint32_t threshold):
        cdef int i
        if self.lora == NULL:
            return
        for i in range(self.d.L * N_SITES):
            self.lora[i].drop_threshold = threshold
            self.lora[i].keep_scale = self.keep_scale if threshold else 1.0

    def lora_dropout_mask(self, int layer, str field):
        """The keep mask [n_in, S] (1 kept, 0 dropped) the current key gives the adapter of
        `field` (wq, wk, wv, wo, w1, w3, w2) in `layer`: what forward_backward applies."""
        sites = {"wq": SITE_WQ, "wk": SITE_WK, "wv": SITE_WV, "wo": SITE_WO, "w1": SITE_W1,
                 "w3": SITE_W3, "w2": SITE_W2}
        if self.lora == NULL or not 0 <= layer < self.d.L or field not in sites \
                or self.lora[layer * N_SITES + <int>sites[field]].A == NULL:
            raise ValueError(f"no adapter on {field} of layer {layer}")
        cdef LoraSite* p = &self.lora[layer * N_SITES + <int>sites[field]]
        cdef int S = self.d.S
        out = np.ones((p.n_in, S), np.uint8)
        cdef unsigned char[:, ::1] m = out
        cdef uint32_t i
        if self.drop_threshold:
            for i in range(<uint32_t>p.n_in * <uint32_t>S):
                m[i // S, i % S] = anecy_drop_hash(i ^ p.drop_key) >= self.drop_threshold
        return out

    def _targets(self, targets, weights):
        """The targets, checked where they are read (every position, or the weighted ones)."""
        if weights is None:
            return self._check_ids(targets, "targets", self.V)
        arr = np.ascontiguousarray(targets, dtype=np.int32)
        if arr.ndim != 1 or arr.shape[0] != self.d.S:
            raise ValueError(f"targets must be a 1-D array of seq_len={self.d.S} ids")
        read = arr[np.asarray(weights) != 0]
        if read.size and (read.min() < 0 or read.max() >= self.V):
            raise ValueError(f"targets holds ids outside [0, {self.V})")
        return arr

    cdef void _forward(self, const int* tokens) noexcept nogil:
        cdef int l
        self.clock = now_ms()
        embedding_fwd(self.embed, tokens, self.acts[0].x_in, self.d.S, self.d.D)
        self.lap(EV_EMBEDDING, -1)
        self.charge(T_ELEMENTWISE)
        for l in range(self.d.L):
            self._attention_forward(l)
            self._ffn_forward(l)
        self._classifier_forward()

    cdef double _backward(self, const int* tokens, const int* targets,
                          float loss_scale) noexcept nogil:
        cdef int l
        self.clock = now_ms()
        cdef double loss = self._classifier_backward(targets, loss_scale)
        for l in range(self.d.L - 1, self.lowest_trained - 1, -1):
            # the buffer set of layer l + 2 must be free before layer l rewrites it
            self.worker.wait_for(self.set_ticket[l & 1])
            self.charge(T_DW_WAIT)
            self._ffn_backward(l)
            self._attention_backward(l)
            self.set_ticket[l & 1] = self.worker.ticket()
        self.worker.wait_all()
        self.charge(T_DW_WAIT)
        if self.dembed != NULL:
            embedding_bwd(self.dembed, tokens, self.g, self.d.S, self.d.D)
            self.lap(EV_EMBEDDING, -1)
        self.charge(T_ELEMENTWISE)
        return loss

    # -- the blocks of the step, forward beside backward ---------------------------------
    # Each runs its work in sections of one kind, charging each section to its timer.

    cdef void _attention_forward(self, int l) noexcept nogil:
        # x2[D,S] = x_in + rs * Wo @ attention(rope(Wq,Wk,Wv @ rmsnorm(x_in)))
        cdef Dims d = self.d
        cdef LayerActs* a = &self.acts[l]
        rmsnorm_fwd(a.x_in, self.weights[l].attn_norm, a.xnorm, d.D, d.S, d.eps,
                    self.norm_scratch)
        self.charge(T_RMS)
        self.kernels.sdpa_fwd(l, a.xnorm, a.attn, KEPT, KEPT, KEPT, a.q_raw, a.k_raw)
        self.lap(EV_SDPA_FWD, l)
        self.kernels.wo_fwd(l, a.attn, self.o)
        self.lap(EV_WO_FWD, l)
        self.charge(T_KERNELS)
        if self.lora != NULL and self.kernels.merges_lora:
            self._lora_inputs(l, SITE_WQ, a.xnorm)
            self._lora_inputs(l, SITE_WK, a.xnorm)
            self._lora_inputs(l, SITE_WV, a.xnorm)
            self._lora_inputs(l, SITE_WO, a.attn)
            self.charge(T_DW)
        memcpy(a.x2, a.x_in, <Py_ssize_t>d.D * d.S * sizeof(float))
        add_scaled(a.x2, self.o, <Py_ssize_t>d.D * d.S, d.residual_scale)
        self.charge(T_ELEMENTWISE)

    cdef void _attention_backward(self, int l) noexcept nogil:
        # in: g = dL/dx2 [D,S]; out: g = dL/dx_in [D,S]; dWo, dWq, dWk, dWv queued; norm grads
        cdef Dims d = self.d
        cdef bint gqa = d.n_heads != d.n_kv_heads
        cdef LayerActs* a = &self.acts[l]
        cdef LayerParams* gw = &self.grads[l]
        cdef GradSet* gs = &self.sets[l & 1]
        # gradients land directly where they are needed when no reduction or norm follows
        cdef float* dq_rot = self.dq_rot if d.qk_norm else gs.dq
        cdef float* dk_rot = self.dk_rot if d.qk_norm else gs.dk
        cdef float* dk_rep = self.dk_rep if gqa else dk_rot
        cdef float* dv_rep = self.dv_rep if gqa else gs.dv
        scale_copy(self.g, gs.do, <Py_ssize_t>d.D * d.S, d.residual_scale)
        self.charge(T_ELEMENTWISE)
        cdef int qkv[3]
        cdef const float* dqkv[3]
        qkv[0], qkv[1], qkv[2] = SITE_WQ, SITE_WK, SITE_WV
        dqkv[0], dqkv[1], dqkv[2] = gs.dq, gs.dk, gs.dv
        self._dw(dw_job(d.D, d.Q, d.S, gs.do, False, a.attn, gw.wo))
        self.kernels.wot_bwd(l, gs.do, self.da)
        self.lap(EV_WOT_BWD, l)
        qkv[0] = SITE_WO
        self._lora_backward(l, qkv, <const float**>&gs.do, 1, a.attn, self.da)
        qkv[0] = SITE_WQ
        self.kernels.sdpa_bwd1(l, KEPT, KEPT, KEPT, self.da, KEPT, KEPT, dv_rep)
        self.lap(EV_SDPA_BWD1, l)
        self.kernels.sdpa_bwd2(l, KEPT, KEPT, KEPT, KEPT, dq_rot, dk_rep)
        self.lap(EV_SDPA_BWD2, l)
        self.charge(T_KERNELS)
        if gqa:
            gqa_reduce(dk_rep, dk_rot, d.n_heads, d.n_kv_heads, d.hd, d.S)
            gqa_reduce(dv_rep, gs.dv, d.n_heads, d.n_kv_heads, d.hd, d.S)
        rope_bwd(dq_rot, d.n_heads, d.hd, d.S, self.kernels.rope_cos, self.kernels.rope_sin,
                 d.rope_half)
        rope_bwd(dk_rot, d.n_kv_heads, d.hd, d.S, self.kernels.rope_cos, self.kernels.rope_sin,
                 d.rope_half)
        self.charge(T_ELEMENTWISE)
        if d.qk_norm:
            self._qk_norm_backward(l, dq_rot, dk_rot)
            self.charge(T_RMS)
        self._dw(dw_job(d.Q, d.D, d.S, gs.dq, False, a.xnorm, gw.wq))
        self._dw(dw_job(d.K, d.D, d.S, gs.dk, False, a.xnorm, gw.wk))
        self._dw(dw_job(d.K, d.D, d.S, gs.dv, False, a.xnorm, gw.wv))
        if l == self.lowest_trained and self.dembed == NULL:
            # a frozen base below: the gradient of this layer's input has no reader, so only
            # the adapters' own gradients are made
            self._lora_backward(l, qkv, dqkv, 3, a.xnorm, NULL)
            self.charge(T_KERNELS)
            return
        self.kernels.q_bwd(l, gs.dq, self.dxnorm)
        self.lap(EV_Q_BWD, l)
        self.kernels.kv_bwd(l, gs.dk, gs.dv, self.dxnorm_kv)
        self.lap(EV_KV_BWD, l)
        self._lora_backward(l, qkv, dqkv, 3, a.xnorm, self.dxnorm)
        self.charge(T_KERNELS)
        add_scaled(self.dxnorm, self.dxnorm_kv, <Py_ssize_t>d.D * d.S, 1.0)
        self.charge(T_ELEMENTWISE)
        rmsnorm_bwd(a.x_in, self.weights[l].attn_norm, self.dxnorm, self.g, gw.attn_norm, d.D,
                    d.S, d.eps, 1, self.norm_scratch)
        self.charge(T_RMS)

    cdef void _qk_norm_backward(self, int l, const float* dq_rot,
                                const float* dk_rot) noexcept nogil:
        # per head: dq[hd,S], dk[hd,S] (w.r.t. the projections) from the gradients after the norm
        cdef Dims d = self.d
        cdef Py_ssize_t block = <Py_ssize_t>d.hd * d.S
        cdef LayerActs* a = &self.acts[l]
        cdef LayerParams* w = &self.weights[l]
        cdef LayerParams* gw = &self.grads[l]
        cdef GradSet* gs = &self.sets[l & 1]
        cdef int h
        for h in range(d.n_heads):
            rmsnorm_bwd(a.q_raw + h * block, w.q_norm, dq_rot + h * block, gs.dq + h * block,
                        gw.q_norm, d.hd, d.S, d.eps, 0, self.norm_scratch)
        for h in range(d.n_kv_heads):
            rmsnorm_bwd(a.k_raw + h * block, w.k_norm, dk_rot + h * block, gs.dk + h * block,
                        gw.k_norm, d.hd, d.S, d.eps, 0, self.norm_scratch)

    cdef void _ffn_forward(self, int l) noexcept nogil:
        # x_next[D,S] = x2 + rs * W2 @ (silu(W1 @ x2norm) * (W3 @ x2norm)), x2norm = rmsnorm(x2)
        cdef Dims d = self.d
        cdef LayerActs* a = &self.acts[l]
        cdef float* x_next = self.acts[l + 1].x_in if l + 1 < d.L else self.x_final
        rmsnorm_fwd(a.x2, self.weights[l].ffn_norm, a.x2norm, d.D, d.S, d.eps, self.norm_scratch)
        self.charge(T_RMS)
        self.kernels.ffn_fused(l, a.x2norm, a.x2, x_next, a.h1, a.h3, a.gate)
        self.lap(EV_FFN_FUSED, l)
        self.charge(T_KERNELS)
        if self.lora != NULL and self.kernels.merges_lora:
            self._lora_inputs(l, SITE_W1, a.x2norm)
            self._lora_inputs(l, SITE_W3, a.x2norm)
            self._lora_inputs(l, SITE_W2, a.gate)
            self.charge(T_DW)

    cdef void _ffn_backward(self, int l) noexcept nogil:
        # in: g = dL/dx_next [D,S]; out: g = dL/dx2 [D,S]; dW1, dW2, dW3 queued; dffn_norm
        cdef Dims d = self.d
        cdef LayerActs* a = &self.acts[l]
        cdef LayerParams* gw = &self.grads[l]
        cdef GradSet* gs = &self.sets[l & 1]
        scale_copy(self.g, gs.dffn, <Py_ssize_t>d.D * d.S, d.residual_scale)
        self.charge(T_ELEMENTWISE)
        cdef int w13[2]
        cdef const float* dh13[2]
        w13[0], w13[1] = SITE_W2, SITE_W3
        self._dw(dw_job(d.D, d.H, d.S, gs.dffn, False, a.gate, gw.w2))
        self.kernels.ffn_bwd_w2t(l, gs.dffn, self.dgate)
        self.lap(EV_FFN_BWD_W2T, l)
        self._lora_backward(l, w13, <const float**>&gs.dffn, 1, a.gate, self.dgate)
        w13[0] = SITE_W1
        dh13[0], dh13[1] = gs.dh1, gs.dh3
        self.charge(T_KERNELS)
        swiglu_bwd(a.h1, a.h3, self.dgate, gs.dh1, gs.dh3, <Py_ssize_t>d.H * d.S)
        self.charge(T_ELEMENTWISE)
        self._dw(dw_job(d.H, d.D, d.S, gs.dh1, False, a.x2norm, gw.w1))
        self._dw(dw_job(d.H, d.D, d.S, gs.dh3, False, a.x2norm, gw.w3))
        self.kernels.ffn_bwd_w13t(l, gs.dh1, gs.dh3, self.dx2norm)
        self.lap(EV_FFN_BWD_W13T, l)
        self._lora_backward(l, w13, dh13, 2, a.x2norm, self.dx2norm)
        self.charge(T_KERNELS)
        rmsnorm_bwd(a.x2, self.weights[l].ffn_norm, self.dx2norm, self.g, gw.ffn_norm, d.D, d.S,
                    d.eps, 1, self.norm_scratch)
        self.charge(T_RMS)

    cdef void _classifier_forward(self) noexcept nogil:
        # logits[S,V] = rmsnorm(x_final)^T @ cls_w^T; with loss weights only the rows of the
        # n scored positions, logits[n,V], from xf_norm's scored columns gathered
        cdef Dims d = self.d
        cdef Py_ssize_t c, r, n = self.n_scored
        rmsnorm_fwd(self.x_final, self.final_norm, self.xf_norm, d.D, d.S, d.eps,
                    self.norm_scratch)
        self.charge(T_RMS)
        if self.loss_w == NULL:
            sgemm(1, 1, d.S, self.V, d.D, 1.0, self.xf_norm, d.S, self.cls_w, d.D, 0.0,
                  self.logit_buf, self.V)
        elif n:
            for c in range(d.D):
                for r in range(n):
                    self.xf_scored[c * n + r] = self.xf_norm[c * d.S + self.scored[r]]
            sgemm(1, 1, n, self.V, d.D, 1.0, self.xf_scored, n, self.cls_w, d.D, 0.0,
                  self.logit_buf, self.V)
        self.charge(T_CLASSIFIER)

    cdef double _scored_xent(self, const int* targets, float loss_scale) noexcept nogil:
        # sum_r w_r CE_r over the scored rows of the logits; each row's gradient (softmax -
        # onehot) * w_r * loss_scale left in its place
        cdef Py_ssize_t r
        cdef int s
        cdef double loss = 0.0
        for r in range(self.n_scored):
            s = self.scored[r]
            loss += self.loss_w[s] * softmax_xent(self.logit_buf + r * self.V, targets + s, 1,
                                                  self.V, loss_scale * self.loss_w[s])
        return loss

    cdef double _classifier_backward(self, const int* targets, float loss_scale) noexcept nogil:
        # dlogits[S,V] in place of the logits; g = dL/dx_final [D,S]; dcls queued; returns the
        # summed loss
        cdef Dims d = self.d
        cdef Py_ssize_t c, r, n = self.n_scored
        cdef double loss
        if self.loss_w == NULL:
            loss = softmax_xent(self.logit_buf, targets, d.S, self.V, loss_scale / d.S)
            # dxf_norm[D, S] = cls_w^T @ dlogits^T ; dcls[V, D] += dlogits^T @ xf_norm^T
            sgemm(1, 1, d.D, d.S, self.V, 1.0, self.cls_w, d.D, self.logit_buf, self.V, 0.0,
                  self.dxnorm, d.S)
            self.charge(T_CLASSIFIER)
            self._dw(dw_job(self.V, d.D, d.S, self.logit_buf, True, self.xf_norm, self.cls_g))
        else:
            # the same over the n scored columns, the gradient scattered back (zero elsewhere)
            loss = self._scored_xent(targets, loss_scale)
            memset(self.dxnorm, 0, <Py_ssize_t>d.D * d.S * sizeof(float))
            if n:
                sgemm(1, 1, d.D, n, self.V, 1.0, self.cls_w, d.D, self.logit_buf, self.V, 0.0,
                      self.dxf_scored, n)
                for c in range(d.D):
                    for r in range(n):
                        self.dxnorm[c * d.S + self.scored[r]] = self.dxf_scored[c * n + r]
            self.charge(T_CLASSIFIER)
            if n:
                self._dw(dw_job(self.V, d.D, n, self.logit_buf, True, self.xf_scored,
                                self.cls_g))
        rmsnorm_bwd(self.x_final, self.final_norm, self.dxnorm, self.g, self.dfinal_norm, d.D, d.S,
                    d.eps, 0, self.norm_scratch)
        self.charge(T_RMS)
        return loss

    # -- timing and the weight gradients ---------------------------------------------------
    cdef inline void charge(self, int slot) noexcept nogil:
        """Charge the time since the last charge (the section just run) to timer `slot`."""
        cdef double now = now_ms()
        self.timers[slot] += now - self.clock
        if self.timeline != NULL:
            trace_event(self.timeline, self.clock, now, EV_SECTION + slot, -1, 0, 0)
            self.lap_clock = now
        self.clock = now

    cdef inline void lap(self, int what, int layer) noexcept nogil:
        """Record the piece of the current section since its last recorded piece (a kernel
        call, ...) as event ``what`` of ``layer``."""
        if self.timeline != NULL:
            self._record_piece(what, layer, 0, 0)

    cdef void _record_piece(self, int what, int layer, long long ref,
                            size_t addr) noexcept nogil:
        cdef double now = now_ms()
        cdef double start = self.lap_clock if self.lap_clock > self.clock else self.clock
        trace_event(self.timeline, start, now, what, layer, ref, addr)
        self.lap_clock = now

    cdef inline void _dw(self, GemmJob job) noexcept nogil:
        """Queue a weight gradient on the worker, or run it here and charge it to "dw";
        nothing for a frozen weight (no gradient buffer)."""
        if job.C == NULL:
            return
        if self.async_dw:
            self.worker.submit(job)
            if self.timeline != NULL:   # the job's number links it to its run on the worker
                self._record_piece(EV_DW_SUBMIT, -1, self.worker.ticket() - 1, <size_t>job.C)
            return
        sgemm(job.trans_a, job.trans_b, job.M, job.N, job.K, job.alpha, job.A, job.lda,
              job.B, job.ldb, job.beta, job.C, job.ldc)
        if self.timeline != NULL:
            self._record_piece(EV_DW_INLINE, -1, 0, <size_t>job.C)
        self.charge(T_DW)

    cdef void _lora_inputs(self, int l, int site, const float* x) noexcept nogil:
        # u = A x of an adapted site, for its dB, when the kernels ran the merged weight
        cdef LoraSite* p = &self.lora[l * N_SITES + site]
        if p.A != NULL:
            anecy_lora_down(p.A, p.R, p.n_in, x, self.d.S, p.u, 0, 0, 1.0)

    cdef void _lora_backward(self, int l, const int* sites, const float** dys, int n,
                             const float* x, float* dx) noexcept nogil:
        # the adapters of n projections y_i = W0_i x + s B_i u_i, u_i = A_i x, that read one
        # x (q, k, v; gate, up; or one alone), dys[i] the gradient of y_i: v_i = B_i^T dy_i;
        # dx += s A_i^T v_i; dB_i += s dy_i u_i^T; dA_i += s v_i x^T. On cpu all inline, in
        # the loops of _lowrank.h (Kernels.lora_fwd says why), through the forward's dropout
        # masks, the sites' dA and dx in one pass over x and dx; charged to "dw". With merged
        # weights (kernels.merges_lora) dx has already flowed through s B A, v is made in the
        # same loops, and dB, dA are queued as weight gradients (they read only buffers that
        # live until the next step: u, v, x and the alternating dy). dx NULL: no input
        # gradient.
        if self.lora == NULL:
            return
        cdef LoraSite* p
        cdef LoraSite* last = NULL       # the sites' n_in, scale and dropout are alike
        cdef const float* a_of[3]
        cdef const float* v_of[3]
        cdef float* da_of[3]
        cdef int r_of[3]
        cdef uint32_t key_of[3]
        cdef int i, m = 0, S = self.d.S
        cdef GemmJob job
        for i in range(n):
            p = &self.lora[l * N_SITES + sites[i]]
            if p.A == NULL:
                continue
            if self.kernels.merges_lora:
                anecy_lora_back_out(p.B, p.R, p.n_out, dys[i], NULL, S, 0.0, p.v, NULL)
                job = dw_job(p.n_out, p.R, S, dys[i], False, p.u, p.dB)
                job.alpha = p.scale
                self._dw(job)
                job = dw_job(p.R, p.n_in, S, p.v, False, x, p.dA)
                job.alpha = p.scale
                self._dw(job)
                continue
            if m == 0:
                self.charge(T_KERNELS)
            anecy_lora_back_out(p.B, p.R, p.n_out, dys[i], p.u, S, p.scale, p.v, p.dB)
            a_of[m], v_of[m], da_of[m], r_of[m], key_of[m] = p.A, p.v, p.dA, p.R, p.drop_key
            last = p
            m += 1
        if m:
            anecy_lora_back_in(m, a_of, r_of, last.n_in, x, v_of, S, last.scale, da_of, dx,
                               self.lora_row, key_of, last.drop_threshold, last.keep_scale)
            self.lap(EV_LORA_BWD, l)
            self.charge(T_DW)

    # -- the optimizer's passes over the flat buffers, split between two threads ---------
    def grad_sumsq(self, float[::1] grads):
        """Sum of squares of a flat buffer (two halves on two threads; fixed order)."""
        cdef Py_ssize_t n = grads.shape[0]
        cdef SumSlice first
        cdef double second
        if n == 0:
            return 0.0
        first.x = &grads[0]
        first.n = n // 2
        cdef double t0
        with nogil:
            t0 = now_ms()
            self.worker.submit_call(_sumsq_call, &first)
            second = sumsq(&grads[n // 2], n - n // 2)
            self.worker.wait_all()
            if self.timeline != NULL:
                trace_event(self.timeline, t0, now_ms(), EV_GRAD_NORM, -1, 0, 0)
        return first.result + second

    def adamw(self, float[::1] params, float[::1] grads, float[::1] m, float[::1] v,
              Py_ssize_t n_decay, double lr, double beta1, double beta2, double eps,
              double weight_decay, long step, double grad_scale):
        """AdamW over flat buffers (decay on [0, n_decay)), clearing grads as it goes.
        Each element is updated exactly as by _ops.adamw, whichever thread runs it.
        Returns True when a parameter or moment came out NaN or infinite."""
        cdef Py_ssize_t n = params.shape[0]
        if grads.shape[0] != n or m.shape[0] != n or v.shape[0] != n or not 0 <= n_decay <= n:
            raise ValueError("adamw: buffers of different lengths")
        if step < 1:
            raise ValueError("step counts from 1")
        cdef AdamSlice first
        cdef Py_ssize_t half = n_decay // 2
        cdef bint nonfinite = False
        first.p, first.g, first.m, first.v = &params[0], &grads[0], &m[0], &v[0]
        first.n = half
        first.lr, first.beta1, first.beta2, first.eps = lr, beta1, beta2, eps
        first.weight_decay, first.step, first.grad_scale = weight_decay, step, grad_scale
        cdef double t0
        with nogil:
            t0 = now_ms()
            self.worker.submit_call(_adamw_call, &first)
            if n_decay > half:
                nonfinite |= adamw(&params[half], &grads[half], &m[half], &v[half],
                                   n_decay - half, lr, beta1, beta2, eps, weight_decay, step,
                                   grad_scale, 1)
            if n > n_decay:
                nonfinite |= adamw(&params[n_decay], &grads[n_decay], &m[n_decay],
                                   &v[n_decay], n - n_decay, lr, beta1, beta2, eps, 0.0, step,
                                   grad_scale, 1)
            self.worker.wait_all()
            if self.timeline != NULL:
                trace_event(self.timeline, t0, now_ms(), EV_ADAMW, -1, 0, 0)
        return bool(nonfinite or first.nonfinite)
