/* losses.c — the diffusion losses and their gradients (spec section 4):
 * normal_kl, the discretised Gaussian log-likelihood (tanh CDF approximation), the
 * per-sample VLB term in bits/dim (_vb_terms_bpd) and its backward with respect to the
 * model output, the mse term and its backward, training_losses for every loss type
 * with the official stop-gradient, and the prior term.
 *
 * The VLB recomputes the model mean and log-variance per element in double straight
 * from the model output (never through float32 intermediates): the KL's (m1 - m2)^2
 * cancels badly when the two means are rounded separately. */
#include "iddpm/diffusion.h"

#include <math.h>
#include <stdlib.h>

#define LN2 0.69314718055994530942
#define DGLL_CLAMP 1e-12 /* the official clamp before every log */
#define DGLL_EDGE 0.999  /* |x| beyond this is an edge bin extending to infinity */

/* ------------------------------------------------------------------ scalar kernels */

double idd_normal_kl1(double mean1, double logvar1, double mean2, double logvar2) {
    double d = mean1 - mean2;
    return 0.5 * (-1.0 + logvar2 - logvar1 + exp(logvar1 - logvar2) + d * d * exp(-logvar2));
}

static const double CDF_K = 0.79788456080286535588; /* sqrt(2/pi) */
static const double CDF_A = 0.044715;

double idd_approx_std_normal_cdf(double x) {
    return 0.5 * (1.0 + tanh(CDF_K * (x + CDF_A * pow(x, 3))));
}

/* d/dx of the approximate CDF */
static double cdf_deriv(double x) {
    double th = tanh(CDF_K * (x + CDF_A * x * x * x));
    return 0.5 * (1 - th * th) * CDF_K * (1 + 3 * CDF_A * x * x);
}

double idd_dgll1(double x, double mean, double log_scale) {
    double c = x - mean, inv = exp(-log_scale);
    double cdf_plus = idd_approx_std_normal_cdf(inv * (c + 1.0 / 255.0));
    double cdf_min = idd_approx_std_normal_cdf(inv * (c - 1.0 / 255.0));
    double p;
    if (x < -DGLL_EDGE) p = cdf_plus;
    else if (x > DGLL_EDGE) p = 1.0 - cdf_min;
    else p = cdf_plus - cdf_min;
    return log(p > DGLL_CLAMP ? p : DGLL_CLAMP);
}

void idd_dgll1_grad(double x, double mean, double log_scale, double *d_mean, double *d_log_scale) {
    double c = x - mean, inv = exp(-log_scale);
    double zp = inv * (c + 1.0 / 255.0), zm = inv * (c - 1.0 / 255.0);
    double cdf_plus = idd_approx_std_normal_cdf(zp), cdf_min = idd_approx_std_normal_cdf(zm);
    /* dz/dmean = -inv, dz/dlog_scale = -z */
    double gp = cdf_deriv(zp), gm = cdf_deriv(zm);
    double p, dpm, dps; /* p and its derivatives wrt mean, log_scale */
    if (x < -DGLL_EDGE) {
        p = cdf_plus; dpm = gp * -inv; dps = gp * -zp;
    } else if (x > DGLL_EDGE) {
        p = 1.0 - cdf_min; dpm = -gm * -inv; dps = -gm * -zm;
    } else {
        p = cdf_plus - cdf_min; dpm = (gp - gm) * -inv; dps = gp * -zp - gm * -zm;
    }
    if (p >= DGLL_CLAMP) { /* torch.clamp passes gradient where p >= min */
        *d_mean = dpm / p;
        *d_log_scale = dps / p;
    } else {
        *d_mean = 0;
        *d_log_scale = 0;
    }
}

/* ------------------------------------------------------------------ elementwise arrays */

idd_status idd_normal_kl(int64_t n, const float *mean1, int64_t s1, const float *logvar1,
                         int64_t s2, const float *mean2, int64_t s3, const float *logvar2,
                         int64_t s4, float *out) {
    if (n < 0) return idd_error("normal_kl: element count must be >= 0, got %lld", (long long)n);
    if (!mean1 || !logvar1 || !mean2 || !logvar2 || !out)
        return idd_error("normal_kl: an input or the output is missing (NULL)");
    for (int64_t i = 0; i < n; i++)
        out[i] = (float)idd_normal_kl1(mean1[i * s1], logvar1[i * s2], mean2[i * s3], logvar2[i * s4]);
    return IDD_OK;
}

