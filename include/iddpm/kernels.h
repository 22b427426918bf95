/* iddpm/kernels.h — raw float32 CPU compute kernels for the UNet layers.
 *
 * These are the kernels behind the tensor ops (conv2d, group norm + scale-shift + SiLU,
 * QKV attention, resampling, timestep embedding). They know nothing of tensors, autograd
 * or devices: every buffer is a plain contiguous row-major float array (NCHW, outermost
 * first, like PyTorch), and the op layer checks shapes, makes inputs contiguous and
 * dispatches here for the CPU backend.
 *
 * Conventions
 *  - Argument order: outputs first, then saved-for-backward buffers, then inputs, then
 *    parameters (weights), then sizes and hyper-parameters.
 *      idd_<op>_forward_f32 (out, saved..., in..., params..., sizes...)
 *      idd_<op>_backward_f32(din..., dparams..., dout, saved/in..., params..., sizes...)
 *  - Every pointer argument carries its shape in a comment, e.g. x (N,C,H,W).
 *  - Forward OVERWRITES its outputs (and its saved buffers).
 *  - Backward ACCUMULATES (+=) into every gradient buffer, so fan-out and weight sharing
 *    need no special cases; the caller zeroes a gradient before the first use.
 *  - Any gradient pointer may be NULL, meaning "not needed"; work needed only for that
 *    gradient is skipped.
 *  - Inputs and outputs must not alias, except where a function says otherwise.
 *  - Functions return IDD_OK, IDD_ERR on bad sizes (message names the kernel and sizes,
 *    see core.h), or IDD_ENOMEM if scratch memory cannot be had.
 *
 * Threads: loops use OpenMP (omp_get_max_threads() threads). GEMMs go to OpenBLAS,
 * either multithreaded from outside any OpenMP region, or single-threaded from inside
 * one (conv2d's per-sample schedule switches OpenBLAS to 1 thread for the call and
 * restores it). No kernel runs multithreaded OpenBLAS inside an OpenMP region, so
 * threads never oversubscribe. Set both to the core count (omp_set_num_threads and
 * openblas_set_num_threads). Kernels must not be called from inside a parallel region
 * of the caller's own (they would then run single-threaded but correct).
 *
 * Scratch: kernels take scratch memory from idd_workspace_get(), a grow-only buffer per
 * calling thread (no malloc per call once warm, no locking; each thread that calls a
 * kernel owns its own buffers). */
#ifndef IDDPM_KERNELS_H
#define IDDPM_KERNELS_H

#include <stddef.h>

#include "iddpm/core.h"

/* ---- workspace (engine/cpu/workspace.c) -------------------------------------------- */

/* Number of independent scratch slots per thread. Slots let one kernel hold several
 * scratch buffers at once. Kernels in this header use slots 0..3 (of the calling thread
 * and of OpenMP worker threads); code outside the kernels may use slot 4 and must not
 * hold it across a kernel call that uses it. */
#define IDD_WORKSPACE_SLOTS 5

/* A 64-byte aligned buffer of at least nbytes for this thread and slot. Grow-only: a
 * larger request reallocates (old contents are lost), a smaller one reuses. Returns
 * NULL if the slot is out of range or memory cannot be had. The pointer stays valid
 * until the next larger request on the same slot or idd_workspace_release(). */
void *idd_workspace_get(int slot, size_t nbytes);
/* Free all of the calling thread's slots. */
void idd_workspace_release(void);
/* Free the slots of the calling thread and of every OpenMP worker thread (runs a
 * parallel region; call from outside any parallel region, e.g. after training). */
void idd_workspace_release_all(void);
/* Bytes currently held by the calling thread's slots. */
size_t idd_workspace_bytes(void);

/* ---- conv2d (engine/cpu/conv2d.c) ---------------------------------------------------- */

/* Output size of a convolution along one axis: (in + 2*pad - k) / stride + 1, or <= 0
 * when the window does not fit. */
int idd_conv2d_out_size(int in, int k, int stride, int pad);

