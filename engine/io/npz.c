/* npz.c — NumPy .npy arrays and .npz archives (a ZIP of <name>.npy members).
 * .npy: "\x93NUMPY", version bytes, header length (u16 for 1.0, u32 for 2.0/3.0), an
 * ASCII Python dict {'descr': '<f4', 'fortran_order': False, 'shape': (N, H, W, C), }
 * space-padded and '\n'-terminated so the data starts on a 64-byte boundary, then the
 * raw C-order data. .npz reading handles STORED and DEFLATED members (zlib) and zip64
 * records, and checks each member's CRC-32; .npz writing stores members uncompressed,
 * which is what np.savez produces and the ADM evaluator streams. */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

// ---- .npy header ------------------------------------------------------------------

static const char *npy_descr(idd_dtype d) {
    switch (d) {
    case IDD_F32: return "<f4";
    case IDD_F64: return "<f8";
    case IDD_I64: return "<i8";
    case IDD_U8: return "|u1";
    default: return NULL;
    }
}

/* numpy has no bfloat16: such arrays are refused (convert to float32 first) */
static int npy_check(const char *path, const idd_array *a) {
    if (io_check_array(path, a) < 0) return -1;
    if (!npy_descr(a->dtype)) {
        idd_error("%s: array '%s': %s has no numpy dtype (numpy has no bfloat16; convert to float32)", path,
                  a->name ? a->name : "?", idd_dtype_name(a->dtype));
        return -1;
    }
    return 0;
}

/* the full header (magic .. '\n'), padded so its length is a multiple of 64 */
static void npy_header(const idd_array *a, iobuf *out) {
    iobuf d = {0};
    iobuf_printf(&d, "{'descr': '%s', 'fortran_order': False, 'shape': (", npy_descr(a->dtype));
    for (int i = 0; i < a->ndim; i++) iobuf_printf(&d, i ? ", %lld" : "%lld", (long long)a->shape[i]);
    iobuf_puts(&d, a->ndim == 1 ? ",), }" : "), }");
    size_t pre = 10; /* magic(6) + version(2) + u16 length */
    size_t total = pre + d.len + 1;
    int v2 = 0;
    if (((total + 63) / 64) * 64 - pre > 65535) {
        v2 = 1;
        pre = 12;
        total = pre + d.len + 1;
    }
    size_t padded = (total + 63) / 64 * 64;
    while (pre + d.len + 1 < padded) iobuf_puts(&d, " ");
    iobuf_puts(&d, "\n");
    size_t hl = d.len;
    unsigned char m[12] = {0x93, 'N', 'U', 'M', 'P', 'Y', (unsigned char)(v2 ? 2 : 1), 0,
                           (unsigned char)hl, (unsigned char)(hl >> 8), (unsigned char)(hl >> 16),
                           (unsigned char)(hl >> 24)};
    iobuf_put(out, m, pre);
    iobuf_put(out, d.data ? d.data : "", d.len);
    if (d.oom) out->oom = 1;
    iobuf_free(&d);
}

/* tiny reader for the Python-literal dict in the header */
typedef struct {
    const char *s;
    size_t n, i;
} lit;

static void lit_ws(lit *l) {
    while (l->i < l->n && (l->s[l->i] == ' ' || l->s[l->i] == '\t' || l->s[l->i] == '\n' || l->s[l->i] == '\r'))
        l->i++;
}

static int lit_char(lit *l, char c) {
    lit_ws(l);
    if (l->i < l->n && l->s[l->i] == c) { l->i++; return 1; }
    return 0;
}

/* quoted string into buf; 0 on failure */
static int lit_str(lit *l, char *buf, size_t cap) {
    lit_ws(l);
    if (l->i >= l->n || (l->s[l->i] != '\'' && l->s[l->i] != '"')) return 0;
    char q = l->s[l->i++];
    size_t k = 0;
    while (l->i < l->n && l->s[l->i] != q) {
        if (k + 1 >= cap) return 0;
        buf[k++] = l->s[l->i++];
    }
    if (l->i >= l->n) return 0;
    l->i++;
    buf[k] = 0;
    return 1;
}

typedef struct {
    char descr[16];
    int fortran;
    int ndim;
    int64_t shape[IDD_MAX_DIMS];
} npy_info;

