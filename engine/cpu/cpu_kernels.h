/* cpu_kernels.h — the CPU backend's entries for the diffusion kernels
 * (engine/cpu/diffusion.c) and the optimizer kernels (engine/cpu/optim.c), declared
 * once for backend.c. */
#ifndef IDDPM_CPU_KERNELS_H
#define IDDPM_CPU_KERNELS_H

#include "iddpm/backend.h"

idd_status idd_cpu_upload_async(void *dst, const void *src, size_t n);
idd_status idd_cpu_diff_pointwise(int op, const idd_diff_args *a, float *out, const float *x, const float *y,
                                  const float *z);
idd_status idd_cpu_diff_p_finish(const idd_diff_args *a, const float *mo, const float *xt, float *px, float *mean,
                                 float *var, float *logvar);
idd_status idd_cpu_diff_losses(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                               const float *noise, float *loss, float *mse, float *vb);
idd_status idd_cpu_diff_losses_backward(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                                        const float *noise, const float *dloss, float *dmo);
idd_status idd_cpu_adamw(int n, float *const *p, const float *const *g, float *const *m, float *const *v,
                         const int64_t *numel, const float hp[6]);
idd_status idd_cpu_ema(int n, float *const *e, const float *const *p, const int64_t *numel, double rate);
idd_status idd_cpu_sumsq(int n, const float *const *g, const int64_t *numel, double *out);
idd_status idd_cpu_scale(int n, float *const *g, const int64_t *numel, double s);

#endif
