-- test_train.lua — the training side: bit-exact resume (2N steps straight == N, save,
-- resume, N more: every parameter, EMA, AdamW moment and RNG/data state equal), recipe
-- parsing (unknown keys, type conversion), the data loader (shuffle determinism, flips,
-- position state, malformed files), the CIFAR-10 recipe without data (the download
-- help) and with fake batch files in the real layout, and SIGKILL during training
-- followed by a restart that resumes from the last checkpoint.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local recipe, data, train = iddpm.recipe, iddpm.data, iddpm.train
local checkpoint = require "iddpm.checkpoint"

-- Exact equality: resumed training replays the same float32 operations in the same
-- order with the same random numbers, so nothing but 0 difference is acceptable.
local TOL_EXACT = 0

local TMP = os.tmpname()
os.remove(TMP)
os.execute("mkdir -p " .. TMP)
-- the program running this test: the lowest negative index of `arg`
local BIN = "./iddpm"
if arg then local i = -1; while arg[i - 1] do i = i - 1 end; if arg[i] then BIN = arg[i] end end
print("# seeds: 3 (tiny model), 5 (loader); tmp " .. TMP)

local function sh(cmd) local ok, _, code = os.execute(cmd) return ok and 0 or code end
local function read(path) local f = io.open(path) if not f then return "" end local s = f:read("a") f:close() return s end

-- ---------------------------------------------------------------- recipes

H.raises("recipe: unknown key is an error", function() recipe.resolve({}, {"num_chanels=3"}) end, "unknown train key 'num_chanels'")
H.raises("recipe: unknown key suggests", function() recipe.resolve({}, {"num_chanels=3"}) end, "did you mean 'num_channels'")
H.raises("recipe: unknown key in a recipe says where and how to list the keys", function() recipe.resolve({bogus = 1}) end,
  "'bogus' in the recipe; `iddpm train help` lists the keys")
H.raises("recipe: bad integer", function() recipe.resolve({}, {"batch_size=1.5"}) end, "not an integer")
H.raises("recipe: bad boolean", function() recipe.resolve({}, {"learn_sigma=maybe"}) end, "not a boolean")
H.raises("recipe: not key=value", function() recipe.resolve({}, {"batch_size"}) end, "key=value")
do
  local c = recipe.resolve({image_size = 32, channel_mult = {1, 2, 2, 2}, ema_rate = 0.9999},
    {[0] = "x.lua", "batch_size=64", "learn_sigma=True", "lr=3e-4", "attention_resolutions=16,8", "dropout=0"})
  H.check("recipe: int override", c.batch_size == 64 and math.type(c.batch_size) == "integer")
  H.check("recipe: bool override", c.learn_sigma == true)
  H.check("recipe: float override", c.lr == 3e-4 and math.type(c.lr) == "float")
  H.check("recipe: list value as official string", c.channel_mult == "1,2,2,2" and c.attention_resolutions == "16,8")
  H.check("recipe: number to string key", c.ema_rate == "0.9999")
  H.check("recipe: defaults kept", c.num_heads == 4 and c.resume == "auto" and c.microbatch == -1)
  H.check("recipe: describe marks overrides", recipe.describe(c):find("batch_size%s+64%s+%*") ~= nil)
end
do
  local r = recipe.load("recipes/cifar10_hybrid.lua")
  H.check("recipe file: cifar10_hybrid reads as data", r.num_channels == 128 and r.dropout == 0.3 and r.diffusion_steps == 4000
    and r.noise_schedule == "cosine" and r.learn_sigma == true and r.batch_size == 128 and r.lr == 1e-4)
  for _, name in ipairs{"cifar10_hybrid", "cifar10_vlb", "imagenet64_hybrid", "imagenet64_hybrid_drop0.3", "fashion_mnist_demo"} do
    local ok, err = pcall(function() recipe.resolve(recipe.load("recipes/" .. name .. ".lua")) end)
    H.check("recipe file resolves: " .. name, ok, err)
  end
  local v = recipe.resolve(recipe.load("recipes/cifar10_vlb.lua"))
  H.check("recipe file: cifar10_vlb is L_vlb with importance sampling", v.use_kl and v.schedule_sampler == "loss-second-moment")
end

-- ---------------------------------------------------------------- data loader

