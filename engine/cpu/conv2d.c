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
 * Scratch comes from idd_workspace_get (slots 0..3 of the calling/worker thread).
 *
 * 3x3 stride-1 pad-1 convs with C, O <= 64 and W a multiple of 16 (or W = 8 with H a
 * multiple of 4) take a direct kernel instead (forward and dx; dw stays on im2col) when
 * the CPU has AVX-512F/VL: see "direct" below. On 1 core, batch 32, it ran the small
 * config's 3x3 layers forward at ~140 GFLOP/s (32x32 and 16x16, 32-64 channels) and
 * ~55 (8x8) vs 50-70 and ~40 by im2col + sgemm.
 *
 * 3x3 stride-1 pad-1 convs with 32+ channels and enough tiles go to Winograd F(4x4,3x3)
 * (conv_winograd.c: forward, dx and dw), 1.5-3x faster than either path above on the
 * UNet layers; winograd_m has the rule and IDDPM_CONV / idd_conv2d_set_algo override it. */
#include "iddpm/kernels.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "conv_winograd.h"
#include "vmath.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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

/* The (K, nb*HoWo) patch matrix of samples [n0, n0+nb): x itself for one sample of a
 * 1x1 stride-1 conv, else im2col (or a gather for 1x1) into workspace slot 0.
 * NULL when scratch memory cannot be had. */
static const float *patches(const float *x, int n0, int nb, const conv_shape *s, int par) {
    const int C = s->C;
    if (is_pointwise(s) && nb == 1) return x + (size_t)n0 * C * s->HoWo;
    float *col = idd_workspace_get(0, sizeof(float) * (size_t)s->K * nb * s->HoWo);
    if (!col) return NULL;
    if (is_pointwise(s)) gather_chunk(col, x + (size_t)n0 * C * s->HoWo, nb, C, s->HoWo, par);
    else im2col(col, x, n0, nb, s, par);
    return col;
}

/* Forward of samples [n0, n0+nb). Scratch from the CALLING thread's workspace.
 * par: use OpenMP inside (0 when already inside a parallel region). */
