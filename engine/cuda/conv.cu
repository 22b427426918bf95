/* conv.cu — conv2d forward and backward: cuDNN (conv_cudnn.cu) unless
 * IDDPM_CUDA_CONV=im2col / iddpm.cuda.conv_impl("im2col"), else im2col + cuBLAS here
 * (and the forward of a 1x1 convolution, one GEMM, always here).
 *
 * Samples are processed in chunks of nc so that the column buffer stays under a
 * budget. col (CKK, nc*P) holds, for row (c,ky,kx) and column (n,oy,ox), the input
 * pixel the kernel tap reads (0 in the padding); P = Ho*Wo, CKK = C*KH*KW.
 *   forward   out_n (O,P) = W (O,CKK) . col_n (CKK,P)       strided batched, W shared
 *   dx        dcol_n (CKK,P) = W^T . dout_n, then col2im (a gather, +=)
 *   dw       += doutP (O, nc*P) . col^T                      one GEMM per chunk
 *   db       += sum over n and p of dout (cu_conv_bias_grad, also used by conv_cudnn.cu)
 * A 1x1 convolution with stride 1 and no padding uses x itself as col_n (no im2col)
 * in the forward and writes dx straight from the GEMM.
 * bf16 channels-last tensors (cu_conv2d_*_bf16, end of file) always run cuDNN. */
#include "cuda_common.cuh"

#define COL_BUDGET ((size_t)256 << 20)

__global__ void k_im2col(float *col, const float *x, int nc, int C, int H, int W, int KH, int KW, int stride, int pad,
                         int Ho, int Wo) {
    int64_t P = (int64_t)Ho * Wo, Q = (int64_t)nc * P, total = (int64_t)C * KH * KW * Q;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t q = e % Q, r = e / Q;
        int n = (int)(q / P), p = (int)(q % P);
        int oy = p / Wo, ox = p % Wo;
        int kx = (int)(r % KW), ky = (int)((r / KW) % KH), c = (int)(r / ((int64_t)KW * KH));
        int y = oy * stride - pad + ky, xx = ox * stride - pad + kx;
        float v = 0.0f;
        if (y >= 0 && y < H && xx >= 0 && xx < W) v = x[(((int64_t)n * C + c) * H + y) * W + xx];
        col[e] = v;
    }
}

/* dx[n,c,y,x] += sum of the dcol entries that read that pixel */
__global__ void k_col2im(float *dx, const float *dcol, int nc, int C, int H, int W, int KH, int KW, int stride, int pad,
                         int Ho, int Wo) {
    int64_t P = (int64_t)Ho * Wo, Q = (int64_t)nc * P, total = (int64_t)nc * C * H * W;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int xx = (int)(e % W), y = (int)((e / W) % H), c = (int)((e / ((int64_t)W * H)) % C);
        int n = (int)(e / ((int64_t)W * H * C));
        float s = 0.0f;
        for (int ky = 0; ky < KH; ky++) {
            int ty = y + pad - ky;
            if (ty < 0 || ty % stride) continue;
            int oy = ty / stride;
            if (oy >= Ho) continue;
            for (int kx = 0; kx < KW; kx++) {
                int tx = xx + pad - kx;
                if (tx < 0 || tx % stride) continue;
                int ox = tx / stride;
                if (ox >= Wo) continue;
                int64_t r = ((int64_t)c * KH + ky) * KW + kx;
                s += dcol[r * Q + (int64_t)n * P + (int64_t)oy * Wo + ox];
            }
        }
        dx[e] += s;
    }
}

/* out (nc,O,P) = bias[o] */
__global__ void k_bias_fill(float *out, const float *b, int O, int64_t P, int64_t total) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
        out[e] = b[(e / P) % O];
}

/* doutP (O, nc*P) from dout (nc, O, P) */
__global__ void k_perm_dout(float *dp, const float *d, int nc, int O, int64_t P) {
    int64_t total = (int64_t)nc * O * P;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t p = e % P, n = (e / P) % nc, o = e / (P * nc);
        dp[e] = d[(n * O + o) * P + p];
    }
}

