/* l_iddpm.c — luaopen_iddpm: the module table that `require "iddpm"` returns.
 * It holds the C sub-modules (tensor, ...) and then runs the pure-Lua half
 * (lua/iddpm/init.lua, embedded at build time as "iddpm.lua") to add nn, diffusion,
 * optim and the recipe drivers. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "l_common.h"
#include "l_dist.h"

#include "iddpm/backend.h"
#include "iddpm/cuda.h"   /* declarations only; the CUDA calls below are under IDDPM_CUDA */

#ifndef IDDPM_VERSION
#define IDDPM_VERSION "0.1.0"
#endif

int luaopen_iddpm_tensor(lua_State *L);
int luaopen_iddpm_io(lua_State *L);
int luaopen_iddpm_optim_c(lua_State *L);
int luaopen_iddpm_diffusion_core(lua_State *L);
int luaopen_iddpm_metrics_core(lua_State *L);
int luaopen_iddpm_data_c(lua_State *L);
int luaopen_iddpm_dist_c(lua_State *L);
int luaopen_iddpm_fs_c(lua_State *L);
void idd_embed_preload(lua_State *L);

typedef struct { const char *name; lua_CFunction open; } submodule;
static const submodule submodules[] = {
    {"tensor", luaopen_iddpm_tensor},
    {"io", luaopen_iddpm_io},
    {"optim_c", luaopen_iddpm_optim_c},
    {"_diffusion", luaopen_iddpm_diffusion_core},   /* C core of iddpm.diffusion */
    {"_metrics", luaopen_iddpm_metrics_core},       /* C core of iddpm.metrics */
    {"_data", luaopen_iddpm_data_c},                /* C core of iddpm.data: batch loader */
    {"_dist", luaopen_iddpm_dist_c},                /* C core of iddpm.dist: MPI/NCCL, launcher */
    {"_fs", luaopen_iddpm_fs_c},                    /* C core of iddpm.fs: files without a shell */
    {NULL, NULL},
};

static int l_num_threads(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) {
        lua_Integer n = luaL_checkinteger(L, 1);
        if (n < 1 || n > IDD_MAX_THREADS)
            return luaL_error(L, "num_threads: %I threads (must be 1 to %d)", n, IDD_MAX_THREADS);
        idd_set_num_threads((int)n);
    }
    lua_pushinteger(L, idd_num_threads());
    return 1;
}

/* iddpm.cuda: available(), reason(), device_name(), synchronize(), memory() -> in use,
 * cached, peak in use, peak reserved; reset_peak_memory(), empty_cache(), tf32(on),
 * precision([name]), conv_impl([name]), profile_reset(), graph_supported(), graph_capture(fn),
 * capturing(), graph_memory() (CUDA graphs, below). A build without CUDA answers
 * available() = false and remembers the precision name (no effect on the CPU). */
