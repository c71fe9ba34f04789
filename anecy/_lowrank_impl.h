/* The loops of _lowrank.h, compiled once per target: included with LR_ATTR (the target
 * attribute) and LR_NAME (the name suffix) defined. Not a header of its own.
 *
 * Every product is register-blocked the same way: up to LR_RB rows of the rank side are
 * held as lr_v8 accumulators (or broadcast coefficients) while one pass streams the wide
 * operand a vector of 8 positions at a time, so each load of the wide operand feeds up to
 * LR_RB fused multiply-adds. The accumulators are scalar-replaced into registers once the
 * row loops are unrolled, which they are for a block of LR_RB; a smaller last block runs
 * the same code with a run-time count. Positions past the last multiple of 8 run the same
 * sums one position at a time. */

/* x = drop(x) for element indices idx0 .. idx0+7 (threshold 0: x unchanged). Vectors go
 * by pointer here: by value, the baseline build would pass 32 bytes without AVX, whose ABI
 * GCC warns of even when the call is inlined. */
LR_ATTR static inline __attribute__((always_inline)) void
LR_NAME(anecy_lr_drop8)(lr_v8 *x, uint32_t idx0, uint32_t key, uint32_t threshold,
                        float keep_scale)
{
    if (!threshold)
        return;
    const lr_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    lr_v8i h = (lr_v8i){idx0, idx0, idx0, idx0, idx0, idx0, idx0, idx0} + lane;
    h ^= key;
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    const lr_v8m kept = (lr_v8m)(h >= threshold);
    *x = (lr_v8)((lr_v8m)(*x * keep_scale) & kept);
}

static inline float LR_NAME(anecy_lr_drop1)(float x, uint32_t idx, uint32_t key,
                                            uint32_t threshold, float keep_scale)
{
    if (!threshold)
        return x;
    return anecy_drop_hash(idx ^ key) >= threshold ? x * keep_scale : 0.0f;
}

/* the lanes of v summed in one fixed order */
LR_ATTR static inline __attribute__((always_inline)) float
LR_NAME(anecy_lr_hsum)(const lr_v8 *v)
{
    return (((*v)[0] + (*v)[1]) + ((*v)[2] + (*v)[3])) +
           (((*v)[4] + (*v)[5]) + ((*v)[6] + (*v)[7]));
}

/* out[r, S] = sum over k < K of coef[r * r_step + k * k_step] drop(w)[k, S], r < rb: the
 * rank side's rows as combinations of the wide operand's K rows. A x is coef = A (r_step
 * its row length, k_step 1), with dropout; B^T dy is coef = B (r_step 1, k_step R). */
LR_ATTR static inline __attribute__((always_inline)) void
LR_NAME(anecy_lr_rows_block)(const float *restrict coef, size_t r_step, size_t k_step, int rb,
                             int K, const float *restrict w, int S, float *restrict out,
                             uint32_t key, uint32_t threshold, float keep_scale)
{
    int s0 = 0;
    for (; s0 + 8 <= S; s0 += 8) {
        lr_v8 acc[LR_RB] = {0};
        for (int k = 0; k < K; k++) {
            lr_v8 wv = lr_load(w + (size_t)k * S + s0);
            LR_NAME(anecy_lr_drop8)(&wv, (uint32_t)k * (uint32_t)S + s0, key, threshold,
                                    keep_scale);
            const float *ck = coef + k * k_step;
#pragma GCC unroll 8
            for (int r = 0; r < rb; r++)
                acc[r] += ck[r * r_step] * wv;
        }
#pragma GCC unroll 8
        for (int r = 0; r < rb; r++)
            lr_store(out + (size_t)r * S + s0, acc[r]);
    }
    for (; s0 < S; s0++)
        for (int r = 0; r < rb; r++) {
            float t = 0.0f;
            for (int k = 0; k < K; k++)
                t += coef[r * r_step + k * k_step] *
                     LR_NAME(anecy_lr_drop1)(w[(size_t)k * S + s0],
                                             (uint32_t)k * (uint32_t)S + s0, key, threshold,
                                             keep_scale);
            out[(size_t)r * S + s0] = t;
        }
}

LR_ATTR static void LR_NAME(anecy_lr_down)(const float *restrict A, int R, int n_in,
                                           const float *restrict x, int S, float *restrict u,
                                           uint32_t key, uint32_t threshold, float keep_scale)
{
    int r0 = 0;
    for (; r0 + LR_RB <= R; r0 += LR_RB)
        LR_NAME(anecy_lr_rows_block)(A + (size_t)r0 * n_in, n_in, 1, LR_RB, n_in, x, S,
                                     u + (size_t)r0 * S, key, threshold, keep_scale);
    if (r0 < R)
        LR_NAME(anecy_lr_rows_block)(A + (size_t)r0 * n_in, n_in, 1, R - r0, n_in, x, S,
                                     u + (size_t)r0 * S, key, threshold, keep_scale);
}

