/* l_dist.c — module iddpm._dist: the collectives of data-parallel training and the
 * one-machine launcher (the Lua side is lua/iddpm/dist.lua).
 *
 * Transports: for CPU tensors MPI (built with IDDPM_MPI: `make MPI=1`, or found through
 * pkg-config ompi-c) or, between the ranks the launcher forked, its ring of socket pairs
 * (l_dist_ring.c); NCCL for CUDA tensors (built with IDDPM_CUDA). Every collective
 * waits with a deadline (set_timeout): a rank that died or hangs makes the others fail
 * with a message naming the operation and the timeout, never hang. MPI collectives are
 * the non-blocking ones polled with MPI_Test; NCCL ones are polled on the backend's
 * stream (cudaStreamQuery) with ncclCommGetAsyncError, and the communicator is aborted
 * on a timeout.
 *
 *   info() -> {mpi = bool, nccl = bool}
 *   mpi_init() -> rank, size, local_rank, local_size (MPI_COMM_TYPE_SHARED for the node)
 *   ring_init(left_fd, right_fd, rank, size)          the launcher's ring (forked ranks)
 *   nccl_unique_id() -> 256 hex characters; nccl_init(hex, rank, size)
 *   set_timeout(seconds)
 *   allreduce({tensor, ...}, "sum" | "avg" | "max")   in place, every tensor float32/64
 *   broadcast({tensor, ...}, root)                    in place
 *   allgather(tensor) -> tensor (size*dim1, ...)      concatenated in rank order
 *   barrier()
 *   finalize(); abort(message)                        abort ends every rank (MPI_Abort)
 *   select_gpu(local_rank)   sets CUDA_VISIBLE_DEVICES to that entry (before CUDA starts;
 *                            ranks do it at load, idd_dist_pick_gpu)
 *   launch(argv, nproc, env) -> exit status            see launch() below
 * Tensors must be contiguous; CPU ones travel over MPI, CUDA ones over NCCL. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "iddpm/core.h"
#include "l_common.h"
#include "l_dist.h"

#ifdef IDDPM_MPI
#include <mpi.h>
#endif
#ifdef IDDPM_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
extern cudaStream_t idd_cu_stream; /* engine/cuda: the backend's one stream */
#endif

#define MAX_TENSORS 4096   /* tensors in one call (the UNet has a few hundred) */
#define POLL_NS 20000      /* sleep between two polls of a pending collective (20 us) */

static double timeout_s = 600;   /* set_timeout */
static int world = 1, me = 0;    /* rank and size of the initialised transport */
#ifdef IDDPM_MPI
static int mpi_up;
#endif
#ifdef IDDPM_CUDA
static ncclComm_t nccl_comm;
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void nap(void) {
    struct timespec ts = {0, POLL_NS};
    nanosleep(&ts, NULL);
}

static int timed_out(lua_State *L, const char *op, double t0) {
    if (now_s() - t0 <= timeout_s) return 0;
    char msg[256];
    snprintf(msg, sizeof msg, "dist.%s: rank %d waited %.0f s for the other ranks (timeout; a rank died or hangs: "
             "stopping; set dist_timeout= to wait longer)", op, me, timeout_s);
    return luaL_error(L, "%s", msg);
}

/* the tensors of the table at idx: contiguous, one device, float32 or float64 */
static int tensors_of(lua_State *L, int idx, const char *op, idd_tensor **ts) {
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)luaL_len(L, idx);
    if (n > MAX_TENSORS) luaL_error(L, "dist.%s: %d tensors (at most %d in one call)", op, n, MAX_TENSORS);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, idx, i + 1);
        idd_tensor *t = lt_check(L, -1);
        lua_pop(L, 1);
        if (!idd_is_contiguous(t)) luaL_error(L, "dist.%s: tensor %d is not contiguous", op, i + 1);
        if (t->dtype != IDD_F32 && t->dtype != IDD_F64)
            luaL_error(L, "dist.%s: tensor %d is %s (float32 or float64 expected)", op, i + 1, idd_dtype_name(t->dtype));
        if (i > 0 && t->device != ts[0]->device)
            luaL_error(L, "dist.%s: tensor %d is on another device than tensor 1", op, i + 1);
        ts[i] = t;
    }
    return n;
}

/* ---------------------------------------------------------------- MPI (CPU tensors) */

