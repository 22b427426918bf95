/* norm.cu — group norm fused with scale-shift and SiLU, forward and backward, one
 * block per (sample, group). Same formulas and operation order as engine/cpu/norm.c:
 * statistics in double (two passes), elementwise math in float32.
 * The backward writes per-(n,c) partial sums of dgamma/dbeta to scratch and a second
 * small kernel adds them over the batch, so every gradient has one writer.
 * bf16 activations: the same op on bf16 channels-last x (NHWC memory). A block
 * works on (sample, slab of whole groups, chunk of positions): 128-192 contiguous bytes per
 * position, 16-byte loads of 8 channels, float math, double sums per channel. With one
 * chunk per sample the block does both passes (the second read hits L2); with several,
 * a sums kernel writes per-chunk channel sums and the apply kernel adds them up first. */
#include "cuda_common.cuh"

#include <cuda_bf16.h>
#include <stdlib.h>

#define GN_THREADS 256

/* sum NV doubles over the block; every thread gets the totals */
template <int NV>
__device__ __forceinline__ void block_sum(double (&v)[NV], double (*sh)[32]) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < NV; k++)
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    if (lane == 0)
        for (int k = 0; k < NV; k++) sh[k][wid] = v[k];
    __syncthreads();
    if (wid == 0) {
#pragma unroll
        for (int k = 0; k < NV; k++) {
            double t = lane < nw ? sh[k][lane] : 0.0;
            for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
            if (lane == 0) sh[k][0] = t;
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < NV; k++) v[k] = sh[k][0];
    __syncthreads();
}

__device__ __forceinline__ float sigm(float u) { return 1.0f / (1.0f + expf(-u)); }

__global__ void k_gn_forward(float *out, float *mean, float *rstd, const float *x, const float *gamma,
                             const float *beta, const float *scale, const float *shift, int C, int HW, int G, float eps,
                             int silu) {
    __shared__ double sh[1][32];
    int ng = blockIdx.x, n = ng / G, g = ng % G, Cg = C / G;
    int64_t M = (int64_t)Cg * HW, base = ((int64_t)n * C + (int64_t)g * Cg) * HW;
    const float *xp = x + base;
    double s[1] = {0};
    for (unsigned i = threadIdx.x; i < (unsigned)M; i += blockDim.x) s[0] += xp[i];
    block_sum<1>(s, sh);
    double mu = s[0] / (double)M;
    double q[1] = {0};
    for (unsigned i = threadIdx.x; i < (unsigned)M; i += blockDim.x) {
        double d = xp[i] - mu;
        q[0] += d * d;
    }
    block_sum<1>(q, sh);
    float r = (float)(1.0 / sqrt(q[0] / (double)M + (double)eps)), m = (float)mu;
    if (threadIdx.x == 0) { mean[ng] = m; rstd[ng] = r; }
    float *op = out + base;
    for (unsigned i = threadIdx.x; i < (unsigned)M; i += blockDim.x) {
        int c = g * Cg + (int)(i / (unsigned)HW);   /* 32-bit: 64-bit division is a subroutine */
        float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
        float sc = scale ? 1.0f + scale[(int64_t)n * C + c] : 1.0f;
        float sf = shift ? shift[(int64_t)n * C + c] : 0.0f;
        float u = ((xp[i] - m) * r * ga + be) * sc + sf;
        op[i] = silu ? u * sigm(u) : u;
    }
}

extern "C" idd_status cu_groupnorm_forward(float *out, float *mean, float *rstd, const float *x, const float *gamma,
                                           const float *beta, const float *scale, const float *shift, int N, int C,
                                           int HW, int G, float eps, int silu) {
    CU_PROF("groupnorm_forward");
    if (N <= 0 || C <= 0 || HW <= 0 || G <= 0 || C % G)
        return idd_error("cuda groupnorm_forward: bad sizes: input (%d,%d,%d), %d groups", N, C, HW, G);
    if ((int64_t)(C / G) * HW > INT32_MAX)
        return idd_error("cuda groupnorm_forward: a group of input (%d,%d,%d), %d groups has over 2^31 elements", N, C, HW, G);
    k_gn_forward<<<N * G, GN_THREADS, 0, idd_cu_stream>>>(out, mean, rstd, x, gamma, beta, scale, shift, C, HW, G, eps,
                                                          silu);
    CU_CHECK_LAUNCH("groupnorm_forward", "input (%d,%d,%d) groups %d", N, C, HW, G);
    return IDD_OK;
}

