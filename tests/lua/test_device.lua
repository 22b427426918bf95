-- test_device.lua — `device=cuda` end to end without a GPU. Part 1 (this process, a
-- machine without a GPU): device=cuda fails at start with a clear message in training,
-- sampling (`iddpm sample`) and eval_nll, before any file is written. Part 2 (a child
-- process with IDDPM_FAKE_CUDA=1, where the CPU backend serves the "cuda" device): a
-- tiny training run on "cuda" keeps model, EMA, AdamW moments on the device and matches
-- the CPU run; checkpoints resume across devices both ways; a checkpoint samples on
-- either device with the same images; tests/cuda/test_diffusion_ops.lua passes.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local recipe, train = iddpm.recipe, iddpm.train
local checkpoint = require "iddpm.checkpoint"

-- Both devices compute the loss with diffusion_kernels.h (engine/cpu/diffusion.c, the
-- CPU backend serving both under the fake device): the same double arithmetic; the
-- device run moves its data through the device plumbing (uploads, coefficient tables,
-- multi-tensor optimizer lists). After 4 AdamW steps (lr 1e-4) the parameters agree to
-- far better than this:
local TOL_PARAM = 4e-6      -- max |a - b| of any parameter / EMA / moment: 1% of the 4e-4 that
                            -- 4 steps at lr 1e-4 can move a weight (measured: 2.4e-7)
local TOL_LOSS = 1e-5       -- relative, logged losses
local TOL_PIXEL = 1         -- uint8 levels between images sampled on either device

local BIN = "./iddpm"
if arg then local i = -1; while arg[i - 1] do i = i - 1 end; if arg[i] then BIN = arg[i] end end
local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local TINY = {
  dataset = "random", image_size = 8, num_images = 20, num_channels = 32, num_res_blocks = 1,
  channel_mult = "1,2", attention_resolutions = "4", dropout = 0.1, learn_sigma = true,
  diffusion_steps = 4, noise_schedule = "cosine", batch_size = 8, log_interval = 2, save_interval = 100,
  ema_rate = "0.9", num_samples = 0, seed = 3, keep_checkpoints = 0,
}
local function tiny(over)
  local c = {}
  for k, v in pairs(TINY) do c[k] = v end
  for k, v in pairs(over) do c[k] = v end
  return recipe.resolve(c)
end

local function exists(p) local f = io.open(p) if f then f:close() return true end return false end

-- max |a - b| over every tensor of two checkpoints (model, EMA, AdamW moments)
local function ckpt_diff(pa, pb)
  local a, b = checkpoint.read(pa).tensors, checkpoint.read(pb).tensors
  local worst, n = 0, 0
  for k, ta in pairs(a) do
    if not k:find("^extra%.") then
      local tb = b[k]
      if not tb then return math.huge, "missing " .. k end
      local d = (ta:double() - tb:double()):abs():max():item()
      if d > worst then worst = d end
      n = n + 1
    end
  end
  return worst, ("%d tensors"):format(n)
end

if arg[1] ~= "fake" then
  -- ------------------------------------------------------------ part 1: no GPU
  H.raises("recipe: device must be cpu or cuda", function() recipe.resolve({}, {"device=gpu"}) end, "expected one of cpu, cuda")
  H.raises("recipe: precision names", function() recipe.resolve({}, {"precision=fp16"}) end, "expected one of auto, fp32, tf32, bf16")
  do
    local c = recipe.resolve({}, {})
    H.check("recipe: device defaults to cpu, precision to auto", c.device == "cpu" and c.precision == "auto")
  end
  local TMP = os.tmpname()
  os.remove(TMP)
  os.execute("mkdir -p " .. TMP)
  print("# seed 3 (tiny model); tmp " .. TMP)
  if iddpm.cuda.available() then
    print("ok - skipped: no-GPU messages (this machine has a GPU)")
  else
    local dir = TMP .. "/gpu_run"
    H.raises("train device=cuda without a GPU: clear error", function() train.run(tiny{run_dir = dir, device = "cuda"}, {quiet = true}) end,
      "device=cuda, but no CUDA GPU can be used")
    H.check("train device=cuda without a GPU: no run directory written", not exists(dir .. "/log.jsonl") and not exists(dir))
    -- the program: the message and exit status 1 (a Lua error, not a crash)
    train.run(tiny{run_dir = TMP .. "/cpu_run", max_steps = 1}, {quiet = true})
    local function run(cmd)
      local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
      local out = p:read("a")
      p:close()
      return out, tonumber(out:match("rc=(%d+)%s*$"))
    end
    for _, c in ipairs({
      {"iddpm train device=cuda", ("%s train dataset=random image_size=8 num_channels=32 channel_mult=1 run_dir=%s device=cuda")
        :format(sh_quote(BIN), sh_quote(TMP .. "/cli_run"))},
      {"iddpm sample device=cuda", ("%s sample ckpt=%s device=cuda out=%s"):format(sh_quote(BIN), sh_quote(TMP .. "/cpu_run"),
        sh_quote(TMP .. "/samples"))},
      {"eval_nll device=cuda", ("%s run tools/eval_nll.lua checkpoint=%s data=%s device=cuda"):format(sh_quote(BIN),
        sh_quote(TMP .. "/cpu_run"), sh_quote(TMP))},
    }) do
      local out, rc = run(c[2])
      H.check(c[1] .. " without a GPU: clear message, exit status " .. tostring(rc),
        rc == 1 and out:find("device=cuda, but no CUDA GPU can be used", 1, true) ~= nil, out)
    end
    H.check("iddpm sample device=cuda without a GPU: no output directory", not exists(TMP .. "/samples"))
  end
  -- ------------------------------------------------------------ part 2: the fake device
  local p = io.popen(("IDDPM_FAKE_CUDA=1 %s run tests/lua/test_device.lua fake %s 2>&1; echo \"rc=$?\""):format(sh_quote(BIN),
    sh_quote(TMP)))
  local rc
  for line in p:lines() do
    local r = line:match("^rc=(%d+)$")
    if r then rc = tonumber(r) else print(line) end
  end
  p:close()
  H.check("fake-device child process exits 0", rc == 0, "status " .. tostring(rc))
  os.execute("rm -rf " .. sh_quote(TMP))
  H.done()
  return
