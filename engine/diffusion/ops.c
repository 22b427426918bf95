/* ops.c — the diffusion ops at the tensor level: argument checks with messages naming
 * the op and the shapes, conversion of inputs to contiguous float32 buffers on their
 * device, output allocation, the backend's diffusion kernels (diffusion_kernels.h) and
 * the tape nodes of q_sample (w.r.t. x_start and noise) and training_losses (w.r.t.
 * the model output). See diffusion_ops.h; the
 * evaluation terms (vb_terms_bpd, prior_bpd, mean_flat, normal_kl, dgll) are in
 * ops_eval.c, the shared helpers in ops_common.h. */
#include "iddpm/diffusion_ops.h"
#include "iddpm/autograd.h"
#include "iddpm/backend.h"
#include "ops_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------- the refcounted diffusion

idd_diffusion *idd_diffusion_new(idd_schedule *s, idd_diffusion_cfg cfg, int rescale_timesteps) {
    idd_diffusion *d = calloc(1, sizeof *d);
    if (!d) { idd_schedule_free(s); idd_error_status(IDD_ENOMEM, "diffusion: out of memory"); return NULL; }
    d->refcount = 1;
    d->s = s;
    d->cfg = cfg;
    d->rescale_timesteps = rescale_timesteps;
    return d;
}

void idd_diffusion_retain(idd_diffusion *d) { d->refcount++; }

void idd_diffusion_release(idd_diffusion *d) {
    if (!d || --d->refcount > 0) return;
    idd_schedule_free(d->s);
    free(d);
}

// ---------------------------------------------------------------- argument helpers

/* A contiguous float32 CPU version of x (a new reference), or NULL with a message. */
idd_tensor *idd_dops_prep(idd_tensor *x, const char *op, const char *arg) {
    if (!x) { idd_error("%s: %s is missing", op, arg); return NULL; }
    if (x->dtype != IDD_F32 && x->dtype != IDD_F64) {
        idd_error("%s: %s must be a float tensor, got %s", op, arg, idd_dtype_name(x->dtype));
        return NULL;
    }
    if (x->device == IDD_CPU && x->dtype == IDD_F32 && idd_is_contiguous(x)) {
        idd_tensor_retain(x);
        return x;
    }
    idd_tensor *c = x->device == IDD_CPU ? (idd_tensor_retain(x), x) : idd_to_device(x, IDD_CPU);
    idd_tensor *f = c ? idd_to_dtype(c, IDD_F32) : NULL;
    idd_tensor_release(c);
    return f;
}

idd_status idd_dops_need_batch(const idd_tensor *x, const char *op, const char *arg) {
    char s[96];
    if (x->ndim < 1)
        return idd_error("%s: %s must have a batch dim, got shape %s", op, arg, idd_shape_str(x, s, 96));
    return IDD_OK;
}

idd_status idd_dops_same_shape(const idd_tensor *a, const idd_tensor *b, const char *op,
                             const char *an, const char *bn) {
    char sa[96], sb[96];
    if (!idd_same_shape(a, b))
        return idd_error("%s: %s %s does not match %s %s", op, bn, idd_shape_str(b, sb, 96), an,
                         idd_shape_str(a, sa, 96));
    return IDD_OK;
}

/* t: int64 (B), contiguous CPU, every value in [0, T). A new reference. */
idd_tensor *idd_dops_prep_t(idd_diffusion *d, idd_tensor *t, int64_t B, const char *op) {
    char s[96];
    if (!t) { idd_error("%s: t is missing", op); return NULL; }
    if (t->dtype != IDD_I64) { idd_error("%s: t must be an int64 tensor, got %s", op, idd_dtype_name(t->dtype)); return NULL; }
    if (t->ndim != 1 || t->shape[0] != B) {
        idd_error("%s: t has shape %s, expected (%lld) (one timestep per example)", op,
                  idd_shape_str(t, s, 96), (long long)B);
        return NULL;
    }
    idd_tensor *c = (t->device == IDD_CPU && idd_is_contiguous(t)) ? (idd_tensor_retain(t), t)
                                                                   : idd_to_device(t, IDD_CPU);
    if (c && idd_check_timesteps(d->s, idd_data(c), B, op) != IDD_OK) { idd_tensor_release(c); return NULL; }
    return c;
}


