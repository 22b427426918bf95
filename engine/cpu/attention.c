/* attention.c — the QKV attention core of the official AttentionBlock
 * (QKVAttentionLegacy), forward and backward.
 *
 * qkv (B, 3C, T) is viewed as (B*H, 3*ch, T) with ch = C/H: head h of sample b owns
 * rows [h*3ch, (h+1)*3ch) of sample b, of which the first ch rows are q, the next ch k
 * and the last ch v (the "legacy" layout). With s = ch^(-1/4), applied to q and to k,
 * i.e. s^2 = 1/sqrt(ch) on their product:
 *   logits (T,T) = s^2 * q^T k          sgemm  M=T N=T K=ch
 *   weight       = softmax over the last axis (float32, max-subtracted), saved
 *   a (ch,T)     = v . weight^T         sgemm  M=ch N=T K=T
 * and a is written to out[b, h*ch .. (h+1)*ch).
 *
 * Backward, per (b,h), with da = dout[b, h*ch ..] (ch,T):
 *   dv      += da . weight               (ch,T)
 *   dweight  = da^T . v                  (T,T)   scratch (workspace slot 0)
 *   dlogits  = weight * (dweight - rowsum(dweight * weight))
 *   dq      += s^2 * k . dlogits^T       (ch,T)
 *   dk      += s^2 * q . dlogits         (ch,T)
 * The (b,h) pairs are spread over OpenMP threads, each with single-threaded sgemm and
 * its own dweight scratch (OpenBLAS is set to 1 thread for the call, so the two never
 * oversubscribe); with fewer pairs than threads they run in turn with threaded sgemm. */
#include "iddpm/kernels.h"

#include <cblas.h>
#include <omp.h>
#include <math.h>

#include "vmath.h"

static idd_status attn_check(const char *fn, int B, int C, int T, int H) {
    if (B <= 0 || C <= 0 || T <= 0 || H <= 0)
        return idd_error("%s: bad sizes: qkv (%d,%d,%d), %d heads", fn, B, 3 * C, T, H);
    if (C % H)
        return idd_error("%s: %d heads do not divide %d channels (qkv (%d,%d,%d))", fn, H, C, B,
                         3 * C, T);
    return IDD_OK;
}

/* (b,h) pairs spread over OpenMP threads, each running single-threaded sgemm, when
 * there are at least as many pairs as threads and we are not inside a parallel region
 * already; otherwise the pairs run in turn with multithreaded sgemm and OpenMP softmax */
static int use_per_head(int BH) {
    int nt = omp_get_max_threads();
    return nt > 1 && BH >= nt && !omp_in_parallel();
}

/* the largest of row[0..T): four independent max chains, so the loop runs at the load
 * rate rather than at the latency of one max */
static float row_max(const float *row, int T) {
    v8f m0 = v8_set1(row[0]), m1 = m0, m2 = m0, m3 = m0;
    int j = 0;
    for (; j + 32 <= T; j += 32) {
        m0 = v8_max(m0, v8_load(row + j));
        m1 = v8_max(m1, v8_load(row + j + 8));
        m2 = v8_max(m2, v8_load(row + j + 16));
        m3 = v8_max(m3, v8_load(row + j + 24));
    }
    for (; j + 8 <= T; j += 8) m0 = v8_max(m0, v8_load(row + j));
    float mx = v8_hmax(v8_max(v8_max(m0, m1), v8_max(m2, m3)));
    for (; j < T; j++) mx = row[j] > mx ? row[j] : mx;
    return mx;
}

/* in-place softmax of each row of w (T,T), float32 with the row max subtracted. With
 * inv_sum set, the rows are left unnormalised (exp(w - max)) and inv_sum[t] gets
 * 1/sum of row t, for the caller to apply to a smaller product instead. */
static void softmax_rows(float *w, int T, int par, float *inv_sum) {
#pragma omp parallel for schedule(static) if (par && T >= 64)
    for (int t = 0; t < T; t++) {
        float *row = w + (size_t)t * T;
        const v8f m = v8_set1(row_max(row, T));
        v8f vs = v8_set1(0.0f);   /* one sum: a second one spills (16 vector registers) */
        int j = 0;
        for (; j + 8 <= T; j += 8) {
            v8f e = v8_exp(v8_load(row + j) - m);
            v8_store(row + j, e);
            vs += e;
        }
        if (j < T) {
            const int k = T - j;
            v8f e = v8_exp(v8_load_n(row + j, k) - m);
            for (int q = k; q < 8; q++) e[q] = 0.0f;
            v8_store_n(row + j, e, k);
            vs += e;
        }
        const float inv = 1.0f / v8_hsum(vs);
        if (inv_sum) {
            inv_sum[t] = inv;
            continue;
        }
        const v8f vinv = v8_set1(inv);
        for (j = 0; j + 8 <= T; j += 8) v8_store(row + j, v8_load(row + j) * vinv);
        for (; j < T; j++) row[j] *= inv;
    }
}

