/* iddpm/backend.h — the device dispatch table.
 *
 * Every op reaches memory and compute only through the backend of its tensors'
 * device: idd_backend_of(t)->fn(...). A backend is one table filled with designated
 * initialisers, in two parts:
 *   the device part  memory, copies, fills, the generic pointwise / reduction / GEMM /
 *                    random kernels, the diffusion and optimizer kernels: every backend
 *                    has every one of them (idd_backend_register refuses a table that
 *                    lacks one);
 *   layer kernels    conv, norm, attention, resampling, dropout, embedding, pooling,
 *                    resize: a backend answers supports(family, dtype) for each
 *                    idd_kernel family, and has the entries of what it supports
 *                    (float32: the *_forward / *_backward entries; bf16: the *_bf16
 *                    ones, channels-last). An op asks supports(), never tests a NULL.
 * A bf16 tensor whose backend does not support its family in bf16 is computed in
 * float32 and converted back (the one rule, engine/ops/ops_internal.h).
 * The CPU backend (engine/cpu/backend.c) is always present; the CUDA backend
 * (engine/cuda/memory.cu) registers itself with idd_backend_register(). */
#ifndef IDDPM_BACKEND_H
#define IDDPM_BACKEND_H

#include "iddpm/tensor.h"
#include "iddpm/diffusion_kernels.h"

typedef enum {
    IDD_BIN_ADD, IDD_BIN_SUB, IDD_BIN_MUL, IDD_BIN_DIV, IDD_BIN_POW, IDD_BIN_MAX, IDD_BIN_MIN,
    IDD_BIN_GT, IDD_BIN_LT, IDD_BIN_GE, IDD_BIN_LE, IDD_BIN_EQ, IDD_BIN_NE, IDD_BIN_COUNT
} idd_binop;

typedef enum {
    IDD_UN_NEG, IDD_UN_EXP, IDD_UN_LOG, IDD_UN_SQRT, IDD_UN_RSQRT, IDD_UN_TANH,
    IDD_UN_SIGMOID, IDD_UN_SILU, IDD_UN_ABS, IDD_UN_SQUARE, IDD_UN_SIN, IDD_UN_COS,
    IDD_UN_RECIP, IDD_UN_FLOOR, IDD_UN_SIGN, IDD_UN_COUNT
} idd_unop;

typedef enum { IDD_RED_SUM, IDD_RED_MAX, IDD_RED_MIN, IDD_RED_LOGSUMEXP, IDD_RED_COUNT } idd_redop;

/* layer kernel families: what supports(family, dtype) is asked about */
typedef enum {
    IDD_K_CONV2D,        /* conv2d_forward/_backward (pad_h == pad_w); bf16: conv2d_*_bf16 */
    IDD_K_CONV2D_HW,     /* conv2d_forward_hw/_backward_hw (pad_h != pad_w), float32 only */
    IDD_K_GROUPNORM,     /* groupnorm_*; bf16: groupnorm_*_bf16 */
    IDD_K_ATTENTION,     /* attention_*; bf16: attention_*_bf16 */
    IDD_K_UPSAMPLE2X,    /* upsample2x_*; bf16: upsample2x_*_bf16 */
    IDD_K_AVGPOOL2X,     /* avgpool2x_*; bf16: avgpool2x_*_bf16 */
    IDD_K_DROPOUT,       /* dropout_*; bf16: dropout_*_bf16 */
    IDD_K_TIMESTEP_EMB,  /* timestep_embedding, float32 */
    IDD_K_MAXPOOL2D,     /* maxpool2d_forward, float32, forward only */
    IDD_K_AVGPOOL2D,     /* avgpool2d_forward, float32, forward only */
    IDD_K_RESIZE,        /* resize_bilinear, float32, forward only */
    IDD_K_COUNT
} idd_kernel;

