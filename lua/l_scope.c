/* l_scope.c — tensor memory owned by scopes, so model code never frees by hand.
 *
 *   T.scope(fn, ...) -> fn(...)'s results
 *       Runs fn; every tensor handle created while it runs is recorded. When fn returns,
 *       the handles it did not return (directly, or inside returned tables, at any
 *       depth) are released at once; the returned ones move to the enclosing scope, which
 *       releases them in turn unless it returns them too. When fn raises, every handle it
 *       made is released and the error goes on. Releasing drops the handle's reference
 *       only: a tensor the autograd tape saved for the backward, or a view's storage, stays
 *       alive until its last owner lets go (engine refcounts), so a scope never breaks a
 *       graph. A released handle that is used later raises "tensor was freed" (never a
 *       silent wrong value).
 *   T.keep(t, ...) -> t, ...     the tensors outlive every scope (module state, caches)
 *   T.scope_depth()              scopes open now (0: nothing is recorded)
 *   T.peak_bytes([reset])        the most live tensor bytes seen at a tensor's creation
 *                                since the last reset (a CPU/GPU-agnostic peak for tests)
 *
 * Who opens scopes: every Module:forward (nn.class wraps it), each sampling-loop step,
 * each training micro-step (forward + backward), each NLL column. With those, the
 * temporaries of a forward are released when the module that made them returns, the
 * graph of a step when the step ends, without Lua's collector and without x:free() in
 * model code. Outside any scope handles are freed by the collector as before (the
 * binding's GC-pressure rule in l_tensor.c). */
#include "l_common.h"

static const char STACK_KEY = 'S';   /* registry[&STACK_KEY]: the handles of all open scopes, oldest first */
static const char ESC_KEY = 'E';     /* registry[&ESC_KEY]: scratch set of the values a scope returns */
static const char KEPT_KEY = 'K';    /* registry[&KEPT_KEY]: weak-keyed set of kept handles */
static int depth;                    /* scopes open */
static lua_Integer top;              /* handles on the stack */
static size_t peak_bytes;
static size_t high;                  /* the most live tensor bytes since the last collection */

/* Lua's small objects (tensor handles above all) share the C heap with tensor memory.
 * Left to Lua's own pace, dead handles sit in the holes that freed activations leave
 * and split them, so the next step's activations go to fresh memory: a small-model
 * training step's VmHWM was 456 MiB instead of 243 with the same 104 MiB of tensors
 * live at peak. So when an outermost scope closes and this much tensor memory came and
 * went since the last collection (a step's activations), Lua collects: about a
 * millisecond for a UNet's heap, once a step. The scopes themselves allocate nothing
 * per call (one stack and one scratch set for all of them), and Lua runs its generational
 * collector, which frees dead young handles in cheap minor collections as they pile up
 * (a sampling run's VmHWM 283 -> 240 MiB... see README "Memory"). */
#define CAME_AND_WENT ((size_t)32 << 20)

/* called by lt_push with the new handle on top of the stack */
void ls_track(lua_State *L) {
    size_t live = idd_live_bytes();
    if (live > peak_bytes) peak_bytes = live;
    if (live > high) high = live;
    if (!depth) return;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &STACK_KEY);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, ++top);
    lua_pop(L, 1);
}

/* esc[v] = true for every tensor reachable from the value at idx (tables followed,
 * each once) */
static void mark(lua_State *L, int idx, int esc, int level) {
    int t = lua_type(L, idx);
    if (t == LUA_TUSERDATA) {
        if (luaL_testudata(L, idx, IDD_TENSOR_MT)) { lua_pushvalue(L, idx); lua_pushboolean(L, 1); lua_rawset(L, esc); }
        return;
    }
    if (t != LUA_TTABLE || level > 32) return;
    lua_pushvalue(L, idx);
    if (lua_rawget(L, esc) != LUA_TNIL) { lua_pop(L, 1); return; }   /* seen */
    lua_pop(L, 1);
    lua_pushvalue(L, idx); lua_pushboolean(L, 1); lua_rawset(L, esc);
    luaL_checkstack(L, 4, "scope: returned tables nest too deep");
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        mark(L, lua_gettop(L), esc, level + 1);
        lua_pop(L, 1);
    }
}

