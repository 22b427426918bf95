-- test_dist.lua — data-parallel training (lua/iddpm/dist.lua, lua/l_dist.c):
--  * sharded generators: rank r of W drawing n values reads the r-th slice of one W*n
--    draw (normal, uniform, randint, the timestep sampler)
--  * the sharded loader: W ranks x batch b read the slices of one loader's batch W*b
--  * the launcher: a failing rank stops the others (bounded time), success gives 0
--  * forked ranks (nproc=2, the launcher's socket ring): 2 ranks x batch 2 for 3 steps ==
--    1 process x batch 4; a hung rank makes the run fail in bounded time
--  * through MPI on the CPU (skipped with a line saying why where mpirun or an MPI
--    build is missing): 2 ranks x batch 2 for 3 steps == 1 process x batch 4 (every
--    parameter, EMA, AdamW moment, sampler history and the logged means); a resume at
--    step 2 with 2 ranks is bit-exact, and with 1 process x 4 continues to the same
--    weights; a rank that hangs makes the other stop with a timeout message.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local data = iddpm.data
local C = require "iddpm._dist"

-- float32 sums in another order: the mean over 4 examples vs the average of two means
-- of 2 (and the AdamW/EMA arithmetic on top). Measured: logged losses ~1e-7, weights
-- (as one vector) ~2e-6, the worst moment 1.85e-5 (AdamW m of the attention's qkv, whose
-- gradient sums cancel); 5e-5 leaves room for another BLAS summation order
local TOL_DP = 5e-5
local TOL_EXACT = 0   -- the same ranks, the same operations: bit-identical
-- How the comparison scales: AdamW moments and the sampler history relative to each
-- tensor's own scale, floored at this fraction of the largest tensor of their kind
-- (model., ema_, opt.m., opt.v.) for tensors that are near zero; parameters and EMAs as
-- one vector each (max |difference| over the model / max |weight| over the model).
-- Why not per tensor for the weights: the zero-initialised convs (out_layers.3, out.2)
-- hold nothing but AdamW steps, and AdamW divides each element's step by that element's
-- gradient size, so a small gradient element's last digits (which the summation order
-- decides) move its step by ~1e-3 of the step; measured ~2e-6 absolute, 1e-3 of such a
-- tensor, 2e-6 of the model's weight scale. (The model has 64 channels, 2 per norm
-- group: with 1, each norm removes the bias of the conv before it, whose gradient is then
-- rounding noise.)
local FLOOR_FRAC = 1e-6
local TIMEOUT_S = 2   -- the collective deadline of the hang test
local STOP_WITHIN_S = 30   -- a failed / hung rank must end the run within this

local TMP = os.tmpname()
os.remove(TMP)
os.execute("mkdir -p " .. TMP)
local BIN = "./iddpm"
if arg then local i = -1; while arg[i - 1] do i = i - 1 end; if arg[i] then BIN = arg[i] end end
print("# seeds: 11 (generators), 5 (loader), 0 (training); tmp " .. TMP)

local function sh(cmd) local ok, _, code = os.execute(cmd) return ok and 0 or code end
local function read(path) local f = io.open(path) if not f then return "" end local s = f:read("a") f:close() return s end

-- ---------------------------------------------------------------- sharded generators

do
  local W, n = 2, 6
  local whole = T.randn({W * n, 1}, T.generator(11, 2)):totable()
  local whole_u = T.rand({W * n}, T.generator(11, 3)):totable()
  local whole_i = T.randint(0, 1000, {W * n}, T.generator(11, 4)):totable()
  local smp = iddpm.diffusion.sampler("uniform", 100)
  local whole_t = smp:sample(W * n, T.generator(11, 5)):totable()
  local ok = {true, true, true, true}
  local after = {T.generator(11, 2)}
  T.randn({W * n, 1}, after[1])
  for r = 0, W - 1 do
    local g1, g2, g3, g4 = T.generator(11, 2), T.generator(11, 3), T.generator(11, 4), T.generator(11, 5)
    for _, g in ipairs{g1, g2, g3, g4} do g:set_shard(r, W) end
    local a, b = T.randn({n, 1}, g1):totable(), T.rand({n}, g2):totable()
    local c, d = T.randint(0, 1000, {n}, g3):totable(), smp:sample(n, g4):totable()
    for i = 1, n do
      ok[1] = ok[1] and a[i] == whole[r * n + i]
      ok[2] = ok[2] and b[i] == whole_u[r * n + i]
      ok[3] = ok[3] and c[i] == whole_i[r * n + i]
      ok[4] = ok[4] and d[i] == whole_t[r * n + i]
    end
    local _, _, off = g1:state()
    local _, _, want = after[1]:state()
    H.check(("sharded generator: rank %d ends at the global offset"):format(r), off == want, ("%d vs %d"):format(off, want))
  end
  H.check("sharded generator: randn slices", ok[1])
  H.check("sharded generator: rand slices", ok[2])
  H.check("sharded generator: randint slices", ok[3])
  H.check("sharded generator: timestep sampler slices", ok[4])
  H.raises("sharded generator: bad rank", function() T.generator(1):set_shard(2, 2) end, "not in [0, world size 2)")
