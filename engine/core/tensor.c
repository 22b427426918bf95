/* tensor.c — tensor and storage lifetime, shape facts, views, copies between
 * dtypes and devices. Compute lives in engine/ops; memory comes from the backend. */
#include "iddpm/backend.h"
#include "iddpm/autograd.h"
#include "iddpm/bf16.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Atomic size_t live_bytes;
size_t idd_live_bytes(void) { return atomic_load(&live_bytes); }

static idd_storage *storage_new(idd_device dev, size_t nbytes, int ndim, const int64_t *shape) {
    const idd_backend *be = idd_backend_get(dev);
    if (!be) {
        idd_error("device %s is not available (%s)", idd_device_name(dev), idd_backend_unavailable_reason(dev));
        return NULL;
    }
    idd_storage *s = calloc(1, sizeof *s);
    if (!s) { idd_error_status(IDD_ENOMEM, "out of memory"); return NULL; }
    s->data = be->alloc(nbytes ? nbytes : 1);
    if (!s->data) {
        free(s);
        char sb[160];
        idd_error_status(IDD_ENOMEM, "out of memory allocating %zu bytes for shape %s on %s", nbytes,
                         idd_shape_str_n(ndim, shape, sb, sizeof sb), idd_device_name(dev));
        return NULL;
    }
    s->refcount = 1;
    s->device = dev;
    s->nbytes = nbytes;
    atomic_fetch_add(&live_bytes, nbytes);
    return s;
}

static void storage_release(idd_storage *s) {
    if (!s || --s->refcount > 0) return;
    idd_backend_get(s->device)->free(s->data);
    atomic_fetch_sub(&live_bytes, s->nbytes);
    free(s);
}

static void set_contiguous_strides(idd_tensor *t) {
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) { t->stride[i] = st; st *= t->shape[i]; }
}

/* Does a tensor of this shape fit (element count and bytes under IDD_MAX_BYTES, no
 * overflow on the way)? Sets an error naming op and shape when not. */
bool idd_shape_fits(int ndim, const int64_t *shape, size_t elsize, const char *op) {
    char sb[160];
    bool zero = false;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) {
            idd_error("%s: negative size %lld at dim %d of %s", op, (long long)shape[i], i + 1,
                      idd_shape_str_n(ndim, shape, sb, sizeof sb));
            return false;
        }
        zero = zero || shape[i] == 0;
    }
    if (zero) return true;
    int64_t n = elsize ? (int64_t)elsize : 1;
    for (int i = 0; i < ndim; i++) {
        if (n > IDD_MAX_BYTES / shape[i]) {
            idd_error("%s: shape %s is too large (at most 2^48 bytes)", op, idd_shape_str_n(ndim, shape, sb, sizeof sb));
            return false;
        }
        n *= shape[i];
    }
    return true;
}

static idd_tensor *header_new(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > IDD_MAX_DIMS) { idd_error("tensor: %d dims (at most %d)", ndim, IDD_MAX_DIMS); return NULL; }
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0) { idd_error("tensor: negative size %lld at dim %d", (long long)shape[i], i + 1); return NULL; }
    if (!idd_shape_fits(ndim, shape, idd_dtype_size(dt), "tensor")) return NULL;
    idd_tensor *t = calloc(1, sizeof *t);
    if (!t) { idd_error_status(IDD_ENOMEM, "out of memory"); return NULL; }
    t->refcount = 1;
    t->ndim = ndim;
    t->dtype = dt;
    t->device = dev;
    if (ndim) memcpy(t->shape, shape, sizeof(int64_t) * ndim);
    set_contiguous_strides(t);
    return t;
}

idd_tensor *idd_tensor_new(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape) {
    idd_tensor *t = header_new(dt, dev, ndim, shape);
    if (!t) return NULL;
    t->storage = storage_new(dev, (size_t)idd_numel(t) * idd_dtype_size(dt), ndim, shape);
    if (!t->storage) { free(t); return NULL; }
    return t;
}

idd_tensor *idd_tensor_zeros(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape) {
    idd_tensor *t = idd_tensor_new(dt, dev, ndim, shape);
    if (t && idd_fill_(t, 0) != IDD_OK) { idd_tensor_release(t); return NULL; }
    return t;
}

idd_tensor *idd_tensor_like(const idd_tensor *t) { return idd_tensor_new(t->dtype, t->device, t->ndim, t->shape); }