end

-- -------------------------------------------------------------- part 2 (IDDPM_FAKE_CUDA=1)
local TMP = arg[2]
H.check("fake device: cuda available", iddpm.cuda.available())

-- the trainer's state lives on the device
do
  local tr = train.new(tiny{run_dir = TMP .. "/state", device = "cuda", precision = "fp32"}, {quiet = true})
  tr:step_once()
  local p1 = tr.model:parameters()[1]
  H.check("device=cuda: parameters, AdamW moments, EMA on the device", p1:device() == "cuda" and tr.opt.m[1]:device() == "cuda"
    and tr.opt.v[1]:device() == "cuda" and tr.emas[1].ema.shadow[1]:device() == "cuda")
  H.check("device=cuda: gradients on the device", p1.grad ~= nil and p1.grad:device() == "cuda")
  tr:close()
end

-- the same run on both devices, and resumes across devices
local runs = {
  cpu4 = {{device = "cpu", max_steps = 4}},
  gpu4 = {{device = "cuda", max_steps = 4}},
  gpu2_cpu4 = {{device = "cuda", max_steps = 2}, {device = "cpu", max_steps = 4}},
  cpu2_gpu4 = {{device = "cpu", max_steps = 2}, {device = "cuda", max_steps = 4}},
}
local res = {}
for name, legs in pairs(runs) do
  for _, leg in ipairs(legs) do
    res[name] = train.run(tiny{run_dir = TMP .. "/" .. name, device = leg.device, max_steps = leg.max_steps}, {quiet = true})
  end
end
local ref = checkpoint.filename(TMP .. "/cpu4", 4)
for _, name in ipairs({"gpu4", "gpu2_cpu4", "cpu2_gpu4"}) do
  local d, info = ckpt_diff(checkpoint.filename(TMP .. "/" .. name, 4), ref)
  H.check(("%s: step-4 checkpoint matches the CPU run (max diff %.2e over %s, tol %.0e)"):format(name, d, info, TOL_PARAM),
    d <= TOL_PARAM)
end
H.check("gpu4: loss logged like the CPU run", res.gpu4.loss and res.cpu4.loss
  and math.abs(res.gpu4.loss - res.cpu4.loss) <= TOL_LOSS * math.abs(res.cpu4.loss),
  ("%s vs %s"):format(tostring(res.gpu4.loss), tostring(res.cpu4.loss)))
do
  local ck = T.load(checkpoint.filename(TMP .. "/gpu4", 4))
  local any = ck["model.out.2.weight"] or select(2, next(ck))
  H.check("a device checkpoint loads as CPU tensors", any:device() == "cpu")
end

-- a device-trained checkpoint samples on the CPU and a CPU one on the device: same images
do
  local S = require "iddpm.sample"
  local imgs = {}
  for _, case in ipairs({{"gpu4", "cpu"}, {"gpu4", "cuda"}, {"cpu4", "cuda"}, {"cpu4", "cpu"}}) do
    local out = ("%s/samples_%s_%s"):format(TMP, case[1], case[2])
    local r = S.main("ckpt=" .. TMP .. "/" .. case[1], "num_samples=3", "batch_size=2", "seed=5", "progress=false",
      "save_each=false", "device=" .. case[2], "out=" .. out)
    imgs[case[1] .. "@" .. case[2]] = r.images:double()
    H.check(("sample %s on %s: images on the CPU"):format(case[1], case[2]), r.images:device() == "cpu")
  end
  local function px(a, b) return (imgs[a] - imgs[b]):abs():max():item() end
  H.check(("gpu4 sampled on cpu == on cuda (max %d levels)"):format(px("gpu4@cpu", "gpu4@cuda")), px("gpu4@cpu", "gpu4@cuda") <= TOL_PIXEL)
  H.check(("cpu4 sampled on cuda == on cpu (max %d levels)"):format(px("cpu4@cuda", "cpu4@cpu")), px("cpu4@cuda", "cpu4@cpu") <= TOL_PIXEL)
end

-- the train CLI with device=cuda and a sample grid at the end (sampling on the device)
do
  local r = train.run(tiny{run_dir = TMP .. "/grid", device = "cuda", max_steps = 2, num_samples = 4, sample_steps = "4"}, {quiet = true})
  H.check("device=cuda: the final sample grid is written", r.grid ~= nil and exists(r.grid), tostring(r.grid))
end

-- the device-side evaluation terms (the cross-backend file for `make test-cuda`)
do
  local p = io.popen(("IDDPM_FAKE_CUDA=1 %s run tests/cuda/test_diffusion_ops.lua 2>&1; echo \"rc=$?\""):format(sh_quote(BIN)))
  local rc
  for line in p:lines() do
    local r = line:match("^rc=(%d+)$")
    if r then rc = tonumber(r) elseif line:find("^ok ") or line:find("^not ok ") then print(line:gsub("^(n?o?t? ?ok %- )", "%1diffusion_ops: ")) else print(line) end
  end
  p:close()
  H.check("test_diffusion_ops.lua (fake device) exits 0", rc == 0, "status " .. tostring(rc))
end

H.done()
