/* test_io.c — engine/io: round trips for every format, safetensors against truncated and
 * corrupted files (each must fail with a clear message, never crash), the public UNet
 * reference checkpoint, writer crash safety (RLIMIT_FSIZE makes a write fail midway),
 * and a cross-check with numpy via tests/ref/check_npz.py when /usr/bin/python3 has it.
 * Files go to a fresh /tmp/idd_io_test.<pid> directory, removed at the end. */
#define _POSIX_C_SOURCE 200809L
#include <gif_lib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "iddpm/io.h"

/* the official UNet reference, written by tests/ref/make_unet_public.py (the suite runs
 * from the repository root) */
#define REF_ST "tests/ref/unet_public.safetensors"

static char dir[256];

static const char *P(const char *name) {
    static char buf[16][512]; /* rotating: callers keep a copy if they need it long */
    static int k;
    k = (k + 1) % 16;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    if (n) fwrite(p, 1, n, f);
    fclose(f);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 1);
    *n = fread(b, 1, (size_t)len, f);
    fclose(f);
    return b;
}

static int file_exists(const char *p) {
    struct stat s;
    return stat(p, &s) == 0;
}

/* expect failure whose message contains want */
static void expect_err(const char *name, idd_status st, const char *want) {
    char d[1400];
    const char *m = idd_last_error();
    int ok = st != IDD_OK && (!want || strstr(m, want));
    snprintf(d, sizeof d, "status %d, message \"%s\", wanted \"%s\"", (int)st, st ? m : "", want ? want : "");
    check_report(ok, name, d);
}

static void expect_ok(const char *name, idd_status st) {
    check_report(st == IDD_OK, name, st ? idd_last_error() : NULL);
}

// ---- JSON --------------------------------------------------------------------------

static void test_json(void) {
    const char *txt = " {\"a\": [1, -2, 3.5e2, true, false, null], \"s\": \"x\\n\\u00e9\\ud83d\\ude00\\\"\","
                      " \"o\": {\"big\": 9007199254740993, \"neg\": -9223372036854775808}} ";
    idd_json *v = NULL;
    idd_status st = idd_json_parse(txt, strlen(txt), &v);
    expect_ok("json: parse a nested document", st);
    if (st) return;
    const idd_json *a = idd_json_get(v, "a"), *s = idd_json_get(v, "s"), *o = idd_json_get(v, "o");
    check_report(a && a->n == 6 && a->items[0].is_int && a->items[1].integer == -2 &&
                 !a->items[2].is_int && a->items[2].number == 350 && a->items[3].boolean &&
                 a->items[5].type == IDD_JSON_NULL, "json: array values", NULL);
    check_report(s && strcmp(s->str, "x\n\xc3\xa9\xf0\x9f\x98\x80\"") == 0, "json: escapes and surrogate pairs", NULL);
    const idd_json *big = idd_json_get(o, "big"), *neg = idd_json_get(o, "neg");
    check_report(big && big->is_int && big->integer == 9007199254740993LL && neg && neg->is_int &&
                 neg->integer == INT64_MIN, "json: exact int64", NULL);
    char *out = NULL;
    size_t len;
    st = idd_json_write(v, &out, &len);
    idd_json *v2 = NULL;
    if (!st) st = idd_json_parse(out, len, &v2);
    char *out2 = NULL;
    if (!st) st = idd_json_write(v2, &out2, NULL);
    check_report(!st && strcmp(out, out2) == 0, "json: write/parse/write is stable", out);
    free(out);
    free(out2);
    idd_json_free(v);
    idd_json_free(v2);

    /* builders */
    idd_json *obj = idd_json_new_object(), *arr = idd_json_new_array();
    idd_json_append(arr, idd_json_new_int(1));
    idd_json_append(arr, idd_json_new_number(0.25));
    idd_json_set(obj, "lr", idd_json_new_number(1e-4));
    idd_json_set(obj, "mult", arr);
    idd_json_set(obj, "name", idd_json_new_string("ci\"far"));
    idd_json_set(obj, "lr", idd_json_new_number(2e-4));
    st = idd_json_write(obj, &out, NULL);
    /* numbers are written in the shortest form that reads back exactly: 2e-4 as 0.0002 */
    check_report(!st && strcmp(out, "{\"lr\":0.0002,\"mult\":[1,0.25],\"name\":\"ci\\\"far\"}") == 0,
                 "json: builders and replace", out);
    free(out);
    idd_json_free(obj);

    struct { const char *txt, *want; } bad[] = {
        {"", "expected a value"}, {"{", "expected a string key"}, {"{\"a\" 1}", "expected ':'"},
        {"[1,]", "expected a value"}, {"[1 2]", "expected ',' or ']'"}, {"{\"a\":1,\"a\":2}", "duplicate key"},
        {"\"abc", "unterminated string"}, {"\"a\\x\"", "bad escape"}, {"\"\\ud800\"", "surrogate"},
        {"\"\\u0000\"", "\\u0000"}, {"01", "trailing"}, {"1.", "digit expected"}, {"-", "bad number"},
        {"tru", "expected a value"}, {"{} x", "trailing"}, {"\"a\tb\"", "control character"},
        {"[\"\\u12\"]", "bad \\u escape"}, {"{\"a\":1,}", "expected a string key"},
    };
    int all = 1;
    char detail[512] = "";
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        v = NULL;
        st = idd_json_parse(bad[i].txt, strlen(bad[i].txt), &v);
        if (st == IDD_OK || v || !strstr(idd_last_error(), bad[i].want) || !strstr(idd_last_error(), "line 1")) {
            all = 0;
            snprintf(detail, sizeof detail, "'%s' gave '%s'", bad[i].txt, st ? idd_last_error() : "OK");
            idd_json_free(v);
        }
    }
    check_report(all, "json: malformed inputs give located errors", detail);

    size_t deep = 100000;
    char *d = malloc(deep + 1);
    memset(d, '[', deep);
    st = idd_json_parse(d, deep, &v);
    expect_err("json: 100000 nested arrays hit the depth limit", st, "nesting too deep");
    memset(d, '[', 64);
    memset(d + 64, ']', 64);
    st = idd_json_parse(d, 128, &v);
    expect_ok("json: 64 nested arrays are fine", st);
    idd_json_free(v);
    free(d);
    /* not NUL-terminated: parse must stop at len */
    st = idd_json_parse("[1]garbage", 3, &v);
    expect_ok("json: honours len (no NUL needed)", st);
    idd_json_free(v);
}

