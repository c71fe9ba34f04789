/* The rank-R products of a LoRA adapter, y = W0 x + c B (A drop(x)), for the cpu backend.
 *
 * With R (8, 16) rows on one side these products are thin: through BLAS each call was
 * threaded, and the threads' start and stop cost more than the arithmetic (a [2048, 8] x
 * [8, 256] product took 29 ms on two loaded cores, 0.8 ms on one). Here they are loops
 * written for it: up to 8 rows of the rank side stay in registers while one pass streams
 * the wide operand 8 positions at a time (_lowrank_impl.h), compiled for AVX2 + FMA when
 * the CPU has them (chosen once at run time) and for the baseline otherwise. Every output
 * element is computed in one fixed order, so results repeat exactly.
 *
 * All activations are channel-first [C, S] row-major; A is [R, n_in], B [n_out, R].
 * Dropout (PEFT's lora_dropout, on the adapter's input only): element i of x [n_in, S]
 * (i = k * S + s) is kept when anecy_drop_hash(i ^ key) >= threshold, and then scaled by
 * keep_scale = 1 / (1 - p); threshold 0 means no dropout. The mask is a function of the
 * key, so the backward recomputes it instead of storing it.
 */
#ifndef ANECY_LOWRANK_H
#define ANECY_LOWRANK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* lowbias32 (a 32-bit integer hash with good avalanche), for the dropout mask */
static inline uint32_t anecy_drop_hash(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* 8 floats (two SSE or NEON registers, one AVX register), the lanes of every loop below;
 * casts between these vector types reinterpret the bits */
typedef float lr_v8 __attribute__((vector_size(32)));
typedef uint32_t lr_v8i __attribute__((vector_size(32)));
typedef int32_t lr_v8m __attribute__((vector_size(32)));
/* the same, at any float's address and aliasing float arrays: for loads and stores */
typedef float lr_v8u __attribute__((vector_size(32), aligned(4), may_alias));
#define lr_load(p) (*(const lr_v8u *)(p))
#define lr_store(p, v) (*(lr_v8u *)(p) = (v))
/* rows of the rank side held in registers at once */
#define LR_RB 8

#if defined(__x86_64__) && defined(__GNUC__)
#define ANECY_LOWRANK_X86 1
#include <cpuid.h>
#define LR_ATTR __attribute__((target("avx2,fma")))
#define LR_NAME(name) name##_avx2
#include "_lowrank_impl.h"
#undef LR_ATTR
#undef LR_NAME
#endif

#define LR_ATTR
#define LR_NAME(name) name##_base
#include "_lowrank_impl.h"
#undef LR_ATTR
#undef LR_NAME

/* Racing threads all store the same value, so the race is benign. */
static int anecy_lowrank_choice = -1;

static inline int anecy_lowrank_avx2(void)
{
    int c = anecy_lowrank_choice;
    if (c >= 0)
        return c;
    c = 0;
#ifdef ANECY_LOWRANK_X86
    __builtin_cpu_init();
    c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    anecy_lowrank_choice = c;
    return c;
}

/* which loops run from now on: 1 AVX2 + FMA (where the CPU has them), 0 the portable
 * ones, -1 as the CPU decides (for tests of both on one machine) */
static inline void anecy_lowrank_choose(int avx2)
{
    anecy_lowrank_choice = -1;
    if (avx2 != 0 && anecy_lowrank_avx2() == 0)
        return;
    if (avx2 >= 0)
        anecy_lowrank_choice = avx2 ? 1 : 0;
}

static inline const char *anecy_lowrank_path(void)
{
    return anecy_lowrank_avx2() ? "avx2+fma" : "portable";
}

#ifdef ANECY_LOWRANK_X86
#define LR_DISPATCH(name, ...) \
    do { if (anecy_lowrank_avx2()) name##_avx2(__VA_ARGS__); else name##_base(__VA_ARGS__); } while (0)
#else
#define LR_DISPATCH(name, ...) name##_base(__VA_ARGS__)
#endif

/* u[R, S] = A drop(x) */
static inline void anecy_lora_down(const float *A, int R, int n_in, const float *x, int S,
                                   float *u, uint32_t key, uint32_t threshold,
                                   float keep_scale)
{
    LR_DISPATCH(anecy_lr_down, A, R, n_in, x, S, u, key, threshold, keep_scale);
}

/* y[n_out, S] += c * B u */
static inline void anecy_lora_up(const float *B, int R, int n_out, const float *u, int S,
                                 float c, float *y)
{
    LR_DISPATCH(anecy_lr_up, B, R, n_out, u, S, c, y);
}

/* v[R, S] = B^T dy;  dB[n_out, R] += c * dy u^T (dB NULL: v alone, and u is not read) */
static inline void anecy_lora_back_out(const float *B, int R, int n_out, const float *dy,
                                       const float *u, int S, float c, float *v, float *dB)
{
    LR_DISPATCH(anecy_lr_back_out, B, R, n_out, dy, u, S, c, v, dB);
}

/* For each of m sites j reading one x: dA_j[R_j, n_in] += c * v_j drop_j(x)^T and
 * dx[n_in, S] += c * mask_j * keep_scale * (A_j^T v_j), sites in order (dx NULL: skipped);
 * one pass over x and dx for all m.   row: S floats of scratch (used with dropout) */
static inline void anecy_lora_back_in(int m, const float *const *A, const int *R, int n_in,
                                      const float *x, const float *const *v, int S, float c,
                                      float *const *dA, float *dx, float *row,
                                      const uint32_t *key, uint32_t threshold,
                                      float keep_scale)
{
    LR_DISPATCH(anecy_lr_back_in, m, A, R, n_in, x, v, S, c, dA, dx, row, key, threshold,
                keep_scale);
}

#endif
