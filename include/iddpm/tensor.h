/* iddpm/tensor.h — the tensor: one struct, refcounted storage, views.
 *
 * Shapes are outermost-first (NCHW, as in PyTorch); strides are in elements; a view
 * (reshape of a contiguous tensor, narrow, permute, expand) shares its base's storage.
 * Every tensor names its device; memory is owned by that device's backend
 * (backend.h). Tensors are refcounted: idd_tensor_retain / idd_tensor_release.
 * Dims passed to engine functions are 0-based; negative dims count from the end.
 * Lua converts its 1-based dims in lua/ only. */
#ifndef IDDPM_TENSOR_H
#define IDDPM_TENSOR_H

#include <stdbool.h>
#include "iddpm/core.h"

typedef struct idd_storage {
    int refcount;
    idd_device device;
    void *data;
    size_t nbytes;
    uint64_t version;   /* bumped by every in-place write (fill_, copy_, optimizer steps): backward
                           checks that what a node saved was not overwritten since */
} idd_storage;

struct idd_node;

typedef struct idd_tensor {
    int refcount;
    int ndim;
    int64_t shape[IDD_MAX_DIMS];
    int64_t stride[IDD_MAX_DIMS];
    int64_t offset;                 /* in elements */
    idd_dtype dtype;
    idd_device device;
    idd_storage *storage;
    bool requires_grad;             /* leaf flag, or "some input needed grad" */
    struct idd_tensor *grad;        /* accumulated gradient (leaves), or NULL */
    struct idd_node *grad_fn;       /* the tape node that made it, NULL for leaves */
} idd_tensor;

/* ---- creation (new tensors are contiguous, refcount 1) ---- */
idd_tensor *idd_tensor_new(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape);
idd_tensor *idd_tensor_zeros(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape);
idd_tensor *idd_tensor_like(const idd_tensor *t);         /* same dtype/device/shape, uninit */
idd_tensor *idd_tensor_zeros_like(const idd_tensor *t);
/* channels-last (N,C,H,W) / (N,C,L): strides (HWC,1,WC,C) / (LC,1,C), i.e. NHWC memory
 * with the NCHW logical shape (the GPU's bf16 activation layout); other ndims: contiguous */
idd_tensor *idd_tensor_new_channels_last(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape);
bool idd_is_channels_last(const idd_tensor *t);
/* uninitialised, t's shape and device, dtype dt; channels-last if t is, else contiguous */
idd_tensor *idd_tensor_empty_like(const idd_tensor *t, idd_dtype dt);
idd_tensor *idd_tensor_from_data(idd_dtype dt, int ndim, const int64_t *shape,
                                 const void *host_data);    /* copies; CPU */
idd_tensor *idd_tensor_scalar(idd_dtype dt, double v);      /* 0-d CPU tensor */
void idd_tensor_retain(idd_tensor *t);
void idd_tensor_release(idd_tensor *t);                      /* NULL-safe */

/* ---- facts ---- */
int64_t idd_numel(const idd_tensor *t);
/* the largest tensor, in elements and in bytes: 2^48 (no product of a checked shape overflows) */
#define IDD_MAX_BYTES ((int64_t)1 << 48)
/* does a shape of elements of elsize bytes fit under IDD_MAX_BYTES? if not sets an error naming op */
bool idd_shape_fits(int ndim, const int64_t *shape, size_t elsize, const char *op);
bool idd_is_contiguous(const idd_tensor *t);
bool idd_same_shape(const idd_tensor *a, const idd_tensor *b);
void *idd_data(const idd_tensor *t);          /* pointer to element 0 (storage + offset) */
/* "(2,3,8,8)" into buf; returns buf */
char *idd_shape_str(const idd_tensor *t, char *buf, size_t n);
char *idd_shape_str_n(int ndim, const int64_t *shape, char *buf, size_t n);
int idd_norm_dim(const idd_tensor *t, int dim, const char *op, idd_status *st);
size_t idd_live_bytes(void);                  /* total bytes held by live storages */

/* ---- views (share storage; no autograd here — see ops.h for differentiable ones) ---- */
/* a view whenever the strides allow (channels-last (N,C,H,W) -> (N,C,H*W) or (N,C,H*W,1)); NULL if not */
idd_tensor *idd_view_reshape(idd_tensor *t, int ndim, const int64_t *shape);
idd_tensor *idd_view_narrow(idd_tensor *t, int dim, int64_t start, int64_t len);
idd_tensor *idd_view_permute(idd_tensor *t, const int *perm);
idd_tensor *idd_view_expand(idd_tensor *t, int ndim, const int64_t *shape);
idd_tensor *idd_view_alias(idd_tensor *t);    /* same view, new header (detach) */

/* ---- data movement (through the backend) ---- */
idd_status idd_copy_(idd_tensor *dst, const idd_tensor *src);  /* any strides/dtypes, same shape (or broadcastable) */
idd_status idd_fill_(idd_tensor *t, double v);
/* an in-place write into t's storage (backward then refuses nodes that kept it before) */
static inline void idd_bump_version(idd_tensor *t) { if (t && t->storage) t->storage->version++; }
idd_tensor *idd_contiguous(idd_tensor *t);      /* retained t itself if already contiguous */
idd_tensor *idd_to_dtype(idd_tensor *t, idd_dtype dt);      /* contiguous result */
idd_tensor *idd_to_device(idd_tensor *t, idd_device dev);   /* keeps channels-last, else contiguous */
idd_tensor *idd_clone(idd_tensor *t);
/* read element i (row-major logical index) of any tensor as double (slow; for tests/Lua) */
double idd_get_flat(const idd_tensor *t, int64_t i);

#endif
