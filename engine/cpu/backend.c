/* backend.c — the CPU backend's device part: aligned host memory, strided copy/fill,
 * the generic pointwise and reduction kernels (float32 fast paths, double elsewhere),
 * batched GEMM through OpenBLAS and the Philox random streams; and its table, which
 * names the layer kernels of the other files of engine/cpu (conv2d.c, norm.c, ...). */
#include "iddpm/backend.h"
#include "iddpm/bf16.h"

#include <cblas.h>
#include <malloc.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "iddpm/kernels.h"
#include "iddpm/philox.h"

#define PAR_MIN 32768   /* below this many elements threads cost more than they give */

/* Activations are allocated and freed every step. glibc would hand large blocks to
 * mmap/munmap, so every step paid page faults and kernel zeroing for them (~8% of a
 * training step); keep them in the heap instead so freed blocks are reused. */
static void cpu_malloc_tuning(void) {
    static int done;
    if (done) return;
    done = 1;
    mallopt(M_MMAP_THRESHOLD, 512 << 20);
    mallopt(M_TRIM_THRESHOLD, -1);   /* never: a step frees its peak at the top of the heap */
}

/* OpenBLAS (0.3.x) takes a GEMM work buffer (128 MiB + a page) per concurrent caller
 * the first time that many call at once, and when the allocation fails it retries
 * forever (blas_memory_alloc loops until one of its allocators succeeds): under an
 * address-space limit (ulimit -v) a run that fills memory then spins in sgemm instead
 * of stopping. So under such a limit our own allocations leave room for one buffer per
 * thread plus the caller's: an allocation that would not leave it fails (our clean "out
 * of memory" error) first. The probe is a PROT_NONE mapping (counted by RLIMIT_AS,
 * never touched) and is skipped entirely when there is no limit. */
#define BLAS_BUFFER_BYTES (((size_t)128 << 20) + 4096)
static size_t blas_headroom(void) {
    static int limited = -1;
    if (limited < 0) {
        struct rlimit r;
        limited = getrlimit(RLIMIT_AS, &r) == 0 && r.rlim_cur != RLIM_INFINITY;
    }
    return limited ? (size_t)(omp_get_max_threads() + 1) * BLAS_BUFFER_BYTES : 0;
}

