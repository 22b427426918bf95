/* bench_util.h — the two helpers every tests/c/bench_*.c program uses: a monotonic
 * clock and a buffer of uniform random floats in [-0.5, 0.5]. */
#ifndef IDDPM_BENCH_UTIL_H
#define IDDPM_BENCH_UTIL_H
#include <stdlib.h>
#include <time.h>

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static inline float *frand(size_t n) {
    float *p = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
    return p;
}
#endif
