/* autograd.c — recording nodes, the reverse walk, gradient accumulation, gradcheck.
 * See include/iddpm/autograd.h for the model. */
#include "iddpm/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local bool grad_disabled;

bool idd_grad_enabled(void) { return !grad_disabled; }
void idd_set_grad_enabled(bool on) { grad_disabled = !on; }

bool idd_any_requires_grad(int n, idd_tensor *const *ts) {
    if (grad_disabled) return false;
    for (int i = 0; i < n; i++)
        if (ts[i] && ts[i]->requires_grad) return true;
    return false;
}

idd_node *idd_record(const char *name, idd_backward_fn bw, idd_tensor *out, int n_in, idd_tensor *const *in) {
    if (!out || !idd_any_requires_grad(n_in, in)) return NULL;
    idd_node *n = calloc(1, sizeof *n);
    if (!n) return NULL;   /* out of memory: the result simply will not backprop */
    n->refcount = 1;
    n->name = name;
    n->backward = bw;
    n->n_in = n_in;
    for (int i = 0; i < n_in; i++) {
        n->in[i] = in[i];
        idd_tensor_retain(in[i]);
        n->needs[i] = in[i] && in[i]->requires_grad;
        n->in_version[i] = in[i] && in[i]->storage ? in[i]->storage->version : 0;
    }
    n->out_ndim = out->ndim;
    memcpy(n->out_shape, out->shape, sizeof out->shape);
    n->out_dtype = out->dtype;
    n->out_device = out->device;
    out->grad_fn = n;
    out->requires_grad = true;
    return n;
}

void idd_node_save(idd_node *n, idd_tensor *t) {
    if (n->n_saved < IDD_NODE_MAX_SAVED) {
        idd_tensor_retain(t);
        n->saved_version[n->n_saved] = t && t->storage ? t->storage->version : 0;
        n->saved[n->n_saved++] = t;
    }
}

static void node_free_saved(idd_node *n) {
    for (int i = 0; i < n->n_saved; i++) { idd_tensor_release(n->saved[i]); n->saved[i] = NULL; }
    n->n_saved = 0;
    if (n->ctx && n->free_ctx) n->free_ctx(n->ctx);
    n->ctx = NULL;
}

static void node_destroy(idd_node *n) {
    node_free_saved(n);
    for (int i = 0; i < n->n_in; i++) idd_tensor_release(n->in[i]);
    idd_tensor_release(n->gout);
    free(n);
}

/* Freeing a node releases its inputs, whose nodes may then die, and so on down the
 * chain: done recursively, dropping a long tape (a million ops never backpropagated)
 * overflows the C stack. So dead nodes go on a worklist that the outermost release
 * drains; a release from inside node_destroy only appends. */
static _Thread_local struct { idd_node **v; size_t n, cap; bool draining; } dead;

void idd_node_release(idd_node *n) {
    if (!n || --n->refcount > 0) return;
    if (dead.n == dead.cap) {
        size_t cap = dead.cap ? 2 * dead.cap : 256;
        idd_node **v = realloc(dead.v, cap * sizeof *v);
        if (!v) { node_destroy(n); return; }   /* out of memory: recursive, as before */
        dead.v = v;
        dead.cap = cap;
    }
    dead.v[dead.n++] = n;
    if (dead.draining) return;
    dead.draining = true;
    while (dead.n > 0) node_destroy(dead.v[--dead.n]);
    dead.draining = false;
    if (dead.cap > 4096) { free(dead.v); dead.v = NULL; dead.cap = 0; }   /* a long chain's list is not kept */
}

/* ------------------------------------------------------------ gradients */

idd_tensor *idd_sum_to_shape(idd_tensor *g, int ndim, const int64_t *shape) {
    idd_tensor *cur = g;
    idd_tensor_retain(cur);
    int lead = cur->ndim - ndim;
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    for (int d = 0; d < cur->ndim && cur; d++) {
        int j = d - lead;
        if (j < 0 || (shape[j] == 1 && cur->shape[d] != 1)) {
            idd_tensor *s = idd_sum(cur, d, true);
            idd_tensor_release(cur);
            cur = s;
        }
    }
    idd_tensor *r = cur ? idd_reshape(cur, ndim, shape) : NULL;
    idd_tensor_release(cur);
    idd_set_grad_enabled(prev);
    return r;
}

/* a tensor that nothing else shares: this reference is its only one, it owns all of
 * its dense (contiguous or channels-last) storage and nothing records through it */