#ifdef IDDPM_MPI
static void mpi_wait(lua_State *L, const char *op, MPI_Request *rq) {
    double t0 = now_s();
    for (;;) {
        int done = 0;
        if (MPI_Test(rq, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) luaL_error(L, "dist.%s: MPI error", op);
        if (done) return;
        if (idd_interrupted) luaL_error(L, "dist.%s: interrupted", op);
        timed_out(L, op, t0);
        nap();
    }
}

static MPI_Datatype mpi_type(const idd_tensor *t) { return t->dtype == IDD_F64 ? MPI_DOUBLE : MPI_FLOAT; }
#endif

static void need_mpi(lua_State *L, const char *op) {
#ifdef IDDPM_MPI
    if (mpi_up) return;
    luaL_error(L, "dist.%s: CPU tensors need MPI, and this process was not started by mpirun "
                  "(run `mpirun -np N iddpm train ...` for data parallelism on the CPU)", op);
#else
    luaL_error(L, "dist.%s: CPU tensors need MPI, and this build has none (install libopenmpi-dev and rebuild, "
                  "or `make MPI=1`)", op);
#endif
}

/* ---------------------------------------------------------------- NCCL (CUDA tensors) */

#ifdef IDDPM_CUDA
static void nccl_wait(lua_State *L, const char *op) {
    double t0 = now_s();
    for (;;) {
        cudaError_t e = cudaStreamQuery(idd_cu_stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) luaL_error(L, "dist.%s: CUDA error %s", op, cudaGetErrorString(e));
        ncclResult_t ae = ncclSuccess;
        ncclCommGetAsyncError(nccl_comm, &ae);
        if (ae != ncclSuccess && ae != ncclInProgress) {
            ncclCommAbort(nccl_comm);
            nccl_comm = NULL;
            luaL_error(L, "dist.%s: NCCL error %s (a rank died?)", op, ncclGetErrorString(ae));
        }
        if (now_s() - t0 > timeout_s) {
            ncclCommAbort(nccl_comm);
            nccl_comm = NULL;
            timed_out(L, op, t0);
        }
        nap();
    }
}

static ncclDataType_t nccl_type(const idd_tensor *t) { return t->dtype == IDD_F64 ? ncclFloat64 : ncclFloat32; }

static void need_nccl(lua_State *L, const char *op) {
    if (!nccl_comm) luaL_error(L, "dist.%s: CUDA tensors need NCCL, not initialised (dist.init with device=cuda)", op);
}

#define NCCL_TRY(L, call, op)                                                                  \
    do {                                                                                       \
        ncclResult_t r_ = (call);                                                              \
        if (r_ != ncclSuccess) luaL_error(L, "dist.%s: %s", op, ncclGetErrorString(r_));       \
    } while (0)
#endif

static int on_cuda(lua_State *L, idd_tensor *t, const char *op) {
    if (t->device == IDD_CPU) return 0;
#ifdef IDDPM_CUDA
    need_nccl(L, op);
    return 1;
#else
    return luaL_error(L, "dist.%s: tensor on a device this build does not know", op);
#endif
}

/* ---------------------------------------------------------------- collectives */

/* the mean from the sum over the ranks: x / W (identical on every rank) */
static void scale(idd_tensor *t, int w) {
    int64_t m = idd_numel(t);
    if (t->dtype == IDD_F64) {
        double *p = idd_data(t);
        for (int64_t k = 0; k < m; k++) p[k] /= w;
    } else {
        float *p = idd_data(t);
        for (int64_t k = 0; k < m; k++) p[k] /= (float)w;
    }
}

static int l_allreduce(lua_State *L) {
    idd_tensor *ts[MAX_TENSORS];
    int n = tensors_of(L, 1, "allreduce", ts);
    static const char *const ops[] = {"sum", "avg", "max", NULL};
    int op = luaL_checkoption(L, 2, "sum", ops);
    if (n == 0 || world == 1) return 0;
    if (on_cuda(L, ts[0], "allreduce")) {
#ifdef IDDPM_CUDA
        ncclRedOp_t rop = op == 0 ? ncclSum : op == 1 ? ncclAvg : ncclMax;
        NCCL_TRY(L, ncclGroupStart(), "allreduce");
        for (int i = 0; i < n; i++)
            NCCL_TRY(L, ncclAllReduce(idd_data(ts[i]), idd_data(ts[i]), (size_t)idd_numel(ts[i]), nccl_type(ts[i]), rop,
                                      nccl_comm, idd_cu_stream), "allreduce");
        NCCL_TRY(L, ncclGroupEnd(), "allreduce");
        nccl_wait(L, "allreduce");
#endif
        return 0;
    }
    if (idd_ring_up()) {
        for (int i = 0; i < n; i++) {
            const char *err = idd_ring_allreduce(idd_data(ts[i]), idd_numel(ts[i]), ts[i]->dtype == IDD_F64, timeout_s);
            if (err) return luaL_error(L, "%s", err);
            if (op == 1) scale(ts[i], world);
        }
        return 0;
    }
    need_mpi(L, "allreduce");
#ifdef IDDPM_MPI
    for (int i = 0; i < n; i++) {
        MPI_Request rq;
        int64_t m = idd_numel(ts[i]);
        if (MPI_Iallreduce(MPI_IN_PLACE, idd_data(ts[i]), (int)m, mpi_type(ts[i]), op == 2 ? MPI_MAX : MPI_SUM,
                           MPI_COMM_WORLD, &rq) != MPI_SUCCESS)
            return luaL_error(L, "dist.allreduce: MPI error on tensor %d", i + 1);
        mpi_wait(L, "allreduce", &rq);
        if (op == 1) scale(ts[i], world);
    }
#endif
    return 0;
}

static int l_broadcast(lua_State *L) {
    idd_tensor *ts[MAX_TENSORS];
    int n = tensors_of(L, 1, "broadcast", ts);
    int root = (int)luaL_optinteger(L, 2, 0);
    if (n == 0 || world == 1) return 0;
    if (on_cuda(L, ts[0], "broadcast")) {
#ifdef IDDPM_CUDA
        NCCL_TRY(L, ncclGroupStart(), "broadcast");
        for (int i = 0; i < n; i++)
            NCCL_TRY(L, ncclBroadcast(idd_data(ts[i]), idd_data(ts[i]), (size_t)idd_numel(ts[i]), nccl_type(ts[i]), root,
                                      nccl_comm, idd_cu_stream), "broadcast");
        NCCL_TRY(L, ncclGroupEnd(), "broadcast");
        nccl_wait(L, "broadcast");
#endif
        return 0;
    }
    if (idd_ring_up()) {
        if (root != 0) return luaL_error(L, "dist.broadcast: the ring broadcasts from rank 0 only");
        for (int i = 0; i < n; i++) {
            const char *err = idd_ring_broadcast(idd_data(ts[i]), (size_t)idd_numel(ts[i]) * idd_dtype_size(ts[i]->dtype),
                                                 timeout_s);
            if (err) return luaL_error(L, "%s", err);
        }
        return 0;
    }
    need_mpi(L, "broadcast");
#ifdef IDDPM_MPI
    for (int i = 0; i < n; i++) {
        MPI_Request rq;
        if (MPI_Ibcast(idd_data(ts[i]), (int)idd_numel(ts[i]), mpi_type(ts[i]), root, MPI_COMM_WORLD, &rq) != MPI_SUCCESS)
            return luaL_error(L, "dist.broadcast: MPI error on tensor %d", i + 1);
        mpi_wait(L, "broadcast", &rq);
    }
#endif
    return 0;
}

static int l_allgather(lua_State *L) {
    idd_tensor *t = lt_check(L, 1);
    if (!idd_is_contiguous(t) || t->ndim < 1 || (t->dtype != IDD_F32 && t->dtype != IDD_F64 && t->dtype != IDD_I64))
        return luaL_error(L, "dist.allgather: expected a contiguous float32, float64 or int64 tensor of >= 1 dims");
    int64_t shape[IDD_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) shape[d] = t->shape[d];
    shape[0] *= world;
    idd_tensor *out = idd_tensor_new(t->dtype, t->device, t->ndim, shape);
    if (!out) return lt_error(L);
    lt_push(L, out);
    size_t bytes = (size_t)idd_numel(t) * idd_dtype_size(t->dtype);
    if (on_cuda(L, t, "allgather")) {
#ifdef IDDPM_CUDA
        NCCL_TRY(L, ncclAllGather(idd_data(t), idd_data(out), bytes, ncclUint8, nccl_comm, idd_cu_stream), "allgather");
        nccl_wait(L, "allgather");
#endif
        return 1;
    }
    if (world == 1) {
        memcpy(idd_data(out), idd_data(t), bytes);
        return 1;
    }
    if (idd_ring_up()) {
        const char *err = idd_ring_allgather(idd_data(t), idd_data(out), bytes, timeout_s);
        if (err) return luaL_error(L, "%s", err);
        return 1;
    }
    need_mpi(L, "allgather");
#ifdef IDDPM_MPI
    MPI_Request rq;
    if (MPI_Iallgather(idd_data(t), (int)bytes, MPI_BYTE, idd_data(out), (int)bytes, MPI_BYTE, MPI_COMM_WORLD, &rq) !=
        MPI_SUCCESS)
        return luaL_error(L, "dist.allgather: MPI error");
    mpi_wait(L, "allgather", &rq);
#endif
    return 1;
}

static int l_barrier(lua_State *L) {
    if (world == 1) return 0;
    if (idd_ring_up()) {
        float one = 0;
        const char *err = idd_ring_allreduce(&one, 1, 0, timeout_s);
        if (err) return luaL_error(L, "%s", err);
        return 0;
    }
#ifdef IDDPM_MPI
    if (mpi_up) {
        MPI_Request rq;
        MPI_Ibarrier(MPI_COMM_WORLD, &rq);
        mpi_wait(L, "barrier", &rq);
        return 0;
    }
#endif
#ifdef IDDPM_CUDA
    if (nccl_comm) {   /* NCCL has no barrier: an allreduce of one float */
        float *d = NULL;
        if (cudaMallocAsync((void **)&d, sizeof *d, idd_cu_stream) != cudaSuccess)
            return luaL_error(L, "dist.barrier: cannot allocate 4 bytes on the GPU");
        cudaMemsetAsync(d, 0, sizeof *d, idd_cu_stream);
        NCCL_TRY(L, ncclAllReduce(d, d, 1, ncclFloat32, ncclSum, nccl_comm, idd_cu_stream), "barrier");
        cudaFreeAsync(d, idd_cu_stream);
        nccl_wait(L, "barrier");
        return 0;
    }
#endif
    return luaL_error(L, "dist.barrier: no transport initialised");
}

/* ---------------------------------------------------------------- set-up */

static int l_info(lua_State *L) {
    lua_createtable(L, 0, 2);
#ifdef IDDPM_MPI
    lua_pushboolean(L, 1);
#else
    lua_pushboolean(L, 0);
#endif
    lua_setfield(L, -2, "mpi");
#ifdef IDDPM_CUDA
    lua_pushboolean(L, 1);
#else
    lua_pushboolean(L, 0);
#endif
    lua_setfield(L, -2, "nccl");
    return 1;
}

static int l_mpi_init(lua_State *L) {
#ifdef IDDPM_MPI
    if (!mpi_up) {
        int provided = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return luaL_error(L, "dist: MPI_Init failed");
        mpi_up = 1;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    MPI_Comm node;
    int lr = 0, ls = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
        MPI_Comm_rank(node, &lr);
        MPI_Comm_size(node, &ls);
        MPI_Comm_free(&node);
    }
    lua_pushinteger(L, me);
    lua_pushinteger(L, world);
    lua_pushinteger(L, lr);
    lua_pushinteger(L, ls);
    return 4;
#else
    return luaL_error(L, "dist: this build has no MPI (install libopenmpi-dev and rebuild, or `make MPI=1`)");
#endif
}

static int l_ring_init(lua_State *L) {
    int left = (int)luaL_checkinteger(L, 1), right = (int)luaL_checkinteger(L, 2);
    int rank = (int)luaL_checkinteger(L, 3), size = (int)luaL_checkinteger(L, 4);
    if (fcntl(left, F_GETFD) < 0 || fcntl(right, F_GETFD) < 0)
        return luaL_error(L, "dist.ring_init: descriptors %d, %d are not open (IDDPM_RING_FDS from another process?)",
                          left, right);
    idd_ring_setup(left, right, rank, size);
    me = rank;
    world = size;
    return 0;
}

/* the id as hex (NCCL_UNIQUE_ID_BYTES = 128 bytes -> 256 characters) */
static int l_nccl_unique_id(lua_State *L) {
#ifdef IDDPM_CUDA
    ncclUniqueId id;
    NCCL_TRY(L, ncclGetUniqueId(&id), "nccl_unique_id");
    char hex[2 * sizeof id.internal + 1];
    for (size_t i = 0; i < sizeof id.internal; i++) snprintf(hex + 2 * i, 3, "%02x", (unsigned char)id.internal[i]);
    lua_pushstring(L, hex);
    return 1;
#else
    return luaL_error(L, "dist: NCCL needs a CUDA build (make CUDA=1)");
#endif
}

static int l_nccl_init(lua_State *L) {
#ifdef IDDPM_CUDA
    size_t len;
    const char *hex = luaL_checklstring(L, 1, &len);
    int rank = (int)luaL_checkinteger(L, 2), size = (int)luaL_checkinteger(L, 3);
    ncclUniqueId id;
    if (len != 2 * sizeof id.internal)
        return luaL_error(L, "dist.nccl_init: the id has %d hex digits, expected %d", (int)len, (int)(2 * sizeof id.internal));
    for (size_t i = 0; i < sizeof id.internal; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return luaL_error(L, "dist.nccl_init: the id is not hex");
        id.internal[i] = (char)v;
    }
    NCCL_TRY(L, ncclCommInitRank(&nccl_comm, size, id, rank), "nccl_init");
    me = rank;
    world = size;
    return 0;
#else
    return luaL_error(L, "dist: NCCL needs a CUDA build (make CUDA=1)");
#endif
}

static int l_set_timeout(lua_State *L) {
    double s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s > 0, 1, "timeout must be > 0 seconds");
    timeout_s = s;
    return 0;
}

