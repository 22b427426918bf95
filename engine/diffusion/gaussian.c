/* gaussian.c — the Gaussian diffusion process on float32 buffers: the model
 * configuration enums, the forward process (q_sample, q posterior), the reverse
 * process (p_mean_variance split around denoised_fn, ancestral p_sample, DDIM and its
 * reverse step). Spec sections 2, 3 and 7.
 *
 * Every per-element computation runs in double with the float64 schedule coefficients
 * (the official f64 reference keeps them float64), and rounds only when storing. */
#include "iddpm/diffusion.h"

#include <math.h>
#include <string.h>
#include <strings.h>

/* ------------------------------------------------------------------ config */

static const char *mean_names[] = {"previous_x", "start_x", "epsilon"};
static const char *var_names[] = {"learned", "fixed_small", "fixed_large", "learned_range"};
static const char *loss_names[] = {"mse", "rescaled_mse", "kl", "rescaled_kl"};

static int lookup(const char *name, const char **names, int n) {
    if (!name) return -1;
    for (int i = 0; i < n; i++)
        if (strcasecmp(name, names[i]) == 0) return i;
    return -1;
}
int idd_mean_type_from_name(const char *name) { return lookup(name, mean_names, 3); }
int idd_var_type_from_name(const char *name) { return lookup(name, var_names, 4); }
int idd_loss_type_from_name(const char *name) { return lookup(name, loss_names, 4); }
const char *idd_mean_type_name(idd_mean_type m) { return (unsigned)m < 3 ? mean_names[m] : "?"; }
const char *idd_var_type_name(idd_var_type v) { return (unsigned)v < 4 ? var_names[v] : "?"; }
const char *idd_loss_type_name(idd_loss_type l) { return (unsigned)l < 4 ? loss_names[l] : "?"; }

idd_diffusion_cfg idd_diffusion_cfg_from_flags(int learn_sigma, int sigma_small, int use_kl,
                                               int predict_xstart, int rescale_learned_sigmas) {
    idd_diffusion_cfg c;
    c.loss_type = use_kl ? IDD_LOSS_RESCALED_KL
                         : rescale_learned_sigmas ? IDD_LOSS_RESCALED_MSE : IDD_LOSS_MSE;
    c.mean_type = predict_xstart ? IDD_MEAN_START_X : IDD_MEAN_EPSILON;
    c.var_type = learn_sigma ? IDD_VAR_LEARNED_RANGE
                             : sigma_small ? IDD_VAR_FIXED_SMALL : IDD_VAR_FIXED_LARGE;
    return c;
}

int idd_var_is_learned(idd_var_type v) { return v == IDD_VAR_LEARNED || v == IDD_VAR_LEARNED_RANGE; }

/* common argument checks: timesteps, sizes, config */
static idd_status check_common(const idd_schedule *s, const int64_t *t, int64_t B, int64_t n,
                               const char *fn) {
    idd_status st = idd_check_timesteps(s, t, B, fn);
    if (st != IDD_OK) return st;
    if (n < 0) return idd_error("%s: elements per sample must be >= 0, got %lld", fn, (long long)n);
    return IDD_OK;
}

static idd_status check_cfg(idd_diffusion_cfg cfg, int64_t C, int64_t HW, const char *fn) {
    if ((unsigned)cfg.mean_type > 2) return idd_error("%s: unknown model_mean_type %d", fn, (int)cfg.mean_type);
    if ((unsigned)cfg.var_type > 3) return idd_error("%s: unknown model_var_type %d", fn, (int)cfg.var_type);
    if ((unsigned)cfg.loss_type > 3) return idd_error("%s: unknown loss_type %d", fn, (int)cfg.loss_type);
    if (C < 1 || HW < 0)
        return idd_error("%s: bad shape: channels %lld, spatial size %lld", fn, (long long)C,
                         (long long)HW);
    return IDD_OK;
}

#define NEED(p, fn, what) \
    do { if (!(p)) return idd_error("%s: %s is missing (NULL)", fn, what); } while (0)

/* ------------------------------------------------------------------ forward process */