static bool exclusive(const idd_tensor *t, int refs) {
    return (idd_is_contiguous(t) || idd_is_channels_last(t)) && t->refcount == refs && t->storage && t->storage->refcount == 1 &&
           t->offset == 0 && !t->requires_grad &&
           t->storage->nbytes == (size_t)idd_numel(t) * idd_dtype_size(t->dtype);
}

/* *acc += g (g reduced to acc's shape); creates *acc if NULL. steal: the caller
 * releases its one reference to g right after, so a g that nothing else shares (tensor
 * and storage referenced once, by the caller) becomes *acc without a copy.
 * shared_ok: *acc is a node's incoming gradient, which only that node's backward reads
 * (never writes): it may alias a tensor held elsewhere (the same g handed to both
 * inputs of an add, a reshaped view of g), so it is referenced instead of copied, and
 * a later gradient is added out of place unless *acc is exclusively ours. A leaf's
 * .grad is the user's to scale or zero in place: it never aliases.
 * The gradient takes the dtype and layout of the tensor it belongs to (like): a g of
 * another dtype is converted, and a channels-last tensor's gradient is made
 * channels-last (a bf16 channels-last activation gets a bf16 channels-last gradient). */
static idd_status accumulate_ex(idd_tensor **acc, idd_tensor *g, const idd_tensor *like, bool steal, bool shared_ok) {
    int ndim = like->ndim;
    const int64_t *shape = like->shape;
    idd_dtype dt = like->dtype;
    idd_tensor *gg = g;
    idd_tensor_retain(gg);
    if (gg->ndim != ndim || memcmp(gg->shape, shape, sizeof(int64_t) * ndim)) {
        idd_tensor *r = idd_sum_to_shape(gg, ndim, shape);
        idd_tensor_release(gg);
        if (!r) return IDD_ERR;
        gg = r;
    }
    if (gg->dtype != dt || (idd_is_channels_last(like) && !idd_is_channels_last(gg))) {
        idd_tensor *c = idd_tensor_empty_like(like, dt);
        if (c && idd_copy_(c, gg) != IDD_OK) { idd_tensor_release(c); c = NULL; }
        idd_tensor_release(gg);
        if (!c) return IDD_ERR;
        gg = c;
    }
    if (!*acc) {
        /* a fresh tensor (reduced or converted here: one reference, ours), or the caller's
         * g that it hands over (two references: its and ours) with unshared storage */
        int owners = gg == g ? (steal ? 2 : 0) : 1;
        if ((owners && exclusive(gg, owners)) || (shared_ok && !gg->requires_grad)) {
            *acc = gg;   /* our reference (taken above); the caller's goes with its release */
            return IDD_OK;
        }
        *acc = idd_tensor_empty_like(gg, gg->dtype);
        if (*acc && idd_copy_(*acc, gg) != IDD_OK) { idd_tensor_release(*acc); *acc = NULL; }
        idd_tensor_release(gg);
        return *acc ? IDD_OK : IDD_ERR;
    }
    idd_status st;
    if (!shared_ok || exclusive(*acc, 1)) {
        st = idd_backend_of(*acc)->binary(IDD_BIN_ADD, *acc, *acc, gg);
    } else {
        /* *acc is shared (shared_ok only): the sum goes to a new tensor */
        idd_tensor *sum = idd_tensor_empty_like(*acc, dt);
        st = sum ? idd_backend_of(sum)->binary(IDD_BIN_ADD, sum, *acc, gg) : IDD_ERR;
        if (st == IDD_OK) { idd_tensor_release(*acc); *acc = sum; }
        else idd_tensor_release(sum);
    }
    idd_tensor_release(gg);
    return st;
}

static idd_status accumulate(idd_tensor **acc, idd_tensor *g, const idd_tensor *like) {
    return accumulate_ex(acc, g, like, false, false);
}

idd_status idd_accumulate_grad(idd_tensor *t, idd_tensor *g) { return accumulate(&t->grad, g, t); }

/* depth-first post-order of the nodes reachable from root */
typedef struct { idd_node **v; int n, cap; } node_list;
static int push(node_list *l, idd_node *n) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 256;
        idd_node **v = realloc(l->v, sizeof *v * cap);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = n;
    return 0;
}

