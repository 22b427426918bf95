/* conv_winograd.c — 3x3 stride-1 pad-1 convolution by Winograd's minimal filtering,
 * F(2x2,3x3) and F(4x4,3x3), for conv2d.c: forward, dx (the same conv of dout with the
 * weights flipped and transposed) and dw (see "weight gradient" below).
 *
 * Algorithm. One output row segment of m values of a 3-tap correlation,
 *   y_i = sum_j d_{i+j} g_j    (i < m, j < 3, d has a = m+2 values)
 * is y = A^T [ (G g) .* (B^T d) ]: a products instead of 3m. In 2-D the same identity
 * nests: for an a x a input tile d and a 3x3 filter g, the m x m output tile is
 *   Y = A^T [ U .* V ] A,   U = G g G^T (a x a),   V = B^T d B (a x a).
 * Summing over input channels commutes with A^T(.)A, so for every one of the a*a tile
 * positions p the channel sum is one GEMM over all tiles t:
 *   M_p (tiles, Co) = V_p (tiles, Ci) . U_p (Ci, Co),   Y_t = A^T M_t A  (+ bias)
 * i.e. a*a/(9 m*m) of the multiplies of a direct conv: 16/36 for m = 2, 36/144 for m = 4.
 *
 * Matrices. Derived by Toom-Cook interpolation at the points p_k (k < a-1) and infinity:
 * A^T[i][k] = p_k^i (the infinity column is e_{m-1}); G[k][j] = p_k^j / prod_{l!=k}(p_k-p_l)
 * (the infinity row is e_2); B^T then solves sum_k A^T[i][k] G[k][j] B^T[k][l] = [l==i+j]
 * for all i, j, l (an exact rational linear system, solved once offline and checked
 * exactly). m = 2 uses the points 0, 1, -1:
 *   B^T = [-1 0 1 0; 0 1 1 0; 0 -1 1 0; 0 -1 0 1]
 *   G   = [-1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
 *   A^T = [1 1 1 0; 0 1 -1 1]
 * m = 4 uses 0, 1, -1, 1/2, -2. The common 0, +-1, +-2 gave about 2.5x the float32 error
 * in a simulation (relative to sum |d g| over 128 channels: 1.0e-6 vs 4.1e-7; 0, +-1,
 * +-1/2 also 1.0e-6; 0, +-1, 2, -1/2 was as good as the chosen set):
 *   B^T = [1 -3/2 -2 3/2 1 0; 0 -1 1/2 5/2 1 0; 0 1 -5/2 1/2 1 0;
 *          0 -2 -1 2 1 0; 0 1/2 -1 -1/2 1 0; 0 1 -3/2 -2 3/2 1]
 *   G   = [1 0 0; 1/3 1/3 1/3; -1/3 1/3 -1/3; -16/15 -8/15 -4/15; 1/15 -2/15 4/15; 0 0 1]
 *   A^T = [1 1 1 1 1 0; 0 1 -1 1/2 -2 0; 0 1 1 1/4 4 0; 0 1 -1 1/8 -8 1]
 * All B^T and A^T entries are exact in float32 (G's thirds and fifteenths are not).
 * Measured error (tests/c/test_winograd.c, against a double-precision direct conv, per
 * output relative to sum |x w|): F(2x2) ~1.5e-7, F(4x4) up to ~2e-6 (im2col: ~5e-8). On
 * the whole UNet reference test (tolerance 1e-4) F(4x4) everywhere gave 2.9e-6 forward
 * and 2.0e-5 worst parameter gradient, vs 1.9e-6 and 1.5e-5 by im2col.
 *
 * Layout and steps (one call):
 *  1. U[p][ci][co] for all positions (co padded to Op, a multiple of 8, with zeros).
 *  2. the input, NCHW, is copied to a zero-bordered channels-last buffer
 *     xh[n][th*m+2][tw*m+2][Cp] (Cp = Ci rounded up to 8), so a tile's a x a inputs of 8
 *     channels are 8 adjacent floats each: the tile transforms run on 8-channel vectors.
 *  3. tiles are processed in blocks of TB (all images' tiles in one sequence): input
 *     transform V[p][t][ci], a*a sgemms M_p = V_p U_p, output transform to NCHW (+ bias,
 *     or added to out when accumulating). Tiles past the bottom/right edge read zeros
 *     and their extra outputs are dropped.
 * Threads: OpenBLAS is set to 1 thread for the call (restored after). With at least one
 * block per thread, threads take whole blocks (scratch V, M in each thread's workspace
 * slots 2, 3: a block stays in that core's cache); with fewer tiles, one block is shared:
 * tiles split for the transforms, positions split for the GEMMs. */
