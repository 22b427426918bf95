/* stub_iddpm.c — a stand-in for the engine's luaopen_iddpm, for testing the program
 * alone (tests/repl_test.sh). Not part of the real build.
 *   iddpm.version = "0.1.0"
 *   iddpm.busy([seconds=60])  spins in C, polling idd_interrupted; raises "interrupted" */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "lauxlib.h"
#include "lua.h"

#include "iddpm/core.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int busy(lua_State *L) {
    double limit = luaL_optnumber(L, 1, 60), t0 = now();
    volatile double acc = 0;
    for (long i = 0;; i++) {
        acc += 1e-9 * (double)i;
        if ((i & 0xffff) == 0) {
            if (idd_interrupted) return luaL_error(L, "interrupted");
            if (now() - t0 > limit) break;
        }
    }
    lua_pushnumber(L, acc);
    return 1;
}

int luaopen_iddpm(lua_State *L) {
    lua_newtable(L);
    lua_pushliteral(L, "0.1.0");
    lua_setfield(L, -2, "version");
    lua_pushcfunction(L, busy);
    lua_setfield(L, -2, "busy");
    return 1;
}
