/* resample.cu — nearest 2x upsample, 2x2 average pool (forward and accumulating
 * backward) and the sinusoidal timestep embedding (float32 in the order of
 * engine/cpu/embedding.c). The bf16 variants work on channels-last (NHWC) tensors, 8
 * channels (16 bytes) per thread, and write their backward instead of accumulating. */
#include "cuda_common.cuh"

#include <cuda_bf16.h>

#include <math.h>

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)
/* the resampling kernels take their index type: unsigned when the element count fits
 * (32-bit div/mod; 64-bit division is a long subroutine on the GPU), else int64_t */
#define GRID_STRIDE_T(I, i, n) \
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < (I)(n); i += (I)gridDim.x * blockDim.x)

static unsigned grid_for(int64_t n) {
    unsigned nb = cu_blocks(n, 256);
    return nb > 65536 ? 65536 : nb;
}

template <typename I> __global__ void k_up_fwd(float *out, const float *x, int64_t planes, int H, int W) {
    int W2 = 2 * W, H2 = 2 * H;
    GRID_STRIDE_T(I, e, planes * H2 * W2) {
        int xx = (int)(e % (I)W2), y = (int)((e / (I)W2) % (I)H2);
        int64_t pl = (int64_t)(e / ((I)W2 * (I)H2));
        out[e] = x[(pl * H + y / 2) * W + xx / 2];
    }
}
template <typename I> __global__ void k_up_bwd(float *dx, const float *dout, int64_t planes, int H, int W) {
    int W2 = 2 * W;
    GRID_STRIDE_T(I, e, planes * H * W) {
        int xx = (int)(e % (I)W), y = (int)((e / (I)W) % (I)H);
        int64_t pl = (int64_t)(e / ((I)W * (I)H));
        const float *d = dout + (pl * 2 * H + 2 * y) * W2 + 2 * xx;
        dx[e] += d[0] + d[1] + d[W2] + d[W2 + 1];
    }
}
template <typename I> __global__ void k_pool_fwd(float *out, const float *x, int64_t planes, int H, int W) {
    int Ho = H / 2, Wo = W / 2;
    GRID_STRIDE_T(I, e, planes * Ho * Wo) {
        int ox = (int)(e % (I)Wo), oy = (int)((e / (I)Wo) % (I)Ho);
        int64_t pl = (int64_t)(e / ((I)Wo * (I)Ho));
        const float *p = x + (pl * H + 2 * oy) * W + 2 * ox;
        out[e] = (p[0] + p[1] + p[W] + p[W + 1]) * 0.25f;
    }
}
template <typename I> __global__ void k_pool_bwd(float *dx, const float *dout, int64_t planes, int H, int W) {
    int Ho = H / 2, Wo = W / 2;
    GRID_STRIDE_T(I, e, planes * H * W) {
        int xx = (int)(e % (I)W), y = (int)((e / (I)W) % (I)H);
        int64_t pl = (int64_t)(e / ((I)W * (I)H));
        if (y / 2 < Ho && xx / 2 < Wo) dx[e] += dout[(pl * Ho + y / 2) * Wo + xx / 2] * 0.25f;
    }
}

#define CHECK_SIZES(fn)                                                                            \
    if (N <= 0 || C <= 0 || H <= 0 || W <= 0)                                                      \
        return idd_error("cuda %s: bad sizes: input (%d,%d,%d,%d)", fn, N, C, H, W);

