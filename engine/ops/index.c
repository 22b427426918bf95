/* index.c — index_select (gather rows by integer index, e.g. a per-timestep
 * coefficient lookup) and its backward (scatter-add, in f32 for a bf16 input). */
#include "iddpm/ops.h"

#include <string.h>

static idd_status index_select_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *a = n->in[0], *idx = n->in[1];
    /* scatter-add in f32 (f64 for f64); the tape converts to a's dtype (bf16) */
    idd_dtype dt = g->dtype == IDD_F64 ? IDD_F64 : IDD_F32;
    idd_tensor *z = idd_tensor_zeros(dt, IDD_CPU, a->ndim, a->shape);
    idd_tensor *g0 = z ? idd_to_device(g, IDD_CPU) : NULL;
    idd_tensor *gc = g0 ? idd_to_dtype(g0, dt) : NULL;
    idd_tensor_release(g0);
    idd_tensor *icpu = gc ? idd_to_device(idx, IDD_CPU) : NULL;
    idd_tensor *ic = icpu ? idd_to_dtype(icpu, IDD_I64) : NULL;
    idd_tensor_release(icpu);
    if (!ic) { idd_tensor_release(z); idd_tensor_release(gc); return IDD_ERR; }
    int64_t rows = idd_numel(ic), inner = idd_numel(a) / (a->shape[0] ? a->shape[0] : 1);
    const int64_t *ip = idd_data(ic);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < inner; j++) {
            if (z->dtype == IDD_F32) ((float *)idd_data(z))[ip[r] * inner + j] += ((float *)idd_data(gc))[r * inner + j];
            else ((double *)idd_data(z))[ip[r] * inner + j] += ((double *)idd_data(gc))[r * inner + j];
        }
    idd_tensor_release(gc);
    idd_tensor_release(ic);
    gin[0] = a->device == IDD_CPU ? z : idd_to_device(z, a->device);
    if (gin[0] != z) idd_tensor_release(z);
    return gin[0] ? IDD_OK : IDD_ERR;
}

/* a (R, ...), idx (N) integer -> (N, ...) ; only dim 0 is supported */
idd_tensor *idd_index_select(idd_tensor *a, int dim, idd_tensor *idx) {
    char sa[96], sb[96];
    if (dim != 0 || a->ndim < 1) { idd_error("index_select: only dim 1 of a tensor with dims is supported"); return NULL; }
    if (idx->ndim != 1) { idd_error("index_select: index must be 1-D, got %s", idd_shape_str(idx, sb, 96)); return NULL; }
    idd_tensor *ic = idd_to_device(idx, IDD_CPU), *i64 = ic ? idd_to_dtype(ic, IDD_I64) : NULL;
    idd_tensor_release(ic);
    if (!i64) return NULL;
    int64_t n = idd_numel(i64), R = a->shape[0];
    const int64_t *ip = idd_data(i64);
    for (int64_t i = 0; i < n; i++)
        if (ip[i] < 0 || ip[i] >= R) {
            idd_error("index_select: index %lld out of range [0, %lld) for a tensor of shape %s", (long long)ip[i],
                      (long long)R, idd_shape_str(a, sa, 96));
            idd_tensor_release(i64);
            return NULL;
        }
    int64_t shape[IDD_MAX_DIMS];
    memcpy(shape, a->shape, sizeof shape);
    shape[0] = n;
    idd_tensor *out = idd_tensor_new(a->dtype, a->device, a->ndim, shape);
    for (int64_t i = 0; out && i < n; i++) {
        idd_tensor *src = idd_view_narrow(a, 0, ip[i], 1), *dst = idd_view_narrow(out, 0, i, 1);
        idd_status st = src && dst ? idd_copy_(dst, src) : IDD_ERR;
        idd_tensor_release(src);
        idd_tensor_release(dst);
        if (st != IDD_OK) { idd_tensor_release(out); out = NULL; }
    }
    idd_tensor_release(i64);
    if (out) {
        idd_tensor *ins[2] = {a, idx};
        idd_record("index_select", index_select_backward, out, 2, ins);
    }
    return out;
}
