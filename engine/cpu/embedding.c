/* embedding.c — the sinusoidal timestep embedding of the official UNet
 * (timestep_embedding in nn.py):
 *   half = dim/2, freq_i = exp(-ln(max_period) * i / half), i = 0..half-1
 *   out[n] = [cos(t[n]*freq_0 .. t[n]*freq_{half-1}), sin(...)] (+ a zero column if dim odd)
 * Everything after ln(max_period) is done in float32, in the same order as the PyTorch
 * code (-ln(P) * i, then / half, then exp; t * freq; cos/sin), so results agree with
 * the reference to the last bit or two even for t ~ 1000. t is not differentiated, so
 * there is no backward. */
#include "iddpm/kernels.h"

#include <math.h>

idd_status idd_timestep_embedding_f32(float *out, const float *t, int N, int dim,
                                      float max_period) {
    if (N <= 0 || dim <= 0)
        return idd_error("timestep_embedding: bad sizes: %d timesteps, dim %d", N, dim);
    if (!(max_period > 0))
        return idd_error("timestep_embedding: max_period must be positive, got %g",
                         (double)max_period);
    const int half = dim / 2;
    const float neg_log = (float)-log((double)max_period);
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * dim;
        for (int i = 0; i < half; i++) {
            float e = neg_log * (float)i;
            e = e / (float)half;
            float freq = expf(e);
            float arg = t[n] * freq;
            o[i] = cosf(arg);
            o[half + i] = sinf(arg);
        }
        if (dim % 2) o[dim - 1] = 0.0f;
    }
    return IDD_OK;
}
