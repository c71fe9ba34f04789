/* float32 <-> float16 (IEEE binary16) conversion, bit-identical to numpy's
 * astype(np.float16) / astype(np.float32).
 *
 * Rounding is to nearest, ties to even; values from 65520 up become Inf;
 * subnormals are kept in both directions; signed zeros and Inf are exact.
 *
 * NaN: numpy (2.4, whose casts are integer code, not F16C) copies NaN payloads
 * bit for bit and never sets the quiet bit. float32 -> float16 keeps the sign
 * and the top 10 payload bits, and if those are all zero sets the lowest bit
 * so the value stays a NaN (0x7f800001 -> 0x7c01, 0x7fa00000 -> 0x7d00);
 * float16 -> float32 shifts the payload up 13 bits (0x7d00 -> 0x7fa00000).
 * The hardware converters (F16C, NEON) quiet signalling NaNs instead.
 * So the vector paths convert a block, and if any lane of it is a NaN, convert
 * that block again with the scalar code: one compare per block on ordinary
 * data, scalar speed only on data full of NaNs.
 *
 * src and dst must not overlap. Nothing is allocated; the only global is the
 * cached dispatch choice. Include from one translation unit: everything is
 * static.
 */
#ifndef ANECY_FP16_H
#define ANECY_FP16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define ANECY_FP16_X86 1
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__GNUC__)
#define ANECY_FP16_NEON 1
#include <arm_neon.h>
#endif

/* ---- scalar reference: bit manipulation (and one exact multiply), so neither
 * the FPU rounding mode nor flush-to-zero / denormals-are-zero can change a
 * result ---- */

static inline uint16_t anecy_fp16_from_f32_bits(uint32_t x)
{
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) { /* NaN, the way numpy does it (see the top) */
        uint32_t m = (a >> 13) & 0x3ffu;
        return (uint16_t)(sign | 0x7c00u | (m ? m : 1u));
    }
    if (a >= 0x477ff000u) /* 65520 = 65504 + half an ulp: a tie that rounds up to Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) { /* normal half: rebias the exponent from 127 to 15 */
        a -= 0x38000000u;
        /* a carry out of the mantissa correctly bumps the exponent */
        return (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) /* up to 2^-25, half the smallest subnormal: ties to even 0 */
        return (uint16_t)sign;
    {   /* subnormal half: the 24-bit significand in units of 2^-24, shift 14..24 */
        uint32_t m = (a & 0x7fffffu) | 0x800000u, s = 126u - (a >> 23);
        uint32_t q = m >> s, rest = m & ((1u << s) - 1u), half = 1u << (s - 1u);
        /* q may round up to 0x400, which is exactly the smallest normal */
        return (uint16_t)(sign | (q + (rest > half || (rest == half && (q & 1u)))));
    }
}

static inline uint32_t anecy_fp16_to_f32_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) /* Inf, or NaN with its payload as is (numpy) */
        return sign | 0x7f800000u | (m << 13);
    if (e)
        return sign | ((e + 112u) << 23) | (m << 13);
    {   /* zero or subnormal: m * 2^-24 is exact and a normal float32, so this
         * float multiply is immune to the rounding mode and FTZ/DAZ */
        float f = (float)m * (1.0f / 16777216.0f);
        uint32_t b;
        memcpy(&b, &f, sizeof b);
        return sign | b;
    }
}

static inline void anecy_f32_to_f16_scalar(const float *src, uint16_t *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        uint32_t x;
        memcpy(&x, src + i, sizeof x);
        dst[i] = anecy_fp16_from_f32_bits(x);
    }
}

static inline void anecy_f16_to_f32_scalar(const uint16_t *src, float *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        uint32_t x = anecy_fp16_to_f32_bits(src[i]);
        memcpy(dst + i, &x, sizeof x);
    }
}

/* ---- vector paths; blocks holding a NaN are redone (see the top) ----
 *
 * x86: the immediate rounding argument rounds to nearest even whatever MXCSR
 * says, and neither FTZ nor DAZ changes these conversions (checked). There is
 * no AVX-512 version: on an AVX-512 Xeon it was no faster than F16C (equal when
 * memory-bound, slower for float16 -> float32 in cache). */

