/* safetensors.c — read and write the huggingface safetensors checkpoint format:
 *   [u64 LE N][N bytes JSON header][data buffer]
 * The header maps tensor names to {"dtype","shape","data_offsets":[begin,end]} (offsets
 * relative to the data buffer, end exclusive) plus an optional "__metadata__" object of
 * string->string. The reader checks everything the reference implementation checks
 * (header size limit and bounds, dtype, shape*size == span, entries packed with no gap or
 * overlap, buffer ends at end of file, unique names) and reads each tensor into its own
 * malloc block, converting F16/BF16 -> F32 and I32 (and other small ints) -> I64.
 * The writer lays entries out as the reference serializer does (dtype size descending,
 * then name; packed; header space-padded to 8 bytes) and writes atomically. */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define ST_MAX_HEADER 100000000ull

typedef enum { CV_NONE, CV_F16, CV_BF16, CV_I32, CV_I16, CV_I8, CV_U16, CV_U32 } conv_kind;

typedef struct {
    const char *name;  /* as in the header */
    size_t size;       /* bytes per element in the file */
    idd_dtype out;     /* what we return */
    conv_kind conv;
} st_dtype;

static const st_dtype st_dtypes[] = {
    {"F32", 4, IDD_F32, CV_NONE},  {"F64", 8, IDD_F64, CV_NONE}, {"I64", 8, IDD_I64, CV_NONE},
    {"U8", 1, IDD_U8, CV_NONE},    {"BOOL", 1, IDD_U8, CV_NONE}, {"F16", 2, IDD_F32, CV_F16},
    {"BF16", 2, IDD_F32, CV_BF16}, {"I32", 4, IDD_I64, CV_I32},  {"I16", 2, IDD_I64, CV_I16},
    {"I8", 1, IDD_I64, CV_I8},     {"U16", 2, IDD_I64, CV_U16},  {"U32", 4, IDD_I64, CV_U32},
};
#define N_ST_DTYPES (sizeof st_dtypes / sizeof st_dtypes[0])

static const char *st_name_of(idd_dtype d) {
    switch (d) {
    case IDD_F32: return "F32";
    case IDD_F64: return "F64";
    case IDD_I64: return "I64";
    case IDD_U8: return "U8";
    case IDD_BF16: return "BF16";
    default: return NULL;
    }
}

/* per-entry scratch while validating */
typedef struct {
    const char *name;
    const st_dtype *dt;
    int ndim;
    int64_t shape[IDD_MAX_DIMS];
    uint64_t begin, end;
} st_entry;

static void convert(const st_dtype *dt, const unsigned char *src, void *dst, size_t n) {
    size_t i;
    switch (dt->conv) {
    case CV_NONE: memcpy(dst, src, n * dt->size); break;
    case CV_F16:
    case CV_BF16:
        for (i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            ((float *)dst)[i] = dt->conv == CV_F16 ? io_f16_to_f32(h) : io_bf16_to_f32(h);
        }
        break;
    case CV_I32:
        for (i = 0; i < n; i++) { int32_t v; memcpy(&v, src + 4 * i, 4); ((int64_t *)dst)[i] = v; }
        break;
    case CV_I16:
        for (i = 0; i < n; i++) { int16_t v; memcpy(&v, src + 2 * i, 2); ((int64_t *)dst)[i] = v; }
        break;
    case CV_I8:
        for (i = 0; i < n; i++) ((int64_t *)dst)[i] = (int8_t)src[i];
        break;
    case CV_U16:
        for (i = 0; i < n; i++) { uint16_t v; memcpy(&v, src + 2 * i, 2); ((int64_t *)dst)[i] = v; }
        break;
    case CV_U32:
        for (i = 0; i < n; i++) { uint32_t v; memcpy(&v, src + 4 * i, 4); ((int64_t *)dst)[i] = v; }
        break;
    }
}

void idd_st_free(idd_st_file *f) {
    if (!f) return;
    for (size_t i = 0; i < f->n; i++) idd_array_clear(&f->tensors[i]);
    free(f->tensors);
    idd_strmap_clear(&f->meta);
    free(f->path);
    free(f);
}

