/* optim.c — AdamW and EMA updates over lists of float32 parameter tensors, plus the
 * global gradient norm used for logging and clipping. One fused pass per tensor:
 * read param, grad, m, v once, write them once. */
#include "iddpm/optim.h"
#include "iddpm/backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../ops/vmath.h"

/* ---------------------------------------------------------------- device path
 * Tensors on a device other than the CPU go to the backend's multi-tensor kernels
 * (one launch for the whole list): the lists are gathered here into host arrays of
 * device pointers. Every tensor of one call must be on the same device. */

typedef struct { int n; float **a[4]; int64_t *numel; const idd_backend *be; } mt_list;

static void mt_free(mt_list *l) {
    for (int k = 0; k < 4; k++) free(l->a[k]);
    free(l->numel);
}

/* k lists (lists[j][i]); only i with keep(i) (a gradient, for AdamW) are taken */
static idd_status mt_gather(mt_list *l, const char *op, int n, int k, idd_tensor **const *lists, int need_grad) {
    memset(l, 0, sizeof *l);
    for (int j = 0; j < 4; j++) l->a[j] = malloc(sizeof(float *) * (size_t)(n ? n : 1));
    l->numel = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (!l->a[0] || !l->a[1] || !l->a[2] || !l->a[3] || !l->numel) { mt_free(l); return idd_error_status(IDD_ENOMEM, "%s: out of memory", op); }
    idd_device dev = lists[0][0]->device;
    l->be = idd_backend_get(dev);
    for (int i = 0; i < n; i++) {
        if (need_grad && !lists[0][i]->grad) continue;
        for (int j = 0; j < k; j++) {
            idd_tensor *t = lists[j][i];
            char sa[96];
            if (!t || t->dtype != IDD_F32 || !idd_is_contiguous(t) || t->device != dev ||
                !idd_same_shape(t, lists[0][i])) {
                mt_free(l);
                return idd_error("%s: tensor %d: expected contiguous float32 tensors of one shape on %s, got %s", op,
                                 i + 1, idd_device_name(dev), t ? idd_shape_str(t, sa, 96) : "nil");
            }
            l->a[j][l->n] = idd_data(t);
        }
        l->numel[l->n] = idd_numel(lists[0][i]);
        l->n++;
    }
    return IDD_OK;
}

static int on_device(int n, idd_tensor **ts) { return n > 0 && ts[0] && ts[0]->device != IDD_CPU; }

static idd_status check_pair(const char *op, idd_tensor *a, idd_tensor *b, int i) {
    char sa[96], sb[96];
    if (!a || !b || a->dtype != IDD_F32 || b->dtype != IDD_F32 || !idd_same_shape(a, b) || !idd_is_contiguous(a) ||
        !idd_is_contiguous(b) || a->device != IDD_CPU || b->device != IDD_CPU)
        return idd_error("%s: tensor %d: expected two contiguous float32 CPU tensors of one shape, got %s and %s", op,
                         i + 1, a ? idd_shape_str(a, sa, 96) : "nil", b ? idd_shape_str(b, sb, 96) : "nil");
    return IDD_OK;
}

/* one AdamW update of k parameters, 8 lanes at a time (vector sqrt and division round as
 * the scalar ones, and nothing is contracted into an FMA: the result is the scalar
 * loop's bit for bit), both cores when large:
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   torch: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) */
static void adamw_span(float *pp, const float *gp, float *mp, float *vp, int64_t k, float b1, float b2,
                       float eps, float decay, float step_size, float rbc2) {
    const int64_t nb = k / 8;
    const v8f B1 = v8_set1(b1), B2 = v8_set1(b2), C1 = v8_set1(1 - b1), C2 = v8_set1(1 - b2);
    const v8f D = v8_set1(decay), S = v8_set1(step_size), R = v8_set1(rbc2), E = v8_set1(eps);
    #pragma omp parallel for schedule(static) if (k > 65536)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j = b * 8;
        v8f g = v8_load(gp + j);
        v8f mj = B1 * v8_load(mp + j) + C1 * g;
        v8f vj = B2 * v8_load(vp + j) + C2 * g * g;
        v8_store(mp + j, mj);
        v8_store(vp + j, vj);
        v8_store(pp + j, v8_load(pp + j) * D - S * mj / (v8_sqrt(vj) * R + E));
    }
    for (int64_t j = nb * 8; j < k; j++) {
        float g = gp[j];
        float mj = b1 * mp[j] + (1 - b1) * g;
        float vj = b2 * vp[j] + (1 - b2) * g * g;
        mp[j] = mj;
        vp[j] = vj;
        pp[j] = pp[j] * decay - step_size * mj / (sqrtf(vj) * rbc2 + eps);
    }
}