idd_status idd_q_sample(const idd_schedule *s, const float *x0, const float *noise,
                        const int64_t *t, int64_t B, int64_t n, float *out) {
    idd_status st = check_common(s, t, B, n, "q_sample");
    if (st != IDD_OK) return st;
    NEED(x0, "q_sample", "x_start"); NEED(noise, "q_sample", "noise"); NEED(out, "q_sample", "output");
    for (int64_t b = 0; b < B; b++) {
        double ca = s->sqrt_alphas_cumprod[t[b]], cb = s->sqrt_one_minus_alphas_cumprod[t[b]];
        size_t o = (size_t)(b * n);
        for (int64_t i = 0; i < n; i++)
            out[o + i] = (float)(ca * x0[o + i] + cb * noise[o + i]);
    }
    return IDD_OK;
}

idd_status idd_q_mean_variance(const idd_schedule *s, const float *x0, const int64_t *t,
                               int64_t B, int64_t n, float *mean, double *variance,
                               double *log_variance) {
    idd_status st = check_common(s, t, B, n, "q_mean_variance");
    if (st != IDD_OK) return st;
    for (int64_t b = 0; b < B; b++) {
        if (mean) {
            NEED(x0, "q_mean_variance", "x_start");
            double ca = s->sqrt_alphas_cumprod[t[b]];
            size_t o = (size_t)(b * n);
            for (int64_t i = 0; i < n; i++) mean[o + i] = (float)(ca * x0[o + i]);
        }
        if (variance) variance[b] = 1.0 - s->alphas_cumprod[t[b]];
        if (log_variance) log_variance[b] = s->log_one_minus_alphas_cumprod[t[b]];
    }
    return IDD_OK;
}

idd_status idd_q_posterior_mean_variance(const idd_schedule *s, const float *x0,
                                         const float *xt, const int64_t *t, int64_t B,
                                         int64_t n, float *mean, double *variance,
                                         double *log_variance) {
    idd_status st = check_common(s, t, B, n, "q_posterior_mean_variance");
    if (st != IDD_OK) return st;
    for (int64_t b = 0; b < B; b++) {
        if (mean) {
            NEED(x0, "q_posterior_mean_variance", "x_start");
            NEED(xt, "q_posterior_mean_variance", "x_t");
            double c1 = s->posterior_mean_coef1[t[b]], c2 = s->posterior_mean_coef2[t[b]];
            size_t o = (size_t)(b * n);
            for (int64_t i = 0; i < n; i++) mean[o + i] = (float)(c1 * x0[o + i] + c2 * xt[o + i]);
        }
        if (variance) variance[b] = s->posterior_variance[t[b]];
        if (log_variance) log_variance[b] = s->posterior_log_variance_clipped[t[b]];
    }
    return IDD_OK;
}

idd_status idd_predict_xstart_from_eps(const idd_schedule *s, const float *xt, const float *eps,
                                       const int64_t *t, int64_t B, int64_t n, float *out) {
    idd_status st = check_common(s, t, B, n, "predict_xstart_from_eps");
    if (st != IDD_OK) return st;
    NEED(xt, "predict_xstart_from_eps", "x_t"); NEED(eps, "predict_xstart_from_eps", "eps");
    for (int64_t b = 0; b < B; b++) {
        double a = s->sqrt_recip_alphas_cumprod[t[b]], c = s->sqrt_recipm1_alphas_cumprod[t[b]];
        size_t o = (size_t)(b * n);
        for (int64_t i = 0; i < n; i++) out[o + i] = (float)(a * xt[o + i] - c * eps[o + i]);
    }
    return IDD_OK;
}

idd_status idd_predict_eps_from_xstart(const idd_schedule *s, const float *xt, const float *x0,
                                       const int64_t *t, int64_t B, int64_t n, float *out) {
    idd_status st = check_common(s, t, B, n, "predict_eps_from_xstart");
    if (st != IDD_OK) return st;
    NEED(xt, "predict_eps_from_xstart", "x_t"); NEED(x0, "predict_eps_from_xstart", "pred_xstart");
    for (int64_t b = 0; b < B; b++) {
        double a = s->sqrt_recip_alphas_cumprod[t[b]], c = s->sqrt_recipm1_alphas_cumprod[t[b]];
        size_t o = (size_t)(b * n);
        for (int64_t i = 0; i < n; i++) out[o + i] = (float)((a * xt[o + i] - x0[o + i]) / c);
    }
    return IDD_OK;
}

