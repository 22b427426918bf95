/* bench_kernels.c — GFLOP/s of conv2d forward and backward on UNet-like layers, plus
 * the raw sgemm rate for scale, group norm and attention timings.
 *
 *   bench_kernels [threads [reps [N]]]   (default 2 threads, best of 5; with N: the
 *   small-config layers, 32-64 channels, batch N)
 *
 * Two strategies are timed for conv2d:
 *   folded      chunked schedule: one multithreaded sgemm per chunk of samples
 *               (idd_conv2d_set_target_cols picks the chunk; several values shown)
 *   DEFAULT     the kernel's automatic choice (per-sample schedule when N >= threads)
 *   outside     the same per-sample idea driven from outside the kernel (OpenMP over
 *               samples calling the kernel with N=1), as a cross-check */
#include "iddpm/kernels.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "bench_util.h"

/* one benchmark case: the buffers and sizes every timed function reads */
typedef struct {
    int N, C, H, W, O, K, st, pad, Ho, Wo, threads;
    size_t nw;
    float *x, *w, *b, *out, *dout, *dx, *dw, *db, *dwt;
} conv_case;

static int reps_conv = 5;

static double time_best(int reps, void (*fn)(conv_case *), conv_case *c) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        fn(c);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

static void folded_fwd(conv_case *c) {
    idd_conv2d_forward_f32(c->out, c->x, c->w, c->b, c->N, c->C, c->H, c->W, c->O, c->K, c->K,
                           c->st, c->pad);
}
static void folded_bwd(conv_case *c) {
    idd_conv2d_backward_f32(c->dx, c->dw, c->db, c->dout, c->x, c->w, c->N, c->C, c->H, c->W,
                            c->O, c->K, c->K, c->st, c->pad);
}
static void persample_fwd(conv_case *c) {
    size_t xs = (size_t)c->C * c->H * c->W, os = (size_t)c->O * c->Ho * c->Wo;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int n = 0; n < c->N; n++)
        idd_conv2d_forward_f32(c->out + n * os, c->x + n * xs, c->w, c->b, 1, c->C, c->H, c->W,
                               c->O, c->K, c->K, c->st, c->pad);
}
static void persample_bwd(conv_case *c) {
    size_t xs = (size_t)c->C * c->H * c->W, os = (size_t)c->O * c->Ho * c->Wo;
#pragma omp parallel num_threads(c->threads)
    {
        float *mydw = c->dwt + (size_t)omp_get_thread_num() * c->nw;
#pragma omp for schedule(static)
        for (int n = 0; n < c->N; n++)
            idd_conv2d_backward_f32(c->dx + n * xs, mydw, NULL, c->dout + n * os, c->x + n * xs,
                                    c->w, 1, c->C, c->H, c->W, c->O, c->K, c->K, c->st, c->pad);
    }
    for (int t = 0; t < c->threads; t++)
        for (size_t i = 0; i < c->nw; i++) c->dw[i] += c->dwt[(size_t)t * c->nw + i];
}

static void bench_conv(int N, int C, int H, int W, int O, int K, int st, int pad, int threads) {
    int Ho = idd_conv2d_out_size(H, K, st, pad), Wo = idd_conv2d_out_size(W, K, st, pad);
    size_t nx = (size_t)N * C * H * W, nw = (size_t)O * C * K * K, no = (size_t)N * O * Ho * Wo;
    conv_case c = {N, C, H, W, O, K, st, pad, Ho, Wo, threads, nw, frand(nx), frand(nw),
                   frand(O), frand(no), frand(no), calloc(nx, 4), calloc(nw, 4), calloc(O, 4),
                   calloc(nw * threads, 4)};
    double fl = 2.0 * N * O * Ho * Wo * (double)C * K * K; /* forward; backward = 2x */
    printf("conv2d N=%d C=%d %dx%d O=%d k%d s%d p%d (%.2f GFLOP fwd)\n", N, C, H, W, O, K, st, pad,
           fl * 1e-9);
    long cols[] = {1, 256, 1024, 4096, 16384};
    openblas_set_num_threads(threads);
    idd_conv2d_set_mode(1); /* chunked */
    for (int i = 0; i < 5; i++) {
        idd_conv2d_set_target_cols(cols[i]);
        folded_fwd(&c), folded_bwd(&c); /* warm the workspace */
        double tf = time_best(reps_conv, folded_fwd, &c), tb = time_best(reps_conv, folded_bwd, &c);
        printf("  folded  target_cols %6ld: fwd %7.2f ms %6.1f GFLOP/s | bwd %7.2f ms %6.1f GFLOP/s\n",
               cols[i], tf * 1e3, fl / tf * 1e-9, tb * 1e3, 2 * fl / tb * 1e-9);
    }
    idd_conv2d_set_target_cols(0);
    idd_conv2d_set_mode(0); /* auto: per-sample when N >= threads (the shipped default) */
    folded_fwd(&c), folded_bwd(&c);
    double tf = time_best(reps_conv, folded_fwd, &c), tb = time_best(reps_conv, folded_bwd, &c);
    printf("  DEFAULT (auto, per-sample):  fwd %7.2f ms %6.1f GFLOP/s | bwd %7.2f ms %6.1f GFLOP/s\n",
           tf * 1e3, fl / tf * 1e-9, tb * 1e3, 2 * fl / tb * 1e-9);
    openblas_set_num_threads(1);
    persample_fwd(&c), persample_bwd(&c);
    tf = time_best(reps_conv, persample_fwd, &c), tb = time_best(reps_conv, persample_bwd, &c);
    printf("  outside loop (BLAS 1 thr.):  fwd %7.2f ms %6.1f GFLOP/s | bwd %7.2f ms %6.1f GFLOP/s\n",
           tf * 1e3, fl / tf * 1e-9, tb * 1e3, 2 * fl / tb * 1e-9);
    openblas_set_num_threads(threads);
    free(c.x), free(c.w), free(c.b), free(c.out), free(c.dout), free(c.dx), free(c.dw);
    free(c.db), free(c.dwt);
}