/* out = conv2d(x, w) + b, zero padding, Ho = idd_conv2d_out_size(H, KH, stride, pad)
 * (likewise Wo). b may be NULL (no bias). */
idd_status idd_conv2d_forward_f32(float *out,          /* (N,O,Ho,Wo) */
                                  const float *x,      /* (N,C,H,W) */
                                  const float *w,      /* (O,C,KH,KW) */
                                  const float *b,      /* (O) or NULL */
                                  int N, int C, int H, int W, int O, int KH, int KW,
                                  int stride, int pad);

/* dx += dL/dx, dw += dL/dw, db += dL/db (each may be NULL). x is needed only for dw,
 * w only for dx (either may be NULL when its gradient is not asked for). */
idd_status idd_conv2d_backward_f32(float *dx,          /* (N,C,H,W) or NULL */
                                   float *dw,          /* (O,C,KH,KW) or NULL */
                                   float *db,          /* (O) or NULL */
                                   const float *dout,  /* (N,O,Ho,Wo) */
                                   const float *x,     /* (N,C,H,W) */
                                   const float *w,     /* (O,C,KH,KW) */
                                   int N, int C, int H, int W, int O, int KH, int KW,
                                   int stride, int pad);

/* The same with separate zero padding along H (pad_h) and W (pad_w), for 1x7 / 7x1
 * kernels (Inception): Ho = idd_conv2d_out_size(H, KH, stride, pad_h), Wo likewise with
 * pad_w. The square-padding functions above call these with pad_h = pad_w = pad. */
idd_status idd_conv2d_forward_hw_f32(float *out, const float *x, const float *w, const float *b,
                                     int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                     int pad_h, int pad_w);
idd_status idd_conv2d_backward_hw_f32(float *dx, float *dw, float *db, const float *dout,
                                      const float *x, const float *w, int N, int C, int H, int W,
                                      int O, int KH, int KW, int stride, int pad_h, int pad_w);

/* Schedules (see conv2d.c): when N >= the OpenMP thread count, samples are spread over
 * OpenMP threads with OpenBLAS temporarily set to 1 thread (restored before return);
 * otherwise samples are folded into one multithreaded sgemm per chunk of about
 * target_cols output columns. Not safe to call from two host threads at once in the
 * per-sample schedule (openblas_set_num_threads is global).
 * Tuning knobs, for benchmarks and tests: target_cols (0 restores the default 4096) and
 * mode 0 auto, 1 always chunked, 2 always per-sample (if more than one thread). */
void idd_conv2d_set_target_cols(long cols);
void idd_conv2d_set_mode(int mode);
/* Algorithm for 3x3 stride-1 pad-1 convs (forward, dx and dw):
 * Winograd F(4x4,3x3) or F(2x2,3x3) (engine/cpu/conv_winograd.c) or im2col + sgemm /
 * the direct kernel. The default comes from IDDPM_CONV=auto|im2col|winograd|winograd2
 * (auto when unset); auto picks per shape (see conv2d.c). */
enum { IDD_CONV_AUTO = 0, IDD_CONV_IM2COL = 1, IDD_CONV_WINOGRAD = 2, IDD_CONV_WINOGRAD2 = 3 };
void idd_conv2d_set_algo(int algo);

/* ---- group norm + scale-shift + SiLU (engine/cpu/norm.c) -------------------------- */

/* Per sample n and group g (channels [g*C/G, (g+1)*C/G), all HW positions):
 *   xhat = (x - mean[n,g]) * rstd[n,g],  rstd = 1/sqrt(var + eps) (biased variance)
 *   y    = xhat * gamma[c] + beta[c]                 (gamma/beta NULL: 1 / 0)
 *   y    = y * (1 + scale[n,c]) + shift[n,c]         (only if scale/shift given;
 *                                                     either may be NULL alone)
 *   out  = silu ? y * sigmoid(y) : y
 * Statistics are accumulated in double. G must divide C. */
