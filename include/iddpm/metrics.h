/* iddpm/metrics.h — evaluation numerics on raw host buffers (engine/metrics/).
 *
 *   feature statistics  mean and unbiased covariance of (N,D) features, in float64
 *   Fréchet distance    |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), the trace of
 *                       the square root taken through two symmetric eigendecompositions
 *                       (LAPACK dsyevd from OpenBLAS)
 *   precision / recall  Kynkäänniemi et al. 2019, k-NN radii
 * The Inception network itself is Lua over the layer ops (lua/iddpm/metrics.lua). */
#ifndef IDDPM_METRICS_H
#define IDDPM_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "iddpm/core.h"

/* Running sums for statistics over batches: n, sum (D), and the cross-product sum
 * (D,D) of centred features (Chan et al. pairwise update, float64). */
typedef struct {
    int64_t n;
    int D;
    double *mean;   /* (D) running mean */
    double *m2;     /* (D,D) sum of outer products of deviations (full matrix) */
} idd_feat_stats;

idd_feat_stats *idd_feat_stats_new(int D);
void idd_feat_stats_free(idd_feat_stats *s);
/* add a batch of N features x (N,D) row-major float32 or float64 (is_f64) */
idd_status idd_feat_stats_add(idd_feat_stats *s, const void *x, int64_t N, int is_f64);
/* mu (D) = mean; sigma (D,D) = m2 / (n-1) (needs n >= 2) */
idd_status idd_feat_stats_get(const idd_feat_stats *s, double *mu, double *sigma);

/* Fréchet distance between N(mu1, s1) and N(mu2, s2), all float64, s (D,D) symmetric.
 * tr sqrt(s1 s2) = sum_i sqrt(max(l_i, 0)), l_i the eigenvalues of the symmetric PSD
 * matrix sqrt(s1) s2 sqrt(s1) (the same as those of s1 s2). If an eigendecomposition
 * fails or gives non-finite values, it is retried once with 1e-6 added to both
 * diagonals, as pytorch-fid / the ADM evaluator / mmgen do. parts (or NULL) receives
 * {mean term |mu1-mu2|^2, trace term, tr sqrt(s1 s2), offset used (0 or 1e-6),
 *  sum of sqrt(-l_i) over negative l_i (the imaginary trace the reference discards)}. */
idd_status idd_frechet_distance(double *fid, double parts[5], const double *mu1, const double *s1,
                                const double *mu2, const double *s2, int D);

/* Precision and recall (k-NN manifolds): radius r_i of each point = distance to its
 * k-th nearest neighbour in its own set (excluding itself: the (k+1)-th smallest
 * distance with self included). precision = fraction of fake points within r_j of
 * some real point j (d <= r_j); recall = fraction of real points within the radius
 * of some fake point. Distances from float32 features, accumulated in float64 per
 * block (|a|^2 + |b|^2 - 2 a.b with sgemm dot products). Needs Nr, Nf > k. */
idd_status idd_precision_recall(double *precision, double *recall, const float *real, int64_t Nr,
                                const float *fake, int64_t Nf, int D, int k);

/* Deterministic test values: out[i] = lo + (hi-lo) * u_i with u_i = top 24 bits of
 * splitmix64(seed + (i+1) * 0x9E3779B97F4A7C15) / 2^24, computed in double and rounded
 * to float32 — reproducible bit for bit in numpy (tests/ref/make_inception_ref.py).
 * seed_from_name: FNV-1a 64 of a string. */
void idd_hash_uniform_f32(float *out, size_t n, uint64_t seed, double lo, double hi);
uint64_t idd_fnv1a64(const char *s);

#endif
