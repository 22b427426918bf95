/* test_winograd.c — Winograd 3x3 convolution (engine/cpu/conv_winograd.c) against a
 * double-precision direct convolution: forward (with and without bias), dx (through
 * idd_conv2d_backward_f32, which accumulates) and dw (idd_winograd_conv3x3_dw, also
 * accumulating), F(2x2,3x3) and F(4x4,3x3), odd sizes, H/W not multiples of the tile,
 * batch 1 and > 1, Ci != Co, 1..256 channels, blocks of several sizes (one shared
 * block, blocks per thread, ragged last block); and the auto choice against im2col.
 *
 * Error measure: |got - exact| / (sum of |terms| + |b| + |old value|) per output, the
 * rounding scale of any float32 sum of those terms (a plain relative error is
 * meaningless where an output cancels to near zero). Measured (seed 20240611, 2 threads):
 * F(2x2) up to 1.5e-7 (2.6e-7 with seed 5; dw 1.9e-7), F(4x4) up to 1.8e-6 (dx, 128
 * channels; dw 1.1e-6 with seed 4);
 * im2col + sgemm is ~5e-8. Tolerances, about 3-4x the measured worst:
 *   WINO2_TOL, WINO2_DW_TOL  F(2x2,3x3)    WINO4_TOL, WINO4_DW_TOL  F(4x4,3x3)
 * Run: test_winograd [seed] (the seed is printed). */
#include <stdint.h>
#include <string.h>

#include "../../engine/cpu/conv_winograd.h"
#include "check.h"
#include "iddpm/kernels.h"

#define WINO2_TOL 8e-7
#define WINO4_TOL 5e-6
#define WINO2_DW_TOL 8e-7
#define WINO4_DW_TOL 4e-6

static uint64_t rng_state;
static float urand(void) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}
static float *frand(long n) {
    float *p = malloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) p[i] = urand();
    return p;
}

/* exact (double) out[n][o][y][x] = b[o] + sum x w, and scale = |b| + sum |x w|;
 * flip: dx of a conv with weight w (Ci,Co,3,3) transposed/flipped (see conv_winograd.h) */
static void naive(double *out, double *scale, const float *x, const float *w, const float *b,
                  int N, int Ci, int H, int W, int Co, int flip) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < Co; o++)
            for (int y = 0; y < H; y++)
                for (int xx = 0; xx < W; xx++) {
                    double s = b ? b[o] : 0, a = b ? fabs(b[o]) : 0;
                    for (int c = 0; c < Ci; c++)
                        for (int i = 0; i < 3; i++)
                            for (int j = 0; j < 3; j++) {
                                int yy = y - 1 + i, xj = xx - 1 + j;
                                if (yy < 0 || yy >= H || xj < 0 || xj >= W) continue;
                                double wv = flip ? w[((long)c * Co + o) * 9 + (2 - i) * 3 + 2 - j]
                                                 : w[((long)o * Ci + c) * 9 + i * 3 + j];
                                double p = x[(((long)n * Ci + c) * H + yy) * W + xj] * wv;
                                s += p, a += fabs(p);
                            }
                    long k = (((long)n * Co + o) * H + y) * W + xx;
                    out[k] = s, scale[k] = a > 1e-30 ? a : 1e-30;
                }
}

/* exact dw[o][c][i][j] = sum dout[n][o][y][x] in[n][c][y-1+i][x-1+j], and its scale */
static void naive_dw(double *dw, double *scale, const float *dout, const float *in, int N, int C,
                     int H, int W, int O) {
    for (int o = 0; o < O; o++)
        for (int c = 0; c < C; c++)
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++) {
                    double s = 0, a = 0;
                    for (int n = 0; n < N; n++)
                        for (int y = 0; y < H; y++)
                            for (int x = 0; x < W; x++) {
                                int yy = y - 1 + i, xx = x - 1 + j;
                                if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
                                double p = (double)dout[(((long)n * O + o) * H + y) * W + x] *
                                           in[(((long)n * C + c) * H + yy) * W + xx];
                                s += p, a += fabs(p);
                            }
                    long k = ((long)o * C + c) * 9 + i * 3 + j;
                    dw[k] = s, scale[k] = a > 1e-30 ? a : 1e-30;
                }
}

