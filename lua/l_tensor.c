/* l_tensor.c — the Tensor userdata: construction, lifetime (GC pressure, free,
 * <close>), facts, views, conversions, autograd fields. Math methods are in
 * l_ops.c. Module table: iddpm.tensor. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "l_common.h"

// ---------------------------------------------------------------- userdata plumbing

static size_t gc_baseline;   /* live tensor bytes after the last forced collection */

/* Lua's GC does not see tensor memory: when live tensor bytes grow by a quarter since
 * the last forced collection (plus 32 MiB slack), collect now, so unreachable tensors
 * are freed without waiting for a full cycle driven by Lua's own small allocations. A
 * full collection of a UNet's Lua heap takes ~0.1 ms; letting garbage reach twice the
 * live bytes (the old rule) grew the heap step after step (a training step's RSS went
 * 1.6 -> 3.0 GiB over 5 steps), and every new page cost a fault. */
static void gc_pressure(lua_State *L) {
    size_t live = idd_live_bytes();
    if (live > gc_baseline + gc_baseline / 4 + ((size_t)32 << 20)) {
        lua_gc(L, LUA_GCCOLLECT);
        gc_baseline = idd_live_bytes();
    }
}

int lt_error(lua_State *L) { return luaL_error(L, "%s", idd_last_error()); }

int lt_push(lua_State *L, idd_tensor *t) {
    if (!t) return lt_error(L);
    idd_tensor **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = t;
    luaL_setmetatable(L, IDD_TENSOR_MT);
    ls_track(L);   /* the open T.scope owns it (l_scope.c) */
    gc_pressure(L);
    return 1;
}

idd_tensor *lt_test(lua_State *L, int idx) {
    idd_tensor **box = luaL_testudata(L, idx, IDD_TENSOR_MT);
    if (box && !*box) luaL_argerror(L, idx, "tensor was freed");
    return box ? *box : NULL;
}

idd_tensor *lt_check(lua_State *L, int idx) {
    idd_tensor **box = luaL_checkudata(L, idx, IDD_TENSOR_MT);
    if (!*box) luaL_argerror(L, idx, "tensor was freed");
    return *box;
}

idd_tensor *lt_check_or_number(lua_State *L, int idx, const idd_tensor *like) {
    if (lua_type(L, idx) == LUA_TNUMBER) {
        idd_dtype dt = like && (like->dtype == IDD_F64) ? IDD_F64 : IDD_F32;
        idd_tensor *t = idd_tensor_new(dt, like ? like->device : IDD_CPU, 0, NULL);
        if (t) idd_fill_(t, lua_tonumber(L, idx));
        lt_push(L, t);   /* owned by Lua from here: nothing leaks if a later check raises */
        return t;
    }
    return lt_check(L, idx);
}

int lt_dim(lua_State *L, int idx) {
    lua_Integer d = luaL_checkinteger(L, idx);
    luaL_argcheck(L, d != 0, idx, "dims are 1-based (use 1 for the first dim, -1 for the last)");
    return d > 0 ? (int)(d - 1) : (int)d;
}

int lt_optdim(lua_State *L, int idx, int def) { return lua_isnoneornil(L, idx) ? def : lt_dim(L, idx); }

int lt_shape(lua_State *L, int idx, int64_t *shape) {
    int n = 0;
    if (lua_istable(L, idx)) {
        n = (int)luaL_len(L, idx);
        luaL_argcheck(L, n <= IDD_MAX_DIMS, idx, "too many dims");
        for (int i = 0; i < n; i++) {
            lua_geti(L, idx, i + 1);
            int ok;
            shape[i] = lua_tointegerx(L, -1, &ok);
            if (!ok) luaL_argerror(L, idx, "shape entries must be integers");
            lua_pop(L, 1);
        }
        return n;
    }
    int top = lua_gettop(L);
    for (int i = idx; i <= top && lua_isinteger(L, i); i++) {
        luaL_argcheck(L, n < IDD_MAX_DIMS, i, "too many dims");
        shape[n++] = lua_tointeger(L, i);
    }
    return n;
}

