/* test_core.c — the core tensor ops of include/iddpm/{tensor,ops,autograd,backend}.h
 * against naive loops written here, and the C gradcheck.
 *
 * Every op runs on float32 and float64 inputs in five memory layouts of the same logical
 * tensor: contiguous, permuted (all dims reversed in storage), narrowed (an interior
 * window of a larger tensor, non-zero offset), permuted+narrowed, and expanded (one dim
 * of size 1 broadcast with stride 0). The references read elements through their own
 * index arithmetic (rd / rd_bcast below), compute in double and, for float32 results,
 * round once to float32. Then idd_gradcheck (engine/core/autograd.c) on composed
 * float64 functions, and on a test-only op with a deliberately wrong backward that it
 * must flag.
 *
 * Tolerances (relative; U32 = 2^-24 and U64 = 2^-53 are the unit roundoffs):
 *   TOL_EXACT 0         moves, views, copies, concat, index_select, comparisons,
 *                       max/min/clamp/floor/sign/abs/neg: no arithmetic, bit-identical
 *   TOL_F32   16 U32    float32 results of a few float32 roundings (the kernel rounds a
 *                       double result once; var is 5 chained float32 ops) and libm's last
 *                       ulp: 16 ulps is ~3x the worst chain
 *   TOL_F64   1024 U64  float64: libm ulps and summation order over <= 210 terms
 *   matmul    K U       measured against sum_k |a_ik b_kj|: the classical gamma_K bound
 *                       for K products accumulated in any order (OpenBLAS blocks and FMAs)
 *   GC_TOL    1e-6      gradcheck in float64 with step GC_EPS 1e-6: central-difference
 *                       truncation ~eps^2 |f'''| ~ 1e-12, rounding ~1e-16 |f| / eps ~ 1e-9;
 *                       a wrong backward term is off by O(1)
 * Run: build/release/tests/test_core [seed] (the seed is printed). */
#include "iddpm/ops.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define U32 (1.0 / 16777216.0)
#define U64 (1.0 / 9007199254740992.0)
#define TOL_EXACT 0.0
#define TOL_F32 (16 * U32)
#define TOL_F64 (1024 * U64)
#define GC_EPS 1e-6
#define GC_TOL 1e-6
/* the wrong backward is off by a factor 2/3: its gradcheck error is ~1/3 of |grad|, so
 * anything above 1e-2 is a clear flag (a correct op stays below GC_TOL) */
#define GC_FLAG 1e-2

static double tol_of(idd_dtype dt) { return dt == IDD_F32 ? TOL_F32 : TOL_F64; }