/* part[o*S + s] = sum over the samples n = s, s+S, ... and all p of dout[n,o,p]: block
 * (o, s), the threads stride over p (no divisions), double partial sums */
#define BG_SPLIT 16
__global__ void k_bias_grad_part(double *part, const float *dout, int N, int O, int P) {
    __shared__ double sh[8];
    int o = blockIdx.x, sp = blockIdx.y, S = gridDim.y;
    double acc = 0;
    for (int n = sp; n < N; n += S) {
        const float *d = dout + ((int64_t)n * O + o) * P;
        for (int q = threadIdx.x; q < P; q += blockDim.x) acc += d[q];
    }
    for (int k = 16; k > 0; k >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, k);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) t += sh[w];
        part[(int64_t)o * S + sp] = t;
    }
}

/* db[o] += sum of its S partials, in a fixed order */
__global__ void k_bias_grad_sum(float *db, const double *part, int O, int S) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= O) return;
    double t = 0;
    for (int s = 0; s < S; s++) t += part[(int64_t)o * S + s];
    db[o] += (float)t;
}

/* scratch slot 12 (memory.cu) holds the partials */
idd_status cu_conv_bias_grad(float *db, const float *dout, int N, int O, int P) {
    int S = N < BG_SPLIT ? N : BG_SPLIT;
    double *part = (double *)cu_scratch(12, (size_t)O * S * sizeof(double), "conv2d_backward (bias)");
    if (!part) return IDD_ENOMEM;
    int threads = P >= 256 ? 256 : P >= 128 ? 128 : 64;
    k_bias_grad_part<<<dim3((unsigned)O, (unsigned)S), threads, 0, idd_cu_stream>>>(part, dout, N, O, P);
    k_bias_grad_sum<<<(O + 127) / 128, 128, 0, idd_cu_stream>>>(db, part, O, S);
    return IDD_OK;
}

static unsigned grid_for(int64_t n) {
    unsigned nb = cu_blocks(n, 256);
    return nb > 65536 ? 65536 : nb;
}

static idd_status conv_check(const char *fn, int N, int C, int H, int W, int O, int KH, int KW, int stride, int pad,
                             int *Ho, int *Wo) {
    if (N <= 0 || C <= 0 || H <= 0 || W <= 0 || O <= 0 || KH <= 0 || KW <= 0 || stride <= 0 || pad < 0)
        return idd_error("cuda %s: bad sizes: input (%d,%d,%d,%d), weight (%d,%d,%d,%d), stride %d, pad %d", fn, N, C, H,
                         W, O, C, KH, KW, stride, pad);
    *Ho = (H + 2 * pad - KH) / stride + 1;
    *Wo = (W + 2 * pad - KW) / stride + 1;
    if (*Ho <= 0 || *Wo <= 0)
        return idd_error("cuda %s: kernel %dx%d larger than padded input (%d,%d,%d,%d)", fn, KH, KW, N, C, H, W);
    return IDD_OK;
}

#define CONV_SIZES "input (%d,%d,%d,%d) weight (%d,%d,%d,%d) stride %d pad %d"
#define CONV_ARGS N, C, H, W, O, C, KH, KW, stride, pad

