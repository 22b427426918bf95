/* test_diffusion.c — the diffusion mathematics against the official implementation's
 * numbers (reference/golden_public.json), finite-difference checks of the loss
 * gradients, the samplers, and the error messages for bad input.
 *
 * Golden file: argv[1], else $IDDPM_GOLDEN, else tests/ref/golden_public.json (written by
 * tests/ref/make_golden.py from the official code; the suite runs from the repository root). */
#include "iddpm/diffusion.h"
#include "check.h"
#include "json_mini.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Schedules are float64 all the way and copy the official expression order, so they
 * agree to a few ulps; 1e-12 leaves room for libm differences (pow, cos, log). */
#define TOL_SCHEDULE 1e-12
/* Tensor ops: we compute in double but store float32 (one rounding, 6e-8 relative),
 * and x_t is float32 between steps, whose rounding is amplified by sqrt(1/abar) in
 * pred_xstart at large t; 1e-5 is the brief's bound. */
#define TOL_OPS 1e-5
/* Near-zero values: an element whose reference is below this magnitude is compared
 * absolutely. Float32 storage of O(1) intermediates leaves absolute errors ~1e-7, so a
 * value of 1e-9 cannot be matched relatively. */
#define FLOOR_OPS 1e-6
/* Schedules: exact zeros occur (posterior_variance[0], alphas_cumprod_next[T-1]). */
#define FLOOR_SCHEDULE 1e-300
/* Finite differences: central differences with h = 1e-4 on float inputs (the actual
 * float step is used), evaluated with double accumulation. At t = 0 the decoder NLL
 * has a scale of exp(0.5 ln beta_0) ~ 6e-3, so h must stay well below it for the
 * O(h^2) truncation error to stay under 2e-4 relative. */
#define TOL_FD 2e-4
#define FLOOR_FD 1e-4

static json_value *G;
static double worst_sched, worst_resp, worst_ops, worst_loss;

static double *get(const char *path, long *n) {
    double *d = json_get_doubles(G, path, n);
    if (!d) check_report(0, path, "missing from golden file");
    return d;
}

static double rel_d(const double *got, const double *want, long n, double floor_) {
    double worst = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]), s = fabs(want[i]);
        double r = d / (s > floor_ ? s : floor_);
        if (!(r <= worst)) worst = r;
    }
    return worst;
}

static void cmp_d(const char *name, const double *got, const double *want, long n, double tol,
                  double floor_, double *worst) {
    char nm[256], det[128];
    double r = rel_d(got, want, n, floor_);
    if (worst && !(r <= *worst)) *worst = r;
    snprintf(nm, sizeof nm, "%s (max rel err %.2e)", name, r);
    snprintf(det, sizeof det, "max rel err %.3g > tol %.3g", r, tol);
    check_report(r <= tol, nm, det);
}

/* compare against golden path, by name */
static void gold_d(const char *path, const double *got, long n, double tol, double floor_, double *worst) {
    long m;
    double *w = get(path, &m);
    if (!w) return;
    if (m != n) {
        char det[64];
        snprintf(det, sizeof det, "length %ld, expected %ld", n, m);
        check_report(0, path, det);
    } else cmp_d(path, got, w, n, tol, floor_, worst);
    free(w);
}

static void gold_f(const char *path, const float *got, long n, double tol, double floor_, double *worst) {
    double *g = malloc(sizeof(double) * (size_t)n);
    for (long i = 0; i < n; i++) g[i] = got[i];
    gold_d(path, g, n, tol, floor_, worst);
    free(g);
}

static float *to_f(const double *d, long n) {
    float *f = malloc(sizeof(float) * (size_t)n);
    for (long i = 0; i < n; i++) f[i] = (float)d[i];
    return f;
}

/* ------------------------------------------------------------------ schedules */

static const char *ARRAYS[] = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2"};
#define NARRAYS ((int)(sizeof ARRAYS / sizeof ARRAYS[0]))

static const double *sched_array(const idd_schedule *s, int k) {
    const double *a[] = {s->betas, s->alphas_cumprod, s->alphas_cumprod_prev, s->alphas_cumprod_next,
                         s->sqrt_alphas_cumprod, s->sqrt_one_minus_alphas_cumprod,
                         s->log_one_minus_alphas_cumprod, s->sqrt_recip_alphas_cumprod,
                         s->sqrt_recipm1_alphas_cumprod, s->posterior_variance,
                         s->posterior_log_variance_clipped, s->posterior_mean_coef1,
                         s->posterior_mean_coef2};
    return a[k];
}

