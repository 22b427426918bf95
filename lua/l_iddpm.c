/* l_iddpm.c — luaopen_iddpm: the module table that `require "iddpm"` returns.
 * It holds the C sub-modules (tensor, ...) and then runs the pure-Lua half
 * (lua/iddpm/init.lua, embedded at build time as "iddpm.lua") to add nn, diffusion,
 * optim and the recipe drivers. */
#include "l_common.h"

#ifndef IDDPM_VERSION
#define IDDPM_VERSION "0.1.0"
#endif

int luaopen_iddpm_tensor(lua_State *L);
int luaopen_iddpm_io(lua_State *L);
int luaopen_iddpm_optim_c(lua_State *L);
int luaopen_iddpm_diffusion_core(lua_State *L);
int luaopen_iddpm_data_c(lua_State *L);
void idd_embed_preload(lua_State *L);

typedef struct { const char *name; lua_CFunction open; } submodule;
static const submodule submodules[] = {
    {"tensor", luaopen_iddpm_tensor},
    {"io", luaopen_iddpm_io},
    {"optim_c", luaopen_iddpm_optim_c},
    {"_diffusion", luaopen_iddpm_diffusion_core},   /* C core of iddpm.diffusion */
    {"_data", luaopen_iddpm_data_c},                /* C core of iddpm.data: batch loader */
    {NULL, NULL},
};

static int l_num_threads(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) idd_set_num_threads((int)luaL_checkinteger(L, 1));
    lua_pushinteger(L, idd_num_threads());
    return 1;
}

int luaopen_iddpm(lua_State *L);
int luaopen_iddpm(lua_State *L) {
    idd_embed_preload(L);
    lua_newtable(L);
    int mod = lua_gettop(L);
    lua_pushstring(L, IDDPM_VERSION);
    lua_setfield(L, mod, "version");
    lua_pushcfunction(L, l_num_threads);
    lua_setfield(L, mod, "num_threads");
    for (const submodule *s = submodules; s->name; s++) {
        luaL_requiref(L, lua_pushfstring(L, "iddpm.%s", s->name), s->open, 0);
        lua_setfield(L, mod, s->name);
        lua_pop(L, 1);   /* the pushed name */
    }
    /* the pure-Lua half: returns function(iddpm) that fills in the rest */
    lua_getglobal(L, "require");
    lua_pushstring(L, "iddpm.lua");
    lua_call(L, 1, 1);
    if (lua_isfunction(L, -1)) {
        lua_pushvalue(L, mod);
        lua_call(L, 1, 0);
    } else {
        lua_pop(L, 1);
    }
    lua_settop(L, mod);
    return 1;
}