idd_status idd_groupnorm_forward_f32(float *out,         /* (N,C,HW) */
                                     float *mean,        /* (N,G) saved */
                                     float *rstd,        /* (N,G) saved */
                                     const float *x,     /* (N,C,HW) */
                                     const float *gamma, /* (C) or NULL */
                                     const float *beta,  /* (C) or NULL */
                                     const float *scale, /* (N,C) or NULL */
                                     const float *shift, /* (N,C) or NULL */
                                     int N, int C, int HW, int G, float eps, int silu);

/* Gradients of the forward above (accumulated; each may be NULL). The pre-SiLU value
 * is recomputed from x, mean, rstd, so gamma, beta, scale, shift and silu must be the
 * ones the forward was given. dscale/dshift are meaningful only when the forward used
 * scale-shift (NULL scale/shift count as 0, and the gradients are still defined). */
idd_status idd_groupnorm_backward_f32(float *dx,          /* (N,C,HW) or NULL */
                                      float *dgamma,      /* (C) or NULL */
                                      float *dbeta,       /* (C) or NULL */
                                      float *dscale,      /* (N,C) or NULL */
                                      float *dshift,      /* (N,C) or NULL */
                                      const float *dout,  /* (N,C,HW) */
                                      const float *mean,  /* (N,G) from forward */
                                      const float *rstd,  /* (N,G) from forward */
                                      const float *x,     /* (N,C,HW) */
                                      const float *gamma, /* (C) or NULL */
                                      const float *beta,  /* (C) or NULL */
                                      const float *scale, /* (N,C) or NULL */
                                      const float *shift, /* (N,C) or NULL */
                                      int N, int C, int HW, int G, int silu);
/* The same, but dx is written, not accumulated (it may be uninitialised): saves the
 * zero fill and a read of dx when the caller's buffer is fresh (the CPU tape). */
idd_status idd_groupnorm_backward_into_f32(float *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                           const float *dout, const float *mean, const float *rstd,
                                           const float *x, const float *gamma, const float *beta,
                                           const float *scale, const float *shift, int N, int C, int HW,
                                           int G, int silu);

/* ---- dropout (engine/cpu/dropout.c) ------------------------------------------------- */

/* out = keep ? x / (1-p) : 0, keep(i) = philox_uniform(seed, stream, offset + i/2) >= p
 * (the uniform of element i is the (i%2)-th of idd_philox_uniform2 at that counter) */
idd_status idd_dropout_forward_f32(float *out,     /* (n) */
                                   const float *x, /* (n) */
                                   int64_t n, float p, uint64_t seed, uint64_t stream,
                                   uint64_t offset);
/* dx += keep ? dout / (1-p) : 0, the mask drawn again from the same stream */
idd_status idd_dropout_backward_f32(float *dx,         /* (n) or NULL */
                                    const float *dout, /* (n) */
                                    int64_t n, float p, uint64_t seed, uint64_t stream,
                                    uint64_t offset);

/* ---- QKV attention (engine/cpu/attention.c) ------------------------------------------ */

/* The core of the official AttentionBlock (QKVAttentionLegacy). qkv holds, per batch
 * element, 3C channels over T positions; head h owns channels [h*3C/H, (h+1)*3C/H):
 * its first C/H rows are q, the next C/H are k, the last C/H are v. With
 * s = (C/H)^(-1/4):
 *   weight[b,h][t,t'] = softmax_t'( sum_c (q[c,t]*s) * (k[c,t']*s) )   (float32)
 *   out[b, h*C/H + c, t] = sum_t' weight[b,h][t,t'] * v[c,t']
 * H must divide C. */
idd_status idd_attention_forward_f32(float *out,        /* (B,C,T) */
                                     float *weight,     /* (B*H,T,T) saved softmax, or NULL
                                                           when not needed (CPU: scratch) */
                                     const float *qkv,  /* (B,3C,T) */
                                     int B, int C, int T, int H);

