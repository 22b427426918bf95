/* iddpm/diffusion_kernels.h — the device-side diffusion kernels' interface: the
 * per-sample coefficient table, the argument block of the backend entries
 * (backend.h: diff_pointwise, diff_p_finish, diff_losses, diff_losses_backward) and
 * the per-element arithmetic as inline functions that both backends compile: the
 * CPU's engine/cpu/diffusion.c and the CUDA kernels of engine/cuda/diffusion.cu. The
 * tensor-level ops (engine/diffusion/ops.c, ops_eval.c) reach it through the backend on
 * every device. All arithmetic is in double per element, so the GPU's results differ
 * from the CPU's by float32 rounding and summation order only. (engine/diffusion/
 * gaussian.c and losses.c are the same mathematics on raw host arrays: the C API of
 * diffusion.h, which tests/c/test_diffusion.c checks against the official code's
 * numbers; no op runs them.) */
#ifndef IDDPM_DIFFUSION_KERNELS_H
#define IDDPM_DIFFUSION_KERNELS_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define IDD_HD __host__ __device__ __forceinline__
#else
#define IDD_HD static inline
#endif

/* the model's parameterisation (diffusion.h; the official ModelMeanType, ModelVarType, LossType) */
typedef enum { IDD_MEAN_PREVIOUS_X = 0, IDD_MEAN_START_X = 1, IDD_MEAN_EPSILON = 2 } idd_mean_type;
typedef enum {
    IDD_VAR_LEARNED = 0, IDD_VAR_FIXED_SMALL = 1, IDD_VAR_FIXED_LARGE = 2, IDD_VAR_LEARNED_RANGE = 3
} idd_var_type;
typedef enum {
    IDD_LOSS_MSE = 0, IDD_LOSS_RESCALED_MSE = 1, IDD_LOSS_KL = 2, IDD_LOSS_RESCALED_KL = 3
} idd_loss_type;

/* columns of the (IDD_DK_NCOEF, B) double table: the schedule arrays at t[b] */
enum {
    IDD_DK_SQRT_AC, IDD_DK_SQRT_1M_AC, IDD_DK_SRAC, IDD_DK_SRM1AC, IDD_DK_PMC1, IDD_DK_PMC2,
    IDD_DK_PLVC, IDD_DK_LOGBETA, IDD_DK_FLLV, IDD_DK_PV, IDD_DK_FLV, IDD_DK_AC, IDD_DK_ACP,
    IDD_DK_ACN, IDD_DK_1M_AC, IDD_DK_LOG1M_AC, IDD_DK_T, IDD_DK_NCOEF
};

/* diff_pointwise op codes; x, y, z are (B, n) unless noted, out (B, n) */
enum {
    IDD_DK_LIN2,          /* out = c[col0]*x + c[col1]*y (q_sample, posterior mean) */
    IDD_DK_SCALE,         /* out = c[col0]*x (q_sample backward, q mean) */
    IDD_DK_BCAST,         /* out = c[col0] (per-sample variance filled over n) */
    IDD_DK_XSTART_EPS,    /* out = SRAC*x - SRM1AC*y (x = x_t, y = eps) */
    IDD_DK_EPS_XSTART,    /* out = (SRAC*x - y) / SRM1AC (x = x_t, y = x_start) */
    IDD_DK_PRED_XSTART,   /* x = model output (B, cout, HW), y = x_t: raw pred_xstart */
    IDD_DK_P_SAMPLE,      /* x = mean, y = log-variance, z = noise; t == 0 copies the mean */
    IDD_DK_DDIM,          /* x = x_t, y = pred_xstart, z = noise (may be NULL when not needed) */
    IDD_DK_DDIM_REVERSE,  /* x = x_t, y = pred_xstart */
    /* evaluation terms, per element (ops_eval.c sums them per sample on the device) */
    IDD_DK_VB,            /* x = model output (B, cout, HW), y = x_start, z = x_t: the L_t term in nats
                           * (discretized decoder NLL at t == 0, KL to the posterior otherwise); a->clip */
    IDD_DK_PRIOR,         /* x = x_start: KL(q(x_T | x_0) || N(0, I)) in nats; coef at t = T-1 */
    IDD_DK_SQDIFF,        /* (x - y)^2 */
    IDD_DK_NORMAL_KL,     /* x = mean1, y = mean2, z = (2, B*n): logvar1 then logvar2; no coef */
    IDD_DK_DGLL           /* x, y = means, z = log_scales: discretized Gaussian log-likelihood; no coef */
};

