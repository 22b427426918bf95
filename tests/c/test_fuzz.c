/* test_fuzz.c — every file reader against mutated files: safetensors, npz, npy, PNG,
 * IDX (raw and gzip), CIFAR-10 binary and JSON text each get a valid seed file, then
 * ITERS mutations of it (bit flips, truncations, length-field overwrites, inserted and
 * deleted bytes) from a fixed seed. Each read must return (loaded or an error with a
 * message): a crash, a sanitizer report or a hang (alarm) fails the program.
 * Also: a safetensors header of 100k keys loads in linear time, and a gzip IDX file cut
 * inside its CRC/length trailer is an error.
 * Environment: IDDPM_FUZZ_ITERS (mutations per reader, default 400; 100 under ASan),
 * IDDPM_FUZZ_SEED (default 20261208). Files go to /tmp/idd_fuzz.<pid>, removed. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "iddpm/io.h"

/* under AddressSanitizer a mutated size field may ask malloc for terabytes: that must be
 * an ordinary NULL (the reader's out-of-memory error), not an ASan abort */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }

#ifdef __SANITIZE_ADDRESS__
#define FUZZ_ITERS_DEFAULT 100   /* ~15 ms a mutant under ASan: the suite's DEBUG=1 run stays short */
#else
#define FUZZ_ITERS_DEFAULT 400   /* 8 readers: 3200 mutants, a few seconds */
#endif
#define HANG_SECONDS 240   /* the whole program; a reader that loops forever trips it */
#define ST_KEYS 100000
#define ST_KEYS_SECONDS 10.0   /* 100k keys parse in well under a second when linear; quadratic took minutes */

static char dir[256];
static uint64_t rng_state;

static uint64_t rnd(void) {   /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}
static size_t rnd_below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

static const char *P(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    if (n && fwrite(p, 1, n, f) != n) { perror(path); exit(2); }
    fclose(f);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc((size_t)sz + 1);
    if (!p || fread(p, 1, (size_t)sz, f) != (size_t)sz) { perror(path); exit(2); }
    fclose(f);
    *n = (size_t)sz;
    return p;
}

/* one mutation of src into a new buffer (*n in: source size, out: result size); room
 * for growth is allocated by the caller's cap */
static unsigned char *mutate(const unsigned char *src, size_t n, size_t *out_n) {
    size_t cap = n + 64;
    unsigned char *b = malloc(cap);
    memcpy(b, src, n);
    size_t len = n;
    int rounds = 1 + (int)rnd_below(3);
    for (int r = 0; r < rounds; r++) {
        /* half the edits land in the first 64 bytes, where headers and length fields live */
        size_t pos = len ? (rnd() & 1 ? rnd_below(len < 64 ? len : 64) : rnd_below(len)) : 0;
        switch (rnd_below(6)) {
        case 0:   /* bit flips */
            for (int k = 0, nf = 1 + (int)rnd_below(4); k < nf && len; k++) b[rnd_below(len)] ^= (unsigned char)(1u << rnd_below(8));
            break;
        case 1:   /* truncation */
            len = rnd_below(len + 1);
            break;
        case 2: { /* a length-like field: 1, 2, 4 or 8 bytes of an interesting value */
            static const uint64_t vals[] = {0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fffffff, 0xffffffff,
                                            0x100000000ULL, 0x7fffffffffffffffULL, 0xffffffffffffffffULL};
            size_t w = (size_t)1 << rnd_below(4);
            uint64_t v = rnd() & 1 ? vals[rnd_below(sizeof vals / sizeof vals[0])] : rnd();
            for (size_t k = 0; k < w && pos + k < len; k++) b[pos + k] = (unsigned char)(v >> (8 * (rnd() & 1 ? k : w - 1 - k)));
            break;
        }
        case 3: { /* insert up to 16 random bytes */
            size_t k = 1 + rnd_below(16);
            if (len + k > cap) break;
            memmove(b + pos + k, b + pos, len - pos);
            for (size_t i = 0; i < k; i++) b[pos + i] = (unsigned char)rnd();
            len += k;
            break;
        }
        case 4: { /* delete a range */
            size_t k = rnd_below(len - pos + 1);
            if (k > 32) k = 32;
            memmove(b + pos, b + pos + k, len - pos - k);
            len -= k;
            break;
        }
        default: /* a random byte */
            if (len) b[rnd_below(len)] = (unsigned char)rnd();
            break;
        }
    }
    *out_n = len;
    return b;
}

