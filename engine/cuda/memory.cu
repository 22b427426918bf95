/* memory.cu — the CUDA backend's memory (caching allocator, scratch slots, graph pools),
 * host <-> device transfers, the per-op profile, and its registration (copies and fills:
 * copy.cu).
 *
 * Memory comes from a caching allocator: sizes are rounded up to a size class (16 per
 * power of two, so at most 1/16 is wasted) and freed blocks wait on a free list of
 * their class, so a training step that allocates the same tensors every iteration
 * stops calling cudaMalloc after the first. Every kernel runs on one stream, so a block
 * freed while kernels that use it are still queued can be handed out again at once:
 * its next user is ordered after them. On cudaMalloc failure the free lists are given
 * back and the allocation retried once.
 * When a class's list is empty, a cached block of a larger class up to BESTFIT_NUM /
 * BESTFIT_DEN of the request is reused before cudaMalloc is called (the smallest such
 * block): the forward and backward passes of a step allocate different size mixes, and
 * without this reuse the cache keeps the peak of each class separately. It is off with
 * IDDPM_CUDA_BESTFIT=0. Peaks of the bytes in use and reserved (in use + cached) are
 * tracked for the benchmark (idd_cuda_memory_peak).
 * CUDA graphs (graph.cu): while a capture runs, the blocks it allocates or frees are
 * "held" by it; see the section "graph pools" below. */
#include "cuda_common.cuh"

#include <stdio.h>
#include <stdlib.h>

#include <map>
#include <mutex>
#include <string.h>
#include <time.h>
#include <unordered_map>
#include <unordered_set>
#include <vector>

extern "C" {
#include "iddpm/cuda.h"
}

cudaStream_t idd_cu_stream;
cublasHandle_t idd_cu_blas;
static char device_name[320];

// ---------------------------------------------------------------- caching allocator

static std::mutex mem_lock;
static std::map<size_t, std::vector<void *>> free_lists;
static std::unordered_map<void *, size_t> block_size;
static size_t bytes_in_use, bytes_cached, peak_in_use, peak_reserved;
static int bestfit = -1;   /* -1: read IDDPM_CUDA_BESTFIT on first use */
#define BESTFIT_NUM 5      /* reuse a cached block of at most 5/4 of the request */
#define BESTFIT_DEN 4

static void note_peaks_locked(void) {
    if (bytes_in_use > peak_in_use) peak_in_use = bytes_in_use;
    if (bytes_in_use + bytes_cached > peak_reserved) peak_reserved = bytes_in_use + bytes_cached;
}

static size_t size_class(size_t n) {
    if (n <= 512) return 512;
    int k = 63 - __builtin_clzll((unsigned long long)n);   /* 2^k <= n < 2^(k+1) */
    size_t step = (size_t)1 << (k >= 4 ? k - 4 : 0);
    return (n + step - 1) / step * step;
}

static void release_cached_locked(void) {
    for (auto &kv : free_lists)
        for (void *p : kv.second) {
            cudaFree(p);
            block_size.erase(p);
            bytes_cached -= kv.first;   /* blocks held by graphs stay cached (graph pools below) */
        }
    free_lists.clear();
}

// ---------------------------------------------------------------- graph pools (CUDA graphs)
/* A captured graph replays with the addresses it was captured with, so every block a
 * capture touches through the allocator belongs to the graph until the graph is
 * destroyed: each block allocated during the capture, and each block freed during it
 * (also one allocated before: the capture may have read it). Such a block is "held"
 * (hold_count = number of live graphs, or the capture, holding it). A held block that
 * is freed goes to the capture's private free lists while the capture runs (reused only
 * inside it: the captured kernels are one stream-ordered chain) and, after the capture,
 * into held_free: no tensor and no other capture gets it. When the last graph holding
 * it goes (cu_pool_release) it returns to the shared free lists. Scratch slots handed
 * out during a capture are held the same way (a later grow frees the old block). */
static bool pool_active;                                  /* a capture is running */
static std::map<size_t, std::vector<void *>> pool_free;   /* freed during the capture */
static std::unordered_set<void *> pool_blocks;            /* held by the running capture */
static std::unordered_map<void *, int> hold_count;
static std::unordered_map<void *, bool> held_free;        /* held, no tensor uses it */

static void pool_hold_locked(void *p) {
    if (!pool_active || !p) return;
    if (pool_blocks.insert(p).second) hold_count[p]++;   /* a capture holds a block once */
}

