/* sampler.c — timestep samplers for training (spec section 5).
 *
 * "uniform": every t equally likely, every importance weight 1.
 * "loss-second-moment": keeps the last IDD_LSM_HISTORY raw losses per t; until every t
 * has a full history the weights are uniform (warm-up), then
 *   w_t = sqrt(mean_k history[t][k]^2), w /= sum(w), w = w (1 - 0.001) + 0.001 / T.
 * Draws: p = w / sum(w), t = #{k : cdf[k] <= u} with cdf the normalised running sum
 * (numpy.random.choice's rule), importance weight 1 / (T p[t]). The uniforms come from
 * the caller (an array or a callback), so the engine's counter-based RNG drives them. */
#include "iddpm/diffusion.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct idd_timestep_sampler {
    int lsm;            /* 0: uniform, 1: loss-second-moment */
    int64_t T;
    double *history;    /* T * IDD_LSM_HISTORY, oldest first per row */
    int64_t *counts;    /* T */
};

idd_status idd_sampler_new(idd_timestep_sampler **out, const char *name, int64_t T) {
    if (!out) return idd_error("schedule_sampler: output pointer is NULL");
    *out = NULL;
    if (T < 1) return idd_error("schedule_sampler: steps must be >= 1, got %lld", (long long)T);
    int lsm;
    if (name && strcmp(name, "uniform") == 0) lsm = 0;
    else if (name && strcmp(name, "loss-second-moment") == 0) lsm = 1;
    else
        return idd_error("schedule_sampler: unknown sampler \"%s\" (expected \"uniform\" or "
                         "\"loss-second-moment\")", name ? name : "(null)");
    idd_timestep_sampler *sp = calloc(1, sizeof *sp);
    if (!sp) return idd_error_status(IDD_ENOMEM, "schedule_sampler: out of memory");
    sp->lsm = lsm;
    sp->T = T;
    if (lsm) {
        sp->history = calloc((size_t)T * IDD_LSM_HISTORY, sizeof(double));
        sp->counts = calloc((size_t)T, sizeof(int64_t));
        if (!sp->history || !sp->counts) {
            idd_sampler_free(sp);
            return idd_error_status(IDD_ENOMEM, "schedule_sampler: out of memory for %lld steps",
                                    (long long)T);
        }
    }
    *out = sp;
    return IDD_OK;
}

void idd_sampler_free(idd_timestep_sampler *sp) {
    if (!sp) return;
    free(sp->history);
    free(sp->counts);
    free(sp);
}

const char *idd_sampler_name(const idd_timestep_sampler *sp) {
    return sp->lsm ? "loss-second-moment" : "uniform";
}
int64_t idd_sampler_T(const idd_timestep_sampler *sp) { return sp->T; }

int idd_sampler_warmed_up(const idd_timestep_sampler *sp) {
    if (!sp->lsm) return 1;
    for (int64_t t = 0; t < sp->T; t++)
        if (sp->counts[t] < IDD_LSM_HISTORY) return 0;
    return 1;
}

idd_status idd_sampler_weights(const idd_timestep_sampler *sp, double *w) {
    if (!sp || !w) return idd_error("schedule_sampler.weights: sampler or output is missing (NULL)");
    int64_t T = sp->T;
    if (!sp->lsm || !idd_sampler_warmed_up(sp)) {
        for (int64_t t = 0; t < T; t++) w[t] = 1.0;
        return IDD_OK;
    }
    double sum = 0;
    for (int64_t t = 0; t < T; t++) {
        const double *h = sp->history + t * IDD_LSM_HISTORY;
        double m = 0;
        for (int k = 0; k < IDD_LSM_HISTORY; k++) m += h[k] * h[k];
        w[t] = sqrt(m / IDD_LSM_HISTORY);
        sum += w[t];
    }
    for (int64_t t = 0; t < T; t++) {
        double x = sum > 0 ? w[t] / sum : 1.0 / (double)T;
        w[t] = x * (1 - IDD_LSM_UNIFORM_PROB) + IDD_LSM_UNIFORM_PROB / (double)T;
    }
    return IDD_OK;
}

/* p[T] normalised and cdf[T] for inverse-CDF draws */
static idd_status probs(const idd_timestep_sampler *sp, double *p, double *cdf) {
    idd_status st = idd_sampler_weights(sp, p);
    if (st != IDD_OK) return st;
    double sum = 0;
    for (int64_t t = 0; t < sp->T; t++) sum += p[t];
    if (!(sum > 0) || !isfinite(sum))
        return idd_error("schedule_sampler.sample: weights sum to %g (history holds non-finite losses?)", sum);
    double acc = 0;
    for (int64_t t = 0; t < sp->T; t++) {
        p[t] /= sum;
        acc += p[t];
        cdf[t] = acc;
    }
    for (int64_t t = 0; t < sp->T; t++) cdf[t] /= acc;
    return IDD_OK;
}

