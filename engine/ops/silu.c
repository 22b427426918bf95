/* silu.c — SiLU (swish), forward and backward, for the places the UNet applies it
 * outside a group norm (the time-embedding MLP, before each ResBlock's emb_layers).
 *   out = x * sigmoid(x)
 *   dx += dout * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
 * Elementwise over a flat buffer, 8 lanes at a time (vmath.h exp); OpenMP over chunks
 * when the buffer is large. */
#include "iddpm/kernels.h"

#include <math.h>

#include "vmath.h"

idd_status idd_silu_forward_f32(float *out, const float *x, size_t n) {
    const long nb = (long)((n + 7) / 8);
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (long b = 0; b < nb; b++) {
        const size_t i = (size_t)b * 8;
        const int k = n - i >= 8 ? 8 : (int)(n - i);
        v8f v = k == 8 ? v8_load(x + i) : v8_load_n(x + i, k);
        v8f o = v * v8_sigmoid(v);
        if (k == 8) v8_store(out + i, o);
        else v8_store_n(out + i, o, k);
    }
    return IDD_OK;
}

idd_status idd_silu_backward_f32(float *dx, const float *dout, const float *x, size_t n) {
    if (!dx) return IDD_OK;
    const long nb = (long)((n + 7) / 8);
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (long b = 0; b < nb; b++) {
        const size_t i = (size_t)b * 8;
        const int k = n - i >= 8 ? 8 : (int)(n - i);
        v8f v = k == 8 ? v8_load(x + i) : v8_load_n(x + i, k);
        v8f d = k == 8 ? v8_load(dout + i) : v8_load_n(dout + i, k);
        v8f o = k == 8 ? v8_load(dx + i) : v8_load_n(dx + i, k);
        v8f s = v8_sigmoid(v);
        o += d * s * v8_fma(v, v8_set1(1.0f) - s, v8_set1(1.0f));
        if (k == 8) v8_store(dx + i, o);
        else v8_store_n(dx + i, o, k);
    }
    return IDD_OK;
}
