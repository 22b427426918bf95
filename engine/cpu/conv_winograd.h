/* conv_winograd.h — Winograd 3x3 stride-1 pad-1 convolution, internal to conv2d.c
 * (engine/cpu/conv_winograd.c has the algorithm). */
#ifndef IDDPM_CONV_WINOGRAD_H
#define IDDPM_CONV_WINOGRAD_H

#include "iddpm/core.h"

/* out (+)= conv3x3(in, g) + b, stride 1, zero padding 1, for all N samples.
 *   m = 2: F(2x2,3x3), m = 4: F(4x4,3x3).
 *   flip = 0: g is the forward weight w (Co,Ci,3,3);
 *   flip = 1: g is a forward weight w (Ci,Co,3,3) used transposed and flipped,
 *             g'[co][ci][i][j] = w[ci][co][2-i][2-j] (the dx of a conv with weight w).
 *   accumulate = 1 adds to out instead of overwriting it. b may be NULL.
 * Returns IDD_OK or IDD_ENOMEM (no message; the caller names the operation). */
idd_status idd_winograd_conv3x3(float *out,       /* (N,Co,H,W) */
                                const float *in,  /* (N,Ci,H,W) */
                                const float *g,   /* (Co,Ci,3,3), or (Ci,Co,3,3) if flip */
                                const float *b,   /* (Co) or NULL */
                                int N, int Ci, int H, int W, int Co, int m, int flip,
                                int accumulate);

/* dw (Co,Ci,3,3) += the gradient of the conv above (flip = 0) w.r.t. its weight, given
 * dout = dL/d(out). IDD_OK or IDD_ENOMEM. */
idd_status idd_winograd_conv3x3_dw(float *dw,         /* (Co,Ci,3,3) */
                                   const float *dout, /* (N,Co,H,W) */
                                   const float *in,   /* (N,Ci,H,W) */
                                   int N, int Ci, int H, int W, int Co, int m);

/* Tiles per GEMM block (rows of each per-position GEMM); 0 restores the default. */
void idd_winograd_set_block(int tiles);

#endif
