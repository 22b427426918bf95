/* conv2d.c — 2-D convolution (NCHW, weight (O,C,KH,KW), zero padding), forward and
 * backward, by im2col + OpenBLAS sgemm.
 *
 * im2col writes the columns of nb samples side by side:
 *   col (K = C*KH*KW, P = nb*Ho*Wo),  col[(c*KH+i)*KW+j][s*HoWo + oy*Wo + ox]
 * so one sgemm covers them:  out (O,P) = w (O,K) . col (K,P). A 1x1 stride-1 unpadded
 * conv of one sample uses x itself as col. Backward, with D = dout (O,P):
 *   dw (O,K) += D . col^T ;  dcol (K,P) = w^T . D ; dx += col2im(dcol) ;  db += sums of D
 *
 * Two schedules (measured on 2 cores, tests/c/bench_kernels.c):
 *  - per-sample (default when N >= OpenMP threads): OpenMP over samples (nb = 1, or a
 *    few samples when Ho*Wo < PER_THREAD_COLS, at least one chunk per thread), each
 *    thread runs single-threaded sgemm on its own scratch (thread-local workspace);
 *    dw goes to a private partial per thread (workspace slot 3), summed at the end.
 *    OpenBLAS is switched to 1 thread for the duration of the call and restored after,
 *    so OpenMP and OpenBLAS threads never oversubscribe. This was ~1.5-2x faster than
 *    the chunked schedule on every UNet layer measured.
 *  - chunked (N < threads, e.g. sampling one image): samples are folded nb at a time
 *    into one multithreaded sgemm (nb so that P reaches target_cols), with OpenMP
 *    im2col/col2im between GEMMs; nb > 1 needs a gather/scatter between (O, nb, HoWo)
 *    and NCHW (workspace slot 1).
 * Scratch comes from idd_workspace_get (slots 0..3 of the calling/worker thread). */
#include "iddpm/kernels.h"

#include <cblas.h>
#include <omp.h>
#include <string.h>

#include "vmath.h"

#define DEFAULT_TARGET_COLS 4096

static long target_cols = DEFAULT_TARGET_COLS;
static int conv_mode = 0; /* 0 auto, 1 always chunked, 2 always per-sample */

void idd_conv2d_set_target_cols(long cols) { target_cols = cols > 0 ? cols : DEFAULT_TARGET_COLS; }
void idd_conv2d_set_mode(int mode) { conv_mode = mode >= 0 && mode <= 2 ? mode : 0; }

int idd_conv2d_out_size(int in, int k, int stride, int pad) {
    if (stride <= 0) return 0;
    long span = (long)in + 2L * pad - k;
    if (span < 0) return 0;
    return (int)(span / stride + 1);
}

typedef struct {
    int N, C, H, W, O, KH, KW, stride, pad_h, pad_w, Ho, Wo;
    long HoWo, K;
} conv_shape;

static idd_status conv_check(const char *fn, conv_shape *s, int N, int C, int H, int W, int O,
                             int KH, int KW, int stride, int pad_h, int pad_w) {
    if (N <= 0 || C <= 0 || H <= 0 || W <= 0 || O <= 0 || KH <= 0 || KW <= 0 || stride <= 0 ||
        pad_h < 0 || pad_w < 0)
        return idd_error("%s: bad sizes: input (%d,%d,%d,%d), weight (%d,%d,%d,%d), stride %d, "
                         "pad (%d,%d)",
                         fn, N, C, H, W, O, C, KH, KW, stride, pad_h, pad_w);
    int Ho = idd_conv2d_out_size(H, KH, stride, pad_h), Wo = idd_conv2d_out_size(W, KW, stride, pad_w);
    if (Ho <= 0 || Wo <= 0)
        return idd_error("%s: kernel %dx%d does not fit input %dx%d with pad (%d,%d)", fn, KH, KW,
                         H, W, pad_h, pad_w);
    *s = (conv_shape){N,  C,      H,      W,  O,  KH,           KW,
                      stride, pad_h, pad_w, Ho, Wo, (long)Ho * Wo, (long)C * KH * KW};
    return IDD_OK;
}

static int is_pointwise(const conv_shape *s) {
    return s->KH == 1 && s->KW == 1 && s->stride == 1 && s->pad_h == 0 && s->pad_w == 0;
}