#ifdef ANECY_FP16_X86
__attribute__((target("avx,f16c")))
static inline void anecy_f32_to_f16_f16c(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)))
            anecy_f32_to_f16_scalar(src + i, dst + i, 8);
    }
    anecy_f32_to_f16_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx,f16c")))
static inline void anecy_f16_to_f32_f16c(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, y);
        if (_mm256_movemask_ps(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)))
            anecy_f16_to_f32_scalar(src + i, dst + i, 8);
    }
    anecy_f16_to_f32_scalar(src + i, dst + i, n - i);
}
#endif

#ifdef ANECY_FP16_NEON
/* FCVTN/FCVTL round per FPCR, whose default (and macOS's) is nearest-even
 * with no flush-to-zero; this path assumes nobody changed that. */
static inline void anecy_f32_to_f16_neon(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t x = vld1q_f32(src + i);
        vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(x)));
        if (vminvq_u32(vceqq_f32(x, x)) == 0) /* x != x only in NaN lanes */
            anecy_f32_to_f16_scalar(src + i, dst + i, 4);
    }
    anecy_f32_to_f16_scalar(src + i, dst + i, n - i);
}

static inline void anecy_f16_to_f32_neon(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t y = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i)));
        vst1q_f32(dst + i, y);
        if (vminvq_u32(vceqq_f32(y, y)) == 0)
            anecy_f16_to_f32_scalar(src + i, dst + i, 4);
    }
    anecy_f16_to_f32_scalar(src + i, dst + i, n - i);
}
#endif

/* ---- transposed: dst[r * ld16 + c] = fp16(src[c * ld32 + r]) for r < rows, c < cols
 * (a weight stored [cols, rows] written as its transpose [rows, cols], each side with its
 * own row stride). Tiles of TILE x TILE keep both sides' cache lines in use while the
 * vector kernels transpose 8 x 8 (x86) or 4 x 4 (NEON) blocks in registers; a block
 * holding a NaN is redone by the scalar code, as above. ---- */

#define ANECY_FP16_TILE 32

/* the conversion paths (run-time dispatch, below) */
enum { ANECY_FP16_SCALAR, ANECY_FP16_F16C, ANECY_FP16_NEON_PATH };

static inline void anecy_f32_to_f16_t_block_scalar(const float *src, uint16_t *dst, size_t nr,
                                                   size_t nc, size_t ld32, size_t ld16)
{
    for (size_t r = 0; r < nr; r++)
        for (size_t c = 0; c < nc; c++)
            anecy_f32_to_f16_scalar(src + c * ld32 + r, dst + r * ld16 + c, 1);
}

#ifdef ANECY_FP16_X86
/* an 8 x 8 block: src rows j = 0..7 (8 floats each) become dst rows i = 0..7 */
__attribute__((target("avx,f16c")))
static inline void anecy_f32_to_f16_t8_f16c(const float *src, uint16_t *dst, size_t ld32,
                                            size_t ld16)
{
    __m256 a0 = _mm256_loadu_ps(src), a1 = _mm256_loadu_ps(src + ld32);
    __m256 a2 = _mm256_loadu_ps(src + 2 * ld32), a3 = _mm256_loadu_ps(src + 3 * ld32);
    __m256 a4 = _mm256_loadu_ps(src + 4 * ld32), a5 = _mm256_loadu_ps(src + 5 * ld32);
    __m256 a6 = _mm256_loadu_ps(src + 6 * ld32), a7 = _mm256_loadu_ps(src + 7 * ld32);
    __m256 nan = _mm256_or_ps(
        _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(a0, a0, _CMP_UNORD_Q), _mm256_cmp_ps(a1, a1, _CMP_UNORD_Q)),
                     _mm256_or_ps(_mm256_cmp_ps(a2, a2, _CMP_UNORD_Q), _mm256_cmp_ps(a3, a3, _CMP_UNORD_Q))),
        _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(a4, a4, _CMP_UNORD_Q), _mm256_cmp_ps(a5, a5, _CMP_UNORD_Q)),
                     _mm256_or_ps(_mm256_cmp_ps(a6, a6, _CMP_UNORD_Q), _mm256_cmp_ps(a7, a7, _CMP_UNORD_Q))));
    if (_mm256_movemask_ps(nan)) {
        anecy_f32_to_f16_t_block_scalar(src, dst, 8, 8, ld32, ld16);
        return;
    }
    /* interleave pairs, then quadruples, then swap 128-bit halves: the classic 8 x 8 */
    __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
    __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
    __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
    __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 col[8] = {
        _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
        _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
        _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
        _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
    for (int i = 0; i < 8; i++)
        _mm_storeu_si128((__m128i *)(dst + i * ld16),
                         _mm256_cvtps_ph(col[i], _MM_FROUND_TO_NEAREST_INT));
}
#endif

