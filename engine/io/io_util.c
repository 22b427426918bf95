/* io_util.c — what the format files share: idd_array and idd_strmap helpers, a growable
 * buffer, whole-file reading, the atomic writer (tmp + fsync + rename), fp16/bf16. */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// ---- idd_array / idd_strmap -------------------------------------------------------

void idd_array_clear(idd_array *a) {
    if (!a) return;
    free(a->name);
    free(a->data);
    memset(a, 0, sizeof *a);
}

int64_t idd_array_numel(const idd_array *a) {
    int64_t n = 1;
    for (int i = 0; i < a->ndim; i++) n *= a->shape[i];
    return n;
}

int64_t io_check_array(const char *what, const idd_array *a) {
    const char *nm = a->name ? a->name : "?";
    if ((unsigned)a->dtype >= IDD_NDTYPES) {
        idd_error("%s: array '%s': invalid dtype %d", what, nm, (int)a->dtype);
        return -1;
    }
    if (a->ndim < 0 || a->ndim > IDD_MAX_DIMS) {
        idd_error("%s: array '%s': ndim %d out of range 0..%d", what, nm, a->ndim, IDD_MAX_DIMS);
        return -1;
    }
    int64_t n = 1;
    for (int i = 0; i < a->ndim; i++) {
        if (a->shape[i] < 0) {
            idd_error("%s: array '%s': negative dim %lld", what, nm, (long long)a->shape[i]);
            return -1;
        }
        if (a->shape[i] && n > INT64_MAX / 16 / a->shape[i]) {
            idd_error("%s: array '%s': shape too large", what, nm);
            return -1;
        }
        n *= a->shape[i];
    }
    size_t want = (size_t)n * idd_dtype_size(a->dtype);
    if (a->nbytes != want) {
        char s[128];
        idd_error("%s: array '%s': nbytes %zu does not match shape %s %s (%zu bytes)", what, nm,
                  a->nbytes, idd_shape_str_n(a->ndim, a->shape, s, sizeof s),
                  idd_dtype_name(a->dtype), want);
        return -1;
    }
    if (want && !a->data) {
        idd_error("%s: array '%s': data is NULL", what, nm);
        return -1;
    }
    return n;
}

static char *dupstr(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

idd_status idd_strmap_set(idd_strmap *m, const char *key, const char *value) {
    char *v = dupstr(value);
    if (!v) return idd_error_status(IDD_ENOMEM, "out of memory");
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->keys[i], key) == 0) {
            free(m->values[i]);
            m->values[i] = v;
            return IDD_OK;
        }
    return idd_strmap_append(m, key, v);
}

/* append without looking for key (the caller knows it is new); owns value */
idd_status idd_strmap_append(idd_strmap *m, const char *key, char *v) {
    char *k = dupstr(key);
    /* capacity doubles: it is the next power of two >= n, so grow when n is one */
    size_t cap = m->n == 0 || (m->n & (m->n - 1)) == 0 ? (m->n ? 2 * m->n : 1) : 0;
    char **nk = cap ? realloc(m->keys, cap * sizeof *nk) : m->keys;
    if (nk) m->keys = nk;
    char **nv = nk ? (cap ? realloc(m->values, cap * sizeof *nv) : m->values) : NULL;
    if (nv) m->values = nv;
    if (!k || !nk || !nv) {
        free(k);
        free(v);
        return idd_error_status(IDD_ENOMEM, "out of memory");
    }
    m->keys[m->n] = k;
    m->values[m->n] = v;
    m->n++;
    return IDD_OK;
}

const char *idd_strmap_get(const idd_strmap *m, const char *key) {
    if (!m) return NULL;
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->keys[i], key) == 0) return m->values[i];
    return NULL;
}

void idd_strmap_clear(idd_strmap *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n; i++) {
        free(m->keys[i]);
        free(m->values[i]);
    }
    free(m->keys);
    free(m->values);
    memset(m, 0, sizeof *m);
}

// ---- growable buffer ----------------------------------------------------------------

void iobuf_put(iobuf *b, const void *p, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) { b->oom = 1; return; }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}

void iobuf_puts(iobuf *b, const char *s) { iobuf_put(b, s, strlen(s)); }

void iobuf_printf(iobuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) { b->oom = 1; return; }
    if ((size_t)n < sizeof tmp) { iobuf_put(b, tmp, (size_t)n); return; }
    char *big = malloc((size_t)n + 1);
    if (!big) { b->oom = 1; return; }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    iobuf_put(b, big, (size_t)n);
    free(big);
}

void iobuf_free(iobuf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

void iobuf_json_quote(iobuf *b, const char *s) {
    iobuf_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char ch = *p;
        switch (ch) {
        case '"': iobuf_puts(b, "\\\""); break;
        case '\\': iobuf_puts(b, "\\\\"); break;
        case '\n': iobuf_puts(b, "\\n"); break;
        case '\r': iobuf_puts(b, "\\r"); break;
        case '\t': iobuf_puts(b, "\\t"); break;
        case '\b': iobuf_puts(b, "\\b"); break;
        case '\f': iobuf_puts(b, "\\f"); break;
        default:
            if (ch < 0x20) iobuf_printf(b, "\\u%04x", ch);
            else iobuf_put(b, &ch, 1);
        }
    }
    iobuf_put(b, "\"", 1);
}

// ---- files ----------------------------------------------------------------------------

/* Open for reading only a regular file: O_NONBLOCK so that opening a FIFO or a device
 * never blocks, fstat to refuse anything but a regular file, then O_NONBLOCK cleared. */