/* pg/pb (N,C): per-sample partial dgamma/dbeta (written, not accumulated) */
__global__ void k_gn_backward(float *dx, float *pg, float *pb, float *dscale, float *dshift, const float *dout,
                              const float *mean, const float *rstd, const float *x, const float *gamma,
                              const float *beta, const float *scale, const float *shift, int C, int HW, int G,
                              int silu) {
    __shared__ double sh[4][32];
    int ng = blockIdx.x, n = ng / G, g = ng % G, Cg = C / G;
    int64_t M = (int64_t)Cg * HW, base = ((int64_t)n * C + (int64_t)g * Cg) * HW;
    const float *xp = x + base, *dp = dout + base;
    float m = mean[ng], r = rstd[ng];
    double sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int cc = 0; cc < Cg; cc++) {
        int c = g * Cg + cc;
        float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
        float sc = scale ? 1.0f + scale[(int64_t)n * C + c] : 1.0f;
        float sf = shift ? shift[(int64_t)n * C + c] : 0.0f;
        const float *xc = xp + (int64_t)cc * HW, *dc = dp + (int64_t)cc * HW;
        double v[4] = {0, 0, 0, 0};   /* du, du*z, dz, dz*xhat */
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            float xh = (xc[i] - m) * r;
            float z = xh * ga + be;
            float du = dc[i];
            if (silu) {
                float u = z * sc + sf, sg = sigm(u);
                du *= sg * (1.0f + u * (1.0f - sg));
            }
            float dz = du * sc;
            v[0] += du;
            v[1] += (double)du * z;
            v[2] += dz;
            v[3] += (double)dz * xh;
        }
        block_sum<4>(v, sh);
        if (threadIdx.x == 0) {
            int64_t nc = (int64_t)n * C + c;
            if (dshift) dshift[nc] += (float)v[0];
            if (dscale) dscale[nc] += (float)v[1];
            if (pb) pb[nc] = (float)v[2];
            if (pg) pg[nc] = (float)v[3];
        }
        sum_dxhat += ga * v[2];
        sum_dxhat_xhat += ga * v[3];
    }
    if (!dx) return;
    float k1 = (float)(sum_dxhat / (double)M), k2 = (float)(sum_dxhat_xhat / (double)M);
    float *dxp = dx + base;
    for (unsigned i = threadIdx.x; i < (unsigned)M; i += blockDim.x) {
        int c = g * Cg + (int)(i / (unsigned)HW);   /* 32-bit: 64-bit division is a subroutine */
        float ga = gamma ? gamma[c] : 1.0f, be = beta ? beta[c] : 0.0f;
        float sc = scale ? 1.0f + scale[(int64_t)n * C + c] : 1.0f;
        float sf = shift ? shift[(int64_t)n * C + c] : 0.0f;
        float xh = (xp[i] - m) * r;
        float du = dp[i];
        if (silu) {
            float u = (xh * ga + be) * sc + sf, sg = sigm(u);
            du *= sg * (1.0f + u * (1.0f - sg));
        }
        float dxh = du * sc * ga;
        dxp[i] += r * (dxh - k1 - xh * k2);
    }
}

__global__ void k_gn_param_grad(float *dgamma, float *dbeta, const float *pg, const float *pb, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sg = 0, sb = 0;
    for (int n = 0; n < N; n++) {
        if (pg) sg += pg[(int64_t)n * C + c];
        if (pb) sb += pb[(int64_t)n * C + c];
    }
    if (dgamma) dgamma[c] += (float)sg;
    if (dbeta) dbeta[c] += (float)sb;
}

extern "C" idd_status cu_groupnorm_backward(float *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                            const float *dout, const float *mean, const float *rstd, const float *x,
                                            const float *gamma, const float *beta, const float *scale,
                                            const float *shift, int N, int C, int HW, int G, int silu) {
    CU_PROF("groupnorm_backward");
    if (N <= 0 || C <= 0 || HW <= 0 || G <= 0 || C % G)
        return idd_error("cuda groupnorm_backward: bad sizes: input (%d,%d,%d), %d groups", N, C, HW, G);
    if ((int64_t)(C / G) * HW > INT32_MAX)
        return idd_error("cuda groupnorm_backward: a group of input (%d,%d,%d), %d groups has over 2^31 elements", N, C, HW, G);
    if (!dx && !dgamma && !dbeta && !dscale && !dshift) return IDD_OK;
    float *pg = NULL, *pb = NULL;
    if (dgamma || dbeta) {
        float *p = (float *)cu_scratch(3, (size_t)2 * N * C * sizeof(float), "groupnorm_backward");
        if (!p) return IDD_ENOMEM;
        pg = dgamma ? p : NULL;
        pb = dbeta ? p + (size_t)N * C : NULL;
    }
    k_gn_backward<<<N * G, GN_THREADS, 0, idd_cu_stream>>>(dx, pg, pb, dscale, dshift, dout, mean, rstd, x, gamma, beta,
                                                           scale, shift, C, HW, G, silu);
    if (pg || pb) k_gn_param_grad<<<(C + 127) / 128, 128, 0, idd_cu_stream>>>(dgamma, dbeta, pg, pb, N, C);
    CU_CHECK_LAUNCH("groupnorm_backward", "input (%d,%d,%d) groups %d", N, C, HW, G);
    return IDD_OK;
}

