/* gemm.cu — batched matrix products through cuBLAS (strided batched gemm; float32 in
 * the current precision, float64 exact). Row-major C (M,N) = op(A) op(B) is column-major
 * C^T = op(B)^T op(A)^T, so B goes first. A single matrix shared over the batch gets
 * stride 0. cu_gemm_rm: the row-major mixed-type product of the bf16 attention. */
#include "cuda_common.cuh"

/* fp32 data in and out; the compute type picks the arithmetic: exact fp32, TF32 tensor
 * cores, or bf16 tensor cores with the fp32 operands rounded inside the kernel (fp32
 * accumulation either way) */
cublasStatus_t cu_sgemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float *A,
                        int lda, int64_t sA, const float *B, int ldb, int64_t sB, float beta, float *C, int ldc,
                        int64_t sC, int batch) {
    cublasComputeType_t ct = idd_cu_precision == IDD_PREC_BF16   ? CUBLAS_COMPUTE_32F_FAST_16BF
                             : idd_cu_precision == IDD_PREC_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                 : CUBLAS_COMPUTE_32F;
    return cublasGemmStridedBatchedEx(idd_cu_blas, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, sA, B, CUDA_R_32F, ldb,
                                      sB, &beta, C, CUDA_R_32F, ldc, sC, batch, ct, CUBLAS_GEMM_DEFAULT);
}

/* row-major C (M,N) = alpha op(A) op(B) + beta C, strided batched, A and B of type ab
 * (bf16 for the bf16 tensors' products), C of type ct, always fp32 accumulation
 * (COMPUTE_32F: bf16 tensor cores for bf16 operands); leading dims and strides in
 * elements of each operand's type */
cublasStatus_t cu_gemm_rm(bool ta, bool tb, int M, int N, int K, float alpha, const void *A, int lda, int64_t sA,
                          const void *B, int ldb, int64_t sB, cudaDataType ab, float beta, void *C, int ldc, int64_t sC,
                          cudaDataType ct, int batch) {
    return cublasGemmStridedBatchedEx(idd_cu_blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M,
                                      K, &alpha, B, ab, ldb, sB, A, ab, lda, sA, &beta, C, ct, ldc, sC, batch,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

/* the same over arrays of batch pointers (device arrays: the heads of a channels-last
 * qkv are not one stride apart) */
cublasStatus_t cu_gemm_rm_ptr(bool ta, bool tb, int M, int N, int K, float alpha, const void *const *A, int lda,
                              const void *const *B, int ldb, cudaDataType ab, float beta, void *const *C, int ldc,
                              cudaDataType ct, int batch) {
    return cublasGemmBatchedEx(idd_cu_blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                               &alpha, B, ab, ldb, A, ab, lda, &beta, C, ct, ldc, batch, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT);
}

extern "C" idd_status cu_bmm(idd_tensor *c, const idd_tensor *a, const idd_tensor *b, bool ta, bool tb, double alpha,
                             double beta) {
    CU_PROF("bmm");
    int nd = c->ndim;
    int64_t M = c->shape[nd - 2], N = c->shape[nd - 1];
    int64_t K = ta ? a->shape[a->ndim - 2] : a->shape[a->ndim - 1];
    int64_t batch = (M * N != 0) ? idd_numel(c) / (M * N) : 0;
    if (batch == 0) return IDD_OK;
    int64_t lda = a->shape[a->ndim - 1], ldb = b->shape[b->ndim - 1];
    int64_t sa = a->shape[a->ndim - 1] * a->shape[a->ndim - 2], sb = b->shape[b->ndim - 1] * b->shape[b->ndim - 2];
    if (idd_numel(a) == sa) sa = 0;
    if (idd_numel(b) == sb) sb = 0;
    cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    char s1[96], s2[96];
    if (K == 0) {   /* cuBLAS leaves C alone when K == 0; the product is then beta*C */
        if (beta == 0) return cu_fill(c, 0);
        return cu_affine(c, c, beta, 0);
    }
    if (c->dtype == IDD_F32) {
        float al = (float)alpha, be = (float)beta;
        BLAS_TRY(cu_sgemm(opb, opa, (int)N, (int)M, (int)K, al, (const float *)idd_data(b), (int)ldb, sb,
                          (const float *)idd_data(a), (int)lda, sa, be, (float *)idd_data(c), (int)N, M * N, (int)batch),
                 "bmm", "a %s b %s", idd_shape_str(a, s1, 96), idd_shape_str(b, s2, 96));
    } else {
        BLAS_TRY(cublasDgemmStridedBatched(idd_cu_blas, opb, opa, (int)N, (int)M, (int)K, &alpha,
                                           (const double *)idd_data(b), (int)ldb, sb, (const double *)idd_data(a),
                                           (int)lda, sa, &beta, (double *)idd_data(c), (int)N, M * N, (int)batch),
                 "bmm", "a %s b %s", idd_shape_str(a, s1, 96), idd_shape_str(b, s2, 96));
    }
    CU_CHECK_LAUNCH("bmm", "a %s b %s", idd_shape_str(a, s1, 96), idd_shape_str(b, s2, 96));
    return IDD_OK;
}
