/* pointwise.c — broadcasting binary ops, unary math, clamp, affine, where; each
 * forward followed by its backward. Gradients of broadcast inputs are summed back to
 * the input's shape by the tape (idd_sum_to_shape).
 * dtypes: bf16 < f32 < f64 among floats (bf16 op f32 = f32), floats above integers; a
 * Python-like scalar (idd_binary_scalar) keeps the tensor's dtype (bf16 * 0.1 is bf16,
 * the scalar itself is held in f32). Layout: the output is channels-last when a
 * full-shape operand is (idd_tensor_empty_like), else contiguous. */
#include "iddpm/ops.h"

#include <math.h>
#include <string.h>

static const char *bin_names[IDD_BIN_COUNT] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum",
                                               "gt", "lt", "ge", "le", "eq", "ne"};
static const char *un_names[IDD_UN_COUNT] = {"neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu",
                                             "abs", "square", "sin", "cos", "reciprocal", "floor", "sign"};
const char *idd_binop_name(idd_binop op) { return (unsigned)op < IDD_BIN_COUNT ? bin_names[op] : "?"; }
const char *idd_unop_name(idd_unop op) { return (unsigned)op < IDD_UN_COUNT ? un_names[op] : "?"; }

static idd_dtype promote(idd_dtype a, idd_dtype b) {
    if (a == IDD_F64 || b == IDD_F64) return IDD_F64;
    if (a == IDD_F32 || b == IDD_F32) return IDD_F32;
    if (a == IDD_BF16 || b == IDD_BF16) return IDD_BF16;
    if (a == IDD_I64 || b == IDD_I64) return IDD_I64;
    return IDD_U8;
}

/* broadcast shape of a and b into shape[]; returns ndim or -1 */
static int broadcast_shape(const idd_tensor *a, const idd_tensor *b, int64_t *shape) {
    int nd = a->ndim > b->ndim ? a->ndim : b->ndim;
    for (int i = 0; i < nd; i++) {
        int ia = i - (nd - a->ndim), ib = i - (nd - b->ndim);
        int64_t sa = ia >= 0 ? a->shape[ia] : 1, sb = ib >= 0 ? b->shape[ib] : 1;
        if (sa != sb && sa != 1 && sb != 1) return -1;
        shape[i] = sa == 1 ? sb : sa;
    }
    return nd;
}

static bool is_float(idd_dtype dt) { return dt == IDD_F32 || dt == IDD_F64 || dt == IDD_BF16; }

/* a new output of dtype dt and the broadcast shape: channels-last when an operand of
 * that full shape is channels-last, else contiguous */
static idd_tensor *out_like(const idd_tensor *a, const idd_tensor *b, idd_dtype dt, int nd, const int64_t *shape) {
    const idd_tensor *ops[2] = {a, b};
    for (int k = 0; k < 2; k++) {
        const idd_tensor *t = ops[k];
        if (t && t->ndim == nd && !memcmp(t->shape, shape, sizeof(int64_t) * nd) && idd_is_channels_last(t))
            return idd_tensor_empty_like(t, dt);
    }
    return idd_tensor_new(dt, a->device, nd, shape);
}

/* short internal helpers used by the backward functions (grad mode is off there) */
static idd_tensor *bin(idd_binop op, idd_tensor *a, idd_tensor *b) { return idd_binary(op, a, b); }

// ---------------------------------------------------------------- binary

