/* l_autograd.c — autograd helpers for Lua: T.gradcheck(fn, inputs, opts) runs the
 * engine's idd_gradcheck (central differences vs the tape) on a Lua function. */
#include "l_common.h"

typedef struct { lua_State *L; int fn; } gc_ctx;

/* calls the Lua function with the inputs; returns a retained result tensor */
static idd_tensor *call_lua(int n, idd_tensor **in, void *ud) {
    gc_ctx *c = ud;
    lua_State *L = c->L;
    lua_pushvalue(L, c->fn);
    for (int i = 0; i < n; i++) { idd_tensor_retain(in[i]); lt_push(L, in[i]); }
    if (lua_pcall(L, n, 1, 0) != LUA_OK) {
        idd_error("gradcheck: function raised: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return NULL;
    }
    idd_tensor *t = lt_test(L, -1);
    if (!t) { lua_pop(L, 1); idd_error("gradcheck: function must return a tensor"); return NULL; }
    idd_tensor_retain(t);
    lua_pop(L, 1);
    return t;
}

/* T.gradcheck(fn, {x1, x2, ...}, {eps = 1e-6, nmax = 64, seed = 0}) -> worst rel err */
static int l_gradcheck(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)luaL_len(L, 2);
    luaL_argcheck(L, n >= 1 && n <= 16, 2, "1 to 16 input tensors");
    idd_tensor *in[16];
    for (int i = 0; i < n; i++) {
        lua_geti(L, 2, i + 1);
        in[i] = lt_check(L, -1);
        lua_pop(L, 1);
    }
    double eps = 1e-6, worst = 0;
    lua_Integer nmax = 64, seed = 0;
    if (lua_istable(L, 3)) {
        lua_getfield(L, 3, "eps"); eps = luaL_optnumber(L, -1, eps); lua_pop(L, 1);
        lua_getfield(L, 3, "nmax"); nmax = luaL_optinteger(L, -1, nmax); lua_pop(L, 1);
        lua_getfield(L, 3, "seed"); seed = luaL_optinteger(L, -1, seed); lua_pop(L, 1);
    }
    gc_ctx c = {L, 1};
    if (idd_gradcheck(call_lua, &c, n, in, eps, nmax, (uint64_t)seed, &worst) != IDD_OK) return lt_error(L);
    lua_pushnumber(L, worst);
    return 1;
}

void lt_open_autograd(lua_State *L, int mod);
void lt_open_autograd(lua_State *L, int mod) {
    lua_pushcfunction(L, l_gradcheck);
    lua_setfield(L, mod, "gradcheck");
}
