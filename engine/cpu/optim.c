/* optim.c — the CPU backend's multi-tensor optimizer kernels (backend.h: adamw, ema,
 * sumsq, scale) over lists of contiguous float32 buffers; engine/train/optim.c reaches
 * them through the backend on every device. One fused pass per tensor: read param,
 * grad, m, v once, write them once; both cores when a tensor is large. */
#include "iddpm/backend.h"

#include <math.h>

#include "cpu_kernels.h"
#include "vmath.h"

#define OPT_PAR_MIN 65536   /* elements of one tensor below which threads cost more than they give */

/* one AdamW update of k parameters, 8 lanes at a time (vector sqrt and division round as
 * the scalar ones, and nothing is contracted into an FMA: the result is the scalar
 * loop's bit for bit):
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   torch: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) */
static void adamw_span(float *pp, const float *gp, float *mp, float *vp, int64_t k, float b1, float b2,
                       float eps, float decay, float step_size, float rbc2) {
    const int64_t nb = k / 8;
    const v8f B1 = v8_set1(b1), B2 = v8_set1(b2), C1 = v8_set1(1 - b1), C2 = v8_set1(1 - b2);
    const v8f D = v8_set1(decay), S = v8_set1(step_size), R = v8_set1(rbc2), E = v8_set1(eps);
    #pragma omp parallel for schedule(static) if (k > OPT_PAR_MIN)
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

idd_status idd_cpu_adamw(int n, float *const *p, const float *const *g, float *const *m, float *const *v,
                         const int64_t *numel, const float hp[6]) {
    for (int t = 0; t < n; t++) adamw_span(p[t], g[t], m[t], v[t], numel[t], hp[0], hp[1], hp[2], hp[3], hp[4], hp[5]);
    return IDD_OK;
}

/* e = rate e + (1 - rate) p, both factors rounded from double once */
idd_status idd_cpu_ema(int n, float *const *e, const float *const *p, const int64_t *numel, double rate) {
    float r = (float)rate, q = (float)(1.0 - rate);
    for (int t = 0; t < n; t++) {
        float *et = e[t];
        const float *pt = p[t];
        int64_t k = numel[t];
        #pragma omp parallel for simd if (k > OPT_PAR_MIN)
        for (int64_t j = 0; j < k; j++) et[j] = r * et[j] + q * pt[j];
    }
    return IDD_OK;
}

/* in double, tensor by tensor (each one's partial sum spread over threads) */
idd_status idd_cpu_sumsq(int n, const float *const *g, const int64_t *numel, double *out) {
    double s = 0;
    for (int t = 0; t < n; t++) {
        const float *gt = g[t];
        int64_t k = numel[t];
        double part = 0;
        #pragma omp parallel for reduction(+ : part) if (k > OPT_PAR_MIN)
        for (int64_t j = 0; j < k; j++) part += (double)gt[j] * gt[j];
        s += part;
    }
    *out = s;
    return IDD_OK;
}

/* g = g * s, the product in double rounded once */
idd_status idd_cpu_scale(int n, float *const *g, const int64_t *numel, double s) {
    for (int t = 0; t < n; t++)
        for (int64_t j = 0; j < numel[t]; j++) g[t][j] = (float)(g[t][j] * s);
    return IDD_OK;
}
