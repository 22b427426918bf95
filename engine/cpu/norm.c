/* norm.c — group norm fused with the ResBlock's scale-shift and SiLU, forward and
 * backward.
 *
 * Forward, for sample n, group g (Cg = C/G channels, M = Cg*HW elements), channel c:
 *   mean, var over the M elements (one read: the sums of x-k and (x-k)^2 for a rough
 *   mean k, float lanes per block of 1024, blocks added in double), rstd = 1/sqrt(var+eps)
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
#include <stdlib.h>

#include "vmath.h"

static idd_status gn_check(const char *fn, int N, int C, int HW, int G) {
    if (N <= 0 || C <= 0 || HW <= 0 || G <= 0)
        return idd_error("%s: bad sizes: input (%d,%d,%d), %d groups", fn, N, C, HW, G);
    if (C % G)
        return idd_error("%s: %d groups do not divide %d channels (input (%d,%d,%d))", fn, G, C,
                         N, C, HW);
    return IDD_OK;
}

/* the sums of (p[i] - k) and (p[i] - k)^2 over p[0..n), in one read: float lanes (two
 * sets, to overlap the adds) over blocks of at most 1024 elements, each block's totals
 * added in double. k, a rough mean of the data, keeps the sum of squares from
 * cancelling when the mean is large against the spread. */
static void block_moments(const float *p, long n, float k, double *s1, double *s2) {
    const v8f vk = v8_set1(k);
    double t1 = 0, t2 = 0;
    for (long b0 = 0; b0 < n; b0 += 1024) {
        const long b1 = b0 + 1024 < n ? b0 + 1024 : n;
        v8f a1 = v8_set1(0.0f), a2 = v8_set1(0.0f), c1 = v8_set1(0.0f), c2 = v8_set1(0.0f);
        long i = b0;
        for (; i + 16 <= b1; i += 16) {
            v8f d = v8_load(p + i) - vk, e = v8_load(p + i + 8) - vk;
            a1 += d;
            a2 = v8_fma(d, d, a2);
            c1 += e;
            c2 = v8_fma(e, e, c2);
        }
        for (; i + 8 <= b1; i += 8) {
            v8f d = v8_load(p + i) - vk;
            a1 += d;
            a2 = v8_fma(d, d, a2);
        }
        if (i < b1) {
            const int m = (int)(b1 - i);
            v8f d = v8_load_n(p + i, m) - vk;
            for (int j = m; j < 8; j++) d[j] = 0.0f;
            a1 += d;
            a2 = v8_fma(d, d, a2);
        }
        t1 += v8_hsum(a1 + c1);
        t2 += v8_hsum(a2 + c2);
    }
    *s1 = t1;
    *s2 = t2;
}

/* the mean of up to the first 64 elements (the shift of block_moments) */
static float rough_mean(const float *p, long n) {
    const long m = n < 64 ? n : 64;
    double s = 0;
    for (long i = 0; i < m; i++) s += p[i];
    return (float)(s / (double)m);
}

/* out[i] = u (or silu(u)) with u = (x[i] - m) * a + b, over n elements (x - m first:
 * folding m into b would cancel when the mean is large against the spread) */
static void affine_act(float *o, const float *xc, long n, float m, float a, float b, int silu) {
    const v8f vm = v8_set1(m), va = v8_set1(a), vb = v8_set1(b);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f u = v8_fma(v8_load(xc + i) - vm, va, vb);
        v8_store(o + i, silu ? u * v8_sigmoid(u) : u);
    }
    if (i < n) {
        const int k = (int)(n - i);
        v8f u = v8_fma(v8_load_n(xc + i, k) - vm, va, vb);
        v8_store_n(o + i, silu ? u * v8_sigmoid(u) : u, k);
    }
}

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
        /* one read for both moments: var = E[(x-k)^2] - (E[x-k])^2 */
        const float k = rough_mean(xp, M);
        double s1, s2;
        block_moments(xp, M, k, &s1, &s2);
        const double d = s1 / (double)M;
        const double mu = k + d;
        const double var = fmax(s2 / (double)M - d * d, 0.0);
        const float r = (float)(1.0 / sqrt(var + (double)eps));
        const float m = (float)mu;
        mean[ng] = m;
        rstd[ng] = r;
        for (int cc = 0; cc < Cg; cc++) {
            const int c = g * Cg + cc;
            const float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
            const float sc = scale ? 1.0f + scale[(size_t)n * C + c] : 1.0f;
            const float sh = shift ? shift[(size_t)n * C + c] : 0.0f;
            /* u = ((x - m) * r * ga + be) * sc + sh = (x - m) * a + b */
            const float a = r * ga * sc, b = be * sc + sh;
            affine_act(op + (size_t)cc * HW, xp + (size_t)cc * HW, HW, m, a, b, silu);
        }
    }
    return IDD_OK;
}

