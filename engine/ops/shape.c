/* shape.c — differentiable reshape, narrow, permute/transpose, expand, concat,
 * detach, dtype cast, contiguous and channels_last; each forward followed by its
 * backward. Views share storage with their input (reshape views whenever the strides
 * allow, channels-last included); concat, cast and the layout changes copy.
 * Gradients come back in the input's dtype and layout. */
#include "iddpm/ops.h"

#include <stdlib.h>
#include <string.h>

static idd_status pass_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    (void)n;   /* the tape reduces g to the input's shape (expand) */
    idd_tensor_retain(g);
    gin[0] = g;
    return IDD_OK;
}

// ---------------------------------------------------------------- reshape

static idd_status reshape_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    gin[0] = idd_reshape(g, n->in[0]->ndim, n->in[0]->shape);
    return gin[0] ? IDD_OK : IDD_ERR;
}

idd_tensor *idd_reshape(idd_tensor *a, int ndim, const int64_t *shape_in) {
    char sa[96], sb[96];
    int64_t shape[IDD_MAX_DIMS], known = 1;
    int infer = -1;
    if (ndim < 0 || ndim > IDD_MAX_DIMS) { idd_error("reshape: %d dims (at most %d)", ndim, IDD_MAX_DIMS); return NULL; }
    for (int i = 0; i < ndim; i++) {
        shape[i] = shape_in[i];
        if (shape[i] == -1 && infer < 0) infer = i;
        else if (shape[i] < 0) { idd_error("reshape: bad size %lld", (long long)shape[i]); return NULL; }
    }
    int64_t probe[IDD_MAX_DIMS] = {0};   /* the known sizes must not overflow their product */
    for (int i = 0; i < ndim; i++) probe[i] = i == infer ? 1 : shape[i];
    if (!idd_shape_fits(ndim, probe, 1, "reshape")) return NULL;
    for (int i = 0; i < ndim; i++) if (i != infer) known *= shape[i];
    int64_t n = idd_numel(a);
    if (infer >= 0) shape[infer] = known ? n / known : 0;
    int64_t m = 1;
    for (int i = 0; i < ndim; i++) m *= shape[i];
    if (m != n) {
        idd_error("reshape: cannot reshape %s (%lld elements) to %s", idd_shape_str(a, sa, 96), (long long)n,
                  idd_shape_str_n(ndim, shape_in, sb, 96));
        return NULL;
    }
    idd_tensor *out = idd_view_reshape(a, ndim, shape);
    if (!out) {   /* the strides do not allow a view: copy */
        idd_tensor *src = idd_contiguous(a);
        if (!src) return NULL;
        out = idd_view_reshape(src, ndim, shape);
        idd_tensor_release(src);
    }
    if (out) idd_record("reshape", reshape_backward, out, 1, &a);
    return out;
}

// ---------------------------------------------------------------- narrow

static idd_status narrow_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *a = n->in[0];
    idd_tensor *z = idd_tensor_empty_like(a, a->dtype);
    idd_status st = z ? idd_fill_(z, 0) : IDD_ERR;
    idd_tensor *v = st == IDD_OK ? idd_view_narrow(z, (int)n->ip[0], n->ip[1], n->ip[2]) : NULL;
    st = v ? idd_copy_(v, g) : IDD_ERR;
    idd_tensor_release(v);
    if (st != IDD_OK) { idd_tensor_release(z); return IDD_ERR; }
    gin[0] = z;
    return IDD_OK;
}

idd_tensor *idd_narrow(idd_tensor *a, int dim, int64_t start, int64_t len) {
    idd_status st;
    char sa[96];
    int d = idd_norm_dim(a, dim, "narrow", &st);
    if (d < 0) return NULL;
    if (start < 0 || len < 0 || start > a->shape[d] || len > a->shape[d] - start) {
        idd_error("narrow: positions %lld..%lld out of bounds for dim %d of %s", (long long)start + 1,
                  (long long)((uint64_t)start + (uint64_t)len), d + 1, idd_shape_str(a, sa, 96));
        return NULL;
    }
    idd_tensor *out = idd_view_narrow(a, d, start, len);
    idd_node *n = out ? idd_record("narrow", narrow_backward, out, 1, &a) : NULL;
    if (n) { n->ip[0] = d; n->ip[1] = start; n->ip[2] = len; }
    return out;
}

// ---------------------------------------------------------------- permute

