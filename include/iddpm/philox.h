/* philox.h — Philox4x32-10 (Salmon et al. 2011), the counter-based generator
 * behind every random number: the value at (seed, stream, counter) never depends on
 * how many numbers were drawn before, on the batch size or on the thread count. */
#ifndef IDDPM_PHILOX_H
#define IDDPM_PHILOX_H
#include <math.h>
#include <stdint.h>

static inline void idd_philox4x32(uint64_t seed, uint64_t stream, uint64_t ctr, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* two uniforms in [0,1) with 53-bit resolution */
static inline void idd_philox_uniform2(uint64_t seed, uint64_t stream, uint64_t ctr, double v[2]) {
    uint32_t r[4];
    idd_philox4x32(seed, stream, ctr, r);
    v[0] = (double)(((uint64_t)r[0] << 21) ^ (r[1] >> 11)) * 0x1p-53;
    v[1] = (double)(((uint64_t)r[2] << 21) ^ (r[3] >> 11)) * 0x1p-53;
}

/* two standard normals (Box-Muller) */
static inline void idd_philox_normal2(uint64_t seed, uint64_t stream, uint64_t ctr, double v[2]) {
    double u[2];
    idd_philox_uniform2(seed, stream, ctr, u);
    double rad = sqrt(-2.0 * log(1.0 - u[0]));   /* 1-u in (0,1]: never log(0) */
    double th = 6.283185307179586 * u[1];
    v[0] = rad * cos(th);
    v[1] = rad * sin(th);
}
#endif