typedef struct {
    int64_t B, C, HW;            /* x-like (B, C, HW); model outputs (B, cout, HW) */
    int mean_type, var_type, loss_type, clip, learned;
    int col0, col1;              /* coefficient columns (LIN2, SCALE, BCAST) */
    double vb_scale, eta;
    const double *coef;          /* (IDD_DK_NCOEF, B) on the tensors' device */
} idd_diff_args;

#define IDD_DK_C(a, col, b) ((a)->coef[(int64_t)(col) * (a)->B + (b)])

/* ------------------------------------------------------------------ scalar math */

#define IDD_DK_LN2 0.69314718055994530942
#define IDD_DK_CDF_K 0.79788456080286535588
#define IDD_DK_CDF_A 0.044715

IDD_HD double idd_dk_normal_kl(double m1, double lv1, double m2, double lv2) {
    double d = m1 - m2;
    return 0.5 * (-1.0 + lv2 - lv1 + exp(lv1 - lv2) + d * d * exp(-lv2));
}
IDD_HD double idd_dk_cdf(double x) { return 0.5 * (1.0 + tanh(IDD_DK_CDF_K * (x + IDD_DK_CDF_A * x * x * x))); }
IDD_HD double idd_dk_cdf_deriv(double x) {
    double th = tanh(IDD_DK_CDF_K * (x + IDD_DK_CDF_A * x * x * x));
    return 0.5 * (1 - th * th) * IDD_DK_CDF_K * (1 + 3 * IDD_DK_CDF_A * x * x);
}
IDD_HD double idd_dk_dgll(double x, double mean, double log_scale) {
    double c = x - mean, inv = exp(-log_scale);
    double cp = idd_dk_cdf(inv * (c + 1.0 / 255.0)), cm = idd_dk_cdf(inv * (c - 1.0 / 255.0));
    double p = x < -0.999 ? cp : x > 0.999 ? 1.0 - cm : cp - cm;
    return log(p > 1e-12 ? p : 1e-12);
}
IDD_HD void idd_dk_dgll_grad(double x, double mean, double log_scale, double *dm, double *ds) {
    double c = x - mean, inv = exp(-log_scale);
    double zp = inv * (c + 1.0 / 255.0), zm = inv * (c - 1.0 / 255.0);
    double gp = idd_dk_cdf_deriv(zp), gm = idd_dk_cdf_deriv(zm), p, dpm, dps;
    if (x < -0.999) { p = idd_dk_cdf(zp); dpm = gp * -inv; dps = gp * -zp; }
    else if (x > 0.999) { p = 1.0 - idd_dk_cdf(zm); dpm = gm * inv; dps = gm * zm; }
    else { p = idd_dk_cdf(zp) - idd_dk_cdf(zm); dpm = (gp - gm) * -inv; dps = gp * -zp - gm * -zm; }
    if (p >= 1e-12) { *dm = dpm / p; *ds = dps / p; } else { *dm = 0; *ds = 0; }
}

/* model mean, log-variance, pred_xstart of one element and their local derivatives
 * (losses.c p_elem): e = mean-half output, v = variance-half output, x = x_t */
typedef struct { double mu, lv, px, dmu_de, dlv_dv; } idd_dk_elem;