static idd_status parse_dict(const char *s, size_t n, npy_info *info) {
    lit l = {s, n, 0};
    int have_descr = 0, have_fo = 0, have_shape = 0;
    if (!lit_char(&l, '{')) return idd_error("npy header is not a dict");
    while (!lit_char(&l, '}')) {
        char key[32];
        if (!lit_str(&l, key, sizeof key) || !lit_char(&l, ':'))
            return idd_error("npy header: malformed dict near byte %zu", l.i);
        if (strcmp(key, "descr") == 0) {
            if (!lit_str(&l, info->descr, sizeof info->descr))
                return idd_error("npy header: 'descr' is not a simple type string (structured "
                                 "dtypes are not supported)");
            have_descr = 1;
        } else if (strcmp(key, "fortran_order") == 0) {
            lit_ws(&l);
            if (l.n - l.i >= 4 && memcmp(s + l.i, "True", 4) == 0) { info->fortran = 1; l.i += 4; }
            else if (l.n - l.i >= 5 && memcmp(s + l.i, "False", 5) == 0) { info->fortran = 0; l.i += 5; }
            else return idd_error("npy header: bad 'fortran_order'");
            have_fo = 1;
        } else if (strcmp(key, "shape") == 0) {
            if (!lit_char(&l, '(')) return idd_error("npy header: 'shape' is not a tuple");
            info->ndim = 0;
            while (!lit_char(&l, ')')) {
                lit_ws(&l);
                if (l.i >= l.n || s[l.i] < '0' || s[l.i] > '9') return idd_error("npy header: bad 'shape'");
                int64_t v = 0;
                while (l.i < l.n && s[l.i] >= '0' && s[l.i] <= '9') {
                    if (v > (INT64_MAX - 9) / 10) return idd_error("npy header: dim too large");
                    v = v * 10 + (s[l.i++] - '0');
                }
                if (info->ndim >= IDD_MAX_DIMS)
                    return idd_error("npy header: more than %d dims", IDD_MAX_DIMS);
                info->shape[info->ndim++] = v;
                if (!lit_char(&l, ',')) {
                    if (!lit_char(&l, ')')) return idd_error("npy header: bad 'shape'");
                    break;
                }
            }
            have_shape = 1;
        } else {
            return idd_error("npy header: unexpected key '%s'", key);
        }
        if (!lit_char(&l, ',')) {
            if (!lit_char(&l, '}')) return idd_error("npy header: expected ',' or '}'");
            break;
        }
    }
    if (!have_descr || !have_fo || !have_shape)
        return idd_error("npy header: missing 'descr', 'fortran_order' or 'shape'");
    return IDD_OK;
}

typedef enum { NC_COPY, NC_F16, NC_I8, NC_I16, NC_I32, NC_U16, NC_U32, NC_U64 } npy_conv;

/* map descr to our dtype and a conversion; 0 on unsupported */
static int map_descr(const char *d, idd_dtype *out, npy_conv *conv, size_t *isz) {
    char e = d[0], k = d[1];
    if (!e || !k) return 0;
    int sz = atoi(d + 2);
    if (sz <= 0 || sz > 8) return 0;
    if (e == '>' && sz > 1) return 0;
    if (e != '<' && e != '|' && e != '=' && e != '>') return 0;
    *isz = (size_t)sz;
    *conv = NC_COPY;
    if (k == 'f' && sz == 4) *out = IDD_F32;
    else if (k == 'f' && sz == 2) { *out = IDD_F32; *conv = NC_F16; }
    else if (k == 'f' && sz == 8) *out = IDD_F64;
    else if (k == 'i' && sz == 8) *out = IDD_I64;
    else if (k == 'i' && sz == 4) { *out = IDD_I64; *conv = NC_I32; }
    else if (k == 'i' && sz == 2) { *out = IDD_I64; *conv = NC_I16; }
    else if (k == 'i' && sz == 1) { *out = IDD_I64; *conv = NC_I8; }
    else if (k == 'u' && sz == 8) { *out = IDD_I64; *conv = NC_U64; }
    else if (k == 'u' && sz == 4) { *out = IDD_I64; *conv = NC_U32; }
    else if (k == 'u' && sz == 2) { *out = IDD_I64; *conv = NC_U16; }
    else if ((k == 'u' || k == 'b') && sz == 1) *out = IDD_U8;
    else return 0;
    return 1;
}

