# cython: language_level=3
"""The training step: one forward and backward pass of a Llama-family model.

The layer loop is written once, here, and runs without the GIL. Matrix work goes
through a Kernels object (cpu here; sim and ane elsewhere); everything between the
kernels (norms, residuals, SwiGLU and RoPE backward, GQA repeat/reduce, classifier,
cross-entropy, embedding) is shared. Weight gradients are queued on a DWWorker.
Every buffer is allocated once, in Engine.__init__. The data flow of a step is in
docs/ARCHITECTURE.md, section 2 (One training step); the buffer layouts in section 3."""

import numpy as np

from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from ._ops cimport (sgemm, rmsnorm_fwd, rmsnorm_bwd, rope_fwd, rope_bwd, swiglu_fwd, swiglu_bwd,
                    attention_fwd, attention_bwd1, attention_bwd2, gqa_repeat, gqa_reduce,
                    softmax_xent, embedding_fwd, embedding_bwd, scale_copy, add_scaled,
                    adamw, sumsq)
from ._worker cimport DWWorker, GemmJob, now_ms
from ._ops import rope_tables

# Timer slots; names as reported by Engine.timings().
cdef enum:
    T_KERNELS = 0
    T_RMS = 1
    T_CLASSIFIER = 2
    T_ELEMENTWISE = 3
    T_DW_WAIT = 4
    T_DW = 5
    N_TIMERS = 6

TIMER_NAMES = ("kernels", "rms", "classifier", "elementwise", "dw_wait", "dw")