idd_dtype lt_optdtype(lua_State *L, int idx, idd_dtype def) {
    if (lua_isnoneornil(L, idx)) return def;
    const char *name = luaL_checkstring(L, idx);
    int dt = idd_dtype_from_name(name);
    if (dt < 0) {
        if (!strcmp(name, "float")) return IDD_F32;
        if (!strcmp(name, "double")) return IDD_F64;
        if (!strcmp(name, "long")) return IDD_I64;
        if (!strcmp(name, "byte")) return IDD_U8;
        if (!strcmp(name, "bf16")) return IDD_BF16;
        luaL_error(L, "unknown dtype '%s' (float32, float64, int64, uint8, bfloat16)", name);
    }
    return (idd_dtype)dt;
}

static int t_gc(lua_State *L) {
    idd_tensor **box = luaL_checkudata(L, 1, IDD_TENSOR_MT);
    idd_tensor_release(*box);
    *box = NULL;
    return 0;
}

// ---------------------------------------------------------------- constructors

/* T.from_table(flat, shape [, dtype]) */
static int t_from_table(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    int64_t shape[IDD_MAX_DIMS];
    int64_t n = luaL_len(L, 1);
    int nd;
    if (lua_isnoneornil(L, 2)) { nd = 1; shape[0] = n; }
    else nd = lt_shape(L, 2, shape);
    idd_dtype dt = lt_optdtype(L, 3, IDD_F32);
    if (!idd_shape_fits(nd, shape, 1, "from_table")) return lt_error(L);
    int64_t m = 1;
    for (int i = 0; i < nd; i++) m *= shape[i];
    if (m != n) return luaL_error(L, "from_table: %lld values do not fill shape of %lld elements", (long long)n, (long long)m);
    /* read as float64 (int64 directly: integers above 2^53 stay exact), then cast into dt */
    idd_dtype rd = dt == IDD_I64 ? IDD_I64 : IDD_F64;
    idd_tensor *t = idd_tensor_new(rd, IDD_CPU, nd, shape);
    if (!t) return lt_error(L);
    for (int64_t i = 0; i < n; i++) {
        lua_geti(L, 1, i + 1);
        int ok;
        double v = lua_tonumberx(L, -1, &ok);
        if (ok && rd == IDD_I64) {
            if (lua_isinteger(L, -1)) ((int64_t *)idd_data(t))[i] = lua_tointeger(L, -1);
            else if (v >= -9.2233720368547758e18 && v < 9.2233720368547758e18) ((int64_t *)idd_data(t))[i] = (int64_t)v;
            else ok = 0;
        } else if (ok) ((double *)idd_data(t))[i] = v;
        lua_pop(L, 1);
        if (!ok) {
            idd_tensor_release(t);
            return luaL_error(L, "from_table: entry %d is not a number%s", (int)(i + 1),
                              rd == IDD_I64 ? " in the int64 range" : "");
        }
    }
    if (dt == rd) return lt_push(L, t);
    idd_tensor *c = idd_to_dtype(t, dt);
    idd_tensor_release(t);
    return lt_push(L, c);
}

/* shape given as a table or integers, then an optional dtype string */
static int shape_and_dtype(lua_State *L, int64_t *shape, idd_dtype *dt) {
    int nd = lt_shape(L, 1, shape);
    int next = lua_istable(L, 1) ? 2 : nd + 1;
    *dt = lt_optdtype(L, next, IDD_F32);
    return nd;
}

static int t_full_common(lua_State *L, double v, int has_value) {
    int64_t shape[IDD_MAX_DIMS];
    idd_dtype dt;
    int nd = shape_and_dtype(L, shape, &dt);
    idd_tensor *t = idd_tensor_new(dt, IDD_CPU, nd, shape);
    if (t && has_value) idd_fill_(t, v);
    return lt_push(L, t);
}
static int t_zeros(lua_State *L) { return t_full_common(L, 0, 1); }
static int t_ones(lua_State *L) { return t_full_common(L, 1, 1); }
static int t_empty(lua_State *L) { return t_full_common(L, 0, 0); }
static int t_full(lua_State *L) {
    int64_t shape[IDD_MAX_DIMS];
    int nd = lt_shape(L, 1, shape);
    double v = luaL_checknumber(L, 2);
    idd_tensor *t = idd_tensor_new(lt_optdtype(L, 3, IDD_F32), IDD_CPU, nd, shape);
    if (t) idd_fill_(t, v);
    return lt_push(L, t);
}

