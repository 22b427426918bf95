/* layers.c — the UNet layer ops as differentiable tensor ops: conv2d, group norm with
 * scale-shift and SiLU, QKV attention, nearest upsample, average pool, timestep
 * embedding, dropout. Each forward is followed by its backward; both dispatch to the
 * backend's kernels (kernels.h on the CPU). Dim letters: N batch, C/O channels, H W
 * spatial, G groups, T positions, B batch of attention. */
#include "iddpm/nn.h"
#include "iddpm/kernels.h"

#include <stdint.h>
#include <string.h>

/* contiguous float32 copy-or-reference of t (NULL stays NULL) */
static idd_tensor *cf32(idd_tensor *t) {
    if (!t) return NULL;
    if (t->dtype == IDD_F32) return idd_contiguous(t);
    return idd_to_dtype(t, IDD_F32);
}

static float *fp(idd_tensor *t) { return t ? (float *)idd_data(t) : NULL; }

static idd_tensor *zeros_like_shape(idd_tensor *t) {
    return t ? idd_tensor_zeros(IDD_F32, t->device, t->ndim, t->shape) : NULL;
}

static idd_status no_kernel(const char *op, idd_device dev) {
    return idd_error("%s: not implemented on %s", op, idd_device_name(dev));
}

/* t's memory is (N, HW, C): channels-last, or contiguous where C or HW is 1 */
static bool nhwc_dense(const idd_tensor *t) {
    if (idd_is_channels_last(t)) return true;
    if (t->ndim < 2 || !idd_is_contiguous(t)) return false;
    return t->shape[1] == 1 || idd_numel(t) == t->shape[0] * t->shape[1];
}

static bool aligned16(const idd_tensor *t) { return ((uintptr_t)idd_data(t) & 15) == 0; }

/* bf16 (N, HW, C) memory, 16-byte aligned: t itself (retained) or a channels-last copy;
 * the layout of the backends' bf16 layer kernels (NULL stays NULL) */
static idd_tensor *cl_bf16(idd_tensor *t) {
    if (!t) return NULL;
    if (t->dtype == IDD_BF16 && nhwc_dense(t) && aligned16(t)) { idd_tensor_retain(t); return t; }
    idd_tensor *c = idd_tensor_new_channels_last(IDD_BF16, t->device, t->ndim, t->shape);
    if (c && idd_copy_(c, t) != IDD_OK) { idd_tensor_release(c); return NULL; }
    return c;
}

/* r (a result or gradient of an op on `like`, r's own shape) in like's dtype and layout
 * (channels-last if like is, else contiguous): r itself when it already is, else a
 * converted copy; r is consumed. A float32 like returns r (the float32 paths). */
static idd_tensor *as_layout_of(idd_tensor *r, const idd_tensor *like) {
    if (!r || like->dtype == IDD_F32) return r;
    bool cl = idd_is_channels_last(like);
    if (r->dtype == like->dtype && (cl ? nhwc_dense(r) : idd_is_contiguous(r))) return r;
    idd_tensor *c = cl ? idd_tensor_new_channels_last(like->dtype, r->device, r->ndim, r->shape)
                       : idd_tensor_new(like->dtype, r->device, r->ndim, r->shape);
    if (c && idd_copy_(c, r) != IDD_OK) { idd_tensor_release(c); c = NULL; }
    idd_tensor_release(r);
    return c;
}

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
    if (be->conv2d_backward_hw)
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
    const idd_backend *be = idd_backend_of(x);
    if (x->dtype == IDD_BF16 && pad_h == pad_w && be->conv2d_forward_bf16 && be->conv2d_backward_bf16)
        return conv2d_bf16(x, w, b, stride, pad_h, Ho, Wo);
    if (!be->conv2d_forward || (pad_h != pad_w && !(be->conv2d_forward_hw && be->conv2d_backward_hw))) {
        no_kernel(pad_h != pad_w ? "conv2d with pad_h != pad_w" : "conv2d", x->device);
        return NULL;
    }
    /* float32 kernels; a bf16 x without bf16 kernels (the CPU) is converted to f32 and
     * gets its result back in bf16, in x's layout */
    idd_tensor *xc = cf32(x), *wc = xc ? cf32(w) : NULL, *bc = wc ? cf32(b) : NULL;
    int64_t shape[4] = {x->shape[0], w->shape[0], Ho, Wo};
    idd_tensor *out = wc && (bc || !b) ? idd_tensor_new(IDD_F32, x->device, 4, shape) : NULL;
    idd_status st = IDD_ERR;
    if (out && be->conv2d_forward_hw)
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
 * forward (norm_conv, engine/nn/fused.c, recomputes x in its backward): the same dispatch
 * and the same backward as the recorded op; gin[0..2] = dx, dw, db where needs[i]. */
