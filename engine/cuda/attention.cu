/* attention.cu — QKV attention (the official QKVAttentionLegacy), forward and
 * backward, as cuBLAS strided-batched products over the B*H heads with a fused
 * row softmax (and its backward) between them. Layout and formulas as in
 * engine/cpu/attention.c: head bh = b*H + h owns rows [h*3ch, (h+1)*3ch) of qkv[b],
 * q then k then v (ch rows each), so head bh starts at qkv + bh*3ch*T; the output of
 * head bh is out + bh*ch*T. logits = q^T k / sqrt(ch).
 *   forward   W = softmax(s2 * Q^T K)      (T,T) saved
 *             out = V W^T                  (ch,T)
 *   backward  dV += dout W,  dW = dout^T V,  dS = W * (dW - rowsum(dW*W)),
 *             dQ += s2 * K dS^T,  dK += s2 * Q dS
 *
 * bf16 channels-last qkv (cu_attention_*_bf16, end of file): memory (B, T, 3C), so head h
 * of sample b reads q, k, v in place as row-major (T, ch) matrices with leading dim 3C;
 * one pointer-array batched bf16 GEMM per product over the B*H heads, logits and dW in
 * fp32 scratch, the softmax in fp32 registers, W saved in bf16 (as the official code
 * under autocast). */
#include "cuda_common.cuh"

#include <cuda_bf16.h>
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

// ---------------------------------------------------------------- bf16 channels-last qkv

/* one warp per row: w (bf16) = softmax of the fp32 logits row */
__global__ void k_softmax_rows_bf16(__nv_bfloat16 *w, const float *lg, int64_t rows, int T) {
    int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float *p = lg + row * T;
    __nv_bfloat16 *q = w + row * T;
    float mx = -INFINITY;
    for (int j = lane; j < T; j += 32) mx = fmaxf(mx, p[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float s = 0;
    for (int j = lane; j < T; j += 32) s += expf(p[j] - mx);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float inv = 1.0f / s;
    for (int j = lane; j < T; j += 32) q[j] = __float2bfloat16(expf(p[j] - mx) * inv);
}

/* one warp per row: dS = W * (dW - rowsum(dW * W)) with dW fp32 rows of T and W bf16;
 * dS (bf16) is written in place over the first half of dW's row (row stride 2T in bf16
 * elements): chunk j0 writes bytes that hold fp32 elements j0/2.. already read by this
 * warp (chunk 0: in this chunk, hence the __syncwarp between its reads and writes) */
__global__ void k_softmax_back_rows_bf16(float *d, const __nv_bfloat16 *w, int64_t rows, int T) {
    int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float *dp = d + row * T;
    const __nv_bfloat16 *wp = w + row * T;
    float dot = 0;
    for (int j = lane; j < T; j += 32) dot += dp[j] * __bfloat162float(wp[j]);
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    __nv_bfloat16 *ds = (__nv_bfloat16 *)dp;
    for (int j0 = 0; j0 < T; j0 += 32) {
        int j = j0 + lane;
        float v = j < T ? __bfloat162float(wp[j]) * (dp[j] - dot) : 0.0f;
        __syncwarp();
        if (j < T) ds[j] = __float2bfloat16(v);
    }
}

#define BF CUDA_R_16BF

/* batch pointers of the B*H heads, head i = b*H + h: array a holds base_a + b*sb_a + h*sh_a
 * (bytes). One GEMM call then covers every head (a loop of H strided calls costs a
 * launch each, which dominates at T = 64). */
enum { HP_MAX = 10 };
struct head_ptrs {
    const char *base[HP_MAX];
    int64_t sb[HP_MAX], sh[HP_MAX];
    int n;
};
__global__ void k_head_ptrs(const void **out, head_ptrs hp, int B, int H) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * H) return;
    int b = i / H, h = i - b * H;
    for (int a = 0; a < hp.n; a++) out[(int64_t)a * B * H + i] = hp.base[a] + b * hp.sb[a] + h * hp.sh[a];
}
static void add_ptrs(head_ptrs *hp, const void *base, int64_t sb, int64_t sh) {
    hp->base[hp->n] = (const char *)base;
    hp->sb[hp->n] = sb;
    hp->sh[hp->n] = sh;
    hp->n++;
}