/* ---- random numbers (splitmix64) ------------------------------------------------- */
static uint64_t rng_state;
static double urand(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

/* value distributions */
enum { V_ANY, V_POS, V_AWAY, V_WIDE };
static double draw(int kind) {
    double u = urand();
    switch (kind) {
    case V_POS: return 0.1 + 2.9 * u;                                   /* log, sqrt, pow base */
    case V_AWAY: return (0.5 + 1.5 * u) * (urand() < 0.5 ? -1 : 1);    /* divisors */
    case V_WIDE: return -300 + 600 * u;                                  /* integer/uint8 casts */
    default: return -3 + 6 * u;
    }
}

/* ---- naive element access ------------------------------------------------------- */
static double rd_off(const idd_tensor *t, int64_t off) {
    const void *p = t->storage->data;
    switch (t->dtype) {
    case IDD_F32: return ((const float *)p)[off];
    case IDD_F64: return ((const double *)p)[off];
    case IDD_I64: return (double)((const int64_t *)p)[off];
    default: return ((const uint8_t *)p)[off];
    }
}
/* element at multi-index idx of t */
static double rd_md(const idd_tensor *t, const int64_t *idx) {
    int64_t off = t->offset;
    for (int d = 0; d < t->ndim; d++) off += idx[d] * t->stride[d];
    return rd_off(t, off);
}
/* row-major flat index -> multi-index over shape */
static void unravel(int64_t i, int nd, const int64_t *shape, int64_t *idx) {
    for (int d = nd - 1; d >= 0; d--) { idx[d] = shape[d] ? i % shape[d] : 0; i = shape[d] ? i / shape[d] : 0; }
}
static double rd(const idd_tensor *t, int64_t i) {
    int64_t idx[IDD_MAX_DIMS];
    unravel(i, t->ndim, t->shape, idx);
    return rd_md(t, idx);
}
/* element of t broadcast to an out index of nd dims (right-aligned, size-1 dims -> 0) */
static double rd_bcast(const idd_tensor *t, int nd, const int64_t *oidx) {
    int64_t idx[IDD_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) {
        int od = d + nd - t->ndim;
        idx[d] = t->shape[d] == 1 ? 0 : oidx[od];
    }
    return rd_md(t, idx);
}
static double round_to(idd_dtype dt, double v) { return dt == IDD_F32 ? (double)(float)v : v; }

/* ---- inputs in five layouts -------------------------------------------------------- */
enum { L_CONTIG, L_PERM, L_NARROW, L_PERM_NARROW, L_EXPAND, L_COUNT };
static const char *layout_name[L_COUNT] = {"contiguous", "permuted", "narrowed", "permuted+narrowed", "expanded"};

static void fill_random(idd_tensor *t, int kind) {   /* every storage element */
    int64_t n = (int64_t)(t->storage->nbytes / idd_dtype_size(t->dtype));
    for (int64_t i = 0; i < n; i++) {
        double v = draw(kind);
        if (t->dtype == IDD_F32) ((float *)t->storage->data)[i] = (float)v;
        else ((double *)t->storage->data)[i] = v;
    }
}

/* a tensor of logical shape `shape` in layout L, random values of `kind` */
static idd_tensor *make(int L, idd_dtype dt, int nd, const int64_t *shape, int kind) {
    int64_t bs[IDD_MAX_DIMS] = {0};
    int perm[IDD_MAX_DIMS] = {0};
    idd_tensor *base, *v, *w;
    if (nd == 0) L = L_CONTIG;
    if (L == L_EXPAND) {   /* the first dim of size > 1 is stored once (stride 0) */
        int e = -1;
        for (int d = 0; d < nd && e < 0; d++) if (shape[d] > 1) e = d;
        if (e < 0) L = L_CONTIG;
        else {
            memcpy(bs, shape, sizeof(int64_t) * nd);
            bs[e] = 1;
            base = idd_tensor_new(dt, IDD_CPU, nd, bs);
            fill_random(base, kind);
            v = idd_view_expand(base, nd, shape);
            idd_tensor_release(base);
            return v;
        }
    }
    bool perm_on = L == L_PERM || L == L_PERM_NARROW, narrow_on = L == L_NARROW || L == L_PERM_NARROW;
    /* storage order: reversed dims when permuted; 3 extra elements per dim when narrowed */
    for (int d = 0; d < nd; d++) {
        int src = perm_on ? nd - 1 - d : d;
        bs[d] = shape[src] + (narrow_on ? 3 : 0);
        perm[d] = nd - 1 - d;
    }
    base = idd_tensor_new(dt, IDD_CPU, nd, bs);
    fill_random(base, kind);
    v = base;
    if (narrow_on) {
        for (int d = 0; d < nd; d++) {
            w = idd_view_narrow(v, d, 1 + d % 2, bs[d] - 3);
            idd_tensor_release(v);
            v = w;
        }
    }
    if (perm_on) {
        w = idd_view_permute(v, perm);
        idd_tensor_release(v);
        v = w;
    }
    return v;
}

static bool shape_is(const idd_tensor *t, int nd, const int64_t *s) {
    if (!t || t->ndim != nd) return false;
    for (int i = 0; i < nd; i++) if (t->shape[i] != s[i]) return false;
    return true;
}

/* |got - want| / max(scale, tiny), NaN == NaN; scale <= 0 means |want| */
static double err_of(double got, double want, double scale) {
    if (isnan(got) && isnan(want)) return 0;
    if (got == want) return 0;
    double s = scale > 0 ? scale : fabs(want);
    return fabs(got - want) / (s > 1e-300 ? s : 1e-300);
}

/* a running worst per check */
typedef struct { double worst; char where[160]; bool bad_shape; } worst_t;
static void note(worst_t *w, double e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(worst_t *w, double e, const char *fmt, ...) {
    if (!(e <= w->worst)) {
        w->worst = isnan(e) ? INFINITY : e;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->where, sizeof w->where, fmt, ap);
        va_end(ap);
    }
}
static void report(const char *name, worst_t *w, double tol) {
    char buf[320];
    if (w->bad_shape) snprintf(buf, sizeof buf, "wrong shape/dtype or NULL result (%s): %s", w->where, idd_last_error());
    else snprintf(buf, sizeof buf, "worst %.3g > tol %.3g at %s", w->worst, tol, w->where);
    check_report(!w->bad_shape && w->worst <= tol, name, buf);
    printf("#   %-58s worst %.3g (tol %.3g)\n", name, w->worst, tol);
}

static const idd_dtype DTS[2] = {IDD_F32, IDD_F64};

/* ---- binary ops with broadcasting ----------------------------------------------- */
static double naive_bin(idd_binop op, double a, double b) {
    switch (op) {
    case IDD_BIN_ADD: return a + b;
    case IDD_BIN_SUB: return a - b;
    case IDD_BIN_MUL: return a * b;
    case IDD_BIN_DIV: return a / b;
    case IDD_BIN_POW: return pow(a, b);
    case IDD_BIN_MAX: return a > b ? a : b;
    case IDD_BIN_MIN: return a < b ? a : b;
    case IDD_BIN_GT: return a > b;
    case IDD_BIN_LT: return a < b;
    case IDD_BIN_GE: return a >= b;
    case IDD_BIN_LE: return a <= b;
    case IDD_BIN_EQ: return a == b;
    case IDD_BIN_NE: return a != b;
    default: return NAN;
    }
}

static void test_binary(void) {
    struct { int na; int64_t a[4]; int nb; int64_t b[4]; int no; int64_t o[4]; } cases[] = {
        {3, {3, 1, 5}, 2, {4, 5}, 3, {3, 4, 5}},
        {3, {2, 3, 4}, 3, {2, 3, 4}, 3, {2, 3, 4}},
        {2, {4, 1}, 3, {2, 1, 3}, 3, {2, 4, 3}},
        {0, {0}, 2, {3, 2}, 2, {3, 2}},            /* 0-d with a matrix */
        {4, {2, 1, 3, 1}, 2, {1, 5}, 4, {2, 1, 3, 5}},   /* size-1 dims on both sides */
    };
    const int dtpairs[3][2] = {{IDD_F32, IDD_F32}, {IDD_F64, IDD_F64}, {IDD_F32, IDD_F64}};
    for (int op = 0; op < IDD_BIN_COUNT; op++) {
        bool exact = op >= IDD_BIN_MAX;   /* max/min and the comparisons do no arithmetic */
        for (int dp = 0; dp < 3; dp++) {
            worst_t w = {0};
            idd_dtype da = dtpairs[dp][0], db = dtpairs[dp][1], dout = da == IDD_F64 || db == IDD_F64 ? IDD_F64 : IDD_F32;
            for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
                for (int la = 0; la < L_COUNT; la++)
                    for (int lb = 0; lb < L_COUNT; lb++) {
                        int ka = op == IDD_BIN_POW ? V_POS : V_ANY, kb = op == IDD_BIN_DIV ? V_AWAY : V_ANY;
                        idd_tensor *a = make(la, da, cases[c].na, cases[c].a, ka);
                        idd_tensor *b = make(lb, db, cases[c].nb, cases[c].b, kb);
                        /* equal operands, so comparisons and max/min also see ties */
                        if (exact && idd_same_shape(a, b) && la == L_CONTIG && lb == L_CONTIG) idd_copy_(b, a);
                        idd_tensor *o = idd_binary((idd_binop)op, a, b);
                        if (!shape_is(o, cases[c].no, cases[c].o) || o->dtype != dout) {
                            w.bad_shape = true;
                            snprintf(w.where, sizeof w.where, "case %zu", c);
                        } else {
                            int64_t n = idd_numel(o), idx[IDD_MAX_DIMS];
                            for (int64_t i = 0; i < n; i++) {
                                unravel(i, o->ndim, o->shape, idx);
                                double want = round_to(dout, naive_bin((idd_binop)op, rd_bcast(a, o->ndim, idx), rd_bcast(b, o->ndim, idx)));
                                note(&w, err_of(rd(o, i), want, 0), "case %zu %s/%s elem %lld", c, layout_name[la],
                                     layout_name[lb], (long long)i);
                            }
                        }
                        idd_tensor_release(a);
                        idd_tensor_release(b);
                        idd_tensor_release(o);
                    }
            char name[128];
            snprintf(name, sizeof name, "binary %s %s,%s (broadcast, 5x5 layouts)", idd_binop_name((idd_binop)op),
                     idd_dtype_name(da), idd_dtype_name(db));
            report(name, &w, exact ? TOL_EXACT : tol_of(dout));
        }
    }
    /* non-broadcasting shapes fail with a message */
    int64_t s1[2] = {3, 4}, s2[2] = {2, 4};
    idd_tensor *a = make(L_CONTIG, IDD_F32, 2, s1, V_ANY), *b = make(L_CONTIG, IDD_F32, 2, s2, V_ANY);
    idd_tensor *o = idd_binary(IDD_BIN_ADD, a, b);
    check_report(!o && strstr(idd_last_error(), "do not broadcast"), "binary: (3,4)+(2,4) fails with a message", idd_last_error());
    idd_tensor_release(a);
    idd_tensor_release(b);
    idd_tensor_release(o);
}

/* ---- unary ops, clamp, affine ---------------------------------------------------- */
static double naive_un(idd_unop op, double x) {
    switch (op) {
    case IDD_UN_NEG: return -x;
    case IDD_UN_EXP: return exp(x);
    case IDD_UN_LOG: return log(x);
    case IDD_UN_SQRT: return sqrt(x);
    case IDD_UN_RSQRT: return 1 / sqrt(x);
    case IDD_UN_TANH: return tanh(x);
    case IDD_UN_SIGMOID: return 1 / (1 + exp(-x));
    case IDD_UN_SILU: return x / (1 + exp(-x));
    case IDD_UN_ABS: return fabs(x);
    case IDD_UN_SQUARE: return x * x;
    case IDD_UN_SIN: return sin(x);
    case IDD_UN_COS: return cos(x);
    case IDD_UN_RECIP: return 1 / x;
    case IDD_UN_FLOOR: return floor(x);
    case IDD_UN_SIGN: return x > 0 ? 1 : x < 0 ? -1 : 0;
    default: return NAN;
    }
}

/* op < 0: clamp (-1) or affine (-2) */
static void test_unary_one(int op, idd_dtype dt) {
    const int64_t shapes[2][3] = {{3, 4, 5}, {6, 1, 7}};
    const double lo = -0.5, hi = 0.7, sc = 1.7, sh = -0.3;
    worst_t w = {0};
    bool exact = op == -1 || op == IDD_UN_NEG || op == IDD_UN_ABS || op == IDD_UN_FLOOR || op == IDD_UN_SIGN;
    int kind = op == IDD_UN_LOG || op == IDD_UN_SQRT || op == IDD_UN_RSQRT ? V_POS : op == IDD_UN_RECIP ? V_AWAY : V_ANY;
    for (int s = 0; s < 2; s++)
        for (int L = 0; L < L_COUNT; L++) {
            idd_tensor *a = make(L, dt, 3, shapes[s], kind);
            idd_tensor *o = op == -1 ? idd_clamp(a, lo, hi) : op == -2 ? idd_affine(a, sc, sh) : idd_unary((idd_unop)op, a);
            if (!shape_is(o, 3, shapes[s]) || o->dtype != dt) {
                w.bad_shape = true;
                snprintf(w.where, sizeof w.where, "%s", layout_name[L]);
            } else {
                for (int64_t i = 0; i < idd_numel(o); i++) {
                    double x = rd(a, i);
                    double want = op == -1 ? (x < lo ? lo : x > hi ? hi : x) : op == -2 ? x * sc + sh : naive_un((idd_unop)op, x);
                    note(&w, err_of(rd(o, i), round_to(dt, want), 0), "%s elem %lld (x=%.9g)", layout_name[L], (long long)i, x);
                }
            }
            idd_tensor_release(a);
            idd_tensor_release(o);
        }
    char name[128];
    snprintf(name, sizeof name, "%s %s (5 layouts)", op == -1 ? "clamp" : op == -2 ? "affine" : idd_unop_name((idd_unop)op),
             idd_dtype_name(dt));
    report(name, &w, exact ? TOL_EXACT : tol_of(dt));
}

static void test_unary(void) {
    for (int k = 0; k < 2; k++) {
        for (int op = 0; op < IDD_UN_COUNT; op++) test_unary_one(op, DTS[k]);
        test_unary_one(-1, DTS[k]);
        test_unary_one(-2, DTS[k]);
    }
}

/* ---- reductions along every dim --------------------------------------------------- */
enum { R_SUM, R_MEAN, R_MAX, R_MIN, R_LSE, R_VAR, R_VAR_BIASED, R_COUNT };
static const char *red_name[R_COUNT] = {"sum", "mean", "max+argmax", "min+argmin", "logsumexp", "var (unbiased)", "var (biased)"};

static void test_reduce_one(int r, idd_dtype dt) {
    const int64_t shapes[2][3] = {{4, 5, 6}, {3, 1, 7}};
    const int dims[5] = {0, 1, 2, -1, IDD_ALL_DIMS};
    worst_t w = {0}, wi = {0};
    bool has_arg = r == R_MAX || r == R_MIN;
    for (int s = 0; s < 2; s++)
        for (int L = 0; L < L_COUNT; L++)
            for (int di = 0; di < 5; di++)
                for (int keep = 0; keep < 2; keep++) {
                    idd_tensor *a = make(L, dt, 3, shapes[s], V_ANY), *arg = NULL;
                    int dim = dims[di];
                    idd_tensor *o = r == R_SUM ? idd_sum(a, dim, keep)
                                  : r == R_MEAN ? idd_mean(a, dim, keep)
                                  : r == R_MAX ? idd_max(a, dim, keep, &arg)
                                  : r == R_MIN ? idd_min(a, dim, keep, &arg)
                                  : r == R_LSE ? idd_logsumexp(a, dim, keep)
                                               : idd_var(a, dim, keep, r == R_VAR);
                    /* expected shape: all dims -> () or (1); else drop or keep dim d */
                    int64_t es[3], nes = 0;
                    int d = dim < 0 && dim != IDD_ALL_DIMS ? dim + 3 : dim;
                    if (dim == IDD_ALL_DIMS) { if (keep) es[nes++] = 1; }
                    else for (int i = 0; i < 3; i++) { if (i != d) es[nes++] = shapes[s][i]; else if (keep) es[nes++] = 1; }
                    char where[96];
                    snprintf(where, sizeof where, "shape %d %s dim %d keepdim %d", s, layout_name[L], dim, keep);
                    if (!shape_is(o, (int)nes, es) || o->dtype != dt || (has_arg && (!shape_is(arg, (int)nes, es) || arg->dtype != IDD_I64))) {
                        w.bad_shape = true;
                        snprintf(w.where, sizeof w.where, "%s", where);
                    } else {
                        /* outer index over the kept dims; the reduced dims are walked naively */
                        int64_t n = idd_numel(o), R = dim == IDD_ALL_DIMS ? idd_numel(a) : shapes[s][d];
                        for (int64_t i = 0; i < n; i++) {
                            int64_t base[3] = {0, 0, 0};
                            if (dim != IDD_ALL_DIMS) {   /* i enumerates the dims other than d */
                                int64_t rem = i;
                                for (int k = 2; k >= 0; k--) if (k != d) { base[k] = rem % shapes[s][k]; rem /= shapes[s][k]; }
                            }
                            double *x = malloc(sizeof(double) * (size_t)R), sum = 0, sabs = 0, best = 0;
                            int64_t barg = 0;
                            for (int64_t j = 0; j < R; j++) {
                                int64_t idx[3] = {base[0], base[1], base[2]};
                                if (dim == IDD_ALL_DIMS) unravel(j, 3, shapes[s], idx); else idx[d] = j;
                                x[j] = rd_md(a, idx);
                                sum += x[j];
                                sabs += fabs(x[j]);
                                if (j == 0 || (r == R_MIN ? x[j] < best : x[j] > best)) { best = x[j]; barg = j; }
                            }
                            double want, scale = 0;
                            if (r == R_SUM) { want = sum; scale = sabs; }
                            else if (r == R_MEAN) { want = sum / R; scale = sabs / R; }
                            else if (r == R_MAX || r == R_MIN) want = best;
                            else if (r == R_LSE) {
                                double m = x[0], e = 0;
                                for (int64_t j = 1; j < R; j++) m = x[j] > m ? x[j] : m;
                                for (int64_t j = 0; j < R; j++) e += exp(x[j] - m);
                                want = m + log(e);
                                scale = fmax(fabs(want), fabs(m));
                            } else {
                                double m = sum / R, q = 0, sq = 0;
                                for (int64_t j = 0; j < R; j++) { q += (x[j] - m) * (x[j] - m); sq += x[j] * x[j]; }
                                want = q / (r == R_VAR ? R - 1 : R);   /* R - 1 == 0 gives NaN, as in PyTorch */
                                /* constant data (an expanded dim) has variance 0 exactly; the op's
                                 * rounded mean is off by delta <= u|x|, leaving delta^2 <= u^2 x^2:
                                 * judge against u * mean(x^2), the rounding scale of the data */
                                scale = fmax(fabs(want), (dt == IDD_F32 ? U32 : U64) * sq / R);
                            }
                            note(&w, err_of(rd(o, i), round_to(dt, want), scale), "%s out %lld", where, (long long)i);
                            if (has_arg) note(&wi, rd(arg, i) == (double)barg ? 0 : 1, "%s out %lld: arg %g vs %lld", where,
                                              (long long)i, rd(arg, i), (long long)barg);
                            free(x);
                        }
                    }
                    idd_tensor_release(a);
                    idd_tensor_release(o);
                    idd_tensor_release(arg);
                }
    char name[128];
    snprintf(name, sizeof name, "%s %s (every dim, keepdim, 5 layouts)", red_name[r], idd_dtype_name(dt));
    report(name, &w, has_arg ? TOL_EXACT : tol_of(dt));
    if (has_arg) {
        snprintf(name, sizeof name, "%s %s: index of the first extremum (ties in expanded dims)", red_name[r], idd_dtype_name(dt));
        report(name, &wi, TOL_EXACT);
    }
}

static void test_reduce(void) {
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < R_COUNT; r++) test_reduce_one(r, DTS[k]);
}

