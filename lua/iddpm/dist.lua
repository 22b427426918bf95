-- iddpm/dist.lua — data-parallel training: one process per rank, gradients averaged
-- over the ranks after backward (the official code's MPI + NCCL data parallelism).
--
-- Starting the ranks:
--   one machine   `iddpm train RECIPE gpus=N` (or nproc=N): this process becomes a
--                 launcher (dist.launch, lua/l_dist_launch.c) that starts N copies of the
--                 same command line (fork/exec, no shell) with IDDPM_RANK/IDDPM_WORLD_SIZE
--                 (and IDDPM_NCCL_ID on the GPU) set, prefixes their output with the rank
--                 and stops them all when one fails or on Ctrl-C. Each rank sees only
--                 its GPU (CUDA_VISIBLE_DEVICES narrowed when iddpm loads, before CUDA
--                 starts: l_dist.c idd_dist_pick_gpu).
--   many machines `mpirun -np 16 -npernode 8 iddpm train RECIPE device=cuda`: rank, size
--                 and local rank come from MPI; rank 0's NCCL id is broadcast over MPI.
--   the CPU       `iddpm train RECIPE nproc=2`: the forked ranks' CPU tensors go over the
--                 launcher's ring of Unix socket pairs (lua/l_dist_ring.c); or
--                 `mpirun -np 2 iddpm train RECIPE`: through MPI_Allreduce.
-- Transports: MPI or the ring for CPU tensors, NCCL for CUDA tensors (lua/l_dist.c); every
-- collective has a deadline (dist_timeout seconds): a rank that died or hangs makes the
-- others stop with a message, never a silent hang.
--
-- Semantics (train.lua's hooks): batch_size is per rank, the global batch is
-- world_size x batch_size. The loader, the timestep and noise generators and dropout
-- are sharded (data.loader rank/world_size, generator:set_shard): rank r reads the r-th
-- slice of what one process with the global batch would read, so W ranks x b images
-- train like 1 process x W*b images (tests/lua/test_dist.lua). Gradients are averaged
-- (the mean over the global batch); the logged loss, mse, vb, quartile means and
-- grad_norm are means over all ranks; the importance sampler sees every rank's losses.
-- Rank 0 alone writes checkpoints, logs, grids and plots. Checkpoint state is global:
-- generator offsets count the global draws and the data position counts global slots,
-- so every rank's state is (that state, its rank); resume broadcasts rank 0's weights.
--
--   dist.setup(c, argv) -> nil, or the launcher's exit status when this process launched
--   dist.world()        -> {rank, size, local_rank, main}
--   dist.allreduce_grads(params), dist.broadcast(tensors), dist.sum_numbers(list, device)
--   dist.allgather(tensor), dist.barrier(), dist.abort(msg), dist.finalize()
--   dist.generate(generate, model, diff, opts, device)   sampling split over the ranks
local T = require "iddpm.tensor"
local C = require "iddpm._dist"

local dist = {}
local W = {rank = 0, size = 1, local_rank = 0, main = true}

function dist.world() return W end
dist.info = C.info

local function env_int(name)
  local v = os.getenv(name)
  return v and math.tointeger(tonumber(v)) or nil
end

-- started by mpirun (OpenMPI, or a PMI/PMIx launcher)?
local function mpi_size()
  return env_int("OMPI_COMM_WORLD_SIZE") or env_int("PMI_SIZE") or env_int("PMIX_SIZE")
end

-- the NCCL id of rank 0, sent to the others over MPI (as 128 bytes in a float64 tensor)
local function mpi_share_nccl_id()
  local bytes = {}
  if W.rank == 0 then
    local hex = C.nccl_unique_id()
    for i = 1, #hex, 2 do bytes[#bytes + 1] = tonumber(hex:sub(i, i + 1), 16) end
  else
    for i = 1, 128 do bytes[i] = 0 end
  end
  local t = T.from_table(bytes, {#bytes}, "float64")
  C.broadcast({t}, 0)
  local out = {}
  for i, b in ipairs(t:totable()) do out[i] = ("%02x"):format(math.tointeger(b)) end
  return table.concat(out)
end

-- the processes per machine asked for: gpus=N or nproc=N (0 = none)
local function wanted(c)
  local n = math.max(c.gpus or 0, c.nproc or 0)
  return n
end

-- argv of this process (the global `arg` of main.c: negative indices hold the program
-- and the command)
local function command_line()
  local lo = 0
  while arg and arg[lo - 1] ~= nil do lo = lo - 1 end
  local a = {}
  for i = lo, #(arg or {}) do a[#a + 1] = arg[i] end
  return a
end

-- Set up this process's rank from its environment, or launch the ranks. c: the resolved
-- config (device, gpus, nproc, dist_timeout).
function dist.setup(c)
  C.set_timeout(c.dist_timeout or 600)
  local n = wanted(c)
  local ms, launched = mpi_size(), env_int("IDDPM_WORLD_SIZE")
  if ms and ms > 1 then
    if not C.info().mpi then
      error("dist: started by mpirun, but this build has no MPI (install libopenmpi-dev and rebuild)", 0)
    end
    local r, s, lr = C.mpi_init()
    W = {rank = r, size = s, local_rank = lr, main = r == 0}
    if c.device == "cuda" then   -- (the GPU of this local rank was picked at load: l_dist.c)
      C.nccl_init(mpi_share_nccl_id(), r, s)
    end
    return nil
  elseif launched and launched > 1 then
    local r = env_int("IDDPM_RANK") or 0
    W = {rank = r, size = launched, local_rank = env_int("IDDPM_LOCAL_RANK") or r, main = r == 0}
    local left, right = (os.getenv("IDDPM_RING_FDS") or ""):match("^(%d+),(%d+)$")
    if not left then error("dist: IDDPM_WORLD_SIZE is set but IDDPM_RING_FDS is not (start the ranks with gpus=N)", 0) end
    C.ring_init(tonumber(left), tonumber(right), r, launched)   -- CPU tensors
    if c.device == "cuda" then   -- CUDA tensors (this rank's GPU was picked at load)
      C.nccl_init(os.getenv("IDDPM_NCCL_ID") or error("dist: IDDPM_NCCL_ID is not set", 0), r, launched)
    end
    return nil
  elseif n > 1 then
    return dist.launch(c, n)
  end
  return nil
end

-- start n ranks of this command line and wait for them; returns the exit status
function dist.launch(c, n)
  local env = {}
  if c.device == "cuda" then
    if not C.info().nccl then error("dist: gpus=N needs a CUDA build with NCCL (make CUDA=1)", 0) end
    env.IDDPM_NCCL_ID = C.nccl_unique_id()
  end
  io.stdout:write(c.batch_size and ("iddpm: launching %d ranks (global batch %d = %d x batch_size %d)\n"):format(n,
    n * c.batch_size, n, c.batch_size) or ("iddpm: launching %d ranks\n"):format(n))
  io.stdout:flush()
  return C.launch(command_line(), n, env)
end

-- ---------------------------------------------------------------- collectives

-- average the gradients of params over the ranks (in place)
function dist.allreduce_grads(params)
  if W.size == 1 then return end
  local gs = {}
  for _, p in ipairs(params) do
    local g = p.grad
    if g then gs[#gs + 1] = g end
  end
  C.allreduce(gs, "avg")
end

-- tensors (in place) from rank 0
function dist.broadcast(tensors)
  if W.size == 1 then return end
  C.broadcast(tensors, 0)
end

-- the sums over the ranks of a list of numbers (reduced on `device`: NCCL on a GPU)
function dist.sum_numbers(list, device)
  if W.size == 1 or #list == 0 then return list end
  local t = T.from_table(list, {#list}, "float64")
  if device and device ~= "cpu" then t = t:to(device) end
  C.allreduce({t}, "sum")
  return t:to("cpu"):totable()
end

-- every rank's tensor, concatenated in rank order along dim 1; a CPU tensor travels
-- through `device` when given (NCCL on a GPU) and comes back to the CPU
function dist.allgather(t, device)
  if W.size == 1 then return t end
  if device and device ~= "cpu" and t:device() == "cpu" then return C.allgather(t:to(device):contiguous()):to("cpu") end
  return C.allgather(t:contiguous())
end

-- sampling across ranks: rank r makes samples r*per .. (r+1)*per - 1 (per = ceil(N/W))
-- with generate(model, diff, opts) (iddpm.sample.generate; sample i's noise comes from
-- its own index, so the images are those of one process), and every rank gets all N in
-- order (float32, gathered through `device`); the labels and record as generate's
function dist.generate(generate, model, diff, opts, device)
  local N, Wn = opts.num_samples, W.size
  local per = (N + Wn - 1) // Wn
  local lo = W.rank * per
  local n = math.max(0, math.min(per, N - lo))
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.first, o.num_samples, o.progress = lo, n, opts.progress and W.main
  local x, rec
  if n > 0 then
    local _
    x, _, rec = generate(model, diff, o)
  end
  local cfg = model.config
  local mine = T.zeros({per, cfg.in_channels, cfg.image_size, cfg.image_size})
  if n > 0 then mine:narrow(1, 1, n):copy_(x) end
  local all = dist.allgather(mine, device)
  if all:device() ~= "cpu" then all = all:to("cpu") end
  return all:narrow(1, 1, N):contiguous(), opts.labels, rec
end

function dist.barrier() if W.size > 1 then C.barrier() end end
function dist.abort(msg) C.abort(msg) end
function dist.finalize() if W.size > 1 then C.finalize() end; W = {rank = 0, size = 1, local_rank = 0, main = true} end

return dist
