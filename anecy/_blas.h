/* Row-major single-precision GEMM for anecy's nogil kernels.
 *
 * On macOS the Accelerate framework's cblas_sgemm is called directly. Elsewhere
 * the Fortran sgemm of the OpenBLAS that SciPy's wheels bundle is used: its
 * address is taken once, at import, from scipy.linalg.cython_blas and stored in
 * anecy_fortran_sgemm (see _ops.pyx). A row-major C = op(A) op(B) is the
 * column-major C^T = op(B)^T op(A)^T, so the operands swap places.
 */
#ifndef ANECY_BLAS_H
#define ANECY_BLAS_H

#ifdef __APPLE__
#define ACCELERATE_NEW_LAPACK 1
#include <Accelerate/Accelerate.h>
#define ANECY_BLAS_NAME "Accelerate"
#else
#define ANECY_BLAS_NAME "OpenBLAS (SciPy)"
#endif

typedef void (*anecy_fortran_sgemm_t)(char *transa, char *transb, int *m, int *n, int *k,
                                      float *alpha, float *a, int *lda, float *b, int *ldb,
                                      float *beta, float *c, int *ldc);

static anecy_fortran_sgemm_t anecy_fortran_sgemm = 0;

static inline void anecy_set_fortran_sgemm(void *fn) { anecy_fortran_sgemm = (anecy_fortran_sgemm_t)fn; }
static inline int anecy_blas_ready(void) {
#ifdef __APPLE__
    return 1;
#else
    return anecy_fortran_sgemm != 0;
#endif
}

/* C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, all row-major. */
static inline void anecy_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                               const float *A, int lda, const float *B, int ldb, float beta,
                               float *C, int ldc) {
#ifdef __APPLE__
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    anecy_fortran_sgemm(&tb, &ta, &N, &M, &K, &alpha, (float *)B, &ldb, (float *)A, &lda,
                        &beta, C, &ldc);
#endif
}

#endif