#include "conv_winograd.h"

#include <cblas.h>
#include <omp.h>
#include <string.h>

#include "iddpm/kernels.h"
#include "vmath.h"

#define DEFAULT_BLOCK 96

static int block_tiles = DEFAULT_BLOCK;

void idd_winograd_set_block(int tiles) { block_tiles = tiles > 0 ? tiles : DEFAULT_BLOCK; }

/* F(2x2,3x3): a = 4 */
static const float BT2[4 * 4] = {-1, 0, 1, 0, 0, 1, 1, 0, 0, -1, 1, 0, 0, -1, 0, 1};
static const float G2[4 * 3] = {-1, 0, 0, 0.5f, 0.5f, 0.5f, 0.5f, -0.5f, 0.5f, 0, 0, 1};
static const float AT2[2 * 4] = {1, 1, 1, 0, 0, 1, -1, 1};
/* F(4x4,3x3): a = 6 */
static const float BT4[6 * 6] = {1, -1.5f, -2,    1.5f, 1,    0, 0, -1,    0.5f, 2.5f,  1,    0,
                                 0, 1,     -2.5f, 0.5f, 1,    0, 0, -2,    -1,   2,     1,    0,
                                 0, 0.5f,  -1,    -0.5f, 1,   0, 0, 1,     -1.5f, -2,   1.5f, 1};
static const float G4[6 * 3] = {1,           0,           0,          1.0f / 3,  1.0f / 3,
                                1.0f / 3,    -1.0f / 3,   1.0f / 3,   -1.0f / 3, -16.0f / 15,
                                -8.0f / 15,  -4.0f / 15,  1.0f / 15,  -2.0f / 15, 4.0f / 15,
                                0,           0,           1};
static const float AT4[4 * 6] = {1, 1, 1,  1,     1,  0, 0, 1, -1, 0.5f,   -2, 0,
                                 0, 1, 1,  0.25f, 4,  0, 0, 1, -1, 0.125f, -8, 1};

/* acc + c x for a coefficient c known at compile time once inlined and unrolled (the
 * tests on c fold away; zero coefficients are skipped by the callers); first: acc unset */
static inline __attribute__((always_inline)) v8f mac(v8f acc, float c, v8f x, int first) {
    if (first) return c == 1.0f ? x : c == -1.0f ? -x : v8_set1(c) * x;
    return c == 1.0f ? acc + x : c == -1.0f ? acc - x : v8_fma(v8_set1(c), x, acc);
}

/* sum over i < n of coef[i*cs] v[i*vs], skipping zero coefficients: one row of a
 * transform matrix times a column of vectors (coefficients fold away once inlined) */
static inline __attribute__((always_inline)) v8f lincomb(const float *coef, int cs, const v8f *v,
                                                         int vs, int n) {
    v8f acc = v8_set1(0.0f);
    int first = 1;
#pragma GCC unroll 6
    for (int i = 0; i < n; i++)
        if (coef[i * cs] != 0.0f) acc = mac(acc, coef[i * cs], v[i * vs], first), first = 0;
    return acc;
}