static void check_sched_arrays(const char *prefix, const idd_schedule *s, double *worst) {
    char path[256];
    for (int k = 0; k < NARRAYS; k++) {
        snprintf(path, sizeof path, "%s.%s", prefix, ARRAYS[k]);
        if (!json_get(G, path)) continue; /* cosine_full stores a subset */
        gold_d(path, sched_array(s, k), s->T, TOL_SCHEDULE, FLOOR_SCHEDULE, worst);
    }
}

/* the official create_gaussian_diffusion: named betas, then a SpacedDiffusion */
static idd_schedule *official(const char *name, int64_t T, const char *respacing) {
    idd_schedule *base = NULL, *s = NULL;
    if (idd_schedule_named(&base, name, T) != IDD_OK ||
        idd_schedule_respace_str(&s, base, respacing) != IDD_OK) {
        check_report(0, "build schedule", idd_last_error());
        idd_schedule_free(base);
        return NULL;
    }
    idd_schedule_free(base);
    return s;
}

static void test_schedules(void) {
    struct { const char *key, *name; int64_t T; } cases[] = {
        {"cosine_full", "cosine", 4000}, {"cosine_small", "cosine", 1000}, {"linear", "linear", 1000}};
    for (int c = 0; c < 3; c++) {
        char path[256];
        double *raw = malloc(sizeof(double) * (size_t)cases[c].T);
        idd_status st = idd_betas_named(cases[c].name, cases[c].T, raw);
        check_report(st == IDD_OK, "betas_named", idd_last_error());
        snprintf(path, sizeof path, "schedules.%s.betas_raw", cases[c].key);
        gold_d(path, raw, cases[c].T, TOL_SCHEDULE, FLOOR_SCHEDULE, &worst_sched);
        free(raw);
        idd_schedule *s = official(cases[c].name, cases[c].T, "");
        if (!s) continue;
        snprintf(path, sizeof path, "schedules.%s", cases[c].key);
        check_sched_arrays(path, s, &worst_sched);
        idd_schedule_free(s);
    }
}

static void test_respaced(void) {
    struct { const char *key, *spec; } cases[] = {{"even", "100"}, {"ddim", "ddim50"}, {"sections", "10,20"}};
    for (int c = 0; c < 3; c++) {
        char path[256];
        idd_schedule *s = official("cosine", 4000, cases[c].spec);
        if (!s) continue;
        double *map = malloc(sizeof(double) * (size_t)s->T);
        for (int64_t k = 0; k < s->T; k++) map[k] = (double)s->timestep_map[k];
        snprintf(path, sizeof path, "respaced.%s.timestep_map", cases[c].key);
        gold_d(path, map, s->T, 0, 1, NULL);
        snprintf(path, sizeof path, "respaced.%s.use_timesteps", cases[c].key);
        gold_d(path, map, s->T, 0, 1, NULL);
        free(map);
        snprintf(path, sizeof path, "respaced.%s", cases[c].key);
        check_sched_arrays(path, s, &worst_resp);
        idd_schedule_free(s);
    }
}

/* ------------------------------------------------------------------ ops */

/* The f64 reference keeps x_t in float64; ours is float32 (the engine's working type),
 * and its rounding delta = x_t(f32) - x_t(f64) enters every op after q_sample affinely
 * (piecewise, with clipping), amplified by sqrt(1/abar) ~ 8e4 at t = T-1 for pred_xstart.
 * That is input conditioning, not kernel error, so the ops are compared with
 *     want = ref + J * delta,   J = d out / d x_t  (exact: the ops are affine in x_t).
 * Without it the worst error at t = T-1 is ~6e-4 (printed as the "raw" line). */
typedef enum { J_NONE, J_POST, J_PRED, J_MEAN, J_DDIM } jac_kind;

static void fill_jac(jac_kind kind, const idd_schedule *s, const int64_t *t, const float *praw,
                     int clip, double eta, int64_t B, int64_t n, double *J) {
    for (int64_t b = 0; b < B; b++) {
        int64_t tb = t[b];
        double sra = s->sqrt_recip_alphas_cumprod[tb], srm = s->sqrt_recipm1_alphas_cumprod[tb];
        double c1 = s->posterior_mean_coef1[tb], c2 = s->posterior_mean_coef2[tb];
        double a = s->alphas_cumprod[tb], ap = s->alphas_cumprod_prev[tb];
        double sigma = eta * sqrt((1 - ap) / (1 - a)) * sqrt(1 - a / ap);
        double ce = sqrt(1 - ap - sigma * sigma);
        for (int64_t i = 0; i < n; i++) {
            float pr = praw[b * n + i];
            double jp = (clip && (pr < -1 || pr > 1)) ? 0 : sra;
            double j = 0;
            switch (kind) {
            case J_NONE: j = 0; break;
            case J_POST: j = c2; break;
            case J_PRED: j = jp; break;
            case J_MEAN: j = c1 * jp + c2; break;
            case J_DDIM: j = jp * sqrt(ap) + ce * (sra - jp) / srm; break;
            }
            J[b * n + i] = j;
        }
    }
}