static int l_finalize(lua_State *L) {
#ifdef IDDPM_CUDA
    if (nccl_comm) { ncclCommDestroy(nccl_comm); nccl_comm = NULL; }
#endif
#ifdef IDDPM_MPI
    if (mpi_up) { MPI_Finalize(); mpi_up = 0; }
#endif
    world = 1;
    me = 0;
    return 0;
}

static int l_abort(lua_State *L) {
    const char *msg = luaL_optstring(L, 1, "aborted");
    fprintf(stderr, "iddpm: rank %d: %s\n", me, msg);
    fflush(stderr);
#ifdef IDDPM_CUDA
    if (nccl_comm) ncclCommAbort(nccl_comm);
#endif
#ifdef IDDPM_MPI
    if (mpi_up) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
    _exit(1);
}

/* CUDA_VISIBLE_DEVICES := the local_rank-th entry of its current value (or local_rank);
 * 0, or -1 when the list has no such entry */
static int pick_gpu(int lr) {
    const char *cur = getenv("CUDA_VISIBLE_DEVICES");
    char buf[64];
    snprintf(buf, sizeof buf, "%d", lr);
    if (cur && *cur) {
        const char *p = cur;
        for (int i = 0; i < lr && p; i++) {
            p = strchr(p, ',');
            if (p) p++;
        }
        if (!p || !*p) return -1;
        size_t k = strcspn(p, ",");
        if (k >= sizeof buf) k = sizeof buf - 1;
        memcpy(buf, p, k);
        buf[k] = 0;
    }
    setenv("CUDA_VISIBLE_DEVICES", buf, 1);
    return 0;
}