static idd_status binary_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_binop op = (idd_binop)n->ip[0];
    idd_tensor *a = n->in[0], *b = n->in[1], *out = n->saved[0];
    switch (op) {
    case IDD_BIN_ADD:
        if (n->needs[0]) { gin[0] = g; idd_tensor_retain(g); }
        if (n->needs[1]) { gin[1] = g; idd_tensor_retain(g); }
        break;
    case IDD_BIN_SUB:
        if (n->needs[0]) { gin[0] = g; idd_tensor_retain(g); }
        if (n->needs[1]) gin[1] = idd_unary(IDD_UN_NEG, g);
        break;
    case IDD_BIN_MUL:
        if (n->needs[0]) gin[0] = bin(IDD_BIN_MUL, g, b);
        if (n->needs[1]) gin[1] = bin(IDD_BIN_MUL, g, a);
        break;
    case IDD_BIN_DIV:
        if (n->needs[0]) gin[0] = bin(IDD_BIN_DIV, g, b);
        if (n->needs[1]) {   /* -g * out / b */
            idd_tensor *t = bin(IDD_BIN_MUL, g, out), *u = t ? bin(IDD_BIN_DIV, t, b) : NULL;
            gin[1] = u ? idd_unary(IDD_UN_NEG, u) : NULL;
            idd_tensor_release(t);
            idd_tensor_release(u);
        }
        break;
    case IDD_BIN_POW:
        if (n->needs[0]) {   /* g * b * a^(b-1) = g * b * out / a */
            idd_tensor *t = bin(IDD_BIN_MUL, g, b), *u = t ? bin(IDD_BIN_MUL, t, out) : NULL;
            gin[0] = u ? bin(IDD_BIN_DIV, u, a) : NULL;
            idd_tensor_release(t);
            idd_tensor_release(u);
        }
        if (n->needs[1]) {   /* g * out * log(a) */
            idd_tensor *l = idd_unary(IDD_UN_LOG, a), *t = l ? bin(IDD_BIN_MUL, g, out) : NULL;
            gin[1] = t ? bin(IDD_BIN_MUL, t, l) : NULL;
            idd_tensor_release(l);
            idd_tensor_release(t);
        }
        break;
    case IDD_BIN_MAX:
    case IDD_BIN_MIN:
        for (int k = 0; k < 2; k++) {
            if (!n->needs[k]) continue;
            idd_tensor *m = bin(IDD_BIN_EQ, n->in[k], out);   /* ties send the gradient to both */
            gin[k] = m ? bin(IDD_BIN_MUL, g, m) : NULL;
            idd_tensor_release(m);
        }
        break;
    default: break;
    }
    for (int k = 0; k < 2; k++) if (n->needs[k] && !gin[k]) return IDD_ERR;
    return IDD_OK;
}

/* out_dt < 0: the promoted dtype */
static idd_tensor *binary_dt(idd_binop op, idd_tensor *a, idd_tensor *b, int out_dt) {
    char sa[96], sb[96];
    int64_t shape[IDD_MAX_DIMS];
    int nd = broadcast_shape(a, b, shape);
    if (nd < 0) {
        idd_error("%s: shapes %s and %s do not broadcast", idd_binop_name(op), idd_shape_str(a, sa, 96),
                  idd_shape_str(b, sb, 96));
        return NULL;
    }
    if (a->device != b->device) {
        idd_error("%s: tensors on different devices (%s and %s)", idd_binop_name(op), idd_device_name(a->device),
                  idd_device_name(b->device));
        return NULL;
    }
    idd_tensor *out = out_like(a, b, out_dt >= 0 ? (idd_dtype)out_dt : promote(a->dtype, b->dtype), nd, shape);
    idd_tensor *ea = out ? idd_view_expand(a, nd, shape) : NULL;
    idd_tensor *eb = ea ? idd_view_expand(b, nd, shape) : NULL;
    idd_status st = eb ? idd_backend_of(out)->binary(op, out, ea, eb) : IDD_ERR;
    idd_tensor_release(ea);
    idd_tensor_release(eb);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    if (op <= IDD_BIN_MIN && is_float(out->dtype)) {
        idd_tensor *ins[2] = {a, b};
        idd_node *n = idd_record(idd_binop_name(op), binary_backward, out, 2, ins);
        if (n) {
            n->ip[0] = op;
            if (op == IDD_BIN_DIV || op == IDD_BIN_POW || op == IDD_BIN_MAX || op == IDD_BIN_MIN) {
                /* save a detached alias of out (saving out itself would make a cycle) */
                idd_tensor *o = idd_view_alias(out);
                idd_node_save(n, o);
                idd_tensor_release(o);
            }
        }
    }
    return out;
}

idd_tensor *idd_binary(idd_binop op, idd_tensor *a, idd_tensor *b) { return binary_dt(op, a, b, -1); }

idd_tensor *idd_binary_scalar(idd_binop op, idd_tensor *a, double s, bool scalar_first) {
    idd_dtype dt = a->dtype;
    if ((dt == IDD_I64 || dt == IDD_U8) && s != floor(s)) dt = IDD_F32;
    /* a bf16 tensor's scalar is held in f32 (0.1 is not rounded to bf16); the result stays bf16 */
    idd_tensor *sc = idd_tensor_new(dt == IDD_BF16 ? IDD_F32 : dt, a->device, 0, NULL);
    if (!sc) return NULL;
    idd_fill_(sc, s);
    idd_tensor *r = scalar_first ? binary_dt(op, sc, a, dt) : binary_dt(op, a, sc, dt);
    idd_tensor_release(sc);
    return r;
}