/* samples per chunk: enough to reach target_cols columns, at least 1 */
static int chunk_samples(const conv_shape *s) {
    long nb = (target_cols + s->HoWo - 1) / s->HoWo;
    if (nb < 1) nb = 1;
    if (nb > s->N) nb = s->N;
    return (int)nb;
}

/* first/last output index o (inclusive) with 0 <= o*stride - pad + k < in */
static void valid_range(int k, int in, int out, int stride, int pad, int *lo, int *hi) {
    int a = pad - k; /* need o*stride >= a */
    int l = a <= 0 ? 0 : (a + stride - 1) / stride;
    int b = in - 1 + pad - k; /* need o*stride <= b */
    int h = b < 0 ? -1 : b / stride;
    if (h > out - 1) h = out - 1;
    *lo = l;
    *hi = h;
}

/* col (K, nb*HoWo) from samples x[n0 .. n0+nb) */
static void im2col(float *col, const float *x, int n0, int nb, const conv_shape *s, int par) {
    const long P = (long)nb * s->HoWo;
    const int C = s->C, KH = s->KH, KW = s->KW, H = s->H, W = s->W;
    const int Ho = s->Ho, Wo = s->Wo, st = s->stride, ph = s->pad_h, pw_ = s->pad_w;
#pragma omp parallel for collapse(2) schedule(static) if (par)
    for (int c = 0; c < C; c++) {
        for (int n = 0; n < nb; n++) {
            const float *xp = x + ((size_t)(n0 + n) * C + c) * H * W;
            for (int i = 0; i < KH; i++) {
                int ylo, yhi;
                valid_range(i, H, Ho, st, ph, &ylo, &yhi);
                for (int j = 0; j < KW; j++) {
                    int xlo, xhi;
                    valid_range(j, W, Wo, st, pw_, &xlo, &xhi);
                    float *row = col + ((size_t)(c * KH + i) * KW + j) * P + (size_t)n * s->HoWo;
                    for (int oy = 0; oy < Ho; oy++) {
                        float *r = row + (size_t)oy * Wo;
                        if (oy < ylo || oy > yhi || xlo > xhi) {
                            for (int ox = 0; ox < Wo; ox++) r[ox] = 0.0f;
                            continue;
                        }
                        const float *src = xp + (size_t)(oy * st - ph + i) * W - pw_ + j;
                        for (int ox = 0; ox < xlo; ox++) r[ox] = 0.0f;
                        if (st == 1) {
                            /* short rows (Wo = 4..64): inline 8-wide copies, not memcpy */
                            int ox = xlo;
                            for (; ox + 8 <= xhi + 1; ox += 8) v8_store(r + ox, v8_load(src + ox));
                            for (; ox <= xhi; ox++) r[ox] = src[ox];
                        } else {
                            for (int ox = xlo; ox <= xhi; ox++) r[ox] = src[(long)ox * st];
                        }
                        for (int ox = xhi + 1; ox < Wo; ox++) r[ox] = 0.0f;
                    }
                }
            }
        }
    }
}

/* dx[n0 .. n0+nb) += col2im(dcol (K, nb*HoWo)); each (n,c) plane is owned by one thread */
static void col2im_add(float *dx, const float *dcol, int n0, int nb, const conv_shape *s,
                       int par) {
    const long P = (long)nb * s->HoWo;
    const int C = s->C, KH = s->KH, KW = s->KW, H = s->H, W = s->W;
    const int Ho = s->Ho, Wo = s->Wo, st = s->stride, ph = s->pad_h, pw_ = s->pad_w;
#pragma omp parallel for collapse(2) schedule(static) if (par)
    for (int n = 0; n < nb; n++) {
        for (int c = 0; c < C; c++) {
            float *xp = dx + ((size_t)(n0 + n) * C + c) * H * W;
            for (int i = 0; i < KH; i++) {
                int ylo, yhi;
                valid_range(i, H, Ho, st, ph, &ylo, &yhi);
                for (int j = 0; j < KW; j++) {
                    int xlo, xhi;
                    valid_range(j, W, Wo, st, pw_, &xlo, &xhi);
                    const float *row =
                        dcol + ((size_t)(c * KH + i) * KW + j) * P + (size_t)n * s->HoWo;
                    for (int oy = ylo; oy <= yhi; oy++) {
                        const float *r = row + (size_t)oy * Wo;
                        float *dst = xp + (size_t)(oy * st - ph + i) * W - pw_ + j;
                        if (st == 1) {
                            int ox = xlo;
                            for (; ox + 8 <= xhi + 1; ox += 8)
                                v8_store(dst + ox, v8_load(dst + ox) + v8_load(r + ox));
                            for (; ox <= xhi; ox++) dst[ox] += r[ox];
                        } else {
                            for (int ox = xlo; ox <= xhi; ox++) dst[(long)ox * st] += r[ox];
                        }
                    }
                }
            }
        }
    }
}