idd_status idd_conv2d_backward_of(idd_tensor *x, idd_tensor *w, bool has_bias, int stride, int pad_h, int pad_w,
                                  idd_tensor *g, const bool needs[3], idd_tensor **gin) {
    const idd_backend *be = idd_backend_of(x);
    bool bf = x->dtype == IDD_BF16 && pad_h == pad_w && be->conv2d_forward_bf16 && be->conv2d_backward_bf16;
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

// ---------------------------------------------------------------- bf16 activations (group norm, resampling, dropout)

/* A bf16 input takes the backend's bf16 kernel when it has one (channels-last
 * (N,HW,C) memory, C % 8 == 0); otherwise the op computes in float32 (cf32) and converts
 * its result to the input's dtype and layout (as_layout_of). float32 inputs never come here. */

/* a float32 (N,C[,1..]) view whose channels are adjacent: its row stride, else -1 */
static int64_t row_stride(const idd_tensor *t) {
    if (!t || t->dtype != IDD_F32 || t->ndim < 2 || (t->shape[1] > 1 && t->stride[1] != 1)) return -1;
    for (int d = 2; d < t->ndim; d++) if (t->shape[d] != 1) return -1;
    int64_t s = t->shape[0] > 1 ? t->stride[0] : t->shape[1];
    return s > 0 && s <= INT32_MAX ? s : -1;
}

/* scale/shift for the bf16 kernel: the view itself when row_stride allows, else a copy */
static idd_tensor *rows_f32(idd_tensor *t) {
    if (!t) return NULL;
    if (row_stride(t) > 0) { idd_tensor_retain(t); return t; }
    return cf32(t);
}

// ---------------------------------------------------------------- group norm

/* the bf16 kernel's backward (p[0] set): x bf16 (N,HW,C); scale/shift rows of stride ip[6]/ip[7] */
static idd_status group_norm_backward_bf16(idd_node *n, idd_tensor *g, idd_tensor **gin, idd_tensor *const sv[4]) {
    idd_tensor *x = n->saved[0], *mean = n->saved[1], *rstd = n->saved[2], *gb = cl_bf16(g);
    if (!gb) return IDD_ERR;
    int N = (int)x->shape[0], C = (int)x->shape[1], HW = (int)(idd_numel(x) / ((int64_t)N * C));
    idd_tensor *dx = n->needs[0] ? idd_tensor_new_channels_last(IDD_BF16, x->device, x->ndim, x->shape) : NULL;
    idd_tensor *d[4] = {NULL, NULL, NULL, NULL};
    for (int k = 0; k < 4; k++) if (n->needs[1 + k] && sv[k]) d[k] = zeros_like_shape(sv[k]);
    idd_status st = idd_backend_of(x)->groupnorm_backward_bf16(
        dx ? idd_data(dx) : NULL, fp(d[0]), fp(d[1]), fp(d[2]), fp(d[3]), idd_data(gb), fp(mean), fp(rstd),
        idd_data(x), fp(sv[0]), fp(sv[1]), fp(sv[2]), (int)n->ip[6], fp(sv[3]), (int)n->ip[7], N, C, HW,
        (int)n->ip[0], (int)n->ip[1]);
    idd_tensor_release(gb);
    gin[0] = as_layout_of(dx, n->in[0]);
    for (int k = 0; k < 4; k++) gin[1 + k] = d[k];
    return st;
}

/* saved: x, mean, rstd, gamma, beta, scale, shift (NULL kept as absent via ip flags) */
static idd_status group_norm_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *x = n->saved[0], *mean = n->saved[1], *rstd = n->saved[2];
    idd_tensor *sv[4] = {NULL, NULL, NULL, NULL};   /* gamma, beta, scale, shift */
    for (int k = 0, j = 3; k < 4; k++) if (n->ip[2 + k]) sv[k] = n->saved[j++];
    if (n->p[0]) return group_norm_backward_bf16(n, g, gin, sv);
    idd_tensor *gc = cf32(g);
    if (!gc) return IDD_ERR;
    int N = (int)x->shape[0], C = (int)x->shape[1], HW = (int)(idd_numel(x) / ((int64_t)N * C));
    /* the CPU kernel can write dx instead of adding to zeros: no fill, one read less */
    const idd_backend *be = idd_backend_of(x);
    bool into = be->groupnorm_backward == idd_groupnorm_backward_f32;
    idd_tensor *dx = !n->needs[0] ? NULL
                     : into ? idd_tensor_new(IDD_F32, x->device, n->in[0]->ndim, n->in[0]->shape)
                            : zeros_like_shape(n->in[0]);
    idd_tensor *d[4] = {NULL, NULL, NULL, NULL};
    for (int k = 0; k < 4; k++) if (n->needs[1 + k] && sv[k]) d[k] = zeros_like_shape(sv[k]);
    idd_status st = (into ? idd_groupnorm_backward_into_f32 : be->groupnorm_backward)(
        fp(dx), fp(d[0]), fp(d[1]), fp(d[2]), fp(d[3]), fp(gc), fp(mean), fp(rstd), fp(x), fp(sv[0]), fp(sv[1]),
        fp(sv[2]), fp(sv[3]), N, C, HW, (int)n->ip[0], (int)n->ip[1]);
    idd_tensor_release(gc);
    gin[0] = as_layout_of(dx, n->in[0]);
    for (int k = 0; k < 4; k++) gin[1 + k] = d[k];
    return st;
}