/* r[i][j] <- r[j][i] for an 8x8 block (written out so that it stays in registers) */
static inline __attribute__((always_inline)) void transpose8(v8f r[8]) {
    const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i p0 = {0, 1, 8, 9, 4, 5, 12, 13}, p1 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i h0 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = {4, 5, 6, 7, 12, 13, 14, 15};
    /* pairs of rows interleaved */
    v8f t0 = __builtin_shuffle(r[0], r[1], lo), t1 = __builtin_shuffle(r[0], r[1], hi);
    v8f t2 = __builtin_shuffle(r[2], r[3], lo), t3 = __builtin_shuffle(r[2], r[3], hi);
    v8f t4 = __builtin_shuffle(r[4], r[5], lo), t5 = __builtin_shuffle(r[4], r[5], hi);
    v8f t6 = __builtin_shuffle(r[6], r[7], lo), t7 = __builtin_shuffle(r[6], r[7], hi);
    /* u_c: columns c and c+4 of rows 0-3 (u0..u3) or rows 4-7 (w0..w3) */
    v8f u0 = __builtin_shuffle(t0, t2, p0), u1 = __builtin_shuffle(t0, t2, p1);
    v8f u2 = __builtin_shuffle(t1, t3, p0), u3 = __builtin_shuffle(t1, t3, p1);
    v8f w0 = __builtin_shuffle(t4, t6, p0), w1 = __builtin_shuffle(t4, t6, p1);
    v8f w2 = __builtin_shuffle(t5, t7, p0), w3 = __builtin_shuffle(t5, t7, p1);
    r[0] = __builtin_shuffle(u0, w0, h0), r[4] = __builtin_shuffle(u0, w0, h1);
    r[1] = __builtin_shuffle(u1, w1, h0), r[5] = __builtin_shuffle(u1, w1, h1);
    r[2] = __builtin_shuffle(u2, w2, h0), r[6] = __builtin_shuffle(u2, w2, h1);
    r[3] = __builtin_shuffle(u3, w3, h0), r[7] = __builtin_shuffle(u3, w3, h1);
}

/* out[(k*a + l)*ostride] = (B^T d B)[k][l] for 8 channels; d[i][j] at src + i*rs + j*cs */
static inline __attribute__((always_inline)) void tile_in(float *out, long ostride,
                                                          const float *src, long rs, long cs,
                                                          int a, const float *bt) {
    v8f t[36];
#pragma GCC unroll 6
    for (int j = 0; j < a; j++) {
        v8f d[6];
#pragma GCC unroll 6
        for (int i = 0; i < a; i++) d[i] = v8_load(src + i * rs + j * cs);
#pragma GCC unroll 6
        for (int k = 0; k < a; k++) {
            v8f acc = lincomb(bt + k * a, 1, d, 1, a);
            t[k * a + j] = acc;
        }
    }
#pragma GCC unroll 6
    for (int k = 0; k < a; k++) {
#pragma GCC unroll 6
        for (int l = 0; l < a; l++) {
            v8f acc = lincomb(bt + l * a, 1, t + k * a, 1, a);
            v8_store(out + (k * a + l) * ostride, acc);
        }
    }
}