/* T.arange([start,] stop [, step] [, dtype]) — int64 when the bounds are integers */
static int t_arange(lua_State *L) {
    double v[3] = {0, 0, 1};
    int nnum = 0, allint = 1;
    while (nnum < 3 && lua_type(L, nnum + 1) == LUA_TNUMBER) {
        allint = allint && lua_isinteger(L, nnum + 1);
        v[nnum] = lua_tonumber(L, nnum + 1);
        nnum++;
    }
    luaL_argcheck(L, nnum >= 1, 1, "arange: expected a number");
    double a = nnum == 1 ? 0 : v[0], b = nnum == 1 ? v[0] : v[1], s = nnum == 3 ? v[2] : 1;
    luaL_argcheck(L, s != 0, 3, "step must not be 0");
    double count = ceil((b - a) / s);
    if (!(count < (double)IDD_MAX_BYTES))   /* also NaN and inf bounds */
        return luaL_error(L, "arange: start %f, stop %f, step %f give too many (or undefined) elements", a, b, s);
    int64_t n = count > 0 ? (int64_t)count : 0;
    idd_dtype dt = lt_optdtype(L, nnum + 1, allint ? IDD_I64 : IDD_F32);
    /* computed in float64, then cast into dt (bf16, uint8 saturate as any cast does) */
    idd_tensor *t64 = idd_tensor_new(IDD_F64, IDD_CPU, 1, &n);
    if (!t64) return lt_error(L);
    for (int64_t i = 0; i < n; i++) ((double *)idd_data(t64))[i] = a + s * (double)i;
    if (dt == IDD_F64) return lt_push(L, t64);
    idd_tensor *t = idd_to_dtype(t64, dt);
    idd_tensor_release(t64);
    return lt_push(L, t);
}

// ---------------------------------------------------------------- random

static idd_generator *check_gen(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx)) return idd_default_generator();
    return luaL_checkudata(L, idx, "iddpm.Generator");
}

/* T.randn(shape [, generator] [, dtype] [, device]): the same numbers on every device */
static int t_rand_common(lua_State *L, bool normal) {
    int64_t shape[IDD_MAX_DIMS];
    int nd = lt_shape(L, 1, shape);
    int next = lua_istable(L, 1) ? 2 : nd + 1;
    idd_generator *g = idd_default_generator();
    if (luaL_testudata(L, next, "iddpm.Generator")) g = check_gen(L, next++);
    idd_device dev = IDD_CPU;
    idd_dtype dt = IDD_F32;
    if (lua_isnil(L, next) && next < lua_gettop(L)) next++;   /* T.randn(shape, nil, dtype, device) */
    for (int k = next; k <= next + 1; k++) {
        const char *s = lua_type(L, k) == LUA_TSTRING ? lua_tostring(L, k) : NULL;
        if (s && (!strcmp(s, "cuda") || !strcmp(s, "cpu"))) dev = s[1] == 'u' ? IDD_CUDA : IDD_CPU;
        else if (!lua_isnoneornil(L, k)) dt = lt_optdtype(L, k, IDD_F32);
    }
    if (!idd_backend_get(dev))
        return luaL_error(L, "randn: device '%s' is not available (%s)", idd_device_name(dev),
                          idd_backend_unavailable_reason(dev));
    return lt_push(L, normal ? idd_randn(g, dt, dev, nd, shape) : idd_rand(g, dt, dev, nd, shape));
}
static int t_randn(lua_State *L) { return t_rand_common(L, true); }
static int t_rand(lua_State *L) { return t_rand_common(L, false); }

/* T.randint(lo, hi, shape [, generator]) -> int64 in [lo, hi) */
static int t_randint(lua_State *L) {
    int64_t lo = luaL_checkinteger(L, 1), hi = luaL_checkinteger(L, 2), shape[IDD_MAX_DIMS];
    int nd = lt_shape(L, 3, shape);
    return lt_push(L, idd_randint(check_gen(L, 4), lo, hi, nd, shape));
}

