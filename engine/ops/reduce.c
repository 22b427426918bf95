/* reduce.c — sum, mean, max/min (with arg indices), var, logsumexp, softmax along a
 * dim or over everything; each forward followed by its backward. Accumulation is in
 * double on the CPU backend (and on the GPU). Result dtypes: f32 and f64 stay; bf16
 * reduces to f32 (a sum of many bf16 terms, bias gradients, keeps its precision; max/min
 * are exact in f32 too); integers reduce to f64 (max/min of int64 stay int64). The
 * gradient goes back to a bf16 input in bf16 (the tape converts it). */
#include "iddpm/ops.h"

#include <string.h>

static const char *red_names[IDD_RED_COUNT] = {"sum", "max", "min", "logsumexp"};

/* shape of a reduced over d, with keepdim */
static void reduced_shape(const idd_tensor *a, int d, int64_t *shape) {
    memcpy(shape, a->shape, sizeof(int64_t) * a->ndim);
    shape[d] = 1;
}

static idd_tensor *drop_dim(idd_tensor *t, int d) {
    int64_t shape[IDD_MAX_DIMS];
    int k = 0;
    for (int i = 0; i < t->ndim; i++) if (i != d) shape[k++] = t->shape[i];
    return idd_reshape(t, k, shape);
}

/* expand g (keepdim-shaped) to the shape of a, as a fresh contiguous tensor */
static idd_tensor *expand_back(idd_tensor *g, const idd_tensor *a) {
    idd_tensor *e = idd_view_expand(g, a->ndim, a->shape);
    idd_tensor *c = e ? idd_clone(e) : NULL;
    idd_tensor_release(e);
    return c;
}

static idd_status reduce_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_redop op = (idd_redop)n->ip[0];
    int d = (int)n->ip[1];
    idd_tensor *a = n->in[0];
    int64_t kshape[IDD_MAX_DIMS];
    reduced_shape(a, d, kshape);
    idd_tensor *gk = idd_reshape(g, a->ndim, kshape);
    if (!gk) return IDD_ERR;
    idd_tensor *ge = expand_back(gk, a), *r = NULL;
    idd_tensor_release(gk);
    if (!ge) return IDD_ERR;
    if (op == IDD_RED_SUM) {
        r = ge;
        ge = NULL;
    } else {
        idd_tensor *outk = idd_reshape(n->saved[0], a->ndim, kshape);
        idd_tensor *m = NULL;
        if (op == IDD_RED_LOGSUMEXP) {   /* g * exp(a - lse) */
            idd_tensor *diff = outk ? idd_binary(IDD_BIN_SUB, a, outk) : NULL;
            m = diff ? idd_unary(IDD_UN_EXP, diff) : NULL;
            idd_tensor_release(diff);
        } else {
            m = outk ? idd_binary(IDD_BIN_EQ, a, outk) : NULL;   /* ties all receive */
        }
        r = m ? idd_binary(IDD_BIN_MUL, ge, m) : NULL;
        idd_tensor_release(m);
        idd_tensor_release(outk);
    }
    idd_tensor_release(ge);
    gin[0] = r;
    return r ? IDD_OK : IDD_ERR;
}

static idd_tensor *reduce(idd_redop op, idd_tensor *a, int dim, bool keepdim, idd_tensor **arg) {
    idd_status st;
    idd_tensor *src = a;
    int d;
    if (dim == IDD_ALL_DIMS) {
        int64_t n = idd_numel(a);
        src = idd_reshape(a, 1, &n);
        if (!src) return NULL;
        d = 0;
    } else {
        d = idd_norm_dim(a, dim, red_names[op], &st);
        if (d < 0) return NULL;
        if (a->ndim == 0) { /* reducing a scalar is the identity */
            idd_tensor_retain(a);
            return a;
        }
        idd_tensor_retain(src);
    }
    if ((op == IDD_RED_MAX || op == IDD_RED_MIN) && src->shape[d] == 0) {
        char sb[96];
        idd_error("%s: cannot reduce an empty dim of %s", red_names[op], idd_shape_str(a, sb, 96));
        idd_tensor_release(src);
        return NULL;
    }
    int64_t kshape[IDD_MAX_DIMS];
    reduced_shape(src, d, kshape);
    idd_dtype dt = src->dtype == IDD_F32 || src->dtype == IDD_F64 ? src->dtype : src->dtype == IDD_BF16 ? IDD_F32 : IDD_F64;
    if ((op == IDD_RED_MAX || op == IDD_RED_MIN) && src->dtype == IDD_I64) dt = IDD_I64;
    idd_tensor *out = idd_tensor_new(dt, src->device, src->ndim, kshape);
    idd_tensor *idx = out && arg ? idd_tensor_new(IDD_I64, src->device, src->ndim, kshape) : NULL;
    st = out && (idx || !arg) ? idd_backend_of(src)->reduce(op, out, idx, src, d) : IDD_ERR;
    if (st == IDD_OK) {
        idd_node *n = idd_record(red_names[op], reduce_backward, out, 1, &src);
        if (n) {
            n->ip[0] = op;
            n->ip[1] = d;
            if (op != IDD_RED_SUM) { idd_tensor *o = idd_view_alias(out); idd_node_save(n, o); idd_tensor_release(o); }
        }
    }
    idd_tensor_release(src);
    if (st != IDD_OK) { idd_tensor_release(out); idd_tensor_release(idx); return NULL; }
    if (!keepdim || dim == IDD_ALL_DIMS) {
        idd_tensor *o2 = dim == IDD_ALL_DIMS && !keepdim ? idd_reshape(out, 0, NULL)
                         : dim == IDD_ALL_DIMS ? idd_reshape(out, 1, kshape)
                                               : drop_dim(out, d);
        idd_tensor_release(out);
        out = o2;
        if (idx) {
            idd_tensor *i2 = dim == IDD_ALL_DIMS ? idd_reshape(idx, keepdim ? 1 : 0, kshape) : drop_dim(idx, d);
            idd_tensor_release(idx);
            idx = i2;
        }
    }
    if (arg) *arg = idx; else idd_tensor_release(idx);
    return out;
}

