/* RMSNorm forward/backward and softmax cross-entropy through Accelerate (vDSP, vForce).
 *
 * On macOS _ops.pyx calls these instead of its portable loops (ANECY_ACCELERATE is 1).
 * Elsewhere the same code is built over _vdsp_portable.h, plain loops with the documented
 * semantics and the signatures of the vDSP/vForce functions used here, so that this
 * file's algebra is tested on every platform against the portable code (tests/test_accel.py);
 * the Accelerate declarations themselves are checked against a stub SDK by
 * tools/objc_check/check.sh. Everything is fp32; sums are fp32 too (vDSP's), so results
 * agree with the portable code (double sums) to fp32 rounding, not bit for bit.
 *
 * Layout as in _ops.pxd: activations [C, S] channel-first; scratch holds 4*S floats.
 */
#ifndef ANECY_ACCEL_H
#define ANECY_ACCEL_H

#include <math.h>
#include <string.h>

#if defined(__APPLE__)
#include <Accelerate/Accelerate.h>
#define ANECY_ACCELERATE 1
#else
#include "_vdsp_portable.h"
#define ANECY_ACCELERATE 0
#endif

/* inv[s] = 1 / sqrt(mean_c x[c, s]^2 + eps) */
static inline void anecy_accel_inv_rms(const float *x, int C, int S, float eps, float *inv)
{
    vDSP_Length n = (vDSP_Length)S;
    float inv_c = 1.0f / (float)C;
    int count = S, c;
    memset(inv, 0, (size_t)S * sizeof(float));
    for (c = 0; c < C; c++)
        vDSP_vma(x + (size_t)c * S, 1, x + (size_t)c * S, 1, inv, 1, inv, 1, n);
    vDSP_vsmsa(inv, 1, &inv_c, &eps, inv, 1, n);
    vvrsqrtf(inv, inv, &count);
}

/* y[c, s] = x[c, s] * inv[s] * w[c] */
static inline void anecy_accel_rmsnorm_fwd(const float *x, const float *w, float *y, int C,
                                           int S, float eps, float *scratch)
{
    vDSP_Length n = (vDSP_Length)S;
    int c;
    anecy_accel_inv_rms(x, C, S, eps, scratch);
    for (c = 0; c < C; c++) {
        vDSP_vmul(x + (size_t)c * S, 1, scratch, 1, y + (size_t)c * S, 1, n);
        vDSP_vsmul(y + (size_t)c * S, 1, w + c, y + (size_t)c * S, 1, n);
    }
}

/* dx (= or +=) inv*w*dy - x * inv^3 * (sum_c dy*w*x) / C ; dw[c] += sum_s dy*x*inv */
static inline void anecy_accel_rmsnorm_bwd(const float *x, const float *w, const float *dy,
                                           float *dx, float *dw, int C, int S, float eps,
                                           int accumulate, float *scratch)
{
    vDSP_Length n = (vDSP_Length)S;
    float *inv = scratch, *dot = scratch + S, *t = scratch + 2 * (size_t)S;
    float *u = scratch + 3 * (size_t)S;
    float inv_c = 1.0f / (float)C, r;
    int c;
    anecy_accel_inv_rms(x, C, S, eps, inv);
    memset(dot, 0, (size_t)S * sizeof(float));
    for (c = 0; c < C; c++) {
        const float *xc = x + (size_t)c * S, *dyc = dy + (size_t)c * S;
        vDSP_vmul(dyc, 1, xc, 1, t, 1, n);          /* t = dy * x */
        vDSP_vsma(t, 1, w + c, dot, 1, dot, 1, n);   /* dot += w[c] * t */
        if (dw) {                                    /* NULL: a frozen norm weight */
            vDSP_dotpr(t, 1, inv, 1, &r, n);
            dw[c] += r;
        }
    }
    vDSP_vmul(dot, 1, inv, 1, dot, 1, n);            /* dot *= inv^3 / C */
    vDSP_vmul(dot, 1, inv, 1, dot, 1, n);
    vDSP_vmul(dot, 1, inv, 1, dot, 1, n);
    vDSP_vsmul(dot, 1, &inv_c, dot, 1, n);
    for (c = 0; c < C; c++) {
        const float *xc = x + (size_t)c * S, *dyc = dy + (size_t)c * S;
        float *dxc = dx + (size_t)c * S;
        vDSP_vmul(dyc, 1, inv, 1, t, 1, n);          /* t = inv * dy */
        vDSP_vmul(xc, 1, dot, 1, u, 1, n);           /* u = x * dot */
        if (accumulate) {
            vDSP_vsmsb(t, 1, w + c, u, 1, t, 1, n);  /* t = t * w[c] - u */
            vDSP_vadd(dxc, 1, t, 1, dxc, 1, n);
        } else {
            vDSP_vsmsb(t, 1, w + c, u, 1, dxc, 1, n);
        }
    }
}

/* Each row of logits[S, V] becomes (softmax - onehot(target)) * grad_scale; returns the
 * summed cross-entropy (in double, as the portable code). */
static inline double anecy_accel_softmax_xent(float *logits, const int *targets, int S, int V,
                                              float grad_scale)
{
    vDSP_Length n = (vDSP_Length)V;
    double loss = 0.0;
    int s, count = V;
    for (s = 0; s < S; s++) {
        float *row = logits + (size_t)s * V;
        float mx, neg, total, scale;
        vDSP_maxv(row, 1, &mx, n);
        loss -= (double)(row[targets[s]] - mx);
        neg = -mx;
        vDSP_vsadd(row, 1, &neg, row, 1, n);
        vvexpf(row, row, &count);
        vDSP_sve(row, 1, &total, n);
        loss += log((double)total);
        scale = grad_scale / total;
        vDSP_vsmul(row, 1, &scale, row, 1, n);
        row[targets[s]] -= grad_scale;
    }
    return loss;
}

#endif