/* Parse a complete .npy image held in buf (malloc'd, len bytes); on success buf is
 * consumed (moved into out->data or freed). On failure buf is freed too. */
static idd_status npy_from_buffer(const char *what, unsigned char *buf, size_t len, idd_array *out) {
    memset(out, 0, sizeof *out);
    idd_status st = IDD_OK;
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0) {
        free(buf);
        return idd_error("%s: not a .npy file (bad magic)", what);
    }
    unsigned major = buf[6];
    size_t pre, hl;
    if (major == 1) { pre = 10; hl = (size_t)buf[8] | ((size_t)buf[9] << 8); }
    else if (major == 2 || major == 3) {
        if (len < 12) { free(buf); return idd_error("%s: .npy file is truncated", what); }
        pre = 12;
        hl = (size_t)buf[8] | ((size_t)buf[9] << 8) | ((size_t)buf[10] << 16) | ((size_t)buf[11] << 24);
    } else {
        unsigned minor = buf[7];
        free(buf);
        return idd_error("%s: unsupported .npy version %u.%u", what, major, minor);
    }
    if (hl > len - pre) {
        free(buf);
        return idd_error("%s: .npy file is truncated: header says %zu bytes, %zu left", what, hl, len - pre);
    }
    npy_info info;
    memset(&info, 0, sizeof info);
    if ((st = parse_dict((const char *)buf + pre, hl, &info))) {
        free(buf);
        idd_error_prefix(what);
        return st;
    }
    idd_dtype dt;
    npy_conv conv;
    size_t isz;
    if (!map_descr(info.descr, &dt, &conv, &isz)) {
        free(buf);
        return idd_error("%s: unsupported dtype '%s' (supported: little-endian f2 f4 f8 i1 i2 i4 i8 "
                         "u1 u2 u4 u8 b1; object/pickled arrays are not)", what, info.descr);
    }
    if (info.fortran && info.ndim > 1) {
        free(buf);
        return idd_error("%s: Fortran-order arrays are not supported (save with "
                         "np.ascontiguousarray)", what);
    }
    out->dtype = dt;
    out->ndim = info.ndim;
    memcpy(out->shape, info.shape, sizeof out->shape);
    uint64_t numel = 1;
    for (int i = 0; i < info.ndim; i++) {
        uint64_t d = (uint64_t)info.shape[i];
        if (d && numel > (UINT64_MAX / 16) / d) { free(buf); return idd_error("%s: shape too large", what); }
        numel *= d;
    }
    size_t off = pre + hl, have = len - off, need = (size_t)numel * isz;
    char s[128];
    if (have != need) {
        free(buf);
        return idd_error("%s: data is %zu bytes but shape %s '%s' needs %zu%s", what, have,
                         idd_shape_str_n(info.ndim, info.shape, s, sizeof s), info.descr, need,
                         have < need ? " (truncated)" : "");
    }
    out->nbytes = (size_t)numel * idd_dtype_size(dt);
    if (conv == NC_COPY) {
        memmove(buf, buf + off, need);
        unsigned char *sh = realloc(buf, need ? need : 1);
        out->data = sh ? sh : buf;
        return IDD_OK;
    }
    void *dst = malloc(out->nbytes ? out->nbytes : 1);
    if (!dst) {
        free(buf);
        memset(out, 0, sizeof *out);
        return idd_error_status(IDD_ENOMEM, "%s: out of memory", what);
    }
    const unsigned char *src = buf + off;
    int64_t *di = dst;
    for (size_t i = 0; i < (size_t)numel; i++) {
        switch (conv) {
        case NC_F16: { uint16_t h; memcpy(&h, src + 2 * i, 2); ((float *)dst)[i] = io_f16_to_f32(h); break; }
        case NC_I8: di[i] = (int8_t)src[i]; break;
        case NC_I16: { int16_t v; memcpy(&v, src + 2 * i, 2); di[i] = v; break; }
        case NC_I32: { int32_t v; memcpy(&v, src + 4 * i, 4); di[i] = v; break; }
        case NC_U16: { uint16_t v; memcpy(&v, src + 2 * i, 2); di[i] = v; break; }
        case NC_U32: { uint32_t v; memcpy(&v, src + 4 * i, 4); di[i] = v; break; }
        case NC_U64: {
            uint64_t v;
            memcpy(&v, src + 8 * i, 8);
            if (v > (uint64_t)INT64_MAX) {
                free(buf);
                free(dst);
                memset(out, 0, sizeof *out);
                return idd_error("%s: uint64 value %llu does not fit int64", what, (unsigned long long)v);
            }
            di[i] = (int64_t)v;
            break;
        }
        case NC_COPY: break;
        }
    }
    free(buf);
    out->data = dst;
    return IDD_OK;
}