typedef int (*reader_fn)(const char *path);   /* 1 loaded, 0 error (with a message) */

static int rd_st(const char *path) {
    idd_st_file *f = NULL;
    idd_status st = idd_st_read(path, &f);
    idd_st_free(f);
    return st == IDD_OK;
}
static int rd_npz(const char *path) {
    idd_npz *z = NULL;
    idd_status st = idd_npz_read(path, &z);
    idd_npz_free(z);
    return st == IDD_OK;
}
static int rd_npy(const char *path) {
    idd_array a;
    idd_status st = idd_npy_read(path, &a);
    if (st == IDD_OK) idd_array_clear(&a);
    return st == IDD_OK;
}
static int rd_png(const char *path) {
    uint8_t *d = NULL;
    int h, w, c;
    idd_status st = idd_png_read(path, 0, &d, &h, &w, &c);
    free(d);
    return st == IDD_OK;
}
static int rd_idx(const char *path) {
    idd_array a;
    idd_status st = idd_idx_read(path, &a);
    if (st == IDD_OK) idd_array_clear(&a);
    return st == IDD_OK;
}
static int rd_cifar(const char *path) {
    idd_array im, lb;
    idd_status st = idd_cifar10_read(path, &im, &lb);
    if (st == IDD_OK) { idd_array_clear(&im); idd_array_clear(&lb); }
    return st == IDD_OK;
}
static int rd_json(const char *path) {
    size_t n;
    unsigned char *t = slurp(path, &n);
    idd_json *v = NULL;
    idd_status st = idd_json_parse((const char *)t, n, &v);
    idd_json_free(v);
    free(t);
    return st == IDD_OK;
}

/* mutate the seed file iters times; every read must come back, and an error must say something */
static void fuzz(const char *name, const char *seed_path, reader_fn rd, int iters) {
    char label[160];
    snprintf(label, sizeof label, "fuzz %s: seed file loads", name);
    check_report(rd(seed_path), label, idd_last_error());
    size_t n;
    unsigned char *src = slurp(seed_path, &n);
    int loaded = 0, silent = 0;
    const char *mpath = P("mutant");
    char mp[512];
    snprintf(mp, sizeof mp, "%s", mpath);
    for (int i = 0; i < iters; i++) {
        size_t m;
        unsigned char *b = mutate(src, n, &m);
        write_bytes(mp, b, m);
        free(b);
        idd_error("%s", "");   /* empty: a failing reader must write its own message */
        if (rd(mp)) loaded++;
        else if (!idd_last_error()[0]) silent++;
    }
    free(src);
    snprintf(label, sizeof label, "fuzz %s: %d mutants, each loaded (%d) or failed with a message", name, iters, loaded);
    check_report(silent == 0, label, "an error without a message");
}

/* ---- seed files ---- */

