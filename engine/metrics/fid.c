/* fid.c — feature statistics and the Fréchet distance in float64.
 *
 * The matrix square root: the reference implementations (pytorch-fid, the ADM evaluator,
 * mmgen) call scipy.linalg.sqrtm(S1 @ S2) (a Schur method on a non-symmetric product)
 * and keep the real part of its trace. For symmetric PSD S1, S2 the eigenvalues of
 * S1 S2 are those of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), so
 *   tr sqrtm(S1 S2) = sum_i sqrt(l_i),  l_i = eig(sqrt(S1) S2 sqrt(S1)),
 * computed here with two dsyevd calls. Eigenvalues that come out slightly negative
 * from rounding contribute 0, which is what taking the real part of the reference's
 * complex result does. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "iddpm/metrics.h"

/* LAPACK (Fortran, in OpenBLAS); the trailing size_t are gfortran's hidden lengths of
 * the two CHARACTER*1 arguments. */
extern void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda,
                    double *w, double *work, const int *lwork, int *iwork, const int *liwork,
                    int *info, size_t ljobz, size_t luplo);

idd_feat_stats *idd_feat_stats_new(int D) {
    if (D < 1) { idd_error("feature stats: dimension %d < 1", D); return NULL; }
    idd_feat_stats *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->D = D;
    s->mean = calloc((size_t)D, sizeof(double));
    s->m2 = calloc((size_t)D * D, sizeof(double));
    if (!s->mean || !s->m2) {
        idd_feat_stats_free(s);
        idd_error_status(IDD_ENOMEM, "feature stats: out of memory for D = %d", D);
        return NULL;
    }
    return s;
}

void idd_feat_stats_free(idd_feat_stats *s) {
    if (!s) return;
    free(s->mean);
    free(s->m2);
    free(s);
}

/* batch mean and centred cross-products, then Chan's merge:
 *   m2 += m2_b + delta delta^T * n_a n_b / n,  mean += delta * n_b / n */
idd_status idd_feat_stats_add(idd_feat_stats *s, const void *x, int64_t N, int is_f64) {
    if (N <= 0) return IDD_OK;
    const int D = s->D;
    double *xb = malloc(sizeof(double) * (size_t)N * D), *mb = calloc((size_t)D, sizeof(double));
    if (!xb || !mb) {
        free(xb);
        free(mb);
        return idd_error_status(IDD_ENOMEM, "feature stats: out of memory for a batch of %lld",
                                (long long)N);
    }
    for (int64_t i = 0; i < N * D; i++)
        xb[i] = is_f64 ? ((const double *)x)[i] : (double)((const float *)x)[i];
    for (int64_t i = 0; i < N; i++)
        for (int d = 0; d < D; d++) mb[d] += xb[i * D + d];
    for (int d = 0; d < D; d++) mb[d] /= (double)N;
    for (int64_t i = 0; i < N; i++)
        for (int d = 0; d < D; d++) xb[i * D + d] -= mb[d];
    /* m2 (upper part) += xb^T xb */
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, D, (int)N, 1.0, xb, D, 1.0, s->m2, D);
    double na = (double)s->n, nb = (double)N, n = na + nb;
    for (int a = 0; a < D; a++) {
        double da = mb[a] - s->mean[a];
        for (int b = a; b < D; b++) s->m2[(size_t)a * D + b] += da * (mb[b] - s->mean[b]) * na * nb / n;
    }
    for (int d = 0; d < D; d++) s->mean[d] += (mb[d] - s->mean[d]) * nb / n;
    s->n += N;
    free(xb);
    free(mb);
    return IDD_OK;
}

idd_status idd_feat_stats_get(const idd_feat_stats *s, double *mu, double *sigma) {
    if (s->n < 2) return idd_error("feature stats: need at least 2 samples, have %lld", (long long)s->n);
    const int D = s->D;
    memcpy(mu, s->mean, sizeof(double) * D);
    for (int a = 0; a < D; a++)
        for (int b = a; b < D; b++) {
            double v = s->m2[(size_t)a * D + b] / (double)(s->n - 1);
            sigma[(size_t)a * D + b] = v;
            sigma[(size_t)b * D + a] = v;
        }
    return IDD_OK;
}

/* eigenvalues w and (jobz 'V') eigenvectors (in a, column-major = row-major transpose;
 * the matrix is symmetric so the layout question is only about the vectors) */
static int syevd(double *a, double *w, int n, int vectors) {
    int lwork = -1, liwork = -1, info = 0, iq;
    double q;
    const char jobz = vectors ? 'V' : 'N', uplo = 'U';
    dsyevd_(&jobz, &uplo, &n, a, &n, w, &q, &lwork, &iq, &liwork, &info, 1, 1);
    if (info) return info;
    lwork = (int)q;
    liwork = iq;
    double *work = malloc(sizeof(double) * (size_t)lwork);
    int *iwork = malloc(sizeof(int) * (size_t)liwork);
    if (!work || !iwork) {
        free(work);
        free(iwork);
        return -1000;
    }
    dsyevd_(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, &info, 1, 1);
    free(work);
    free(iwork);
    return info;
}