/* dqkv += dL/dqkv (q, k and v rows in the same legacy layout). */
idd_status idd_attention_backward_f32(float *dqkv,          /* (B,3C,T) */
                                      const float *dout,    /* (B,C,T) */
                                      const float *weight,  /* (B*H,T,T) from forward */
                                      const float *qkv,     /* (B,3C,T) */
                                      int B, int C, int T, int H);

/* ---- resampling (engine/cpu/resample.c) ---------------------------------------------- */

/* Nearest-neighbour 2x upsample: out[n,c,y,x] = x[n,c,y/2,x/2]. */
idd_status idd_upsample2x_forward_f32(float *out,       /* (N,C,2H,2W) */
                                      const float *x,   /* (N,C,H,W) */
                                      int N, int C, int H, int W);
/* dx[n,c,y,x] += sum of the 2x2 block of dout it was copied to. */
idd_status idd_upsample2x_backward_f32(float *dx,          /* (N,C,H,W) */
                                       const float *dout,  /* (N,C,2H,2W) */
                                       int N, int C, int H, int W);

/* 2x2 average pool, stride 2, no padding (PyTorch AvgPool2d(2)): Ho = H/2, Wo = W/2
 * (floor; an odd last row/column is dropped). */
idd_status idd_avgpool2x_forward_f32(float *out,       /* (N,C,H/2,W/2) */
                                     const float *x,   /* (N,C,H,W) */
                                     int N, int C, int H, int W);
/* dx += dout/4 on each element of the window (dropped rows/columns get nothing). */
idd_status idd_avgpool2x_backward_f32(float *dx,          /* (N,C,H,W) */
                                      const float *dout,  /* (N,C,H/2,W/2) */
                                      int N, int C, int H, int W);

/* ---- general pooling (engine/cpu/pool.c), forward only ------------------------------ */

/* Output size along one axis: (in + 2*pad - k) / stride + 1 (floor), <= 0 if no fit. */
int idd_pool2d_out_size(int in, int k, int stride, int pad);
/* k x k max pool, stride, implicit -inf padding pad (pad <= k/2). */
idd_status idd_maxpool2d_forward_f32(float *out,       /* (N,C,Ho,Wo) */
                                     const float *x,   /* (N,C,H,W) */
                                     int N, int C, int H, int W, int k, int stride, int pad);
/* k x k average pool; count_include_pad 1: divide by k*k (PyTorch default), 0: by the
 * number of real input positions under the window (FID Inception). */
idd_status idd_avgpool2d_forward_f32(float *out,       /* (N,C,Ho,Wo) */
                                     const float *x,   /* (N,C,H,W) */
                                     int N, int C, int H, int W, int k, int stride, int pad,
                                     int count_include_pad);

/* ---- bilinear resize (engine/cpu/resize.c), forward only ------------------------------ */

/* Where output pixel j samples the input along an axis (clamped to [0, in-1]):
 * TF1: src = j*in/out (TF1 resize_bilinear, the TF FID Inception graph);
 * HALF_PIXEL: src = max((j+0.5)*in/out - 0.5, 0) (PyTorch align_corners=False). */
enum { IDD_RESIZE_TF1 = 0, IDD_RESIZE_HALF_PIXEL = 1 };
idd_status idd_resize_bilinear_f32(float *out,       /* (N,C,Ho,Wo) */
                                   const float *x,   /* (N,C,H,W) */
                                   int N, int C, int H, int W, int Ho, int Wo, int mode);

/* ---- timestep embedding (engine/cpu/embedding.c) ------------------------------------ */

/* half = dim/2, freq_i = exp(-ln(max_period) * i / half), i = 0..half-1;
 * out[n] = [cos(t[n]*freq_0..), sin(t[n]*freq_0..)] and a zero last column if dim is
 * odd. Computed in float32 the way the official PyTorch code does. No backward (t is
 * not differentiated). */
idd_status idd_timestep_embedding_f32(float *out,       /* (N,dim) */
                                      const float *t,   /* (N) */
                                      int N, int dim, float max_period);

#endif
