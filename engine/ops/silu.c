/* silu.c — SiLU (swish), forward and backward, for the places the UNet applies it
 * outside a group norm (the time-embedding MLP, before each ResBlock's emb_layers).
 *   out = x * sigmoid(x)
 *   dx += dout * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
 * Elementwise over a flat buffer; OpenMP over chunks when the buffer is large. */
#include "iddpm/kernels.h"

#include <math.h>

idd_status idd_silu_forward_f32(float *out, const float *x, size_t n) {
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        out[i] = v / (1.0f + expf(-v));
    }
    return IDD_OK;
}

idd_status idd_silu_backward_f32(float *dx, const float *dout, const float *x, size_t n) {
    if (!dx) return IDD_OK;
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        float s = 1.0f / (1.0f + expf(-v));
        dx[i] += dout[i] * s * (1.0f + v * (1.0f - s));
    }
    return IDD_OK;
}