static double worst_raw;

static void gold_f_xt(const char *path, const float *got, long n, const double *J,
                      const double *delta) {
    long m;
    double *w = get(path, &m);
    if (!w) return;
    if (m != n) { check_report(0, path, "length mismatch"); free(w); return; }
    double *g = malloc(sizeof(double) * (size_t)n);
    for (long i = 0; i < n; i++) g[i] = got[i];
    double r = rel_d(g, w, n, FLOOR_OPS);
    if (!(r <= worst_raw)) worst_raw = r;
    for (long i = 0; i < n; i++) w[i] += J[i] * delta[i];
    cmp_d(path, g, w, n, TOL_OPS, FLOOR_OPS, &worst_ops);
    free(g);
    free(w);
}

static void test_ops(void) {
    const char *setups[] = {"cosine_small_hybrid", "cifar_hybrid", "linear_hybrid", "spaced_even"};
    const char *caseids[] = {"t_edge", "t_mid"};
    long nx, nn, nm, nz;
    double *x0d = get("inputs.x_start", &nx), *nd = get("inputs.noise", &nn);
    double *md = get("inputs.model_output", &nm), *zd = get("inputs.noise_sample", &nz);
    if (!x0d || !nd || !md || !zd) return;
    const int64_t B = 2, C = 3, HW = 64, n = C * HW;
    float *x0 = to_f(x0d, nx), *noise = to_f(nd, nn), *mo = to_f(md, nm), *z = to_f(zd, nz);
    float *xt = malloc(sizeof(float) * (size_t)(B * n)), *buf[4];
    float *praw = malloc(sizeof(float) * (size_t)(B * n));
    double *J = malloc(sizeof(double) * (size_t)(B * n)), *delta = malloc(sizeof(double) * (size_t)(B * n));
    for (int k = 0; k < 4; k++) buf[k] = malloc(sizeof(float) * (size_t)(B * n));
    idd_diffusion_cfg cfg = idd_diffusion_cfg_from_flags(1, 0, 0, 0, 1);
    char p[256], base[192];
    for (int si = 0; si < 4; si++) {
        snprintf(p, sizeof p, "ops.%s.spec.schedule", setups[si]);
        const json_value *sn = json_get(G, p);
        snprintf(p, sizeof p, "ops.%s.spec.T", setups[si]);
        const json_value *sT = json_get(G, p);
        snprintf(p, sizeof p, "ops.%s.spec.timestep_respacing", setups[si]);
        const json_value *sr = json_get(G, p);
        if (!sn || !sT || !sr) { check_report(0, setups[si], "spec missing"); continue; }
        idd_schedule *s = official(sn->str, (int64_t)sT->num, sr->str);
        if (!s) continue;
        for (int ci = 0; ci < 2; ci++) {
            long nt;
            snprintf(base, sizeof base, "ops.%s.cases.%s", setups[si], caseids[ci]);
            snprintf(p, sizeof p, "%s.t", base);
            double *td = get(p, &nt);
            if (!td) continue;
            int64_t t[2] = {(int64_t)td[0], (int64_t)td[1]};
            free(td);
            float mt[2];
            idd_schedule_model_t(s, t, B, 1, mt);
            snprintf(p, sizeof p, "%s.model_t", base);
            gold_f(p, mt, B, 0, 1, NULL);

            idd_q_sample(s, x0, noise, t, B, n, xt);
            snprintf(p, sizeof p, "%s.f64.q_sample", base);
            gold_f(p, xt, B * n, TOL_OPS, FLOOR_OPS, &worst_ops);
            long nq;
            double *xtd = get(p, &nq);
            if (!xtd) continue;
            for (long i = 0; i < B * n; i++) delta[i] = (double)xt[i] - xtd[i];
            free(xtd);
            idd_p_pred_xstart_raw(s, cfg, mo, xt, t, B, C, HW, praw);

            double var[2], lvar[2];
            idd_q_posterior_mean_variance(s, x0, xt, t, B, n, buf[0], var, lvar);
            snprintf(p, sizeof p, "%s.f64.q_posterior_mean", base);
            fill_jac(J_POST, s, t, praw, 0, 0, B, n, J);
            gold_f_xt(p, buf[0], B * n, J, delta);
            snprintf(p, sizeof p, "%s.f64.q_posterior_variance", base);
            gold_d(p, var, B, TOL_OPS, FLOOR_OPS, &worst_ops);
            snprintf(p, sizeof p, "%s.f64.q_posterior_log_variance_clipped", base);
            gold_d(p, lvar, B, TOL_OPS, FLOOR_OPS, &worst_ops);

            for (int clip = 1; clip >= 0; clip--) {
                const char *names[4] = {"mean", "variance", "log_variance", "pred_xstart"};
                idd_status st = idd_p_mean_variance(s, cfg, mo, xt, t, B, C, HW, clip, buf[0], buf[1],
                                                    buf[2], buf[3]);
                check_report(st == IDD_OK, "p_mean_variance", idd_last_error());
                jac_kind kinds[4] = {J_MEAN, J_NONE, J_NONE, J_PRED};
                for (int k = 0; k < 4; k++) {
                    snprintf(p, sizeof p, "%s.f64.p_mean_variance_%s.%s", base, clip ? "clip" : "noclip",
                             names[k]);
                    fill_jac(kinds[k], s, t, praw, clip, 0, B, n, J);
                    gold_f_xt(p, buf[k], B * n, J, delta);
                }
            }

            double loss[2], mse[2], vb[2];
            idd_status st = idd_training_losses(s, cfg, mo, x0, xt, noise, t, B, C, HW, loss, mse, vb);
            check_report(st == IDD_OK, "training_losses", idd_last_error());
            snprintf(p, sizeof p, "%s.f64.training_losses.mse", base);
            gold_d(p, mse, B, TOL_OPS, FLOOR_OPS, &worst_ops);
            snprintf(p, sizeof p, "%s.f64.training_losses.vb", base);
            gold_d(p, vb, B, TOL_OPS, FLOOR_OPS, &worst_ops);
            snprintf(p, sizeof p, "%s.f64.training_losses.loss", base);
            gold_d(p, loss, B, TOL_OPS, FLOOR_OPS, &worst_ops);

            st = idd_p_sample(s, cfg, mo, xt, z, t, B, C, HW, 1, buf[0], buf[1]);
            check_report(st == IDD_OK, "p_sample", idd_last_error());
            snprintf(p, sizeof p, "%s.f64.p_sample", base);
            fill_jac(J_MEAN, s, t, praw, 1, 0, B, n, J);
            gold_f_xt(p, buf[0], B * n, J, delta);

            /* the split path (as Lua runs it with a denoised_fn) must agree */
            idd_p_pred_xstart_raw(s, cfg, mo, xt, t, B, C, HW, buf[1]);
            idd_p_finish(s, cfg, mo, xt, t, B, C, HW, 1, buf[1], buf[2], NULL, buf[3]);
            idd_p_sample_step(buf[2], buf[3], z, t, B, n, buf[2]);
            gold_f_xt(p, buf[2], B * n, J, delta);

            for (int e = 0; e <= 1; e++) {
                st = idd_ddim_sample(s, cfg, mo, xt, z, t, (double)e, B, C, HW, 1, buf[0], buf[1]);
                check_report(st == IDD_OK, "ddim_sample", idd_last_error());
                snprintf(p, sizeof p, "%s.f64.ddim_eta%d", base, e);
                fill_jac(J_DDIM, s, t, praw, 1, (double)e, B, n, J);
                gold_f_xt(p, buf[0], B * n, J, delta);
            }
        }
        idd_schedule_free(s);
    }
    free(x0d); free(nd); free(md); free(zd);
    free(x0); free(noise); free(mo); free(z); free(xt); free(praw); free(J); free(delta);
    for (int k = 0; k < 4; k++) free(buf[k]);
}