/* dst (rows, nb*HoWo) <- src (nb, rows, HoWo): gathers a chunk of NCHW into GEMM layout */
static void gather_chunk(float *dst, const float *src, int nb, int rows, long HoWo, int par) {
    const long P = (long)nb * HoWo;
#pragma omp parallel for collapse(2) schedule(static) if (par)
    for (int r = 0; r < rows; r++)
        for (int n = 0; n < nb; n++)
            memcpy(dst + (size_t)r * P + (size_t)n * HoWo, src + ((size_t)n * rows + r) * HoWo,
                   sizeof(float) * HoWo);
}

/* Forward of samples [n0, n0+nb). Scratch from the CALLING thread's workspace.
 * par: use OpenMP inside (0 when already inside a parallel region). */
static idd_status fwd_chunk(float *out, const float *x, const float *w, const float *b, int n0,
                            int nb, const conv_shape *s, int par) {
    const int C = s->C, O = s->O, pw = is_pointwise(s);
    const long P = (long)nb * s->HoWo;
    const float *B;
    if (pw && nb == 1) {
        B = x + (size_t)n0 * C * s->HoWo;
    } else {
        float *col = idd_workspace_get(0, sizeof(float) * (size_t)s->K * P);
        if (!col) return IDD_ENOMEM;
        if (pw) gather_chunk(col, x + (size_t)n0 * C * s->HoWo, nb, C, s->HoWo, par);
        else im2col(col, x, n0, nb, s, par);
        B = col;
    }
    float *dst = out + (size_t)n0 * O * s->HoWo;
    if (nb > 1) {
        dst = idd_workspace_get(1, sizeof(float) * (size_t)O * P);
        if (!dst) return IDD_ENOMEM;
    }
    if (nb == 1 && b) {
        /* one sample: start from the bias and accumulate (beta = 1), which replaces
         * OpenBLAS's zeroing pass and a separate bias pass over the output */
#pragma omp parallel for schedule(static) if (par)
        for (int o = 0; o < O; o++) {
            float *d = dst + (size_t)o * P;
            const float bo = b[o];
            for (long p = 0; p < P; p++) d[p] = bo;
        }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, O, (int)P, (int)s->K, 1.0f, w,
                (int)s->K, B, (int)P, nb == 1 && b ? 1.0f : 0.0f, dst, (int)P);
    if (nb == 1) return IDD_OK;
    /* add the bias; when nb > 1 also scatter (O, nb, HoWo) -> out (nb, O, HoWo) */
#pragma omp parallel for collapse(2) schedule(static) if (par)
    for (int n = 0; n < nb; n++) {
        for (int o = 0; o < O; o++) {
            const float *src = dst + (size_t)o * P + (size_t)n * s->HoWo;
            float *d = out + ((size_t)(n0 + n) * O + o) * s->HoWo;
            float bo = b ? b[o] : 0.0f;
            for (long p = 0; p < s->HoWo; p++) d[p] = src[p] + bo;
        }
    }
    return IDD_OK;
}

/* Backward of samples [n0, n0+nb): dx rows of those samples and dw += their share
 * (dw may be a thread-private partial). Scratch from the calling thread's workspace. */