/* T.generator(seed [, stream]) : an independent counter-based stream */
static int t_generator(lua_State *L) {
    uint64_t seed = (uint64_t)luaL_checkinteger(L, 1), stream = (uint64_t)luaL_optinteger(L, 2, 0);
    idd_generator *g = lua_newuserdatauv(L, sizeof *g, 0);
    g->seed = seed;
    g->stream = stream;
    g->offset = 0;
    g->shard = 0;
    g->shards = 0;
    luaL_setmetatable(L, "iddpm.Generator");
    return 1;
}
static int g_state(lua_State *L) {
    idd_generator *g = luaL_checkudata(L, 1, "iddpm.Generator");
    lua_pushinteger(L, (lua_Integer)g->seed);
    lua_pushinteger(L, (lua_Integer)g->stream);
    lua_pushinteger(L, (lua_Integer)g->offset);
    return 3;
}
static int g_set_state(lua_State *L) {
    idd_generator *g = luaL_checkudata(L, 1, "iddpm.Generator");
    g->seed = (uint64_t)luaL_checkinteger(L, 2);
    g->stream = (uint64_t)luaL_checkinteger(L, 3);
    g->offset = (uint64_t)luaL_checkinteger(L, 4);
    return 0;
}
/* g:set_shard(rank, world): rank's slice of every draw (0-based rank; world 1 = plain),
 * see idd_generator in iddpm/ops.h; g:shard() -> rank, world */
static int g_set_shard(lua_State *L) {
    idd_generator *g = luaL_checkudata(L, 1, "iddpm.Generator");
    lua_Integer r = luaL_checkinteger(L, 2), w = luaL_checkinteger(L, 3);
    if (w < 1 || r < 0 || r >= w) return luaL_error(L, "generator:set_shard: rank %d is not in [0, world size %d)", (int)r, (int)w);
    g->shard = (uint64_t)r;
    g->shards = (uint64_t)w;
    return 0;
}
static int g_shard(lua_State *L) {
    idd_generator *g = luaL_checkudata(L, 1, "iddpm.Generator");
    lua_pushinteger(L, (lua_Integer)g->shard);
    lua_pushinteger(L, (lua_Integer)(g->shards ? g->shards : 1));
    return 2;
}
static int g_uniform(lua_State *L) {   /* g:uniform() -> one double in [0,1) */
    double u;
    idd_rand_doubles(luaL_checkudata(L, 1, "iddpm.Generator"), &u, 1);
    lua_pushnumber(L, u);
    return 1;
}
static int t_manual_seed(lua_State *L) {
    idd_manual_seed((uint64_t)luaL_checkinteger(L, 1));
    return 0;
}
static int t_default_generator(lua_State *L) {
    lua_pushlightuserdata(L, idd_default_generator());
    return 1;
}

// ---------------------------------------------------------------- facts

static int m_shape(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    lua_createtable(L, t->ndim, 0);
    for (int i = 0; i < t->ndim; i++) { lua_pushinteger(L, t->shape[i]); lua_rawseti(L, -2, i + 1); }
    return 1;
}
static int m_stride(lua_State *L) {   /* strides in elements, one per dim */
    idd_tensor *t = lt_check(L, 1);
    lua_createtable(L, t->ndim, 0);
    for (int i = 0; i < t->ndim; i++) { lua_pushinteger(L, t->stride[i]); lua_rawseti(L, -2, i + 1); }
    return 1;
}
static int m_is_channels_last(lua_State *L) { lua_pushboolean(L, idd_is_channels_last(lt_check(L, 1))); return 1; }
static int m_size(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    if (lua_isnoneornil(L, 2)) return m_shape(L);
    idd_status st;
    int d = idd_norm_dim(t, lt_dim(L, 2), "size", &st);
    if (d < 0) return lt_error(L);
    lua_pushinteger(L, t->shape[d]);
    return 1;
}
static int m_dim(lua_State *L) { lua_pushinteger(L, lt_check(L, 1)->ndim); return 1; }
static int m_numel(lua_State *L) { lua_pushinteger(L, idd_numel(lt_check(L, 1))); return 1; }
static int m_dtype(lua_State *L) { lua_pushstring(L, idd_dtype_name(lt_check(L, 1)->dtype)); return 1; }
static int m_device(lua_State *L) { lua_pushstring(L, idd_device_name(lt_check(L, 1)->device)); return 1; }
static int m_is_contiguous(lua_State *L) { lua_pushboolean(L, idd_is_contiguous(lt_check(L, 1))); return 1; }

static idd_tensor *to_cpu(lua_State *L, idd_tensor *t) {
    if (t->device == IDD_CPU) { idd_tensor_retain(t); return t; }
    idd_tensor *c = idd_to_device(t, IDD_CPU);
    if (!c) lt_error(L);
    return c;
}

