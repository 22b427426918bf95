/* ops_common.h — helpers shared by the tensor-level diffusion ops (ops.c: forward
 * process, reverse process, training loss; ops_eval.c: the evaluation terms): argument
 * checks whose messages name the op and the shapes, conversion of inputs to contiguous
 * float32 buffers on the CPU or on a device, and the device coefficient table. Internal
 * to engine/diffusion. */
#ifndef IDDPM_DIFFUSION_OPS_COMMON_H
#define IDDPM_DIFFUSION_OPS_COMMON_H

#include "iddpm/backend.h"
#include "iddpm/diffusion_ops.h"

/* a contiguous float32 CPU version of x (a new reference), or NULL with a message */
idd_tensor *idd_dops_prep(idd_tensor *x, const char *op, const char *arg);
/* contiguous float32 on dev (a new reference) */
idd_tensor *idd_dops_prep_dev(idd_tensor *x, idd_device dev, const char *op, const char *arg);
/* t: int64 (B), contiguous CPU, every value in [0, T). A new reference. */
idd_tensor *idd_dops_prep_t(idd_diffusion *d, idd_tensor *t, int64_t B, const char *op);
idd_status idd_dops_need_batch(const idd_tensor *x, const char *op, const char *arg);
idd_status idd_dops_same_shape(const idd_tensor *a, const idd_tensor *b, const char *op, const char *an,
                               const char *bn);
/* model_out must be x_t's shape, or with 2C channels when the variance is learned */
idd_status idd_dops_check_model_out(idd_diffusion *d, const idd_tensor *mo, const idd_tensor *xt, const char *op);
/* the (IDD_DK_NCOEF, B) table of schedule values at t on dev; t checked on the host */
idd_tensor *idd_dops_coef_table(idd_diffusion *d, idd_tensor *t, int64_t B, idd_device dev, const char *op);
/* the kernel argument block (types from the diffusion's config; clip, cols, eta zero) */
void idd_dops_dk_args(idd_diffusion *d, idd_diff_args *a, int64_t B, int64_t C, int64_t HW, idd_tensor *coef);

/* B, C, HW of an x-like tensor (dim 0, dim 1, the rest) */
static inline void geom(const idd_tensor *x, int64_t *B, int64_t *C, int64_t *HW) {
    *B = x->ndim >= 1 ? x->shape[0] : 1;
    *C = x->ndim >= 2 ? x->shape[1] : 1;
    int64_t hw = 1;
    for (int i = 2; i < x->ndim; i++) hw *= x->shape[i];
    *HW = hw;
}

static inline idd_tensor *new_like(const idd_tensor *x) { return idd_tensor_new(IDD_F32, IDD_CPU, x->ndim, x->shape); }
static inline idd_tensor *new_b(int64_t B) { return idd_tensor_new(IDD_F32, IDD_CPU, 1, &B); }
static inline idd_tensor *new_dev(idd_device dev, int ndim, const int64_t *shape) {
    return idd_tensor_new(IDD_F32, dev, ndim, shape);
}
static inline float *F(idd_tensor *t) { return t ? (float *)idd_data(t) : NULL; }
static inline const int64_t *I(idd_tensor *t) { return (const int64_t *)idd_data(t); }
static inline void drop(int n, idd_tensor **ts) {
    for (int i = 0; i < n; i++) { idd_tensor_release(ts[i]); ts[i] = NULL; }
}
/* a CPU result moved to dev (the CPU reference released) */
static inline idd_tensor *home(idd_tensor *o, idd_device dev) {
    if (!o || o->device == dev) return o;
    idd_tensor *r = idd_to_device(o, dev);
    idd_tensor_release(o);
    return r;
}

#endif
