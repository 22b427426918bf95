/* diffusion.c — the CPU backend's diffusion kernels (backend.h: diff_pointwise,
 * diff_p_finish, diff_losses, diff_losses_backward), which engine/diffusion/ops.c and
 * ops_eval.c reach on every device; and upload_async (a plain copy on the CPU). The
 * per-element arithmetic is diffusion_kernels.h, the same that
 * engine/cuda/diffusion.cu compiles. */
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