/* y[n_out, S] += sum over r < rb of coef[o, r] u[r, S]; coef[o, r] = c * B[o * ldb + r] */
LR_ATTR static inline __attribute__((always_inline)) void
LR_NAME(anecy_lr_up_block)(const float *restrict B, int ldb, int rb, int n_out,
                           const float *restrict u, int S, float c, float *restrict y)
{
    for (int o = 0; o < n_out; o++) {
        float *restrict yo = y + (size_t)o * S;
        float b[LR_RB] = {0};
#pragma GCC unroll 8
        for (int r = 0; r < rb; r++)
            b[r] = c * B[(size_t)o * ldb + r];
        int s0 = 0;
        for (; s0 + 8 <= S; s0 += 8) {
            lr_v8 acc = lr_load(yo + s0);
#pragma GCC unroll 8
            for (int r = 0; r < rb; r++)
                acc += b[r] * lr_load(u + (size_t)r * S + s0);
            lr_store(yo + s0, acc);
        }
        for (; s0 < S; s0++)
            for (int r = 0; r < rb; r++)
                yo[s0] += b[r] * u[(size_t)r * S + s0];
    }
}

LR_ATTR static void LR_NAME(anecy_lr_up)(const float *restrict B, int R, int n_out,
                                         const float *restrict u, int S, float c,
                                         float *restrict y)
{
    int r0 = 0;
    for (; r0 + LR_RB <= R; r0 += LR_RB)
        LR_NAME(anecy_lr_up_block)(B + r0, R, LR_RB, n_out, u + (size_t)r0 * S, S, c, y);
    if (r0 < R)
        LR_NAME(anecy_lr_up_block)(B + r0, R, R - r0, n_out, u + (size_t)r0 * S, S, c, y);
}

/* out[r] = sum_s a[r, s] b[s] for r < rb (a's rows S apart), lanes then the tail */
LR_ATTR static inline __attribute__((always_inline)) void
LR_NAME(anecy_lr_dots)(const float *restrict a, int rb, const float *restrict b, int S,
                       float *restrict out)
{
    lr_v8 acc[LR_RB] = {0};
    int s0 = 0;
    for (; s0 + 8 <= S; s0 += 8) {
        const lr_v8 bv = lr_load(b + s0);
#pragma GCC unroll 8
        for (int r = 0; r < rb; r++)
            acc[r] += lr_load(a + (size_t)r * S + s0) * bv;
    }
#pragma GCC unroll 8
    for (int r = 0; r < rb; r++) {
        float t = LR_NAME(anecy_lr_hsum)(&acc[r]);
        for (int s = s0; s < S; s++)
            t += a[(size_t)r * S + s] * b[s];
        out[r] = t;
    }
}

/* v[rb, S] = B[:, r0 .. r0+rb)^T dy;  dB[:, r0 .. r0+rb) += c * dy u^T (dB NULL: v only) */
LR_ATTR static inline __attribute__((always_inline)) void
LR_NAME(anecy_lr_back_out_block)(const float *restrict B, int ldb, int rb, int n_out,
                                 const float *restrict dy, const float *restrict u, int S,
                                 float c, float *restrict v, float *restrict dB)
{
    LR_NAME(anecy_lr_rows_block)(B, 1, (size_t)ldb, rb, n_out, dy, S, v, 0, 0, 1.0f);
    if (dB == NULL)
        return;
    float dot[LR_RB] = {0};
    for (int o = 0; o < n_out; o++) {
        LR_NAME(anecy_lr_dots)(u, rb, dy + (size_t)o * S, S, dot);
#pragma GCC unroll 8
        for (int r = 0; r < rb; r++)
            dB[(size_t)o * ldb + r] += c * dot[r];
    }
}

LR_ATTR static void LR_NAME(anecy_lr_back_out)(const float *restrict B, int R, int n_out,
                                               const float *restrict dy,
                                               const float *restrict u, int S, float c,
                                               float *restrict v, float *restrict dB)
{
    /* without dB, u is not read (and may be NULL) */
    int r0 = 0;
    for (; r0 + LR_RB <= R; r0 += LR_RB)
        LR_NAME(anecy_lr_back_out_block)(B + r0, R, LR_RB, n_out, dy,
                                         dB ? u + (size_t)r0 * S : NULL, S, c,
                                         v + (size_t)r0 * S, dB ? dB + r0 : NULL);
    if (r0 < R)
        LR_NAME(anecy_lr_back_out_block)(B + r0, R, R - r0, n_out, dy,
                                         dB ? u + (size_t)r0 * S : NULL, S, c,
                                         v + (size_t)r0 * S, dB ? dB + r0 : NULL);
}

