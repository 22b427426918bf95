/* json_mini.c — recursive-descent JSON parser and dotted-path lookup for the tests.
 * Handles the whole JSON grammar except that \u escapes outside ASCII become '?'. */
#include "json_mini.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *p, *end;
    char *err;
    size_t errlen;
    int failed;
} parser;

static void fail(parser *ps, const char *msg) {
    if (!ps->failed) snprintf(ps->err, ps->errlen, "json: %s at byte offset %ld", msg, (long)(ps->end - ps->p));
    ps->failed = 1;
}

static void skip_ws(parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\r' || *ps->p == '\t')) ps->p++;
}

static json_value *new_value(json_type t) {
    json_value *v = calloc(1, sizeof *v);
    if (v) v->type = t;
    return v;
}

static char *parse_string_raw(parser *ps) {
    /* at the opening quote */
    ps->p++;
    size_t cap = 16, len = 0;
    char *s = malloc(cap);
    while (ps->p < ps->end && *ps->p != '"') {
        char c = *ps->p++;
        if (c == '\\') {
            if (ps->p >= ps->end) break;
            char e = *ps->p++;
            switch (e) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': {
                unsigned code = 0;
                for (int i = 0; i < 4 && ps->p < ps->end; i++, ps->p++) {
                    char h = *ps->p;
                    code = code * 16 + (unsigned)(h >= 'a' ? h - 'a' + 10 : h >= 'A' ? h - 'A' + 10 : h - '0');
                }
                c = code < 128 ? (char)code : '?';
                break;
            }
            default: c = e;
            }
        }
        if (len + 2 > cap) s = realloc(s, cap *= 2);
        s[len++] = c;
    }
    if (ps->p >= ps->end) { fail(ps, "unterminated string"); free(s); return NULL; }
    ps->p++;
    s[len] = 0;
    return s;
}

static json_value *parse_value(parser *ps, int depth);

static void push(json_value *v, size_t *cap, json_value *item, char *key) {
    if (v->n == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        v->items = realloc(v->items, sizeof *v->items * *cap);
        if (v->type == JSON_OBJ) v->keys = realloc(v->keys, sizeof *v->keys * *cap);
    }
    v->items[v->n] = item;
    if (v->type == JSON_OBJ) v->keys[v->n] = key;
    v->n++;
}

static json_value *parse_value(parser *ps, int depth) {
    if (depth > 200) { fail(ps, "nesting too deep"); return NULL; }
    skip_ws(ps);
    if (ps->p >= ps->end) { fail(ps, "unexpected end"); return NULL; }
    char c = *ps->p;
    if (c == '{' || c == '[') {
        json_value *v = new_value(c == '{' ? JSON_OBJ : JSON_ARR);
        size_t cap = 0;
        ps->p++;
        skip_ws(ps);
        char close = c == '{' ? '}' : ']';
        if (ps->p < ps->end && *ps->p == close) { ps->p++; return v; }
        for (;;) {
            char *key = NULL;
            if (v->type == JSON_OBJ) {
                skip_ws(ps);
                if (ps->p >= ps->end || *ps->p != '"') { fail(ps, "expected a key"); json_free(v); return NULL; }
                key = parse_string_raw(ps);
                skip_ws(ps);
                if (!key || ps->p >= ps->end || *ps->p != ':') { fail(ps, "expected ':'"); free(key); json_free(v); return NULL; }
                ps->p++;
            }
            json_value *item = parse_value(ps, depth + 1);
            if (!item) { free(key); json_free(v); return NULL; }
            push(v, &cap, item, key);
            skip_ws(ps);
            if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
            if (ps->p < ps->end && *ps->p == close) { ps->p++; return v; }
            fail(ps, "expected ',' or a closing bracket");
            json_free(v);
            return NULL;
        }
    }
    if (c == '"') {
        char *s = parse_string_raw(ps);
        if (!s) return NULL;
        json_value *v = new_value(JSON_STR);
        v->str = s;
        return v;
    }
    if (ps->end - ps->p >= 4 && strncmp(ps->p, "true", 4) == 0) { ps->p += 4; json_value *v = new_value(JSON_BOOL); v->num = 1; return v; }
    if (ps->end - ps->p >= 5 && strncmp(ps->p, "false", 5) == 0) { ps->p += 5; return new_value(JSON_BOOL); }
    if (ps->end - ps->p >= 4 && strncmp(ps->p, "null", 4) == 0) { ps->p += 4; return new_value(JSON_NULL); }
    /* number (also NaN / Infinity as Python's json writes them) */
    char buf[64];
    size_t k = 0;
    while (ps->p < ps->end && k < sizeof buf - 1 && strchr("+-0123456789.eEnaNIfinity", *ps->p)) buf[k++] = *ps->p++;
    buf[k] = 0;
    char *endp;
    double d = strtod(buf, &endp);
    if (k == 0 || *endp) { fail(ps, "bad value"); return NULL; }
    json_value *v = new_value(JSON_NUM);
    v->num = d;
    return v;
}

json_value *json_parse(const char *text, size_t len, char *err, size_t errlen) {
    parser ps = {text, text + len, err, errlen, 0};
    json_value *v = parse_value(&ps, 0);
    if (v) {
        skip_ws(&ps);
        if (ps.p != ps.end) { fail(&ps, "trailing characters"); json_free(v); v = NULL; }
    }
    return v;
}

json_value *json_parse_file(const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "json: cannot open %s", path); return NULL; }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    size_t got = fread(buf, 1, (size_t)len, f);
    fclose(f);
    json_value *v = json_parse(buf, got, err, errlen);
    free(buf);
    return v;
}

void json_free(json_value *v) {
    if (!v) return;
    for (size_t i = 0; i < v->n; i++) {
        json_free(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->str);
    free(v);
}

const json_value *json_get(const json_value *root, const char *path) {
    if (!root) return NULL;
    if (!*path) return root;
    if (root->type == JSON_OBJ) {
        for (size_t i = 0; i < root->n; i++) {
            size_t kl = strlen(root->keys[i]);
            if (strncmp(root->keys[i], path, kl) == 0 && (path[kl] == '.' || path[kl] == 0)) {
                const json_value *r = json_get(root->items[i], path[kl] ? path + kl + 1 : path + kl);
                if (r) return r;
            }
        }
        return NULL;
    }
    if (root->type == JSON_ARR) { /* numeric index */
        char *e;
        long idx = strtol(path, &e, 10);
        if (e == path || (*e && *e != '.') || idx < 0 || (size_t)idx >= root->n) return NULL;
        return json_get(root->items[idx], *e ? e + 1 : e);
    }
    return NULL;
}

static long count_nums(const json_value *v) {
    if (v->type == JSON_NUM) return 1;
    if (v->type != JSON_ARR) return -1;
    long n = 0;
    for (size_t i = 0; i < v->n; i++) {
        long k = count_nums(v->items[i]);
        if (k < 0) return -1;
        n += k;
    }
    return n;
}

static void fill_nums(const json_value *v, double *out, long *k) {
    if (v->type == JSON_NUM) { out[(*k)++] = v->num; return; }
    for (size_t i = 0; i < v->n; i++) fill_nums(v->items[i], out, k);
}

double *json_get_doubles(const json_value *root, const char *path, long *n) {
    const json_value *v = json_get(root, path);
    if (!v) return NULL;
    long cnt = count_nums(v);
    if (cnt < 0) return NULL;
    double *out = malloc(sizeof(double) * (size_t)(cnt ? cnt : 1));
    long k = 0;
    fill_nums(v, out, &k);
    *n = cnt;
    return out;
}