/* best-of-5 wall time of a statement without arguments to capture */
#define BEST5(var, stmt)                                                                    \
    do {                                                                                    \
        var = 1e30;                                                                         \
        for (int r_ = 0; r_ < 5; r_++) {                                                    \
            double t0_ = now();                                                             \
            stmt;                                                                           \
            if (now() - t0_ < var) var = now() - t0_;                                       \
        }                                                                                   \
    } while (0)

static void bench_sgemm(int M, int Nn, int K) {
    float *a = frand((size_t)M * K), *b = frand((size_t)K * Nn), *c = frand((size_t)M * Nn);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, Nn, K, 1, a, K, b, Nn, 0, c, Nn);
    double t;
    BEST5(t, cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, Nn, K, 1, a, K, b, Nn, 0,
                         c, Nn));
    printf("sgemm %dx%dx%d: %.1f GFLOP/s\n", M, Nn, K, 2.0 * M * Nn * K / t * 1e-9);
    free(a), free(b), free(c);
}

static void bench_gn(int N, int C, int HW) {
    size_t n = (size_t)N * C * HW;
    float *x = frand(n), *out = frand(n), *dx = calloc(n, 4), *g = frand(C), *be = frand(C);
    float *sc = frand((size_t)N * C), *sh = frand((size_t)N * C), *mean = malloc(N * 32 * 4),
          *rstd = malloc(N * 32 * 4), *dg = calloc(C, 4), *dbe = calloc(C, 4);
    float *dsc = calloc((size_t)N * C, 4), *dsh = calloc((size_t)N * C, 4);
    double tf, tb;
    BEST5(tf, idd_groupnorm_forward_f32(out, mean, rstd, x, g, be, sc, sh, N, C, HW, 32, 1e-5f, 1));
    BEST5(tb, idd_groupnorm_backward_f32(dx, dg, dbe, dsc, dsh, out, mean, rstd, x, g, be, sc, sh, N,
                                         C, HW, 32, 1));
    printf("groupnorm+scaleshift+silu N=%d C=%d HW=%d: fwd %.2f ms (%.2f GB/s) bwd %.2f ms\n", N,
           C, HW, tf * 1e3, 8.0 * n / tf * 1e-9, tb * 1e3);
    free(x), free(out), free(dx), free(g), free(be), free(sc), free(sh), free(mean), free(rstd);
    free(dg), free(dbe), free(dsc), free(dsh);
}

static void bench_attn(int B, int C, int T, int H) {
    size_t nq = (size_t)B * 3 * C * T, no = (size_t)B * C * T, nw = (size_t)B * H * T * T;
    float *qkv = frand(nq), *out = frand(no), *w = frand(nw), *dq = calloc(nq, 4);
    idd_attention_forward_f32(out, w, qkv, B, C, T, H);
    double tf, tb;
    BEST5(tf, idd_attention_forward_f32(out, w, qkv, B, C, T, H));
    BEST5(tb, idd_attention_backward_f32(dq, out, w, qkv, B, C, T, H));
    double fl = 4.0 * B * C * (double)T * T;
    printf("attention B=%d C=%d T=%d H=%d: fwd %.2f ms (%.1f GFLOP/s) bwd %.2f ms (%.1f GFLOP/s)\n",
           B, C, T, H, tf * 1e3, fl / tf * 1e-9, tb * 1e3, 2 * fl / tb * 1e-9);
    free(qkv), free(out), free(w), free(dq);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (argc > 2) reps_conv = atoi(argv[2]);
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    printf("# threads %d (OpenMP and OpenBLAS); %s\n", threads, openblas_get_config());
    if (argc > 3) { /* small config layers (1x32x32, 32-64 channels) */
        int N = atoi(argv[3]);
        bench_conv(N, 32, 32, 32, 32, 3, 1, 1, threads);
        bench_conv(N, 64, 16, 16, 64, 3, 1, 1, threads);
        bench_conv(N, 64, 8, 8, 64, 3, 1, 1, threads);
        bench_conv(N, 32, 16, 16, 64, 3, 1, 1, threads);
        bench_conv(N, 64, 16, 16, 64, 3, 2, 1, threads);
        return 0;
    }
    bench_sgemm(128, 1024, 1152);
    bench_sgemm(256, 1024, 2304);
    bench_conv(16, 128, 32, 32, 128, 3, 1, 1, threads);
    bench_conv(16, 256, 8, 8, 256, 3, 1, 1, threads);
    bench_conv(16, 256, 16, 16, 256, 3, 2, 1, threads); /* downsample */
    bench_conv(16, 256, 8, 8, 256, 1, 1, 0, threads);   /* 1x1 */
    bench_conv(64, 256, 4, 4, 256, 3, 1, 1, threads);
    bench_gn(16, 128, 1024);
    bench_attn(16, 256, 256, 4);
    bench_attn(16, 256, 64, 4);
    return 0;
}
