/* Vectorisable float helpers for anecy's element-wise loops.
 *
 * libm's expf is a function call per element, so loops over it do not vectorise.
 * anecy_expf is the classic range reduction x = n ln2 + r (ln2 split in two parts so r
 * is exact to ~1 ulp), a degree-6 polynomial for e^r on |r| <= ln2/2 and a scale by 2^n
 * built in the exponent bits: straight-line code gcc and clang turn into SIMD. Its
 * error is within 2 ulp of expf; inputs below -87.3 return 0 (the true value is
 * subnormal and adds nothing to a softmax sum) and inputs above ln(FLT_MAX) return inf.
 */
#ifndef ANECY_MATHX_H
#define ANECY_MATHX_H

#include <stdint.h>
#include <string.h>

static inline float anecy_expf(float x) {
    float input = x;
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    int overflow = x > 88.7228391116729f;  /* expf overflows to inf above ln(FLT_MAX) */
    if (overflow) x = 0.0f;
    int underflow = x < -87.3365447505531f;
    if (underflow) x = -87.3365447505531f;
    float fn = x * log2e;
    /* round to nearest without a libm call: works for |fn| < 2^22 */
    fn = (fn + 12582912.0f) - 12582912.0f;
    float r = x - fn * ln2_hi;
    r = r - fn * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = (p * r) * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &e, sizeof bits);
    bits += (int32_t)fn << 23;
    memcpy(&e, &bits, sizeof e);
    if (overflow) e = __builtin_inff();
    e = underflow ? 0.0f : e;
    return input != input ? input : e;  /* NaN in, NaN out */
}

#endif