/* channels-last: (N,C,H,W) with strides (HWC,1,WC,C), or (N,C,L) with (LC,1,C); C > 1 and
 * some spatial size > 1 (otherwise it is also contiguous and reads as such) */
bool idd_is_channels_last(const idd_tensor *t) {
    if (t->ndim != 3 && t->ndim != 4) return false;
    int64_t C = t->shape[1], NC = t->shape[0] * C, HW = NC > 0 ? idd_numel(t) / NC : 0;
    if (C < 2 || HW < 2) return false;
    if (t->stride[1] != 1) return false;
    if (t->ndim == 3) return t->stride[2] == C && (t->shape[0] == 1 || t->stride[0] == C * HW);
    return (t->shape[3] == 1 || t->stride[3] == C) && (t->shape[2] == 1 || t->stride[2] == C * t->shape[3]) &&
           (t->shape[0] == 1 || t->stride[0] == C * HW);
}

idd_tensor *idd_tensor_new_channels_last(idd_dtype dt, idd_device dev, int ndim, const int64_t *shape) {
    idd_tensor *t = idd_tensor_new(dt, dev, ndim, shape);
    if (!t || (ndim != 3 && ndim != 4)) return t;
    int64_t C = shape[1];
    t->stride[1] = 1;
    t->stride[ndim - 1] = C;
    if (ndim == 4) t->stride[2] = C * shape[3];
    t->stride[0] = C * (ndim == 4 ? shape[2] * shape[3] : shape[2]);
    return t;
}

idd_tensor *idd_tensor_empty_like(const idd_tensor *t, idd_dtype dt) {
    if (idd_is_channels_last(t)) return idd_tensor_new_channels_last(dt, t->device, t->ndim, t->shape);
    return idd_tensor_new(dt, t->device, t->ndim, t->shape);
}
idd_tensor *idd_tensor_zeros_like(const idd_tensor *t) { return idd_tensor_zeros(t->dtype, t->device, t->ndim, t->shape); }

idd_tensor *idd_tensor_from_data(idd_dtype dt, int ndim, const int64_t *shape, const void *host) {
    idd_tensor *t = idd_tensor_new(dt, IDD_CPU, ndim, shape);
    if (t && host) memcpy(t->storage->data, host, (size_t)idd_numel(t) * idd_dtype_size(dt));
    return t;
}

idd_tensor *idd_tensor_scalar(idd_dtype dt, double v) {
    idd_tensor *t = idd_tensor_new(dt, IDD_CPU, 0, NULL);
    if (t) idd_fill_(t, v);
    return t;
}

void idd_tensor_retain(idd_tensor *t) { if (t) t->refcount++; }

void idd_tensor_release(idd_tensor *t) {
    if (!t || --t->refcount > 0) return;
    storage_release(t->storage);
    idd_tensor_release(t->grad);
    if (t->grad_fn) idd_node_release(t->grad_fn);
    free(t);
}

int64_t idd_numel(const idd_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

bool idd_is_contiguous(const idd_tensor *t) {
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->stride[i] != st) return false;
        st *= t->shape[i];
    }
    return true;
}

bool idd_same_shape(const idd_tensor *a, const idd_tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++) if (a->shape[i] != b->shape[i]) return false;
    return true;
}

void *idd_data(const idd_tensor *t) {
    return (char *)t->storage->data + (size_t)t->offset * idd_dtype_size(t->dtype);
}

char *idd_shape_str_n(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t k = 0;
    k += snprintf(buf + k, n - k, "(");
    for (int i = 0; i < ndim && k < n; i++)
        k += snprintf(buf + k, n - k, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, ")");
    return buf;
}

char *idd_shape_str(const idd_tensor *t, char *buf, size_t n) { return idd_shape_str_n(t->ndim, t->shape, buf, n); }

int idd_norm_dim(const idd_tensor *t, int dim, const char *op, idd_status *st) {
    int d = dim < 0 ? dim + t->ndim : dim;
    if (d < 0 || d >= (t->ndim ? t->ndim : 1)) {
        char sb[96];
        /* messages number dims from 1, as the Lua API does (negatives count from the end) */
        *st = idd_error("%s: dim %d out of range for a tensor of shape %s", op, dim >= 0 ? dim + 1 : dim,
                        idd_shape_str(t, sb, sizeof sb));
        return -1;
    }
    *st = IDD_OK;
    return d;
}

/* ---------------------------------------------------------------- views */