IDD_HD void idd_dk_p_elem(const idd_diff_args *a, int64_t b, double e, double v, double x, int clip,
                          idd_dk_elem *r) {
    double px, dpx;
    double c1 = IDD_DK_C(a, IDD_DK_PMC1, b), c2 = IDD_DK_C(a, IDD_DK_PMC2, b);
    if (a->mean_type == IDD_MEAN_EPSILON) {          /* epsilon */
        px = IDD_DK_C(a, IDD_DK_SRAC, b) * x - IDD_DK_C(a, IDD_DK_SRM1AC, b) * e;
        dpx = -IDD_DK_C(a, IDD_DK_SRM1AC, b);
    } else if (a->mean_type == IDD_MEAN_START_X) {   /* start_x */
        px = e; dpx = 1;
    } else {                          /* previous_x */
        double r1 = 1.0 / c1, r2 = c2 / c1;
        px = r1 * e - r2 * x; dpx = r1;
    }
    if (clip) {
        if (px < -1 || px > 1) dpx = 0;
        px = px < -1 ? -1 : px > 1 ? 1 : px;
    }
    r->px = px;
    if (a->mean_type == IDD_MEAN_PREVIOUS_X) { r->mu = e; r->dmu_de = 1; }
    else { r->mu = c1 * px + c2 * x; r->dmu_de = c1 * dpx; }
    switch (a->var_type) {
    case IDD_VAR_LEARNED: r->lv = v; r->dlv_dv = 1; break;
    case IDD_VAR_LEARNED_RANGE: {
        double lo = IDD_DK_C(a, IDD_DK_PLVC, b), hi = IDD_DK_C(a, IDD_DK_LOGBETA, b), f = (v + 1) / 2;
        r->lv = f * hi + (1 - f) * lo; r->dlv_dv = 0.5 * (hi - lo);
        break;
    }
    case IDD_VAR_FIXED_SMALL: r->lv = IDD_DK_C(a, IDD_DK_PLVC, b); r->dlv_dv = 0; break;
    default: r->lv = IDD_DK_C(a, IDD_DK_FLLV, b); r->dlv_dv = 0; break;
    }
}

IDD_HD double idd_dk_mse_target(const idd_diff_args *a, int64_t b, double x0, double x, double nz) {
    if (a->mean_type == IDD_MEAN_EPSILON) return nz;
    if (a->mean_type == IDD_MEAN_START_X) return x0;
    return IDD_DK_C(a, IDD_DK_PMC1, b) * x0 + IDD_DK_C(a, IDD_DK_PMC2, b) * x;
}

/* one element of the training loss: adds its mse and vb (nats, before /n/ln2)
 * contributions. i indexes the sample's n = C*HW elements; mo points at the sample's
 * model output, x0/xt/nz at its x-like rows. */
IDD_HD void idd_dk_loss_elem(const idd_diff_args *a, int64_t b, int64_t i, const float *mo, const float *x0,
                             const float *xt, const float *nz, double *mse, double *vb) {
    int64_t n = a->C * a->HW;
    int kl = a->loss_type == IDD_LOSS_KL || a->loss_type == IDD_LOSS_RESCALED_KL;
    if (!kl) { double d = idd_dk_mse_target(a, b, x0[i], xt[i], nz[i]) - mo[i]; *mse += d * d; }
    if (kl || a->learned) {
        idd_dk_elem r;
        idd_dk_p_elem(a, b, mo[i], a->learned ? mo[n + i] : 0, xt[i], 0, &r);
        if (IDD_DK_C(a, IDD_DK_T, b) == 0) *vb += -idd_dk_dgll(x0[i], r.mu, 0.5 * r.lv);
        else
            *vb += idd_dk_normal_kl(IDD_DK_C(a, IDD_DK_PMC1, b) * x0[i] + IDD_DK_C(a, IDD_DK_PMC2, b) * xt[i],
                                    IDD_DK_C(a, IDD_DK_PLVC, b), r.mu, r.lv);
    }
}

/* per-sample finish: sums -> loss, mse, vb (float32) */
IDD_HD void idd_dk_loss_finish(const idd_diff_args *a, double smse, double svb, float *loss, float *mse,
                               float *vb) {
    double n = (double)(a->C * a->HW);
    int kl = a->loss_type == IDD_LOSS_KL || a->loss_type == IDD_LOSS_RESCALED_KL;
    double m = kl ? 0 : smse / n;
    double v = (kl || a->learned) ? svb / n / IDD_DK_LN2 * a->vb_scale : 0;
    *loss = (float)(m + v); *mse = (float)m; *vb = (float)v;
}

/* gradient of the loss w.r.t. model output element i of sample b (mean half) and,
 * when learned, its variance-half element (n + i); dl = dloss[b]. Written, not added. */