// ---- safetensors -------------------------------------------------------------------

static float f32v[6];
static double f64v[3];
static int64_t stepv = 123456789012LL;
static uint8_t rngv[5];

static void fill_st(idd_array *t) {
    for (int i = 0; i < 6; i++) f32v[i] = (float)i * 0.5f - 1;
    for (int i = 0; i < 3; i++) f64v[i] = i / 3.0;
    for (int i = 0; i < 5; i++) rngv[i] = (uint8_t)(i * 51);
    memset(t, 0, 5 * sizeof *t);
    t[0] = (idd_array){.name = "w.f32", .dtype = IDD_F32, .ndim = 2, .shape = {2, 3}, .data = f32v, .nbytes = 24};
    t[1] = (idd_array){.name = "w.f64", .dtype = IDD_F64, .ndim = 1, .shape = {3}, .data = f64v, .nbytes = 24};
    t[2] = (idd_array){.name = "step", .dtype = IDD_I64, .ndim = 0, .data = &stepv, .nbytes = 8};
    t[3] = (idd_array){.name = "rng", .dtype = IDD_U8, .ndim = 1, .shape = {5}, .data = rngv, .nbytes = 5};
    t[4] = (idd_array){.name = "empty", .dtype = IDD_F32, .ndim = 2, .shape = {0, 4}, .data = NULL, .nbytes = 0};
}

static int same_array(const idd_array *a, const idd_array *b) {
    return a && b && a->dtype == b->dtype && a->ndim == b->ndim &&
           memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim) == 0 && a->nbytes == b->nbytes &&
           (a->nbytes == 0 || memcmp(a->data, b->data, a->nbytes) == 0);
}

