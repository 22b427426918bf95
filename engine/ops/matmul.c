/* matmul.c — matrix products through the backend's batched GEMM (OpenBLAS on the
 * CPU): matmul with batch broadcasting of the leading dims, and linear. Forward
 * followed by backward. Shapes: a (..., M, K) @ b (..., K, N) -> (..., M, N). */
#include "iddpm/ops.h"

#include <string.h>

static idd_tensor *mm_raw(idd_tensor *a, idd_tensor *b, bool ta, bool tb);

/* the gradients of a batched product, summed over broadcast batch dims by the tape */
static idd_status matmul_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *a = n->in[0], *b = n->in[1];
    if (n->needs[0]) gin[0] = mm_raw(g, b, false, true);    /* dA = G B^T */
    if (n->needs[1]) gin[1] = mm_raw(a, g, true, false);    /* dB = A^T G */
    return (n->needs[0] && !gin[0]) || (n->needs[1] && !gin[1]) ? IDD_ERR : IDD_OK;
}

/* op(a) @ op(b) with broadcast batch dims; a, b made contiguous and expanded */
static idd_tensor *mm_raw(idd_tensor *a, idd_tensor *b, bool ta, bool tb) {
    char sa[96], sb[96];
    if (a->ndim < 2 || b->ndim < 2) {
        idd_error("matmul: needs at least 2-D tensors, got %s and %s", idd_shape_str(a, sa, 96), idd_shape_str(b, sb, 96));
        return NULL;
    }
    int64_t M = ta ? a->shape[a->ndim - 1] : a->shape[a->ndim - 2];
    int64_t K = ta ? a->shape[a->ndim - 2] : a->shape[a->ndim - 1];
    int64_t K2 = tb ? b->shape[b->ndim - 1] : b->shape[b->ndim - 2];
    int64_t N = tb ? b->shape[b->ndim - 2] : b->shape[b->ndim - 1];
    if (K != K2) {
        idd_error("matmul: inner dims differ: a %s vs b %s", idd_shape_str(a, sa, 96), idd_shape_str(b, sb, 96));
        return NULL;
    }
    if (a->dtype != b->dtype || (a->dtype != IDD_F32 && a->dtype != IDD_F64)) {
        idd_error("matmul: needs two float32 or two float64 tensors, got %s and %s", idd_dtype_name(a->dtype),
                  idd_dtype_name(b->dtype));
        return NULL;
    }
    /* broadcast batch dims */
    int nb = (a->ndim > b->ndim ? a->ndim : b->ndim) - 2;
    int64_t shape[IDD_MAX_DIMS], ash[IDD_MAX_DIMS], bsh[IDD_MAX_DIMS];
    for (int i = 0; i < nb; i++) {
        int ia = i - (nb - (a->ndim - 2)), ib = i - (nb - (b->ndim - 2));
        int64_t x = ia >= 0 ? a->shape[ia] : 1, y = ib >= 0 ? b->shape[ib] : 1;
        if (x != y && x != 1 && y != 1) {
            idd_error("matmul: batch dims of %s and %s do not broadcast", idd_shape_str(a, sa, 96), idd_shape_str(b, sb, 96));
            return NULL;
        }
        shape[i] = ash[i] = bsh[i] = x == 1 ? y : x;
    }
    shape[nb] = M;
    shape[nb + 1] = N;
    ash[nb] = a->shape[a->ndim - 2]; ash[nb + 1] = a->shape[a->ndim - 1];
    bsh[nb] = b->shape[b->ndim - 2]; bsh[nb + 1] = b->shape[b->ndim - 1];
    int64_t abatch = 1, bbatch = 1, batch = 1;
    for (int i = 0; i < a->ndim - 2; i++) abatch *= a->shape[i];
    for (int i = 0; i < b->ndim - 2; i++) bbatch *= b->shape[i];
    for (int i = 0; i < nb; i++) batch *= shape[i];
    /* a single matrix on one side is shared; otherwise materialise the broadcast */
    idd_tensor *ea = abatch == 1 || abatch == batch ? (idd_tensor_retain(a), a) : idd_view_expand(a, nb + 2, ash);
    idd_tensor *eb = bbatch == 1 || bbatch == batch ? (idd_tensor_retain(b), b) : idd_view_expand(b, nb + 2, bsh);
    idd_tensor *ca = ea ? idd_contiguous(ea) : NULL, *cb = eb ? idd_contiguous(eb) : NULL;
    idd_tensor *out = ca && cb ? idd_tensor_new(a->dtype, a->device, nb + 2, shape) : NULL;
    idd_status st = out ? idd_backend_of(out)->bmm(out, ca, cb, ta, tb, 1.0, 0.0) : IDD_ERR;
    idd_tensor_release(ea);
    idd_tensor_release(eb);
    idd_tensor_release(ca);
    idd_tensor_release(cb);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    return out;
}

idd_tensor *idd_matmul(idd_tensor *a, idd_tensor *b) {
    idd_tensor *out = mm_raw(a, b, false, false);
    if (out) {
        idd_tensor *ins[2] = {a, b};
        idd_record("matmul", matmul_backward, out, 2, ins);
    }
    return out;
}

/* x (N, in), w (out, in), bias (out) or NULL -> (N, out) */
idd_tensor *idd_linear(idd_tensor *x, idd_tensor *w, idd_tensor *bias) {
    char sa[96], sb[96];
    if (w->ndim != 2 || x->ndim < 1 || x->shape[x->ndim - 1] != w->shape[1]) {
        idd_error("linear: input %s does not match weight %s (out, in)", idd_shape_str(x, sa, 96), idd_shape_str(w, sb, 96));
        return NULL;
    }
    idd_tensor *wt = idd_transpose(w, 0, 1);
    idd_tensor *y = wt ? idd_matmul(x, wt) : NULL;
    idd_tensor_release(wt);
    if (y && bias) {
        idd_tensor *z = idd_binary(IDD_BIN_ADD, y, bias);
        idd_tensor_release(y);
        y = z;
    }
    return y;
}