// ---------------------------------------------------------------- the device path
//
// For tensors on a device other than the CPU whose backend has the diffusion kernels
// (backend.h, diffusion_kernels.h): inputs become contiguous float32 buffers on that
// device, the timesteps are checked on the host and the per-sample schedule values
// go up as one (IDD_DK_NCOEF, B) double table (an upload ordered on the stream, no
// wait), and the outputs stay on the device. Ops without device kernels compute on
// the CPU and move their results back to the input's device.

static const idd_backend *dev_be(const idd_tensor *x) {
    return x ? idd_backend_of(x) : NULL;
}

/* contiguous float32 on dev (a new reference) */
idd_tensor *idd_dops_prep_dev(idd_tensor *x, idd_device dev, const char *op, const char *arg) {
    if (!x) { idd_error("%s: %s is missing", op, arg); return NULL; }
    if (x->dtype != IDD_F32 && x->dtype != IDD_F64) {
        idd_error("%s: %s must be a float tensor, got %s", op, arg, idd_dtype_name(x->dtype));
        return NULL;
    }
    idd_tensor *c = x->device == dev ? (idd_tensor_retain(x), x) : idd_to_device(x, dev);
    if (c && c->dtype != IDD_F32) { idd_tensor *f = idd_to_dtype(c, IDD_F32); idd_tensor_release(c); c = f; }
    if (c && !idd_is_contiguous(c)) { idd_tensor *f = idd_contiguous(c); idd_tensor_release(c); c = f; }
    return c;
}

static double vb_scale_of(const idd_diffusion *d) {
    if (d->cfg.loss_type == IDD_LOSS_RESCALED_KL) return (double)d->s->T;
    if (d->cfg.loss_type == IDD_LOSS_RESCALED_MSE) return (double)d->s->T / 1000.0;
    return 1.0;
}

/* the (IDD_DK_NCOEF, B) table of schedule values at t on dev; t checked on the host */
idd_tensor *idd_dops_coef_table(idd_diffusion *d, idd_tensor *t, int64_t B, idd_device dev, const char *op) {
    idd_tensor *tc = idd_dops_prep_t(d, t, B, op);
    if (!tc) return NULL;
    const idd_schedule *s = d->s;
    const int64_t *tv = I(tc);
    int64_t shape[2] = {IDD_DK_NCOEF, B};
    double *h = malloc(sizeof(double) * IDD_DK_NCOEF * (size_t)(B ? B : 1));
    idd_tensor *c = h ? idd_tensor_new(IDD_F64, dev, 2, shape) : NULL;
    if (!h) idd_error_status(IDD_ENOMEM, "%s: out of memory", op);
    if (c) {
        for (int64_t b = 0; b < B; b++) {
            int64_t k = tv[b];
            double *col = h + b;
#define SET(name, v) col[(int64_t)(name) * B] = (v)
            SET(IDD_DK_SQRT_AC, s->sqrt_alphas_cumprod[k]);
            SET(IDD_DK_SQRT_1M_AC, s->sqrt_one_minus_alphas_cumprod[k]);
            SET(IDD_DK_SRAC, s->sqrt_recip_alphas_cumprod[k]);
            SET(IDD_DK_SRM1AC, s->sqrt_recipm1_alphas_cumprod[k]);
            SET(IDD_DK_PMC1, s->posterior_mean_coef1[k]);
            SET(IDD_DK_PMC2, s->posterior_mean_coef2[k]);
            SET(IDD_DK_PLVC, s->posterior_log_variance_clipped[k]);
            SET(IDD_DK_LOGBETA, s->log_betas[k]);
            SET(IDD_DK_FLLV, s->fixed_large_log_variance[k]);
            SET(IDD_DK_PV, s->posterior_variance[k]);
            SET(IDD_DK_FLV, s->fixed_large_variance[k]);
            SET(IDD_DK_AC, s->alphas_cumprod[k]);
            SET(IDD_DK_ACP, s->alphas_cumprod_prev[k]);
            SET(IDD_DK_ACN, s->alphas_cumprod_next[k]);
            SET(IDD_DK_1M_AC, 1.0 - s->alphas_cumprod[k]);
            SET(IDD_DK_LOG1M_AC, s->log_one_minus_alphas_cumprod[k]);
            SET(IDD_DK_T, (double)k);
#undef SET
        }
        const idd_backend *be = idd_backend_get(dev);
        size_t nb = sizeof(double) * IDD_DK_NCOEF * (size_t)B;
        idd_status st = nb == 0 ? IDD_OK : be->upload_async(idd_data(c), h, nb);
        if (st != IDD_OK) { idd_error_prefix(op); idd_tensor_release(c); c = NULL; }
    }
    free(h);
    idd_tensor_release(tc);
    return c;
}