/* write a file from a header string and a data blob */
static void st_craft(const char *path, const char *hdr, const void *data, size_t dlen, int64_t hlen_override) {
    size_t hl = strlen(hdr);
    uint64_t n = hlen_override >= 0 ? (uint64_t)hlen_override : hl;
    unsigned char *buf = malloc(8 + hl + dlen);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(n >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    if (dlen) memcpy(buf + 8 + hl, data, dlen);
    write_bytes(path, buf, 8 + hl + dlen);
    free(buf);
}

static void test_safetensors(void) {
    idd_array t[5];
    fill_st(t);
    idd_strmap meta = {0};
    idd_strmap_set(&meta, "config", "{\"model_channels\": 32, \"name\": \"q\\\"uote\\n\\u00e9\"}");
    idd_strmap_set(&meta, "format_version", "1");
    char path[512];
    snprintf(path, sizeof path, "%s", P("out.safetensors"));
    expect_ok("st: write", idd_st_write(path, t, 5, &meta));
    idd_st_file *f = NULL;
    idd_status st = idd_st_read(path, &f);
    expect_ok("st: read back", st);
    if (st) return;
    int all = f->n == 5;
    for (int i = 0; i < 5; i++) all = all && same_array(idd_st_find(f, t[i].name), &t[i]);
    check_report(all, "st: round trip of F32, F64, I64 scalar, U8, empty", NULL);
    check_report(strcmp(idd_strmap_get(&f->meta, "config"), idd_strmap_get(&meta, "config")) == 0 &&
                 strcmp(idd_strmap_get(&f->meta, "format_version"), "1") == 0, "st: metadata round trip", NULL);
    idd_st_free(f);

    /* layout: header multiple of 8, F64/I64 first, each begin aligned */
    size_t n;
    unsigned char *raw = slurp(path, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | raw[i];
    idd_json *h = NULL;
    idd_json_parse((char *)raw + 8, hl, &h);
    int aligned = hl % 8 == 0 && h;
    for (size_t i = 0; h && i < h->n; i++) {
        const idd_json *o = idd_json_get(&h->items[i], "data_offsets");
        const idd_json *dt = idd_json_get(&h->items[i], "dtype");
        if (!o) continue;
        int64_t b = o->items[0].integer;
        size_t es = strcmp(dt->str, "U8") == 0 ? 1 : strcmp(dt->str, "F32") == 0 ? 4 : 8;
        aligned = aligned && b % (int64_t)es == 0;
    }
    check_report(aligned, "st: header padded to 8, every tensor aligned to its element size", NULL);
    idd_json_free(h);

    /* every truncation of a valid file fails cleanly */
    int trunc_ok = 1;
    char detail[1200] = "";
    char tp[512];
    snprintf(tp, sizeof tp, "%s", P("trunc.safetensors"));
    for (size_t len = 0; len < n; len++) {
        write_bytes(tp, raw, len);
        f = NULL;
        st = idd_st_read(tp, &f);
        const char *m = idd_last_error();
        if (st == IDD_OK || f || !strstr(m, tp)) {
            trunc_ok = 0;
            snprintf(detail, sizeof detail, "length %zu: %s", len, st ? m : "accepted");
            idd_st_free(f);
            break;
        }
        if (len == 4) expect_err("st: 4-byte file says truncated", st, "file is truncated");
        if (len == 100) expect_err("st: 100-byte file says header bigger than file", st, "file is truncated: header says");
    }
    check_report(trunc_ok, "st: every truncation length is rejected with the file named", detail);
    /* random byte corruption of the header (fixed seed): accepted or rejected, never a crash
     * (meaningful under -fsanitize=address,undefined or valgrind) */
    unsigned seed = 12345u, nok = 0, nerr = 0;
    printf("# st fuzz seed %u\n", seed);
    unsigned char *fz = malloc(n);
    for (int it = 0; it < 3000; it++) {
        memcpy(fz, raw, n);
        for (int k = 0; k < 1 + it % 4; k++) {
            seed = seed * 1103515245u + 12345u;
            size_t pos = (seed >> 8) % (8 + hl);
            seed = seed * 1103515245u + 12345u;
            fz[pos] = (unsigned char)(seed >> 16);
        }
        write_bytes(tp, fz, n);
        f = NULL;
        if (idd_st_read(tp, &f) == IDD_OK) nok++, idd_st_free(f);
        else nerr++;
    }
    free(fz);
    snprintf(detail, sizeof detail, "%u accepted, %u rejected", nok, nerr);
    check_report(nok + nerr == 3000 && nerr > 2000, "st: 3000 randomly corrupted headers handled", detail);
    printf("# %s\n", detail);
    /* trailing garbage */
    unsigned char *longer = malloc(n + 3);
    memcpy(longer, raw, n);
    memcpy(longer + n, "xyz", 3);
    write_bytes(tp, longer, n + 3);
    expect_err("st: trailing bytes rejected", idd_st_read(tp, &f), "trailing bytes");
    free(longer);
    free(raw);

    /* corrupted headers */
    float d6[6] = {0};
    char cp[512];
    snprintf(cp, sizeof cp, "%s", P("bad.safetensors"));
    struct { const char *hdr; size_t dlen; int64_t hl; const char *want; } bad[] = {
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}", 24, -1, "json: line 1"},
        {"not json at all!", 0, -1, "header: json"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 12, -1,
         "tensor 'x' data_offsets [0, 12] do not match shape (2,3) F32 (24 bytes)"},
        {"{\"x\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -1, "unknown or unsupported dtype 'Q7'"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 1000000, "file is truncated: header says 1000000 bytes"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 200000000, "exceeds the limit"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]}}", 12, -1, "run past the data buffer"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, -1, "overlap"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, -1, "leave a gap"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, -1, "shape[0] is not a non-negative integer"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}", 8, -1, "not a non-negative integer"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, -1, "begin > end"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, -1, "data_offsets"},
        {"{\"x\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -1, "\"dtype\""},
        {"{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, -1, "\"shape\""},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -1, "duplicate key"},
        {"{\"__metadata__\":{\"a\":1},\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -1, "is not a string"},
        {"[1,2,3]", 0, -1, "not a JSON object"},
        {"{\"x\":[]}", 0, -1, "not a JSON object"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, -1, "do not match shape"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, -1, "at most 8"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,99999999999999999999]}}", 8, -1, "data_offsets"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "st: corrupt header %zu", i);
        st_craft(cp, bad[i].hdr, d6, bad[i].dlen, bad[i].hl);
        f = NULL;
        st = idd_st_read(cp, &f);
        expect_err(name, st, bad[i].want);
        if (st && !strstr(idd_last_error(), cp)) check_report(0, name, "message does not name the file");
        idd_st_free(f);
    }
    expect_err("st: missing file", idd_st_read(P("nope.safetensors"), &f), "cannot open");

    /* writer argument checks */
    idd_array badt[5];
    fill_st(badt);
    badt[1].name = "w.f32";
    expect_err("st: writer rejects duplicate names", idd_st_write(P("w.safetensors"), badt, 2, NULL), "duplicate");
    fill_st(badt);
    badt[0].nbytes = 20;
    expect_err("st: writer rejects nbytes/shape mismatch", idd_st_write(P("w.safetensors"), badt, 1, NULL), "does not match shape (2,3)");
    check_report(!file_exists(P("w.safetensors")), "st: no file after a rejected write", NULL);

    /* crash safety: a write that fails midway leaves the old file intact and no tmp */
    float *big = calloc(1 << 16, sizeof(float));
    idd_array bt = {.name = "big", .dtype = IDD_F32, .ndim = 1, .shape = {1 << 16}, .data = big, .nbytes = 4u << 16};
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 4096;
    signal(SIGXFSZ, SIG_IGN);
    setrlimit(RLIMIT_FSIZE, &lim);
    st = idd_st_write(path, &bt, 1, NULL);
    setrlimit(RLIMIT_FSIZE, &old);
    expect_err("st: write failing midway (file size limit) reports an I/O error", st, "write failed");
    char tmpname[600];
    snprintf(tmpname, sizeof tmpname, "%s.tmp.%ld", path, (long)getpid());
    check_report(!file_exists(tmpname), "st: temp file removed after a failed write", tmpname);
    f = NULL;
    st = idd_st_read(path, &f);
    check_report(!st && f->n == 5 && idd_st_find(f, "w.f32"), "st: the previous file is untouched", st ? idd_last_error() : NULL);
    idd_st_free(f);
    expect_ok("st: large write succeeds without the limit", idd_st_write(P("big.safetensors"), &bt, 1, NULL));
    free(big);
    idd_strmap_clear(&meta);
}

