/* l_dist_ring.c — the CPU transport between the ranks that the one-machine launcher
 * forked (lua/l_dist_launch.c): a ring of Unix socket pairs made by the launcher, rank r
 * reading from rank r-1 and writing to rank r+1. No MPI needed for `nproc=N` on the CPU.
 *
 * Collectives (byte buffers in host memory):
 *   allreduce  ring reduce-scatter then ring all-gather over W segments: each segment
 *              is summed once, in a fixed order, and copied to every rank, so every rank
 *              ends with identical bits
 *   broadcast  from rank 0 along the ring
 *   allgather  equal blocks, in rank order
 * Every wait polls with a deadline that restarts whenever bytes move: a peer that died
 * (EOF or a reset) or sends nothing for `timeout` seconds fails the call with a message;
 * so does a Ctrl-C (idd_interrupted). Functions return NULL on success, else a message
 * (valid until the next call) that the binding raises. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "iddpm/core.h"
#include "l_dist.h"

static int left_fd = -1, right_fd = -1, rank_, world_ = 1;
static char msg[512];

static const char *fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return msg;
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int idd_ring_up(void) { return left_fd >= 0 && right_fd >= 0; }

void idd_ring_setup(int left, int right, int rank, int world) {
    left_fd = left;
    right_fd = right;
    rank_ = rank;
    world_ = world;
    fcntl(left, F_SETFL, fcntl(left, F_GETFL) | O_NONBLOCK);
    fcntl(right, F_SETFL, fcntl(right, F_GETFL) | O_NONBLOCK);
}

static int mod(int a) { return ((a % world_) + world_) % world_; }

/* send sn bytes to the right neighbour while receiving rn bytes from the left one */
static const char *xchg(const char *op, const char *s, size_t sn, char *r, size_t rn, double timeout) {
    size_t so = 0, ro = 0;
    double t0 = mono();
    while (so < sn || ro < rn) {
        struct pollfd pf[2];
        int np = 0, is = -1, ir = -1;
        if (so < sn) { pf[np].fd = right_fd; pf[np].events = POLLOUT; pf[np].revents = 0; is = np++; }
        if (ro < rn) { pf[np].fd = left_fd; pf[np].events = POLLIN; pf[np].revents = 0; ir = np++; }
        int k = poll(pf, (nfds_t)np, 100);
        if (k < 0 && errno != EINTR) return fail("dist.%s: poll: %s", op, strerror(errno));
        if (idd_interrupted) return fail("dist.%s: interrupted", op);
        if (k > 0 && is >= 0 && pf[is].revents) {
            ssize_t w = send(right_fd, s + so, sn - so, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return fail("dist.%s: rank %d cannot send to rank %d (it died?): %s", op, rank_, mod(rank_ + 1),
                            strerror(errno));
            if (w > 0) { so += (size_t)w; t0 = mono(); }
        }
        if (k > 0 && ir >= 0 && pf[ir].revents) {
            ssize_t g = recv(left_fd, r + ro, rn - ro, 0);
            if (g == 0) return fail("dist.%s: rank %d closed its connection (it died?)", op, mod(rank_ - 1));
            if (g < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return fail("dist.%s: rank %d cannot receive from rank %d (it died?): %s", op, rank_, mod(rank_ - 1),
                            strerror(errno));
            if (g > 0) { ro += (size_t)g; t0 = mono(); }
        }
        if (mono() - t0 > timeout)
            return fail("dist.%s: rank %d waited %.0f s for the other ranks (timeout; a rank died or hangs: stopping; "
                        "set dist_timeout= to wait longer)", op, rank_, timeout);
    }
    return NULL;
}

/* segment i of n elements split in world_ parts: first element and count */
static void segment(int64_t n, int i, int64_t *first, int64_t *count) {
    int64_t cs = (n + world_ - 1) / world_;
    int64_t a = (int64_t)i * cs, b = a + cs;
    if (a > n) a = n;
    if (b > n) b = n;
    *first = a;
    *count = b - a;
}

const char *idd_ring_allreduce(void *buf, int64_t n, int f64, double timeout) {
    if (world_ == 1 || n == 0) return NULL;
    size_t es = f64 ? sizeof(double) : sizeof(float);
    char *b = buf;
    int64_t cs = (n + world_ - 1) / world_;
    char *tmp = malloc((size_t)cs * es);
    if (!tmp) return fail("dist.allreduce: out of memory for %lld elements", (long long)cs);
    const char *err = NULL;
    for (int s = 0; s < world_ - 1 && !err; s++) {   /* reduce-scatter */
        int64_t so, sc, ro, rc;
        segment(n, mod(rank_ - s), &so, &sc);
        segment(n, mod(rank_ - s - 1), &ro, &rc);
        err = xchg("allreduce", b + so * es, (size_t)sc * es, tmp, (size_t)rc * es, timeout);
        if (err) break;
        if (f64) {
            double *d = (double *)(void *)(b + ro * es), *t = (double *)(void *)tmp;
            for (int64_t i = 0; i < rc; i++) d[i] += t[i];
        } else {
            float *d = (float *)(void *)(b + ro * es), *t = (float *)(void *)tmp;
            for (int64_t i = 0; i < rc; i++) d[i] += t[i];
        }
    }
    for (int s = 0; s < world_ - 1 && !err; s++) {   /* all-gather of the reduced segments */
        int64_t so, sc, ro, rc;
        segment(n, mod(rank_ + 1 - s), &so, &sc);
        segment(n, mod(rank_ - s), &ro, &rc);
        err = xchg("allreduce", b + so * es, (size_t)sc * es, b + ro * es, (size_t)rc * es, timeout);
    }
    free(tmp);
    return err;
}

const char *idd_ring_broadcast(void *buf, size_t bytes, double timeout) {
    if (world_ == 1 || bytes == 0) return NULL;
    const char *err = NULL;
    if (rank_ != 0) err = xchg("broadcast", NULL, 0, buf, bytes, timeout);
    if (!err && rank_ != world_ - 1) err = xchg("broadcast", buf, bytes, NULL, 0, timeout);
    return err;
}

const char *idd_ring_allgather(const void *in, void *out, size_t bytes, double timeout) {
    char *o = out;
    memcpy(o + (size_t)rank_ * bytes, in, bytes);
    for (int s = 0; s < world_ - 1; s++) {
        const char *err = xchg("allgather", o + (size_t)mod(rank_ - s) * bytes, bytes,
                               o + (size_t)mod(rank_ - s - 1) * bytes, bytes, timeout);
        if (err) return err;
    }
    return NULL;
}