/* the smallest block of class sz, or of a class up to 5/4 of it (bestfit), from lists;
 * any_size: the smallest of any larger class (a capture's own free blocks: they belong
 * to the graph whatever their use, so a larger one costs nothing) */
static void *take_cached_locked(std::map<size_t, std::vector<void *>> &lists, size_t sz, size_t *got, bool any_size) {
    auto it = lists.find(sz);
    if (it != lists.end() && !it->second.empty()) {
        void *p = it->second.back();
        it->second.pop_back();
        *got = sz;
        return p;
    }
    if (!bestfit && !any_size) return NULL;
    for (auto jt = lists.upper_bound(sz); jt != lists.end() && (any_size || jt->first <= sz / BESTFIT_DEN * BESTFIT_NUM);
         ++jt) {
        if (jt->second.empty()) continue;
        void *p = jt->second.back();
        jt->second.pop_back();
        *got = jt->first;
        return p;
    }
    return NULL;
}

void cu_pool_begin(void) {
    std::lock_guard<std::mutex> g(mem_lock);
    pool_active = true;
    pool_blocks.clear();
    pool_free.clear();
}

/* the capture is over: its free blocks stay reserved for the graph; -> the held blocks */
std::vector<void *> cu_pool_end(void) {
    std::lock_guard<std::mutex> g(mem_lock);
    for (auto &kv : pool_free)
        for (void *p : kv.second) held_free[p] = true;
    pool_free.clear();
    pool_active = false;
    std::vector<void *> out(pool_blocks.begin(), pool_blocks.end());
    pool_blocks.clear();
    return out;
}

/* a graph (or an aborted capture) lets its blocks go */
void cu_pool_release(const std::vector<void *> &blocks) {
    std::lock_guard<std::mutex> g(mem_lock);
    for (void *p : blocks) {
        auto it = hold_count.find(p);
        if (it == hold_count.end() || --it->second > 0) continue;
        hold_count.erase(it);
        auto jt = held_free.find(p);
        if (jt == held_free.end()) continue;   /* a live tensor still uses it: freed as usual later */
        held_free.erase(jt);
        free_lists[block_size[p]].push_back(p);
    }
}

/* bytes of the blocks held by live graphs (and a running capture) */
extern "C" size_t idd_cuda_graph_memory(void) {
    std::lock_guard<std::mutex> g(mem_lock);
    size_t n = 0;
    for (auto &kv : hold_count) n += block_size[kv.first];
    return n;
}

void cu_pool_note_scratch(void *p) {
    std::lock_guard<std::mutex> g(mem_lock);
    pool_hold_locked(p);
}

static void *cu_alloc(size_t n) {
    size_t sz = size_class(n), got = 0;
    std::lock_guard<std::mutex> g(mem_lock);
    if (bestfit < 0) {
        const char *e = getenv("IDDPM_CUDA_BESTFIT");
        bestfit = !(e && *e == '0');
    }
    /* during a capture, the blocks it freed come first, of any larger size (graph pools above) */
    void *p = pool_active ? take_cached_locked(pool_free, sz, &got, true) : NULL;
    if (!p) p = take_cached_locked(free_lists, sz, &got, false);   /* exact class, else best fit up to 5/4 */
    if (p) {
        bytes_cached -= got;
        bytes_in_use += got;
        note_peaks_locked();
        pool_hold_locked(p);
        return p;
    }
    if (cudaMalloc(&p, sz) != cudaSuccess) {
        cudaGetLastError();
        if (pool_active) {   /* no wait and no cudaFree inside a capture */
            idd_error_status(IDD_ENOMEM, "graph_capture: out of memory allocating %zu bytes inside a CUDA graph capture "
                             "(%zu in use)", sz, bytes_in_use);
            return NULL;
        }
        cudaStreamSynchronize(idd_cu_stream);
        release_cached_locked();
        if (cudaMalloc(&p, sz) != cudaSuccess) {
            cudaGetLastError();
            size_t fr = 0, tot = 0;
            cudaMemGetInfo(&fr, &tot);
            idd_error_status(IDD_ENOMEM, "cuda: out of memory allocating %zu bytes (%zu in use, %zu free of %zu)", sz,
                             bytes_in_use, fr, tot);
            return NULL;
        }
    }
    block_size[p] = sz;
    bytes_in_use += sz;
    note_peaks_locked();
    pool_hold_locked(p);
    return p;
}