/* y[i*m + j] = (A^T M A)[i][j] for 8 channels; M[k][l] at src + (k*a + l)*sstride */
static inline __attribute__((always_inline)) void tile_out(v8f *y, const float *src,
                                                           long sstride, int a, int m,
                                                           const float *at) {
    v8f t[24];
#pragma GCC unroll 6
    for (int l = 0; l < a; l++) {
        v8f c[6];
#pragma GCC unroll 6
        for (int k = 0; k < a; k++) c[k] = v8_load(src + (k * a + l) * sstride);
#pragma GCC unroll 4
        for (int i = 0; i < m; i++) {
            v8f acc = lincomb(at + i * a, 1, c, 1, a);
            t[i * a + l] = acc;
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < m; i++) {
#pragma GCC unroll 4
        for (int j = 0; j < m; j++) {
            v8f acc = lincomb(at + j * a, 1, t + i * a, 1, a);
            y[i * m + j] = acc;
        }
    }
}

/* out[(k*a + l)*ostride] = (A dY A^T)[k][l] for 8 channels, dY[i][j] (m x m) at
 * src + i*rs + j*cs: the adjoint of tile_out, for the weight gradient */
static inline __attribute__((always_inline)) void tile_dy(float *out, long ostride,
                                                          const float *src, long rs, long cs,
                                                          int a, int m, const float *at) {
    v8f t[24]; /* t[k*m + j] = sum_i A^T[i][k] dY[i][j] */
#pragma GCC unroll 4
    for (int j = 0; j < m; j++) {
        v8f d[4];
#pragma GCC unroll 4
        for (int i = 0; i < m; i++) d[i] = v8_load(src + i * rs + j * cs);
#pragma GCC unroll 6
        for (int k = 0; k < a; k++) {
            v8f acc = lincomb(at + k, a, d, 1, m);
            t[k * m + j] = acc;
        }
    }
#pragma GCC unroll 6
    for (int k = 0; k < a; k++) {
#pragma GCC unroll 6
        for (int l = 0; l < a; l++) {
            v8f acc = lincomb(at + l, a, t + k * m, 1, m);
            v8_store(out + (k * a + l) * ostride, acc);
        }
    }
}

/* sizes of one call */
typedef struct {
    int N, Ci, Co, H, W, m, a, th, tw, Cp, Op, Hp, Wp, accumulate;
    long TI, T; /* tiles per image, in all */
} wg_plan;

static int round8(int n) { return (n + 7) & ~7; }

/* floats from one tile position to the next in U, V, M: the matrix size plus 16, so that
 * the a*a values of one tile (read or written together) do not all fall into one L1
 * cache set when the size is a multiple of 4 KiB */
static long ustride(const wg_plan *q) { return (long)q->Ci * q->Op + 16; }
static long vstride(const wg_plan *q, long tb) { return tb * q->Cp + 16; }
static long mstride(const wg_plan *q, long tb) { return tb * q->Op + 16; }

/* out[(k*a + l)*ostride] = (G f G^T)[k][l] for 8 filters, f[i*3 + j] (3 x 3) */
static inline __attribute__((always_inline)) void filter_tile(float *out, long ostride,
                                                              const v8f *f, int a,
                                                              const float *G) {
    v8f t[18]; /* G f (a x 3) */
#pragma GCC unroll 6
    for (int k = 0; k < a; k++) {
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            v8f acc = lincomb(G + k * 3, 1, f + j, 3, 3);
            t[k * 3 + j] = acc;
        }
    }
#pragma GCC unroll 6
    for (int k = 0; k < a; k++) {
#pragma GCC unroll 6
        for (int l = 0; l < a; l++) {
            v8f acc = lincomb(G + l * 3, 1, t + k * 3, 1, 3);
            v8_store(out + (k * a + l) * ostride, acc);
        }
    }
}

/* U[p][ci][co] (co < Op) = (G g G^T)[p] of filter g[co][ci] (or the flipped transpose)
 * for one input channel ci, 8-wide over co (row ci of every U_p is written in order);
 * columns co >= Co are zero. */
static void weights_row(float *U, const float *g, const wg_plan *q, int flip, int ci) {
    const int Ci = q->Ci, Co = q->Co, Op = q->Op;
    for (int o0 = 0; o0 < Op; o0 += 8) {
        const int nq = Co - o0 < 8 ? Co - o0 : 8;
        v8f f[9];
        if (nq == 8) {
            /* taps 0-7 (flip: 1-8) of the 8 filters as rows, transposed to one vector
             * per tap; the remaining tap element by element */
            v8f r[8];
            for (int k = 0; k < 8; k++)
                r[k] = flip ? v8_load(g + ((long)ci * Co + o0 + k) * 9 + 1)
                            : v8_load(g + ((long)(o0 + k) * Ci + ci) * 9);
            transpose8(r);
            for (int j = 0; j < 8; j++) f[flip ? 7 - j : j] = r[j];
            for (int k = 0; k < 8; k++)
                f[8][k] = flip ? g[((long)ci * Co + o0 + k) * 9] : g[((long)(o0 + k) * Ci + ci) * 9 + 8];
        } else {
            for (int r = 0; r < 9; r++) {
                f[r] = v8_set1(0.0f);
                for (int k = 0; k < nq; k++)
                    f[r][k] = flip ? g[((long)ci * Co + o0 + k) * 9 + (8 - r)]
                                   : g[((long)(o0 + k) * Ci + ci) * 9 + r];
            }
        }
        float *u = U + (long)ci * Op + o0;
        if (q->m == 4) filter_tile(u, ustride(q), f, 6, G4);
        else filter_tile(u, ustride(q), f, 4, G2);
    }
}

/* Row y of sample n of a channels-last copy dst[n][rows][cols][Cp] of src (N,C,H,W),
 * shifted by off rows and columns (off = 1: a zero border for the padding), zero outside
 * src and in channels C..Cp; 8 channels x 8 pixels at a time through an 8x8 transpose */
