-- iddpm/cli/fid.lua — `iddpm fid ...`: FID from the command line, in one line.
--
--   iddpm fid ckpt=RUN num_samples=N [steps=S] stats=FILE [key=value ...]
--       samples a checkpoint batch by batch and streams each batch through the Inception
--       (no image is kept), then prints the FID against the reference statistics;
--       real_features=F.npz adds precision/recall (k=3)
--   iddpm fid samples=NPZ|DIR stats=FILE      FID of images already sampled
--   iddpm fid stats data=PATH out=FILE [split=train] [num=N]
--       reference statistics of a dataset: a folder of Fashion-MNIST/MNIST IDX files or
--       CIFAR-10 batches, one IDX / CIFAR .bin file, an .npz (arr_0 NHWC uint8: ImageNet-64
--       batches, sample files) or a folder of PNGs; out=X.npz writes mu, sigma (float64,
--       the pytorch-fid / ADM layout), out=X.safetensors adds metadata, a name without
--       either extension writes both.
-- The Inception weights default to M.default_weights() (`make fid-weights`).
-- All key=value parsing is in parse() below (one place).
local iddpm = require "iddpm"
local M = require "iddpm.metrics"
local io_ = iddpm.io

local F = {}

local function fail(msg) error(msg, 0) end

-- key -> {type, help}; types: str, int (positive), int0 (non-negative), num, bool
local INCEPTION = {
  weights = {"str", "FID Inception weights (default: $IDDPM_INCEPTION or ~/.cache/iddpm/" .. M.WEIGHTS_FILE .. ")"},
  fid_batch = {"int", "images per Inception batch (50)"},
  resize = {"str", "tf1 (default: the TF graph's resize) or pytorch (pytorch-fid's F.interpolate)"},
  threads = {"int", "engine threads (default: all cores)"},
  progress = {"bool", "progress line with ETA on stderr (true)"},
}
F.EVAL = {
  ckpt = {"str", "run directory (newest ckpt_*.safetensors) or checkpoint file: sample it"},
  samples = {"str", "or: images already sampled (.npz arr_0, IDX, CIFAR .bin, folder of PNGs)"},
  stats = {"str", "reference statistics (.npz mu/sigma or .safetensors; required)"},
  num_samples = {"int", "images to sample, or the first N of samples= (default: 50000 with ckpt=, all of samples=)"},
  steps = {"str", "sampling steps: a number like 250, sections 10,15,20, or ddim50 (default: the checkpoint's)"},
  sampler = {"str", "ddpm | ddim (default: ddim for steps=ddimN)"},
  eta = {"num", "DDIM eta (0)"},
  batch_size = {"int", "images per sampling batch (16)"},
  seed = {"int0", "seed (0): sample i uses stream i, as iddpm sample"},
  use_ema = {"bool", "EMA weights (true)"},
  ema_rate = {"str", "which EMA rate (default 0.9999 or the only one)"},
  clip_denoised = {"bool", "clip predicted x_0 to [-1,1] (true)"},
  class = {"str", "class-conditional models: K or random (default random)"},
  real_features = {"str", "reference features .npz (iddpm fid stats ... features=F.npz): adds precision/recall"},
  k = {"int", "k of precision/recall (3)"},
  out = {"str", "also write the result as JSON to this file"},
  device = {"str", "cpu (default) or cuda: where the diffusion model runs (the Inception runs on the CPU)"},
  split = {"str", "split of a dataset folder given as samples= (test)"},
}
F.STATS = {
  data = {"str", "dataset: IDX/CIFAR folder or file, .npz (arr_0), folder of PNGs (required)"},
  out = {"str", "output: X.npz, X.safetensors, or X (both) (required)"},
  split = {"str", "train (default) or test"},
  num = {"int", "the first N images only"},
  features = {"str", "also save the features (.npz, key features) for precision/recall"},
}
for _, spec in ipairs{F.EVAL, F.STATS} do for k, v in pairs(INCEPTION) do spec[k] = v end end