static void test_reference_st(void) {
    if (!file_exists(REF_ST)) { printf("not ok - st: reference file %s missing\n", REF_ST); return; }
    idd_st_file *f = NULL;
    idd_status st = idd_st_read(REF_ST, &f);
    expect_ok("st ref: read unet_public.safetensors", st);
    if (st) return;
    const idd_array *x = idd_st_find(f, "input.x"), *t = idd_st_find(f, "input.t");
    const idd_array *w = idd_st_find(f, "param.time_embed.0.weight");
    check_report(f->n == 393, "st ref: 393 tensors", NULL);
    check_report(x && x->dtype == IDD_F32 && x->ndim == 4 && x->shape[0] == 2 && x->shape[1] == 3 &&
                 x->shape[2] == 16 && x->shape[3] == 16, "st ref: input.x F32 (2,3,16,16)", NULL);
    check_report(t && t->dtype == IDD_I64 && t->ndim == 1 && t->shape[0] == 2 &&
                 ((int64_t *)t->data)[0] == 587 && ((int64_t *)t->data)[1] == 433, "st ref: input.t I64 (2) = [587, 433]", NULL);
    check_report(w && w->ndim == 2 && w->shape[0] == 128 && w->shape[1] == 32, "st ref: param.time_embed.0.weight (128,32)", NULL);
    const char *cfg = idd_strmap_get(&f->meta, "unet_config");
    idd_json *j = NULL;
    st = cfg ? idd_json_parse(cfg, strlen(cfg), &j) : IDD_ERR;
    const idd_json *mc = idd_json_get(j, "model_channels");
    check_report(!st && mc && mc->integer == 32 && idd_strmap_get(&f->meta, "diffusion"),
                 "st ref: __metadata__ unet_config JSON parses, model_channels 32", NULL);
    idd_json_free(j);
    /* rewrite and reread: same tensors */
    st = idd_st_write(P("ref_copy.safetensors"), f->tensors, f->n, &f->meta);
    idd_st_file *g = NULL;
    if (!st) st = idd_st_read(P("ref_copy.safetensors"), &g);
    int same = !st && g->n == f->n && g->meta.n == f->meta.n;
    for (size_t i = 0; same && i < f->n; i++) same = same_array(idd_st_find(g, f->tensors[i].name), &f->tensors[i]);
    check_report(same, "st ref: rewrite + reread preserves all 393 tensors and metadata", st ? idd_last_error() : NULL);
    idd_st_free(g);
    idd_st_free(f);
}

// ---- npy / npz -----------------------------------------------------------------------

static uint8_t samples[4 * 8 * 8 * 3];
static int64_t labels4[4] = {3, 1, 4, 1};

