/* graph.cu — CUDA graphs: capture the work queued on the backend's stream between
 * idd_cuda_graph_begin and idd_cuda_graph_end, instantiate it, replay it with one launch
 * (include/iddpm/cuda.h). The allocator's side (blocks held by graphs) is in memory.cu,
 * section "graph pools". The sampler replays the UNet forward this way
 * (lua/iddpm/diffusion.lua, D.graphed); the host then queues one launch per step
 * instead of ~700 kernels through Lua, the autograd bookkeeping and the allocator. */
#include "cuda_common.cuh"

#include <vector>

/* memory.cu, "graph pools" */
void cu_pool_begin(void);
std::vector<void *> cu_pool_end(void);
void cu_pool_release(const std::vector<void *> &blocks);

struct idd_cuda_graph {
    cudaGraphExec_t exec;
    std::vector<void *> blocks;   /* held by this graph (memory.cu) */
};

static bool capturing;
static std::vector<idd_cuda_graph *> deferred;   /* destroyed during a capture: freed after it */

extern "C" int idd_cuda_capturing(void) { return capturing; }

extern "C" idd_status idd_cuda_capture_refuse(const char *op, const char *why) {
    return idd_error("graph_capture: %s cannot run inside a CUDA graph capture: %s", op, why);
}

static void destroy_now(idd_cuda_graph *g) {
    cudaStreamSynchronize(idd_cu_stream);   /* no replay of it is still queued */
    cudaGraphExecDestroy(g->exec);
    cu_pool_release(g->blocks);
    delete g;
}

static void run_deferred(void) {
    std::vector<idd_cuda_graph *> d;
    d.swap(deferred);
    for (idd_cuda_graph *g : d) destroy_now(g);
}

extern "C" idd_status idd_cuda_graph_begin(void) {
    if (capturing) return idd_error("graph_capture: a capture is already running (captures do not nest)");
    cudaGetLastError();
    /* relaxed: cudaMalloc stays legal (the allocator may need a new block) */
    CU_TRY(cudaStreamBeginCapture(idd_cu_stream, cudaStreamCaptureModeRelaxed), "graph_capture (begin)");
    capturing = true;
    cu_pool_begin();
    return IDD_OK;
}

/* end the capture (valid or not) -> the graph or NULL, and the blocks the capture holds */
static cudaError_t end_capture(cudaGraph_t *graph, std::vector<void *> *blocks) {
    *graph = NULL;
    cudaError_t e = cudaStreamEndCapture(idd_cu_stream, graph);
    capturing = false;
    *blocks = cu_pool_end();
    cudaGetLastError();   /* capture errors are not sticky: the stream is usable again */
    return e;
}

extern "C" void idd_cuda_graph_abort(void) {
    if (!capturing) return;
    cudaGraph_t graph;
    std::vector<void *> blocks;
    end_capture(&graph, &blocks);
    if (graph) cudaGraphDestroy(graph);
    cu_pool_release(blocks);
    run_deferred();
}

extern "C" idd_status idd_cuda_graph_end(idd_cuda_graph **out) {
    *out = NULL;
    if (!capturing) return idd_error("graph_capture: no capture is running");
    cudaGraph_t graph;
    std::vector<void *> blocks;
    cudaError_t e = end_capture(&graph, &blocks);
    if (e != cudaSuccess || !graph) {
        if (graph) cudaGraphDestroy(graph);
        cu_pool_release(blocks);
        run_deferred();
        return idd_error("graph_capture: the capture was invalidated (an op called something that cannot be recorded): %s",
                         cudaGetErrorString(e));
    }
    cudaGraphExec_t exec;
    e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cu_pool_release(blocks);
        run_deferred();
        return idd_error("graph_capture: instantiating the graph failed: %s", cudaGetErrorString(e));
    }
    idd_cuda_graph *g = new idd_cuda_graph;
    g->exec = exec;
    g->blocks.swap(blocks);
    *out = g;
    run_deferred();
    return IDD_OK;
}

extern "C" idd_status idd_cuda_graph_replay(idd_cuda_graph *g) {
    if (!g) return idd_error("graph replay: the graph was freed");
    if (capturing) return idd_cuda_capture_refuse("graph replay", "replay the graph outside the capture");
    CU_TRY(cudaGraphLaunch(g->exec, idd_cu_stream), "graph replay");
    return IDD_OK;
}

extern "C" void idd_cuda_graph_destroy(idd_cuda_graph *g) {
    if (!g) return;
    if (capturing) deferred.push_back(g);
    else destroy_now(g);
}