extern "C" idd_status cu_upsample2x_forward(float *out, const float *x, int N, int C, int H, int W) {
    CU_PROF("upsample2x_forward");
    CHECK_SIZES("upsample2x_forward");
    int64_t pl = (int64_t)N * C;
    if (pl * 4 * H * W <= INT32_MAX)
        k_up_fwd<unsigned><<<grid_for(pl * 4 * H * W), 256, 0, idd_cu_stream>>>(out, x, pl, H, W);
    else
        k_up_fwd<int64_t><<<grid_for(pl * 4 * H * W), 256, 0, idd_cu_stream>>>(out, x, pl, H, W);
    CU_CHECK_LAUNCH("upsample2x_forward", "input (%d,%d,%d,%d)", N, C, H, W);
    return IDD_OK;
}
extern "C" idd_status cu_upsample2x_backward(float *dx, const float *dout, int N, int C, int H, int W) {
    CU_PROF("upsample2x_backward");
    CHECK_SIZES("upsample2x_backward");
    int64_t pl = (int64_t)N * C;
    if (pl * H * W <= INT32_MAX)
        k_up_bwd<unsigned><<<grid_for(pl * H * W), 256, 0, idd_cu_stream>>>(dx, dout, pl, H, W);
    else
        k_up_bwd<int64_t><<<grid_for(pl * H * W), 256, 0, idd_cu_stream>>>(dx, dout, pl, H, W);
    CU_CHECK_LAUNCH("upsample2x_backward", "input (%d,%d,%d,%d)", N, C, H, W);
    return IDD_OK;
}
extern "C" idd_status cu_avgpool2x_forward(float *out, const float *x, int N, int C, int H, int W) {
    CU_PROF("avgpool2x_forward");
    CHECK_SIZES("avgpool2x_forward");
    int64_t pl = (int64_t)N * C;
    if (H / 2 == 0 || W / 2 == 0) return IDD_OK;
    if (pl * (H / 2) * (W / 2) <= INT32_MAX)
        k_pool_fwd<unsigned><<<grid_for(pl * (H / 2) * (W / 2)), 256, 0, idd_cu_stream>>>(out, x, pl, H, W);
    else
        k_pool_fwd<int64_t><<<grid_for(pl * (H / 2) * (W / 2)), 256, 0, idd_cu_stream>>>(out, x, pl, H, W);
    CU_CHECK_LAUNCH("avgpool2x_forward", "input (%d,%d,%d,%d)", N, C, H, W);
    return IDD_OK;
}
extern "C" idd_status cu_avgpool2x_backward(float *dx, const float *dout, int N, int C, int H, int W) {
    CU_PROF("avgpool2x_backward");
    CHECK_SIZES("avgpool2x_backward");
    int64_t pl = (int64_t)N * C;
    if (pl * H * W <= INT32_MAX)
        k_pool_bwd<unsigned><<<grid_for(pl * H * W), 256, 0, idd_cu_stream>>>(dx, dout, pl, H, W);
    else
        k_pool_bwd<int64_t><<<grid_for(pl * H * W), 256, 0, idd_cu_stream>>>(dx, dout, pl, H, W);
    CU_CHECK_LAUNCH("avgpool2x_backward", "input (%d,%d,%d,%d)", N, C, H, W);
    return IDD_OK;
}

// ---------------------------------------------------------------- bf16 channels-last