IDD_HD void idd_dk_loss_grad(const idd_diff_args *a, int64_t b, int64_t i, const float *mo, const float *x0,
                             const float *xt, const float *nz, double dl, float *dmo) {
    int64_t n = a->C * a->HW;
    int kl = a->loss_type == IDD_LOSS_KL || a->loss_type == IDD_LOSS_RESCALED_KL;
    double gm = 0, gv = 0;
    if (!kl) gm = 2.0 * dl / (double)n * (mo[i] - idd_dk_mse_target(a, b, x0[i], xt[i], nz[i]));
    double scale = dl * a->vb_scale / (double)n / IDD_DK_LN2;
    if ((kl || a->learned) && scale != 0) {
        idd_dk_elem r;
        idd_dk_p_elem(a, b, mo[i], a->learned ? mo[n + i] : 0, xt[i], 0, &r);
        double dmu, dlv;
        if (IDD_DK_C(a, IDD_DK_T, b) == 0) {
            double g1, g2;
            idd_dk_dgll_grad(x0[i], r.mu, 0.5 * r.lv, &g1, &g2);
            dmu = -g1; dlv = -0.5 * g2;
        } else {
            double d = r.mu - (IDD_DK_C(a, IDD_DK_PMC1, b) * x0[i] + IDD_DK_C(a, IDD_DK_PMC2, b) * xt[i]);
            double ie = exp(-r.lv);
            dmu = d * ie;
            dlv = 0.5 * (1 - exp(IDD_DK_C(a, IDD_DK_PLVC, b) - r.lv) - d * d * ie);
        }
        if (kl) gm += scale * dmu * r.dmu_de;
        gv = scale * dlv * r.dlv_dv;
    }
    dmo[i] = (float)gm;
    if (a->learned) dmo[n + i] = (float)gv;
}

/* pointwise ops: element i of sample b (x-like offsets o = b*n + i) */
IDD_HD float idd_dk_pointwise(int op, const idd_diff_args *a, int64_t b, int64_t i, const float *x,
                              const float *y, const float *z) {
    int64_t n = a->C * a->HW, o = b * n + i;
    switch (op) {
    case IDD_DK_LIN2: return (float)(IDD_DK_C(a, a->col0, b) * x[o] + IDD_DK_C(a, a->col1, b) * y[o]);
    case IDD_DK_SCALE: return (float)(IDD_DK_C(a, a->col0, b) * x[o]);
    case IDD_DK_BCAST: return (float)IDD_DK_C(a, a->col0, b);
    case IDD_DK_XSTART_EPS: return (float)(IDD_DK_C(a, IDD_DK_SRAC, b) * x[o] - IDD_DK_C(a, IDD_DK_SRM1AC, b) * y[o]);
    case IDD_DK_EPS_XSTART: return (float)((IDD_DK_C(a, IDD_DK_SRAC, b) * x[o] - y[o]) / IDD_DK_C(a, IDD_DK_SRM1AC, b));
    case IDD_DK_PRED_XSTART: {
        int64_t cout = a->learned ? 2 * n : n;
        double e = x[b * cout + i], xv = y[o];
        if (a->mean_type == IDD_MEAN_EPSILON) return (float)(IDD_DK_C(a, IDD_DK_SRAC, b) * xv - IDD_DK_C(a, IDD_DK_SRM1AC, b) * e);
        if (a->mean_type == IDD_MEAN_START_X) return (float)e;
        double c1 = IDD_DK_C(a, IDD_DK_PMC1, b), c2 = IDD_DK_C(a, IDD_DK_PMC2, b);
        return (float)((1.0 / c1) * e - (c2 / c1) * xv);
    }
    case IDD_DK_P_SAMPLE:
        if (IDD_DK_C(a, IDD_DK_T, b) == 0) return x[o];
        return (float)(x[o] + exp(0.5 * (double)y[o]) * z[o]);
    case IDD_DK_DDIM: {
        double ac = IDD_DK_C(a, IDD_DK_AC, b), ap = IDD_DK_C(a, IDD_DK_ACP, b);
        double sigma = a->eta * sqrt((1 - ap) / (1 - ac)) * sqrt(1 - ac / ap);
        double x0 = y[o], eps = (IDD_DK_C(a, IDD_DK_SRAC, b) * x[o] - x0) / IDD_DK_C(a, IDD_DK_SRM1AC, b);
        double v = x0 * sqrt(ap) + sqrt(1 - ap - sigma * sigma) * eps;
        if (IDD_DK_C(a, IDD_DK_T, b) != 0 && sigma != 0) v += sigma * z[o];
        return (float)v;
    }
    case IDD_DK_DDIM_REVERSE: {
        double an = IDD_DK_C(a, IDD_DK_ACN, b);
        double x0 = y[o], eps = (IDD_DK_C(a, IDD_DK_SRAC, b) * x[o] - x0) / IDD_DK_C(a, IDD_DK_SRM1AC, b);
        return (float)(x0 * sqrt(an) + sqrt(1 - an) * eps);
    }
    case IDD_DK_VB: {
        int64_t cout = a->learned ? 2 * n : n;
        idd_dk_elem r;
        idd_dk_p_elem(a, b, x[b * cout + i], a->learned ? x[b * cout + n + i] : 0, z[o], a->clip, &r);
        if (IDD_DK_C(a, IDD_DK_T, b) == 0) return (float)-idd_dk_dgll(y[o], r.mu, 0.5 * r.lv);
        return (float)idd_dk_normal_kl(IDD_DK_C(a, IDD_DK_PMC1, b) * y[o] + IDD_DK_C(a, IDD_DK_PMC2, b) * z[o],
                                       IDD_DK_C(a, IDD_DK_PLVC, b), r.mu, r.lv);
    }
    case IDD_DK_PRIOR:
        return (float)idd_dk_normal_kl(IDD_DK_C(a, IDD_DK_SQRT_AC, b) * x[o], IDD_DK_C(a, IDD_DK_LOG1M_AC, b), 0, 0);
    case IDD_DK_SQDIFF: {
        double d = (double)x[o] - (double)y[o];
        return (float)(d * d);
    }
    case IDD_DK_NORMAL_KL: return (float)idd_dk_normal_kl(x[o], z[o], y[o], z[a->B * n + o]);
    case IDD_DK_DGLL: return (float)idd_dk_dgll(x[o], y[o], z[o]);
    }
    return 0;
}

