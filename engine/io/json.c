/* json.c — a small strict JSON (RFC 8259) parser and compact writer, enough for
 * safetensors headers and the config stored in __metadata__. Recursive descent with a
 * depth limit (IDD_JSON_MAX_DEPTH), so malformed or hostile input gives an error with a
 * line/column, never a crash. Duplicate object keys and \u0000 are rejected.
 * Numbers: integer literals are kept exactly in int64 when they fit; all numbers also
 * get a double via strtod (assumes the "C" LC_NUMERIC locale). */
#include "io_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *s;
    size_t len, pos;
    int depth;
} parser;

static idd_status perr(const parser *p, const char *what) {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < p->pos && i < p->len; i++) {
        if (p->s[i] == '\n') { line++; col = 1; }
        else col++;
    }
    if (p->pos >= p->len)
        return idd_error("json: line %zu, column %zu: %s (unexpected end of input)", line, col, what);
    return idd_error("json: line %zu, column %zu: %s", line, col, what);
}

static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') p->pos++;
        else break;
    }
}

static int peek(const parser *p) { return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1; }

static void free_contents(idd_json *v) {
    if (!v) return;
    free(v->str);
    for (size_t i = 0; i < v->n; i++) {
        free_contents(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof *v);
}

void idd_json_free(idd_json *v) {
    if (!v) return;
    free_contents(v);
    free(v);
}

static idd_status parse_value(parser *p, idd_json *out);

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static void put_utf8(iobuf *b, unsigned cp) {
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (unsigned char)(0xc0 | (cp >> 6)); u[1] = (unsigned char)(0x80 | (cp & 0x3f)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (unsigned char)(0xe0 | (cp >> 12)); u[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (unsigned char)(0x80 | (cp & 0x3f)); n = 3;
    } else {
        u[0] = (unsigned char)(0xf0 | (cp >> 18)); u[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f)); u[3] = (unsigned char)(0x80 | (cp & 0x3f)); n = 4;
    }
    iobuf_put(b, u, n);
}

/* p->pos at the opening quote; *out malloc'd NUL-terminated string */
static idd_status parse_string(parser *p, char **out) {
    iobuf b = {0};
    *out = NULL;
    p->pos++;
    for (;;) {
        if (p->pos >= p->len) { iobuf_free(&b); return perr(p, "unterminated string"); }
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') { p->pos++; break; }
        if (c < 0x20) { iobuf_free(&b); return perr(p, "control character in string"); }
        if (c != '\\') {
            size_t start = p->pos;
            while (p->pos < p->len && p->s[p->pos] != '"' && p->s[p->pos] != '\\' &&
                   (unsigned char)p->s[p->pos] >= 0x20)
                p->pos++;
            iobuf_put(&b, p->s + start, p->pos - start);
            continue;
        }
        if (p->pos + 1 >= p->len) { p->pos++; iobuf_free(&b); return perr(p, "unterminated string"); }
        char e = p->s[p->pos + 1];
        p->pos += 2;
        switch (e) {
        case '"': iobuf_put(&b, "\"", 1); break;
        case '\\': iobuf_put(&b, "\\", 1); break;
        case '/': iobuf_put(&b, "/", 1); break;
        case 'b': iobuf_put(&b, "\b", 1); break;
        case 'f': iobuf_put(&b, "\f", 1); break;
        case 'n': iobuf_put(&b, "\n", 1); break;
        case 'r': iobuf_put(&b, "\r", 1); break;
        case 't': iobuf_put(&b, "\t", 1); break;
        case 'u': {
            unsigned cp;
            if (p->pos + 4 > p->len || !hex4(p->s + p->pos, &cp)) {
                iobuf_free(&b);
                return perr(p, "bad \\u escape");
            }
            p->pos += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                unsigned lo;
                if (p->pos + 6 > p->len || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u' ||
                    !hex4(p->s + p->pos + 2, &lo) || lo < 0xdc00 || lo >= 0xe000) {
                    iobuf_free(&b);
                    return perr(p, "unpaired UTF-16 surrogate in \\u escape");
                }
                p->pos += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp < 0xe000) {
                iobuf_free(&b);
                return perr(p, "unpaired UTF-16 surrogate in \\u escape");
            }
            if (cp == 0) { iobuf_free(&b); return perr(p, "\\u0000 in string is not supported"); }
            put_utf8(&b, cp);
            break;
        }
        default:
            p->pos -= 1;
            iobuf_free(&b);
            return perr(p, "bad escape in string");
        }
    }
    if (!b.data) iobuf_put(&b, "", 0);
    if (b.oom) { iobuf_free(&b); return idd_error_status(IDD_ENOMEM, "json: out of memory"); }
    *out = b.data;
    return IDD_OK;
}

