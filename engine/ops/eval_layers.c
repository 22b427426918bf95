/* eval_layers.c — forward-only layer ops used by the evaluation networks (the FID
 * Inception): general max / average pooling, bilinear resize, and conv2d + ReLU (the
 * BN-folded BasicConv2d: the conv's fresh output is clamped in place, no second tensor). They record no tape
 * node (feature extraction never differentiates through them); each checks shapes,
 * makes its input contiguous float32 (uint8 images are converted) and dispatches to the
 * backend kernel (kernels.h). */
#include "iddpm/backend.h"
#include "iddpm/kernels.h"
#include "iddpm/nn.h"

static idd_tensor *cf32(idd_tensor *t) {
    if (t->dtype == IDD_F32) return idd_contiguous(t);
    return idd_to_dtype(t, IDD_F32);
}

static const idd_backend *check4(const char *op, idd_tensor *x, idd_kernel k) {
    char sx[96];
    if (x->ndim != 4) {
        idd_error("%s: input %s must be (N,C,H,W)", op, idd_shape_str(x, sx, 96));
        return NULL;
    }
    if (x->requires_grad) {
        idd_error("%s: forward-only op; call it under no_grad or on a detached input", op);
        return NULL;
    }
    const idd_backend *be = idd_backend_of(x);
    if (!idd_backend_supports(be, k, IDD_F32)) {
        idd_error("%s: not implemented on %s", op, idd_device_name(x->device));
        return NULL;
    }
    return be;
}

static idd_tensor *pool(idd_tensor *x, int k, int stride, int pad, int avg, int cip) {
    const char *op = avg ? "avg_pool2d" : "max_pool2d";
    const idd_backend *be = check4(op, x, avg ? IDD_K_AVGPOOL2D : IDD_K_MAXPOOL2D);
    if (!be) return NULL;
    int N = (int)x->shape[0], C = (int)x->shape[1], H = (int)x->shape[2], W = (int)x->shape[3];
    int Ho = idd_pool2d_out_size(H, k, stride, pad), Wo = idd_pool2d_out_size(W, k, stride, pad);
    if (k < 1 || stride < 1 || pad < 0 || 2 * pad > k || Ho <= 0 || Wo <= 0) {
        char sx[96];
        idd_error("%s: window %d, stride %d, pad %d does not fit input %s (pad at most half the window)", op, k,
                  stride, pad, idd_shape_str(x, sx, 96));
        return NULL;
    }
    int64_t shape[4] = {N, C, Ho, Wo};
    idd_tensor *xc = cf32(x), *out = xc ? idd_tensor_new(IDD_F32, x->device, 4, shape) : NULL;
    idd_status st = IDD_ERR;
    if (out)
        st = avg ? be->avgpool2d_forward(idd_data(out), idd_data(xc), N, C, H, W, k, stride, pad, cip)
                 : be->maxpool2d_forward(idd_data(out), idd_data(xc), N, C, H, W, k, stride, pad);
    idd_tensor_release(xc);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    return out;
}

idd_tensor *idd_max_pool2d(idd_tensor *x, int k, int stride, int pad) { return pool(x, k, stride, pad, 0, 0); }

idd_tensor *idd_avg_pool2d(idd_tensor *x, int k, int stride, int pad, bool count_include_pad) {
    return pool(x, k, stride, pad, 1, count_include_pad);
}

idd_tensor *idd_resize_bilinear(idd_tensor *x, int Ho, int Wo, int mode) {
    const idd_backend *be = check4("resize_bilinear", x, IDD_K_RESIZE);
    if (!be) return NULL;
    if (Ho < 1 || Wo < 1 || (mode != IDD_RESIZE_TF1 && mode != IDD_RESIZE_HALF_PIXEL)) {
        idd_error("resize_bilinear: bad output size %dx%d or mode %d", Ho, Wo, mode);
        return NULL;
    }
    int N = (int)x->shape[0], C = (int)x->shape[1], H = (int)x->shape[2], W = (int)x->shape[3];
    int64_t shape[4] = {N, C, Ho, Wo};
    idd_tensor *xc = cf32(x), *out = xc ? idd_tensor_new(IDD_F32, x->device, 4, shape) : NULL;
    idd_status st = out ? be->resize_bilinear(idd_data(out), idd_data(xc), N, C, H, W, Ho, Wo, mode) : IDD_ERR;
    idd_tensor_release(xc);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    return out;
}

/* relu(conv2d(x, w, b)) for the evaluation nets: the conv as idd_conv2d_hw (every shape
 * check and kernel choice is its own), then max(0, .) in place on its new output, which
 * saves the allocation and the second pass of a separate maximum op. CPU only. */
idd_tensor *idd_conv2d_relu(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad_h, int pad_w) {
    char sx[96];
    if (x->device != IDD_CPU || x->requires_grad || w->requires_grad || (b && b->requires_grad)) {
        idd_error("conv2d_relu: forward-only CPU op; input %s on %s%s", idd_shape_str(x, sx, 96),
                  idd_device_name(x->device), x->requires_grad || w->requires_grad ? " requires grad" : "");
        return NULL;
    }
    idd_tensor *y = idd_conv2d_hw(x, w, b, stride, pad_h, pad_w);
    if (!y) return NULL;
    if (y->dtype != IDD_F32 || !idd_is_contiguous(y)) {
        idd_error("conv2d_relu: expected a float32 input, got %s", idd_shape_str(x, sx, 96));
        idd_tensor_release(y);
        return NULL;
    }
    float *d = idd_data(y);
    const long n = (long)idd_numel(y);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (long i = 0; i < n; i++) d[i] = d[i] > 0.0f ? d[i] : (d[i] != d[i] ? d[i] : 0.0f);   /* NaN stays */
    return y;
}
