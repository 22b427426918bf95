/* resample.c — nearest 2x upsample and 2x2 average pool as differentiable ops: shape
 * checks, dispatch (float32; bf16 channels-last where the backend has it) and the tape
 * node. Kernels: engine/cpu/resample.c, engine/cuda/resample.cu. */
#include "ops_internal.h"

#include <string.h>

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
    idd_kernel k = up ? IDD_K_UPSAMPLE2X : IDD_K_AVGPOOL2X;
    const idd_backend *be = op_backend(x, k, name);
    if (!be) return NULL;
    int64_t shape[4] = {x->shape[0], x->shape[1], up ? 2 * x->shape[2] : x->shape[2] / 2, up ? 2 * x->shape[3] : x->shape[3] / 2};
    int N = (int)x->shape[0], C = (int)x->shape[1], H = (int)x->shape[2], W = (int)x->shape[3];
    bool bf = takes_bf16(x, k, C % 8 == 0);
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
