/* l_ops.c — Tensor math methods and operators: x + y, x:exp(), x:sum(2), x:matmul(y),
 * T.cat, T.where... Each binding checks its arguments, calls one engine op (ops.h)
 * and pushes the result. Numbers are accepted wherever a tensor operand is. */
#include <math.h>
#include <string.h>

#include "l_common.h"

/* a op b where either side may be a number */
static int binop(lua_State *L, idd_binop op) {
    idd_tensor *a = lt_test(L, 1), *b = lt_test(L, 2);
    if (a && b) return lt_push(L, idd_binary(op, a, b));
    if (a) return lt_push(L, idd_binary_scalar(op, a, luaL_checknumber(L, 2), false));
    if (b) return lt_push(L, idd_binary_scalar(op, b, luaL_checknumber(L, 1), true));
    return luaL_error(L, "%s: expected a tensor operand", idd_binop_name(op));
}
static int m_add(lua_State *L) { return binop(L, IDD_BIN_ADD); }
static int m_sub(lua_State *L) { return binop(L, IDD_BIN_SUB); }
static int m_mul(lua_State *L) { return binop(L, IDD_BIN_MUL); }
static int m_div(lua_State *L) { return binop(L, IDD_BIN_DIV); }
static int m_pow(lua_State *L) { return binop(L, IDD_BIN_POW); }
static int m_maximum(lua_State *L) { return binop(L, IDD_BIN_MAX); }
static int m_minimum(lua_State *L) { return binop(L, IDD_BIN_MIN); }
static int m_gt(lua_State *L) { return binop(L, IDD_BIN_GT); }
static int m_lt(lua_State *L) { return binop(L, IDD_BIN_LT); }
static int m_ge(lua_State *L) { return binop(L, IDD_BIN_GE); }
static int m_le(lua_State *L) { return binop(L, IDD_BIN_LE); }
static int m_eq(lua_State *L) { return binop(L, IDD_BIN_EQ); }
static int m_ne(lua_State *L) { return binop(L, IDD_BIN_NE); }

static int unop(lua_State *L, idd_unop op) { return lt_push(L, idd_unary(op, lt_check(L, 1))); }
static int m_neg(lua_State *L) { return unop(L, IDD_UN_NEG); }
static int m_exp(lua_State *L) { return unop(L, IDD_UN_EXP); }
static int m_log(lua_State *L) { return unop(L, IDD_UN_LOG); }
static int m_sqrt(lua_State *L) { return unop(L, IDD_UN_SQRT); }
static int m_rsqrt(lua_State *L) { return unop(L, IDD_UN_RSQRT); }
static int m_tanh(lua_State *L) { return unop(L, IDD_UN_TANH); }
static int m_sigmoid(lua_State *L) { return unop(L, IDD_UN_SIGMOID); }
static int m_silu(lua_State *L) { return unop(L, IDD_UN_SILU); }
static int m_abs(lua_State *L) { return unop(L, IDD_UN_ABS); }
static int m_square(lua_State *L) { return unop(L, IDD_UN_SQUARE); }
static int m_sin(lua_State *L) { return unop(L, IDD_UN_SIN); }
static int m_cos(lua_State *L) { return unop(L, IDD_UN_COS); }
static int m_reciprocal(lua_State *L) { return unop(L, IDD_UN_RECIP); }
static int m_floor(lua_State *L) { return unop(L, IDD_UN_FLOOR); }
static int m_sign(lua_State *L) { return unop(L, IDD_UN_SIGN); }

static int m_clamp(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    double lo = luaL_optnumber(L, 2, -HUGE_VAL), hi = luaL_optnumber(L, 3, HUGE_VAL);
    luaL_argcheck(L, lo <= hi, 3, "clamp: min must not exceed max");
    return lt_push(L, idd_clamp(t, lo, hi));
}
static int m_affine(lua_State *L) {   /* x:affine(scale, shift) = x*scale + shift */
    idd_tensor *t = lt_check(L, 1);
    return lt_push(L, idd_affine(t, luaL_checknumber(L, 2), luaL_optnumber(L, 3, 0)));
}

/* reductions: x:sum() over all, x:sum(dim [, keepdim]) */
static int reduce_args(lua_State *L, int *dim, bool *keep) {
    *dim = lua_isnoneornil(L, 2) ? IDD_ALL_DIMS : lt_dim(L, 2);
    *keep = lua_toboolean(L, 3);
    return 0;
}
static int m_sum(lua_State *L) { int d; bool k; reduce_args(L, &d, &k); return lt_push(L, idd_sum(lt_check(L, 1), d, k)); }
static int m_mean(lua_State *L) { int d; bool k; reduce_args(L, &d, &k); return lt_push(L, idd_mean(lt_check(L, 1), d, k)); }
static int m_logsumexp(lua_State *L) { int d; bool k; reduce_args(L, &d, &k); return lt_push(L, idd_logsumexp(lt_check(L, 1), d, k)); }
static int m_var(lua_State *L) {   /* x:var([dim [, keepdim [, unbiased=true]]]) */
    int d; bool k;
    reduce_args(L, &d, &k);
    bool unb = lua_isnoneornil(L, 4) ? true : lua_toboolean(L, 4);
    return lt_push(L, idd_var(lt_check(L, 1), d, k, unb));
}
static int minmax(lua_State *L, bool is_max) {
    idd_tensor *t = lt_check(L, 1);
    if (lt_test(L, 2) || (lua_isnumber(L, 2) && !lua_isinteger(L, 2)))
        return binop(L, is_max ? IDD_BIN_MAX : IDD_BIN_MIN);
    int d; bool k;
    reduce_args(L, &d, &k);
    idd_tensor *arg = NULL;
    idd_tensor *v = is_max ? idd_max(t, d, k, d == IDD_ALL_DIMS ? NULL : &arg) : idd_min(t, d, k, d == IDD_ALL_DIMS ? NULL : &arg);
    lt_push(L, v);
    if (!arg) return 1;
    /* indices 1-based for Lua */
    idd_tensor *a1 = idd_binary_scalar(IDD_BIN_ADD, arg, 1, false);
    idd_tensor_release(arg);
    lt_push(L, a1);
    return 2;
}
static int m_max(lua_State *L) { return minmax(L, true); }
static int m_min(lua_State *L) { return minmax(L, false); }
static int m_softmax(lua_State *L) { return lt_push(L, idd_softmax(lt_check(L, 1), lt_optdim(L, 2, -1))); }
static int m_mean_flat(lua_State *L) { return lt_push(L, idd_mean_flat(lt_check(L, 1))); }