static idd_status fwd_chunk(float *out, const float *x, const float *w, const float *b, int n0,
                            int nb, const conv_shape *s, int par) {
    const int O = s->O;
    const long P = (long)nb * s->HoWo;
    const float *B = patches(x, n0, nb, s, par);
    if (!B) return IDD_ENOMEM;
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
        const float *B = patches(x, n0, nb, s, par);
        if (!B) return IDD_ENOMEM;
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

#if defined(__x86_64__) && defined(__GNUC__)
/* ---- direct 3x3 stride-1 pad-1 kernel (small channel counts) -------------------------
 * For C, O <= DIRECT_MAX_CH and W a multiple of 8, out = conv(x, w) is computed without
 * im2col: each sample's input is copied into a zero-bordered (C, H+2, W+2) buffer, and
 * a register tile of DIRECT_OB output channels x 4 vectors of 8 output pixels (one row
 * of 32, two rows of 16 or four rows of 8) accumulates FMAs over the C channels and 9
 * taps, starting from the bias (forward) and added to the output (dx backward).
 * dx is the same conv of dout with the kernel flipped and in/out channels swapped:
 *   dx[c][y][x] += sum_o sum_ij dout[o][y+1-i][x+1-j] w[o][c][i][j].
 * Weights are rearranged once per call to (Ci, 9, Co), so a tile's DIRECT_OB weights of
 * one tap are adjacent. dw stays on im2col + sgemm. */
#define DIRECT_MAX_CH 64
#define DIRECT_OB 4

static int direct_rows(int W) { return W >= 64 ? 1 : 64 / W; }

static int have_avx512(void) {
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 1 : 0;
    return known;
}

static int use_direct(const conv_shape *s) {
    return s->KH == 3 && s->KW == 3 && s->stride == 1 && s->pad_h == 1 && s->pad_w == 1 &&
           s->C <= DIRECT_MAX_CH && s->O <= DIRECT_MAX_CH &&
           (s->W == 8 ? s->H % 4 == 0
                      : s->W % 16 == 0 &&
                            (s->W >= 64 ? s->W % 64 == 0 : s->H % direct_rows(s->W) == 0)) &&
           have_avx512();
}

/* pad (Ci, H+2, W+2) <- in (Ci, H, W) with a zero border */
static void direct_pad(float *pad, const float *in, int Ci, int H, int W, int par) {
    const int Wp = W + 2, Hp = H + 2;
#pragma omp parallel for schedule(static) if (par)
    for (int c = 0; c < Ci; c++) {
        float *p = pad + (size_t)c * Hp * Wp;
        const float *src = in + (size_t)c * H * W;
        memset(p, 0, sizeof(float) * Wp);
        for (int y = 0; y < H; y++) {
            float *r = p + (size_t)(y + 1) * Wp;
            r[0] = 0.0f;
            memcpy(r + 1, src + (size_t)y * W, sizeof(float) * W);
            r[W + 1] = 0.0f;
        }
        memset(p + (size_t)(H + 1) * Wp, 0, sizeof(float) * Wp);
    }
}

/* output channels o0 + {0, d1, d2, d3} (d_q = q, or clamped to the last channel of a
 * short final group: repeats are computed and not stored) of one sample, all tiles.
 * A tile is 4 vectors of 16 output pixels (one row of 64, two rows of 32 or four rows
 * of 16): 16 named zmm accumulators of the 32 AVX-512 registers. */
__attribute__((target("avx512f,fma"))) static void direct_quad(float *out, const float *pad,
                                                          const float *wt, const float *b,
                                                          int Ci, int Co, int H, int W, int o0,
                                                          int nq, int accumulate) {
    const int Wp = W + 2, R = direct_rows(W);
    const long HpWp = (long)(H + 2) * Wp, HW = (long)H * W;
    int oi[4], oo[4];
    for (int k = 0; k < 4; k++) {
        int r = W >= 64 ? 0 : k / (W / 16), v = W >= 64 ? k : k % (W / 16);
        oi[k] = r * Wp + 16 * v;
        oo[k] = r * W + 16 * v;
    }
    const int i1 = oi[1], i2 = oi[2], i3 = oi[3];
    const int d1 = nq > 1 ? 1 : 0, d2 = nq > 2 ? 2 : d1, d3 = nq > 3 ? 3 : d2;
    const __m512 b0 = _mm512_set1_ps(b ? b[o0] : 0.0f), b1 = _mm512_set1_ps(b ? b[o0 + d1] : 0.0f);
    const __m512 b2 = _mm512_set1_ps(b ? b[o0 + d2] : 0.0f), b3 = _mm512_set1_ps(b ? b[o0 + d3] : 0.0f);
    for (int oy = 0; oy < H; oy += R) {
        for (int ox = 0; ox < (W >= 64 ? W : 16); ox += 64) {
            __m512 a00 = b0, a01 = b0, a02 = b0, a03 = b0;
            __m512 a10 = b1, a11 = b1, a12 = b1, a13 = b1;
            __m512 a20 = b2, a21 = b2, a22 = b2, a23 = b2;
            __m512 a30 = b3, a31 = b3, a32 = b3, a33 = b3;
            const float *xc = pad + (long)oy * Wp + ox;
            const float *wc = wt + o0;
            for (int c = 0; c < Ci; c++, xc += HpWp, wc += 9 * Co) {
#pragma GCC unroll 9
                for (int t = 0; t < 9; t++) {
                    const float *xr = xc + (t / 3) * Wp + t % 3;
                    const float *wr = wc + t * Co;
                    __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + i1);
                    __m512 x2 = _mm512_loadu_ps(xr + i2), x3 = _mm512_loadu_ps(xr + i3);
                    __m512 w = _mm512_set1_ps(wr[0]);
                    a00 = _mm512_fmadd_ps(x0, w, a00);
                    a01 = _mm512_fmadd_ps(x1, w, a01);
                    a02 = _mm512_fmadd_ps(x2, w, a02);
                    a03 = _mm512_fmadd_ps(x3, w, a03);
                    w = _mm512_set1_ps(wr[d1]);
                    a10 = _mm512_fmadd_ps(x0, w, a10);
                    a11 = _mm512_fmadd_ps(x1, w, a11);
                    a12 = _mm512_fmadd_ps(x2, w, a12);
                    a13 = _mm512_fmadd_ps(x3, w, a13);
                    w = _mm512_set1_ps(wr[d2]);
                    a20 = _mm512_fmadd_ps(x0, w, a20);
                    a21 = _mm512_fmadd_ps(x1, w, a21);
                    a22 = _mm512_fmadd_ps(x2, w, a22);
                    a23 = _mm512_fmadd_ps(x3, w, a23);
                    w = _mm512_set1_ps(wr[d3]);
                    a30 = _mm512_fmadd_ps(x0, w, a30);
                    a31 = _mm512_fmadd_ps(x1, w, a31);
                    a32 = _mm512_fmadd_ps(x2, w, a32);
                    a33 = _mm512_fmadd_ps(x3, w, a33);
                }
            }
            float *d = out + o0 * HW + (long)oy * W + ox;
#define DIRECT_STORE(q, v0, v1, v2, v3)                                                    \
    do {                                                                                   \
        float *e = d + (q) * HW;                                                           \
        if (accumulate) {                                                                  \
            _mm512_storeu_ps(e, _mm512_add_ps(_mm512_loadu_ps(e), v0));                    \
            _mm512_storeu_ps(e + oo[1], _mm512_add_ps(_mm512_loadu_ps(e + oo[1]), v1));    \
            _mm512_storeu_ps(e + oo[2], _mm512_add_ps(_mm512_loadu_ps(e + oo[2]), v2));    \
            _mm512_storeu_ps(e + oo[3], _mm512_add_ps(_mm512_loadu_ps(e + oo[3]), v3));    \
        } else {                                                                           \
            _mm512_storeu_ps(e, v0);                                                       \
            _mm512_storeu_ps(e + oo[1], v1);                                               \
            _mm512_storeu_ps(e + oo[2], v2);                                               \
            _mm512_storeu_ps(e + oo[3], v3);                                               \
        }                                                                                  \
    } while (0)
            DIRECT_STORE(0, a00, a01, a02, a03);
            if (nq > 1) DIRECT_STORE(1, a10, a11, a12, a13);
            if (nq > 2) DIRECT_STORE(2, a20, a21, a22, a23);
            if (nq > 3) DIRECT_STORE(3, a30, a31, a32, a33);
#undef DIRECT_STORE
        }
    }
}