#ifdef ANECY_FP16_NEON
/* a 4 x 4 block: src rows j = 0..3 (4 floats each) become dst rows i = 0..3 */
static inline void anecy_f32_to_f16_t4_neon(const float *src, uint16_t *dst, size_t ld32,
                                            size_t ld16)
{
    float32x4_t a = vld1q_f32(src), b = vld1q_f32(src + ld32);
    float32x4_t c = vld1q_f32(src + 2 * ld32), d = vld1q_f32(src + 3 * ld32);
    uint32x4_t ok = vandq_u32(vandq_u32(vceqq_f32(a, a), vceqq_f32(b, b)),
                              vandq_u32(vceqq_f32(c, c), vceqq_f32(d, d)));
    if (vminvq_u32(ok) == 0) {
        anecy_f32_to_f16_t_block_scalar(src, dst, 4, 4, ld32, ld16);
        return;
    }
    float32x4x2_t ab = vtrnq_f32(a, b);       /* a0 b0 a2 b2 | a1 b1 a3 b3 */
    float32x4x2_t cd = vtrnq_f32(c, d);       /* c0 d0 c2 d2 | c1 d1 c3 d3 */
    float32x4_t col[4] = {
        vcombine_f32(vget_low_f32(ab.val[0]), vget_low_f32(cd.val[0])),
        vcombine_f32(vget_low_f32(ab.val[1]), vget_low_f32(cd.val[1])),
        vcombine_f32(vget_high_f32(ab.val[0]), vget_high_f32(cd.val[0])),
        vcombine_f32(vget_high_f32(ab.val[1]), vget_high_f32(cd.val[1]))};
    for (int i = 0; i < 4; i++)
        vst1_u16(dst + i * ld16, vreinterpret_u16_f16(vcvt_f16_f32(col[i])));
}
#endif

/* one tile of at most TILE x TILE: vector blocks where they fit, scalar at the edges */
static inline void anecy_f32_to_f16_t_tile(const float *src, uint16_t *dst, size_t nr,
                                           size_t nc, size_t ld32, size_t ld16, int path)
{
    size_t b = 1;   /* the vector block's side */
#ifdef ANECY_FP16_X86
    if (path == ANECY_FP16_F16C)
        b = 8;
#endif
#ifdef ANECY_FP16_NEON
    if (path == ANECY_FP16_NEON_PATH)
        b = 4;
#endif
    /* [0, fr) x [0, fc): whole vector blocks (none on the scalar path) */
    size_t fr = b > 1 ? nr - nr % b : 0, fc = b > 1 ? nc - nc % b : 0;
    for (size_t c = 0; c < fc; c += b)
        for (size_t r = 0; r < fr; r += b) {
#ifdef ANECY_FP16_X86
            anecy_f32_to_f16_t8_f16c(src + c * ld32 + r, dst + r * ld16 + c, ld32, ld16);
#endif
#ifdef ANECY_FP16_NEON
            anecy_f32_to_f16_t4_neon(src + c * ld32 + r, dst + r * ld16 + c, ld32, ld16);
#endif
        }
    /* the edges: columns past fc for every row, rows past fr for the vector columns */
    anecy_f32_to_f16_t_block_scalar(src + fc * ld32, dst + fc, nr, nc - fc, ld32, ld16);
    anecy_f32_to_f16_t_block_scalar(src + fr, dst + fr * ld16, nr - fr, fc, ld32, ld16);
}

