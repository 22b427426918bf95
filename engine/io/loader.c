/* loader.c — the training batch loader (see iddpm/io.h): a uint8 dataset in memory,
 * per-epoch permutations and flips from Philox counters, and one background pthread
 * that builds the next float batch while the caller trains on the current one.
 *
 * Protocol between the caller and the worker (all under mu):
 *   state EMPTY     nothing requested
 *   state REQUESTED the worker is (or will be) building the batch at (req_epoch, req_index)
 *   state READY     buf holds the batch at (req_epoch, req_index)
 * next() makes sure the batch at the current position is READY (requesting it if the
 * prefetched one is for another position), copies it out, advances the position and
 * requests the following batch. Only the worker ever builds batches, so the permutation
 * cache needs no lock. Also the image resizer used for folders of PNGs. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "iddpm/philox.h"
#include "io_internal.h"

enum { EMPTY, REQUESTED, READY };

struct idd_loader {
    uint8_t *images;
    int64_t *labels;   /* NULL without labels */
    int64_t n, sample; /* sample = c*h*w */
    int c, h, w;
    idd_loader_opts o;
    int64_t epoch, index; /* the caller's position */
    /* worker side */
    float *bx;
    int64_t *by;
    int64_t req_epoch, req_index;
    int state, quit;
    int64_t *perm, perm_epoch;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static double philox_u(uint64_t seed, uint64_t stream, uint64_t ctr) {
    double v[2];
    idd_philox_uniform2(seed, stream, ctr, v);
    return v[0];
}

static void make_perm(idd_loader *l, int64_t epoch) {
    for (int64_t i = 0; i < l->n; i++) l->perm[i] = i;
    if (l->o.shuffle)
        for (int64_t i = l->n - 1; i > 0; i--) {
            int64_t j = (int64_t)(philox_u(l->o.seed, l->o.stream, ((uint64_t)epoch << 32) + (uint64_t)i) * (double)(i + 1));
            if (j > i) j = i;
            int64_t t = l->perm[i];
            l->perm[i] = l->perm[j];
            l->perm[j] = t;
        }
    l->perm_epoch = epoch;
}

/* slots one step takes: the global batch */
static int64_t step_size(const idd_loader *l) { return l->o.batch_size * l->o.world_size; }

static void build(idd_loader *l, int64_t epoch, int64_t index) {
    if (l->perm_epoch != epoch) make_perm(l, epoch);
    int64_t first = index + l->o.rank * l->o.batch_size;   /* this rank's slice */
    for (int64_t b = 0; b < l->o.batch_size; b++) {
        int64_t k = l->perm[first + b];
        const uint8_t *src = l->images + k * l->sample;
        float *dst = l->bx + b * l->sample;
        int flip = l->o.flip && philox_u(l->o.seed, l->o.stream + 1, ((uint64_t)epoch << 32) + (uint64_t)(first + b)) < 0.5;
        for (int64_t r = 0; r < (int64_t)l->c * l->h; r++) {
            const uint8_t *s = src + r * l->w;
            float *d = dst + r * l->w;
            if (flip) for (int x = 0; x < l->w; x++) d[x] = (float)s[l->w - 1 - x] / 127.5f - 1.0f;
            else for (int x = 0; x < l->w; x++) d[x] = (float)s[x] / 127.5f - 1.0f;
        }
        l->by[b] = l->labels ? l->labels[k] : -1;
    }
}