/* Called before the CUDA backend starts (luaopen_iddpm): a rank of a data-parallel run
 * (IDDPM_LOCAL_RANK from the launcher, OMPI_COMM_WORLD_LOCAL_RANK under mpirun, with a
 * world size above 1) sees only its own GPU, as device 0. Once per process tree. */
void idd_dist_pick_gpu(void) {
    const char *lr = getenv("IDDPM_LOCAL_RANK"), *ws = getenv("IDDPM_WORLD_SIZE");
    if (!lr) { lr = getenv("OMPI_COMM_WORLD_LOCAL_RANK"); ws = getenv("OMPI_COMM_WORLD_SIZE"); }
    if (!lr || !ws || atoi(ws) < 2 || getenv("IDDPM_GPU_PICKED")) return;
    if (pick_gpu(atoi(lr)) != 0)
        fprintf(stderr, "iddpm: local rank %s has no GPU in CUDA_VISIBLE_DEVICES=%s (more ranks than GPUs?)\n", lr,
                getenv("CUDA_VISIBLE_DEVICES"));
    setenv("IDDPM_GPU_PICKED", "1", 1);
}

static int l_select_gpu(lua_State *L) {
    int lr = (int)luaL_checkinteger(L, 1);
    if (pick_gpu(lr) != 0)
        return luaL_error(L, "dist: local rank %d has no GPU in CUDA_VISIBLE_DEVICES=%s", lr, getenv("CUDA_VISIBLE_DEVICES"));
    lua_pushstring(L, getenv("CUDA_VISIBLE_DEVICES"));
    return 1;
}

int lt_dist_launch(lua_State *L);   /* l_dist_launch.c */

int luaopen_iddpm_dist_c(lua_State *L);
int luaopen_iddpm_dist_c(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"info", l_info},           {"mpi_init", l_mpi_init},     {"nccl_unique_id", l_nccl_unique_id},
        {"nccl_init", l_nccl_init}, {"set_timeout", l_set_timeout}, {"allreduce", l_allreduce},
        {"broadcast", l_broadcast}, {"allgather", l_allgather},   {"barrier", l_barrier},
        {"finalize", l_finalize},   {"abort", l_abort},           {"select_gpu", l_select_gpu},
        {"launch", lt_dist_launch}, {"ring_init", l_ring_init},   {NULL, NULL}};
    luaL_newlib(L, fns);
    return 1;
}