static void *cpu_alloc(size_t n) {
    void *p = NULL;
    cpu_malloc_tuning();
    if (posix_memalign(&p, 64, (n + 63) & ~(size_t)63)) return NULL;
    size_t room = blas_headroom();
    if (room) {
        void *q = mmap(NULL, room, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (q == MAP_FAILED) { free(p); return NULL; }
        munmap(q, room);
    }
    return p;
}
static void cpu_free(void *p) { free(p); }
static idd_status cpu_upload(void *d, const void *s, size_t n) { memcpy(d, s, n); return IDD_OK; }

/* ------------------------------------------------------------ element access */

static inline double load(const void *base, idd_dtype dt, int64_t i) {
    switch (dt) {
    case IDD_F32: return ((const float *)base)[i];
    case IDD_F64: return ((const double *)base)[i];
    case IDD_I64: return (double)((const int64_t *)base)[i];
    case IDD_BF16: return idd_f32_from_bf16(((const uint16_t *)base)[i]);
    default: return ((const uint8_t *)base)[i];
    }
}
static inline void store(void *base, idd_dtype dt, int64_t i, double v) {
    switch (dt) {
    case IDD_F32: ((float *)base)[i] = (float)v; break;
    case IDD_F64: ((double *)base)[i] = v; break;
    /* float -> integer casts truncate toward zero and saturate at the dtype's range; NaN
     * stores 0 here, and copy/fill report it as an error (see cpu_copy) */
    case IDD_I64:
        ((int64_t *)base)[i] = v != v ? 0 : v >= 9.2233720368547758e18 ? INT64_MAX
                             : v <= -9.2233720368547758e18 ? INT64_MIN : (int64_t)v;
        break;
    case IDD_BF16: ((uint16_t *)base)[i] = idd_bf16_from_f32((float)v); break;
    default: ((uint8_t *)base)[i] = (uint8_t)(v > 0 ? (v > 255 ? 255 : v) : 0); break;
    }
}

/* Iterate over the elements of up to three same-shape tensors: calls fn on runs of
 * the innermost dim with the element offsets of each operand and its inner stride. */
typedef struct { int n; const idd_tensor *t[3]; int serial; } iter_set;
typedef void (*run_fn)(void *ud, int64_t len, const int64_t *off, const int64_t *st);

static void iterate(iter_set *s, run_fn fn, void *ud) {
    const idd_tensor *t0 = s->t[0];
    /* coalesce: dims d and d+1 merge when every operand steps over d exactly as over the
     * whole of d+1 (a narrow along C of NCHW runs over C*H*W, not W, at a time) */
    int64_t shape[IDD_MAX_DIMS], stride[3][IDD_MAX_DIMS];
    int nd = 0;
    for (int d = 0; d < t0->ndim; d++) {
        if (t0->shape[d] == 1) continue;   /* a size-1 dim steps nowhere */
        bool merge = nd > 0;
        for (int k = 0; k < s->n && merge; k++)
            merge = stride[k][nd - 1] == s->t[k]->stride[d] * t0->shape[d];
        if (merge) {
            shape[nd - 1] *= t0->shape[d];
            for (int k = 0; k < s->n; k++) stride[k][nd - 1] = s->t[k]->stride[d];
        } else {
            shape[nd] = t0->shape[d];
            for (int k = 0; k < s->n; k++) stride[k][nd] = s->t[k]->stride[d];
            nd++;
        }
    }
    int64_t len = nd ? shape[nd - 1] : 1;
    int64_t st[3];
    for (int k = 0; k < s->n; k++) st[k] = nd ? stride[k][nd - 1] : 0;
    int64_t outer = 1;
    for (int d = 0; d < nd - 1; d++) outer *= shape[d];
    if (idd_numel(t0) == 0) return;
    /* rows are independent (the output never overlaps itself): large iterations split
     * their rows over OpenMP threads; fn's own OpenMP loops then run serially */
    #pragma omp parallel for schedule(static) if (!s->serial && outer > 1 && outer * len > PAR_MIN)
    for (int64_t o = 0; o < outer; o++) {
        int64_t off[3];
        int64_t rem = o;
        for (int k = 0; k < s->n; k++) off[k] = s->t[k]->offset;
        for (int d = nd - 2; d >= 0; d--) {
            int64_t i = rem % shape[d];
            rem /= shape[d];
            for (int k = 0; k < s->n; k++) off[k] += i * stride[k][d];
        }
        fn(ud, len, off, st);
    }
}

static bool all_contig_f32(int n, const idd_tensor *const *ts) {
    for (int i = 0; i < n; i++)
        if (ts[i]->dtype != IDD_F32 || !idd_is_contiguous(ts[i])) return false;
    return true;
}

/* ------------------------------------------------------------ copy and fill */

typedef struct { const idd_tensor *dst, *src; int nan; } copy_ud;
static bool int_dtype(idd_dtype dt) { return dt == IDD_I64 || dt == IDD_U8; }
static void copy_run(void *ud, int64_t len, const int64_t *off, const int64_t *st) {
    copy_ud *c = ud;
    void *d = c->dst->storage->data;
    const void *s = c->src->storage->data;
    if (c->dst->dtype == IDD_F32 && c->src->dtype == IDD_F32) {
        float *dp = (float *)d + off[0];
        const float *sp = (const float *)s + off[1];
        if (st[0] == 1 && st[1] == 1) { memmove(dp, sp, sizeof(float) * (size_t)len); return; }
        if (st[0] == 1 && st[1] == 0) { for (int64_t i = 0; i < len; i++) dp[i] = sp[0]; return; }
        for (int64_t i = 0; i < len; i++) dp[i * st[0]] = sp[i * st[1]];
        return;
    }
    int nan = 0;
    for (int64_t i = 0; i < len; i++) {
        double v = load(s, c->src->dtype, off[1] + i * st[1]);
        nan |= v != v;
        store(d, c->dst->dtype, off[0] + i * st[0], v);
    }
    if (nan && int_dtype(c->dst->dtype)) __atomic_store_n(&c->nan, 1, __ATOMIC_RELAXED);
}

static idd_status cpu_copy(idd_tensor *dst, const idd_tensor *src) {
    if (dst->dtype == src->dtype && idd_is_contiguous(dst) && idd_is_contiguous(src)) {
        memmove(idd_data(dst), idd_data(src), (size_t)idd_numel(dst) * idd_dtype_size(dst->dtype));
        return IDD_OK;
    }
    copy_ud c = {dst, src, 0};
    /* a copy within one storage keeps its order (rows might overlap) */
    iter_set s = {2, {dst, src}, dst->storage == src->storage};
    iterate(&s, copy_run, &c);
    if (c.nan) {
        char sb[96];
        return idd_error("cast: NaN in a %s tensor of shape %s has no %s value", idd_dtype_name(src->dtype),
                         idd_shape_str(src, sb, sizeof sb), idd_dtype_name(dst->dtype));
    }
    return IDD_OK;
}

typedef struct { const idd_tensor *t; double v; } fill_ud;
static void fill_run(void *ud, int64_t len, const int64_t *off, const int64_t *st) {
    fill_ud *f = ud;
    for (int64_t i = 0; i < len; i++) store(f->t->storage->data, f->t->dtype, off[0] + i * st[0], f->v);
}

static idd_status cpu_fill(idd_tensor *t, double v) {
    if (t->dtype == IDD_F32 && idd_is_contiguous(t)) {
        float *p = idd_data(t), fv = (float)v;
        int64_t n = idd_numel(t);
        /* zero-filled gradient buffers are the common case: memset, both cores when large */
        const int64_t chunk = 16384;
        #pragma omp parallel for schedule(static) if (n > 4 * PAR_MIN)
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {
            int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
            if (fv == 0.0f && !signbit(fv)) memset(p + c0, 0, sizeof(float) * (size_t)(c1 - c0));
            else for (int64_t i = c0; i < c1; i++) p[i] = fv;
        }
        return IDD_OK;
    }
    if (v != v && int_dtype(t->dtype)) {
        char sb[96];
        return idd_error("fill: NaN has no %s value (tensor of shape %s)", idd_dtype_name(t->dtype),
                         idd_shape_str(t, sb, sizeof sb));
    }
    fill_ud f = {t, v};
    iter_set s = {1, {t}};
    iterate(&s, fill_run, &f);
    return IDD_OK;
}

/* ------------------------------------------------------------ pointwise math */

static inline double bin_apply(idd_binop op, double a, double b) {
    switch (op) {
    case IDD_BIN_ADD: return a + b;
    case IDD_BIN_SUB: return a - b;
    case IDD_BIN_MUL: return a * b;
    case IDD_BIN_DIV: return a / b;
    case IDD_BIN_POW: return pow(a, b);
    case IDD_BIN_MAX: return a > b || isnan(a) ? a : b;
    case IDD_BIN_MIN: return a < b || isnan(a) ? a : b;
    case IDD_BIN_GT: return a > b;
    case IDD_BIN_LT: return a < b;
    case IDD_BIN_GE: return a >= b;
    case IDD_BIN_LE: return a <= b;
    case IDD_BIN_EQ: return a == b;
    case IDD_BIN_NE: return a != b;
    default: return NAN;
    }
}

static inline double un_apply(idd_unop op, double x) {
    switch (op) {
    case IDD_UN_NEG: return -x;
    case IDD_UN_EXP: return exp(x);
    case IDD_UN_LOG: return log(x);
    case IDD_UN_SQRT: return sqrt(x);
    case IDD_UN_RSQRT: return 1.0 / sqrt(x);
    case IDD_UN_TANH: return tanh(x);
    case IDD_UN_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case IDD_UN_SILU: return x / (1.0 + exp(-x));
    case IDD_UN_ABS: return fabs(x);
    case IDD_UN_SQUARE: return x * x;
    case IDD_UN_SIN: return sin(x);
    case IDD_UN_COS: return cos(x);
    case IDD_UN_RECIP: return 1.0 / x;
    case IDD_UN_FLOOR: return floor(x);
    case IDD_UN_SIGN: return (x > 0) - (x < 0);
    default: return NAN;
    }
}

/* float32 contiguous fast path for the common binary ops ("simd": -O2 leaves these
 * loops scalar; vector add/sub/mul/div round exactly as the scalar ones) */
static void bin_f32(idd_binop op, int64_t n, float *o, const float *a, const float *b) {
    switch (op) {
    case IDD_BIN_ADD:
        #pragma omp parallel for simd if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] + b[i];
        break;
    case IDD_BIN_SUB:
        #pragma omp parallel for simd if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] - b[i];
        break;
    case IDD_BIN_MUL:
        #pragma omp parallel for simd if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] * b[i];
        break;
    case IDD_BIN_DIV:
        #pragma omp parallel for simd if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] / b[i];
        break;
    default:
        #pragma omp parallel for if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = (float)bin_apply(op, a[i], b[i]);
    }
}

typedef struct { idd_binop op; const idd_tensor *o, *a, *b; } bin_ud;
static void bin_run(void *ud, int64_t len, const int64_t *off, const int64_t *st) {
    bin_ud *u = ud;
    if (u->o->dtype == IDD_F32 && u->a->dtype == IDD_F32 && u->b->dtype == IDD_F32) {
        float *o = (float *)u->o->storage->data + off[0];
        const float *a = (const float *)u->a->storage->data + off[1];
        const float *b = (const float *)u->b->storage->data + off[2];
        if (st[0] == 1 && st[1] == 1 && st[2] == 1) { bin_f32(u->op, len, o, a, b); return; }
        /* a row against one broadcast value (bias of (C,1) or (N,C,1,1) over NCHW) */
        if (st[0] == 1 && (st[1] == 1 || st[1] == 0) && (st[2] == 1 || st[2] == 0) &&
            u->op <= IDD_BIN_DIV) {
            const float av = a[0], bv = b[0];
            const int sa = st[1] == 1, sb = st[2] == 1;
#define ROW(OPER)                                                                  \
    do {                                                                           \
        if (sa && !sb) for (int64_t i = 0; i < len; i++) o[i] = a[i] OPER bv;      \
        else if (!sa && sb) for (int64_t i = 0; i < len; i++) o[i] = av OPER b[i]; \
        else for (int64_t i = 0; i < len; i++) o[i] = av OPER bv;                  \
    } while (0)
            switch (u->op) {
            case IDD_BIN_ADD: ROW(+); return;
            case IDD_BIN_SUB: ROW(-); return;
            case IDD_BIN_MUL: ROW(*); return;
            case IDD_BIN_DIV: ROW(/); return;
            default: break;
            }
#undef ROW
        }
        for (int64_t i = 0; i < len; i++) o[i * st[0]] = (float)bin_apply(u->op, a[i * st[1]], b[i * st[2]]);
        return;
    }
    for (int64_t i = 0; i < len; i++) {
        double a = load(u->a->storage->data, u->a->dtype, off[1] + i * st[1]);
        double b = load(u->b->storage->data, u->b->dtype, off[2] + i * st[2]);
        store(u->o->storage->data, u->o->dtype, off[0] + i * st[0], bin_apply(u->op, a, b));
    }
}

/* one value broadcast everywhere (a 0-d tensor or a scalar expanded to a shape) */
static bool is_single_value(const idd_tensor *t) {
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] != 1 && t->stride[d] != 0) return false;
    return true;
}

