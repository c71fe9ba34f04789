/* The loops of anecy/_lowrank.h against a double-precision reference, in C.
 *
 * Built for this machine it checks the path the dispatcher picks here (AVX2 + FMA on most
 * x86-64) and the portable one; cross-compiled for arm64 and run under an emulator it
 * checks the portable loops as an arm64 compiler lowers them to NEON, as the Macs run them
 * (tools/lowrank_check/check.sh does both). tests/test_lowrank.py holds the same loops to
 * numpy through Python on this machine.
 *
 * Each result must lie within 4 K U of the reference, relative to the sum of the
 * magnitudes of its terms (K the length of its sum, U = 2^-24), over ranks below, at and
 * across a register block of 8 and lengths with and without a tail past a multiple of 8,
 * with and without dropout. Prints "<path>: ok (N checks)" per path and exits 0, or the
 * first result out of bounds and exits 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "_lowrank.h"

static unsigned long long checks;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static float next_float(void)
{
    /* xorshift64*, mapped to [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / 8388608.0f - 1.0f;
}

static float *filled(size_t n)
{
    float *p = malloc(n * sizeof(float) + 1);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = next_float();
    return p;
}

static void within(const char *what, float got, double ref, double magnitude, int length)
{
    const double bound = 4.0 * length * ldexp(1.0, -24) * magnitude + 1e-30;
    checks++;
    if (fabs((double)got - ref) > bound) {
        printf("%s (%s): %.9g against %.9g, bound %.3g\n", what, anecy_lowrank_path(), got,
               ref, bound);
        exit(1);
    }
}

/* drop(x)[k, s] as _lowrank.h draws it, in double */
static double dropped(const float *x, int S, int k, int s, uint32_t key, uint32_t threshold,
                      float keep)
{
    const uint32_t i = (uint32_t)k * (uint32_t)S + (uint32_t)s;
    if (threshold && anecy_drop_hash(i ^ key) < threshold)
        return 0.0;
    return (double)x[(size_t)k * S + s] * (threshold ? keep : 1.0f);
}

static void check_shape(int R, int n_in, int n_out, int S, uint32_t threshold)
{
    const float keep = threshold ? 1.0f / 0.7f : 1.0f, c = 0.75f;
    const uint32_t key = 0x9E3779B9u;
    float *A = filled((size_t)R * n_in), *B = filled((size_t)n_out * R);
    float *x = filled((size_t)n_in * S), *dy = filled((size_t)n_out * S);
    float *u = filled((size_t)R * S), *y = filled((size_t)n_out * S);
    float *y0 = malloc(sizeof(float) * n_out * S), *v = filled((size_t)R * S);
    float *dB = filled((size_t)n_out * R), *dB0 = malloc(sizeof(float) * n_out * R);
    float *dA = filled((size_t)R * n_in), *dA0 = malloc(sizeof(float) * R * n_in);
    float *dx = filled((size_t)n_in * S), *dx0 = malloc(sizeof(float) * n_in * S);
    float *row = filled((size_t)S);
    for (int i = 0; i < n_out * S; i++)
        y0[i] = y[i];
    for (int i = 0; i < n_out * R; i++)
        dB0[i] = dB[i];
    for (int i = 0; i < R * n_in; i++)
        dA0[i] = dA[i];
    for (int i = 0; i < n_in * S; i++)
        dx0[i] = dx[i];

    anecy_lora_down(A, R, n_in, x, S, u, key, threshold, keep);
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            double ref = 0, mag = 0;
            for (int k = 0; k < n_in; k++) {
                const double t = A[(size_t)r * n_in + k] * dropped(x, S, k, s, key, threshold,
                                                                     keep);
                ref += t;
                mag += fabs(t);
            }
            within("down", u[(size_t)r * S + s], ref, mag, n_in);
        }
    anecy_lora_up(B, R, n_out, u, S, c, y);
    for (int o = 0; o < n_out; o++)
        for (int s = 0; s < S; s++) {
            double ref = y0[(size_t)o * S + s], mag = fabs(ref);
            for (int r = 0; r < R; r++) {
                const double t = (double)c * B[(size_t)o * R + r] * u[(size_t)r * S + s];
                ref += t;
                mag += fabs(t);
            }
            within("up", y[(size_t)o * S + s], ref, mag, R + 1);
        }
    anecy_lora_back_out(B, R, n_out, dy, u, S, c, v, dB);
    for (int r = 0; r < R; r++) {
        for (int s = 0; s < S; s++) {
            double ref = 0, mag = 0;
            for (int o = 0; o < n_out; o++) {
                const double t = (double)B[(size_t)o * R + r] * dy[(size_t)o * S + s];
                ref += t;
                mag += fabs(t);
            }
            within("back_out v", v[(size_t)r * S + s], ref, mag, n_out);
        }
        for (int o = 0; o < n_out; o++) {
            double ref = dB0[(size_t)o * R + r], mag = fabs(ref);
            for (int s = 0; s < S; s++) {
                const double t = (double)c * dy[(size_t)o * S + s] * u[(size_t)r * S + s];
                ref += t;
                mag += fabs(t);
            }
            within("back_out dB", dB[(size_t)o * R + r], ref, mag, S + 1);
        }
    }
    const float *As[1] = {A}, *vs[1] = {v};
    float *dAs[1] = {dA};
    const int Rs[1] = {R};
    const uint32_t keys[1] = {key};
    anecy_lora_back_in(1, As, Rs, n_in, x, vs, S, c, dAs, dx, row, keys, threshold, keep);
    for (int k = 0; k < n_in; k++) {
        for (int r = 0; r < R; r++) {
            double ref = dA0[(size_t)r * n_in + k], mag = fabs(ref);
            for (int s = 0; s < S; s++) {
                const double t = (double)c * v[(size_t)r * S + s] *
                                 dropped(x, S, k, s, key, threshold, keep);
                ref += t;
                mag += fabs(t);
            }
            within("back_in dA", dA[(size_t)r * n_in + k], ref, mag, S + 1);
        }
        for (int s = 0; s < S; s++) {
            const uint32_t i = (uint32_t)k * (uint32_t)S + (uint32_t)s;
            const int kept = !threshold || anecy_drop_hash(i ^ key) >= threshold;
            double ref = dx0[(size_t)k * S + s], mag = fabs(ref);
            for (int r = 0; r < R && kept; r++) {
                const double t = (double)c * keep * A[(size_t)r * n_in + k] *
                                 v[(size_t)r * S + s];
                ref += t;
                mag += fabs(t);
            }
            within("back_in dx", dx[(size_t)k * S + s], ref, mag, R + 2);
        }
    }
    free(A), free(B), free(x), free(dy), free(u), free(y), free(y0), free(v), free(dB);
    free(dB0), free(dA), free(dA0), free(dx), free(dx0), free(row);
}

static void check_all(void)
{
    static const int shapes[][4] = {  /* R, n_in, n_out, S */
        {1, 5, 7, 1}, {3, 24, 40, 7}, {8, 40, 24, 8}, {8, 64, 96, 35}, {12, 33, 17, 13},
        {19, 24, 40, 16}, {5, 17, 64, 3},
    };
    checks = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int drop = 0; drop < 2; drop++)
            check_shape(shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3],
                        drop ? 1288490189u : 0u);   /* p = 0.3 */
    printf("%s: ok (%llu checks)\n", anecy_lowrank_path(), checks);
}

int main(void)
{
    anecy_lowrank_choose(-1);
    check_all();
    if (anecy_lowrank_avx2()) {
        anecy_lowrank_choose(0);
        check_all();
    }
    return 0;
}
