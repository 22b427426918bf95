/* diffusion.cu — the diffusion kernels (q_sample, posterior, pred_xstart, p_finish,
 * p_sample, DDIM, the hybrid training loss and its backward w.r.t. the model output)
 * and the multi-tensor optimizer kernels (AdamW, EMA, sum of squares, scale), plus an
 * upload that is ordered on the stream without waiting for it (pinned staging ring).
 * The per-element arithmetic is include/iddpm/diffusion_kernels.h, in double, shared
 * with the CPU backend's engine/cpu/diffusion.c. */
#include "cuda_common.cuh"

#include <math.h>
#include <string.h>

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static unsigned grid_for(int64_t n) {
    unsigned nb = cu_blocks(n, 256);
    return nb > 65536 ? 65536 : nb;
}

// ---------------------------------------------------------------- async upload

/* A pinned ring of two halves; each half's last copy is marked by an event, waited on
 * (long since done, in practice) before the half is reused. Larger copies than a half
 * go through the synchronous path. */
#define STAGE_HALF (4u << 20)
static char *stage;
static size_t stage_pos;
static int stage_half;
static cudaEvent_t stage_ev[2];
static bool stage_ev_live[2];

extern "C" idd_status cu_upload_async(void *dst, const void *src, size_t n) {
    if (n == 0) return IDD_OK;
    if (idd_cuda_capturing())   /* a replay would copy whatever the ring holds by then */
        return idd_cuda_capture_refuse("upload", "it copies host memory (the pinned upload ring) that a replay would read stale");
    if (n > STAGE_HALF) {
        CU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, idd_cu_stream), "upload");
        CU_TRY(cudaStreamSynchronize(idd_cu_stream), "upload");
        return IDD_OK;
    }
    if (!stage) {
        CU_TRY(cudaMallocHost((void **)&stage, 2 * (size_t)STAGE_HALF), "upload staging");
        CU_TRY(cudaEventCreateWithFlags(&stage_ev[0], cudaEventDisableTiming), "upload staging");
        CU_TRY(cudaEventCreateWithFlags(&stage_ev[1], cudaEventDisableTiming), "upload staging");
        stage_pos = 0;
        stage_half = 0;
    }
    size_t aligned = (n + 255) & ~(size_t)255;
    if (stage_pos + aligned > STAGE_HALF) {   /* switch halves: mark this one, wait for the other */
        CU_TRY(cudaEventRecord(stage_ev[stage_half], idd_cu_stream), "upload staging");
        stage_ev_live[stage_half] = true;
        stage_half ^= 1;
        stage_pos = 0;
        if (stage_ev_live[stage_half]) CU_TRY(cudaEventSynchronize(stage_ev[stage_half]), "upload staging");
    }
    char *h = stage + (size_t)stage_half * STAGE_HALF + stage_pos;
    memcpy(h, src, n);
    stage_pos += aligned;
    CU_TRY(cudaMemcpyAsync(dst, h, n, cudaMemcpyHostToDevice, idd_cu_stream), "upload");
    return IDD_OK;
}

// ---------------------------------------------------------------- diffusion kernels

__global__ void k_diff_pointwise(int op, idd_diff_args a, float *out, const float *x, const float *y, const float *z) {
    int64_t n = a.C * a.HW;
    GRID_STRIDE(e, a.B * n) {
        int64_t b = e / n, i = e - b * n;
        out[e] = idd_dk_pointwise(op, &a, b, i, x, y, z);
    }
}

__global__ void k_diff_p_finish(idd_diff_args a, const float *mo, const float *xt, float *px, float *mean, float *var,
                                float *logvar) {
    int64_t n = a.C * a.HW;
    GRID_STRIDE(e, a.B * n) {
        int64_t b = e / n, i = e - b * n;
        idd_dk_p_finish(&a, b, i, mo, xt, px, mean, var, logvar);
    }
}