/* dx[k, S] += ck * mask * sum over r < rb of A[r, k] v[r, S], for one site's block of rows
 * (ck = c * keep_scale; the mask is the site's dropout, none with threshold 0) */
LR_ATTR static inline __attribute__((always_inline)) void
LR_NAME(anecy_lr_dx_block)(const float *restrict A, int n_in, int rb, int k,
                           const float *restrict v, int S, float ck, float *restrict dxk,
                           uint32_t key, uint32_t threshold)
{
    float a[LR_RB] = {0};
#pragma GCC unroll 8
    for (int r = 0; r < rb; r++)
        a[r] = A[(size_t)r * n_in + k];
    const uint32_t idx0 = (uint32_t)k * (uint32_t)S;
    int s0 = 0;
    for (; s0 + 8 <= S; s0 += 8) {
        lr_v8 t = (lr_v8){0};
#pragma GCC unroll 8
        for (int r = 0; r < rb; r++)
            t += a[r] * lr_load(v + (size_t)r * S + s0);
        /* the mask passes the gradient where the forward kept x (scaled by ck) */
        LR_NAME(anecy_lr_drop8)(&t, idx0 + s0, key, threshold, 1.0f);
        lr_store(dxk + s0, lr_load(dxk + s0) + ck * t);
    }
    for (; s0 < S; s0++) {
        float t = 0.0f;
        for (int r = 0; r < rb; r++)
            t += a[r] * v[(size_t)r * S + s0];
        dxk[s0] += ck * LR_NAME(anecy_lr_drop1)(t, idx0 + s0, key, threshold, 1.0f);
    }
}

/* the adapters of m sites that read one x (q, k, v; gate, up): row k of x (dropped as each
 * site's forward dropped it) meets every site's v for dA, then row k of dx gets every
 * site's A^T v, blocks of LR_RB rows at a time, sites in order */
LR_ATTR static void LR_NAME(anecy_lr_back_in)(int m, const float *const *A, const int *R,
                                              int n_in, const float *restrict x,
                                              const float *const *v, int S, float c,
                                              float *const *dA, float *restrict dx,
                                              float *restrict row, const uint32_t *key,
                                              uint32_t threshold, float keep_scale)
{
    float dot[LR_RB] = {0};
    for (int k = 0; k < n_in; k++) {
        const float *xrow = x + (size_t)k * S;
        const uint32_t idx0 = (uint32_t)k * (uint32_t)S;
        for (int j = 0; j < m; j++) {
            const float *xk = xrow;
            if (threshold) {
                int s0 = 0;
                for (; s0 + 8 <= S; s0 += 8) {
                    lr_v8 xv = lr_load(xrow + s0);
                    LR_NAME(anecy_lr_drop8)(&xv, idx0 + s0, key[j], threshold, keep_scale);
                    lr_store(row + s0, xv);
                }
                for (; s0 < S; s0++)
                    row[s0] = LR_NAME(anecy_lr_drop1)(xrow[s0], idx0 + s0, key[j], threshold,
                                                      keep_scale);
                xk = row;
            }
            int r0 = 0;
            for (; r0 + LR_RB <= R[j]; r0 += LR_RB) {
                LR_NAME(anecy_lr_dots)(v[j] + (size_t)r0 * S, LR_RB, xk, S, dot);
#pragma GCC unroll 8
                for (int r = 0; r < LR_RB; r++)
                    dA[j][(size_t)(r0 + r) * n_in + k] += c * dot[r];
            }
            if (r0 < R[j]) {
                LR_NAME(anecy_lr_dots)(v[j] + (size_t)r0 * S, R[j] - r0, xk, S, dot);
                for (int r = 0; r < R[j] - r0; r++)
                    dA[j][(size_t)(r0 + r) * n_in + k] += c * dot[r];
            }
        }
        if (dx == NULL)
            continue;
        float *restrict dxk = dx + (size_t)k * S;
        for (int j = 0; j < m; j++) {
            int r0 = 0;
            for (; r0 + LR_RB <= R[j]; r0 += LR_RB)
                LR_NAME(anecy_lr_dx_block)(A[j] + (size_t)r0 * n_in, n_in, LR_RB, k,
                                           v[j] + (size_t)r0 * S, S, c * keep_scale, dxk,
                                           key[j], threshold);
            if (r0 < R[j])
                LR_NAME(anecy_lr_dx_block)(A[j] + (size_t)r0 * n_in, n_in, R[j] - r0, k,
                                           v[j] + (size_t)r0 * S, S, c * keep_scale, dxk,
                                           key[j], threshold);
        }
    }
}