/* scratch slot 4: fp32 (B*H,T,T) (logits, or dW then dS in place), then the pointer arrays */
static float *att_scratch(int B, int H, int T, const void ***ptrs, const char *op) {
    size_t fl = ((size_t)B * H * T * T * sizeof(float) + 15) & ~(size_t)15;
    char *p = (char *)cu_scratch(4, fl + (size_t)HP_MAX * B * H * sizeof(void *), op);
    if (!p) return NULL;
    *ptrs = (const void **)(p + fl);
    return (float *)p;
}

extern "C" idd_status cu_attention_forward_bf16(uint16_t *out, uint16_t *weight, const uint16_t *qkv, int B, int C,
                                                int T, int H) {
    CU_PROF("attention_forward_bf16");
    if (B <= 0 || C <= 0 || T <= 0 || H <= 0 || C % H)
        return idd_error("cuda attention_forward (bf16): bad sizes: " ATT_SIZES, ATT_ARGS);
    if (!weight) return idd_error("cuda attention_forward (bf16) " ATT_SIZES ": weight buffer missing", ATT_ARGS);
    const char *op = "attention_forward (bf16)";
    int ch = C / H, C3 = 3 * C, BH = B * H;
    int64_t TT = (int64_t)T * T, e = sizeof(__nv_bfloat16);
    float s2 = (float)(1.0 / sqrt((double)ch));
    const void **pa;
    float *lg = att_scratch(B, H, T, &pa, op);
    if (!lg) return IDD_ENOMEM;
    /* arrays: 0 q, 1 k, 2 v, 3 logits (fp32), 4 W, 5 out */
    head_ptrs hp = {};
    add_ptrs(&hp, qkv, C3 * T * e, 3 * ch * e);
    add_ptrs(&hp, (const __nv_bfloat16 *)qkv + ch, C3 * T * e, 3 * ch * e);
    add_ptrs(&hp, (const __nv_bfloat16 *)qkv + 2 * ch, C3 * T * e, 3 * ch * e);
    add_ptrs(&hp, lg, H * TT * 4, TT * 4);
    add_ptrs(&hp, weight, H * TT * e, TT * e);
    add_ptrs(&hp, out, (int64_t)C * T * e, ch * e);
    k_head_ptrs<<<cu_blocks(BH, 128), 128, 0, idd_cu_stream>>>(pa, hp, B, H);
    const void *const *P[6];
    for (int a = 0; a < 6; a++) P[a] = pa + (int64_t)a * BH;
    /* logits (T,T) = s2 q (T,ch) k^T (ch,T) */
    BLAS_TRY(cu_gemm_rm_ptr(false, true, T, T, ch, s2, P[0], C3, P[1], C3, BF, 0.0f, (void *const *)P[3], T, CUDA_R_32F,
                            BH),
             op, ATT_SIZES, ATT_ARGS);
    int64_t rows = (int64_t)BH * T;
    k_softmax_rows_bf16<<<cu_blocks(rows * 32, 256), 256, 0, idd_cu_stream>>>((__nv_bfloat16 *)weight, lg, rows, T);
    /* out (T,ch) = W (T,T') v (T',ch) */
    BLAS_TRY(cu_gemm_rm_ptr(false, false, T, ch, T, 1.0f, P[4], T, P[2], C3, BF, 0.0f, (void *const *)P[5], C, BF, BH),
             op, ATT_SIZES, ATT_ARGS);
    CU_CHECK_LAUNCH(op, ATT_SIZES, ATT_ARGS);
    return IDD_OK;
}