/* tr sqrt(s1 s2) with eps added to both diagonals; 0 on success */
static int trace_sqrt(double *tr, double *imag, const double *s1, const double *s2, int D, double eps) {
    size_t DD = (size_t)D * D;
    double *v = malloc(sizeof(double) * DD), *w = malloc(sizeof(double) * D);
    double *t = malloc(sizeof(double) * DD), *m = malloc(sizeof(double) * DD);
    int rc = -1000;
    if (!v || !w || !t || !m) goto done;
    memcpy(v, s1, sizeof(double) * DD);
    for (int i = 0; i < D; i++) v[(size_t)i * D + i] += eps;
    /* s1 = V diag(w) V^T. LAPACK is column-major: on return the eigenvectors are the
     * columns of the column-major array, i.e. the ROWS of our row-major v. */
    if ((rc = syevd(v, w, D, 1))) goto done;
    /* R = sqrt(s1) = sum_i sqrt(w_i) v_i v_i^T: scale rows, t = diag(sqrt w) V_rows */
    for (int i = 0; i < D; i++) {
        double sw = w[i] > 0 ? sqrt(w[i]) : 0.0;
        if (!isfinite(w[i])) { rc = -1; goto done; }
        for (int j = 0; j < D; j++) t[(size_t)i * D + j] = v[(size_t)i * D + j] * sqrt(sw);
    }
    /* R = t^T t (t rows scaled by w^(1/4)) */
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, D, D, 1.0, t, D, 0.0, m, D);
    for (int a = 0; a < D; a++)
        for (int b = a + 1; b < D; b++) m[(size_t)b * D + a] = m[(size_t)a * D + b];
    /* s2 + eps I into v, then t = R s2, m2 = t R (symmetric) */
    memcpy(v, s2, sizeof(double) * DD);
    for (int i = 0; i < D; i++) v[(size_t)i * D + i] += eps;
    cblas_dsymm(CblasRowMajor, CblasLeft, CblasUpper, D, D, 1.0, m, D, v, D, 0.0, t, D);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, D, D, D, 1.0, t, D, m, D, 0.0, v, D);
    for (int a = 0; a < D; a++)
        for (int b = a + 1; b < D; b++) {
            double s = 0.5 * (v[(size_t)a * D + b] + v[(size_t)b * D + a]);
            v[(size_t)a * D + b] = v[(size_t)b * D + a] = s;
        }
    if ((rc = syevd(v, w, D, 0))) goto done;
    double acc = 0, im = 0;
    for (int i = 0; i < D; i++) {
        if (!isfinite(w[i])) { rc = -1; goto done; }
        if (w[i] > 0) acc += sqrt(w[i]);
        else im += sqrt(-w[i]);
    }
    *tr = acc;
    *imag = im;
    rc = 0;
done:
    free(v); free(w); free(t); free(m);
    return rc;
}

idd_status idd_frechet_distance(double *fid, double parts[5], const double *mu1, const double *s1,
                                const double *mu2, const double *s2, int D) {
    if (D < 1) return idd_error("frechet_distance: dimension %d < 1", D);
    for (size_t i = 0; i < (size_t)D * D; i++)
        if (!isfinite(s1[i]) || !isfinite(s2[i]))
            return idd_error("frechet_distance: sigma%d has a non-finite entry", isfinite(s1[i]) ? 2 : 1);
    double mean = 0, tr1 = 0, tr2 = 0;
    for (int i = 0; i < D; i++) {
        double d = mu1[i] - mu2[i];
        mean += d * d;
        tr1 += s1[(size_t)i * D + i];
        tr2 += s2[(size_t)i * D + i];
    }
    if (!isfinite(mean)) return idd_error("frechet_distance: the means have non-finite entries");
    double tr = 0, imag = 0, eps = 0;
    int rc = trace_sqrt(&tr, &imag, s1, s2, D, 0.0);
    if (rc) {   /* as the reference: retry with 1e-6 on both diagonals */
        eps = 1e-6;
        rc = trace_sqrt(&tr, &imag, s1, s2, D, eps);
    }
    if (rc == -1000) return idd_error_status(IDD_ENOMEM, "frechet_distance: out of memory for D = %d", D);
    if (rc) return idd_error("frechet_distance: eigendecomposition failed (LAPACK info %d), also with 1e-6 offset", rc);
    /* the offset changes the covariance traces as well in the reference only through
     * covmean; tr1, tr2 stay those of the given matrices (pytorch-fid does the same) */
    *fid = mean + tr1 + tr2 - 2.0 * tr;
    if (parts) {
        parts[0] = mean;
        parts[1] = tr1 + tr2 - 2.0 * tr;
        parts[2] = tr;
        parts[3] = eps;
        parts[4] = imag;
    }
    return IDD_OK;
}

/* ---- deterministic test values ---- */

uint64_t idd_fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return h;
}

void idd_hash_uniform_f32(float *out, size_t n, uint64_t seed, double lo, double hi) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        double u = (double)(z >> 40) / 16777216.0;
        out[i] = (float)(lo + (hi - lo) * u);
    }
}