static void test_losses(void) {
    long n, k;
    double *m1 = get("losses.normal_kl.inputs.mean1", &n), *l1 = get("losses.normal_kl.inputs.logvar1", &k);
    double *m2 = get("losses.normal_kl.inputs.mean2", &k), *l2 = get("losses.normal_kl.inputs.logvar2", &k);
    if (m1 && l1 && m2 && l2) {
        float *a = to_f(m1, n), *b = to_f(l1, n), *c = to_f(m2, n), *d = to_f(l2, n), zero = 0;
        float *out = malloc(sizeof(float) * (size_t)n);
        idd_normal_kl(n, a, 1, b, 1, c, 1, d, 1, out);
        gold_f("losses.normal_kl.f64", out, n, TOL_OPS, FLOOR_OPS, &worst_loss);
        idd_normal_kl(n, a, 1, b, 1, &zero, 0, &zero, 0, out);
        gold_f("losses.normal_kl_vs_std.f64", out, n, TOL_OPS, FLOOR_OPS, &worst_loss);
        free(a); free(b); free(c); free(d); free(out);
    }
    free(m1); free(l1); free(m2); free(l2);
    double *x = get("losses.discretized_gaussian_log_likelihood.inputs.x", &n);
    double *mu = get("losses.discretized_gaussian_log_likelihood.inputs.means", &k);
    double *ls = get("losses.discretized_gaussian_log_likelihood.inputs.log_scales", &k);
    if (x && mu && ls) {
        float *a = to_f(x, n), *b = to_f(mu, n), *c = to_f(ls, n), *out = malloc(sizeof(float) * (size_t)n);
        idd_discretized_gaussian_log_likelihood(n, a, 1, b, 1, c, 1, out);
        gold_f("losses.discretized_gaussian_log_likelihood.f64", out, n, TOL_OPS, FLOOR_OPS, &worst_loss);
        free(a); free(b); free(c); free(out);
    }
    free(x); free(mu); free(ls);
}

