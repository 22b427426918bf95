/* ops_eval.c — the evaluation terms of the variational bound at the tensor level:
 * vb_terms_bpd (L_t in bits/dim and pred_xstart), prior_bpd (L_T), mean_flat of squared
 * differences, and the elementwise normal_kl and discretized Gaussian log-likelihood.
 * On every device (the CPU included) they run the backend's diffusion pointwise kernel
 * (diffusion_kernels.h IDD_DK_VB, _PRIOR, _SQDIFF, _NORMAL_KL, _DGLL; per element in
 * double): the per-element terms go into a (B, n) tensor that the backend's reduction
 * sums per sample in double, so calc_bpd_loop never leaves the GPU. */
#include "iddpm/diffusion_ops.h"
#include "iddpm/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops_common.h"

#define LN2 0.69314718055994530942

// ---------------------------------------------------------------- through the backend

static const idd_backend *eval_be(const idd_tensor *x) { return idd_backend_of(x); }

/* the op's per-element values as a new (B, C*HW) tensor on dev */
static idd_tensor *dev_elems(const idd_backend *be, int op, const idd_diff_args *a, idd_device dev, idd_tensor *x,
                             idd_tensor *y, idd_tensor *z, const char *opn) {
    int64_t shape[2] = {a->B, a->C * a->HW};
    idd_tensor *out = new_dev(dev, 2, shape);
    if (out && idd_numel(out) > 0 && be->diff_pointwise(op, a, F(out), F(x), F(y), F(z)) != IDD_OK) {
        idd_error_prefix(opn);
        idd_tensor_release(out);
        return NULL;
    }
    return out;
}

/* e (B, n) -> (B): the sums of its rows (in double by the backend) times k; releases e */
static idd_tensor *row_sums(idd_tensor *e, double k) {
    idd_tensor *s = e ? idd_sum(e, 1, false) : NULL;
    idd_tensor *o = s ? idd_affine(s, k, 0) : NULL;
    idd_tensor_release(e);
    idd_tensor_release(s);
    return o;
}

static idd_status vb_terms_dev(const idd_backend *be, idd_diffusion *d, idd_tensor *model_out, idd_tensor *x0,
                               idd_tensor *xt, idd_tensor *t, int clip, idd_tensor **vb, idd_tensor **pred_xstart) {
    const char *op = "diffusion.vb_terms_bpd";
    int64_t B, C, HW;
    geom(xt, &B, &C, &HW);
    idd_device dev = xt->device;
    idd_tensor *a[4] = {idd_dops_prep_dev(model_out, dev, op, "model output"), idd_dops_prep_dev(x0, dev, op, "x_start"),
                        idd_dops_prep_dev(xt, dev, op, "x_t"), NULL};
    a[3] = a[0] && a[1] && a[2] ? idd_dops_coef_table(d, t, B, dev, op) : NULL;
    if (!a[3]) { drop(4, a); return IDD_ERR; }
    idd_diff_args ar;
    idd_dops_dk_args(d, &ar, B, C, HW, a[3]);
    ar.clip = clip;
    idd_tensor *o = row_sums(dev_elems(be, IDD_DK_VB, &ar, dev, a[0], a[1], a[2], op), 1.0 / ((double)(C * HW) * LN2));
    idd_tensor *p = NULL;
    if (o && pred_xstart) {
        p = new_dev(dev, xt->ndim, xt->shape);
        if (p && (be->diff_pointwise(IDD_DK_PRED_XSTART, &ar, F(p), F(a[0]), F(a[2]), NULL) != IDD_OK ||
                  (clip && be->clamp(p, p, -1.0, 1.0) != IDD_OK))) {
            idd_error_prefix(op);
            idd_tensor_release(p);
            p = NULL;
        }
        if (!p) { idd_tensor_release(o); o = NULL; }
    }
    drop(4, a);
    if (!o) return IDD_ERR;
    *vb = o;
    if (pred_xstart) *pred_xstart = p;
    return IDD_OK;
}

