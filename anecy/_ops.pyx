# cython: language_level=3
"""Numeric kernels of anecy (see _ops.pxd for the shapes).

The cdef functions are what the engine calls in its nogil layer loop; the few Python
functions at the end (fp16 conversion, RoPE tables) are for Python-level code that runs
once (never per layer). The tests reach the cdef functions through the ``py_*`` entry
points of ``anecy._testing``."""

import sys

import numpy as np

from libc.float cimport FLT_MAX
from libc.math cimport fabsf, log, sqrt, sqrtf
from libc.string cimport memcpy, memset
from libc.stdint cimport uint16_t
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer

cdef extern from "_blas.h" nogil:
    const char* ANECY_BLAS_NAME
    void anecy_set_fortran_sgemm(void* fn)
    int anecy_blas_ready()
    void anecy_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                     const float* A, int lda, const float* B, int ldb, float beta,
                     float* C, int ldc)

cdef extern from "_accel.h" nogil:
    enum:
        ANECY_ACCELERATE        # 1 on macOS: RMSNorm and softmax/CE go through vDSP/vForce
    void anecy_accel_rmsnorm_fwd(const float* x, const float* w, float* y, int C, int S,
                                 float eps, float* scratch)
    void anecy_accel_rmsnorm_bwd(const float* x, const float* w, const float* dy, float* dx,
                                 float* dw, int C, int S, float eps, int accumulate,
                                 float* scratch)
    double anecy_accel_softmax_xent(float* logits, const int* targets, int S, int V,
                                    float grad_scale)

cdef extern from "_mathx.h" nogil:
    float anecy_expf(float x)

cdef extern from "_fp16.h" nogil:
    void anecy_f32_to_f16(const float* src, uint16_t* dst, size_t n)
    void anecy_f16_to_f32(const uint16_t* src, float* dst, size_t n)
    void anecy_f32_to_f16_scalar(const float* src, uint16_t* dst, size_t n)
    void anecy_f16_to_f32_scalar(const uint16_t* src, float* dst, size_t n)
    const char* anecy_fp16_path()
    void anecy_f32_to_f16_transposed(const float* src, uint16_t* dst, size_t rows,
                                     size_t cols, size_t ld32, size_t ld16)
    void anecy_f32_to_f16_transposed_scalar(const float* src, uint16_t* dst, size_t rows,
                                            size_t cols, size_t ld32, size_t ld16)


def _bind_blas():
    # Outside macOS the sgemm is SciPy's bundled OpenBLAS, reached through the
    # function pointer that scipy.linalg.cython_blas exports for Cython users.
    if anecy_blas_ready():
        return
    from scipy.linalg import cython_blas
    capsule = cython_blas.__pyx_capi__["sgemm"]
    anecy_set_fortran_sgemm(PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule)))


_bind_blas()
BLAS_NAME = ANECY_BLAS_NAME.decode()


cdef void sgemm(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                const float* A, int lda, const float* B, int ldb, float beta,
                float* C, int ldc) noexcept nogil:
    anecy_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)


# ---------------------------------------------------------------------------------------
# RMSNorm over the channel axis of [C, S]. Rows are walked in order so the inner loop
# over positions is contiguous; per-position sums live in double scratch.

cdef void _inv_rms(const float* x, int C, int S, float eps, double* inv) noexcept nogil:
    cdef Py_ssize_t c, s
    cdef const float* row
    memset(inv, 0, S * sizeof(double))
    for c in range(C):
        row = x + c * S
        for s in range(S):
            inv[s] += <double>row[s] * row[s]
    for s in range(S):
        # float32 like the reference implementations (HF computes the variance in fp32)
        inv[s] = 1.0 / sqrtf(<float>(inv[s] / C) + eps)


