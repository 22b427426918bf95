/* diffusion.c — the CPU backend's entries for the device-side diffusion and
 * optimizer kernels (backend.h). The CPU device itself never reaches them (ops.c and
 * optim.c keep their own host paths); they serve a device whose backend is the CPU's
 * (IDDPM_FAKE_CUDA=1), so that the device plumbing is exercised without a GPU. The
 * arithmetic is diffusion_kernels.h, shared with engine/cuda/diffusion.cu. */
#include "iddpm/backend.h"

#include <math.h>
#include <string.h>

#include "cpu_kernels.h"

idd_status idd_cpu_upload_async(void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n);
    return IDD_OK;
}

idd_status idd_cpu_diff_pointwise(int op, const idd_diff_args *a, float *out, const float *x, const float *y,
                                  const float *z) {
    int64_t n = a->C * a->HW;
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t i = 0; i < n; i++) out[b * n + i] = idd_dk_pointwise(op, a, b, i, x, y, z);
    return IDD_OK;
}

idd_status idd_cpu_diff_p_finish(const idd_diff_args *a, const float *mo, const float *xt, float *px, float *mean,
                                 float *var, float *logvar) {
    int64_t n = a->C * a->HW;
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t i = 0; i < n; i++) idd_dk_p_finish(a, b, i, mo, xt, px, mean, var, logvar);
    return IDD_OK;
}

idd_status idd_cpu_diff_losses(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                               const float *noise, float *loss, float *mse, float *vb) {
    int64_t n = a->C * a->HW, cout = a->learned ? 2 * n : n;
    for (int64_t b = 0; b < a->B; b++) {
        double sm = 0, sv = 0;
        for (int64_t i = 0; i < n; i++)
            idd_dk_loss_elem(a, b, i, mo + b * cout, x0 + b * n, xt + b * n, noise + b * n, &sm, &sv);
        idd_dk_loss_finish(a, sm, sv, loss + b, mse + b, vb + b);
    }
    return IDD_OK;
}

idd_status idd_cpu_diff_losses_backward(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                                        const float *noise, const float *dloss, float *dmo) {
    int64_t n = a->C * a->HW, cout = a->learned ? 2 * n : n;
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t i = 0; i < n; i++)
            idd_dk_loss_grad(a, b, i, mo + b * cout, x0 + b * n, xt + b * n, noise + b * n, dloss[b], dmo + b * cout);
    return IDD_OK;
}

idd_status idd_cpu_adamw(int n, float *const *p, const float *const *g, float *const *m, float *const *v,
                         const int64_t *numel, const float hp[6]) {
    float b1 = hp[0], b2 = hp[1], eps = hp[2], decay = hp[3], step_size = hp[4], rbc2 = hp[5];
    for (int t = 0; t < n; t++)
        for (int64_t j = 0; j < numel[t]; j++) {
            float gj = g[t][j];
            float mj = b1 * m[t][j] + (1 - b1) * gj;
            float vj = b2 * v[t][j] + (1 - b2) * gj * gj;
            m[t][j] = mj;
            v[t][j] = vj;
            p[t][j] = p[t][j] * decay - step_size * mj / (sqrtf(vj) * rbc2 + eps);
        }
    return IDD_OK;
}

idd_status idd_cpu_ema(int n, float *const *e, const float *const *p, const int64_t *numel, float rate) {
    float q = 1.0f - rate;
    for (int t = 0; t < n; t++)
        for (int64_t j = 0; j < numel[t]; j++) e[t][j] = rate * e[t][j] + q * p[t][j];
    return IDD_OK;
}

idd_status idd_cpu_sumsq(int n, const float *const *g, const int64_t *numel, double *out) {
    double s = 0;
    for (int t = 0; t < n; t++)
        for (int64_t j = 0; j < numel[t]; j++) s += (double)g[t][j] * g[t][j];
    *out = s;
    return IDD_OK;
}

idd_status idd_cpu_scale(int n, float *const *g, const int64_t *numel, float s) {
    for (int t = 0; t < n; t++)
        for (int64_t j = 0; j < numel[t]; j++) g[t][j] = g[t][j] * s;
    return IDD_OK;
}