static idd_status parse_number(parser *p, idd_json *out) {
    size_t start = p->pos;
    int is_int = 1;
    if (peek(p) == '-') p->pos++;
    if (peek(p) == '0') p->pos++;
    else if (peek(p) >= '1' && peek(p) <= '9') while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    else return perr(p, "bad number");
    if (peek(p) == '.') {
        is_int = 0;
        p->pos++;
        if (!(peek(p) >= '0' && peek(p) <= '9')) return perr(p, "bad number: digit expected after '.'");
        while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    }
    if (peek(p) == 'e' || peek(p) == 'E') {
        is_int = 0;
        p->pos++;
        if (peek(p) == '+' || peek(p) == '-') p->pos++;
        if (!(peek(p) >= '0' && peek(p) <= '9')) return perr(p, "bad number: digit expected in exponent");
        while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    }
    size_t n = p->pos - start;
    char tmp[64];
    char *buf = n < sizeof tmp ? tmp : malloc(n + 1);
    if (!buf) return idd_error_status(IDD_ENOMEM, "json: out of memory");
    memcpy(buf, p->s + start, n);
    buf[n] = 0;
    out->type = IDD_JSON_NUMBER;
    out->number = strtod(buf, NULL);
    if (is_int) {
        /* exact int64 when it fits */
        const char *d = buf + (buf[0] == '-');
        int neg = buf[0] == '-';
        uint64_t v = 0;
        int fits = 1;
        for (; *d; d++) {
            unsigned dig = (unsigned)(*d - '0');
            if (v > (UINT64_MAX - dig) / 10) { fits = 0; break; }
            v = v * 10 + dig;
        }
        if (fits && (neg ? v <= (uint64_t)INT64_MAX + 1 : v <= (uint64_t)INT64_MAX)) {
            out->is_int = 1;
            out->integer = neg ? (int64_t)(0 - v) : (int64_t)v;
        }
    }
    if (buf != tmp) free(buf);
    return IDD_OK;
}

static int match_lit(parser *p, const char *lit) {
    size_t n = strlen(lit);
    if (p->len - p->pos >= n && memcmp(p->s + p->pos, lit, n) == 0) {
        p->pos += n;
        return 1;
    }
    return 0;
}

static idd_status grow(idd_json *v, size_t *cap, int with_keys) {
    if (v->n < *cap) return IDD_OK;
    size_t nc = *cap ? *cap * 2 : 4;
    idd_json *it = realloc(v->items, nc * sizeof *it);
    if (!it) return idd_error_status(IDD_ENOMEM, "json: out of memory");
    v->items = it;
    if (with_keys) {
        char **k = realloc(v->keys, nc * sizeof *k);
        if (!k) return idd_error_status(IDD_ENOMEM, "json: out of memory");
        v->keys = k;
    }
    *cap = nc;
    return IDD_OK;
}

static idd_status parse_array(parser *p, idd_json *out) {
    size_t cap = 0;
    idd_status st;
    out->type = IDD_JSON_ARRAY;
    p->pos++;
    skip_ws(p);
    if (peek(p) == ']') { p->pos++; return IDD_OK; }
    for (;;) {
        if ((st = grow(out, &cap, 0))) return st;
        memset(&out->items[out->n], 0, sizeof out->items[0]);
        out->n++;
        if ((st = parse_value(p, &out->items[out->n - 1]))) return st;
        skip_ws(p);
        int c = peek(p);
        if (c == ',') { p->pos++; continue; }
        if (c == ']') { p->pos++; return IDD_OK; }
        return perr(p, "expected ',' or ']' in array");
    }
}

/* keys with where they start, sorted to find duplicates in O(n log n) (a header with
 * 100k tensor names was quadratic when each key was compared with all before it) */
typedef struct { const char *key; size_t pos; } key_at;
static int cmp_key_at(const void *a, const void *b) {
    const key_at *x = a, *y = b;
    int c = strcmp(x->key, y->key);
    return c ? c : (x->pos > y->pos) - (x->pos < y->pos);
}

static idd_status check_unique_keys(parser *p, key_at *ka, size_t n) {
    qsort(ka, n, sizeof *ka, cmp_key_at);
    for (size_t i = 1; i < n; i++)
        if (strcmp(ka[i - 1].key, ka[i].key) == 0) {
            p->pos = ka[i].pos;   /* the second occurrence */
            return perr(p, "duplicate key in object");
        }
    return IDD_OK;
}