/* o = a op s or o = s op a for one float32 value s, contiguous a and o */
static void bin_f32_scalar(idd_binop op, int64_t n, float *o, const float *a, float s, bool s_first) {
    switch (op) {
    case IDD_BIN_ADD:
        #pragma omp parallel for simd if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] + s;
        break;
    case IDD_BIN_MUL:
        #pragma omp parallel for simd if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] * s;
        break;
    case IDD_BIN_MAX:   /* ReLU is maximum(x, 0) */
        #pragma omp parallel for if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = a[i] > s || isnan(a[i]) ? a[i] : s;
        break;
    default:
        #pragma omp parallel for if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = (float)(s_first ? bin_apply(op, s, a[i]) : bin_apply(op, a[i], s));
    }
}

static idd_status cpu_binary(idd_binop op, idd_tensor *out, const idd_tensor *a, const idd_tensor *b) {
    const idd_tensor *ts[3] = {out, a, b};
    if (all_contig_f32(3, ts)) {
        bin_f32(op, idd_numel(out), idd_data(out), idd_data(a), idd_data(b));
        return IDD_OK;
    }
    /* tensor op scalar (x * 2, x + 1, maximum(x, 0)): no iterator */
    const idd_tensor *ta[2] = {out, a}, *tb[2] = {out, b};
    if (b->dtype == IDD_F32 && all_contig_f32(2, ta) && is_single_value(b)) {
        bin_f32_scalar(op, idd_numel(out), idd_data(out), idd_data(a), *(const float *)idd_data(b), false);
        return IDD_OK;
    }
    if (a->dtype == IDD_F32 && all_contig_f32(2, tb) && is_single_value(a)) {
        bin_f32_scalar(op, idd_numel(out), idd_data(out), idd_data(b), *(const float *)idd_data(a), true);
        return IDD_OK;
    }
    bin_ud u = {op, out, a, b};
    iter_set s = {3, {out, a, b}};
    iterate(&s, bin_run, &u);
    return IDD_OK;
}

