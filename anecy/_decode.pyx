# cython: language_level=3
"""The compiled decoder: a Llama-family model's forward pass over a KV cache, one token per
step (split across threads) or a prompt at once (batched sgemm).

A token's step runs on ``threads`` threads: the caller's and background workers (the
trainer's DWWorker, one each), which meet at a spin barrier between products. Every
matrix-vector product is split by rows; attention by KV-head groups (a thread computes the
q/k/v rows of its groups' heads, so attention needs no barrier before it). Each row's dot
product is summed in one fixed order (_decode.h) whoever computes it, and the small
reductions (RMSNorm, softmax) are done in full by every thread that needs them, so the
logits are bit-identical for any thread count.

A prompt goes through the layers in chunks of up to PREFILL_ROWS positions on the same
threads: sgemms over fixed blocks of output columns (the BLAS on one thread in each),
attention per head as two sgemms over the cache; its last position's logits then come
from the threads' classifier step. Every step is the threads' shares of one job
(``net.mode``): a token, a prompt chunk, or the classifier alone.

Shapes: D model width, Q = n_heads*hd, KV = n_kv_heads*hd, H hidden, V classifier rows."""

from libc.math cimport sqrt
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import numpy as np

from ._ops cimport sgemm
from ._worker cimport DWWorker


cdef extern from "_mathx.h" nogil:
    float anecy_expf(float x)


cdef extern from "_decode.h" nogil:
    ctypedef struct anecy_barrier:
        pass
    void anecy_matvec_rows(const float* W, long ld, const float* x, float* y, long r0,
                           long r1, int n, int accumulate, float scale)
    void anecy_matvec_rows_q8(const signed char* Q, long ldq, const float* S, long lds,
                              const float* x, float* y, long r0, long r1, int n,
                              int accumulate, float scale)
    int ANECY_Q8_BLOCK
    void anecy_barrier_init(anecy_barrier* b, unsigned n)
    void anecy_barrier_wait(anecy_barrier* b)


# Positions a prompt's chunk holds: its sgemms are large enough to run at BLAS speed and the
# chunk's buffers stay small whatever the context.
cdef enum:
    PREFILL_ROWS = 128


cdef struct Mat:
    const float* f32          # [rows, cols] (prompts always go through these)
    const signed char* q8     # [rows, cols] when tokens decode from int8 weights, else NULL
    const float* scales       # [rows, ceil(cols / ANECY_Q8_BLOCK)]
    int cols


cdef struct LayerWeights:
    Mat wq                    # [Q, D]
    Mat wk                    # [KV, D]
    Mat wv                    # [KV, D]
    Mat wo                    # [D, Q]
    Mat w1                    # [H, D] gate
    Mat w3                    # [H, D] up
    Mat w2                    # [D, H] down
    const float* attn_norm    # [D]
    const float* ffn_norm     # [D]
    const float* q_norm       # [hd] (QK-norm models)
    const float* k_norm       # [hd]


cdef struct Net:
    int D, H, Q, KV, hd, n_heads, n_kv_heads, n_layers, n_cls, max_len, n_threads
    bint rope_half, qk_norm
    float eps, res
    LayerWeights* layers
    const float* embed        # [vocab, D]
    Mat classifier            # [V, D]
    const float* final_norm   # [D]
    const float* cos          # [max_len, hd/2]
    const float* sin
    float* k_cache            # [n_layers, max_len, KV] after QK-norm and RoPE
    float* v_cache            # [n_layers, max_len, KV]
    float* x                  # [D] the residual stream of the token being decoded
    float* q                  # [Q]
    float* att                # [Q] attention output
    float* gate               # [H]
    float* up                 # [H]
    float* logits             # [V]
    int pos                   # the position being decoded (a prompt chunk's first)
    int mode                  # what the threads run: MODE_TOKEN, MODE_CHUNK, MODE_CLASSIFY
    # a prompt chunk of T positions: the token ids and the buffers [PREFILL_ROWS, ...]
    const int* chunk_tokens
    int T
    float* px                 # [rows, D] residual stream
    float* pxn                # [rows, D] normed
    float* pq                 # [rows, Q]
    float* patt               # [rows, Q]
    float* pgate              # [rows, H]
    float* pup                # [rows, H]
    anecy_barrier barrier


