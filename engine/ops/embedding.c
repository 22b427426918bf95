/* embedding.c — the sinusoidal timestep embedding (no gradient: t is an index).
 * Kernels: engine/cpu/embedding.c, engine/cuda/resample.cu. */
#include "ops_internal.h"

#include <string.h>

// ---------------------------------------------------------------- timestep embedding

idd_tensor *idd_timestep_embedding(idd_tensor *t, int dim, double max_period) {
    char st_[96];
    if (t->ndim != 1 || dim < 1) { idd_error("timestep_embedding: t %s must be (N) and dim >= 1", idd_shape_str(t, st_, 96)); return NULL; }
    const idd_backend *be = op_backend(t, IDD_K_TIMESTEP_EMB, "timestep_embedding");
    if (!be) return NULL;
    int64_t shape[2] = {t->shape[0], dim};
    idd_tensor *tc = cf32(t), *out = idd_tensor_new(IDD_F32, t->device, 2, shape);
    idd_status st = tc && out ? be->timestep_embedding(fp(out), fp(tc), (int)t->shape[0], dim, (float)max_period) : IDD_ERR;
    idd_tensor_release(tc);
    if (st != IDD_OK) { idd_tensor_release(out); return NULL; }
    return out;
}

