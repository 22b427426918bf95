/* iddpm/nn.h — differentiable UNet layer ops on tensors (engine/ops (conv2d.c, norm.c, attention.c, resample.c, dropout.c, embedding.c)).
 *
 * Each checks shapes (messages name the op and every shape), makes its inputs
 * contiguous float32, calls the backend's kernel for the tensors' device, and records
 * a tape node whose backward calls the backend's matching backward kernel. The raw
 * kernels and their exact maths are documented in kernels.h. Returns a new tensor or
 * NULL with idd_last_error() set. */
#ifndef IDDPM_NN_H
#define IDDPM_NN_H

#include "iddpm/ops.h"

/* x (N,C,H,W), w (O,C,KH,KW), b (O) or NULL -> (N,O,Ho,Wo) */
idd_tensor *idd_conv2d(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad);
/* the same with separate zero padding along H and W (1x7 / 7x1 kernels) */
idd_tensor *idd_conv2d_hw(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad_h, int pad_w);

/* x (N,C,...) -> same; gamma/beta (C) or NULL; scale/shift (N,C) or NULL:
 * y = GN(x)*gamma+beta; y = y*(1+scale)+shift; silu ? y*sigmoid(y) : y */
idd_tensor *idd_group_norm(idd_tensor *x, int groups, idd_tensor *gamma, idd_tensor *beta, idd_tensor *scale,
                           idd_tensor *shift, bool silu, double eps);

/* conv2d(dropout(GN(x; groups, gamma, beta, scale, shift, silu, eps), p, g), w, b, stride,
 * pad_h, pad_w) as one op (engine/ops/norm_conv.c): x (N,C,H,W), w (O,C,KH,KW) -> (N,O,Ho,Wo);
 * p == 0 skips the dropout (g unused; NULL is the default generator when p > 0). Saves
 * only x (and the parameters): the backward recomputes the norm and the mask. */
idd_tensor *idd_norm_conv(idd_tensor *x, int groups, idd_tensor *gamma, idd_tensor *beta, idd_tensor *scale,
                          idd_tensor *shift, bool silu, double eps, double p, idd_generator *g, idd_tensor *w,
                          idd_tensor *b, int stride, int pad_h, int pad_w);

/* the backward of idd_conv2d_hw(x, w, b, ...) alone, for an x recomputed in a backward:
 * gin[0..2] = dx, dw, db (new tensors) where needs[i] */
idd_status idd_conv2d_backward_of(idd_tensor *x, idd_tensor *w, bool has_bias, int stride, int pad_h, int pad_w,
                                  idd_tensor *g, const bool needs[3], idd_tensor **gin);

/* qkv (B,3C,T) in the official legacy head layout -> (B,C,T) */
idd_tensor *idd_qkv_attention(idd_tensor *qkv, int heads);

/* x (N,C,H,W) -> (N,C,2H,2W) nearest; (N,C,H/2,W/2) 2x2 average */
idd_tensor *idd_upsample_nearest2x(idd_tensor *x);
idd_tensor *idd_avg_pool2x(idd_tensor *x);

/* t (N) float -> (N,dim): [cos | sin] of t*freq (no gradient) */
idd_tensor *idd_timestep_embedding(idd_tensor *t, int dim, double max_period);

/* inverted dropout with a mask drawn from g (advances it); identity if p == 0 */
idd_tensor *idd_dropout(idd_tensor *x, double p, idd_generator *g);

/* ---- forward-only evaluation layers (engine/ops/eval_layers.c); no tape node, the
 * result does not require grad. Any float/uint8 input is converted to float32. */
/* x (N,C,H,W) -> k x k max pool with stride and -inf padding */
idd_tensor *idd_max_pool2d(idd_tensor *x, int k, int stride, int pad);
/* k x k average pool; count_include_pad false divides by the real positions only */
idd_tensor *idd_avg_pool2d(idd_tensor *x, int k, int stride, int pad, bool count_include_pad);
/* bilinear resize to (Ho,Wo); mode IDD_RESIZE_TF1 or IDD_RESIZE_HALF_PIXEL (kernels.h) */
idd_tensor *idd_resize_bilinear(idd_tensor *x, int Ho, int Wo, int mode);
/* max(0, conv2d(x, w, b)) with (pad_h, pad_w) zero padding; float32, CPU */
idd_tensor *idd_conv2d_relu(idd_tensor *x, idd_tensor *w, idd_tensor *b, int stride, int pad_h, int pad_w);

#endif