static int m_matmul(lua_State *L) { return lt_push(L, idd_matmul(lt_check(L, 1), lt_check(L, 2))); }

/* x:index_select(dim, idx): idx an int tensor or a Lua array of 1-based positions */
static int m_index_select(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    int d = lt_dim(L, 2);
    idd_tensor *idx = lt_test(L, 3), *own = NULL;
    if (!idx) {
        luaL_checktype(L, 3, LUA_TTABLE);
        int64_t n = luaL_len(L, 3);
        own = idd_tensor_new(IDD_I64, IDD_CPU, 1, &n);
        if (!own) return lt_error(L);
        for (int64_t i = 0; i < n; i++) {
            lua_geti(L, 3, i + 1);
            ((int64_t *)idd_data(own))[i] = lua_tointeger(L, -1) - 1;
            lua_pop(L, 1);
        }
        idx = own;
    }
    idd_tensor *r = idd_index_select(t, d, idx);
    idd_tensor_release(own);
    return lt_push(L, r);
}

/* T.cat({a, b, ...}, dim) */
static int f_cat(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    int n = (int)luaL_len(L, 1);
    luaL_argcheck(L, n >= 1, 1, "cat: expected at least one tensor");
    int dim = lt_optdim(L, 2, 0);
    /* the userdata keeps the array alive, and frees it on a Lua error */
    idd_tensor **ts = lua_newuserdatauv(L, sizeof *ts * (size_t)n, 0);
    for (int i = 0; i < n; i++) {
        lua_geti(L, 1, i + 1);
        ts[i] = lt_test(L, -1);
        lua_pop(L, 1);
        if (!ts[i]) return luaL_error(L, "cat: entry %d is not a tensor", i + 1);
    }
    return lt_push(L, idd_concat(n, ts, dim));
}

static int f_where(lua_State *L) {
    idd_tensor *c = lt_check(L, 1);
    idd_tensor *a = lt_check_or_number(L, 2, c), *b = lt_check_or_number(L, 3, c);
    return lt_push(L, idd_where(c, a, b));
}

static const luaL_Reg ops_methods[] = {
    {"add", m_add}, {"sub", m_sub}, {"mul", m_mul}, {"div", m_div}, {"pow", m_pow}, {"maximum", m_maximum},
    {"minimum", m_minimum}, {"gt", m_gt}, {"lt", m_lt}, {"ge", m_ge}, {"le", m_le}, {"eq", m_eq}, {"ne", m_ne},
    {"neg", m_neg}, {"exp", m_exp}, {"log", m_log}, {"sqrt", m_sqrt}, {"rsqrt", m_rsqrt}, {"tanh", m_tanh},
    {"sigmoid", m_sigmoid}, {"silu", m_silu}, {"abs", m_abs}, {"square", m_square}, {"sin", m_sin},
    {"cos", m_cos}, {"reciprocal", m_reciprocal}, {"floor", m_floor}, {"sign", m_sign}, {"clamp", m_clamp},
    {"affine", m_affine}, {"sum", m_sum}, {"mean", m_mean}, {"var", m_var}, {"logsumexp", m_logsumexp},
    {"max", m_max}, {"min", m_min}, {"softmax", m_softmax}, {"mean_flat", m_mean_flat}, {"matmul", m_matmul},
    {"index_select", m_index_select}, {NULL, NULL}};

static const luaL_Reg ops_functions[] = {{"cat", f_cat}, {"where", f_where}, {NULL, NULL}};

static const luaL_Reg metamethods[] = {{"__add", m_add}, {"__sub", m_sub}, {"__mul", m_mul}, {"__div", m_div},
                                       {"__pow", m_pow}, {"__unm", m_neg}, {NULL, NULL}};

void lt_open_ops(lua_State *L, int meth, int mod) {
    lua_pushvalue(L, meth);
    luaL_setfuncs(L, ops_methods, 0);
    lua_newtable(L);
    luaL_setfuncs(L, metamethods, 0);
    lua_setfield(L, meth, "__metamethods");
    lua_pop(L, 1);
    lua_pushvalue(L, mod);
    luaL_setfuncs(L, ops_functions, 0);
    lua_pop(L, 1);
}