idd_status idd_discretized_gaussian_log_likelihood(int64_t n, const float *x, int64_t sx,
                                                   const float *means, int64_t sm,
                                                   const float *log_scales, int64_t sl,
                                                   float *out) {
    if (n < 0)
        return idd_error("discretized_gaussian_log_likelihood: element count must be >= 0, got %lld",
                         (long long)n);
    if (!x || !means || !log_scales || !out)
        return idd_error("discretized_gaussian_log_likelihood: an input or the output is missing (NULL)");
    for (int64_t i = 0; i < n; i++) out[i] = (float)idd_dgll1(x[i * sx], means[i * sm], log_scales[i * sl]);
    return IDD_OK;
}

/* ------------------------------------------------------------------ model mean / log-variance */

/* One element of p_mean_variance in double, plus the local derivatives:
 * e = mean-half output, v = variance-half output (learned types), x = x_t. */
typedef struct {
    double mu, lv, px;  /* model mean, log-variance, (processed) pred_xstart */
    double dmu_de;      /* d mu / d e */
    double dlv_dv;      /* d lv / d v (0 for fixed types) */
} elem_out;

static void p_elem(const idd_schedule *s, idd_diffusion_cfg cfg, int64_t tb, double e, double v,
                   double x, int clip, elem_out *r) {
    double px, dpx;
    switch (cfg.mean_type) {
    case IDD_MEAN_EPSILON:
        px = s->sqrt_recip_alphas_cumprod[tb] * x - s->sqrt_recipm1_alphas_cumprod[tb] * e;
        dpx = -s->sqrt_recipm1_alphas_cumprod[tb];
        break;
    case IDD_MEAN_START_X: px = e; dpx = 1; break;
    default: {
        double r1 = 1.0 / s->posterior_mean_coef1[tb];
        double r2 = s->posterior_mean_coef2[tb] / s->posterior_mean_coef1[tb];
        px = r1 * e - r2 * x;
        dpx = r1;
    }
    }
    if (clip) {
        if (px < -1 || px > 1) dpx = 0;
        px = px < -1 ? -1 : px > 1 ? 1 : px;
    }
    r->px = px;
    if (cfg.mean_type == IDD_MEAN_PREVIOUS_X) {
        r->mu = e;
        r->dmu_de = 1;
    } else {
        r->mu = s->posterior_mean_coef1[tb] * px + s->posterior_mean_coef2[tb] * x;
        r->dmu_de = s->posterior_mean_coef1[tb] * dpx;
    }
    switch (cfg.var_type) {
    case IDD_VAR_LEARNED: r->lv = v; r->dlv_dv = 1; break;
    case IDD_VAR_LEARNED_RANGE: {
        double lo = s->posterior_log_variance_clipped[tb], hi = s->log_betas[tb];
        double frac = (v + 1) / 2;
        r->lv = frac * hi + (1 - frac) * lo;
        r->dlv_dv = 0.5 * (hi - lo);
        break;
    }
    case IDD_VAR_FIXED_SMALL: r->lv = s->posterior_log_variance_clipped[tb]; r->dlv_dv = 0; break;
    default: r->lv = s->fixed_large_log_variance[tb]; r->dlv_dv = 0; break;
    }
}

static idd_status check_loss_args(const idd_schedule *s, idd_diffusion_cfg cfg, const int64_t *t,
                                  int64_t B, int64_t C, int64_t HW, const char *fn) {
    idd_status st = idd_check_timesteps(s, t, B, fn);
    if (st != IDD_OK) return st;
    if ((unsigned)cfg.mean_type > 2 || (unsigned)cfg.var_type > 3 || (unsigned)cfg.loss_type > 3)
        return idd_error("%s: unknown mean/variance/loss type (%d/%d/%d)", fn, (int)cfg.mean_type,
                         (int)cfg.var_type, (int)cfg.loss_type);
    if (C < 1 || HW < 1)
        return idd_error("%s: bad shape: channels %lld, spatial size %lld", fn, (long long)C,
                         (long long)HW);
    return IDD_OK;
}