/* element i (row-major) of an int64/uint8 CPU tensor, read as an integer: through a
 * double, int64 values above 2^53 would round and 2^63-1 would not convert back */
static lua_Integer int_at(const idd_tensor *t, int64_t i) {
    int64_t off = t->offset;
    for (int d = t->ndim - 1; d >= 0; d--) {
        off += (i % t->shape[d]) * t->stride[d];
        i /= t->shape[d];
    }
    if (t->dtype == IDD_I64) return ((const int64_t *)t->storage->data)[off];
    return ((const uint8_t *)t->storage->data)[off];
}

static int m_totable(lua_State *L) {
    idd_tensor *t = to_cpu(L, lt_check(L, 1));
    int64_t n = idd_numel(t);
    lua_createtable(L, (int)n, 0);
    bool isint = t->dtype == IDD_I64 || t->dtype == IDD_U8;
    for (int64_t i = 0; i < n; i++) {
        if (isint) lua_pushinteger(L, int_at(t, i)); else lua_pushnumber(L, idd_get_flat(t, i));
        lua_rawseti(L, -2, i + 1);
    }
    idd_tensor_release(t);
    return 1;
}

static int m_item(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    char sb[96];
    if (idd_numel(t) != 1)
        return luaL_error(L, "item: tensor of shape %s has %d elements, not 1", idd_shape_str(t, sb, 96), (int)idd_numel(t));
    idd_tensor *c = to_cpu(L, t);
    if (t->dtype == IDD_I64 || t->dtype == IDD_U8) lua_pushinteger(L, int_at(c, 0));
    else lua_pushnumber(L, idd_get_flat(c, 0));
    idd_tensor_release(c);
    return 1;
}

/* t:get(i, j, ...) with 1-based positions */
static int m_get(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    int n = lua_gettop(L) - 1;
    if (n != t->ndim) return luaL_error(L, "get: %d indices for a %d-dim tensor", n, t->ndim);
    int64_t flat = 0;
    for (int i = 0; i < n; i++) {
        lua_Integer k = luaL_checkinteger(L, i + 2);
        if (k < 0) k += t->shape[i] + 1;
        luaL_argcheck(L, k >= 1 && k <= t->shape[i], i + 2, "index out of range");
        flat = flat * t->shape[i] + (k - 1);
    }
    idd_tensor *c = to_cpu(L, t);
    lua_pushnumber(L, idd_get_flat(c, flat));
    idd_tensor_release(c);
    return 1;
}

/* The one-line form, "Tensor(2,3) float32 cpu requires_grad": the fallback of __tostring
 * when the Lua printer cannot run, and x:summary(). */
static int m_summary(lua_State *L) {
    idd_tensor **box = luaL_checkudata(L, 1, IDD_TENSOR_MT);
    if (!*box) { lua_pushstring(L, "Tensor(freed)"); return 1; }
    idd_tensor *t = *box;
    char sb[128];
    lua_pushfstring(L, "Tensor%s %s %s%s", idd_shape_str(t, sb, sizeof sb), idd_dtype_name(t->dtype),
                    idd_device_name(t->device), t->requires_grad ? " requires_grad" : "");
    return 1;
}

/* __tostring: the values, PyTorch style, by the Lua module iddpm.tensor_print. */
static int m_tostring(lua_State *L) {
    idd_tensor **box = luaL_checkudata(L, 1, IDD_TENSOR_MT);
    if (!*box) { lua_pushstring(L, "Tensor(freed)"); return 1; }
    lua_settop(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "iddpm.tensor_print");
    if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_istable(L, -1)) {
        lua_getfield(L, -1, "tostring");
        lua_pushvalue(L, 1);
        lua_call(L, 1, 1);   /* errors (a Ctrl-C, out of memory) go up */
        return 1;
    }
    lua_settop(L, 1);
    return m_summary(L);
}

// ---------------------------------------------------------------- views and copies

