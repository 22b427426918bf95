/* conv_cudnn.cu — conv2d forward, backward data, backward filter through cuDNN (the
 * legacy convolution API of cuDNN 9), the default conv of the CUDA backend (conv.cu
 * dispatches here; IDDPM_CUDA_CONV=im2col keeps the old path).
 *
 * A plan per (pass, sizes, precision) holds the cuDNN descriptors and the algorithm
 * that cudnnFind*AlgorithmEx measured fastest on the first call with those sizes; the
 * workspace is one grow-only scratch slot of the caching allocator.
 *   fp32  float32 NCHW tensors, CUDNN_FMA_MATH (no tensor cores: exact fp32 products)
 *   tf32  float32 NCHW tensors, tensor-op math (TF32)
 *   bf16  x, w, dout converted on the fly to bfloat16 NHWC (one tiled transpose-cast
 *         kernel each), cuDNN bf16 tensor cores with fp32 accumulation, the bf16 NHWC
 *         result converted back into the float32 NCHW output (+ bias, or += for the
 *         gradients). Tensors outside the op stay float32.
 * The bias gradient is conv.cu's float32 reduction (double partial sums) in every mode.
 * bf16 tensors (channels-last, the GPU's bf16 activations) take their own entries at the
 * end: cuDNN on them in place (a 1x1 stride-1 convolution: one cuBLAS GEMM), float32
 * weight cast per call, bias in a bf16 NHWC pass. */
#include "cuda_common.cuh"

#ifdef IDDPM_NO_CUDNN
/* built without cuDNN's header (Makefile): conv.cu always runs im2col + cuBLAS */
bool cu_cudnn_ready(void) { return false; }
idd_status cu_cudnn_conv_forward(float *, const float *, const float *, const float *, int, int, int, int, int, int,
                                 int, int, int, int, int) {
    return idd_error("cuda conv2d_forward: built without cuDNN");
}
idd_status cu_cudnn_conv_backward(float *, float *, float *, const float *, const float *, const float *, int, int,
                                  int, int, int, int, int, int, int, int, int) {
    return idd_error("cuda conv2d_backward: built without cuDNN");
}
idd_status cu_cudnn_conv_forward_bf16(void *, const void *, const float *, const float *, int, int, int, int, int, int,
                                      int, int, int, int, int) {
    return idd_error("cuda conv2d_forward (bf16): built without cuDNN");
}
idd_status cu_cudnn_conv_backward_bf16(void *, float *, float *, const void *, const void *, const float *, int, int,
                                       int, int, int, int, int, int, int, int, int) {
    return idd_error("cuda conv2d_backward (bf16): built without cuDNN");
}
#else

#include <cuda_bf16.h>
#include <cudnn.h>
#include <stdio.h>
#include <stdlib.h>
#include <vector>

/* scratch slots (memory.cu): workspace, then bf16 copies of x, w, dout/out, dx, dw */
enum { S_WS = 6, S_X = 7, S_W = 8, S_Y = 9, S_DX = 10, S_DW = 11 };
/* workspace offered to cudnnFind*Ex; algorithms that need more are not considered
 * (IDDPM_CUDNN_WS_MB overrides; IDDPM_CUDNN_FIND_VERBOSE=1 prints every search) */
static size_t find_ws(void) {
    static size_t ws = 0;
    if (!ws) {
        const char *e = getenv("IDDPM_CUDNN_WS_MB");
        ws = (size_t)(e && atoi(e) > 0 ? atoi(e) : 256) << 20;
    }
    return ws;
}
#define FIND_WS find_ws()

static cudnnHandle_t dnn;

#define CONV_SIZES "input (%d,%d,%d,%d) weight (%d,%d,%d,%d) stride %d pad %d"
#define CONV_ARGS N, C, H, W, O, C, KH, KW, stride, pad
#define DNN_TRY(call, opname)                                                                                       \
    do {                                                                                                            \
        cudnnStatus_t s_ = (call);                                                                                  \
        if (s_ != CUDNN_STATUS_SUCCESS)                                                                             \
            return idd_error("cuda %s " CONV_SIZES ": cuDNN: %s", opname, CONV_ARGS, cudnnGetErrorString(s_));      \
    } while (0)

