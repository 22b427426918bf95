/* l_common.h — what every lua/l_*.c binding shares: the Tensor userdata (a boxed
 * idd_tensor*), argument checks, the 1-based-dim convention, and the error bridge.
 *
 * Index convention: Lua dims and positions are 1-based (dim 1 = batch), negative dims
 * count from the end (-1 = last); conversion happens only here. Timestep and label
 * VALUES are 0-based, as in the official code. */
#ifndef IDDPM_L_COMMON_H
#define IDDPM_L_COMMON_H

#include <lauxlib.h>
#include <lua.h>

#include "iddpm/ops.h"

#define IDD_TENSOR_MT "iddpm.Tensor"

/* push a new tensor (steals the reference); raises the engine error if t is NULL */
int lt_push(lua_State *L, idd_tensor *t);
/* the tensor at idx, or a raised "bad argument" */
idd_tensor *lt_check(lua_State *L, int idx);
idd_tensor *lt_test(lua_State *L, int idx);        /* NULL if not a tensor */
/* the tensor at idx, or a number at idx converted to a 0-d tensor (of like's float
 * dtype and device) that is pushed on the stack, so Lua owns it */
idd_tensor *lt_check_or_number(lua_State *L, int idx, const idd_tensor *like);
/* raise the engine's error message */
int lt_error(lua_State *L);
/* 1-based Lua dim -> engine dim (negatives pass through) */
int lt_dim(lua_State *L, int idx);
int lt_optdim(lua_State *L, int idx, int def);
/* read a shape from a table at idx, or from varargs idx..top; returns ndim */
int lt_shape(lua_State *L, int idx, int64_t *shape);
idd_dtype lt_optdtype(lua_State *L, int idx, idd_dtype def);

void lt_open_ops(lua_State *L, int methods_idx, int module_idx);
void lt_open_autograd(lua_State *L, int module_idx);
void lt_open_nn(lua_State *L, int module_idx);
void lt_open_scope(lua_State *L, int module_idx);
/* record the new tensor handle on top of the stack in the open T.scope (l_scope.c) */
void ls_track(lua_State *L);

#endif
