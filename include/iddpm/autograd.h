/* iddpm/autograd.h — the tape.
 *
 * An op whose inputs require grad records a node: its inputs (retained), the tensors
 * it saved for backward, scalar params and a backward function that sits next to the
 * op's forward in engine/ops/<family>.c. The output holds the node (t->grad_fn); a
 * node never holds its output, so there are no cycles. idd_backward() walks the
 * nodes reachable from the root in reverse topological order, accumulating each
 * output gradient, calling the node's backward, and freeing saved tensors as soon as
 * a node is done. Leaves with requires_grad accumulate into t->grad (+=). */
#ifndef IDDPM_AUTOGRAD_H
#define IDDPM_AUTOGRAD_H

#include "iddpm/tensor.h"

#define IDD_NODE_MAX_IN 8
#define IDD_NODE_MAX_SAVED 8

typedef struct idd_node idd_node;
/* Given dout (the gradient of the node's output, same shape), write into gin[i] a new
 * tensor holding the gradient for input i, for each i with needs[i] true (others stay
 * NULL). The tape adds gin[i] into the right place. */
typedef idd_status (*idd_backward_fn)(idd_node *n, idd_tensor *dout, idd_tensor **gin);

struct idd_node {
    int refcount;
    const char *name;                       /* op name, for errors: "conv2d" */
    idd_backward_fn backward;
    int n_in;
    idd_tensor *in[IDD_NODE_MAX_IN];        /* retained inputs (may be NULL) */
    bool needs[IDD_NODE_MAX_IN];            /* input i needs a gradient */
    int n_saved;
    idd_tensor *saved[IDD_NODE_MAX_SAVED];  /* retained; released after backward */
    uint64_t in_version[IDD_NODE_MAX_IN];   /* storage versions when recorded / saved: */
    uint64_t saved_version[IDD_NODE_MAX_SAVED];   /* backward refuses to run if they moved */
    double p[8];                            /* scalar params */
    int64_t ip[8];                          /* integer params */
    void *ctx;                              /* op-owned extra state, freed by free_ctx */
    void (*free_ctx)(void *ctx);
    int64_t out_shape[IDD_MAX_DIMS];        /* the output's shape and dtype */
    int out_ndim;
    idd_dtype out_dtype;
    idd_device out_device;
    /* backward bookkeeping */
    idd_tensor *gout;
    int pending;
    int mark;
};

/* Is grad recording on (not inside no_grad) and does any input need grad? */
bool idd_grad_enabled(void);
void idd_set_grad_enabled(bool on);          /* the no_grad switch; returns nothing */
bool idd_any_requires_grad(int n, idd_tensor *const *ts);

/* If recording is needed for these inputs, make a node and attach it to out (which
 * becomes requires_grad). Returns the node (to fill saved/p) or NULL if not needed. */
idd_node *idd_record(const char *name, idd_backward_fn bw, idd_tensor *out, int n_in,
                     idd_tensor *const *in);
void idd_node_save(idd_node *n, idd_tensor *t);  /* retains t into n->saved */
void idd_node_release(idd_node *n);

/* Run backward from root; grad == NULL means ones (root must then have 1 element). */
idd_status idd_backward(idd_tensor *root, idd_tensor *grad);

/* Accumulate g into t->grad (+=), reducing broadcast dims. */
idd_status idd_accumulate_grad(idd_tensor *t, idd_tensor *g);

/* Sum g down to the given shape (undo broadcasting). New tensor. */
idd_tensor *idd_sum_to_shape(idd_tensor *g, int ndim, const int64_t *shape);

/* Gradcheck: f maps the inputs to a tensor; compares the tape's gradient of
 * sum(f(x) * R) (R fixed random) with central differences of step eps on every input
 * that requires grad (at most nmax elements each). Returns the worst relative error
 * in *worst; IDD_ERR only on failure to evaluate. */
typedef idd_tensor *(*idd_gradcheck_fn)(int n, idd_tensor **inputs, void *ud);
idd_status idd_gradcheck(idd_gradcheck_fn f, void *ud, int n, idd_tensor **inputs, double eps,
                         int64_t nmax, uint64_t seed, double *worst);

#endif