void idd_dops_dk_args(idd_diffusion *d, idd_diff_args *a, int64_t B, int64_t C, int64_t HW, idd_tensor *coef) {
    memset(a, 0, sizeof *a);
    a->B = B; a->C = C; a->HW = HW;
    a->mean_type = (int)d->cfg.mean_type;
    a->var_type = (int)d->cfg.var_type;
    a->loss_type = (int)d->cfg.loss_type;
    a->learned = idd_var_is_learned(d->cfg.var_type);
    a->vb_scale = vb_scale_of(d);
    a->coef = coef ? idd_data(coef) : NULL;
}

/* a pointwise device op: out (like's shape) from up to 3 inputs; NULL inputs allowed
 * where the op does not read them. The coefficient table is returned in *coef_out
 * (when asked) for the tape. */
static idd_tensor *dev_pointwise(idd_diffusion *d, int op, const char *opn, idd_tensor *like, idd_tensor *t,
                                 idd_tensor *x, idd_tensor *y, idd_tensor *z, const char *const *names,
                                 int col0, int col1, double eta, idd_tensor **coef_out) {
    const idd_backend *be = dev_be(like);
    idd_device dev = like->device;
    int64_t B, C, HW;
    geom(like, &B, &C, &HW);
    idd_tensor *in[3] = {x, y, z}, *a[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3; k++)
        if (in[k] && !(a[k] = idd_dops_prep_dev(in[k], dev, opn, names[k]))) { drop(3, a); return NULL; }
    idd_tensor *coef = idd_dops_coef_table(d, t, B, dev, opn);
    idd_tensor *out = coef ? new_dev(dev, like->ndim, like->shape) : NULL;
    if (out) {
        idd_diff_args ar;
        idd_dops_dk_args(d, &ar, B, C, HW, coef);
        ar.col0 = col0; ar.col1 = col1; ar.eta = eta;
        if (idd_numel(out) > 0 && be->diff_pointwise(op, &ar, F(out), F(a[0]), F(a[1]), F(a[2])) != IDD_OK) {
            idd_error_prefix(opn);
            idd_tensor_release(out);
            out = NULL;
        }
    }
    drop(3, a);
    if (out && coef_out) *coef_out = coef; else idd_tensor_release(coef);
    return out;
}

// ---------------------------------------------------------------- model_t, q_sample

idd_tensor *idd_diff_model_t(idd_diffusion *d, idd_tensor *t) {
    if (!t || t->ndim != 1) { idd_error("diffusion.model_t: t must be a 1-D int64 tensor"); return NULL; }
    idd_tensor *tc = idd_dops_prep_t(d, t, t->shape[0], "diffusion.model_t");
    if (!tc) return NULL;
    idd_tensor *out = new_b(t->shape[0]);
    if (out && idd_schedule_model_t(d->s, I(tc), t->shape[0], d->rescale_timesteps, F(out)) != IDD_OK) {
        idd_tensor_release(out);
        out = NULL;
    }
    idd_tensor_release(tc);
    return home(out, t->device);
}