bool cu_cudnn_ready(void) {
    static int state = 0;   /* 0 not tried, 1 open, -1 unavailable */
    if (state == 0) {
        cudnnStatus_t s = cudnnCreate(&dnn);
        if (s == CUDNN_STATUS_SUCCESS) s = cudnnSetStream(dnn, idd_cu_stream);
        state = s == CUDNN_STATUS_SUCCESS ? 1 : -1;
        if (state < 0)
            fprintf(stderr, "iddpm: cuDNN could not be opened (%s); conv2d runs im2col + cuBLAS\n",
                    cudnnGetErrorString(s));
    }
    return state == 1;
}

// ---------------------------------------------------------------- layout casts

/* dst (B,S,R) bf16 = src (B,R,S) float32, transposed through a 32x32 shared tile:
 * NCHW -> NHWC with R = C, S = H*W; OIHW -> OHWI with R = I, S = KH*KW */
__global__ void k_to_bf16_t(__nv_bfloat16 *dst, const float *src, int R, int S) {
    __shared__ float tile[32][33];
    int64_t b = blockIdx.z;
    int s0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    const float *sp = src + b * R * (int64_t)S;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int r = r0 + i, s = s0 + threadIdx.x;
        if (r < R && s < S) tile[i][threadIdx.x] = sp[(int64_t)r * S + s];
    }
    __syncthreads();
    __nv_bfloat16 *dp = dst + b * R * (int64_t)S;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int s = s0 + i, r = r0 + threadIdx.x;
        if (r < R && s < S) dp[(int64_t)s * R + r] = __float2bfloat16(tile[threadIdx.x][i]);
    }
}

/* dst (B,R,S) float32 = beta * dst + src (B,S,R) bf16 (+ bias[r]): the way back */
__global__ void k_from_bf16_t(float *dst, const __nv_bfloat16 *src, const float *bias, float beta, int R, int S) {
    __shared__ float tile[32][33];
    int64_t b = blockIdx.z;
    int s0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    const __nv_bfloat16 *sp = src + b * R * (int64_t)S;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int s = s0 + i, r = r0 + threadIdx.x;
        if (r < R && s < S) tile[threadIdx.x][i] = __bfloat162float(sp[(int64_t)s * R + r]);
    }
    __syncthreads();
    float *dp = dst + b * R * (int64_t)S;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int r = r0 + i, s = s0 + threadIdx.x;
        if (r < R && s < S) {
            float v = tile[i][threadIdx.x] + (bias ? bias[r] : 0.0f);
            int64_t e = (int64_t)r * S + s;
            dp[e] = beta != 0.0f ? beta * dp[e] + v : v;
        }
    }
}

static dim3 tgrid(int B, int R, int S) {
    return dim3((unsigned)((S + 31) / 32), (unsigned)((R + 31) / 32), (unsigned)B);
}

/* (B,R,S) float32 -> bf16 (B,S,R) in scratch slot; NULL on out-of-memory */
static __nv_bfloat16 *to_bf16(int slot, const float *src, int B, int R, int S, const char *op) {
    __nv_bfloat16 *d = (__nv_bfloat16 *)cu_scratch(slot, (size_t)B * R * S * sizeof(__nv_bfloat16), op);
    if (d) k_to_bf16_t<<<tgrid(B, R, S), dim3(32, 8), 0, idd_cu_stream>>>(d, src, R, S);
    return d;
}
static void from_bf16(float *dst, const __nv_bfloat16 *src, const float *bias, float beta, int B, int R, int S) {
    k_from_bf16_t<<<tgrid(B, R, S), dim3(32, 8), 0, idd_cu_stream>>>(dst, src, bias, beta, R, S);
}

/* out (N,O,P) += b[o] */
__global__ void k_add_bias(float *out, const float *b, int O, int64_t P, int64_t total) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
        out[e] += b[(e / P) % O];
}
static void from_bias(float *out, const float *b, int N, int O, int64_t P) {
    int64_t total = (int64_t)N * O * P;
    unsigned nb = cu_blocks(total, 256);
    k_add_bias<<<nb > 65536 ? 65536 : nb, 256, 0, idd_cu_stream>>>(out, b, O, P, total);
}

