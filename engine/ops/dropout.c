/* dropout.c — inverted dropout as a differentiable op with a Philox mask that its
 * backward regenerates. Kernels: engine/cpu/dropout.c, engine/cuda/rng.cu. */
#include "ops_internal.h"

#include <string.h>

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
    const idd_backend *be = op_backend(x, IDD_K_DROPOUT, "dropout");
    if (!be) return NULL;
    /* bf16: the mask follows memory order (channels-last stays channels-last; other
     * layouts are made contiguous, where memory order is the logical order) */
    bool bf = takes_bf16(x, IDD_K_DROPOUT, true);
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