typedef struct { idd_unop op; const idd_tensor *o, *a; double lo, hi; int kind; } un_ud;
static inline double un_kind(const un_ud *u, double x) {
    if (u->kind == 0) return un_apply(u->op, x);
    if (u->kind == 1) return x < u->lo ? u->lo : x > u->hi ? u->hi : x;   /* clamp */
    return x * u->lo + u->hi;                                              /* affine */
}
static void un_run(void *ud, int64_t len, const int64_t *off, const int64_t *st) {
    un_ud *u = ud;
    if (u->o->dtype == IDD_F32 && u->a->dtype == IDD_F32) {
        float *o = (float *)u->o->storage->data + off[0];
        const float *a = (const float *)u->a->storage->data + off[1];
        for (int64_t i = 0; i < len; i++) o[i * st[0]] = (float)un_kind(u, a[i * st[1]]);
        return;
    }
    for (int64_t i = 0; i < len; i++)
        store(u->o->storage->data, u->o->dtype, off[0] + i * st[0],
              un_kind(u, load(u->a->storage->data, u->a->dtype, off[1] + i * st[1])));
}

static idd_status un_common(un_ud *u) {
    const idd_tensor *ts[2] = {u->o, u->a};
    if (all_contig_f32(2, ts)) {
        float *o = idd_data(u->o);
        const float *a = idd_data(u->a);
        int64_t n = idd_numel(u->o);
        #pragma omp parallel for if (n > PAR_MIN)
        for (int64_t i = 0; i < n; i++) o[i] = (float)un_kind(u, a[i]);
        return IDD_OK;
    }
    iter_set s = {2, {u->o, u->a}};
    iterate(&s, un_run, u);
    return IDD_OK;
}