typedef struct idd_backend {
    const char *name;
    /* ---- layer kernels: does this backend have family k for dtype (IDD_F32 or IDD_BF16)? */
    bool (*supports)(idd_kernel k, idd_dtype dtype);

    /* ---- the device part (every backend has all of these) */
    void *(*alloc)(size_t nbytes);
    void (*free)(void *p);
    /* dst[i] = src[i] for same-shape tensors of any strides/dtypes (src may be a
     * broadcast view). Cross-device copies go through upload/download. */
    idd_status (*copy)(idd_tensor *dst, const idd_tensor *src);
    idd_status (*upload)(void *dst_dev, const void *src_host, size_t nbytes);
    idd_status (*download)(void *dst_host, const void *src_dev, size_t nbytes);
    idd_status (*fill)(idd_tensor *t, double v);
    /* out = a op b, a and b already expanded (broadcast views) to out's shape */
    idd_status (*binary)(idd_binop op, idd_tensor *out, const idd_tensor *a, const idd_tensor *b);
    /* out = op(a) */
    idd_status (*unary)(idd_unop op, idd_tensor *out, const idd_tensor *a);
    /* out = clamp(a, lo, hi), out = a*s + b (affine) */
    idd_status (*clamp)(idd_tensor *out, const idd_tensor *a, double lo, double hi);
    idd_status (*affine)(idd_tensor *out, const idd_tensor *a, double s, double b);
    /* reduce a over dim into out (out has a's shape with size 1 at dim); idx: argmax (I64) or NULL */
    idd_status (*reduce)(idd_redop op, idd_tensor *out, idd_tensor *idx, const idd_tensor *a, int dim);
    /* C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b], contiguous float tensors (B,M,K)(B,K,N)(B,M,N) */
    idd_status (*bmm)(idd_tensor *c, const idd_tensor *a, const idd_tensor *b, bool ta, bool tb,
                      double alpha, double beta);
    /* random numbers: counter-based (Philox), element i uses counter (stream, offset + i/2) */
    idd_status (*rand_normal)(idd_tensor *t, uint64_t seed, uint64_t stream, uint64_t offset);
    idd_status (*rand_uniform)(idd_tensor *t, uint64_t seed, uint64_t stream, uint64_t offset);

    /* ---- layer kernels, present where supports() says so. UNet layer kernels on raw contiguous float32 device buffers; signatures and
     * conventions as in kernels.h (outputs first; backward accumulates; NULL grads
     * are skipped). The CPU entries are the idd_*_f32 functions of engine/ops. */
    idd_status (*conv2d_forward)(float *out, const float *x, const float *w, const float *b, int N, int C, int H,
                                 int W, int O, int KH, int KW, int stride, int pad);
    idd_status (*conv2d_backward)(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                                  int N, int C, int H, int W, int O, int KH, int KW, int stride, int pad);
    idd_status (*groupnorm_forward)(float *out, float *mean, float *rstd, const float *x, const float *gamma,
                                    const float *beta, const float *scale, const float *shift, int N, int C, int HW,
                                    int G, float eps, int silu);
    idd_status (*groupnorm_backward)(float *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                     const float *dout, const float *mean, const float *rstd, const float *x,
                                     const float *gamma, const float *beta, const float *scale, const float *shift,
                                     int N, int C, int HW, int G, int silu);
    idd_status (*attention_forward)(float *out, float *weight, const float *qkv, int B, int C, int T, int H);
    idd_status (*attention_backward)(float *dqkv, const float *dout, const float *weight, const float *qkv, int B,
                                     int C, int T, int H);
    /* bf16 channels-last qkv (B,3C,T) / out (B,C,T), bf16 weight (B*H,T,T) saved */
    idd_status (*attention_forward_bf16)(uint16_t *out, uint16_t *weight, const uint16_t *qkv, int B, int C, int T,
                                         int H);
    /* its backward: dqkv (B,3C,T) bf16 channels-last written (not accumulated) */
    idd_status (*attention_backward_bf16)(uint16_t *dqkv, const uint16_t *dout, const uint16_t *weight,
                                          const uint16_t *qkv, int B, int C, int T, int H);
    idd_status (*upsample2x_forward)(float *out, const float *x, int N, int C, int H, int W);
    idd_status (*upsample2x_backward)(float *dx, const float *dout, int N, int C, int H, int W);
    idd_status (*avgpool2x_forward)(float *out, const float *x, int N, int C, int H, int W);
    idd_status (*avgpool2x_backward)(float *dx, const float *dout, int N, int C, int H, int W);
    idd_status (*timestep_embedding)(float *out, const float *t, int N, int dim, float max_period);
    /* dropout: out = keep ? x/(1-p) : 0 with keep = philox_uniform(seed, stream, offset + i/2) >= p;
     * the backward regenerates the same mask (dx += keep ? dout/(1-p) : 0) */
    idd_status (*dropout_forward)(float *out, const float *x, int64_t n, float p, uint64_t seed, uint64_t stream,
                                  uint64_t offset);
    idd_status (*dropout_backward)(float *dx, const float *dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                                   uint64_t offset);
    /* bf16 channels-last: x/out/dout/dx are bf16 (N,HW,C) memory with C % 8 == 0, C <= 1024, 16-byte
     * aligned; dx is written, not accumulated; mean/rstd (N,G) and the parameters' grads float32 as above;
     * scale/shift (N,C) float32 rows of stride scale_stride/shift_stride (dscale/dshift contiguous). */
    idd_status (*groupnorm_forward_bf16)(void *out, float *mean, float *rstd, const void *x, const float *gamma,
                                         const float *beta, const float *scale, int scale_stride, const float *shift,
                                         int shift_stride, int N, int C, int HW, int G, float eps, int silu);
    /* the group norm's backward on bf16 (N,HW,C): dx written; dgamma, dbeta, dscale, dshift accumulated */
    idd_status (*groupnorm_backward_bf16)(void *dx, float *dgamma, float *dbeta, float *dscale, float *dshift,
                                          const void *dout, const float *mean, const float *rstd, const void *x,
                                          const float *gamma, const float *beta, const float *scale,
                                          int scale_stride, const float *shift, int shift_stride, int N, int C,
                                          int HW, int G, int silu);
    /* nearest 2x upsample, bf16 x (N,H,W,C) -> out (N,2H,2W,C), C % 8 == 0, 16-byte aligned */
    idd_status (*upsample2x_forward_bf16)(void *out, const void *x, int N, int C, int H, int W);
    /* its backward: dx (N,H,W,C) written from dout (N,2H,2W,C), bf16 */
    idd_status (*upsample2x_backward_bf16)(void *dx, const void *dout, int N, int C, int H, int W);
    /* 2x2 average pool, bf16 x (N,H,W,C) -> out (N,H/2,W/2,C), C % 8 == 0, 16-byte aligned */
    idd_status (*avgpool2x_forward_bf16)(void *out, const void *x, int N, int C, int H, int W);
    /* its backward: dx (N,H,W,C) written (0 in an odd last row/column) from dout (N,H/2,W/2,C), bf16 */
    idd_status (*avgpool2x_backward_bf16)(void *dx, const void *dout, int N, int C, int H, int W);
    /* dropout on n bf16 elements of any dense layout, the mask indexed by memory order (as dropout_forward) */
    idd_status (*dropout_forward_bf16)(void *out, const void *x, int64_t n, float p, uint64_t seed, uint64_t stream,
                                       uint64_t offset);
    /* its backward on bf16: dx = keep ? dout/(1-p) : 0, written (not accumulated) */
    idd_status (*dropout_backward_bf16)(void *dx, const void *dout, int64_t n, float p, uint64_t seed,
                                        uint64_t stream, uint64_t offset);
    /* separate H/W zero padding (1x7, 7x1 kernels): IDD_K_CONV2D_HW */
    idd_status (*conv2d_forward_hw)(float *out, const float *x, const float *w, const float *b, int N, int C, int H,
                                    int W, int O, int KH, int KW, int stride, int pad_h, int pad_w);
    idd_status (*conv2d_backward_hw)(float *dx, float *dw, float *db, const float *dout, const float *x,
                                     const float *w, int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                     int pad_h, int pad_w);
    /* bf16 channels-last (NHWC memory) x -> out, float32 w (O,C,KH,KW) and b (or NULL) */
    idd_status (*conv2d_forward_bf16)(uint16_t *out, const uint16_t *x, const float *w, const float *b, int N, int C,
                                      int H, int W, int O, int KH, int KW, int stride, int pad);
    /* its backward: dx bf16 channels-last written (not accumulated), dw/db float32 accumulated; NULL skipped */
    idd_status (*conv2d_backward_bf16)(uint16_t *dx, float *dw, float *db, const uint16_t *dout, const uint16_t *x,
                                       const float *w, int N, int C, int H, int W, int O, int KH, int KW, int stride,
                                       int pad);
    /* forward-only evaluation kernels (kernels.h: pool, resize) */
    idd_status (*maxpool2d_forward)(float *out, const float *x, int N, int C, int H, int W, int k, int stride,
                                    int pad);
    idd_status (*avgpool2d_forward)(float *out, const float *x, int N, int C, int H, int W, int k, int stride,
                                    int pad, int count_include_pad);
    idd_status (*resize_bilinear)(float *out, const float *x, int N, int C, int H, int W, int Ho, int Wo, int mode);

    /* ---- the device part, continued */
    /* host -> device copy ordered on the backend's stream without waiting for it (the
     * host buffer may be reused as soon as it returns) */
    idd_status (*upload_async)(void *dst_dev, const void *src_host, size_t nbytes);
    /* diffusion kernels (diffusion_kernels.h) on contiguous float32 device buffers;
     * a->coef is the (IDD_DK_NCOEF, B) table on the device */
    idd_status (*diff_pointwise)(int op, const idd_diff_args *a, float *out, const float *x, const float *y,
                                 const float *z);
    idd_status (*diff_p_finish)(const idd_diff_args *a, const float *mo, const float *xt, float *px, float *mean,
                                float *var, float *logvar);
    /* per-sample loss, mse, vb (B) of the hybrid loss; sums in double */
    idd_status (*diff_losses)(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                              const float *noise, float *loss, float *mse, float *vb);
    /* dmo (B, cout, HW) written (not accumulated) from dloss (B) */
    idd_status (*diff_losses_backward)(const idd_diff_args *a, const float *mo, const float *x0, const float *xt,
                                       const float *noise, const float *dloss, float *dmo);

    /* multi-tensor optimizer kernels (engine/train/optim.c): n tensors, host arrays
     * of device pointers and element counts. hp: lr-free AdamW constants
     * {beta1, beta2, eps, decay = 1 - lr*wd, step_size = lr/bc1, rbc2 = 1/sqrt(bc2)}. */
    idd_status (*adamw)(int n, float *const *p, const float *const *g, float *const *m, float *const *v,
                        const int64_t *numel, const float hp[6]);
    idd_status (*ema)(int n, float *const *e, const float *const *p, const int64_t *numel, double rate);
    /* *out = sum of squares of every element, in double (waits for the device) */
    idd_status (*sumsq)(int n, const float *const *g, const int64_t *numel, double *out);
    /* g *= s (the CPU multiplies in double and rounds once; the GPU by (float)s) */
    idd_status (*scale)(int n, float *const *g, const int64_t *numel, double s);
} idd_backend;

extern const idd_backend idd_cpu_backend;   /* engine/cpu/backend.c */

const idd_backend *idd_backend_get(idd_device dev);         /* NULL if not available */
static inline const idd_backend *idd_backend_of(const idd_tensor *t) { return idd_backend_get(t->device); }
/* does b have layer kernel family k for dtype? */
static inline bool idd_backend_supports(const idd_backend *b, idd_kernel k, idd_dtype dtype) {
    return b && b->supports && b->supports(k, dtype);
}
/* IDD_OK when b has every device-part entry and the entries of every (family, dtype) its
 * supports() claims; else an error naming the first missing entry */
idd_status idd_backend_check(const idd_backend *b);
/* makes b serve dev after idd_backend_check(b); a table that fails it is refused */
idd_status idd_backend_register(idd_device dev, const idd_backend *b);
/* why a device has no backend (for error messages); a backend's init sets it when the
 * hardware is missing. The default names the build option. */
const char *idd_backend_unavailable_reason(idd_device dev);
void idd_backend_set_unavailable(idd_device dev, const char *reason);

#endif