/* p_finish for element i of sample b: clips px in place (when clip) and writes the
 * mean, variance and log-variance where asked (float32 as gaussian.c idd_p_finish) */
IDD_HD void idd_dk_p_finish(const idd_diff_args *a, int64_t b, int64_t i, const float *mo, const float *xt,
                            float *px, float *mean, float *var, float *logvar) {
    int64_t n = a->C * a->HW, o = b * n + i, cout = a->learned ? 2 * n : n;
    if (a->clip) { float p = px[o]; px[o] = p < -1.f ? -1.f : p > 1.f ? 1.f : p; }
    if (mean) {
        if (a->mean_type == IDD_MEAN_PREVIOUS_X) mean[o] = mo[b * cout + i];
        else mean[o] = (float)(IDD_DK_C(a, IDD_DK_PMC1, b) * px[o] + IDD_DK_C(a, IDD_DK_PMC2, b) * xt[o]);
    }
    if (!var && !logvar) return;
    double l;
    float fv, fl;
    switch (a->var_type) {
    case IDD_VAR_LEARNED: l = mo[b * cout + n + i]; fl = (float)l; fv = (float)exp(l); break;
    case IDD_VAR_LEARNED_RANGE: {
        double f = ((double)mo[b * cout + n + i] + 1) / 2;
        l = f * IDD_DK_C(a, IDD_DK_LOGBETA, b) + (1 - f) * IDD_DK_C(a, IDD_DK_PLVC, b);
        fl = (float)l; fv = (float)exp(l);
        break;
    }
    case IDD_VAR_FIXED_SMALL: fv = (float)IDD_DK_C(a, IDD_DK_PV, b); fl = (float)IDD_DK_C(a, IDD_DK_PLVC, b); break;
    default: fv = (float)IDD_DK_C(a, IDD_DK_FLV, b); fl = (float)IDD_DK_C(a, IDD_DK_FLLV, b); break;
    }
    if (var) var[o] = fv;
    if (logvar) logvar[o] = fl;
}

#endif