/* W = 8 (8x8 maps): tiles of 4 rows of 8 pixels (ymm) x 6 output channels o0 + d_q
 * (clamped as above): 24 accumulators of the 32 AVX-512VL vector registers. */
__attribute__((target("avx512f,avx512vl,avx2,fma"))) static void direct_w8(float *out, const float *pad,
                                                                  const float *wt,
                                                                  const float *b, int Ci,
                                                                  int Co, int H, int o0, int nq,
                                                                  int accumulate) {
    const int W = 8, Wp = 10;
    const long HpWp = (long)(H + 2) * Wp, HW = (long)H * W;
    int dq[6];
    for (int q = 0; q < 6; q++) dq[q] = q < nq ? q : nq - 1;
    for (int oy = 0; oy < H; oy += 4) {
        __m256 a[6][4];
#pragma GCC unroll 6
        for (int q = 0; q < 6; q++) {
            __m256 init = _mm256_set1_ps(b ? b[o0 + dq[q]] : 0.0f);
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) a[q][k] = init;
        }
        const float *xc = pad + (long)oy * Wp;
        const float *wc = wt + o0;
        for (int c = 0; c < Ci; c++, xc += HpWp, wc += 9 * Co) {
#pragma GCC unroll 9
            for (int t = 0; t < 9; t++) {
                const float *xr = xc + (t / 3) * Wp + t % 3;
                const float *wr = wc + t * Co;
                __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + Wp);
                __m256 x2 = _mm256_loadu_ps(xr + 2 * Wp), x3 = _mm256_loadu_ps(xr + 3 * Wp);
#pragma GCC unroll 6
                for (int q = 0; q < 6; q++) {
                    __m256 w = _mm256_set1_ps(wr[dq[q]]);
                    a[q][0] = _mm256_fmadd_ps(x0, w, a[q][0]);
                    a[q][1] = _mm256_fmadd_ps(x1, w, a[q][1]);
                    a[q][2] = _mm256_fmadd_ps(x2, w, a[q][2]);
                    a[q][3] = _mm256_fmadd_ps(x3, w, a[q][3]);
                }
            }
        }