local function keys_of(spec)
  local k = {}
  for n in pairs(spec) do k[#k + 1] = n end
  table.sort(k)
  return k
end

-- {"key=value", ...} -> table, every value converted to its type; unknown keys are errors
function F.parse(args, spec)
  local o = {}
  for _, a in ipairs(args) do
    local k, v = tostring(a):match("^%-*([%w_]+)=(.*)$")
    if not k then fail(("bad argument '%s': expected key=value (iddpm fid help)"):format(tostring(a))) end
    local s = spec[k]
    if not s then fail(("unknown option '%s'; valid: %s"):format(k, table.concat(keys_of(spec), ", "))) end
    local ty = s[1]
    if ty == "int" or ty == "int0" then
      local n = math.tointeger(tonumber(v))
      if not n or n < (ty == "int" and 1 or 0) then
        fail(("%s=%s: expected a %s integer"):format(k, v, ty == "int" and "positive" or "non-negative"))
      end
      v = n
    elseif ty == "num" then
      local n = tonumber(v)
      if not n then fail(("%s=%s: expected a number"):format(k, v)) end
      v = n
    elseif ty == "bool" then
      local l = v:lower()
      if l == "true" or l == "1" or l == "yes" then v = true
      elseif l == "false" or l == "0" or l == "no" then v = false
      else fail(("%s=%s: expected true or false"):format(k, v)) end
    end
    o[k] = v
  end
  return o
end

local function usage(spec, head)
  print(head .. "\n\noptions:")
  for _, k in ipairs(keys_of(spec)) do print(("  %-16s %s"):format(k, spec[k][2])) end
end

local function fmt_time(s)
  if s ~= s or s == math.huge then return "?" end
  if s < 60 then return ("%.0fs"):format(s) end
  if s < 3600 then return ("%dm%02ds"):format(s // 60, math.floor(s % 60)) end
  return ("%dh%02dm"):format(s // 3600, math.floor(s % 3600 / 60))
end

local function write_json(path, t)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "wb"))
  f:write(io_.json_encode(t), "\n")
  f:close()
  assert(os.rename(tmp, path))
end

local function inception(o)
  if o.threads then iddpm.num_threads(o.threads) end
  local w = o.weights or M.default_weights()
  return M.inception(w, {resize = o.resize}), w
end

-- ---------------------------------------------------------------- iddpm fid stats

function F.stats(args)
  local o = F.parse(args, F.STATS)
  if not o.data or not o.out then fail("iddpm fid stats: data= and out= are required (iddpm fid help)") end
  local net, w = inception(o)
  local images = M.read_images(o.data, {split = o.split or "train", num = o.num})
  local s = images:shape()
  print(("fid stats: %d images (%dx%dx%d) from %s [%s], Inception %s, resize %s"):format(s[1], s[2], s[3], s[4],
    o.data, o.split or "train", w, net.resize))
  local stream = net:stream{batch_size = o.fid_batch, total = s[1], progress = o.progress ~= false,
    keep = o.features ~= nil, label = "fid stats"}
  stream:add(images)
  local mu, sigma, n = stream:get()
  local out = o.out
  local written = {}
  local meta = {source = o.data, split = o.split or "train", resize = net.resize, weights = w}
  if out:match("%.npz$") or out:match("%.safetensors$") then
    M.save_stats(out, mu, sigma, n, meta)
    written[1] = out
  else
    M.save_stats(out .. ".npz", mu, sigma, n)
    M.save_stats(out .. ".safetensors", mu, sigma, n, meta)
    written = {out .. ".npz", out .. ".safetensors"}
  end
  if o.features then
    io_.npz_write(o.features, {{"features", stream:features()}})
    written[#written + 1] = o.features
  end
  print(("fid stats: n = %d in %s (%.1f img/s); wrote %s"):format(n, fmt_time(stream:seconds()),
    n / stream:seconds(), table.concat(written, ", ")))
  return mu, sigma, n
end

-- ---------------------------------------------------------------- iddpm fid (evaluate)

local function sample_into(stream, o)
  local S = require "iddpm.sample"
  local image = require "iddpm.image"
  local dev = require("iddpm.device").setup(o.device or "cpu", "auto", "sample")
  local model, diff, info = S.load(o.ckpt, {use_ema = o.use_ema, steps = o.steps, sampler = o.sampler,
    ema_rate = o.ema_rate, device = dev})
  local nc = info.unet.num_classes
  local N, B = o.num_samples or 50000, math.min(o.batch_size or 16, o.num_samples or 50000)
  local cls = o.class
  if nc and not cls then cls = "random" end
  if cls and not nc then fail(("class=%s given, but this checkpoint is unconditional"):format(cls)) end
  if cls and cls ~= "random" then
    local c = math.tointeger(tonumber(cls))
    if not c or c < 0 or c >= nc then fail(("class=%s: expected random or 0..%d"):format(cls, nc - 1)) end
    cls = c
  end
  local labels = S.make_labels(cls, N, nc, o.seed)
  local K = diff.num_timesteps
  print(("fid: checkpoint %s (step %s), %s weights, sampler %s, %d steps, %d samples in batches of %d, seed %d")
    :format(info.path, tostring(info.step), info.weights, info.sampler, K, N, B, o.seed or 0))
  local nb = (N + B - 1) // B
  local t0 = iddpm.wall_time()
  local show = o.progress ~= false
  for b = 0, nb - 1 do
    local first = b * B
    local n = math.min(B, N - first)
    local x = S.sample_batch(model, diff, first, n, {seed = o.seed or 0, clip_denoised = o.clip_denoised ~= false,
      labels = labels, sampler = info.sampler, eta = o.eta or 0,
      on_step = show and function(j)
        local done = b + j / K            -- batches done, counting sampling only
        local dt = iddpm.wall_time() - t0
        io.stderr:write(("\rfid: batch %d/%d step %d/%d, %d/%d images, ETA %s   "):format(b + 1, nb, j, K, first,
          N, fmt_time(dt * (nb - done) / math.max(done, 1e-9))))
      end or nil})
    stream:add(image.to_uint8(x))
  end
  if show then io.stderr:write("\n") end
  return {checkpoint = info.path, step = info.step, weights_used = info.weights, sampler = info.sampler, steps = K,
    seed = o.seed or 0, seconds = iddpm.wall_time() - t0}
end

function F.evaluate(args)
  local o = F.parse(args, F.EVAL)
  if not o.stats then fail("iddpm fid: stats= is required (make it with: iddpm fid stats data=... out=...)") end
  if (o.ckpt == nil) == (o.samples == nil) then fail("iddpm fid: give either ckpt= (sample it) or samples=") end
  local mu_r, sigma_r = M.load_stats(o.stats)            -- clear errors before any long work
  local rf = o.real_features and io_.npz_read(o.real_features).features
  if o.real_features and not rf then fail(("%s has no 'features' array"):format(o.real_features)) end
  local net, w = inception(o)
  local res
  local stream
  if o.ckpt then
    stream = net:stream{batch_size = o.fid_batch, keep = rf ~= nil, label = "fid"}
    res = sample_into(stream, o)
  else
    local images = M.read_images(o.samples, {num = o.num_samples, split = o.split or "test"})
    stream = net:stream{batch_size = o.fid_batch, total = images:shape()[1], progress = o.progress ~= false,
      keep = rf ~= nil, label = "fid"}
    stream:add(images)
    res = {samples = o.samples}
  end
  local mu, sigma, n = stream:get()
  local fid, parts = M.frechet_distance(mu, sigma, mu_r, sigma_r)
  res.fid, res.mean_term, res.trace_term, res.offset, res.n = fid, parts.mean, parts.trace, parts.offset, n
  res.stats, res.inception, res.resize = o.stats, w, net.resize
  if n < 50000 then
    print(("fid: note: %d images; FID is biased upwards at small n (published numbers use 50,000)"):format(n))
  end
  print(("FID %.4f  (mean term %.4f, trace term %.4f; n = %d, stats %s%s)"):format(fid, parts.mean, parts.trace, n,
    o.stats, parts.offset > 0 and ", 1e-6 offset used" or ""))
  if rf then
    local p, r = M.precision_recall(rf, stream:features(), {k = o.k or 3})
    res.precision, res.recall, res.k = p, r, o.k or 3
    print(("precision %.4f  recall %.4f  (k = %d, %d real features)"):format(p, r, o.k or 3, rf:shape()[1]))
  end
  if o.out then write_json(o.out, res) end
  return res
end

function F.main(...)
  local args = {...}
  local a1 = args[1]
  if a1 == nil or a1 == "help" or a1 == "--help" or a1 == "-h" then
    usage(F.EVAL, "usage: iddpm fid ckpt=RUN num_samples=N [steps=S] stats=FILE [key=value ...]\n"
      .. "       iddpm fid samples=NPZ|DIR stats=FILE [key=value ...]\n"
      .. "       iddpm fid stats data=PATH out=FILE [key=value ...]   (iddpm fid stats help)")
    if a1 == nil then fail("iddpm fid: ckpt= or samples=, and stats=, are required") end
    return
  end
  if a1 == "stats" then
    table.remove(args, 1)
    if args[1] == nil or args[1] == "help" or args[1] == "--help" then
      usage(F.STATS, "usage: iddpm fid stats data=PATH out=FILE [key=value ...]")
      if args[1] == nil then fail("iddpm fid stats: data= and out= are required") end
      return
    end
    return F.stats(args)
  end
  return F.evaluate(args)
end

return F
