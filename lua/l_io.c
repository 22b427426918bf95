/* l_io.c — file formats for Lua: T.load/T.save (safetensors), and the iddpm.io
 * module: PNG, npz/npy, GIF, IDX (MNIST), CIFAR-10 batches, and JSON encode/decode
 * (the same parser/writer the safetensors header uses). Writers go through a
 * temporary file renamed into place (engine/io). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "iddpm/io.h"
#include "l_common.h"

// ---------------------------------------------------------------- tensor <-> array

/* new tensor holding a copy of a */
static idd_tensor *tensor_from_array(const idd_array *a) {
    return idd_tensor_from_data(a->dtype, a->ndim, a->shape, a->data);
}

/* fill arr (borrowing the tensor's memory via a contiguous CPU copy kept in *hold) */
static int array_from_tensor(lua_State *L, idd_tensor *t, const char *name, idd_array *arr, idd_tensor **hold) {
    idd_tensor *c = t->device == IDD_CPU ? (idd_tensor_retain(t), t) : idd_to_device(t, IDD_CPU);
    if (!c) return lt_error(L);
    idd_tensor *cc = idd_contiguous(c);
    idd_tensor_release(c);
    if (!cc) return lt_error(L);
    memset(arr, 0, sizeof *arr);
    arr->name = (char *)name;
    arr->dtype = cc->dtype;
    arr->ndim = cc->ndim;
    memcpy(arr->shape, cc->shape, sizeof(int64_t) * cc->ndim);
    arr->data = idd_data(cc);
    arr->nbytes = (size_t)idd_numel(cc) * idd_dtype_size(cc->dtype);
    *hold = cc;
    return 0;
}

/* collect {name = tensor} (or an array of {name, tensor}) from the table at idx, sorted by name */
typedef struct { idd_array *arr; idd_tensor **hold; size_t n; } array_set;

static void set_free(array_set *s) {
    for (size_t i = 0; i < s->n; i++) { idd_tensor_release(s->hold[i]); free(s->arr[i].name); }
    free(s->arr);
    free(s->hold);
    s->n = 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(((const idd_array *)a)->name, ((const idd_array *)b)->name);
}

static void collect(lua_State *L, int idx, array_set *s) {
    size_t cap = 0;
    s->n = 0;
    s->arr = NULL;
    s->hold = NULL;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) { lua_pop(L, 2); set_free(s); luaL_error(L, "save: tensor names must be strings"); }
        idd_tensor *t = lt_test(L, -1);
        if (!t) {
            const char *k = lua_tostring(L, -2);
            lua_pop(L, 2);
            set_free(s);
            luaL_error(L, "save: value for '%s' is not a tensor", k);
        }
        if (s->n == cap) {
            cap = cap ? 2 * cap : 64;
            s->arr = realloc(s->arr, cap * sizeof *s->arr);
            s->hold = realloc(s->hold, cap * sizeof *s->hold);
        }
        char *name = strdup(lua_tostring(L, -2));
        array_from_tensor(L, t, name, &s->arr[s->n], &s->hold[s->n]);
        s->n++;
        lua_pop(L, 1);
    }
    /* sort by name, keeping hold[] aligned with arr[] */
    for (size_t i = 1; i < s->n; i++)
        for (size_t j = i; j > 0 && cmp_names(&s->arr[j - 1], &s->arr[j]) > 0; j--) {
            idd_array ta = s->arr[j]; s->arr[j] = s->arr[j - 1]; s->arr[j - 1] = ta;
            idd_tensor *th = s->hold[j]; s->hold[j] = s->hold[j - 1]; s->hold[j - 1] = th;
        }
}

// ---------------------------------------------------------------- safetensors

/* T.load(path) -> {name = tensor}, metadata {key = string} */
static int l_load(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    idd_st_file *f = NULL;
    if (idd_st_read(path, &f) != IDD_OK) return lt_error(L);
    lua_createtable(L, 0, (int)f->n);
    for (size_t i = 0; i < f->n; i++) {
        idd_tensor *t = tensor_from_array(&f->tensors[i]);
        if (!t) { idd_st_free(f); return lt_error(L); }
        lt_push(L, t);
        lua_setfield(L, -2, f->tensors[i].name);
    }
    lua_createtable(L, 0, (int)f->meta.n);
    for (size_t i = 0; i < f->meta.n; i++) {
        lua_pushstring(L, f->meta.values[i]);
        lua_setfield(L, -2, f->meta.keys[i]);
    }
    idd_st_free(f);
    return 2;
}

