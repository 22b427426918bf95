/* iddpm/cuda.h — the CUDA backend's entry points (engine/cuda, built with `make CUDA=1`).
 *
 * idd_cuda_init() registers the backend for IDD_CUDA when a device is present; without
 * one it registers nothing, records why (idd_backend_unavailable_reason) and returns
 * IDD_ERR, so that x:cuda() / device=cuda fail with a clear message, never a crash. */
#ifndef IDDPM_CUDA_H
#define IDDPM_CUDA_H

#include <stddef.h>

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
/* 1: let cuBLAS use TF32 tensor cores for float32 products (default 0: exact fp32) */
void idd_cuda_set_tf32(int on);

#endif
