/* schedule.c — noise schedules (spec section 1) and the derived float64 arrays of
 * spec section 2, held in an idd_schedule.
 *
 * The arithmetic copies the official numpy expressions operation by operation
 * (same order, same libm calls) so that the arrays equal the reference bit for bit or
 * within an ulp: linspace as numpy computes it (i*step + start, last element = stop),
 * the cosine alpha_bar as the official lambda, cumprod as a running product. */
#include "iddpm/diffusion.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* numpy.linspace(start, stop, T) with endpoint=True */
static void linspace(double start, double stop, int64_t T, double *out) {
    if (T == 1) { out[0] = start; return; }
    double step = (stop - start) / (double)(T - 1);
    for (int64_t i = 0; i < T; i++) out[i] = (double)i * step + start;
    out[T - 1] = stop;
}

/* the official cosine alpha_bar: cos((u + 0.008) / 1.008 * pi / 2) ** 2 */
static idd_status cosine_alpha_bar(void *ud, double u, double *out) {
    (void)ud;
    double c = cos((u + 0.008) / 1.008 * M_PI / 2);
    *out = pow(c, 2.0);
    return IDD_OK;
}

idd_status idd_betas_from_alpha_bar(int64_t T, idd_alpha_bar_fn fn, void *userdata,
                                    double max_beta, double *out) {
    if (T < 1) return idd_error("betas_for_alpha_bar: steps must be >= 1, got %lld", (long long)T);
    if (!fn) return idd_error("betas_for_alpha_bar: alpha_bar function is missing");
    if (!(max_beta > 0 && max_beta <= 1))
        return idd_error("betas_for_alpha_bar: max_beta must be in (0, 1], got %g", max_beta);
    double prev = 0;
    for (int64_t i = 0; i <= T; i++) {
        double u = (double)i / (double)T, a;
        idd_status st = fn(userdata, u, &a);
        if (st != IDD_OK) {
            idd_error_prefix("betas_for_alpha_bar: alpha_bar failed");
            return st;
        }
        if (!isfinite(a))
            return idd_error("betas_for_alpha_bar: alpha_bar(%g) is not finite", u);
        if (i == 0) {
            if (!(a > 0)) return idd_error("betas_for_alpha_bar: alpha_bar(0) must be > 0, got %g", a);
        } else {
            double b = 1 - a / prev;
            if (b > max_beta) b = max_beta;
            if (!(b > 0 && b <= 1))
                return idd_error("betas_for_alpha_bar: beta[%lld] = 1 - alpha_bar(%g)/alpha_bar(%g) = %g "
                                 "is outside (0, 1]; alpha_bar must decrease strictly and stay >= 0",
                                 (long long)(i - 1), u, (double)(i - 1) / (double)T, b);
            out[i - 1] = b;
            if (!(a > 0) && i < T)
                return idd_error("betas_for_alpha_bar: alpha_bar(%g) = %g must be > 0 before u = 1", u, a);
        }
        prev = a;
    }
    return IDD_OK;
}

idd_status idd_betas_named(const char *name, int64_t T, double *out) {
    if (!name) return idd_error("schedule: name is missing (expected \"linear\" or \"cosine\")");
    if (T < 1) return idd_error("schedule: steps must be >= 1, got %lld", (long long)T);
    if (strcmp(name, "linear") == 0) {
        double scale = 1000.0 / (double)T;
        linspace(scale * 0.0001, scale * 0.02, T, out);
        for (int64_t i = 0; i < T; i++)
            if (!(out[i] > 0 && out[i] <= 1))
                return idd_error("schedule: linear betas for steps=%lld exceed 1 (beta[%lld] = %g); "
                                 "use steps >= 20", (long long)T, (long long)i, out[i]);
        return IDD_OK;
    }
    if (strcmp(name, "cosine") == 0) return idd_betas_from_alpha_bar(T, cosine_alpha_bar, NULL, 0.999, out);
    return idd_error("schedule: unknown noise schedule \"%s\" (expected \"linear\" or \"cosine\")", name);
}

/* ------------------------------------------------------------------ the struct */

void idd_schedule_free(idd_schedule *s) {
    if (!s) return;
    /* every array lives in one block starting at betas */
    free(s->betas);
    free(s->timestep_map);
    free(s);
}