static void pad_row(float *dst, const float *src, int C, int Cp, int H, int W, int rows, int cols,
                    int off, int n, int y) {
    float *row = dst + ((long)n * rows + y) * cols * Cp;
    const int sy = y - off;
    if (sy < 0 || sy >= H) {
        memset(row, 0, sizeof(float) * (size_t)cols * Cp);
        return;
    }
    memset(row, 0, sizeof(float) * (size_t)off * Cp);
    const long HW = (long)H * W;
    const float *s = src + ((long)n * C * H + sy) * W;
    int x0 = 0;
    for (; x0 + 8 <= W; x0 += 8) {
        int c = 0;
        for (; c + 8 <= C; c += 8) {
            v8f r[8];
            for (int i = 0; i < 8; i++) r[i] = v8_load(s + (c + i) * HW + x0);
            transpose8(r);
            for (int j = 0; j < 8; j++) v8_store(row + (long)(off + x0 + j) * Cp + c, r[j]);
        }
        for (int x = x0; x < x0 + 8; x++) {
            float *d = row + (long)(off + x) * Cp;
            for (int cc = c; cc < Cp; cc++) d[cc] = cc < C ? s[cc * HW + x] : 0.0f;
        }
    }
    for (int x = x0; x < W; x++) {
        float *d = row + (long)(off + x) * Cp;
        for (int c = 0; c < Cp; c++) d[c] = c < C ? s[c * HW + x] : 0.0f;
    }
    memset(row + (long)(off + W) * Cp, 0, sizeof(float) * (size_t)(cols - W - off) * Cp);
}

/* V[p][t - t0][.] for tiles t in [t0 + u0, t0 + u1) of a block starting at tile t0 */
static void input_tiles(float *V, long tb, const float *xh, const wg_plan *q, long t0, long u0,
                        long u1) {
    const int m = q->m, Cp = q->Cp;
    const long rs = (long)q->Wp * Cp, vs = vstride(q, tb);
    for (long u = u0; u < u1; u++) {
        long t = t0 + u, n = t / q->TI, r = t % q->TI;
        int ty = (int)(r / q->tw), tx = (int)(r % q->tw);
        const float *src = xh + ((n * q->Hp + (long)ty * m) * q->Wp + (long)tx * m) * Cp;
        float *dst = V + u * Cp;
        for (int c = 0; c < Cp; c += 8) {
            if (m == 4) tile_in(dst + c, vs, src + c, rs, Cp, 6, BT4);
            else tile_in(dst + c, vs, src + c, rs, Cp, 4, BT2);
        }
    }
}

/* d[0..3] (+)= v[0..3], d[W..W+3] (+)= v[4..7] */
static inline void store_rows(float *d, int W, v8f v, int accumulate) {
    float *e = d + W;
    if (accumulate) {
        for (int k = 0; k < 4; k++) d[k] += v[k], e[k] += v[4 + k];
    } else {
        for (int k = 0; k < 4; k++) d[k] = v[k], e[k] = v[4 + k];
    }
}

/* out (NCHW) (+)= A^T M A + bias for tiles [t0 + u0, t0 + u1); bias padded to Op */
static void output_tiles(float *out, const float *M, long tb, const float *bias,
                         const wg_plan *q, long t0, long u0, long u1) {
    const int m = q->m, Op = q->Op, Co = q->Co, H = q->H, W = q->W;
    const long HW = (long)H * W, ms = mstride(q, tb);
    for (long u = u0; u < u1; u++) {
        long t = t0 + u, n = t / q->TI, r = t % q->TI;
        int ty = (int)(r / q->tw), tx = (int)(r % q->tw);
        int hi = H - ty * m < m ? H - ty * m : m, wi = W - tx * m < m ? W - tx * m : m;
        float *dst = out + (n * Co * H + (long)ty * m) * W + (long)tx * m;
        for (int o = 0; o < Op; o += 8) {
            v8f y[16];
            float buf[16][8];
            if (m == 4) tile_out(y, M + u * Op + o, ms, 6, 4, AT4);
            else tile_out(y, M + u * Op + o, ms, 4, 2, AT2);
            v8f bv = bias ? v8_load(bias + o) : v8_set1(0.0f);
            int qn = Co - o < 8 ? Co - o : 8;
            if (m == 4 && hi == 4 && wi == 4 && qn == 8) {
                /* whole tile: two 8x8 transposes give each channel's rows 0-1 and 2-3 */
                for (int k = 0; k < 16; k++) y[k] += bv;
                transpose8(y), transpose8(y + 8);
                for (int c = 0; c < 8; c++) {
                    float *d = dst + (long)(o + c) * HW;
                    store_rows(d, W, y[c], q->accumulate);
                    store_rows(d + 2 * W, W, y[8 + c], q->accumulate);
                }
                continue;
            }
            for (int k = 0; k < m * m; k++) v8_store(buf[k], y[k] + bv);
            for (int c = 0; c < qn; c++) {
                float *d = dst + (long)(o + c) * HW;
                for (int i = 0; i < hi; i++)
                    for (int j = 0; j < wi; j++) {
                        float v = buf[i * m + j][c];
                        d[(long)i * W + j] = q->accumulate ? d[(long)i * W + j] + v : v;
                    }
            }
        }
    }
}