static idd_status parse_object_items(parser *p, idd_json *out, key_at **ka, size_t *ka_cap) {
    size_t cap = 0;
    idd_status st;
    for (;;) {
        skip_ws(p);
        if (peek(p) != '"') return perr(p, "expected a string key in object");
        size_t key_pos = p->pos;
        char *key;
        if ((st = parse_string(p, &key))) return st;
        if ((st = grow(out, &cap, 1))) { free(key); return st; }
        if (out->n == *ka_cap) {
            size_t nc = *ka_cap ? 2 * *ka_cap : 8;
            key_at *k2 = realloc(*ka, nc * sizeof *k2);
            if (!k2) { free(key); return idd_error_status(IDD_ENOMEM, "json: out of memory"); }
            *ka = k2;
            *ka_cap = nc;
        }
        memset(&out->items[out->n], 0, sizeof out->items[0]);
        out->keys[out->n] = key;
        (*ka)[out->n].key = key;
        (*ka)[out->n].pos = key_pos;
        out->n++;
        skip_ws(p);
        if (peek(p) != ':') return perr(p, "expected ':' after key in object");
        p->pos++;
        if ((st = parse_value(p, &out->items[out->n - 1]))) return st;
        skip_ws(p);
        int c = peek(p);
        if (c == ',') { p->pos++; continue; }
        if (c == '}') { p->pos++; return check_unique_keys(p, *ka, out->n); }
        return perr(p, "expected ',' or '}' in object");
    }
}

static idd_status parse_object(parser *p, idd_json *out) {
    out->type = IDD_JSON_OBJECT;
    p->pos++;
    skip_ws(p);
    if (peek(p) == '}') { p->pos++; return IDD_OK; }
    key_at *ka = NULL;
    size_t ka_cap = 0;
    idd_status st = parse_object_items(p, out, &ka, &ka_cap);
    free(ka);
    return st;
}

static idd_status parse_value(parser *p, idd_json *out) {
    idd_status st;
    skip_ws(p);
    int c = peek(p);
    switch (c) {
    case '{':
    case '[':
        if (++p->depth > IDD_JSON_MAX_DEPTH) return perr(p, "nesting too deep");
        st = c == '{' ? parse_object(p, out) : parse_array(p, out);
        p->depth--;
        return st;
    case '"':
        out->type = IDD_JSON_STRING;
        return parse_string(p, &out->str);
    case 't':
        if (match_lit(p, "true")) { out->type = IDD_JSON_BOOL; out->boolean = 1; return IDD_OK; }
        break;
    case 'f':
        if (match_lit(p, "false")) { out->type = IDD_JSON_BOOL; out->boolean = 0; return IDD_OK; }
        break;
    case 'n':
        if (match_lit(p, "null")) { out->type = IDD_JSON_NULL; return IDD_OK; }
        break;
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, out);
    }
    return perr(p, "unexpected character, expected a value");
}

idd_status idd_json_parse(const char *text, size_t len, idd_json **out) {
    *out = NULL;
    parser p = {text, len, 0, 0};
    idd_json *v = calloc(1, sizeof *v);
    if (!v) return idd_error_status(IDD_ENOMEM, "json: out of memory");
    idd_status st = parse_value(&p, v);
    if (st == IDD_OK) {
        skip_ws(&p);
        if (p.pos < p.len) st = perr(&p, "trailing characters after the value");
    }
    if (st != IDD_OK) {
        idd_json_free(v);
        return st;
    }
    *out = v;
    return IDD_OK;
}

const idd_json *idd_json_get(const idd_json *obj, const char *key) {
    if (!obj || obj->type != IDD_JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->n; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

// ---- writer -------------------------------------------------------------------------

/* The shortest %.Ng (N = 1..17) that reads back as the same double: 0.1 is written
 * "0.1", not "0.10000000000000001"; every value still round-trips exactly. */
static void write_double(iobuf *b, double x) {
    char buf[32];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) break;
    }
    iobuf_puts(b, buf);
}