static int c_available(lua_State *L) { lua_pushboolean(L, idd_backend_get(IDD_CUDA) != NULL); return 1; }
static int c_reason(lua_State *L) {
    if (idd_backend_get(IDD_CUDA)) lua_pushnil(L); else lua_pushstring(L, idd_backend_unavailable_reason(IDD_CUDA));
    return 1;
}
#ifdef IDDPM_CUDA
static int c_device_name(lua_State *L) { lua_pushstring(L, idd_cuda_device_name()); return 1; }
static int c_synchronize(lua_State *L) {
    if (idd_backend_get(IDD_CUDA) && idd_cuda_synchronize() != IDD_OK) return luaL_error(L, "%s", idd_last_error());
    return 0;
}
static int c_memory(lua_State *L) {
    size_t used = 0, cached = 0, peak_used = 0, peak_reserved = 0;
    if (idd_backend_get(IDD_CUDA)) {
        idd_cuda_memory(&used, &cached);
        idd_cuda_memory_peak(&peak_used, &peak_reserved, 0);
    }
    lua_pushinteger(L, (lua_Integer)used);
    lua_pushinteger(L, (lua_Integer)cached);
    lua_pushinteger(L, (lua_Integer)peak_used);
    lua_pushinteger(L, (lua_Integer)peak_reserved);
    return 4;
}
static int c_reset_peak(lua_State *L) {
    if (idd_backend_get(IDD_CUDA)) idd_cuda_memory_peak(NULL, NULL, 1);
    return 0;
}
static int c_empty_cache(lua_State *L) { if (idd_backend_get(IDD_CUDA)) idd_cuda_empty_cache(); return 0; }
static int c_tf32(lua_State *L) { idd_cuda_set_tf32(lua_toboolean(L, 1)); return 0; }
static int get_precision(void) { return idd_cuda_precision(); }
static void set_precision(int p) { idd_cuda_set_precision(p); }
/* iddpm.cuda.conv_impl([name]) -> "cudnn" | "im2col": the conv2d implementation */
static int c_conv_impl(lua_State *L) {
    static const char *const names[] = {"cudnn", "im2col", NULL};
    if (!lua_isnoneornil(L, 1)) idd_cuda_set_conv_impl(luaL_checkoption(L, 1, NULL, names));
    lua_pushstring(L, names[idd_cuda_conv_impl()]);
    return 1;
}
static int c_profile_reset(lua_State *L) { idd_cuda_profile_reset(); return 0; }

/* ---- CUDA graphs: iddpm.cuda.graph_supported() -> ok, reason; iddpm.cuda.capturing();
 * iddpm.cuda.graph_capture(fn [, warmup = 1]) -> graph, fn's results: fn runs `warmup`
 * times as usual (cuDNN's search, cuBLAS workspaces), then once under capture; the
 * results (tensors made during the capture) are rewritten by every graph:replay().
 * graph:free() releases it (also done by the collector); the graph keeps fn alive (and
 * so the tensors it reads). graph_memory() -> bytes reserved by live graphs.
 * include/iddpm/cuda.h, engine/cuda/graph.cu. */
