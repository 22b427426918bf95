/* cuda_common.cuh — what every file of the CUDA backend shares: the C headers of the
 * engine (with C linkage), the backend's stream and cuBLAS handle, error checks that
 * turn a CUDA status into an idd_error naming the op and the sizes, a strided tensor
 * descriptor for kernels, and the device scratch buffers. */
#ifndef IDDPM_CUDA_COMMON_CUH
#define IDDPM_CUDA_COMMON_CUH

#include <cublas_v2.h>
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

__device__ __forceinline__ double cu_load(const void *p, int dt, int64_t i) {
    switch (dt) {
    case IDD_F32: return ((const float *)p)[i];
    case IDD_F64: return ((const double *)p)[i];
    case IDD_I64: return (double)((const int64_t *)p)[i];
    default: return ((const uint8_t *)p)[i];
    }
}
__device__ __forceinline__ void cu_store(void *p, int dt, int64_t i, double v) {
    switch (dt) {
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
idd_status cu_ema(int n, float *const *e, const float *const *p, const int64_t *numel, float rate);
idd_status cu_sumsq(int n, const float *const *g, const int64_t *numel, double *out);
idd_status cu_scale(int n, float *const *g, const int64_t *numel, float s);
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
