/* norm.c — group norm fused with the ResBlock's scale-shift and SiLU, forward and
 * backward.
 *
 * Forward, for sample n, group g (Cg = C/G channels, M = Cg*HW elements), channel c:
 *   mean, var over the M elements (two passes, accumulated in double), rstd = 1/sqrt(var+eps)
 *   xhat = (x - mean) * rstd
 *   z    = xhat * gamma[c] + beta[c]
 *   u    = z * (1 + scale[n,c]) + shift[n,c]        (scale-shift, if given)
 *   out  = silu ? u * sigmoid(u) : u
 * mean and rstd are saved; z and u are recomputed in backward (cheap, saves a tensor).
 *
 * Backward, with du = dout * silu'(u) (or dout):
 *   dshift[n,c] += sum_hw du          dscale[n,c] += sum_hw du * z
 *   dz = du * (1 + scale[n,c])
 *   dbeta[c] += sum_{n,hw} dz         dgamma[c] += sum_{n,hw} dz * xhat
 *   dxhat = dz * gamma[c]
 *   dx += rstd * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat))
 * The loop runs in parallel over groups (each group owns its channels, so dgamma/dbeta
 * and every per-(n,c) gradient have a single writer), with samples inside. */
#include "iddpm/kernels.h"

#include <math.h>

static idd_status gn_check(const char *fn, int N, int C, int HW, int G) {
    if (N <= 0 || C <= 0 || HW <= 0 || G <= 0)
        return idd_error("%s: bad sizes: input (%d,%d,%d), %d groups", fn, N, C, HW, G);
    if (C % G)
        return idd_error("%s: %d groups do not divide %d channels (input (%d,%d,%d))", fn, G, C,
                         N, C, HW);
    return IDD_OK;
}

static inline float sigmoidf(float u) { return 1.0f / (1.0f + expf(-u)); }

idd_status idd_groupnorm_forward_f32(float *out, float *mean, float *rstd, const float *x,
                                     const float *gamma, const float *beta, const float *scale,
                                     const float *shift, int N, int C, int HW, int G, float eps,
                                     int silu) {
    idd_status st = gn_check("groupnorm_forward", N, C, HW, G);
    if (st) return st;
    const int Cg = C / G;
    const long M = (long)Cg * HW;
#pragma omp parallel for schedule(static)
    for (long ng = 0; ng < (long)N * G; ng++) {
        const int n = (int)(ng / G), g = (int)(ng % G);
        const float *xp = x + ((size_t)n * C + (size_t)g * Cg) * HW;
        float *op = out + ((size_t)n * C + (size_t)g * Cg) * HW;
        double s = 0;
        for (long i = 0; i < M; i++) s += xp[i];
        const double mu = s / (double)M;
        double ss = 0;
        for (long i = 0; i < M; i++) {
            double d = xp[i] - mu;
            ss += d * d;
        }
        const double var = ss / (double)M;
        const float r = (float)(1.0 / sqrt(var + (double)eps));
        const float m = (float)mu;
        mean[ng] = m;
        rstd[ng] = r;
        for (int cc = 0; cc < Cg; cc++) {
            const int c = g * Cg + cc;
            const float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
            const float sc = scale ? 1.0f + scale[(size_t)n * C + c] : 1.0f;
            const float sh = shift ? shift[(size_t)n * C + c] : 0.0f;
            /* u = ((x - m) * r * ga + be) * sc + sh, in the same order of operations as
             * the backward's recomputation */
            const float *xc = xp + (size_t)cc * HW;
            float *oc = op + (size_t)cc * HW;
            if (silu) {
                for (int i = 0; i < HW; i++) {
                    float u = ((xc[i] - m) * r * ga + be) * sc + sh;
                    oc[i] = u * sigmoidf(u);
                }
            } else {
                for (int i = 0; i < HW; i++) oc[i] = ((xc[i] - m) * r * ga + be) * sc + sh;
            }
        }
    }
    return IDD_OK;
}

idd_status idd_groupnorm_backward_f32(float *dx, float *dgamma, float *dbeta, float *dscale,
                                      float *dshift, const float *dout, const float *mean,
                                      const float *rstd, const float *x, const float *gamma,
                                      const float *beta, const float *scale, const float *shift,
                                      int N, int C, int HW, int G, int silu) {
    idd_status st = gn_check("groupnorm_backward", N, C, HW, G);
    if (st) return st;
    if (!dx && !dgamma && !dbeta && !dscale && !dshift) return IDD_OK;
    const int Cg = C / G;
    const long M = (long)Cg * HW;
#pragma omp parallel for schedule(dynamic, 1)
    for (int g = 0; g < G; g++) {
        for (int n = 0; n < N; n++) {
            const size_t ng = (size_t)n * G + g;
            const float m = mean[ng], r = rstd[ng];
            const size_t base = ((size_t)n * C + (size_t)g * Cg) * HW;
            const float *xp = x + base, *dp = dout + base;
            double sum_dxhat = 0, sum_dxhat_xhat = 0;
            /* pass 1: per-channel sums, and the two group sums dx needs */
            for (int cc = 0; cc < Cg; cc++) {
                const int c = g * Cg + cc;
                const float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
                const float sc = scale ? 1.0f + scale[(size_t)n * C + c] : 1.0f;
                const float sh = shift ? shift[(size_t)n * C + c] : 0.0f;
                const float *xc = xp + (size_t)cc * HW, *dc = dp + (size_t)cc * HW;
                double s_du = 0, s_duz = 0, s_dz = 0, s_dzxh = 0;
                for (int i = 0; i < HW; i++) {
                    float xh = (xc[i] - m) * r;
                    float z = xh * ga + be;
                    float du = dc[i];
                    if (silu) {
                        float u = z * sc + sh, sg = sigmoidf(u);
                        du *= sg * (1.0f + u * (1.0f - sg));
                    }
                    float dz = du * sc;
                    s_du += du;
                    s_duz += (double)du * z;
                    s_dz += dz;
                    s_dzxh += (double)dz * xh;
                }
                if (dshift) dshift[(size_t)n * C + c] += (float)s_du;
                if (dscale) dscale[(size_t)n * C + c] += (float)s_duz;
                if (dbeta) dbeta[c] += (float)s_dz;
                if (dgamma) dgamma[c] += (float)s_dzxh;
                /* dxhat = dz * ga, so its sums are ga times those of dz */
                sum_dxhat += ga * s_dz;
                sum_dxhat_xhat += ga * s_dzxh;
            }
            if (!dx) continue;
            /* pass 2: dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) */
            const float k1 = (float)(sum_dxhat / (double)M);
            const float k2 = (float)(sum_dxhat_xhat / (double)M);
            float *dxp = dx + base;
            for (int cc = 0; cc < Cg; cc++) {
                const int c = g * Cg + cc;
                const float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
                const float sc = scale ? 1.0f + scale[(size_t)n * C + c] : 1.0f;
                const float sh = shift ? shift[(size_t)n * C + c] : 0.0f;
                const float *xc = xp + (size_t)cc * HW, *dc = dp + (size_t)cc * HW;
                float *dxc = dxp + (size_t)cc * HW;
                for (int i = 0; i < HW; i++) {
                    float xh = (xc[i] - m) * r;
                    float du = dc[i];
                    if (silu) {
                        float u = (xh * ga + be) * sc + sh, sg = sigmoidf(u);
                        du *= sg * (1.0f + u * (1.0f - sg));
                    }
                    float dxh = du * sc * ga;
                    dxc[i] += r * (dxh - k1 - xh * k2);
                }
            }
        }
    }
    return IDD_OK;
}
