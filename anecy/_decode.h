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

#define ANECY_LANES 32

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define ANECY_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ANECY_ROW_CLONES
#endif

/* y[r] = W[r, :n] . x for rows r0 <= r < r1 of the row-major W (row r at W + r * ld);
 * with `accumulate`, y[r] += scale * (W[r] . x) instead (a residual add). Two rows at a
 * time share each load of x. */
ANECY_ROW_CLONES
static void anecy_matvec_rows(const float *W, long ld, const float *x, float *y, long r0,
                              long r1, int n, int accumulate, float scale) {
    const int body = n - n % ANECY_LANES;
    long r = r0;
    for (; r + 2 <= r1; r += 2) {
        const float *a = W + r * ld, *b = a + ld;
        float sa[ANECY_LANES] = {0}, sb[ANECY_LANES] = {0};
        for (int i = 0; i < body; i += ANECY_LANES)
            for (int j = 0; j < ANECY_LANES; j++) {
                sa[j] += a[i + j] * x[i + j];
                sb[j] += b[i + j] * x[i + j];
            }
        for (int w = ANECY_LANES / 2; w > 0; w /= 2)
            for (int j = 0; j < w; j++) {
                sa[j] += sa[j + w];
                sb[j] += sb[j + w];
            }
        float da = sa[0], db = sb[0];
        for (int i = body; i < n; i++) {
            da += a[i] * x[i];
            db += b[i] * x[i];
        }
        if (accumulate) {
            y[r] += scale * da;
            y[r + 1] += scale * db;
        } else {
            y[r] = da;
            y[r + 1] = db;
        }
    }
    for (; r < r1; r++) {   /* an odd last row: the same sums, one row */
        const float *a = W + r * ld;
        float sa[ANECY_LANES] = {0};
        for (int i = 0; i < body; i += ANECY_LANES)
            for (int j = 0; j < ANECY_LANES; j++) sa[j] += a[i + j] * x[i + j];
        for (int w = ANECY_LANES / 2; w > 0; w /= 2)
            for (int j = 0; j < w; j++) sa[j] += sa[j + w];
        float da = sa[0];
        for (int i = body; i < n; i++) da += a[i] * x[i];
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
