/* resize.c — bilinear resize of float32 NCHW images, forward only (feature extraction).
 *
 * Two conventions for where output pixel j samples the input (in = input size along an
 * axis, out = output size), each with bilinear weights between floor(src) and the next
 * pixel, indices clamped to [0, in-1]:
 *   IDD_RESIZE_TF1      src = j * in / out
 *       TensorFlow 1 resize_bilinear (align_corners=False, no half-pixel centres): the
 *       resize inside the TF Inception graph and Tero Karras' TorchScript port
 *       (affine_grid + grid_sample with border padding).
 *   IDD_RESIZE_HALF_PIXEL  src = max((j + 0.5) * in / out - 0.5, 0)
 *       PyTorch F.interpolate(mode='bilinear', align_corners=False), which pytorch-fid
 *       uses. */
#include <math.h>

#include "iddpm/kernels.h"

/* per output index: left source index, right source index, weight of the right one */
static void axis_taps(int *i0, int *i1, float *frac, int in, int out, int mode) {
    double scale = (double)in / out;
    for (int j = 0; j < out; j++) {
        double src = mode == IDD_RESIZE_TF1 ? j * scale : (j + 0.5) * scale - 0.5;
        if (src < 0) src = 0;
        if (src > in - 1) src = in - 1;
        int a = (int)floor(src);
        i0[j] = a;
        i1[j] = a + 1 < in ? a + 1 : in - 1;
        frac[j] = (float)(src - a);
    }
}

idd_status idd_resize_bilinear_f32(float *out, const float *x, int N, int C, int H, int W, int Ho,
                                   int Wo, int mode) {
    if (N <= 0 || C <= 0 || H <= 0 || W <= 0 || Ho <= 0 || Wo <= 0 ||
        (mode != IDD_RESIZE_TF1 && mode != IDD_RESIZE_HALF_PIXEL))
        return idd_error("resize_bilinear: bad sizes: input (%d,%d,%d,%d) to %dx%d, mode %d", N, C,
                         H, W, Ho, Wo, mode);
    int *y0 = idd_workspace_get(0, sizeof(int) * 2 * (size_t)(Ho + Wo) + sizeof(float) * (Ho + Wo));
    if (!y0) return idd_error_status(IDD_ENOMEM, "resize_bilinear: out of memory");
    int *y1 = y0 + Ho, *x0 = y1 + Ho, *x1 = x0 + Wo;
    float *fy = (float *)(x1 + Wo), *fx = fy + Ho;
    axis_taps(y0, y1, fy, H, Ho, mode);
    axis_taps(x0, x1, fx, W, Wo, mode);
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)N * C; nc++) {
        const float *xp = x + (size_t)nc * H * W;
        float *op = out + (size_t)nc * Ho * Wo;
        for (int i = 0; i < Ho; i++) {
            const float *r0 = xp + (size_t)y0[i] * W, *r1 = xp + (size_t)y1[i] * W;
            float wy = fy[i];
            for (int j = 0; j < Wo; j++) {
                float wx = fx[j];
                float top = r0[x0[j]] + (r0[x1[j]] - r0[x0[j]]) * wx;
                float bot = r1[x0[j]] + (r1[x1[j]] - r1[x0[j]]) * wx;
                op[(size_t)i * Wo + j] = top + (bot - top) * wy;
            }
        }
    }
    return IDD_OK;
}