/* ------------------------------------------------------------------ p_mean_variance */

idd_status idd_p_pred_xstart_raw(const idd_schedule *s, idd_diffusion_cfg cfg,
                                 const float *model_out, const float *xt, const int64_t *t,
                                 int64_t B, int64_t C, int64_t HW, float *pred_xstart) {
    const char *fn = "p_mean_variance";
    idd_status st = check_cfg(cfg, C, HW, fn);
    if (st == IDD_OK) st = check_common(s, t, B, C * HW, fn);
    if (st != IDD_OK) return st;
    NEED(model_out, fn, "model output"); NEED(xt, fn, "x_t"); NEED(pred_xstart, fn, "pred_xstart");
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        const float *mo = model_out + (size_t)(b * cout * HW);
        const float *x = xt + (size_t)(b * n);
        float *px = pred_xstart + (size_t)(b * n);
        int64_t tb = t[b];
        if (cfg.mean_type == IDD_MEAN_EPSILON) {
            double a = s->sqrt_recip_alphas_cumprod[tb], c = s->sqrt_recipm1_alphas_cumprod[tb];
            for (int64_t i = 0; i < n; i++) px[i] = (float)(a * x[i] - c * mo[i]);
        } else if (cfg.mean_type == IDD_MEAN_START_X) {
            for (int64_t i = 0; i < n; i++) px[i] = mo[i];
        } else { /* PREVIOUS_X: (1/coef1)*xprev - (coef2/coef1)*x_t */
            double r1 = 1.0 / s->posterior_mean_coef1[tb];
            double r2 = s->posterior_mean_coef2[tb] / s->posterior_mean_coef1[tb];
            for (int64_t i = 0; i < n; i++) px[i] = (float)(r1 * mo[i] - r2 * x[i]);
        }
    }
    return IDD_OK;
}

idd_status idd_p_finish(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                        const float *xt, const int64_t *t, int64_t B, int64_t C, int64_t HW,
                        int clip, float *pred_xstart, float *mean, float *variance,
                        float *log_variance) {
    const char *fn = "p_mean_variance";
    idd_status st = check_cfg(cfg, C, HW, fn);
    if (st == IDD_OK) st = check_common(s, t, B, C * HW, fn);
    if (st != IDD_OK) return st;
    NEED(model_out, fn, "model output"); NEED(xt, fn, "x_t"); NEED(pred_xstart, fn, "pred_xstart");
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        const float *mo = model_out + (size_t)(b * cout * HW);
        const float *x = xt + (size_t)(b * n);
        float *px = pred_xstart + (size_t)(b * n);
        int64_t tb = t[b];
        if (clip)
            for (int64_t i = 0; i < n; i++) px[i] = px[i] < -1.f ? -1.f : px[i] > 1.f ? 1.f : px[i];
        if (mean) {
            float *m = mean + (size_t)(b * n);
            if (cfg.mean_type == IDD_MEAN_PREVIOUS_X) {
                for (int64_t i = 0; i < n; i++) m[i] = mo[i];
            } else {
                double c1 = s->posterior_mean_coef1[tb], c2 = s->posterior_mean_coef2[tb];
                for (int64_t i = 0; i < n; i++) m[i] = (float)(c1 * px[i] + c2 * x[i]);
            }
        }
        if (!variance && !log_variance) continue;
        float *v = variance ? variance + (size_t)(b * n) : NULL;
        float *lv = log_variance ? log_variance + (size_t)(b * n) : NULL;
        const float *vv = mo + n; /* variance half (learned types only) */
        switch (cfg.var_type) {
        case IDD_VAR_LEARNED:
            for (int64_t i = 0; i < n; i++) {
                if (lv) lv[i] = vv[i];
                if (v) v[i] = (float)exp((double)vv[i]);
            }
            break;
        case IDD_VAR_LEARNED_RANGE: {
            double lo = s->posterior_log_variance_clipped[tb], hi = s->log_betas[tb];
            for (int64_t i = 0; i < n; i++) {
                double frac = ((double)vv[i] + 1) / 2;
                double l = frac * hi + (1 - frac) * lo;
                if (lv) lv[i] = (float)l;
                if (v) v[i] = (float)exp(l);
            }
            break;
        }
        case IDD_VAR_FIXED_SMALL:
        case IDD_VAR_FIXED_LARGE: {
            int small = cfg.var_type == IDD_VAR_FIXED_SMALL;
            float fv = (float)(small ? s->posterior_variance[tb] : s->fixed_large_variance[tb]);
            float fl = (float)(small ? s->posterior_log_variance_clipped[tb]
                                     : s->fixed_large_log_variance[tb]);
            for (int64_t i = 0; i < n; i++) {
                if (v) v[i] = fv;
                if (lv) lv[i] = fl;
            }
            break;
        }
        }
    }
    return IDD_OK;
}