/* one block per sample: sums in double, a fixed-order tree (deterministic) */
#define LOSS_THREADS 512
__global__ void k_diff_losses(idd_diff_args a, const float *mo, const float *x0, const float *xt, const float *nz,
                              float *loss, float *mse, float *vb) {
    __shared__ double sm[LOSS_THREADS], sv[LOSS_THREADS];
    int64_t b = blockIdx.x, n = a.C * a.HW, cout = a.learned ? 2 * n : n;
    double m = 0, v = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        idd_dk_loss_elem(&a, b, i, mo + b * cout, x0 + b * n, xt + b * n, nz + b * n, &m, &v);
    sm[threadIdx.x] = m;
    sv[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) { sm[threadIdx.x] += sm[threadIdx.x + s]; sv[threadIdx.x] += sv[threadIdx.x + s]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) idd_dk_loss_finish(&a, sm[0], sv[0], loss + b, mse + b, vb + b);
}

__global__ void k_diff_losses_bwd(idd_diff_args a, const float *mo, const float *x0, const float *xt, const float *nz,
                                  const float *dloss, float *dmo) {
    int64_t n = a.C * a.HW, cout = a.learned ? 2 * n : n;
    GRID_STRIDE(e, a.B * n) {
        int64_t b = e / n, i = e - b * n;
        idd_dk_loss_grad(&a, b, i, mo + b * cout, x0 + b * n, xt + b * n, nz + b * n, (double)dloss[b], dmo + b * cout);
    }
}

extern "C" idd_status cu_diff_pointwise(int op, const idd_diff_args *a, float *out, const float *x, const float *y,
                                        const float *z) {
    int64_t total = a->B * a->C * a->HW;
    if (total == 0) return IDD_OK;
    k_diff_pointwise<<<grid_for(total), 256, 0, idd_cu_stream>>>(op, *a, out, x, y, z);
    CU_CHECK_LAUNCH("diffusion", "(op %d, B %lld, n %lld)", op, (long long)a->B, (long long)(a->C * a->HW));
    return IDD_OK;
}

extern "C" idd_status cu_diff_p_finish(const idd_diff_args *a, const float *mo, const float *xt, float *px,
                                       float *mean, float *var, float *logvar) {
    int64_t total = a->B * a->C * a->HW;
    if (total == 0) return IDD_OK;
    k_diff_p_finish<<<grid_for(total), 256, 0, idd_cu_stream>>>(*a, mo, xt, px, mean, var, logvar);
    CU_CHECK_LAUNCH("p_mean_variance", "(B %lld, n %lld)", (long long)a->B, (long long)(a->C * a->HW));
    return IDD_OK;
}

extern "C" idd_status cu_diff_losses(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                                     const float *noise, float *loss, float *mse, float *vb) {
    if (a->B == 0) return IDD_OK;
    if (a->B > 2147483647) return idd_error("cuda training_losses: batch %lld too large", (long long)a->B);
    k_diff_losses<<<(unsigned)a->B, LOSS_THREADS, 0, idd_cu_stream>>>(*a, mo, x0, xt, noise, loss, mse, vb);
    CU_CHECK_LAUNCH("training_losses", "(B %lld, n %lld)", (long long)a->B, (long long)(a->C * a->HW));
    return IDD_OK;
}

extern "C" idd_status cu_diff_losses_backward(const idd_diff_args *a, const float *mo, const float *x0,
                                              const float *xt, const float *noise, const float *dloss, float *dmo) {
    int64_t total = a->B * a->C * a->HW;
    if (total == 0) return IDD_OK;
    k_diff_losses_bwd<<<grid_for(total), 256, 0, idd_cu_stream>>>(*a, mo, x0, xt, noise, dloss, dmo);
    CU_CHECK_LAUNCH("training_losses backward", "(B %lld, n %lld)", (long long)a->B, (long long)(a->C * a->HW));
    return IDD_OK;
}

// ---------------------------------------------------------------- multi-tensor optimizer kernels