do
  local ds = data.random(10, 1, 4, 5)
  local function batches(opts, n, L)
    L = L or data.loader(ds, opts)
    local out = {}
    for i = 1, n do local x, y = L:next(); out[i] = {x:totable(), y:totable()} end
    return out, L
  end
  local function same(a, b)
    for i = 1, #a do
      for k = 1, 2 do for j = 1, #a[i][k] do if a[i][k][j] ~= b[i][k][j] then return false end end end
    end
    return true
  end
  local a = batches({batch_size = 3, seed = 5}, 7)
  local b = batches({batch_size = 3, seed = 5}, 7)
  local c = batches({batch_size = 3, seed = 6}, 7)
  H.check("loader: same seed, same order", same(a, b))
  H.check("loader: other seed, other order", not same(a, c))
  -- epoch = 3 batches of 3 (drop_last): every image once per epoch
  local seen, all = {}, true
  local L = data.loader(ds, {batch_size = 3, seed = 5})
  for _ = 1, 3 do local _, y = L:next(); for _, v in ipairs(y:totable()) do end end
  local st = L:state()
  H.check("loader: position after an epoch", st.epoch == 1 and st.index == 0, ("%d %d"):format(st.epoch, st.index))
  -- every sample of an epoch is distinct: compare images row sums
  local L2 = data.loader(ds, {batch_size = 3, seed = 5, shuffle = true})
  for _ = 1, 3 do
    local x = L2:next()
    for i = 1, 3 do
      local key = table.concat(x:narrow(1, i, 1):totable(), ",")
      if seen[key] then all = false end
      seen[key] = true
    end
  end
  H.check("loader: an epoch visits distinct images", all)
  -- position state resumes exactly
  local L3 = data.loader(ds, {batch_size = 3, seed = 5, flip = true})
  batches(nil, 4, L3)
  local s = L3:state()
  local rest = batches(nil, 3, L3)
  local L4 = data.loader(ds, {batch_size = 3, seed = 5, flip = true})
  L4:set_state(s)
  H.check("loader: set_state continues the same batches", same(rest, batches(nil, 3, L4)))
  -- flips: values are the mirrored rows of the unflipped ones
  local nf = batches({batch_size = 10, seed = 5, shuffle = false}, 1)[1][1]
  local fl = batches({batch_size = 10, seed = 5, shuffle = false, flip = true}, 1)[1][1]
  local flipped, mirrored_ok = 0, true
  for i = 0, 9 do
    local eq, mir = true, true
    for r = 0, 3 do for col = 0, 3 do
      local base = i * 16 + r * 4
      if fl[base + col + 1] ~= nf[base + col + 1] then eq = false end
      if fl[base + col + 1] ~= nf[base + 3 - col + 1] then mir = false end
    end end
    if not eq then flipped = flipped + 1; if not mir then mirrored_ok = false end end
  end
  H.check("loader: flip mirrors some images horizontally", flipped > 0 and flipped < 10 and mirrored_ok, flipped)
  H.check("loader: scaled to [-1,1]", (function() for _, v in ipairs(nf) do if v < -1 or v > 1 then return false end end return true end)())
  H.raises("loader: bad position", function() L4:set_state{epoch = 0, index = 1} end, "not a batch start")
  H.raises("loader: batch larger than dataset", function() data.loader(ds, {batch_size = 11}) end, "larger than the dataset")
end

