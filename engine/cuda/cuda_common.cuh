/* cuda_common.cuh — what every file of the CUDA backend shares: the C headers of the
 * engine (with C linkage), the backend's stream and cuBLAS handle, error checks that
 * turn a CUDA status into an idd_error naming the op and the sizes, a strided tensor
 * descriptor for kernels, and the device scratch buffers. */
#ifndef IDDPM_CUDA_COMMON_CUH
#define IDDPM_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "iddpm/backend.h"
#include "iddpm/core.h"
#include "iddpm/tensor.h"
#include "iddpm/cuda.h"
}

/* the one stream every kernel, copy and cuBLAS call of the backend runs on */
extern cudaStream_t idd_cu_stream;
extern cublasHandle_t idd_cu_blas;
/* IDD_PREC_* and IDD_CONV_* (include/iddpm/cuda.h), set by idd_cuda_set_precision/_conv_impl */
extern int idd_cu_precision;
extern int idd_cu_conv_impl;

/* After a launch: turn a pending CUDA error into "cuda <op> (<sizes>): <message>". */
#define CU_CHECK_LAUNCH(opname, fmt, ...)                                                          \
    do {                                                                                           \
        cudaError_t e_ = cudaGetLastError();                                                       \
        if (e_ != cudaSuccess)                                                                     \
            return idd_error("cuda %s " fmt ": %s", opname, __VA_ARGS__, cudaGetErrorString(e_));  \
    } while (0)
#define CU_TRY(call, opname)                                                                       \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return idd_error("cuda %s: %s", opname, cudaGetErrorString(e_));    \
    } while (0)
#define BLAS_TRY(call, opname, fmt, ...)                                                           \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                           \
            return idd_error("cuda %s " fmt ": cuBLAS status %d", opname, __VA_ARGS__, (int)s_);   \
    } while (0)

/* A tensor as a kernel sees it: after coalescing, up to IDD_MAX_DIMS dims. */
struct cu_desc {
    int64_t shape[IDD_MAX_DIMS];
    int64_t stride[IDD_MAX_DIMS];
    int ndim;
};

/* Coalesce the dims of n same-shape tensors (drop size-1 dims, merge dims that are
 * contiguous with respect to each other in every operand). Fills d[k] and base offsets;
 * returns the element count. */
int64_t cu_coalesce(int n, const idd_tensor *const *ts, cu_desc *d);
/* The same after ordering the dims by ts[0]'s strides, largest first (stable), so that
 * operands that share one dense layout (channels-last ones: NHWC memory) coalesce to a
 * single stride-1 dim, and a kernel walks ts[0] (the output) in memory order. */
int64_t cu_coalesce_sorted(int n, const idd_tensor *const *ts, cu_desc *d);

/* Device scratch memory (grow-only per slot, stream-ordered: only valid until the next
 * call for the same slot). NULL on out-of-memory, with the message set. */
void *cu_scratch(int slot, size_t nbytes, const char *op);

/* IDDPM_CUDA_PROFILE=1: each backend entry point that opens a CU_PROF scope waits for
 * the stream before and after itself and adds the wall time to a per-name total; the
 * table (calls, ms, share) is printed to stderr at exit. Off: one branch per call. */
struct cu_prof_scope {
    int slot;
    double t0;
    explicit cu_prof_scope(const char *name);
    ~cu_prof_scope();
};
#define CU_PROF(name) cu_prof_scope prof_scope_(name)

static inline unsigned cu_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 2147483647 ? 2147483647 : (b < 1 ? 1 : b));
}

/* element i of a strided descriptor -> storage offset (relative to the base) */
__device__ __forceinline__ int64_t cu_offset(const cu_desc &d, int64_t i) {
    int64_t off = 0;
    for (int k = d.ndim - 1; k >= 0; k--) {
        int64_t s = d.shape[k];
        off += (i % s) * d.stride[k];
        i /= s;
    }
    return off;
}

/* The same walk in 32-bit for up to 3 operands that share one coalesced shape: the
 * linear index is split into coordinates once (unsigned 32-bit div/mod) and dotted with
 * each operand's strides. 64-bit division is a long subroutine on the GPU; with one
 * per dim per operand, broadcast adds and strided copies were bound by it rather than
 * by memory. cu_desc32_make (memory.cu) fills it when the element count and every
 * operand's offsets fit in int32, else returns false (the kernels keep cu_offset). */