static inline void anecy_f32_to_f16_transposed_path(const float *src, uint16_t *dst,
                                                    size_t rows, size_t cols, size_t ld32,
                                                    size_t ld16, int path)
{
    for (size_t c0 = 0; c0 < cols; c0 += ANECY_FP16_TILE)
        for (size_t r0 = 0; r0 < rows; r0 += ANECY_FP16_TILE) {
            size_t nr = rows - r0 < ANECY_FP16_TILE ? rows - r0 : ANECY_FP16_TILE;
            size_t nc = cols - c0 < ANECY_FP16_TILE ? cols - c0 : ANECY_FP16_TILE;
            anecy_f32_to_f16_t_tile(src + c0 * ld32 + r0, dst + r0 * ld16 + c0, nr, nc, ld32,
                                    ld16, path);
        }
}

static inline void anecy_f32_to_f16_transposed_scalar(const float *src, uint16_t *dst,
                                                      size_t rows, size_t cols, size_t ld32,
                                                      size_t ld16)
{
    anecy_f32_to_f16_transposed_path(src, dst, rows, cols, ld32, ld16, ANECY_FP16_SCALAR);
}

/* ---- run-time dispatch ---- */

/* Racing threads all store the same value, so the race is benign. */
static int anecy_fp16_choice = -1;

static inline int anecy_fp16_select(void)
{
    int c = anecy_fp16_choice;
    if (c >= 0)
        return c;
    c = ANECY_FP16_SCALAR;
#if defined(ANECY_FP16_X86)
    __builtin_cpu_init();
    /* "avx" also checks that the OS saves the YMM registers; F16C is read from
     * CPUID because older clang rejects __builtin_cpu_supports("f16c") */
    {
        unsigned a, b, cx, d;
        if (__builtin_cpu_supports("avx") && __get_cpuid(1, &a, &b, &cx, &d) && (cx & bit_F16C))
            c = ANECY_FP16_F16C;
    }
#elif defined(ANECY_FP16_NEON)
    c = ANECY_FP16_NEON_PATH;
#endif
    anecy_fp16_choice = c;
    return c;
}

static inline const char *anecy_fp16_path(void)
{
    static const char *const names[] = {"scalar", "f16c", "neon"};
    return names[anecy_fp16_select()];
}

static inline void anecy_f32_to_f16(const float *src, uint16_t *dst, size_t n)
{
    switch (anecy_fp16_select()) {
#ifdef ANECY_FP16_X86
    case ANECY_FP16_F16C: anecy_f32_to_f16_f16c(src, dst, n); return;
#endif
#ifdef ANECY_FP16_NEON
    case ANECY_FP16_NEON_PATH: anecy_f32_to_f16_neon(src, dst, n); return;
#endif
    default: anecy_f32_to_f16_scalar(src, dst, n);
    }
}

static inline void anecy_f16_to_f32(const uint16_t *src, float *dst, size_t n)
{
    switch (anecy_fp16_select()) {
#ifdef ANECY_FP16_X86
    case ANECY_FP16_F16C: anecy_f16_to_f32_f16c(src, dst, n); return;
#endif
#ifdef ANECY_FP16_NEON
    case ANECY_FP16_NEON_PATH: anecy_f16_to_f32_neon(src, dst, n); return;
#endif
    default: anecy_f16_to_f32_scalar(src, dst, n);
    }
}

static inline void anecy_f32_to_f16_transposed(const float *src, uint16_t *dst, size_t rows,
                                               size_t cols, size_t ld32, size_t ld16)
{
    anecy_f32_to_f16_transposed_path(src, dst, rows, cols, ld32, ld16, anecy_fp16_select());
}

#endif