// ---------------------------------------------------------------- bf16 channels-last

/* the bf16 kernels' sigmoid: fast exp and division (about 2 float ulps; the result is
 * rounded to bf16, 2^16 float ulps) — the float32 kernels keep expf and a true division */
__device__ __forceinline__ float sigm_fast(float u) { return __fdividef(1.0f, 1.0f + __expf(-u)); }

/* Geometry: SC channels per slab (whole groups, a multiple of 8) as nv = SC/8 vectors per
 * position, `rows` positions at a time (blockDim = rows * nv); S chunks of L positions. */
struct gn_geom {
    int C, HW, G, Cg, SC, nv, rows, S, L;
};

/* a channel slab: the smallest multiple of lcm(Cg, 8) that is >= 64 and divides C (else
 * C); chunks: one per sample when the (sample, slab) blocks fill the GPU about twice,
 * else enough for ~4 blocks per SM (IDDPM_GN_CHUNKS=k forces k, for measurements) */
static gn_geom gn_plan(int N, int C, int HW, int G) {
    gn_geom g;
    g.C = C; g.HW = HW; g.G = G; g.Cg = C / G;
    int a = g.Cg, b = 8;
    while (b) { int t = a % b; a = b; b = t; }
    int l = g.Cg / a * 8;
    g.SC = C;
    for (int s = l; s < C; s += l)
        if (s >= 64 && C % s == 0) { g.SC = s; break; }
    g.nv = g.SC / 8;
    g.rows = g.nv >= 256 ? 1 : 256 / g.nv;
    static int force = -1, sms = 0;
    if (force < 0) {
        const char *e = getenv("IDDPM_GN_CHUNKS");
        force = e ? atoi(e) : 0;
        int dev = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (sms <= 0) sms = 100;
    }
    int64_t blocks = (int64_t)N * (C / g.SC);
    int S = 1;
    if (force > 0) S = force;
    else if (blocks < 2 * sms) S = (int)((4 * (int64_t)sms + blocks - 1) / blocks);
    int maxS = (HW + g.rows - 1) / g.rows;   /* at least `rows` positions a chunk */
    if (S > maxS) S = maxS;
    if (S < 1) S = 1;
    g.L = (HW + S - 1) / S;
    g.S = (HW + g.L - 1) / g.L;
    return g;
}

/* sum the per-thread values a[8] of every row into chv[c] (double) for the slab's SC
 * channels; red: float [rows * SC] scratch in shared memory */
__device__ __forceinline__ void gn_rows_sum(double *chv, float *red, const float (&a)[8], const gn_geom &g, int row,
                                            int v) {
#pragma unroll
    for (int k = 0; k < 8; k++) red[row * g.SC + v * 8 + k] = a[k];
    __syncthreads();
    for (int c = threadIdx.x; c < g.SC; c += blockDim.x) {
        double t = 0;
        for (int r = 0; r < g.rows; r++) t += red[r * g.SC + c];
        chv[c] = t;
    }
    __syncthreads();
}

static size_t gn_smem(const gn_geom &g, int nq) {
    return (size_t)nq * g.SC * sizeof(double) + (size_t)g.SC * sizeof(float) + (size_t)g.rows * g.SC * sizeof(float);
}

/* forward, first pass over positions [p0, p1): per-channel sums of d = x - x[position 0]
 * (shifted: no cancellation in the variance) into s1, s2 (double [SC]) and the pivots */
__device__ __forceinline__ void gn_fwd_sums(double *s1, double *s2, float *piv, float *red, const __nv_bfloat16 *x,
                                            size_t base, int p0, int p1, const gn_geom &g, int row, int v) {
    float k[8], a1[8], a2[8], f[8];
    cu_bf8_get(k, *(const uint4 *)(x + base));
#pragma unroll
    for (int j = 0; j < 8; j++) { a1[j] = 0; a2[j] = 0; }
#pragma unroll 4
    for (int p = p0 + row; p < p1; p += g.rows) {
        cu_bf8_get(f, *(const uint4 *)(x + base + (size_t)p * g.C));
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float d = f[j] - k[j];
            a1[j] += d;
            a2[j] += d * d;
        }
    }
    if (row == 0)
        for (int j = 0; j < 8; j++) piv[v * 8 + j] = k[j];
    gn_rows_sum(s1, red, a1, g, row, v);
    gn_rows_sum(s2, red, a2, g, row, v);
}