/* M_p = V_p U_p for positions [p0, p1) and rows of tiles [0, cnt) */
static void gemms(float *M, const float *V, const float *U, long tb, long cnt, const wg_plan *q,
                  int p0, int p1) {
    for (int p = p0; p < p1; p++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)cnt, q->Op, q->Ci, 1.0f,
                    V + p * vstride(q, tb), q->Cp, U + p * ustride(q), q->Op, 0.0f,
                    M + p * mstride(q, tb), q->Op);
}

static wg_plan plan(int N, int Ci, int H, int W, int Co, int m, int accumulate) {
    wg_plan q = {N, Ci, Co, H, W, m, m + 2, (H + m - 1) / m, (W + m - 1) / m, round8(Ci),
                 round8(Co), 0, 0, accumulate, 0, 0};
    q.Hp = q.th * m + 2;
    q.Wp = q.tw * m + 2;
    q.TI = (long)q.th * q.tw;
    q.T = (long)N * q.TI;
    return q;
}

idd_status idd_winograd_conv3x3(float *out, const float *in, const float *g, const float *b,
                                int N, int Ci, int H, int W, int Co, int m, int flip,
                                int accumulate) {
    wg_plan q = plan(N, Ci, H, W, Co, m, accumulate);
    const int P = q.a * q.a;
    const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();

    /* blocks: per-thread when there is at least one block per thread (count rounded up
     * to a multiple of the threads, so they get equal shares), else one shared block */
    long tb = q.T < block_tiles ? q.T : block_tiles, nblk = (q.T + tb - 1) / tb;
    const int shared = nt > 1 && nblk < nt;
    if (shared) tb = q.T, nblk = 1;
    else if (nt > 1) nblk = (nblk + nt - 1) / nt * nt, tb = (q.T + nblk - 1) / nblk;

    float *xh = idd_workspace_get(0, sizeof(float) * (size_t)N * q.Hp * q.Wp * q.Cp);
    float *U = idd_workspace_get(1, sizeof(float) * ((size_t)P * ustride(&q) + q.Op));
    float *sV = NULL, *sM = NULL;
    if (shared) {
        sV = idd_workspace_get(2, sizeof(float) * (size_t)P * vstride(&q, tb));
        sM = idd_workspace_get(3, sizeof(float) * (size_t)P * mstride(&q, tb));
        if (!sV || !sM) return IDD_ENOMEM;
    }
    if (!xh || !U) return IDD_ENOMEM;
    float *bias = NULL;
    if (b) {
        bias = U + (size_t)P * ustride(&q);
        for (int o = 0; o < q.Op; o++) bias[o] = o < Co ? b[o] : 0.0f;
    }

    int failed = 0, blas_threads = 0;
    if (!omp_in_parallel()) {
        blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
    }
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (int ci = 0; ci < Ci; ci++) weights_row(U, g, &q, flip, ci);
#pragma omp for collapse(2) schedule(static)
        for (int n = 0; n < N; n++)
            for (int y = 0; y < q.Hp; y++)
                pad_row(xh, in, Ci, q.Cp, H, W, q.Hp, q.Wp, 1, n, y);
        /* implicit barrier: U and xh complete */
        if (shared) {
            int team = omp_get_num_threads(), me = omp_get_thread_num();
            long u0 = q.T * me / team, u1 = q.T * (me + 1) / team;
            input_tiles(sV, tb, xh, &q, 0, u0, u1);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) gemms(sM, sV, U, tb, q.T, &q, p, p + 1);
            /* implicit barrier */
            output_tiles(out, sM, tb, bias, &q, 0, u0, u1);
        } else {
            float *V = idd_workspace_get(2, sizeof(float) * (size_t)P * vstride(&q, tb));
            float *M = idd_workspace_get(3, sizeof(float) * (size_t)P * mstride(&q, tb));
            if (!V || !M) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (long k = 0; k < nblk; k++) {
                long t0 = k * tb, cnt = q.T - t0 < tb ? q.T - t0 : tb;
                if (!V || !M || cnt <= 0) continue;
                input_tiles(V, tb, xh, &q, t0, 0, cnt);
                gemms(M, V, U, tb, cnt, &q, 0, P);
                output_tiles(out, M, tb, bias, &q, t0, 0, cnt);
            }
        }
    }
    if (!omp_in_parallel()) openblas_set_num_threads(blas_threads);
    return failed ? IDD_ENOMEM : IDD_OK;
}

