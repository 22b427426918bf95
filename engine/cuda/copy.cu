/* copy.cu — copies and casts between any dtypes (float32/64, int64, uint8, bf16) and any
 * strides, and fills: cu_copy / cu_fill of the backend table (memory.cu registers them).
 * The operands' dims are sorted by the destination's strides and merged where every
 * operand steps over one dim exactly as over the whole of the next; then one dense block
 * is a memcpy, float32 <-> bf16 of dense blocks a flat 16-byte conversion, NCHW <->
 * channels-last a tiled transpose, a row copy of a multiple of 8 (cat along C) an 8-wide
 * kernel, anything else a 32-bit index walk where the offsets fit, else a 64-bit one. */
#include "cuda_common.cuh"

#include <string.h>

// ---------------------------------------------------------------- coalescing

/* dims of ts[0] in the given order (size-1 dims dropped), merged where every operand
 * steps over a dim exactly as over the whole of the next */
static int64_t coalesce_order(int n, const idd_tensor *const *ts, const int *order, cu_desc *d) {
    const idd_tensor *t0 = ts[0];
    int nd = 0;
    int64_t numel = 1;
    for (int k = 0; k < n; k++) d[k].ndim = 0;
    for (int j = 0; j < t0->ndim; j++) {
        int i = order[j];
        numel *= t0->shape[i];
        if (t0->shape[i] == 1) continue;
        for (int k = 0; k < n; k++) { d[k].shape[nd] = t0->shape[i]; d[k].stride[nd] = ts[k]->stride[i]; }
        nd++;
    }
    if (nd == 0) {
        for (int k = 0; k < n; k++) { d[k].ndim = 0; }
        return numel;
    }
    int cur = 0;
    for (int j = 1; j < nd; j++) {
        bool ok = true;
        for (int k = 0; k < n; k++)
            if (d[k].stride[cur] != d[k].stride[j] * d[k].shape[j]) { ok = false; break; }
        if (ok) {
            for (int k = 0; k < n; k++) { d[k].shape[cur] *= d[k].shape[j]; d[k].stride[cur] = d[k].stride[j]; }
        } else {
            cur++;
            for (int k = 0; k < n; k++) { d[k].shape[cur] = d[k].shape[j]; d[k].stride[cur] = d[k].stride[j]; }
        }
    }
    for (int k = 0; k < n; k++) d[k].ndim = cur + 1;
    return numel;
}

int64_t cu_coalesce(int n, const idd_tensor *const *ts, cu_desc *d) {
    int order[IDD_MAX_DIMS];
    for (int i = 0; i < ts[0]->ndim; i++) order[i] = i;
    return coalesce_order(n, ts, order, d);
}

