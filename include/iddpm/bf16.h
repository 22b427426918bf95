/* iddpm/bf16.h — bfloat16 <-> float32 on the host: the upper 16 bits of a float32,
 * rounded to nearest even (NaN stays a quiet NaN). Same rounding as CUDA's
 * __float2bfloat16_rn, so CPU and GPU conversions agree bit for bit. */
#ifndef IDDPM_BF16_H
#define IDDPM_BF16_H

#include <stdint.h>
#include <string.h>

static inline uint16_t idd_bf16_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN: keep it quiet */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float idd_f32_from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