/* ------------------------------------------------------------------ VLB term */

idd_status idd_vb_terms_bpd(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                            const float *x0, const float *xt, const int64_t *t, int64_t B,
                            int64_t C, int64_t HW, int clip, double *vb, float *pred_xstart) {
    const char *fn = "vb_terms_bpd";
    idd_status st = check_loss_args(s, cfg, t, B, C, HW, fn);
    if (st != IDD_OK) return st;
    if (!model_out || !x0 || !xt || !vb)
        return idd_error("%s: model output, x_start, x_t or the output is missing (NULL)", fn);
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        int64_t tb = t[b];
        const float *mo = model_out + (size_t)(b * cout * HW), *mv = mo + n;
        const float *xs = x0 + (size_t)(b * n), *x = xt + (size_t)(b * n);
        double c1 = s->posterior_mean_coef1[tb], c2 = s->posterior_mean_coef2[tb];
        double tlv = s->posterior_log_variance_clipped[tb], acc = 0;
        for (int64_t i = 0; i < n; i++) {
            elem_out r;
            p_elem(s, cfg, tb, mo[i], cout > C ? mv[i] : 0, x[i], clip, &r);
            if (pred_xstart) pred_xstart[(size_t)(b * n + i)] = (float)r.px;
            if (tb == 0) acc += -idd_dgll1(xs[i], r.mu, 0.5 * r.lv);
            else acc += idd_normal_kl1(c1 * xs[i] + c2 * x[i], tlv, r.mu, r.lv);
        }
        vb[b] = acc / (double)n / LN2;
    }
    return IDD_OK;
}

idd_status idd_vb_terms_bpd_backward(const idd_schedule *s, idd_diffusion_cfg cfg,
                                     const float *model_out, const float *x0, const float *xt,
                                     const int64_t *t, int64_t B, int64_t C, int64_t HW,
                                     int clip, int skip_mean, const double *dvb,
                                     float *dmodel_out) {
    const char *fn = "vb_terms_bpd_backward";
    idd_status st = check_loss_args(s, cfg, t, B, C, HW, fn);
    if (st != IDD_OK) return st;
    if (!model_out || !x0 || !xt || !dvb || !dmodel_out)
        return idd_error("%s: model output, x_start, x_t, dvb or the gradient is missing (NULL)", fn);
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        int64_t tb = t[b];
        const float *mo = model_out + (size_t)(b * cout * HW), *mv = mo + n;
        float *dmo = dmodel_out + (size_t)(b * cout * HW), *dmv = dmo + n;
        const float *xs = x0 + (size_t)(b * n), *x = xt + (size_t)(b * n);
        double c1 = s->posterior_mean_coef1[tb], c2 = s->posterior_mean_coef2[tb];
        double tlv = s->posterior_log_variance_clipped[tb];
        double scale = dvb[b] / (double)n / LN2;
        if (scale == 0) continue;
        for (int64_t i = 0; i < n; i++) {
            elem_out r;
            p_elem(s, cfg, tb, mo[i], cout > C ? mv[i] : 0, x[i], clip, &r);
            double dmu, dlv;
            if (tb == 0) { /* -dgll(x0, mu, 0.5 lv) */
                double gm, gs;
                idd_dgll1_grad(xs[i], r.mu, 0.5 * r.lv, &gm, &gs);
                dmu = -gm;
                dlv = -0.5 * gs;
            } else { /* normal_kl(true_mean, tlv, mu, lv) */
                double d = r.mu - (c1 * xs[i] + c2 * x[i]), ie = exp(-r.lv);
                dmu = d * ie;
                dlv = 0.5 * (1 - exp(tlv - r.lv) - d * d * ie);
            }
            if (!skip_mean) dmo[i] += (float)(scale * dmu * r.dmu_de);
            if (cout > C) dmv[i] += (float)(scale * dlv * r.dlv_dv);
        }
    }
    return IDD_OK;
}

/* ------------------------------------------------------------------ mse term */