/* device path: saved[0] is the coefficient table */
static idd_status q_sample_backward_dev(idd_node *n, idd_tensor *dout, idd_tensor **gin) {
    idd_tensor *coef = n->saved[0];
    idd_tensor *g = idd_dops_prep_dev(dout, coef->device, "q_sample backward", "dout");
    if (!g) return IDD_ERR;
    idd_diff_args a;
    memset(&a, 0, sizeof a);
    a.B = coef->shape[1];
    a.C = a.B ? idd_numel(g) / a.B : 0;
    a.HW = 1;
    a.coef = idd_data(coef);
    const idd_backend *be = idd_backend_of(g);
    for (int k = 0; k < 2; k++) {
        if (!n->needs[k]) continue;
        idd_tensor *o = new_dev(g->device, g->ndim, g->shape);
        a.col0 = k == 0 ? IDD_DK_SQRT_AC : IDD_DK_SQRT_1M_AC;
        if (!o || (idd_numel(o) > 0 && be->diff_pointwise(IDD_DK_SCALE, &a, F(o), F(g), NULL, NULL) != IDD_OK)) {
            idd_tensor_release(o);
            idd_tensor_release(g);
            return IDD_ERR;
        }
        gin[k] = o;
    }
    idd_tensor_release(g);
    return IDD_OK;
}

idd_tensor *idd_diff_q_sample(idd_diffusion *d, idd_tensor *x0, idd_tensor *t, idd_tensor *noise) {
    const char *op = "diffusion.q_sample";
    int64_t B, C, HW;
    if (!x0 || !noise) { idd_error("%s: %s is missing", op, x0 ? "noise" : "x_start"); return NULL; }
    if (idd_dops_need_batch(x0, op, "x_start") || idd_dops_same_shape(x0, noise, op, "x_start", "noise")) return NULL;
    geom(x0, &B, &C, &HW);
    static const char *const names[3] = {"x_start", "noise", ""};
    idd_tensor *coef = NULL;
    idd_tensor *out = dev_pointwise(d, IDD_DK_LIN2, op, x0, t, x0, noise, NULL, names, IDD_DK_SQRT_AC,
                                    IDD_DK_SQRT_1M_AC, 0, &coef);
    if (out) {
        idd_tensor *ins[2] = {x0, noise};
        idd_node *nd = idd_record("diffusion.q_sample", q_sample_backward_dev, out, 2, ins);
        if (nd) idd_node_save(nd, coef);
    }
    idd_tensor_release(coef);
    return out;
}

idd_status idd_diff_q_mean_variance(idd_diffusion *d, idd_tensor *x0, idd_tensor *t,
                                    idd_tensor **mean, idd_tensor **var, idd_tensor **logvar) {
    const char *op = "diffusion.q_mean_variance";
    int64_t B, C, HW;
    if (!x0) return idd_error("%s: x_start is missing", op);
    if (idd_dops_need_batch(x0, op, "x_start")) return IDD_ERR;
    geom(x0, &B, &C, &HW);
    static const char *const names[3] = {"x_start", "", ""};
    idd_tensor *o[3];
    o[0] = dev_pointwise(d, IDD_DK_SCALE, op, x0, t, x0, NULL, NULL, names, IDD_DK_SQRT_AC, 0, 0, NULL);
    o[1] = o[0] ? dev_pointwise(d, IDD_DK_BCAST, op, x0, t, NULL, NULL, NULL, names, IDD_DK_1M_AC, 0, 0, NULL) : NULL;
    o[2] = o[1] ? dev_pointwise(d, IDD_DK_BCAST, op, x0, t, NULL, NULL, NULL, names, IDD_DK_LOG1M_AC, 0, 0, NULL) : NULL;
    if (!o[2]) { drop(3, o); return IDD_ERR; }
    *mean = o[0]; *var = o[1]; *logvar = o[2];
    return IDD_OK;
}