end

-- ---------------------------------------------------------------- sharded loader

do
  local ds = data.random(13, 1, 4, 5)
  local one = data.loader(ds, {batch_size = 6, seed = 5, flip = true})
  local ranks = {data.loader(ds, {batch_size = 3, seed = 5, flip = true, rank = 0, world_size = 2}),
                 data.loader(ds, {batch_size = 3, seed = 5, flip = true, rank = 1, world_size = 2})}
  local same = true
  for _ = 1, 5 do   -- 13 images, global batch 6: two batches an epoch, over 2.5 epochs
    local x = one:next()
    for r = 1, 2 do
      local xr = ranks[r]:next()
      same = same and H.max_rel(xr, x:narrow(1, 3 * (r - 1) + 1, 3), 1) == 0
    end
  end
  H.check("sharded loader: ranks read the slices of the global batch (flips included)", same)
  local s1, s2 = one:state(), ranks[2]:state()
  H.check("sharded loader: the position is global", s1.epoch == s2.epoch and s1.index == s2.index,
    ("%d/%d vs %d/%d"):format(s1.epoch, s1.index, s2.epoch, s2.index))
  ranks[1]:set_state{epoch = 1, index = 9}   -- no room for 6 more of 13: the next epoch
  local s = ranks[1]:state()
  H.check("sharded loader: a position without room moves to the next epoch", s.epoch == 2 and s.index == 0)
  H.raises("sharded loader: global batch larger than the data", function()
    data.loader(ds, {batch_size = 7, rank = 0, world_size = 2}) end, "larger than the dataset")
  one:close(); ranks[1]:close(); ranks[2]:close()
end

-- ---------------------------------------------------------------- the launcher

do
  local code = "if os.getenv('IDDPM_RANK') == '1' then os.exit(3) end " ..
    "local t = os.time() while os.time() - t < 60 do end"
  local t0 = os.time()
  local st = C.launch({BIN, "-e", code}, 2, {}, 5)
  H.check("launcher: a failing rank's status is returned", st == 3, "status " .. tostring(st))
  H.check("launcher: the other rank is stopped in bounded time", os.time() - t0 < STOP_WITHIN_S, os.time() - t0 .. " s")
  st = C.launch({BIN, "-e", "print('rank ' .. os.getenv('IDDPM_RANK') .. ' of ' .. os.getenv('IDDPM_WORLD_SIZE'))"}, 2, {})
  H.check("launcher: ranks that succeed give 0", st == 0, "status " .. tostring(st))
end
-- ---------------------------------------------------------------- training

-- root needs the two ALLOW variables; ASAN_OPTIONS: under `make test DEBUG=1`, OpenMPI's
-- own allocations in its dlopen'ed components are reported as leaks at exit (the forked
-- runs keep the leak check)
local MPIRUN = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 " ..
  "ASAN_OPTIONS=detect_leaks=0 mpirun --oversubscribe -np 2 "
local ARGS = "dataset=random num_images=32 image_size=8 in_channels=1 num_channels=64 num_res_blocks=1 channel_mult=1,2 " ..
  "attention_resolutions=4 num_heads=1 dropout=0.1 learn_sigma=true diffusion_steps=50 noise_schedule=cosine " ..
  "log_interval=1 save_interval=1 num_samples=0 num_threads=1 lr=1e-3 ema_rate=0.9 schedule_sampler=loss-second-moment " ..
  "keep_checkpoints=0 seed=0 "
-- how: "mpi" (mpirun -np 2), "fork" (nproc=2: the launcher and its socket ring), or nil
-- (one process)
local function train(how, batch, steps, dir)
  local cmd = (how == "mpi" and MPIRUN or "") .. BIN .. " train " .. ARGS .. (how == "fork" and "nproc=2 " or "") ..
    ("batch_size=%d max_steps=%d run_dir=%s > %s/%s.out 2>&1"):format(batch, steps, dir, TMP, dir:match("[^/]+$"))
  return sh(cmd)
end