struct cu_desc32 {
    unsigned shape[IDD_MAX_DIMS];
    int stride[3][IDD_MAX_DIMS];
    int ndim;
};
bool cu_desc32_make(int nop, const cu_desc *d, int64_t numel, cu_desc32 *out);

/* The 8-wide walk: every 8 consecutive elements share their outer coordinates (the
 * innermost coalesced dim is a multiple of 8), ts[0] runs with stride 1 along it, the
 * others with stride 1 or 0 (a broadcast value: a bias over NHWC rows), and the stride-1
 * ones are 16-byte aligned at every row start. Then one index split per 8 elements and
 * 16-byte accesses: a channels-last tensor plus an (N,C,1,1) one, a cat along C.
 * inner[k] gets operand k's inner stride (0 or 1). */
bool cu_vec8_ok(int nop, const cu_desc *d, const void *const *ptrs, const size_t *elsize, int *inner);

template <int NOP> __device__ __forceinline__ void cu_offsets32(const cu_desc32 &d, unsigned i, int off[NOP]) {
    for (int k = 0; k < NOP; k++) off[k] = 0;
    for (int j = d.ndim - 1; j >= 0; j--) {
        unsigned c = i;
        if (j > 0) {
            unsigned q = i / d.shape[j];
            c = i - q * d.shape[j];
            i = q;
        }
        for (int k = 0; k < NOP; k++) off[k] += (int)c * d.stride[k][j];
    }
}

/* bfloat16 bits <-> float, rounding to nearest even as idd_bf16_from_f32 (bf16.h) does,
 * NaNs included, so GPU and CPU conversions agree bit for bit */