static idd_tensor *prior_dev(const idd_backend *be, idd_diffusion *d, idd_tensor *x0) {
    const char *op = "diffusion.prior_bpd";
    int64_t B, C, HW;
    geom(x0, &B, &C, &HW);
    idd_device dev = x0->device;
    idd_tensor *tl = idd_tensor_new(IDD_I64, IDD_CPU, 1, &B);   /* t = T-1 for every sample */
    if (!tl) return NULL;
    for (int64_t b = 0; b < B; b++) ((int64_t *)idd_data(tl))[b] = d->s->T - 1;
    idd_tensor *coef = idd_dops_coef_table(d, tl, B, dev, op);
    idd_tensor *x = coef ? idd_dops_prep_dev(x0, dev, op, "x_start") : NULL;
    idd_tensor *o = NULL;
    if (x) {
        idd_diff_args ar;
        idd_dops_dk_args(d, &ar, B, C, HW, coef);
        o = row_sums(dev_elems(be, IDD_DK_PRIOR, &ar, dev, x, NULL, NULL, op), 1.0 / ((double)(C * HW) * LN2));
    }
    idd_tensor_release(x);
    idd_tensor_release(coef);
    idd_tensor_release(tl);
    return o;
}

static idd_tensor *mean_flat_dev(const idd_backend *be, idd_tensor *x, idd_tensor *y) {
    const char *op = "diffusion.mean_flat_sq_diff";
    idd_diff_args ar;
    memset(&ar, 0, sizeof ar);
    geom(x, &ar.B, &ar.C, &ar.HW);
    idd_tensor *a = idd_dops_prep_dev(x, x->device, op, "a"), *b = a ? idd_dops_prep_dev(y, x->device, op, "b") : NULL;
    idd_tensor *o = b ? row_sums(dev_elems(be, IDD_DK_SQDIFF, &ar, x->device, a, b, NULL, op), 1.0 / (double)(ar.C * ar.HW))
                      : NULL;
    idd_tensor_release(a);
    idd_tensor_release(b);
    return o;
}

/* in (one element or ref's shape) as a contiguous float32 tensor of ref's shape on dev */
static idd_tensor *full_on(idd_tensor *in, const idd_tensor *ref, idd_device dev, const char *op, const char *name) {
    if (idd_numel(in) == idd_numel(ref)) return idd_dops_prep_dev(in, dev, op, name);
    int64_t ones[IDD_MAX_DIMS];
    for (int i = 0; i < ref->ndim; i++) ones[i] = 1;
    idd_tensor *v = idd_view_reshape(in, ref->ndim, ones);
    idd_tensor *s = v ? idd_dops_prep_dev(v, dev, op, name) : NULL;
    idd_tensor *e = s ? idd_view_expand(s, ref->ndim, ref->shape) : NULL;
    idd_tensor *c = e ? idd_contiguous(e) : NULL;
    idd_tensor_release(v);
    idd_tensor_release(s);
    idd_tensor_release(e);
    return c;
}

/* normal_kl (kind 0: mean1, logvar1, mean2, logvar2) or dgll (kind 1: x, means,
 * log_scales) on ref's device; the inputs already checked */
static idd_tensor *elementwise_dev(const idd_backend *be, const char *op, int n, idd_tensor **in,
                                   const char *const *names, int kind, const idd_tensor *ref) {
    idd_device dev = ref->device;
    int64_t m = idd_numel(ref);
    idd_tensor *a[4] = {NULL, NULL, NULL, NULL}, *z = NULL, *out = NULL;
    for (int i = 0; i < n; i++)
        if (!(a[i] = full_on(in[i], ref, dev, op, names[i]))) { drop(n, a); return NULL; }
    idd_diff_args ar;
    memset(&ar, 0, sizeof ar);
    ar.B = 1; ar.C = 1; ar.HW = m;
    if (kind == 0) {   /* z = (2, m): logvar1 then logvar2 */
        int64_t two = 2 * m;
        z = new_dev(dev, 1, &two);
        idd_tensor *h0 = z ? idd_view_narrow(z, 0, 0, m) : NULL, *h1 = z ? idd_view_narrow(z, 0, m, m) : NULL;
        idd_tensor *f1 = h0 ? idd_view_reshape(a[1], 1, &m) : NULL, *f3 = h1 ? idd_view_reshape(a[3], 1, &m) : NULL;
        idd_status st = f1 && f3 ? idd_copy_(h0, f1) : IDD_ERR;
        if (st == IDD_OK) st = idd_copy_(h1, f3);
        idd_tensor_release(h0); idd_tensor_release(h1); idd_tensor_release(f1); idd_tensor_release(f3);
        if (st != IDD_OK) { idd_tensor_release(z); z = NULL; }
    }
    if (kind == 1 || z) {
        out = new_dev(dev, ref->ndim, ref->shape);
        idd_status st = !out ? IDD_ERR : m == 0 ? IDD_OK
                        : kind == 0 ? be->diff_pointwise(IDD_DK_NORMAL_KL, &ar, F(out), F(a[0]), F(a[2]), F(z))
                                    : be->diff_pointwise(IDD_DK_DGLL, &ar, F(out), F(a[0]), F(a[1]), F(a[2]));
        if (st != IDD_OK) { if (out) idd_error_prefix(op); idd_tensor_release(out); out = NULL; }
    }
    idd_tensor_release(z);
    drop(n, a);
    return out;
}