idd_status idd_diff_q_posterior(idd_diffusion *d, idd_tensor *x0, idd_tensor *xt, idd_tensor *t,
                                idd_tensor **mean, idd_tensor **var, idd_tensor **logvar) {
    const char *op = "diffusion.q_posterior_mean_variance";
    int64_t B, C, HW;
    if (!x0 || !xt) return idd_error("%s: %s is missing", op, x0 ? "x_t" : "x_start");
    if (idd_dops_need_batch(x0, op, "x_start") || idd_dops_same_shape(x0, xt, op, "x_start", "x_t")) return IDD_ERR;
    geom(x0, &B, &C, &HW);
    static const char *const names[3] = {"x_start", "x_t", ""};
    idd_tensor *o[3];
    o[0] = dev_pointwise(d, IDD_DK_LIN2, op, x0, t, x0, xt, NULL, names, IDD_DK_PMC1, IDD_DK_PMC2, 0, NULL);
    o[1] = o[0] ? dev_pointwise(d, IDD_DK_BCAST, op, x0, t, NULL, NULL, NULL, names, IDD_DK_PV, 0, 0, NULL) : NULL;
    o[2] = o[1] ? dev_pointwise(d, IDD_DK_BCAST, op, x0, t, NULL, NULL, NULL, names, IDD_DK_PLVC, 0, 0, NULL) : NULL;
    if (!o[2]) { drop(3, o); return IDD_ERR; }
    *mean = o[0]; *var = o[1]; *logvar = o[2];
    return IDD_OK;
}

static idd_tensor *predict(idd_diffusion *d, idd_tensor *xt, idd_tensor *t, idd_tensor *y, int from_eps) {
    const char *op = from_eps ? "diffusion.predict_xstart_from_eps" : "diffusion.predict_eps_from_xstart";
    int64_t B, C, HW;
    if (!xt || !y) { idd_error("%s: %s is missing", op, xt ? "second input" : "x_t"); return NULL; }
    if (idd_dops_need_batch(xt, op, "x_t") || idd_dops_same_shape(xt, y, op, "x_t", from_eps ? "eps" : "x_start")) return NULL;
    geom(xt, &B, &C, &HW);
    const char *const names[3] = {"x_t", from_eps ? "eps" : "x_start", ""};
    return dev_pointwise(d, from_eps ? IDD_DK_XSTART_EPS : IDD_DK_EPS_XSTART, op, xt, t, xt, y, NULL, names, 0, 0,
                         0, NULL);
}
idd_tensor *idd_diff_predict_xstart_from_eps(idd_diffusion *d, idd_tensor *xt, idd_tensor *t, idd_tensor *eps) {
    return predict(d, xt, t, eps, 1);
}
idd_tensor *idd_diff_predict_eps_from_xstart(idd_diffusion *d, idd_tensor *xt, idd_tensor *t, idd_tensor *x0) {
    return predict(d, xt, t, x0, 0);
}

// ---------------------------------------------------------------- reverse process

/* model_out must be x_t's shape, or with 2C channels when the variance is learned */
idd_status idd_dops_check_model_out(idd_diffusion *d, const idd_tensor *mo, const idd_tensor *xt, const char *op) {
    char sm[96], sx[96];
    int learned = idd_var_is_learned(d->cfg.var_type);
    int ok = mo->ndim == xt->ndim && mo->ndim >= 2;
    for (int i = 0; ok && i < mo->ndim; i++)
        ok = i == 1 ? mo->shape[1] == (learned ? 2 : 1) * xt->shape[1] : mo->shape[i] == xt->shape[i];
    if (!ok)
        return idd_error("%s: model output %s does not match x_t %s (expected %s channels for variance type %s)",
                         op, idd_shape_str(mo, sm, 96), idd_shape_str(xt, sx, 96), learned ? "2C" : "C",
                         idd_var_type_name(d->cfg.var_type));
    return IDD_OK;
}

