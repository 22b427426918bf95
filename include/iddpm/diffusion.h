/* iddpm/diffusion.h — the diffusion mathematics of Improved DDPM on raw buffers.
 *
 * Everything here follows the paper (Nichol & Dhariwal 2021) and the official code
 * (openai/improved-diffusion). Layers:
 *
 *  1. Schedules (schedule.c). An idd_schedule holds T and every float64 array of spec
 *     section 2, indexed by a 0-based timestep t in 0..T-1, plus timestep_map (the
 *     original index of each step; the identity unless respaced).
 *     Betas come from a name ("linear", "cosine"), from an alpha_bar(u) callback, or
 *     from an array. NOTE: the official create_gaussian_diffusion() always builds a
 *     SpacedDiffusion, which re-derives betas as 1 - abar[i]/abar[i-1] even without
 *     respacing. To reproduce its arrays bit for bit, build the base schedule from the
 *     raw betas and then call idd_schedule_respace() with the steps chosen by
 *     idd_space_timesteps(T, "") (all of them) — D.new should always do this.
 *
 *  2. Respacing (respace.c): idd_space_timesteps() parses "100", "10,20,30", "ddim50"
 *     or "" (all steps); idd_schedule_respace() builds the respaced process.
 *
 *  3. Gaussian diffusion kernels (gaussian.c, losses.c). Float32 buffers in and out,
 *     all arithmetic in double (so results equal the float64 reference to about one
 *     float32 rounding). Shapes: B samples; x-like buffers are (B, C, HW) contiguous,
 *     n = C*HW elements per sample; model outputs are (B, C, HW) or (B, 2C, HW) (mean
 *     half first, then the variance half v) when the variance type is learned.
 *     t is a (B) array of int64 timesteps of THIS (possibly respaced) process; every
 *     kernel checks 0 <= t[b] < T. Per-sample results are double arrays of length B.
 *     Outputs may not alias inputs unless stated.
 *
 *  4. Timestep samplers (sampler.c): "uniform" and "loss-second-moment"; the caller
 *     supplies the uniform draws, so the engine's counter-based RNG drives them.
 *
 * Every fallible function returns idd_status and sets idd_last_error() with a message
 * naming the function and the bad argument. Nothing here allocates tensors; the only
 * allocations are the schedule and sampler structs (free with their _free function).
 */
#ifndef IDDPM_DIFFUSION_H
#define IDDPM_DIFFUSION_H

#include "iddpm/core.h"
#include "iddpm/diffusion_kernels.h"

/* ------------------------------------------------------------------ schedules */

typedef struct idd_schedule {
    int64_t T;          /* steps of this process */
    int64_t T_original; /* steps of the base process it was respaced from (== T if not) */
    /* float64 arrays of length T (spec section 2) */
    double *betas, *alphas, *alphas_cumprod, *alphas_cumprod_prev, *alphas_cumprod_next;
    double *sqrt_alphas_cumprod, *sqrt_one_minus_alphas_cumprod, *log_one_minus_alphas_cumprod;
    double *sqrt_recip_alphas_cumprod, *sqrt_recipm1_alphas_cumprod;
    double *posterior_variance;             /* exactly 0 at t=0 */
    double *posterior_log_variance_clipped; /* index 0 borrows posterior_variance[1] */
    double *posterior_mean_coef1, *posterior_mean_coef2;
    double *log_betas;                      /* ln(betas): LEARNED_RANGE upper bound */
    double *fixed_large_variance;           /* [post_var[1], betas[1], ..., betas[T-1]] */
    double *fixed_large_log_variance;       /* ln of the above */
    int64_t *timestep_map;                  /* original index of each step (length T) */
} idd_schedule;
/* With T == 1 there is no posterior_variance[1]; index 0 then uses betas[0]. */

/* Named betas into out[T]. name: "linear" (1000/T-scaled 1e-4..0.02, linspace) or
 * "cosine" (s = 0.008, max_beta 0.999). Errors: T < 1, unknown name. */