// ---------------------------------------------------------------- the ops

idd_status idd_diff_vb_terms_bpd(idd_diffusion *d, idd_tensor *model_out, idd_tensor *x0, idd_tensor *xt,
                                 idd_tensor *t, int clip, idd_tensor **vb, idd_tensor **pred_xstart) {
    const char *op = "diffusion.vb_terms_bpd";
    if (!model_out || !x0 || !xt) return idd_error("%s: an input is missing", op);
    if (idd_dops_check_model_out(d, model_out, xt, op) || idd_dops_same_shape(x0, xt, op, "x_start", "x_t")) return IDD_ERR;
    return vb_terms_dev(eval_be(xt), d, model_out, x0, xt, t, clip, vb, pred_xstart);
}

idd_tensor *idd_diff_prior_bpd(idd_diffusion *d, idd_tensor *x0) {
    const char *op = "diffusion.prior_bpd";
    if (!x0 || idd_dops_need_batch(x0, op, "x_start")) { if (!x0) idd_error("%s: x_start is missing", op); return NULL; }
    return prior_dev(eval_be(x0), d, x0);
}

idd_tensor *idd_diff_mean_flat_sq_diff(idd_tensor *x, idd_tensor *y) {
    const char *op = "diffusion.mean_flat_sq_diff";
    if (!x || !y) { idd_error("%s: an input is missing", op); return NULL; }
    if (idd_dops_need_batch(x, op, "a") || idd_dops_same_shape(x, y, op, "a", "b")) return NULL;
    return mean_flat_dev(eval_be(x), x, y);
}

// ---------------------------------------------------------------- elementwise losses

/* the first argument with more than one element gives the shape; the others must
 * match it or hold one element (stride 0) */
static idd_tensor *elementwise(const char *op, int n, idd_tensor **in, const char *const *names, int kind) {
    char s0[96], s1[96];
    const idd_tensor *ref = in[0];
    for (int i = 0; i < n; i++) {
        if (!in[i]) { idd_error("%s: %s is missing", op, names[i]); return NULL; }
        if (idd_numel(in[i]) > 1 && (idd_numel(ref) <= 1)) ref = in[i];
    }
    for (int i = 0; i < n; i++)
        if (idd_numel(in[i]) != 1 && !idd_same_shape(in[i], ref)) {
            idd_error("%s: %s %s does not match %s (pass a tensor of that shape or a number)", op, names[i],
                      idd_shape_str(in[i], s0, 96), idd_shape_str(ref, s1, 96));
            return NULL;
        }
    return elementwise_dev(eval_be(ref), op, n, in, names, kind, ref);
}

idd_tensor *idd_diff_normal_kl(idd_tensor *m1, idd_tensor *lv1, idd_tensor *m2, idd_tensor *lv2) {
    idd_tensor *in[4] = {m1, lv1, m2, lv2};
    static const char *const names[4] = {"mean1", "logvar1", "mean2", "logvar2"};
    return elementwise("diffusion.normal_kl", 4, in, names, 0);
}

idd_tensor *idd_diff_dgll(idd_tensor *x, idd_tensor *means, idd_tensor *log_scales) {
    idd_tensor *in[3] = {x, means, log_scales};
    static const char *const names[3] = {"x", "means", "log_scales"};
    return elementwise("diffusion.discretized_gaussian_log_likelihood", 3, in, names, 1);
}