int io_open_regular(const char *path, const char *what) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        idd_error_status(IDD_EIO, "%s: %s: cannot open: %s", what, path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        idd_error_status(IDD_EIO, "%s: %s: not a regular file", what, path);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
        idd_error_status(IDD_EIO, "%s: %s: fcntl: %s", what, path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

FILE *io_fopen_regular(const char *path, const char *what) {
    int fd = io_open_regular(path, what);
    if (fd < 0) return NULL;
    FILE *fp = fdopen(fd, "rb");
    if (!fp) {
        idd_error_status(IDD_EIO, "%s: %s: cannot open: %s", what, path, strerror(errno));
        close(fd);
    }
    return fp;
}

idd_status io_read_file(const char *path, const char *what, unsigned char **data, size_t *len) {
    *data = NULL;
    *len = 0;
    FILE *fp = io_fopen_regular(path, what);
    if (!fp) return IDD_EIO;
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        return idd_error_status(IDD_EIO, "%s: %s: not a regular file", what, path);
    }
    size_t n = (size_t)st.st_size;
    unsigned char *buf = malloc(n + 1);
    if (!buf) {
        fclose(fp);
        return idd_error_status(IDD_ENOMEM, "%s: %s: out of memory reading %zu bytes", what, path, n);
    }
    size_t got = n ? fread(buf, 1, n, fp) : 0;
    int err = ferror(fp);
    fclose(fp);
    if (got != n || err) {
        free(buf);
        return idd_error_status(IDD_EIO, "%s: %s: read error (%zu of %zu bytes)", what, path, got, n);
    }
    buf[n] = 0;
    *data = buf;
    *len = n;
    return IDD_OK;
}

/* The temporary file is created next to path as "<path>.tmp.<pid>.<k>" with
 * O_CREAT|O_EXCL|O_NOFOLLOW: an existing file or symbolic link of that name is never
 * opened (nor its target written); the next k is tried instead. */
idd_status io_atomic_open(io_atomic *a, const char *path, const char *what) {
    memset(a, 0, sizeof *a);
    a->path = path;
    a->what = what;
    if (!path || !path[0]) return idd_error("%s: empty file name", what);
    size_t n = strlen(path) + 48;
    a->tmp = malloc(n);
    if (!a->tmp) return idd_error_status(IDD_ENOMEM, "%s: %s: out of memory", what, path);
    int fd = -1;
    for (unsigned k = 0; k < IO_TMP_TRIES && fd < 0; k++) {
        snprintf(a->tmp, n, "%s.tmp.%ld.%u", path, (long)getpid(), k);
        fd = open(a->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd >= 0) a->fp = fdopen(fd, "wb");
    if (!a->fp) {
        idd_status st = idd_error_status(IDD_EIO, "%s: %s: cannot create %s: %s", what, path,
                                         a->tmp, strerror(errno));
        if (fd >= 0) {
            close(fd);
            unlink(a->tmp);
        }
        free(a->tmp);
        a->tmp = NULL;
        return st;
    }
    return IDD_OK;
}

idd_status io_atomic_write(io_atomic *a, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, a->fp) != n)
        return idd_error_status(IDD_EIO, "%s: %s: write failed: %s", a->what, a->path,
                                strerror(errno));
    return IDD_OK;
}

void io_atomic_abort(io_atomic *a) {
    if (a->fp) fclose(a->fp);
    if (a->tmp) unlink(a->tmp);
    free(a->tmp);
    a->fp = NULL;
    a->tmp = NULL;
}

idd_status io_atomic_commit(io_atomic *a) {
    idd_status st = IDD_OK;
    if (fflush(a->fp) != 0 || ferror(a->fp))
        st = idd_error_status(IDD_EIO, "%s: %s: write failed: %s", a->what, a->path, strerror(errno));
    else if (fsync(fileno(a->fp)) != 0)
        st = idd_error_status(IDD_EIO, "%s: %s: fsync failed: %s", a->what, a->path, strerror(errno));
    int rc = fclose(a->fp);
    a->fp = NULL;
    if (st == IDD_OK && rc != 0)
        st = idd_error_status(IDD_EIO, "%s: %s: close failed: %s", a->what, a->path, strerror(errno));
    if (st == IDD_OK && rename(a->tmp, a->path) != 0)
        st = idd_error_status(IDD_EIO, "%s: %s: rename from %s failed: %s", a->what, a->path,
                              a->tmp, strerror(errno));
    if (st != IDD_OK) {
        io_atomic_abort(a);
        return st;
    }
    free(a->tmp);
    a->tmp = NULL;
    /* make the rename itself durable: fsync the directory (best effort) */
    const char *slash = strrchr(a->path, '/');
    char *dir = NULL;
    if (slash) {
        size_t dn = (size_t)(slash - a->path);
        dir = malloc(dn + 2);
        if (dir) {
            memcpy(dir, a->path, dn ? dn : 1);
            dir[dn ? dn : 1] = 0;
        }
    }
    int fd = open(dir ? dir : ".", O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dir);
    return IDD_OK;
}

idd_status idd_write_file_atomic(const char *path, const void *data, size_t len, const char *what) {
    io_atomic a;
    idd_status st = io_atomic_open(&a, path, what);
    if (st) return st;
    st = io_atomic_write(&a, data, len);
    if (st) {
        io_atomic_abort(&a);
        return st;
    }
    return io_atomic_commit(&a);
}

// ---- half floats ----------------------------------------------------------------------

static float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float io_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13)); /* inf / nan */
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

float io_bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }
