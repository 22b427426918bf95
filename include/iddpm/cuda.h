/* iddpm/cuda.h — the CUDA backend's entry points (engine/cuda, built with `make CUDA=1`).
 *
 * idd_cuda_init() registers the backend for IDD_CUDA when a device is present; without
 * one it registers nothing, records why (idd_backend_unavailable_reason) and returns
 * IDD_ERR, so that x:cuda() / device=cuda fail with a clear message, never a crash. */
#ifndef IDDPM_CUDA_H
#define IDDPM_CUDA_H

#include <stddef.h>
#include <string.h>

#include "iddpm/core.h"

idd_status idd_cuda_init(void);
/* wait for every queued kernel (timings) */
idd_status idd_cuda_synchronize(void);
/* bytes held by live tensors and by the caching allocator's free lists */
void idd_cuda_memory(size_t *in_use, size_t *cached);
/* the peaks of the bytes in use and reserved (in use + cached) since the last reset;
 * reset != 0 starts new peaks from the current values */
void idd_cuda_memory_peak(size_t *in_use, size_t *reserved, int reset);
/* give cached (free) blocks back to the driver */
void idd_cuda_empty_cache(void);
/* the device's name, or "" before init */
const char *idd_cuda_device_name(void);
/* The arithmetic of convolutions, matrix products and attention on the GPU. Tensors stay
 * float32 in every mode; only the products change (engine/cuda/README.md):
 *   fp32  exact float32 (the default)
 *   tf32  float32 data on TF32 tensor cores (10-bit mantissa products, fp32 sums)
 *   bf16  operands rounded to bfloat16 inside the op, bf16 tensor cores, fp32 sums and
 *         fp32 results; parameters, gradients, optimizer state stay float32 */
enum { IDD_PREC_FP32 = 0, IDD_PREC_TF32 = 1, IDD_PREC_BF16 = 2 };
void idd_cuda_set_precision(int prec);
int idd_cuda_precision(void);
/* the older switch: 1 = tf32, 0 = fp32 */
void idd_cuda_set_tf32(int on);
/* conv2d implementation: cuDNN (default) or the im2col + cuBLAS fallback
 * (IDDPM_CUDA_CONV=im2col) */
enum { IDD_CONV_CUDNN = 0, IDD_CONV_IM2COL = 1 };
void idd_cuda_set_conv_impl(int impl);
int idd_cuda_conv_impl(void);

/* IDDPM_CUDA_PROFILE=1: zero the per-op totals (after a warm-up; the table prints at exit) */
void idd_cuda_profile_reset(void);

/* CUDA graphs (engine/cuda/graph.cu): record the work a function queues on the backend's
 * stream once, then replay it with one launch. Between idd_cuda_graph_begin() and
 * idd_cuda_graph_end() nothing runs: kernels are recorded (relaxed capture mode), and
 * the caching allocator gives the capture blocks that belong to the graph until it is
 * destroyed (engine/cuda/memory.cu, "graph pools"), so the tensors made during the
 * capture (the outputs included) keep their addresses, and each replay overwrites them.
 * Tensors the graph reads that were made before (inputs, parameters) must stay alive.
 * Ops that cannot be recorded (a host wait, an upload or download, the pinned upload
 * ring) fail with "graph_capture: <op> cannot run inside a CUDA graph capture: ...".
 * After a failure, idd_cuda_graph_abort() ends the capture; the stream stays usable. */
typedef struct idd_cuda_graph idd_cuda_graph;
idd_status idd_cuda_graph_begin(void);
/* end the capture and instantiate the graph; on error the capture is aborted */
idd_status idd_cuda_graph_end(idd_cuda_graph **out);
void idd_cuda_graph_abort(void);
idd_status idd_cuda_graph_replay(idd_cuda_graph *g);
/* waits for the stream, frees the graph and gives its blocks back (deferred to the end
 * of a capture when called during one, e.g. from a garbage collector) */
void idd_cuda_graph_destroy(idd_cuda_graph *g);
/* bytes of the blocks held by live graphs (reserved for their replays) */
size_t idd_cuda_graph_memory(void);
/* nonzero while a capture runs */
int idd_cuda_capturing(void);
/* the error of an op that cannot be recorded: sets and returns
 * "graph_capture: <op> cannot run inside a CUDA graph capture: <why>" */
idd_status idd_cuda_capture_refuse(const char *op, const char *why);

static inline int idd_cuda_precision_from_name(const char *s) {
    if (!strcmp(s, "fp32")) return IDD_PREC_FP32;
    if (!strcmp(s, "tf32")) return IDD_PREC_TF32;
    if (!strcmp(s, "bf16")) return IDD_PREC_BF16;
    return -1;
}
static inline const char *idd_cuda_precision_name(int prec) {
    return prec == IDD_PREC_BF16 ? "bf16" : prec == IDD_PREC_TF32 ? "tf32" : "fp32";
}

#endif