// ---------------------------------------------------------------- plans

enum { FWD = 0, BWD_DATA = 1, BWD_FILTER = 2 };
/* plan mode: the precision (IDD_PREC_FP32 / _TF32) of the float32-tensor path, or ACT_BF16
 * for bf16 channels-last tensors (bf16 NHWC descriptors, tensor cores, fp32 accumulation;
 * the float32 path in precision bf16 casts to those and uses them too) */
enum { ACT_BF16 = 16 };

struct conv_plan {
    int key[11];   /* pass, N, C, H, W, O, KH, KW, stride, pad, precision */
    cudnnTensorDescriptor_t xd = NULL, yd = NULL;
    cudnnFilterDescriptor_t wd = NULL;
    cudnnConvolutionDescriptor_t cd = NULL;
    int algo = -1;
    size_t ws = 0;
};
static std::vector<conv_plan *> plans;

static conv_plan *plan_lookup(const int key[11]) {
    for (conv_plan *p : plans) {
        bool same = true;
        for (int i = 0; i < 11 && same; i++) same = p->key[i] == key[i];
        if (same) return p;
    }
    return NULL;
}

/* descriptors for the sizes; the algorithm is found by plan_find */
static idd_status plan_make(conv_plan *p, int mode, int N, int C, int H, int W, int O, int KH, int KW, int stride,
                            int pad, int Ho, int Wo) {
    const char *op = "conv2d (cuDNN descriptors)";
    bool bf = mode == ACT_BF16;
    cudnnDataType_t dt = bf ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
    cudnnTensorFormat_t fmt = bf ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    DNN_TRY(cudnnCreateTensorDescriptor(&p->xd), op);
    DNN_TRY(cudnnCreateTensorDescriptor(&p->yd), op);
    DNN_TRY(cudnnCreateFilterDescriptor(&p->wd), op);
    DNN_TRY(cudnnCreateConvolutionDescriptor(&p->cd), op);
    DNN_TRY(cudnnSetTensor4dDescriptor(p->xd, fmt, dt, N, C, H, W), op);
    DNN_TRY(cudnnSetTensor4dDescriptor(p->yd, fmt, dt, N, O, Ho, Wo), op);
    DNN_TRY(cudnnSetFilter4dDescriptor(p->wd, dt, fmt, O, C, KH, KW), op);
    DNN_TRY(cudnnSetConvolution2dDescriptor(p->cd, pad, pad, stride, stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                            CUDNN_DATA_FLOAT),
            op);
    DNN_TRY(cudnnSetConvolutionMathType(p->cd, mode == IDD_PREC_FP32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH), op);
    return IDD_OK;
}

/* the fastest algorithm that ran and fits FIND_WS; in fp32 only FMA algorithms count */
template <typename Perf> static int pick(const Perf *r, int n, int mode, size_t *ws, cudnnMathType_t *math) {
    static int verbose = -1;
    if (verbose < 0) verbose = getenv("IDDPM_CUDNN_FIND_VERBOSE") != NULL;
    for (int i = 0; verbose && i < n; i++)
        fprintf(stderr, "#   cudnn find (mode %d): algo %d status %d %.3f ms ws %.1f MiB math %d\n", mode, (int)r[i].algo,
                (int)r[i].status, r[i].time, r[i].memory / 1048576.0, (int)r[i].mathType);
    for (int i = 0; i < n; i++) {
        if (r[i].status != CUDNN_STATUS_SUCCESS || r[i].memory > FIND_WS) continue;
        if (mode == IDD_PREC_FP32 && r[i].mathType != CUDNN_FMA_MATH && r[i].mathType != CUDNN_DEFAULT_MATH)
            continue;
        *ws = r[i].memory;
        *math = mode == IDD_PREC_FP32 ? CUDNN_FMA_MATH : r[i].mathType;
        return (int)r[i].algo;
    }
    return -1;
}

/* times the algorithms of the pass with cudnnFind*Ex on the operands given and keeps
 * the fastest in p (algo, ws, math type) */
