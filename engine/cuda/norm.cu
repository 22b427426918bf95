/* norm.cu — group norm fused with scale-shift and SiLU, forward and backward, one
 * block per (sample, group). Same formulas and operation order as engine/ops/norm.c:
 * statistics in double (two passes), elementwise math in float32.
 * The backward writes per-(n,c) partial sums of dgamma/dbeta to scratch and a second
 * small kernel adds them over the batch, so every gradient has one writer. */
#include "cuda_common.cuh"

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