// ---------------------------------------------------------------- unary

static idd_status unary_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_unop op = (idd_unop)n->ip[0];
    idd_tensor *a = n->in[0], *out = n->saved[0], *r = NULL, *t = NULL;
    switch (op) {
    case IDD_UN_NEG: r = idd_unary(IDD_UN_NEG, g); break;
    case IDD_UN_EXP: r = bin(IDD_BIN_MUL, g, out); break;
    case IDD_UN_LOG: r = bin(IDD_BIN_DIV, g, a); break;
    case IDD_UN_SQRT: t = bin(IDD_BIN_DIV, g, out); r = t ? idd_affine(t, 0.5, 0) : NULL; break;
    case IDD_UN_RSQRT: {   /* -0.5 * g * out^3 */
        idd_tensor *o2 = idd_unary(IDD_UN_SQUARE, out), *o3 = o2 ? bin(IDD_BIN_MUL, o2, out) : NULL;
        t = o3 ? bin(IDD_BIN_MUL, g, o3) : NULL;
        r = t ? idd_affine(t, -0.5, 0) : NULL;
        idd_tensor_release(o2);
        idd_tensor_release(o3);
        break;
    }
    case IDD_UN_TANH: {   /* g * (1 - out^2) */
        idd_tensor *o2 = idd_unary(IDD_UN_SQUARE, out);
        t = o2 ? idd_affine(o2, -1, 1) : NULL;
        r = t ? bin(IDD_BIN_MUL, g, t) : NULL;
        idd_tensor_release(o2);
        break;
    }
    case IDD_UN_SIGMOID: {   /* g * out * (1 - out) */
        idd_tensor *om = idd_affine(out, -1, 1);
        t = om ? bin(IDD_BIN_MUL, out, om) : NULL;
        r = t ? bin(IDD_BIN_MUL, g, t) : NULL;
        idd_tensor_release(om);
        break;
    }
    case IDD_UN_SILU: {   /* g * s * (1 + a * (1 - s)) */
        idd_tensor *s = idd_unary(IDD_UN_SIGMOID, a), *om = s ? idd_affine(s, -1, 1) : NULL;
        idd_tensor *u = om ? bin(IDD_BIN_MUL, a, om) : NULL, *v = u ? idd_affine(u, 1, 1) : NULL;
        t = v ? bin(IDD_BIN_MUL, s, v) : NULL;
        r = t ? bin(IDD_BIN_MUL, g, t) : NULL;
        idd_tensor_release(s);
        idd_tensor_release(om);
        idd_tensor_release(u);
        idd_tensor_release(v);
        break;
    }
    case IDD_UN_ABS: t = idd_unary(IDD_UN_SIGN, a); r = t ? bin(IDD_BIN_MUL, g, t) : NULL; break;
    case IDD_UN_SQUARE: t = bin(IDD_BIN_MUL, g, a); r = t ? idd_affine(t, 2, 0) : NULL; break;
    case IDD_UN_SIN: t = idd_unary(IDD_UN_COS, a); r = t ? bin(IDD_BIN_MUL, g, t) : NULL; break;
    case IDD_UN_COS: {
        idd_tensor *s = idd_unary(IDD_UN_SIN, a);
        t = s ? bin(IDD_BIN_MUL, g, s) : NULL;
        r = t ? idd_unary(IDD_UN_NEG, t) : NULL;
        idd_tensor_release(s);
        break;
    }
    case IDD_UN_RECIP: {
        idd_tensor *o2 = idd_unary(IDD_UN_SQUARE, out);
        t = o2 ? bin(IDD_BIN_MUL, g, o2) : NULL;
        r = t ? idd_unary(IDD_UN_NEG, t) : NULL;
        idd_tensor_release(o2);
        break;
    }
    default: break;
    }
    idd_tensor_release(t);
    gin[0] = r;
    return r ? IDD_OK : IDD_ERR;
}

/* same shape and layout; float dtypes kept, integers become f32 */
static idd_tensor *float_like(idd_tensor *a) { return idd_tensor_empty_like(a, is_float(a->dtype) ? a->dtype : IDD_F32); }