static void seeds(void) {
    float f[6] = {1, -2, 3.5f, 0, 1e-3f, 7};
    int64_t ix[3] = {5, -1, 1LL << 40};
    uint8_t u[4] = {1, 2, 3, 250};
    idd_array arr[3] = {
        {.name = "weight", .dtype = IDD_F32, .ndim = 2, .shape = {2, 3}, .data = f, .nbytes = sizeof f},
        {.name = "step", .dtype = IDD_I64, .ndim = 1, .shape = {3}, .data = ix, .nbytes = sizeof ix},
        {.name = "bytes", .dtype = IDD_U8, .ndim = 1, .shape = {4}, .data = u, .nbytes = sizeof u}};
    idd_strmap meta = {0};
    idd_strmap_set(&meta, "format", "iddpm-ckpt-1");
    idd_strmap_set(&meta, "config", "{\"lr\":0.0001,\"channels\":[1,2,2]}");
    if (idd_st_write(P("seed.safetensors"), arr, 3, &meta)) { fprintf(stderr, "%s\n", idd_last_error()); exit(2); }
    idd_strmap_clear(&meta);
    if (idd_npz_write(P("seed.npz"), arr, 3)) { fprintf(stderr, "%s\n", idd_last_error()); exit(2); }
    if (idd_npy_write(P("seed.npy"), &arr[0])) { fprintf(stderr, "%s\n", idd_last_error()); exit(2); }
    uint8_t px[5 * 4 * 3];
    for (size_t i = 0; i < sizeof px; i++) px[i] = (uint8_t)(i * 17);
    if (idd_png_write(P("seed.png"), px, 5, 4, 3, "parameters", "steps=10")) { fprintf(stderr, "%s\n", idd_last_error()); exit(2); }
    unsigned char idx[16 + 3 * 4 * 5] = {0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5};
    for (int i = 16; i < (int)sizeof idx; i++) idx[i] = (unsigned char)(i * 3);
    write_bytes(P("seed-idx"), idx, sizeof idx);
    gzFile gz = gzopen(P("seed-idx.gz"), "wb");
    gzwrite(gz, idx, sizeof idx);
    gzclose(gz);
    unsigned char cif[2 * 3073];
    for (int i = 0; i < (int)sizeof cif; i++) cif[i] = (unsigned char)(i * 5);
    cif[0] = 6; cif[3073] = 2;
    write_bytes(P("seed.bin"), cif, sizeof cif);
    const char *js = "{\"a\": [1, 2.5e3, -0.0, true, false, null], \"b\": {\"c\": \"\\u00e9\\n\", \"d\": []},"
                     " \"config\": {\"image_size\": 32, \"attention\": [16, 8], \"name\": \"cifar\"}}";
    write_bytes(P("seed.json"), js, strlen(js));
}

/* ---- linear header ---- */

static void test_many_keys(void) {
    /* ST_KEYS one-element tensors "t<i>", packed in order, in one header */
    size_t cap = (size_t)ST_KEYS * 80 + 64, len = 0;
    char *h = malloc(cap);
    len += (size_t)snprintf(h + len, cap - len, "{\"__metadata__\":{");
    for (int i = 0; i < ST_KEYS; i++)
        len += (size_t)snprintf(h + len, cap - len, "%s\"m%d\":\"v\"", i ? "," : "", i);
    len += (size_t)snprintf(h + len, cap - len, "}");
    for (int i = 0; i < ST_KEYS; i++)
        len += (size_t)snprintf(h + len, cap - len, ",\"t%d\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[%d,%d]}", i, i, i + 1);
    len += (size_t)snprintf(h + len, cap - len, "}");
    FILE *fp = fopen(P("many.safetensors"), "wb");
    unsigned char l8[8];
    for (int k = 0; k < 8; k++) l8[k] = (unsigned char)((uint64_t)len >> (8 * k));
    fwrite(l8, 1, 8, fp);
    fwrite(h, 1, len, fp);
    for (int i = 0; i < ST_KEYS; i++) fputc(i & 0xff, fp);
    fclose(fp);
    free(h);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    idd_st_file *f = NULL;
    idd_status st = idd_st_read(P("many.safetensors"), &f);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double sec = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    printf("# %d tensors + %d metadata keys loaded in %.2f s\n", ST_KEYS, ST_KEYS, sec);
    const idd_array *last = f ? idd_st_find(f, "t99999") : NULL;
    check_report(!st && f->n == ST_KEYS && f->meta.n == ST_KEYS && last && ((uint8_t *)last->data)[0] == (99999 & 0xff),
                 "safetensors: 100k keys load", st ? idd_last_error() : NULL);
    char d[96];
    snprintf(d, sizeof d, "took %.1f s (limit %.0f)", sec, ST_KEYS_SECONDS);
    check_report(sec < ST_KEYS_SECONDS, "safetensors: 100k keys in linear time", d);
    idd_st_free(f);
    /* and a duplicate among many is still found */
    const char *dup = "{\"a\":1,\"b\":2,\"c\":3,\"d\":4,\"e\":5,\"f\":6,\"g\":7,\"h\":8,\"i\":9,\"b\":10}";
    idd_json *v = NULL;
    st = idd_json_parse(dup, strlen(dup), &v);
    check_report(st && strstr(idd_last_error(), "duplicate key") && strstr(idd_last_error(), "column 56"),
                 "json: duplicate key reported at its second occurrence", idd_last_error());
    idd_json_free(v);
}