static idd_tensor *view_of(idd_tensor *t) {
    idd_tensor *v = calloc(1, sizeof *v);
    if (!v) { idd_error_status(IDD_ENOMEM, "out of memory"); return NULL; }
    *v = *t;
    v->refcount = 1;
    v->grad = NULL;
    v->grad_fn = NULL;
    v->requires_grad = false;
    v->storage->refcount++;
    return v;
}

idd_tensor *idd_view_alias(idd_tensor *t) { return view_of(t); }

/* A view when the strides allow one (PyTorch's rule): the old dims split into runs
 * that are contiguous with respect to each other; each run of new dims must multiply
 * to exactly one such run, and gets strides within it. So a channels-last (N,C,H,W)
 * views as (N,C,H*W) with strides (HWC,1,C), but not as (N,C*H*W). */
idd_tensor *idd_view_reshape(idd_tensor *t, int ndim, const int64_t *shape) {
    int64_t stride[IDD_MAX_DIMS];
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0) { idd_error("reshape: negative size %lld at dim %d", (long long)shape[i], i + 1); return NULL; }
    if (!idd_shape_fits(ndim, shape, idd_dtype_size(t->dtype), "reshape")) return NULL;
    for (int i = 0; i < ndim; i++) numel *= shape[i];
    if (idd_is_contiguous(t) || numel == 0 || t->ndim == 0) {
        int64_t st = 1;
        for (int i = ndim - 1; i >= 0; i--) { stride[i] = st; st *= shape[i]; }
    } else {
        int vd = ndim - 1;
        int64_t base = t->stride[t->ndim - 1], tn = 1, vn = 1;
        for (int td = t->ndim - 1; td >= 0; td--) {
            tn *= t->shape[td];
            if (td == 0 || (t->shape[td - 1] != 1 && t->stride[td - 1] != tn * base)) {
                while (vd >= 0 && (vn < tn || shape[vd] == 1)) {
                    stride[vd] = vn * base;
                    vn *= shape[vd];
                    vd--;
                }
                if (vn != tn) return NULL;
                if (td > 0) { base = t->stride[td - 1]; tn = 1; vn = 1; }
            }
        }
        if (vd != -1) return NULL;
    }
    idd_tensor *v = view_of(t);
    if (!v) return NULL;
    v->ndim = ndim;
    memcpy(v->shape, shape, sizeof(int64_t) * ndim);
    memcpy(v->stride, stride, sizeof(int64_t) * ndim);
    return v;
}

idd_tensor *idd_view_narrow(idd_tensor *t, int dim, int64_t start, int64_t len) {
    idd_tensor *v = view_of(t);
    if (!v) return NULL;
    v->offset += start * t->stride[dim];
    v->shape[dim] = len;
    return v;
}

idd_tensor *idd_view_permute(idd_tensor *t, const int *perm) {
    idd_tensor *v = view_of(t);
    if (!v) return NULL;
    for (int i = 0; i < t->ndim; i++) { v->shape[i] = t->shape[perm[i]]; v->stride[i] = t->stride[perm[i]]; }
    return v;
}

/* shape may have more dims than t (new leading dims); size-1 dims broadcast (stride 0) */
idd_tensor *idd_view_expand(idd_tensor *t, int ndim, const int64_t *shape) {
    char sa[96], sb[96];
    if (ndim < t->ndim || ndim > IDD_MAX_DIMS) {
        idd_error("expand: cannot expand %s to %s", idd_shape_str(t, sa, 96), idd_shape_str_n(ndim, shape, sb, 96));
        return NULL;
    }
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0) {
            idd_error("expand: negative size %lld at dim %d (expanding %s to %s)", (long long)shape[i], i + 1,
                      idd_shape_str(t, sa, 96), idd_shape_str_n(ndim, shape, sb, 96));
            return NULL;
        }
    if (!idd_shape_fits(ndim, shape, idd_dtype_size(t->dtype), "expand")) return NULL;
    idd_tensor *v = view_of(t);
    if (!v) return NULL;
    int lead = ndim - t->ndim;
    for (int i = 0; i < ndim; i++) {
        int j = i - lead;
        int64_t sz = j >= 0 ? t->shape[j] : 1, st = j >= 0 ? t->stride[j] : 0;
        if (sz != shape[i]) {
            if (sz != 1) {
                idd_tensor_release(v);
                idd_error("expand: cannot expand %s to %s", idd_shape_str(t, sa, 96), idd_shape_str_n(ndim, shape, sb, 96));
                return NULL;
            }
            st = 0;
        }
        v->shape[i] = shape[i];
        v->stride[i] = st;
    }
    v->ndim = ndim;
    return v;
}