static idd_status plan_find(conv_plan *p, int mode, int pass, const void *a, const void *b, void *out, int N, int C, int H,
                            int W, int O, int KH, int KW, int stride, int pad) {
    const char *op = pass == FWD        ? "conv2d_forward (cuDNN find)"
                     : pass == BWD_DATA ? "conv2d_backward dx (cuDNN find)"
                                        : "conv2d_backward dw (cuDNN find)";
    void *ws = cu_scratch(S_WS, FIND_WS, op);
    if (!ws) return IDD_ENOMEM;
    int got = 0, algo = -1;
    cudnnMathType_t math = CUDNN_DEFAULT_MATH;
    if (pass == FWD) {
        cudnnConvolutionFwdAlgoPerf_t r[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
        DNN_TRY(cudnnFindConvolutionForwardAlgorithmEx(dnn, p->xd, a, p->wd, b, p->cd, p->yd, out,
                                                       CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &got, r, ws, FIND_WS),
                op);
        algo = pick(r, got, mode, &p->ws, &math);
    } else if (pass == BWD_DATA) {
        cudnnConvolutionBwdDataAlgoPerf_t r[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
        DNN_TRY(cudnnFindConvolutionBackwardDataAlgorithmEx(dnn, p->wd, a, p->yd, b, p->cd, p->xd, out,
                                                            CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &got, r, ws,
                                                            FIND_WS),
                op);
        algo = pick(r, got, mode, &p->ws, &math);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t r[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
        DNN_TRY(cudnnFindConvolutionBackwardFilterAlgorithmEx(dnn, p->xd, a, p->yd, b, p->cd, p->wd, out,
                                                              CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &got, r, ws,
                                                              FIND_WS),
                op);
        algo = pick(r, got, mode, &p->ws, &math);
    }
    if (algo < 0)
        return idd_error("cuda %s " CONV_SIZES ": no cuDNN algorithm ran (of %d tried) in %s", op, CONV_ARGS, got,
                         mode == ACT_BF16 ? "bf16 tensors" : idd_cuda_precision_name(mode));
    DNN_TRY(cudnnSetConvolutionMathType(p->cd, math), op);
    p->algo = algo;
    return IDD_OK;
}

static void plan_free(conv_plan *p) {
    if (p->xd) cudnnDestroyTensorDescriptor(p->xd);
    if (p->yd) cudnnDestroyTensorDescriptor(p->yd);
    if (p->wd) cudnnDestroyFilterDescriptor(p->wd);
    if (p->cd) cudnnDestroyConvolutionDescriptor(p->cd);
    delete p;
}

/* The plan for these sizes in the mode (the current precision, or ACT_BF16), made and
 * timed on first use (out is a scratch buffer for the passes that accumulate into their
 * result). */
/* the plan for these sizes (made and timed on first use) and its workspace (*ws: the
 * scratch slot, or NULL when the algorithm needs none) */
static idd_status plan_get(conv_plan **out_plan, void **ws, const char *op, int mode, int pass, const void *a,
                           const void *b, void *out, int N, int C, int H, int W, int O, int KH, int KW, int stride,
                           int pad, int Ho, int Wo) {
    int key[11] = {pass, N, C, H, W, O, KH, KW, stride, pad, mode};
    conv_plan *p = plan_lookup(key);
    if (!p) {
        p = new conv_plan();
        for (int i = 0; i < 11; i++) p->key[i] = key[i];
        idd_status st = plan_make(p, mode, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (!st) st = plan_find(p, mode, pass, a, b, out, N, C, H, W, O, KH, KW, stride, pad);
        if (st) { plan_free(p); return st; }
        plans.push_back(p);
    }
    *out_plan = p;
    *ws = p->ws ? cu_scratch(S_WS, p->ws, op) : NULL;
    return p->ws && !*ws ? IDD_ENOMEM : IDD_OK;
}

// ---------------------------------------------------------------- float32 tensors

/* Float32 NCHW tensors. In precision bf16 the operands are cast to bf16 NHWC (x, dout),
 * the bf16 channels-last entry points below run, and the results are cast back (bias
 * added in fp32, dx accumulated); fp32 / tf32 run cuDNN on the float32 tensors. */
idd_status cu_cudnn_conv_forward(float *out, const float *x, const float *w, const float *b, int N, int C, int H, int W,
                                 int O, int KH, int KW, int stride, int pad, int Ho, int Wo) {
    const char *op = "conv2d_forward";
    if (idd_cu_precision == IDD_PREC_BF16) {
        const void *xa = to_bf16(S_X, x, N, C, H * W, op);
        void *ya = cu_scratch(S_Y, (size_t)N * O * Ho * Wo * sizeof(__nv_bfloat16), op);
        if (!xa || !ya) return IDD_ENOMEM;
        idd_status st = cu_cudnn_conv_forward_bf16(ya, xa, w, NULL, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (st) return st;
        from_bf16(out, (const __nv_bfloat16 *)ya, b, 0.0f, N, O, Ho * Wo);
        CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
        return IDD_OK;
    }
    conv_plan *p;
    void *ws;
    idd_status st = plan_get(&p, &ws, op, idd_cu_precision, FWD, x, w, out, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
    if (st) return st;
    const float one = 1.0f, zero = 0.0f;
    DNN_TRY(cudnnConvolutionForward(dnn, &one, p->xd, x, p->wd, w, p->cd, (cudnnConvolutionFwdAlgo_t)p->algo, ws,
                                    p->ws, &zero, p->yd, out),
            op);
    /* out (N,O,P) += b (1,O,1,1): the forward's bias in fp32 */
    if (b) from_bias(out, b, N, O, (int64_t)Ho * Wo);
    CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
    return IDD_OK;
}

idd_status cu_cudnn_conv_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                                  int N, int C, int H, int W, int O, int KH, int KW, int stride, int pad, int Ho,
                                  int Wo) {
    const char *op = "conv2d_backward";
    int64_t P = (int64_t)Ho * Wo;
    if (db) {
        idd_status st = cu_conv_bias_grad(db, dout, N, O, (int)P);
        if (st) return st;
    }
    if (!dx && !dw) return IDD_OK;
    if (idd_cu_precision == IDD_PREC_BF16) {
        /* dxb = conv^T(doutb, w) in scratch, then dx += dxb; dw += the bf16 path's dw */
        const void *dya = to_bf16(S_Y, dout, N, O, (int)P, op);
        const void *xa = dw ? to_bf16(S_X, x, N, C, H * W, op) : NULL;
        void *dxa = dx ? cu_scratch(S_DX, (size_t)N * C * H * W * sizeof(__nv_bfloat16), op) : NULL;
        if (!dya || (dw && !xa) || (dx && !dxa)) return IDD_ENOMEM;
        idd_status st =
            cu_cudnn_conv_backward_bf16(dxa, dw, NULL, dya, xa, w, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (st) return st;
        if (dx) from_bf16(dx, (const __nv_bfloat16 *)dxa, NULL, 1.0f, N, C, H * W);
        CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
        return IDD_OK;
    }
    const float one = 1.0f;
    /* cudnnFind (a plan's first use) writes into the output it is given: it gets scratch,
     * never the gradients that are accumulated into */
    if (dx) {
        /* dx += conv^T(dout, w) (beta 1) */
        void *dxa = cu_scratch(S_DX, (size_t)N * C * H * W * sizeof(float), op);
        if (!dxa) return IDD_ENOMEM;
        conv_plan *p;
        void *ws;
        idd_status st = plan_get(&p, &ws, op, idd_cu_precision, BWD_DATA, w, dout, dxa,
                                  N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (st) return st;
        DNN_TRY(cudnnConvolutionBackwardData(dnn, &one, p->wd, w, p->yd, dout, p->cd,
                                             (cudnnConvolutionBwdDataAlgo_t)p->algo, ws, p->ws, &one, p->xd, dx),
                op);
    }
    if (dw) {
        void *dwa = cu_scratch(S_DW, (size_t)O * C * KH * KW * sizeof(float), op);
        if (!dwa) return IDD_ENOMEM;
        conv_plan *p;
        void *ws;
        idd_status st = plan_get(&p, &ws, op, idd_cu_precision, BWD_FILTER, x, dout, dwa,
                                  N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (st) return st;
        DNN_TRY(cudnnConvolutionBackwardFilter(dnn, &one, p->xd, x, p->yd, dout, p->cd,
                                               (cudnnConvolutionBwdFilterAlgo_t)p->algo, ws, p->ws, &one, p->wd, dw),
                op);
    }
    CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
    return IDD_OK;
}

// ---------------------------------------------------------------- bf16 channels-last tensors

/* The bf16 activation path: x, out, dout, dx are bf16 NHWC tensors (channels-last), so
 * cuDNN reads and writes them in place; only the float32 weight (O,C,KH,KW) is cast to
 * bf16 (O,KH,KW,C) per call (a few hundred KB; no cache: tensors carry no version to
 * invalidate one). Bias and bias gradient are float32. */

/* out (R,O) bf16 += b[o], 8 channels per 16-byte access (O % 8 == 0, R*O/8 < 2^31) */
__global__ void k_bias_nhwc8(uint4 *out, const float *b, unsigned O8, unsigned n8) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        unsigned c0 = (i % O8) * 8;
        uint4 v = out[i];
        __nv_bfloat162 *h = (__nv_bfloat162 *)&v;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            h[k] = __floats2bfloat162_rn(f.x + b[c0 + 2 * k], f.y + b[c0 + 2 * k + 1]);
        }
        out[i] = v;
    }
}
/* the same one element at a time (any O) */
__global__ void k_bias_nhwc(__nv_bfloat16 *out, const float *b, int O, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(__bfloat162float(out[i]) + b[i % O]);
}
static void bias_nhwc(__nv_bfloat16 *out, const float *b, int64_t rows, int O) {
    int64_t n = rows * O;
    if (O % 8 == 0 && n / 8 < ((int64_t)1 << 31)) {
        unsigned n8 = (unsigned)(n / 8), nb = cu_blocks(n8, 256);
        k_bias_nhwc8<<<nb > 65536 ? 65536 : nb, 256, 0, idd_cu_stream>>>((uint4 *)out, b, (unsigned)O / 8, n8);
    } else {
        unsigned nb = cu_blocks(n, 256);
        k_bias_nhwc<<<nb > 65536 ? 65536 : nb, 256, 0, idd_cu_stream>>>(out, b, O, n);
    }
}

/* db partials: part[s*O + c] = sum of d[r*O + c] over rows r of chunk s (float32).
 * Block (channel tile, chunk), threads (32, 8): lane x takes V adjacent channels (a warp
 * reads 32*V*2 contiguous bytes of a row), the 8 y-rows stride the chunk; the 8 y
 * partials are summed in a fixed order. */
template <int V>
__global__ void k_db_part(float *part, const __nv_bfloat16 *d, int64_t rows, int O, int64_t per) {
    __shared__ float sh[8][32 * V];
    int c = (blockIdx.x * 32 + threadIdx.x) * V;
    int64_t r0 = blockIdx.y * per, r1 = r0 + per < rows ? r0 + per : rows;
    float acc[V];
    for (int k = 0; k < V; k++) acc[k] = 0.0f;
    if (c < O) {
        for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
            const __nv_bfloat16 *p = d + r * O + c;
            if (V == 2) {
                float2 f = __bfloat1622float2(*(const __nv_bfloat162 *)p);
                acc[0] += f.x;
                acc[V - 1] += f.y;
            } else {
                acc[0] += __bfloat162float(p[0]);
            }
        }
    }
    for (int k = 0; k < V; k++) sh[threadIdx.y][threadIdx.x * V + k] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && c < O)
        for (int k = 0; k < V; k++) {
            float t = 0.0f;
            for (int y = 0; y < 8; y++) t += sh[y][threadIdx.x * V + k];
            part[blockIdx.y * (int64_t)O + c + k] = t;
        }
}
/* db[c] += sum of the S chunk partials of channel c, in chunk order (double) */
__global__ void k_db_sum(float *db, const float *part, int O, int S) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= O) return;
    double t = 0;
    for (int s = 0; s < S; s++) t += part[(int64_t)s * O + c];
    db[c] += (float)t;
}
/* the same 8 channels per 16-byte load (O % 8 == 0, O <= 2048): thread t of 256 takes
 * channel group t % O8 of rows t / O8, t / O8 + RP, ... (RP = 256 / O8 rows per step);
 * the RP partials of a channel group are summed in a fixed order */
__global__ void k_db_part8(float *part, const uint4 *d, int64_t rows, int O8, int64_t per) {
    __shared__ float sh[256][9];
    int t = threadIdx.x, RP = 256 / O8, g = t % O8, r0t = t / O8;
    int64_t r0 = blockIdx.x * per, r1 = r0 + per < rows ? r0 + per : rows;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (r0t < RP)
        for (int64_t r = r0 + r0t; r < r1; r += RP) {
            uint4 v = d[r * O8 + g];
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 f = __bfloat1622float2(h[k]);
                acc[2 * k] += f.x;
                acc[2 * k + 1] += f.y;
            }
        }
    for (int k = 0; k < 8; k++) sh[t][k] = acc[k];
    __syncthreads();
    if (t < O8)
        for (int k = 0; k < 8; k++) {
            float s = 0.0f;
            for (int j = 0; j < RP; j++) s += sh[j * O8 + t][k];
            part[blockIdx.x * (int64_t)O8 * 8 + t * 8 + k] = s;
        }
}