-- malformed files
do
  local d = TMP .. "/bad_cifar"
  os.execute("mkdir -p " .. d)
  local f = io.open(d .. "/data_batch_1.bin", "wb"); f:write(("x"):rep(100)); f:close()
  H.raises("data: malformed CIFAR file names it", function() data.load{dataset = "cifar10", data_dir = d, image_size = 32} end,
    d .. "/data_batch_1.bin")
  H.raises("data: malformed CIFAR file says what was expected", function() data.load{dataset = "cifar10", data_dir = d, image_size = 32} end,
    "3072 pixel bytes")
  local m = TMP .. "/bad_idx"
  os.execute("mkdir -p " .. m)
  f = io.open(m .. "/train-images-idx3-ubyte", "wb"); f:write("\0\0\8\3\0\0\0\2\0\0\0\28\0\0\0\28abc"); f:close()
  f = io.open(m .. "/train-labels-idx1-ubyte", "wb"); f:write("\0\0\8\1\0\0\0\2\1\2"); f:close()
  H.raises("data: truncated IDX names the file", function() data.load{dataset = "idx", data_dir = m, image_size = 32} end,
    "train-images-idx3-ubyte: idx: file is truncated")
  H.raises("data: missing IDX says what is needed", function() data.load{dataset = "mnist", data_dir = TMP, image_size = 32} end,
    "train-images-idx3-ubyte[.gz]")
  H.raises("data: missing CIFAR dir gives the download", function() data.load{dataset = "cifar10", data_dir = TMP .. "/nope", image_size = 32} end,
    "cifar-10-binary.tar.gz")
  local p = TMP .. "/pngs"
  os.execute("mkdir -p " .. p)
  iddpm.io.png_write(p .. "/cat_1.png", T.full({20, 12, 3}, 200, "uint8"))
  iddpm.io.png_write(p .. "/dog_1.png", T.full({6, 6, 3}, 10, "uint8"))
  local ds = data.load{dataset = "folder", data_dir = p, image_size = 8}
  H.check("data: PNG folder centre-cropped and resized", table.concat(ds.images:shape(), ",") == "2,3,8,8"
    and ds.images:max():item() == 200 and ds.images:min():item() == 10)
  H.check("data: PNG folder classes from file names", table.concat(ds.labels:totable(), ",") == "0,1" and ds.num_classes == 2)
  f = io.open(p .. "/zz_broken.png", "wb"); f:write("not a png"); f:close()
  H.raises("data: malformed PNG names the file", function() data.load{dataset = "folder", data_dir = p, image_size = 8} end, "zz_broken.png")
end

-- ---------------------------------------------------------------- bit-exact resume

local TINY = {
  dataset = "random", image_size = 8, num_images = 20, num_channels = 32, num_res_blocks = 1,
  channel_mult = "1,2", attention_resolutions = "4", dropout = 0.1, learn_sigma = true,
  diffusion_steps = 4, noise_schedule = "cosine", schedule_sampler = "loss-second-moment",
  batch_size = 8, microbatch = 3, log_interval = 2, save_interval = 100, random_flip = true,
  ema_rate = "0.9,0.99", num_samples = 0, seed = 3, keep_checkpoints = 0,
}
local function tiny(over)
  local c = {}
  for k, v in pairs(TINY) do c[k] = v end
  for k, v in pairs(over) do c[k] = v end
  return recipe.resolve(c)
end