/* ---------------------------------------------------------------- copies */

idd_status idd_fill_(idd_tensor *t, double v) { idd_bump_version(t); return idd_backend_of(t)->fill(t, v); }

idd_status idd_copy_(idd_tensor *dst, const idd_tensor *src) {
    char sa[96], sb[96];
    idd_tensor *s = (idd_tensor *)src, *tmp = NULL;
    idd_bump_version(dst);
    if (!idd_same_shape(dst, src)) {
        tmp = idd_view_expand(s, dst->ndim, dst->shape);
        if (!tmp)
            return idd_error("copy: source %s does not fit destination %s", idd_shape_str(src, sa, 96),
                             idd_shape_str(dst, sb, 96));
        s = tmp;
    }
    idd_status st;
    if (s->device == dst->device) {
        st = idd_backend_of(dst)->copy(dst, s);
    } else {
        /* cross-device: make a dense same-dtype staging copy on the source side, in dst's
         * layout when dst is channels-last (the transfer is then one block) */
        bool cl = idd_is_channels_last(dst);
        idd_tensor *c = cl ? idd_tensor_new_channels_last(dst->dtype, s->device, dst->ndim, dst->shape)
                           : idd_tensor_new(dst->dtype, s->device, dst->ndim, dst->shape);
        st = c ? idd_backend_of(s)->copy(c, s) : IDD_ENOMEM;
        if (st == IDD_OK) {
            size_t nb = (size_t)idd_numel(c) * idd_dtype_size(c->dtype);
            if (idd_is_contiguous(dst) || cl) {
                st = dst->device == IDD_CPU ? idd_backend_of(c)->download(idd_data(dst), idd_data(c), nb)
                                            : idd_backend_of(dst)->upload(idd_data(dst), idd_data(c), nb);
            } else {
                idd_tensor *d2 = idd_tensor_new(dst->dtype, dst->device, dst->ndim, dst->shape);
                st = d2 ? IDD_OK : IDD_ENOMEM;
                if (st == IDD_OK)
                    st = dst->device == IDD_CPU ? idd_backend_of(c)->download(idd_data(d2), idd_data(c), nb)
                                                : idd_backend_of(dst)->upload(idd_data(d2), idd_data(c), nb);
                if (st == IDD_OK) st = idd_backend_of(dst)->copy(dst, d2);
                idd_tensor_release(d2);
            }
        }
        idd_tensor_release(c);
    }
    idd_tensor_release(tmp);
    return st;
}

idd_tensor *idd_clone(idd_tensor *t) {
    idd_tensor *c = idd_tensor_like(t);
    if (c && idd_copy_(c, t) != IDD_OK) { idd_tensor_release(c); return NULL; }
    return c;
}

idd_tensor *idd_contiguous(idd_tensor *t) {
    if (idd_is_contiguous(t)) { idd_tensor_retain(t); return t; }
    return idd_clone(t);
}

/* contiguous, as idd_contiguous (idd_channels_last in ops.h keeps that layout) */
idd_tensor *idd_to_dtype(idd_tensor *t, idd_dtype dt) {
    idd_tensor *c = idd_tensor_new(dt, t->device, t->ndim, t->shape);
    if (c && idd_copy_(c, t) != IDD_OK) { idd_tensor_release(c); return NULL; }
    return c;
}

/* channels-last stays channels-last; anything else arrives contiguous */
idd_tensor *idd_to_device(idd_tensor *t, idd_device dev) {
    idd_tensor *c = idd_is_channels_last(t) ? idd_tensor_new_channels_last(t->dtype, dev, t->ndim, t->shape)
                                            : idd_tensor_new(t->dtype, dev, t->ndim, t->shape);
    if (c && idd_copy_(c, t) != IDD_OK) { idd_tensor_release(c); return NULL; }
    return c;
}

double idd_get_flat(const idd_tensor *t, int64_t i) {
    int64_t off = t->offset;
    for (int d = t->ndim - 1; d >= 0; d--) {
        off += (i % t->shape[d]) * t->stride[d];
        i /= t->shape[d];
    }
    const void *p = t->storage->data;
    switch (t->dtype) {
    case IDD_F32: return ((const float *)p)[off];
    case IDD_F64: return ((const double *)p)[off];
    case IDD_I64: return (double)((const int64_t *)p)[off];
    case IDD_U8: return ((const uint8_t *)p)[off];
    case IDD_BF16: return idd_f32_from_bf16(((const uint16_t *)p)[off]);
    default: return 0;
    }
}