/* db (O) += sum over rows of d (rows, O) bf16; partials in scratch slot 12 */
static idd_status bias_grad_nhwc(float *db, const __nv_bfloat16 *d, int64_t rows, int O) {
    bool v8 = O % 8 == 0 && O <= 2048;
    int V = O % 2 == 0 ? 2 : 1;
    int tiles = v8 ? 1 : (O + 32 * V - 1) / (32 * V);
    int64_t S = 1024 / tiles;   /* about 1024 blocks, at least 64 rows each */
    if (S > rows / 64) S = rows / 64;
    if (S < 1) S = 1;
    int64_t per = (rows + S - 1) / S;
    S = (rows + per - 1) / per;
    float *part = (float *)cu_scratch(12, (size_t)S * O * sizeof(float), "conv2d_backward (bias, bf16)");
    if (!part) return IDD_ENOMEM;
    dim3 grid((unsigned)tiles, (unsigned)S), block(32, 8);
    if (v8) k_db_part8<<<(unsigned)S, 256, 0, idd_cu_stream>>>(part, (const uint4 *)d, rows, O / 8, per);
    else if (V == 2) k_db_part<2><<<grid, block, 0, idd_cu_stream>>>(part, d, rows, O, per);
    else k_db_part<1><<<grid, block, 0, idd_cu_stream>>>(part, d, rows, O, per);
    k_db_sum<<<(O + 127) / 128, 128, 0, idd_cu_stream>>>(db, part, O, (int)S);
    return IDD_OK;
}