idd_tensor *idd_group_norm(idd_tensor *x, int groups, idd_tensor *gamma, idd_tensor *beta, idd_tensor *scale,
                           idd_tensor *shift, bool silu, double eps) {
    char sx[96], so[96];
    if (x->ndim < 2) { idd_error("group_norm: input %s needs (N,C,...)", idd_shape_str(x, sx, 96)); return NULL; }
    int64_t N = x->shape[0], C = x->shape[1];
    if (groups < 1 || C % groups) {
        idd_error("group_norm: %lld channels of %s are not divisible into %d groups", (long long)C, idd_shape_str(x, sx, 96), groups);
        return NULL;
    }
    idd_tensor *vec[2] = {gamma, beta};
    for (int k = 0; k < 2; k++)
        if (vec[k] && idd_numel(vec[k]) != C) {
            idd_error("group_norm: %s %s does not match %lld channels of input %s", k ? "bias" : "weight",
                      idd_shape_str(vec[k], so, 96), (long long)C, idd_shape_str(x, sx, 96));
            return NULL;
        }
    idd_tensor *ss[2] = {scale, shift};
    for (int k = 0; k < 2; k++)
        if (ss[k] && (idd_numel(ss[k]) != N * C || ss[k]->shape[0] != N)) {
            idd_error("group_norm: %s %s must be (N,C) = (%lld,%lld) for input %s", k ? "shift" : "scale",
                      idd_shape_str(ss[k], so, 96), (long long)N, (long long)C, idd_shape_str(x, sx, 96));
            return NULL;
        }
    const idd_backend *be = idd_backend_of(x);
    if (!be->groupnorm_forward) { no_kernel("group_norm", x->device); return NULL; }
    bool bf = x->dtype == IDD_BF16 && be->groupnorm_forward_bf16 && be->groupnorm_backward_bf16 && C % 8 == 0 &&
              C <= 1024 && N > 0;
    idd_tensor *xc = bf ? cl_bf16(x) : cf32(x), *gc = cf32(gamma), *bc = cf32(beta);
    idd_tensor *sc = bf ? rows_f32(scale) : cf32(scale), *hc = bf ? rows_f32(shift) : cf32(shift);
    int64_t ng[2] = {N, groups};
    idd_tensor *out = !xc ? NULL
                      : bf ? idd_tensor_new_channels_last(IDD_BF16, x->device, x->ndim, x->shape)
                           : idd_tensor_new(IDD_F32, x->device, x->ndim, x->shape);
    idd_tensor *mean = idd_tensor_new(IDD_F32, x->device, 2, ng), *rstd = idd_tensor_new(IDD_F32, x->device, 2, ng);
    bool ready = out && mean && rstd && (gc || !gamma) && (bc || !beta) && (sc || !scale) && (hc || !shift);
    int HW = N * C > 0 ? (int)(idd_numel(x) / (N * C)) : 0, sstr = sc ? (int)row_stride(sc) : 0,
        hstr = hc ? (int)row_stride(hc) : 0;
    idd_status st = !ready ? IDD_ERR
                    : bf   ? be->groupnorm_forward_bf16(idd_data(out), fp(mean), fp(rstd), idd_data(xc), fp(gc), fp(bc),
                                                        fp(sc), sstr, fp(hc), hstr, (int)N, (int)C, HW, groups, (float)eps,
                                                        silu)
                           : be->groupnorm_forward(fp(out), fp(mean), fp(rstd), fp(xc), fp(gc), fp(bc), fp(sc),
                                                   fp(hc), (int)N, (int)C, HW, groups, (float)eps, silu);
    if (st == IDD_OK && !bf && x->dtype == IDD_BF16) {
        out = as_layout_of(out, x);
        if (!out) st = IDD_ERR;
    }
    if (st == IDD_OK) {
        idd_tensor *ins[5] = {x, gamma, beta, scale, shift};
        idd_node *n = idd_record("group_norm", group_norm_backward, out, 5, ins);
        if (n) {
            idd_node_save(n, xc); idd_node_save(n, mean); idd_node_save(n, rstd);
            idd_tensor *opt[4] = {gc, bc, sc, hc};
            for (int k = 0; k < 4; k++) { n->ip[2 + k] = opt[k] != NULL; if (opt[k]) idd_node_save(n, opt[k]); }
            n->ip[0] = groups;
            n->ip[1] = silu;
            n->p[0] = bf;
            n->ip[6] = sstr;
            n->ip[7] = hstr;
        }
    } else {
        idd_tensor_release(out);
        out = NULL;
    }
    idd_tensor_release(xc); idd_tensor_release(gc); idd_tensor_release(bc); idd_tensor_release(sc);
    idd_tensor_release(hc); idd_tensor_release(mean); idd_tensor_release(rstd);
    return out;
}