cdef struct ThreadShare:
    Net* net
    int t                     # this thread's index, 0 .. n_threads-1
    float* xn                 # [D] its own normed copy of x
    float* scores             # [PREFILL_ROWS, max_len] its own attention scores


cdef enum:
    MODE_TOKEN = 0            # one token through the layers, then the classifier
    MODE_CHUNK = 1            # a prompt chunk through the layers
    MODE_CLASSIFY = 2         # the classifier over x (a prompt's last position)
    # a prompt's products are sgemms over blocks of this many output columns (a head's
    # for q, k and v), the same blocks whatever the thread count: the BLAS's rounding
    # depends on a call's shape, so the result does not depend on who computes a block
    CHUNK_COLS = 64


cdef inline void matvec(const Mat* m, const float* x, float* y, long r0, long r1,
                        bint accumulate, float scale) noexcept nogil:
    # rows r0 .. r1-1 of m @ x into y (added, times scale, with accumulate)
    cdef long blocks = (m.cols + ANECY_Q8_BLOCK - 1) // ANECY_Q8_BLOCK
    if m.q8 != NULL:
        anecy_matvec_rows_q8(m.q8, m.cols, m.scales, blocks, x, y, r0, r1, m.cols, accumulate,
                             scale)
    else:
        anecy_matvec_rows(m.f32, m.cols, x, y, r0, r1, m.cols, accumulate, scale)


cdef inline void split(long n, int t, int nt, long* lo, long* hi) noexcept nogil:
    # thread t's contiguous share of n items
    lo[0] = n * t // nt
    hi[0] = n * (t + 1) // nt


cdef inline void split_cols(long n, int t, int nt, long* lo, long* hi) noexcept nogil:
    # thread t's share of n columns, cut at multiples of CHUNK_COLS
    cdef long blocks = (n + CHUNK_COLS - 1) // CHUNK_COLS
    split(blocks, t, nt, lo, hi)
    lo[0] = min(lo[0] * CHUNK_COLS, n)
    hi[0] = min(hi[0] * CHUNK_COLS, n)


cdef inline void linear_cols(const float* A, int T, int K, const Mat* m, long c0, long c1,
                             long block, float alpha, float beta, float* C,
                             int ldc) noexcept nogil:
    # columns c0 .. c1-1 of C [T, ldc] = alpha * A [T, K] @ m^T + beta * C (rows c0.. of m),
    # one sgemm per block of columns (c0 a multiple of block)
    cdef long b = c0, n
    while b < c1:
        n = min(block, c1 - b)
        sgemm(0, 1, T, n, K, alpha, A, K, m.f32 + b * K, K, beta, C + b, ldc)
        b += n


cdef void rmsnorm(const float* x, const float* w, float* y, int n, float eps) noexcept nogil:
    # x [n] -> y [n] (may alias x): x * (1 / sqrt(mean(x^2) + eps)) * w, as HF computes it
    cdef double ss = 0.0
    cdef int i
    for i in range(n):
        ss += <double>x[i] * x[i]
    cdef float inv = <float>(1.0 / sqrt(<float>(ss / n) + eps))
    for i in range(n):
        y[i] = (x[i] * inv) * w[i]


cdef void rope(float* v, const float* cos_p, const float* sin_p, int hd,
               bint half) noexcept nogil:
    # one head's v [hd] rotated in place by the angles of one position ([hd/2] tables)
    cdef int i, h2 = hd // 2
    cdef float a, b
    if half:   # pairs (i, i + hd/2): HF Llama, Qwen3
        for i in range(h2):
            a, b = v[i], v[i + h2]
            v[i] = a * cos_p[i] - b * sin_p[i]
            v[i + h2] = a * sin_p[i] + b * cos_p[i]
    else:      # pairs (2i, 2i+1): llama2.c
        for i in range(h2):
            a, b = v[2 * i], v[2 * i + 1]
            v[2 * i] = a * cos_p[i] - b * sin_p[i]
            v[2 * i + 1] = a * sin_p[i] + b * cos_p[i]