static idd_status topo(idd_node *root, node_list *out) {
    /* iterative DFS: stack of (node, next input index) */
    node_list stack = {0}, idx = {0};
    idd_status st = IDD_OK;
    root->mark = 1;
    if (push(&stack, root)) return idd_error_status(IDD_ENOMEM, "backward: out of memory");
    int *next = calloc(1, sizeof(int));
    int next_cap = 1;
    (void)idx;
    while (stack.n) {
        idd_node *n = stack.v[stack.n - 1];
        if (next_cap < stack.n) { next_cap = stack.cap; next = realloc(next, sizeof(int) * next_cap); }
        int *k = &next[stack.n - 1];
        bool descended = false;
        while (*k < n->n_in) {
            idd_tensor *in = n->in[(*k)++];
            if (in && in->grad_fn) {
                in->grad_fn->pending++;
                if (!in->grad_fn->mark) {
                    in->grad_fn->mark = 1;
                    if (push(&stack, in->grad_fn)) { st = IDD_ENOMEM; break; }
                    if (next_cap < stack.n) { next_cap = stack.cap; next = realloc(next, sizeof(int) * next_cap); }
                    next[stack.n - 1] = 0;
                    descended = true;
                    break;
                }
            }
        }
        if (st) break;
        if (!descended) { stack.n--; if (push(out, n)) { st = IDD_ENOMEM; break; } }
    }
    free(stack.v);
    free(next);
    return st ? idd_error_status(st, "backward: out of memory") : IDD_OK;
}

/* PyTorch's rule: a tensor a node kept (an input or a saved tensor) must still hold what
 * it held at record time, or its gradient would silently be wrong */
static idd_status check_versions(const idd_node *n) {
    char sb[96];
    for (int k = 0; k < n->n_in + n->n_saved; k++) {
        const idd_tensor *t = k < n->n_in ? n->in[k] : n->saved[k - n->n_in];
        uint64_t v = k < n->n_in ? n->in_version[k] : n->saved_version[k - n->n_in];
        if (t && t->storage && t->storage->version != v)
            return idd_error("backward: one of the variables needed for gradient computation has been modified "
                             "by an inplace operation: %s %s %s at version %llu, now %llu", n->name,
                             k < n->n_in ? "input" : "saved", idd_shape_str(t, sb, sizeof sb),
                             (unsigned long long)v, (unsigned long long)t->storage->version);
    }
    return IDD_OK;
}

idd_status idd_backward(idd_tensor *root, idd_tensor *grad) {
    char sb[96];
    if (!root->requires_grad)
        return idd_error("backward: tensor %s does not require grad (did you set requires_grad on an input?)",
                         idd_shape_str(root, sb, sizeof sb));
    idd_tensor *g = grad;
    if (!g) {
        if (idd_numel(root) != 1)
            return idd_error("backward: gradient can be implicit only for a 1-element output, got %s",
                             idd_shape_str(root, sb, sizeof sb));
        g = idd_tensor_new(root->dtype, root->device, root->ndim, root->shape);
        if (!g) return IDD_ERR;
        idd_fill_(g, 1.0);
    } else {
        idd_tensor_retain(g);
    }
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    idd_status st = IDD_OK;
    if (!root->grad_fn) {
        st = idd_accumulate_grad(root, g);
        idd_tensor_release(g);
        idd_set_grad_enabled(prev);
        return st;
    }
    node_list order = {0};
    st = topo(root->grad_fn, &order);
    /* every node of the walk is held until its end: releasing a node's inputs (below) can
     * free an input tensor, and with it that tensor's node, still due in the walk */
    for (int i = 0; i < order.n; i++) order.v[i]->refcount++;
    /* the root node's incoming gradient: read by its backward only, so g is referenced, not
     * copied (norm_conv walks its recompute tape from an activation-sized g) */
    if (st == IDD_OK) st = accumulate_ex(&root->grad_fn->gout, g, root, false, true);
    idd_tensor_release(g);
    /* order is post-order (inputs before users): walk it backwards */
    for (int i = order.n - 1; i >= 0 && st == IDD_OK; i--) {
        idd_node *n = order.v[i];
        if (!n->gout) continue;   /* no gradient reached this node */
        if (idd_interrupted) { st = idd_error("backward: interrupted"); break; }
        if (!n->backward) { st = idd_error("backward: %s has no backward (was the graph already freed?)", n->name); break; }
        if ((st = check_versions(n)) != IDD_OK) break;
        idd_tensor *gin[IDD_NODE_MAX_IN] = {0};
        st = n->backward(n, n->gout, gin);
        if (st != IDD_OK) idd_error_prefix(n->name);
        for (int k = 0; k < n->n_in && st == IDD_OK; k++) {
            idd_tensor *in = n->in[k];
            if (!gin[k] || !n->needs[k]) continue;
            /* gin[k] is released below: hand it over when nothing else holds it */
            if (in->grad_fn)
                st = accumulate_ex(&in->grad_fn->gout, gin[k], in, true, true);
            else if (in->requires_grad)
                st = accumulate_ex(&in->grad, gin[k], in, true, false);
        }
        for (int k = 0; k < n->n_in; k++) idd_tensor_release(gin[k]);
        idd_tensor_release(n->gout);
        n->gout = NULL;
        node_free_saved(n);
        n->backward = NULL;   /* the graph is consumed: a second backward says so */
        /* and its inputs (the activations, for most ops) go now, not when the output
         * holding this node is garbage-collected: peak memory and heap growth */
        for (int k = 0; k < n->n_in; k++) { idd_tensor_release(n->in[k]); n->in[k] = NULL; }
    }
    for (int i = 0; i < order.n; i++) {
        order.v[i]->mark = 0;
        order.v[i]->pending = 0;
        idd_tensor_release(order.v[i]->gout);
        order.v[i]->gout = NULL;
    }
    /* users before inputs: a node freed here releases only nodes already visited */
    for (int i = order.n - 1; i >= 0; i--) idd_node_release(order.v[i]);
    free(order.v);
    idd_set_grad_enabled(prev);
    return st;
}

