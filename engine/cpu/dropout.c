/* dropout.c — inverted dropout on the CPU, forward and backward, with the mask drawn
 * from Philox4x32-10 eight counters at a time.
 *
 * Element i keeps when the i-th uniform of the stream (seed, stream, offset) is >= p:
 * counter offset + i/2 gives four 32-bit words r0..r3, and the uniforms of elements 2j
 * and 2j+1 are ((r0 << 21) ^ (r1 >> 11)) * 2^-53 and the same of r2, r3
 * (include/iddpm/philox.h, idd_philox_uniform2). u >= p is tested on the 53-bit integers:
 * X * 2^-53 >= p  <=>  X >= ceil(p * 2^53), exact because p * 2^53 is.
 *   forward:  out = keep ? x / (1 - p) : 0
 *   backward: dx += keep ? dout / (1 - p) : 0      (the mask drawn again, not stored)
 * The draws are the scalar generator's bit for bit (tests/c/test_kernels.c), so the
 * mask does not depend on the thread count or on the CUDA backend, which draws the same. */
#include "iddpm/kernels.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "iddpm/philox.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define PAR_MIN 32768 /* below this many elements threads cost more than they give */

/* r[w][l]: word w of counter ctr + l, for l < 8 */
static void philox8(uint64_t seed, uint64_t stream, uint64_t ctr, uint32_t r[4][8]) {
#if defined(__AVX2__)
    uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; l++) {
        lo[l] = (uint32_t)(ctr + (uint64_t)l);
        hi[l] = (uint32_t)((ctr + (uint64_t)l) >> 32);
    }
    __m256i c0 = _mm256_loadu_si256((const __m256i *)lo), c1 = _mm256_loadu_si256((const __m256i *)hi);
    __m256i c2 = _mm256_set1_epi32((int)(uint32_t)stream), c3 = _mm256_set1_epi32((int)(uint32_t)(stream >> 32));
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const __m256i m0 = _mm256_set1_epi32((int)0xD2511F53u), m1 = _mm256_set1_epi32((int)0xCD9E8D57u);
    for (int round = 0; round < 10; round++) {
        /* 32x32 -> 64-bit products of the even and the odd lanes, split into hi and lo */
        __m256i pe0 = _mm256_mul_epu32(c0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
        __m256i pe1 = _mm256_mul_epu32(c2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
        __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
        __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
        __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
        __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
        __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
        __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
        c1 = lo1;
        c3 = lo0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256((__m256i *)r[0], c0);
    _mm256_storeu_si256((__m256i *)r[1], c1);
    _mm256_storeu_si256((__m256i *)r[2], c2);
    _mm256_storeu_si256((__m256i *)r[3], c3);
#else
    for (int l = 0; l < 8; l++) {
        uint32_t o[4];
        idd_philox4x32(seed, stream, ctr + (uint64_t)l, o);
        for (int w = 0; w < 4; w++) r[w][l] = o[w];
    }
#endif
}

/* m[e] = all ones if element 16*b + e keeps, else 0: a bit mask ANDed into x * scale
 * (no branch on the random mask, which would mispredict; and a dropped element is +0
 * even where x is negative, inf or NaN) */
static void keep16(uint64_t seed, uint64_t stream, uint64_t offset, int64_t b, uint64_t thr,
                   uint32_t m[16]) {
    uint32_t r[4][8];
    philox8(seed, stream, offset + (uint64_t)b * 8, r);
    for (int l = 0; l < 8; l++) {
        uint64_t u0 = ((uint64_t)r[0][l] << 21) ^ (r[1][l] >> 11);
        uint64_t u1 = ((uint64_t)r[2][l] << 21) ^ (r[3][l] >> 11);
        m[2 * l] = -(uint32_t)(u0 >= thr);
        m[2 * l + 1] = -(uint32_t)(u1 >= thr);
    }
}

/* o[e] = (a[e] * s) & m[e] over k <= 16 elements */
static void masked_scale(float *o, const float *a, float s, const uint32_t *m, int k) {
    for (int e = 0; e < k; e++) {
        float v = a[e] * s;
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        u &= m[e];
        memcpy(&o[e], &u, sizeof u);
    }
}

static uint64_t keep_threshold(float p) { return (uint64_t)ceil((double)p * 0x1p53); }

idd_status idd_dropout_forward_f32(float *out, const float *x, int64_t n, float p, uint64_t seed,
                                   uint64_t stream, uint64_t offset) {
    const float scale = 1.0f / (1.0f - p);
    const uint64_t thr = keep_threshold(p);
    const int64_t nb = (n + 15) / 16;
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t b = 0; b < nb; b++) {
        uint32_t mask[16];
        keep16(seed, stream, offset, b, thr, mask);
        const int64_t i0 = b * 16;
        masked_scale(out + i0, x + i0, scale, mask, n - i0 < 16 ? (int)(n - i0) : 16);
    }
    return IDD_OK;
}

idd_status idd_dropout_backward_f32(float *dx, const float *dout, int64_t n, float p, uint64_t seed,
                                    uint64_t stream, uint64_t offset) {
    if (!dx) return IDD_OK;
    const float scale = 1.0f / (1.0f - p);
    const uint64_t thr = keep_threshold(p);
    const int64_t nb = (n + 15) / 16;
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t b = 0; b < nb; b++) {
        uint32_t mask[16];
        float d[16];
        keep16(seed, stream, offset, b, thr, mask);
        const int64_t i0 = b * 16;
        const int k = n - i0 < 16 ? (int)(n - i0) : 16;
        masked_scale(d, dout + i0, scale, mask, k);
        for (int e = 0; e < k; e++) dx[i0 + e] += d[e];
    }
    return IDD_OK;
}
