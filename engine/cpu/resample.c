/* resample.c — the UNet's non-learned resampling, forward and backward:
 *   nearest-neighbour 2x upsample (Upsample: out[y][x] = in[y/2][x/2]) and
 *   2x2 stride-2 average pooling (Downsample without conv; PyTorch AvgPool2d(2), floor).
 * Both work plane by plane (one (n,c) image at a time), spread over OpenMP threads;
 * each plane has a single writer, so the backward accumulation needs no atomics. */
#include "iddpm/kernels.h"

#include <string.h>

typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));

static idd_status rs_check(const char *fn, int N, int C, int H, int W, int minhw) {
    if (N <= 0 || C <= 0 || H < minhw || W < minhw)
        return idd_error("%s: bad input size (%d,%d,%d,%d)", fn, N, C, H, W);
    return IDD_OK;
}

idd_status idd_upsample2x_forward_f32(float *out, const float *x, int N, int C, int H, int W) {
    idd_status st = rs_check("upsample2x_forward", N, C, H, W, 1);
    if (st) return st;
    const long planes = (long)N * C;
    const int W2 = 2 * W;
#pragma omp parallel for schedule(static)
    for (long pl = 0; pl < planes; pl++) {
        const float *xp = x + (size_t)pl * H * W;
        float *op = out + (size_t)pl * 4 * H * W;
        for (int y = 0; y < H; y++) {
            const float *xr = xp + (size_t)y * W;
            float *r0 = op + (size_t)(2 * y) * W2, *r1 = r0 + W2;
            int i = 0;
            for (; i + 4 <= W; i += 4) {   /* 4 inputs -> 8 outputs, one vector store */
                v4f v;
                memcpy(&v, xr + i, sizeof v);
                v8f d = __builtin_shufflevector(v, v, 0, 0, 1, 1, 2, 2, 3, 3);
                memcpy(r0 + 2 * i, &d, sizeof d);
            }
            for (; i < W; i++) r0[2 * i] = r0[2 * i + 1] = xr[i];
            memcpy(r1, r0, sizeof(float) * (size_t)W2);   /* the odd row repeats the even one */
        }
    }
    return IDD_OK;
}

idd_status idd_upsample2x_backward_f32(float *dx, const float *dout, int N, int C, int H, int W) {
    idd_status st = rs_check("upsample2x_backward", N, C, H, W, 1);
    if (st) return st;
    if (!dx) return IDD_OK;
    const long planes = (long)N * C;
    const int W2 = 2 * W;
#pragma omp parallel for schedule(static)
    for (long pl = 0; pl < planes; pl++) {
        float *dp = dx + (size_t)pl * H * W;
        const float *gp = dout + (size_t)pl * 4 * H * W;
        for (int y = 0; y < H; y++) {
            float *dr = dp + (size_t)y * W;
            const float *r0 = gp + (size_t)(2 * y) * W2, *r1 = r0 + W2;
            for (int i = 0; i < W; i++)
                dr[i] += (r0[2 * i] + r0[2 * i + 1]) + (r1[2 * i] + r1[2 * i + 1]);
        }
    }
    return IDD_OK;
}

idd_status idd_avgpool2x_forward_f32(float *out, const float *x, int N, int C, int H, int W) {
    idd_status st = rs_check("avgpool2x_forward", N, C, H, W, 2);
    if (st) return st;
    const long planes = (long)N * C;
    const int Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static)
    for (long pl = 0; pl < planes; pl++) {
        const float *xp = x + (size_t)pl * H * W;
        float *op = out + (size_t)pl * Ho * Wo;
        for (int y = 0; y < Ho; y++) {
            const float *r0 = xp + (size_t)(2 * y) * W, *r1 = r0 + W;
            float *orow = op + (size_t)y * Wo;
            for (int i = 0; i < Wo; i++)
                orow[i] = ((r0[2 * i] + r0[2 * i + 1]) + (r1[2 * i] + r1[2 * i + 1])) * 0.25f;
        }
    }
    return IDD_OK;
}

idd_status idd_avgpool2x_backward_f32(float *dx, const float *dout, int N, int C, int H, int W) {
    idd_status st = rs_check("avgpool2x_backward", N, C, H, W, 2);
    if (st) return st;
    if (!dx) return IDD_OK;
    const long planes = (long)N * C;
    const int Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static)
    for (long pl = 0; pl < planes; pl++) {
        float *dp = dx + (size_t)pl * H * W;
        const float *gp = dout + (size_t)pl * Ho * Wo;
        for (int y = 0; y < Ho; y++) {
            float *r0 = dp + (size_t)(2 * y) * W, *r1 = r0 + W;
            const float *grow = gp + (size_t)y * Wo;
            for (int i = 0; i < Wo; i++) {
                float g = grow[i] * 0.25f;
                r0[2 * i] += g;
                r0[2 * i + 1] += g;
                r1[2 * i] += g;
                r1[2 * i + 1] += g;
            }
        }
    }
    return IDD_OK;
}