static int m_reshape(lua_State *L) {
    int64_t shape[IDD_MAX_DIMS];
    idd_tensor *t = lt_check(L, 1);
    int nd = lt_shape(L, 2, shape);
    return lt_push(L, idd_reshape(t, nd, shape));
}
static int m_narrow(lua_State *L) {   /* t:narrow(dim, start (1-based), len) */
    idd_tensor *t = lt_check(L, 1);
    return lt_push(L, idd_narrow(t, lt_dim(L, 2), luaL_checkinteger(L, 3) - 1, luaL_checkinteger(L, 4)));
}
static int m_permute(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    int64_t p64[IDD_MAX_DIMS];
    int perm[IDD_MAX_DIMS];
    int n = lt_shape(L, 2, p64);
    for (int i = 0; i < n; i++) perm[i] = p64[i] > 0 ? (int)p64[i] - 1 : (int)p64[i];
    return lt_push(L, idd_permute(t, n, perm));
}
static int m_transpose(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    return lt_push(L, idd_transpose(t, lt_optdim(L, 2, 0), lt_optdim(L, 3, 1)));
}
static int m_expand(lua_State *L) {
    int64_t shape[IDD_MAX_DIMS];
    idd_tensor *t = lt_check(L, 1);
    int nd = lt_shape(L, 2, shape);
    return lt_push(L, idd_expand(t, nd, shape));
}
static int m_contiguous(lua_State *L) { return lt_push(L, idd_contiguous_op(lt_check(L, 1))); }
static int m_clone(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    idd_tensor *c = idd_contiguous_op(t);
    if (c && c->storage == t->storage) {   /* was already contiguous: force a copy */
        idd_tensor *d = idd_affine(c, 1, 0);
        idd_tensor_release(c);
        c = d;
    }
    return lt_push(L, c);
}
static int m_detach(lua_State *L) { return lt_push(L, idd_detach(lt_check(L, 1))); }

static int cast_to(lua_State *L, idd_dtype dt) { return lt_push(L, idd_cast(lt_check(L, 1), dt)); }
static int m_float(lua_State *L) { return cast_to(L, IDD_F32); }
static int m_double(lua_State *L) { return cast_to(L, IDD_F64); }
static int m_long(lua_State *L) { return cast_to(L, IDD_I64); }
static int m_byte(lua_State *L) { return cast_to(L, IDD_U8); }
static int m_bfloat16(lua_State *L) { return cast_to(L, IDD_BF16); }
/* x:channels_last([dtype]): a channels-last copy (NHWC memory, NCHW shape), in dtype if given */
static int m_channels_last(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    return lt_push(L, idd_channels_last(t, lt_optdtype(L, 2, t->dtype)));
}

static int to_dev(lua_State *L, idd_device dev) {
    idd_tensor *t = lt_check(L, 1);
    if (!idd_backend_get(dev))
        return luaL_error(L, "to: device '%s' is not available (%s)", idd_device_name(dev),
                          idd_backend_unavailable_reason(dev));
    if (t->device == dev) { idd_tensor_retain(t); return lt_push(L, t); }
    return lt_push(L, idd_to_device(t, dev));
}
static int m_cpu(lua_State *L) { return to_dev(L, IDD_CPU); }
static int m_cuda(lua_State *L) { return to_dev(L, IDD_CUDA); }
static int m_to(lua_State *L) {   /* t:to("cuda") / t:to("float64") */
    const char *s = luaL_checkstring(L, 2);
    if (!strcmp(s, "cpu")) return to_dev(L, IDD_CPU);
    if (!strcmp(s, "cuda")) return to_dev(L, IDD_CUDA);
    return cast_to(L, lt_optdtype(L, 2, IDD_F32));
}

static int m_fill_(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    if (idd_fill_(t, luaL_checknumber(L, 2)) != IDD_OK) return lt_error(L);
    lua_settop(L, 1);
    return 1;
}
static int m_zero_(lua_State *L) { lua_settop(L, 1); lua_pushnumber(L, 0); return m_fill_(L); }
static int m_copy_(lua_State *L) {
    idd_tensor *t = lt_check(L, 1), *s = lt_check(L, 2);
    if (idd_copy_(t, s) != IDD_OK) return lt_error(L);
    lua_settop(L, 1);
    return 1;
}

static int m_free(lua_State *L) { return t_gc(L); }

// ---------------------------------------------------------------- autograd

static int m_backward(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    idd_tensor *g = lua_isnoneornil(L, 2) ? NULL : lt_check(L, 2);
    if (g && !idd_same_shape(g, t)) {
        char sa[96], sb[96];
        return luaL_error(L, "backward: gradient %s does not match tensor %s", idd_shape_str(g, sa, 96), idd_shape_str(t, sb, 96));
    }
    if (idd_backward(t, g) != IDD_OK) return lt_error(L);
    return 0;
}
static int m_zero_grad(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    idd_tensor_release(t->grad);
    t->grad = NULL;
    return 0;
}

