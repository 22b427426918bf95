/* prdc.c — improved precision and recall (Kynkäänniemi et al. 2019), as in the ADM
 * evaluator and mmgen: k-NN radii within each set, then membership tests across sets.
 * Pairwise squared distances come in row blocks: d2(a,b) = |a|^2 + |b|^2 - 2 a.b, the
 * dot products from one sgemm per block, the norms in float64; negative rounding
 * results clamp to 0. Memory: one (BLOCK, N) float block. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "iddpm/metrics.h"

#define PR_BLOCK 1024

static double *sq_norms(const float *x, int64_t N, int D) {
    double *n = malloc(sizeof(double) * (size_t)(N ? N : 1));
    if (!n) return NULL;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        double s = 0;
        for (int d = 0; d < D; d++) s += (double)x[i * D + d] * x[i * D + d];
        n[i] = s;
    }
    return n;
}

/* dot (nb, Nb) = a[i0 .. i0+nb) . b^T */
static void dots(float *dot, const float *a, int64_t i0, int64_t nb, const float *b, int64_t Nb, int D) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)Nb, D, 1.0f, a + i0 * D, D, b, D, 0.0f, dot,
                (int)Nb);
}

/* r[i] = squared distance from x_i to its k-th nearest other point of x */
static idd_status knn_radii(double *r, const float *x, const double *nx, int64_t N, int D, int k, float *blk) {
    for (int64_t i0 = 0; i0 < N; i0 += PR_BLOCK) {
        int64_t nb = N - i0 < PR_BLOCK ? N - i0 : PR_BLOCK;
        dots(blk, x, i0, nb, x, N, D);
        int fail = 0;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < nb; i++) {
            double best[64];   /* the k+1 smallest, ascending (self included) */
            int nbest = 0;
            const float *row = blk + (size_t)i * N;
            for (int64_t j = 0; j < N; j++) {
                double d2 = nx[i0 + i] + nx[j] - 2.0 * row[j];
                if (j == i0 + i || d2 < 0) d2 = 0.0;   /* self, or rounding below 0 */
                if (nbest < k + 1) {
                    int p = nbest++;
                    while (p > 0 && best[p - 1] > d2) { best[p] = best[p - 1]; p--; }
                    best[p] = d2;
                } else if (d2 < best[k]) {
                    int p = k;
                    while (p > 0 && best[p - 1] > d2) { best[p] = best[p - 1]; p--; }
                    best[p] = d2;
                }
            }
            if (nbest < k + 1) fail = 1;
            r[i0 + i] = best[k];
        }
        if (fail) return idd_error("precision_recall: fewer than k+1 points");
    }
    return IDD_OK;
}

/* fraction of points q of `query` with d2(q, m_j) <= r_j for some point m_j of `manifold` */
static double coverage(const float *query, const double *nq, int64_t Nq, const float *man, const double *nm,
                       const double *r, int64_t Nm, int D, float *blk) {
    int64_t inside = 0;
    for (int64_t i0 = 0; i0 < Nq; i0 += PR_BLOCK) {
        int64_t nb = Nq - i0 < PR_BLOCK ? Nq - i0 : PR_BLOCK;
        dots(blk, query, i0, nb, man, Nm, D);
#pragma omp parallel for schedule(static) reduction(+ : inside)
        for (int64_t i = 0; i < nb; i++) {
            const float *row = blk + (size_t)i * Nm;
            for (int64_t j = 0; j < Nm; j++) {
                double d2 = nq[i0 + i] + nm[j] - 2.0 * row[j];
                if (d2 < 0) d2 = 0;
                if (d2 <= r[j]) { inside++; break; }
            }
        }
    }
    return (double)inside / (double)Nq;
}

idd_status idd_precision_recall(double *precision, double *recall, const float *real, int64_t Nr,
                                const float *fake, int64_t Nf, int D, int k) {
    if (k < 1 || k > 63) return idd_error("precision_recall: k = %d must be in 1..63", k);
    if (Nr <= k || Nf <= k)
        return idd_error("precision_recall: need more than k = %d points in each set, have %lld real and %lld fake",
                         k, (long long)Nr, (long long)Nf);
    if (D < 1) return idd_error("precision_recall: feature dimension %d < 1", D);
    int64_t Nmax = Nr > Nf ? Nr : Nf;
    double *nr = sq_norms(real, Nr, D), *nf = sq_norms(fake, Nf, D);
    double *rr = malloc(sizeof(double) * Nr), *rf = malloc(sizeof(double) * Nf);
    float *blk = malloc(sizeof(float) * (size_t)PR_BLOCK * Nmax);
    idd_status st = IDD_OK;
    if (!nr || !nf || !rr || !rf || !blk) {
        st = idd_error_status(IDD_ENOMEM, "precision_recall: out of memory (%lld real, %lld fake)", (long long)Nr,
                              (long long)Nf);
        goto done;
    }
    if ((st = knn_radii(rr, real, nr, Nr, D, k, blk))) goto done;
    if ((st = knn_radii(rf, fake, nf, Nf, D, k, blk))) goto done;
    *precision = coverage(fake, nf, Nf, real, nr, rr, Nr, D, blk);
    *recall = coverage(real, nr, Nr, fake, nf, rf, Nf, D, blk);
done:
    free(nr); free(nf); free(rr); free(rf); free(blk);
    return st;
}
