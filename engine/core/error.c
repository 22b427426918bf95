/* error.c — the thread-local error message behind idd_error()/idd_last_error(),
 * dtype and device names, the thread-count setting and the interrupt flag. */
#include "iddpm/core.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char err_buf[1024];
volatile int idd_interrupted = 0;
volatile int idd_interrupt_deferred = 0;

static void vset(const char *fmt, va_list ap) { vsnprintf(err_buf, sizeof err_buf, fmt, ap); }

idd_status idd_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vset(fmt, ap);
    va_end(ap);
    return IDD_ERR;
}

idd_status idd_error_status(idd_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vset(fmt, ap);
    va_end(ap);
    return st;
}

void idd_error_prefix(const char *ctx) {
    char tmp[sizeof err_buf + 256];
    snprintf(tmp, sizeof tmp, "%.200s: %s", ctx, err_buf);
    memcpy(err_buf, tmp, sizeof err_buf - 1);
    err_buf[sizeof err_buf - 1] = 0;
}

const char *idd_last_error(void) { return err_buf[0] ? err_buf : "unknown error"; }
void idd_clear_error(void) { err_buf[0] = 0; }

static const char *dtype_names[IDD_NDTYPES] = {"float32", "float64", "int64", "uint8", "bfloat16"};
static const size_t dtype_sizes[IDD_NDTYPES] = {4, 8, 8, 1, 2};

size_t idd_dtype_size(idd_dtype dt) { return (unsigned)dt < IDD_NDTYPES ? dtype_sizes[dt] : 0; }
const char *idd_dtype_name(idd_dtype dt) { return (unsigned)dt < IDD_NDTYPES ? dtype_names[dt] : "?"; }
int idd_dtype_from_name(const char *name) {
    for (int i = 0; i < IDD_NDTYPES; i++)
        if (strcmp(name, dtype_names[i]) == 0) return i;
    return -1;
}

const char *idd_device_name(idd_device d) { return d == IDD_CPU ? "cpu" : d == IDD_CUDA ? "cuda" : "?"; }