static idd_status bwd_chunk(float *dx, float *dw, const float *dout, const float *x,
                            const float *w, int n0, int nb, const conv_shape *s, int par) {
    const int C = s->C, O = s->O, pw = is_pointwise(s);
    const long P = (long)nb * s->HoWo;
    const float *D = dout + (size_t)n0 * O * s->HoWo;
    if (nb > 1) {
        float *g = idd_workspace_get(1, sizeof(float) * (size_t)O * P);
        if (!g) return IDD_ENOMEM;
        gather_chunk(g, D, nb, O, s->HoWo, par);
        D = g;
    }
    if (dw) {
        const float *B;
        if (pw && nb == 1) {
            B = x + (size_t)n0 * C * s->HoWo;
        } else {
            float *col = idd_workspace_get(0, sizeof(float) * (size_t)s->K * P);
            if (!col) return IDD_ENOMEM;
            if (pw) gather_chunk(col, x + (size_t)n0 * C * s->HoWo, nb, C, s->HoWo, par);
            else im2col(col, x, n0, nb, s, par);
            B = col;
        }
        /* dw (O,K) += D (O,P) . B^T (P,K) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, O, (int)s->K, (int)P, 1.0f, D,
                    (int)P, B, (int)P, 1.0f, dw, (int)s->K);
    }
    if (!dx) return IDD_OK;
    if (pw && nb == 1) {
        /* dx_n (C,HW) += w^T (C,O) . D (O,HW) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, (int)P, O, 1.0f, w, (int)s->K, D,
                    (int)P, 1.0f, dx + (size_t)n0 * C * s->HoWo, (int)P);
        return IDD_OK;
    }
    float *dcol = idd_workspace_get(2, sizeof(float) * (size_t)s->K * P);
    if (!dcol) return IDD_ENOMEM;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)s->K, (int)P, O, 1.0f, w,
                (int)s->K, D, (int)P, 0.0f, dcol, (int)P);
    if (!pw) {
        col2im_add(dx, dcol, n0, nb, s, par);
        return IDD_OK;
    }
    /* 1x1 with nb > 1: scatter-add dcol (C, nb, HW) -> dx (nb, C, HW) */
#pragma omp parallel for collapse(2) schedule(static) if (par)
    for (int n = 0; n < nb; n++)
        for (int c = 0; c < C; c++) {
            const float *src = dcol + (size_t)c * P + (size_t)n * s->HoWo;
            float *d = dx + ((size_t)(n0 + n) * C + c) * s->HoWo;
            for (long p = 0; p < s->HoWo; p++) d[p] += src[p];
        }
    return IDD_OK;
}

/* Per-sample mode when there are at least as many samples as threads (see the header
 * comment); otherwise chunks with multithreaded BLAS. */
static int use_per_sample(int N) {
    if (conv_mode == 1) return 0;
    int nt = omp_get_max_threads();
    if (conv_mode == 2) return nt > 1;
    return nt > 1 && N >= nt && !omp_in_parallel();
}

/* per-sample schedule on tiny images (4x4, 8x8): fold a few samples per thread so each
 * single-threaded sgemm has at least PER_THREAD_COLS columns, while keeping at least
 * one chunk per thread */
#define PER_THREAD_COLS 256
static int per_thread_chunk(const conv_shape *s) {
    long nb = (PER_THREAD_COLS + s->HoWo - 1) / s->HoWo;
    long cap = s->N / omp_get_max_threads();
    if (nb > cap) nb = cap;
    return nb < 1 ? 1 : (int)nb;
}

static idd_status nomem(const char *fn, const conv_shape *s) {
    return idd_error_status(IDD_ENOMEM, "%s: out of memory for scratch, input (%d,%d,%d,%d), "
                            "weight (%d,%d,%d,%d)",
                            fn, s->N, s->C, s->H, s->W, s->O, s->C, s->KH, s->KW);
}

idd_status idd_conv2d_forward_f32(float *out, const float *x, const float *w, const float *b,
                                  int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                  int pad) {
    return idd_conv2d_forward_hw_f32(out, x, w, b, N, C, H, W, O, KH, KW, stride, pad, pad);
}

idd_status idd_conv2d_forward_hw_f32(float *out, const float *x, const float *w, const float *b,
                                     int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                     int pad_h, int pad_w) {
    conv_shape s;
    idd_status st = conv_check("conv2d_forward", &s, N, C, H, W, O, KH, KW, stride, pad_h, pad_w);
    if (st) return st;
    if (use_per_sample(N)) {
        int failed = 0, nb = per_thread_chunk(&s), nch = (N + nb - 1) / nb;
        int blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
#pragma omp parallel for schedule(static)
        for (int ch = 0; ch < nch; ch++)
            if (fwd_chunk(out, x, w, b, ch * nb, ch * nb + nb <= N ? nb : N - ch * nb, &s, 0)) {
#pragma omp atomic write
                failed = 1;
            }
        openblas_set_num_threads(blas_threads);
        return failed ? nomem("conv2d_forward", &s) : IDD_OK;
    }
    const int nb_max = chunk_samples(&s);
    for (int n0 = 0; n0 < N; n0 += nb_max) {
        int nb = N - n0 < nb_max ? N - n0 : nb_max;
        if (fwd_chunk(out, x, w, b, n0, nb, &s, 1)) return nomem("conv2d_forward", &s);
    }
    return IDD_OK;
}

idd_status idd_conv2d_backward_f32(float *dx, float *dw, float *db, const float *dout,
                                   const float *x, const float *w, int N, int C, int H, int W,
                                   int O, int KH, int KW, int stride, int pad) {
    return idd_conv2d_backward_hw_f32(dx, dw, db, dout, x, w, N, C, H, W, O, KH, KW, stride, pad,
                                      pad);
}

idd_status idd_conv2d_backward_hw_f32(float *dx, float *dw, float *db, const float *dout,
                                      const float *x, const float *w, int N, int C, int H, int W,
                                      int O, int KH, int KW, int stride, int pad_h, int pad_w) {
    conv_shape s;
    idd_status st = conv_check("conv2d_backward", &s, N, C, H, W, O, KH, KW, stride, pad_h, pad_w);
    if (st) return st;
    if (dw && !x) return idd_error("conv2d_backward: dw requested but x is NULL");
    if (dx && !w) return idd_error("conv2d_backward: dx requested but w is NULL");

    if (db) {
#pragma omp parallel for schedule(static)
        for (int o = 0; o < O; o++) {
            double acc = 0;
            for (int n = 0; n < N; n++) {
                const float *r = dout + ((size_t)n * O + o) * s.HoWo;
                float part = 0;
                for (long p = 0; p < s.HoWo; p++) part += r[p];
                acc += part;
            }
            db[o] += (float)acc;
        }
    }
    if (!dx && !dw) return IDD_OK;

    if (use_per_sample(N)) {
        /* each thread accumulates dw over its samples into a private partial (workspace
         * slot 3 of that thread), then all partials are summed into dw */
        const size_t nw = (size_t)O * s.K;
        float *parts[256];
        int failed = 0, nt = omp_get_max_threads();
        int nb = per_thread_chunk(&s), nch = (N + nb - 1) / nb;
        if (nt > 256) nt = 256;
        int blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), team = omp_get_num_threads();
            float *mydw = NULL;
            if (dw) {
                mydw = idd_workspace_get(3, sizeof(float) * nw);
                if (mydw) memset(mydw, 0, sizeof(float) * nw);
                else {
#pragma omp atomic write
                    failed = 1;
                }
            }
            parts[t] = mydw;
#pragma omp for schedule(static)
            for (int ch = 0; ch < nch; ch++)
                if (!(dw && !mydw) &&
                    bwd_chunk(dx, mydw, dout, x, w, ch * nb, ch * nb + nb <= N ? nb : N - ch * nb,
                              &s, 0)) {
#pragma omp atomic write
                    failed = 1;
                }
            /* implicit barrier of the omp for: all partials are complete */
            if (dw && !failed) {
#pragma omp for schedule(static)
                for (size_t i = 0; i < nw; i++) {
                    float acc = 0;
                    for (int u = 0; u < team; u++) acc += parts[u][i];
                    dw[i] += acc;
                }
            }
        }
        openblas_set_num_threads(blas_threads);
        return failed ? nomem("conv2d_backward", &s) : IDD_OK;
    }
    const int nb_max = chunk_samples(&s);
    for (int n0 = 0; n0 < N; n0 += nb_max) {
        int nb = N - n0 < nb_max ? N - n0 : nb_max;
        if (bwd_chunk(dx, dw, dout, x, w, n0, nb, &s, 1)) return nomem("conv2d_backward", &s);
    }
    return IDD_OK;
}
