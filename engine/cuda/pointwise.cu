/* pointwise.cu — binary (with broadcast views: stride-0 inputs), unary, clamp and
 * affine on the device. Operands are coalesced on the host after ordering the dims by
 * the output's strides (cu_coalesce_sorted), so most calls index 1 to 3 dims and
 * operands sharing one dense layout (contiguous, or channels-last) are one flat run.
 * float32 contiguous operands take a fast path (float4 when aligned). Any mix of
 * float32 and bfloat16 operands and output has typed kernels: a flat one (8 elements
 * per thread, 16-byte accesses: 8 bf16 per load; a stride-0 operand is one value) and
 * a 32-bit index walk (cu_desc32); other dtypes go through double. bf16 is loaded to
 * float and stored rounded to nearest even. + - * / are computed in float (the
 * correctly rounded result, as the CPU's double math rounded to float), the rest in
 * double and rounded, as the CPU backend does: bf16 results match it bit for bit for
 * + - * /, and to an ulp of float before the bf16 rounding elsewhere. */
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

/* float32 / bfloat16 operands in any mix ------------------------------------------ */

/* flat: every operand one stride-1 run (sa/sb: 1) or one value (0); 8 elements a thread */
template <typename O, typename A, typename B>
__global__ void k_bin_flat(int op, O *o, const A *a, int sa, const B *b, int sb, int64_t n, bool vec) {
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c * 8 < n; c += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = c * 8;
        float x[8], y[8];
        if (vec && i + 8 <= n) {
            if (sa) cu_ld8(a + i, x); else for (int k = 0; k < 8; k++) x[k] = cu_ld(a, 0);
            if (sb) cu_ld8(b + i, y); else for (int k = 0; k < 8; k++) y[k] = cu_ld(b, 0);
            for (int k = 0; k < 8; k++) x[k] = bin_f32(op, x[k], y[k]);
            cu_st8(o + i, x);
        } else {
            for (int64_t j = i; j < n && j < i + 8; j++)
                cu_st(o, j, bin_f32(op, cu_ld(a, sa ? j : 0), cu_ld(b, sb ? j : 0)));
        }
    }
}

/* the 8-wide walk (cu_vec8_ok): sa/sb 1 for a run, 0 for a value broadcast along it */
template <typename O, typename A, typename B>
__global__ void k_bin_vec8(int op, O *o, const A *a, int sa, const B *b, int sb, cu_desc32 d, int n8) {
    for (unsigned q = blockIdx.x * blockDim.x + threadIdx.x; q < (unsigned)n8; q += gridDim.x * blockDim.x) {
        int off[3];
        cu_offsets32<3>(d, q * 8, off);
        float x[8], y[8];
        if (sa) cu_ld8(a + off[1], x); else for (int k = 0; k < 8; k++) x[k] = cu_ld(a, off[1]);
        if (sb) cu_ld8(b + off[2], y); else for (int k = 0; k < 8; k++) y[k] = cu_ld(b, off[2]);
        for (int k = 0; k < 8; k++) x[k] = bin_f32(op, x[k], y[k]);
        cu_st8(o + off[0], x);
    }
}

template <typename O, typename A, typename B>
__global__ void k_bin_t32(int op, O *o, const A *a, const B *b, cu_desc32 d, int n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)n; i += gridDim.x * blockDim.x) {
        int off[3];
        cu_offsets32<3>(d, i, off);
        cu_st(o, off[0], bin_f32(op, cu_ld(a, off[1]), cu_ld(b, off[2])));
    }
}