static double mse_target(const idd_schedule *s, idd_diffusion_cfg cfg, int64_t tb, double x0,
                         double x, double noise) {
    if (cfg.mean_type == IDD_MEAN_EPSILON) return noise;
    if (cfg.mean_type == IDD_MEAN_START_X) return x0;
    return s->posterior_mean_coef1[tb] * x0 + s->posterior_mean_coef2[tb] * x;
}

idd_status idd_mse_term(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                        const float *x0, const float *xt, const float *noise, const int64_t *t,
                        int64_t B, int64_t C, int64_t HW, double *mse) {
    const char *fn = "mse_term";
    idd_status st = check_loss_args(s, cfg, t, B, C, HW, fn);
    if (st != IDD_OK) return st;
    if (!model_out || !x0 || !xt || !noise || !mse)
        return idd_error("%s: model output, x_start, x_t, noise or the output is missing (NULL)", fn);
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        const float *mo = model_out + (size_t)(b * cout * HW);
        size_t o = (size_t)(b * n);
        double acc = 0;
        for (int64_t i = 0; i < n; i++) {
            double d = mse_target(s, cfg, t[b], x0[o + i], xt[o + i], noise[o + i]) - mo[i];
            acc += d * d;
        }
        mse[b] = acc / (double)n;
    }
    return IDD_OK;
}

idd_status idd_mse_term_backward(const idd_schedule *s, idd_diffusion_cfg cfg,
                                 const float *model_out, const float *x0, const float *xt,
                                 const float *noise, const int64_t *t, int64_t B, int64_t C,
                                 int64_t HW, const double *dmse, float *dmodel_out) {
    const char *fn = "mse_term_backward";
    idd_status st = check_loss_args(s, cfg, t, B, C, HW, fn);
    if (st != IDD_OK) return st;
    if (!model_out || !x0 || !xt || !noise || !dmse || !dmodel_out)
        return idd_error("%s: an input or the gradient is missing (NULL)", fn);
    int64_t n = C * HW, cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    for (int64_t b = 0; b < B; b++) {
        const float *mo = model_out + (size_t)(b * cout * HW);
        float *dmo = dmodel_out + (size_t)(b * cout * HW);
        size_t o = (size_t)(b * n);
        double k = 2.0 * dmse[b] / (double)n;
        for (int64_t i = 0; i < n; i++)
            dmo[i] += (float)(k * (mo[i] - mse_target(s, cfg, t[b], x0[o + i], xt[o + i], noise[o + i])));
    }
    return IDD_OK;
}

/* ------------------------------------------------------------------ training losses */

/* the factor applied to L_t in the loss */
static double vb_scale(const idd_schedule *s, idd_loss_type lt) {
    if (lt == IDD_LOSS_RESCALED_KL) return (double)s->T;
    if (lt == IDD_LOSS_RESCALED_MSE) return (double)s->T / 1000.0;
    return 1.0;
}

static int is_kl(idd_loss_type lt) { return lt == IDD_LOSS_KL || lt == IDD_LOSS_RESCALED_KL; }

idd_status idd_training_losses(const idd_schedule *s, idd_diffusion_cfg cfg,
                               const float *model_out, const float *x0, const float *xt,
                               const float *noise, const int64_t *t, int64_t B, int64_t C,
                               int64_t HW, double *loss, double *mse, double *vb) {
    const char *fn = "training_losses";
    idd_status st = check_loss_args(s, cfg, t, B, C, HW, fn);
    if (st != IDD_OK) return st;
    if (!loss) return idd_error("%s: loss output is missing (NULL)", fn);
    double *tmp = malloc(sizeof(double) * (size_t)(B > 0 ? 2 * B : 1));
    if (!tmp) return idd_error_status(IDD_ENOMEM, "%s: out of memory", fn);
    double *m = tmp, *v = tmp + B, k = vb_scale(s, cfg.loss_type);
    if (is_kl(cfg.loss_type)) {
        st = idd_vb_terms_bpd(s, cfg, model_out, x0, xt, t, B, C, HW, 0, v, NULL);
        for (int64_t b = 0; st == IDD_OK && b < B; b++) {
            v[b] *= k;
            m[b] = 0;
            loss[b] = v[b];
        }
    } else {
        st = idd_mse_term(s, cfg, model_out, x0, xt, noise, t, B, C, HW, m);
        if (st == IDD_OK && idd_var_is_learned(cfg.var_type))
            st = idd_vb_terms_bpd(s, cfg, model_out, x0, xt, t, B, C, HW, 0, v, NULL);
        else
            for (int64_t b = 0; b < B; b++) v[b] = 0;
        for (int64_t b = 0; st == IDD_OK && b < B; b++) {
            v[b] *= k;
            loss[b] = m[b] + v[b];
        }
    }
    for (int64_t b = 0; st == IDD_OK && b < B; b++) {
        if (mse) mse[b] = m[b];
        if (vb) vb[b] = v[b];
    }
    free(tmp);
    return st;
}

