/* vmath.h — 8-wide float vectors (GCC vector extensions), a polynomial exp, sigmoid and
 * sqrt for the CPU kernels: group norm + SiLU, SiLU, softmax, AdamW.
 *
 * v8f is 8 floats; with -march=x86-64-v3 (AVX2 + FMA) each operation is one
 * instruction, elsewhere GCC lowers it to SSE pairs or scalar code, so the same source
 * is the fallback. Loads and stores go through memcpy (unaligned, no aliasing issues);
 * the _n variants handle a tail of fewer than 8 elements.
 *
 * v8_exp: exp(x) with x clamped to [-87.3, 88.0] (results below 1.2e-38 or above
 * 1.65e38 are not produced), Cody–Waite reduction x = n ln2 + r, |r| <= ln2/2, and a
 * degree-7 polynomial (Cephes expf coefficients): relative error within about 2 ulp of
 * expf over the clamped range (tests/c/test_kernels.c checks 3e-7).
 * v8_sigmoid divides by the reciprocal estimate plus one Newton step (v8_recip_ge1),
 * v8_sqrt is the correctly rounded root; both are used by the CPU kernels (group norm,
 * SiLU, softmax, AdamW). */
#ifndef IDDPM_VMATH_H
#define IDDPM_VMATH_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f v8_set1(float a) { return (v8f){a, a, a, a, a, a, a, a}; }
static inline v8f v8_load(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v8_store(float *p, v8f v) { memcpy(p, &v, sizeof v); }
/* the first n (< 8) elements; the others are zero */
static inline v8f v8_load_n(const float *p, int n) {
    v8f v = v8_set1(0.0f);
    for (int i = 0; i < n; i++) v[i] = p[i];
    return v;
}
static inline void v8_store_n(float *p, v8f v, int n) {
    for (int i = 0; i < n; i++) p[i] = v[i];
}
static inline float v8_hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
static inline float v8_hmax(v8f v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}
static inline v8f v8_select(v8i mask, v8f a, v8f b) {
    return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask));
}
/* a > b ? a : b and a < b ? a : b (with a NaN, b): exactly maxps/minps, one instruction
 * where the target has AVX */
static inline v8f v8_max(v8f a, v8f b) {
#if defined(__AVX__)
    return (v8f)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return v8_select(a > b, a, b);
#endif
}
static inline v8f v8_min(v8f a, v8f b) {
#if defined(__AVX__)
    return (v8f)_mm256_min_ps((__m256)a, (__m256)b);
#else
    return v8_select(a < b, a, b);
#endif
}
/* a * b + c, fused where the target has FMA (ISO C mode never contracts a*b+c) */
static inline v8f v8_fma(v8f a, v8f b, v8f c) {
#if defined(__FMA__) && defined(__AVX__)
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline v8f v8_exp(v8f x) {
    x = v8_min(v8_max(x, v8_set1(-87.3f)), v8_set1(88.0f));
    /* n = round(x / ln2) by the 1.5*2^23 trick (|x/ln2| < 2^22) */
    const v8f magic = v8_set1(12582912.0f);
    v8f n = v8_fma(x, v8_set1(1.44269504088896341f), magic) - magic;
    v8f r = v8_fma(n, v8_set1(-0.693359375f), x);
    r = v8_fma(n, v8_set1(2.12194440e-4f), r);
    v8f p = v8_set1(1.9875691500e-4f);
    p = v8_fma(p, r, v8_set1(1.3981999507e-3f));
    p = v8_fma(p, r, v8_set1(8.3334519073e-3f));
    p = v8_fma(p, r, v8_set1(4.1665795894e-2f));
    p = v8_fma(p, r, v8_set1(1.6666665459e-1f));
    p = v8_fma(p, r, v8_set1(5.0000001201e-1f));
    p = v8_fma(p, r * r, r) + v8_set1(1.0f);
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8f)e;
}

/* the square root of each lane, correctly rounded (as sqrtf, without its errno path,
 * which keeps GCC from vectorising a loop that calls it) */
static inline v8f v8_sqrt(v8f x) {
#if defined(__AVX__)
    return (v8f)_mm256_sqrt_ps((__m256)x);
#else
    for (int i = 0; i < 8; i++) x[i] = __builtin_sqrtf(x[i]);
    return x;
#endif
}

/* 1 / d for d >= 1: the hardware estimate (12 bits) and one Newton step, r(2 - d r),
 * within about 2 ulp of the division at a fraction of its cost; d beyond ~2^126 gives
 * 0 (the true value is below 1e-38) */
static inline v8f v8_recip_ge1(v8f d) {
#if defined(__AVX__)
    v8f r = (v8f)_mm256_rcp_ps((__m256)d);
    return r * v8_fma(-d, r, v8_set1(2.0f));
#else
    return v8_set1(1.0f) / d;
#endif
}

/* 1 / (1 + exp(-u)) */
static inline v8f v8_sigmoid(v8f u) { return v8_recip_ge1(v8_set1(1.0f) + v8_exp(-u)); }

/* the scalar form of v8_exp, for code that has one value (same results) */
static inline float idd_fast_expf(float x) { return v8_exp(v8_set1(x))[0]; }

#endif
