/* respace.c — which timesteps a respaced process keeps (spec 6.1).
 *
 * idd_space_timesteps(T, spec) reproduces the official space_timesteps():
 *   "ddimN"   the smallest stride i in 1..T-1 with len(range(0, T, i)) == N;
 *   "a,b,c"   T split into len(counts) consecutive sections (the first T % n one
 *             longer); a section of size S yielding K steps uses the real stride
 *             (S-1)/(K-1), accumulated by repeated addition, each index rounded
 *             half-to-even (nearbyint in the default rounding mode, as Python round);
 *   ""        every step (what create_gaussian_diffusion does with no respacing).
 * Building the respaced schedule itself (spec 6.2) is idd_schedule_respace in
 * schedule.c. */
#include "iddpm/diffusion.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Parse a decimal integer occupying all of [p, end) save surrounding spaces, like
 * Python's int(). Returns 1 on success. */
static int parse_int(const char *p, const char *end, long long *v) {
    while (p < end && isspace((unsigned char)*p)) p++;
    while (end > p && isspace((unsigned char)end[-1])) end--;
    if (p == end) return 0;
    const char *q = p;
    if (*q == '+' || *q == '-') q++;
    if (q == end) return 0;
    for (const char *r = q; r < end; r++)
        if (!isdigit((unsigned char)*r)) return 0;
    if (end - p > 18) return 0; /* far beyond any sensible step count */
    char buf[32];
    memcpy(buf, p, (size_t)(end - p));
    buf[end - p] = 0;
    errno = 0;
    *v = strtoll(buf, NULL, 10);
    return errno == 0;
}

static idd_status space_ddim(int64_t T, const char *spec, int64_t *out, int64_t *n_out) {
    long long want;
    const char *num = spec + 4;
    if (!parse_int(num, num + strlen(num), &want))
        return idd_error("space_timesteps: cannot parse \"%s\": expected \"ddimN\" with an integer N",
                         spec);
    for (int64_t i = 1; i < T; i++) {
        int64_t count = (T + i - 1) / i; /* len(range(0, T, i)) */
        if (count == want) {
            for (int64_t k = 0; k < count; k++) out[k] = k * i;
            *n_out = count;
            return IDD_OK;
        }
    }
    return idd_error("space_timesteps: cannot create exactly %lld steps with an integer stride "
                     "from %lld steps (\"%s\")", want, (long long)T, spec);
}

idd_status idd_space_timesteps(int64_t T, const char *spec, int64_t *out, int64_t *n_out) {
    if (T < 1) return idd_error("space_timesteps: steps must be >= 1, got %lld", (long long)T);
    if (!out || !n_out) return idd_error("space_timesteps: output array is missing");
    *n_out = 0;
    if (!spec || spec[0] == 0) {
        for (int64_t i = 0; i < T; i++) out[i] = i;
        *n_out = T;
        return IDD_OK;
    }
    if (strncmp(spec, "ddim", 4) == 0) return space_ddim(T, spec, out, n_out);

    /* parse the section counts */
    int64_t nsec = 1;
    for (const char *p = spec; *p; p++) nsec += *p == ',';
    long long *counts = malloc(sizeof(long long) * (size_t)nsec);
    if (!counts) return idd_error_status(IDD_ENOMEM, "space_timesteps: out of memory");
    const char *p = spec;
    for (int64_t k = 0; k < nsec; k++) {
        const char *e = strchr(p, ',');
        if (!e) e = p + strlen(p);
        if (!parse_int(p, e, &counts[k])) {
            free(counts);
            return idd_error("space_timesteps: cannot parse section %lld of \"%s\": expected "
                             "\"N\", \"a,b,c\" or \"ddimN\" with integers", (long long)k + 1, spec);
        }
        if (counts[k] < 0) {
            long long bad = counts[k];
            free(counts);
            return idd_error("space_timesteps: section %lld of \"%s\" asks for %lld steps (< 0)",
                             (long long)k + 1, spec, bad);
        }
        p = *e ? e + 1 : e;
    }

    int64_t size_per = T / nsec, extra = T % nsec, start = 0, n = 0;
    for (int64_t k = 0; k < nsec; k++) {
        int64_t size = size_per + (k < extra ? 1 : 0);
        long long want = counts[k];
        if (size < want) {
            free(counts);
            return idd_error("space_timesteps: cannot divide a section of %lld steps into %lld "
                             "(section %lld of \"%s\", T = %lld)", (long long)size, want,
                             (long long)k + 1, spec, (long long)T);
        }
        double stride = want <= 1 ? 1.0 : (double)(size - 1) / (double)(want - 1);
        double cur = 0.0;
        for (long long j = 0; j < want; j++) {
            out[n++] = start + (int64_t)nearbyint(cur);
            cur += stride;
        }
        start += size;
    }
    free(counts);
    if (n == 0) return idd_error("space_timesteps: \"%s\" keeps no steps at all", spec);
    /* sections are consecutive and each index list strictly increases: already sorted,
     * but guard the set semantics anyway */
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if (m == 0 || out[i] > out[m - 1]) out[m++] = out[i];
    *n_out = m;
    return IDD_OK;
}
