/* l_metrics.c — iddpm._metrics, the C core of iddpm.metrics (include/iddpm/metrics.h):
 *   frechet_distance(mu1, s1, mu2, s2)  -> fid, {mean=, trace=, trace_sqrt=, offset=, imag=}
 *   stats(D)                             -> FeatStats: st:add(feats (N,D)), st:get() -> mu, sigma
 *                                           (float64), st:count()
 *   precision_recall(real, fake, k)      -> precision, recall
 *   hash_uniform(shape, name, lo, hi)    -> float32 test values, reproducible in numpy */
#include <stdlib.h>
#include <string.h>

#include "iddpm/metrics.h"
#include "l_common.h"

#define STATS_MT "iddpm.FeatStats"

/* contiguous host copy of t as dtype dt; it is pushed on the Lua stack, so Lua owns it
 * (nothing leaks when a later argument check raises); the pointer is borrowed */
static idd_tensor *as_host(lua_State *L, int idx, idd_dtype dt, int ndim, const char *what) {
    idd_tensor *t = lt_check(L, idx);
    if (t->ndim != ndim) {
        char s[96];
        luaL_error(L, "%s must have %d dims, got %s", what, ndim, idd_shape_str(t, s, 96));
    }
    idd_tensor *c = t->device == IDD_CPU ? t : NULL;
    if (!c) { c = idd_to_device(t, IDD_CPU); if (!c) lt_error(L); }
    else idd_tensor_retain(c);
    idd_tensor *d = idd_to_dtype(c, dt);
    idd_tensor_release(c);
    if (!d) lt_error(L);
    idd_tensor *e = idd_contiguous(d);
    idd_tensor_release(d);
    lt_push(L, e);   /* raises if e is NULL */
    return e;
}

static int l_frechet(lua_State *L) {
    idd_tensor *m1 = as_host(L, 1, IDD_F64, 1, "mu1"), *s1 = as_host(L, 2, IDD_F64, 2, "sigma1");
    idd_tensor *m2 = as_host(L, 3, IDD_F64, 1, "mu2"), *s2 = as_host(L, 4, IDD_F64, 2, "sigma2");
    int64_t D = m1->shape[0];
    int bad = m2->shape[0] != D || s1->shape[0] != D || s1->shape[1] != D || s2->shape[0] != D || s2->shape[1] != D;
    double fid = 0, parts[5] = {0};
    idd_status st = IDD_OK;
    char a[96], b[96], c[96], d[96];
    if (bad)
        st = idd_error("frechet_distance: shapes differ: mu1 %s, sigma1 %s, mu2 %s, sigma2 %s",
                       idd_shape_str(m1, a, 96), idd_shape_str(s1, b, 96), idd_shape_str(m2, c, 96),
                       idd_shape_str(s2, d, 96));
    else
        st = idd_frechet_distance(&fid, parts, idd_data(m1), idd_data(s1), idd_data(m2), idd_data(s2), (int)D);
    if (st) return lt_error(L);
    lua_pushnumber(L, fid);
    lua_createtable(L, 0, 5);
    static const char *names[5] = {"mean", "trace", "trace_sqrt", "offset", "imag"};
    for (int i = 0; i < 5; i++) { lua_pushnumber(L, parts[i]); lua_setfield(L, -2, names[i]); }
    return 2;
}

static idd_feat_stats **check_stats(lua_State *L) {
    idd_feat_stats **b = luaL_checkudata(L, 1, STATS_MT);
    if (!*b) luaL_argerror(L, 1, "statistics were freed");
    return b;
}

static int l_stats_new(lua_State *L) {
    int D = (int)luaL_checkinteger(L, 1);
    idd_feat_stats **b = lua_newuserdatauv(L, sizeof *b, 0);
    *b = NULL;
    luaL_setmetatable(L, STATS_MT);
    *b = idd_feat_stats_new(D);
    if (!*b) return lt_error(L);
    return 1;
}

static int l_stats_add(lua_State *L) {
    idd_feat_stats *s = *check_stats(L);
    idd_tensor *x = as_host(L, 2, IDD_F64, 2, "features");
    idd_status st = IDD_OK;
    if (x->shape[1] != s->D) {
        char a[96];
        st = idd_error("stats:add: features %s, expected (N,%d)", idd_shape_str(x, a, 96), s->D);
    } else {
        st = idd_feat_stats_add(s, idd_data(x), x->shape[0], 1);
    }
    if (st) return lt_error(L);
    lua_settop(L, 1);
    return 1;
}

static int l_stats_get(lua_State *L) {
    idd_feat_stats *s = *check_stats(L);
    int64_t d1[1] = {s->D}, d2[2] = {s->D, s->D};
    idd_tensor *mu = idd_tensor_new(IDD_F64, IDD_CPU, 1, d1), *sg = idd_tensor_new(IDD_F64, IDD_CPU, 2, d2);
    if (!mu || !sg || idd_feat_stats_get(s, idd_data(mu), idd_data(sg))) {
        idd_tensor_release(mu);
        idd_tensor_release(sg);
        return lt_error(L);
    }
    lt_push(L, mu);
    lt_push(L, sg);
    return 2;
}

static int l_stats_count(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)(*check_stats(L))->n);
    return 1;
}

static int l_stats_gc(lua_State *L) {
    idd_feat_stats **b = luaL_checkudata(L, 1, STATS_MT);
    idd_feat_stats_free(*b);
    *b = NULL;
    return 0;
}

static int l_precision_recall(lua_State *L) {
    int k = (int)luaL_optinteger(L, 3, 3);
    idd_tensor *r = as_host(L, 1, IDD_F32, 2, "real features"), *f = as_host(L, 2, IDD_F32, 2, "fake features");
    double p = 0, rc = 0;
    idd_status st;
    char a[96], b[96];
    if (r->shape[1] != f->shape[1])
        st = idd_error("precision_recall: real features %s and fake features %s differ in dimension",
                       idd_shape_str(r, a, 96), idd_shape_str(f, b, 96));
    else
        st = idd_precision_recall(&p, &rc, idd_data(r), r->shape[0], idd_data(f), f->shape[0], (int)r->shape[1], k);
    if (st) return lt_error(L);
    lua_pushnumber(L, p);
    lua_pushnumber(L, rc);
    return 2;
}

static int l_hash_uniform(lua_State *L) {
    int64_t shape[IDD_MAX_DIMS];
    luaL_checktype(L, 1, LUA_TTABLE);
    int nd = lt_shape(L, 1, shape);
    const char *name = luaL_checkstring(L, 2);
    double lo = luaL_checknumber(L, 3), hi = luaL_checknumber(L, 4);
    idd_tensor *t = idd_tensor_new(IDD_F32, IDD_CPU, nd, shape);
    if (t) idd_hash_uniform_f32(idd_data(t), (size_t)idd_numel(t), idd_fnv1a64(name), lo, hi);
    return lt_push(L, t);
}

static const luaL_Reg stats_methods[] = {
    {"add", l_stats_add}, {"get", l_stats_get}, {"count", l_stats_count}, {NULL, NULL}};

static const luaL_Reg fns[] = {{"frechet_distance", l_frechet}, {"stats", l_stats_new},
                               {"precision_recall", l_precision_recall}, {"hash_uniform", l_hash_uniform},
                               {NULL, NULL}};

int luaopen_iddpm_metrics_core(lua_State *L);
int luaopen_iddpm_metrics_core(lua_State *L) {
    if (luaL_newmetatable(L, STATS_MT)) {
        luaL_newlib(L, stats_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_stats_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    luaL_newlib(L, fns);
    return 1;
}
