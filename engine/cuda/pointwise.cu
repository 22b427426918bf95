/* pointwise.cu — binary (with broadcast views: stride-0 inputs), unary, clamp and
 * affine on the device. Operands are coalesced on the host (cu_coalesce) so most calls
 * index 1 to 3 dims; float32 contiguous operands take a fast path (float4 when
 * aligned), strided float32 ones a 32-bit index walk when their offsets fit (cu_desc32). Math is
 * done in double and rounded, as the CPU backend does, so results match it exactly for
 * + - * / and to an ulp for the transcendental functions. */
#include "cuda_common.cuh"

__device__ __forceinline__ double bin_apply(int op, double a, double b) {
    switch (op) {
    case IDD_BIN_ADD: return a + b;
    case IDD_BIN_SUB: return a - b;
    case IDD_BIN_MUL: return a * b;
    case IDD_BIN_DIV: return a / b;
    case IDD_BIN_POW: return pow(a, b);
    case IDD_BIN_MAX: return a > b || isnan(a) ? a : b;
    case IDD_BIN_MIN: return a < b || isnan(a) ? a : b;
    case IDD_BIN_GT: return a > b;
    case IDD_BIN_LT: return a < b;
    case IDD_BIN_GE: return a >= b;
    case IDD_BIN_LE: return a <= b;
    case IDD_BIN_EQ: return a == b;
    case IDD_BIN_NE: return a != b;
    default: return nan("");
    }
}

__device__ __forceinline__ double un_apply(int op, double x) {
    switch (op) {
    case IDD_UN_NEG: return -x;
    case IDD_UN_EXP: return exp(x);
    case IDD_UN_LOG: return log(x);
    case IDD_UN_SQRT: return sqrt(x);
    case IDD_UN_RSQRT: return 1.0 / sqrt(x);
    case IDD_UN_TANH: return tanh(x);
    case IDD_UN_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case IDD_UN_SILU: return x / (1.0 + exp(-x));
    case IDD_UN_ABS: return fabs(x);
    case IDD_UN_SQUARE: return x * x;
    case IDD_UN_SIN: return sin(x);
    case IDD_UN_COS: return cos(x);
    case IDD_UN_RECIP: return 1.0 / x;
    case IDD_UN_FLOOR: return floor(x);
    case IDD_UN_SIGN: return (x > 0) - (x < 0);
    default: return nan("");
    }
}

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static unsigned grid_for(int64_t n) {
    unsigned nb = cu_blocks(n, 256);
    return nb > 65536 ? 65536 : nb;
}

// ---------------------------------------------------------------- binary

template <int OP>
__global__ void k_bin_f32_contig(float *o, const float *a, const float *b, int64_t n) {
    GRID_STRIDE(i, n) {
        float x = a[i], y = b[i];
        o[i] = OP == IDD_BIN_ADD ? x + y : OP == IDD_BIN_SUB ? x - y : OP == IDD_BIN_MUL ? x * y : x / y;
    }
}

/* the same four float at a time (operands 16-byte aligned; n4 = n / 4, the tail of
 * n % 4 elements is left to k_bin_f32_contig): a quarter of the load/store instructions */
template <int OP>
__global__ void k_bin_f32_vec4(float4 *o, const float4 *a, const float4 *b, int64_t n4) {
    GRID_STRIDE(i, n4) {
        float4 x = a[i], y = b[i], r;
        r.x = OP == IDD_BIN_ADD ? x.x + y.x : OP == IDD_BIN_SUB ? x.x - y.x : OP == IDD_BIN_MUL ? x.x * y.x : x.x / y.x;
        r.y = OP == IDD_BIN_ADD ? x.y + y.y : OP == IDD_BIN_SUB ? x.y - y.y : OP == IDD_BIN_MUL ? x.y * y.y : x.y / y.y;
        r.z = OP == IDD_BIN_ADD ? x.z + y.z : OP == IDD_BIN_SUB ? x.z - y.z : OP == IDD_BIN_MUL ? x.z * y.z : x.z / y.z;
        r.w = OP == IDD_BIN_ADD ? x.w + y.w : OP == IDD_BIN_SUB ? x.w - y.w : OP == IDD_BIN_MUL ? x.w * y.w : x.w / y.w;
        o[i] = r;
    }
}

