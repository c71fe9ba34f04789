/* The rank-R products of a LoRA adapter, y = W0 x + c B (A drop(x)), for the cpu backend.
 *
 * With R (8, 16) rows on one side these products are thin: through BLAS each call was
 * threaded, and the threads' start and stop cost more than the arithmetic (a [2048, 8] x
 * [8, 256] product took 29 ms on two loaded cores, 0.8 ms on one). Here they are plain
 * loops over the S positions, one pass over the wide operand each, vectorised by the
 * compiler (AVX2 + FMA when the CPU has them, chosen once at run time). Every output
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

/* u[R, S] = A drop(x)   (row: S floats of scratch, used with dropout) */
static inline void anecy_lora_down(const float *A, int R, int n_in, const float *x, int S,
                                   float *u, float *row, uint32_t key, uint32_t threshold,
                                   float keep_scale)
{
    LR_DISPATCH(anecy_lr_down, A, R, n_in, x, S, u, row, key, threshold, keep_scale);
}

/* y[n_out, S] += c * B u */
static inline void anecy_lora_up(const float *B, int R, int n_out, const float *u, int S,
                                 float c, float *y)
{
    LR_DISPATCH(anecy_lr_up, B, R, n_out, u, S, c, y);
}

/* v[R, S] = B^T dy;  dB[n_out, R] += c * dy u^T */
static inline void anecy_lora_back_out(const float *B, int R, int n_out, const float *dy,
                                       const float *u, int S, float c, float *v, float *dB)
{
    LR_DISPATCH(anecy_lr_back_out, B, R, n_out, dy, u, S, c, v, dB);
}

/* For each of m sites j reading one x: dA_j[R_j, n_in] += c * v_j drop_j(x)^T and
 * dx[n_in, S] += c * mask_j * keep_scale * (A_j^T v_j), sites in order (dx NULL: skipped);
 * one pass over x and dx for all m.   rows: 2 S floats of scratch */
static inline void anecy_lora_back_in(int m, const float *const *A, const int *R, int n_in,
                                      const float *x, const float *const *v, int S, float c,
                                      float *const *dA, float *dx, float *rows,
                                      const uint32_t *key, uint32_t threshold,
                                      float keep_scale)
{
    LR_DISPATCH(anecy_lr_back_in, m, A, R, n_in, x, v, S, c, dA, dx, rows, key, threshold,
                keep_scale);
}

#endif
