/* norm_conv.c — norm_conv: group norm (+scale/shift, SiLU) -> dropout -> conv2d as one
 * differentiable op that saves only the norm's input (to save training memory). The
 * forward runs the three layer ops of conv2d.c, norm.c and dropout.c without recording and frees their
 * intermediates; the backward recomputes the conv's input with the same ops (same
 * kernels, the dropout mask from the same Philox position) recorded on a small private
 * tape, runs the conv's backward alone (idd_conv2d_backward_of) and walks that tape
 * with idd_backward.
 * The results and every gradient equal those of the unfused sequence; the generator
 * advances exactly as that sequence advances it. The price: one more norm (+ dropout)
 * forward per op in the backward. */
#include "iddpm/nn.h"

#include <string.h>

/* node: in = x, gamma, beta, scale, shift, w, b; ip: groups, silu, stride, pad_h,
 * pad_w, seed, stream, offset of the dropout mask; p: eps, dropout p */
enum { IN_X, IN_GAMMA, IN_BETA, IN_SCALE, IN_SHIFT, IN_W, IN_B, N_IN };

/* the conv's input: dropout(group_norm(x)) of the node's inputs (or their aliases); g:
 * the mask's generator */
static idd_tensor *norm_dropout(idd_tensor *const in[N_IN], int groups, bool silu, double eps, double p,
                                idd_generator *g) {
    idd_tensor *h = idd_group_norm(in[IN_X], groups, in[IN_GAMMA], in[IN_BETA], in[IN_SCALE], in[IN_SHIFT], silu, eps);
    if (!h || p <= 0) return h;
    idd_tensor *d = idd_dropout(h, p, g);
    idd_tensor_release(h);   /* a recording dropout keeps its own reference */
    return d;
}

/* Backpropagates g through the private tape ending in t with the engine's one tape walker
 * (idd_backward): the leaves are aliases of the node's inputs with requires_grad = needs,
 * so their gradients land in leaf[k]->grad, which are handed to gin. Consumes t and g;
 * the private nodes and their saved tensors go as the walk passes them. */
static idd_status walk(idd_tensor *t, idd_tensor *g, idd_tensor *const leaf[N_IN], idd_tensor **gin) {
    idd_status st = idd_backward(t, g);
    idd_tensor_release(g);
    idd_tensor_release(t);
    for (int k = 0; k < N_IN && st == IDD_OK; k++)
        if (leaf[k] && leaf[k]->grad) { gin[k] = leaf[k]->grad; leaf[k]->grad = NULL; }
    return st;
}

/* recompute the conv's input d (recording the norm and dropout on a private tape of
 * aliases of the inputs), run the conv's backward alone, then walk the tape from d */
static idd_status norm_conv_backward(idd_node *n, idd_tensor *g, idd_tensor **gin) {
    idd_tensor *leaf[N_IN] = {0};
    idd_status st = IDD_OK;
    for (int k = 0; k < N_IN && st == IDD_OK; k++) {
        if (!n->in[k]) continue;
        leaf[k] = idd_view_alias(n->in[k]);
        if (!leaf[k]) st = IDD_ERR;
        else leaf[k]->requires_grad = n->needs[k];
    }
    idd_generator mask = {(uint64_t)n->ip[5], (uint64_t)n->ip[6], (uint64_t)n->ip[7], 0, 0};
    idd_tensor *d = NULL;
    if (st == IDD_OK) {
        bool prev = idd_grad_enabled();
        idd_set_grad_enabled(true);
        d = norm_dropout(leaf, (int)n->ip[0], n->ip[1] != 0, n->p[0], n->p[1], &mask);
        idd_set_grad_enabled(prev);
        if (!d) st = IDD_ERR;
    }
    idd_tensor *gc[3] = {NULL, NULL, NULL};
    if (st == IDD_OK) {
        bool needs[3] = {d->requires_grad, n->needs[IN_W], n->needs[IN_B]};
        st = idd_conv2d_backward_of(d, n->in[IN_W], n->in[IN_B] != NULL, (int)n->ip[2], (int)n->ip[3], (int)n->ip[4],
                                    g, needs, gc);
        if (st != IDD_OK) idd_error_prefix("conv2d");
    }
    gin[IN_W] = gc[1];
    gin[IN_B] = gc[2];
    if (st == IDD_OK && gc[0]) st = walk(d, gc[0], leaf, gin);
    else { idd_tensor_release(gc[0]); idd_tensor_release(d); }
    for (int k = 0; k < N_IN; k++) idd_tensor_release(leaf[k]);
    return st;
}

idd_tensor *idd_norm_conv(idd_tensor *x, int groups, idd_tensor *gamma, idd_tensor *beta, idd_tensor *scale,
                          idd_tensor *shift, bool silu, double eps, double p, idd_generator *g, idd_tensor *w,
                          idd_tensor *b, int stride, int pad_h, int pad_w) {
    if (!(p >= 0 && p < 1)) { idd_error("norm_conv: dropout p = %g must be in [0, 1)", p); return NULL; }
    if (p > 0 && !g) g = idd_default_generator();
    uint64_t seed = g ? g->seed : 0, stream = g ? g->stream : 0, offset = g ? g->offset : 0;
    /* the mask's counters are claimed here (shard-aware, iddpm/ops.h) and drawn from a
     * plain generator at that start, which the backward replays */
    idd_generator mask = {seed, stream, offset, 0, 0};
    if (p > 0) mask.offset = offset = idd_generator_claim(g, (uint64_t)(idd_numel(x) + 1) / 2);
    idd_tensor *in[N_IN] = {x, gamma, beta, scale, shift, w, b};
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    idd_tensor *d = norm_dropout(in, groups, silu, eps, p, &mask);
    idd_tensor *y = d ? idd_conv2d_hw(d, w, b, stride, pad_h, pad_w) : NULL;
    idd_tensor_release(d);
    idd_set_grad_enabled(prev);
    if (!y) return NULL;
    idd_node *n = idd_record("norm_conv", norm_conv_backward, y, N_IN, in);
    if (n) {
        n->ip[0] = groups; n->ip[1] = silu; n->ip[2] = stride; n->ip[3] = pad_h; n->ip[4] = pad_w;
        n->ip[5] = (int64_t)seed; n->ip[6] = (int64_t)stream; n->ip[7] = (int64_t)offset;
        n->p[0] = eps; n->p[1] = p;
    }
    return y;
}