static idd_status cpu_unary(idd_unop op, idd_tensor *out, const idd_tensor *a) {
    un_ud u = {op, out, a, 0, 0, 0};
    return un_common(&u);
}
static idd_status cpu_clamp(idd_tensor *out, const idd_tensor *a, double lo, double hi) {
    un_ud u = {0, out, a, lo, hi, 1};
    return un_common(&u);
}
static idd_status cpu_affine(idd_tensor *out, const idd_tensor *a, double s, double b) {
    un_ud u = {0, out, a, s, b, 2};
    return un_common(&u);
}

/* ------------------------------------------------------------ reductions */

/* a is viewed as (outer, R, inner) around dim; accumulation in double */
static idd_status cpu_reduce(idd_redop op, idd_tensor *out, idd_tensor *idx, const idd_tensor *a, int dim) {
    int64_t outer = 1, R = a->ndim ? a->shape[dim] : 1, inner = 1;
    for (int d = 0; d < dim; d++) outer *= a->shape[d];
    for (int d = dim + 1; d < a->ndim; d++) inner *= a->shape[d];
    const void *ap = a->storage->data;
    int64_t total = outer * inner;
    #pragma omp parallel for if (total * R > PAR_MIN)
    for (int64_t oi = 0; oi < total; oi++) {
        int64_t o = oi / inner, in = oi % inner;
        /* element (o, r, in) -> storage offset via a's strides */
        int64_t base = a->offset, rem = o;
        for (int d = dim - 1; d >= 0; d--) { base += (rem % a->shape[d]) * a->stride[d]; rem /= a->shape[d]; }
        rem = in;
        for (int d = a->ndim - 1; d > dim; d--) { base += (rem % a->shape[d]) * a->stride[d]; rem /= a->shape[d]; }
        int64_t rs = a->ndim ? a->stride[dim] : 0;
        double acc = 0, best = 0;
        int64_t arg = 0;
        if (op == IDD_RED_SUM) {
            for (int64_t r = 0; r < R; r++) acc += load(ap, a->dtype, base + r * rs);
        } else {
            best = R ? load(ap, a->dtype, base) : (op == IDD_RED_LOGSUMEXP ? -INFINITY : NAN);
            for (int64_t r = 1; r < R; r++) {
                double v = load(ap, a->dtype, base + r * rs);
                bool better = op == IDD_RED_MIN ? v < best : v > best;
                if (better || isnan(v)) { best = v; arg = r; if (isnan(v)) break; }
            }
            acc = best;
            if (op == IDD_RED_LOGSUMEXP && isfinite(best)) {
                double s = 0;
                for (int64_t r = 0; r < R; r++) s += exp(load(ap, a->dtype, base + r * rs) - best);
                acc = best + log(s);
            }
        }
        store(out->storage->data, out->dtype, out->offset + oi, acc);
        if (idx) ((int64_t *)idx->storage->data)[idx->offset + oi] = arg;
    }
    return IDD_OK;
}