extern "C" idd_status cu_attention_backward_bf16(uint16_t *dqkv, const uint16_t *dout, const uint16_t *weight,
                                                 const uint16_t *qkv, int B, int C, int T, int H) {
    CU_PROF("attention_backward_bf16");
    if (B <= 0 || C <= 0 || T <= 0 || H <= 0 || C % H)
        return idd_error("cuda attention_backward (bf16): bad sizes: " ATT_SIZES, ATT_ARGS);
    const char *op = "attention_backward (bf16)";
    int ch = C / H, C3 = 3 * C, BH = B * H;
    int64_t TT = (int64_t)T * T, e = sizeof(__nv_bfloat16), xb = C3 * T * e, xh = 3 * ch * e;
    float s2 = (float)(1.0 / sqrt((double)ch));
    const void **pa;
    float *dw = att_scratch(B, H, T, &pa, op);
    if (!dw) return IDD_ENOMEM;
    /* arrays: 0 q, 1 k, 2 v, 3 dout, 4 dq, 5 dk, 6 dv, 7 W, 8 dW (fp32), 9 dS (bf16 in place
     * over dW: row stride 2T) */
    const __nv_bfloat16 *x = (const __nv_bfloat16 *)qkv;
    __nv_bfloat16 *dx = (__nv_bfloat16 *)dqkv;
    head_ptrs hp = {};
    add_ptrs(&hp, x, xb, xh);
    add_ptrs(&hp, x + ch, xb, xh);
    add_ptrs(&hp, x + 2 * ch, xb, xh);
    add_ptrs(&hp, dout, (int64_t)C * T * e, ch * e);
    add_ptrs(&hp, dx, xb, xh);
    add_ptrs(&hp, dx + ch, xb, xh);
    add_ptrs(&hp, dx + 2 * ch, xb, xh);
    add_ptrs(&hp, weight, H * TT * e, TT * e);
    add_ptrs(&hp, dw, H * TT * 4, TT * 4);
    add_ptrs(&hp, dw, H * TT * 4, TT * 4);
    k_head_ptrs<<<cu_blocks(BH, 128), 128, 0, idd_cu_stream>>>(pa, hp, B, H);
    const void *const *P[10];
    for (int a = 0; a < 10; a++) P[a] = pa + (int64_t)a * BH;
    /* dv (T',ch) = W^T (T',T) dout (T,ch), written */
    BLAS_TRY(cu_gemm_rm_ptr(true, false, T, ch, T, 1.0f, P[7], T, P[3], C, BF, 0.0f, (void *const *)P[6], C3, BF, BH),
             op, ATT_SIZES, ATT_ARGS);
    /* dW (T,T') = dout (T,ch) v^T (ch,T') */
    BLAS_TRY(cu_gemm_rm_ptr(false, true, T, T, ch, 1.0f, P[3], C, P[2], C3, BF, 0.0f, (void *const *)P[8], T,
                            CUDA_R_32F, BH),
             op, ATT_SIZES, ATT_ARGS);
    int64_t rows = (int64_t)BH * T;
    k_softmax_back_rows_bf16<<<cu_blocks(rows * 32, 256), 256, 0, idd_cu_stream>>>(dw, (const __nv_bfloat16 *)weight,
                                                                                   rows, T);
    /* dq (T,ch) = s2 dS (T,T') k (T',ch) */
    BLAS_TRY(cu_gemm_rm_ptr(false, false, T, ch, T, s2, P[9], 2 * T, P[1], C3, BF, 0.0f, (void *const *)P[4], C3, BF,
                            BH),
             op, ATT_SIZES, ATT_ARGS);
    /* dk (T',ch) = s2 dS^T (T',T) q (T,ch) */
    BLAS_TRY(cu_gemm_rm_ptr(true, false, T, ch, T, s2, P[9], 2 * T, P[0], C3, BF, 0.0f, (void *const *)P[5], C3, BF,
                            BH),
             op, ATT_SIZES, ATT_ARGS);
    CU_CHECK_LAUNCH(op, ATT_SIZES, ATT_ARGS);
    return IDD_OK;
}