idd_status idd_betas_named(const char *name, int64_t T, double *out);

/* alpha_bar(u) for u in [0,1]; return IDD_OK and write *out, or an error status with
 * the message already set (a Lua callback that raised, for instance). */
typedef idd_status (*idd_alpha_bar_fn)(void *userdata, double u, double *out);

/* betas[i] = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) into out[T].
 * Errors: T < 1, max_beta outside (0,1], callback failure, non-finite or
 * non-positive alpha_bar, a resulting beta outside (0,1]. */
idd_status idd_betas_from_alpha_bar(int64_t T, idd_alpha_bar_fn fn, void *userdata,
                                    double max_beta, double *out);

/* Build a schedule from betas[T] (each in (0,1], finite). timestep_map = identity. */
idd_status idd_schedule_new(idd_schedule **out, const double *betas, int64_t T);
/* idd_betas_named + idd_schedule_new. */
idd_status idd_schedule_named(idd_schedule **out, const char *name, int64_t T);
void idd_schedule_free(idd_schedule *s);

/* Timesteps as the model sees them: map[t[b]] * 1000 / T_original when rescale,
 * else map[t[b]] (as float). out[B] float32, as the official wrapper passes it. */
idd_status idd_schedule_model_t(const idd_schedule *s, const int64_t *t, int64_t B,
                                int rescale, float *out);

/* ------------------------------------------------------------------ respacing */

/* Retained original indices, ascending, into out (capacity T); *n_out = their count.
 * spec: "" (all T steps), "N", "a,b,c" (sections), "ddimN" (smallest stride i in
 * 1..T-1 with ceil(T/i) == N). Errors: T < 1, unparseable spec, a section asked for
 * more steps than it has, no ddim stride, zero steps in total. */
idd_status idd_space_timesteps(int64_t T, const char *spec, int64_t *out, int64_t *n_out);

/* The respaced process keeping base steps use[0..n-1] (strictly ascending, in
 * [0, base->T)): new_beta = 1 - abar[i]/last_abar. timestep_map composes with the
 * base's map; T_original = base->T_original. */
idd_status idd_schedule_respace(idd_schedule **out, const idd_schedule *base,
                                const int64_t *use, int64_t n);
/* idd_space_timesteps + idd_schedule_respace. */
idd_status idd_schedule_respace_str(idd_schedule **out, const idd_schedule *base,
                                    const char *spec);

/* ------------------------------------------------------------------ model config */

/* idd_mean_type, idd_var_type, idd_loss_type: iddpm/diffusion_kernels.h (the kernels read them too) */

typedef struct {
    idd_mean_type mean_type;
    idd_var_type var_type;
    idd_loss_type loss_type;
} idd_diffusion_cfg;

/* Names as in the official enums, case-insensitive ("epsilon", "learned_range",
 * "rescaled_mse", ...); -1 if unknown. */
int idd_mean_type_from_name(const char *name);
int idd_var_type_from_name(const char *name);
int idd_loss_type_from_name(const char *name);
const char *idd_mean_type_name(idd_mean_type m);
const char *idd_var_type_name(idd_var_type v);
const char *idd_loss_type_name(idd_loss_type l);
/* The official flag mapping of create_gaussian_diffusion(). */
idd_diffusion_cfg idd_diffusion_cfg_from_flags(int learn_sigma, int sigma_small, int use_kl,
                                               int predict_xstart, int rescale_learned_sigmas);
/* 1 when the model outputs 2C channels (LEARNED, LEARNED_RANGE). */
int idd_var_is_learned(idd_var_type v);
/* Check every t[b] is in [0, s->T); names `fn` in the message. */
idd_status idd_check_timesteps(const idd_schedule *s, const int64_t *t, int64_t B, const char *fn);

/* ------------------------------------------------------------------ forward process */

/* out = sqrt_abar[t]*x0 + sqrt_1m_abar[t]*noise */
idd_status idd_q_sample(const idd_schedule *s, const float *x0, const float *noise,
                        const int64_t *t, int64_t B, int64_t n, float *out);