static idd_status permute_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    int inv[IDD_MAX_DIMS];
    for (int i = 0; i < n->in[0]->ndim; i++) inv[n->ip[i]] = i;
    gin[0] = idd_permute(g, n->in[0]->ndim, inv);
    return gin[0] ? IDD_OK : IDD_ERR;
}

idd_tensor *idd_permute(idd_tensor *a, int ndim, const int *perm) {
    char sa[96];
    int seen[IDD_MAX_DIMS] = {0}, p[IDD_MAX_DIMS];
    if (ndim != a->ndim) { idd_error("permute: %d dims given for a tensor of shape %s", ndim, idd_shape_str(a, sa, 96)); return NULL; }
    for (int i = 0; i < ndim; i++) {
        p[i] = perm[i] < 0 ? perm[i] + ndim : perm[i];
        if (p[i] < 0 || p[i] >= ndim || seen[p[i]]++) { idd_error("permute: not a permutation of %d dims", ndim); return NULL; }
    }
    idd_tensor *out = idd_view_permute(a, p);
    idd_node *n = out ? idd_record("permute", permute_backward, out, 1, &a) : NULL;
    if (n) for (int i = 0; i < ndim; i++) n->ip[i] = p[i];
    return out;
}

idd_tensor *idd_transpose(idd_tensor *a, int d0, int d1) {
    idd_status st;
    int p[IDD_MAX_DIMS];
    int i0 = idd_norm_dim(a, d0, "transpose", &st);
    int i1 = i0 < 0 ? -1 : idd_norm_dim(a, d1, "transpose", &st);
    if (i1 < 0) return NULL;
    for (int i = 0; i < a->ndim; i++) p[i] = i;
    p[i0] = i1;
    p[i1] = i0;
    return idd_permute(a, a->ndim, p);
}

// ---------------------------------------------------------------- expand

idd_tensor *idd_expand(idd_tensor *a, int ndim, const int64_t *shape_in) {
    int64_t shape[IDD_MAX_DIMS];
    for (int i = 0; i < ndim && i < IDD_MAX_DIMS; i++) {
        int j = i - (ndim - a->ndim);
        shape[i] = shape_in[i] == -1 && j >= 0 ? a->shape[j] : shape_in[i];
    }
    idd_tensor *out = idd_view_expand(a, ndim, shape);
    if (out) idd_record("expand", pass_backward, out, 1, &a);
    return out;
}

// ---------------------------------------------------------------- concat

static idd_status concat_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    int d = (int)n->ip[0];
    int64_t start = 0;
    for (int k = 0; k < n->n_in; k++) {
        int64_t len = n->in[k]->shape[d];
        if (n->needs[k]) {   /* in the input's dtype and layout */
            idd_tensor *v = idd_view_narrow(g, d, start, len);
            gin[k] = v ? idd_tensor_empty_like(n->in[k], n->in[k]->dtype) : NULL;
            if (gin[k] && idd_copy_(gin[k], v) != IDD_OK) { idd_tensor_release(gin[k]); gin[k] = NULL; }
            idd_tensor_release(v);
            if (!gin[k]) return IDD_ERR;
        }
        start += len;
    }
    return IDD_OK;
}