/* accum: dx += (the kernel API), else dx = (a fresh buffer) */
static idd_status gn_backward(float *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                              const float *dout, const float *mean, const float *rstd,
                              const float *x, const float *gamma, const float *beta,
                              const float *scale, const float *shift, int N, int C, int HW, int G,
                              int silu, int accum) {
    idd_status st = gn_check("groupnorm_backward", N, C, HW, G);
    if (st) return st;
    if (!dx && !dgamma && !dbeta && !dscale && !dshift) return IDD_OK;
    const int Cg = C / G;
    const long M = (long)Cg * HW;
    int oom = 0;
#pragma omp parallel reduction(| : oom)
    {
        /* du of one (n, g): written by pass 1, read by pass 2 (the sigmoid once) */
        float *dub = silu ? malloc(sizeof(float) * (size_t)M) : NULL;
        if (silu && !dub) oom = 1;
#pragma omp for schedule(dynamic, 1)
        for (int g = 0; g < G; g++) {
            if (silu && !dub) continue;
            for (int n = 0; n < N; n++) {
                const size_t ng = (size_t)n * G + g;
                const float m = mean[ng], r = rstd[ng];
                const size_t base = ((size_t)n * C + (size_t)g * Cg) * HW;
                const float *xp = x + base, *dp = dout + base;
                double sum_dxhat = 0, sum_dxhat_xhat = 0;
                /* pass 1: per channel S1 = sum du, S2 = sum du * xhat, from which
                 *   dshift += S1, dscale += sum du*z = ga*S2 + be*S1,
                 *   dbeta += sc*S1, dgamma += sc*S2, and the group sums of dxhat = du*sc*ga */
                for (int cc = 0; cc < Cg; cc++) {
                    const int c = g * Cg + cc;
                    const float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
                    const float sc = scale ? 1.0f + scale[(size_t)n * C + c] : 1.0f;
                    const float sh = shift ? shift[(size_t)n * C + c] : 0.0f;
                    const float *xc = xp + (size_t)cc * HW, *dc = dp + (size_t)cc * HW;
                    float *duc = silu ? dub + (size_t)cc * HW : NULL;
                    const v8f vr = v8_set1(r), vm = v8_set1(m);
                    const v8f ua = v8_set1(ga * sc), ub = v8_set1(be * sc + sh);
                    double S1 = 0, S2 = 0;
                    for (long b0 = 0; b0 < HW; b0 += 1024) {
                        const long b1 = b0 + 1024 < HW ? b0 + 1024 : HW;
                        v8f a1 = v8_set1(0.0f), a2 = v8_set1(0.0f);
                        for (long i = b0; i < b1; i += 8) {
                            const int k = b1 - i >= 8 ? 8 : (int)(b1 - i);
                            v8f xv = k == 8 ? v8_load(xc + i) : v8_load_n(xc + i, k);
                            v8f du = k == 8 ? v8_load(dc + i) : v8_load_n(dc + i, k);
                            v8f xh = (xv - vm) * vr;
                            if (silu) {
                                v8f u = v8_fma(xh, ua, ub), sg = v8_sigmoid(u);
                                du = du * (sg * v8_fma(u, v8_set1(1.0f) - sg, v8_set1(1.0f)));
                                if (k == 8) v8_store(duc + i, du);
                                else v8_store_n(duc + i, du, k);
                            }
                            a1 += du;                       /* padded lanes: du = 0 */
                            a2 = v8_fma(du, xh, a2);
                        }
                        S1 += v8_hsum(a1);
                        S2 += v8_hsum(a2);
                    }
                    if (dshift) dshift[(size_t)n * C + c] += (float)S1;
                    if (dscale) dscale[(size_t)n * C + c] += (float)(ga * S2 + be * S1);
                    if (dbeta) dbeta[c] += (float)(sc * S1);
                    if (dgamma) dgamma[c] += (float)(sc * S2);
                    sum_dxhat += (double)ga * sc * S1;
                    sum_dxhat_xhat += (double)ga * sc * S2;
                }
                if (!dx) continue;
                /* pass 2: dx += r * (du*sc*ga - k1 - xhat * k2), xhat = (x - m) * r */
                const float k1 = (float)(sum_dxhat / (double)M);
                const float k2 = (float)(sum_dxhat_xhat / (double)M);
                float *dxp = dx + base;
                for (int cc = 0; cc < Cg; cc++) {
                    const int c = g * Cg + cc;
                    const float ga = gamma ? gamma[c] : 1.0f;
                    const float sc = scale ? 1.0f + scale[(size_t)n * C + c] : 1.0f;
                    const float *xc = xp + (size_t)cc * HW;
                    const float *duc = silu ? dub + (size_t)cc * HW : dp + (size_t)cc * HW;
                    float *dxc = dxp + (size_t)cc * HW;
                    const v8f A = v8_set1(r * sc * ga), vr = v8_set1(r), vm = v8_set1(m);
                    const v8f K2 = v8_set1(-r * k2), K1 = v8_set1(-r * k1);
                    long i = 0;
                    if (accum) {
                        for (; i + 8 <= HW; i += 8) {
                            v8f xh = (v8_load(xc + i) - vm) * vr;
                            v8f d = v8_fma(v8_load(duc + i), A, v8_fma(xh, K2, K1));
                            v8_store(dxc + i, v8_load(dxc + i) + d);
                        }
                    } else {
                        for (; i + 8 <= HW; i += 8) {
                            v8f xh = (v8_load(xc + i) - vm) * vr;
                            v8_store(dxc + i, v8_fma(v8_load(duc + i), A, v8_fma(xh, K2, K1)));
                        }
                    }
                    for (; i < HW; i++) {
                        float xh = (xc[i] - m) * r;
                        float d = r * (duc[i] * sc * ga - k1 - xh * k2);
                        dxc[i] = accum ? dxc[i] + d : d;
                    }
                }
            }
        }
        free(dub);
    }
    if (oom)
        return idd_error_status(IDD_ENOMEM, "groupnorm_backward: out of memory for %ld floats "
                                "of scratch", M);
    return IDD_OK;
}

idd_status idd_groupnorm_backward_f32(float *dx, float *dgamma, float *dbeta, float *dscale,
                                      float *dshift, const float *dout, const float *mean,
                                      const float *rstd, const float *x, const float *gamma,
                                      const float *beta, const float *scale, const float *shift,
                                      int N, int C, int HW, int G, int silu) {
    return gn_backward(dx, dgamma, dbeta, dscale, dshift, dout, mean, rstd, x, gamma, beta, scale,
                       shift, N, C, HW, G, silu, 1);
}

idd_status idd_groupnorm_backward_into_f32(float *dx, float *dgamma, float *dbeta, float *dscale,
                                           float *dshift, const float *dout, const float *mean,
                                           const float *rstd, const float *x, const float *gamma,
                                           const float *beta, const float *scale, const float *shift,
                                           int N, int C, int HW, int G, int silu) {
    return gn_backward(dx, dgamma, dbeta, dscale, dshift, dout, mean, rstd, x, gamma, beta, scale,
                       shift, N, C, HW, G, silu, 0);
}