cdef void rmsnorm_fwd(const float* x, const float* w, float* y, int C, int S, float eps,
                      double* scratch) noexcept nogil:
    cdef Py_ssize_t c, s
    cdef float wc
    if ANECY_ACCELERATE:
        anecy_accel_rmsnorm_fwd(x, w, y, C, S, eps, <float*>scratch)
        return
    _inv_rms(x, C, S, eps, scratch)
    for c in range(C):
        wc = w[c]
        for s in range(S):
            y[c * S + s] = (x[c * S + s] * <float>scratch[s]) * wc


cdef void rmsnorm_bwd(const float* x, const float* w, const float* dy, float* dx, float* dw,
                      int C, int S, float eps, bint accumulate, double* scratch) noexcept nogil:
    cdef double* inv = scratch
    cdef double* dot = scratch + S
    cdef Py_ssize_t c, s, i
    cdef double acc
    cdef float wc
    if ANECY_ACCELERATE:
        anecy_accel_rmsnorm_bwd(x, w, dy, dx, dw, C, S, eps, accumulate, <float*>scratch)
        return
    _inv_rms(x, C, S, eps, inv)
    memset(dot, 0, S * sizeof(double))
    for c in range(C):
        wc = w[c]
        acc = 0.0
        for s in range(S):
            i = c * S + s
            dot[s] += <double>dy[i] * wc * x[i]
            acc += <double>dy[i] * x[i] * inv[s]
        if dw != NULL:           # NULL: a frozen norm weight
            dw[c] += <float>acc
    for s in range(S):
        # d/dx of x*inv: inv*g - x * inv^3 * (g.x) / C, with g = dy*w
        dot[s] = dot[s] * inv[s] * inv[s] * inv[s] / C
    for c in range(C):
        wc = w[c]
        for s in range(S):
            i = c * S + s
            if accumulate:
                dx[i] += <float>(inv[s] * wc * dy[i] - x[i] * dot[s])
            else:
                dx[i] = <float>(inv[s] * wc * dy[i] - x[i] * dot[s])


# ---------------------------------------------------------------------------------------
# RoPE. "interleaved" rotates rows (2i, 2i+1) of each head, "half" rows (i, i + hd/2);
# both use angle pos * theta^(-2i/hd), tabulated as cos/sin [hd/2, S].

