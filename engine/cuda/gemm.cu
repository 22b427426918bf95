/* gemm.cu — batched matrix products through cuBLAS (strided batched sgemm/dgemm).
 * Row-major C (M,N) = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so B goes
 * first. A single matrix shared over the batch gets stride 0. */
#include "cuda_common.cuh"

extern "C" idd_status cu_bmm(idd_tensor *c, const idd_tensor *a, const idd_tensor *b, bool ta, bool tb, double alpha,
                             double beta) {
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
        BLAS_TRY(cublasSgemmStridedBatched(idd_cu_blas, opb, opa, (int)N, (int)M, (int)K, &al,
                                           (const float *)idd_data(b), (int)ldb, sb, (const float *)idd_data(a),
                                           (int)lda, sa, &be, (float *)idd_data(c), (int)N, M * N, (int)batch),
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
