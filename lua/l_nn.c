/* l_nn.c — Lua bindings of the UNet layer ops (include/iddpm/nn.h), installed on the
 * tensor module: T.conv2d, T.group_norm, T.qkv_attention, T.upsample_nearest,
 * T.avg_pool2d, T.timestep_embedding, T.dropout. */
#include "iddpm/nn.h"
#include "l_common.h"

static idd_tensor *opt_tensor(lua_State *L, int idx) { return lua_isnoneornil(L, idx) ? NULL : lt_check(L, idx); }

/* T.conv2d(x, w [, b] [, stride=1] [, padding=0]) */
static int l_conv2d(lua_State *L) {
    idd_tensor *x = lt_check(L, 1), *w = lt_check(L, 2), *b = opt_tensor(L, 3);
    int stride = (int)luaL_optinteger(L, 4, 1), pad = (int)luaL_optinteger(L, 5, 0);
    return lt_push(L, idd_conv2d(x, w, b, stride, pad));
}

/* T.group_norm(x, groups, weight, bias [, scale, shift, silu=false, eps=1e-5]) */
static int l_group_norm(lua_State *L) {
    idd_tensor *x = lt_check(L, 1);
    int groups = (int)luaL_checkinteger(L, 2);
    idd_tensor *g = opt_tensor(L, 3), *b = opt_tensor(L, 4), *sc = opt_tensor(L, 5), *sh = opt_tensor(L, 6);
    bool silu = lua_toboolean(L, 7);
    double eps = luaL_optnumber(L, 8, 1e-5);
    return lt_push(L, idd_group_norm(x, groups, g, b, sc, sh, silu, eps));
}

static int l_qkv_attention(lua_State *L) {
    return lt_push(L, idd_qkv_attention(lt_check(L, 1), (int)luaL_checkinteger(L, 2)));
}

static int l_upsample_nearest(lua_State *L) {
    luaL_argcheck(L, luaL_optinteger(L, 2, 2) == 2, 2, "only a factor of 2 is supported");
    return lt_push(L, idd_upsample_nearest2x(lt_check(L, 1)));
}

static int l_avg_pool2d(lua_State *L) {
    luaL_argcheck(L, luaL_optinteger(L, 2, 2) == 2, 2, "only a 2x2 window with stride 2 is supported");
    return lt_push(L, idd_avg_pool2x(lt_check(L, 1)));
}

/* T.timestep_embedding(t, dim [, max_period=10000]) */
static int l_timestep_embedding(lua_State *L) {
    return lt_push(L, idd_timestep_embedding(lt_check(L, 1), (int)luaL_checkinteger(L, 2), luaL_optnumber(L, 3, 10000)));
}

/* T.dropout(x, p [, generator]) */
static int l_dropout(lua_State *L) {
    idd_tensor *x = lt_check(L, 1);
    double p = luaL_checknumber(L, 2);
    idd_generator *g = lua_isnoneornil(L, 3) ? idd_default_generator() : luaL_checkudata(L, 3, "iddpm.Generator");
    return lt_push(L, idd_dropout(x, p, g));
}

static const luaL_Reg fns[] = {{"conv2d", l_conv2d}, {"group_norm", l_group_norm}, {"qkv_attention", l_qkv_attention},
                               {"upsample_nearest", l_upsample_nearest}, {"avg_pool2d", l_avg_pool2d},
                               {"timestep_embedding", l_timestep_embedding}, {"dropout", l_dropout}, {NULL, NULL}};

void lt_open_nn(lua_State *L, int mod);
void lt_open_nn(lua_State *L, int mod) {
    lua_pushvalue(L, mod);
    luaL_setfuncs(L, fns, 0);
    lua_pop(L, 1);
}