cdef void softmax(float* s, int n) noexcept nogil:
    # s [n] in place
    cdef float m = s[0], total = 0.0
    cdef int j
    for j in range(1, n):
        if s[j] > m:
            m = s[j]
    for j in range(n):
        s[j] = anecy_expf(s[j] - m)
        total += s[j]
    cdef float inv = 1.0 / total
    for j in range(n):
        s[j] *= inv


cdef void attend(const float* q, const float* keys, const float* values, int ld, int n_keys,
                 int hd, float* scores, float* out) noexcept nogil:
    # one query head q [hd] over keys/values [n_keys, hd] (row stride ld) -> out [hd]
    cdef int j, i
    cdef const float* v
    cdef float p
    anecy_matvec_rows(keys, ld, q, scores, 0, n_keys, hd, 0, 0.0)
    cdef float scale = <float>(1.0 / sqrt(<double>hd))
    for j in range(n_keys):
        scores[j] *= scale
    softmax(scores, n_keys)
    memset(out, 0, hd * sizeof(float))
    for j in range(n_keys):
        v, p = values + <long>j * ld, scores[j]
        for i in range(hd):
            out[i] += p * v[i]


cdef void attention_block(ThreadShare* me, int l) noexcept nogil:
    # this thread's KV-head groups of layer l at net.pos: q/k/v rows, QK-norm, RoPE, the
    # new key and value into the cache, attention -> net.att
    cdef Net* net = me.net
    cdef LayerWeights* w = &net.layers[l]
    cdef int hd = net.hd, rep = net.n_heads // net.n_kv_heads, pos = net.pos, h, qh
    cdef long g0, g1
    cdef float* layer_k = net.k_cache + <long>l * net.max_len * net.KV
    cdef float* layer_v = net.v_cache + <long>l * net.max_len * net.KV
    cdef float* k_row = layer_k + <long>pos * net.KV
    cdef const float* cos_p = net.cos + <long>pos * (hd // 2)
    cdef const float* sin_p = net.sin + <long>pos * (hd // 2)
    split(net.n_kv_heads, me.t, net.n_threads, &g0, &g1)
    matvec(&w.wk, me.xn, k_row, g0 * hd, g1 * hd, 0, 0.0)
    matvec(&w.wv, me.xn, layer_v + <long>pos * net.KV, g0 * hd, g1 * hd, 0, 0.0)
    matvec(&w.wq, me.xn, net.q, g0 * rep * hd, g1 * rep * hd, 0, 0.0)
    for h in range(g0, g1):
        if net.qk_norm:
            rmsnorm(k_row + h * hd, w.k_norm, k_row + h * hd, hd, net.eps)
        rope(k_row + h * hd, cos_p, sin_p, hd, net.rope_half)
    for qh in range(g0 * rep, g1 * rep):
        if net.qk_norm:
            rmsnorm(net.q + qh * hd, w.q_norm, net.q + qh * hd, hd, net.eps)
        rope(net.q + qh * hd, cos_p, sin_p, hd, net.rope_half)
        h = qh // rep
        attend(net.q + qh * hd, layer_k + h * hd, layer_v + h * hd, net.KV, pos + 1, hd,
               me.scores, net.att + qh * hd)


cdef void chunk_share(ThreadShare* me) noexcept nogil:
    # thread me.t's part of a prompt chunk (net.T positions from net.pos) through every
    # layer; the residual stream ends in net.px. Products are sgemms over column shares
    # (the BLAS on one thread in each), attention by KV-head groups as for a token.
    cdef Net* n = me.net
    cdef LayerWeights* w
    cdef int D = n.D, Q = n.Q, KV = n.KV, H = n.H, hd = n.hd, T = n.T, p0 = n.pos
    cdef int p1 = p0 + T, rep = n.n_heads // n.n_kv_heads, l, t, h, qh, j
    cdef long r0, r1, c0, c1, g0, g1, i
    cdef float g
    cdef float scale = <float>(1.0 / sqrt(<double>hd))
    cdef float* S = me.scores
    cdef float* layer_k
    cdef float* layer_v
    cdef float* row
    cdef const float* cos_p
    cdef const float* sin_p
    split(T, me.t, n.n_threads, &r0, &r1)
    for t in range(r0, r1):
        memcpy(n.px + <long>t * D, n.embed + <long>n.chunk_tokens[t] * D, D * sizeof(float))
    split(n.n_kv_heads, me.t, n.n_threads, &g0, &g1)
    for l in range(n.n_layers):
        w = &n.layers[l]
        layer_k = n.k_cache + <long>l * n.max_len * KV
        layer_v = n.v_cache + <long>l * n.max_len * KV
        split(T, me.t, n.n_threads, &r0, &r1)
        anecy_barrier_wait(&n.barrier)                       # px complete
        for t in range(r0, r1):
            rmsnorm(n.px + <long>t * D, w.attn_norm, n.pxn + <long>t * D, D, n.eps)
        anecy_barrier_wait(&n.barrier)                       # pxn complete
        # this thread's KV-head groups: their q, k and v columns, then their attention
        linear_cols(n.pxn, T, D, &w.wq, g0 * rep * hd, g1 * rep * hd, hd, 1.0, 0.0, n.pq, Q)
        linear_cols(n.pxn, T, D, &w.wk, g0 * hd, g1 * hd, hd, 1.0, 0.0,
                    layer_k + <long>p0 * KV, KV)
        linear_cols(n.pxn, T, D, &w.wv, g0 * hd, g1 * hd, hd, 1.0, 0.0,
                    layer_v + <long>p0 * KV, KV)
        for t in range(T):
            cos_p = n.cos + <long>(p0 + t) * (hd // 2)
            sin_p = n.sin + <long>(p0 + t) * (hd // 2)
            for h in range(g0, g1):
                row = layer_k + <long>(p0 + t) * KV + h * hd
                if n.qk_norm:
                    rmsnorm(row, w.k_norm, row, hd, n.eps)
                rope(row, cos_p, sin_p, hd, n.rope_half)
            for qh in range(g0 * rep, g1 * rep):
                row = n.pq + <long>t * Q + qh * hd
                if n.qk_norm:
                    rmsnorm(row, w.q_norm, row, hd, n.eps)
                rope(row, cos_p, sin_p, hd, n.rope_half)
        for qh in range(g0 * rep, g1 * rep):
            h = qh // rep
            # scores [T, p1] = q_h k_h^T / sqrt(hd); position p0+t sees keys 0 .. p0+t
            sgemm(0, 1, T, p1, hd, scale, n.pq + qh * hd, Q, layer_k + h * hd, KV, 0.0, S, p1)
            for t in range(T):
                softmax(S + <long>t * p1, p0 + t + 1)
                for j in range(p0 + t + 1, p1):
                    S[<long>t * p1 + j] = 0.0
            sgemm(0, 0, T, hd, p1, 1.0, S, p1, layer_v + h * hd, KV, 0.0, n.patt + qh * hd, Q)
        anecy_barrier_wait(&n.barrier)                       # patt complete
        split_cols(D, me.t, n.n_threads, &c0, &c1)           # px += res * patt wo^T
        linear_cols(n.patt, T, Q, &w.wo, c0, c1, CHUNK_COLS, n.res, 1.0, n.px, D)
        anecy_barrier_wait(&n.barrier)                       # px complete
        for t in range(r0, r1):
            rmsnorm(n.px + <long>t * D, w.ffn_norm, n.pxn + <long>t * D, D, n.eps)
        anecy_barrier_wait(&n.barrier)                       # pxn complete
        split_cols(H, me.t, n.n_threads, &c0, &c1)
        linear_cols(n.pxn, T, D, &w.w1, c0, c1, CHUNK_COLS, 1.0, 0.0, n.pgate, H)
        linear_cols(n.pxn, T, D, &w.w3, c0, c1, CHUNK_COLS, 1.0, 0.0, n.pup, H)
        for t in range(T):
            for i in range(<long>t * H + c0, <long>t * H + c1):
                g = n.pgate[i]
                n.pgate[i] = g / (1.0 + anecy_expf(-g)) * n.pup[i]
        anecy_barrier_wait(&n.barrier)                       # pgate complete
        split_cols(D, me.t, n.n_threads, &c0, &c1)           # px += res * pgate w2^T
        linear_cols(n.pgate, T, H, &w.w2, c0, c1, CHUNK_COLS, n.res, 1.0, n.px, D)
    anecy_barrier_wait(&n.barrier)                           # px complete


cdef void decode_share(void* arg) noexcept nogil:
    # thread me.t's part of one token's step; every thread runs it, meeting at the barrier
    cdef ThreadShare* me = <ThreadShare*>arg
    cdef Net* net = me.net
    cdef LayerWeights* w
    cdef long r0, r1, i
    cdef int l
    cdef float g
    if net.mode == MODE_CHUNK:
        chunk_share(me)
        return
    if net.mode == MODE_TOKEN:
        for l in range(net.n_layers):
            w = &net.layers[l]
            rmsnorm(net.x, w.attn_norm, me.xn, net.D, net.eps)
            attention_block(me, l)
            anecy_barrier_wait(&net.barrier)                 # att complete
            split(net.D, me.t, net.n_threads, &r0, &r1)
            matvec(&w.wo, net.att, net.x, r0, r1, 1, net.res)
            anecy_barrier_wait(&net.barrier)                 # x complete
            rmsnorm(net.x, w.ffn_norm, me.xn, net.D, net.eps)
            split(net.H, me.t, net.n_threads, &r0, &r1)
            matvec(&w.w1, me.xn, net.gate, r0, r1, 0, 0.0)
            matvec(&w.w3, me.xn, net.up, r0, r1, 0, 0.0)
            for i in range(r0, r1):   # SwiGLU: silu(gate) * up
                g = net.gate[i]
                net.gate[i] = g / (1.0 + anecy_expf(-g)) * net.up[i]
            anecy_barrier_wait(&net.barrier)                 # gate complete
            split(net.D, me.t, net.n_threads, &r0, &r1)
            matvec(&w.w2, net.gate, net.x, r0, r1, 1, net.res)
            anecy_barrier_wait(&net.barrier)                 # x complete
    rmsnorm(net.x, net.final_norm, me.xn, net.D, net.eps)
    split(net.n_cls, me.t, net.n_threads, &r0, &r1)
    matvec(&net.classifier, me.xn, net.logits, r0, r1, 0, 0.0)


_blas_controller = None


def one_blas_thread():
    """A context in which the BLAS runs each call on the calling thread alone: the prompt's
    threads split its products themselves (BLAS threads on top of them would oversubscribe
    the cores, and on a loaded machine they wait on each other)."""
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def quantize_q8(w):
    """(q int8 [rows, cols], scales float32 [rows, ceil(cols / 32)]) of w [rows, cols]: each
    block of 32 weights of a row as llama.cpp's q8_0 stores it, round(w / d) with
    d = max|w| / 127 over the block (d in fp32 here), so that w ~ q * d."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    block = ANECY_Q8_BLOCK
    padded = np.zeros((rows, -(-cols // block) * block), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, -1, block)
    scales = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.round(blocks / safe[:, :, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.reshape(rows, -1)[:, :cols]), np.ascontiguousarray(scales)


cdef const float* address(a, tuple shape) except NULL:
    # the first float of a C-contiguous float32 array of this shape (its owner keeps it)
    cdef const float[::1] flat
    if a.dtype != np.float32 or not a.flags.c_contiguous or tuple(a.shape) != shape:
        raise ValueError(f"expected a C-contiguous float32 array of shape {shape}, got "
                         f"{a.dtype} {a.shape}")
    flat = a.reshape(-1)
    return &flat[0]


cdef class DecodeCore:
    """A model's weights (not copied), a KV cache of ``max_len`` positions and the buffers
    of one step, allocated once. ``weights`` maps HF names to arrays in the model's RoPE
    order; ``classifier`` is [V, D] (the embedding, lm_head, or their active rows)."""
    cdef Net net
    cdef object keep                     # every array net points into
    cdef list workers                    # DWWorker, one per thread beyond the caller's
    cdef ThreadShare* shares             # [threads]
    cdef int n_vocab
    cdef float[:, ::1] xn_rows, score_rows
    # prompt chunk buffers [rows, ...], rows = min(PREFILL_ROWS, max_len)
    cdef float[:, ::1] p_x, p_xn, p_q, p_att, p_gate, p_up
    cdef readonly long prefill_positions   # positions computed by prefill() so far
    cdef readonly object logits            # [V] after the last step, overwritten by the next

    def __init__(self, cfg, dict weights, classifier, int max_len, int threads,
                 bint q8=False):
        cdef int D = cfg.dim, H = cfg.hidden_dim, hd = cfg.head_dim, l
        cdef int Q = cfg.n_heads * hd, KV = cfg.n_kv_heads * hd
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        from ._ops import rope_tables
        cos, sin = rope_tables(hd, max_len, cfg.rope_theta)            # [hd/2, max_len]
        cos, sin = np.ascontiguousarray(cos.T), np.ascontiguousarray(sin.T)
        k_cache = np.zeros((cfg.n_layers, max_len, KV), np.float32)
        v_cache = np.zeros_like(k_cache)
        buffers = {name: np.zeros(n, np.float32)
                   for name, n in (("x", D), ("q", Q), ("att", Q), ("gate", H), ("up", H),
                                   ("logits", classifier.shape[0]))}
        self.keep = [weights, classifier, cos, sin, k_cache, v_cache, buffers]
        n = &self.net
        n.D, n.H, n.Q, n.KV, n.hd = D, H, Q, KV, hd
        n.n_heads, n.n_kv_heads, n.n_layers = cfg.n_heads, cfg.n_kv_heads, cfg.n_layers
        n.n_cls, n.max_len, n.n_threads = classifier.shape[0], max_len, threads
        n.rope_half, n.qk_norm = cfg.rope_style == "half", cfg.qk_norm
        n.eps, n.res = cfg.norm_eps, cfg.residual_scale
        n.layers = <LayerWeights*>calloc(cfg.n_layers, sizeof(LayerWeights))
        self.shares = <ThreadShare*>calloc(threads, sizeof(ThreadShare))
        if n.layers == NULL or self.shares == NULL:
            raise MemoryError()
        for l in range(cfg.n_layers):
            p = f"model.layers.{l}."
            lw = &n.layers[l]
            self._matrix(&lw.wq, weights[p + "self_attn.q_proj.weight"], (Q, D), q8)
            self._matrix(&lw.wk, weights[p + "self_attn.k_proj.weight"], (KV, D), q8)
            self._matrix(&lw.wv, weights[p + "self_attn.v_proj.weight"], (KV, D), q8)
            self._matrix(&lw.wo, weights[p + "self_attn.o_proj.weight"], (D, Q), q8)
            self._matrix(&lw.w1, weights[p + "mlp.gate_proj.weight"], (H, D), q8)
            self._matrix(&lw.w3, weights[p + "mlp.up_proj.weight"], (H, D), q8)
            self._matrix(&lw.w2, weights[p + "mlp.down_proj.weight"], (D, H), q8)
            lw.attn_norm = address(weights[p + "input_layernorm.weight"], (D,))
            lw.ffn_norm = address(weights[p + "post_attention_layernorm.weight"], (D,))
            lw.q_norm = lw.k_norm = NULL
            if cfg.qk_norm:
                lw.q_norm = address(weights[p + "self_attn.q_norm.weight"], (hd,))
                lw.k_norm = address(weights[p + "self_attn.k_norm.weight"], (hd,))
        n.embed = address(weights["model.embed_tokens.weight"], (cfg.vocab_size, D))
        self.n_vocab = cfg.vocab_size
        self._matrix(&n.classifier, classifier, (n.n_cls, D), q8)
        n.final_norm = address(weights["model.norm.weight"], (D,))
        n.cos, n.sin = address(cos, (max_len, hd // 2)), address(sin, (max_len, hd // 2))
        n.k_cache = <float*>address(k_cache, k_cache.shape)
        n.v_cache = <float*>address(v_cache, v_cache.shape)
        n.x, n.q = <float*>address(buffers["x"], (D,)), <float*>address(buffers["q"], (Q,))
        n.att = <float*>address(buffers["att"], (Q,))
        n.gate = <float*>address(buffers["gate"], (H,))
        n.up = <float*>address(buffers["up"], (H,))
        n.logits = <float*>address(buffers["logits"], (n.n_cls,))
        anecy_barrier_init(&n.barrier, threads)
        self.xn_rows = np.zeros((threads, D), np.float32)
        rows = min(PREFILL_ROWS, max_len)
        self.score_rows = np.zeros((threads, rows * max_len), np.float32)
        for l in range(threads):
            self.shares[l].net = n
            self.shares[l].t = l
            self.shares[l].xn = &self.xn_rows[l, 0]
            self.shares[l].scores = &self.score_rows[l, 0]
        self.workers = [DWWorker() for _ in range(threads - 1)]
        self.p_x, self.p_xn = np.zeros((rows, D), np.float32), np.zeros((rows, D), np.float32)
        self.p_q, self.p_att = np.zeros((rows, Q), np.float32), np.zeros((rows, Q), np.float32)
        self.p_gate = np.zeros((rows, H), np.float32)
        self.p_up = np.zeros((rows, H), np.float32)
        n.px, n.pxn, n.pq, n.patt = &self.p_x[0, 0], &self.p_xn[0, 0], &self.p_q[0, 0], \
            &self.p_att[0, 0]
        n.pgate, n.pup = &self.p_gate[0, 0], &self.p_up[0, 0]
        self.logits = buffers["logits"]
        self.prefill_positions = 0

    cdef int _matrix(self, Mat* m, a, tuple shape, bint q8) except -1:
        # m set to the fp32 array a [rows, cols] and, with q8, its int8 copy (kept here)
        m.f32, m.cols, m.q8, m.scales = address(a, shape), shape[1], NULL, NULL
        if q8:
            weights_q8, scales = quantize_q8(a)
            self.keep += [weights_q8, scales]
            m.q8 = <const signed char*><size_t>weights_q8.ctypes.data
            m.scales = address(scales, scales.shape)
        return 0

    def __dealloc__(self):
        # the workers' threads end (joined) when the list goes; nothing runs a share now
        free(self.net.layers)
        free(self.shares)

    @property
    def q8(self):
        """True when tokens decode from int8 copies of the weights."""
        return self.net.classifier.q8 != NULL

    @property
    def threads(self):
        return self.net.n_threads

    cdef void _run_threads(self):
        # every thread's share of the step set up in net; returns when all are done
        cdef DWWorker worker
        cdef int t
        for t in range(1, self.net.n_threads):
            worker = self.workers[t - 1]
            worker.submit_call(decode_share, &self.shares[t])
        with nogil:
            decode_share(&self.shares[0])
        for worker in self.workers:
            with nogil:
                worker.wait_all()

    def decode(self, int token, int pos):
        """Feed ``token`` at position ``pos`` (the cache holds 0 .. pos-1); the logits are
        in ``self.logits``."""
        if not 0 <= pos < self.net.max_len:
            raise ValueError(f"position {pos} outside the cache of {self.net.max_len}")
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token id {token} outside the vocabulary of {self.n_vocab}")
        memcpy(self.net.x, self.net.embed + <long>token * self.net.D,
               self.net.D * sizeof(float))
        self.net.pos, self.net.mode = pos, MODE_TOKEN
        self._run_threads()

    def prefill(self, const int[::1] tokens, int pos):
        """Feed ``tokens`` at positions pos, pos+1, ...; the logits after the last are in
        ``self.logits``."""
        cdef int T = tokens.shape[0], done = 0, rows
        if T < 1 or pos < 0 or pos + T > self.net.max_len:
            raise ValueError(f"positions {pos}..{pos + T - 1} outside the cache of "
                             f"{self.net.max_len}")
        for done in range(T):
            if not 0 <= tokens[done] < self.n_vocab:
                raise ValueError(f"token id {tokens[done]} outside the vocabulary of "
                                 f"{self.n_vocab}")
        done = 0
        with one_blas_thread():   # each thread's sgemms on its own core
            while done < T:
                rows = min(T - done, PREFILL_ROWS)
                self.net.chunk_tokens, self.net.T = &tokens[done], rows
                self.net.pos, self.net.mode = pos + done, MODE_CHUNK
                self._run_threads()
                done += rows
        memcpy(self.net.x, &self.p_x[rows - 1, 0], self.net.D * sizeof(float))
        self.prefill_positions += T
        self.net.mode = MODE_CLASSIFY
        self._run_threads()