/* allocate the struct and its arrays (one block of doubles) */
static idd_status schedule_alloc(idd_schedule **out, int64_t T) {
    idd_schedule *s = calloc(1, sizeof *s);
    if (!s) return idd_error_status(IDD_ENOMEM, "schedule: out of memory");
    double **p[] = {&s->betas, &s->alphas, &s->alphas_cumprod, &s->alphas_cumprod_prev,
                    &s->alphas_cumprod_next, &s->sqrt_alphas_cumprod,
                    &s->sqrt_one_minus_alphas_cumprod, &s->log_one_minus_alphas_cumprod,
                    &s->sqrt_recip_alphas_cumprod, &s->sqrt_recipm1_alphas_cumprod,
                    &s->posterior_variance, &s->posterior_log_variance_clipped,
                    &s->posterior_mean_coef1, &s->posterior_mean_coef2, &s->log_betas,
                    &s->fixed_large_variance, &s->fixed_large_log_variance};
    int n = (int)(sizeof p / sizeof p[0]);
    double *block = malloc(sizeof(double) * (size_t)T * (size_t)n);
    s->timestep_map = malloc(sizeof(int64_t) * (size_t)T);
    if (!block || !s->timestep_map) {
        free(block);
        free(s->timestep_map);
        free(s);
        return idd_error_status(IDD_ENOMEM, "schedule: out of memory for %lld steps", (long long)T);
    }
    for (int k = 0; k < n; k++) *p[k] = block + (size_t)k * (size_t)T;
    s->T = T;
    s->T_original = T;
    *out = s;
    return IDD_OK;
}

/* fill every derived array from s->betas, exactly as the official __init__ */
static void derive(idd_schedule *s) {
    int64_t T = s->T;
    const double *b = s->betas;
    double prod = 1.0;
    for (int64_t i = 0; i < T; i++) {
        s->alphas[i] = 1.0 - b[i];
        prod = (i == 0) ? s->alphas[0] : prod * s->alphas[i];
        s->alphas_cumprod[i] = prod;
    }
    for (int64_t i = 0; i < T; i++) {
        double a = s->alphas_cumprod[i];
        double ap = i == 0 ? 1.0 : s->alphas_cumprod[i - 1];
        s->alphas_cumprod_prev[i] = ap;
        s->alphas_cumprod_next[i] = i + 1 < T ? s->alphas_cumprod[i + 1] : 0.0;
        s->sqrt_alphas_cumprod[i] = sqrt(a);
        s->sqrt_one_minus_alphas_cumprod[i] = sqrt(1.0 - a);
        s->log_one_minus_alphas_cumprod[i] = log(1.0 - a);
        s->sqrt_recip_alphas_cumprod[i] = sqrt(1.0 / a);
        s->sqrt_recipm1_alphas_cumprod[i] = sqrt(1.0 / a - 1);
        s->posterior_variance[i] = b[i] * (1.0 - ap) / (1.0 - a);
        s->posterior_mean_coef1[i] = b[i] * sqrt(ap) / (1.0 - a);
        s->posterior_mean_coef2[i] = (1.0 - ap) * sqrt(s->alphas[i]) / (1.0 - a);
        s->log_betas[i] = log(b[i]);
    }
    /* index 0 borrows posterior_variance[1] (ln 0 = -inf); with T == 1 use betas[0] */
    double v0 = T > 1 ? s->posterior_variance[1] : b[0];
    for (int64_t i = 0; i < T; i++) {
        double pv = i == 0 ? v0 : s->posterior_variance[i];
        s->posterior_log_variance_clipped[i] = log(pv);
        double fl = i == 0 ? v0 : b[i];
        s->fixed_large_variance[i] = fl;
        s->fixed_large_log_variance[i] = log(fl);
    }
}

idd_status idd_schedule_new(idd_schedule **out, const double *betas, int64_t T) {
    if (!out) return idd_error("schedule: output pointer is NULL");
    *out = NULL;
    if (T < 1) return idd_error("schedule: steps must be >= 1, got %lld", (long long)T);
    if (!betas) return idd_error("schedule: betas array is missing");
    for (int64_t i = 0; i < T; i++)
        if (!(betas[i] > 0 && betas[i] <= 1))
            return idd_error("schedule: betas[%lld] = %g is outside (0, 1]", (long long)i, betas[i]);
    idd_schedule *s;
    idd_status st = schedule_alloc(&s, T);
    if (st != IDD_OK) return st;
    memcpy(s->betas, betas, sizeof(double) * (size_t)T);
    for (int64_t i = 0; i < T; i++) s->timestep_map[i] = i;
    derive(s);
    *out = s;
    return IDD_OK;
}

