/* The loops of _lowrank.h, compiled once per target: included with LR_ATTR (the target
 * attribute) and LR_NAME (the name suffix) defined. Not a header of its own. */

/* out[s] = x[s] * keep_scale where element idx0 + s is kept, else 0 */
LR_ATTR static void LR_NAME(anecy_lr_dropped)(const float *restrict x, float *restrict out,
                                              int S, uint32_t idx0, uint32_t key,
                                              uint32_t threshold, float keep_scale)
{
    for (int s = 0; s < S; s++)
        out[s] = anecy_drop_hash((idx0 + (uint32_t)s) ^ key) >= threshold ? x[s] * keep_scale
                                                                          : 0.0f;
}

/* sum a[i] b[i] in 16 lanes, then the lanes in order: one fixed summation order */
LR_ATTR static float LR_NAME(anecy_lr_dot)(const float *restrict a, const float *restrict b,
                                           int n)
{
    float lane[16] = {0};
    float t = 0.0f;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++)
            lane[j] += a[i + j] * b[i + j];
    for (int j = 0; j < 16; j++)
        t += lane[j];
    for (; i < n; i++)
        t += a[i] * b[i];
    return t;
}

LR_ATTR static void LR_NAME(anecy_lr_down)(const float *restrict A, int R, int n_in,
                                           const float *restrict x, int S, float *restrict u,
                                           float *restrict row, uint32_t key,
                                           uint32_t threshold, float keep_scale)
{
    memset(u, 0, sizeof(float) * (size_t)R * S);
    for (int k = 0; k < n_in; k++) {
        const float *xk = x + (size_t)k * S;
        if (threshold) {
            LR_NAME(anecy_lr_dropped)(xk, row, S, (uint32_t)k * (uint32_t)S, key, threshold,
                                      keep_scale);
            xk = row;
        }
        for (int r = 0; r < R; r++) {
            const float a = A[(size_t)r * n_in + k];
            float *restrict ur = u + (size_t)r * S;
            for (int s = 0; s < S; s++)
                ur[s] += a * xk[s];
        }
    }
}

LR_ATTR static void LR_NAME(anecy_lr_up)(const float *restrict B, int R, int n_out,
                                         const float *restrict u, int S, float c,
                                         float *restrict y)
{
    for (int o = 0; o < n_out; o++) {
        float *restrict yo = y + (size_t)o * S;
        for (int r = 0; r < R; r++) {
            const float b = c * B[(size_t)o * R + r];
            const float *restrict ur = u + (size_t)r * S;
            for (int s = 0; s < S; s++)
                yo[s] += b * ur[s];
        }
    }
}

LR_ATTR static void LR_NAME(anecy_lr_back_out)(const float *restrict B, int R, int n_out,
                                               const float *restrict dy,
                                               const float *restrict u, int S, float c,
                                               float *restrict v, float *restrict dB)
{
    memset(v, 0, sizeof(float) * (size_t)R * S);
    for (int o = 0; o < n_out; o++) {
        const float *restrict g = dy + (size_t)o * S;
        for (int r = 0; r < R; r++) {
            const float b = B[(size_t)o * R + r];
            float *restrict vr = v + (size_t)r * S;
            for (int s = 0; s < S; s++)
                vr[s] += b * g[s];
            dB[(size_t)o * R + r] += c * LR_NAME(anecy_lr_dot)(g, u + (size_t)r * S, S);
        }
    }
}

/* the adapters of m sites that read one x (q, k, v; gate, up): one pass over x and dx */
LR_ATTR static void LR_NAME(anecy_lr_back_in)(int m, const float *const *A, const int *R,
                                              int n_in, const float *restrict x,
                                              const float *const *v, int S, float c,
                                              float *const *dA, float *restrict dx,
                                              float *restrict rows, const uint32_t *key,
                                              uint32_t threshold, float keep_scale)
{
    float *restrict dropped = rows, *restrict t = rows + S;
    for (int k = 0; k < n_in; k++) {
        const float *xrow = x + (size_t)k * S;
        const uint32_t idx0 = (uint32_t)k * (uint32_t)S;
        float *restrict dxk = dx == NULL ? NULL : dx + (size_t)k * S;
        for (int j = 0; j < m; j++) {
            const float *restrict Aj = A[j];
            const float *restrict vj = v[j];
            float *restrict dAj = dA[j];
            const float *xk = xrow;
            if (threshold) {
                LR_NAME(anecy_lr_dropped)(xrow, dropped, S, idx0, key[j], threshold,
                                          keep_scale);
                xk = dropped;
            }
            for (int r = 0; r < R[j]; r++)
                dAj[(size_t)r * n_in + k] += c * LR_NAME(anecy_lr_dot)(vj + (size_t)r * S, xk,
                                                                       S);
            if (dxk == NULL)
                continue;
            if (!threshold) {
                for (int r = 0; r < R[j]; r++) {
                    const float a = c * Aj[(size_t)r * n_in + k];
                    const float *restrict vr = vj + (size_t)r * S;
                    for (int s = 0; s < S; s++)
                        dxk[s] += a * vr[s];
                }
                continue;
            }
            /* through the dropout: t = A^T v at row k, passed where the mask kept x */
            memset(t, 0, sizeof(float) * (size_t)S);
            for (int r = 0; r < R[j]; r++) {
                const float a = Aj[(size_t)r * n_in + k];
                const float *restrict vr = vj + (size_t)r * S;
                for (int s = 0; s < S; s++)
                    t[s] += a * vr[s];
            }
            const float ck = c * keep_scale;
            for (int s = 0; s < S; s++)
                if (anecy_drop_hash((idx0 + (uint32_t)s) ^ key[j]) >= threshold)
                    dxk[s] += ck * t[s];
        }
    }
}