/* x[i]: the view at position i (1-based, negative from the end) along dim 1, with that
 * dim dropped: (4,3,8) -> (3,8). Out of range raises; a 0-dim tensor has no positions. */
static int t_select(lua_State *L, idd_tensor *t) {
    char sb[96];
    int isint;
    lua_Integer i = lua_tointegerx(L, 2, &isint);
    if (!isint)
        return luaL_error(L, "index: position %s is not an integer (tensor of shape %s)",
                          luaL_tolstring(L, 2, NULL), idd_shape_str(t, sb, 96));
    if (t->ndim == 0) return luaL_error(L, "index: a 0-dim tensor has no positions (use x:item())");
    int64_t n = t->shape[0];
    if (i < 0) i += n + 1;
    if (i < 1 || i > n)
        return luaL_error(L, "index: position %I out of range 1..%I (or -%I..-1) for dim 1 of shape %s",
                          lua_tointeger(L, 2), (lua_Integer)n, (lua_Integer)n, idd_shape_str(t, sb, 96));
    idd_tensor *row = idd_narrow(t, 0, i - 1, 1);
    if (!row) return lt_error(L);
    idd_tensor *v = idd_reshape(row, t->ndim - 1, t->shape + 1);
    idd_tensor_release(row);
    return lt_push(L, v);
}

static int t_index(lua_State *L) {
    if (lua_type(L, 2) == LUA_TNUMBER) return t_select(L, lt_check(L, 1));
    const char *k = lua_tostring(L, 2);
    if (k) {
        idd_tensor *t = lt_check(L, 1);
        if (!strcmp(k, "requires_grad")) { lua_pushboolean(L, t->requires_grad); return 1; }
        if (!strcmp(k, "grad")) {
            if (!t->grad) { lua_pushnil(L); return 1; }
            idd_tensor_retain(t->grad);
            return lt_push(L, t->grad);
        }
        if (!strcmp(k, "is_leaf")) { lua_pushboolean(L, t->grad_fn == NULL); return 1; }
        if (!strcmp(k, "grad_fn")) { if (t->grad_fn) lua_pushstring(L, t->grad_fn->name); else lua_pushnil(L); return 1; }
    }
    lua_pushvalue(L, lua_upvalueindex(1));   /* methods */
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1) || !k || k[0] == '_') return 1;   /* "__name" & co. probe: nil */
    /* no such method: "no method 'sume' on Tensor; did you mean 'sum'?" (iddpm.repl) */
    lua_getglobal(L, "require");
    lua_pushliteral(L, "iddpm.repl");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "no_method");
    lua_pushvalue(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushliteral(L, "Tensor");
    lua_call(L, 3, 1);
    luaL_where(L, 1);   /* the Lua line that asked for the method */
    lua_insert(L, -2);
    lua_concat(L, 2);
    return lua_error(L);
}

static int t_newindex(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    const char *k = luaL_checkstring(L, 2);
    if (!strcmp(k, "requires_grad")) {
        bool on = lua_toboolean(L, 3);
        if (on && t->dtype != IDD_F32 && t->dtype != IDD_F64 && t->dtype != IDD_BF16)
            return luaL_error(L, "requires_grad: only float tensors can require grad (this one is %s)", idd_dtype_name(t->dtype));
        if (!on && t->grad_fn) return luaL_error(L, "requires_grad: use detach() on a non-leaf tensor");
        t->requires_grad = on;
        return 0;
    }
    if (!strcmp(k, "grad")) {
        idd_tensor *g = lua_isnil(L, 3) ? NULL : lt_check(L, 3);
        if (g && !idd_same_shape(g, t)) return luaL_error(L, "grad: shape does not match the tensor");
        idd_tensor_retain(g);
        idd_tensor_release(t->grad);
        t->grad = g;
        return 0;
    }
    return luaL_error(L, "tensor field '%s' cannot be set (only requires_grad and grad)", k);
}

// ---------------------------------------------------------------- no_grad