// ---------------------------------------------------------------- attention

/* saved: qkv, weight; ip: heads. A bf16 qkv of the fallback gets dqkv back in bf16, in
 * its layout. */
static idd_status attention_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *qkv = n->saved[0], *w = n->saved[1], *gc = cf32(g);
    if (!gc) return IDD_ERR;
    idd_tensor *dq = zeros_like_shape(qkv);
    int B = (int)qkv->shape[0], C = (int)qkv->shape[1] / 3, T = (int)qkv->shape[2];
    idd_status st = dq ? idd_backend_of(qkv)->attention_backward(fp(dq), fp(gc), fp(w), fp(qkv), B, C, T, (int)n->ip[0])
                       : IDD_ERR;
    idd_tensor_release(gc);
    if (st == IDD_OK && n->in[0]->dtype == IDD_BF16 && !(dq = as_layout_of(dq, n->in[0]))) st = IDD_ERR;
    gin[0] = dq;
    return st;
}

/* the backend's bf16 kernels; saved: qkv (bf16 channels-last), weight (bf16 (B*H,T,T));
 * ip: heads. dqkv is written by the kernel (bf16 channels-last). */
static idd_status attention_backward_bf16(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *qkv = n->saved[0], *w = n->saved[1], *gc = cl_bf16(g);
    if (!gc) return IDD_ERR;
    idd_tensor *dq = idd_tensor_new_channels_last(IDD_BF16, qkv->device, 3, qkv->shape);
    int B = (int)qkv->shape[0], C = (int)qkv->shape[1] / 3, T = (int)qkv->shape[2];
    idd_status st = dq ? idd_backend_of(qkv)->attention_backward_bf16(
                             (uint16_t *)idd_data(dq), (const uint16_t *)idd_data(gc), (const uint16_t *)idd_data(w),
                             (const uint16_t *)idd_data(qkv), B, C, T, (int)n->ip[0])
                       : IDD_ERR;
    idd_tensor_release(gc);
    gin[0] = dq;
    return st;
}