/* group statistics of the slab from the channel sums (as the float32 kernel: mean and
 * rstd in double, stored as float); block `store` writes them to mean/rstd (N,G) */
__device__ __forceinline__ void gn_fwd_groups(float *gm, float *gr, const double *s1, const double *s2,
                                              const float *piv, float *mean, float *rstd, int n, int c0, float eps,
                                              const gn_geom &g, bool store) {
    int gs = g.SC / g.Cg;
    for (int j = threadIdx.x; j < gs; j += blockDim.x) {
        double M = (double)g.Cg * g.HW, sx = 0, q = 0;
        for (int c = j * g.Cg; c < (j + 1) * g.Cg; c++) sx += s1[c] + (double)g.HW * piv[c];
        double mu = sx / M;
        for (int c = j * g.Cg; c < (j + 1) * g.Cg; c++) {
            double dk = (double)piv[c] - mu;
            q += s2[c] + 2.0 * dk * s1[c] + (double)g.HW * dk * dk;
        }
        double var = q / M;
        if (var < 0) var = 0;
        float m = (float)mu, r = (float)(1.0 / sqrt(var + (double)eps));
        gm[j] = m; gr[j] = r;
        if (store) {
            int ng = n * g.G + c0 / g.Cg + j;
            mean[ng] = m; rstd[ng] = r;
        }
    }
    __syncthreads();
}

/* forward, second pass over [p0, p1): out = silu?(((x - m) * r * gamma + beta) * (1 + scale) + shift) */
__device__ __forceinline__ void gn_fwd_apply(__nv_bfloat16 *out, const __nv_bfloat16 *x, const float *gm,
                                             const float *gr, const float *gamma, const float *beta,
                                             const float *scale, int ss, const float *shift, int hs, size_t base,
                                             int n, int c0, int p0, int p1, const gn_geom &g, int row, int v,
                                             int silu) {
    float m[8], r[8], ga[8], be[8], sc[8], sf[8], f[8];
    int cl = v * 8;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int c = c0 + cl + j, jg = (cl + j) / g.Cg;
        m[j] = gm[jg]; r[j] = gr[jg];
        ga[j] = gamma ? gamma[c] : 1.0f; be[j] = beta ? beta[c] : 0.0f;
        sc[j] = scale ? 1.0f + scale[(size_t)n * ss + c] : 1.0f;
        sf[j] = shift ? shift[(size_t)n * hs + c] : 0.0f;
    }
#pragma unroll 4
    for (int p = p0 + row; p < p1; p += g.rows) {
        size_t o = base + (size_t)p * g.C;
        cu_bf8_get(f, *(const uint4 *)(x + o));
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float u = ((f[j] - m[j]) * r[j] * ga[j] + be[j]) * sc[j] + sf[j];
            f[j] = silu ? u * sigm_fast(u) : u;
        }
        *(uint4 *)(out + o) = cu_bf8_put(f);
    }
}

/* blockIdx: x sample, y slab, z chunk. part: (N, S, 2, C) double channel sums (split
 * forward) */
#define GN_BLOCK_SETUP                                                                             \
    int n = blockIdx.x, c0 = blockIdx.y * g.SC, v = threadIdx.x % g.nv, row = threadIdx.x / g.nv; \
    int p0 = blockIdx.z * g.L, p1 = min(g.HW, p0 + g.L);                                         \
    size_t base = (size_t)n * g.HW * g.C + c0 + v * 8;

/* one chunk per sample: both passes in one block; 4 blocks of 256 threads per SM (64
 * registers, a few bytes spilled; one wave at b256 x 128 channels; 3 measured slower) */
__global__ void __launch_bounds__(256, 4) k_gn_fwd_bf16(__nv_bfloat16 *out, float *mean, float *rstd, const __nv_bfloat16 *x,
                              const float *gamma, const float *beta, const float *scale, int ss, const float *shift,
                              int hs, gn_geom g, float eps, int silu) {
    extern __shared__ double smem[];
    double *s1 = smem, *s2 = s1 + g.SC;
    float *piv = (float *)(s2 + g.SC), *red = piv + g.SC;
    __shared__ float gm[128], gr[128];
    GN_BLOCK_SETUP
    gn_fwd_sums(s1, s2, piv, red, x, base, 0, g.HW, g, row, v);
    gn_fwd_groups(gm, gr, s1, s2, piv, mean, rstd, n, c0, eps, g, true);
    gn_fwd_apply(out, x, gm, gr, gamma, beta, scale, ss, shift, hs, base, n, c0, 0, g.HW, g, row, v, silu);
}