#pragma GCC unroll 6
        for (int q = 0; q < 6; q++) {
            if (q >= nq) break;
            float *d = out + (o0 + q) * HW + (long)oy * W;
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                __m256 v = a[q][k];
                if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(d + k * W), v);
                _mm256_storeu_ps(d + k * W, v);
            }
        }
    }
}

/* out (Co, H, W) (+)= conv of one sample; pairs of output channels over OpenMP if par */
static void direct_sample(float *out, const float *pad, const float *wt, const float *b, int Ci,
                          int Co, int H, int W, int accumulate, int par) {
    if (W == 8) {
        const int n6 = (Co + 5) / 6;
#pragma omp parallel for schedule(static) if (par)
        for (int ob = 0; ob < n6; ob++)
            direct_w8(out, pad, wt, b, Ci, Co, H, ob * 6, Co - ob * 6 < 6 ? Co - ob * 6 : 6,
                      accumulate);
        return;
    }
    const int nblk = (Co + DIRECT_OB - 1) / DIRECT_OB;
#pragma omp parallel for schedule(static) if (par)
    for (int ob = 0; ob < nblk; ob++) {
        int o0 = ob * DIRECT_OB;
        direct_quad(out, pad, wt, b, Ci, Co, H, W, o0, Co - o0 < DIRECT_OB ? Co - o0 : DIRECT_OB,
                    accumulate);
    }
}

/* out[n] (+)= conv(in[n]) for all N samples; wt is (Ci, 9, Co) */
static idd_status direct_conv(float *out, const float *in, const float *wt, const float *b, int N,
                              int Ci, int Co, int H, int W, int accumulate) {
    const size_t npad = (size_t)Ci * (H + 2) * (W + 2), isz = (size_t)Ci * H * W,
                 osz = (size_t)Co * H * W;
    int nt = omp_get_max_threads(), failed = 0;
    if (nt > 1 && N >= nt && !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            float *pad = idd_workspace_get(0, sizeof(float) * npad);
            if (!pad) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            direct_pad(pad, in + n * isz, Ci, H, W, 0);
            direct_sample(out + n * osz, pad, wt, b, Ci, Co, H, W, accumulate, 0);
        }
        return failed ? IDD_ENOMEM : IDD_OK;
    }
    float *pad = idd_workspace_get(0, sizeof(float) * npad);
    if (!pad) return IDD_ENOMEM;
    int par = !omp_in_parallel();
    for (int n = 0; n < N; n++) {
        direct_pad(pad, in + n * isz, Ci, H, W, par);
        direct_sample(out + n * osz, pad, wt, b, Ci, Co, H, W, accumulate, par);
    }
    return IDD_OK;
}

/* forward: wt[(c*9 + t)*O + o] = w[o][c][t] */
static idd_status direct_forward(float *out, const float *x, const float *w, const float *b,
                                 const conv_shape *s) {
    const int C = s->C, O = s->O;
    float *wt = malloc(sizeof(float) * (size_t)C * 9 * O);
    if (!wt) return IDD_ENOMEM;
    for (int o = 0; o < O; o++)
        for (int c = 0; c < C; c++)
            for (int t = 0; t < 9; t++) wt[((size_t)c * 9 + t) * O + o] = w[((size_t)o * C + c) * 9 + t];
    idd_status st = direct_conv(out, x, wt, b, s->N, C, O, s->H, s->W, 0);
    free(wt);
    return st;
}

/* dx += conv(dout, flipped w): wt[(o*9 + t)*C + c] = w[o][c][8 - t] */
static idd_status direct_backward_dx(float *dx, const float *dout, const float *w,
                                     const conv_shape *s) {
    const int C = s->C, O = s->O;
    float *wt = malloc(sizeof(float) * (size_t)C * 9 * O);
    if (!wt) return IDD_ENOMEM;
    for (int o = 0; o < O; o++)
        for (int c = 0; c < C; c++)
            for (int t = 0; t < 9; t++)
                wt[((size_t)o * 9 + t) * C + c] = w[((size_t)o * C + c) * 9 + (8 - t)];
    idd_status st = direct_conv(dx, dout, wt, NULL, s->N, O, C, s->H, s->W, 1);
    free(wt);
    return st;
}
#else
static int use_direct(const conv_shape *s) { return 0; }
static idd_status direct_forward(float *out, const float *x, const float *w, const float *b,
                                 const conv_shape *s) {
    return IDD_ERR;
}
static idd_status direct_backward_dx(float *dx, const float *dout, const float *w,
                                     const conv_shape *s) {
    return IDD_ERR;
}
#endif