idd_status idd_schedule_named(idd_schedule **out, const char *name, int64_t T) {
    if (!out) return idd_error("schedule: output pointer is NULL");
    *out = NULL;
    if (T < 1) return idd_error("schedule: steps must be >= 1, got %lld", (long long)T);
    double *b = malloc(sizeof(double) * (size_t)T);
    if (!b) return idd_error_status(IDD_ENOMEM, "schedule: out of memory for %lld steps", (long long)T);
    idd_status st = idd_betas_named(name, T, b);
    if (st == IDD_OK) st = idd_schedule_new(out, b, T);
    free(b);
    return st;
}

idd_status idd_schedule_respace(idd_schedule **out, const idd_schedule *base, const int64_t *use,
                                int64_t n) {
    if (!out) return idd_error("respace: output pointer is NULL");
    *out = NULL;
    if (!base) return idd_error("respace: base schedule is missing");
    if (n < 1) return idd_error("respace: need at least one retained step, got %lld", (long long)n);
    if (!use) return idd_error("respace: retained steps array is missing");
    for (int64_t k = 0; k < n; k++) {
        if (use[k] < 0 || use[k] >= base->T)
            return idd_error("respace: retained step %lld is outside [0, %lld)", (long long)use[k],
                             (long long)base->T);
        if (k > 0 && use[k] <= use[k - 1])
            return idd_error("respace: retained steps must be strictly ascending (%lld after %lld)",
                             (long long)use[k], (long long)use[k - 1]);
    }
    idd_schedule *s;
    idd_status st = schedule_alloc(&s, n);
    if (st != IDD_OK) return st;
    double last = 1.0;
    for (int64_t k = 0; k < n; k++) {
        double a = base->alphas_cumprod[use[k]];
        s->betas[k] = 1 - a / last;
        last = a;
        s->timestep_map[k] = base->timestep_map[use[k]];
    }
    for (int64_t k = 0; k < n; k++)
        if (!(s->betas[k] > 0 && s->betas[k] <= 1)) {
            double bad = s->betas[k];
            idd_schedule_free(s);
            return idd_error("respace: derived beta[%lld] = %g is outside (0, 1]", (long long)k, bad);
        }
    s->T_original = base->T_original;
    derive(s);
    *out = s;
    return IDD_OK;
}

idd_status idd_schedule_respace_str(idd_schedule **out, const idd_schedule *base, const char *spec) {
    if (!out) return idd_error("respace: output pointer is NULL");
    *out = NULL;
    if (!base) return idd_error("respace: base schedule is missing");
    int64_t *use = malloc(sizeof(int64_t) * (size_t)base->T), n = 0;
    if (!use) return idd_error_status(IDD_ENOMEM, "respace: out of memory");
    idd_status st = idd_space_timesteps(base->T, spec, use, &n);
    if (st == IDD_OK) st = idd_schedule_respace(out, base, use, n);
    free(use);
    return st;
}

idd_status idd_schedule_model_t(const idd_schedule *s, const int64_t *t, int64_t B, int rescale,
                                float *out) {
    idd_status st = idd_check_timesteps(s, t, B, "model_t");
    if (st != IDD_OK) return st;
    for (int64_t b = 0; b < B; b++) {
        int64_t m = s->timestep_map[t[b]];
        /* official: map[t].float() * (1000.0 / T_original), in float32 */
        out[b] = rescale ? (float)m * (float)(1000.0 / (double)s->T_original) : (float)m;
    }
    return IDD_OK;
}

idd_status idd_check_timesteps(const idd_schedule *s, const int64_t *t, int64_t B, const char *fn) {
    if (!s) return idd_error("%s: schedule is missing", fn);
    if (B < 0) return idd_error("%s: batch size must be >= 0, got %lld", fn, (long long)B);
    if (B > 0 && !t) return idd_error("%s: timesteps array is missing", fn);
    for (int64_t b = 0; b < B; b++)
        if (t[b] < 0 || t[b] >= s->T)
            return idd_error("%s: t[%lld] = %lld is outside [0, %lld)", fn, (long long)b,
                             (long long)t[b], (long long)s->T);
    return IDD_OK;
}