/* split forward, pass 1: the chunk's channel sums into part */
__global__ void __launch_bounds__(256, 4) k_gn_fwd_sums_bf16(double *part, const __nv_bfloat16 *x, gn_geom g) {
    extern __shared__ double smem[];
    double *s1 = smem, *s2 = s1 + g.SC;
    float *piv = (float *)(s2 + g.SC), *red = piv + g.SC;
    GN_BLOCK_SETUP
    gn_fwd_sums(s1, s2, piv, red, x, base, p0, p1, g, row, v);
    double *pp = part + ((size_t)n * g.S + blockIdx.z) * 2 * g.C + c0;
    for (int c = threadIdx.x; c < g.SC; c += blockDim.x) { pp[c] = s1[c]; pp[g.C + c] = s2[c]; }
}

/* split forward, pass 2: add the chunks' sums, then normalize this chunk */
__global__ void __launch_bounds__(256, 4) k_gn_fwd_apply_bf16(__nv_bfloat16 *out, float *mean, float *rstd, const double *part,
                                    const __nv_bfloat16 *x, const float *gamma, const float *beta, const float *scale,
                                    int ss, const float *shift, int hs, gn_geom g, float eps, int silu) {
    extern __shared__ double smem[];
    double *s1 = smem, *s2 = s1 + g.SC;
    float *piv = (float *)(s2 + g.SC);
    __shared__ float gm[128], gr[128];
    GN_BLOCK_SETUP
    for (int c = threadIdx.x; c < g.SC; c += blockDim.x) {
        double a = 0, b = 0;
        for (int k = 0; k < g.S; k++) {
            const double *pp = part + ((size_t)n * g.S + k) * 2 * g.C + c0;
            a += pp[c];
            b += pp[g.C + c];
        }
        s1[c] = a; s2[c] = b;
        piv[c] = __bfloat162float(x[(size_t)n * g.HW * g.C + c0 + c]);
    }
    __syncthreads();
    gn_fwd_groups(gm, gr, s1, s2, piv, mean, rstd, n, c0, eps, g, blockIdx.z == 0);
    gn_fwd_apply(out, x, gm, gr, gamma, beta, scale, ss, shift, hs, base, n, c0, p0, p1, g, row, v, silu);
}

static idd_status gn_check_bf16(const char *op, const void *x, int N, int C, int HW, int G) {
    if (N <= 0 || C <= 0 || HW <= 0 || G <= 0 || C % G)
        return idd_error("cuda %s: bad sizes: input (%d,%d,%d), %d groups", op, N, C, HW, G);
    if (C % 8 || C > 1024 || ((uintptr_t)x & 15))
        return idd_error("cuda %s: bf16 input (%d,%d,%d) needs C %% 8 == 0, C <= 1024 and 16-byte alignment", op, N, C,
                         HW);
    if (gn_plan(N, C, HW, G).SC / (C / G) > 128)
        return idd_error("cuda %s: bf16 input (%d,%d,%d), %d groups: over 128 groups per block", op, N, C, HW, G);
    return IDD_OK;
}

extern "C" idd_status cu_groupnorm_forward_bf16(void *out, float *mean, float *rstd, const void *x,
                                                const float *gamma, const float *beta, const float *scale,
                                                int scale_stride, const float *shift, int shift_stride, int N, int C,
                                                int HW, int G, float eps, int silu) {
    CU_PROF("groupnorm_forward_bf16");
    idd_status st = gn_check_bf16("groupnorm_forward_bf16", x, N, C, HW, G);
    if (st != IDD_OK) return st;
    gn_geom g = gn_plan(N, C, HW, G);
    dim3 grid(N, C / g.SC, g.S);
    const __nv_bfloat16 *xb = (const __nv_bfloat16 *)x;
    if (g.S == 1) {
        k_gn_fwd_bf16<<<grid, g.rows * g.nv, gn_smem(g, 2), idd_cu_stream>>>(
            (__nv_bfloat16 *)out, mean, rstd, xb, gamma, beta, scale, scale_stride, shift, shift_stride, g, eps, silu);
    } else {
        double *part = (double *)cu_scratch(5, (size_t)N * g.S * 2 * C * sizeof(double), "groupnorm_forward_bf16");
        if (!part) return IDD_ENOMEM;
        k_gn_fwd_sums_bf16<<<grid, g.rows * g.nv, gn_smem(g, 2), idd_cu_stream>>>(part, xb, g);
        k_gn_fwd_apply_bf16<<<grid, g.rows * g.nv, gn_smem(g, 2), idd_cu_stream>>>(
            (__nv_bfloat16 *)out, mean, rstd, part, xb, gamma, beta, scale, scale_stride, shift, shift_stride, g, eps,
            silu);
    }
    CU_CHECK_LAUNCH("groupnorm_forward_bf16", "input (%d,%d,%d) groups %d", N, C, HW, G);
    return IDD_OK;
}

