/* datasets.c — readers for the raw dataset formats:
 *  - IDX (LeCun's MNIST format, also Fashion-MNIST): big-endian magic 0x0000TTDD
 *    (TT = element type, DD = number of dims), DD big-endian u32 dims, then the data,
 *    big-endian. Read through zlib's gzopen, which handles .gz and raw files alike.
 *  - CIFAR-10 binary batches: records of 1 label byte + 3072 pixel bytes (1024 R, then
 *    1024 G, then 1024 B, each a 32x32 row-major plane); 10000 records per file. */
#include "io_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

/* read exactly n bytes (gzread takes unsigned lengths, so chunk); returns bytes read or -1 */
static int64_t gz_read_all(gzFile gz, void *dst, size_t n) {
    size_t got = 0;
    while (got < n) {
        unsigned ch = n - got > (1u << 30) ? (1u << 30) : (unsigned)(n - got);
        int r = gzread(gz, (char *)dst + got, ch);
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (int64_t)got;
}

static idd_status gz_fail(gzFile gz, const char *path, const char *what) {
    int errnum = 0;
    const char *m = gzerror(gz, &errnum);
    return idd_error_status(IDD_EIO, "%s: idx: %s (%s)", path, what, errnum == Z_ERRNO ? strerror(errno) : m);
}

idd_status idd_idx_read(const char *path, idd_array *out) {
    memset(out, 0, sizeof *out);
    int fd = io_open_regular(path, "idx");   /* a FIFO is refused, never blocked on */
    if (fd < 0) return IDD_EIO;
    gzFile gz = gzdopen(fd, "rb");
    if (!gz) {
        close(fd);
        return idd_error_status(IDD_EIO, "%s: idx: cannot open: %s", path, strerror(errno));
    }
    idd_status st = IDD_OK;
    unsigned char m[4];
    int64_t r = gz_read_all(gz, m, 4);
    if (r < 0) { st = gz_fail(gz, path, "read error"); goto done; }
    if (r < 4 || m[0] != 0 || m[1] != 0) {
        st = idd_error("%s: idx: bad magic (expected 00 00 <type> <ndims>, e.g. 0x00000803 for "
                       "images, 0x00000801 for labels)", path);
        goto done;
    }
    size_t esz;
    idd_dtype dt;
    switch (m[2]) {
    case 0x08: esz = 1; dt = IDD_U8; break;
    case 0x09: esz = 1; dt = IDD_I64; break;
    case 0x0B: esz = 2; dt = IDD_I64; break;
    case 0x0C: esz = 4; dt = IDD_I64; break;
    case 0x0D: esz = 4; dt = IDD_F32; break;
    case 0x0E: esz = 8; dt = IDD_F64; break;
    default: st = idd_error("%s: idx: unknown element type 0x%02x", path, m[2]); goto done;
    }
    int nd = m[3];
    if (nd < 1 || nd > IDD_MAX_DIMS) { st = idd_error("%s: idx: %d dims not supported (1..%d)", path, nd, IDD_MAX_DIMS); goto done; }
    unsigned char dims[4 * IDD_MAX_DIMS];
    r = gz_read_all(gz, dims, 4 * (size_t)nd);
    if (r != 4 * nd) { st = r < 0 ? gz_fail(gz, path, "read error") : idd_error("%s: idx: file is truncated in the dims", path); goto done; }
    uint64_t numel = 1;
    for (int i = 0; i < nd; i++) {
        uint64_t d = ((uint64_t)dims[4 * i] << 24) | ((uint64_t)dims[4 * i + 1] << 16) | ((uint64_t)dims[4 * i + 2] << 8) | dims[4 * i + 3];
        out->shape[i] = (int64_t)d;
        if (d && numel > ((uint64_t)1 << 40) / d) { st = idd_error("%s: idx: dims too large", path); goto done; }
        numel *= d;
    }
    out->ndim = nd;
    out->dtype = dt;
    size_t raw = (size_t)numel * esz;
    out->nbytes = (size_t)numel * idd_dtype_size(dt);
    unsigned char *buf = malloc(raw ? raw : 1);
    if (!buf) { st = idd_error_status(IDD_ENOMEM, "%s: idx: out of memory (%zu bytes)", path, raw); goto done; }
    r = gz_read_all(gz, buf, raw);
    if (r < 0) { free(buf); st = gz_fail(gz, path, "read error (corrupt gzip?)"); goto done; }
    if ((size_t)r != raw) {
        char s[128];
        free(buf);
        st = idd_error("%s: idx: file is truncated: dims %s need %zu data bytes, got %lld", path,
                       idd_shape_str_n(nd, out->shape, s, sizeof s), raw, (long long)r);
        goto done;
    }
    unsigned char extra;
    r = gz_read_all(gz, &extra, 1);
    if (r != 0) {
        free(buf);
        st = r < 0 ? gz_fail(gz, path, "read error (corrupt gzip?)")
                   : idd_error("%s: idx: trailing bytes after the data (dims disagree with the file size)", path);
        goto done;
    }
    /* zlib checks a gzip member's CRC-32 and length trailer itself (a mismatch is a read
     * error above), but a stream cut before or inside that trailer reads as a quiet end
     * of file, with Z_BUF_ERROR left behind: that is a truncated file */
    int zerr = Z_OK;
    gzerror(gz, &zerr);
    if (zerr != Z_OK) {
        free(buf);
        st = idd_error("%s: idx: gzip stream is truncated (its CRC-32/length trailer is missing or cut)", path);
        goto done;
    }
    if (dt == IDD_U8) {
        out->data = buf;
    } else {
        out->data = malloc(out->nbytes ? out->nbytes : 1);
        if (!out->data) { free(buf); st = idd_error_status(IDD_ENOMEM, "%s: idx: out of memory", path); goto done; }
        for (size_t i = 0; i < (size_t)numel; i++) {
            const unsigned char *p = buf + i * esz;
            uint64_t v = 0;
            for (size_t k = 0; k < esz; k++) v = (v << 8) | p[k];
            switch (m[2]) {
            case 0x09: ((int64_t *)out->data)[i] = (int8_t)v; break;
            case 0x0B: ((int64_t *)out->data)[i] = (int16_t)v; break;
            case 0x0C: ((int64_t *)out->data)[i] = (int32_t)v; break;
            case 0x0D: { uint32_t u = (uint32_t)v; float f; memcpy(&f, &u, 4); ((float *)out->data)[i] = f; break; }
            case 0x0E: { double d; memcpy(&d, &v, 8); ((double *)out->data)[i] = d; break; }
            }
        }
        free(buf);
    }
done:
    gzclose(gz);
    if (st) {
        free(out->data);
        memset(out, 0, sizeof *out);
    }
    return st;
}

idd_status idd_mnist_read(const char *images_path, const char *labels_path, idd_array *images,
                          idd_array *labels) {
    memset(labels, 0, sizeof *labels);
    idd_array raw;
    idd_status st = idd_idx_read(images_path, images);
    if (st) return st;
    if (images->ndim != 3 || images->dtype != IDD_U8) {
        idd_array_clear(images);
        return idd_error("%s: expected an IDX ubyte image file (magic 0x00000803, dims N,H,W)", images_path);
    }
    if ((st = idd_idx_read(labels_path, &raw))) {
        idd_array_clear(images);
        return st;
    }
    if (raw.ndim != 1 || raw.dtype != IDD_U8) {
        idd_array_clear(images);
        idd_array_clear(&raw);
        return idd_error("%s: expected an IDX ubyte label file (magic 0x00000801, dims N)", labels_path);
    }
    if (raw.shape[0] != images->shape[0]) {
        st = idd_error("%s has %lld labels but %s has %lld images", labels_path, (long long)raw.shape[0],
                       images_path, (long long)images->shape[0]);
        idd_array_clear(images);
        idd_array_clear(&raw);
        return st;
    }
    labels->dtype = IDD_I64;
    labels->ndim = 1;
    labels->shape[0] = raw.shape[0];
    labels->nbytes = (size_t)raw.shape[0] * 8;
    labels->data = malloc(labels->nbytes ? labels->nbytes : 1);
    if (!labels->data) {
        idd_array_clear(images);
        idd_array_clear(&raw);
        return idd_error_status(IDD_ENOMEM, "%s: out of memory", labels_path);
    }
    const uint8_t *l = raw.data;
    for (int64_t i = 0; i < raw.shape[0]; i++) {
        if (l[i] > 9) {
            st = idd_error("%s: label %d at index %lld is not in 0..9", labels_path, l[i], (long long)i);
            idd_array_clear(images);
            idd_array_clear(labels);
            idd_array_clear(&raw);
            return st;
        }
        ((int64_t *)labels->data)[i] = l[i];
    }
    idd_array_clear(&raw);
    return IDD_OK;
}

#define CIFAR_REC 3073

idd_status idd_cifar10_read(const char *path, idd_array *images, idd_array *labels) {
    memset(images, 0, sizeof *images);
    memset(labels, 0, sizeof *labels);
    unsigned char *buf;
    size_t len;
    idd_status st = io_read_file(path, "cifar10", &buf, &len);
    if (st) return st;
    if (len == 0 || len % CIFAR_REC != 0) {
        free(buf);
        return idd_error("%s: cifar10: size %zu is not a multiple of %d; expected records of 1 label "
                         "byte + 3072 pixel bytes (R, G, B planes of 32x32), 10000 records = "
                         "30730000 bytes per batch file", path, len, CIFAR_REC);
    }
    size_t n = len / CIFAR_REC;
    images->data = malloc(n * 3072);
    labels->data = malloc(n * 8);
    if (!images->data || !labels->data) {
        free(buf);
        idd_array_clear(images);
        idd_array_clear(labels);
        return idd_error_status(IDD_ENOMEM, "%s: cifar10: out of memory", path);
    }
    for (size_t i = 0; i < n; i++) {
        const unsigned char *rec = buf + i * CIFAR_REC;
        if (rec[0] > 9) {
            st = idd_error("%s: cifar10: record %zu has label %d, not 0..9 (a CIFAR-100 file? those "
                           "have 2 label bytes)", path, i, rec[0]);
            free(buf);
            idd_array_clear(images);
            idd_array_clear(labels);
            return st;
        }
        ((int64_t *)labels->data)[i] = rec[0];
        memcpy((unsigned char *)images->data + i * 3072, rec + 1, 3072);
    }
    free(buf);
    images->dtype = IDD_U8;
    images->ndim = 4;
    images->shape[0] = (int64_t)n;
    images->shape[1] = 3;
    images->shape[2] = 32;
    images->shape[3] = 32;
    images->nbytes = n * 3072;
    labels->dtype = IDD_I64;
    labels->ndim = 1;
    labels->shape[0] = (int64_t)n;
    labels->nbytes = n * 8;
    return IDD_OK;
}