idd_status idd_npy_read(const char *path, idd_array *out) {
    unsigned char *buf;
    size_t len;
    memset(out, 0, sizeof *out);
    idd_status st = io_read_file(path, "npy", &buf, &len);
    if (st) return st;
    return npy_from_buffer(path, buf, len, out);
}

idd_status idd_npy_write(const char *path, const idd_array *a) {
    if (npy_check(path, a) < 0) return IDD_ERR;
    iobuf h = {0};
    npy_header(a, &h);
    if (h.oom) { iobuf_free(&h); return idd_error_status(IDD_ENOMEM, "%s: out of memory", path); }
    io_atomic w;
    idd_status st = io_atomic_open(&w, path, "npy");
    if (!st) st = io_atomic_write(&w, h.data, h.len);
    if (!st) st = io_atomic_write(&w, a->data, a->nbytes);
    if (st) { if (w.fp) io_atomic_abort(&w); }
    else st = io_atomic_commit(&w);
    iobuf_free(&h);
    return st;
}

// ---- ZIP reading ----------------------------------------------------------------------

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const unsigned char *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }
static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

static int read_at(FILE *fp, uint64_t off, void *buf, size_t n) {
    if (fseeko(fp, (off_t)off, SEEK_SET) != 0) return 0;
    return fread(buf, 1, n, fp) == n;
}

void idd_npz_free(idd_npz *z) {
    if (!z) return;
    for (size_t i = 0; i < z->n; i++) idd_array_clear(&z->arrays[i]);
    free(z->arrays);
    free(z);
}

const idd_array *idd_npz_find(const idd_npz *z, const char *name) {
    if (!z) return NULL;
    for (size_t i = 0; i < z->n; i++)
        if (z->arrays[i].name && strcmp(z->arrays[i].name, name) == 0) return &z->arrays[i];
    return NULL;
}

/* inflate a raw-deflate stream of csize bytes from fp into out[usize] */
static idd_status inflate_member(FILE *fp, uint64_t csize, unsigned char *out, uint64_t usize, const char *name) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) return idd_error_status(IDD_ENOMEM, "member '%s': zlib init failed", name);
    enum { IN_CHUNK = 1 << 16 };
    unsigned char *in = malloc(IN_CHUNK); /* heap: keep worker-thread stacks small */
    if (!in) { inflateEnd(&zs); return idd_error_status(IDD_ENOMEM, "member '%s': out of memory", name); }
    uint64_t left = csize, produced = 0;
    int rc = Z_OK;
    while (rc != Z_STREAM_END) {
        if (zs.avail_in == 0) {
            if (left == 0) break;
            size_t k = left < IN_CHUNK ? (size_t)left : IN_CHUNK;
            if (fread(in, 1, k, fp) != k) { inflateEnd(&zs); free(in); return idd_error_status(IDD_EIO, "member '%s': read error", name); }
            left -= k;
            zs.next_in = in;
            zs.avail_in = (uInt)k;
        }
        uint64_t room = usize - produced;
        if (room == 0) { /* give zlib a byte of room to detect extra output / stream end */
            unsigned char extra;
            zs.next_out = &extra;
            zs.avail_out = 1;
            rc = inflate(&zs, Z_NO_FLUSH);
            if (zs.avail_out == 0) { inflateEnd(&zs); free(in); return idd_error("member '%s': inflates to more than %llu bytes", name, (unsigned long long)usize); }
        } else {
            uInt chunk = room > (1u << 30) ? (1u << 30) : (uInt)room;
            zs.next_out = out + produced;
            zs.avail_out = chunk;
            rc = inflate(&zs, Z_NO_FLUSH);
            produced += chunk - zs.avail_out;
        }
        if (rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) {
            idd_status st = idd_error("member '%s': corrupt deflate data (%s)", name, zs.msg ? zs.msg : "zlib error");
            inflateEnd(&zs);
            free(in);
            return st;
        }
        if (rc == Z_BUF_ERROR && zs.avail_in == 0 && left == 0) break;
    }
    inflateEnd(&zs);
    free(in);
    if (rc != Z_STREAM_END || produced != usize)
        return idd_error("member '%s': deflate stream ended early (%llu of %llu bytes; truncated?)", name,
                         (unsigned long long)produced, (unsigned long long)usize);
    return IDD_OK;
}