__device__ __forceinline__ float cu_bf16_to_f32(uint16_t h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ uint16_t cu_f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* typed element access for the float32 / bfloat16 kernels (bf16 stored as uint16_t):
 * values travel as float */
__device__ __forceinline__ float cu_ld(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float cu_ld(const uint16_t *p, int64_t i) { return cu_bf16_to_f32(p[i]); }
__device__ __forceinline__ void cu_st(float *p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void cu_st(uint16_t *p, int64_t i, float v) { p[i] = cu_f32_to_bf16(v); }

/* 8 consecutive elements at p (16-byte aligned) to and from float: one 16-byte access
 * per 8 bf16, two float4 per 8 float32 */
__device__ __forceinline__ void cu_ld8(const float *p, float v[8]) {
    float4 x = ((const float4 *)p)[0], y = ((const float4 *)p)[1];
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w, v[4] = y.x, v[5] = y.y, v[6] = y.z, v[7] = y.w;
}
__device__ __forceinline__ void cu_ld8(const uint16_t *p, float v[8]) {
    uint4 u = *(const uint4 *)p;
    unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void cu_st8(float *p, const float v[8]) {
    ((float4 *)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4 *)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void cu_st8(uint16_t *p, const float v[8]) {
    unsigned w[4];
    for (int k = 0; k < 4; k++) w[k] = (unsigned)cu_f32_to_bf16(v[2 * k]) | ((unsigned)cu_f32_to_bf16(v[2 * k + 1]) << 16);
    *(uint4 *)p = make_uint4(w[0], w[1], w[2], w[3]);
}

/* 8 bf16 in one 16-byte word <-> 8 floats, with the hardware's round-to-nearest-even
 * conversion (NaNs come out as the canonical NaN: the layer kernels' loads and stores) */
__device__ __forceinline__ void cu_bf8_get(float (&f)[8], uint4 u) {
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 t = __bfloat1622float2(h[k]);
        f[2 * k] = t.x;
        f[2 * k + 1] = t.y;
    }
}
__device__ __forceinline__ uint4 cu_bf8_put(const float (&f)[8]) {
    uint4 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
    for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    return u;
}

__device__ __forceinline__ double cu_load(const void *p, int dt, int64_t i) {
    switch (dt) {
    case IDD_BF16: return cu_bf16_to_f32(((const uint16_t *)p)[i]);
    case IDD_F32: return ((const float *)p)[i];
    case IDD_F64: return ((const double *)p)[i];
    case IDD_I64: return (double)((const int64_t *)p)[i];
    default: return ((const uint8_t *)p)[i];
    }
}
__device__ __forceinline__ void cu_store(void *p, int dt, int64_t i, double v) {
    switch (dt) {
    case IDD_BF16: ((uint16_t *)p)[i] = cu_f32_to_bf16((float)v); break;
    case IDD_F32: ((float *)p)[i] = (float)v; break;
    case IDD_F64: ((double *)p)[i] = v; break;
    case IDD_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    default: ((uint8_t *)p)[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); break;
    }
}

/* float32 column-major strided-batched C = alpha op(A) op(B) + beta C (cuBLAS argument
 * order) in the current precision: exact fp32, TF32 or bf16 tensor cores (gemm.cu) */
cublasStatus_t cu_sgemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float *A,
                        int lda, int64_t sA, const float *B, int ldb, int64_t sB, float beta, float *C, int ldc,
                        int64_t sC, int batch);
/* row-major strided-batched C (M,N) = alpha op(A) op(B) + beta C with A, B of type ab and C
 * of type ct (bf16 / fp32), fp32 accumulation (gemm.cu) */
cublasStatus_t cu_gemm_rm(bool ta, bool tb, int M, int N, int K, float alpha, const void *A, int lda, int64_t sA,
                          const void *B, int ldb, int64_t sB, cudaDataType ab, float beta, void *C, int ldc, int64_t sC,
                          cudaDataType ct, int batch);
/* the same with device arrays of batch pointers (cublasGemmBatchedEx) */
cublasStatus_t cu_gemm_rm_ptr(bool ta, bool tb, int M, int N, int K, float alpha, const void *const *A, int lda,
                              const void *const *B, int ldb, cudaDataType ab, float beta, void *const *C, int ldc,
                              cudaDataType ct, int batch);

/* conv_cudnn.cu: the cuDNN convolution, same contract as cu_conv2d_forward/backward
 * (sizes already checked). cu_cudnn_ready() opens cuDNN on first use; false (after one
 * note on stderr) when it cannot, and conv.cu then runs im2col. */
bool cu_cudnn_ready(void);
/* db (O) += sum over n and p of dout (N,O,P), float32 with double partial sums (both convs) */
idd_status cu_conv_bias_grad(float *db, const float *dout, int N, int O, int P);
idd_status cu_cudnn_conv_forward(float *out, const float *x, const float *w, const float *b, int N, int C, int H, int W,
                                 int O, int KH, int KW, int stride, int pad, int Ho, int Wo);
idd_status cu_cudnn_conv_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                                  int N, int C, int H, int W, int O, int KH, int KW, int stride, int pad, int Ho,
                                  int Wo);
/* the same on bf16 NHWC x/out/dout/dx (void *), float32 w/b/dw/db; dx written */
idd_status cu_cudnn_conv_forward_bf16(void *out, const void *x, const float *w, const float *b, int N, int C, int H,
                                      int W, int O, int KH, int KW, int stride, int pad, int Ho, int Wo);
idd_status cu_cudnn_conv_backward_bf16(void *dx, float *dw, float *db, const void *dout, const void *x, const float *w,
                                       int N, int C, int H, int W, int O, int KH, int KW, int stride, int pad, int Ho,
                                       int Wo);

/* C-linkage entry points of each file, gathered into the table in memory.cu */
extern "C" {
idd_status cu_copy(idd_tensor *dst, const idd_tensor *src);
idd_status cu_fill(idd_tensor *t, double v);
idd_status cu_binary(idd_binop op, idd_tensor *out, const idd_tensor *a, const idd_tensor *b);
idd_status cu_unary(idd_unop op, idd_tensor *out, const idd_tensor *a);
idd_status cu_clamp(idd_tensor *out, const idd_tensor *a, double lo, double hi);
idd_status cu_affine(idd_tensor *out, const idd_tensor *a, double s, double b);
idd_status cu_reduce(idd_redop op, idd_tensor *out, idd_tensor *idx, const idd_tensor *a, int dim);
idd_status cu_bmm(idd_tensor *c, const idd_tensor *a, const idd_tensor *b, bool ta, bool tb, double alpha,
                  double beta);
idd_status cu_rand_normal(idd_tensor *t, uint64_t seed, uint64_t stream, uint64_t offset);
idd_status cu_rand_uniform(idd_tensor *t, uint64_t seed, uint64_t stream, uint64_t offset);
idd_status cu_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed, uint64_t stream,
                              uint64_t offset);
idd_status cu_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                               uint64_t offset);
idd_status cu_conv2d_forward(float *out, const float *x, const float *w, const float *b, int N, int C, int H, int W,
                             int O, int KH, int KW, int stride, int pad);
idd_status cu_conv2d_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w, int N,
                              int C, int H, int W, int O, int KH, int KW, int stride, int pad);
