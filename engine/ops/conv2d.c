/* conv2d.c — 2-D convolution (NCHW, weight (O,C,KH,KW), zero padding), forward and
 * backward, by im2col + OpenBLAS sgemm.
 *
 * The batch is processed in chunks of nb samples. For a chunk, im2col writes the
 * columns of all nb samples side by side:
 *   col (K = C*KH*KW, P = nb*Ho*Wo),  col[(c*KH+i)*KW+j][s*HoWo + oy*Wo + ox]
 * so ONE sgemm covers the chunk:  out_chunk (O,P) = w (O,K) . col (K,P).
 * nb is chosen so that P reaches about target_cols columns: large layers (32x32) use
 * nb = 1 and the GEMM writes straight into out; small layers (8x8, 4x4) fold several
 * samples so the GEMM stays big enough for both cores, at the cost of a scatter from
 * (O, nb, HoWo) to (nb, O, HoWo). A 1x1 stride-1 unpadded conv with nb = 1 uses x
 * itself as col (no im2col).
 *
 * Backward, per chunk with D = dout_chunk (O,P):
 *   dw (O,K) += D . col^T           (sgemm, beta = 1, accumulates across chunks)
 *   dcol (K,P) = w^T . D ; dx += col2im(dcol)
 *   db[o] += sum of dout[n,o,:,:]
 * OpenMP parallelizes im2col / col2im / scatter; OpenBLAS threads the sgemm; the two
 * never run at the same time. Scratch comes from idd_workspace_get (slots 0..2). */
#include "iddpm/kernels.h"

#include <cblas.h>
#include <string.h>

#define DEFAULT_TARGET_COLS 1024

static long target_cols = DEFAULT_TARGET_COLS;

void idd_conv2d_set_target_cols(long cols) { target_cols = cols > 0 ? cols : DEFAULT_TARGET_COLS; }

int idd_conv2d_out_size(int in, int k, int stride, int pad) {
    if (stride <= 0) return 0;
    long span = (long)in + 2L * pad - k;
    if (span < 0) return 0;
    return (int)(span / stride + 1);
}

typedef struct {
    int N, C, H, W, O, KH, KW, stride, pad, Ho, Wo;
    long HoWo, K;
} conv_shape;

static idd_status conv_check(const char *fn, conv_shape *s, int N, int C, int H, int W, int O,
                             int KH, int KW, int stride, int pad) {
    if (N <= 0 || C <= 0 || H <= 0 || W <= 0 || O <= 0 || KH <= 0 || KW <= 0 || stride <= 0 ||
        pad < 0)
        return idd_error("%s: bad sizes: input (%d,%d,%d,%d), weight (%d,%d,%d,%d), stride %d, "
                         "pad %d",
                         fn, N, C, H, W, O, C, KH, KW, stride, pad);
    int Ho = idd_conv2d_out_size(H, KH, stride, pad), Wo = idd_conv2d_out_size(W, KW, stride, pad);
    if (Ho <= 0 || Wo <= 0)
        return idd_error("%s: kernel %dx%d does not fit input %dx%d with pad %d", fn, KH, KW, H, W,
                         pad);
    *s = (conv_shape){N, C, H, W, O, KH, KW, stride, pad, Ho, Wo, (long)Ho * Wo, (long)C * KH * KW};
    return IDD_OK;
}