idd_tensor *idd_sum(idd_tensor *a, int dim, bool keepdim) { return reduce(IDD_RED_SUM, a, dim, keepdim, NULL); }
idd_tensor *idd_max(idd_tensor *a, int dim, bool keepdim, idd_tensor **arg) { return reduce(IDD_RED_MAX, a, dim, keepdim, arg); }
idd_tensor *idd_min(idd_tensor *a, int dim, bool keepdim, idd_tensor **arg) { return reduce(IDD_RED_MIN, a, dim, keepdim, arg); }
idd_tensor *idd_logsumexp(idd_tensor *a, int dim, bool keepdim) { return reduce(IDD_RED_LOGSUMEXP, a, dim, keepdim, NULL); }

static int64_t reduced_count(idd_tensor *a, int dim) {
    if (dim == IDD_ALL_DIMS) return idd_numel(a);
    if (a->ndim == 0) return 1;
    int d = dim < 0 ? dim + a->ndim : dim;
    return (d >= 0 && d < a->ndim) ? a->shape[d] : 1;
}

idd_tensor *idd_mean(idd_tensor *a, int dim, bool keepdim) {
    idd_tensor *s = idd_sum(a, dim, keepdim);
    if (!s) return NULL;
    int64_t n = reduced_count(a, dim);
    idd_tensor *m = idd_affine(s, n ? 1.0 / (double)n : 0.0 / 0.0, 0);
    idd_tensor_release(s);
    return m;
}

/* composed from differentiable ops, so its gradient comes for free */
idd_tensor *idd_var(idd_tensor *a, int dim, bool keepdim, bool unbiased) {
    int64_t n = reduced_count(a, dim);
    idd_tensor *m = idd_mean(a, dim, true);
    idd_tensor *d = m ? idd_binary(IDD_BIN_SUB, a, m) : NULL;
    idd_tensor *d2 = d ? idd_unary(IDD_UN_SQUARE, d) : NULL;
    idd_tensor *s = d2 ? idd_sum(d2, dim, keepdim) : NULL;
    double den = unbiased ? (double)(n - 1) : (double)n;
    idd_tensor *v = s ? idd_affine(s, 1.0 / den, 0) : NULL;
    idd_tensor_release(m);
    idd_tensor_release(d);
    idd_tensor_release(d2);
    idd_tensor_release(s);
    return v;
}

idd_tensor *idd_softmax(idd_tensor *a, int dim) {
    idd_tensor *l = idd_logsumexp(a, dim, true);
    idd_tensor *d = l ? idd_binary(IDD_BIN_SUB, a, l) : NULL;
    idd_tensor *e = d ? idd_unary(IDD_UN_EXP, d) : NULL;
    idd_tensor_release(l);
    idd_tensor_release(d);
    return e;
}

idd_tensor *idd_mean_flat(idd_tensor *a) {
    if (a->ndim < 1) { idd_error("mean_flat: needs at least 1 dim, got a scalar"); return NULL; }
    int64_t shape[2] = {a->shape[0], -1};
    idd_tensor *r = idd_reshape(a, 2, shape);
    idd_tensor *m = r ? idd_mean(r, 1, false) : NULL;
    idd_tensor_release(r);
    return m;
}