static void cu_free(void *p) {
    if (!p) return;
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = block_size.find(p);
    if (it == block_size.end()) return;
    size_t sz = it->second;
    bytes_in_use -= sz;
    bytes_cached += sz;
    if (pool_active) {   /* the capture may have used it: the graph keeps it (graph pools above) */
        bool other = hold_count.count(p) && !pool_blocks.count(p);   /* another graph's block: never reused */
        pool_hold_locked(p);
        if (other) held_free[p] = true;
        else pool_free[sz].push_back(p);
    } else if (hold_count.count(p)) {
        held_free[p] = true;
    } else {
        free_lists[sz].push_back(p);
    }
}

extern "C" void idd_cuda_memory(size_t *in_use, size_t *cached) {
    std::lock_guard<std::mutex> g(mem_lock);
    if (in_use) *in_use = bytes_in_use;
    if (cached) *cached = bytes_cached;
}

extern "C" void idd_cuda_memory_peak(size_t *in_use, size_t *reserved, int reset) {
    std::lock_guard<std::mutex> g(mem_lock);
    if (in_use) *in_use = peak_in_use;
    if (reserved) *reserved = peak_reserved;
    if (reset) {
        peak_in_use = bytes_in_use;
        peak_reserved = bytes_in_use + bytes_cached;
    }
}

extern "C" void idd_cuda_empty_cache(void) {
    if (idd_cuda_capturing()) return;   /* no wait inside a capture; nothing to do then */
    cudaStreamSynchronize(idd_cu_stream);
    std::lock_guard<std::mutex> g(mem_lock);
    release_cached_locked();
}

// ---------------------------------------------------------------- scratch

#define N_SCRATCH 13
static void *scratch_ptr[N_SCRATCH];
static size_t scratch_cap[N_SCRATCH];

void *cu_scratch(int slot, size_t nbytes, const char *op) {
    if (slot < 0 || slot >= N_SCRATCH) { idd_error("cuda %s: bad scratch slot %d", op, slot); return NULL; }
    if (scratch_ptr[slot] && scratch_cap[slot] >= nbytes) {
        if (idd_cuda_capturing()) cu_pool_note_scratch(scratch_ptr[slot]);   /* the graph keeps it */
        return scratch_ptr[slot];
    }
    if (scratch_ptr[slot]) cu_free(scratch_ptr[slot]);
    size_t want = nbytes + nbytes / 4;
    scratch_ptr[slot] = cu_alloc(want);
    scratch_cap[slot] = scratch_ptr[slot] ? size_class(want) : 0;
    if (!scratch_ptr[slot]) idd_error_prefix(op);
    return scratch_ptr[slot];
}

// ---------------------------------------------------------------- profile (IDDPM_CUDA_PROFILE=1)

#define N_PROF 48
static bool prof_on;
static const char *prof_name[N_PROF];
static double prof_ms[N_PROF];
static long prof_calls[N_PROF];
static int prof_n;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

cu_prof_scope::cu_prof_scope(const char *name) : slot(-1), t0(0) {
    if (!prof_on || idd_cuda_capturing()) return;   /* no waits inside a CUDA graph capture */
    for (slot = 0; slot < prof_n && strcmp(prof_name[slot], name); slot++) {}
    if (slot == prof_n) {
        if (prof_n == N_PROF) { slot = -1; return; }
        prof_name[prof_n++] = name;
    }
    cudaStreamSynchronize(idd_cu_stream);
    t0 = now_ms();
}

cu_prof_scope::~cu_prof_scope() {
    if (slot < 0) return;
    cudaStreamSynchronize(idd_cu_stream);
    prof_ms[slot] += now_ms() - t0;
    prof_calls[slot]++;
}

extern "C" void idd_cuda_profile_reset(void) {
    for (int i = 0; i < prof_n; i++) prof_ms[i] = 0, prof_calls[i] = 0;
}

static void prof_report(void) {
    double total = 0;
    int order[N_PROF];
    for (int i = 0; i < prof_n; i++) total += prof_ms[i], order[i] = i;
    for (int i = 1; i < prof_n; i++)   /* insertion sort, largest total first */
        for (int j = i; j > 0 && prof_ms[order[j]] > prof_ms[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    fprintf(stderr, "# cuda profile (stream waits around each op; %s):\n", idd_cuda_precision_name(idd_cu_precision));
    for (int k = 0; k < prof_n; k++) {
        int i = order[k];
        fprintf(stderr, "#   %-24s %8ld calls %10.1f ms %6.3f ms/call %5.1f%%\n", prof_name[i], prof_calls[i], prof_ms[i],
                prof_ms[i] / (double)(prof_calls[i] ? prof_calls[i] : 1), total > 0 ? 100 * prof_ms[i] / total : 0.0);
    }
    fprintf(stderr, "#   %-24s %8s       %10.1f ms\n", "total", "", total);
}

// ---------------------------------------------------------------- host <-> device

static idd_status cu_upload(void *dst, const void *src, size_t n) {
    if (idd_cuda_capturing())
        return idd_cuda_capture_refuse("upload", "it copies from pageable host memory and waits for the GPU");
    CU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, idd_cu_stream), "upload");
    CU_TRY(cudaStreamSynchronize(idd_cu_stream), "upload");
    return IDD_OK;
}

