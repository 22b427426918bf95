/* bench_winograd.c — 3x3 stride-1 pad-1 conv layers of the UNet configs: forward and dx
 * by im2col + sgemm (or the direct kernel where conv2d.c picks it), Winograd F(2x2,3x3)
 * and F(4x4,3x3), and the auto choice; dw likewise. Rates are "GFLOP/s equivalent": the direct conv's
 * 2*N*O*H*W*C*9 flops (dx and dw the same) over the time, so they compare across algorithms.
 * The algorithms are timed alternately, best of reps rounds (the machine is shared).
 *
 *   bench_winograd [threads [reps [block]]]   (default 2 threads, 5 rounds)
 * Build: make build/release/tests/bench_winograd */
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../../engine/cpu/conv_winograd.h"
#include "iddpm/kernels.h"

#include "bench_util.h"

#define NALGO 4
static const int algos[NALGO] = {IDD_CONV_IM2COL, IDD_CONV_WINOGRAD2, IDD_CONV_WINOGRAD,
                                 IDD_CONV_AUTO};
static const char *names[NALGO] = {"im2col/direct", "winograd F2", "winograd F4", "auto"};

static void layer(int N, int C, int H, int W, int O, int reps) {
    size_t nx = (size_t)N * C * H * W, no = (size_t)N * O * H * W, nw = (size_t)O * C * 9;
    float *x = frand(nx), *w = frand(nw), *b = frand(O), *out = frand(no), *dx = frand(nx);
    float *dw = frand(nw);
    double fl = 2.0 * N * O * H * W * (double)C * 9, bf[NALGO], bb[NALGO], bw[NALGO];
    for (int a = 0; a < NALGO; a++) bf[a] = bb[a] = bw[a] = 1e30;
    for (int r = 0; r < reps + 1; r++) /* round 0 warms the workspaces */
        for (int a = 0; a < NALGO; a++) {
            idd_conv2d_set_algo(algos[a]);
            double t0 = now();
            idd_conv2d_forward_f32(out, x, w, b, N, C, H, W, O, 3, 3, 1, 1);
            double t1 = now();
            idd_conv2d_backward_f32(dx, NULL, NULL, out, NULL, w, N, C, H, W, O, 3, 3, 1, 1);
            double t2 = now();
            idd_conv2d_backward_f32(NULL, dw, NULL, out, x, NULL, N, C, H, W, O, 3, 3, 1, 1);
            double t3 = now();
            if (r && t1 - t0 < bf[a]) bf[a] = t1 - t0;
            if (r && t2 - t1 < bb[a]) bb[a] = t2 - t1;
            if (r && t3 - t2 < bw[a]) bw[a] = t3 - t2;
        }
    printf("N=%-3d C=%-3d %2dx%-2d O=%-3d (%.2f GFLOP)", N, C, H, W, O, fl * 1e-9);
    for (int a = 0; a < NALGO; a++)
        printf(" | %s fwd %6.2f ms %5.0f dx %6.2f ms %5.0f dw %6.2f ms %5.0f", names[a],
               bf[a] * 1e3, fl / bf[a] * 1e-9, bb[a] * 1e3, fl / bb[a] * 1e-9, bw[a] * 1e3,
               fl / bw[a] * 1e-9);
    printf(" | speedup F4/im2col fwd %.2f dx %.2f dw %.2f\n", bf[0] / bf[2], bb[0] / bb[2],
           bw[0] / bw[2]);
    fflush(stdout);
    idd_conv2d_set_algo(IDD_CONV_AUTO);
    free(x), free(w), free(b), free(out), free(dx), free(dw);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2, reps = argc > 2 ? atoi(argv[2]) : 5;
    if (argc > 3) idd_winograd_set_block(atoi(argv[3]));
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    printf("# threads %d, best of %d; %s\n", threads, reps, openblas_get_config());
    static const int cifar[4][3] = {{128, 32, 32}, {256, 16, 16}, {256, 8, 8}, {256, 4, 4}};
    static const int small[3][3] = {{32, 32, 32}, {64, 16, 16}, {64, 8, 8}};
    static const int nb[2] = {8, 64}; /* CIFAR training, sampling batches */
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < 4; i++)
            layer(nb[k], cifar[i][0], cifar[i][1], cifar[i][2], cifar[i][0], reps);
    static const int ns[2] = {128, 64}; /* small config training, sampling */
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < 3; i++)
            layer(ns[k], small[i][0], small[i][1], small[i][2], small[i][0], reps);
    return 0;
}