#define GRAPH_MT "iddpm.cuda.graph"
static const char *graph_unsupported(void) {
    const idd_backend *b = idd_backend_get(IDD_CUDA);
    if (!b) return idd_backend_unavailable_reason(IDD_CUDA);
    if (b == idd_backend_get(IDD_CPU)) return "the cuda device is served by the CPU backend (IDDPM_FAKE_CUDA=1)";
    return NULL;
}
static int c_graph_supported(lua_State *L) {
    const char *why = graph_unsupported();
    lua_pushboolean(L, why == NULL);
    if (why) lua_pushstring(L, why); else lua_pushnil(L);
    return 2;
}
static int c_capturing(lua_State *L) { lua_pushboolean(L, idd_cuda_capturing()); return 1; }
static int c_graph_memory(lua_State *L) {
    lua_pushinteger(L, idd_backend_get(IDD_CUDA) && !graph_unsupported() ? (lua_Integer)idd_cuda_graph_memory() : 0);
    return 1;
}
static idd_cuda_graph **graph_check(lua_State *L) { return (idd_cuda_graph **)luaL_checkudata(L, 1, GRAPH_MT); }
static int g_replay(lua_State *L) {
    idd_cuda_graph **g = graph_check(L);
    if (!*g) return luaL_error(L, "graph:replay: the graph was freed");
    if (idd_cuda_graph_replay(*g) != IDD_OK) return luaL_error(L, "%s", idd_last_error());
    return 0;
}
static int g_free(lua_State *L) {
    idd_cuda_graph **g = graph_check(L);
    idd_cuda_graph_destroy(*g);
    *g = NULL;
    return 0;
}
static int g_tostring(lua_State *L) {
    lua_pushstring(L, *graph_check(L) ? "cuda graph" : "cuda graph (freed)");
    return 1;
}
static int c_graph_capture(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_Integer warm = luaL_optinteger(L, 2, 1);
    const char *why = graph_unsupported();
    if (why) return luaL_error(L, "graph_capture: CUDA graphs need the GPU: %s", why);
    if (idd_cuda_capturing()) return luaL_error(L, "graph_capture: a capture is already running (captures do not nest)");
    lua_settop(L, 1);
    for (lua_Integer i = 0; i < warm; i++) {
        lua_pushvalue(L, 1);
        lua_call(L, 0, 0);
    }
    lua_gc(L, LUA_GCCOLLECT);   /* garbage freed now is not held by the graph */
    idd_cuda_graph **ud = (idd_cuda_graph **)lua_newuserdatauv(L, sizeof *ud, 1);   /* index 2 */
    *ud = NULL;
    luaL_setmetatable(L, GRAPH_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, 2, 1);   /* fn, and what it reads, live as long as the graph */
    if (idd_cuda_graph_begin() != IDD_OK) return luaL_error(L, "%s", idd_last_error());
    lua_pushvalue(L, 1);
    int rc = lua_pcall(L, 0, LUA_MULTRET, 0);
    if (rc != LUA_OK) {
        idd_cuda_graph_abort();
        const char *msg = luaL_tolstring(L, -1, NULL);
        const char *at = strstr(msg, "graph_capture: ");
        if (at == msg) return luaL_error(L, "%s", msg);
        if (at) return luaL_error(L, "%s (in: %s)", at, lua_pushlstring(L, msg, (size_t)(at - msg)));
        return luaL_error(L, "graph_capture: the captured function failed (the capture was aborted): %s", msg);
    }
    if (idd_cuda_graph_end(ud) != IDD_OK) return luaL_error(L, "%s", idd_last_error());
    return lua_gettop(L) - 1;   /* the graph, then fn's results */
}
static void graph_register(lua_State *L) {
    static const luaL_Reg m[] = {{"replay", g_replay}, {"free", g_free}, {NULL, NULL}};
    if (luaL_newmetatable(L, GRAPH_MT)) {
        luaL_newlib(L, m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, g_free);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, g_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
}
#else
static int c_profile_reset(lua_State *L) { return 0; }
static int c_device_name(lua_State *L) { lua_pushstring(L, ""); return 1; }
static int c_synchronize(lua_State *L) { return 0; }
static int c_memory(lua_State *L) {
    for (int i = 0; i < 4; i++) lua_pushinteger(L, 0);
    return 4;
}
static int c_reset_peak(lua_State *L) { return 0; }
static int c_empty_cache(lua_State *L) { return 0; }
/* without CUDA the switches are only remembered, so that scripts behave the same */
static int cpu_precision, cpu_conv_impl;
static int c_tf32(lua_State *L) { cpu_precision = lua_toboolean(L, 1) ? IDD_PREC_TF32 : IDD_PREC_FP32; return 0; }
static int get_precision(void) { return cpu_precision; }
static void set_precision(int p) { cpu_precision = p; }
static int c_conv_impl(lua_State *L) {
    static const char *const names[] = {"cudnn", "im2col", NULL};
    if (!lua_isnoneornil(L, 1)) cpu_conv_impl = luaL_checkoption(L, 1, NULL, names);
    lua_pushstring(L, names[cpu_conv_impl]);
    return 1;
}
/* CUDA graphs: not in this build */
#define NO_GRAPHS "this build has no CUDA (make CUDA=1)"
static int c_graph_supported(lua_State *L) { lua_pushboolean(L, 0); lua_pushstring(L, NO_GRAPHS); return 2; }
static int c_capturing(lua_State *L) { lua_pushboolean(L, 0); return 1; }
static int c_graph_memory(lua_State *L) { lua_pushinteger(L, 0); return 1; }
static int c_graph_capture(lua_State *L) { return luaL_error(L, "graph_capture: CUDA graphs need the GPU: " NO_GRAPHS); }
static void graph_register(lua_State *L) { (void)L; }
#endif

/* iddpm.cuda.precision([name]) -> "fp32" | "tf32" | "bf16": the arithmetic of GPU convs,
 * matmuls and attention (include/iddpm/cuda.h); no argument only queries */
static int c_precision(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) {
        const char *name = luaL_checkstring(L, 1);
        int p = idd_cuda_precision_from_name(name);
        if (p < 0) return luaL_error(L, "iddpm.cuda.precision: '%s' is not fp32, tf32 or bf16", name);
        set_precision(p);
    }
    lua_pushstring(L, idd_cuda_precision_name(get_precision()));
    return 1;
}