/* backward parameters of the thread's 8 channels */
struct gn_bw_par {
    float m[8], r[8], ga[8], be[8], sc[8], sf[8];
};
__device__ __forceinline__ void gn_bw_load(gn_bw_par &q, const float *mean, const float *rstd, const float *gamma,
                                           const float *beta, const float *scale, int ss, const float *shift, int hs,
                                           int n, int c0, int v, const gn_geom &g) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int c = c0 + v * 8 + j, ng = n * g.G + c / g.Cg;
        q.m[j] = mean[ng]; q.r[j] = rstd[ng];
        q.ga[j] = gamma ? gamma[c] : 1.0f; q.be[j] = beta ? beta[c] : 0.0f;
        q.sc[j] = scale ? 1.0f + scale[(size_t)n * ss + c] : 1.0f;
        q.sf[j] = shift ? shift[(size_t)n * hs + c] : 0.0f;
    }
}

/* one element of the backward: xh = (x - mean) * rstd, z = xh * gamma + beta, and the
 * gradient du reaching z (through the SiLU of u = z * (1 + scale) + shift when silu) */
__device__ __forceinline__ float gn_du(float x, float d, const gn_bw_par &q, int j, int silu, float &xh, float &z) {
    xh = (x - q.m[j]) * q.r[j];
    z = xh * q.ga[j] + q.be[j];
    if (silu) {
        float u = z * q.sc[j] + q.sf[j], sg = sigm_fast(u);
        d *= sg * (1.0f + u * (1.0f - sg));
    }
    return d;
}

/* backward pass 1 over [p0, p1): per-channel sums of du, du*z, dz, dz*xhat into v0..v3 */
__device__ __forceinline__ void gn_bwd_sums(double *v0, double *v1, double *v2, double *v3, float *red,
                                            const __nv_bfloat16 *x, const __nv_bfloat16 *dout, const gn_bw_par &q,
                                            size_t base, int p0, int p1, const gn_geom &g, int row, int v, int silu) {
    float a0[8], a1[8], a2[8], a3[8], fx[8], fd[8];
#pragma unroll
    for (int j = 0; j < 8; j++) { a0[j] = 0; a1[j] = 0; a2[j] = 0; a3[j] = 0; }
#pragma unroll 2
    for (int p = p0 + row; p < p1; p += g.rows) {
        size_t o = base + (size_t)p * g.C;
        cu_bf8_get(fx, *(const uint4 *)(x + o));
        cu_bf8_get(fd, *(const uint4 *)(dout + o));
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float xh, z;
            float du = gn_du(fx[j], fd[j], q, j, silu, xh, z);
            float dz = du * q.sc[j];
            a0[j] += du;
            a1[j] += du * z;
            a2[j] += dz;
            a3[j] += dz * xh;
        }
    }
    gn_rows_sum(v0, red, a0, g, row, v);
    gn_rows_sum(v1, red, a1, g, row, v);
    gn_rows_sum(v2, red, a2, g, row, v);
    gn_rows_sum(v3, red, a3, g, row, v);
}

/* the per-sample outputs of the channel sums (block `store` only), then k1, k2 per group
 * and dx over [p0, p1) */