/* ---- weight gradient ------------------------------------------------------------------
 * With Y_t = A^T [sum_ci U .* V_t] A per tile and output channel, the gradient of the
 * loss w.r.t. U is dU_p (Ci, Co) = sum_t V_p[t]^T dM_p[t], dM_t = A dY_t A^T (a x a;
 * dY is zero past the bottom/right edge), and dw = G^T dU G (3x3) per (co, ci). Each
 * thread sums the GEMMs of its tile blocks into a private dU (workspace slot 3; V and dM
 * share slot 2), then the partials are added while transforming back. */

/* dM[p][t - t0][.] for tiles [t0, t0 + cnt), from dyh[n][th*m][tw*m][Op] */
static void dy_tiles(float *dM, long tb, const float *dyh, const wg_plan *q, long t0, long cnt) {
    const int m = q->m, Op = q->Op;
    const long rs = (long)q->tw * m * Op, ms = mstride(q, tb);
    for (long u = 0; u < cnt; u++) {
        long t = t0 + u, n = t / q->TI, r = t % q->TI;
        int ty = (int)(r / q->tw), tx = (int)(r % q->tw);
        const float *src = dyh + ((n * q->th * m + (long)ty * m) * q->tw * m + (long)tx * m) * Op;
        for (int o = 0; o < Op; o += 8) {
            if (m == 4) tile_dy(dM + u * Op + o, ms, src + o, rs, Op, 6, 4, AT4);
            else tile_dy(dM + u * Op + o, ms, src + o, rs, Op, 4, 2, AT2);
        }
    }
}

/* e[i*3 + j] = (G^T d G)[i][j] for 8 filters, d[k*a + l] (a x a): the adjoint of
 * filter_tile */
static inline __attribute__((always_inline)) void filter_grad_tile(v8f *e, const v8f *d, int a,
                                                                   const float *G) {
    v8f r[18]; /* d G (a x 3) */
#pragma GCC unroll 6
    for (int k = 0; k < a; k++) {
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            v8f acc = lincomb(G + j, 3, d + k * a, 1, a);
            r[k * 3 + j] = acc;
        }
    }
#pragma GCC unroll 3
    for (int i = 0; i < 3; i++) {
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            v8f acc = lincomb(G + i, 3, r + j, 3, a);
            e[i * 3 + j] = acc;
        }
    }
}

/* dw[co][ci] += G^T (sum of the team's dU partials) G for co in [o, o+8), all ci (so the
 * 8 rows of dw are written in order) */
