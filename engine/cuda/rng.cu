/* rng.cu — the Philox4x32-10 streams and dropout on the device. The generator is the
 * one of include/iddpm/philox.h, step for step (same rounds, constants, 53-bit
 * uniforms and Box-Muller in double), so a tensor drawn on the GPU holds the numbers
 * the CPU draws for the same (seed, stream, offset), and dropout keeps the same mask.
 * bf16 dropout indexes the mask by memory order (the CPU's mask for a contiguous
 * tensor; for a channels-last one it is the mask of the NHWC element order). */
#include "cuda_common.cuh"

#include <cuda_bf16.h>
#include <math.h>

__device__ __forceinline__ void philox4x32(uint64_t seed, uint64_t stream, uint64_t ctr, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
    for (int r = 0; r < 10; r++) {
        uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c1 = lo1;
        c3 = lo0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

__device__ __forceinline__ void philox_uniform2(uint64_t seed, uint64_t stream, uint64_t ctr, double v[2]) {
    uint32_t r[4];
    philox4x32(seed, stream, ctr, r);
    v[0] = (double)((((uint64_t)r[0]) << 21) ^ (r[1] >> 11)) * 0x1p-53;
    v[1] = (double)((((uint64_t)r[2]) << 21) ^ (r[3] >> 11)) * 0x1p-53;
}

__device__ __forceinline__ void philox_normal2(uint64_t seed, uint64_t stream, uint64_t ctr, double v[2]) {
    double u[2];
    philox_uniform2(seed, stream, ctr, u);
    double rad = sqrt(-2.0 * log(1.0 - u[0]));
    double th = 6.283185307179586 * u[1];
    double s, c;
    sincos(th, &s, &c);
    v[0] = rad * c;
    v[1] = rad * s;
}

__global__ void k_rand(void *p, int dt, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset, int normal) {
    int64_t pairs = (n + 1) / 2;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < pairs; j += (int64_t)gridDim.x * blockDim.x) {
        double v[2];
        if (normal) philox_normal2(seed, stream, offset + (uint64_t)j, v);
        else philox_uniform2(seed, stream, offset + (uint64_t)j, v);
        cu_store(p, dt, 2 * j, v[0]);
        if (2 * j + 1 < n) cu_store(p, dt, 2 * j + 1, v[1]);
    }
}

static idd_status rand_common(idd_tensor *t, uint64_t seed, uint64_t stream, uint64_t offset, int normal) {
    int64_t n = idd_numel(t);
    if (n == 0) return IDD_OK;
    unsigned nb = cu_blocks((n + 1) / 2, 256);
    if (nb > 65536) nb = 65536;
    k_rand<<<nb, 256, 0, idd_cu_stream>>>(idd_data(t), t->dtype, n, seed, stream, offset, normal);
    char sb[96];
    CU_CHECK_LAUNCH(normal ? "randn" : "rand", "%s", idd_shape_str(t, sb, 96));
    return IDD_OK;
}

extern "C" idd_status cu_rand_normal(idd_tensor *t, uint64_t s, uint64_t st, uint64_t o) {
    CU_PROF("rand");
    return rand_common(t, s, st, o, 1);
}
extern "C" idd_status cu_rand_uniform(idd_tensor *t, uint64_t s, uint64_t st, uint64_t o) {
    CU_PROF("rand");
    return rand_common(t, s, st, o, 0);
}

__global__ void k_dropout(float *out, const float *x, int64_t n, float p, uint64_t seed, uint64_t stream,
                          uint64_t offset, int backward) {
    float scale = 1.0f / (1.0f - p);
    int64_t pairs = (n + 1) / 2;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < pairs; j += (int64_t)gridDim.x * blockDim.x) {
        double u[2];
        philox_uniform2(seed, stream, offset + (uint64_t)j, u);
        for (int k = 0; k < 2 && 2 * j + k < n; k++) {
            int64_t i = 2 * j + k;
            if (backward) { if (u[k] >= p) out[i] += x[i] * scale; }
            else out[i] = u[k] >= p ? x[i] * scale : 0.0f;
        }
    }
}