-- worst over the tensors of max |a - b| / max |b| (the scale of each tensor)
local function compare(pa, pb)
  local ok, ta = pcall(T.load, pa)
  local ok2, tb = pcall(T.load, pb)
  if not ok or not ok2 then return math.huge, "cannot read " .. (ok and pb or pa), 0 end
  local worst, where, count = 0, "", 0
  local function kind(k) return k:match("^opt%.%a%.") or k:match("^[^.]+%.") end
  local function whole(k) return k:match("^model%.") or k:match("^ema_") end
  local largest = {}
  for k, b in pairs(tb) do largest[kind(k)] = math.max(largest[kind(k)] or 0, b:double():abs():max():item()) end
  for k, b in pairs(tb) do
    if k:match("^model%.") or k:match("^ema_") or k:match("^opt%.") or k:match("^extra%.sampler") then
      local a = ta[k]
      if not a then return math.huge, "missing " .. k, count end
      local ad, bd = a:double(), b:double()
      local scale = whole(k) and largest[kind(k)] or math.max(bd:abs():max():item(), FLOOR_FRAC * largest[kind(k)])
      local r = (ad - bd):abs():max():item() / (scale > 0 and scale or 1)
      if r ~= r then r = math.huge end
      if r > worst then worst, where = r, k end
      count = count + 1
    end
  end
  return worst, where, count
end
local function ck(dir) return dir .. "/ckpt_00000003.safetensors" end

local B = TMP .. "/b"
H.check("one process x batch 4, 3 steps", train(nil, 4, 3, B) == 0, read(TMP .. "/b.out"):sub(-600))

-- forked ranks (no MPI needed): the same equivalence through the launcher's ring
do
  local F = TMP .. "/f"
  H.check("fork: nproc=2 x batch 2, 3 steps", train("fork", 2, 3, F) == 0, read(TMP .. "/f.out"):sub(-600))
  local r, where, n = compare(ck(F), ck(B))
  print(("# fork: 2 ranks x 2 vs 1 x 4 after 3 steps: worst rel err %.3g (%s) over %d tensors"):format(r, where, n))
  H.check("fork: 2 ranks x 2 == 1 process x 4 (parameters, EMA, AdamW moments, sampler history)", r <= TOL_DP and n > 10,
    ("%.3g at %s"):format(r, where))
  local out = read(TMP .. "/f.out")
  H.check("fork: output prefixed with the rank", out:find("[rank 0] done: step 3", 1, true) ~= nil, out:sub(-400))
  -- sampling over forked ranks: the images of one process (exact=true), one npz
  local common = (" sample ckpt=%s num_samples=5 batch_size=2 steps=4 exact=true progress=false seed=3 out="):format(F)
  local s1 = sh(BIN .. common .. TMP .. "/fs1 > " .. TMP .. "/fs1.out 2>&1")
  local s2 = sh(BIN .. common .. TMP .. "/fs2 nproc=2 > " .. TMP .. "/fs2.out 2>&1")
  H.check("fork sample: both runs succeed", s1 == 0 and s2 == 0, read(TMP .. "/fs2.out"):sub(-600))
  local z1 = select(2, pcall(iddpm.io.npz_read, TMP .. "/fs1/samples_5x8x8x1.npz"))
  local z2 = select(2, pcall(iddpm.io.npz_read, TMP .. "/fs2/samples_5x8x8x1.npz"))
  H.check("fork sample: 2 ranks give the images of one process, in order", type(z1) == "table" and type(z2) == "table"
    and z1.arr_0 and z2.arr_0 and H.max_rel(z2.arr_0:double(), z1.arr_0:double(), 1) == 0)
  -- a rank that hangs: the other one times out, the launcher stops both
  local code = ("local d = require 'iddpm.dist' d.setup(iddpm.recipe.resolve({}, {'dist_timeout=%d'})) " ..
    "local T = iddpm.tensor if d.world().rank == 1 then local t = os.time() while os.time() - t < 60 do end end " ..
    "d.allreduce_grads({{grad = T.ones({4})}})"):format(TIMEOUT_S)
  local t0 = os.time()
  local st = C.launch({BIN, "-e", "iddpm = require 'iddpm'", "-e", code}, 2, {}, 5)
  H.check("fork: a hung rank makes the run fail", st ~= 0, "status " .. tostring(st))
  H.check("fork: ... within bounded time", os.time() - t0 < STOP_WITHIN_S, os.time() - t0 .. " s")
end

-- ---------------------------------------------------------------- through MPI

local function have_mpirun() return sh("command -v mpirun >/dev/null 2>&1") == 0 end
if not C.info().mpi or not have_mpirun() then
  print(("ok - skipped: MPI data-parallel tests (%s)"):format(not C.info().mpi and
    "this build has no MPI: install libopenmpi-dev and rebuild" or "no mpirun: install openmpi-bin"))
  sh("rm -rf " .. TMP)
  H.done()
  return
end