static idd_status cu_download(void *dst, const void *src, size_t n) {
    if (idd_cuda_capturing())
        return idd_cuda_capture_refuse("download", "it copies to the host and waits for the GPU (a host sync)");
    CU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, idd_cu_stream), "download");
    CU_TRY(cudaStreamSynchronize(idd_cu_stream), "download");
    return IDD_OK;
}

extern "C" idd_status idd_cuda_synchronize(void) {
    if (idd_cuda_capturing()) return idd_cuda_capture_refuse("synchronize", "it waits for the GPU (a host sync)");
    CU_TRY(cudaStreamSynchronize(idd_cu_stream), "synchronize");
    return IDD_OK;
}

// ---------------------------------------------------------------- registration

int idd_cu_precision = IDD_PREC_FP32;
int idd_cu_conv_impl = IDD_CONV_CUDNN;
extern "C" void idd_cuda_set_precision(int p) {
    if (p < IDD_PREC_FP32 || p > IDD_PREC_BF16) return;
    idd_cu_precision = p;
    /* cuBLAS calls name their compute type (cu_sgemm); the handle's own mode is the fp32 default */
    if (idd_cu_blas) cublasSetMathMode(idd_cu_blas, CUBLAS_DEFAULT_MATH);
}
extern "C" int idd_cuda_precision(void) { return idd_cu_precision; }
extern "C" void idd_cuda_set_tf32(int on) { idd_cuda_set_precision(on ? IDD_PREC_TF32 : IDD_PREC_FP32); }
extern "C" void idd_cuda_set_conv_impl(int impl) {
    if (impl == IDD_CONV_CUDNN || impl == IDD_CONV_IM2COL) idd_cu_conv_impl = impl;
}
extern "C" int idd_cuda_conv_impl(void) { return idd_cu_conv_impl; }

extern "C" const char *idd_cuda_device_name(void) { return device_name; }

/* layer families in float32 and, channels-last, in bf16; not: conv2d with pad_h != pad_w and
 * the forward-only evaluation kernels (max/avg pool2d, resize), which the FID network runs on the CPU */
static bool cu_supports(idd_kernel k, idd_dtype dtype) {
    switch (k) {
    case IDD_K_CONV2D: case IDD_K_GROUPNORM: case IDD_K_ATTENTION: case IDD_K_UPSAMPLE2X: case IDD_K_AVGPOOL2X:
    case IDD_K_DROPOUT:
        return dtype == IDD_F32 || dtype == IDD_BF16;
    case IDD_K_TIMESTEP_EMB:
        return dtype == IDD_F32;
    default:
        return false;
    }
}

static const idd_backend cuda_backend = {
    .name = "cuda",
    .supports = cu_supports,
    .alloc = cu_alloc,
    .free = cu_free,
    .copy = cu_copy,
    .upload = cu_upload,
    .download = cu_download,
    .fill = cu_fill,
    .binary = cu_binary,
    .unary = cu_unary,
    .clamp = cu_clamp,
    .affine = cu_affine,
    .reduce = cu_reduce,
    .bmm = cu_bmm,
    .rand_normal = cu_rand_normal,
    .rand_uniform = cu_rand_uniform,
    .conv2d_forward = cu_conv2d_forward,
    .conv2d_backward = cu_conv2d_backward,
    .groupnorm_forward = cu_groupnorm_forward,
    .groupnorm_backward = cu_groupnorm_backward,
    .attention_forward = cu_attention_forward,
    .attention_backward = cu_attention_backward,
    .attention_forward_bf16 = cu_attention_forward_bf16,
    .attention_backward_bf16 = cu_attention_backward_bf16,
    .upsample2x_forward = cu_upsample2x_forward,
    .upsample2x_backward = cu_upsample2x_backward,
    .avgpool2x_forward = cu_avgpool2x_forward,
    .avgpool2x_backward = cu_avgpool2x_backward,
    .timestep_embedding = cu_timestep_embedding,
    .dropout_forward = cu_dropout_forward,
    .dropout_backward = cu_dropout_backward,
    .groupnorm_forward_bf16 = cu_groupnorm_forward_bf16,
    .groupnorm_backward_bf16 = cu_groupnorm_backward_bf16,
    .upsample2x_forward_bf16 = cu_upsample2x_forward_bf16,
    .upsample2x_backward_bf16 = cu_upsample2x_backward_bf16,
    .avgpool2x_forward_bf16 = cu_avgpool2x_forward_bf16,
    .avgpool2x_backward_bf16 = cu_avgpool2x_backward_bf16,
    .dropout_forward_bf16 = cu_dropout_forward_bf16,
    .dropout_backward_bf16 = cu_dropout_backward_bf16,
    .conv2d_forward_bf16 = cu_conv2d_forward_bf16,
    .conv2d_backward_bf16 = cu_conv2d_backward_bf16,
    .upload_async = cu_upload_async,
    .diff_pointwise = cu_diff_pointwise,
    .diff_p_finish = cu_diff_p_finish,
    .diff_losses = cu_diff_losses,
    .diff_losses_backward = cu_diff_losses_backward,
    .adamw = cu_adamw,
    .ema = cu_ema,
    .sumsq = cu_sumsq,
    .scale = cu_scale,
};

