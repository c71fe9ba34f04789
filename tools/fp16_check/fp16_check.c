/* The vector paths of anecy/_fp16.h against its scalar reference, bit for bit, in C.
 *
 * Built for this machine it checks the path the dispatcher picks here (F16C on x86-64);
 * cross-compiled for arm64 and run under an emulator it checks the NEON path, which no
 * test machine of this project runs natively (tools/fp16_check/check.sh does both). The
 * scalar reference itself is held to numpy's casts by tests/test_fp16.py.
 *
 * Checked: every float16 pattern to float32; float32 patterns around every float16
 * rounding boundary, the special values and random bits to float16, at every length
 * and offset up to a few vectors; the transposed conversion over shapes and strides
 * that leave edges of every size, with special values at random places.
 * Prints "<path>: ok (N checks)" and exits 0, or the first difference and exits 1. */
#include <stdio.h>
#include <stdlib.h>

#include "_fp16.h"

static unsigned long long checks;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void)
{
    /* xorshift64*: reproducible, no libc dependence */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static int fail(const char *what, size_t at, uint32_t input, uint32_t got, uint32_t want)
{
    printf("%s: %s differs at %zu: input %#x -> %#x, scalar gives %#x\n", anecy_fp16_path(),
           what, at, input, got, want);
    return 1;
}

/* float32 patterns a conversion can get wrong: specials, boundaries, random bits */
static size_t fill_f32(uint32_t *bits, size_t n)
{
    static const uint32_t special[] = {
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FC00001,
        0x7FC02000, 0x7FFFFFFF, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FBFFFFF, 0x7F802000,
        0x7F801FFF, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x477FE000, 0x477FEFFF,
        0x477FF000, 0x477FF001, 0x47800000, 0xC77FF000, 0x7F7FFFFF, 0x33000000, 0x33000001,
        0x387FC000, 0x387FE000, 0x38800000, 0x3F800000, 0x3F801000, 0x3F802000, 0x3F803000};
    size_t k = 0;
    for (size_t i = 0; i < sizeof special / sizeof special[0] && k < n; i++)
        bits[k++] = special[i];
    /* each float16 value, the float32s halfway to its neighbour and one ulp either side */
    for (uint32_t h = 0; h < 0x10000 && k + 4 <= n; h += 7) {
        uint32_t x = anecy_fp16_to_f32_bits((uint16_t)h);
        bits[k++] = x;
        bits[k++] = x + 0x1000;
        bits[k++] = x + 0x0FFF;
        bits[k++] = x + 0x1001;
    }
    while (k < n)
        bits[k++] = next_u32();
    return k;
}

static int check_plain(void)
{
    enum { N = 1 << 16 };
    static uint16_t halves[N], got16[N], want16[N];
    static float f32[N], got32[N], want32[N];
    static uint32_t bits[N];
    for (size_t i = 0; i < N; i++)
        halves[i] = (uint16_t)i;
    anecy_f16_to_f32(halves, got32, N);
    anecy_f16_to_f32_scalar(halves, want32, N);
    for (size_t i = 0; i < N; i++, checks++)
        if (to_bits(got32[i]) != to_bits(want32[i]))
            return fail("f16 -> f32", i, halves[i], to_bits(got32[i]), to_bits(want32[i]));
    fill_f32(bits, N);
    for (size_t i = 0; i < N; i++)
        f32[i] = from_bits(bits[i]);
    /* every length and offset up to a few vectors, then the whole array */
    for (size_t off = 0; off < 9; off++)
        for (size_t n = 0; n < 40; n++) {
            memset(got16, 0xAB, sizeof got16);
            memset(want16, 0xAB, sizeof want16);
            anecy_f32_to_f16(f32 + off * 37, got16 + off, n);
            anecy_f32_to_f16_scalar(f32 + off * 37, want16 + off, n);
            for (size_t i = 0; i < n + 2 * off + 2; i++, checks++)
                if (got16[i] != want16[i])
                    return fail("f32 -> f16 (short)", i,
                                i >= off && i - off < n ? bits[off * 37 + i - off] : 0,
                                got16[i], want16[i]);
        }
    anecy_f32_to_f16(f32, got16, N);
    anecy_f32_to_f16_scalar(f32, want16, N);
    for (size_t i = 0; i < N; i++, checks++)
        if (got16[i] != want16[i])
            return fail("f32 -> f16", i, bits[i], got16[i], want16[i]);
    return 0;
}

static int check_transposed(void)
{
    /* src: [cols, rows] with row stride ld32; dst: [rows, cols] with row stride ld16 */
    static const size_t shapes[][2] = {{1, 1},   {3, 5},   {8, 8},   {7, 9},   {16, 24},
                                       {33, 31}, {40, 64}, {64, 40}, {65, 97}, {128, 96},
                                       {4, 100}, {100, 4}, {32, 32}, {31, 33}, {200, 72}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t rows = shapes[s][0], cols = shapes[s][1];
        for (size_t pad = 0; pad < 3; pad++) {
            size_t ld32 = rows + pad * 5, ld16 = cols + pad * 3;
            float *src = malloc(cols * ld32 * sizeof(float));
            uint16_t *got = malloc(rows * ld16 * sizeof(uint16_t));
            uint16_t *want = malloc(rows * ld16 * sizeof(uint16_t));
            if (!src || !got || !want) {
                printf("out of memory\n");
                return 1;
            }
            for (size_t i = 0; i < cols * ld32; i++) {
                uint32_t r = next_u32();
                /* mostly ordinary values; now and then a special one (NaN, Inf, subnormal) */
                src[i] = (r & 63) == 0 ? from_bits(next_u32()) : (float)((int32_t)r) / 65536.0f;
            }
            memset(got, 0xCD, rows * ld16 * sizeof(uint16_t));
            memset(want, 0xCD, rows * ld16 * sizeof(uint16_t));
            anecy_f32_to_f16_transposed(src, got, rows, cols, ld32, ld16);
            for (size_t r = 0; r < rows; r++)
                for (size_t c = 0; c < cols; c++)
                    anecy_f32_to_f16_scalar(src + c * ld32 + r, want + r * ld16 + c, 1);
            for (size_t i = 0; i < rows * ld16; i++, checks++)
                if (got[i] != want[i]) {
                    size_t r = i / ld16, c = i % ld16;
                    int e = fail("transposed f32 -> f16", i,
                                 c < cols ? to_bits(src[c * ld32 + r]) : 0, got[i], want[i]);
                    printf("  (shape %zu x %zu, ld32 %zu, ld16 %zu, row %zu, column %zu)\n",
                           rows, cols, ld32, ld16, r, c);
                    return e;
                }
            free(src);
            free(got);
            free(want);
        }
    }
    return 0;
}

int main(void)
{
    if (check_plain() || check_transposed())
        return 1;
    printf("%s: ok (%llu checks)\n", anecy_fp16_path(), checks);
    return 0;
}