/* ---- algorithm choice for 3x3 stride-1 pad-1 convs ----------------------------------
 * IDDPM_CONV (read once) or idd_conv2d_set_algo: auto (default), im2col (im2col + sgemm
 * or the direct kernel, as before Winograd), winograd (F(4x4,3x3) for every such conv),
 * winograd2 (F(2x2,3x3)). Auto: see winograd_m. */
static int conv_algo = -1;

void idd_conv2d_set_algo(int algo) { conv_algo = algo >= 0 && algo <= 3 ? algo : 0; }

static int get_algo(void) {
    if (conv_algo < 0) {
        const char *e = getenv("IDDPM_CONV");
        conv_algo = !e ? IDD_CONV_AUTO
                    : !strcmp(e, "im2col") ? IDD_CONV_IM2COL
                    : !strcmp(e, "winograd") ? IDD_CONV_WINOGRAD
                    : !strcmp(e, "winograd2") ? IDD_CONV_WINOGRAD2
                                              : IDD_CONV_AUTO;
    }
    return conv_algo;
}

/* tile size m of the Winograd conv to use for this shape, 0 for none; dw: for the weight
 * gradient (else forward and dx) */
static int winograd_m(const conv_shape *s, int dw) {
    if (s->KH != 3 || s->KW != 3 || s->stride != 1 || s->pad_h != 1 || s->pad_w != 1) return 0;
    switch (get_algo()) {
    case IDD_CONV_IM2COL: return 0;
    case IDD_CONV_WINOGRAD: return 4;
    case IDD_CONV_WINOGRAD2: return 2;
    default: break;
    }
    /* measured (tests/c/bench_winograd.c, 2 threads, UNet layers, shared machine):
     * F(4x4) beat im2col + sgemm 1.6-2.8x on 64-256 channels from 8x8 maps up (4x4 too
     * at batch 64), forward, dx and dw; the direct kernel (forward, dx) 1.6-3.5x at 64
     * channels; im2col for dw 2.9x at 32 channels. It lost (0.4-0.7x) with under ~32
     * tiles in all (4x4 maps at batch 8: the transforms cost as much as the GEMMs).
     * F(2x2) was never the fastest. At 32 channels it beat the direct kernel only 1.1-1.3x
     * (forward, dx), and its error there (up to ~2e-4 of O(1) outputs, tests/c/
     * test_kernels.c allows 1e-4) is not worth it: the direct kernel stays. Below 32
     * channels (the first and last convs) it is not used. */
    long tiles = (long)s->N * ((s->H + 3) / 4) * ((s->W + 3) / 4);
    if (tiles < 32 || s->C < 32 || s->O < 32) return 0;
    if (!dw && (s->C < 64 || s->O < 64) && use_direct(s)) return 0;
    return 4;
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
    int wm = winograd_m(&s, 0);
    if (wm)
        return idd_winograd_conv3x3(out, x, w, b, N, C, H, W, O, wm, 0, 0)
                   ? nomem("conv2d_forward", &s)
                   : IDD_OK;
    if (use_direct(&s))
        return direct_forward(out, x, w, b, &s) ? nomem("conv2d_forward", &s) : IDD_OK;
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
    int wm = winograd_m(&s, 0);
    if (wm && dx) {
        /* dx += conv(dout, w flipped and transposed), see conv_winograd.h */
        if (idd_winograd_conv3x3(dx, dout, w, NULL, N, O, H, W, C, wm, 1, 1))
            return nomem("conv2d_backward", &s);
        dx = NULL;
    }
    wm = winograd_m(&s, 1);
    if (wm && dw) {
        if (idd_winograd_conv3x3_dw(dw, dout, x, N, C, H, W, O, wm))
            return nomem("conv2d_backward", &s);
        dw = NULL;
    }
    if (!dx && !dw) return IDD_OK;
    if (dx && use_direct(&s)) {
        if (direct_backward_dx(dx, dout, w, &s)) return nomem("conv2d_backward", &s);
        dx = NULL; /* dw below, by im2col */
        if (!dw) return IDD_OK;
    }

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