/* T.save(path, {name = tensor}, [metadata {key = string|number|boolean}]) */
static int l_save(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    idd_strmap meta = {0};
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            if (lua_type(L, -2) != LUA_TSTRING || !(lua_isstring(L, -1) || lua_isboolean(L, -1))) {
                idd_strmap_clear(&meta);
                return luaL_error(L, "save: metadata must map strings to strings (encode tables with iddpm.io.json_encode)");
            }
            const char *v = lua_isboolean(L, -1) ? (lua_toboolean(L, -1) ? "true" : "false") : lua_tostring(L, -1);
            idd_strmap_set(&meta, lua_tostring(L, -2), v);
            lua_pop(L, 1);
        }
    }
    array_set s;
    collect(L, 2, &s);
    idd_status st = idd_st_write(path, s.arr, s.n, meta.n ? &meta : NULL);
    set_free(&s);
    idd_strmap_clear(&meta);
    if (st != IDD_OK) return lt_error(L);
    return 0;
}

// ---------------------------------------------------------------- images

/* io.png_write(path, u8 tensor (H,W,C) or (H,W) [, text_key, text]) */
static int l_png_write(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    idd_tensor *t = lt_check(L, 2);
    char sb[96];
    if (t->dtype != IDD_U8 || (t->ndim != 3 && t->ndim != 2) || (t->ndim == 3 && t->shape[2] != 1 && t->shape[2] != 3 && t->shape[2] != 4))
        return luaL_error(L, "png_write: expected a uint8 tensor (H,W,C) with C = 1, 3 or 4, got %s %s",
                          idd_dtype_name(t->dtype), idd_shape_str(t, sb, 96));
    idd_tensor *c = idd_contiguous(t);
    if (!c) return lt_error(L);
    idd_status st = idd_png_write(path, idd_data(c), (int)c->shape[0], (int)c->shape[1], c->ndim == 3 ? (int)c->shape[2] : 1,
                                  luaL_optstring(L, 3, NULL), luaL_optstring(L, 4, NULL));
    idd_tensor_release(c);
    if (st != IDD_OK) return lt_error(L);
    return 0;
}

/* io.png_read(path [, channels 0|1|3]) -> u8 tensor (H,W,C) */
static int l_png_read(lua_State *L) {
    uint8_t *data = NULL;
    int h, w, c;
    if (idd_png_read(luaL_checkstring(L, 1), (int)luaL_optinteger(L, 2, 0), &data, &h, &w, &c) != IDD_OK) return lt_error(L);
    int64_t shape[3] = {h, w, c};
    idd_tensor *t = idd_tensor_from_data(IDD_U8, 3, shape, data);
    free(data);
    return lt_push(L, t);
}

/* io.gif_write(path, u8 frames (T,H,W,C), delay_centiseconds) */
static int l_gif_write(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    idd_tensor *t = lt_check(L, 2);
    char sb[96];
    if (t->dtype != IDD_U8 || t->ndim != 4 || (t->shape[3] != 1 && t->shape[3] != 3))
        return luaL_error(L, "gif_write: expected uint8 frames (T,H,W,C) with C = 1 or 3, got %s %s", idd_dtype_name(t->dtype),
                          idd_shape_str(t, sb, 96));
    idd_tensor *c = idd_contiguous(t);
    if (!c) return lt_error(L);
    idd_status st = idd_gif_write(path, idd_data(c), (int)c->shape[0], (int)c->shape[1], (int)c->shape[2], (int)c->shape[3],
                                  (int)luaL_optinteger(L, 3, 10));
    idd_tensor_release(c);
    if (st != IDD_OK) return lt_error(L);
    return 0;
}

// ---------------------------------------------------------------- npz / npy

/* io.npz_write(path, {{"arr_0", t0}, {"arr_1", t1}}) — names kept in the given order;
 * bfloat16 tensors are written as float32 (numpy has no bfloat16) */
static int l_npz_write(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)luaL_len(L, 2);
    luaL_argcheck(L, n >= 1 && n <= 64, 2, "npz_write: 1 to 64 arrays as {{name, tensor}, ...}");
    idd_array arr[64];
    idd_tensor *hold[64];
    for (int i = 0; i < n; i++) {
        lua_geti(L, 2, i + 1);
        lua_geti(L, -1, 1);
        lua_geti(L, -2, 2);
        const char *name = lua_tostring(L, -2);
        idd_tensor *t = lt_test(L, -1);
        if (!name || !t) {
            for (int k = 0; k < i; k++) idd_tensor_release(hold[k]);
            return luaL_error(L, "npz_write: entry %d must be {name, tensor}", i + 1);
        }
        /* numpy has no bfloat16: bf16 arrays are written as float32 (exact) */
        idd_tensor *f = t->dtype == IDD_BF16 ? idd_to_dtype(t, IDD_F32) : (idd_tensor_retain(t), t);
        if (!f) {
            for (int k = 0; k < i; k++) idd_tensor_release(hold[k]);
            return lt_error(L);
        }
        array_from_tensor(L, f, name, &arr[i], &hold[i]);
        idd_tensor_release(f);
        lua_pop(L, 3);
    }
    idd_status st = idd_npz_write(path, arr, (size_t)n);
    for (int i = 0; i < n; i++) idd_tensor_release(hold[i]);
    if (st != IDD_OK) return lt_error(L);
    return 0;
}