extern "C" idd_status idd_cuda_init(void) {
    static int state = 0;   /* 0 not tried, 1 registered, -1 unavailable */
    static char why[512];
    if (state == 1) return IDD_OK;
    if (state == -1) return idd_error("%s", why);
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        snprintf(why, sizeof why, "no CUDA device found (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports 0 devices");
        cudaGetLastError();
        state = -1;
        idd_backend_set_unavailable(IDD_CUDA, why);
        return idd_error("%s", why);
    }
    cudaDeviceProp prop;
    if (cudaSetDevice(0) != cudaSuccess || cudaGetDeviceProperties(&prop, 0) != cudaSuccess ||
        cudaStreamCreateWithFlags(&idd_cu_stream, cudaStreamNonBlocking) != cudaSuccess) {
        snprintf(why, sizeof why, "CUDA device 0 could not be opened: %s", cudaGetErrorString(cudaGetLastError()));
        state = -1;
        idd_backend_set_unavailable(IDD_CUDA, why);
        return idd_error("%s", why);
    }
    snprintf(device_name, sizeof device_name, "%s (sm_%d%d, %zu MiB)", prop.name, prop.major, prop.minor,
             (size_t)(prop.totalGlobalMem >> 20));
    cublasStatus_t bs = cublasCreate(&idd_cu_blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        snprintf(why, sizeof why, "cuBLAS could not be initialised (status %d)", (int)bs);
        state = -1;
        idd_backend_set_unavailable(IDD_CUDA, why);
        return idd_error("%s", why);
    }
    cublasSetStream(idd_cu_blas, idd_cu_stream);
    /* defaults from the environment: IDDPM_PRECISION=fp32|tf32|bf16 (IDDPM_TF32=1 is the older
     * spelling of tf32), IDDPM_CUDA_CONV=cudnn|im2col */
    const char *tf = getenv("IDDPM_TF32"), *pr = getenv("IDDPM_PRECISION"), *cv = getenv("IDDPM_CUDA_CONV");
    int prec = tf && *tf == '1' ? IDD_PREC_TF32 : IDD_PREC_FP32;
    if (pr && *pr) {
        prec = idd_cuda_precision_from_name(pr);
        if (prec < 0) {
            fprintf(stderr, "iddpm: IDDPM_PRECISION=%s is not fp32, tf32 or bf16; using fp32\n", pr);
            prec = IDD_PREC_FP32;
        }
    }
    idd_cuda_set_precision(prec);
    const char *pf = getenv("IDDPM_CUDA_PROFILE");
    if (pf && *pf == '1') {
        prof_on = true;
        atexit(prof_report);
    }
    if (cv && *cv) {
        if (!strcmp(cv, "im2col")) idd_cuda_set_conv_impl(IDD_CONV_IM2COL);
        else if (strcmp(cv, "cudnn")) fprintf(stderr, "iddpm: IDDPM_CUDA_CONV=%s is not cudnn or im2col; using cudnn\n", cv);
    }
    if (idd_backend_register(IDD_CUDA, &cuda_backend) != IDD_OK) {
        snprintf(why, sizeof why, "%s", idd_last_error());
        state = -1;
        idd_backend_set_unavailable(IDD_CUDA, why);
        return idd_error("%s", why);
    }
    state = 1;
    return IDD_OK;
}