/* ---- gzip trailer ---- */

static void test_gzip_trailer(void) {
    size_t n;
    unsigned char *g = slurp(P("seed-idx.gz"), &n);
    idd_array a;
    int bad = 0;
    for (size_t cut = 1; cut <= 8; cut++) {   /* inside the CRC-32 + ISIZE trailer */
        write_bytes(P("cut.gz"), g, n - cut);
        idd_status st = idd_idx_read(P("cut.gz"), &a);
        if (st == IDD_OK) { idd_array_clear(&a); bad++; }
        else if (!strstr(idd_last_error(), "truncated")) bad++;
    }
    check_report(bad == 0, "idx gzip: a file cut inside its 8-byte trailer is an error", idd_last_error());
    unsigned char *c = malloc(n);
    memcpy(c, g, n);
    c[n - 8] ^= 1;   /* CRC-32 */
    write_bytes(P("crc.gz"), c, n);
    idd_status st = idd_idx_read(P("crc.gz"), &a);
    if (st == IDD_OK) idd_array_clear(&a);
    check_report(st != IDD_OK, "idx gzip: a wrong CRC-32 is an error", NULL);
    memcpy(c, g, n);
    c[n - 4] ^= 1;   /* ISIZE */
    write_bytes(P("isize.gz"), c, n);
    st = idd_idx_read(P("isize.gz"), &a);
    if (st == IDD_OK) idd_array_clear(&a);
    check_report(st != IDD_OK, "idx gzip: a wrong length (ISIZE) is an error", NULL);
    free(c);
    free(g);
}

int main(void) {
    alarm(HANG_SECONDS);
    const char *e = getenv("IDDPM_FUZZ_ITERS");
    int iters = e ? atoi(e) : FUZZ_ITERS_DEFAULT;
    e = getenv("IDDPM_FUZZ_SEED");
    uint64_t seed = e ? strtoull(e, NULL, 10) : 20261208ULL;
    rng_state = seed ? seed : 1;
    printf("# seed %llu, %d mutations per reader (IDDPM_FUZZ_SEED, IDDPM_FUZZ_ITERS)\n", (unsigned long long)seed, iters);
    snprintf(dir, sizeof dir, "/tmp/idd_fuzz.%d", (int)getpid());
    if (mkdir(dir, 0700)) { perror(dir); return 2; }
    seeds();
    test_many_keys();
    test_gzip_trailer();
    fuzz("safetensors", P("seed.safetensors"), rd_st, iters);
    fuzz("npz", P("seed.npz"), rd_npz, iters);
    fuzz("npy", P("seed.npy"), rd_npy, iters);
    fuzz("png", P("seed.png"), rd_png, iters);
    fuzz("idx", P("seed-idx"), rd_idx, iters);
    fuzz("idx gzip", P("seed-idx.gz"), rd_idx, iters);
    fuzz("cifar10", P("seed.bin"), rd_cifar, iters);
    fuzz("json", P("seed.json"), rd_json, iters);
    const char *names[] = {"seed.safetensors", "seed.npz", "seed.npy", "seed.png", "seed-idx", "seed-idx.gz", "seed.bin",
                           "seed.json", "mutant", "many.safetensors", "cut.gz", "crc.gz", "isize.gz"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) unlink(P(names[i]));
    rmdir(dir);
    return check_done();
}