idd_tensor *idd_diff_pred_xstart_raw(idd_diffusion *d, idd_tensor *model_out, idd_tensor *xt, idd_tensor *t) {
    const char *op = "diffusion.p_mean_variance";
    int64_t B, C, HW;
    if (!model_out || !xt) { idd_error("%s: %s is missing", op, xt ? "model output" : "x_t"); return NULL; }
    if (idd_dops_check_model_out(d, model_out, xt, op)) return NULL;
    geom(xt, &B, &C, &HW);
    static const char *const names[3] = {"model output", "x_t", ""};
    return dev_pointwise(d, IDD_DK_PRED_XSTART, op, xt, t, model_out, xt, NULL, names, 0, 0, 0, NULL);
}

idd_status idd_diff_p_finish(idd_diffusion *d, idd_tensor *model_out, idd_tensor *xt, idd_tensor *t,
                             idd_tensor *pred_xstart, int clip, idd_tensor **mean, idd_tensor **var,
                             idd_tensor **logvar, idd_tensor **pred_out) {
    const char *op = "diffusion.p_mean_variance";
    int64_t B, C, HW;
    if (!model_out || !xt || !pred_xstart) return idd_error("%s: an input is missing", op);
    if (idd_dops_check_model_out(d, model_out, xt, op) || idd_dops_same_shape(xt, pred_xstart, op, "x_t", "pred_xstart"))
        return IDD_ERR;
    geom(xt, &B, &C, &HW);
    idd_device dev = xt->device;
    const idd_backend *be = dev_be(xt);
    idd_tensor *a[2] = {idd_dops_prep_dev(model_out, dev, op, "model output"), NULL};
    a[1] = a[0] ? idd_dops_prep_dev(xt, dev, op, "x_t") : NULL;
    idd_tensor *pc = a[1] ? idd_dops_prep_dev(pred_xstart, dev, op, "pred_xstart") : NULL;
    if (pc && pc == pred_xstart) { idd_tensor *c = idd_clone(pc); idd_tensor_release(pc); pc = c; }  /* a fresh copy */
    idd_tensor *coef = pc ? idd_dops_coef_table(d, t, B, dev, op) : NULL;
    idd_tensor *o[3] = {NULL, NULL, NULL};
    idd_tensor **want[3] = {mean, var, logvar};
    idd_status st = coef ? IDD_OK : IDD_ERR;
    for (int k = 0; k < 3 && st == IDD_OK; k++)
        if (want[k] && !(o[k] = new_dev(dev, xt->ndim, xt->shape))) st = IDD_ERR;
    if (st == IDD_OK && idd_numel(xt) > 0) {
        idd_diff_args ar;
        idd_dops_dk_args(d, &ar, B, C, HW, coef);
        ar.clip = clip;
        st = be->diff_p_finish(&ar, F(a[0]), F(a[1]), F(pc), F(o[0]), F(o[1]), F(o[2]));
        if (st != IDD_OK) idd_error_prefix(op);
    }
    drop(2, a);
    idd_tensor_release(coef);
    if (st != IDD_OK) { drop(3, o); idd_tensor_release(pc); return IDD_ERR; }
    for (int k = 0; k < 3; k++) if (want[k]) *want[k] = o[k];
    if (pred_out) *pred_out = pc; else idd_tensor_release(pc);
    return IDD_OK;
}