/* A 1x1 convolution with stride 1 and no padding is one GEMM over the NHWC rows:
 * out (R,O) = x (R,C) wb^T, dx (R,C) = dout (R,O) wb, dw (O,C) += dout^T x (float32 out,
 * no bf16 rounding of dw); wb (O,C) is w cast to bf16, R = N*H*W. */
static bool conv_is_1x1(int KH, int KW, int stride, int pad) { return KH == 1 && KW == 1 && stride == 1 && pad == 0; }
#define GEMM_TRY(call, opname)                                                                                      \
    do {                                                                                                            \
        cublasStatus_t s_ = (call);                                                                                 \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                            \
            return idd_error("cuda %s " CONV_SIZES ": cuBLAS status %d", opname, CONV_ARGS, (int)s_);               \
    } while (0)

idd_status cu_cudnn_conv_forward_bf16(void *out, const void *x, const float *w, const float *b, int N, int C, int H,
                                      int W, int O, int KH, int KW, int stride, int pad, int Ho, int Wo) {
    const char *op = "conv2d_forward (bf16)";
    const void *wa = to_bf16(S_W, w, O, C, KH * KW, op);
    if (!wa) return IDD_ENOMEM;
    if (conv_is_1x1(KH, KW, stride, pad)) {
        int R = N * H * W;
        GEMM_TRY(cu_gemm_rm(false, true, R, O, C, 1.0f, x, C, 0, wa, C, 0, CUDA_R_16BF, 0.0f, out, O, 0, CUDA_R_16BF, 1),
                 op);
        if (b) bias_nhwc((__nv_bfloat16 *)out, b, R, O);
        CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
        return IDD_OK;
    }
    conv_plan *p;
    void *ws;
    idd_status st = plan_get(&p, &ws, op, ACT_BF16, FWD, x, wa, out, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
    if (st) return st;
    const float one = 1.0f, zero = 0.0f;
    DNN_TRY(cudnnConvolutionForward(dnn, &one, p->xd, x, p->wd, wa, p->cd, (cudnnConvolutionFwdAlgo_t)p->algo, ws,
                                    p->ws, &zero, p->yd, out),
            op);
    /* the bias in its own bf16 NHWC pass: cuDNN's conv + bias op (which needs
     * IMPLICIT_PRECOMP_GEMM) measured slower at 4 of 5 UNet shapes */
    if (b) bias_nhwc((__nv_bfloat16 *)out, b, (int64_t)N * Ho * Wo, O);
    CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
    return IDD_OK;
}

idd_status cu_cudnn_conv_backward_bf16(void *dx, float *dw, float *db, const void *dout, const void *x, const float *w,
                                       int N, int C, int H, int W, int O, int KH, int KW, int stride, int pad, int Ho,
                                       int Wo) {
    const char *op = "conv2d_backward (bf16)";
    const float one = 1.0f, zero = 0.0f;
    if (db) {
        idd_status st = bias_grad_nhwc(db, (const __nv_bfloat16 *)dout, (int64_t)N * Ho * Wo, O);
        if (st) return st;
    }
    if (conv_is_1x1(KH, KW, stride, pad)) {
        int R = N * H * W;
        if (dx) {
            const void *wa = to_bf16(S_W, w, O, C, 1, op);
            if (!wa) return IDD_ENOMEM;
            GEMM_TRY(cu_gemm_rm(false, false, R, C, O, 1.0f, dout, O, 0, wa, C, 0, CUDA_R_16BF, 0.0f, dx, C, 0,
                                CUDA_R_16BF, 1),
                     op);
        }
        if (dw)
            GEMM_TRY(cu_gemm_rm(true, false, O, C, R, 1.0f, dout, O, 0, x, C, 0, CUDA_R_16BF, 1.0f, dw, C, 0, CUDA_R_32F,
                                1),
                     op);
        CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
        return IDD_OK;
    }
    if (dx) {
        /* dx (bf16 NHWC) = conv^T(dout, w), written */
        const void *wa = to_bf16(S_W, w, O, C, KH * KW, op);
        if (!wa) return IDD_ENOMEM;
        conv_plan *p;
        void *ws;
        idd_status st = plan_get(&p, &ws, op, ACT_BF16, BWD_DATA, wa, dout, dx,
                                  N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (st) return st;
        DNN_TRY(cudnnConvolutionBackwardData(dnn, &one, p->wd, wa, p->yd, dout, p->cd,
                                             (cudnnConvolutionBwdDataAlgo_t)p->algo, ws, p->ws, &zero, p->xd, dx),
                op);
    }
    if (dw) {
        /* dwb (O,KH,KW,C) bf16 in scratch, then dw (O,C,KH,KW) float32 += dwb */
        void *dwa = cu_scratch(S_DW, (size_t)O * C * KH * KW * sizeof(__nv_bfloat16), op);
        if (!dwa) return IDD_ENOMEM;
        conv_plan *p;
        void *ws;
        idd_status st = plan_get(&p, &ws, op, ACT_BF16, BWD_FILTER, x, dout, dwa,
                                  N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
        if (st) return st;
        DNN_TRY(cudnnConvolutionBackwardFilter(dnn, &one, p->xd, x, p->yd, dout, p->cd,
                                               (cudnnConvolutionBwdFilterAlgo_t)p->algo, ws, p->ws, &zero, p->wd, dwa),
                op);
        from_bf16(dw, (const __nv_bfloat16 *)dwa, NULL, 1.0f, O, C, KH * KW);
    }
    CU_CHECK_LAUNCH(op, CONV_SIZES, CONV_ARGS);
    return IDD_OK;
}

#endif /* IDDPM_NO_CUDNN */