/* ------------------------------------------------------------ gradcheck */

static double eval_dot(idd_gradcheck_fn f, void *ud, int n, idd_tensor **in, idd_tensor *R, idd_status *st) {
    idd_tensor *y = f(n, in, ud);
    if (!y) { *st = IDD_ERR; return 0; }
    double s = 0;
    int64_t m = idd_numel(y);
    for (int64_t i = 0; i < m; i++) s += idd_get_flat(y, i) * idd_get_flat(R, i);
    idd_tensor_release(y);
    *st = IDD_OK;
    return s;
}

idd_status idd_gradcheck(idd_gradcheck_fn f, void *ud, int n, idd_tensor **in, double eps, int64_t nmax,
                         uint64_t seed, double *worst) {
    idd_status st;
    *worst = 0;
    for (int i = 0; i < n; i++) if (in[i]) { idd_tensor_release(in[i]->grad); in[i]->grad = NULL; }
    idd_tensor *y = f(n, in, ud);
    if (!y) return IDD_ERR;
    idd_generator g = {seed, 7, 0};
    idd_tensor *R = idd_randn(&g, y->dtype, IDD_CPU, y->ndim, y->shape);
    if (!R) { idd_tensor_release(y); return IDD_ERR; }
    st = idd_backward(y, R);
    idd_tensor_release(y);
    if (st != IDD_OK) { idd_tensor_release(R); return st; }
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    for (int i = 0; i < n && st == IDD_OK; i++) {
        idd_tensor *x = in[i];
        if (!x || !x->requires_grad || x->dtype == IDD_I64 || x->dtype == IDD_U8) continue;
        if (!idd_is_contiguous(x) || x->device != IDD_CPU) { st = idd_error("gradcheck: inputs must be contiguous CPU tensors"); break; }
        int64_t m = idd_numel(x), step = m > nmax ? m / nmax : 1;
        for (int64_t j = 0; j < m && st == IDD_OK; j += step) {
            double orig = idd_get_flat(x, j);
            double *pd = x->dtype == IDD_F64 ? (double *)idd_data(x) + j : NULL;
            float *pf = x->dtype == IDD_F32 ? (float *)idd_data(x) + j : NULL;
            if (pd) *pd = orig + eps; else *pf = (float)(orig + eps);
            double fp = eval_dot(f, ud, n, in, R, &st);
            if (pd) *pd = orig - eps; else *pf = (float)(orig - eps);
            double fm = st ? 0 : eval_dot(f, ud, n, in, R, &st);
            if (pd) *pd = orig; else *pf = (float)orig;
            double num = (fp - fm) / (2 * eps);
            double ana = x->grad ? idd_get_flat(x->grad, j) : 0;
            double err = fabs(num - ana) / fmax(1.0, fmax(fabs(num), fabs(ana)));
            if (!(err <= *worst)) *worst = err;
        }
    }
    idd_set_grad_enabled(prev);
    idd_tensor_release(R);
    return st;
}