/* ---- matmul ----------------------------------------------------------------------- */
static void test_matmul(void) {
    struct { const char *what; int na; int64_t a[4]; int nb; int64_t b[4]; int no; int64_t o[4]; } cases[] = {
        {"(M,K)@(K,N)", 2, {5, 7}, 2, {7, 3}, 2, {5, 3}},
        {"batched (B,M,K)@(B,K,N)", 3, {4, 5, 6}, 3, {4, 6, 3}, 3, {4, 5, 3}},
        {"shared B: (B,M,K)@(K,N)", 3, {4, 5, 6}, 2, {6, 3}, 3, {4, 5, 3}},
        {"shared A: (M,K)@(B,K,N)", 2, {5, 33}, 3, {4, 33, 3}, 3, {4, 5, 3}},
        {"broadcast batch (2,1,M,K)@(3,K,N)", 4, {2, 1, 5, 6}, 3, {3, 6, 4}, 4, {2, 3, 5, 4}},
        {"broadcast batch (1,M,K)@(3,K,N)", 3, {1, 5, 6}, 3, {3, 6, 2}, 3, {3, 5, 2}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int k = 0; k < 2; k++) {
            idd_dtype dt = DTS[k];
            worst_t w = {0};
            int64_t K = cases[c].a[cases[c].na - 1];
            for (int la = 0; la < L_COUNT; la++)
                for (int lb = 0; lb < L_COUNT; lb++) {
                    idd_tensor *a = make(la, dt, cases[c].na, cases[c].a, V_ANY);
                    idd_tensor *b = make(lb, dt, cases[c].nb, cases[c].b, V_ANY);
                    idd_tensor *o = idd_matmul(a, b);
                    if (!shape_is(o, cases[c].no, cases[c].o) || o->dtype != dt) {
                        w.bad_shape = true;
                        snprintf(w.where, sizeof w.where, "%s/%s", layout_name[la], layout_name[lb]);
                    } else {
                        int no = o->ndim;
                        int64_t idx[IDD_MAX_DIMS], ia[IDD_MAX_DIMS], ib[IDD_MAX_DIMS];
                        for (int64_t i = 0; i < idd_numel(o); i++) {
                            unravel(i, no, o->shape, idx);
                            double s = 0, sabs = 0;
                            for (int64_t kk = 0; kk < K; kk++) {
                                /* batch dims right-aligned and broadcast; then (m,k) and (k,n) */
                                for (int d = 0; d < a->ndim - 2; d++) { int od = d + (no - a->ndim); ia[d] = a->shape[d] == 1 ? 0 : idx[od]; }
                                for (int d = 0; d < b->ndim - 2; d++) { int od = d + (no - b->ndim); ib[d] = b->shape[d] == 1 ? 0 : idx[od]; }
                                ia[a->ndim - 2] = idx[no - 2]; ia[a->ndim - 1] = kk;
                                ib[b->ndim - 2] = kk; ib[b->ndim - 1] = idx[no - 1];
                                double p = rd_md(a, ia) * rd_md(b, ib);
                                s += p;
                                sabs += fabs(p);
                            }
                            note(&w, err_of(rd(o, i), s, sabs), "%s/%s elem %lld", layout_name[la], layout_name[lb], (long long)i);
                        }
                    }
                    idd_tensor_release(a);
                    idd_tensor_release(b);
                    idd_tensor_release(o);
                }
            char name[160];
            snprintf(name, sizeof name, "matmul %s %s (5x5 layouts)", cases[c].what, idd_dtype_name(dt));
            report(name, &w, (double)K * (dt == IDD_F32 ? U32 : U64));
        }
    /* linear: x (N,in) w (out,in) b (out) */
    for (int k = 0; k < 2; k++) {
        idd_dtype dt = DTS[k];
        worst_t w = {0};
        int64_t sx[2] = {4, 9}, sw[2] = {5, 9}, sb[1] = {5};
        for (int L = 0; L < L_COUNT; L++) {
            idd_tensor *x = make(L, dt, 2, sx, V_ANY), *wt = make((L + 1) % L_COUNT, dt, 2, sw, V_ANY);
            idd_tensor *b = make(L_CONTIG, dt, 1, sb, V_ANY), *o = idd_linear(x, wt, b);
            int64_t so[2] = {4, 5};
            if (!shape_is(o, 2, so)) { w.bad_shape = true; snprintf(w.where, sizeof w.where, "%s", layout_name[L]); }
            else
                for (int64_t n = 0; n < 4; n++)
                    for (int64_t j = 0; j < 5; j++) {
                        double s = rd(b, j), sabs = fabs(s);
                        for (int64_t q = 0; q < 9; q++) {
                            int64_t i1[2] = {n, q}, i2[2] = {j, q};
                            double p = rd_md(x, i1) * rd_md(wt, i2);
                            s += p;
                            sabs += fabs(p);
                        }
                        int64_t io[2] = {n, j};
                        note(&w, err_of(rd_md(o, io), s, sabs), "%s (%lld,%lld)", layout_name[L], (long long)n, (long long)j);
                    }
            idd_tensor_release(x);
            idd_tensor_release(wt);
            idd_tensor_release(b);
            idd_tensor_release(o);
        }
        char name[96];
        snprintf(name, sizeof name, "linear x W^T + b %s (5 layouts)", idd_dtype_name(dt));
        report(name, &w, 10 * (dt == IDD_F32 ? U32 : U64));   /* 9 products + bias: gamma_10 */
    }
    int64_t s1[2] = {3, 4}, s2[2] = {5, 2};
    idd_tensor *a = make(L_CONTIG, IDD_F32, 2, s1, V_ANY), *b = make(L_CONTIG, IDD_F32, 2, s2, V_ANY), *o = idd_matmul(a, b);
    check_report(!o && strstr(idd_last_error(), "inner dims"), "matmul (3,4)@(5,2) fails with a message", idd_last_error());
    idd_tensor_release(a); idd_tensor_release(b); idd_tensor_release(o);
}

/* ---- concat ------------------------------------------------------------------------ */
static void test_concat(void) {
    const idd_dtype combos[3][3] = {{IDD_F32, IDD_F32, IDD_F32}, {IDD_F64, IDD_F64, IDD_F64}, {IDD_F32, IDD_F64, IDD_F32}};
    const int dims[4] = {0, 1, 2, -1};
    for (int c = 0; c < 3; c++) {
        worst_t w = {0};
        idd_dtype dout = c == 0 ? IDD_F32 : IDD_F64;
        for (int di = 0; di < 4; di++)
            for (int L = 0; L < L_COUNT; L++) {
                int d = dims[di] < 0 ? dims[di] + 3 : dims[di];
                idd_tensor *ts[3];
                int64_t os[3] = {2, 3, 4};
                os[d] = 0;
                for (int k = 0; k < 3; k++) {
                    int64_t s[3] = {2, 3, 4};
                    s[d] = k + 1;
                    os[d] += k + 1;
                    ts[k] = make((L + k) % L_COUNT, combos[c][k], 3, s, V_ANY);   /* three different layouts */
                }
                idd_tensor *o = idd_concat(3, ts, dims[di]);
                if (!shape_is(o, 3, os) || o->dtype != dout) {
                    w.bad_shape = true;
                    snprintf(w.where, sizeof w.where, "dim %d", dims[di]);
                } else {
                    int64_t idx[3];
                    for (int64_t i = 0; i < idd_numel(o); i++) {
                        unravel(i, 3, os, idx);
                        int k = 0;
                        int64_t j = idx[d];
                        while (j >= ts[k]->shape[d]) j -= ts[k++]->shape[d];
                        idx[d] = j;
                        note(&w, err_of(rd(o, i), round_to(dout, rd_md(ts[k], idx)), 0), "dim %d layouts from %s elem %lld",
                             dims[di], layout_name[L], (long long)i);
                    }
                }
                for (int k = 0; k < 3; k++) idd_tensor_release(ts[k]);
                idd_tensor_release(o);
            }
        char name[96];
        snprintf(name, sizeof name, "concat of %s,%s,%s along every dim (mixed layouts)", idd_dtype_name(combos[c][0]),
                 idd_dtype_name(combos[c][1]), idd_dtype_name(combos[c][2]));
        report(name, &w, TOL_EXACT);
    }
}

/* ---- views, contiguous, copies between dtypes ---------------------------------------- */
static void test_views(void) {
    int64_t bs[3] = {4, 5, 6};
    for (int k = 0; k < 2; k++) {
        idd_dtype dt = DTS[k];
        idd_tensor *base = make(L_CONTIG, dt, 3, bs, V_ANY);
        #define B(i, j, l) rd_off(base, ((i) * 5 + (j)) * 6 + (l))
        /* v1 = permute(base, (2,0,1)) (6,4,5); v2 = narrow(v1, 2, 1, 3) (6,4,3);
         * v3 = narrow(v2, 0, 2, 1) (1,4,3); v4 = expand(v3, (2,5,4,3)) */
        int perm[3] = {2, 0, 1};
        idd_tensor *v1 = idd_permute(base, 3, perm), *v2 = idd_narrow(v1, 2, 1, 3), *v3 = idd_narrow(v2, 0, 2, 1);
        int64_t es[4] = {2, 5, 4, 3};
        idd_tensor *v4 = idd_expand(v3, 4, es);
        worst_t w = {0};
        int64_t s1[3] = {6, 4, 5}, s2[3] = {6, 4, 3}, s3[3] = {1, 4, 3};
        if (!shape_is(v1, 3, s1) || !shape_is(v2, 3, s2) || !shape_is(v3, 3, s3) || !shape_is(v4, 4, es)) {
            w.bad_shape = true;
            snprintf(w.where, sizeof w.where, "view shapes");
        } else {
            for (int64_t a = 0; a < 6; a++) for (int64_t b = 0; b < 4; b++) for (int64_t c = 0; c < 5; c++) {
                int64_t i[3] = {a, b, c};
                note(&w, err_of(rd_md(v1, i), B(b, c, a), 0), "permute (%lld,%lld,%lld)", (long long)a, (long long)b, (long long)c);
                if (c < 3) note(&w, err_of(rd_md(v2, i), B(b, c + 1, a), 0), "narrow (%lld,%lld,%lld)", (long long)a, (long long)b, (long long)c);
            }
            for (int64_t n = 0; n < 2; n++) for (int64_t m = 0; m < 5; m++) for (int64_t b = 0; b < 4; b++) for (int64_t c = 0; c < 3; c++) {
                int64_t i[4] = {n, m, b, c};
                note(&w, err_of(rd_md(v4, i), B(b, c + 1, 2), 0), "expand (%lld,%lld,%lld,%lld)", (long long)n, (long long)m,
                     (long long)b, (long long)c);
            }
        }
        char name[128];
        snprintf(name, sizeof name, "permute/narrow/expand views index the base %s", idd_dtype_name(dt));
        report(name, &w, TOL_EXACT);
        check_report(v1 && v4 && v1->storage == base->storage && v4->storage == base->storage && !idd_is_contiguous(v1),
                     "views share the base's storage", NULL);

        /* contiguous and every dtype conversion of each view */
        idd_tensor *views[4] = {v1, v2, v3, v4};
        const idd_dtype targets[4] = {IDD_F32, IDD_F64, IDD_I64, IDD_U8};
        for (int t = 0; t < 4; t++) {
            worst_t wc = {0};
            for (int v = 0; v < 4; v++) {
                if (!views[v]) continue;
                /* wide values so the integer casts truncate and uint8 saturates */
                idd_tensor *wide = make(L_CONTIG, dt, 3, bs, V_WIDE);
                idd_copy_(base, wide);
                idd_tensor_release(wide);
                idd_tensor *c = targets[t] == dt ? idd_contiguous(views[v]) : idd_to_dtype(views[v], targets[t]);
                if (!c || !idd_is_contiguous(c) || c->dtype != targets[t] || !idd_same_shape(c, views[v])) {
                    wc.bad_shape = true;
                    snprintf(wc.where, sizeof wc.where, "view %d", v + 1);
                } else {
                    for (int64_t i = 0; i < idd_numel(c); i++) {
                        double x = rd(views[v], i), want;
                        switch (targets[t]) {
                        case IDD_F32: want = (float)x; break;
                        case IDD_F64: want = x; break;
                        case IDD_I64: want = (double)(int64_t)x; break;   /* C conversion: toward zero */
                        default: want = x < 0 ? 0 : x > 255 ? 255 : (double)(uint8_t)x;   /* saturating */
                        }
                        /* read c as plain contiguous memory, not through strides */
                        note(&wc, err_of(rd_off(c, c->offset + i), want, 0), "view %d elem %lld (%.9g)", v + 1, (long long)i, x);
                    }
                }
                idd_tensor_release(c);
            }
            snprintf(name, sizeof name, "%s of strided %s views -> contiguous %s", targets[t] == dt ? "contiguous" : "to_dtype",
                     idd_dtype_name(dt), idd_dtype_name(targets[t]));
            report(name, &wc, TOL_EXACT);
        }

        /* copy_ from a strided view of the other float dtype into a permuted view of a
         * sentinel-filled tensor: the window gets the values, the rest stays */
        idd_dtype other = dt == IDD_F32 ? IDD_F64 : IDD_F32;
        int64_t ds[3] = {5, 6, 4};
        idd_tensor *dbase = idd_tensor_new(other, IDD_CPU, 3, ds);
        idd_fill_(dbase, 42.0);
        int dperm[3] = {2, 0, 1};   /* (4,5,6) */
        idd_tensor *dv = idd_view_permute(dbase, dperm), *dwin = idd_view_narrow(dv, 1, 1, 3);   /* (4,3,6) */
        int64_t ss[3] = {4, 3, 6};
        idd_tensor *src = make(L_PERM_NARROW, dt, 3, ss, V_ANY);
        worst_t wcp = {0};
        if (idd_copy_(dwin, src) != IDD_OK) { wcp.bad_shape = true; snprintf(wcp.where, sizeof wcp.where, "copy_"); }
        else
            for (int64_t a = 0; a < 5; a++) for (int64_t b = 0; b < 6; b++) for (int64_t c = 0; c < 4; c++) {
                /* dbase[a][b][c] is dv[c][a][b]; inside the window when 1 <= a < 4 */
                double want = 42.0;
                if (a >= 1 && a < 4) { int64_t si[3] = {c, a - 1, b}; want = round_to(other, rd_md(src, si)); }
                note(&wcp, err_of(rd_off(dbase, (a * 6 + b) * 4 + c), want, 0), "dbase (%lld,%lld,%lld)", (long long)a,
                     (long long)b, (long long)c);
            }
        snprintf(name, sizeof name, "copy_ strided %s -> strided window of %s", idd_dtype_name(dt), idd_dtype_name(other));
        report(name, &wcp, TOL_EXACT);
        /* copy_ with a broadcast source (1,6) into (4,6), and clone of an expanded view */
        int64_t rs[2] = {1, 6}, ds2[2] = {4, 6};
        idd_tensor *row = make(L_NARROW, dt, 2, rs, V_ANY), *dst = idd_tensor_new(dt, IDD_CPU, 2, ds2);
        worst_t wb = {0};
        if (idd_copy_(dst, row) != IDD_OK) { wb.bad_shape = true; snprintf(wb.where, sizeof wb.where, "copy_ broadcast"); }
        else for (int64_t i = 0; i < 24; i++) note(&wb, err_of(rd_off(dst, i), rd(row, i % 6), 0), "copy_ broadcast %lld", (long long)i);
        idd_tensor *cl = v4 ? idd_clone(v4) : NULL;
        if (!cl || !idd_is_contiguous(cl) || !idd_same_shape(cl, v4)) { wb.bad_shape = true; snprintf(wb.where, sizeof wb.where, "clone"); }
        else for (int64_t i = 0; i < idd_numel(cl); i++) note(&wb, err_of(rd_off(cl, i), rd(v4, i), 0), "clone %lld", (long long)i);
        snprintf(name, sizeof name, "copy_ from a broadcast row, clone of an expanded view %s", idd_dtype_name(dt));
        report(name, &wb, TOL_EXACT);
        idd_tensor_release(row); idd_tensor_release(dst); idd_tensor_release(cl);
        idd_tensor_release(src); idd_tensor_release(dwin); idd_tensor_release(dv); idd_tensor_release(dbase);
        idd_tensor_release(v1); idd_tensor_release(v2); idd_tensor_release(v3); idd_tensor_release(v4);
        idd_tensor_release(base);
        #undef B
    }
}

/* ---- index_select: forward on strided inputs, backward (scatter-add) -------------------- */
static void test_index_select(void) {
    int64_t as[3] = {6, 3, 4};
    const int64_t idx_data[6] = {5, 0, 2, 2, 5, 1};
    for (int k = 0; k < 2; k++) {
        idd_dtype dt = DTS[k];
        worst_t w = {0};
        for (int L = 0; L < L_COUNT; L++)
            for (int ik = 0; ik < 3; ik++) {
                idd_tensor *a = make(L, dt, 3, as, V_ANY), *idx;
                int64_t n = 6, one = 1, four = 4;
                if (ik == 0) idx = idd_tensor_from_data(IDD_I64, 1, &n, idx_data);
                else if (ik == 1) {   /* stride-0 index: one row, four times */
                    int64_t three = 3;
                    idd_tensor *s = idd_tensor_from_data(IDD_I64, 1, &one, &three);
                    idx = idd_view_expand(s, 1, &four);
                    idd_tensor_release(s);
                } else {   /* float64-valued indices */
                    double fd[2] = {4.0, 1.0};
                    int64_t two = 2;
                    idx = idd_tensor_from_data(IDD_F64, 1, &two, fd);
                }
                idd_tensor *o = idd_index_select(a, 0, idx);
                int64_t ni = idd_numel(idx), os[3] = {ni, 3, 4};
                if (!shape_is(o, 3, os) || o->dtype != dt) { w.bad_shape = true; snprintf(w.where, sizeof w.where, "%s idx %d", layout_name[L], ik); }
                else
                    for (int64_t i = 0; i < idd_numel(o); i++) {
                        int64_t m[3];
                        unravel(i, 3, os, m);
                        m[0] = (int64_t)rd(idx, m[0]);
                        note(&w, err_of(rd(o, i), rd_md(a, m), 0), "%s idx kind %d elem %lld", layout_name[L], ik, (long long)i);
                    }
                idd_tensor_release(a);
                idd_tensor_release(idx);
                idd_tensor_release(o);
            }
        char name[128];
        snprintf(name, sizeof name, "index_select dim 0 %s (5 layouts; int64, stride-0 and float indices)", idd_dtype_name(dt));
        report(name, &w, TOL_EXACT);

        /* backward: L = sum(index_select(permute(P), 0, idx) * R): dP = permuted scatter-add of R */
        int64_t ps[3] = {4, 3, 6}, n = 6;
        idd_tensor *P = make(L_CONTIG, dt, 3, ps, V_ANY);
        P->requires_grad = true;
        int perm[3] = {2, 1, 0};
        idd_tensor *A = idd_permute(P, 3, perm), *idx = idd_tensor_from_data(IDD_I64, 1, &n, idx_data);
        idd_tensor *o = idd_index_select(A, 0, idx);
        int64_t os[3] = {6, 3, 4};
        idd_tensor *R = make(L_CONTIG, dt, 3, os, V_ANY);
        idd_tensor *prod = o ? idd_binary(IDD_BIN_MUL, o, R) : NULL, *L = prod ? idd_sum(prod, IDD_ALL_DIMS, false) : NULL;
        worst_t wg = {0};
        if (!L || idd_backward(L, NULL) != IDD_OK || !P->grad) { wg.bad_shape = true; snprintf(wg.where, sizeof wg.where, "backward"); }
        else
            for (int64_t p0 = 0; p0 < 4; p0++) for (int64_t p1 = 0; p1 < 3; p1++) for (int64_t p2 = 0; p2 < 6; p2++) {
                /* P[p0][p1][p2] = A[p2][p1][p0]; A row p2 is picked by every r with idx[r] == p2 */
                double want = 0, sabs = 0;
                for (int r = 0; r < 6; r++)
                    if (idx_data[r] == p2) { int64_t ri[3] = {r, p1, p0}; want += rd_md(R, ri); sabs += fabs(rd_md(R, ri)); }
                int64_t gi[3] = {p0, p1, p2};
                note(&wg, err_of(rd_md(P->grad, gi), round_to(dt, want), sabs), "(%lld,%lld,%lld)", (long long)p0, (long long)p1, (long long)p2);
            }
        snprintf(name, sizeof name, "index_select backward through a permute %s (scatter-add, repeated rows)", idd_dtype_name(dt));
        report(name, &wg, tol_of(dt));
        idd_tensor_release(L); idd_tensor_release(prod); idd_tensor_release(R); idd_tensor_release(o);
        idd_tensor_release(idx); idd_tensor_release(A); idd_tensor_release(P);
    }
    int64_t as2[2] = {3, 2}, one = 1, bad = 3;
    idd_tensor *a = make(L_CONTIG, IDD_F32, 2, as2, V_ANY), *idx = idd_tensor_from_data(IDD_I64, 1, &one, &bad);
    idd_tensor *o = idd_index_select(a, 0, idx);
    check_report(!o && strstr(idd_last_error(), "out of range"), "index_select: index 3 of 3 rows fails with a message", idd_last_error());
    idd_tensor_release(a); idd_tensor_release(idx); idd_tensor_release(o);
}

/* ---- gradcheck ------------------------------------------------------------------------ */
/* composed float64 functions (inputs contiguous; the strided paths happen inside) */
#define REL(t) idd_tensor_release(t)

/* sum over dim 1 of exp(a) * b + a / (1 + b^2); a (3,4), b (4): broadcasting, unary, affine */
static idd_tensor *gf_pointwise(int n, idd_tensor **in, void *ud) {
    idd_tensor *a = in[0], *b = in[1];
    idd_tensor *e = idd_unary(IDD_UN_EXP, a), *eb = idd_binary(IDD_BIN_MUL, e, b);
    idd_tensor *b2 = idd_unary(IDD_UN_SQUARE, b), *den = idd_affine(b2, 1, 1), *q = idd_binary(IDD_BIN_DIV, a, den);
    idd_tensor *s = idd_binary(IDD_BIN_ADD, eb, q), *r = idd_sum(s, 1, false);
    REL(e); REL(eb); REL(b2); REL(den); REL(q); REL(s);
    return r;
}
/* logsumexp(a @ b^T, -1) + var(a, 1) - mean(tanh(a), 1); a (3,5), b (4,5) */
static idd_tensor *gf_matmul(int n, idd_tensor **in, void *ud) {
    idd_tensor *a = in[0], *b = in[1];
    idd_tensor *bt = idd_transpose(b, 0, 1), *m = idd_matmul(a, bt), *l = idd_logsumexp(m, -1, false);
    idd_tensor *v = idd_var(a, 1, false, true), *t = idd_unary(IDD_UN_TANH, a), *mt = idd_mean(t, 1, false);
    idd_tensor *s = idd_binary(IDD_BIN_ADD, l, v), *r = idd_binary(IDD_BIN_SUB, s, mt);
    REL(bt); REL(m); REL(l); REL(v); REL(t); REL(mt); REL(s);
    return r;
}
/* silu(index_select(concat(narrow(a,1,1,3), permute(b)), 0, idx)) * sigmoid(clamp(...)); a (4,5), b (2,4) */
static idd_tensor *gf_shape(int n, idd_tensor **in, void *ud) {
    idd_tensor *a = in[0], *b = in[1];
    int p[2] = {1, 0};
    const int64_t id[4] = {3, 0, 3, 1};
    int64_t ni = 4;
    idd_tensor *na = idd_narrow(a, 1, 1, 3), *pb = idd_permute(b, 2, p);
    idd_tensor *cat_in[2] = {na, pb};
    idd_tensor *c = idd_concat(2, cat_in, 1), *idx = idd_tensor_from_data(IDD_I64, 1, &ni, id);
    idd_tensor *sel = idd_index_select(c, 0, idx), *s1 = idd_unary(IDD_UN_SILU, sel);
    idd_tensor *cl = idd_clamp(sel, -0.8, 0.9), *sg = idd_unary(IDD_UN_SIGMOID, cl), *r = idd_binary(IDD_BIN_MUL, s1, sg);
    REL(na); REL(pb); REL(c); REL(idx); REL(sel); REL(s1); REL(cl); REL(sg);
    return r;
}
/* mean over dim 0 of max over dim 2 of softmax(a @ expand(b), -1); a (2,1,3,4), b (3,4,2) */
static idd_tensor *gf_batched(int n, idd_tensor **in, void *ud) {
    idd_tensor *a = in[0], *b = in[1];
    int64_t es[4] = {2, 3, 4, 2};
    idd_tensor *eb = idd_expand(b, 4, es), *m = idd_matmul(a, eb), *sm = idd_softmax(m, -1);
    idd_tensor *mx = idd_max(sm, 2, false, NULL), *r = idd_mean(mx, 0, false);
    REL(eb); REL(m); REL(sm); REL(mx);
    return r;
}
/* log(pow(a^2 + 0.5, b)) + rsqrt(a^2 + 0.5) * sqrt(exp(b)) + max(a, b) - min(a, b) + sin(a) cos(b); a, b (3,4) */
static idd_tensor *gf_powers(int n, idd_tensor **in, void *ud) {
    idd_tensor *a = in[0], *b = in[1];
    idd_tensor *a2 = idd_unary(IDD_UN_SQUARE, a), *ap = idd_affine(a2, 1, 0.5), *pw = idd_binary(IDD_BIN_POW, ap, b);
    idd_tensor *lg = idd_unary(IDD_UN_LOG, pw), *rs = idd_unary(IDD_UN_RSQRT, ap), *eb = idd_unary(IDD_UN_EXP, b);
    idd_tensor *sq = idd_unary(IDD_UN_SQRT, eb), *t1 = idd_binary(IDD_BIN_MUL, rs, sq), *s1 = idd_binary(IDD_BIN_ADD, lg, t1);
    idd_tensor *mx = idd_binary(IDD_BIN_MAX, a, b), *mn = idd_binary(IDD_BIN_MIN, a, b), *d = idd_binary(IDD_BIN_SUB, mx, mn);
    idd_tensor *sa = idd_unary(IDD_UN_SIN, a), *cb = idd_unary(IDD_UN_COS, b), *sc = idd_binary(IDD_BIN_MUL, sa, cb);
    idd_tensor *s2 = idd_binary(IDD_BIN_ADD, s1, d), *r = idd_binary(IDD_BIN_ADD, s2, sc);
    REL(a2); REL(ap); REL(pw); REL(lg); REL(rs); REL(eb); REL(sq); REL(t1); REL(s1); REL(mx); REL(mn); REL(d);
    REL(sa); REL(cb); REL(sc); REL(s2);
    return r;
}

/* the test-only op: out = 3a; its backward returns factor * g (3 is right) */
static idd_status times3_backward(idd_node *nd, idd_tensor *g, idd_tensor **gin) {
    gin[0] = idd_affine(g, nd->p[0], 0);
    return gin[0] ? IDD_OK : IDD_ERR;
}
static idd_tensor *times3(idd_tensor *a, double backward_factor) {
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    idd_tensor *out = idd_affine(a, 3, 0);
    idd_set_grad_enabled(prev);
    idd_node *nd = out ? idd_record("times3 (test)", times3_backward, out, 1, &a) : NULL;
    if (nd) nd->p[0] = backward_factor;
    return out;
}
/* exp(times3(a)) * b + a: the op inside a composition; ud points at the backward factor */
static idd_tensor *gf_times3(int n, idd_tensor **in, void *ud) {
    idd_tensor *t = times3(in[0], *(double *)ud), *e = idd_unary(IDD_UN_EXP, t);
    idd_tensor *m = idd_binary(IDD_BIN_MUL, e, in[1]), *r = idd_binary(IDD_BIN_ADD, m, in[0]);
    REL(t); REL(e); REL(m);
    return r;
}

static void gradcheck_case(const char *name, idd_gradcheck_fn f, void *ud, int na, const int64_t *sa, int nb,
                           const int64_t *sb, int kind_a, bool expect_fail) {
    idd_tensor *in[2] = {make(L_CONTIG, IDD_F64, na, sa, kind_a), make(L_CONTIG, IDD_F64, nb, sb, V_ANY)};
    /* scale inputs into a comfortable range (no clamp kinks or max ties within eps) */
    for (int k = 0; k < 2; k++) {
        idd_tensor *s = idd_affine(in[k], 0.5, 0);
        REL(in[k]);
        in[k] = s;
        in[k]->requires_grad = true;
    }
    double worst = -1;
    idd_status st = idd_gradcheck(f, ud, 2, in, GC_EPS, 64, 1234, &worst);
    char buf[200];
    snprintf(buf, sizeof buf, "status %d (%s), worst %.3g vs %s %.3g", st, st ? idd_last_error() : "ok", worst,
             expect_fail ? "flag above" : "tol", expect_fail ? GC_FLAG : GC_TOL);
    bool ok = st == IDD_OK && (expect_fail ? worst > GC_FLAG : worst <= GC_TOL);
    check_report(ok, name, buf);
    printf("#   %-58s worst %.3g\n", name, worst);
    REL(in[0]);
    REL(in[1]);
}

static void test_gradcheck(void) {
    int64_t s34[2] = {3, 4}, s4[1] = {4}, s35[2] = {3, 5}, s45[2] = {4, 5}, s24[2] = {2, 4};
    int64_t s2134[4] = {2, 1, 3, 4}, s342[3] = {3, 4, 2};
    gradcheck_case("gradcheck float64: exp(a)*b + a/(1+b^2), broadcast, sum dim 1", gf_pointwise, NULL, 2, s34, 1, s4, V_ANY, false);
    gradcheck_case("gradcheck float64: logsumexp(a b^T) + var(a) - mean(tanh a)", gf_matmul, NULL, 2, s35, 2, s45, V_ANY, false);
    gradcheck_case("gradcheck float64: narrow/permute/concat/index_select/silu/clamp", gf_shape, NULL, 2, s45, 2, s24, V_ANY, false);
    gradcheck_case("gradcheck float64: broadcast bmm, softmax, max dim, mean", gf_batched, NULL, 4, s2134, 3, s342, V_ANY, false);
    gradcheck_case("gradcheck float64: pow/log/rsqrt/sqrt/exp/max/min/sin/cos", gf_powers, NULL, 2, s34, 2, s34, V_ANY, false);
    double right = 3, wrong = 2;
    gradcheck_case("gradcheck: test op times3 with its right backward passes", gf_times3, &right, 2, s34, 2, s34, V_ANY, false);
    gradcheck_case("gradcheck FLAGS times3 whose backward is off by 2/3", gf_times3, &wrong, 2, s34, 2, s34, V_ANY, true);
}

int main(int argc, char **argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 20250611;
    rng_state = seed;
    printf("# test_core seed %llu\n", (unsigned long long)seed);
    size_t live0 = idd_live_bytes();
    test_binary();
    test_unary();
    test_reduce();
    test_matmul();
    test_concat();
    test_views();
    test_index_select();
    test_gradcheck();
    char buf[96];
    snprintf(buf, sizeof buf, "%zu bytes still held (started with %zu)", idd_live_bytes(), live0);
    check_report(idd_live_bytes() == live0, "every tensor released: no storage leaked", buf);
    return check_done();
}