static void dw_back(float *dw, float *const *parts, int team, const wg_plan *q, int o) {
    const int a = q->a, Ci = q->Ci, Co = q->Co, Op = q->Op;
    const long us = ustride(q);
    for (int ci = 0; ci < Ci; ci++) {
        v8f d[36];
        for (int p = 0; p < a * a; p++) {
            d[p] = v8_load(parts[0] + p * us + (long)ci * Op + o);
            for (int u = 1; u < team; u++) d[p] += v8_load(parts[u] + p * us + (long)ci * Op + o);
        }
        const int nq = Co - o < 8 ? Co - o : 8;
        v8f e[9];
        if (q->m == 4) filter_grad_tile(e, d, 6, G4);
        else filter_grad_tile(e, d, 4, G2);
        if (nq == 8) { /* taps 0-7 transposed to one vector per filter, tap 8 alone */
            float *dwo = dw + ((long)o * Ci + ci) * 9;
            for (int c = 0; c < 8; c++) dwo[(long)c * Ci * 9 + 8] += e[8][c];
            transpose8(e);
            for (int c = 0; c < 8; c++) {
                float *dc = dwo + (long)c * Ci * 9;
                v8_store(dc, v8_load(dc) + e[c]);
            }
        } else {
            for (int t = 0; t < 9; t++)
                for (int c = 0; c < nq; c++) dw[((long)(o + c) * Ci + ci) * 9 + t] += e[t][c];
        }
    }
}

idd_status idd_winograd_conv3x3_dw(float *dw, const float *dout, const float *in, int N, int Ci,
                                   int H, int W, int Co, int m) {
    wg_plan q = plan(N, Ci, H, W, Co, m, 0);
    const int P = q.a * q.a;
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (nt > 256) nt = 256; /* parts[] */
    /* blocks: a multiple of the thread count, at most block_tiles tiles each */
    long nblk = (q.T + block_tiles - 1) / block_tiles;
    nblk = (nblk + nt - 1) / nt * nt;
    const long tb = (q.T + nblk - 1) / nblk;
    const int dyr = q.th * m, dyc = q.tw * m;
    float *xh = idd_workspace_get(0, sizeof(float) * (size_t)N * q.Hp * q.Wp * q.Cp);
    float *dyh = idd_workspace_get(1, sizeof(float) * (size_t)N * dyr * dyc * q.Op);
    if (!xh || !dyh) return IDD_ENOMEM;
    float *parts[256];
    int failed = 0, blas_threads = 0;
    if (!omp_in_parallel()) {
        blas_threads = openblas_get_num_threads();
        openblas_set_num_threads(1);
    }
#pragma omp parallel num_threads(nt)
    {
        int me = omp_get_thread_num(), team = omp_get_num_threads();
        float *VM = idd_workspace_get(2, sizeof(float) * (size_t)P * (vstride(&q, tb) + mstride(&q, tb)));
        float *dU = idd_workspace_get(3, sizeof(float) * (size_t)P * ustride(&q));
        parts[me] = dU;
        if (!VM || !dU) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(dU, 0, sizeof(float) * (size_t)P * ustride(&q));
        }
#pragma omp for collapse(2) schedule(static) nowait
        for (int n = 0; n < N; n++)
            for (int y = 0; y < q.Hp; y++)
                pad_row(xh, in, Ci, q.Cp, H, W, q.Hp, q.Wp, 1, n, y);
#pragma omp for collapse(2) schedule(static)
        for (int n = 0; n < N; n++)
            for (int y = 0; y < dyr; y++) pad_row(dyh, dout, Co, q.Op, H, W, dyr, dyc, 0, n, y);
        /* implicit barrier: xh, dyh and failed complete */
        if (!failed) {
            float *V = VM, *dM = VM + (size_t)P * vstride(&q, tb);
#pragma omp for schedule(static)
            for (long k = 0; k < nblk; k++) {
                long t0 = k * tb, cnt = q.T - t0 < tb ? q.T - t0 : tb;
                if (cnt <= 0) continue;
                input_tiles(V, tb, xh, &q, t0, 0, cnt);
                dy_tiles(dM, tb, dyh, &q, t0, cnt);
                for (int p = 0; p < P; p++)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Ci, q.Op, (int)cnt, 1.0f,
                                V + p * vstride(&q, tb), q.Cp, dM + p * mstride(&q, tb), q.Op,
                                1.0f, dU + p * ustride(&q), q.Op);
            }
            /* implicit barrier: every partial complete */
#pragma omp for schedule(static)
            for (int o = 0; o < q.Op; o += 8) dw_back(dw, parts, team, &q, o);
        }
    }
    if (!omp_in_parallel()) openblas_set_num_threads(blas_threads);
    return failed ? IDD_ENOMEM : IDD_OK;
}