idd_status idd_adamw_step(int n, idd_tensor **params, idd_tensor **m, idd_tensor **v, const idd_adamw_cfg *c) {
    double bc1 = 1.0 - pow(c->beta1, (double)c->step), bc2 = 1.0 - pow(c->beta2, (double)c->step);
    float lr = (float)c->lr, b1 = (float)c->beta1, b2 = (float)c->beta2, eps = (float)c->eps;
    float decay = (float)(1.0 - c->lr * c->weight_decay);
    float step_size = (float)(c->lr / bc1), rbc2 = (float)(1.0 / sqrt(bc2));
    (void)lr;
    for (int i = 0; i < n; i++) if (params[i]->grad) idd_bump_version(params[i]);   /* written in place */
    if (on_device(n, params)) {
        idd_tensor **grads = malloc(sizeof *grads * (size_t)n);
        if (!grads) return idd_error_status(IDD_ENOMEM, "adamw: out of memory");
        for (int i = 0; i < n; i++) grads[i] = params[i]->grad ? params[i]->grad : params[i];
        idd_tensor **const lists[4] = {params, grads, m, v};
        mt_list l;
        idd_status st = mt_gather(&l, "adamw", n, 4, lists, 1);
        free(grads);
        if (st) return st;
        float hp[6] = {b1, b2, eps, decay, step_size, rbc2};
        st = !l.be->adamw ? idd_error("adamw: not implemented on %s", l.be->name)
                          : l.n ? l.be->adamw(l.n, l.a[0], (const float *const *)l.a[1], l.a[2], l.a[3], l.numel, hp) : IDD_OK;
        mt_free(&l);
        return st;
    }
    for (int i = 0; i < n; i++) {
        idd_tensor *p = params[i];
        if (!p->grad) continue;
        idd_status st = check_pair("adamw", p, p->grad, i);
        if (!st) st = check_pair("adamw", p, m[i], i);
        if (!st) st = check_pair("adamw", p, v[i], i);
        if (st) return st;
        float *pp = idd_data(p), *gp = idd_data(p->grad), *mp = idd_data(m[i]), *vp = idd_data(v[i]);
        adamw_span(pp, gp, mp, vp, idd_numel(p), b1, b2, eps, decay, step_size, rbc2);
    }
    return IDD_OK;
}

idd_status idd_ema_update(int n, idd_tensor **ema, idd_tensor **params, double rate) {
    float r = (float)rate, q = (float)(1.0 - rate);
    for (int i = 0; i < n; i++) idd_bump_version(ema[i]);   /* written in place */
    if (on_device(n, ema)) {
        idd_tensor **const lists[2] = {ema, params};
        mt_list l;
        idd_status st = mt_gather(&l, "ema", n, 2, lists, 0);
        if (st) return st;
        st = !l.be->ema ? idd_error("ema: not implemented on %s", l.be->name)
                        : l.n ? l.be->ema(l.n, l.a[0], (const float *const *)l.a[1], l.numel, r) : IDD_OK;
        mt_free(&l);
        return st;
    }
    for (int i = 0; i < n; i++) {
        idd_status st = check_pair("ema", ema[i], params[i], i);
        if (st) return st;
        float *e = idd_data(ema[i]);
        const float *p = idd_data(params[i]);
        int64_t k = idd_numel(ema[i]);
        #pragma omp parallel for simd if (k > 65536)
        for (int64_t j = 0; j < k; j++) e[j] = r * e[j] + q * p[j];
    }
    return IDD_OK;
}

/* the gradients of params that have one, as a list (NULL entries dropped) */
static int grads_of(int n, idd_tensor **params, idd_tensor **out) {
    int k = 0;
    for (int i = 0; i < n; i++) if (params[i]->grad) out[k++] = params[i]->grad;
    return k;
}

double idd_grad_norm(int n, idd_tensor **params) {
    double s = 0;
    idd_tensor **gl = n > 0 ? malloc(sizeof *gl * (size_t)n) : NULL;
    int ng = gl ? grads_of(n, params, gl) : 0;
    if (ng > 0 && gl[0]->device != IDD_CPU) {
        idd_tensor **const lists[1] = {gl};
        mt_list l;
        double r = NAN;
        if (mt_gather(&l, "grad_norm", ng, 1, lists, 0) == IDD_OK) {
            if (l.be->sumsq && l.be->sumsq(l.n, (const float *const *)l.a[0], l.numel, &r) == IDD_OK) r = sqrt(r);
            else r = NAN;
            mt_free(&l);
        }
        free(gl);
        return r;
    }
    free(gl);
    for (int i = 0; i < n; i++) {
        idd_tensor *g = params[i]->grad;
        if (!g) continue;
        int64_t k = idd_numel(g);
        if (g->dtype == IDD_F32 && idd_is_contiguous(g)) {
            const float *p = idd_data(g);
            double part = 0;
            #pragma omp parallel for reduction(+ : part) if (k > 65536)
            for (int64_t j = 0; j < k; j++) part += (double)p[j] * p[j];
            s += part;
        } else {
            for (int64_t j = 0; j < k; j++) { double x = idd_get_flat(g, j); s += x * x; }
        }
    }
    return sqrt(s);
}

idd_status idd_grad_scale(int n, idd_tensor **params, double s) {
    idd_tensor **gl = n > 0 ? malloc(sizeof *gl * (size_t)n) : NULL;
    int ng = gl ? grads_of(n, params, gl) : 0;
    if (ng > 0 && gl[0]->device != IDD_CPU) {
        idd_tensor **const lists[1] = {gl};
        mt_list l;
        idd_status st = mt_gather(&l, "grad_scale", ng, 1, lists, 0);
        free(gl);
        if (st) return st;
        st = !l.be->scale ? idd_error("grad_scale: not implemented on %s", l.be->name) : l.be->scale(l.n, l.a[0], l.numel, (float)s);
        mt_free(&l);
        return st;
    }
    free(gl);
    for (int i = 0; i < n; i++) {
        idd_tensor *g = params[i]->grad;
        if (!g) continue;
        if (g->dtype != IDD_F32 || !idd_is_contiguous(g) || g->device != IDD_CPU)
            return idd_error("grad_scale: gradient %d is not a contiguous float32 CPU tensor", i + 1);
        float *p = idd_data(g);
        int64_t k = idd_numel(g);
        for (int64_t j = 0; j < k; j++) p[j] = (float)(p[j] * s);
    }
    return IDD_OK;
}