/* ------------------------------------------------------------ batched GEMM */

static idd_status cpu_bmm(idd_tensor *c, const idd_tensor *a, const idd_tensor *b, bool ta, bool tb,
                          double alpha, double beta) {
    int nd = c->ndim;
    int64_t M = c->shape[nd - 2], N = c->shape[nd - 1];
    int64_t K = ta ? a->shape[a->ndim - 2] : a->shape[a->ndim - 1];
    int64_t batch = idd_numel(c) / ((M * N) != 0 ? M * N : 1);
    int64_t lda = a->shape[a->ndim - 1], ldb = b->shape[b->ndim - 1];
    int64_t sa = a->shape[a->ndim - 1] * a->shape[a->ndim - 2], sb = b->shape[b->ndim - 1] * b->shape[b->ndim - 2];
    if (idd_numel(a) == sa) sa = 0;   /* a single matrix shared over the batch */
    if (idd_numel(b) == sb) sb = 0;
    /* a batch of at least as many products as threads: spread the products over OpenMP
     * threads with single-threaded BLAS (threaded BLAS on small products mostly waits) */
    int nt = omp_get_max_threads();
    int per_item = c->dtype == IDD_F32 && nt > 1 && batch >= nt && !omp_in_parallel();
    int blas_threads = 0;
    if (per_item) {
        blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
    }
    #pragma omp parallel for schedule(static) if (per_item)
    for (int64_t i = 0; i < batch; i++) {
        if (c->dtype == IDD_F32)
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N,
                        (int)K, (float)alpha, (const float *)idd_data(a) + i * sa, (int)lda,
                        (const float *)idd_data(b) + i * sb, (int)ldb, (float)beta, (float *)idd_data(c) + i * M * N,
                        (int)N);
        else
            cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N,
                        (int)K, alpha, (const double *)idd_data(a) + i * sa, (int)lda,
                        (const double *)idd_data(b) + i * sb, (int)ldb, beta, (double *)idd_data(c) + i * M * N,
                        (int)N);
    }
    if (per_item) openblas_set_num_threads(blas_threads);
    return IDD_OK;
}

