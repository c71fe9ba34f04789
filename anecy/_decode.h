/* Kernels of the compiled decoder (_decode.pyx): row dot products and a spin barrier.
 *
 * A decoded token is a chain of matrix-vector products whose rows are split among the
 * decoding threads. Each row's dot product is summed in one fixed order (ANECY_LANES
 * partial sums over the row, added in a fixed tree, then the tail), whichever thread
 * computes it, so the logits are bit-identical for any number of threads. BLAS's sgemv
 * gives no such promise, and its threads wake for every product.
 *
 * On x86-64 Linux the row kernel is compiled for AVX-512, AVX2+FMA and the baseline, and
 * the loader picks the one the CPU runs (GCC's target_clones): the wide units do the same
 * sums in the same order (FMA rounds each product-add once, so results can differ between
 * machines, never between threads).
 */
#ifndef ANECY_DECODE_H
#define ANECY_DECODE_H

#include <sched.h>

#define ANECY_LANES 32   /* partial sums per row: four vectors of eight */

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define ANECY_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ANECY_ROW_CLONES
#endif

/* eight floats, loaded from any float address (GCC and clang lower them to the target's
 * vectors: two SSE registers on the baseline, one AVX register above) */
typedef float anecy_v8 __attribute__((vector_size(32), aligned(4), may_alias));

/* The fixed-order sum of a row's partial sums: the four vectors pairwise, then the lanes. */
static inline float anecy_v8_total(anecy_v8 s0, anecy_v8 s1, anecy_v8 s2, anecy_v8 s3) {
    anecy_v8 s = (s0 + s2) + (s1 + s3);
    float l[8];
    __builtin_memcpy(l, &s, sizeof l);
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* y[r] = W[r, :n] . x for rows r0 <= r < r1 of the row-major W (row r at W + r * ld);
 * with `accumulate`, y[r] += scale * (W[r] . x) instead (a residual add). One row after
 * the other, so the weights stream from memory in a single sequential run: reading two or
 * four rows at a time (sharing each load of x) measured 1.5-1.7 times slower here. */
ANECY_ROW_CLONES
static void anecy_matvec_rows(const float *W, long ld, const float *x, float *y, long r0,
                              long r1, int n, int accumulate, float scale) {
    const int body = n - n % ANECY_LANES;
    for (long r = r0; r < r1; r++) {
        const float *a = W + r * ld;
        anecy_v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int i = 0; i < body; i += ANECY_LANES) {
            s0 += *(const anecy_v8 *)(a + i) * *(const anecy_v8 *)(x + i);
            s1 += *(const anecy_v8 *)(a + i + 8) * *(const anecy_v8 *)(x + i + 8);
            s2 += *(const anecy_v8 *)(a + i + 16) * *(const anecy_v8 *)(x + i + 16);
            s3 += *(const anecy_v8 *)(a + i + 24) * *(const anecy_v8 *)(x + i + 24);
        }
        float dot = anecy_v8_total(s0, s1, s2, s3);
        for (int i = body; i < n; i++) dot += a[i] * x[i];
        if (accumulate) y[r] += scale * dot;
        else y[r] = dot;
    }
}

/* The same products over int8 weights (llama.cpp's q8_0 layout, with fp32 scales): row r's
 * weights are Q[r, :n] * S[r, i / ANECY_Q8_BLOCK] (row r at Q + r * ldq, its scales at
 * S + r * lds). Each weight is widened to float and scaled, then summed in the fp32
 * kernel's order, so the result does not depend on the thread count either. */
#define ANECY_Q8_BLOCK 32

ANECY_ROW_CLONES
static void anecy_matvec_rows_q8(const signed char *Q, long ldq, const float *S, long lds,
                                 const float *x, float *y, long r0, long r1, int n,
                                 int accumulate, float scale) {
    const int blocks = n / ANECY_Q8_BLOCK;
    for (long r = r0; r < r1; r++) {
        const signed char *q = Q + r * ldq;
        const float *s = S + r * lds;
        anecy_v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int b = 0; b < blocks; b++) {
            const signed char *qb = q + b * ANECY_Q8_BLOCK;
            const float *xb = x + b * ANECY_Q8_BLOCK;
            const float d = s[b];
            float w[ANECY_Q8_BLOCK];   /* a plain loop: compilers widen it in vectors */
            for (int j = 0; j < ANECY_Q8_BLOCK; j++) w[j] = (float)qb[j] * d;
            a0 += *(const anecy_v8 *)w * *(const anecy_v8 *)xb;
            a1 += *(const anecy_v8 *)(w + 8) * *(const anecy_v8 *)(xb + 8);
            a2 += *(const anecy_v8 *)(w + 16) * *(const anecy_v8 *)(xb + 16);
            a3 += *(const anecy_v8 *)(w + 24) * *(const anecy_v8 *)(xb + 24);
        }
        float da = anecy_v8_total(a0, a1, a2, a3);
        for (int i = blocks * ANECY_Q8_BLOCK; i < n; i++) da += (q[i] * s[blocks]) * x[i];
        if (accumulate) y[r] += scale * da;
        else y[r] = da;
    }
}

/* A barrier of `n` threads that spins (they wait microseconds, between two products),
 * yielding the core after a while so a loaded machine still makes progress. */
typedef struct {
    unsigned arrived;
    unsigned generation;
    unsigned n;
} anecy_barrier;

static inline void anecy_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline void anecy_barrier_init(anecy_barrier *b, unsigned n) {
    b->arrived = 0;
    b->generation = 0;
    b->n = n;
}

static inline void anecy_barrier_wait(anecy_barrier *b) {
    if (b->n <= 1) return;
    unsigned gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == b->n) {
        /* the last to arrive: nobody enters the next barrier before generation moves */
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    int spins = 0;
    while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen) {
        if (++spins < 4000) anecy_cpu_relax();
        else sched_yield();
    }
}

#endif