idd_status idd_p_mean_variance(const idd_schedule *s, idd_diffusion_cfg cfg,
                               const float *model_out, const float *xt, const int64_t *t,
                               int64_t B, int64_t C, int64_t HW, int clip, float *mean,
                               float *variance, float *log_variance, float *pred_xstart) {
    idd_status st = idd_p_pred_xstart_raw(s, cfg, model_out, xt, t, B, C, HW, pred_xstart);
    if (st != IDD_OK) return st;
    return idd_p_finish(s, cfg, model_out, xt, t, B, C, HW, clip, pred_xstart, mean, variance,
                        log_variance);
}

/* ------------------------------------------------------------------ sampling steps */

idd_status idd_p_sample_step(const float *mean, const float *log_variance, const float *noise,
                             const int64_t *t, int64_t B, int64_t n, float *out) {
    const char *fn = "p_sample";
    if (B < 0 || n < 0) return idd_error("%s: bad sizes B=%lld n=%lld", fn, (long long)B, (long long)n);
    NEED(mean, fn, "mean"); NEED(log_variance, fn, "log_variance"); NEED(t, fn, "timesteps");
    NEED(out, fn, "output");
    for (int64_t b = 0; b < B; b++) {
        size_t o = (size_t)(b * n);
        if (t[b] < 0) return idd_error("%s: t[%lld] = %lld is negative", fn, (long long)b, (long long)t[b]);
        if (t[b] == 0) {
            if (out != mean) memcpy(out + o, mean + o, sizeof(float) * (size_t)n);
            continue;
        }
        NEED(noise, fn, "noise");
        for (int64_t i = 0; i < n; i++)
            out[o + i] = (float)(mean[o + i] + exp(0.5 * (double)log_variance[o + i]) * noise[o + i]);
    }
    return IDD_OK;
}

idd_status idd_p_sample(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                        const float *xt, const float *noise, const int64_t *t, int64_t B,
                        int64_t C, int64_t HW, int clip, float *out, float *pred_xstart) {
    const char *fn = "p_sample";
    NEED(out, fn, "output");
    NEED(pred_xstart, fn, "pred_xstart (scratch)");
    /* the mean goes to out; the log-variance is recomputed per element below (in double)
     * so that no extra buffer is needed */
    idd_status st = idd_p_mean_variance(s, cfg, model_out, xt, t, B, C, HW, clip, out, NULL, NULL,
                                        pred_xstart);
    if (st != IDD_OK) return st;
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        if (t[b] == 0) continue;
        NEED(noise, fn, "noise");
        int64_t tb = t[b];
        const float *vv = model_out + (size_t)(b * cout * HW) + n;
        float *o = out + (size_t)(b * n);
        const float *z = noise + (size_t)(b * n);
        for (int64_t i = 0; i < n; i++) {
            double l;
            switch (cfg.var_type) {
            case IDD_VAR_LEARNED: l = vv[i]; break;
            case IDD_VAR_LEARNED_RANGE: {
                double frac = ((double)vv[i] + 1) / 2;
                l = frac * s->log_betas[tb] + (1 - frac) * s->posterior_log_variance_clipped[tb];
                break;
            }
            case IDD_VAR_FIXED_SMALL: l = s->posterior_log_variance_clipped[tb]; break;
            default: l = s->fixed_large_log_variance[tb]; break;
            }
            o[i] = (float)((double)o[i] + exp(0.5 * l) * z[i]);
        }
    }
    return IDD_OK;
}

