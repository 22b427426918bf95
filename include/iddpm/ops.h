/* iddpm/ops.h — differentiable tensor operations.
 *
 * Every function returns a new tensor (refcount 1) or NULL with idd_last_error() set
 * (the message names the op and the shapes). Inputs are borrowed, never consumed. When
 * an input requires grad and grad mode is on, the result carries a tape node whose
 * backward sits next to the forward in engine/ops/<family>.c. Dims are 0-based;
 * negative dims count from the end. Error messages number dims from 1, as Lua does. Binary ops broadcast as in PyTorch. */
#ifndef IDDPM_OPS_H
#define IDDPM_OPS_H

#include "iddpm/backend.h"
#include "iddpm/autograd.h"

/* ---- pointwise (engine/ops/pointwise.c) ---- */
idd_tensor *idd_binary(idd_binop op, idd_tensor *a, idd_tensor *b);
idd_tensor *idd_binary_scalar(idd_binop op, idd_tensor *a, double s, bool scalar_first);
idd_tensor *idd_unary(idd_unop op, idd_tensor *a);
idd_tensor *idd_clamp(idd_tensor *a, double lo, double hi);
idd_tensor *idd_affine(idd_tensor *a, double scale, double shift);  /* a*scale + shift */
idd_tensor *idd_where(idd_tensor *cond, idd_tensor *a, idd_tensor *b);
const char *idd_binop_name(idd_binop op);
const char *idd_unop_name(idd_unop op);

/* ---- reductions (engine/ops/reduce.c); dim = IDD_ALL_DIMS reduces everything ---- */
#define IDD_ALL_DIMS 1000
idd_tensor *idd_sum(idd_tensor *a, int dim, bool keepdim);
idd_tensor *idd_mean(idd_tensor *a, int dim, bool keepdim);
idd_tensor *idd_max(idd_tensor *a, int dim, bool keepdim, idd_tensor **argmax);
idd_tensor *idd_min(idd_tensor *a, int dim, bool keepdim, idd_tensor **argmin);
idd_tensor *idd_var(idd_tensor *a, int dim, bool keepdim, bool unbiased);
idd_tensor *idd_logsumexp(idd_tensor *a, int dim, bool keepdim);
idd_tensor *idd_softmax(idd_tensor *a, int dim);
idd_tensor *idd_mean_flat(idd_tensor *a);   /* mean over all but dim 0 -> (N) */

/* ---- matmul (engine/ops/matmul.c): (M,K)@(K,N), batched (...,M,K)@(...,K,N) ---- */
idd_tensor *idd_matmul(idd_tensor *a, idd_tensor *b);
idd_tensor *idd_linear(idd_tensor *x, idd_tensor *w, idd_tensor *bias); /* x (N,in) w (out,in) */

/* ---- shape (engine/ops/shape.c): differentiable views and copies ---- */
idd_tensor *idd_reshape(idd_tensor *a, int ndim, const int64_t *shape); /* one -1 allowed */
idd_tensor *idd_narrow(idd_tensor *a, int dim, int64_t start, int64_t len);
idd_tensor *idd_permute(idd_tensor *a, int ndim, const int *perm);
idd_tensor *idd_transpose(idd_tensor *a, int d0, int d1);
idd_tensor *idd_expand(idd_tensor *a, int ndim, const int64_t *shape);
idd_tensor *idd_concat(int n, idd_tensor **ts, int dim);
idd_tensor *idd_detach(idd_tensor *a);
/* contiguous; differentiable between floats. Float -> int64/uint8 truncates toward zero
 * and saturates at the type's range; NaN is an error (idd_copy_ reports it) */
idd_tensor *idd_cast(idd_tensor *a, idd_dtype dt);
idd_tensor *idd_contiguous_op(idd_tensor *a);
/* a copy in channels-last layout (tensor.h) and dtype dt (a view if a already is both);
 * differentiable between float dtypes, the gradient returns in a's dtype and layout */
idd_tensor *idd_channels_last(idd_tensor *a, idd_dtype dt);

/* ---- indexing (engine/ops/index.c) ---- */
/* out[i...] = a[idx[i], ...] along dim 0 (timestep lookup: a (T), idx (N) -> (N)) */
idd_tensor *idd_index_select(idd_tensor *a, int dim, idd_tensor *idx);

/* ---- random (engine/core/rng.c) ---- */
/* shard/shards (data-parallel training, lua/iddpm/dist.lua): 0/0 or 0/1 is a plain
 * generator. With shards = W > 1, every draw of n counters is one slice of a draw of
 * W*n counters: shard r reads counters offset + r*n .. offset + (r+1)*n - 1 and offset
 * advances by W*n on every shard. So W ranks drawing b examples each read exactly what
 * one process drawing W*b examples reads (when n covers whole counters: an even number
 * of normal/uniform values, or draws of one value per counter). */
typedef struct { uint64_t seed, stream, offset, shard, shards; } idd_generator;
idd_generator *idd_default_generator(void);
/* the first counter of a draw of n counters, advancing g (shard-aware, see above) */
uint64_t idd_generator_claim(idd_generator *g, uint64_t n);
void idd_manual_seed(uint64_t seed);
idd_tensor *idd_randn(idd_generator *g, idd_dtype dt, idd_device dev, int ndim, const int64_t *shape);
idd_tensor *idd_rand(idd_generator *g, idd_dtype dt, idd_device dev, int ndim, const int64_t *shape);
/* integers uniform in [lo, hi) as I64 */
idd_tensor *idd_randint(idd_generator *g, int64_t lo, int64_t hi, int ndim, const int64_t *shape);
/* raw draws for samplers: n uniforms in [0,1) as double */
void idd_rand_doubles(idd_generator *g, double *out, int64_t n);

#endif