const idd_array *idd_st_find(const idd_st_file *f, const char *name) {
    if (!f) return NULL;
    for (size_t i = 0; i < f->n; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

static int get_u64(const idd_json *v, uint64_t *out) {
    if (!v || v->type != IDD_JSON_NUMBER || !v->is_int || v->integer < 0) return 0;
    *out = (uint64_t)v->integer;
    return 1;
}

/* validate one header entry into e; errors are prefixed by the caller */
static idd_status parse_entry(const char *name, const idd_json *v, uint64_t data_len, st_entry *e) {
    memset(e, 0, sizeof *e);
    e->name = name;
    if (v->type != IDD_JSON_OBJECT) return idd_error("tensor '%s': entry is not a JSON object", name);
    const idd_json *dt = idd_json_get(v, "dtype");
    const idd_json *sh = idd_json_get(v, "shape");
    const idd_json *off = idd_json_get(v, "data_offsets");
    if (!dt || dt->type != IDD_JSON_STRING)
        return idd_error("tensor '%s': missing or non-string \"dtype\"", name);
    for (size_t i = 0; i < N_ST_DTYPES; i++)
        if (strcmp(dt->str, st_dtypes[i].name) == 0) e->dt = &st_dtypes[i];
    if (!e->dt)
        return idd_error("tensor '%s': unknown or unsupported dtype '%.32s' (supported: F32 F64 "
                         "I64 U8 BOOL F16 BF16 I32 I16 I8 U16 U32)", name, dt->str);
    if (!sh || sh->type != IDD_JSON_ARRAY)
        return idd_error("tensor '%s': missing or non-array \"shape\"", name);
    if (sh->n > IDD_MAX_DIMS)
        return idd_error("tensor '%s': shape has %zu dims, at most %d supported", name, sh->n, IDD_MAX_DIMS);
    e->ndim = (int)sh->n;
    uint64_t numel = 1;
    int overflow = 0;
    for (size_t i = 0; i < sh->n; i++) {
        uint64_t d;
        if (!get_u64(&sh->items[i], &d))
            return idd_error("tensor '%s': shape[%zu] is not a non-negative integer", name, i);
        e->shape[i] = (int64_t)d;
        if (d && numel > (UINT64_MAX / 16) / d) overflow = 1;
        else numel *= d;
    }
    if (!off || off->type != IDD_JSON_ARRAY || off->n != 2 || !get_u64(&off->items[0], &e->begin) ||
        !get_u64(&off->items[1], &e->end))
        return idd_error("tensor '%s': \"data_offsets\" must be [begin, end], non-negative integers", name);
    char s[160];
    idd_shape_str_n(e->ndim, e->shape, s, sizeof s);
    if (e->begin > e->end)
        return idd_error("tensor '%s': data_offsets [%llu, %llu]: begin > end", name,
                         (unsigned long long)e->begin, (unsigned long long)e->end);
    if (overflow || numel * e->dt->size != e->end - e->begin)
        return idd_error("tensor '%s' data_offsets [%llu, %llu] do not match shape %s %s (%llu bytes)",
                         name, (unsigned long long)e->begin, (unsigned long long)e->end, s,
                         e->dt->name, overflow ? 0ull : (unsigned long long)(numel * e->dt->size));
    if (e->end > data_len)
        return idd_error("tensor '%s': data_offsets [%llu, %llu] run past the data buffer (%llu "
                         "bytes; file truncated?)", name, (unsigned long long)e->begin,
                         (unsigned long long)e->end, (unsigned long long)data_len);
    return IDD_OK;
}

/* sort keys carry what they compare, so qsort needs no global (thread-safe) */
typedef struct {
    uint64_t begin, end;
    size_t idx;
} ord_read;

static int cmp_begin(const void *a, const void *b) {
    const ord_read *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* the body of idd_st_read with fp open and f allocated; errors unprefixed */
static idd_status read_body(FILE *fp, uint64_t fsize, idd_st_file *f) {
    idd_status st;
    unsigned char lenb[8];
    if (fsize < 8)
        return idd_error("file is truncated: %llu bytes, less than the 8-byte header length",
                         (unsigned long long)fsize);
    if (fread(lenb, 1, 8, fp) != 8) return idd_error_status(IDD_EIO, "read error: %s", strerror(errno));
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenb[i];
    if (hlen > ST_MAX_HEADER)
        return idd_error("header length %llu exceeds the limit of %llu bytes (not a safetensors file?)",
                         (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > fsize - 8)
        return idd_error("file is truncated: header says %llu bytes, file has %llu after the 8-byte length",
                         (unsigned long long)hlen, (unsigned long long)(fsize - 8));
    if (hlen < 2) return idd_error("header length %llu is too small for a JSON object", (unsigned long long)hlen);
    char *hdr = malloc(hlen + 1);
    if (!hdr) return idd_error_status(IDD_ENOMEM, "out of memory for a %llu-byte header", (unsigned long long)hlen);
    if (fread(hdr, 1, hlen, fp) != hlen) {
        free(hdr);
        return idd_error_status(IDD_EIO, "read error in header: %s", strerror(errno));
    }
    idd_json *root = NULL;
    st = idd_json_parse(hdr, hlen, &root);
    free(hdr);
    if (st) {
        idd_error_prefix("header");
        return st;
    }
    uint64_t data_len = fsize - 8 - hlen;
    st_entry *ents = NULL;
    ord_read *order = NULL;
    size_t ne = 0;
    if (root->type != IDD_JSON_OBJECT) {
        st = idd_error("header is not a JSON object");
        goto done;
    }
    ents = calloc(root->n ? root->n : 1, sizeof *ents);
    order = calloc(root->n ? root->n : 1, sizeof *order);
    if (!ents || !order) {
        st = idd_error_status(IDD_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < root->n; i++) {
        const idd_json *v = &root->items[i];
        if (strcmp(root->keys[i], "__metadata__") == 0) {
            if (v->type != IDD_JSON_OBJECT) {
                st = idd_error("__metadata__ is not a JSON object");
                goto done;
            }
            for (size_t j = 0; j < v->n; j++) {
                if (v->items[j].type != IDD_JSON_STRING) {
                    st = idd_error("__metadata__ value for '%s' is not a string (safetensors "
                                   "metadata is string->string)", v->keys[j]);
                    goto done;
                }
                /* JSON keys are unique (the parser checks): append, no quadratic search */
                char *val = strdup(v->items[j].str);
                if (!val) { st = idd_error_status(IDD_ENOMEM, "out of memory"); goto done; }
                if ((st = idd_strmap_append(&f->meta, v->keys[j], val))) goto done;
            }
            continue;
        }
        if ((st = parse_entry(root->keys[i], v, data_len, &ents[ne]))) goto done;
        order[ne].begin = ents[ne].begin;
        order[ne].end = ents[ne].end;
        order[ne].idx = ne;
        ne++;
    }
    /* packed: sorted by offset, each begins where the previous ended, last ends at EOF */
    qsort(order, ne, sizeof *order, cmp_begin);
    uint64_t at = 0;
    for (size_t k = 0; k < ne; k++) {
        const st_entry *e = &ents[order[k].idx];
        if (e->begin != at) {
            if (e->begin < at)
                st = idd_error("tensor '%s': data_offsets [%llu, %llu] overlap the previous tensor "
                               "(which ends at %llu)", e->name, (unsigned long long)e->begin,
                               (unsigned long long)e->end, (unsigned long long)at);
            else
                st = idd_error("tensor '%s': data_offsets [%llu, %llu] leave a gap after offset %llu",
                               e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                               (unsigned long long)at);
            goto done;
        }
        at = e->end;
    }
    if (at != data_len) {
        st = idd_error("data buffer is %llu bytes but the tensors cover %llu (trailing bytes or "
                       "bad offsets)", (unsigned long long)data_len, (unsigned long long)at);
        goto done;
    }
    f->tensors = calloc(ne ? ne : 1, sizeof *f->tensors);
    if (!f->tensors) {
        st = idd_error_status(IDD_ENOMEM, "out of memory");
        goto done;
    }
    /* read in offset order (sequential I/O), store in header order */
    unsigned char *scratch = NULL;
    size_t scratch_cap = 0;
    for (size_t k = 0; k < ne && st == IDD_OK; k++) {
        size_t i = order[k].idx;
        const st_entry *e = &ents[i];
        idd_array *a = &f->tensors[i];
        f->n = ne; /* so idd_st_free sees every slot (zeroed ones are fine) */
        size_t nname = strlen(e->name) + 1;
        a->name = malloc(nname);
        if (!a->name) { st = idd_error_status(IDD_ENOMEM, "out of memory"); break; }
        memcpy(a->name, e->name, nname);
        a->dtype = e->dt->out;
        a->ndim = e->ndim;
        memcpy(a->shape, e->shape, sizeof a->shape);
        size_t span = (size_t)(e->end - e->begin);
        size_t numel = span / e->dt->size;
        a->nbytes = numel * idd_dtype_size(a->dtype);
        a->data = malloc(a->nbytes ? a->nbytes : 1);
        if (!a->data) {
            st = idd_error_status(IDD_ENOMEM, "tensor '%s': out of memory (%zu bytes)", e->name, a->nbytes);
            break;
        }
        if (fseeko(fp, (off_t)(8 + hlen + e->begin), SEEK_SET) != 0) {
            st = idd_error_status(IDD_EIO, "tensor '%s': seek failed: %s", e->name, strerror(errno));
            break;
        }
        unsigned char *dst = a->data;
        if (e->dt->conv != CV_NONE) {
            if (span > scratch_cap) {
                unsigned char *s2 = realloc(scratch, span);
                if (!s2) { st = idd_error_status(IDD_ENOMEM, "out of memory"); break; }
                scratch = s2;
                scratch_cap = span;
            }
            dst = scratch;
        }
        if (span && fread(dst, 1, span, fp) != span) {
            st = idd_error_status(IDD_EIO, "tensor '%s': read error (file changed or truncated?)", e->name);
            break;
        }
        if (e->dt->conv != CV_NONE) convert(e->dt, scratch, a->data, numel);
    }
    free(scratch);
done:
    free(ents);
    free(order);
    idd_json_free(root);
    return st;
}

idd_status idd_st_read(const char *path, idd_st_file **out) {
    *out = NULL;
    idd_st_file *f = calloc(1, sizeof *f);
    size_t np = strlen(path) + 1;
    if (f) f->path = malloc(np);
    if (!f || !f->path) {
        free(f);
        return idd_error_status(IDD_ENOMEM, "%s: out of memory", path);
    }
    memcpy(f->path, path, np);
    FILE *fp = io_fopen_regular(path, "safetensors");
    if (!fp) {
        idd_st_free(f);
        return IDD_EIO;
    }
    struct stat sb;
    idd_status st;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode))
        st = idd_error_status(IDD_EIO, "not a regular file");
    else
        st = read_body(fp, (uint64_t)sb.st_size, f);
    fclose(fp);
    if (st) {
        idd_error_prefix(path);
        idd_st_free(f);
        return st;
    }
    *out = f;
    return IDD_OK;
}

// ---- writer -------------------------------------------------------------------------

typedef struct {
    size_t size;
    const char *name;
    size_t idx;
} ord_write;

static int cmp_write(const void *a, const void *b) {
    const ord_write *x = a, *y = b;
    if (x->size != y->size) return x->size > y->size ? -1 : 1;
    return strcmp(x->name, y->name);
}

idd_status idd_st_write(const char *path, const idd_array *tensors, size_t n, const idd_strmap *meta) {
    idd_status st = IDD_OK;
    ord_write *order = malloc((n ? n : 1) * sizeof *order);
    iobuf h = {0};
    if (!order) return idd_error_status(IDD_ENOMEM, "%s: out of memory", path);
    for (size_t i = 0; i < n; i++) {
        const idd_array *a = &tensors[i];
        if (!a->name || !a->name[0] || strcmp(a->name, "__metadata__") == 0) {
            st = idd_error("%s: tensor %zu: name must be non-empty and not \"__metadata__\"", path, i);
            goto fail;
        }
        if (io_check_array(path, a) < 0) { st = IDD_ERR; goto fail; }
        order[i].size = idd_dtype_size(a->dtype);
        order[i].name = a->name;
        order[i].idx = i;
        for (size_t j = 0; j < i; j++)
            if (strcmp(tensors[j].name, a->name) == 0) {
                st = idd_error("%s: duplicate tensor name '%s'", path, a->name);
                goto fail;
            }
    }
    qsort(order, n, sizeof *order, cmp_write);

    /* header */
    iobuf_puts(&h, "{");
    int first = 1;
    if (meta && meta->n) {
        iobuf_puts(&h, "\"__metadata__\":{");
        for (size_t i = 0; i < meta->n; i++) {
            if (i) iobuf_puts(&h, ",");
            iobuf_json_quote(&h, meta->keys[i]);
            iobuf_puts(&h, ":");
            iobuf_json_quote(&h, meta->values[i]);
        }
        iobuf_puts(&h, "}");
        first = 0;
    }
    uint64_t at = 0;
    for (size_t k = 0; k < n; k++) {
        const idd_array *a = &tensors[order[k].idx];
        if (!first) iobuf_puts(&h, ",");
        first = 0;
        iobuf_json_quote(&h, a->name);
        iobuf_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", st_name_of(a->dtype));
        for (int d = 0; d < a->ndim; d++) iobuf_printf(&h, d ? ",%lld" : "%lld", (long long)a->shape[d]);
        iobuf_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)at,
                     (unsigned long long)(at + a->nbytes));
        at += a->nbytes;
    }
    iobuf_puts(&h, "}");
    while (h.len % 8) iobuf_puts(&h, " ");
    if (h.oom) { st = idd_error_status(IDD_ENOMEM, "%s: out of memory", path); goto fail; }
    if (h.len > ST_MAX_HEADER) {
        st = idd_error("%s: header of %zu bytes exceeds the safetensors limit", path, h.len);
        goto fail;
    }

    io_atomic w;
    if ((st = io_atomic_open(&w, path, "safetensors"))) goto fail;
    unsigned char lenb[8];
    uint64_t hl = h.len;
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)(hl >> (8 * i));
    st = io_atomic_write(&w, lenb, 8);
    if (!st) st = io_atomic_write(&w, h.data, h.len);
    for (size_t k = 0; k < n && !st; k++) st = io_atomic_write(&w, tensors[order[k].idx].data, tensors[order[k].idx].nbytes);
    if (st) io_atomic_abort(&w);
    else st = io_atomic_commit(&w);
fail:
    free(order);
    iobuf_free(&h);
    return st;
}
