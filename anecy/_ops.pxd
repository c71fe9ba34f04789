# Numeric kernels shared by every backend. All activations are channel-first
# [C, S] row-major fp32 (C channels, S positions); every function here runs without
# the GIL and allocates nothing: callers pass the scratch they own.

cdef void sgemm(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                const float* A, int lda, const float* B, int ldb, float beta,
                float* C, int ldc) noexcept nogil

# y[C,S] = x * rsqrt(mean_c x^2 + eps) * w.   scratch: S doubles
cdef void rmsnorm_fwd(const float* x, const float* w, float* y, int C, int S, float eps,
                      double* scratch) noexcept nogil
# dx[C,S] (= or +=) d/dx, dw[C] += d/dw (dw NULL: skipped), for dy[C,S].   scratch: 2*S doubles
cdef void rmsnorm_bwd(const float* x, const float* w, const float* dy, float* dx, float* dw,
                      int C, int S, float eps, bint accumulate, double* scratch) noexcept nogil

# In-place rotation of x[n_heads*hd, S]; cos/sin tables are [hd/2, S].
cdef void rope_fwd(float* x, int n_heads, int hd, int S, const float* cos_t, const float* sin_t,
                   bint half) noexcept nogil
cdef void rope_bwd(float* dx, int n_heads, int hd, int S, const float* cos_t, const float* sin_t,
                   bint half) noexcept nogil

# gate = silu(h1) * h3, elementwise over n
cdef void swiglu_fwd(const float* h1, const float* h3, float* gate, Py_ssize_t n) noexcept nogil
cdef void swiglu_bwd(const float* h1, const float* h3, const float* dgate, float* dh1, float* dh3,
                     Py_ssize_t n) noexcept nogil

# Causal attention, head h of q[n_heads*hd, S] reads kv head h // (n_heads // n_kv_heads).
# out[n_heads*hd, S]; probs[h*S + i, j] is left holding the attention probabilities.
# key_start[S] (or NULL: 0 for every query): query i attends keys key_start[i]..i only
# (several examples packed in one window, each attending within itself).
cdef void attention_fwd(const float* q, const float* k, const float* v, float* out,
                        int n_heads, int n_kv_heads, int hd, int S, float* probs,
                        const int* key_start) noexcept nogil
# probs[h*S + i, j] (query i, key j) and dprobs = da_h^T v_h; dv[Q,S] = da_h @ probs_h.
# k and v are already repeated to n_heads heads; probs_ready: probs already holds them.
cdef void attention_bwd1(const float* q, const float* k_rep, const float* v_rep, const float* da,
                         float* dv_rep, float* probs, float* dprobs, int n_heads, int hd,
                         int S, bint probs_ready, const int* key_start) noexcept nogil
# dq[Q,S], dk_rep[Q,S] from probs and dprobs.   scratch: S*S floats
cdef void attention_bwd2(const float* probs, const float* dprobs, const float* q,
                         const float* k_rep, float* dq, float* dk_rep, int n_heads, int hd,
                         int S, float* scratch) noexcept nogil

# dst[n_heads*hd, S] <- src[n_kv*hd, S] (HF repeat_kv); reduce sums the group back.
cdef void gqa_repeat(const float* src, float* dst, int n_heads, int n_kv_heads, int hd,
                     int S) noexcept nogil
cdef void gqa_reduce(const float* src, float* dst, int n_heads, int n_kv_heads, int hd,
                     int S) noexcept nogil

# logits[S,V] -> dlogits in place (softmax - onehot) * grad_scale; returns the summed loss.
cdef double softmax_xent(float* logits, const int* targets, int S, int V,
                         float grad_scale) noexcept nogil

# x[D,S] column s = E[tokens[s], :];  dE[tokens[s], :] += dx[:, s]
cdef void embedding_fwd(const float* E, const int* tokens, float* x, int S, int D) noexcept nogil
cdef void embedding_bwd(float* dE, const int* tokens, const float* dx, int S, int D) noexcept nogil

# One AdamW update (PyTorch's formula) of n parameters; grads are multiplied by grad_scale
# and, with zero_grad, cleared as they are read. True when a parameter or moment came out
# NaN or infinite (checked in the same pass).
cdef bint adamw(float* p, float* g, float* m, float* v, Py_ssize_t n, double lr,
                double beta1, double beta2, double eps, double weight_decay, long step,
                double grad_scale, bint zero_grad) noexcept nogil
cdef double sumsq(const float* x, Py_ssize_t n) noexcept nogil
cdef double sum_f64(const float* x, Py_ssize_t n) noexcept nogil
cdef void scale_copy(const float* src, float* dst, Py_ssize_t n, float alpha) noexcept nogil
cdef void add_scaled(float* dst, const float* src, Py_ssize_t n, float alpha) noexcept nogil