__device__ __forceinline__ void gn_bwd_finish(__nv_bfloat16 *dx, float *pg, float *pb, float *dscale, float *dshift,
                                              const double *v0, const double *v1, const double *v2, const double *v3,
                                              float *gk1, float *gk2, const __nv_bfloat16 *x,
                                              const __nv_bfloat16 *dout, const float *gamma, const gn_bw_par &q,
                                              size_t base, int n, int c0, int p0, int p1, const gn_geom &g, int row,
                                              int v, int silu, bool store) {
    if (store)
        for (int c = threadIdx.x; c < g.SC; c += blockDim.x) {
            size_t nc = (size_t)n * g.C + c0 + c;
            if (dshift) dshift[nc] += (float)v0[c];
            if (dscale) dscale[nc] += (float)v1[c];
            if (pb) pb[nc] = (float)v2[c];
            if (pg) pg[nc] = (float)v3[c];
        }
    if (!dx) return;
    int gs = g.SC / g.Cg;
    for (int j = threadIdx.x; j < gs; j += blockDim.x) {
        double M = (double)g.Cg * g.HW, s2 = 0, s3 = 0;
        for (int c = j * g.Cg; c < (j + 1) * g.Cg; c++) {
            float gac = gamma ? gamma[c0 + c] : 1.0f;
            s2 += gac * v2[c];
            s3 += gac * v3[c];
        }
        gk1[j] = (float)(s2 / M);
        gk2[j] = (float)(s3 / M);
    }
    __syncthreads();
    float k1[8], k2[8], fx[8], fd[8];
    int cl = v * 8;
#pragma unroll
    for (int j = 0; j < 8; j++) { k1[j] = gk1[(cl + j) / g.Cg]; k2[j] = gk2[(cl + j) / g.Cg]; }
#pragma unroll 2
    for (int p = p0 + row; p < p1; p += g.rows) {
        size_t o = base + (size_t)p * g.C;
        cu_bf8_get(fx, *(const uint4 *)(x + o));
        cu_bf8_get(fd, *(const uint4 *)(dout + o));
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float xh, z;
            float du = gn_du(fx[j], fd[j], q, j, silu, xh, z);
            float dxh = du * q.sc[j] * q.ga[j];
            fx[j] = q.r[j] * (dxh - k1[j] - xh * k2[j]);
        }
        *(uint4 *)(dx + o) = cu_bf8_put(fx);
    }
}

/* dout, x, dx (N, HW, C) bf16, dx written; pg/pb (N,C) per-sample partial dgamma/dbeta
 * (written); dscale/dshift (N,C) contiguous, accumulated. One chunk per sample; 2 blocks
 * per SM (122 registers; bounding it to 3 spilled and measured slower). */
__global__ void __launch_bounds__(256, 2) k_gn_bwd_bf16(__nv_bfloat16 *dx, float *pg, float *pb, float *dscale, float *dshift,
                              const __nv_bfloat16 *dout, const float *mean, const float *rstd,
                              const __nv_bfloat16 *x, const float *gamma, const float *beta, const float *scale,
                              int ss, const float *shift, int hs, gn_geom g, int silu) {
    extern __shared__ double smem[];
    double *v0 = smem, *v1 = v0 + g.SC, *v2 = v1 + g.SC, *v3 = v2 + g.SC;
    float *red = (float *)(v3 + g.SC) + g.SC;
    __shared__ float gk1[128], gk2[128];
    GN_BLOCK_SETUP
    gn_bw_par q;
    gn_bw_load(q, mean, rstd, gamma, beta, scale, ss, shift, hs, n, c0, v, g);
    gn_bwd_sums(v0, v1, v2, v3, red, x, dout, q, base, 0, g.HW, g, row, v, silu);
    gn_bwd_finish(dx, pg, pb, dscale, dshift, v0, v1, v2, v3, gk1, gk2, x, dout, gamma, q, base, n, c0, 0, g.HW, g,
                  row, v, silu, true);
}

/* split backward, pass 1: the chunk's four channel sums into part (N, S, 4, C) double */
__global__ void k_gn_bwd_sums_bf16(double *part, const __nv_bfloat16 *dout, const float *mean, const float *rstd,
                                   const __nv_bfloat16 *x, const float *gamma, const float *beta, const float *scale,
                                   int ss, const float *shift, int hs, gn_geom g, int silu) {
    extern __shared__ double smem[];
    double *v0 = smem, *v1 = v0 + g.SC, *v2 = v1 + g.SC, *v3 = v2 + g.SC;
    float *red = (float *)(v3 + g.SC) + g.SC;
    GN_BLOCK_SETUP
    gn_bw_par q;
    gn_bw_load(q, mean, rstd, gamma, beta, scale, ss, shift, hs, n, c0, v, g);
    gn_bwd_sums(v0, v1, v2, v3, red, x, dout, q, base, p0, p1, g, row, v, silu);
    double *pp = part + ((size_t)n * g.S + blockIdx.z) * 4 * g.C + c0;
    for (int c = threadIdx.x; c < g.SC; c += blockDim.x) {
        pp[c] = v0[c]; pp[g.C + c] = v1[c]; pp[2 * g.C + c] = v2[c]; pp[3 * g.C + c] = v3[c];
    }
}