/* the handles above `start`: escaped ones stay on the stack for the enclosing scope
 * (dropped when there is none), kept ones are left alone, the rest are released */
static void close_scope(lua_State *L, lua_Integer start, int esc) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &STACK_KEY);
    int stack = lua_gettop(L);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &KEPT_KEY);
    int kept = lua_gettop(L);
    lua_Integer w = start;
    for (lua_Integer i = start + 1; i <= top; i++) {
        lua_rawgeti(L, stack, i);
        idd_tensor **box = luaL_testudata(L, -1, IDD_TENSOR_MT);
        if (!box || !*box) { lua_pop(L, 1); continue; }              /* already freed */
        lua_pushvalue(L, -1);
        int is_kept = lua_rawget(L, kept) != LUA_TNIL;
        lua_pop(L, 1);
        if (is_kept) { lua_pop(L, 1); continue; }
        lua_pushvalue(L, -1);
        int escaped = esc && lua_rawget(L, esc) != LUA_TNIL;
        if (esc) lua_pop(L, 1);
        if (escaped) {
            if (depth > 0) lua_rawseti(L, stack, ++w);
            else lua_pop(L, 1);
            continue;
        }
        idd_tensor_release(*box);
        *box = NULL;
        lua_pop(L, 1);
    }
    for (lua_Integer i = w + 1; i <= top; i++) { lua_pushnil(L); lua_rawseti(L, stack, i); }
    top = w;
    lua_pop(L, 2);
}

static int l_scope(lua_State *L) {
    luaL_checkany(L, 1);
    int nargs = lua_gettop(L) - 1;
    lua_Integer start = top;
    depth++;
    int st = lua_pcall(L, nargs, LUA_MULTRET, 0);
    depth--;
    int nres = lua_gettop(L);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &ESC_KEY);
    int esc = lua_gettop(L);
    if (st == LUA_OK)
        for (int i = 1; i <= nres; i++) mark(L, i, esc, 0);
    close_scope(L, start, st == LUA_OK ? esc : 0);
    lua_pushnil(L);                                         /* empty the scratch set */
    while (lua_next(L, esc)) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, esc);
    }
    lua_settop(L, nres);
    if (depth == 0) {
        size_t live = idd_live_bytes();
        if (high > live + CAME_AND_WENT) {
            lua_gc(L, LUA_GCCOLLECT);
            high = idd_live_bytes();
        }
    }
    if (st != LUA_OK) return lua_error(L);                  /* the error object is on top */
    return nres;
}

static int l_keep(lua_State *L) {
    int n = lua_gettop(L);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &KEPT_KEY);
    for (int i = 1; i <= n; i++) {
        if (!luaL_testudata(L, i, IDD_TENSOR_MT)) continue;
        lua_pushvalue(L, i);
        lua_pushboolean(L, 1);
        lua_rawset(L, -3);
    }
    lua_pop(L, 1);
    return n;
}

static int l_scope_depth(lua_State *L) { lua_pushinteger(L, depth); return 1; }

static int l_peak_bytes(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)peak_bytes);
    if (lua_toboolean(L, 1)) peak_bytes = idd_live_bytes();
    return 1;
}

void lt_open_scope(lua_State *L, int module_idx) {
    lua_gc(L, LUA_GCGEN, 0, 0);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &STACK_KEY);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &ESC_KEY);
    lua_newtable(L);                                        /* the kept set, weak keys */
    lua_newtable(L);
    lua_pushstring(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &KEPT_KEY);
    static const luaL_Reg fns[] = {{"scope", l_scope}, {"keep", l_keep}, {"scope_depth", l_scope_depth},
                                   {"peak_bytes", l_peak_bytes}, {NULL, NULL}};
    lua_pushvalue(L, module_idx);
    luaL_setfuncs(L, fns, 0);
    lua_pop(L, 1);
}
