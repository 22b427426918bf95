/* check.h — the tiny C test harness. Each check prints "ok - name" or
 * "not ok - name: detail"; check_done() prints the count and returns the exit code.
 * tests/run.sh counts these lines across all test programs. */
#ifndef IDDPM_CHECK_H
#define IDDPM_CHECK_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int check_pass, check_fail;

static inline void check_report(int ok, const char *name, const char *detail) {
    if (ok) { check_pass++; printf("ok - %s\n", name); }
    else { check_fail++; printf("not ok - %s: %s\n", name, detail ? detail : ""); }
    fflush(stdout);
}

/* max |a-b| / max(|b|, floor) over n floats; floor keeps near-zero values sane */
static inline double check_max_rel(const float *a, const float *b, long n, double floor_) {
    double worst = 0;
    for (long i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        double s = fabs((double)b[i]);
        double r = d / (s > floor_ ? s : floor_);
        if (!(r <= worst)) worst = r;  /* NaN propagates */
    }
    return worst;
}

/* compare two float arrays with a named relative tolerance */
static inline void check_close(const char *name, const float *got, const float *want, long n,
                               double rtol, double floor_) {
    char buf[160];
    double r = check_max_rel(got, want, n, floor_);
    snprintf(buf, sizeof buf, "max rel err %.3g > tol %.3g", r, rtol);
    check_report(r <= rtol, name, buf);
}

static inline int check_done(void) {
    printf("# %d passed, %d failed\n", check_pass, check_fail);
    return check_fail ? 1 : 0;
}
#endif