idd_tensor *idd_diff_p_sample_step(idd_diffusion *d, idd_tensor *mean, idd_tensor *logvar,
                                   idd_tensor *noise, idd_tensor *t) {
    const char *op = "diffusion.p_sample";
    int64_t B, C, HW;
    if (!mean || !logvar) { idd_error("%s: mean or log_variance missing", op); return NULL; }
    if (idd_dops_need_batch(mean, op, "mean") || idd_dops_same_shape(mean, logvar, op, "mean", "log_variance") ||
        (noise && idd_dops_same_shape(mean, noise, op, "x_t", "noise")))
        return NULL;
    geom(mean, &B, &C, &HW);
    static const char *const names[3] = {"mean", "log_variance", "noise"};
    if (!noise) {   /* only t == 0 rows may go without noise */
        idd_tensor *tc = idd_dops_prep_t(d, t, B, op);
        if (!tc) return NULL;
        int need = 0;
        for (int64_t b = 0; b < B; b++) need |= I(tc)[b] != 0;
        idd_tensor_release(tc);
        if (need) { idd_error("%s: noise is missing (NULL)", op); return NULL; }
        noise = mean;
    }
    return dev_pointwise(d, IDD_DK_P_SAMPLE, op, mean, t, mean, logvar, noise, names, 0, 0, 0, NULL);
}

static idd_tensor *ddim(idd_diffusion *d, idd_tensor *xt, idd_tensor *px, idd_tensor *noise, idd_tensor *t,
                        double eta, int reverse) {
    const char *op = reverse ? "diffusion.ddim_reverse_sample" : "diffusion.ddim_sample";
    int64_t B, C, HW;
    if (!xt || !px) { idd_error("%s: x_t or pred_xstart missing", op); return NULL; }
    if (idd_dops_need_batch(xt, op, "x_t") || idd_dops_same_shape(xt, px, op, "x_t", "pred_xstart") ||
        (noise && idd_dops_same_shape(xt, noise, op, "x_t", "noise")))
        return NULL;
    geom(xt, &B, &C, &HW);
    static const char *const names[3] = {"x_t", "pred_xstart", "noise"};
    if (reverse && eta != 0.0) {
        idd_error("%s: reverse ODE only for deterministic path (eta must be 0, got %g)", op, eta);
        return NULL;
    }
    if (!reverse && (!(eta >= 0) || !isfinite(eta))) { idd_error("%s: eta must be >= 0, got %g", op, eta); return NULL; }
    if (!reverse && !noise) {
        if (eta != 0) {
            idd_tensor *tc = idd_dops_prep_t(d, t, B, op);
            if (!tc) return NULL;
            int need = 0;
            for (int64_t b = 0; b < B; b++) need |= I(tc)[b] != 0;
            idd_tensor_release(tc);
            if (need) { idd_error("%s: noise (eta > 0) is missing (NULL)", op); return NULL; }
        }
        noise = xt;   /* not read */
    }
    return dev_pointwise(d, reverse ? IDD_DK_DDIM_REVERSE : IDD_DK_DDIM, op, xt, t, xt, px, reverse ? NULL : noise,
                         names, 0, 0, eta, NULL);
}
idd_tensor *idd_diff_ddim_step(idd_diffusion *d, idd_tensor *xt, idd_tensor *pred_xstart, idd_tensor *noise,
                               idd_tensor *t, double eta) {
    return ddim(d, xt, pred_xstart, noise, t, eta, 0);
}
idd_tensor *idd_diff_ddim_reverse_step(idd_diffusion *d, idd_tensor *xt, idd_tensor *pred_xstart, idd_tensor *t,
                                       double eta) {
    return ddim(d, xt, pred_xstart, NULL, t, eta, 1);
}

// ---------------------------------------------------------------- losses

static void release_diffusion(void *p) { idd_diffusion_release(p); }