/* o = a OP b over n contiguous floats: float4 for the aligned bulk, then the tail */
template <int OP> static void bin_contig(float *o, const float *a, const float *b, int64_t n) {
    int64_t n4 = 0;
    if ((((uintptr_t)o | (uintptr_t)a | (uintptr_t)b) & 15) == 0) {
        n4 = n / 4;
        if (n4) k_bin_f32_vec4<OP><<<grid_for(n4), 256, 0, idd_cu_stream>>>((float4 *)o, (const float4 *)a,
                                                                          (const float4 *)b, n4);
    }
    int64_t done = 4 * n4;
    if (done < n)
        k_bin_f32_contig<OP><<<grid_for(n - done), 256, 0, idd_cu_stream>>>(o + done, a + done, b + done, n - done);
}

/* one float32 binary op: the four arithmetic ones in float, the rest through bin_apply */
__device__ __forceinline__ float bin_f32(int op, float x, float y) {
    switch (op) {
    case IDD_BIN_ADD: return x + y;
    case IDD_BIN_SUB: return x - y;
    case IDD_BIN_MUL: return x * y;
    case IDD_BIN_DIV: return x / y;
    default: return (float)bin_apply(op, x, y);
    }
}

__global__ void k_bin_f32(int op, float *o, cu_desc od, const float *a, cu_desc ad, const float *b, cu_desc bd,
                          int64_t n) {
    GRID_STRIDE(i, n) {
        o[cu_offset(od, i)] = bin_f32(op, a[cu_offset(ad, i)], b[cu_offset(bd, i)]);
    }
}

/* the same with 32-bit indices (cu_desc32: count and offsets fit in int32) */
__global__ void k_bin_f32_32(int op, float *o, const float *a, const float *b, cu_desc32 d, int n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)n; i += gridDim.x * blockDim.x) {
        int off[3];
        cu_offsets32<3>(d, i, off);
        o[off[0]] = bin_f32(op, a[off[1]], b[off[2]]);
    }
}

__global__ void k_bin_any(int op, void *o, int odt, cu_desc od, const void *a, int adt, cu_desc ad, const void *b,
                          int bdt, cu_desc bd, int64_t n) {
    GRID_STRIDE(i, n) {
        double x = cu_load(a, adt, cu_offset(ad, i)), y = cu_load(b, bdt, cu_offset(bd, i));
        cu_store(o, odt, cu_offset(od, i), bin_apply(op, x, y));
    }
}