/* split backward, pass 2: add the chunks' sums, then dx of this chunk */
__global__ void k_gn_bwd_dx_bf16(__nv_bfloat16 *dx, float *pg, float *pb, float *dscale, float *dshift,
                                 const double *part, const __nv_bfloat16 *dout, const float *mean, const float *rstd,
                                 const __nv_bfloat16 *x, const float *gamma, const float *beta, const float *scale,
                                 int ss, const float *shift, int hs, gn_geom g, int silu) {
    extern __shared__ double smem[];
    double *v0 = smem, *v1 = v0 + g.SC, *v2 = v1 + g.SC, *v3 = v2 + g.SC;
    __shared__ float gk1[128], gk2[128];
    GN_BLOCK_SETUP
    for (int c = threadIdx.x; c < g.SC; c += blockDim.x) {
        double a[4] = {0, 0, 0, 0};
        for (int k = 0; k < g.S; k++) {
            const double *pp = part + ((size_t)n * g.S + k) * 4 * g.C + c0;
            for (int t = 0; t < 4; t++) a[t] += pp[t * g.C + c];
        }
        v0[c] = a[0]; v1[c] = a[1]; v2[c] = a[2]; v3[c] = a[3];
    }
    __syncthreads();
    gn_bw_par q;
    gn_bw_load(q, mean, rstd, gamma, beta, scale, ss, shift, hs, n, c0, v, g);
    gn_bwd_finish(dx, pg, pb, dscale, dshift, v0, v1, v2, v3, gk1, gk2, x, dout, gamma, q, base, n, c0, p0, p1, g,
                  row, v, silu, blockIdx.z == 0);
}

extern "C" idd_status cu_groupnorm_backward_bf16(void *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                                 const void *dout, const float *mean, const float *rstd, const void *x,
                                                 const float *gamma, const float *beta, const float *scale,
                                                 int scale_stride, const float *shift, int shift_stride, int N, int C,
                                                 int HW, int G, int silu) {
    CU_PROF("groupnorm_backward_bf16");
    idd_status st = gn_check_bf16("groupnorm_backward_bf16", x, N, C, HW, G);
    if (st != IDD_OK) return st;
    if (((uintptr_t)dout & 15) || ((uintptr_t)dx & 15))
        return idd_error("cuda groupnorm_backward_bf16: dout/dx of input (%d,%d,%d) not 16-byte aligned", N, C, HW);
    if (!dx && !dgamma && !dbeta && !dscale && !dshift) return IDD_OK;
    float *pg = NULL, *pb = NULL;
    if (dgamma || dbeta) {
        float *p = (float *)cu_scratch(3, (size_t)2 * N * C * sizeof(float), "groupnorm_backward_bf16");
        if (!p) return IDD_ENOMEM;
        pg = dgamma ? p : NULL;
        pb = dbeta ? p + (size_t)N * C : NULL;
    }
    gn_geom g = gn_plan(N, C, HW, G);
    dim3 grid(N, C / g.SC, g.S);
    __nv_bfloat16 *dxb = (__nv_bfloat16 *)dx;
    const __nv_bfloat16 *db = (const __nv_bfloat16 *)dout, *xb = (const __nv_bfloat16 *)x;
    if (g.S == 1) {
        k_gn_bwd_bf16<<<grid, g.rows * g.nv, gn_smem(g, 4), idd_cu_stream>>>(
            dxb, pg, pb, dscale, dshift, db, mean, rstd, xb, gamma, beta, scale, scale_stride, shift, shift_stride, g,
            silu);
    } else {
        double *part = (double *)cu_scratch(5, (size_t)N * g.S * 4 * C * sizeof(double), "groupnorm_backward_bf16");
        if (!part) return IDD_ENOMEM;
        k_gn_bwd_sums_bf16<<<grid, g.rows * g.nv, gn_smem(g, 4), idd_cu_stream>>>(
            part, db, mean, rstd, xb, gamma, beta, scale, scale_stride, shift, shift_stride, g, silu);
        k_gn_bwd_dx_bf16<<<grid, g.rows * g.nv, gn_smem(g, 4), idd_cu_stream>>>(
            dxb, pg, pb, dscale, dshift, part, db, mean, rstd, xb, gamma, beta, scale, scale_stride, shift,
            shift_stride, g, silu);
    }
    if (pg || pb) k_gn_param_grad<<<(C + 127) / 128, 128, 0, idd_cu_stream>>>(dgamma, dbeta, pg, pb, N, C);
    CU_CHECK_LAUNCH("groupnorm_backward_bf16", "input (%d,%d,%d) groups %d", N, C, HW, G);
    return IDD_OK;
}
