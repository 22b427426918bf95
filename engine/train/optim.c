/* optim.c — AdamW and EMA updates over lists of float32 parameter tensors, plus the
 * global gradient norm used for logging and clipping, on every device through the
 * backend's multi-tensor kernels (engine/cpu/optim.c, engine/cuda/diffusion.cu): the
 * lists are gathered here into host arrays of data pointers (one launch for the whole
 * list on a GPU). Every tensor of one call must be on the same device. */
#include "iddpm/optim.h"
#include "iddpm/backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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

idd_status idd_adamw_step(int n, idd_tensor **params, idd_tensor **m, idd_tensor **v, const idd_adamw_cfg *c) {
    double bc1 = 1.0 - pow(c->beta1, (double)c->step), bc2 = 1.0 - pow(c->beta2, (double)c->step);
    float lr = (float)c->lr, b1 = (float)c->beta1, b2 = (float)c->beta2, eps = (float)c->eps;
    float decay = (float)(1.0 - c->lr * c->weight_decay);
    float step_size = (float)(c->lr / bc1), rbc2 = (float)(1.0 / sqrt(bc2));
    (void)lr;
    if (n <= 0) return IDD_OK;
    for (int i = 0; i < n; i++) if (params[i]->grad) idd_bump_version(params[i]);   /* written in place */
    idd_tensor **grads = malloc(sizeof *grads * (size_t)n);
    if (!grads) return idd_error_status(IDD_ENOMEM, "adamw: out of memory");
    for (int i = 0; i < n; i++) grads[i] = params[i]->grad ? params[i]->grad : params[i];
    idd_tensor **const lists[4] = {params, grads, m, v};
    mt_list l;
    idd_status st = mt_gather(&l, "adamw", n, 4, lists, 1);
    free(grads);
    if (st) return st;
    float hp[6] = {b1, b2, eps, decay, step_size, rbc2};
    st = l.n ? l.be->adamw(l.n, l.a[0], (const float *const *)l.a[1], l.a[2], l.a[3], l.numel, hp) : IDD_OK;
    mt_free(&l);
    return st;
}

idd_status idd_ema_update(int n, idd_tensor **ema, idd_tensor **params, double rate) {
    if (n <= 0) return IDD_OK;
    for (int i = 0; i < n; i++) idd_bump_version(ema[i]);   /* written in place */
    idd_tensor **const lists[2] = {ema, params};
    mt_list l;
    idd_status st = mt_gather(&l, "ema", n, 2, lists, 0);
    if (st) return st;
    st = l.n ? l.be->ema(l.n, l.a[0], (const float *const *)l.a[1], l.numel, rate) : IDD_OK;
    mt_free(&l);
    return st;
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
    /* float32 contiguous gradients (every one the tape makes for float32 parameters):
     * the backend's kernel; others (CPU only) element by element below */
    mt_list l;
    idd_tensor **const lists[1] = {gl};
    if (ng > 0 && mt_gather(&l, "grad_norm", ng, 1, lists, 0) == IDD_OK) {
        double r = NAN;
        if (l.be->sumsq(l.n, (const float *const *)l.a[0], l.numel, &r) == IDD_OK) r = sqrt(r);
        else r = NAN;
        mt_free(&l);
        free(gl);
        return r;
    }
    idd_clear_error();
    bool cpu = ng == 0 || gl[0]->device == IDD_CPU;
    free(gl);
    if (!cpu) return NAN;
    for (int i = 0; i < n; i++) {
        idd_tensor *g = params[i]->grad;
        if (!g) continue;
        int64_t k = idd_numel(g);
        for (int64_t j = 0; j < k; j++) { double x = idd_get_flat(g, j); s += x * x; }
    }
    return sqrt(s);
}

idd_status idd_grad_scale(int n, idd_tensor **params, double s) {
    idd_tensor **gl = n > 0 ? malloc(sizeof *gl * (size_t)n) : NULL;
    int ng = gl ? grads_of(n, params, gl) : 0;
    if (ng <= 0) { free(gl); return IDD_OK; }
    idd_tensor **const lists[1] = {gl};
    mt_list l;
    idd_status st = mt_gather(&l, "grad_scale", ng, 1, lists, 0);
    free(gl);
    if (st) return st;
    st = l.be->scale(l.n, l.a[0], l.numel, s);
    mt_free(&l);
    return st;
}