static int64_t draw(const double *cdf, int64_t T, double u) {
    /* searchsorted(cdf, u, side="right"): first k with cdf[k] > u */
    int64_t lo = 0, hi = T;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cdf[mid] <= u) lo = mid + 1;
        else hi = mid;
    }
    return lo < T ? lo : T - 1;
}

static idd_status sample_impl(const idd_timestep_sampler *sp, int64_t B, const double *u,
                              idd_uniform_fn fn, void *ud, int64_t *t, double *weights) {
    if (!sp || !t) return idd_error("schedule_sampler.sample: sampler or output is missing (NULL)");
    if (B < 0) return idd_error("schedule_sampler.sample: batch size must be >= 0, got %lld", (long long)B);
    double *p = malloc(sizeof(double) * (size_t)sp->T * 2);
    if (!p) return idd_error_status(IDD_ENOMEM, "schedule_sampler.sample: out of memory");
    double *cdf = p + sp->T;
    idd_status st = probs(sp, p, cdf);
    for (int64_t b = 0; st == IDD_OK && b < B; b++) {
        double x;
        if (u) x = u[b];
        else if ((st = fn(ud, &x)) != IDD_OK) break;
        if (!(x >= 0 && x < 1)) {
            st = idd_error("schedule_sampler.sample: uniform draw %lld = %g is outside [0, 1)",
                           (long long)b, x);
            break;
        }
        t[b] = draw(cdf, sp->T, x);
        if (weights) weights[b] = 1.0 / ((double)sp->T * p[t[b]]);
    }
    free(p);
    return st;
}

idd_status idd_sampler_sample(const idd_timestep_sampler *sp, int64_t B, const double *u,
                              int64_t *t, double *weights) {
    if (B > 0 && !u) return idd_error("schedule_sampler.sample: uniform draws array is missing (NULL)");
    return sample_impl(sp, B, u, NULL, NULL, t, weights);
}

idd_status idd_sampler_sample_cb(const idd_timestep_sampler *sp, int64_t B, idd_uniform_fn fn,
                                 void *userdata, int64_t *t, double *weights) {
    if (!fn) return idd_error("schedule_sampler.sample: uniform callback is missing (NULL)");
    return sample_impl(sp, B, NULL, fn, userdata, t, weights);
}

idd_status idd_sampler_update(idd_timestep_sampler *sp, const int64_t *t, const double *losses,
                              int64_t n) {
    if (!sp) return idd_error("schedule_sampler.update: sampler is missing (NULL)");
    if (n < 0) return idd_error("schedule_sampler.update: count must be >= 0, got %lld", (long long)n);
    if (n > 0 && (!t || !losses))
        return idd_error("schedule_sampler.update: timesteps or losses array is missing (NULL)");
    for (int64_t i = 0; i < n; i++)
        if (t[i] < 0 || t[i] >= sp->T)
            return idd_error("schedule_sampler.update: t[%lld] = %lld is outside [0, %lld)",
                             (long long)i, (long long)t[i], (long long)sp->T);
    if (!sp->lsm) return IDD_OK;
    for (int64_t i = 0; i < n; i++) {
        double *h = sp->history + t[i] * IDD_LSM_HISTORY;
        int64_t *c = &sp->counts[t[i]];
        if (*c == IDD_LSM_HISTORY) {
            memmove(h, h + 1, sizeof(double) * (IDD_LSM_HISTORY - 1));
            h[IDD_LSM_HISTORY - 1] = losses[i];
        } else {
            h[*c] = losses[i];
            (*c)++;
        }
    }
    return IDD_OK;
}

idd_status idd_sampler_get_state(const idd_timestep_sampler *sp, double *history, int64_t *counts) {
    if (!sp) return idd_error("schedule_sampler.state: sampler is missing (NULL)");
    size_t T = (size_t)sp->T;
    if (history) {
        if (sp->lsm) memcpy(history, sp->history, sizeof(double) * T * IDD_LSM_HISTORY);
        else memset(history, 0, sizeof(double) * T * IDD_LSM_HISTORY);
    }
    if (counts) {
        if (sp->lsm) memcpy(counts, sp->counts, sizeof(int64_t) * T);
        else memset(counts, 0, sizeof(int64_t) * T);
    }
    return IDD_OK;
}

idd_status idd_sampler_set_state(idd_timestep_sampler *sp, const double *history,
                                 const int64_t *counts) {
    if (!sp) return idd_error("schedule_sampler.set_state: sampler is missing (NULL)");
    if (!sp->lsm) return IDD_OK;
    if (!history || !counts)
        return idd_error("schedule_sampler.set_state: history or counts is missing (NULL)");
    for (int64_t t = 0; t < sp->T; t++)
        if (counts[t] < 0 || counts[t] > IDD_LSM_HISTORY)
            return idd_error("schedule_sampler.set_state: counts[%lld] = %lld is outside [0, %d]",
                             (long long)t, (long long)counts[t], IDD_LSM_HISTORY);
    memcpy(sp->history, history, sizeof(double) * (size_t)sp->T * IDD_LSM_HISTORY);
    memcpy(sp->counts, counts, sizeof(int64_t) * (size_t)sp->T);
    return IDD_OK;
}