int64_t cu_coalesce_sorted(int n, const idd_tensor *const *ts, cu_desc *d) {
    const idd_tensor *t0 = ts[0];
    int order[IDD_MAX_DIMS];
    for (int i = 0; i < t0->ndim; i++) {   /* insertion sort, |stride| descending, stable */
        int j = i;
        int64_t si = t0->stride[i] < 0 ? -t0->stride[i] : t0->stride[i];
        while (j > 0) {
            int64_t sp = t0->stride[order[j - 1]];
            if ((sp < 0 ? -sp : sp) >= si) break;
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    return coalesce_order(n, ts, order, d);
}

// ---------------------------------------------------------------- copy and fill
bool cu_desc32_make(int nop, const cu_desc *d, int64_t numel, cu_desc32 *out) {
    if (nop > 3 || numel > INT32_MAX || d[0].ndim > IDD_MAX_DIMS) return false;
    out->ndim = d[0].ndim;
    for (int k = 0; k < nop; k++) {
        int64_t span = 0;   /* the largest |offset| the operand reaches */
        for (int j = 0; j < d[k].ndim; j++) {
            int64_t st = d[k].stride[j] < 0 ? -d[k].stride[j] : d[k].stride[j];
            span += (d[k].shape[j] - 1) * st;
            if (k == 0) out->shape[j] = (unsigned)d[0].shape[j];
            out->stride[k][j] = (int)d[k].stride[j];
        }
        if (span > INT32_MAX) return false;
    }
    return true;
}


bool cu_vec8_ok(int nop, const cu_desc *d, const void *const *ptrs, const size_t *elsize, int *inner) {
    int nd = d[0].ndim;
    if (nd < 1 || d[0].shape[nd - 1] % 8 != 0 || d[0].stride[nd - 1] != 1) return false;
    for (int k = 0; k < nop; k++) {
        int64_t s = d[k].stride[nd - 1];
        if (s != 0 && s != 1) return false;
        inner[k] = (int)s;
        if (s == 0) continue;
        if (((uintptr_t)ptrs[k] & 15) != 0) return false;
        for (int j = 0; j < nd - 1; j++)
            if ((d[k].stride[j] * (int64_t)elsize[k]) % 16 != 0) return false;
    }
    return true;
}

__global__ void k_copy_f32(float *dst, cu_desc dd, const float *src, cu_desc sd, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[cu_offset(dd, i)] = src[cu_offset(sd, i)];
}

/* float32 / bfloat16 in any mix, 32-bit indices (cu_desc32: count and offsets fit in int32) */
template <typename D, typename S> __global__ void k_copy_t32(D *dst, const S *src, cu_desc32 d, int n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)n; i += gridDim.x * blockDim.x) {
        int off[2];
        cu_offsets32<2>(d, i, off);
        cu_st(dst, off[0], cu_ld(src, off[1]));
    }
}

/* dense conversion (both operands one stride-1 run): 8 elements per thread, 16-byte
 * accesses when aligned (vec), element by element otherwise and for the tail */
template <typename D, typename S> __global__ void k_copy_flat(D *dst, const S *src, int64_t n, bool vec) {
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c * 8 < n; c += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = c * 8;
        if (vec && i + 8 <= n) {
            float v[8];
            cu_ld8(src + i, v);
            cu_st8(dst + i, v);
        } else {
            for (int64_t j = i; j < n && j < i + 8; j++) cu_st(dst, j, cu_ld(src, j));
        }
    }
}

/* the 8-wide walk (cu_vec8_ok): rows of a cat along C, broadcast rows */
template <typename D, typename S> __global__ void k_copy_vec8(D *dst, const S *src, int ss, cu_desc32 d, int n8) {
    for (unsigned q = blockIdx.x * blockDim.x + threadIdx.x; q < (unsigned)n8; q += gridDim.x * blockDim.x) {
        int off[2];
        cu_offsets32<2>(d, q * 8, off);
        float v[8];
        if (ss) cu_ld8(src + off[1], v);
        else for (int k = 0; k < 8; k++) v[k] = cu_ld(src, off[1]);
        cu_st8(dst + off[0], v);
    }
}

/* batched transpose through a 32x32 shared tile: element (b, x, y) is src[b*sb + x*sx + y]
 * (src runs along y) and dst[b*db + x + y*dy] (dst runs along x), so both the reads and
 * the writes are coalesced: NCHW <-> NHWC (channels-last) conversions */
#define TT 32
template <typename D, typename S>
__global__ void k_transpose(D *dst, const S *src, int X, int Y, int64_t sb, int64_t sx, int64_t db, int64_t dy) {
    __shared__ float tile[TT][TT + 1];
    int64_t b = blockIdx.z;
    int x0 = blockIdx.y * TT, y0 = blockIdx.x * TT;
    const S *sp = src + b * sb;
    D *dp = dst + b * db;
    for (int r = threadIdx.y; r < TT; r += blockDim.y) {
        int x = x0 + r, y = y0 + threadIdx.x;
        if (x < X && y < Y) tile[r][threadIdx.x] = cu_ld(sp, (int64_t)x * sx + y);
    }
    __syncthreads();
    for (int r = threadIdx.y; r < TT; r += blockDim.y) {
        int y = y0 + r, x = x0 + threadIdx.x;
        if (x < X && y < Y) cu_st(dp, x + (int64_t)y * dy, tile[threadIdx.x][r]);
    }
}

