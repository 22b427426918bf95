/* ops_internal.h — what the layer ops of engine/ops share: contiguous float32 and
 * channels-last bf16 views of their inputs, the conversion of a result back to an
 * input's dtype and layout, and the two dispatch questions every layer op asks its
 * backend (backend.h: idd_kernel families, supports()):
 *   op_backend   is there a kernel of this family at all? (else "op: not implemented on dev")
 *   takes_bf16   the one bf16 rule: a bf16 input runs the backend's bf16 kernel when the
 *                backend supports the family in bf16 and the op's layout condition holds;
 *                otherwise the op computes in float32 (cf32) and converts every result
 *                back to the input's dtype and layout (as_layout_of).
 * Static inline, for the files of this folder only. */
#ifndef IDDPM_OPS_INTERNAL_H
#define IDDPM_OPS_INTERNAL_H

#include "iddpm/backend.h"
#include "iddpm/nn.h"

#include <stdint.h>

/* contiguous float32 copy-or-reference of t (NULL stays NULL) */
static inline idd_tensor *cf32(idd_tensor *t) {
    if (!t) return NULL;
    if (t->dtype == IDD_F32) return idd_contiguous(t);
    return idd_to_dtype(t, IDD_F32);
}

static inline float *fp(idd_tensor *t) { return t ? (float *)idd_data(t) : NULL; }

static inline idd_tensor *zeros_like_shape(idd_tensor *t) {
    return t ? idd_tensor_zeros(IDD_F32, t->device, t->ndim, t->shape) : NULL;
}

/* t's memory is (N, HW, C): channels-last, or contiguous where C or HW is 1 */
static inline bool nhwc_dense(const idd_tensor *t) {
    if (idd_is_channels_last(t)) return true;
    if (t->ndim < 2 || !idd_is_contiguous(t)) return false;
    return t->shape[1] == 1 || idd_numel(t) == t->shape[0] * t->shape[1];
}

static inline bool aligned16(const idd_tensor *t) { return ((uintptr_t)idd_data(t) & 15) == 0; }

/* bf16 (N, HW, C) memory, 16-byte aligned: t itself (retained) or a channels-last copy;
 * the layout of the backends' bf16 layer kernels (NULL stays NULL) */
static inline idd_tensor *cl_bf16(idd_tensor *t) {
    if (!t) return NULL;
    if (t->dtype == IDD_BF16 && nhwc_dense(t) && aligned16(t)) { idd_tensor_retain(t); return t; }
    idd_tensor *c = idd_tensor_new_channels_last(IDD_BF16, t->device, t->ndim, t->shape);
    if (c && idd_copy_(c, t) != IDD_OK) { idd_tensor_release(c); return NULL; }
    return c;
}

/* r (a result or gradient of an op on `like`, r's own shape) in like's dtype and layout
 * (channels-last if like is, else contiguous): r itself when it already is, else a
 * converted copy; r is consumed. A float32 like returns r (the float32 paths). */
static inline idd_tensor *as_layout_of(idd_tensor *r, const idd_tensor *like) {
    if (!r || like->dtype == IDD_F32) return r;
    bool cl = idd_is_channels_last(like);
    if (r->dtype == like->dtype && (cl ? nhwc_dense(r) : idd_is_contiguous(r))) return r;
    idd_tensor *c = cl ? idd_tensor_new_channels_last(like->dtype, r->device, r->ndim, r->shape)
                       : idd_tensor_new(like->dtype, r->device, r->ndim, r->shape);
    if (c && idd_copy_(c, r) != IDD_OK) { idd_tensor_release(c); c = NULL; }
    idd_tensor_release(r);
    return c;
}

/* x's backend when it supports family k in float32 (every bf16 fallback computes in float32), else NULL
 * and "op: not implemented on <device>" */
static inline const idd_backend *op_backend(const idd_tensor *x, idd_kernel k, const char *op) {
    const idd_backend *be = idd_backend_of(x);
    if (idd_backend_supports(be, k, IDD_F32)) return be;
    idd_error("%s: not implemented on %s", op, idd_device_name(x->device));
    return NULL;
}

/* the bf16 rule: x is bf16, its backend has family k in bf16 and the op's layout condition
 * `fits` holds (channel counts, padding). False: float32 kernels, results converted back. */
static inline bool takes_bf16(const idd_tensor *x, idd_kernel k, bool fits) {
    return x->dtype == IDD_BF16 && fits && idd_backend_supports(idd_backend_of(x), k, IDD_BF16);
}

#endif