static double worst_err(const float *got, const float *base, const double *exact,
                        const double *scale, long n) {
    double e = 0;
    for (long i = 0; i < n; i++) {
        double r = fabs((double)got[i] - (base ? base[i] : 0) - exact[i]) / scale[i];
        if (!(r <= e)) e = r; /* NaN propagates */
    }
    return e;
}

static double measured[2], measured_dw[2]; /* worst errors seen, F(2x2) and F(4x4) */

/* forward by idd_winograd_conv3x3 directly (block size blk), then through conv2d with
 * the algorithm forced, and dx through idd_conv2d_backward_f32 */
static void check_shape(int N, int C, int H, int W, int O, int bias, int m, int blk) {
    char name[200], detail[120];
    const double tol = m == 2 ? WINO2_TOL : WINO4_TOL;
    long nx = (long)N * C * H * W, no = (long)N * O * H * W, nw = (long)O * C * 9;
    float *x = frand(nx), *w = frand(nw), *b = bias ? frand(O) : NULL, *out = frand(no);
    double *ex = malloc(sizeof(double) * (nx > no ? nx : no));
    double *sc = malloc(sizeof(double) * (nx > no ? nx : no));
    snprintf(name, sizeof name, "winograd F(%dx%d) N%d C%d %dx%d O%d%s block %d", m, m, N, C, H,
             W, O, bias ? "" : " nobias", blk);

    naive(ex, sc, x, w, b, N, C, H, W, O, 0);
    idd_winograd_set_block(blk);
    idd_status st = idd_winograd_conv3x3(out, x, w, b, N, C, H, W, O, m, 0, 0);
    double e = st ? INFINITY : worst_err(out, NULL, ex, sc, no);
    if (e > measured[m / 4]) measured[m / 4] = e;
    snprintf(detail, sizeof detail, "status %d, err %.3g > tol %.3g", (int)st, e, tol);
    char nm[260];
    snprintf(nm, sizeof nm, "%s forward (err %.2g)", name, e);
    check_report(e <= tol, nm, detail);

    /* the same through the public conv2d entry points, with the algorithm forced */
    idd_conv2d_set_algo(m == 2 ? IDD_CONV_WINOGRAD2 : IDD_CONV_WINOGRAD);
    float *out2 = frand(no);
    st = idd_conv2d_forward_f32(out2, x, w, b, N, C, H, W, O, 3, 3, 1, 1);
    snprintf(nm, sizeof nm, "%s conv2d_forward is the same", name);
    check_report(!st && memcmp(out, out2, sizeof(float) * no) == 0, nm, "differs");

    /* dx += conv(dout, w flipped): naive with flip, exact relative to the old dx */
    float *R = frand(no), *dx = frand(nx), *dx0 = malloc(sizeof(float) * nx);
    memcpy(dx0, dx, sizeof(float) * nx);
    naive(ex, sc, R, w, NULL, N, O, H, W, C, 1);
    st = idd_conv2d_backward_f32(dx, NULL, NULL, R, NULL, w, N, C, H, W, O, 3, 3, 1, 1);
    /* dx0 holds values up to 1 that the sum adds to; count them in the scale */
    for (long i = 0; i < nx; i++) sc[i] += fabs(dx0[i]);
    e = st ? INFINITY : worst_err(dx, dx0, ex, sc, nx);
    if (e > measured[m / 4]) measured[m / 4] = e;
    snprintf(detail, sizeof detail, "status %d, err %.3g > tol %.3g", (int)st, e, tol);
    snprintf(nm, sizeof nm, "%s dx accumulated (err %.2g)", name, e);
    check_report(e <= tol, nm, detail);

    /* dw += the weight gradient, by idd_winograd_conv3x3_dw directly */
    float *dw = frand(nw), *dw0 = malloc(sizeof(float) * nw);
    memcpy(dw0, dw, sizeof(float) * nw);
    double *exw = calloc(nw, sizeof(double)), *scw = calloc(nw, sizeof(double));
    naive_dw(exw, scw, R, x, N, C, H, W, O);
    for (long i = 0; i < nw; i++) scw[i] += fabs(dw0[i]);
    st = idd_winograd_conv3x3_dw(dw, R, x, N, C, H, W, O, m);
    e = st ? INFINITY : worst_err(dw, dw0, exw, scw, nw);
    if (e > measured_dw[m / 4]) measured_dw[m / 4] = e;
    const double tolw = m == 2 ? WINO2_DW_TOL : WINO4_DW_TOL;
    snprintf(detail, sizeof detail, "status %d, err %.3g > tol %.3g", (int)st, e, tolw);
    snprintf(nm, sizeof nm, "%s dw accumulated (err %.2g)", name, e);
    check_report(e <= tolw, nm, detail);
    free(dw), free(dw0), free(exw), free(scw);

    idd_conv2d_set_algo(IDD_CONV_AUTO);
    idd_winograd_set_block(0);
    free(x), free(w), free(b), free(out), free(out2), free(R), free(dx), free(dx0), free(ex);
    free(sc);
}

