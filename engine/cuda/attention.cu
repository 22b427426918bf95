/* attention.cu — QKV attention (the official QKVAttentionLegacy), forward and
 * backward, as cuBLAS strided-batched products over the B*H heads with a fused
 * row softmax (and its backward) between them. Layout and formulas as in
 * engine/ops/attention.c: head bh = b*H + h owns rows [h*3ch, (h+1)*3ch) of qkv[b],
 * q then k then v (ch rows each), so head bh starts at qkv + bh*3ch*T; the output of
 * head bh is out + bh*ch*T. logits = q^T k / sqrt(ch).
 *   forward   W = softmax(s2 * Q^T K)      (T,T) saved
 *             out = V W^T                  (ch,T)
 *   backward  dV += dout W,  dW = dout^T V,  dS = W * (dW - rowsum(dW*W)),
 *             dQ += s2 * K dS^T,  dK += s2 * Q dS */
#include "cuda_common.cuh"

#include <math.h>

/* one warp per row: in-place softmax of rows of length T */
__global__ void k_softmax_rows(float *w, int64_t rows, int T) {
    int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float *p = w + row * T;
    float mx = -INFINITY;
    for (int j = lane; j < T; j += 32) mx = fmaxf(mx, p[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float s = 0;
    for (int j = lane; j < T; j += 32) {
        float e = expf(p[j] - mx);
        p[j] = e;
        s += e;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float inv = 1.0f / s;
    for (int j = lane; j < T; j += 32) p[j] *= inv;
}

/* d <- w * (d - rowsum(d * w)) */
__global__ void k_softmax_back_rows(float *d, const float *w, int64_t rows, int T) {
    int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float *dp = d + row * T;
    const float *wp = w + row * T;
    float dot = 0;
    for (int j = lane; j < T; j += 32) dot += dp[j] * wp[j];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    for (int j = lane; j < T; j += 32) dp[j] = wp[j] * (dp[j] - dot);
}

#define ATT_SIZES "qkv (%d,%d,%d) heads %d"
#define ATT_ARGS B, 3 * C, T, H

/* row-major C (M,N) = alpha op(A) op(B) + beta C, batched with strides (in elements) */
static cublasStatus_t rm_gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda, int64_t sA,
                              const float *Bm, int ldb, int64_t sB, float beta, float *Cm, int ldc, int64_t sC,
                              int batch) {
    return cu_sgemm(tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, alpha, Bm, ldb, sB, A, lda,
                    sA, beta, Cm, ldc, sC, batch);
}

extern "C" idd_status cu_attention_forward(float *out, float *weight, const float *qkv, int B, int C, int T, int H) {
    CU_PROF("attention_forward");
    if (B <= 0 || C <= 0 || T <= 0 || H <= 0 || C % H)
        return idd_error("cuda attention_forward: bad sizes: " ATT_SIZES, ATT_ARGS);
    int ch = C / H, BH = B * H;
    int64_t hs = (int64_t)3 * ch * T, TT = (int64_t)T * T;
    float s2 = (float)(1.0 / sqrt((double)ch));
    const float *q = qkv, *k = qkv + (int64_t)ch * T, *v = qkv + (int64_t)2 * ch * T;
    /* W (T,T) = s2 * q^T (T,ch) k (ch,T) */
    BLAS_TRY(rm_gemm(true, false, T, T, ch, s2, q, T, hs, k, T, hs, 0.0f, weight, T, TT, BH), "attention_forward",
             ATT_SIZES, ATT_ARGS);
    int64_t rows = (int64_t)BH * T;
    k_softmax_rows<<<cu_blocks(rows * 32, 256), 256, 0, idd_cu_stream>>>(weight, rows, T);
    /* out (ch,T) = v (ch,T') W^T (T',T) */
    BLAS_TRY(rm_gemm(false, true, ch, T, T, 1.0f, v, T, hs, weight, T, TT, 0.0f, out, T, (int64_t)ch * T, BH),
             "attention_forward", ATT_SIZES, ATT_ARGS);
    CU_CHECK_LAUNCH("attention_forward", ATT_SIZES, ATT_ARGS);
    return IDD_OK;
}

extern "C" idd_status cu_attention_backward(float *dqkv, const float *dout, const float *weight, const float *qkv, int B,
                                            int C, int T, int H) {
    CU_PROF("attention_backward");
    if (B <= 0 || C <= 0 || T <= 0 || H <= 0 || C % H)
        return idd_error("cuda attention_backward: bad sizes: " ATT_SIZES, ATT_ARGS);
    int ch = C / H, BH = B * H;
    int64_t hs = (int64_t)3 * ch * T, TT = (int64_t)T * T, os = (int64_t)ch * T;
    float s2 = (float)(1.0 / sqrt((double)ch));
    const float *q = qkv, *k = qkv + os, *v = qkv + 2 * os;
    float *dq = dqkv, *dk = dqkv + os, *dv = dqkv + 2 * os;
    float *dw = (float *)cu_scratch(4, (size_t)BH * TT * sizeof(float), "attention_backward");
    if (!dw) return IDD_ENOMEM;
    /* dv (ch,T') += dout (ch,T) W (T,T') */
    BLAS_TRY(rm_gemm(false, false, ch, T, T, 1.0f, dout, T, os, weight, T, TT, 1.0f, dv, T, hs, BH),
             "attention_backward", ATT_SIZES, ATT_ARGS);
    /* dW (T,T') = dout^T (T,ch) v (ch,T') */
    BLAS_TRY(rm_gemm(true, false, T, T, ch, 1.0f, dout, T, os, v, T, hs, 0.0f, dw, T, TT, BH), "attention_backward",
             ATT_SIZES, ATT_ARGS);
    int64_t rows = (int64_t)BH * T;
    k_softmax_back_rows<<<cu_blocks(rows * 32, 256), 256, 0, idd_cu_stream>>>(dw, weight, rows, T);
    /* dq (ch,T) += s2 * k (ch,T') dS^T (T',T) */
    BLAS_TRY(rm_gemm(false, true, ch, T, T, s2, k, T, hs, dw, T, TT, 1.0f, dq, T, hs, BH), "attention_backward",
             ATT_SIZES, ATT_ARGS);
    /* dk (ch,T') += s2 * q (ch,T) dS (T,T') */
    BLAS_TRY(rm_gemm(false, false, ch, T, T, s2, q, T, hs, dw, T, TT, 1.0f, dk, T, hs, BH), "attention_backward",
             ATT_SIZES, ATT_ARGS);
    CU_CHECK_LAUNCH("attention_backward", ATT_SIZES, ATT_ARGS);
    return IDD_OK;
}