/* x (N,H,W,nv) and out (N,2H,2W,nv) in 16-byte vectors; a thread per input vector */
template <typename I> __global__ void k_up_fwd_bf16(uint4 *out, const uint4 *x, int64_t N, int H, int W, int nv) {
    GRID_STRIDE_T(I, e, N * H * W * nv) {
        I pos = e / (I)nv;
        int v = (int)(e - pos * (I)nv), xx = (int)(pos % (I)W), y = (int)((pos / (I)W) % (I)H);
        I n = pos / ((I)W * (I)H);
        uint4 u = x[e];
        I o = ((n * (I)(2 * H) + (I)(2 * y)) * (I)(2 * W) + (I)(2 * xx)) * (I)nv + (I)v;
        out[o] = u;
        out[o + nv] = u;
        out[o + (I)(2 * W) * nv] = u;
        out[o + (I)(2 * W) * nv + nv] = u;
    }
}
/* dx (N,H,W,nv) = sum of the four dout (N,2H,2W,nv) it was copied to (written) */
template <typename I> __global__ void k_up_bwd_bf16(uint4 *dx, const uint4 *dout, int64_t N, int H, int W, int nv) {
    GRID_STRIDE_T(I, e, N * H * W * nv) {
        I pos = e / (I)nv;
        int v = (int)(e - pos * (I)nv), xx = (int)(pos % (I)W), y = (int)((pos / (I)W) % (I)H);
        I n = pos / ((I)W * (I)H);
        I o = ((n * (I)(2 * H) + (I)(2 * y)) * (I)(2 * W) + (I)(2 * xx)) * (I)nv + (I)v, rw = (I)(2 * W) * nv;
        float a[8], b[8], c[8], d[8];
        cu_bf8_get(a, dout[o]); cu_bf8_get(b, dout[o + nv]); cu_bf8_get(c, dout[o + rw]); cu_bf8_get(d, dout[o + rw + nv]);
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] = a[k] + b[k] + c[k] + d[k];
        dx[e] = cu_bf8_put(a);
    }
}
/* out (N,H/2,W/2,nv) = mean of the 2x2 window of x (N,H,W,nv); a thread per output vector */
template <typename I> __global__ void k_pool_fwd_bf16(uint4 *out, const uint4 *x, int64_t N, int H, int W, int nv) {
    int Ho = H / 2, Wo = W / 2;
    GRID_STRIDE_T(I, e, N * Ho * Wo * nv) {
        I pos = e / (I)nv;
        int v = (int)(e - pos * (I)nv), ox = (int)(pos % (I)Wo), oy = (int)((pos / (I)Wo) % (I)Ho);
        I n = pos / ((I)Wo * (I)Ho);
        I i = ((n * (I)H + (I)(2 * oy)) * (I)W + (I)(2 * ox)) * (I)nv + (I)v, rw = (I)W * nv;
        float a[8], b[8], c[8], d[8];
        cu_bf8_get(a, x[i]); cu_bf8_get(b, x[i + nv]); cu_bf8_get(c, x[i + rw]); cu_bf8_get(d, x[i + rw + nv]);
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] = (a[k] + b[k] + c[k] + d[k]) * 0.25f;
        out[e] = cu_bf8_put(a);
    }
}
/* dx (N,H,W,nv) = dout/4 of its window, 0 in an odd last row/column (written) */
template <typename I> __global__ void k_pool_bwd_bf16(uint4 *dx, const uint4 *dout, int64_t N, int H, int W, int nv) {
    int Ho = H / 2, Wo = W / 2;
    GRID_STRIDE_T(I, e, N * H * W * nv) {
        I pos = e / (I)nv;
        int v = (int)(e - pos * (I)nv), xx = (int)(pos % (I)W), y = (int)((pos / (I)W) % (I)H);
        I n = pos / ((I)W * (I)H);
        float a[8];
        if (y / 2 < Ho && xx / 2 < Wo) {
            cu_bf8_get(a, dout[((n * (I)Ho + (I)(y / 2)) * (I)Wo + (I)(xx / 2)) * (I)nv + (I)v]);
#pragma unroll
            for (int k = 0; k < 8; k++) a[k] *= 0.25f;
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) a[k] = 0.0f;
        }
        dx[e] = cu_bf8_put(a);
    }
}

/* bf16 entries: x/out NHWC, C % 8 == 0, 16-byte aligned (checked); which: 0 up fwd,
 * 1 up bwd, 2 pool fwd, 3 pool bwd. The element count of the larger side picks the index type. */