extern "C" idd_status cu_conv2d_forward(float *out, const float *x, const float *w, const float *b, int N, int C, int H,
                                        int W, int O, int KH, int KW, int stride, int pad) {
    CU_PROF("conv2d_forward");
    int Ho, Wo;
    idd_status st = conv_check("conv2d_forward", N, C, H, W, O, KH, KW, stride, pad, &Ho, &Wo);
    if (st) return st;
    bool direct = KH == 1 && KW == 1 && stride == 1 && pad == 0;
    /* a 1x1 convolution's forward is one GEMM below, faster than cuDNN's (bench_gpu OPS=1) */
    if (!direct && idd_cu_conv_impl == IDD_CONV_CUDNN && cu_cudnn_ready())
        return cu_cudnn_conv_forward(out, x, w, b, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
    int64_t P = (int64_t)Ho * Wo, CKK = (int64_t)C * KH * KW;
    int64_t per = CKK * P * (int64_t)sizeof(float);
    int nc = direct ? N : (int)(COL_BUDGET / (size_t)per);
    if (nc < 1) nc = 1;
    if (nc > N) nc = N;
    float *col = direct ? NULL : (float *)cu_scratch(0, (size_t)per * nc, "conv2d_forward");
    if (!direct && !col) return IDD_ENOMEM;
    const float one = 1.0f, zero = 0.0f;
    for (int n0 = 0; n0 < N; n0 += nc) {
        int m = N - n0 < nc ? N - n0 : nc;
        float *o = out + (int64_t)n0 * O * P;
        if (b) k_bias_fill<<<grid_for((int64_t)m * O * P), 256, 0, idd_cu_stream>>>(o, b, O, P, (int64_t)m * O * P);
        const float *A;
        int64_t lda, sA;
        if (direct) {
            A = x + (int64_t)n0 * C * P;
            lda = P;
            sA = C * P;
        } else {
            k_im2col<<<grid_for(CKK * m * P), 256, 0, idd_cu_stream>>>(col, x + (int64_t)n0 * C * H * W, m, C, H, W, KH,
                                                                        KW, stride, pad, Ho, Wo);
            A = col;
            lda = (int64_t)m * P;
            sA = P;
        }
        BLAS_TRY(cu_sgemm(CUBLAS_OP_N, CUBLAS_OP_N, (int)P, O, (int)CKK, one, A, (int)lda, sA, w, (int)CKK, 0,
                          b ? one : zero, o, (int)P, (int64_t)O * P, m),
                 "conv2d_forward", CONV_SIZES, CONV_ARGS);
    }
    CU_CHECK_LAUNCH("conv2d_forward", CONV_SIZES, CONV_ARGS);
    return IDD_OK;
}

extern "C" idd_status cu_conv2d_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                                         const float *w, int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                         int pad) {
    CU_PROF("conv2d_backward");
    int Ho, Wo;
    idd_status st = conv_check("conv2d_backward", N, C, H, W, O, KH, KW, stride, pad, &Ho, &Wo);
    if (st) return st;
    if (!dx && !dw && !db) return IDD_OK;
    if (idd_cu_conv_impl == IDD_CONV_CUDNN && cu_cudnn_ready())
        return cu_cudnn_conv_backward(dx, dw, db, dout, x, w, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
    int64_t P = (int64_t)Ho * Wo, CKK = (int64_t)C * KH * KW;
    bool direct = KH == 1 && KW == 1 && stride == 1 && pad == 0;
    const float one = 1.0f, zero = 0.0f;
    if (db) {
        st = cu_conv_bias_grad(db, dout, N, O, (int)P);
        if (st) return st;
    }
    /* per-sample bytes: col (CKK*P) for dw, dcol (CKK*P) for dx, doutP (O*P) for dw */
    int64_t per = ((dw ? CKK * P + O * P : 0) + (dx && !direct ? CKK * P : 0)) * (int64_t)sizeof(float);
    int nc = per ? (int)(COL_BUDGET / (size_t)per) : N;
    if (nc < 1) nc = 1;
    if (nc > N) nc = N;
    float *col = NULL, *dcol = NULL, *dp = NULL;
    if (dw) {
        col = (float *)cu_scratch(0, (size_t)(CKK * P) * nc * sizeof(float), "conv2d_backward");
        dp = (float *)cu_scratch(1, (size_t)(O * P) * nc * sizeof(float), "conv2d_backward");
        if (!col || !dp) return IDD_ENOMEM;
    }
    if (dx && !direct) {
        dcol = (float *)cu_scratch(2, (size_t)(CKK * P) * nc * sizeof(float), "conv2d_backward");
        if (!dcol) return IDD_ENOMEM;
    }
    for (int n0 = 0; n0 < N; n0 += nc) {
        int m = N - n0 < nc ? N - n0 : nc;
        const float *d = dout + (int64_t)n0 * O * P;
        if (dw) {
            k_im2col<<<grid_for(CKK * m * P), 256, 0, idd_cu_stream>>>(col, x + (int64_t)n0 * C * H * W, m, C, H, W, KH,
                                                                        KW, stride, pad, Ho, Wo);
            k_perm_dout<<<grid_for((int64_t)m * O * P), 256, 0, idd_cu_stream>>>(dp, d, m, O, P);
            int64_t Q = (int64_t)m * P;
            BLAS_TRY(cu_sgemm(CUBLAS_OP_T, CUBLAS_OP_N, (int)CKK, O, (int)Q, one, col, (int)Q, 0, dp, (int)Q, 0, one,
                              dw, (int)CKK, 0, 1),
                     "conv2d_backward (dw)", CONV_SIZES, CONV_ARGS);
        }
        if (dx) {
            if (direct) {
                /* dx_n (C,P) += W^T dout_n */
                BLAS_TRY(cu_sgemm(CUBLAS_OP_N, CUBLAS_OP_T, (int)P, C, O, one, d, (int)P, (int64_t)O * P, w, C, 0, one,
                                  dx + (int64_t)n0 * C * P, (int)P, (int64_t)C * P, m),
                         "conv2d_backward (dx)", CONV_SIZES, CONV_ARGS);
            } else {
                BLAS_TRY(cu_sgemm(CUBLAS_OP_N, CUBLAS_OP_T, (int)P, (int)CKK, O, one, d, (int)P, (int64_t)O * P, w,
                                  (int)CKK, 0, zero, dcol, (int)((int64_t)m * P), P, m),
                         "conv2d_backward (dx)", CONV_SIZES, CONV_ARGS);
                k_col2im<<<grid_for((int64_t)m * C * H * W), 256, 0, idd_cu_stream>>>(
                    dx + (int64_t)n0 * C * H * W, dcol, m, C, H, W, KH, KW, stride, pad, Ho, Wo);
            }
        }
    }
    CU_CHECK_LAUNCH("conv2d_backward", CONV_SIZES, CONV_ARGS);
    return IDD_OK;
}

// ---------------------------------------------------------------- bf16 channels-last tensors

/* x, out, dout, dx: bf16 NHWC (channels-last); w, b, dw, db float32; dx written, dw and
 * db accumulated. cuDNN only (conv_cudnn.cu): without it these fail with a message. */
extern "C" idd_status cu_conv2d_forward_bf16(uint16_t *out, const uint16_t *x, const float *w, const float *b, int N,
                                             int C, int H, int W, int O, int KH, int KW, int stride, int pad) {
    CU_PROF("conv2d_forward_bf16");
    int Ho = 0, Wo = 0;
    idd_status st = conv_check("conv2d_forward (bf16)", N, C, H, W, O, KH, KW, stride, pad, &Ho, &Wo);
    if (st) return st;
    if (!cu_cudnn_ready())
        return idd_error("cuda conv2d_forward (bf16) " CONV_SIZES ": needs cuDNN, which could not be opened",
                         CONV_ARGS);
    return cu_cudnn_conv_forward_bf16(out, x, w, b, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
}

extern "C" idd_status cu_conv2d_backward_bf16(uint16_t *dx, float *dw, float *db, const uint16_t *dout,
                                              const uint16_t *x, const float *w, int N, int C, int H, int W, int O,
                                              int KH, int KW, int stride, int pad) {
    CU_PROF("conv2d_backward_bf16");
    int Ho = 0, Wo = 0;
    idd_status st = conv_check("conv2d_backward (bf16)", N, C, H, W, O, KH, KW, stride, pad, &Ho, &Wo);
    if (st) return st;
    if (!dx && !dw && !db) return IDD_OK;
    if (!cu_cudnn_ready())
        return idd_error("cuda conv2d_backward (bf16) " CONV_SIZES ": needs cuDNN, which could not be opened",
                         CONV_ARGS);
    return cu_cudnn_conv_backward_bf16(dx, dw, db, dout, x, w, N, C, H, W, O, KH, KW, stride, pad, Ho, Wo);
}