/* ------------------------------------------------------------------ gradients */

static unsigned lcg_state = 12345;
static double urand(void) { /* deterministic, seed printed by the caller */
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return (lcg_state >> 8) / 16777216.0;
}

typedef enum { F_VB, F_MSE, F_LOSS } fd_kind;

static double eval_sum(fd_kind kind, const idd_schedule *s, idd_diffusion_cfg cfg, const float *mo,
                       const float *x0, const float *xt, const float *noise, const int64_t *t,
                       int64_t B, int64_t C, int64_t HW, const double *w) {
    double out[4], loss[4], acc = 0;
    if (kind == F_VB) idd_vb_terms_bpd(s, cfg, mo, x0, xt, t, B, C, HW, 0, out, NULL);
    else if (kind == F_MSE) idd_mse_term(s, cfg, mo, x0, xt, noise, t, B, C, HW, out);
    else { idd_training_losses(s, cfg, mo, x0, xt, noise, t, B, C, HW, loss, NULL, NULL); memcpy(out, loss, sizeof loss); }
    for (int64_t b = 0; b < B; b++) acc += w[b] * out[b];
    return acc;
}

/* FD of sum_b w[b] f_b over the elements [lo, hi) of every sample's model output */
static double fd_check(fd_kind kind, const idd_schedule *s, idd_diffusion_cfg cfg, float *mo,
                       const float *x0, const float *xt, const float *noise, const int64_t *t,
                       int64_t B, int64_t C, int64_t HW, const double *w, const float *grad,
                       int64_t lo, int64_t hi) {
    int64_t cout = idd_var_is_learned(cfg.var_type) ? 2 * C : C;
    double worst = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = lo; i < hi; i++) {
            size_t k = (size_t)(b * cout * HW + i);
            float orig = mo[k], h = 1e-4f;
            mo[k] = orig + h;
            double fp = eval_sum(kind, s, cfg, mo, x0, xt, noise, t, B, C, HW, w);
            float up = mo[k];
            mo[k] = orig - h;
            double fm = eval_sum(kind, s, cfg, mo, x0, xt, noise, t, B, C, HW, w);
            float dn = mo[k];
            mo[k] = orig;
            double fd = (fp - fm) / ((double)up - (double)dn);
            double d = fabs(fd - grad[k]), sc = fabs(fd) > FLOOR_FD ? fabs(fd) : FLOOR_FD;
            if (!(d / sc <= worst)) worst = d / sc;
        }
    return worst;
}

