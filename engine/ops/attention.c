/* attention.c — the QKV attention core as a differentiable op: shape checks, dispatch
 * (float32; bf16 channels-last where the backend has it) and the tape node. Kernels:
 * engine/cpu/attention.c, engine/cuda/attention.cu. Dims: B batch, C channels, T positions, H heads. */
#include "ops_internal.h"

#include <string.h>

// ---------------------------------------------------------------- attention

/* saved: qkv, weight; ip: heads. A bf16 qkv of the fallback gets dqkv back in bf16, in
 * its layout. */
static idd_status attention_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *qkv = n->saved[0], *w = n->saved[1], *gc = cf32(g);
    if (!gc) return IDD_ERR;
    idd_tensor *dq = zeros_like_shape(qkv);
    int B = (int)qkv->shape[0], C = (int)qkv->shape[1] / 3, T = (int)qkv->shape[2];
    idd_status st = dq ? idd_backend_of(qkv)->attention_backward(fp(dq), fp(gc), fp(w), fp(qkv), B, C, T, (int)n->ip[0])
                       : IDD_ERR;
    idd_tensor_release(gc);
    if (st == IDD_OK && n->in[0]->dtype == IDD_BF16 && !(dq = as_layout_of(dq, n->in[0]))) st = IDD_ERR;
    gin[0] = dq;
    return st;
}

/* the backend's bf16 kernels; saved: qkv (bf16 channels-last), weight (bf16 (B*H,T,T));
 * ip: heads. dqkv is written by the kernel (bf16 channels-last). */
static idd_status attention_backward_bf16(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *qkv = n->saved[0], *w = n->saved[1], *gc = cl_bf16(g);
    if (!gc) return IDD_ERR;
    idd_tensor *dq = idd_tensor_new_channels_last(IDD_BF16, qkv->device, 3, qkv->shape);
    int B = (int)qkv->shape[0], C = (int)qkv->shape[1] / 3, T = (int)qkv->shape[2];
    idd_status st = dq ? idd_backend_of(qkv)->attention_backward_bf16(
                             (uint16_t *)idd_data(dq), (const uint16_t *)idd_data(gc), (const uint16_t *)idd_data(w),
                             (const uint16_t *)idd_data(qkv), B, C, T, (int)n->ip[0])
                       : IDD_ERR;
    idd_tensor_release(gc);
    gin[0] = dq;
    return st;
}

/* the forward's end: on success the node (saving qkv as the kernel read it, qc, and the
 * softmax weights w), on failure no result; the caller's references to qc, w are dropped */
static idd_tensor *attention_record(idd_status st, idd_tensor *out, idd_tensor *qkv, idd_tensor *qc, idd_tensor *w,
                                    int heads, idd_backward_fn bw) {
    if (st == IDD_OK) {
        idd_node *n = idd_record("qkv_attention", bw, out, 1, &qkv);
        if (n) { idd_node_save(n, qc); idd_node_save(n, w); n->ip[0] = heads; }
    } else {
        idd_tensor_release(out);
        out = NULL;
    }
    idd_tensor_release(qc);
    idd_tensor_release(w);
    return out;
}

/* qkv bf16 on a backend with bf16 attention kernels: out bf16 channels-last (B,C,T) */
static idd_tensor *qkv_attention_bf16(idd_tensor *qkv, int heads) {
    int64_t B = qkv->shape[0], C = qkv->shape[1] / 3, T = qkv->shape[2];
    int64_t oshape[3] = {B, C, T}, wshape[3] = {B * heads, T, T};
    idd_tensor *qc = cl_bf16(qkv), *out = idd_tensor_new_channels_last(IDD_BF16, qkv->device, 3, oshape);
    idd_tensor *w = idd_tensor_new(IDD_BF16, qkv->device, 3, wshape);
    idd_status st = qc && out && w ? idd_backend_of(qkv)->attention_forward_bf16(
                                         (uint16_t *)idd_data(out), (uint16_t *)idd_data(w),
                                         (const uint16_t *)idd_data(qc), (int)B, (int)C, (int)T, heads)
                                   : IDD_ERR;
    return attention_record(st, out, qkv, qc, w, heads, attention_backward_bf16);
}

idd_tensor *idd_qkv_attention(idd_tensor *qkv, int heads) {
    char sq[96];
    if (qkv->ndim != 3 || qkv->shape[1] % 3 || heads < 1 || (qkv->shape[1] / 3) % heads) {
        idd_error("qkv_attention: qkv %s must be (B, 3C, T) with C divisible by %d heads", idd_shape_str(qkv, sq, 96), heads);
        return NULL;
    }
    if (takes_bf16(qkv, IDD_K_ATTENTION, true)) return qkv_attention_bf16(qkv, heads);
    const idd_backend *be = op_backend(qkv, IDD_K_ATTENTION, "qkv_attention");
    if (!be) return NULL;
    int64_t B = qkv->shape[0], C = qkv->shape[1] / 3, T = qkv->shape[2];
    int64_t oshape[3] = {B, C, T}, wshape[3] = {B * heads, T, T};
    idd_tensor *qc = cf32(qkv), *out = idd_tensor_new(IDD_F32, qkv->device, 3, oshape);
    /* the softmax is kept only for a backward; without one the CPU kernel keeps each
     * head's (T,T) block in a per-thread scratch that stays in cache */
    bool keep = qkv->device != IDD_CPU || idd_any_requires_grad(1, &qkv);
    idd_tensor *w = keep ? idd_tensor_new(IDD_F32, qkv->device, 3, wshape) : NULL;
    idd_status st = qc && out && (w || !keep)
                        ? be->attention_forward(fp(out), w ? fp(w) : NULL, fp(qc), (int)B, (int)C, (int)T, heads)
                        : IDD_ERR;
    /* a bf16 qkv without bf16 kernels (the CPU): the f32 result back in bf16, qkv's layout */
    if (st == IDD_OK && qkv->dtype == IDD_BF16 && !(out = as_layout_of(out, qkv))) st = IDD_ERR;
    return attention_record(st, out, qkv, qc, w, heads, attention_backward);
}

