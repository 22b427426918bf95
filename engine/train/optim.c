/* optim.c — AdamW and EMA updates over lists of float32 parameter tensors, plus the
 * global gradient norm used for logging and clipping. One fused pass per tensor:
 * read param, grad, m, v once, write them once. */
#include "iddpm/optim.h"

#include <math.h>

static idd_status check_pair(const char *op, idd_tensor *a, idd_tensor *b, int i) {
    char sa[96], sb[96];
    if (!a || !b || a->dtype != IDD_F32 || b->dtype != IDD_F32 || !idd_same_shape(a, b) || !idd_is_contiguous(a) ||
        !idd_is_contiguous(b) || a->device != IDD_CPU || b->device != IDD_CPU)
        return idd_error("%s: tensor %d: expected two contiguous float32 CPU tensors of one shape, got %s and %s", op,
                         i + 1, a ? idd_shape_str(a, sa, 96) : "nil", b ? idd_shape_str(b, sb, 96) : "nil");
    return IDD_OK;
}

idd_status idd_adamw_step(int n, idd_tensor **params, idd_tensor **m, idd_tensor **v, const idd_adamw_cfg *c) {
    double bc1 = 1.0 - pow(c->beta1, (double)c->step), bc2 = 1.0 - pow(c->beta2, (double)c->step);
    float lr = (float)c->lr, b1 = (float)c->beta1, b2 = (float)c->beta2, eps = (float)c->eps;
    float decay = (float)(1.0 - c->lr * c->weight_decay);
    float step_size = (float)(c->lr / bc1), rbc2 = (float)(1.0 / sqrt(bc2));
    (void)lr;
    for (int i = 0; i < n; i++) {
        idd_tensor *p = params[i];
        if (!p->grad) continue;
        idd_status st = check_pair("adamw", p, p->grad, i);
        if (!st) st = check_pair("adamw", p, m[i], i);
        if (!st) st = check_pair("adamw", p, v[i], i);
        if (st) return st;
        float *pp = idd_data(p), *gp = idd_data(p->grad), *mp = idd_data(m[i]), *vp = idd_data(v[i]);
        int64_t k = idd_numel(p);
        #pragma omp parallel for if (k > 65536)
        for (int64_t j = 0; j < k; j++) {
            float g = gp[j];
            float mj = b1 * mp[j] + (1 - b1) * g;
            float vj = b2 * vp[j] + (1 - b2) * g * g;
            mp[j] = mj;
            vp[j] = vj;
            /* torch: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) */
            pp[j] = pp[j] * decay - step_size * mj / (sqrtf(vj) * rbc2 + eps);
        }
    }
    return IDD_OK;
}

idd_status idd_ema_update(int n, idd_tensor **ema, idd_tensor **params, double rate) {
    float r = (float)rate, q = (float)(1.0 - rate);
    for (int i = 0; i < n; i++) {
        idd_status st = check_pair("ema", ema[i], params[i], i);
        if (st) return st;
        float *e = idd_data(ema[i]);
        const float *p = idd_data(params[i]);
        int64_t k = idd_numel(ema[i]);
        #pragma omp parallel for if (k > 65536)
        for (int64_t j = 0; j < k; j++) e[j] = r * e[j] + q * p[j];
    }
    return IDD_OK;
}

double idd_grad_norm(int n, idd_tensor **params) {
    double s = 0;
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