cdef inline void _rope_rows(float* x, int n_heads, int hd, int S, const float* cos_t,
                            const float* sin_t, bint half, float sign) noexcept nogil:
    cdef Py_ssize_t h, i, s
    cdef float* r0
    cdef float* r1
    cdef const float* c
    cdef const float* sn
    cdef float a, b
    for h in range(n_heads):
        for i in range(hd // 2):
            if half:
                r0 = x + (h * hd + i) * S
                r1 = x + (h * hd + i + hd // 2) * S
            else:
                r0 = x + (h * hd + 2 * i) * S
                r1 = r0 + S
            c = cos_t + i * S
            sn = sin_t + i * S
            for s in range(S):
                a = r0[s]
                b = r1[s]
                r0[s] = a * c[s] - sign * b * sn[s]
                r1[s] = sign * a * sn[s] + b * c[s]


cdef void rope_fwd(float* x, int n_heads, int hd, int S, const float* cos_t, const float* sin_t,
                   bint half) noexcept nogil:
    _rope_rows(x, n_heads, hd, S, cos_t, sin_t, half, 1.0)


cdef void rope_bwd(float* dx, int n_heads, int hd, int S, const float* cos_t, const float* sin_t,
                   bint half) noexcept nogil:
    # the transpose of a rotation is the rotation by the opposite angle
    _rope_rows(dx, n_heads, hd, S, cos_t, sin_t, half, -1.0)


# ---------------------------------------------------------------------------------------
# SwiGLU

cdef void swiglu_fwd(const float* h1, const float* h3, float* gate, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        gate[i] = (h1[i] / (1.0 + anecy_expf(-h1[i]))) * h3[i]


cdef void swiglu_bwd(const float* h1, const float* h3, const float* dgate, float* dh1, float* dh3,
                     Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float sig, x
    for i in range(n):
        x = h1[i]
        sig = 1.0 / (1.0 + anecy_expf(-x))
        dh1[i] = dgate[i] * h3[i] * sig * (1.0 + x * (1.0 - sig))
        dh3[i] = dgate[i] * x * sig


# ---------------------------------------------------------------------------------------
# Causal softmax attention, one head at a time; scores go through sgemm.

cdef double sum_f64(const float* x, Py_ssize_t n) noexcept nogil:
    # four independent accumulators: the adds overlap instead of waiting on each other,
    # and the order (hence the result) is fixed
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        i += 4
    while i < n:
        a0 += x[i]
        i += 1
    return (a0 + a1) + (a2 + a3)


cdef float max_f32(const float* x, Py_ssize_t n) noexcept nogil:
    cdef float mx = x[0]
    cdef Py_ssize_t i
    for i in range(1, n):
        mx = x[i] if x[i] > mx else mx
    return mx


cdef void _causal_softmax(float* scores, int S, const int* key_start) noexcept nogil:
    # row i holds query i; keys j > i (and j < key_start[i]) are masked to exactly zero
    cdef Py_ssize_t i, j, j0 = 0
    cdef float* row
    cdef float mx, inv
    for i in range(S):
        row = scores + i * S
        if key_start != NULL:
            j0 = key_start[i]
            for j in range(j0):
                row[j] = 0.0
        mx = max_f32(row + j0, i + 1 - j0)
        for j in range(j0, i + 1):
            row[j] = anecy_expf(row[j] - mx)
        inv = <float>(1.0 / sum_f64(row + j0, i + 1 - j0))
        for j in range(j0, i + 1):
            row[j] *= inv
        for j in range(i + 1, S):
            row[j] = 0.0


# Causal attention is computed in CAUSAL_BLOCKS bands of query rows: band b (rows r0..r1)
# sees keys 0..r1 only, so the products skip most of the masked upper triangle
# (10/16 of the full work with four bands) while each sgemm stays large.
cdef enum:
    CAUSAL_BLOCKS = 4


cdef inline int _band(int b, int S) noexcept nogil:
    return (b * S) // CAUSAL_BLOCKS


cdef void _head_probs(const float* qh, const float* kh, float* probs, int hd,
                      int S, const int* key_start) noexcept nogil:
    # probs[i, j] = softmax_j(q_i . k_j / sqrt(hd)); entries right of a band stay unset
    # until _causal_softmax zeroes every j > i
    cdef int b, r0, r1
    for b in range(CAUSAL_BLOCKS):
        r0, r1 = _band(b, S), _band(b + 1, S)
        if r1 > r0:
            sgemm(1, 0, r1 - r0, r1, hd, <float>(1.0 / sqrt(hd)), qh + r0, S, kh, S, 0.0,
                  probs + <Py_ssize_t>r0 * S, S)
    _causal_softmax(probs, S, key_start)


cdef void _probs_times(const float* x, const float* probs, float* out, int hd, int S,
                       float alpha) noexcept nogil:
    # out[c, i] = alpha * sum_{j <= i} x[c, j] probs[i, j]   (probs zero above the diagonal)
    cdef int b, r0, r1
    for b in range(CAUSAL_BLOCKS):
        r0, r1 = _band(b, S), _band(b + 1, S)
        if r1 > r0:
            sgemm(0, 1, hd, r1 - r0, r1, alpha, x, S, probs + <Py_ssize_t>r0 * S, S, 0.0,
                  out + r0, S)


cdef void _times_probs(const float* x, const float* probs, float* out, int hd, int S,
                       float alpha) noexcept nogil:
    # out[c, j] = alpha * sum_{i >= j} x[c, i] probs[i, j]   (probs zero above the diagonal)
    cdef int b, c0, c1
    for b in range(CAUSAL_BLOCKS):
        c0, c1 = _band(b, S), _band(b + 1, S)
        if c1 > c0:
            sgemm(0, 0, hd, c1 - c0, S - c0, alpha, x + c0, S, probs + <Py_ssize_t>c0 * S + c0,
                  S, 0.0, out + c0, S)


cdef void attention_fwd(const float* q, const float* k, const float* v, float* out,
                        int n_heads, int n_kv_heads, int hd, int S, float* probs,
                        const int* key_start) noexcept nogil:
    cdef int h, g
    cdef int ratio = n_heads // n_kv_heads
    cdef Py_ssize_t block = <Py_ssize_t>hd * S
    cdef Py_ssize_t square = <Py_ssize_t>S * S
    for h in range(n_heads):
        g = h // ratio
        _head_probs(q + h * block, k + g * block, probs + h * square, hd, S, key_start)
        _probs_times(v + g * block, probs + h * square, out + h * block, hd, S, 1.0)


cdef void attention_bwd1(const float* q, const float* k_rep, const float* v_rep, const float* da,
                         float* dv_rep, float* probs, float* dprobs, int n_heads, int hd,
                         int S, bint probs_ready, const int* key_start) noexcept nogil:
    cdef int h
    cdef Py_ssize_t block = <Py_ssize_t>hd * S
    cdef Py_ssize_t square = <Py_ssize_t>S * S
    cdef float* ph
    for h in range(n_heads):
        ph = probs + h * square
        if not probs_ready:
            _head_probs(q + h * block, k_rep + h * block, ph, hd, S, key_start)
        # dprobs[i, j] = da_i . v_j
        sgemm(1, 0, S, S, hd, 1.0, da + h * block, S, v_rep + h * block, S, 0.0,
              dprobs + h * square, S)
        # dv[c, j] = sum_i da[c, i] probs[i, j]
        _times_probs(da + h * block, ph, dv_rep + h * block, hd, S, 1.0)


cdef void attention_bwd2(const float* probs, const float* dprobs, const float* q,
                         const float* k_rep, float* dq, float* dk_rep, int n_heads, int hd,
                         int S, float* scratch) noexcept nogil:
    cdef int h
    cdef Py_ssize_t i, j
    cdef Py_ssize_t block = <Py_ssize_t>hd * S
    cdef Py_ssize_t square = <Py_ssize_t>S * S
    cdef const float* p
    cdef const float* dp
    cdef float* ds
    cdef double rowdot
    cdef float scale = <float>(1.0 / sqrt(hd))
    for h in range(n_heads):
        # softmax backward: dS = P * (dP - rowsum(P * dP)); masked entries stay zero (those
        # left of a key start too: P is zero there)
        for i in range(S):
            p = probs + h * square + i * S
            dp = dprobs + h * square + i * S
            ds = scratch + i * S
            rowdot = 0.0
            for j in range(i + 1):
                rowdot += <double>p[j] * dp[j]
            for j in range(i + 1):
                ds[j] = p[j] * (dp[j] - <float>rowdot)
            for j in range(i + 1, S):
                ds[j] = 0.0
        _probs_times(k_rep + h * block, scratch, dq + h * block, hd, S, scale)
        _times_probs(q + h * block, scratch, dk_rep + h * block, hd, S, scale)


cdef void gqa_repeat(const float* src, float* dst, int n_heads, int n_kv_heads, int hd,
                     int S) noexcept nogil:
    cdef int h
    cdef int ratio = n_heads // n_kv_heads
    cdef Py_ssize_t block = <Py_ssize_t>hd * S
    for h in range(n_heads):
        memcpy(dst + h * block, src + (h // ratio) * block, block * sizeof(float))


cdef void gqa_reduce(const float* src, float* dst, int n_heads, int n_kv_heads, int hd,
                     int S) noexcept nogil:
    cdef int h, r
    cdef int ratio = n_heads // n_kv_heads
    cdef Py_ssize_t block = <Py_ssize_t>hd * S
    cdef Py_ssize_t i
    cdef float* d
    for h in range(n_kv_heads):
        d = dst + h * block
        memcpy(d, src + (h * ratio) * block, block * sizeof(float))
        for r in range(1, ratio):
            add_scaled(d, src + (h * ratio + r) * block, block, 1.0)


# ---------------------------------------------------------------------------------------
# Classifier loss, embedding, optimizer

cdef double softmax_xent(float* logits, const int* targets, int S, int V,
                         float grad_scale) noexcept nogil:
    cdef Py_ssize_t s, j
    cdef float* row
    cdef float mx, scale
    cdef double total, loss = 0.0
    if ANECY_ACCELERATE:
        return anecy_accel_softmax_xent(logits, targets, S, V, grad_scale)
    for s in range(S):
        row = logits + s * V
        mx = max_f32(row, V)
        loss -= row[targets[s]] - mx
        for j in range(V):
            row[j] = anecy_expf(row[j] - mx)
        total = sum_f64(row, V)
        loss += log(total)
        scale = <float>(grad_scale / total)
        for j in range(V):
            row[j] *= scale
        row[targets[s]] -= grad_scale
    return loss


cdef void embedding_fwd(const float* E, const int* tokens, float* x, int S, int D) noexcept nogil:
    cdef Py_ssize_t s, d
    cdef const float* row
    for s in range(S):
        row = E + <Py_ssize_t>tokens[s] * D
        for d in range(D):
            x[d * S + s] = row[d]


cdef void embedding_bwd(float* dE, const int* tokens, const float* dx, int S, int D) noexcept nogil:
    cdef Py_ssize_t s, d
    cdef float* row
    for s in range(S):
        row = dE + <Py_ssize_t>tokens[s] * D
        for d in range(D):
            row[d] += dx[d * S + s]


cdef bint adamw(float* p, float* g, float* m, float* v, Py_ssize_t n, double lr,
                double beta1, double beta2, double eps, double weight_decay, long step,
                double grad_scale, bint zero_grad) noexcept nogil:
    # The order of operations follows torch.optim.AdamW (decoupled decay first, lerp
    # for the first moment, bias corrections folded into the step size and denominator);
    # its constants are formed in double from the double hyperparameters, as torch does.
    # The finite check rides along: |p| + v is NaN or inf when p or v is (nothing cancels,
    # both terms are >= 0); m cannot go non-finite alone: that takes a gradient above
    # ~1e19 (or NaN), whose square makes v infinite (or NaN) in the same update. One
    # compare per element, OR-ed into an integer, keeps the loop vectorised.
    cdef Py_ssize_t i
    cdef float gi, pi, mi, vi
    cdef int nonfinite = 0
    cdef float gscale = <float>grad_scale
    cdef float decay = <float>(1.0 - lr * weight_decay)
    cdef float one_m_b1 = <float>(1.0 - beta1)
    cdef float b2 = <float>beta2
    cdef float one_m_b2 = <float>(1.0 - beta2)
    cdef float step_size = <float>(lr / (1.0 - beta1 ** step))
    cdef float bc2_sqrt = <float>sqrt(1.0 - beta2 ** step)
    cdef float epsf = <float>eps
    for i in range(n):
        gi = g[i] * gscale
        pi = p[i] * decay
        mi = m[i] + one_m_b1 * (gi - m[i])
        vi = v[i] * b2 + one_m_b2 * gi * gi
        pi = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + epsf)
        p[i] = pi
        m[i] = mi
        v[i] = vi
        nonfinite |= not (fabsf(pi) + vi <= FLT_MAX)
        if zero_grad:  # saves the separate pass over the gradients
            g[i] = 0.0
    return nonfinite != 0


cdef double sumsq(const float* x, Py_ssize_t n) noexcept nogil:
    # independent accumulators, as in sum_f64: a single chain is latency-bound
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        a0 += <double>x[i] * x[i]
        a1 += <double>x[i + 1] * x[i + 1]
        a2 += <double>x[i + 2] * x[i + 2]
        a3 += <double>x[i + 3] * x[i + 3]
        i += 4
    while i < n:
        a0 += <double>x[i] * x[i]
        i += 1
    return (a0 + a1) + (a2 + a3)


cdef void scale_copy(const float* src, float* dst, Py_ssize_t n, float alpha) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i] * alpha


cdef void add_scaled(float* dst, const float* src, Py_ssize_t n, float alpha) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] += src[i] * alpha


# =======================================================================================
# Python entry points for one-off Python-level work (the tests' py_* entry points to the
# loops above are in anecy._testing).

def _same_len(a, b, what):
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what}: source has {a.shape[0]} elements, destination {b.shape[0]}")


def f32_to_f16(const float[::1] src, uint16_t[::1] dst, bint simd=True):
    """Round float32 to float16 bits (round-to-nearest-even, as numpy.astype)."""
    _same_len(src, dst, "f32_to_f16")
    if src.shape[0] == 0:
        return
    with nogil:
        if simd:
            anecy_f32_to_f16(&src[0], &dst[0], src.shape[0])
        else:
            anecy_f32_to_f16_scalar(&src[0], &dst[0], src.shape[0])


def f16_to_f32(const uint16_t[::1] src, float[::1] dst, bint simd=True):
    """Widen float16 bits to float32 (exact)."""
    _same_len(src, dst, "f16_to_f32")
    if src.shape[0] == 0:
        return
    with nogil:
        if simd:
            anecy_f16_to_f32(&src[0], &dst[0], src.shape[0])
        else:
            anecy_f16_to_f32_scalar(&src[0], &dst[0], src.shape[0])


def f32_to_f16_transposed(const float[:, :] src, uint16_t[:, :] dst, bint simd=True):
    """dst[r, c] = float16 bits of src[c, r] (what weight staging does with a weight that
    a kernel reads transposed). Each array may have a row stride of its own, but its
    rows must be contiguous."""
    if src.shape[0] != dst.shape[1] or src.shape[1] != dst.shape[0]:
        raise ValueError(f"f32_to_f16_transposed: source {src.shape[0]}x{src.shape[1]} is "
                         f"not the transpose of destination {dst.shape[0]}x{dst.shape[1]}")
    if src.shape[0] == 0 or src.shape[1] == 0:
        return
    if src.strides[1] != sizeof(float) or dst.strides[1] != sizeof(uint16_t) \
            or src.strides[0] <= 0 or dst.strides[0] <= 0:
        raise ValueError("f32_to_f16_transposed: rows must be contiguous, in increasing "
                         "addresses")
    cdef size_t ld32 = src.strides[0] // sizeof(float), ld16 = dst.strides[0] // sizeof(uint16_t)
    cdef size_t rows = dst.shape[0], cols = dst.shape[1]
    with nogil:
        if simd:
            anecy_f32_to_f16_transposed(&src[0, 0], &dst[0, 0], rows, cols, ld32, ld16)
        else:
            anecy_f32_to_f16_transposed_scalar(&src[0, 0], &dst[0, 0], rows, cols, ld32, ld16)


def fp16_path():
    """The conversion path this CPU uses: f16c, neon or scalar."""
    return anecy_fp16_path().decode()


def rope_tables(int head_dim, int seq_len, double theta):
    """cos and sin tables [head_dim/2, seq_len], computed in float32 as HF does."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    pos = np.arange(seq_len, dtype=np.float32)
    angles = (inv_freq[:, None] * pos[None, :]).astype(np.float32)
    return (np.ascontiguousarray(np.cos(angles), np.float32),
            np.ascontiguousarray(np.sin(angles), np.float32))


# Whether RMSNorm and softmax/CE go through Accelerate (_accel.h): macOS builds.
ACCELERATE = bool(ANECY_ACCELERATE)