static idd_status npz_body(FILE *fp, uint64_t fsize, idd_npz *z) {
    enum { TAIL = 65557 }; /* EOCD (22) + the longest comment */
    size_t tn = fsize < TAIL ? (size_t)fsize : TAIL;
    if (tn < 22) return idd_error("not a zip file (too short)");
    unsigned char *tail = malloc(tn);
    if (!tail) return idd_error_status(IDD_ENOMEM, "out of memory");
    if (!read_at(fp, fsize - tn, tail, tn)) { free(tail); return idd_error_status(IDD_EIO, "read error"); }
    long eo = -1;
    for (long i = (long)tn - 22; i >= 0; i--)
        if (rd32(tail + i) == 0x06054b50) { eo = i; break; }
    if (eo < 0) { free(tail); return idd_error("not a zip file or truncated (no end-of-central-directory record)"); }
    const unsigned char *e = tail + eo;
    uint64_t nent = rd16(e + 10), cdsize = rd32(e + 12), cdoff = rd32(e + 16);
    free(tail);
    uint64_t eocd_pos = fsize - tn + (uint64_t)eo;
    if (nent == 0xffff || cdsize == 0xffffffffu || cdoff == 0xffffffffu) {
        unsigned char loc[20], z64[56];
        if (eocd_pos < 20 || !read_at(fp, eocd_pos - 20, loc, 20) || rd32(loc) != 0x07064b50)
            return idd_error("zip64 locator missing");
        uint64_t z64off = rd64(loc + 8);
        if (z64off > fsize - 56 || !read_at(fp, z64off, z64, 56) || rd32(z64) != 0x06064b50)
            return idd_error("zip64 end-of-central-directory record missing or bad");
        nent = rd64(z64 + 32);
        cdsize = rd64(z64 + 40);
        cdoff = rd64(z64 + 48);
    }
    if (cdoff > fsize || cdsize > fsize - cdoff) return idd_error("central directory lies outside the file (truncated?)");
    if (nent > cdsize / 46) return idd_error("central directory claims %llu entries in %llu bytes", (unsigned long long)nent, (unsigned long long)cdsize);
    unsigned char *cd = malloc(cdsize ? cdsize : 1);
    if (!cd) return idd_error_status(IDD_ENOMEM, "out of memory");
    idd_status st = IDD_OK;
    if (!read_at(fp, cdoff, cd, cdsize)) { free(cd); return idd_error_status(IDD_EIO, "cannot read the central directory"); }
    z->arrays = calloc(nent ? nent : 1, sizeof *z->arrays);
    if (!z->arrays) { free(cd); return idd_error_status(IDD_ENOMEM, "out of memory"); }
    size_t p = 0;
    for (uint64_t k = 0; k < nent; k++) {
        if (p + 46 > cdsize || rd32(cd + p) != 0x02014b50) { st = idd_error("central directory entry %llu is corrupt", (unsigned long long)k); break; }
        const unsigned char *c = cd + p;
        unsigned flags = rd16(c + 8), method = rd16(c + 10);
        uint32_t crc = rd32(c + 16);
        uint64_t csize = rd32(c + 20), usize = rd32(c + 24), loff = rd32(c + 42);
        size_t nlen = rd16(c + 28), xlen = rd16(c + 30), clen = rd16(c + 32);
        if (p + 46 + nlen + xlen + clen > cdsize) { st = idd_error("central directory entry %llu is corrupt", (unsigned long long)k); break; }
        char name[512];
        size_t nl = nlen < sizeof name - 1 ? nlen : sizeof name - 1;
        memcpy(name, c + 46, nl);
        name[nl] = 0;
        /* zip64 extra: the 0xffffffff fields, in order usize, csize, offset */
        const unsigned char *x = c + 46 + nlen, *xe = x + xlen;
        while (x + 4 <= xe) {
            unsigned id = rd16(x), sz = rd16(x + 2);
            if (x + 4 + sz > xe) break;
            if (id == 1) {
                const unsigned char *q = x + 4, *qe = x + 4 + sz;
                if (usize == 0xffffffffu && q + 8 <= qe) { usize = rd64(q); q += 8; }
                if (csize == 0xffffffffu && q + 8 <= qe) { csize = rd64(q); q += 8; }
                if (loff == 0xffffffffu && q + 8 <= qe) { loff = rd64(q); q += 8; }
            }
            x += 4 + sz;
        }
        p += 46 + nlen + xlen + clen;
        if (flags & 1) { st = idd_error("member '%s' is encrypted", name); break; }
        if (method != 0 && method != 8) { st = idd_error("member '%s': compression method %u not supported (stored or deflate only)", name, method); break; }
        unsigned char lh[30];
        if (loff > fsize - 30 || !read_at(fp, loff, lh, 30) || rd32(lh) != 0x04034b50) { st = idd_error("member '%s': bad local header offset (truncated?)", name); break; }
        uint64_t doff = loff + 30 + rd16(lh + 26) + rd16(lh + 28);
        if (doff > fsize || csize > fsize - doff) { st = idd_error("member '%s': data runs past the end of the file (truncated?)", name); break; }
        if (method == 0 && csize != usize) { st = idd_error("member '%s': stored sizes differ", name); break; }
        if (usize > (uint64_t)SIZE_MAX - 1) { st = idd_error("member '%s' too large", name); break; }
        unsigned char *buf = malloc(usize ? (size_t)usize : 1);
        if (!buf) { st = idd_error_status(IDD_ENOMEM, "member '%s': out of memory (%llu bytes)", name, (unsigned long long)usize); break; }
        if (fseeko(fp, (off_t)doff, SEEK_SET) != 0) { free(buf); st = idd_error_status(IDD_EIO, "seek failed"); break; }
        if (method == 0) {
            if (usize && fread(buf, 1, (size_t)usize, fp) != usize) { free(buf); st = idd_error_status(IDD_EIO, "member '%s': read error", name); break; }
        } else if ((st = inflate_member(fp, csize, buf, usize, name))) {
            free(buf);
            break;
        }
        uLong got = crc32(0L, Z_NULL, 0);
        for (uint64_t o = 0; o < usize;) {
            uInt ch = usize - o > (1u << 30) ? (1u << 30) : (uInt)(usize - o);
            got = crc32(got, buf + o, ch);
            o += ch;
        }
        if ((uint32_t)got != crc) { free(buf); st = idd_error("member '%s': CRC-32 mismatch (corrupt file)", name); break; }
        idd_array *a = &z->arrays[z->n];
        if ((st = npy_from_buffer(name, buf, (size_t)usize, a))) break;
        z->n++;
        size_t bl = strlen(name);
        if (bl >= 4 && strcmp(name + bl - 4, ".npy") == 0) name[bl - 4] = 0;
        a->name = malloc(strlen(name) + 1);
        if (!a->name) { st = idd_error_status(IDD_ENOMEM, "out of memory"); break; }
        strcpy(a->name, name);
    }
    free(cd);
    return st;
}