__global__ void k_copy_any(void *dst, int ddt, cu_desc dd, const void *src, int sdt, cu_desc sd, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        cu_store(dst, ddt, cu_offset(dd, i), cu_load(src, sdt, cu_offset(sd, i)));
}

/* the typed copies for one (dst, src) pair of float32 / bfloat16 */
template <typename D, typename S> static void copy_typed(void *dst, const void *src, const cu_desc *d, int64_t n) {
    D *dp = (D *)dst;
    const S *sp = (const S *)src;
    unsigned nb = cu_blocks(n, 256);
    if (nb > 65536) nb = 65536;
    int nd = d[0].ndim;
    /* one dense run: a flat conversion */
    if (nd <= 1 && (nd == 0 || (d[0].stride[0] == 1 && d[1].stride[0] == 1))) {
        bool vec = ((((uintptr_t)dp) | ((uintptr_t)sp)) & 15) == 0;
        unsigned nb8 = cu_blocks((n + 7) / 8, 256);
        k_copy_flat<D, S><<<nb8 > 65536 ? 65536 : nb8, 256, 0, idd_cu_stream>>>(dp, sp, n, vec);
        return;
    }
    cu_desc32 d32;
    const void *ptrs[2] = {dp, sp};
    size_t es[2] = {sizeof(D), sizeof(S)};
    int inner[2];
    if (cu_vec8_ok(2, d, ptrs, es, inner) && cu_desc32_make(2, d, n, &d32)) {
        unsigned nb8 = cu_blocks(n / 8, 256);
        k_copy_vec8<D, S><<<nb8 > 65536 ? 65536 : nb8, 256, 0, idd_cu_stream>>>(dp, sp, inner[1], d32, (int)(n / 8));
        return;
    }
    /* a transpose of the last two dims (with at most one batch dim before them) */
    if (nd == 2 || nd == 3) {
        int i0 = nd - 2, i1 = nd - 1, ys = -1, xd = -1;
        if (d[1].stride[i1] == 1 && d[0].stride[i0] == 1) ys = i1, xd = i0;
        else if (d[1].stride[i0] == 1 && d[0].stride[i1] == 1) ys = i0, xd = i1;
        int64_t B = nd == 3 ? d[0].shape[0] : 1;
        if (ys >= 0 && B <= 65535 && d[0].shape[xd] <= INT32_MAX && d[0].shape[ys] <= INT32_MAX &&
            (d[0].shape[xd] + TT - 1) / TT <= 65535) {
            int X = (int)d[0].shape[xd], Y = (int)d[0].shape[ys];
            dim3 grid((unsigned)((Y + TT - 1) / TT), (unsigned)((X + TT - 1) / TT), (unsigned)B);
            k_transpose<D, S><<<grid, dim3(TT, 8), 0, idd_cu_stream>>>(dp, sp, X, Y, nd == 3 ? d[1].stride[0] : 0,
                                                                         d[1].stride[xd], nd == 3 ? d[0].stride[0] : 0,
                                                                         d[0].stride[ys]);
            return;
        }
    }
    if (cu_desc32_make(2, d, n, &d32)) {
        k_copy_t32<D, S><<<nb, 256, 0, idd_cu_stream>>>(dp, sp, d32, (int)n);
        return;
    }
    if (sizeof(D) == 4 && sizeof(S) == 4)
        k_copy_f32<<<nb, 256, 0, idd_cu_stream>>>((float *)dst, d[0], (const float *)src, d[1], n);
    else
        k_copy_any<<<nb, 256, 0, idd_cu_stream>>>(dst, sizeof(D) == 2 ? IDD_BF16 : IDD_F32, d[0], src,
                                                  sizeof(S) == 2 ? IDD_BF16 : IDD_F32, d[1], n);
}