/* a coalesced operand that is one stride-1 run (1), one value (0), or neither (-1) */
static int flat_stride(const cu_desc &d) {
    if (d.ndim == 0) return 0;
    if (d.ndim == 1 && (d.stride[0] == 1 || d.stride[0] == 0)) return (int)d.stride[0];
    return -1;
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* true when launched (float32 / bfloat16 operands and a flat or 32-bit walk) */
template <typename O, typename A, typename B>
static bool bin_typed(int op, void *o, const void *a, const void *b, const cu_desc *d, int64_t n) {
    int so = flat_stride(d[0]), sa = flat_stride(d[1]), sb = flat_stride(d[2]);
    if (so == 1 || (so == 0 && n == 1)) {
        if (sa >= 0 && sb >= 0) {
            bool vec = aligned16(o) && (!sa || aligned16(a)) && (!sb || aligned16(b));
            unsigned nb = cu_blocks((n + 7) / 8, 256);
            k_bin_flat<O, A, B><<<nb > 65536 ? 65536 : nb, 256, 0, idd_cu_stream>>>(op, (O *)o, (const A *)a, sa,
                                                                                  (const B *)b, sb, n, vec);
            return true;
        }
    }
    cu_desc32 d32;
    if (!cu_desc32_make(3, d, n, &d32)) return false;
    const void *ptrs[3] = {o, a, b};
    size_t es[3] = {sizeof(O), sizeof(A), sizeof(B)};
    int inner[3];
    if (cu_vec8_ok(3, d, ptrs, es, inner)) {
        unsigned nb = cu_blocks(n / 8, 256);
        k_bin_vec8<O, A, B><<<nb > 65536 ? 65536 : nb, 256, 0, idd_cu_stream>>>(op, (O *)o, (const A *)a, inner[1],
                                                                              (const B *)b, inner[2], d32, (int)(n / 8));
        return true;
    }
    k_bin_t32<O, A, B><<<grid_for(n), 256, 0, idd_cu_stream>>>(op, (O *)o, (const A *)a, (const B *)b, d32, (int)n);
    return true;
}

template <typename O, typename A>
static bool bin_pick_b(int bdt, int op, void *o, const void *a, const void *b, const cu_desc *d, int64_t n) {
    return bdt == IDD_BF16 ? bin_typed<O, A, uint16_t>(op, o, a, b, d, n) : bin_typed<O, A, float>(op, o, a, b, d, n);
}
template <typename O>
static bool bin_pick_a(int adt, int bdt, int op, void *o, const void *a, const void *b, const cu_desc *d, int64_t n) {
    return adt == IDD_BF16 ? bin_pick_b<O, uint16_t>(bdt, op, o, a, b, d, n) : bin_pick_b<O, float>(bdt, op, o, a, b, d, n);
}

static bool f32_or_bf16(int dt) { return dt == IDD_F32 || dt == IDD_BF16; }

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
        cu_coalesce_sorted(3, ts, d);
        bool done = false;
        if (f32_or_bf16(out->dtype) && f32_or_bf16(a->dtype) && f32_or_bf16(b->dtype)) {
            void *o = idd_data(out);
            const void *x = idd_data(a), *y = idd_data(b);
            done = out->dtype == IDD_BF16 ? bin_pick_a<uint16_t>(a->dtype, b->dtype, op, o, x, y, d, n)
                                          : bin_pick_a<float>(a->dtype, b->dtype, op, o, x, y, d, n);
        }
        if (done)
            ;   /* launched by bin_typed (flat or 32-bit walk) */
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

/* float32 / bfloat16 in any mix: flat (8 a thread, 16-byte accesses) or a 32-bit walk */
template <typename O, typename A>
__global__ void k_un_flat(int kind, int op, double lo, double hi, O *o, const A *a, int64_t n, bool vec) {
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c * 8 < n; c += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = c * 8;
        if (vec && i + 8 <= n) {
            float x[8];
            cu_ld8(a + i, x);
            for (int k = 0; k < 8; k++) x[k] = (float)un_kind(kind, op, lo, hi, x[k]);
            cu_st8(o + i, x);
        } else {
            for (int64_t j = i; j < n && j < i + 8; j++) cu_st(o, j, (float)un_kind(kind, op, lo, hi, cu_ld(a, j)));
        }
    }
}

template <typename O, typename A>
__global__ void k_un_t32(int kind, int op, double lo, double hi, O *o, const A *a, cu_desc32 d, int n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)n; i += gridDim.x * blockDim.x) {
        int off[2];
        cu_offsets32<2>(d, i, off);
        cu_st(o, off[0], (float)un_kind(kind, op, lo, hi, cu_ld(a, off[1])));
    }
}

template <typename O, typename A>
static bool un_typed(int kind, int op, double lo, double hi, void *o, const void *a, const cu_desc *d, int64_t n) {
    if ((d[0].ndim == 0 && n == 1) || (d[0].ndim == 1 && d[0].stride[0] == 1 && d[1].stride[0] == 1)) {
        bool vec = aligned16(o) && aligned16(a);
        unsigned nb = cu_blocks((n + 7) / 8, 256);
        k_un_flat<O, A><<<nb > 65536 ? 65536 : nb, 256, 0, idd_cu_stream>>>(kind, op, lo, hi, (O *)o, (const A *)a, n,
                                                                          vec);
        return true;
    }
    cu_desc32 d32;
    if (!cu_desc32_make(2, d, n, &d32)) return false;
    k_un_t32<O, A><<<grid_for(n), 256, 0, idd_cu_stream>>>(kind, op, lo, hi, (O *)o, (const A *)a, d32, (int)n);
    return true;
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
        cu_coalesce_sorted(2, ts, d);
        bool done = false;
        if (f32_or_bf16(out->dtype) && f32_or_bf16(a->dtype)) {
            void *o = idd_data(out);
            const void *x = idd_data(a);
            bool ob = out->dtype == IDD_BF16, ab = a->dtype == IDD_BF16;
            done = ob && ab ? un_typed<uint16_t, uint16_t>(kind, op, lo, hi, o, x, d, n)
                   : ob     ? un_typed<uint16_t, float>(kind, op, lo, hi, o, x, d, n)
                   : ab     ? un_typed<float, uint16_t>(kind, op, lo, hi, o, x, d, n)
                            : un_typed<float, float>(kind, op, lo, hi, o, x, d, n);
        }
        if (!done)
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