/* q(x_t | x0): mean (B,n); variance, log_variance per sample (B), either may be NULL */
idd_status idd_q_mean_variance(const idd_schedule *s, const float *x0, const int64_t *t,
                               int64_t B, int64_t n, float *mean, double *variance,
                               double *log_variance);
/* q(x_{t-1} | x_t, x0): mean (B,n); variance, log_variance_clipped (B), may be NULL */
idd_status idd_q_posterior_mean_variance(const idd_schedule *s, const float *x0,
                                         const float *xt, const int64_t *t, int64_t B,
                                         int64_t n, float *mean, double *variance,
                                         double *log_variance);

/* Inversions (spec section 2), out (B,n) */
idd_status idd_predict_xstart_from_eps(const idd_schedule *s, const float *xt, const float *eps,
                                       const int64_t *t, int64_t B, int64_t n, float *out);
idd_status idd_predict_eps_from_xstart(const idd_schedule *s, const float *xt, const float *x0,
                                       const int64_t *t, int64_t B, int64_t n, float *out);

/* ------------------------------------------------------------------ reverse process */

/* p_mean_variance, in two halves so that a Lua denoised_fn can run in between:
 *
 *   idd_p_pred_xstart_raw: pred_xstart BEFORE processing, (B, C, HW):
 *       EPSILON: sqrt_recip_abar*xt - sqrt_recipm1_abar*eps; START_X: the output;
 *       PREVIOUS_X: (out - coef2*xt)/coef1.
 *   -- caller applies denoised_fn(pred_xstart) here if it has one --
 *   idd_p_finish: clamps pred_xstart to [-1,1] in place when clip, then writes the
 *       model mean (posterior mean of the processed pred_xstart and xt; for
 *       PREVIOUS_X the model output itself), and variance / log_variance (B,C,HW)
 *       from the variance type. Any of mean/variance/log_variance may be NULL.
 *
 * idd_p_mean_variance does both (no denoised_fn). pred_xstart must be given. */
idd_status idd_p_pred_xstart_raw(const idd_schedule *s, idd_diffusion_cfg cfg,
                                 const float *model_out, const float *xt, const int64_t *t,
                                 int64_t B, int64_t C, int64_t HW, float *pred_xstart);
idd_status idd_p_finish(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                        const float *xt, const int64_t *t, int64_t B, int64_t C, int64_t HW,
                        int clip, float *pred_xstart, float *mean, float *variance,
                        float *log_variance);
idd_status idd_p_mean_variance(const idd_schedule *s, idd_diffusion_cfg cfg,
                               const float *model_out, const float *xt, const int64_t *t,
                               int64_t B, int64_t C, int64_t HW, int clip, float *mean,
                               float *variance, float *log_variance, float *pred_xstart);

/* x_{t-1} = mean + [t != 0] * exp(0.5*log_variance) * noise, (B,n); noise may be
 * NULL only if every t is 0. */
idd_status idd_p_sample_step(const float *mean, const float *log_variance, const float *noise,
                             const int64_t *t, int64_t B, int64_t n, float *out);
/* p_mean_variance + p_sample_step. pred_xstart (B,C,HW) is required (it is written). */
idd_status idd_p_sample(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                        const float *xt, const float *noise, const int64_t *t, int64_t B,
                        int64_t C, int64_t HW, int clip, float *out, float *pred_xstart);

/* DDIM from an already processed pred_xstart (spec 7.3). noise may be NULL if eta == 0.
 * Errors: eta < 0. */
idd_status idd_ddim_step(const idd_schedule *s, const float *xt, const float *pred_xstart,
                         const float *noise, const int64_t *t, double eta, int64_t B,
                         int64_t n, float *out);
/* Reverse ODE step x_t -> x_{t+1}; errors unless eta == 0. */
idd_status idd_ddim_reverse_step(const idd_schedule *s, const float *xt, const float *pred_xstart,
                                 const int64_t *t, double eta, int64_t B, int64_t n, float *out);