extern "C" idd_status cu_binary(idd_binop op, idd_tensor *out, const idd_tensor *a, const idd_tensor *b) {
    CU_PROF("binary");
    int64_t n = idd_numel(out);
    if (n == 0) return IDD_OK;
    unsigned nb = grid_for(n);
    bool f32 = out->dtype == IDD_F32 && a->dtype == IDD_F32 && b->dtype == IDD_F32;
    if (f32 && op <= IDD_BIN_DIV && idd_is_contiguous(out) && idd_is_contiguous(a) && idd_is_contiguous(b)) {
        float *o = (float *)idd_data(out);
        const float *x = (const float *)idd_data(a), *y = (const float *)idd_data(b);
        switch (op) {
        case IDD_BIN_ADD: bin_contig<IDD_BIN_ADD>(o, x, y, n); break;
        case IDD_BIN_SUB: bin_contig<IDD_BIN_SUB>(o, x, y, n); break;
        case IDD_BIN_MUL: bin_contig<IDD_BIN_MUL>(o, x, y, n); break;
        default: bin_contig<IDD_BIN_DIV>(o, x, y, n); break;
        }
    } else {
        const idd_tensor *ts[3] = {out, a, b};
        cu_desc d[3];
        cu_coalesce(3, ts, d);
        cu_desc32 d32;
        if (f32 && cu_desc32_make(3, d, n, &d32))
            k_bin_f32_32<<<nb, 256, 0, idd_cu_stream>>>(op, (float *)idd_data(out), (const float *)idd_data(a),
                                                        (const float *)idd_data(b), d32, (int)n);
        else if (f32)
            k_bin_f32<<<nb, 256, 0, idd_cu_stream>>>(op, (float *)idd_data(out), d[0], (const float *)idd_data(a), d[1],
                                                     (const float *)idd_data(b), d[2], n);
        else
            k_bin_any<<<nb, 256, 0, idd_cu_stream>>>(op, idd_data(out), out->dtype, d[0], idd_data(a), a->dtype, d[1],
                                                     idd_data(b), b->dtype, d[2], n);
    }
    char sb[96];
    CU_CHECK_LAUNCH("binary", "op %d out %s", (int)op, idd_shape_str(out, sb, 96));
    return IDD_OK;
}

// ---------------------------------------------------------------- unary, clamp, affine

/* kind 0: unary op; 1: clamp(lo, hi); 2: x*lo + hi */
__device__ __forceinline__ double un_kind(int kind, int op, double lo, double hi, double x) {
    if (kind == 0) return un_apply(op, x);
    if (kind == 1) return x < lo ? lo : x > hi ? hi : x;
    return x * lo + hi;
}

__global__ void k_un_f32_contig(int kind, int op, double lo, double hi, float *o, const float *a, int64_t n) {
    GRID_STRIDE(i, n) o[i] = (float)un_kind(kind, op, lo, hi, a[i]);
}

__global__ void k_un_any(int kind, int op, double lo, double hi, void *o, int odt, cu_desc od, const void *a, int adt,
                         cu_desc ad, int64_t n) {
    GRID_STRIDE(i, n) cu_store(o, odt, cu_offset(od, i), un_kind(kind, op, lo, hi, cu_load(a, adt, cu_offset(ad, i))));
}

static idd_status un_common(int kind, int op, double lo, double hi, idd_tensor *out, const idd_tensor *a,
                            const char *name) {
    int64_t n = idd_numel(out);
    if (n == 0) return IDD_OK;
    unsigned nb = grid_for(n);
    if (out->dtype == IDD_F32 && a->dtype == IDD_F32 && idd_is_contiguous(out) && idd_is_contiguous(a)) {
        k_un_f32_contig<<<nb, 256, 0, idd_cu_stream>>>(kind, op, lo, hi, (float *)idd_data(out),
                                                       (const float *)idd_data(a), n);
    } else {
        const idd_tensor *ts[2] = {out, a};
        cu_desc d[2];
        cu_coalesce(2, ts, d);
        k_un_any<<<nb, 256, 0, idd_cu_stream>>>(kind, op, lo, hi, idd_data(out), out->dtype, d[0], idd_data(a),
                                                a->dtype, d[1], n);
    }
    char sb[96];
    CU_CHECK_LAUNCH(name, "out %s", idd_shape_str(out, sb, 96));
    return IDD_OK;
}

extern "C" idd_status cu_unary(idd_unop op, idd_tensor *out, const idd_tensor *a) {
    CU_PROF("unary");
    return un_common(0, op, 0, 0, out, a, "unary");
}
extern "C" idd_status cu_clamp(idd_tensor *out, const idd_tensor *a, double lo, double hi) {
    CU_PROF("clamp");
    return un_common(1, 0, lo, hi, out, a, "clamp");
}
extern "C" idd_status cu_affine(idd_tensor *out, const idd_tensor *a, double s, double b) {
    CU_PROF("affine");
    return un_common(2, 0, s, b, out, a, "affine");
}