static void test_gradients(void) {
    printf("# gradient checks: LCG seed %u\n", lcg_state);
    idd_schedule *s = official("cosine", 1000, "");
    if (!s) return;
    const int64_t B = 3, C = 2, HW = 4, n = C * HW;
    int64_t t[3] = {0, 7, 600}; /* decoder NLL, small-t KL, large-t KL */
    double w[3] = {1.0, -0.7, 1.3};
    float x0[3 * 8], noise[3 * 8], xt[3 * 8], mo[3 * 16];
    for (int i = 0; i < B * n; i++) {
        /* on the 8-bit grid, including both edge bins */
        int q = (int)(urand() * 256);
        if (i == 0) q = 0;
        if (i == 1) q = 255;
        x0[i] = (float)(q / 127.5 - 1);
        noise[i] = (float)(urand() * 2 - 1);
    }
    idd_q_sample(s, x0, noise, t, B, n, xt);
    idd_var_type vts[4] = {IDD_VAR_LEARNED_RANGE, IDD_VAR_LEARNED, IDD_VAR_FIXED_SMALL, IDD_VAR_FIXED_LARGE};
    idd_mean_type mts[3] = {IDD_MEAN_EPSILON, IDD_MEAN_START_X, IDD_MEAN_PREVIOUS_X};
    for (int vi = 0; vi < 4; vi++)
        for (int mi = 0; mi < 3; mi++)
            for (int li = 0; li < 4; li++) {
                idd_diffusion_cfg cfg = {mts[mi], vts[vi], (idd_loss_type)li};
                int learned = idd_var_is_learned(cfg.var_type);
                int64_t cout = learned ? 2 * C : C;
                for (int i = 0; i < B * cout * HW; i++) {
                    int64_t b = i / (cout * HW), j = i % (cout * HW);
                    double e = noise[b * n + (j % n)] + 0.3 * (urand() - 0.5);
                    if (cfg.mean_type == IDD_MEAN_START_X) e = x0[b * n + (j % n)] * 0.9 + 0.05 * (urand() - 0.5);
                    if (cfg.mean_type == IDD_MEAN_PREVIOUS_X) e = x0[b * n + (j % n)] * 0.9 + 0.05 * (urand() - 0.5);
                    /* LEARNED: log-variances around -1.5 keep the decoder NLL away from
                     * the far tails, where cdf_plus - cdf_min cancels and FD is noise */
                    double v = cfg.var_type == IDD_VAR_LEARNED ? -2 + urand() : urand() * 2 - 1;
                    mo[i] = (float)(j < n ? e : v);
                }
                char name[200];
                float g[3 * 16];
                double r;
                if (li == 0) { /* the generic pieces, once per mean/var type */
                    memset(g, 0, sizeof g);
                    idd_vb_terms_bpd_backward(s, cfg, mo, x0, xt, t, B, C, HW, 0, 0, w, g);
                    r = fd_check(F_VB, s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g, 0, cout * HW);
                    snprintf(name, sizeof name, "fd vb_terms_bpd_backward %s/%s (max rel err %.2e)",
                             idd_mean_type_name(cfg.mean_type), idd_var_type_name(cfg.var_type), r);
                    check_report(r <= TOL_FD, name, "finite difference mismatch");
                    memset(g, 0, sizeof g);
                    idd_mse_term_backward(s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g);
                    r = fd_check(F_MSE, s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g, 0, cout * HW);
                    snprintf(name, sizeof name, "fd mse_term_backward %s/%s (max rel err %.2e)",
                             idd_mean_type_name(cfg.mean_type), idd_var_type_name(cfg.var_type), r);
                    check_report(r <= TOL_FD, name, "finite difference mismatch");
                }
                memset(g, 0, sizeof g);
                idd_training_losses_backward(s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g);
                int kl = cfg.loss_type == IDD_LOSS_KL || cfg.loss_type == IDD_LOSS_RESCALED_KL;
                if (kl) { /* full gradient through both halves */
                    r = fd_check(F_LOSS, s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g, 0, cout * HW);
                } else { /* mean half: mse only (stop-gradient); variance half: all of loss */
                    r = fd_check(F_MSE, s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g, 0, n);
                    if (learned) {
                        double r2 = fd_check(F_LOSS, s, cfg, mo, x0, xt, noise, t, B, C, HW, w, g, n, 2 * n);
                        if (!(r2 <= r)) r = r2;
                    }
                }
                snprintf(name, sizeof name, "fd training_losses_backward %s/%s/%s (max rel err %.2e)",
                         idd_mean_type_name(cfg.mean_type), idd_var_type_name(cfg.var_type),
                         idd_loss_type_name(cfg.loss_type), r);
                check_report(r <= TOL_FD, name, "finite difference mismatch");
            }
    idd_schedule_free(s);
}

/* ------------------------------------------------------------------ respacing, samplers */