/* p_mean_variance (learned variance ignored) + ddim_step; pred_xstart (B,C,HW) is
 * required (it is written). */
idd_status idd_ddim_sample(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                           const float *xt, const float *noise, const int64_t *t, double eta,
                           int64_t B, int64_t C, int64_t HW, int clip, float *out,
                           float *pred_xstart);
idd_status idd_ddim_reverse_sample(const idd_schedule *s, idd_diffusion_cfg cfg,
                                   const float *model_out, const float *xt, const int64_t *t,
                                   double eta, int64_t B, int64_t C, int64_t HW, int clip,
                                   float *out, float *pred_xstart);

/* ------------------------------------------------------------------ losses (losses.c) */

/* Scalar kernels in double. */
double idd_normal_kl1(double mean1, double logvar1, double mean2, double logvar2);
double idd_approx_std_normal_cdf(double x);
/* log-likelihood of x (in [-1,1], 8-bit bins) under the discretised Gaussian, nats */
double idd_dgll1(double x, double mean, double log_scale);
/* d(dgll1)/d(mean) and d(dgll1)/d(log_scale) */
void idd_dgll1_grad(double x, double mean, double log_scale, double *d_mean, double *d_log_scale);

/* Elementwise over n; each input has its own stride (1 = array, 0 = broadcast scalar
 * from element 0). out is float32 [n]. */
idd_status idd_normal_kl(int64_t n, const float *mean1, int64_t s1, const float *logvar1,
                         int64_t s2, const float *mean2, int64_t s3, const float *logvar2,
                         int64_t s4, float *out);
idd_status idd_discretized_gaussian_log_likelihood(int64_t n, const float *x, int64_t sx,
                                                   const float *means, int64_t sm,
                                                   const float *log_scales, int64_t sl,
                                                   float *out);

/* The per-sample VLB term in bits/dim (official _vb_terms_bpd): KL(q posterior || p)
 * for t > 0, decoder NLL for t == 0, each mean-flattened and divided by ln 2.
 * vb[B]; pred_xstart (B,C,HW) may be NULL. */
idd_status idd_vb_terms_bpd(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                            const float *x0, const float *xt, const int64_t *t, int64_t B,
                            int64_t C, int64_t HW, int clip, double *vb, float *pred_xstart);
/* dmodel_out += sum_b dvb[b] * d vb[b] / d model_out. dmodel_out has the model output's
 * shape. skip_mean: no gradient to the mean half (the stop-gradient of the hybrid loss).
 * With clip, the clamp passes gradient where -1 <= pred_xstart <= 1 (as torch.clamp). */
idd_status idd_vb_terms_bpd_backward(const idd_schedule *s, idd_diffusion_cfg cfg,
                                     const float *model_out, const float *x0, const float *xt,
                                     const int64_t *t, int64_t B, int64_t C, int64_t HW,
                                     int clip, int skip_mean, const double *dvb,
                                     float *dmodel_out);

/* mse[b] = mean over (C,HW) of (target - model_out[:, :C])^2 where target is noise
 * (EPSILON), x0 (START_X) or the posterior mean of (x0, xt) (PREVIOUS_X). */
idd_status idd_mse_term(const idd_schedule *s, idd_diffusion_cfg cfg, const float *model_out,
                        const float *x0, const float *xt, const float *noise, const int64_t *t,
                        int64_t B, int64_t C, int64_t HW, double *mse);
/* dmodel_out[:, :C] += dmse[b] * 2 (out - target) / n */
idd_status idd_mse_term_backward(const idd_schedule *s, idd_diffusion_cfg cfg,
                                 const float *model_out, const float *x0, const float *xt,
                                 const float *noise, const int64_t *t, int64_t B, int64_t C,
                                 int64_t HW, const double *dmse, float *dmodel_out);

