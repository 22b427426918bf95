-- tests/bench.lua — `make bench`: images/second of the training and sampling steps
-- of the README's Performance table, with the official code's figures beside ours where they can be measured.
--
--   iddpm run tests/bench.lua [quick] [reps=N] [rows=a,b] [mem=0] [gpu=0] [cpu=0]
--       [gpu_args=iters=10;precisions=fp32,tf32] [peer_modes=eager,compiled]
--   iddpm run tests/bench.lua mem ROW [STEPS]     (internal: VmHWM of a training run)
--
-- With a GPU (a `make CUDA=1` build on a machine with one; gpu=0 skips it) the GPU rows
-- come first: tests/cuda/bench_gpu.lua (CIFAR-10 config, training batch 128, sampling
-- batch 256, per precision, with the allocator's peak memory), and where IDDPM_PEER
-- names the official code and python3 (IDDPM_PEER_PYTHON) has torch with CUDA,
-- tests/cuda/bench_peer_gpu.py runs the official code in eager bf16 and torch.compile
-- bf16 in the same run, after ours; ratios and peak memory are printed side by side.
-- cpu=0 skips the CPU rows below.
--
-- Rows: cifar_train (CIFAR-10 config, batch 8: hybrid loss + backward + AdamW),
-- cifar_sample (forward, no grad, batch 64), small_train (1x32x32, 32 channels,
-- mult 1,2,2, 1 res block, attention at 16, batch 128), small_sample (batch 64).
-- Every timing is one step after a warm-up step; the figure is the median of reps (the
-- ratio of the fastest steps is printed too: on a shared machine it varies less).
-- When IDDPM_PEER names a local copy of the official improved-diffusion code and
-- /usr/bin/python3 imports torch, tests/bench_peer.py runs the same step in a second
-- process; ours and the peer's steps alternate, two at a time (the first untimed), so
-- load from elsewhere falls on both. Peak memory: VmHWM of a separate process that runs training steps.
-- quick: the small config only, smaller batches, no peer, no memory (a smoke run).
local iddpm = require "iddpm"
local T, nn, D, optim = iddpm.tensor, iddpm.nn, iddpm.diffusion, iddpm.optim
local now = iddpm.wall_time

local CONFIGS = {
  cifar = {image_size = 32, in_channels = 3, num_channels = 128, channel_mult = {1, 2, 2, 2}, num_res_blocks = 3,
           attention_resolutions = {16, 8}, num_heads = 4, dropout = 0.3, learn_sigma = true, steps = 4000},
  small = {image_size = 32, in_channels = 1, num_channels = 32, channel_mult = {1, 2, 2}, num_res_blocks = 1,
           attention_resolutions = {16}, num_heads = 4, dropout = 0.0, learn_sigma = true, steps = 1000},
}
local BATCH = {cifar_train = 8, cifar_sample = 64, small_train = 128, small_sample = 64}
local ORDER = {"cifar_train", "cifar_sample", "small_train", "small_sample"}
local TITLE = {
  cifar_train = "CIFAR-10 config train (hybrid loss + backward + AdamW)",
  cifar_sample = "CIFAR-10 config sampling forward (no grad)",
  small_train = "small config train",
  small_sample = "small config sampling forward",
}

-- ---------------------------------------------------------------- our steps

local function build(name)
  local c = CONFIGS[name]
  local cfg = {}
  for k, v in pairs(c) do if k ~= "steps" then cfg[k] = v end end
  local model = nn.UNet.new(cfg)
  local diff = D.new{steps = c.steps, noise_schedule = "cosine", learn_sigma = true}
  return c, model, diff
end

local function step_fn(row, batch)
  local cname, kind = row:match("^(%a+)_(%a+)$")
  local c, model, diff = build(cname)
  local b = batch or BATCH[row]
  local gen = T.generator(1)
  local x = T.rand({b, c.in_channels, c.image_size, c.image_size}, gen) * 2 - 1
  if kind == "train" then
    model:train()
    local opt = optim.adamw(model:parameters(), {lr = 1e-4})
    return function()
      local t = T.randint(0, diff.num_timesteps, {b}, gen)
      opt:zero_grad()
      local loss = diff:training_losses(model, x, t, {generator = gen}).loss:mean()
      loss:backward()
      opt:step()
    end
  end
  model:eval()
  local t = T.randint(0, 1000, {b}, gen):float()
  return function() T.no_grad(function() model:forward(x, t) end) end
end

local function vmhwm()
  local f = io.open("/proc/self/status")
  if not f then return -1 end
  for line in f:lines() do
    local v = line:match("^VmHWM:%s*(%d+)")
    if v then f:close(); return tonumber(v) end
  end
  f:close()
  return -1
end

-- internal mode: peak memory of training steps in a fresh process
if arg[1] == "mem" then
  local f = step_fn(arg[2])
  for _ = 1, tonumber(arg[3] or 2) do f() end
  collectgarbage()
  print(vmhwm())
  return
end

-- ---------------------------------------------------------------- options

local opts = {quick = false, reps = nil, rows = nil, mem = true, gpu = true, cpu = true, gpu_args = {},
  peer_modes = "eager,compiled"}
for _, a in ipairs(arg) do
  if a == "quick" then opts.quick = true
  else
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == "reps" then opts.reps = tonumber(v)
    elseif k == "rows" then opts.rows = {}; for r in v:gmatch("[%w_]+") do opts.rows[#opts.rows + 1] = r end
    elseif k == "mem" then opts.mem = v ~= "0"
    elseif k == "gpu" then opts.gpu = v ~= "0"
    elseif k == "cpu" then opts.cpu = v ~= "0"
    elseif k == "gpu_args" then for g in v:gmatch("[^;]+") do opts.gpu_args[#opts.gpu_args + 1] = g end
    elseif k == "peer_modes" then opts.peer_modes = v
    else error("bench: unknown argument " .. a .. " (quick, reps=N, rows=a,b, mem=0, gpu=0, cpu=0, gpu_args=, peer_modes=)") end
  end
end
local rows = opts.rows or (opts.quick and {"small_train", "small_sample"} or ORDER)
local reps = opts.reps or (opts.quick and 2 or 5)
if opts.quick then BATCH.small_train, BATCH.small_sample = 16, 16; opts.mem = false end

local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local script_dir = (arg[0] or "tests/bench.lua"):match("^(.*)/[^/]*$") or "."
local self_exe = "./iddpm"
do local i = -1; while arg[i] do self_exe = arg[i]; i = i - 1 end end

-- ---------------------------------------------------------------- the GPU rows

local GiB = 2 ^ 30
local function gpu_rows()
  local ours = assert(loadfile(script_dir .. "/cuda/bench_gpu.lua"))(table.unpack(opts.gpu_args))
  local pdir, py = os.getenv("IDDPM_PEER"), os.getenv("IDDPM_PEER_PYTHON") or "python3"
  local peer_rows = {}
  if pdir and pdir ~= "" and not opts.quick then
    iddpm.cuda.empty_cache()   -- the peer gets the GPU's memory back
    local probe = ("%s -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1"):format(py)
    if os.execute(probe) then
      print(("# peer: the official code at %s, %s"):format(pdir, opts.peer_modes))
      local p = io.popen(("IDDPM_PEER=%s %s %s modes=%s 2>&1"):format(sh_quote(pdir), py,
        sh_quote(script_dir .. "/cuda/bench_peer_gpu.py"), opts.peer_modes))
      for line in p:lines() do
        if line:match("^{") then
          local ok, r = pcall(iddpm.io.json_decode, line)
          if ok and r.error then print("# peer " .. tostring(r.mode) .. " failed: " .. r.error)
          elseif ok then peer_rows[#peer_rows + 1] = r
            print(("# peer %s %s batch %d: %.1f ms, %.0f /s (first step %.1f s), peak %.2f GiB reserved, %.2f GiB allocated")
              :format(r.mode, r.row, r.batch, r.ms, r.per_s, r.first_step_s or 0, (r.mem_reserved or 0) / GiB,
              (r.mem_allocated or 0) / GiB))
          end
        elseif not line:find("^%s*$") then print("# peer: " .. line) end
      end
      p:close()
    else
      print(("# peer: IDDPM_PEER=%s set, but %s has no torch with CUDA: no GPU peer"):format(pdir, py))
    end
  end
  -- the summary: each of our precisions against each peer mode
  print(("GPU %s, CIFAR-10 config (ours: iddpm; peer: official improved-diffusion, autocast bf16)"):format(ours.device or "?"))
  for _, row in ipairs({"train", "sample"}) do
    local unit = row == "train" and "img/s" or "images x steps/s"
    for _, r in ipairs(ours.rows or {}) do
      if r.row == row then
        io.write(("  %-6s batch %3d  ours %-4s %8.0f %s"):format(row, r.batch, r.precision, r.per_s, unit))
        for _, q in ipairs(peer_rows) do
          if q.row == row then io.write(("   peer %s %6.0f (x%.2f)"):format(q.mode, q.per_s, r.per_s / q.per_s)) end
        end
        io.write("\n")
      end
    end
  end
  for _, r in ipairs(ours.rows or {}) do
    if r.row == "train" then
      io.write(("  memory of training (%s): ours peak %.2f GiB reserved (%.2f in use)"):format(r.precision,
        r.peak_reserved / GiB, r.peak_in_use / GiB))
      for _, q in ipairs(peer_rows) do
        if q.row == "train" and q.mem_reserved then
          io.write(("   peer %s %.2f GiB reserved (%.2f allocated, x%.2f)"):format(q.mode, q.mem_reserved / GiB,
            q.mem_allocated / GiB, r.peak_reserved / q.mem_reserved))
        end
      end
      io.write("\n")
    end
  end
end
if opts.gpu and iddpm.cuda.available() then gpu_rows() end
if not opts.cpu then return end

-- ---------------------------------------------------------------- the peer

local peer_dir = os.getenv("IDDPM_PEER")
local peer = nil
local PY = os.getenv("IDDPM_PEER_PYTHON") or "/usr/bin/python3"
if peer_dir and peer_dir ~= "" and not opts.quick then
  local probe = ("%s -c 'import torch, sys; sys.path.insert(0, %q); import improved_diffusion.unet' >/dev/null 2>&1")
    :format(PY, peer_dir)
  if os.execute(probe) then
    local base = ("/tmp/iddpm_bench_%d_%d"):format(os.time(), math.random(1, 1 << 30))
    local cmd_fifo, reply_fifo = base .. ".cmd", base .. ".reply"
    assert(os.execute(("mkfifo %s %s"):format(cmd_fifo, reply_fifo)))
    assert(os.execute(("IDDPM_PEER=%s OMP_PROC_BIND=true OMP_NUM_THREADS=2 %s %s serve %s %s &"):format(
      sh_quote(peer_dir), PY, sh_quote(script_dir .. "/bench_peer.py"), cmd_fifo, reply_fifo)))
    local w = assert(io.open(cmd_fifo, "w"))
    local r = assert(io.open(reply_fifo, "r"))
    os.remove(cmd_fifo); os.remove(reply_fifo)
    peer = {
      step = function(row)
        w:write(row, "\n"); w:flush()
        local line = r:read("l")
        if not line then error("bench: the peer process ended (see its messages above)") end
        return tonumber(line)
      end,
      close = function() w:write("quit\n"); w:close(); r:close() end,
    }
  else
    print(("bench: IDDPM_PEER=%s set, but %s cannot import torch and improved_diffusion there: no peer"):format(peer_dir, PY))
  end
end

-- ---------------------------------------------------------------- run

local function median(v)
  local s = {}
  for i, x in ipairs(v) do s[i] = x end
  table.sort(s)
  local n = #s
  if n == 0 then return 0 / 0 end
  return n % 2 == 1 and s[(n + 1) // 2] or (s[n // 2] + s[n // 2 + 1]) / 2
end

print(("iddpm bench: %d threads, %d reps per row (median), %s"):format(iddpm.num_threads(), reps,
  peer and ("peer: official code at " .. peer_dir) or "no peer (set IDDPM_PEER to a copy of improved-diffusion)"))
local results = {}
for _, row in ipairs(rows) do
  if not BATCH[row] then error("bench: unknown row " .. row) end
  local f = step_fn(row)
  f()                                   -- warm-up (first-touch allocation, OpenBLAS buffers)
  if peer then peer.step(row) end
  local ours, theirs = {}, {}
  for i = 1, reps do
    -- with a peer, each side runs an untimed step first: the other side's threads may
    -- still spin after its step (OpenBLAS waits up to 2^28 cycles, ~0.1 s, before it
    -- sleeps), and a step right after an idle pause pays for waking its own threads;
    -- the timed step is then one of a run of steps, as in training or sampling
    if peer then f() end
    local t0 = now(); f(); ours[i] = now() - t0
    if peer then peer.step(row); theirs[i] = peer.step(row) end
  end
  f = nil
  collectgarbage(); collectgarbage()
  local b = BATCH[row]
  local r = {row = row, batch = b, ours = b / median(ours), peer = peer and b / median(theirs) or nil,
             ours_best = b / math.min(table.unpack(ours)), peer_best = peer and b / math.min(table.unpack(theirs)) or nil}
  results[#results + 1] = r
  io.write(("%-58s batch %3d  ours %8.2f img/s"):format(TITLE[row], b, r.ours))
  if r.peer then
    -- the ratio of medians, and of best steps (less sensitive to load from elsewhere)
    io.write(("   peer %8.2f img/s   ratio %5.2fx (best steps %5.2fx)"):format(r.peer, r.ours / r.peer,
      r.ours_best / r.peer_best))
  end
  io.write("\n"); io.flush()
end
if peer then peer.close() end

-- ---------------------------------------------------------------- peak memory

if opts.mem then
  for _, row in ipairs({"cifar_train", "small_train"}) do
    local function run(cmd)
      local p = io.popen(cmd)
      local out = p:read("a")
      p:close()
      return tonumber(out:match("(%d+)%s*$"))
    end
    local ours = run(("%s run %s mem %s 2"):format(sh_quote(self_exe), sh_quote(arg[0]), row))
    io.write(("peak memory of a training step, %-12s ours %7.1f MiB"):format(row, (ours or 0) / 1024))
    if peer then
      local theirs = run(("IDDPM_PEER=%s %s %s mem %s 2"):format(sh_quote(peer_dir), PY,
        sh_quote(script_dir .. "/bench_peer.py"), row))
      if theirs then io.write(("   peer %7.1f MiB   ratio %5.2f"):format(theirs / 1024, (ours or 0) / theirs)) end
    end
    io.write("\n")
  end
end