/* iddpm.wall_time() -> seconds of a monotonic wall clock (os.clock is CPU time) */
static int c_wall_time(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + 1e-9 * (lua_Number)ts.tv_nsec);
    return 1;
}

/* iddpm.isatty(fd) -> whether file descriptor fd (1 = stdout) is a terminal */
static int c_isatty(lua_State *L) {
    lua_pushboolean(L, isatty((int)luaL_optinteger(L, 1, 1)));
    return 1;
}

static const luaL_Reg cuda_fns[] = {
    {"available", c_available}, {"reason", c_reason}, {"device_name", c_device_name},
    {"synchronize", c_synchronize}, {"memory", c_memory}, {"empty_cache", c_empty_cache},
    {"tf32", c_tf32}, {"precision", c_precision}, {"conv_impl", c_conv_impl}, {"profile_reset", c_profile_reset},
    {"wall_time", c_wall_time}, {"reset_peak_memory", c_reset_peak},
    {"graph_supported", c_graph_supported}, {"graph_capture", c_graph_capture}, {"capturing", c_capturing},
    {"graph_memory", c_graph_memory},
    {NULL, NULL},
};

/* A script may require a sub-module first ("iddpm.recipe" requires "iddpm.tensor"):
 * these preload entries make "iddpm.tensor" & co. load the whole module, so the C
 * sub-modules always come from this binary. Without them Lua's searchers would look
 * for ./iddpm.so and load a second copy of the engine into the process. */
static int load_submodule(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    lua_getglobal(L, "require");
    lua_pushstring(L, "iddpm");
    lua_call(L, 1, 0);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, name);
    return 1;
}

void idd_preload_submodules(lua_State *L);
void idd_preload_submodules(lua_State *L) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    for (const submodule *s = submodules; s->name; s++) {
        const char *key = lua_pushfstring(L, "iddpm.%s", s->name);
        lua_pushcfunction(L, load_submodule);
        lua_setfield(L, -3, key);
        lua_pop(L, 1);   /* the key */
    }
    lua_pop(L, 1);
}

int luaopen_iddpm(lua_State *L);
int luaopen_iddpm(lua_State *L) {
#ifdef IDDPM_CUDA
    idd_dist_pick_gpu();   /* a data-parallel rank: its own GPU only (l_dist.c) */
    /* registers the backend when a GPU is present; otherwise records why not */
    if (idd_cuda_init() != IDD_OK) idd_clear_error();
#endif
    /* IDDPM_FAKE_CUDA=1 (tests only): without a GPU, serve the "cuda" device with the
     * CPU backend, to exercise device plumbing and the cross-backend test script */
    const char *fake = getenv("IDDPM_FAKE_CUDA");
    if (fake && *fake == '1' && !idd_backend_get(IDD_CUDA) && idd_backend_register(IDD_CUDA, &idd_cpu_backend) != IDD_OK)
        return luaL_error(L, "%s", idd_last_error());
    idd_embed_preload(L);
    lua_newtable(L);
    int mod = lua_gettop(L);
    lua_pushstring(L, IDDPM_VERSION);
    lua_setfield(L, mod, "version");
    lua_pushcfunction(L, l_num_threads);
    lua_setfield(L, mod, "num_threads");
    lua_pushcfunction(L, c_wall_time);
    lua_setfield(L, mod, "wall_time");
    lua_pushcfunction(L, c_isatty);
    lua_setfield(L, mod, "isatty");
    luaL_newlib(L, cuda_fns);
    lua_setfield(L, mod, "cuda");
    graph_register(L);
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
