/* conv2d.c — 2-D convolution as a differentiable op: shape checks, dispatch to the
 * backend's kernels (float32 NCHW; bf16 channels-last where the backend has them) and
 * the tape node; idd_conv2d_backward_of for norm_conv.c. Kernels: engine/cpu/conv2d.c,
 * engine/cuda/conv.cu. Dims: N batch, C/O channels, H W spatial, KH KW kernel. */
#include "ops_internal.h"

#include <string.h>

// ---------------------------------------------------------------- conv2d

/* saved: x, w (contiguous f32); ip: stride, pad_h, pad_w. A bf16 input (the fallback
 * of a bf16 x) gets dx back in its dtype and layout. */
static idd_status conv2d_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *x = n->saved[0], *w = n->saved[1], *gc = cf32(g);
    if (!gc) return IDD_ERR;
    idd_tensor *dx = n->needs[0] ? zeros_like_shape(x) : NULL;
    idd_tensor *dw = n->needs[1] ? zeros_like_shape(w) : NULL;
    idd_tensor *db = n->n_in > 2 && n->needs[2] ? idd_tensor_zeros(IDD_F32, w->device, 1, w->shape) : NULL;
    const idd_backend *be = idd_backend_of(x);
    int ph = (int)n->ip[1], pw = (int)n->ip[2];
    idd_status st;
    if (idd_backend_supports(be, IDD_K_CONV2D_HW, IDD_F32))
        st = be->conv2d_backward_hw(fp(dx), fp(dw), fp(db), fp(gc), fp(x), fp(w), (int)x->shape[0], (int)x->shape[1],
                                    (int)x->shape[2], (int)x->shape[3], (int)w->shape[0], (int)w->shape[2],
                                    (int)w->shape[3], (int)n->ip[0], ph, pw);
    else
        st = be->conv2d_backward(fp(dx), fp(dw), fp(db), fp(gc), fp(x), fp(w), (int)x->shape[0], (int)x->shape[1],
                                 (int)x->shape[2], (int)x->shape[3], (int)w->shape[0], (int)w->shape[2],
                                 (int)w->shape[3], (int)n->ip[0], ph);
    idd_tensor_release(gc);
    if (st == IDD_OK && dx && n->in[0]->dtype == IDD_BF16 && !(dx = as_layout_of(dx, n->in[0]))) st = IDD_ERR;
    gin[0] = dx; gin[1] = dw; gin[2] = db;
    return st;
}

/* the backend's bf16 channels-last kernels; saved: x (bf16 channels-last), w (contiguous
 * f32); ip: stride, pad. dx is written by the kernel (bf16 channels-last). */
static idd_status conv2d_backward_bf16(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *x = n->saved[0], *w = n->saved[1], *gc = cl_bf16(g);
    if (!gc) return IDD_ERR;
    idd_tensor *dx = n->needs[0] ? idd_tensor_new_channels_last(IDD_BF16, x->device, 4, x->shape) : NULL;
    idd_tensor *dw = n->needs[1] ? zeros_like_shape(w) : NULL;
    idd_tensor *db = n->n_in > 2 && n->needs[2] ? idd_tensor_zeros(IDD_F32, w->device, 1, w->shape) : NULL;
    idd_status st = (dx || !n->needs[0]) && (dw || !n->needs[1])
                        ? idd_backend_of(x)->conv2d_backward_bf16(
                              dx ? (uint16_t *)idd_data(dx) : NULL, fp(dw), fp(db), (const uint16_t *)idd_data(gc),
                              (const uint16_t *)idd_data(x), fp(w), (int)x->shape[0], (int)x->shape[1],
                              (int)x->shape[2], (int)x->shape[3], (int)w->shape[0], (int)w->shape[2], (int)w->shape[3],
                              (int)n->ip[0], (int)n->ip[1])
                        : IDD_ERR;
    idd_tensor_release(gc);
    gin[0] = dx; gin[1] = dw; gin[2] = db;
    return st;
}

/* x bf16 on a backend with bf16 conv kernels: out bf16 channels-last */
static idd_tensor *conv2d_bf16(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad, int64_t Ho,
                               int64_t Wo) {
    const idd_backend *be = idd_backend_of(x);
    idd_tensor *xc = cl_bf16(x), *wc = xc ? cf32(w) : NULL, *bc = wc ? cf32(b) : NULL;
    int64_t shape[4] = {x->shape[0], w->shape[0], Ho, Wo};
    idd_tensor *out = wc && (bc || !b) ? idd_tensor_new_channels_last(IDD_BF16, x->device, 4, shape) : NULL;
    idd_status st = out ? be->conv2d_forward_bf16((uint16_t *)idd_data(out), (const uint16_t *)idd_data(xc), fp(wc),
                                                  fp(bc), (int)x->shape[0], (int)x->shape[1], (int)x->shape[2],
                                                  (int)x->shape[3], (int)w->shape[0], (int)w->shape[2],
                                                  (int)w->shape[3], stride, pad)
                        : IDD_ERR;
    if (st == IDD_OK) {
        idd_tensor *ins[3] = {x, w, b};
        idd_node *n = idd_record("conv2d", conv2d_backward_bf16, out, b ? 3 : 2, ins);
        if (n) { idd_node_save(n, xc); idd_node_save(n, wc); n->ip[0] = stride; n->ip[1] = pad; }
    } else {
        idd_tensor_release(out);
        out = NULL;
    }
    idd_tensor_release(xc); idd_tensor_release(wc); idd_tensor_release(bc);
    return out;
}