static void *worker(void *arg) {
    idd_loader *l = arg;
    pthread_mutex_lock(&l->mu);
    while (!l->quit) {
        if (l->state == REQUESTED) {
            int64_t e = l->req_epoch, i = l->req_index;
            pthread_mutex_unlock(&l->mu);
            build(l, e, i);
            pthread_mutex_lock(&l->mu);
            l->state = READY;
            pthread_cond_broadcast(&l->cv);
        } else {
            pthread_cond_wait(&l->cv, &l->mu);
        }
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* with mu held: request the batch at (e, i) unless it is already requested or ready */
static void request(idd_loader *l, int64_t e, int64_t i) {
    if (l->state != EMPTY && l->req_epoch == e && l->req_index == i) return;
    while (l->state == REQUESTED) pthread_cond_wait(&l->cv, &l->mu);
    l->req_epoch = e;
    l->req_index = i;
    l->state = REQUESTED;
    pthread_cond_broadcast(&l->cv);
}

idd_status idd_loader_new(const uint8_t *images, int64_t n, int c, int h, int w, const int64_t *labels,
                          const idd_loader_opts *opts, idd_loader **out) {
    *out = NULL;
    if (n < 1 || c < 1 || h < 1 || w < 1) return idd_error("loader: empty dataset (%lld images of %dx%dx%d)", (long long)n, c, h, w);
    if (opts->batch_size < 1 || opts->batch_size > n)
        return idd_error("loader: batch_size %lld must be between 1 and the dataset size %lld", (long long)opts->batch_size, (long long)n);
    int64_t world = opts->world_size < 1 ? 1 : opts->world_size;
    if (opts->rank < 0 || opts->rank >= world)
        return idd_error("loader: rank %lld is not in [0, world size %lld)", (long long)opts->rank, (long long)world);
    if (opts->batch_size * world > n)
        return idd_error("loader: the global batch %lld x %lld ranks is larger than the dataset (%lld images)",
                         (long long)opts->batch_size, (long long)world, (long long)n);
    idd_loader *l = calloc(1, sizeof *l);
    if (!l) return idd_error_status(IDD_ENOMEM, "loader: out of memory");
    l->n = n; l->c = c; l->h = h; l->w = w; l->o = *opts;
    l->o.world_size = world;
    l->sample = (int64_t)c * h * w;
    l->images = malloc((size_t)(n * l->sample));
    l->labels = labels ? malloc((size_t)n * sizeof *l->labels) : NULL;
    l->perm = malloc((size_t)n * sizeof *l->perm);
    l->bx = malloc((size_t)(opts->batch_size * l->sample) * sizeof *l->bx);
    l->by = malloc((size_t)opts->batch_size * sizeof *l->by);
    if (!l->images || (labels && !l->labels) || !l->perm || !l->bx || !l->by) {
        free(l->images); free(l->labels); free(l->perm); free(l->bx); free(l->by); free(l);
        return idd_error_status(IDD_ENOMEM, "loader: out of memory for %lld images", (long long)n);
    }
    memcpy(l->images, images, (size_t)(n * l->sample));
    if (labels) memcpy(l->labels, labels, (size_t)n * sizeof *l->labels);
    l->perm_epoch = -1;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    if (pthread_create(&l->th, NULL, worker, l) != 0) {
        pthread_mutex_destroy(&l->mu); pthread_cond_destroy(&l->cv);
        free(l->images); free(l->labels); free(l->perm); free(l->bx); free(l->by); free(l);
        return idd_error("loader: cannot start the loader thread");
    }
    pthread_mutex_lock(&l->mu);
    request(l, 0, 0);
    pthread_mutex_unlock(&l->mu);
    *out = l;
    return IDD_OK;
}

idd_status idd_loader_next(idd_loader *l, float *x, int64_t *y) {
    pthread_mutex_lock(&l->mu);
    request(l, l->epoch, l->index);
    while (l->state != READY) pthread_cond_wait(&l->cv, &l->mu);
    memcpy(x, l->bx, (size_t)(l->o.batch_size * l->sample) * sizeof *x);
    memcpy(y, l->by, (size_t)l->o.batch_size * sizeof *y);
    l->index += step_size(l);
    if (l->index + step_size(l) > l->n) { l->epoch++; l->index = 0; }
    l->state = EMPTY;
    request(l, l->epoch, l->index);
    pthread_mutex_unlock(&l->mu);
    return IDD_OK;
}

void idd_loader_position(idd_loader *l, int64_t *epoch, int64_t *index) {
    pthread_mutex_lock(&l->mu);
    *epoch = l->epoch;
    *index = l->index;
    pthread_mutex_unlock(&l->mu);
}

idd_status idd_loader_set_position(idd_loader *l, int64_t epoch, int64_t index) {
    if (l->o.world_size > 1 && epoch >= 0 && index >= 0 && index <= l->n) {
        if (index + step_size(l) > l->n) { epoch++; index = 0; }
    } else if (epoch < 0 || index < 0 || index % l->o.batch_size != 0 || index + l->o.batch_size > l->n)
        return idd_error("loader: position (epoch %lld, index %lld) is not a batch start for batch_size %lld and %lld "
                         "images (a checkpoint from another dataset or batch size?)", (long long)epoch, (long long)index,
                         (long long)l->o.batch_size, (long long)l->n);
    pthread_mutex_lock(&l->mu);
    l->epoch = epoch;
    l->index = index;
    request(l, epoch, index);
    pthread_mutex_unlock(&l->mu);
    return IDD_OK;
}

void idd_loader_free(idd_loader *l) {
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->quit = 1;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->th, NULL);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    free(l->images); free(l->labels); free(l->perm); free(l->bx); free(l->by);
    free(l);
}

/* ---------------------------------------------------------------- resizing */

idd_status idd_resize_center_crop(const uint8_t *hwc, int h, int w, int c, int size, uint8_t *chw) {
    if (h < 1 || w < 1 || c < 1 || size < 1) return idd_error("resize: bad sizes %dx%dx%d -> %d", h, w, c, size);
    int s = h < w ? h : w, y0 = (h - s) / 2, x0 = (w - s) / 2;
    double scale = (double)s / size;
    for (int ch = 0; ch < c; ch++)
        for (int oy = 0; oy < size; oy++)
            for (int ox = 0; ox < size; ox++) {
                double v;
                if (scale >= 1.0) {   /* area average over [o*scale, (o+1)*scale) */
                    double sy0 = oy * scale, sy1 = sy0 + scale, sx0 = ox * scale, sx1 = sx0 + scale, acc = 0;
                    for (int yy = (int)sy0; yy < (int)ceil(sy1) && yy < s; yy++) {
                        double wy = fmin(sy1, yy + 1) - fmax(sy0, yy);
                        for (int xx = (int)sx0; xx < (int)ceil(sx1) && xx < s; xx++) {
                            double wx = fmin(sx1, xx + 1) - fmax(sx0, xx);
                            acc += wy * wx * hwc[((size_t)(y0 + yy) * w + (x0 + xx)) * c + ch];
                        }
                    }
                    v = acc / (scale * scale);
                } else {              /* bilinear, pixel centres aligned */
                    double sy = (oy + 0.5) * scale - 0.5, sx = (ox + 0.5) * scale - 0.5;
                    if (sy < 0) sy = 0;
                    if (sx < 0) sx = 0;
                    int iy = (int)sy, ix = (int)sx;
                    int iy1 = iy + 1 < s ? iy + 1 : s - 1, ix1 = ix + 1 < s ? ix + 1 : s - 1;
                    double fy = sy - iy, fx = sx - ix;
#define P(yy, xx) (double)hwc[((size_t)(y0 + (yy)) * w + (x0 + (xx))) * c + ch]
                    v = (1 - fy) * ((1 - fx) * P(iy, ix) + fx * P(iy, ix1)) + fy * ((1 - fx) * P(iy1, ix) + fx * P(iy1, ix1));
#undef P
                }
                int q = (int)lround(v);
                chw[((size_t)ch * size + oy) * size + ox] = (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q);
            }
    return IDD_OK;
}