/* Official training_losses, given x_t = q_sample(x0, t, noise) and the model output on
 * (x_t, model_t). Per sample (B):
 *   KL:           loss = vb = L_t                   mse = 0 (not computed)
 *   RESCALED_KL:  loss = vb = T * L_t               mse = 0
 *   MSE:          mse; vb = L_t with mean half frozen (learned sigma only, else 0);
 *                 loss = mse + vb
 *   RESCALED_MSE: as MSE with vb = (T/1000) * L_t   (T of this process)
 * clip_denoised is False as in the official code. mse and vb may be NULL. */
idd_status idd_training_losses(const idd_schedule *s, idd_diffusion_cfg cfg,
                               const float *model_out, const float *x0, const float *xt,
                               const float *noise, const int64_t *t, int64_t B, int64_t C,
                               int64_t HW, double *loss, double *mse, double *vb);
/* dmodel_out += sum_b dloss[b] * d loss[b] / d model_out, with the official stop-gradient:
 * in MSE types the vb part reaches only the variance half. */
idd_status idd_training_losses_backward(const idd_schedule *s, idd_diffusion_cfg cfg,
                                        const float *model_out, const float *x0, const float *xt,
                                        const float *noise, const int64_t *t, int64_t B,
                                        int64_t C, int64_t HW, const double *dloss,
                                        float *dmodel_out);

/* prior_bpd[b] = mean_flat(KL(q(x_{T-1}|x0) || N(0,1))) / ln 2 */
idd_status idd_prior_bpd(const idd_schedule *s, const float *x0, int64_t B, int64_t n,
                         double *prior_bpd);
/* per-sample mean over n of (a - b)^2, in double (calc_bpd_loop's mse columns) */
idd_status idd_mean_flat_sq_diff(const float *a, const float *b, int64_t B, int64_t n,
                                 double *out);

/* ------------------------------------------------------------------ timestep samplers */

typedef struct idd_timestep_sampler idd_timestep_sampler;

#define IDD_LSM_HISTORY 10        /* history_per_term */
#define IDD_LSM_UNIFORM_PROB 0.001

/* name: "uniform" or "loss-second-moment". Errors: T < 1, unknown name. */
idd_status idd_sampler_new(idd_timestep_sampler **out, const char *name, int64_t T);
void idd_sampler_free(idd_timestep_sampler *sp);
const char *idd_sampler_name(const idd_timestep_sampler *sp);
int64_t idd_sampler_T(const idd_timestep_sampler *sp);
/* Unnormalised weights w[T] (ones for uniform and during warm-up). */
idd_status idd_sampler_weights(const idd_timestep_sampler *sp, double *w);
/* Draw B timesteps from p = w/sum(w) by inverse CDF of the uniforms u[B] in [0,1)
 * (numpy's choice rule: t = #{k : cdf[k] <= u}); weights[b] = 1/(T p[t[b]]).
 * weights may be NULL. */
idd_status idd_sampler_sample(const idd_timestep_sampler *sp, int64_t B, const double *u,
                              int64_t *t, double *weights);
/* Same with a callback producing one uniform per call (returns IDD_OK or an error). */
typedef idd_status (*idd_uniform_fn)(void *userdata, double *u);
idd_status idd_sampler_sample_cb(const idd_timestep_sampler *sp, int64_t B, idd_uniform_fn fn,
                                 void *userdata, int64_t *t, double *weights);
/* Record raw per-sample losses (before weighting). No-op for "uniform". */
idd_status idd_sampler_update(idd_timestep_sampler *sp, const int64_t *t, const double *losses,
                              int64_t n);
/* 1 when every t has IDD_LSM_HISTORY entries (always 1 for uniform). */
int idd_sampler_warmed_up(const idd_timestep_sampler *sp);
/* State for checkpoints: history[T*IDD_LSM_HISTORY] (row t holds its entries, oldest
 * first) and counts[T]. Both NULL-safe; set validates counts in [0, 10]. */
idd_status idd_sampler_get_state(const idd_timestep_sampler *sp, double *history, int64_t *counts);
idd_status idd_sampler_set_state(idd_timestep_sampler *sp, const double *history,
                                 const int64_t *counts);

#endif