/* the auto choice and the im2col switch must agree with each other to float rounding */
static void check_auto(int N, int C, int H, int W, int O) {
    long nx = (long)N * C * H * W, no = (long)N * O * H * W, nw = (long)O * C * 9;
    float *x = frand(nx), *w = frand(nw), *b = frand(O), *o1 = frand(no), *o2 = frand(no);
    idd_conv2d_set_algo(IDD_CONV_IM2COL);
    idd_status s1 = idd_conv2d_forward_f32(o1, x, w, b, N, C, H, W, O, 3, 3, 1, 1);
    idd_conv2d_set_algo(IDD_CONV_AUTO);
    idd_status s2 = idd_conv2d_forward_f32(o2, x, w, b, N, C, H, W, O, 3, 3, 1, 1);
    char nm[160];
    snprintf(nm, sizeof nm, "conv2d auto vs im2col N%d C%d %dx%d O%d", N, C, H, W, O);
    /* both are within their own bounds of the exact sums; values are O(sqrt(9C)) */
    check_report(!s1 && !s2 && check_max_rel(o2, o1, no, 1.0) <= WINO4_TOL * 9 * C, nm,
                 "auto differs from im2col beyond the Winograd bound");
    free(x), free(w), free(b), free(o1), free(o2);
}

int main(int argc, char **argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 20240611;
    rng_state = seed;
    printf("# test_winograd seed %llu\n", (unsigned long long)seed);
    for (int m = 2; m <= 4; m += 2) {
        check_shape(1, 1, 1, 1, 1, 1, m, 0);      /* one pixel: all taps but the centre pad */
        check_shape(2, 3, 7, 5, 4, 1, m, 0);      /* odd sizes, tiles past both edges */
        check_shape(1, 5, 9, 11, 2, 0, m, 0);     /* batch 1, no bias, Ci > Co */
        check_shape(3, 8, 6, 6, 16, 1, m, 3);     /* ragged blocks of 3 tiles */
        check_shape(2, 17, 10, 13, 9, 1, m, 1);   /* channels not multiples of 8, 1-tile blocks */
        check_shape(4, 32, 8, 8, 32, 1, m, 0);
        check_shape(2, 64, 16, 16, 64, 1, m, 7);
        check_shape(8, 128, 4, 4, 128, 1, m, 0);  /* CIFAR 4x4 layer, one shared block */
        check_shape(2, 256, 8, 8, 128, 0, m, 0);  /* Ci != Co, many channels */
        check_shape(1, 96, 12, 12, 256, 1, m, 0);
    }
    printf("# worst error: F(2x2) %.3g (tol %.3g), F(4x4) %.3g (tol %.3g)\n", measured[0],
           WINO2_TOL, measured[1], WINO4_TOL);
    printf("# worst dw error: F(2x2) %.3g (tol %.3g), F(4x4) %.3g (tol %.3g)\n", measured_dw[0],
           WINO2_DW_TOL, measured_dw[1], WINO4_DW_TOL);
    check_auto(8, 128, 8, 8, 128); /* 32 tiles: auto picks F(4x4) */
    check_auto(2, 64, 16, 16, 96);
    check_auto(4, 32, 32, 32, 32);
    return check_done();
}
