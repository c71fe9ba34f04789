/* The vDSP/vForce functions _accel.h uses, as plain loops with Apple's signatures and
 * documented semantics, for platforms without Accelerate: there they let _accel.h's code
 * be built and tested against _ops' portable loops. Not used on macOS, and not what the
 * portable build runs (ANECY_ACCELERATE is 0 there).
 */
#ifndef ANECY_VDSP_PORTABLE_H
#define ANECY_VDSP_PORTABLE_H

#include <math.h>
#include <string.h>

typedef unsigned long vDSP_Length;
typedef long vDSP_Stride;

/* D = A * B + C */
static inline void vDSP_vma(const float *A, vDSP_Stride IA, const float *B, vDSP_Stride IB,
                            const float *C, vDSP_Stride IC, float *D, vDSP_Stride ID,
                            vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        D[i * ID] = A[i * IA] * B[i * IB] + C[i * IC];
}

/* D = A * b + c */
static inline void vDSP_vsmsa(const float *A, vDSP_Stride IA, const float *B, const float *C,
                              float *D, vDSP_Stride ID, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        D[i * ID] = A[i * IA] * B[0] + C[0];
}

/* D = A * b + C */
static inline void vDSP_vsma(const float *A, vDSP_Stride IA, const float *B, const float *C,
                             vDSP_Stride IC, float *D, vDSP_Stride ID, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        D[i * ID] = A[i * IA] * B[0] + C[i * IC];
}

/* D = A * b - C */
static inline void vDSP_vsmsb(const float *A, vDSP_Stride IA, const float *B, const float *C,
                              vDSP_Stride IC, float *D, vDSP_Stride ID, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        D[i * ID] = A[i * IA] * B[0] - C[i * IC];
}

/* C = A * B */
static inline void vDSP_vmul(const float *A, vDSP_Stride IA, const float *B, vDSP_Stride IB,
                             float *C, vDSP_Stride IC, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        C[i * IC] = A[i * IA] * B[i * IB];
}

/* C = A * b */
static inline void vDSP_vsmul(const float *A, vDSP_Stride IA, const float *B, float *C,
                              vDSP_Stride IC, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        C[i * IC] = A[i * IA] * B[0];
}

/* C = A + B */
static inline void vDSP_vadd(const float *A, vDSP_Stride IA, const float *B, vDSP_Stride IB,
                             float *C, vDSP_Stride IC, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        C[i * IC] = A[i * IA] + B[i * IB];
}

/* C = A + b */
static inline void vDSP_vsadd(const float *A, vDSP_Stride IA, const float *B, float *C,
                              vDSP_Stride IC, vDSP_Length N)
{
    for (vDSP_Length i = 0; i < N; i++)
        C[i * IC] = A[i * IA] + B[0];
}

/* Sums run in 8 lanes, as a vector implementation's would (the order, hence the rounding,
 * of Apple's is unspecified). */
#define ANECY_LANES 8

/* *C = sum A * B */
static inline void vDSP_dotpr(const float *A, vDSP_Stride IA, const float *B, vDSP_Stride IB,
                              float *C, vDSP_Length N)
{
    float lane[ANECY_LANES] = {0}, s = 0.0f;
    for (vDSP_Length i = 0; i < N; i++)
        lane[i % ANECY_LANES] += A[i * IA] * B[i * IB];
    for (int k = 0; k < ANECY_LANES; k++)
        s += lane[k];
    *C = s;
}

/* *C = sum A */
static inline void vDSP_sve(const float *A, vDSP_Stride IA, float *C, vDSP_Length N)
{
    float lane[ANECY_LANES] = {0}, s = 0.0f;
    for (vDSP_Length i = 0; i < N; i++)
        lane[i % ANECY_LANES] += A[i * IA];
    for (int k = 0; k < ANECY_LANES; k++)
        s += lane[k];
    *C = s;
}

/* *C = max A (-Inf when N is 0) */
static inline void vDSP_maxv(const float *A, vDSP_Stride IA, float *C, vDSP_Length N)
{
    float m = -INFINITY;
    for (vDSP_Length i = 0; i < N; i++)
        m = A[i * IA] > m ? A[i * IA] : m;
    *C = m;
}

/* y = exp(x), y = 1 / sqrt(x), over *n elements */
static inline void vvexpf(float *y, const float *x, const int *n)
{
    for (int i = 0; i < *n; i++)
        y[i] = expf(x[i]);
}

static inline void vvrsqrtf(float *y, const float *x, const int *n)
{
    for (int i = 0; i < *n; i++)
        y[i] = 1.0f / sqrtf(x[i]);
}

#endif