idd_status cu_groupnorm_forward(float *out, float *mean, float *rstd, const float *x, const float *gamma,
                                const float *beta, const float *scale, const float *shift, int N, int C, int HW, int G,
                                float eps, int silu);
idd_status cu_groupnorm_backward(float *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                 const float *dout, const float *mean, const float *rstd, const float *x,
                                 const float *gamma, const float *beta, const float *scale, const float *shift, int N,
                                 int C, int HW, int G, int silu);
idd_status cu_conv2d_forward_bf16(uint16_t *out, const uint16_t *x, const float *w, const float *b, int N, int C,
                                  int H, int W, int O, int KH, int KW, int stride, int pad);
idd_status cu_conv2d_backward_bf16(uint16_t *dx, float *dw, float *db, const uint16_t *dout, const uint16_t *x,
                                   const float *w, int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                   int pad);
idd_status cu_attention_forward_bf16(uint16_t *out, uint16_t *weight, const uint16_t *qkv, int B, int C, int T, int H);
idd_status cu_attention_backward_bf16(uint16_t *dqkv, const uint16_t *dout, const uint16_t *weight,
                                      const uint16_t *qkv, int B, int C, int T, int H);
idd_status cu_attention_forward(float *out, float *weight, const float *qkv, int B, int C, int T, int H);
idd_status cu_attention_backward(float *dqkv, const float *dout, const float *weight, const float *qkv, int B, int C,
                                 int T, int H);
idd_status cu_upsample2x_forward(float *out, const float *x, int N, int C, int H, int W);
idd_status cu_upsample2x_backward(float *dx, const float *dout, int N, int C, int H, int W);
idd_status cu_avgpool2x_forward(float *out, const float *x, int N, int C, int H, int W);
idd_status cu_avgpool2x_backward(float *dx, const float *dout, int N, int C, int H, int W);
idd_status cu_timestep_embedding(float *out, const float *t, int N, int dim, float max_period);
idd_status cu_upload_async(void *dst, const void *src, size_t n);
idd_status cu_diff_pointwise(int op, const idd_diff_args *a, float *out, const float *x, const float *y,
                             const float *z);
idd_status cu_diff_p_finish(const idd_diff_args *a, const float *mo, const float *xt, float *px, float *mean,
                            float *var, float *logvar);
idd_status cu_diff_losses(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                          const float *noise, float *loss, float *mse, float *vb);
idd_status cu_diff_losses_backward(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                                   const float *noise, const float *dloss, float *dmo);
idd_status cu_adamw(int n, float *const *p, const float *const *g, float *const *m, float *const *v,
                    const int64_t *numel, const float hp[6]);
idd_status cu_ema(int n, float *const *e, const float *const *p, const int64_t *numel, double rate);
idd_status cu_sumsq(int n, const float *const *g, const int64_t *numel, double *out);
idd_status cu_scale(int n, float *const *g, const int64_t *numel, double s);
}

/* bf16 channels-last layer kernels (norm.cu, resample.cu, rng.cu; backend.h) */
extern "C" {
idd_status cu_groupnorm_forward_bf16(void *out, float *mean, float *rstd, const void *x, const float *gamma,
                                     const float *beta, const float *scale, int scale_stride, const float *shift,
                                     int shift_stride, int N, int C, int HW, int G, float eps, int silu);
idd_status cu_groupnorm_backward_bf16(void *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                      const void *dout, const float *mean, const float *rstd, const void *x,
                                      const float *gamma, const float *beta, const float *scale, int scale_stride,
                                      const float *shift, int shift_stride, int N, int C, int HW, int G, int silu);
idd_status cu_upsample2x_forward_bf16(void *out, const void *x, int N, int C, int H, int W);
idd_status cu_upsample2x_backward_bf16(void *dx, const void *dout, int N, int C, int H, int W);
idd_status cu_avgpool2x_forward_bf16(void *out, const void *x, int N, int C, int H, int W);
idd_status cu_avgpool2x_backward_bf16(void *dx, const void *dout, int N, int C, int H, int W);
idd_status cu_dropout_forward_bf16(void *out, const void *x, int64_t n, float p, uint64_t seed, uint64_t stream,
                                   uint64_t offset);
idd_status cu_dropout_backward_bf16(void *dx, const void *dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                                    uint64_t offset);
}

#endif