idd_status idd_npz_read(const char *path, idd_npz **out) {
    *out = NULL;
    idd_npz *z = calloc(1, sizeof *z);
    if (!z) return idd_error_status(IDD_ENOMEM, "%s: out of memory", path);
    FILE *fp = io_fopen_regular(path, "npz");
    if (!fp) {
        free(z);
        return IDD_EIO;
    }
    struct stat sb;
    idd_status st;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode)) st = idd_error_status(IDD_EIO, "not a regular file");
    else st = npz_body(fp, (uint64_t)sb.st_size, z);
    fclose(fp);
    if (st) {
        idd_error_prefix(path);
        idd_npz_free(z);
        return st;
    }
    *out = z;
    return IDD_OK;
}

// ---- ZIP writing (STORED) -------------------------------------------------------------

static void wr16(unsigned char *p, unsigned v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void wr32(unsigned char *p, uint32_t v) { wr16(p, v & 0xffff); wr16(p + 2, v >> 16); }

idd_status idd_npz_write(const char *path, const idd_array *arrays, size_t n) {
    idd_status st = IDD_OK;
    iobuf cd = {0};
    iobuf hdr = {0};
    for (size_t i = 0; i < n; i++) {
        if (!arrays[i].name || !arrays[i].name[0] || strlen(arrays[i].name) > 250)
            return idd_error("%s: array %zu needs a name (1..250 chars)", path, i);
        if (npy_check(path, &arrays[i]) < 0) return IDD_ERR;
        for (size_t j = 0; j < i; j++)
            if (strcmp(arrays[i].name, arrays[j].name) == 0)
                return idd_error("%s: duplicate array name '%s'", path, arrays[i].name);
    }
    io_atomic w;
    if ((st = io_atomic_open(&w, path, "npz"))) return st;
    uint64_t off = 0;
    for (size_t i = 0; i < n && !st; i++) {
        const idd_array *a = &arrays[i];
        char name[260];
        snprintf(name, sizeof name, "%s.npy", a->name);
        size_t nl = strlen(name);
        hdr.len = 0;
        npy_header(a, &hdr);
        if (hdr.oom) { st = idd_error_status(IDD_ENOMEM, "%s: out of memory", path); break; }
        uint64_t size = hdr.len + (uint64_t)a->nbytes;
        if (size >= 0xffffffffu || off >= 0xffffffffu) {
            st = idd_error("%s: array '%s' (%llu bytes) or archive exceeds 4 GiB; zip64 writing is not supported",
                           path, a->name, (unsigned long long)size);
            break;
        }
        uLong crc = crc32(0L, Z_NULL, 0);
        crc = crc32(crc, (const Bytef *)hdr.data, (uInt)hdr.len);
        for (size_t o = 0; o < a->nbytes;) {
            uInt ch = a->nbytes - o > (1u << 30) ? (1u << 30) : (uInt)(a->nbytes - o);
            crc = crc32(crc, (const Bytef *)a->data + o, ch);
            o += ch;
        }
        unsigned char lh[30] = {0};
        wr32(lh, 0x04034b50);
        wr16(lh + 4, 20);          /* version needed */
        wr16(lh + 8, 0);           /* stored */
        wr16(lh + 10, 0);          /* time 00:00 */
        wr16(lh + 12, (0 << 9) | (1 << 5) | 1); /* date 1980-01-01 */
        wr32(lh + 14, (uint32_t)crc);
        wr32(lh + 18, (uint32_t)size);
        wr32(lh + 22, (uint32_t)size);
        wr16(lh + 26, (unsigned)nl);
        unsigned char ch[46] = {0};
        wr32(ch, 0x02014b50);
        wr16(ch + 4, 20);
        wr16(ch + 6, 20);
        memcpy(ch + 10, lh + 8, 20); /* method .. name length, same as the local header */
        wr32(ch + 38, 0x81a40000u);  /* external attrs: regular file, 0644 */
        wr32(ch + 42, (uint32_t)off);
        iobuf_put(&cd, ch, 46);
        iobuf_put(&cd, name, nl);
        st = io_atomic_write(&w, lh, 30);
        if (!st) st = io_atomic_write(&w, name, nl);
        if (!st) st = io_atomic_write(&w, hdr.data, hdr.len);
        if (!st) st = io_atomic_write(&w, a->data, a->nbytes);
        off += 30 + nl + size;
    }
    if (!st && (cd.oom || off >= 0xffffffffu || n > 0xfffe)) st = idd_error("%s: archive too large or out of memory", path);
    if (!st) {
        unsigned char e[22] = {0};
        wr32(e, 0x06054b50);
        wr16(e + 8, (unsigned)n);
        wr16(e + 10, (unsigned)n);
        wr32(e + 12, (uint32_t)cd.len);
        wr32(e + 16, (uint32_t)off);
        st = io_atomic_write(&w, cd.data ? cd.data : "", cd.len);
        if (!st) st = io_atomic_write(&w, e, 22);
    }
    if (st) io_atomic_abort(&w);
    else st = io_atomic_commit(&w);
    iobuf_free(&cd);
    iobuf_free(&hdr);
    return st;
}