static void expect_steps(int64_t T, const char *spec, const int64_t *head, int nh,
                         const int64_t *tail, int nt, int64_t count) {
    int64_t *out = malloc(sizeof(int64_t) * (size_t)T), n = 0;
    idd_status st = idd_space_timesteps(T, spec, out, &n);
    int ok = st == IDD_OK && n == count;
    for (int i = 0; ok && i < nh; i++) ok = out[i] == head[i];
    for (int i = 0; ok && i < nt; i++) ok = out[n - nt + i] == tail[i];
    char name[128];
    snprintf(name, sizeof name, "space_timesteps(%lld, \"%s\")", (long long)T, spec);
    check_report(ok, name, st == IDD_OK ? "wrong steps" : idd_last_error());
    free(out);
}

static void test_space_timesteps(void) {
    expect_steps(10, "3", (int64_t[]){0, 4, 9}, 3, NULL, 0, 3);
    expect_steps(4000, "50", (int64_t[]){0, 82, 163, 245, 326}, 5, (int64_t[]){3836, 3917, 3999}, 3, 50);
    expect_steps(4000, "100", (int64_t[]){0, 40, 81, 121, 162}, 5, (int64_t[]){3999}, 1, 100);
    expect_steps(4000, "250", (int64_t[]){0, 16, 32, 48, 64}, 5, (int64_t[]){3983, 3999}, 2, 250);
    expect_steps(300, "10,15,20", (int64_t[]){0, 11, 22}, 3, (int64_t[]){294, 299}, 2, 45);
    expect_steps(4000, "ddim50", (int64_t[]){0, 80, 160}, 3, (int64_t[]){3920}, 1, 50);
    expect_steps(7, "", (int64_t[]){0, 1, 2, 3, 4, 5, 6}, 7, NULL, 0, 7);
}

static void test_samplers(void) {
    idd_timestep_sampler *u = NULL, *l = NULL;
    const int64_t T = 5;
    idd_sampler_new(&u, "uniform", T);
    idd_sampler_new(&l, "loss-second-moment", T);
    double draws[4] = {0.0, 0.2, 0.5, 0.9999}, wts[4];
    int64_t t[4];
    idd_sampler_sample(u, 4, draws, t, wts);
    check_report(t[0] == 0 && t[1] == 1 && t[2] == 2 && t[3] == 4 && wts[0] == 1 && wts[3] == 1,
                 "uniform sampler: inverse-CDF draws and unit weights", "wrong draws");
    /* warm-up: 9 entries everywhere is not enough */
    for (int r = 0; r < 9; r++)
        for (int64_t k = 0; k < T; k++) {
            double loss = (double)(k + 1);
            idd_sampler_update(l, &k, &loss, 1);
        }
    double w[5];
    idd_sampler_weights(l, w);
    check_report(!idd_sampler_warmed_up(l) && w[0] == 1 && w[4] == 1, "loss-second-moment: uniform during warm-up", "");
    for (int r = 0; r < 3; r++) /* fills, then shifts */
        for (int64_t k = 0; k < T; k++) {
            double loss = (double)(k + 1);
            idd_sampler_update(l, &k, &loss, 1);
        }
    idd_sampler_weights(l, w);
    int ok = idd_sampler_warmed_up(l);
    for (int64_t k = 0; k < T; k++) {
        double want = (k + 1) / 15.0 * (1 - 0.001) + 0.001 / T;
        ok = ok && fabs(w[k] - want) < 1e-15;
    }
    check_report(ok, "loss-second-moment: weights sqrt(E[loss^2]) mixed with 0.001 uniform", "");
    idd_sampler_sample(l, 4, draws, t, wts);
    double p4 = w[4]; /* weights already sum to 1 */
    check_report(t[3] == 4 && fabs(wts[3] - 1.0 / (T * p4)) < 1e-12, "loss-second-moment: importance weight 1/(T p)", "");
    double hist[50];
    int64_t cnt[5];
    idd_sampler_get_state(l, hist, cnt);
    check_report(cnt[0] == 10 && hist[9] == 1.0, "loss-second-moment: state round trip", "");
    idd_sampler_free(u);
    idd_sampler_free(l);
}

/* ------------------------------------------------------------------ errors */

static void expect_err(idd_status st, const char *want, const char *name) {
    char det[600];
    int ok = st != IDD_OK && strstr(idd_last_error(), want) != NULL;
    snprintf(det, sizeof det, "status %d, message \"%s\", expected to contain \"%s\"", (int)st,
             st == IDD_OK ? "" : idd_last_error(), want);
    check_report(ok, name, det);
}