extern "C" idd_status cu_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed, uint64_t stream,
                                         uint64_t offset) {
    CU_PROF("dropout_forward");
    if (n == 0) return IDD_OK;
    unsigned nb = cu_blocks((n + 1) / 2, 256);
    if (nb > 65536) nb = 65536;
    k_dropout<<<nb, 256, 0, idd_cu_stream>>>(out, x, n, p, seed, stream, offset, 0);
    CU_CHECK_LAUNCH("dropout", "n %lld p %g", (long long)n, (double)p);
    return IDD_OK;
}

extern "C" idd_status cu_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed,
                                          uint64_t stream, uint64_t offset) {
    CU_PROF("dropout_backward");
    if (n == 0) return IDD_OK;
    unsigned nb = cu_blocks((n + 1) / 2, 256);
    if (nb > 65536) nb = 65536;
    k_dropout<<<nb, 256, 0, idd_cu_stream>>>(dx, dout, n, p, seed, stream, offset, 1);
    CU_CHECK_LAUNCH("dropout_backward", "n %lld p %g", (long long)n, (double)p);
    return IDD_OK;
}

/* bf16, any dense layout: element i of memory; backward writes dx (not accumulated). The
 * keep test is the CPU's integer form: the 53-bit draw v keeps when v >= ceil(p * 2^53),
 * the same as uniform = v * 2^-53 >= p, without the conversions to double. */
__global__ void k_dropout_bf16(__nv_bfloat16 *out, const __nv_bfloat16 *x, int64_t n, float p, uint64_t thr,
                               uint64_t seed, uint64_t stream, uint64_t offset) {
    float scale = 1.0f / (1.0f - p);
    int64_t pairs = (n + 1) / 2;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < pairs; j += (int64_t)gridDim.x * blockDim.x) {
        uint32_t r[4];
        philox4x32(seed, stream, offset + (uint64_t)j, r);
        bool keep0 = ((((uint64_t)r[0]) << 21) ^ (r[1] >> 11)) >= thr;
        bool keep1 = ((((uint64_t)r[2]) << 21) ^ (r[3] >> 11)) >= thr;
        int64_t i = 2 * j;
        if (i + 1 < n && !((uintptr_t)(out + i) & 3) && !((uintptr_t)(x + i) & 3)) {
            float2 f = __bfloat1622float2(*(const __nv_bfloat162 *)(x + i));
            *(__nv_bfloat162 *)(out + i) = __floats2bfloat162_rn(keep0 ? f.x * scale : 0.0f, keep1 ? f.y * scale : 0.0f);
        } else {
            out[i] = __float2bfloat16_rn(keep0 ? __bfloat162float(x[i]) * scale : 0.0f);
            if (i + 1 < n) out[i + 1] = __float2bfloat16_rn(keep1 ? __bfloat162float(x[i + 1]) * scale : 0.0f);
        }
    }
}

static idd_status dropout_bf16(const char *op, void *out, const void *x, int64_t n, float p, uint64_t seed,
                               uint64_t stream, uint64_t offset) {
    if (n == 0) return IDD_OK;
    unsigned nb = cu_blocks((n + 1) / 2, 256);
    if (nb > 65536) nb = 65536;
    uint64_t thr = (uint64_t)ceil((double)p * 0x1p53);
    k_dropout_bf16<<<nb, 256, 0, idd_cu_stream>>>((__nv_bfloat16 *)out, (const __nv_bfloat16 *)x, n, p, thr, seed,
                                                  stream, offset);
    CU_CHECK_LAUNCH(op, "n %lld p %g", (long long)n, (double)p);
    return IDD_OK;
}

extern "C" idd_status cu_dropout_forward_bf16(void *out, const void *x, int64_t n, float p, uint64_t seed,
                                              uint64_t stream, uint64_t offset) {
    CU_PROF("dropout_forward_bf16");
    return dropout_bf16("dropout_forward_bf16", out, x, n, p, seed, stream, offset);
}
extern "C" idd_status cu_dropout_backward_bf16(void *dx, const void *dout, int64_t n, float p, uint64_t seed,
                                               uint64_t stream, uint64_t offset) {
    CU_PROF("dropout_backward_bf16");
    return dropout_bf16("dropout_backward_bf16", dx, dout, n, p, seed, stream, offset);
}