static idd_status write_value(const idd_json *v, iobuf *b, int depth) {
    if (depth > IDD_JSON_MAX_DEPTH) return idd_error("json: write: nesting too deep");
    switch (v->type) {
    case IDD_JSON_NULL: iobuf_puts(b, "null"); break;
    case IDD_JSON_BOOL: iobuf_puts(b, v->boolean ? "true" : "false"); break;
    case IDD_JSON_NUMBER:
        if (v->is_int) iobuf_printf(b, "%lld", (long long)v->integer);
        else if (!isfinite(v->number)) return idd_error("json: write: NaN or Inf is not valid JSON");
        else write_double(b, v->number);
        break;
    case IDD_JSON_STRING: iobuf_json_quote(b, v->str ? v->str : ""); break;
    case IDD_JSON_ARRAY:
    case IDD_JSON_OBJECT: {
        int obj = v->type == IDD_JSON_OBJECT;
        iobuf_puts(b, obj ? "{" : "[");
        for (size_t i = 0; i < v->n; i++) {
            if (i) iobuf_puts(b, ",");
            if (obj) {
                iobuf_json_quote(b, v->keys[i]);
                iobuf_puts(b, ":");
            }
            idd_status st = write_value(&v->items[i], b, depth + 1);
            if (st) return st;
        }
        iobuf_puts(b, obj ? "}" : "]");
        break;
    }
    default: return idd_error("json: write: bad value type %d", (int)v->type);
    }
    return IDD_OK;
}

idd_status idd_json_write(const idd_json *v, char **out, size_t *len) {
    iobuf b = {0};
    *out = NULL;
    if (len) *len = 0;
    idd_status st = write_value(v, &b, 0);
    if (st == IDD_OK && b.oom) st = idd_error_status(IDD_ENOMEM, "json: out of memory");
    if (st != IDD_OK) {
        iobuf_free(&b);
        return st;
    }
    *out = b.data;
    if (len) *len = b.len;
    return IDD_OK;
}

// ---- builders -------------------------------------------------------------------------

static idd_json *new_value(idd_json_type t) {
    idd_json *v = calloc(1, sizeof *v);
    if (v) v->type = t;
    return v;
}

idd_json *idd_json_new_null(void) { return new_value(IDD_JSON_NULL); }
idd_json *idd_json_new_array(void) { return new_value(IDD_JSON_ARRAY); }
idd_json *idd_json_new_object(void) { return new_value(IDD_JSON_OBJECT); }

idd_json *idd_json_new_bool(int b) {
    idd_json *v = new_value(IDD_JSON_BOOL);
    if (v) v->boolean = !!b;
    return v;
}

idd_json *idd_json_new_number(double x) {
    idd_json *v = new_value(IDD_JSON_NUMBER);
    if (v) v->number = x;
    return v;
}

idd_json *idd_json_new_int(int64_t x) {
    idd_json *v = new_value(IDD_JSON_NUMBER);
    if (v) {
        v->number = (double)x;
        v->is_int = 1;
        v->integer = x;
    }
    return v;
}

idd_json *idd_json_new_string(const char *s) {
    idd_json *v = new_value(IDD_JSON_STRING);
    if (!v) return NULL;
    size_t n = strlen(s) + 1;
    v->str = malloc(n);
    if (!v->str) { free(v); return NULL; }
    memcpy(v->str, s, n);
    return v;
}

/* move *item into slot (the struct is copied, the heap shell freed) */
static idd_status add_item(idd_json *c, idd_json *item, char *key) {
    size_t cap = c->n; /* exact-size growth: builders are not hot */
    idd_status st = grow(c, &cap, c->type == IDD_JSON_OBJECT);
    if (st) return st;
    c->items[c->n] = *item;
    if (key) c->keys[c->n] = key;
    c->n++;
    free(item);
    return IDD_OK;
}

idd_status idd_json_append(idd_json *arr, idd_json *item) {
    if (!item) return idd_error_status(IDD_ENOMEM, "json: out of memory");
    if (!arr || arr->type != IDD_JSON_ARRAY) {
        idd_json_free(item);
        return idd_error("json: append: not an array");
    }
    idd_status st = add_item(arr, item, NULL);
    if (st) idd_json_free(item);
    return st;
}

idd_status idd_json_set(idd_json *obj, const char *key, idd_json *item) {
    if (!item) return idd_error_status(IDD_ENOMEM, "json: out of memory");
    if (!obj || obj->type != IDD_JSON_OBJECT) {
        idd_json_free(item);
        return idd_error("json: set: not an object");
    }
    for (size_t i = 0; i < obj->n; i++)
        if (strcmp(obj->keys[i], key) == 0) {
            free_contents(&obj->items[i]);
            obj->items[i] = *item;
            free(item);
            return IDD_OK;
        }
    size_t n = strlen(key) + 1;
    char *k = malloc(n);
    if (!k) {
        idd_json_free(item);
        return idd_error_status(IDD_ENOMEM, "json: out of memory");
    }
    memcpy(k, key, n);
    idd_status st = add_item(obj, item, k);
    if (st) {
        free(k);
        idd_json_free(item);
    }
    return st;
}