/* ------------------------------------------------------------ random */

static idd_status cpu_rand(idd_tensor *t, uint64_t seed, uint64_t stream, uint64_t offset, bool normal) {
    int64_t n = idd_numel(t);
    void *p = idd_data(t);   /* t is freshly made: contiguous */
    #pragma omp parallel for if (n > PAR_MIN)
    for (int64_t j = 0; j < (n + 1) / 2; j++) {
        double v[2];
        if (normal) idd_philox_normal2(seed, stream, offset + (uint64_t)j, v);
        else idd_philox_uniform2(seed, stream, offset + (uint64_t)j, v);
        store(p, t->dtype, 2 * j, v[0]);
        if (2 * j + 1 < n) store(p, t->dtype, 2 * j + 1, v[1]);
    }
    return IDD_OK;
}
static idd_status cpu_rand_normal(idd_tensor *t, uint64_t s, uint64_t st, uint64_t o) { return cpu_rand(t, s, st, o, true); }
static idd_status cpu_rand_uniform(idd_tensor *t, uint64_t s, uint64_t st, uint64_t o) { return cpu_rand(t, s, st, o, false); }

/* ------------------------------------------------------------ the table */

#include "cpu_kernels.h"

/* every layer family in float32; bf16 tensors take the float32 kernels and convert */
static bool cpu_supports(idd_kernel k, idd_dtype dtype) { return dtype == IDD_F32 && (unsigned)k < IDD_K_COUNT; }

const idd_backend idd_cpu_backend = {
    .name = "cpu",
    .supports = cpu_supports,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy = cpu_copy,
    .upload = cpu_upload,
    .download = cpu_upload,
    .fill = cpu_fill,
    .binary = cpu_binary,
    .unary = cpu_unary,
    .clamp = cpu_clamp,
    .affine = cpu_affine,
    .reduce = cpu_reduce,
    .bmm = cpu_bmm,
    .rand_normal = cpu_rand_normal,
    .rand_uniform = cpu_rand_uniform,
    .conv2d_forward = idd_conv2d_forward_f32,
    .conv2d_backward = idd_conv2d_backward_f32,
    .conv2d_forward_hw = idd_conv2d_forward_hw_f32,
    .conv2d_backward_hw = idd_conv2d_backward_hw_f32,
    .maxpool2d_forward = idd_maxpool2d_forward_f32,
    .avgpool2d_forward = idd_avgpool2d_forward_f32,
    .resize_bilinear = idd_resize_bilinear_f32,
    .groupnorm_forward = idd_groupnorm_forward_f32,
    .groupnorm_backward = idd_groupnorm_backward_f32,
    .attention_forward = idd_attention_forward_f32,
    .attention_backward = idd_attention_backward_f32,
    .upsample2x_forward = idd_upsample2x_forward_f32,
    .upsample2x_backward = idd_upsample2x_backward_f32,
    .avgpool2x_forward = idd_avgpool2x_forward_f32,
    .avgpool2x_backward = idd_avgpool2x_backward_f32,
    .timestep_embedding = idd_timestep_embedding_f32,
    .dropout_forward = idd_dropout_forward_f32,
    .dropout_backward = idd_dropout_backward_f32,
    .upload_async = idd_cpu_upload_async,
    .diff_pointwise = idd_cpu_diff_pointwise,
    .diff_p_finish = idd_cpu_diff_p_finish,
    .diff_losses = idd_cpu_diff_losses,
    .diff_losses_backward = idd_cpu_diff_losses_backward,
    .adamw = idd_cpu_adamw,
    .ema = idd_cpu_ema,
    .sumsq = idd_cpu_sumsq,
    .scale = idd_cpu_scale,
};