/* device path: saved mo, x0, xt, noise (contiguous float32 on the device), coef */
static idd_status training_losses_backward_dev(idd_node *n, idd_tensor *dout, idd_tensor **gin) {
    idd_diffusion *d = n->ctx;
    idd_tensor *mo = n->saved[0], *x0 = n->saved[1], *xt = n->saved[2], *nz = n->saved[3], *coef = n->saved[4];
    int64_t B, C, HW;
    geom(xt, &B, &C, &HW);
    idd_tensor *g = idd_dops_prep_dev(dout, mo->device, "training_losses backward", "dout");
    idd_tensor *gm = g ? new_dev(mo->device, mo->ndim, mo->shape) : NULL;
    if (!gm) { idd_tensor_release(g); return IDD_ERR; }
    idd_diff_args a;
    idd_dops_dk_args(d, &a, B, C, HW, coef);
    idd_status st = idd_numel(gm) > 0 ? idd_backend_of(gm)->diff_losses_backward(&a, F(mo), F(x0), F(xt), F(nz), F(g), F(gm))
                                      : IDD_OK;
    idd_tensor_release(g);
    if (st != IDD_OK) { idd_error_prefix("diffusion.training_losses backward"); idd_tensor_release(gm); return IDD_ERR; }
    gin[0] = gm;
    return IDD_OK;
}

static idd_status training_losses_dev(idd_diffusion *d, idd_tensor *model_out, idd_tensor *x0, idd_tensor *xt,
                                      idd_tensor *noise, idd_tensor *t, idd_tensor **loss, idd_tensor **mse,
                                      idd_tensor **vb) {
    const char *op = "diffusion.training_losses";
    int64_t B, C, HW;
    geom(xt, &B, &C, &HW);
    idd_device dev = xt->device;
    const idd_backend *be = dev_be(xt);
    idd_tensor *a[5] = {idd_dops_prep_dev(model_out, dev, op, "model output"), idd_dops_prep_dev(x0, dev, op, "x_start"),
                        idd_dops_prep_dev(xt, dev, op, "x_t"), idd_dops_prep_dev(noise, dev, op, "noise"), NULL};
    a[4] = a[0] && a[1] && a[2] && a[3] ? idd_dops_coef_table(d, t, B, dev, op) : NULL;
    idd_tensor *o[3] = {a[4] ? new_dev(dev, 1, &B) : NULL, a[4] ? new_dev(dev, 1, &B) : NULL,
                        a[4] ? new_dev(dev, 1, &B) : NULL};
    idd_status st = o[0] && o[1] && o[2] ? IDD_OK : IDD_ERR;
    if (st == IDD_OK && B > 0) {
        idd_diff_args ar;
        idd_dops_dk_args(d, &ar, B, C, HW, a[4]);
        st = be->diff_losses(&ar, F(a[0]), F(a[1]), F(a[2]), F(a[3]), F(o[0]), F(o[1]), F(o[2]));
        if (st != IDD_OK) idd_error_prefix(op);
    }
    if (st == IDD_OK) {
        idd_tensor *ins[1] = {model_out};
        idd_node *nd = idd_record("diffusion.training_losses", training_losses_backward_dev, o[0], 1, ins);
        if (nd) {
            for (int k = 0; k < 5; k++) idd_node_save(nd, a[k]);
            idd_diffusion_retain(d);
            nd->ctx = d;
            nd->free_ctx = release_diffusion;
        }
    }
    drop(5, a);
    if (st != IDD_OK) { drop(3, o); return IDD_ERR; }
    *loss = o[0];
    if (mse) *mse = o[1]; else idd_tensor_release(o[1]);
    if (vb) *vb = o[2]; else idd_tensor_release(o[2]);
    return IDD_OK;
}

idd_status idd_diff_training_losses(idd_diffusion *d, idd_tensor *model_out, idd_tensor *x0, idd_tensor *xt,
                                    idd_tensor *noise, idd_tensor *t, idd_tensor **loss, idd_tensor **mse,
                                    idd_tensor **vb) {
    const char *op = "diffusion.training_losses";
    if (!model_out || !x0 || !xt || !noise) return idd_error("%s: an input is missing", op);
    if (idd_dops_check_model_out(d, model_out, xt, op) || idd_dops_same_shape(x0, xt, op, "x_start", "x_t") ||
        idd_dops_same_shape(x0, noise, op, "x_start", "noise"))
        return IDD_ERR;
    return training_losses_dev(d, model_out, x0, xt, noise, t, loss, mse, vb);
}