/* wrap the bytes of a file into a one-member deflated zip */
static void make_deflated_npz(const char *npy_path, const char *member, const char *out_path) {
    size_t n;
    unsigned char *src = slurp(npy_path, &n);
    uLong bound = compressBound(n) + 64;
    unsigned char *cbuf = malloc(bound);
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    deflateInit2(&zs, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
    zs.next_in = src;
    zs.avail_in = (uInt)n;
    zs.next_out = cbuf;
    zs.avail_out = (uInt)bound;
    deflate(&zs, Z_FINISH);
    size_t cn = zs.total_out;
    deflateEnd(&zs);
    uint32_t crc = (uint32_t)crc32(crc32(0, Z_NULL, 0), src, (uInt)n);
    size_t nl = strlen(member);
    FILE *f = fopen(out_path, "wb");
    unsigned char lh[30] = {0x50, 0x4b, 3, 4, 20, 0, 0, 0, 8, 0};
    memcpy(lh + 14, &crc, 4);
    uint32_t c32 = (uint32_t)cn, u32 = (uint32_t)n;
    memcpy(lh + 18, &c32, 4);
    memcpy(lh + 22, &u32, 4);
    lh[26] = (unsigned char)nl;
    fwrite(lh, 1, 30, f);
    fwrite(member, 1, nl, f);
    fwrite(cbuf, 1, cn, f);
    unsigned char ch[46] = {0x50, 0x4b, 1, 2, 20, 0, 20, 0};
    memcpy(ch + 10, lh + 8, 20);
    fwrite(ch, 1, 46, f);
    fwrite(member, 1, nl, f);
    unsigned char e[22] = {0x50, 0x4b, 5, 6, 0, 0, 0, 0, 1, 0, 1, 0};
    uint32_t cds = (uint32_t)(46 + nl), cdo = (uint32_t)(30 + nl + cn);
    memcpy(e + 12, &cds, 4);
    memcpy(e + 16, &cdo, 4);
    fwrite(e, 1, 22, f);
    fclose(f);
    free(src);
    free(cbuf);
}

static void test_npz(void) {
    for (size_t i = 0; i < sizeof samples; i++) samples[i] = (uint8_t)(i * 7 % 256);
    idd_array arrs[2] = {
        {.name = "arr_0", .dtype = IDD_U8, .ndim = 4, .shape = {4, 8, 8, 3}, .data = samples, .nbytes = sizeof samples},
        {.name = "arr_1", .dtype = IDD_I64, .ndim = 1, .shape = {4}, .data = labels4, .nbytes = sizeof labels4},
    };
    char zp[512];
    snprintf(zp, sizeof zp, "%s", P("samples_4x8x8x3.npz"));
    expect_ok("npz: write samples", idd_npz_write(zp, arrs, 2));
    idd_npz *z = NULL;
    idd_status st = idd_npz_read(zp, &z);
    expect_ok("npz: read back", st);
    if (!st) {
        check_report(z->n == 2 && same_array(idd_npz_find(z, "arr_0"), &arrs[0]) &&
                     same_array(idd_npz_find(z, "arr_1"), &arrs[1]), "npz: round trip arr_0 uint8 NHWC, arr_1 int64", NULL);
        idd_npz_free(z);
    }
    double f64[5] = {0, 0.25, 0.5, 0.75, 1};
    idd_array a = {.dtype = IDD_F64, .ndim = 1, .shape = {5}, .data = f64, .nbytes = sizeof f64};
    idd_array b;
    expect_ok("npy: write f64", idd_npy_write(P("f64.npy"), &a));
    st = idd_npy_read(P("f64.npy"), &b);
    check_report(!st && same_array(&a, &b), "npy: round trip f64 (5,)", st ? idd_last_error() : NULL);
    size_t n;
    unsigned char *raw = slurp(P("f64.npy"), &n);
    check_report(raw && (n - sizeof f64) % 64 == 0 && raw[6] == 1 && raw[n - sizeof f64 - 1] == '\n', "npy: data 64-byte aligned, v1.0", NULL);
    idd_array_clear(&b);
    float sc = 2.5f;
    idd_array s = {.dtype = IDD_F32, .ndim = 0, .data = &sc, .nbytes = 4};
    idd_npy_write(P("scalar.npy"), &s);
    st = idd_npy_read(P("scalar.npy"), &b);
    check_report(!st && same_array(&s, &b), "npy: round trip 0-d f32", NULL);
    idd_array_clear(&b);

    /* deflated member (what savez_compressed writes) */
    make_deflated_npz(P("f64.npy"), "mean.npy", P("defl.npz"));
    st = idd_npz_read(P("defl.npz"), &z);
    check_report(!st && z->n == 1 && same_array(idd_npz_find(z, "mean"), &a), "npz: deflated member", st ? idd_last_error() : NULL);
    if (!st) idd_npz_free(z);

    /* truncations and corruption of the npz and npy: clean errors */
    int ok = 1;
    char detail[1200] = "";
    free(raw);
    raw = slurp(zp, &n);
    for (size_t len = 0; len < n; len += (len < 200 || len > n - 200) ? 1 : 37) {
        write_bytes(P("t.npz"), raw, len);
        z = NULL;
        st = idd_npz_read(P("t.npz"), &z);
        if (st == IDD_OK) { ok = 0; snprintf(detail, sizeof detail, "length %zu accepted", len); idd_npz_free(z); break; }
    }
    check_report(ok, "npz: truncated archives are rejected", detail);
    raw[n / 2] ^= 0x55;
    write_bytes(P("t.npz"), raw, n);
    expect_err("npz: flipped byte caught by CRC", idd_npz_read(P("t.npz"), &z), "CRC-32 mismatch");
    free(raw);
    raw = slurp(P("f64.npy"), &n);
    memcpy(raw + 21, "<c8", 3);
    write_bytes(P("t.npy"), raw, n);
    expect_err("npy: unsupported descr", idd_npy_read(P("t.npy"), &b), "unsupported dtype '<c8'");
    free(raw);
    raw = slurp(P("f64.npy"), &n);
    write_bytes(P("t.npy"), raw, n - 3);
    expect_err("npy: truncated data", idd_npy_read(P("t.npy"), &b), "truncated");
    free(raw);
    const char *fdict = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 2), }\n";
    char fo[128];
    size_t fl = strlen(fdict);
    memcpy(fo, "\x93NUMPY\x01\x00", 8);
    fo[8] = (char)fl;
    fo[9] = 0;
    memcpy(fo + 10, fdict, fl);
    write_bytes(P("t.npy"), fo, 10 + fl);
    expect_err("npy: Fortran order rejected", idd_npy_read(P("t.npy"), &b), "Fortran");
    expect_err("npz: not a zip", idd_npz_read(P("f64.npy"), &z), "not a zip");
    idd_array noname = arrs[0];
    noname.name = NULL;
    expect_err("npz: writer wants names", idd_npz_write(P("x.npz"), &noname, 1), "needs a name");
}