/* The tensor list goes up as one table: ptr[k][i] (k < 4 pointer lists), numel[i], and
 * the first block of tensor i (blocks of MT_CHUNK elements). A block finds its tensor
 * by binary search over the block starts. */
#define MT_CHUNK 4096
#define MT_THREADS 256

struct mt_table {
    float **ptr[4];
    const int64_t *numel;
    const int64_t *start;   /* n + 1 block starts */
    int n;
};

static idd_status mt_upload(int n, int k, float *const *const *lists, const int64_t *numel, mt_table *t,
                            int64_t *nblocks, const char *op) {
    size_t bytes = sizeof(float *) * (size_t)n * (size_t)k + sizeof(int64_t) * (size_t)(2 * n + 1);
    char *h = (char *)malloc(bytes);
    if (!h) return idd_error_status(IDD_ENOMEM, "cuda %s: out of memory", op);
    float **hp = (float **)h;
    for (int j = 0; j < k; j++)
        for (int i = 0; i < n; i++) hp[(size_t)j * n + i] = lists[j][i];
    int64_t *hn = (int64_t *)(h + sizeof(float *) * (size_t)n * (size_t)k), *hs = hn + n;
    int64_t acc = 0;
    for (int i = 0; i < n; i++) {
        hn[i] = numel[i];
        hs[i] = acc;
        acc += (numel[i] + MT_CHUNK - 1) / MT_CHUNK;
    }
    hs[n] = acc;
    char *d = (char *)cu_scratch(5, bytes, op);
    idd_status st = d ? cu_upload_async(d, h, bytes) : IDD_ERR;
    free(h);
    if (st != IDD_OK) return st;
    for (int j = 0; j < 4; j++) t->ptr[j] = j < k ? (float **)d + (size_t)j * n : NULL;
    t->numel = (const int64_t *)(d + sizeof(float *) * (size_t)n * (size_t)k);
    t->start = t->numel + n;
    t->n = n;
    *nblocks = acc;
    return IDD_OK;
}

/* tensor index and element range of this block */
__device__ __forceinline__ int mt_locate(const mt_table &t, int64_t blk, int64_t *lo, int64_t *hi) {
    int a = 0, b = t.n - 1;
    while (a < b) {
        int m = (a + b + 1) / 2;
        if (t.start[m] <= blk) a = m; else b = m - 1;
    }
    *lo = (blk - t.start[a]) * MT_CHUNK;
    int64_t e = *lo + MT_CHUNK;
    *hi = e < t.numel[a] ? e : t.numel[a];
    return a;
}

struct adam_hp { float b1, b2, eps, decay, step_size, rbc2; };

__global__ void k_mt_adamw(mt_table t, adam_hp h) {
    int64_t lo, hi;
    int i = mt_locate(t, blockIdx.x, &lo, &hi);
    float *p = t.ptr[0][i], *g = t.ptr[1][i], *m = t.ptr[2][i], *v = t.ptr[3][i];
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float gj = g[j];
        float mj = h.b1 * m[j] + (1 - h.b1) * gj;
        float vj = h.b2 * v[j] + (1 - h.b2) * gj * gj;
        m[j] = mj;
        v[j] = vj;
        p[j] = p[j] * h.decay - h.step_size * mj / (sqrtf(vj) * h.rbc2 + h.eps);
    }
}

__global__ void k_mt_ema(mt_table t, float r) {
    int64_t lo, hi;
    int i = mt_locate(t, blockIdx.x, &lo, &hi);
    float *e = t.ptr[0][i];
    const float *p = t.ptr[1][i];
    float q = 1.0f - r;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) e[j] = r * e[j] + q * p[j];
}

__global__ void k_mt_scale(mt_table t, float s) {
    int64_t lo, hi;
    int i = mt_locate(t, blockIdx.x, &lo, &hi);
    float *g = t.ptr[0][i];
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) g[j] = g[j] * s;
}

