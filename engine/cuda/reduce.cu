/* reduce.cu — sum / max / min (with argmax-style index) / logsumexp over one dim.
 * a is seen as (outer, R, inner) around dim, with any strides; out is contiguous (it
 * has a's shape with size 1 at dim), out index = o*inner + in. Accumulation in double,
 * ties and NaNs resolved as on the CPU (first best index; the first NaN wins).
 * Two schedules: one thread per output when there are many outputs (coalesced reads
 * when inner > 1), one block per output when R is long and outputs few. */
#include "cuda_common.cuh"

struct red_geom {
    int64_t outer_shape[IDD_MAX_DIMS], outer_stride[IDD_MAX_DIMS];   /* dims before dim, then after dim */
    int nouter;        /* dims in outer_shape (before and after dim together) */
    int64_t R, rs;     /* reduced length and its stride */
};

__device__ __forceinline__ int64_t red_base(const red_geom &g, int64_t oi) {
    int64_t off = 0;
    for (int k = g.nouter - 1; k >= 0; k--) {
        off += (oi % g.outer_shape[k]) * g.outer_stride[k];
        oi /= g.outer_shape[k];
    }
    return off;
}

/* "v at r is better than best at arg" with the CPU's rules (scan order, strict, NaN first) */
__device__ __forceinline__ bool red_better(int op, double v, int64_t r, double best, int64_t arg) {
    if (isnan(best)) return isnan(v) && r < arg;
    if (isnan(v)) return true;
    if (op == IDD_RED_MIN) return v < best || (v == best && r < arg);
    return v > best || (v == best && r < arg);
}

__global__ void k_reduce_thread(int op, void *out, int odt, int64_t *idx, const void *a, int adt, red_geom g,
                                int64_t total) {
    for (int64_t oi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; oi < total; oi += (int64_t)gridDim.x * blockDim.x) {
        int64_t base = red_base(g, oi);
        double acc = 0, best = 0;
        int64_t arg = 0;
        if (op == IDD_RED_SUM) {
            for (int64_t r = 0; r < g.R; r++) acc += cu_load(a, adt, base + r * g.rs);
        } else {
            best = g.R ? cu_load(a, adt, base) : (op == IDD_RED_LOGSUMEXP ? -INFINITY : nan(""));
            for (int64_t r = 1; r < g.R; r++) {
                double v = cu_load(a, adt, base + r * g.rs);
                bool better = op == IDD_RED_MIN ? v < best : v > best;
                if (better || isnan(v)) { best = v; arg = r; if (isnan(v)) break; }
            }
            acc = best;
            if (op == IDD_RED_LOGSUMEXP && isfinite(best)) {
                double s = 0;
                for (int64_t r = 0; r < g.R; r++) s += exp(cu_load(a, adt, base + r * g.rs) - best);
                acc = best + log(s);
            }
        }
        cu_store(out, odt, oi, acc);
        if (idx) idx[oi] = arg;
    }
}

#define RB 256
__global__ void k_reduce_block(int op, void *out, int odt, int64_t *idx, const void *a, int adt, red_geom g) {
    __shared__ double sv[RB];
    __shared__ int64_t si[RB];
    int64_t oi = blockIdx.x;
    int64_t base = red_base(g, oi);
    int tid = threadIdx.x;
    double acc;
    int64_t arg = INT64_MAX;
    if (op == IDD_RED_SUM) {
        acc = 0;
        for (int64_t r = tid; r < g.R; r += RB) acc += cu_load(a, adt, base + r * g.rs);
    } else {
        acc = 0;
        bool have = false;
        for (int64_t r = tid; r < g.R; r += RB) {
            double v = cu_load(a, adt, base + r * g.rs);
            if (!have || red_better(op == IDD_RED_LOGSUMEXP ? IDD_RED_MAX : op, v, r, acc, arg)) { acc = v; arg = r; have = true; }
        }
        if (!have) { acc = op == IDD_RED_MIN ? INFINITY : -INFINITY; arg = INT64_MAX; }
    }
    sv[tid] = acc;
    si[tid] = arg;
    __syncthreads();
    for (int s = RB / 2; s > 0; s >>= 1) {
        if (tid < s) {
            if (op == IDD_RED_SUM) sv[tid] += sv[tid + s];
            else if (si[tid + s] != INT64_MAX &&
                     (si[tid] == INT64_MAX ||
                      red_better(op == IDD_RED_LOGSUMEXP ? IDD_RED_MAX : op, sv[tid + s], si[tid + s], sv[tid], si[tid]))) {
                sv[tid] = sv[tid + s];
                si[tid] = si[tid + s];
            }
        }
        __syncthreads();
    }
    double best = sv[0];
    int64_t barg = si[0];
    __syncthreads();
    if (op == IDD_RED_LOGSUMEXP && isfinite(best)) {
        double s = 0;
        for (int64_t r = tid; r < g.R; r += RB) s += exp(cu_load(a, adt, base + r * g.rs) - best);
        sv[tid] = s;
        __syncthreads();
        for (int k = RB / 2; k > 0; k >>= 1) {
            if (tid < k) sv[tid] += sv[tid + k];
            __syncthreads();
        }
        if (tid == 0) best = best + log(sv[0]);
    }
    if (tid == 0) {
        cu_store(out, odt, oi, best);
        if (idx) idx[oi] = barg == INT64_MAX ? 0 : barg;
    }
}

extern "C" idd_status cu_reduce(idd_redop op, idd_tensor *out, idd_tensor *idx, const idd_tensor *a, int dim) {
    CU_PROF("reduce");
    red_geom g;
    g.nouter = 0;
    int64_t total = 1;
    for (int d = 0; d < a->ndim; d++) {
        if (d == dim) continue;
        g.outer_shape[g.nouter] = a->shape[d];
        g.outer_stride[g.nouter] = a->stride[d];
        g.nouter++;
        total *= a->shape[d];
    }
    g.R = a->ndim ? a->shape[dim] : 1;
    g.rs = a->ndim ? a->stride[dim] : 0;
    if (total == 0) return IDD_OK;
    /* out (and idx) are fresh contiguous tensors: element oi at data + oi */
    int64_t *ip = idx ? (int64_t *)idd_data(idx) : NULL;
    if (g.R >= 1024 && total < 4096) {
        k_reduce_block<<<(unsigned)total, RB, 0, idd_cu_stream>>>(op, idd_data(out), out->dtype, ip, idd_data(a), a->dtype,
                                                                 g);
    } else {
        unsigned nb = cu_blocks(total, 128);
        if (nb > 65536) nb = 65536;
        k_reduce_thread<<<nb, 128, 0, idd_cu_stream>>>(op, idd_data(out), out->dtype, ip, idd_data(a), a->dtype, g,
                                                       total);
    }
    char sb[96];
    CU_CHECK_LAUNCH("reduce", "op %d dim %d of %s", (int)op, dim, idd_shape_str(a, sb, 96));
    return IDD_OK;
}
