/* norm.c — group norm fused with scale-shift and SiLU as a differentiable op: shape
 * checks, dispatch (float32 NCHW; bf16 channels-last where the backend has it) and the
 * tape node. Kernels: engine/cpu/norm.c, engine/cuda/norm.cu. Dims: N batch, C
 * channels, HW positions, G groups. */
#include "iddpm/kernels.h"
#include "ops_internal.h"

#include <string.h>

// ---------------------------------------------------------------- bf16 activations (group norm, resampling, dropout)

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
    const idd_backend *be = op_backend(x, IDD_K_GROUPNORM, "group_norm");
    if (!be) return NULL;
    bool bf = takes_bf16(x, IDD_K_GROUPNORM, C % 8 == 0 && C <= 1024 && N > 0);
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