static bool f32_or_bf16(idd_dtype dt) { return dt == IDD_F32 || dt == IDD_BF16; }

extern "C" idd_status cu_copy(idd_tensor *dst, const idd_tensor *src) {
    CU_PROF("copy");
    int64_t n = idd_numel(dst);
    if (n == 0) return IDD_OK;
    if (dst->dtype == src->dtype && idd_is_contiguous(dst) && idd_is_contiguous(src)) {
        CU_TRY(cudaMemcpyAsync(idd_data(dst), idd_data(src), (size_t)n * idd_dtype_size(dst->dtype),
                               cudaMemcpyDeviceToDevice, idd_cu_stream), "copy");
        return IDD_OK;
    }
    const idd_tensor *ts[2] = {dst, src};
    cu_desc d[2];
    cu_coalesce_sorted(2, ts, d);
    if (dst->dtype == src->dtype && d[0].ndim == 1 && d[0].stride[0] == 1 && d[1].stride[0] == 1) {
        /* one dense run in both (channels-last to channels-last) */
        CU_TRY(cudaMemcpyAsync(idd_data(dst), idd_data(src), (size_t)n * idd_dtype_size(dst->dtype),
                               cudaMemcpyDeviceToDevice, idd_cu_stream), "copy");
        return IDD_OK;
    }
    if (f32_or_bf16(dst->dtype) && f32_or_bf16(src->dtype)) {
        bool db = dst->dtype == IDD_BF16, sbf = src->dtype == IDD_BF16;
        if (db && sbf) copy_typed<uint16_t, uint16_t>(idd_data(dst), idd_data(src), d, n);
        else if (db) copy_typed<uint16_t, float>(idd_data(dst), idd_data(src), d, n);
        else if (sbf) copy_typed<float, uint16_t>(idd_data(dst), idd_data(src), d, n);
        else copy_typed<float, float>(idd_data(dst), idd_data(src), d, n);
    } else {
        unsigned nb = cu_blocks(n, 256);
        if (nb > 65536) nb = 65536;
        k_copy_any<<<nb, 256, 0, idd_cu_stream>>>(idd_data(dst), dst->dtype, d[0], idd_data(src), src->dtype, d[1], n);
    }
    char sb[96];
    CU_CHECK_LAUNCH("copy", "%s", idd_shape_str(dst, sb, 96));
    return IDD_OK;
}

__global__ void k_fill_f32(float *p, float v, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = v;
}
__global__ void k_fill_any(void *p, int dt, cu_desc d, double v, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        cu_store(p, dt, cu_offset(d, i), v);
}

extern "C" idd_status cu_fill(idd_tensor *t, double v) {
    CU_PROF("fill");
    int64_t n = idd_numel(t);
    if (n == 0) return IDD_OK;
    unsigned nb = cu_blocks(n, 256);
    if (nb > 65536) nb = 65536;
    if (v == 0.0 && (idd_is_contiguous(t) || idd_is_channels_last(t))) {   /* dense: all bytes */
        CU_TRY(cudaMemsetAsync(idd_data(t), 0, (size_t)n * idd_dtype_size(t->dtype), idd_cu_stream), "fill");
        return IDD_OK;
    }
    if (t->dtype == IDD_F32 && idd_is_contiguous(t)) {
        k_fill_f32<<<nb, 256, 0, idd_cu_stream>>>((float *)idd_data(t), (float)v, n);
    } else {
        const idd_tensor *ts[1] = {t};
        cu_desc d[1];
        cu_coalesce_sorted(1, ts, d);
        k_fill_any<<<nb, 256, 0, idd_cu_stream>>>(idd_data(t), t->dtype, d[0], v, n);
    }
    char sb[96];
    CU_CHECK_LAUNCH("fill", "%s", idd_shape_str(t, sb, 96));
    return IDD_OK;
}

