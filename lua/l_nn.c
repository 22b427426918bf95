/* l_nn.c — Lua bindings of the UNet layer ops (include/iddpm/nn.h), installed on the
 * tensor module: T.conv2d, T.group_norm, T.qkv_attention, T.upsample_nearest,
 * T.avg_pool2d, T.timestep_embedding, T.dropout, T.norm_conv; and for the FID Inception
 * T.max_pool2d, T.resize_bilinear, T.conv2d_relu (forward only). */
#include "iddpm/kernels.h"
#include "iddpm/nn.h"
#include "l_common.h"

static idd_tensor *opt_tensor(lua_State *L, int idx) { return lua_isnoneornil(L, idx) ? NULL : lt_check(L, idx); }

/* T.conv2d(x, w [, b] [, stride=1] [, padding=0 or {pad_h, pad_w}]) */
static int l_conv2d(lua_State *L) {
    idd_tensor *x = lt_check(L, 1), *w = lt_check(L, 2), *b = opt_tensor(L, 3);
    int stride = (int)luaL_optinteger(L, 4, 1), ph, pw;
    if (lua_istable(L, 5)) {
        lua_geti(L, 5, 1);
        lua_geti(L, 5, 2);
        luaL_argcheck(L, lua_isinteger(L, -2) && lua_isinteger(L, -1), 5, "padding table must be {pad_h, pad_w}");
        ph = (int)lua_tointeger(L, -2);
        pw = (int)lua_tointeger(L, -1);
        lua_pop(L, 2);
    } else {
        ph = pw = (int)luaL_optinteger(L, 5, 0);
    }
    return lt_push(L, lua_toboolean(L, lua_upvalueindex(1)) ? idd_conv2d_relu(x, w, b, stride, ph, pw)
                                                             : idd_conv2d_hw(x, w, b, stride, ph, pw));
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

/* T.avg_pool2d(x [, k=2, stride=k, pad=0, count_include_pad=true]): the 2x2 stride-2
 * case is differentiable; any other window is the forward-only general pool. */
static int l_avg_pool2d(lua_State *L) {
    idd_tensor *x = lt_check(L, 1);
    int k = (int)luaL_optinteger(L, 2, 2), stride = (int)luaL_optinteger(L, 3, k), pad = (int)luaL_optinteger(L, 4, 0);
    bool cip = lua_isnoneornil(L, 5) ? true : lua_toboolean(L, 5);
    if (k == 2 && stride == 2 && pad == 0) return lt_push(L, idd_avg_pool2x(x));
    return lt_push(L, idd_avg_pool2d(x, k, stride, pad, cip));
}

/* T.max_pool2d(x, k [, stride=k, pad=0]) — forward only */
static int l_max_pool2d(lua_State *L) {
    idd_tensor *x = lt_check(L, 1);
    int k = (int)luaL_checkinteger(L, 2), stride = (int)luaL_optinteger(L, 3, k), pad = (int)luaL_optinteger(L, 4, 0);
    return lt_push(L, idd_max_pool2d(x, k, stride, pad));
}

/* T.resize_bilinear(x, {H, W} [, mode = "tf1" | "half_pixel"]) — forward only; uint8 in is fine */
static int l_resize_bilinear(lua_State *L) {
    idd_tensor *x = lt_check(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_geti(L, 2, 1);
    lua_geti(L, 2, 2);
    int Ho = (int)luaL_checkinteger(L, -2), Wo = (int)luaL_checkinteger(L, -1);
    lua_pop(L, 2);
    static const char *const modes[] = {"tf1", "half_pixel", NULL};
    int mode = luaL_checkoption(L, 3, "tf1", modes) == 0 ? IDD_RESIZE_TF1 : IDD_RESIZE_HALF_PIXEL;
    return lt_push(L, idd_resize_bilinear(x, Ho, Wo, mode));
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

/* T.norm_conv(x, groups, gamma, beta, w, b [, opts]): conv2d(dropout(group_norm(x))) with
 * the norm recomputed in the backward; opts: scale, shift (N,C), silu=false, eps=1e-5,
 * dropout=0 (p), generator (default generator), stride=1, padding=0 */
static int l_norm_conv(lua_State *L) {
    idd_tensor *x = lt_check(L, 1);
    int groups = (int)luaL_checkinteger(L, 2);
    idd_tensor *gamma = opt_tensor(L, 3), *beta = opt_tensor(L, 4), *w = lt_check(L, 5), *b = opt_tensor(L, 6);
    idd_tensor *scale = NULL, *shift = NULL;
    bool silu = false;
    double eps = 1e-5, p = 0;
    idd_generator *g = NULL;
    int stride = 1, pad = 0;
    if (!lua_isnoneornil(L, 7)) {
        luaL_checktype(L, 7, LUA_TTABLE);
        lua_getfield(L, 7, "scale"); if (!lua_isnil(L, -1)) scale = lt_check(L, -1);
        lua_getfield(L, 7, "shift"); if (!lua_isnil(L, -1)) shift = lt_check(L, -1);
        lua_getfield(L, 7, "silu"); silu = lua_toboolean(L, -1);
        lua_getfield(L, 7, "eps"); eps = luaL_optnumber(L, -1, 1e-5);
        lua_getfield(L, 7, "dropout"); p = luaL_optnumber(L, -1, 0);
        lua_getfield(L, 7, "generator"); if (!lua_isnil(L, -1)) g = luaL_checkudata(L, -1, "iddpm.Generator");
        lua_getfield(L, 7, "stride"); stride = (int)luaL_optinteger(L, -1, 1);
        lua_getfield(L, 7, "padding"); pad = (int)luaL_optinteger(L, -1, 0);
        lua_pop(L, 8);   /* scale and shift stay referenced by opts (the table is at 7) */
    }
    return lt_push(L, idd_norm_conv(x, groups, gamma, beta, scale, shift, silu, eps, p, g, w, b, stride, pad, pad));
}

static const luaL_Reg fns[] = {{"norm_conv", l_norm_conv}, {"conv2d", l_conv2d}, {"group_norm", l_group_norm}, {"qkv_attention", l_qkv_attention},
                               {"upsample_nearest", l_upsample_nearest}, {"avg_pool2d", l_avg_pool2d},
                               {"max_pool2d", l_max_pool2d}, {"resize_bilinear", l_resize_bilinear},
                               {"timestep_embedding", l_timestep_embedding}, {"dropout", l_dropout}, {NULL, NULL}};

void lt_open_nn(lua_State *L, int mod);
void lt_open_nn(lua_State *L, int mod) {
    lua_pushvalue(L, mod);
    luaL_setfuncs(L, fns, 0);
    /* T.conv2d_relu(x, w, b, stride, pad): the same arguments, forward only, max(0, .) fused */
    lua_pushboolean(L, 1);
    lua_pushcclosure(L, l_conv2d, 1);
    lua_setfield(L, -2, "conv2d_relu");
    lua_pop(L, 1);
}