idd_status idd_training_losses_backward(const idd_schedule *s, idd_diffusion_cfg cfg,
                                        const float *model_out, const float *x0, const float *xt,
                                        const float *noise, const int64_t *t, int64_t B,
                                        int64_t C, int64_t HW, const double *dloss,
                                        float *dmodel_out) {
    const char *fn = "training_losses_backward";
    idd_status st = check_loss_args(s, cfg, t, B, C, HW, fn);
    if (st != IDD_OK) return st;
    if (!dloss) return idd_error("%s: dloss is missing (NULL)", fn);
    double *dv = malloc(sizeof(double) * (size_t)(B > 0 ? B : 1)), k = vb_scale(s, cfg.loss_type);
    if (!dv) return idd_error_status(IDD_ENOMEM, "%s: out of memory", fn);
    for (int64_t b = 0; b < B; b++) dv[b] = dloss[b] * k;
    if (is_kl(cfg.loss_type)) {
        st = idd_vb_terms_bpd_backward(s, cfg, model_out, x0, xt, t, B, C, HW, 0, 0, dv, dmodel_out);
    } else {
        st = idd_mse_term_backward(s, cfg, model_out, x0, xt, noise, t, B, C, HW, dloss, dmodel_out);
        if (st == IDD_OK && idd_var_is_learned(cfg.var_type)) /* stop-gradient on the mean half */
            st = idd_vb_terms_bpd_backward(s, cfg, model_out, x0, xt, t, B, C, HW, 0, 1, dv,
                                           dmodel_out);
    }
    free(dv);
    return st;
}

/* ------------------------------------------------------------------ prior, helpers */

idd_status idd_prior_bpd(const idd_schedule *s, const float *x0, int64_t B, int64_t n,
                         double *prior_bpd) {
    if (!s) return idd_error("prior_bpd: schedule is missing");
    if (B < 0 || n < 1) return idd_error("prior_bpd: bad sizes B=%lld n=%lld", (long long)B, (long long)n);
    if (!x0 || !prior_bpd) return idd_error("prior_bpd: x_start or the output is missing (NULL)");
    int64_t tl = s->T - 1;
    double ca = s->sqrt_alphas_cumprod[tl], lv = s->log_one_minus_alphas_cumprod[tl];
    for (int64_t b = 0; b < B; b++) {
        double acc = 0;
        for (int64_t i = 0; i < n; i++) acc += idd_normal_kl1(ca * x0[(size_t)(b * n + i)], lv, 0.0, 0.0);
        prior_bpd[b] = acc / (double)n / LN2;
    }
    return IDD_OK;
}

idd_status idd_mean_flat_sq_diff(const float *a, const float *b, int64_t B, int64_t n, double *out) {
    if (B < 0 || n < 1) return idd_error("mean_flat: bad sizes B=%lld n=%lld", (long long)B, (long long)n);
    if (!a || !b || !out) return idd_error("mean_flat: an input or the output is missing (NULL)");
    for (int64_t k = 0; k < B; k++) {
        double acc = 0;
        for (int64_t i = 0; i < n; i++) {
            double d = (double)a[(size_t)(k * n + i)] - (double)b[(size_t)(k * n + i)];
            acc += d * d;
        }
        out[k] = acc / (double)n;
    }
    return IDD_OK;
}