static idd_status failing_alpha_bar(void *ud, double u, double *out) {
    (void)ud; (void)u; (void)out;
    return idd_error("attempt to call a nil value");
}
static idd_status increasing_alpha_bar(void *ud, double u, double *out) {
    (void)ud;
    *out = 0.5 + u;
    return IDD_OK;
}

static void test_errors(void) {
    double b[8];
    int64_t idx[16], n;
    expect_err(idd_betas_named("cosin", 10, b), "unknown noise schedule \"cosin\"", "error: unknown schedule name");
    expect_err(idd_betas_named("cosine", 0, b), "steps must be >= 1, got 0", "error: T < 1");
    idd_schedule *s = NULL;
    double bad[3] = {0.1, 0.0, 0.2};
    expect_err(idd_schedule_new(&s, bad, 3), "betas[1] = 0 is outside (0, 1]", "error: beta = 0");
    bad[1] = 1.5;
    expect_err(idd_schedule_new(&s, bad, 3), "betas[1] = 1.5 is outside (0, 1]", "error: beta > 1");
    expect_err(idd_betas_from_alpha_bar(4, failing_alpha_bar, NULL, 0.999, b),
               "alpha_bar failed: attempt to call a nil value", "error: alpha_bar callback fails");
    expect_err(idd_betas_from_alpha_bar(4, increasing_alpha_bar, NULL, 0.999, b), "is outside (0, 1]",
               "error: increasing alpha_bar");
    expect_err(idd_space_timesteps(10, "abc", idx, &n), "cannot parse section 1 of \"abc\"", "error: unparseable respacing");
    expect_err(idd_space_timesteps(10, "5,x", idx, &n), "cannot parse section 2", "error: unparseable second section");
    expect_err(idd_space_timesteps(10, "20", idx, &n), "cannot divide a section of 10 steps into 20", "error: too many steps");
    expect_err(idd_space_timesteps(10, "ddim7", idx, &n), "cannot create exactly 7 steps", "error: no ddim stride");
    expect_err(idd_space_timesteps(10, "ddimx", idx, &n), "expected \"ddimN\"", "error: bad ddim count");
    idd_schedule_named(&s, "linear", 100);
    float x[4] = {0}, o[4];
    int64_t t[2] = {3, 100};
    expect_err(idd_q_sample(s, x, x, t, 2, 2, o), "q_sample: t[1] = 100 is outside [0, 100)", "error: timestep out of range");
    t[1] = 3;
    expect_err(idd_ddim_reverse_step(s, x, x, t, 0.5, 2, 2, o), "eta must be 0", "error: ddim reverse with eta");
    expect_err(idd_ddim_step(s, x, x, NULL, t, -1, 2, 2, o), "eta must be >= 0", "error: negative eta");
    int64_t use[2] = {5, 5};
    idd_schedule *r = NULL;
    expect_err(idd_schedule_respace(&r, s, use, 2), "strictly ascending", "error: respace with duplicate steps");
    idd_schedule_free(s);
    idd_timestep_sampler *sp = NULL;
    expect_err(idd_sampler_new(&sp, "importance", 10), "unknown sampler \"importance\"", "error: unknown sampler");
    check_report(idd_mean_type_from_name("EPSILON") == IDD_MEAN_EPSILON &&
                 idd_var_type_from_name("learned_range") == IDD_VAR_LEARNED_RANGE &&
                 idd_loss_type_from_name("rescaled_mse") == IDD_LOSS_RESCALED_MSE &&
                 idd_var_type_from_name("bogus") == -1, "enum names", "");
}

int main(int argc, char **argv) {
    const char *paths[] = {argc > 1 ? argv[1] : NULL, getenv("IDDPM_GOLDEN"), "tests/ref/golden_public.json"};
    char err[256] = "";
    for (int i = 0; i < 3 && !G; i++)
        if (paths[i]) G = json_parse_file(paths[i], err, sizeof err);
    if (!G) {
        check_report(0, "load golden_public.json", err);
    } else {
        test_schedules();
        test_respaced();
        test_ops();
        test_losses();
    }
    test_space_timesteps();
    test_gradients();
    test_samplers();
    test_errors();
    printf("# worst rel err: schedules %.2e, respaced %.2e, ops %.2e (raw, before the x_t "
           "rounding correction: %.2e), losses %.2e\n", worst_sched, worst_resp, worst_ops, worst_raw,
           worst_loss);
    printf("# not checked here: timestep_embedding (t, dim32, dim33) belongs to the UNet kernel\n");
    json_free(G);
    return check_done();
}
