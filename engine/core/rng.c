/* rng.c — generators over the counter-based Philox streams (include/iddpm/philox.h).
 * A generator is (seed, stream, offset); each draw of n values advances offset by
 * ceil(n/2), so the numbers depend only on the seed and the draw history. */
#include "iddpm/ops.h"

#include "iddpm/philox.h"

static _Thread_local idd_generator default_gen = {0, 0, 0, 0, 0};

uint64_t idd_generator_claim(idd_generator *g, uint64_t n) {
    if (g->shards <= 1) {
        uint64_t start = g->offset;
        g->offset += n;
        return start;
    }
    uint64_t start = g->offset + g->shard * n;
    g->offset += g->shards * n;
    return start;
}

idd_generator *idd_default_generator(void) { return &default_gen; }
void idd_manual_seed(uint64_t seed) { default_gen.seed = seed; default_gen.stream = 0; default_gen.offset = 0; }

static idd_tensor *draw(idd_generator *g, idd_dtype dt, idd_device dev, int ndim, const int64_t *shape, bool normal) {
    if (!g) g = &default_gen;
    if (dt != IDD_F32 && dt != IDD_F64) { idd_error("rand: dtype must be float32 or float64, got %s", idd_dtype_name(dt)); return NULL; }
    idd_tensor *t = idd_tensor_new(dt, dev, ndim, shape);
    if (!t) return NULL;
    const idd_backend *be = idd_backend_of(t);
    idd_generator save = *g;
    uint64_t start = idd_generator_claim(g, (uint64_t)(idd_numel(t) + 1) / 2);
    idd_status st = normal ? be->rand_normal(t, g->seed, g->stream, start) : be->rand_uniform(t, g->seed, g->stream, start);
    if (st != IDD_OK) { *g = save; idd_tensor_release(t); return NULL; }
    return t;
}

idd_tensor *idd_randn(idd_generator *g, idd_dtype dt, idd_device dev, int ndim, const int64_t *shape) {
    return draw(g, dt, dev, ndim, shape, true);
}
idd_tensor *idd_rand(idd_generator *g, idd_dtype dt, idd_device dev, int ndim, const int64_t *shape) {
    return draw(g, dt, dev, ndim, shape, false);
}

void idd_rand_doubles(idd_generator *g, double *out, int64_t n) {
    if (!g) g = &default_gen;
    uint64_t start = idd_generator_claim(g, (uint64_t)(n + 1) / 2);
    for (int64_t j = 0; j < (n + 1) / 2; j++) {
        double v[2];
        idd_philox_uniform2(g->seed, g->stream, start + (uint64_t)j, v);
        out[2 * j] = v[0];
        if (2 * j + 1 < n) out[2 * j + 1] = v[1];
    }
}

idd_tensor *idd_randint(idd_generator *g, int64_t lo, int64_t hi, int ndim, const int64_t *shape) {
    if (hi <= lo) { idd_error("randint: empty range [%lld, %lld)", (long long)lo, (long long)hi); return NULL; }
    idd_tensor *t = idd_tensor_new(IDD_I64, IDD_CPU, ndim, shape);
    if (!t) return NULL;
    int64_t n = idd_numel(t);
    int64_t *p = idd_data(t);
    if (!g) g = &default_gen;
    /* one counter per value, claimed at once so that a sharded generator hands each
     * shard a contiguous slice of the values */
    idd_generator one = {g->seed, g->stream, idd_generator_claim(g, (uint64_t)n), 0, 0};
    for (int64_t i = 0; i < n; i++) {
        double u;
        idd_rand_doubles(&one, &u, 1);
        int64_t v = lo + (int64_t)(u * (double)(hi - lo));
        p[i] = v < hi ? v : hi - 1;
    }
    return t;
}