static int is_pointwise(const conv_shape *s) {
    return s->KH == 1 && s->KW == 1 && s->stride == 1 && s->pad == 0;
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
static void im2col(float *col, const float *x, int n0, int nb, const conv_shape *s) {
    const long P = (long)nb * s->HoWo;
    const int C = s->C, KH = s->KH, KW = s->KW, H = s->H, W = s->W;
    const int Ho = s->Ho, Wo = s->Wo, st = s->stride, pad = s->pad;
#pragma omp parallel for collapse(2) schedule(static)
    for (int c = 0; c < C; c++) {
        for (int n = 0; n < nb; n++) {
            const float *xp = x + ((size_t)(n0 + n) * C + c) * H * W;
            for (int i = 0; i < KH; i++) {
                int ylo, yhi;
                valid_range(i, H, Ho, st, pad, &ylo, &yhi);
                for (int j = 0; j < KW; j++) {
                    int xlo, xhi;
                    valid_range(j, W, Wo, st, pad, &xlo, &xhi);
                    float *row = col + ((size_t)(c * KH + i) * KW + j) * P + (size_t)n * s->HoWo;
                    for (int oy = 0; oy < Ho; oy++) {
                        float *r = row + (size_t)oy * Wo;
                        if (oy < ylo || oy > yhi || xlo > xhi) {
                            memset(r, 0, sizeof(float) * Wo);
                            continue;
                        }
                        const float *src = xp + (size_t)(oy * st - pad + i) * W - pad + j;
                        for (int ox = 0; ox < xlo; ox++) r[ox] = 0.0f;
                        if (st == 1) {
                            memcpy(r + xlo, src + xlo, sizeof(float) * (xhi - xlo + 1));
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
static void col2im_add(float *dx, const float *dcol, int n0, int nb, const conv_shape *s) {
    const long P = (long)nb * s->HoWo;
    const int C = s->C, KH = s->KH, KW = s->KW, H = s->H, W = s->W;
    const int Ho = s->Ho, Wo = s->Wo, st = s->stride, pad = s->pad;
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < nb; n++) {
        for (int c = 0; c < C; c++) {
            float *xp = dx + ((size_t)(n0 + n) * C + c) * H * W;
            for (int i = 0; i < KH; i++) {
                int ylo, yhi;
                valid_range(i, H, Ho, st, pad, &ylo, &yhi);
                for (int j = 0; j < KW; j++) {
                    int xlo, xhi;
                    valid_range(j, W, Wo, st, pad, &xlo, &xhi);
                    const float *row =
                        dcol + ((size_t)(c * KH + i) * KW + j) * P + (size_t)n * s->HoWo;
                    for (int oy = ylo; oy <= yhi; oy++) {
                        const float *r = row + (size_t)oy * Wo;
                        float *dst = xp + (size_t)(oy * st - pad + i) * W - pad + j;
                        if (st == 1) {
                            for (int ox = xlo; ox <= xhi; ox++) dst[ox] += r[ox];
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
static void gather_chunk(float *dst, const float *src, int nb, int rows, long HoWo) {
    const long P = (long)nb * HoWo;
#pragma omp parallel for collapse(2) schedule(static)
    for (int r = 0; r < rows; r++)
        for (int n = 0; n < nb; n++)
            memcpy(dst + (size_t)r * P + (size_t)n * HoWo, src + ((size_t)n * rows + r) * HoWo,
                   sizeof(float) * HoWo);
}

idd_status idd_conv2d_forward_f32(float *out, const float *x, const float *w, const float *b,
                                  int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                  int pad) {
    conv_shape s;
    idd_status st = conv_check("conv2d_forward", &s, N, C, H, W, O, KH, KW, stride, pad);
    if (st) return st;
    const int nb_max = chunk_samples(&s);
    const int pw = is_pointwise(&s);
    float *col = NULL, *tmp = NULL;
    if (!(pw && nb_max == 1)) {
        col = idd_workspace_get(0, sizeof(float) * (size_t)s.K * nb_max * s.HoWo);
        if (!col) goto nomem;
    }
    if (nb_max > 1) {
        tmp = idd_workspace_get(1, sizeof(float) * (size_t)O * nb_max * s.HoWo);
        if (!tmp) goto nomem;
    }
    for (int n0 = 0; n0 < N; n0 += nb_max) {
        int nb = N - n0 < nb_max ? N - n0 : nb_max;
        long P = (long)nb * s.HoWo;
        const float *B;
        if (pw && nb == 1) {
            B = x + (size_t)n0 * C * s.HoWo;
        } else if (pw) {
            gather_chunk(col, x + (size_t)n0 * C * s.HoWo, nb, C, s.HoWo);
            B = col;
        } else {
            im2col(col, x, n0, nb, &s);
            B = col;
        }
        float *dst = nb == 1 ? out + (size_t)n0 * O * s.HoWo : tmp;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, O, (int)P, (int)s.K, 1.0f, w,
                    (int)s.K, B, (int)P, 0.0f, dst, (int)P);
        if (nb == 1) {
            if (b) {
                float *o0 = out + (size_t)n0 * O * s.HoWo;
#pragma omp parallel for schedule(static)
                for (int o = 0; o < O; o++) {
                    float *r = o0 + (size_t)o * s.HoWo;
                    float bo = b[o];
                    for (long p = 0; p < s.HoWo; p++) r[p] += bo;
                }
            }
        } else {
            /* scatter tmp (O, nb, HoWo) -> out (nb, O, HoWo), adding the bias */
#pragma omp parallel for collapse(2) schedule(static)
            for (int n = 0; n < nb; n++) {
                for (int o = 0; o < O; o++) {
                    const float *src = tmp + (size_t)o * P + (size_t)n * s.HoWo;
                    float *d = out + ((size_t)(n0 + n) * O + o) * s.HoWo;
                    float bo = b ? b[o] : 0.0f;
                    for (long p = 0; p < s.HoWo; p++) d[p] = src[p] + bo;
                }
            }
        }
    }
    return IDD_OK;
nomem:
    return idd_error_status(IDD_ENOMEM, "conv2d_forward: out of memory for scratch, input "
                            "(%d,%d,%d,%d), weight (%d,%d,%d,%d)",
                            N, C, H, W, O, C, KH, KW);
}

idd_status idd_conv2d_backward_f32(float *dx, float *dw, float *db, const float *dout,
                                   const float *x, const float *w, int N, int C, int H, int W,
                                   int O, int KH, int KW, int stride, int pad) {
    conv_shape s;
    idd_status st = conv_check("conv2d_backward", &s, N, C, H, W, O, KH, KW, stride, pad);
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

    const int nb_max = chunk_samples(&s);
    const int pw = is_pointwise(&s);
    float *col = NULL, *dgath = NULL, *dcol = NULL;
    if (dw && !(pw && nb_max == 1)) {
        col = idd_workspace_get(0, sizeof(float) * (size_t)s.K * nb_max * s.HoWo);
        if (!col) goto nomem;
    }
    if (nb_max > 1) {
        dgath = idd_workspace_get(1, sizeof(float) * (size_t)O * nb_max * s.HoWo);
        if (!dgath) goto nomem;
    }
    if (dx && !(pw && nb_max == 1)) {
        dcol = idd_workspace_get(2, sizeof(float) * (size_t)s.K * nb_max * s.HoWo);
        if (!dcol) goto nomem;
    }
    for (int n0 = 0; n0 < N; n0 += nb_max) {
        int nb = N - n0 < nb_max ? N - n0 : nb_max;
        long P = (long)nb * s.HoWo;
        const float *D;
        if (nb == 1) {
            D = dout + (size_t)n0 * O * s.HoWo;
        } else {
            gather_chunk(dgath, dout + (size_t)n0 * O * s.HoWo, nb, O, s.HoWo);
            D = dgath;
        }
        if (dw) {
            const float *B;
            if (pw && nb == 1) {
                B = x + (size_t)n0 * C * s.HoWo;
            } else if (pw) {
                gather_chunk(col, x + (size_t)n0 * C * s.HoWo, nb, C, s.HoWo);
                B = col;
            } else {
                im2col(col, x, n0, nb, &s);
                B = col;
            }
            /* dw (O,K) += D (O,P) . B^T (P,K) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, O, (int)s.K, (int)P, 1.0f, D,
                        (int)P, B, (int)P, 1.0f, dw, (int)s.K);
        }
        if (dx) {
            if (pw && nb == 1) {
                /* dx_n (C,HW) += w^T (C,O) . D (O,HW) */
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, (int)P, O, 1.0f, w,
                            (int)s.K, D, (int)P, 1.0f, dx + (size_t)n0 * C * s.HoWo, (int)P);
            } else {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)s.K, (int)P, O, 1.0f,
                            w, (int)s.K, D, (int)P, 0.0f, dcol, (int)P);
                if (pw) {
                    /* scatter-add dcol (C, nb, HW) -> dx (nb, C, HW) */
#pragma omp parallel for collapse(2) schedule(static)
                    for (int n = 0; n < nb; n++)
                        for (int c = 0; c < C; c++) {
                            const float *src = dcol + (size_t)c * P + (size_t)n * s.HoWo;
                            float *d = dx + ((size_t)(n0 + n) * C + c) * s.HoWo;
                            for (long p = 0; p < s.HoWo; p++) d[p] += src[p];
                        }
                } else {
                    col2im_add(dx, dcol, n0, nb, &s);
                }
            }
        }
    }
    return IDD_OK;
nomem:
    return idd_error_status(IDD_ENOMEM, "conv2d_backward: out of memory for scratch, input "
                            "(%d,%d,%d,%d), weight (%d,%d,%d,%d)",
                            N, C, H, W, O, C, KH, KW);
}