// ---- PNG / GIF ---------------------------------------------------------------------

static void test_png(void) {
    enum { H = 5, W = 7 };
    uint8_t rgb[H * W * 3], gray[H * W], rgba[H * W * 4];
    for (int i = 0; i < H * W * 3; i++) rgb[i] = (uint8_t)(i * 13);
    for (int i = 0; i < H * W; i++) gray[i] = (uint8_t)(i * 9);
    for (int i = 0; i < H * W; i++) {
        memcpy(rgba + 4 * i, rgb + 3 * i, 3);
        rgba[4 * i + 3] = 255;
    }
    uint8_t *d = NULL;
    int h, w, c;
    expect_ok("png: write RGB with a text chunk", idd_png_write(P("rgb.png"), rgb, H, W, 3, "parameters", "Steps: 100, Seed: 0"));
    idd_status st = idd_png_read(P("rgb.png"), 0, &d, &h, &w, &c);
    check_report(!st && h == H && w == W && c == 3 && memcmp(d, rgb, sizeof rgb) == 0, "png: RGB round trip", st ? idd_last_error() : NULL);
    free(d);
    size_t n;
    unsigned char *raw = slurp(P("rgb.png"), &n);
    int has_text = 0;
    for (size_t i = 0; raw && i + 14 < n; i++) if (memcmp(raw + i, "tEXtparameters", 14) == 0) has_text = 1;
    check_report(has_text, "png: tEXt 'parameters' chunk present", NULL);
    expect_ok("png: write gray", idd_png_write(P("gray.png"), gray, H, W, 1, NULL, NULL));
    st = idd_png_read(P("gray.png"), 0, &d, &h, &w, &c);
    check_report(!st && c == 1 && memcmp(d, gray, sizeof gray) == 0, "png: gray round trip", NULL);
    free(d);
    st = idd_png_read(P("gray.png"), 3, &d, &h, &w, &c);
    int rep = !st && c == 3;
    for (int i = 0; rep && i < H * W; i++) rep = d[3 * i] == gray[i] && d[3 * i + 1] == gray[i] && d[3 * i + 2] == gray[i];
    check_report(rep, "png: gray read as RGB replicates", NULL);
    free(d);
    idd_png_write(P("rgba.png"), rgba, H, W, 4, NULL, NULL);
    st = idd_png_read(P("rgba.png"), 3, &d, &h, &w, &c);
    check_report(!st && c == 3 && memcmp(d, rgb, sizeof rgb) == 0, "png: opaque RGBA read as RGB", NULL);
    free(d);
    expect_err("png: missing file", idd_png_read(P("none.png"), 0, &d, &h, &w, &c), "none.png");
    write_bytes(P("junk.png"), "hello, not a png", 16);
    expect_err("png: junk file", idd_png_read(P("junk.png"), 0, &d, &h, &w, &c), "junk.png: png:");
    write_bytes(P("cut.png"), raw, n / 2);
    expect_err("png: truncated file", idd_png_read(P("cut.png"), 0, &d, &h, &w, &c), "cut.png: png:");
    check_report(d == NULL, "png: no data on error", NULL);
    free(raw);
    expect_err("png: bad channels", idd_png_write(P("x.png"), rgb, H, W, 2, NULL, NULL), "channels");
}

