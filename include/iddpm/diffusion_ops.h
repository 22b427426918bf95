/* iddpm/diffusion_ops.h — the diffusion kernels of diffusion.h at the tensor level.
 *
 * An idd_diffusion is a refcounted schedule plus the model configuration (mean type,
 * variance type, loss type, rescale_timesteps); tape nodes retain it, so a backward
 * may run after the Lua object that made it is gone.
 *
 * Every function below takes idd_tensor* inputs, checks them and names the op and the
 * shapes in its error ("diffusion.q_sample: noise (2,3,8,8) does not match x_start
 * (2,3,4,4)"), converts them to contiguous float32 on the CPU, runs the kernel and
 * returns new tensors (refcount 1), or NULL / IDD_ERR with idd_last_error() set.
 *
 * Shapes: x-like tensors are (B, C, ...) (B = dim 0, C = dim 1, the rest flattened);
 * a 1-D x is (B) with C = 1. t is an int64 tensor of shape (B) holding 0-based
 * timesteps of this (possibly respaced) process. A model output is (B, C, ...) or
 * (B, 2C, ...) when the variance is learned.
 *
 * Gradients: idd_diff_training_losses records a node on the model output (the
 * official stop-gradient is inside the kernel backward); idd_diff_q_sample records
 * one on x_start and noise. Everything else is for sampling and evaluation and
 * records nothing. */
#ifndef IDDPM_DIFFUSION_OPS_H
#define IDDPM_DIFFUSION_OPS_H

#include "iddpm/diffusion.h"
#include "iddpm/tensor.h"

typedef struct idd_diffusion {
    int refcount;
    idd_schedule *s;           /* owned */
    idd_diffusion_cfg cfg;
    int rescale_timesteps;
} idd_diffusion;

/* Takes ownership of s (freed with the last release, or at once on failure). */
idd_diffusion *idd_diffusion_new(idd_schedule *s, idd_diffusion_cfg cfg, int rescale_timesteps);
void idd_diffusion_retain(idd_diffusion *d);
void idd_diffusion_release(idd_diffusion *d);  /* NULL-safe */

/* t (B) int64 -> (B) float32 timesteps as the model sees them */
idd_tensor *idd_diff_model_t(idd_diffusion *d, idd_tensor *t);

/* x_t = sqrt_abar[t] x0 + sqrt(1-abar[t]) noise (differentiable in x0 and noise) */
idd_tensor *idd_diff_q_sample(idd_diffusion *d, idd_tensor *x0, idd_tensor *t, idd_tensor *noise);
/* q(x_t | x0): mean, variance, log_variance (variance tensors have x0's shape) */
idd_status idd_diff_q_mean_variance(idd_diffusion *d, idd_tensor *x0, idd_tensor *t,
                                    idd_tensor **mean, idd_tensor **var, idd_tensor **logvar);
/* q(x_{t-1} | x_t, x0): mean, variance, log_variance_clipped (all x0's shape) */
idd_status idd_diff_q_posterior(idd_diffusion *d, idd_tensor *x0, idd_tensor *xt, idd_tensor *t,
                                idd_tensor **mean, idd_tensor **var, idd_tensor **logvar);
idd_tensor *idd_diff_predict_xstart_from_eps(idd_diffusion *d, idd_tensor *xt, idd_tensor *t,
                                             idd_tensor *eps);
idd_tensor *idd_diff_predict_eps_from_xstart(idd_diffusion *d, idd_tensor *xt, idd_tensor *t,
                                             idd_tensor *x0);

/* pred_xstart before clipping / denoised_fn (x_t's shape) */
idd_tensor *idd_diff_pred_xstart_raw(idd_diffusion *d, idd_tensor *model_out, idd_tensor *xt,
                                     idd_tensor *t);
/* From a (processed) pred_xstart: clamps a copy when clip, then mean, variance,
 * log_variance (x_t's shape); *pred_out is the clamped copy. Any output may be NULL. */
idd_status idd_diff_p_finish(idd_diffusion *d, idd_tensor *model_out, idd_tensor *xt,
                             idd_tensor *t, idd_tensor *pred_xstart, int clip,
                             idd_tensor **mean, idd_tensor **var, idd_tensor **logvar,
                             idd_tensor **pred_out);
/* mean + [t != 0] exp(0.5 logvar) noise; noise may be NULL when every t is 0 */
idd_tensor *idd_diff_p_sample_step(idd_diffusion *d, idd_tensor *mean, idd_tensor *logvar,
                                   idd_tensor *noise, idd_tensor *t);
/* DDIM update from a processed pred_xstart; noise may be NULL when eta == 0 */
idd_tensor *idd_diff_ddim_step(idd_diffusion *d, idd_tensor *xt, idd_tensor *pred_xstart,
                               idd_tensor *noise, idd_tensor *t, double eta);
idd_tensor *idd_diff_ddim_reverse_step(idd_diffusion *d, idd_tensor *xt, idd_tensor *pred_xstart,
                                       idd_tensor *t, double eta);

/* training losses per example, float32 (B): loss differentiable w.r.t. model_out;
 * mse and vb (may be NULL) carry no gradient. */
idd_status idd_diff_training_losses(idd_diffusion *d, idd_tensor *model_out, idd_tensor *x0,
                                    idd_tensor *xt, idd_tensor *noise, idd_tensor *t,
                                    idd_tensor **loss, idd_tensor **mse, idd_tensor **vb);
/* _vb_terms_bpd: vb (B) float32 in bits/dim; pred_xstart (x_t's shape) may be NULL */
idd_status idd_diff_vb_terms_bpd(idd_diffusion *d, idd_tensor *model_out, idd_tensor *x0,
                                 idd_tensor *xt, idd_tensor *t, int clip, idd_tensor **vb,
                                 idd_tensor **pred_xstart);
/* (B) float32 */
idd_tensor *idd_diff_prior_bpd(idd_diffusion *d, idd_tensor *x0);
idd_tensor *idd_diff_mean_flat_sq_diff(idd_tensor *a, idd_tensor *b);

/* Elementwise; each argument a tensor of the common shape or a 1-element tensor. */
idd_tensor *idd_diff_normal_kl(idd_tensor *m1, idd_tensor *lv1, idd_tensor *m2, idd_tensor *lv2);
idd_tensor *idd_diff_dgll(idd_tensor *x, idd_tensor *means, idd_tensor *log_scales);

#endif