/* the forward's end: on success the node (saving qkv as the kernel read it, qc, and the
 * softmax weights w), on failure no result; the caller's references to qc, w are dropped */
static idd_tensor *attention_record(idd_status st, idd_tensor *out, idd_tensor *qkv, idd_tensor *qc, idd_tensor *w,
                                    int heads, idd_backward_fn bw) {
    if (st == IDD_OK) {
        idd_node *n = idd_record("qkv_attention", bw, out, 1, &qkv);
        if (n) { idd_node_save(n, qc); idd_node_save(n, w); n->ip[0] = heads; }
    } else {
        idd_tensor_release(out);
        out = NULL;
    }
    idd_tensor_release(qc);
    idd_tensor_release(w);
    return out;
}

/* qkv bf16 on a backend with bf16 attention kernels: out bf16 channels-last (B,C,T) */
static idd_tensor *qkv_attention_bf16(idd_tensor *qkv, int heads) {
    int64_t B = qkv->shape[0], C = qkv->shape[1] / 3, T = qkv->shape[2];
    int64_t oshape[3] = {B, C, T}, wshape[3] = {B * heads, T, T};
    idd_tensor *qc = cl_bf16(qkv), *out = idd_tensor_new_channels_last(IDD_BF16, qkv->device, 3, oshape);
    idd_tensor *w = idd_tensor_new(IDD_BF16, qkv->device, 3, wshape);
    idd_status st = qc && out && w ? idd_backend_of(qkv)->attention_forward_bf16(
                                         (uint16_t *)idd_data(out), (uint16_t *)idd_data(w),
                                         (const uint16_t *)idd_data(qc), (int)B, (int)C, (int)T, heads)
                                   : IDD_ERR;
    return attention_record(st, out, qkv, qc, w, heads, attention_backward_bf16);
}

idd_tensor *idd_qkv_attention(idd_tensor *qkv, int heads) {
    char sq[96];
    if (qkv->ndim != 3 || qkv->shape[1] % 3 || heads < 1 || (qkv->shape[1] / 3) % heads) {
        idd_error("qkv_attention: qkv %s must be (B, 3C, T) with C divisible by %d heads", idd_shape_str(qkv, sq, 96), heads);
        return NULL;
    }
    const idd_backend *be = idd_backend_of(qkv);
    if (qkv->dtype == IDD_BF16 && be->attention_forward_bf16 && be->attention_backward_bf16)
        return qkv_attention_bf16(qkv, heads);
    if (!be->attention_forward) { no_kernel("qkv_attention", qkv->device); return NULL; }
    int64_t B = qkv->shape[0], C = qkv->shape[1] / 3, T = qkv->shape[2];
    int64_t oshape[3] = {B, C, T}, wshape[3] = {B * heads, T, T};
    idd_tensor *qc = cf32(qkv), *out = idd_tensor_new(IDD_F32, qkv->device, 3, oshape);
    /* the softmax is kept only for a backward; without one the CPU kernel keeps each
     * head's (T,T) block in a per-thread scratch that stays in cache */
    bool keep = qkv->device != IDD_CPU || idd_any_requires_grad(1, &qkv);
    idd_tensor *w = keep ? idd_tensor_new(IDD_F32, qkv->device, 3, wshape) : NULL;
    idd_status st = qc && out && (w || !keep)
                        ? be->attention_forward(fp(out), w ? fp(w) : NULL, fp(qc), (int)B, (int)C, (int)T, heads)
                        : IDD_ERR;
    /* a bf16 qkv without bf16 kernels (the CPU): the f32 result back in bf16, qkv's layout */
    if (st == IDD_OK && qkv->dtype == IDD_BF16 && !(out = as_layout_of(out, qkv))) st = IDD_ERR;
    return attention_record(st, out, qkv, qc, w, heads, attention_backward);
}

