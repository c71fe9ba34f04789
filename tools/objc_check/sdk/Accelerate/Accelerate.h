/* Stub of <Accelerate/Accelerate.h>: only the declarations anecy uses (anecy/_blas.h: BLAS
 * sgemm; anecy/_accel.h: vDSP and vForce), with the signatures of Apple's macOS SDK
 * (cblas_new.h with ACCELERATE_NEW_LAPACK and LP64 integers, vDSP.h, vForce.h). For
 * type-checking on machines without the SDK; nothing here is an implementation. */
#ifndef ANECY_STUB_ACCELERATE_H
#define ANECY_STUB_ACCELERATE_H

#define __LAPACK_int int

enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112, CblasConjTrans = 113 };
typedef enum CBLAS_ORDER CBLAS_ORDER;
typedef enum CBLAS_TRANSPOSE CBLAS_TRANSPOSE;

void cblas_sgemm(const enum CBLAS_ORDER ORDER, const enum CBLAS_TRANSPOSE TRANSA,
                 const enum CBLAS_TRANSPOSE TRANSB, const __LAPACK_int M, const __LAPACK_int N,
                 const __LAPACK_int K, const float ALPHA, const float *_Nullable A,
                 const __LAPACK_int LDA, const float *_Nullable B, const __LAPACK_int LDB,
                 const float BETA, float *_Nullable C, const __LAPACK_int LDC);

typedef unsigned long vDSP_Length;
typedef long vDSP_Stride;

extern void vDSP_vma(const float *__A, vDSP_Stride __IA, const float *__B, vDSP_Stride __IB,
                     const float *__C, vDSP_Stride __IC, float *__D, vDSP_Stride __ID,
                     vDSP_Length __N);
extern void vDSP_vsmsa(const float *__A, vDSP_Stride __IA, const float *__B,
                       const float *__C, float *__D, vDSP_Stride __ID, vDSP_Length __N);
extern void vDSP_vsma(const float *__A, vDSP_Stride __IA, const float *__B,
                      const float *__C, vDSP_Stride __IC, float *__D, vDSP_Stride __ID,
                      vDSP_Length __N);
extern void vDSP_vsmsb(const float *__A, vDSP_Stride __IA, const float *__B,
                       const float *__C, vDSP_Stride __IC, float *__D, vDSP_Stride __ID,
                       vDSP_Length __N);
extern void vDSP_vmul(const float *__A, vDSP_Stride __IA, const float *__B, vDSP_Stride __IB,
                      float *__C, vDSP_Stride __IC, vDSP_Length __N);
extern void vDSP_vsmul(const float *__A, vDSP_Stride __IA, const float *__B, float *__C,
                       vDSP_Stride __IC, vDSP_Length __N);
extern void vDSP_vadd(const float *__A, vDSP_Stride __IA, const float *__B, vDSP_Stride __IB,
                      float *__C, vDSP_Stride __IC, vDSP_Length __N);
extern void vDSP_vsadd(const float *__A, vDSP_Stride __IA, const float *__B, float *__C,
                       vDSP_Stride __IC, vDSP_Length __N);
extern void vDSP_dotpr(const float *__A, vDSP_Stride __IA, const float *__B, vDSP_Stride __IB,
                       float *__C, vDSP_Length __N);
extern void vDSP_sve(const float *__A, vDSP_Stride __I, float *__C, vDSP_Length __N);
extern void vDSP_maxv(const float *__A, vDSP_Stride __IA, float *__C, vDSP_Length __N);

extern void vvexpf(float *, const float *, const int *);
extern void vvrsqrtf(float *, const float *, const int *);

#endif