/* io.npz_read(path) -> {name = tensor} */
static int l_npz_read(lua_State *L) {
    idd_npz *z = NULL;
    if (idd_npz_read(luaL_checkstring(L, 1), &z) != IDD_OK) return lt_error(L);
    lua_newtable(L);
    for (size_t i = 0; i < z->n; i++) {
        idd_tensor *t = tensor_from_array(&z->arrays[i]);
        if (!t) { idd_npz_free(z); return lt_error(L); }
        lt_push(L, t);
        lua_setfield(L, -2, z->arrays[i].name ? z->arrays[i].name : "arr");
    }
    idd_npz_free(z);
    return 1;
}

// ---------------------------------------------------------------- datasets

static int push_array(lua_State *L, idd_array *a) {
    idd_tensor *t = tensor_from_array(a);
    idd_array_clear(a);
    return lt_push(L, t);
}

/* io.mnist_read(images_path, labels_path) -> u8 (N,H,W), int64 (N) */
static int l_mnist_read(lua_State *L) {
    idd_array im = {0}, lb = {0};
    if (idd_mnist_read(luaL_checkstring(L, 1), luaL_checkstring(L, 2), &im, &lb) != IDD_OK) return lt_error(L);
    push_array(L, &im);
    push_array(L, &lb);
    return 2;
}

/* io.cifar10_read(path) -> u8 (N,3,32,32), int64 (N) */
static int l_cifar10_read(lua_State *L) {
    idd_array im = {0}, lb = {0};
    if (idd_cifar10_read(luaL_checkstring(L, 1), &im, &lb) != IDD_OK) return lt_error(L);
    push_array(L, &im);
    push_array(L, &lb);
    return 2;
}

static int l_idx_read(lua_State *L) {
    idd_array a = {0};
    if (idd_idx_read(luaL_checkstring(L, 1), &a) != IDD_OK) return lt_error(L);
    return push_array(L, &a);
}

// ---------------------------------------------------------------- JSON

static void push_json(lua_State *L, const idd_json *v) {
    switch (v->type) {
    case IDD_JSON_NULL: lua_pushnil(L); break;
    case IDD_JSON_BOOL: lua_pushboolean(L, v->boolean); break;
    case IDD_JSON_NUMBER: if (v->is_int) lua_pushinteger(L, (lua_Integer)v->number); else lua_pushnumber(L, v->number); break;
    case IDD_JSON_STRING: lua_pushstring(L, v->str); break;
    case IDD_JSON_ARRAY:
        lua_createtable(L, (int)v->n, 0);
        for (size_t i = 0; i < v->n; i++) { push_json(L, &v->items[i]); lua_rawseti(L, -2, (lua_Integer)i + 1); }
        break;
    case IDD_JSON_OBJECT:
        lua_createtable(L, 0, (int)v->n);
        for (size_t i = 0; i < v->n; i++) { push_json(L, &v->items[i]); lua_setfield(L, -2, v->keys[i]); }
        break;
    }
}

static int l_json_decode(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    idd_json *v = NULL;
    if (idd_json_parse(s, len, &v) != IDD_OK) return lt_error(L);
    push_json(L, v);
    idd_json_free(v);
    return 1;
}

typedef struct { const char *key; int i; } key_ref;
static int cmp_key_ref(const void *a, const void *b) { return strcmp(((const key_ref *)a)->key, ((const key_ref *)b)->key); }

/* tables with keys 1..n are arrays, others objects (keys sorted for a stable text) */
#define JSON_MAX_DEPTH 64   /* tables nested deeper than this are refused (a cycle is refused at once) */
static idd_json *to_json(lua_State *L, int idx, int depth, int seen);
/* a table: marks it in seen (the tables on the path from the root) while it is encoded */
static idd_json *table_to_json(lua_State *L, int idx, int depth, int seen);

