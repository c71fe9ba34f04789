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

/* ---- run-time dispatch ---- */

enum { ANECY_FP16_SCALAR, ANECY_FP16_F16C, ANECY_FP16_NEON_PATH };

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

#endif