/* T.no_grad(fn, ...) runs fn with recording off and restores the mode even on error */
static int t_no_grad(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    bool prev = idd_grad_enabled();
    idd_set_grad_enabled(false);
    int n = lua_gettop(L) - 1;
    int st = lua_pcall(L, n, LUA_MULTRET, 0);
    idd_set_grad_enabled(prev);
    if (st != LUA_OK) return lua_error(L);
    return lua_gettop(L);
}
static int t_set_grad_enabled(lua_State *L) {
    lua_pushboolean(L, idd_grad_enabled());
    idd_set_grad_enabled(lua_toboolean(L, 1));
    return 1;
}
static int t_is_tensor(lua_State *L) { lua_pushboolean(L, lt_test(L, 1) != NULL); return 1; }
static int t_live_bytes(lua_State *L) { lua_pushinteger(L, (lua_Integer)idd_live_bytes()); return 1; }

static const luaL_Reg methods[] = {
    {"shape", m_shape}, {"size", m_size}, {"dim", m_dim}, {"numel", m_numel}, {"dtype", m_dtype},
    {"device", m_device}, {"is_contiguous", m_is_contiguous}, {"totable", m_totable}, {"item", m_item},
    {"get", m_get}, {"reshape", m_reshape}, {"view", m_reshape}, {"narrow", m_narrow}, {"permute", m_permute},
    {"transpose", m_transpose}, {"expand", m_expand}, {"contiguous", m_contiguous}, {"clone", m_clone},
    {"detach", m_detach}, {"float", m_float}, {"double", m_double}, {"long", m_long}, {"byte", m_byte}, {"bfloat16", m_bfloat16},
    {"channels_last", m_channels_last}, {"is_channels_last", m_is_channels_last}, {"stride", m_stride},
    {"cpu", m_cpu}, {"cuda", m_cuda}, {"to", m_to}, {"fill_", m_fill_}, {"zero_", m_zero_},
    {"copy_", m_copy_}, {"free", m_free}, {"summary", m_summary}, {"backward", m_backward}, {"zero_grad", m_zero_grad},
    {NULL, NULL}};

static const luaL_Reg functions[] = {
    {"from_table", t_from_table}, {"zeros", t_zeros}, {"ones", t_ones}, {"empty", t_empty}, {"full", t_full},
    {"arange", t_arange}, {"randn", t_randn}, {"rand", t_rand}, {"randint", t_randint},
    {"generator", t_generator}, {"manual_seed", t_manual_seed}, {"no_grad", t_no_grad},
    {"set_grad_enabled", t_set_grad_enabled}, {"is_tensor", t_is_tensor}, {"live_bytes", t_live_bytes},
    {"default_generator", t_default_generator}, {NULL, NULL}};

int luaopen_iddpm_tensor(lua_State *L);
int luaopen_iddpm_tensor(lua_State *L) {
    luaL_newlib(L, functions);                 /* module */
    int mod = lua_gettop(L);
    lua_newtable(L);                           /* methods */
    int meth = lua_gettop(L);
    luaL_setfuncs(L, methods, 0);
    lt_open_ops(L, meth, mod);                 /* math methods + metamethods */
    lt_open_autograd(L, mod);                  /* T.gradcheck */
    lt_open_nn(L, mod);                        /* T.conv2d, T.group_norm, ... */
    lt_open_scope(L, mod);                     /* T.scope, T.keep (l_scope.c) */
    luaL_newmetatable(L, IDD_TENSOR_MT);
    lua_pushvalue(L, meth);
    lua_pushcclosure(L, t_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, t_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, t_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, t_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, m_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_getfield(L, meth, "__metamethods");    /* set by lt_open_ops: copy into the metatable */
    if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2)) { lua_pushvalue(L, -2); lua_insert(L, -2); lua_settable(L, -5); }
    }
    lua_pop(L, 2);
    lua_pushnil(L);
    lua_setfield(L, meth, "__metamethods");
    lua_pushvalue(L, meth);
    lua_setfield(L, mod, "methods");           /* so pure-Lua code can add methods */
    luaL_newmetatable(L, "iddpm.Generator");
    lua_newtable(L);
    lua_pushcfunction(L, g_state); lua_setfield(L, -2, "state");
    lua_pushcfunction(L, g_set_state); lua_setfield(L, -2, "set_state");
    lua_pushcfunction(L, g_uniform); lua_setfield(L, -2, "uniform");
    lua_pushcfunction(L, g_set_shard); lua_setfield(L, -2, "set_shard");
    lua_pushcfunction(L, g_shard); lua_setfield(L, -2, "shard");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_settop(L, mod);
    return 1;
}