idd_tensor *idd_unary(idd_unop op, idd_tensor *a) {
    idd_tensor *out = (op == IDD_UN_NEG || op == IDD_UN_ABS || op == IDD_UN_SQUARE || op == IDD_UN_SIGN ||
                       op == IDD_UN_FLOOR)
                          ? idd_tensor_empty_like(a, a->dtype)
                          : float_like(a);
    if (!out) return NULL;
    if (idd_backend_of(a)->unary(op, out, a) != IDD_OK) { idd_tensor_release(out); return NULL; }
    if (op != IDD_UN_FLOOR && op != IDD_UN_SIGN) {
        idd_node *n = idd_record(idd_unop_name(op), unary_backward, out, 1, &a);
        if (n) {
            n->ip[0] = op;
            idd_tensor *o = idd_view_alias(out);
            idd_node_save(n, o);
            idd_tensor_release(o);
        }
    }
    return out;
}

// ---------------------------------------------------------------- clamp, affine

static idd_status clamp_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    /* pass the gradient where lo <= a <= hi */
    idd_tensor *a = n->in[0];
    idd_tensor *m1 = idd_binary_scalar(IDD_BIN_GE, a, n->p[0], false);
    idd_tensor *m2 = idd_binary_scalar(IDD_BIN_LE, a, n->p[1], false);
    idd_tensor *m = m1 && m2 ? bin(IDD_BIN_MUL, m1, m2) : NULL;
    gin[0] = m ? bin(IDD_BIN_MUL, g, m) : NULL;
    idd_tensor_release(m1);
    idd_tensor_release(m2);
    idd_tensor_release(m);
    return gin[0] ? IDD_OK : IDD_ERR;
}

idd_tensor *idd_clamp(idd_tensor *a, double lo, double hi) {
    idd_tensor *out = idd_tensor_empty_like(a, a->dtype);
    if (!out) return NULL;
    if (idd_backend_of(a)->clamp(out, a, lo, hi) != IDD_OK) { idd_tensor_release(out); return NULL; }
    idd_node *n = idd_record("clamp", clamp_backward, out, 1, &a);
    if (n) { n->p[0] = lo; n->p[1] = hi; }
    return out;
}

static idd_status affine_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    gin[0] = idd_affine(g, n->p[0], 0);
    return gin[0] ? IDD_OK : IDD_ERR;
}

idd_tensor *idd_affine(idd_tensor *a, double scale, double shift) {
    idd_tensor *out = float_like(a);
    if (!out) return NULL;
    if (idd_backend_of(a)->affine(out, a, scale, shift) != IDD_OK) { idd_tensor_release(out); return NULL; }
    idd_node *n = idd_record("affine", affine_backward, out, 1, &a);
    if (n) n->p[0] = scale;
    return out;
}

// ---------------------------------------------------------------- where

static idd_status where_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *c = n->in[0];
    if (n->needs[1]) gin[1] = bin(IDD_BIN_MUL, g, c);
    if (n->needs[2]) {
        idd_tensor *nc = idd_affine(c, -1, 1);
        gin[2] = nc ? bin(IDD_BIN_MUL, g, nc) : NULL;
        idd_tensor_release(nc);
    }
    return (n->needs[1] && !gin[1]) || (n->needs[2] && !gin[2]) ? IDD_ERR : IDD_OK;
}

/* cond ? a : b, computed as b + cond*(a - b) with cond in {0,1} (NaN-safe via masks);
 * the masks are made in the dtype of a and b, so bf16 operands give a bf16 result */
idd_tensor *idd_where(idd_tensor *cond, idd_tensor *a, idd_tensor *b) {
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    idd_dtype dt = promote(a->dtype, b->dtype);
    idd_tensor *c0 = idd_binary_scalar(IDD_BIN_NE, cond, 0, false);
    idd_tensor *c = c0 && c0->dtype != dt && is_float(dt) ? binary_dt(IDD_BIN_MUL, c0, c0, dt) : c0;
    if (c != c0) idd_tensor_release(c0);
    idd_tensor *nc = c ? idd_affine(c, -1, 1) : NULL;
    idd_tensor *ca = nc ? bin(IDD_BIN_MUL, c, a) : NULL, *cb = ca ? bin(IDD_BIN_MUL, nc, b) : NULL;
    idd_tensor *out = cb ? bin(IDD_BIN_ADD, ca, cb) : NULL;
    idd_set_grad_enabled(prev);
    idd_tensor_release(nc);
    idd_tensor_release(ca);
    idd_tensor_release(cb);
    if (out) {
        idd_tensor *ins[3] = {c, a, b};
        idd_record("where", where_backward, out, 3, ins);
    }
    idd_tensor_release(c);
    return out;
}