/* per-block partial sums of squares (double), then one block adds them in order */
__global__ void k_mt_sumsq(mt_table t, double *part) {
    __shared__ double sh[MT_THREADS];
    int64_t lo, hi;
    int i = mt_locate(t, blockIdx.x, &lo, &hi);
    const float *g = t.ptr[0][i];
    double s = 0;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) s += (double)g[j] * g[j];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}
__global__ void k_sum_parts(const double *part, int64_t n, double *out) {
    __shared__ double sh[MT_THREADS];
    double s = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += part[j];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = sh[0];
}

extern "C" idd_status cu_adamw(int n, float *const *p, const float *const *g, float *const *m, float *const *v,
                               const int64_t *numel, const float hp[6]) {
    if (n <= 0) return IDD_OK;
    float *const *lists[4] = {p, (float *const *)g, m, v};
    mt_table t;
    int64_t nb = 0;
    if (mt_upload(n, 4, lists, numel, &t, &nb, "adamw") != IDD_OK) return IDD_ERR;
    if (nb == 0) return IDD_OK;
    adam_hp h = {hp[0], hp[1], hp[2], hp[3], hp[4], hp[5]};
    k_mt_adamw<<<(unsigned)nb, MT_THREADS, 0, idd_cu_stream>>>(t, h);
    CU_CHECK_LAUNCH("adamw", "(%d tensors, %lld blocks)", n, (long long)nb);
    return IDD_OK;
}

extern "C" idd_status cu_ema(int n, float *const *e, const float *const *p, const int64_t *numel, double rate) {
    if (n <= 0) return IDD_OK;
    float *const *lists[2] = {e, (float *const *)p};
    mt_table t;
    int64_t nb = 0;
    if (mt_upload(n, 2, lists, numel, &t, &nb, "ema") != IDD_OK) return IDD_ERR;
    if (nb == 0) return IDD_OK;
    k_mt_ema<<<(unsigned)nb, MT_THREADS, 0, idd_cu_stream>>>(t, rate);
    CU_CHECK_LAUNCH("ema", "(%d tensors, %lld blocks)", n, (long long)nb);
    return IDD_OK;
}

extern "C" idd_status cu_scale(int n, float *const *g, const int64_t *numel, double s) {
    if (n <= 0) return IDD_OK;
    float *const *lists[1] = {g};
    mt_table t;
    int64_t nb = 0;
    if (mt_upload(n, 1, lists, numel, &t, &nb, "grad_scale") != IDD_OK) return IDD_ERR;
    if (nb == 0) return IDD_OK;
    k_mt_scale<<<(unsigned)nb, MT_THREADS, 0, idd_cu_stream>>>(t, s);
    CU_CHECK_LAUNCH("grad_scale", "(%d tensors, %lld blocks)", n, (long long)nb);
    return IDD_OK;
}

extern "C" idd_status cu_sumsq(int n, const float *const *g, const int64_t *numel, double *out) {
    *out = 0;
    if (n <= 0) return IDD_OK;
    float *const *lists[1] = {(float *const *)g};
    mt_table t;
    int64_t nb = 0;
    if (mt_upload(n, 1, lists, numel, &t, &nb, "grad_norm") != IDD_OK) return IDD_ERR;
    if (nb == 0) return IDD_OK;
    double *part = (double *)cu_scratch(4, sizeof(double) * (size_t)(nb + 1), "grad_norm");
    if (!part) return IDD_ERR;
    k_mt_sumsq<<<(unsigned)nb, MT_THREADS, 0, idd_cu_stream>>>(t, part);
    k_sum_parts<<<1, MT_THREADS, 0, idd_cu_stream>>>(part, nb, part + nb);
    CU_CHECK_LAUNCH("grad_norm", "(%d tensors, %lld blocks)", n, (long long)nb);
    CU_TRY(cudaMemcpyAsync(out, part + nb, sizeof(double), cudaMemcpyDeviceToHost, idd_cu_stream), "grad_norm");
    CU_TRY(cudaStreamSynchronize(idd_cu_stream), "grad_norm");
    return IDD_OK;
}