/* dw (T,T) <- w * (dw - rowsum(dw * w)), the softmax backward, in place */
static void softmax_backward_rows(float *dw, const float *w, int T, int par) {
#pragma omp parallel for schedule(static) if (par && T >= 64)
    for (int t = 0; t < T; t++) {
        float *d = dw + (size_t)t * T;
        const float *p = w + (size_t)t * T;
        v8f vd = v8_set1(0.0f);
        int j = 0;
        for (; j + 8 <= T; j += 8) vd = v8_fma(v8_load(d + j), v8_load(p + j), vd);
        float dot = v8_hsum(vd);
        for (; j < T; j++) dot += d[j] * p[j];
        const v8f vdot = v8_set1(dot);
        for (j = 0; j + 8 <= T; j += 8) v8_store(d + j, v8_load(p + j) * (v8_load(d + j) - vdot));
        for (; j < T; j++) d[j] = p[j] * (d[j] - dot);
    }
}

idd_status idd_attention_forward_f32(float *out, float *weight, const float *qkv, int B, int C,
                                     int T, int H) {
    idd_status st = attn_check("attention_forward", B, C, T, H);
    if (st) return st;
    const int ch = C / H;
    const float s2 = (float)(1.0 / sqrt((double)ch));
    const int par = use_per_head(B * H);
    int blas_threads = 0;
    if (par) {
        blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
    }
    int oom = 0;
#pragma omp parallel if (par) reduction(| : oom)
    {
    /* no weight to keep: this thread's scratch (workspace slot 0) holds each block */
    /* no weight to keep: this thread's scratch (workspace slot 0) holds each block, left
     * unnormalised; the 1/sum of its rows (slot 1) scales the (ch,T) result instead */
    float *scratch = weight ? NULL : idd_workspace_get(0, sizeof(float) * (size_t)T * T);
    float *inv = weight ? NULL : idd_workspace_get(1, sizeof(float) * (size_t)T);
    if (!weight && (!scratch || !inv)) oom = 1;
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        if (!weight && (!scratch || !inv)) continue;
        const int b = bh / H, h = bh % H;
        const float *q = qkv + ((size_t)b * 3 * C + (size_t)h * 3 * ch) * T;
        const float *k = q + (size_t)ch * T, *v = k + (size_t)ch * T;
        float *w = weight ? weight + ((size_t)b * H + h) * T * T : scratch;
        float *a = out + ((size_t)b * C + (size_t)h * ch) * T;
        /* w (T,T) = s2 * q^T (T,ch) . k (ch,T) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, T, ch, s2, q, T, k, T, 0.0f, w,
                    T);
        softmax_rows(w, T, !par, inv);
        /* a (ch,T) = v (ch,T) . w^T (T,T) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ch, T, T, 1.0f, v, T, w, T, 0.0f, a,
                    T);
        if (inv) {   /* column t of a is over row t of the unnormalised block */
            for (int c = 0; c < ch; c++) {
                float *ac = a + (size_t)c * T;
                int j = 0;
                for (; j + 8 <= T; j += 8) v8_store(ac + j, v8_load(ac + j) * v8_load(inv + j));
                for (; j < T; j++) ac[j] *= inv[j];
            }
        }
    }
    }
    if (par) openblas_set_num_threads(blas_threads);
    if (oom)
        return idd_error_status(IDD_ENOMEM, "attention_forward: out of memory for (%d,%d) "
                                "scratch", T, T);
    return IDD_OK;
}

idd_status idd_attention_backward_f32(float *dqkv, const float *dout, const float *weight,
                                      const float *qkv, int B, int C, int T, int H) {
    idd_status st = attn_check("attention_backward", B, C, T, H);
    if (st) return st;
    if (!dqkv) return IDD_OK;
    const int ch = C / H;
    const float s2 = (float)(1.0 / sqrt((double)ch));
    const int par = use_per_head(B * H);
    int blas_threads = 0, oom = 0;
    if (par) {
        blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
    }
#pragma omp parallel if (par) reduction(| : oom)
    {
        float *dw = idd_workspace_get(0, sizeof(float) * (size_t)T * T);   /* this thread's */
        if (!dw) oom = 1;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            if (!dw) continue;
            const int b = bh / H, h = bh % H;
            const size_t qoff = ((size_t)b * 3 * C + (size_t)h * 3 * ch) * T;
            const float *q = qkv + qoff;
            const float *k = q + (size_t)ch * T, *v = k + (size_t)ch * T;
            float *dq = dqkv + qoff;
            float *dk = dq + (size_t)ch * T, *dv = dk + (size_t)ch * T;
            const float *w = weight + ((size_t)b * H + h) * T * T;
            const float *da = dout + ((size_t)b * C + (size_t)h * ch) * T;
            /* dv (ch,T) += da (ch,T) . w (T,T) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, ch, T, T, 1.0f, da, T, w, T,
                        1.0f, dv, T);
            /* dw (T,T) = da^T (T,ch) . v (ch,T) */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, T, ch, 1.0f, da, T, v, T, 0.0f,
                        dw, T);
            softmax_backward_rows(dw, w, T, !par);
            /* dq (ch,T) += s2 * k (ch,T) . dlogits^T (T,T) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ch, T, T, s2, k, T, dw, T, 1.0f,
                        dq, T);
            /* dk (ch,T) += s2 * q (ch,T) . dlogits (T,T) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, ch, T, T, s2, q, T, dw, T, 1.0f,
                        dk, T);
        }
    }
    if (par) openblas_set_num_threads(blas_threads);
    if (oom)
        return idd_error_status(IDD_ENOMEM, "attention_backward: out of memory for (%d,%d) "
                                "scratch", T, T);
    return IDD_OK;
}