static void test_gif(void) {
    enum { T = 3, H = 6, W = 5 };
    uint8_t rgb[T * H * W * 3], gray[T * H * W];
    for (int i = 0; i < T * H * W * 3; i++) rgb[i] = (uint8_t)(i * 37);
    for (int i = 0; i < T * H * W; i++) gray[i] = (uint8_t)(i * 11);
    expect_ok("gif: write RGB animation", idd_gif_write(P("a.gif"), rgb, T, H, W, 3, 10));
    expect_ok("gif: write gray animation", idd_gif_write(P("g.gif"), gray, T, H, W, 1, 5));
    int err;
    GifFileType *g = DGifOpenFileName(P("a.gif"), &err);
    int ok = g && DGifSlurp(g) == GIF_OK && g->ImageCount == T && g->SWidth == W && g->SHeight == H;
    int maxd = 0, loop = 0;
    for (int f = 0; ok && f < T; f++) {
        SavedImage *im = &g->SavedImages[f];
        ColorMapObject *cm = im->ImageDesc.ColorMap ? im->ImageDesc.ColorMap : g->SColorMap;
        for (int p = 0; p < H * W; p++) {
            GifColorType col = cm->Colors[im->RasterBits[p]];
            const uint8_t *want = rgb + ((size_t)f * H * W + p) * 3;
            int dd[3] = {abs(col.Red - want[0]), abs(col.Green - want[1]), abs(col.Blue - want[2])};
            for (int k = 0; k < 3; k++) if (dd[k] > maxd) maxd = dd[k];
        }
        GraphicsControlBlock gcb;
        if (DGifSavedExtensionToGCB(g, f, &gcb) != GIF_OK || gcb.DelayTime != 10) ok = 0;
        for (int e = 0; e < im->ExtensionBlockCount; e++)
            if (im->ExtensionBlocks[e].ByteCount == 11 && memcmp(im->ExtensionBlocks[e].Bytes, "NETSCAPE2.0", 11) == 0) loop = 1;
    }
    char detail[100];
    snprintf(detail, sizeof detail, "max channel error %d (cube step/2 = 26)", maxd);
    check_report(ok && maxd <= 26, "gif: RGB frames, size, delay, colours within the 6x7x6 cube", detail);
    check_report(loop, "gif: NETSCAPE2.0 loop extension present", NULL);
    if (g) DGifCloseFile(g, &err);
    g = DGifOpenFileName(P("g.gif"), &err);
    ok = g && DGifSlurp(g) == GIF_OK && g->ImageCount == T;
    for (int f = 0; ok && f < T; f++)
        for (int p = 0; p < H * W; p++)
            if (g->SColorMap->Colors[g->SavedImages[f].RasterBits[p]].Red != gray[f * H * W + p]) ok = 0;
    check_report(ok, "gif: gray frames exact", NULL);
    if (g) DGifCloseFile(g, &err);
    expect_err("gif: bad channels", idd_gif_write(P("x.gif"), gray, T, H, W, 2, 5), "channels");
}

// ---- datasets ------------------------------------------------------------------------

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static void test_datasets(void) {
    enum { N = 3, R = 4, C = 5 };
    unsigned char img[16 + N * R * C], lab[8 + N];
    put_be32(img, 0x803); put_be32(img + 4, N); put_be32(img + 8, R); put_be32(img + 12, C);
    for (int i = 0; i < N * R * C; i++) img[16 + i] = (unsigned char)(i * 3);
    put_be32(lab, 0x801); put_be32(lab + 4, N);
    lab[8] = 7; lab[9] = 0; lab[10] = 9;
    write_bytes(P("img-idx3-ubyte"), img, sizeof img);
    gzFile gz = gzopen(P("lab-idx1-ubyte.gz"), "wb");
    gzwrite(gz, lab, sizeof lab);
    gzclose(gz);
    gz = gzopen(P("img-idx3-ubyte.gz"), "wb");
    gzwrite(gz, img, sizeof img);
    gzclose(gz);
    idd_array im, lb;
    idd_status st = idd_mnist_read(P("img-idx3-ubyte"), P("lab-idx1-ubyte.gz"), &im, &lb);
    check_report(!st && im.ndim == 3 && im.shape[0] == N && im.shape[1] == R && im.shape[2] == C &&
                 memcmp(im.data, img + 16, N * R * C) == 0 && lb.dtype == IDD_I64 &&
                 ((int64_t *)lb.data)[0] == 7 && ((int64_t *)lb.data)[2] == 9, "idx: raw images + gzip labels", st ? idd_last_error() : NULL);
    idd_array_clear(&im);
    idd_array_clear(&lb);
    st = idd_idx_read(P("img-idx3-ubyte.gz"), &im);
    check_report(!st && im.nbytes == N * R * C && memcmp(im.data, img + 16, N * R * C) == 0, "idx: gzip images", NULL);
    idd_array_clear(&im);
    write_bytes(P("cut-idx"), img, sizeof img - 5);
    expect_err("idx: truncated", idd_idx_read(P("cut-idx"), &im), "file is truncated");
    write_bytes(P("bad-idx"), "\x12\x34\x08\x01", 4);
    expect_err("idx: bad magic", idd_idx_read(P("bad-idx"), &im), "bad magic");
    put_be32(lab + 4, N - 1);
    write_bytes(P("lab2"), lab, sizeof lab - 1);
    expect_err("idx: count mismatch", idd_mnist_read(P("img-idx3-ubyte"), P("lab2"), &im, &lb), "has 2 labels but");

    unsigned char cif[2 * 3073];
    for (int i = 0; i < 2 * 3073; i++) cif[i] = (unsigned char)(i * 5);
    cif[0] = 6; cif[3073] = 2;
    write_bytes(P("data_batch_1.bin"), cif, sizeof cif);
    st = idd_cifar10_read(P("data_batch_1.bin"), &im, &lb);
    check_report(!st && im.ndim == 4 && im.shape[0] == 2 && im.shape[1] == 3 && im.shape[2] == 32 &&
                 memcmp(im.data, cif + 1, 3072) == 0 && memcmp((uint8_t *)im.data + 3072, cif + 3074, 3072) == 0 &&
                 ((int64_t *)lb.data)[0] == 6 && ((int64_t *)lb.data)[1] == 2, "cifar10: two records", st ? idd_last_error() : NULL);
    idd_array_clear(&im);
    idd_array_clear(&lb);
    write_bytes(P("short.bin"), cif, 3000);
    expect_err("cifar10: wrong size names the layout", idd_cifar10_read(P("short.bin"), &im, &lb), "short.bin: cifar10: size 3000 is not a multiple of 3073");
    cif[3073] = 12;
    write_bytes(P("lab.bin"), cif, sizeof cif);
    expect_err("cifar10: bad label", idd_cifar10_read(P("lab.bin"), &im, &lb), "record 1 has label 12");
}