idd_tensor *idd_concat(int n, idd_tensor **ts, int dim) {
    char sa[96], sb[96];
    idd_status st;
    if (n < 1) { idd_error("concat: no tensors"); return NULL; }
    if (n > IDD_NODE_MAX_IN && idd_grad_enabled() && idd_any_requires_grad(n, ts)) {
        /* a node takes at most IDD_NODE_MAX_IN inputs: concatenate groups, then the groups */
        int ng = (n + IDD_NODE_MAX_IN - 1) / IDD_NODE_MAX_IN;
        idd_tensor **parts = calloc((size_t)ng, sizeof *parts);
        if (!parts) { idd_error_status(IDD_ENOMEM, "concat: out of memory"); return NULL; }
        idd_tensor *out = NULL;
        int g = 0;
        for (; g < ng; g++) {
            int k0 = g * IDD_NODE_MAX_IN, k1 = k0 + IDD_NODE_MAX_IN < n ? k0 + IDD_NODE_MAX_IN : n;
            if (!(parts[g] = idd_concat(k1 - k0, ts + k0, dim))) break;
        }
        if (g == ng) out = idd_concat(ng, parts, dim);
        for (int k = 0; k < ng; k++) idd_tensor_release(parts[k]);
        free(parts);
        return out;
    }
    int d = idd_norm_dim(ts[0], dim, "concat", &st);
    if (d < 0) return NULL;
    int64_t shape[IDD_MAX_DIMS];
    memcpy(shape, ts[0]->shape, sizeof shape);
    shape[d] = 0;
    idd_dtype dt = ts[0]->dtype;
    bool cl = true;   /* all channels-last: so is the result */
    for (int k = 0; k < n; k++) {
        bool ok = ts[k]->ndim == ts[0]->ndim && ts[k]->device == ts[0]->device;
        for (int i = 0; ok && i < ts[0]->ndim; i++) ok = i == d || ts[k]->shape[i] == ts[0]->shape[i];
        if (!ok) {
            idd_error("concat: tensor %d has shape %s, tensor 1 has %s (must match except in dim %d)", k + 1,
                      idd_shape_str(ts[k], sa, 96), idd_shape_str(ts[0], sb, 96), d + 1);
            return NULL;
        }
        /* bf16 < f32 < f64 above the integer dtypes */
        if (ts[k]->dtype == IDD_F64 || (ts[k]->dtype == IDD_F32 && dt != IDD_F64) ||
            (ts[k]->dtype == IDD_BF16 && dt != IDD_F64 && dt != IDD_F32))
            dt = ts[k]->dtype;
        cl = cl && idd_is_channels_last(ts[k]);
        shape[d] += ts[k]->shape[d];
    }
    idd_tensor *out = cl ? idd_tensor_new_channels_last(dt, ts[0]->device, ts[0]->ndim, shape)
                         : idd_tensor_new(dt, ts[0]->device, ts[0]->ndim, shape);
    if (!out) return NULL;
    int64_t start = 0;
    for (int k = 0; k < n; k++) {
        idd_tensor *v = idd_view_narrow(out, d, start, ts[k]->shape[d]);
        st = v ? idd_copy_(v, ts[k]) : IDD_ERR;
        idd_tensor_release(v);
        if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
        start += ts[k]->shape[d];
    }
    idd_node *nd = n <= IDD_NODE_MAX_IN ? idd_record("concat", concat_backward, out, n, ts) : NULL;
    if (nd) nd->ip[0] = d;
    return out;
}

// ---------------------------------------------------------------- detach, cast, contiguous

idd_tensor *idd_detach(idd_tensor *a) { return idd_view_alias(a); }

/* the gradient in the input's dtype and layout (cast, contiguous, channels_last) */
static idd_status relayout_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *a = n->in[0];
    gin[0] = idd_tensor_empty_like(a, a->dtype);
    if (gin[0] && idd_copy_(gin[0], g) != IDD_OK) { idd_tensor_release(gin[0]); gin[0] = NULL; }
    return gin[0] ? IDD_OK : IDD_ERR;
}

static bool float_dtype(idd_dtype dt) { return dt == IDD_F32 || dt == IDD_F64 || dt == IDD_BF16; }

/* a contiguous copy in dt (a view when the dtype is already dt); differentiable between
 * float dtypes (f32, f64, bf16) */
idd_tensor *idd_cast(idd_tensor *a, idd_dtype dt) {
    if (a->dtype == dt) { idd_tensor *v = idd_view_alias(a); if (v) idd_record("cast", pass_backward, v, 1, &a); return v; }
    idd_tensor *out = idd_to_dtype(a, dt);
    if (out && float_dtype(dt) && float_dtype(a->dtype)) idd_record("cast", relayout_backward, out, 1, &a);
    return out;
}

idd_tensor *idd_contiguous_op(idd_tensor *a) {
    bool view = idd_is_contiguous(a);
    idd_tensor *out = view ? idd_view_alias(a) : idd_clone(a);
    if (out) idd_record("contiguous", view ? pass_backward : relayout_backward, out, 1, &a);
    return out;
}

idd_tensor *idd_channels_last(idd_tensor *a, idd_dtype dt) {
    if (a->dtype == dt && (idd_is_channels_last(a) || (a->ndim != 3 && a->ndim != 4 && idd_is_contiguous(a)))) {
        idd_tensor *v = idd_view_alias(a);
        if (v) idd_record("channels_last", pass_backward, v, 1, &a);
        return v;
    }
    idd_tensor *out = idd_tensor_new_channels_last(dt, a->device, a->ndim, a->shape);
    if (out && idd_copy_(out, a) != IDD_OK) { idd_tensor_release(out); return NULL; }
    if (out && float_dtype(dt) && float_dtype(a->dtype)) idd_record("channels_last", relayout_backward, out, 1, &a);
    return out;
}