idd_tensor *idd_conv2d(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad) {
    return idd_conv2d_hw(x, w, b, stride, pad, pad);
}

idd_tensor *idd_conv2d_hw(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad_h, int pad_w) {
    char sx[96], sw[96], sb[96];
    if (x->ndim != 4 || w->ndim != 4) {
        idd_error("conv2d: expected input (N,C,H,W) and weight (O,C,KH,KW), got %s and %s", idd_shape_str(x, sx, 96),
                  idd_shape_str(w, sw, 96));
        return NULL;
    }
    if (x->shape[1] != w->shape[1]) {
        idd_error("conv2d: input %s has %lld channels, weight %s expects %lld", idd_shape_str(x, sx, 96),
                  (long long)x->shape[1], idd_shape_str(w, sw, 96), (long long)w->shape[1]);
        return NULL;
    }
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) {
        idd_error("conv2d: bias %s does not match weight %s", idd_shape_str(b, sb, 96), idd_shape_str(w, sw, 96));
        return NULL;
    }
    if (stride < 1 || pad_h < 0 || pad_w < 0) {
        idd_error("conv2d: stride %d / padding (%d,%d) out of range", stride, pad_h, pad_w);
        return NULL;
    }
    int64_t Ho = (x->shape[2] + 2 * pad_h - w->shape[2]) / stride + 1, Wo = (x->shape[3] + 2 * pad_w - w->shape[3]) / stride + 1;
    if (x->shape[2] + 2 * pad_h < w->shape[2] || x->shape[3] + 2 * pad_w < w->shape[3]) {
        idd_error("conv2d: kernel %s larger than padded input %s", idd_shape_str(w, sw, 96), idd_shape_str(x, sx, 96));
        return NULL;
    }
    if (takes_bf16(x, IDD_K_CONV2D, pad_h == pad_w)) return conv2d_bf16(x, w, b, stride, pad_h, Ho, Wo);
    bool hw = pad_h != pad_w;
    const idd_backend *be = op_backend(x, hw ? IDD_K_CONV2D_HW : IDD_K_CONV2D, hw ? "conv2d with pad_h != pad_w" : "conv2d");
    if (!be) return NULL;
    /* float32 kernels; a bf16 x without bf16 kernels (the CPU) is converted to f32 and
     * gets its result back in bf16, in x's layout */
    idd_tensor *xc = cf32(x), *wc = xc ? cf32(w) : NULL, *bc = wc ? cf32(b) : NULL;
    int64_t shape[4] = {x->shape[0], w->shape[0], Ho, Wo};
    idd_tensor *out = wc && (bc || !b) ? idd_tensor_new(IDD_F32, x->device, 4, shape) : NULL;
    idd_status st = IDD_ERR;
    if (out && idd_backend_supports(be, IDD_K_CONV2D_HW, IDD_F32))
        st = be->conv2d_forward_hw(fp(out), fp(xc), fp(wc), fp(bc), (int)x->shape[0], (int)x->shape[1], (int)x->shape[2],
                                   (int)x->shape[3], (int)w->shape[0], (int)w->shape[2], (int)w->shape[3], stride, pad_h,
                                   pad_w);
    else if (out)
        st = be->conv2d_forward(fp(out), fp(xc), fp(wc), fp(bc), (int)x->shape[0], (int)x->shape[1], (int)x->shape[2],
                                (int)x->shape[3], (int)w->shape[0], (int)w->shape[2], (int)w->shape[3], stride, pad_h);
    if (st == IDD_OK && x->dtype == IDD_BF16 && !(out = as_layout_of(out, x))) st = IDD_ERR;
    if (st == IDD_OK) {
        idd_tensor *ins[3] = {x, w, b};
        idd_node *n = idd_record("conv2d", conv2d_backward, out, b ? 3 : 2, ins);
        if (n) { idd_node_save(n, xc); idd_node_save(n, wc); n->ip[0] = stride; n->ip[1] = pad_h; n->ip[2] = pad_w; }
    } else {
        idd_tensor_release(out);
        out = NULL;
    }
    idd_tensor_release(xc); idd_tensor_release(wc); idd_tensor_release(bc);
    return out;
}

/* conv2d's backward for idd_conv2d_hw(x, w, b, stride, pad_h, pad_w) without running its
 * forward (norm_conv, engine/ops/norm_conv.c, recomputes x in its backward): the same dispatch
 * and the same backward as the recorded op; gin[0..2] = dx, dw, db where needs[i]. */
idd_status idd_conv2d_backward_of(idd_tensor *x, idd_tensor *w, bool has_bias, int stride, int pad_h, int pad_w,
                                  idd_tensor *g, const bool needs[3], idd_tensor **gin) {
    bool bf = takes_bf16(x, IDD_K_CONV2D, pad_h == pad_w);
    idd_node n;
    memset(&n, 0, sizeof n);
    n.name = "conv2d";
    n.n_in = has_bias ? 3 : 2;
    n.in[0] = x; n.in[1] = w;
    for (int k = 0; k < 3; k++) n.needs[k] = needs[k];
    n.ip[0] = stride; n.ip[1] = pad_h; n.ip[2] = pad_w;
    idd_tensor *xc = bf ? cl_bf16(x) : cf32(x), *wc = xc ? cf32(w) : NULL;
    idd_status st = IDD_ERR;
    if (wc) {
        n.saved[0] = xc; n.saved[1] = wc; n.n_saved = 2;
        st = bf ? conv2d_backward_bf16(&n, g, gin) : conv2d_backward(&n, g, gin);
    }
    idd_tensor_release(xc); idd_tensor_release(wc);
    return st;
}