// ---- numpy cross-check ---------------------------------------------------------------

static void test_python(void) {
    char cmd[700];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 -c 'import numpy' 2>/dev/null");
    if (access("tests/ref/check_npz.py", R_OK) != 0 || system(cmd) != 0) {
        printf("ok - py: numpy cross-check # skip (run from the repo root with /usr/bin/python3 + numpy)\n");
        return;
    }
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 tests/ref/check_npz.py %s", dir);
    fflush(stdout);
    int rc = system(cmd);
    check_report(rc == 0, "py: check_npz.py accepts our npz/npy/safetensors", NULL);
    if (rc != 0) return;
    idd_npz *z = NULL;
    idd_status st = idd_npz_read(P("py_compressed.npz"), &z);
    expect_ok("py: read savez_compressed ImageNet-64 layout", st);
    if (!st) {
        const idd_array *d = idd_npz_find(z, "data"), *l = idd_npz_find(z, "labels"), *m = idd_npz_find(z, "mean");
        int ok = d && d->dtype == IDD_U8 && d->ndim == 2 && d->shape[0] == 3 && d->shape[1] == 12288;
        for (int i = 0; ok && i < 3 * 12288; i++) ok = ((uint8_t *)d->data)[i] == i % 251;
        ok = ok && l && l->dtype == IDD_I64 && ((int64_t *)l->data)[1] == 1000;
        ok = ok && m && m->dtype == IDD_F64 && m->shape[0] == 12288 && ((double *)m->data)[12287] == 1.0;
        check_report(ok, "py: data (3,12288) u8, labels int64, mean f64 values", NULL);
        idd_npz_free(z);
    }
    idd_array a;
    st = idd_npy_read(P("py_f16.npy"), &a);
    float *fv = st ? NULL : a.data;
    check_report(fv && a.dtype == IDD_F32 && fv[0] == 1.5f && fv[1] == -2.0f && fv[2] == 65504.0f && fv[3] == 0x1p-24f,
                 "py: f16 .npy -> F32 (incl. max and subnormal)", st ? idd_last_error() : NULL);
    idd_array_clear(&a);
    st = idd_npy_read(P("py_i4.npy"), &a);
    int64_t *iv = st ? NULL : a.data;
    check_report(iv && a.dtype == IDD_I64 && a.ndim == 2 && iv[0] == -1 && iv[3] == -4, "py: i4 .npy -> I64", NULL);
    idd_array_clear(&a);
    idd_st_file *f = NULL;
    st = idd_st_read(P("py.safetensors"), &f);
    expect_ok("py: read python-written safetensors (unaligned F16/BF16/I32/U8)", st);
    if (!st) {
        const idd_array *h = idd_st_find(f, "h"), *b = idd_st_find(f, "b"), *i = idd_st_find(f, "i"), *u = idd_st_find(f, "u");
        int ok = h && h->dtype == IDD_F32 && ((float *)h->data)[0] == 0.5f && ((float *)h->data)[2] == 3.0f;
        ok = ok && b && b->dtype == IDD_F32 && ((float *)b->data)[0] == 1.5f && ((float *)b->data)[1] == -256.0f;
        ok = ok && i && i->dtype == IDD_I64 && ((int64_t *)i->data)[0] == -7 && ((int64_t *)i->data)[1] == 1 << 30;
        ok = ok && u && u->dtype == IDD_U8 && ((uint8_t *)u->data)[2] == 3;
        ok = ok && strcmp(idd_strmap_get(&f->meta, "who"), "python") == 0;
        check_report(ok, "py: F16, BF16 -> F32, I32 -> I64, U8, metadata", NULL);
        idd_st_free(f);
    }
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/idd_io_test.%ld", (long)getpid());
    mkdir(dir, 0755);
    printf("# test_io: files in %s\n", dir);
    test_json();
    test_safetensors();
    test_reference_st();
    test_npz();
    test_png();
    test_gif();
    test_datasets();
    test_python();
    if (!getenv("IDD_IO_KEEP")) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) printf("# could not remove %s\n", dir);
    }
    return check_done();
}