do
  local a, b = TMP .. "/straight", TMP .. "/resumed"
  train.run(tiny{run_dir = a, max_steps = 6}, {quiet = true})
  train.run(tiny{run_dir = b, max_steps = 3}, {quiet = true})
  local r = train.run(tiny{run_dir = b, max_steps = 6}, {quiet = true})
  H.check("resume: continued to step 6", r.step == 6)
  local A = checkpoint.read(checkpoint.filename(a, 6))
  local B = checkpoint.read(checkpoint.filename(b, 6))
  local n, bad, kinds = 0, {}, {}
  for k, ta in pairs(A.tensors) do
    local tb = B.tensors[k]
    if k == "extra.loss_curve" then goto continue end   -- logging only: the stopped run logged step 3 too
    n = n + 1
    if not tb then bad[#bad + 1] = k .. " missing"
    else
      local d = (ta:double() - tb:double()):abs():max():item()
      if d > TOL_EXACT then bad[#bad + 1] = ("%s differs by %g"):format(k, d) end
    end
    kinds[k:match("^([^.]+)")] = true
    ::continue::
  end
  H.check("resume: 6 straight == 3 + resume + 3, every tensor bit-exact", #bad == 0 and n > 100, bad[1])
  H.check("resume: checkpoint holds model, 2 EMAs, AdamW moments, RNG, data position, sampler history",
    kinds.model and kinds["ema_0"] and kinds.opt and A.tensors["extra.rng"] and A.tensors["extra.data_pos"]
    and A.tensors["extra.sampler_history"] and A.tensors["ema_0.99.out.2.weight"] ~= nil)
  H.check("resume: log.jsonl and loss.png written", read(b .. "/log.jsonl"):find('"step":6') ~= nil
    and io.open(b .. "/loss.png") ~= nil)
  H.check("resume: loss curve carried over", B.tensors["extra.loss_curve"]:size(1) == 4)
  local c = A.config
  H.check("checkpoint: config in metadata", c.num_channels == 32 and c.in_channels == 3 and c.learn_sigma == true)
  H.raises("resume: refuses another architecture", function()
    train.run(tiny{run_dir = b, max_steps = 7, num_channels = 64}, {quiet = true})
  end, "num_channels=32")
end

-- microbatch mean: gradients do not depend on the microbatch size (up to rounding)
do
  local function one(mb)
    local tr = train.new(tiny{run_dir = TMP .. "/mb" .. mb, microbatch = mb, dropout = 0, schedule_sampler = "uniform",
      resume = "none"}, {quiet = true})
    tr:step_once()
    local v = tr.model:parameters()[1]:totable()
    tr:close()
    return v
  end
  -- same t and noise per sample only when mb = B; compare mb=-1 with itself via a fresh run
  local x1, x2 = one(-1), one(-1)
  H.close("train: a step is deterministic", x1, x2, 0)
end

-- ---------------------------------------------------------------- subprocesses

do
  local out = TMP .. "/out.txt"
  local rc = sh(("%s run recipes/cifar10_hybrid.lua data_dir=%s/no_such_dir run_dir=%s/c0 >%s 2>&1"):format(BIN, TMP, TMP, out))
  local s = read(out)
  H.check("cifar10 recipe without data: fails", rc ~= 0)
  H.check("cifar10 recipe without data: says where to get it", s:find("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", 1, true)
    and s:find("data_batch_1.bin", 1, true), s:sub(1, 300))
  -- fake CIFAR batches in the real layout: 5 files of 6 records each
  local d = TMP .. "/cifar-10-batches-bin"
  os.execute("mkdir -p " .. d)
  for i = 1, 5 do
    local f = io.open(("%s/data_batch_%d.bin"):format(d, i), "wb")
    for r = 1, 6 do
      f:write(string.char((r + i) % 10))
      local px = {}
      for p = 1, 3072 do px[p] = string.char((p * 7 + r * 13 + i) % 256) end
      f:write(table.concat(px))
    end
    f:close()
  end
  rc = sh(("%s run recipes/cifar10_hybrid.lua data_dir=%s run_dir=%s/c1 num_channels=32 num_res_blocks=1 batch_size=2 " ..
    "max_steps=2 log_interval=1 diffusion_steps=100 num_samples=2 sample_steps=2 >%s 2>&1"):format(BIN, d, TMP, out))
  s = read(out)
  H.check("cifar10 recipe with fake batches: trains 2 steps", rc == 0 and s:find("step 2/2") and s:find("30 images")
    and io.open(TMP .. "/c1/ckpt_00000002.safetensors") ~= nil, s:sub(-600))
  H.check("cifar10 recipe: prints the resolved config", s:find("num_channels%s+32") ~= nil)
  H.check("cifar10 recipe: sample grid written", io.open(TMP .. "/c1/samples_00000002.png") ~= nil)

  -- SIGKILL mid-training, then restart: resumes from the last checkpoint
  local rd = TMP .. "/killed"
  local args = ("dataset=random image_size=8 num_images=16 num_channels=32 num_res_blocks=1 channel_mult=1,2 " ..
    "attention_resolutions=4 batch_size=4 save_interval=2 log_interval=1 num_samples=0 run_dir=%s"):format(rd)
  local pidf = TMP .. "/pid"
  sh(("sh -c 'echo $$ > %s; exec %s run recipes/fashion_mnist_demo.lua %s max_steps=1000 >%s/k.txt 2>&1' &"):format(pidf, BIN, args, TMP))
  local pid
  for _ = 1, 600 do
    sh("sleep 0.1")
    pid = pid or read(pidf):match("%d+")
    if checkpoint.latest(rd) and checkpoint.latest(rd).step >= 4 then break end
  end
  local before = checkpoint.latest(rd)
  if pid then sh("kill -9 " .. pid) end
  sh("sleep 0.3")
  H.check("sigkill: a checkpoint was written before the kill", before ~= nil and before.step >= 4)
  local last = checkpoint.latest(rd)
  rc = sh(("%s run recipes/fashion_mnist_demo.lua %s max_steps=%d >%s 2>&1"):format(BIN, args, (last and last.step or 0) + 2, out))
  s = read(out)
  H.check("sigkill: restart resumes from the last checkpoint", rc == 0 and last and
    s:find("resumed from step " .. last.step, 1, true) ~= nil, s:sub(-400))
  local ok = pcall(checkpoint.read, checkpoint.latest(rd).path)
  H.check("sigkill: checkpoints stay readable", ok)

  -- Ctrl-C (SIGINT): the loop stops, saves a checkpoint of the current step and exits
  local rd2 = TMP .. "/interrupted"
  local args2 = args:gsub("save_interval=2", "save_interval=1000"):gsub("run_dir=%S+", "run_dir=" .. rd2)
  sh(("sh -c 'echo $$ > %s; exec %s run recipes/fashion_mnist_demo.lua %s max_steps=1000 >%s/i.txt 2>&1' &"):format(pidf, BIN, args2, TMP))
  pid = nil
  for _ = 1, 600 do
    sh("sleep 0.1")
    pid = read(pidf):match("%d+")
    if read(TMP .. "/i.txt"):find("step 3/", 1, true) then break end
  end
  if pid then sh("kill -INT " .. pid) end
  for _ = 1, 300 do if sh("kill -0 " .. (pid or 0) .. " 2>/dev/null") ~= 0 then break end sh("sleep 0.1") end
  s = read(TMP .. "/i.txt")
  local at = tonumber(s:match("interrupted at step (%d+): saving"))
  H.check("sigint: saves the current step and stops", at and at >= 3 and io.open(checkpoint.filename(rd2, at)) ~= nil
    and s:find(("iddpm: interrupted: saved checkpoint at step %d; run the same command to resume"):format(at), 1, true) ~= nil
    and not s:find("traceback", 1, true), s:sub(-300))
end

-- Ctrl-C during a section that must complete (the weight update): only recorded while
-- deferred, raised when the section ends. The signal goes to this process (the parent of
-- os.execute's shell); a raise inside the section, or none after it, fails the check.
do
  local data = require "iddpm.data"
  data.defer_interrupt(true)
  local ok_during = pcall(function()
    -- system() ignores SIGINT while it waits, so the kill comes from a background job
    os.execute("(sleep 0.2; kill -INT $PPID) &")
    local t0, x = require("iddpm").wall_time(), 0
    while require("iddpm").wall_time() - t0 < 1.5 do x = x + 1 end   -- the hook would fire here
    return x
  end)
  local ok_after, err = pcall(data.defer_interrupt, false)
  data.clear_interrupt()
  H.check("defer_interrupt: Ctrl-C waits for the end of the section", ok_during and not ok_after
    and tostring(err):find("interrupted", 1, true) ~= nil, tostring(err))
end

os.execute("rm -rf " .. TMP)

-- AdamW against the update written out in float64 (torch.optim.AdamW's formula), on
-- 70001 parameters (8-lane blocks, a tail of 1, both threads) for 3 steps with weight
-- decay. Compared: the change of each parameter (~lr = 1e-2), whose float32 rounding
-- (parameters of order 1: 6e-8 absolute per step) bounds ADAMW_TOL, relative to the
-- change or to lr, whichever is larger.
do
  local ADAMW_TOL = 1e-4
  local n = 70001
  local p = T.randn({n}); p.requires_grad = true
  local opt = iddpm.optim.adamw({p}, {lr = 1e-2, weight_decay = 0.1})
  local p0 = p:totable()
  local pw, m, v = p:totable(), {}, {}
  for i = 1, n do m[i], v[i] = 0, 0 end
  for step = 1, 3 do
    opt:zero_grad()
    local g = T.randn({n})
    ;(p * g):sum():backward()      -- p.grad = g
    opt:step()
    local gt = g:totable()
    local bc1, bc2 = 1 - 0.9 ^ step, 1 - 0.999 ^ step
    for i = 1, n do
      m[i] = 0.9 * m[i] + 0.1 * gt[i]
      v[i] = 0.999 * v[i] + 0.001 * gt[i] * gt[i]
      pw[i] = pw[i] * (1 - 1e-2 * 0.1) - 1e-2 / bc1 * m[i] / (math.sqrt(v[i]) / math.sqrt(bc2) + 1e-8)
    end
  end
  local got, worst = p:totable(), 0
  for i = 1, n do
    local dw, dg = pw[i] - p0[i], got[i] - p0[i]
    local e = math.abs(dg - dw) / math.max(math.abs(dw), 1e-2)
    if e > worst then worst = e end
  end
  H.check("AdamW (weight decay, 3 steps, 70001 params): updates vs float64", worst <= ADAMW_TOL,
    ("worst rel err %.3g > %.3g"):format(worst, ADAMW_TOL))
end
H.done()