static idd_status resample_bf16(const char *op, int which, void *dst, const void *src, int N, int C, int H, int W) {
    if (N <= 0 || C <= 0 || H <= 0 || W <= 0) return idd_error("cuda %s: bad sizes: input (%d,%d,%d,%d)", op, N, C, H, W);
    if (C % 8 || ((uintptr_t)dst & 15) || ((uintptr_t)src & 15))
        return idd_error("cuda %s: bf16 input (%d,%d,%d,%d) needs C %% 8 == 0 and 16-byte alignment", op, N, C, H, W);
    int nv = C / 8;
    int64_t big = (int64_t)N * C * H * W * (which < 2 ? 4 : 1), work = (int64_t)N * H * W * nv;
    if (which == 2) work = (int64_t)N * (H / 2) * (W / 2) * nv;
    if (work == 0) return IDD_OK;
    uint4 *d = (uint4 *)dst;
    const uint4 *s = (const uint4 *)src;
    unsigned nb = grid_for(work);
    bool narrow = big <= INT32_MAX;
    switch (which) {
    case 0: if (narrow) k_up_fwd_bf16<unsigned><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv);
            else k_up_fwd_bf16<int64_t><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv); break;
    case 1: if (narrow) k_up_bwd_bf16<unsigned><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv);
            else k_up_bwd_bf16<int64_t><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv); break;
    case 2: if (narrow) k_pool_fwd_bf16<unsigned><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv);
            else k_pool_fwd_bf16<int64_t><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv); break;
    default: if (narrow) k_pool_bwd_bf16<unsigned><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv);
             else k_pool_bwd_bf16<int64_t><<<nb, 256, 0, idd_cu_stream>>>(d, s, N, H, W, nv); break;
    }
    CU_CHECK_LAUNCH(op, "input (%d,%d,%d,%d)", N, C, H, W);
    return IDD_OK;
}

extern "C" idd_status cu_upsample2x_forward_bf16(void *out, const void *x, int N, int C, int H, int W) {
    CU_PROF("upsample2x_forward_bf16");
    return resample_bf16("upsample2x_forward_bf16", 0, out, x, N, C, H, W);
}
extern "C" idd_status cu_upsample2x_backward_bf16(void *dx, const void *dout, int N, int C, int H, int W) {
    CU_PROF("upsample2x_backward_bf16");
    return resample_bf16("upsample2x_backward_bf16", 1, dx, dout, N, C, H, W);
}
extern "C" idd_status cu_avgpool2x_forward_bf16(void *out, const void *x, int N, int C, int H, int W) {
    CU_PROF("avgpool2x_forward_bf16");
    return resample_bf16("avgpool2x_forward_bf16", 2, out, x, N, C, H, W);
}
extern "C" idd_status cu_avgpool2x_backward_bf16(void *dx, const void *dout, int N, int C, int H, int W) {
    CU_PROF("avgpool2x_backward_bf16");
    return resample_bf16("avgpool2x_backward_bf16", 3, dx, dout, N, C, H, W);
}

__global__ void k_temb(float *out, const float *t, int N, int dim, int half, float neg_log) {
    GRID_STRIDE(e, (int64_t)N * dim) {
        int n = (int)(e / dim), j = (int)(e % dim);
        float v = 0.0f;
        if (j < 2 * half) {
            int i = j < half ? j : j - half;
            float ex = neg_log * (float)i;
            ex = ex / (float)half;
            /* correctly rounded float results (as glibc's expf/cosf/sinf give on the
             * CPU): CUDA's float versions are up to 2 ulp off, which t ~ 4000 magnifies */
            float freq = (float)exp((double)ex);
            float arg = t[n] * freq;
            v = (float)(j < half ? cos((double)arg) : sin((double)arg));
        }
        out[e] = v;
    }
}

extern "C" idd_status cu_timestep_embedding(float *out, const float *t, int N, int dim, float max_period) {
    CU_PROF("timestep_embedding");
    if (N <= 0 || dim <= 0) return idd_error("cuda timestep_embedding: bad sizes: %d timesteps, dim %d", N, dim);
    if (!(max_period > 0))
        return idd_error("cuda timestep_embedding: max_period must be positive, got %g", (double)max_period);
    int half = dim / 2;
    float neg_log = (float)-log((double)max_period);
    k_temb<<<grid_for((int64_t)N * dim), 256, 0, idd_cu_stream>>>(out, t, N, dim, half, neg_log);
    CU_CHECK_LAUNCH("timestep_embedding", "%d timesteps, dim %d", N, dim);
    return IDD_OK;
}