// ---------------------------------------------------------------- resampling

/* ip[0]: 1 = upsample, 0 = avgpool; ip[1]: the bf16 kernels ran; the input's shape
 * comes from the node's input */
static idd_status resample_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *x = n->in[0];
    const idd_backend *be = idd_backend_of(x);
    int N = (int)x->shape[0], C = (int)x->shape[1], H = (int)x->shape[2], W = (int)x->shape[3];
    idd_status st;
    if (n->ip[1]) {
        idd_tensor *gb = cl_bf16(g), *dx = idd_tensor_new_channels_last(IDD_BF16, x->device, 4, x->shape);
        st = gb && dx ? (n->ip[0] ? be->upsample2x_backward_bf16(idd_data(dx), idd_data(gb), N, C, H, W)
                                  : be->avgpool2x_backward_bf16(idd_data(dx), idd_data(gb), N, C, H, W))
                      : IDD_ERR;
        idd_tensor_release(gb);
        gin[0] = as_layout_of(dx, x);
        return st;
    }
    idd_tensor *gc = cf32(g), *dx = zeros_like_shape(x);
    st = gc && dx ? (n->ip[0] ? be->upsample2x_backward(fp(dx), fp(gc), N, C, H, W)
                              : be->avgpool2x_backward(fp(dx), fp(gc), N, C, H, W))
                  : IDD_ERR;
    idd_tensor_release(gc);
    gin[0] = as_layout_of(dx, x);
    return st;
}

static idd_tensor *resample(idd_tensor *x, bool up) {
    char sx[96];
    const char *name = up ? "upsample_nearest" : "avg_pool2d";
    if (x->ndim != 4) { idd_error("%s: input %s must be (N,C,H,W)", name, idd_shape_str(x, sx, 96)); return NULL; }
    const idd_backend *be = idd_backend_of(x);
    if (!(up ? be->upsample2x_forward : be->avgpool2x_forward)) { no_kernel(name, x->device); return NULL; }
    int64_t shape[4] = {x->shape[0], x->shape[1], up ? 2 * x->shape[2] : x->shape[2] / 2, up ? 2 * x->shape[3] : x->shape[3] / 2};
    int N = (int)x->shape[0], C = (int)x->shape[1], H = (int)x->shape[2], W = (int)x->shape[3];
    bool bf = x->dtype == IDD_BF16 && C % 8 == 0 &&
              (up ? be->upsample2x_forward_bf16 && be->upsample2x_backward_bf16
                  : be->avgpool2x_forward_bf16 && be->avgpool2x_backward_bf16);
    idd_tensor *xc = bf ? cl_bf16(x) : cf32(x);
    idd_tensor *out = bf ? idd_tensor_new_channels_last(IDD_BF16, x->device, 4, shape)
                         : idd_tensor_new(IDD_F32, x->device, 4, shape);
    idd_status st = !xc || !out ? IDD_ERR
                    : bf ? (up ? be->upsample2x_forward_bf16(idd_data(out), idd_data(xc), N, C, H, W)
                               : be->avgpool2x_forward_bf16(idd_data(out), idd_data(xc), N, C, H, W))
                         : (up ? be->upsample2x_forward(fp(out), fp(xc), N, C, H, W)
                               : be->avgpool2x_forward(fp(out), fp(xc), N, C, H, W));
    idd_tensor_release(xc);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    if (!bf && !(out = as_layout_of(out, x))) return NULL;
    idd_node *n = idd_record(name, resample_backward, out, 1, &x);
    if (n) { n->ip[0] = up; n->ip[1] = bf; }
    return out;
}

idd_tensor *idd_upsample_nearest2x(idd_tensor *x) { return resample(x, true); }
idd_tensor *idd_avg_pool2x(idd_tensor *x) { return resample(x, false); }

// ---------------------------------------------------------------- timestep embedding