idd_status idd_ddim_step(const idd_schedule *s, const float *xt, const float *pred_xstart,
                         const float *noise, const int64_t *t, double eta, int64_t B, int64_t n,
                         float *out) {
    const char *fn = "ddim_sample";
    idd_status st = check_common(s, t, B, n, fn);
    if (st != IDD_OK) return st;
    if (!(eta >= 0) || !isfinite(eta)) return idd_error("%s: eta must be >= 0, got %g", fn, eta);
    NEED(xt, fn, "x_t"); NEED(pred_xstart, fn, "pred_xstart"); NEED(out, fn, "output");
    for (int64_t b = 0; b < B; b++) {
        int64_t tb = t[b];
        double a = s->alphas_cumprod[tb], ap = s->alphas_cumprod_prev[tb];
        double ra = s->sqrt_recip_alphas_cumprod[tb], rm = s->sqrt_recipm1_alphas_cumprod[tb];
        double sigma = eta * sqrt((1 - ap) / (1 - a)) * sqrt(1 - a / ap);
        double cx = sqrt(ap), ce = sqrt(1 - ap - sigma * sigma);
        int add = tb != 0 && sigma != 0;
        if (add) NEED(noise, fn, "noise (eta > 0)");
        size_t o = (size_t)(b * n);
        for (int64_t i = 0; i < n; i++) {
            double x0 = pred_xstart[o + i];
            double eps = (ra * xt[o + i] - x0) / rm;
            double v = x0 * cx + ce * eps;
            if (add) v += sigma * noise[o + i];
            out[o + i] = (float)v;
        }
    }
    return IDD_OK;
}

idd_status idd_ddim_reverse_step(const idd_schedule *s, const float *xt, const float *pred_xstart,
                                 const int64_t *t, double eta, int64_t B, int64_t n, float *out) {
    const char *fn = "ddim_reverse_sample";
    if (eta != 0.0) return idd_error("%s: reverse ODE only for deterministic path (eta must be 0, got %g)", fn, eta);
    idd_status st = check_common(s, t, B, n, fn);
    if (st != IDD_OK) return st;
    NEED(xt, fn, "x_t"); NEED(pred_xstart, fn, "pred_xstart"); NEED(out, fn, "output");
    for (int64_t b = 0; b < B; b++) {
        int64_t tb = t[b];
        double an = s->alphas_cumprod_next[tb];
        double ra = s->sqrt_recip_alphas_cumprod[tb], rm = s->sqrt_recipm1_alphas_cumprod[tb];
        double cx = sqrt(an), ce = sqrt(1 - an);
        size_t o = (size_t)(b * n);
        for (int64_t i = 0; i < n; i++) {
            double x0 = pred_xstart[o + i];
            double eps = (ra * xt[o + i] - x0) / rm;
            out[o + i] = (float)(x0 * cx + ce * eps);
        }
    }
    return IDD_OK;
}

idd_status idd_ddim_sample(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                           const float *xt, const float *noise, const int64_t *t, double eta,
                           int64_t B, int64_t C, int64_t HW, int clip, float *out,
                           float *pred_xstart) {
    NEED(pred_xstart, "ddim_sample", "pred_xstart (scratch)");
    if (!(eta >= 0) || !isfinite(eta)) return idd_error("ddim_sample: eta must be >= 0, got %g", eta);
    idd_status st = idd_p_mean_variance(s, cfg, model_out, xt, t, B, C, HW, clip, NULL, NULL, NULL,
                                        pred_xstart);
    if (st != IDD_OK) return st;
    return idd_ddim_step(s, xt, pred_xstart, noise, t, eta, B, C * HW, out);
}

idd_status idd_ddim_reverse_sample(const idd_schedule *s, idd_diffusion_cfg cfg,
                                   const float *model_out, const float *xt, const int64_t *t,
                                   double eta, int64_t B, int64_t C, int64_t HW, int clip,
                                   float *out, float *pred_xstart) {
    NEED(pred_xstart, "ddim_reverse_sample", "pred_xstart (scratch)");
    if (eta != 0.0)
        return idd_error("ddim_reverse_sample: reverse ODE only for deterministic path (eta must be 0, got %g)", eta);
    idd_status st = idd_p_mean_variance(s, cfg, model_out, xt, t, B, C, HW, clip, NULL, NULL, NULL,
                                        pred_xstart);
    if (st != IDD_OK) return st;
    return idd_ddim_reverse_step(s, xt, pred_xstart, t, eta, B, C * HW, out);
}