cdef float* _ptr(arr):
    """Address of a C-contiguous float32 array (checked once, at set-up)."""
    cdef float[::1] flat = arr.reshape(-1)
    return &flat[0]


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
        self.rope_cos = _ptr(engine.rope_cos)
        self.rope_sin = _ptr(engine.rope_sin)
        self.engine_probs = engine.probs
        self.engine_dprobs = engine.dprobs
        L = engine.d.L
        self._engine_ptrs = np.zeros((3, L), np.uintp)
        cdef size_t[:, ::1] ptrs = self._engine_ptrs
        self.engine_q = <const float**>&ptrs[0, 0]
        self.engine_k = <const float**>&ptrs[1, 0]
        self.engine_v = <const float**>&ptrs[2, 0]
        for l in range(L):
            self.engine_q[l] = engine.acts[l].q
            self.engine_k[l] = engine.acts[l].k
            self.engine_v[l] = engine.acts[l].v
        self.engine_k_rep = engine.k_rep
        self.engine_v_rep = engine.v_rep

    cdef bint qkv_held(self, int l) noexcept nogil:
        """Whether this backend holds layer l's q, k, v from its last engine forward (the
        engine's fp32 buffers of them were then not written)."""
        return False

    cdef void stage_weights(self) noexcept nogil:
        pass
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
    cdef void sdpa_bwd1(self, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil:
        pass
    cdef void sdpa_bwd2(self, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil:
        pass
    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil:
        pass
    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil:
        pass


cdef class CpuKernels(Kernels):
    """fp32 kernels: BLAS sgemm plus the fused _ops loops.

    The forward keeps each layer's attention probabilities, so the backward does not
    recompute them (the ANE programs recompute, having no such memory). The cache of
    layer l is used only for the engine's own q buffer of layer l, which lives as long
    as the engine: a caller's temporary array can never be mistaken for it."""
    cdef float* scores           # [S, S]
    cdef double* norm_scratch    # [S]
    cdef float* probs_cache      # [L, n_heads*S, S]
    cdef unsigned char* probs_valid  # [L] the cache holds the probabilities of engine_q[l]
    cdef object _buffers

    def bind(self, Engine engine):
        Kernels.bind(self, engine)
        d = engine.d
        S = d.S
        self._buffers = (np.empty(S * S, np.float32), np.empty(2 * S, np.float64),
                         np.empty((d.L, d.n_heads * S, S), np.float32),
                         np.zeros(d.L, np.uint8))
        self.scores = _ptr(self._buffers[0])
        cdef double[::1] ns = self._buffers[1]
        self.norm_scratch = &ns[0]
        self.probs_cache = _ptr(self._buffers[2])
        cdef unsigned char[::1] valid = self._buffers[3]
        self.probs_valid = &valid[0]

    cdef void sdpa_fwd(self, int l, const float* xnorm, float* attn, float* q, float* k, float* v,
                       float* q_raw, float* k_raw) noexcept nogil:
        cdef Dims d = self.d
        cdef LayerParams* w = &self.layers[l]
        cdef int h
        cdef Py_ssize_t block = <Py_ssize_t>d.hd * d.S
        # with QK-norm the raw projections are kept for its backward
        sgemm(0, 0, d.Q, d.S, d.D, 1.0, w.wq, d.D, xnorm, d.S, 0.0, q_raw if d.qk_norm else q, d.S)
        sgemm(0, 0, d.K, d.S, d.D, 1.0, w.wk, d.D, xnorm, d.S, 0.0, k_raw if d.qk_norm else k, d.S)
        sgemm(0, 0, d.K, d.S, d.D, 1.0, w.wv, d.D, xnorm, d.S, 0.0, v, d.S)
        if d.qk_norm:
            for h in range(d.n_heads):
                rmsnorm_fwd(q_raw + h * block, w.q_norm, q + h * block, d.hd, d.S, d.eps,
                            self.norm_scratch)
            for h in range(d.n_kv_heads):
                rmsnorm_fwd(k_raw + h * block, w.k_norm, k + h * block, d.hd, d.S, d.eps,
                            self.norm_scratch)
        rope_fwd(q, d.n_heads, d.hd, d.S, self.rope_cos, self.rope_sin, d.rope_half)
        rope_fwd(k, d.n_kv_heads, d.hd, d.S, self.rope_cos, self.rope_sin, d.rope_half)
        attention_fwd(q, k, v, attn, d.n_heads, d.n_kv_heads, d.hd, d.S,
                      self.probs_cache + <Py_ssize_t>l * d.n_heads * d.S * d.S)
        self.probs_valid[l] = q == self.engine_q[l]

    cdef void wo_fwd(self, int l, const float* attn, float* o) noexcept nogil:
        cdef Dims d = self.d
        sgemm(0, 0, d.D, d.S, d.Q, 1.0, self.layers[l].wo, d.Q, attn, d.S, 0.0, o, d.S)

    cdef void ffn_fused(self, int l, const float* x2norm, const float* x2, float* x_next,
                        float* h1, float* h3, float* gate) noexcept nogil:
        cdef Dims d = self.d
        cdef LayerParams* w = &self.layers[l]
        cdef Py_ssize_t n = <Py_ssize_t>d.D * d.S
        sgemm(0, 0, d.H, d.S, d.D, 1.0, w.w1, d.D, x2norm, d.S, 0.0, h1, d.S)
        sgemm(0, 0, d.H, d.S, d.D, 1.0, w.w3, d.D, x2norm, d.S, 0.0, h3, d.S)
        swiglu_fwd(h1, h3, gate, <Py_ssize_t>d.H * d.S)
        memcpy(x_next, x2, n * sizeof(float))
        sgemm(0, 0, d.D, d.S, d.H, d.residual_scale, w.w2, d.H, gate, d.S, 1.0, x_next, d.S)

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

    cdef void sdpa_bwd1(self, const float* q, const float* k_rep, const float* v_rep,
                        const float* da, float* probs, float* dprobs,
                        float* dv_rep) noexcept nogil:
        cdef Py_ssize_t size = <Py_ssize_t>self.d.n_heads * self.d.S * self.d.S
        cdef bint cached = False
        cdef int l
        for l in range(self.d.L):
            if self.engine_q[l] == q and self.probs_valid[l]:  # layer l's forward wrote q
                memcpy(probs, self.probs_cache + l * size, size * sizeof(float))
                cached = True
                break
        attention_bwd1(q, k_rep, v_rep, da, dv_rep, probs, dprobs, self.d.n_heads, self.d.hd,
                       self.d.S, cached)

    cdef void sdpa_bwd2(self, const float* probs, const float* dprobs, const float* q,
                        const float* k_rep, float* dq, float* dk_rep) noexcept nogil:
        attention_bwd2(probs, dprobs, q, k_rep, dq, dk_rep, self.d.n_heads, self.d.hd, self.d.S,
                       self.scores)

    cdef void q_bwd(self, int l, const float* dq, float* dx) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.D, d.S, d.Q, 1.0, self.layers[l].wq, d.D, dq, d.S, 0.0, dx, d.S)

    cdef void kv_bwd(self, int l, const float* dk, const float* dv, float* dx) noexcept nogil:
        cdef Dims d = self.d
        sgemm(1, 0, d.D, d.S, d.K, 1.0, self.layers[l].wk, d.D, dk, d.S, 0.0, dx, d.S)
        sgemm(1, 0, d.D, d.S, d.K, 1.0, self.layers[l].wv, d.D, dv, d.S, 1.0, dx, d.S)


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
    cdef LayerParams* grads
    cdef LayerActs* acts
    cdef GradSet sets[2]
    cdef long set_ticket[2]
    cdef readonly Kernels kernels
    cdef readonly DWWorker worker
    cdef readonly bint async_dw      # dW sgemms on the worker (else inline, timed as "dw")
    cdef readonly object rope_cos, rope_sin
    cdef object _keep                # every numpy buffer the pointers point into

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
    cdef float* k_rep                # [Q, S]
    cdef float* v_rep                # [Q, S]
    cdef float* dk_rep               # [Q, S]
    cdef float* dv_rep               # [Q, S]
    cdef float* dq_rot               # [Q, S] gradient w.r.t. q after QK-norm
    cdef float* dk_rot               # [K, S]
    cdef float* probs                # [n_heads*S, S]
    cdef float* dprobs               # [n_heads*S, S]
    cdef float* dxnorm               # [D, S]
    cdef float* dxnorm_kv            # [D, S]
    cdef double* norm_scratch        # [2S]
    cdef double timers[N_TIMERS]
    cdef readonly long steps

    def __cinit__(self):
        self.weights = NULL
        self.grads = NULL
        self.acts = NULL

    def __init__(self, config, views, grad_views, Kernels kernels, bint async_dw=True):
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
        keep = []
        self._keep = keep

        def buf(*shape, dtype=np.float32):
            a = np.zeros(shape, dtype)
            keep.append(a)
            return a

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
            self._bind_layer(&self.grads[l], grad_views, names)
        keep.append((views, grad_views))
        self.embed = _ptr(views[EMBEDDING])
        self.dembed = _ptr(grad_views[EMBEDDING])
        self.final_norm = _ptr(views[FINAL_NORM])
        self.dfinal_norm = _ptr(grad_views[FINAL_NORM])
        self.cls_w = _ptr(views[classifier_name(cfg)])
        self.cls_g = _ptr(grad_views[classifier_name(cfg)])
        self.V = cfg.vocab_size

        D, H, Q, K, S = d.D, d.H, d.Q, d.K, d.S
        for l in range(L):
            a = &self.acts[l]
            a.x_in = _ptr(buf(D, S)); a.xnorm = _ptr(buf(D, S))
            if d.qk_norm:
                a.q_raw = _ptr(buf(Q, S)); a.k_raw = _ptr(buf(K, S))
            a.q = _ptr(buf(Q, S)); a.k = _ptr(buf(K, S)); a.v = _ptr(buf(K, S))
            a.attn = _ptr(buf(Q, S)); a.x2 = _ptr(buf(D, S)); a.x2norm = _ptr(buf(D, S))
            a.h1 = _ptr(buf(H, S)); a.h3 = _ptr(buf(H, S)); a.gate = _ptr(buf(H, S))
        for i in range(2):
            gs = &self.sets[i]
            gs.dffn = _ptr(buf(D, S)); gs.dh1 = _ptr(buf(H, S)); gs.dh3 = _ptr(buf(H, S))
            gs.do = _ptr(buf(D, S)); gs.dq = _ptr(buf(Q, S)); gs.dk = _ptr(buf(K, S))
            gs.dv = _ptr(buf(K, S))
            self.set_ticket[i] = 0
        self.x_final = _ptr(buf(D, S)); self.xf_norm = _ptr(buf(D, S))
        self.logit_buf = _ptr(buf(S, cfg.vocab_size))
        self.g = _ptr(buf(D, S)); self.o = _ptr(buf(D, S)); self.dgate = _ptr(buf(H, S))
        self.dx2norm = _ptr(buf(D, S)); self.da = _ptr(buf(Q, S))
        self.k_rep = _ptr(buf(Q, S)); self.v_rep = _ptr(buf(Q, S))
        self.dk_rep = _ptr(buf(Q, S)); self.dv_rep = _ptr(buf(Q, S))
        self.dq_rot = _ptr(buf(Q, S)); self.dk_rot = _ptr(buf(K, S))
        self.probs = _ptr(buf(d.n_heads * S, S)); self.dprobs = _ptr(buf(d.n_heads * S, S))
        self.dxnorm = _ptr(buf(D, S)); self.dxnorm_kv = _ptr(buf(D, S))
        cdef double[::1] ns = buf(2 * S, dtype=np.float64)
        self.norm_scratch = &ns[0]
        self.rope_cos, self.rope_sin = rope_tables(d.hd, S, cfg.rope_theta)
        self.kernels = kernels
        # the worker thread always exists: it also runs the optimizer's second half
        self.worker = DWWorker()
        self.async_dw = async_dw
        kernels.bind(self)
        self.reset_timers()

    def __dealloc__(self):
        free(self.weights)
        free(self.grads)
        free(self.acts)

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
        """Point the classifier at rows [V', D] (vocab compaction) and their gradient buffer."""
        if weight.shape != grad.shape or weight.ndim != 2 or weight.shape[1] != self.d.D \
                or not 0 < weight.shape[0] <= self.vocab_size:
            raise ValueError("classifier weight and grad must both be [V, dim] with V <= vocab_size")
        self._keep.append((weight, grad))
        self.cls_w = _ptr(weight)
        self.cls_g = _ptr(grad)
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
        out = {name: self.timers[i] for i, name in enumerate(TIMER_NAMES)}
        out["io"] = self.kernels.io_ms
        out["kernels"] -= self.kernels.io_ms  # kernel time net of its own I/O
        return out

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

    def forward_backward(self, tokens, targets, float loss_scale=1.0):
        """Mean cross-entropy of one sequence; gradients (times loss_scale) are added to grads.
        Targets index the classifier rows (compact ids when compaction is on)."""
        cdef int[::1] tok = self._check_ids(tokens, "tokens", self.vocab_size)
        cdef int[::1] tgt = self._check_ids(targets, "targets", self.V)
        cdef double loss
        with nogil:
            self._forward(&tok[0])
            loss = self._backward(&tok[0], &tgt[0], loss_scale)
        self.kernels.raise_pending()
        self.steps += 1
        return loss / self.d.S

    def loss(self, tokens, targets):
        """Mean cross-entropy of one sequence, forward only: forward_backward's loss (the
        same softmax_xent), its gradient left in the logit buffer unused."""
        cdef int[::1] tok = self._check_ids(tokens, "tokens", self.vocab_size)
        cdef int[::1] tgt = self._check_ids(targets, "targets", self.V)
        cdef double loss
        with nogil:
            self._forward(&tok[0])
            loss = softmax_xent(self.logit_buf, &tgt[0], self.d.S, self.V, 1.0)
        self.kernels.raise_pending()
        return loss / self.d.S

    def logits(self, tokens):
        """Logits [S, V] of one sequence (V = the classifier rows in use)."""
        cdef int[::1] tok = self._check_ids(tokens, "tokens", self.vocab_size)
        with nogil:
            self._forward(&tok[0])
        self.kernels.raise_pending()
        out = np.empty((self.d.S, self.V), np.float32)
        cdef float[:, ::1] dst = out
        memcpy(&dst[0, 0], self.logit_buf, <Py_ssize_t>self.d.S * self.V * sizeof(float))
        return out

    cdef inline double lap(self, int slot, double t) noexcept nogil:
        """Charge the time since t to timer `slot`; return now, the start of the next section."""
        cdef double now = now_ms()
        self.timers[slot] += now - t
        return now

    cdef inline double _dw(self, GemmJob job, double t) noexcept nogil:
        """Queue a weight gradient on the worker, or run it here timed as "dw"; returns the
        clock for the next section."""
        if self.async_dw:
            self.worker.submit(job)
            return t
        sgemm(job.trans_a, job.trans_b, job.M, job.N, job.K, job.alpha, job.A, job.lda,
              job.B, job.ldb, job.beta, job.C, job.ldc)
        return self.lap(T_DW, t)

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
        with nogil:
            self.worker.submit_call(_sumsq_call, &first)
            second = sumsq(&grads[n // 2], n - n // 2)
            self.worker.wait_all()
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
        with nogil:
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
        return bool(nonfinite or first.nonfinite)

    cdef void _forward(self, const int* tokens) noexcept nogil:
        cdef Dims d = self.d
        cdef Py_ssize_t nD = <Py_ssize_t>d.D * d.S
        cdef LayerActs* a
        cdef LayerParams* w
        cdef float* x_next
        cdef int l
        cdef double t = now_ms()
        embedding_fwd(self.embed, tokens, self.acts[0].x_in, d.S, d.D)
        t = self.lap(T_ELEMENTWISE, t)
        for l in range(d.L):
            a = &self.acts[l]
            w = &self.weights[l]
            x_next = self.acts[l + 1].x_in if l + 1 < d.L else self.x_final
            rmsnorm_fwd(a.x_in, w.attn_norm, a.xnorm, d.D, d.S, d.eps, self.norm_scratch)
            t = self.lap(T_RMS, t)
            self.kernels.sdpa_fwd(l, a.xnorm, a.attn, a.q, a.k, a.v, a.q_raw, a.k_raw)
            self.kernels.wo_fwd(l, a.attn, self.o)
            t = self.lap(T_KERNELS, t)
            memcpy(a.x2, a.x_in, nD * sizeof(float))
            add_scaled(a.x2, self.o, nD, d.residual_scale)
            t = self.lap(T_ELEMENTWISE, t)
            rmsnorm_fwd(a.x2, w.ffn_norm, a.x2norm, d.D, d.S, d.eps, self.norm_scratch)
            t = self.lap(T_RMS, t)
            self.kernels.ffn_fused(l, a.x2norm, a.x2, x_next, a.h1, a.h3, a.gate)
            t = self.lap(T_KERNELS, t)
        rmsnorm_fwd(self.x_final, self.final_norm, self.xf_norm, d.D, d.S, d.eps,
                    self.norm_scratch)
        t = self.lap(T_RMS, t)
        # logits[S, V] = xf_norm^T @ cls_w^T
        sgemm(1, 1, d.S, self.V, d.D, 1.0, self.xf_norm, d.S, self.cls_w, d.D, 0.0, self.logit_buf,
              self.V)
        self.lap(T_CLASSIFIER, t)

    cdef double _backward(self, const int* tokens, const int* targets,
                          float loss_scale) noexcept nogil:
        cdef Dims d = self.d
        cdef double loss
        cdef int l
        cdef double t = now_ms()
        loss = softmax_xent(self.logit_buf, targets, d.S, self.V, loss_scale / d.S)
        # dxf_norm[D, S] = cls_w^T @ dlogits^T ; dcls[V, D] += dlogits^T @ xf_norm^T
        sgemm(1, 1, d.D, d.S, self.V, 1.0, self.cls_w, d.D, self.logit_buf, self.V, 0.0,
              self.dxnorm, d.S)
        t = self.lap(T_CLASSIFIER, t)
        t = self._dw(dw_job(self.V, d.D, d.S, self.logit_buf, True, self.xf_norm, self.cls_g), t)
        rmsnorm_bwd(self.x_final, self.final_norm, self.dxnorm, self.g, self.dfinal_norm, d.D, d.S,
                    d.eps, 0, self.norm_scratch)
        t = self.lap(T_RMS, t)
        for l in range(d.L - 1, -1, -1):
            # the buffer set of layer l + 2 must be free before layer l rewrites it
            self.worker.wait_for(self.set_ticket[l & 1])
            t = self.lap(T_DW_WAIT, t)
            t = self._ffn_backward(l, t)
            t = self._attention_backward(l, t)
            self.set_ticket[l & 1] = self.worker.ticket()
        self.worker.wait_all()
        t = self.lap(T_DW_WAIT, t)
        embedding_bwd(self.dembed, tokens, self.g, d.S, d.D)
        self.lap(T_ELEMENTWISE, t)
        return loss

    cdef double _ffn_backward(self, int l, double t) noexcept nogil:
        # FFN of layer l: x_next = x2 + rs * W2 @ (silu(W1 x2norm) * (W3 x2norm)).
        # In: g = dL/dx_next [D, S]. Out: g = dL/dx2 [D, S]; dW1, dW2, dW3 queued, dffn_norm.
        cdef Dims d = self.d
        cdef LayerActs* a = &self.acts[l]
        cdef LayerParams* gw = &self.grads[l]
        cdef GradSet* gs = &self.sets[l & 1]
        scale_copy(self.g, gs.dffn, <Py_ssize_t>d.D * d.S, d.residual_scale)
        t = self.lap(T_ELEMENTWISE, t)
        t = self._dw(dw_job(d.D, d.H, d.S, gs.dffn, False, a.gate, gw.w2), t)
        self.kernels.ffn_bwd_w2t(l, gs.dffn, self.dgate)
        t = self.lap(T_KERNELS, t)
        swiglu_bwd(a.h1, a.h3, self.dgate, gs.dh1, gs.dh3, <Py_ssize_t>d.H * d.S)
        t = self.lap(T_ELEMENTWISE, t)
        t = self._dw(dw_job(d.H, d.D, d.S, gs.dh1, False, a.x2norm, gw.w1), t)
        t = self._dw(dw_job(d.H, d.D, d.S, gs.dh3, False, a.x2norm, gw.w3), t)
        self.kernels.ffn_bwd_w13t(l, gs.dh1, gs.dh3, self.dx2norm)
        t = self.lap(T_KERNELS, t)
        rmsnorm_bwd(a.x2, self.weights[l].ffn_norm, self.dx2norm, self.g, gw.ffn_norm, d.D, d.S,
                    d.eps, 1, self.norm_scratch)
        return self.lap(T_RMS, t)

    cdef double _attention_backward(self, int l, double t) noexcept nogil:
        # Attention of layer l: x2 = x + rs * Wo @ attn(q, k, v).
        # In: g = dL/dx2 [D, S]. Out: g = dL/dx [D, S]; dWo, dWq, dWk, dWv queued, norm grads.
        cdef Dims d = self.d
        cdef Py_ssize_t nD = <Py_ssize_t>d.D * d.S
        cdef Py_ssize_t block = <Py_ssize_t>d.hd * d.S
        cdef bint gqa = d.n_heads != d.n_kv_heads
        cdef LayerActs* a = &self.acts[l]
        cdef LayerParams* w = &self.weights[l]
        cdef LayerParams* gw = &self.grads[l]
        cdef GradSet* gs = &self.sets[l & 1]
        cdef float* dq_rot
        cdef float* dk_rot
        cdef float* dk_rep
        cdef float* dv_rep
        cdef const float* k_rep
        cdef const float* v_rep
        cdef int h
        scale_copy(self.g, gs.do, nD, d.residual_scale)
        t = self.lap(T_ELEMENTWISE, t)
        t = self._dw(dw_job(d.D, d.Q, d.S, gs.do, False, a.attn, gw.wo), t)
        self.kernels.wot_bwd(l, gs.do, self.da)
        t = self.lap(T_KERNELS, t)
        if gqa:
            if not self.kernels.qkv_held(l):    # else the kernels repeat them as they copy
                gqa_repeat(a.k, self.k_rep, d.n_heads, d.n_kv_heads, d.hd, d.S)
                gqa_repeat(a.v, self.v_rep, d.n_heads, d.n_kv_heads, d.hd, d.S)
            k_rep, v_rep = self.k_rep, self.v_rep
        else:
            k_rep, v_rep = a.k, a.v
        # gradients land directly where they are needed when no reduction or norm follows
        dq_rot = self.dq_rot if d.qk_norm else gs.dq
        dk_rot = self.dk_rot if d.qk_norm else gs.dk
        dk_rep = self.dk_rep if gqa else dk_rot
        dv_rep = self.dv_rep if gqa else gs.dv
        t = self.lap(T_ELEMENTWISE, t)
        self.kernels.sdpa_bwd1(a.q, k_rep, v_rep, self.da, self.probs, self.dprobs, dv_rep)
        self.kernels.sdpa_bwd2(self.probs, self.dprobs, a.q, k_rep, dq_rot, dk_rep)
        t = self.lap(T_KERNELS, t)
        if gqa:
            gqa_reduce(dk_rep, dk_rot, d.n_heads, d.n_kv_heads, d.hd, d.S)
            gqa_reduce(dv_rep, gs.dv, d.n_heads, d.n_kv_heads, d.hd, d.S)
        rope_bwd(dq_rot, d.n_heads, d.hd, d.S, self.kernels.rope_cos, self.kernels.rope_sin,
                 d.rope_half)
        rope_bwd(dk_rot, d.n_kv_heads, d.hd, d.S, self.kernels.rope_cos, self.kernels.rope_sin,
                 d.rope_half)
        t = self.lap(T_ELEMENTWISE, t)
        if d.qk_norm:
            for h in range(d.n_heads):
                rmsnorm_bwd(a.q_raw + h * block, w.q_norm, dq_rot + h * block,
                            gs.dq + h * block, gw.q_norm, d.hd, d.S, d.eps, 0,
                            self.norm_scratch)
            for h in range(d.n_kv_heads):
                rmsnorm_bwd(a.k_raw + h * block, w.k_norm, dk_rot + h * block,
                            gs.dk + h * block, gw.k_norm, d.hd, d.S, d.eps, 0,
                            self.norm_scratch)
            t = self.lap(T_RMS, t)
        t = self._dw(dw_job(d.Q, d.D, d.S, gs.dq, False, a.xnorm, gw.wq), t)
        t = self._dw(dw_job(d.K, d.D, d.S, gs.dk, False, a.xnorm, gw.wk), t)
        t = self._dw(dw_job(d.K, d.D, d.S, gs.dv, False, a.xnorm, gw.wv), t)
        self.kernels.q_bwd(l, gs.dq, self.dxnorm)
        self.kernels.kv_bwd(l, gs.dk, gs.dv, self.dxnorm_kv)
        t = self.lap(T_KERNELS, t)
        add_scaled(self.dxnorm, self.dxnorm_kv, nD, 1.0)
        t = self.lap(T_ELEMENTWISE, t)
        rmsnorm_bwd(a.x_in, w.attn_norm, self.dxnorm, self.g, gw.attn_norm, d.D, d.S, d.eps,
                    1, self.norm_scratch)
        return self.lap(T_RMS, t)