static idd_json *to_json(lua_State *L, int idx, int depth, int seen) {
    idx = lua_absindex(L, idx);
    if (depth > JSON_MAX_DEPTH) {
        idd_error("json_encode: tables nested deeper than %d levels", JSON_MAX_DEPTH);
        return NULL;
    }
    if (lua_type(L, idx) == LUA_TTABLE) {
        if (!lua_checkstack(L, 8)) { idd_error("json_encode: out of Lua stack at depth %d", depth); return NULL; }
        lua_pushvalue(L, idx);
        if (lua_rawget(L, seen) != LUA_TNIL) {
            lua_pop(L, 1);
            idd_error("json_encode: the table at depth %d contains itself (a cycle)", depth);
            return NULL;
        }
        lua_pop(L, 1);
        lua_pushvalue(L, idx);
        lua_pushboolean(L, 1);
        lua_rawset(L, seen);
        idd_json *r = table_to_json(L, idx, depth, seen);
        lua_pushvalue(L, idx);
        lua_pushnil(L);
        lua_rawset(L, seen);
        return r;
    }
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return idd_json_new_null();
    case LUA_TBOOLEAN: return idd_json_new_bool(lua_toboolean(L, idx));
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) return idd_json_new_int(lua_tointeger(L, idx));
        if (!isfinite(lua_tonumber(L, idx))) { idd_error("json_encode: %f has no JSON form", lua_tonumber(L, idx)); return NULL; }
        return idd_json_new_number(lua_tonumber(L, idx));
    case LUA_TSTRING: return idd_json_new_string(lua_tostring(L, idx));
    default:
        idd_error("json_encode: cannot encode a %s", luaL_typename(L, idx));
        return NULL;
    }
}

static idd_json *table_to_json(lua_State *L, int idx, int depth, int seen) {
    {
        lua_Integer n = luaL_len(L, idx);
        lua_Integer count = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) { count++; lua_pop(L, 1); }
        if (n > 0 && n == count) {
            idd_json *arr = idd_json_new_array();
            for (lua_Integer i = 1; i <= n; i++) {
                lua_geti(L, idx, i);
                idd_json *item = to_json(L, -1, depth + 1, seen);
                lua_pop(L, 1);
                if (!item || idd_json_append(arr, item) != IDD_OK) { idd_json_free(arr); return NULL; }
            }
            return arr;
        }
        /* object: gather (key string, value) pairs, then sort by key for a stable text */
        lua_newtable(L);
        int kt = lua_gettop(L);
        lua_newtable(L);
        int vt = lua_gettop(L);
        int nk = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            int kty = lua_type(L, -2);
            if (kty != LUA_TSTRING && kty != LUA_TNUMBER) {
                lua_pop(L, 4);
                idd_error("json_encode: table keys must be strings or numbers");
                return NULL;
            }
            lua_pushvalue(L, -2);
            lua_tostring(L, -1);          /* converts the copy, never the iteration key */
            lua_rawseti(L, kt, ++nk);
            lua_rawseti(L, vt, nk);       /* pops the value */
        }
        key_ref *refs = malloc(sizeof *refs * (size_t)(nk + 1));
        if (!refs) { lua_pop(L, 2); idd_error_status(IDD_ENOMEM, "json_encode: out of memory"); return NULL; }
        for (int i = 1; i <= nk; i++) {
            lua_rawgeti(L, kt, i);
            refs[i - 1].key = lua_tostring(L, -1);   /* kept alive by kt */
            refs[i - 1].i = i;
            lua_pop(L, 1);
        }
        qsort(refs, (size_t)nk, sizeof *refs, cmp_key_ref);
        idd_json *obj = idd_json_new_object();
        for (int i = 0; i < nk && obj; i++) {
            lua_rawgeti(L, vt, refs[i].i);
            idd_json *item = to_json(L, -1, depth + 1, seen);
            lua_pop(L, 1);
            if (!item || idd_json_set(obj, refs[i].key, item) != IDD_OK) { idd_json_free(obj); obj = NULL; }
        }
        free(refs);
        lua_pop(L, 2);
        return obj;
    }
}

static int l_json_encode(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    lua_newtable(L);   /* 2: the tables being encoded, to find cycles */
    idd_json *v = to_json(L, 1, 0, 2);
    if (!v) return lt_error(L);
    char *s = NULL;
    size_t len = 0;
    idd_status st = idd_json_write(v, &s, &len);
    idd_json_free(v);
    if (st != IDD_OK) return lt_error(L);
    lua_pushlstring(L, s, len);
    free(s);
    return 1;
}

static const luaL_Reg io_functions[] = {
    {"load", l_load}, {"save", l_save}, {"png_write", l_png_write}, {"png_read", l_png_read},
    {"gif_write", l_gif_write}, {"npz_write", l_npz_write}, {"npz_read", l_npz_read},
    {"mnist_read", l_mnist_read}, {"cifar10_read", l_cifar10_read}, {"idx_read", l_idx_read},
    {"json_decode", l_json_decode}, {"json_encode", l_json_encode}, {NULL, NULL}};

int luaopen_iddpm_io(lua_State *L);
int luaopen_iddpm_io(lua_State *L) {
    luaL_newlib(L, io_functions);
    /* T.load / T.save live on the tensor module too */
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, "iddpm.tensor");
    if (lua_istable(L, -1)) {
        lua_pushcfunction(L, l_load);
        lua_setfield(L, -2, "load");
        lua_pushcfunction(L, l_save);
        lua_setfield(L, -2, "save");
    }
    lua_pop(L, 2);
    return 1;
}
