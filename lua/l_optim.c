/* l_optim.c — the C half of iddpm.optim: fused AdamW and EMA updates and the
 * gradient norm over Lua lists of tensors. The optimizer objects are in
 * lua/iddpm/optim.lua. */
#include <stdlib.h>

#include "iddpm/optim.h"
#include "l_common.h"

/* read a Lua list of tensors at idx into an array held by a userdata pushed on the
 * stack (Lua owns it: an error raised later cannot leak it) */
static idd_tensor **tensor_list(lua_State *L, int idx, int *n) {
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (int)luaL_len(L, idx);
    idd_tensor **v = lua_newuserdatauv(L, sizeof *v * (size_t)(*n + 1), 0);
    for (int i = 0; i < *n; i++) {
        lua_geti(L, idx, i + 1);
        v[i] = lt_test(L, -1);
        lua_pop(L, 1);
        if (!v[i]) { luaL_error(L, "entry %d of argument #%d is not a tensor", i + 1, idx); }
    }
    return v;
}

/* adamw_step(params, m, v, {lr, beta1, beta2, eps, weight_decay, step}) */
static int l_adamw_step(lua_State *L) {
    int n, nm, nv;
    luaL_checktype(L, 4, LUA_TTABLE);
    idd_adamw_cfg c;
    lua_getfield(L, 4, "lr"); c.lr = luaL_checknumber(L, -1);
    lua_getfield(L, 4, "beta1"); c.beta1 = luaL_checknumber(L, -1);
    lua_getfield(L, 4, "beta2"); c.beta2 = luaL_checknumber(L, -1);
    lua_getfield(L, 4, "eps"); c.eps = luaL_checknumber(L, -1);
    lua_getfield(L, 4, "weight_decay"); c.weight_decay = luaL_checknumber(L, -1);
    lua_getfield(L, 4, "step"); c.step = luaL_checkinteger(L, -1);
    lua_pop(L, 6);
    idd_tensor **p = tensor_list(L, 1, &n), **m = tensor_list(L, 2, &nm), **v = tensor_list(L, 3, &nv);
    idd_status st = (n == nm && n == nv) ? idd_adamw_step(n, p, m, v, &c) : idd_error("adamw: %d params, %d m, %d v", n, nm, nv);
    if (st) return lt_error(L);
    return 0;
}

/* ema_update(ema_list, params, rate) */
static int l_ema_update(lua_State *L) {
    int n, np;
    double rate = luaL_checknumber(L, 3);
    idd_tensor **e = tensor_list(L, 1, &n), **p = tensor_list(L, 2, &np);
    idd_status st = n == np ? idd_ema_update(n, e, p, rate) : idd_error("ema: %d ema tensors for %d params", n, np);
    if (st) return lt_error(L);
    return 0;
}

static int l_grad_norm(lua_State *L) {
    int n;
    idd_tensor **p = tensor_list(L, 1, &n);
    double g = idd_grad_norm(n, p);
    lua_pushnumber(L, g);
    return 1;
}

static int l_grad_scale(lua_State *L) {
    int n;
    idd_tensor **p = tensor_list(L, 1, &n);
    idd_status st = idd_grad_scale(n, p, luaL_checknumber(L, 2));
    if (st) return lt_error(L);
    return 0;
}

static const luaL_Reg fns[] = {{"adamw_step", l_adamw_step}, {"ema_update", l_ema_update},
                               {"grad_norm", l_grad_norm}, {"grad_scale", l_grad_scale}, {NULL, NULL}};

int luaopen_iddpm_optim_c(lua_State *L);
int luaopen_iddpm_optim_c(lua_State *L) {
    luaL_newlib(L, fns);
    return 1;
}