local A, Cd, Dd = TMP .. "/a", TMP .. "/c", TMP .. "/d"
H.check("mpi: 2 ranks x batch 2, 3 steps", train("mpi", 2, 3, A) == 0, read(TMP .. "/a.out"):sub(-600))
H.check("mpi: 2 ranks x 2 to step 2", train("mpi", 2, 2, Cd) == 0, read(TMP .. "/c.out"):sub(-600))
sh(("mkdir -p %s && cp %s/ckpt_00000002.safetensors %s/"):format(Dd, Cd, Dd))
H.check("mpi: resume the 2-rank run to step 3", train("mpi", 2, 3, Cd) == 0, read(TMP .. "/c.out"):sub(-600))
H.check("resume the 2-rank checkpoint in one process x 4", train(nil, 4, 3, Dd) == 0, read(TMP .. "/d.out"):sub(-600))


local r, where, n = compare(ck(A), ck(B))
print(("# 2 ranks x 2 vs 1 x 4 after 3 steps: worst rel err %.3g (%s) over %d tensors"):format(r, where, n))
H.check("mpi: 2 ranks x 2 == 1 process x 4 (parameters, EMA, AdamW moments, sampler history)", r <= TOL_DP and n > 10,
  ("%.3g at %s"):format(r, where))
r, where = compare(ck(Cd), ck(A))
H.check("mpi: resume at step 2 with 2 ranks is bit-exact", r <= TOL_EXACT, ("%.3g at %s"):format(r, where))
r, where = compare(ck(Dd), ck(B))
print(("# 2-rank checkpoint resumed by 1 x 4: worst rel err %.3g (%s)"):format(r, where))
H.check("resume with another world size (same global batch) continues to the same weights", r <= TOL_DP,
  ("%.3g at %s"):format(r, where))

local function last_log(dir)
  local last
  for line in read(dir .. "/log.jsonl"):gmatch("[^\n]+") do last = line end
  return last and iddpm.io.json_decode(last) or {}
end
local la, lb = last_log(A), last_log(B)
local lok = la.step == 3
for _, k in ipairs{"loss", "mse", "vb", "grad_norm", "loss_q0", "mse_q3"} do
  if lb[k] then lok = lok and la[k] and math.abs(la[k] - lb[k]) <= TOL_DP * math.abs(lb[k]) end
end
H.check("mpi: the logged means are over all ranks (== one process x 4)", lok, ("loss %s vs %s"):format(la.loss, lb.loss))
local outa = read(TMP .. "/a.out")
H.check("mpi: only rank 0 prints (the global batch once, the data once)", select(2, outa:gsub("data: random", "")) == 1
  and select(2, outa:gsub("global batch 4 = 2 x batch_size 2", "")) == 1, outa:sub(1, 600))

-- sampling across ranks: the same images as one process (exact=true: one model call per
-- sample, so the batch composition cannot change the rounding), one npz in order
do
  local common = (" sample ckpt=%s num_samples=5 batch_size=2 steps=4 exact=true progress=false seed=3 out="):format(A)
  local s1 = sh(BIN .. common .. TMP .. "/s1 > " .. TMP .. "/s1.out 2>&1")
  local s2 = sh(MPIRUN .. BIN .. common .. TMP .. "/s2 > " .. TMP .. "/s2.out 2>&1")
  H.check("mpi sample: both runs succeed", s1 == 0 and s2 == 0, read(TMP .. "/s2.out"):sub(-600))
  local z1 = select(2, pcall(iddpm.io.npz_read, TMP .. "/s1/samples_5x8x8x1.npz"))
  local z2 = select(2, pcall(iddpm.io.npz_read, TMP .. "/s2/samples_5x8x8x1.npz"))
  local same = type(z1) == "table" and type(z2) == "table" and z1.arr_0 and z2.arr_0 and
    H.max_rel(z2.arr_0:double(), z1.arr_0:double(), 1) == 0
  H.check("mpi sample: 2 ranks give the images of one process, in order (bit-identical npz arrays)", same)
end

-- a rank that hangs: the other stops with a timeout message
do
  local code = ("local d = require 'iddpm.dist' d.setup(iddpm.recipe.resolve({}, {'dist_timeout=%d'})) " ..
    "local T = iddpm.tensor if d.world().rank == 1 then local t = os.time() while os.time() - t < 60 do end end " ..
    "d.allreduce_grads({{grad = T.ones({4})}})"):format(TIMEOUT_S)
  local t0 = os.time()
  local st = sh(MPIRUN .. BIN .. " -e \"iddpm = require 'iddpm'\" -e \"" .. code .. "\" > " .. TMP .. "/hang.out 2>&1")
  local out = read(TMP .. "/hang.out")
  H.check("mpi: a hung rank makes the run fail", st ~= 0, out:sub(-400))
  H.check("mpi: ... with a timeout message", out:find("timeout", 1, true) ~= nil, out:sub(-400))
  H.check("mpi: ... within bounded time", os.time() - t0 < STOP_WITHIN_S, os.time() - t0 .. " s")
end

sh("rm -rf " .. TMP)
H.done()
