/* io_internal.h — helpers shared by the engine/io/ format files (not public API):
 * a growable byte buffer, whole-file reading, and the atomic writer (tmp + fsync +
 * rename) every writer goes through. */
#ifndef IDDPM_IO_INTERNAL_H
#define IDDPM_IO_INTERNAL_H

#include <stdio.h>

#include "iddpm/io.h"

/* growable byte buffer; on allocation failure oom is set and later appends are no-ops */
typedef struct {
    char *data;
    size_t len, cap;
    int oom;
} iobuf;

void iobuf_put(iobuf *b, const void *p, size_t n);
void iobuf_puts(iobuf *b, const char *s);
void iobuf_printf(iobuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void iobuf_free(iobuf *b);
/* append s as a JSON string literal (quotes and escapes) */
void iobuf_json_quote(iobuf *b, const char *s);

/* Read a whole file into a malloc'd buffer (plus a NUL after the end). what is a short
 * label for the message ("safetensors"). */
idd_status io_read_file(const char *path, const char *what, unsigned char **data, size_t *len);

/* Open a regular file for reading without blocking on a FIFO or device (O_NONBLOCK, fstat,
 * non-regular refused, O_NONBLOCK cleared): a descriptor, or -1 with the error set. */
int io_open_regular(const char *path, const char *what);
FILE *io_fopen_regular(const char *path, const char *what);

/* The atomic writer: data goes to "<path>.tmp.<pid>.<k>", created exclusively (never
 * through an existing file or link); commit checks every write, flush and close, fsyncs
 * and renames it over path; abort (also called by commit on failure) closes and unlinks
 * the temp file. */
#define IO_TMP_TRIES 1000
typedef struct {
    FILE *fp;
    char *tmp;
    const char *path;
    const char *what;
} io_atomic;

idd_status io_atomic_open(io_atomic *a, const char *path, const char *what);
idd_status io_atomic_write(io_atomic *a, const void *p, size_t n);
idd_status io_atomic_commit(io_atomic *a);
void io_atomic_abort(io_atomic *a);

/* check a dtype/ndim/shape/nbytes description; returns the element count or -1 with
 * the error set ("what: array 'x': ...") */
int64_t io_check_array(const char *what, const idd_array *a);

/* IEEE half / bfloat16 to float */
float io_f16_to_f32(uint16_t h);
float io_bf16_to_f32(uint16_t h);

#endif
