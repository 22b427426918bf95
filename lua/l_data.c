/* l_data.c — the C half of iddpm.data (lua/iddpm/data.lua), module iddpm._data:
 *   loader(images u8 (N,C,H,W), labels i64 (N) | nil, {batch_size, shuffle, flip, seed, stream,
 *          rank, world_size})
 *     -> Loader with :next() -> x f32 (B,C,H,W) in [-1,1], y i64 (B);
 *        :position() -> epoch, index; :set_position(epoch, index); :close()
 *   resize_center_crop(u8 (H,W,C), size) -> u8 (C,size,size)
 *   now() -> wall-clock seconds (monotonic), for images/s and ETA
 *   clear_interrupt() -> lets engine loops run again after a caught Ctrl-C (to save)
 *   defer_interrupt(on) -> Ctrl-C only recorded while on; raised when turned off */
#include <time.h>

#include "iddpm/io.h"
#include "l_common.h"

#define LOADER_MT "iddpm.Loader"

typedef struct {
    idd_loader *l;
    int64_t b, c, h, w;
} loader_ud;

/* contiguous CPU tensor of the given dtype at idx (retained; release after use) */
static idd_tensor *checked(lua_State *L, int idx, idd_dtype dt, int ndim, const char *what) {
    idd_tensor *t = lt_check(L, idx);
    if (t->dtype != dt || t->ndim != ndim || t->device != IDD_CPU)
        luaL_error(L, "%s must be a %d-d %s CPU tensor", what, ndim, idd_dtype_name(dt));
    idd_tensor *c = idd_contiguous(t);
    if (!c) lt_error(L);
    return c;
}

static int64_t opt_int(lua_State *L, int t, const char *k, int64_t def) {
    lua_getfield(L, t, k);
    int64_t v = lua_isnil(L, -1) ? def : (int64_t)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    return v;
}

static int l_loader(lua_State *L) {
    luaL_checktype(L, 3, LUA_TTABLE);
    idd_tensor *im = checked(L, 1, IDD_U8, 4, "loader: images");
    idd_tensor *lb = NULL;
    if (!lua_isnoneornil(L, 2)) {
        lb = checked(L, 2, IDD_I64, 1, "loader: labels");
        if (lb->shape[0] != im->shape[0]) {
            idd_tensor_release(im); idd_tensor_release(lb);
            return luaL_error(L, "loader: %d labels for %d images", (int)lb->shape[0], (int)im->shape[0]);
        }
    }
    idd_loader_opts o;
    o.batch_size = opt_int(L, 3, "batch_size", 1);
    o.shuffle = (int)opt_int(L, 3, "shuffle", 1);
    o.flip = (int)opt_int(L, 3, "flip", 0);
    o.seed = (uint64_t)opt_int(L, 3, "seed", 0);
    o.stream = (uint64_t)opt_int(L, 3, "stream", 0);
    o.rank = opt_int(L, 3, "rank", 0);
    o.world_size = opt_int(L, 3, "world_size", 1);
    loader_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
    u->l = NULL;
    luaL_setmetatable(L, LOADER_MT);
    idd_status st = idd_loader_new(idd_data(im), im->shape[0], (int)im->shape[1], (int)im->shape[2], (int)im->shape[3],
                                   lb ? idd_data(lb) : NULL, &o, &u->l);
    u->b = o.batch_size; u->c = im->shape[1]; u->h = im->shape[2]; u->w = im->shape[3];
    idd_tensor_release(im);
    idd_tensor_release(lb);
    if (st) return lt_error(L);
    return 1;
}

static loader_ud *check_loader(lua_State *L) {
    loader_ud *u = luaL_checkudata(L, 1, LOADER_MT);
    if (!u->l) luaL_error(L, "loader: used after close()");
    return u;
}

static int m_next(lua_State *L) {
    loader_ud *u = check_loader(L);
    int64_t xs[4] = {u->b, u->c, u->h, u->w}, ys[1] = {u->b};
    idd_tensor *x = idd_tensor_new(IDD_F32, IDD_CPU, 4, xs), *y = idd_tensor_new(IDD_I64, IDD_CPU, 1, ys);
    if (!x || !y) { idd_tensor_release(x); idd_tensor_release(y); return lt_error(L); }
    if (idd_loader_next(u->l, idd_data(x), idd_data(y)) != IDD_OK) {
        idd_tensor_release(x); idd_tensor_release(y);
        return lt_error(L);
    }
    lt_push(L, x);
    lt_push(L, y);
    return 2;
}

static int m_position(lua_State *L) {
    loader_ud *u = check_loader(L);
    int64_t e, i;
    idd_loader_position(u->l, &e, &i);
    lua_pushinteger(L, e);
    lua_pushinteger(L, i);
    return 2;
}

static int m_set_position(lua_State *L) {
    loader_ud *u = check_loader(L);
    if (idd_loader_set_position(u->l, luaL_checkinteger(L, 2), luaL_checkinteger(L, 3)) != IDD_OK) return lt_error(L);
    return 0;
}

static int m_close(lua_State *L) {
    loader_ud *u = luaL_checkudata(L, 1, LOADER_MT);
    idd_loader_free(u->l);
    u->l = NULL;
    return 0;
}

static int l_resize(lua_State *L) {
    idd_tensor *im = checked(L, 1, IDD_U8, 3, "resize_center_crop: image");
    int size = (int)luaL_checkinteger(L, 2);
    int64_t os[3] = {im->shape[2], size, size};
    idd_tensor *out = idd_tensor_new(IDD_U8, IDD_CPU, 3, os);
    idd_status st = out ? idd_resize_center_crop(idd_data(im), (int)im->shape[0], (int)im->shape[1], (int)im->shape[2], size,
                                                 idd_data(out))
                        : IDD_ENOMEM;
    idd_tensor_release(im);
    if (st) { idd_tensor_release(out); return lt_error(L); }
    return lt_push(L, out);
}

static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec);
    return 1;
}

static int l_clear_interrupt(lua_State *L) {
    idd_interrupted = 0;
    return 0;
}

/* defer_interrupt(on): while on, Ctrl-C is only recorded; turning it off raises
 * "interrupted!" if one came in between (the section it guarded has completed). */
static int l_defer_interrupt(lua_State *L) {
    int on = lua_toboolean(L, 1);
    idd_interrupt_deferred = on;
    if (!on && idd_interrupted) return luaL_error(L, "interrupted!");
    return 0;
}

int luaopen_iddpm_data_c(lua_State *L);
int luaopen_iddpm_data_c(lua_State *L) {
    static const luaL_Reg methods[] = {{"next", m_next}, {"position", m_position}, {"set_position", m_set_position},
                                       {"close", m_close}, {NULL, NULL}};
    static const luaL_Reg fns[] = {{"loader", l_loader}, {"resize_center_crop", l_resize}, {"now", l_now},
                                   {"clear_interrupt", l_clear_interrupt},
                                   {"defer_interrupt", l_defer_interrupt}, {NULL, NULL}};
    luaL_newmetatable(L, LOADER_MT);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, m_close);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newlib(L, fns);
    return 1;
}