idd_tensor *idd_timestep_embedding(idd_tensor *t, int dim, double max_period) {
    char st_[96];
    if (t->ndim != 1 || dim < 1) { idd_error("timestep_embedding: t %s must be (N) and dim >= 1", idd_shape_str(t, st_, 96)); return NULL; }
    const idd_backend *be = idd_backend_of(t);
    int64_t shape[2] = {t->shape[0], dim};
    idd_tensor *tc = cf32(t), *out = idd_tensor_new(IDD_F32, t->device, 2, shape);
    idd_status st = tc && out ? be->timestep_embedding(fp(out), fp(tc), (int)t->shape[0], dim, (float)max_period) : IDD_ERR;
    idd_tensor_release(tc);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    return out;
}

// ---------------------------------------------------------------- dropout

/* p[0] = p; ip: seed, stream, offset of the mask; ip[3]: the bf16 kernel ran on memory of
 * layout ip[4] (1 channels-last, 0 contiguous), the layout its mask is indexed by */
static idd_status dropout_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *x = n->in[0];
    if (n->ip[3]) {
        idd_tensor *gb = n->ip[4] ? cl_bf16(g) : NULL;
        if (!n->ip[4]) gb = g->dtype == IDD_BF16 ? idd_contiguous(g) : idd_to_dtype(g, IDD_BF16);
        idd_tensor *dx = gb ? idd_tensor_empty_like(gb, IDD_BF16) : NULL;
        idd_status st = dx ? idd_backend_of(x)->dropout_backward_bf16(idd_data(dx), idd_data(gb), idd_numel(dx),
                                                                      (float)n->p[0], (uint64_t)n->ip[0],
                                                                      (uint64_t)n->ip[1], (uint64_t)n->ip[2])
                           : IDD_ERR;
        idd_tensor_release(gb);
        gin[0] = as_layout_of(dx, x);
        return st;
    }
    idd_tensor *gc = cf32(g), *dx = zeros_like_shape(x);
    idd_status st = gc && dx ? idd_backend_of(dx)->dropout_backward(fp(dx), fp(gc), idd_numel(dx), (float)n->p[0],
                                                                    (uint64_t)n->ip[0], (uint64_t)n->ip[1], (uint64_t)n->ip[2])
                             : IDD_ERR;
    idd_tensor_release(gc);
    gin[0] = as_layout_of(dx, x);
    return st;
}

idd_tensor *idd_dropout(idd_tensor *x, double p, idd_generator *g) {
    if (!(p >= 0 && p < 1)) { idd_error("dropout: p = %g must be in [0, 1)", p); return NULL; }
    if (!g) g = idd_default_generator();
    const idd_backend *be = idd_backend_of(x);
    /* bf16: the mask follows memory order (channels-last stays channels-last; other
     * layouts are made contiguous, where memory order is the logical order) */
    bool bf = x->dtype == IDD_BF16 && be->dropout_forward_bf16 && be->dropout_backward_bf16;
    bool cl = bf && idd_is_channels_last(x);
    idd_tensor *xc = !bf ? cf32(x) : cl ? (idd_tensor_retain(x), x) : idd_contiguous(x);
    idd_tensor *out = !xc ? NULL : bf ? idd_tensor_empty_like(xc, IDD_BF16) : idd_tensor_new(IDD_F32, x->device, x->ndim, x->shape);
    int64_t n = idd_numel(x);
    idd_generator save = *g;
    uint64_t seed = g->seed, stream = g->stream, offset = idd_generator_claim(g, (uint64_t)(n + 1) / 2);
    idd_status st = !out ? IDD_ERR
                    : bf ? be->dropout_forward_bf16(idd_data(out), idd_data(xc), n, (float)p, seed, stream, offset)
                         : be->dropout_forward(fp(out), fp(xc), n, (float)p, seed, stream, offset);
    idd_tensor_release(xc);
    if (st != IDD_OK) { *g = save; idd_tensor_release(out); return NULL; }
    if (!bf && !(out = as_layout_of(out, x))) return NULL;
    idd_node *nd = idd_record("dropout", dropout_backward, out, 1, &x);
    if (nd) {
        nd->p[0] = p; nd->ip[0] = (int64_t)seed; nd->ip[1] = (int64_t)stream; nd->ip[2] = (int64_t)offset;
        nd->ip[3] = bf; nd->ip[4] = cl;
    }
    return out;
}
