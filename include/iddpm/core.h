/* iddpm/core.h — status codes, the thread-local error message, dtypes, devices.
 *
 * Every fallible engine function returns idd_status (IDD_OK == 0) and, on failure,
 * leaves a message in a thread-local buffer read with idd_last_error(). Messages name
 * the operation, the argument and the shapes: "conv2d: input (8,3,32,32) has 3
 * channels, weight (128,4,3,3) expects 4". The engine never aborts on user input and
 * never longjmps; only lua/ turns a message into a Lua error. */
#ifndef IDDPM_CORE_H
#define IDDPM_CORE_H

#include <stddef.h>
#include <stdint.h>

typedef enum { IDD_OK = 0, IDD_ERR = 1, IDD_ENOMEM = 2, IDD_EIO = 3 } idd_status;

/* Set the message (printf-style) and return IDD_ERR, so callers write
 *   return idd_error("matmul: inner dims differ: a %s vs b %s", sa, sb); */
idd_status idd_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Same, with a status of the caller's choice. */
idd_status idd_error_status(idd_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Prefix the current message with "ctx: " (used by containers to say where). */
void idd_error_prefix(const char *ctx);
const char *idd_last_error(void);
void idd_clear_error(void);

/* IDD_BF16: bfloat16 storage (activations in bf16 mixed precision on the GPU; the CPU
 * converts it element by element: include/iddpm/bf16.h) */
typedef enum { IDD_F32 = 0, IDD_F64 = 1, IDD_I64 = 2, IDD_U8 = 3, IDD_BF16 = 4, IDD_NDTYPES } idd_dtype;
size_t idd_dtype_size(idd_dtype dt);
const char *idd_dtype_name(idd_dtype dt);   /* "float32", "float64", "int64", "uint8", "bfloat16" */
int idd_dtype_from_name(const char *name);  /* -1 if unknown */

typedef enum { IDD_CPU = 0, IDD_CUDA = 1, IDD_NDEVICES } idd_device;
const char *idd_device_name(idd_device d);

#define IDD_MAX_DIMS 8

/* Threads: number of worker threads used by engine loops and OpenBLAS. */
int idd_num_threads(void);
void idd_set_num_threads(int n);   /* clamped to 1..IDD_MAX_THREADS */
#define IDD_MAX_THREADS 1024

/* Cooperative interruption: set from a signal handler (Ctrl-C in the REPL); long
 * engine loops poll it and fail with "interrupted". */
extern volatile int idd_interrupted;
/* While set, the program's Ctrl-C handler only records the interrupt (idd_interrupted)
 * and raises nothing: a section that must complete (a weight update) runs to its end,
 * and the Lua side raises afterwards (iddpm.data.defer_interrupt). */
extern volatile int idd_interrupt_deferred;

#endif
