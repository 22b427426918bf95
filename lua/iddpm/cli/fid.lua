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

local cfg = require "iddpm.config"
local function fail(msg) cfg.error(msg) end   -- a user error: "iddpm: msg", exit 2

-- f(...), with a failure on the user's input (a missing weights, statistics or data file)
-- turned into a user error (no traceback, exit 2)
local function user(f, ...)
  local r = table.pack(pcall(f, ...))
  if r[1] then return table.unpack(r, 2, r.n) end
  if cfg.is_user_error(r[2]) then error(r[2], 0) end
  fail((tostring(r[2]):gsub("^[^\n:]*:%d+: ", "")))
end

local function inception_keys(list, batch_key) return M.inception_keys(list, batch_key, {progress = true}) end

F.EVAL = cfg.schema("fid", inception_keys({
  {"stats", "str", "", "reference statistics (.npz mu/sigma or .safetensors)", required = true, group = "inputs"},
  {"ckpt", "str", "", "run directory (newest ckpt_*.safetensors) or checkpoint file: sample it",
    aliases = {"checkpoint"}},
  {"samples", "str", "", "or: images already sampled (.npz arr_0, IDX, CIFAR .bin, folder of PNGs)"},
  {"split", "str", "test", "split when samples= is a dataset folder", one_of = {"train", "test"}},
  {"num_samples", "int", 0, "images to sample (0: 50000 with ckpt=) or the first N of samples= (0: all)",
    min = 0, aliases = {"num"}},
  {"steps", "str", "", "sampling steps: 250, sections 10,15,20, or ddim50 (default: the checkpoint's)",
    group = "sampling"},
  {"sampler", "str", "", "ddpm | ddim (default: ddim for steps=ddimN)", one_of = {"", "ddpm", "ddim"}},
  {"eta", "num", 0, "DDIM eta", min = 0},
  {"batch_size", "int", 16, "images per sampling batch", min = 1, max = 100000},
  {"seed", "int", 0, "seed: sample i uses stream i, as iddpm sample", min = 0},
  {"use_ema", "bool", true, "EMA weights", aliases = {"ema"}},
  {"ema_rate", "str", "", "which EMA rate (default 0.9999 or the only one)"},
  {"clip_denoised", "bool", true, "clip predicted x_0 to [-1,1]"},
  {"class", "str", "", "class-conditional models: K or random (default random)"},
  {"device", "str", "cpu", "where the diffusion model runs (the Inception runs on the CPU)",
    one_of = {"cpu", "cuda"}},
  {"real_features", "str", "", "reference features .npz (iddpm fid stats features=F.npz): precision/recall",
    group = "outputs"},
  {"k", "int", 3, "neighbours for precision/recall", min = 1, max = 1000},
  {"out", "str", "", "also write the result as JSON to this file"},
}, "fid_batch"), {usage = "iddpm fid ckpt=RUN num_samples=N [steps=S] stats=FILE | samples=NPZ stats=FILE "
  .. "[key=value ...]\n       iddpm fid stats data=PATH out=FILE [key=value ...]   (iddpm fid stats help)",
  help_cmd = "iddpm fid help"})

F.STATS = cfg.schema("fid stats", inception_keys({
  {"data", "str", "", "dataset: IDX/CIFAR folder or file, .npz (arr_0 NHWC uint8), folder of PNGs",
    required = true, group = "data"},
  {"split", "str", "train", "train or test", one_of = {"train", "test"}},
  {"num_samples", "int", 0, "the first N images only (0 = all)", min = 0, aliases = {"num"}},
  {"out", "str", "", "output: X.npz (mu, sigma), X.safetensors, or X (both)", required = true, group = "output"},
  {"features", "str", "", "also save the features (.npz, key features) for precision/recall"},
}, "batch_size"), {usage = "iddpm fid stats data=PATH out=FILE [key=value ...]", help_cmd = "iddpm fid stats help"})

-- {"key=value", ...} -> options ("" for strings not given -> nil), flags; nil after help.
-- The one place where the command line is parsed (iddpm.config).
function F.parse(args, schema)
  local o, flags = cfg.command(schema, nil, args)
  if not o then return nil end
  for k, v in pairs(o) do if v == "" then o[k] = nil end end
  return o, flags
end

local function fmt_time(s) return require("iddpm.timefmt").duration(s) end

-- a temporary file created exclusively, checked and renamed (iddpm.fs)
local function write_json(path, t) require("iddpm.fs").write_atomic(path, io_.json_encode(t) .. "\n") end

local function inception(o)
  if o.num_threads and o.num_threads > 0 then iddpm.num_threads(o.num_threads) end
  local w = o.weights or M.default_weights()
  return user(M.inception, w, {resize = o.resize}), w
end

-- ---------------------------------------------------------------- iddpm fid stats

function F.stats(args)
  local o, flags = F.parse(args, F.STATS)
  if not o then return end
  local base = o.out:gsub("%.npz$", ""):gsub("%.safetensors$", "")
  cfg.check_writable_file(base .. ".npz", "out")      -- before the long work, not after it
  if o.features then cfg.check_writable_file(o.features, "features") end
  if flags.dry_run then
    print(("dry run: statistics of %s [%s] -> %s"):format(o.data, o.split, o.out))
    return
  end
  local net, w = inception(o)
  local images = user(M.read_images, o.data, {split = o.split, num = o.num_samples > 0 and o.num_samples or nil})
  local s = images:shape()
  print(("fid stats: %d images (%dx%dx%d) from %s [%s], Inception %s, resize %s"):format(s[1], s[2], s[3], s[4],
    o.data, o.split, w, net.resize))
  local stream = net:stream{batch_size = o.batch_size, total = s[1], progress = o.progress,
    keep = o.features ~= nil, label = "fid stats"}
  stream:add(images)
  local mu, sigma, n = stream:get()
  local out = o.out
  local written = {}
  local meta = {source = o.data, split = o.split, resize = net.resize, weights = w}
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
  local model, diff, info = user(S.load, o.ckpt, {use_ema = o.use_ema, steps = o.steps, sampler = o.sampler,
    ema_rate = o.ema_rate, device = dev})
  local nc = info.unet.num_classes
  local N = o.num_samples > 0 and o.num_samples or 50000
  local B = math.min(o.batch_size, N)
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
  local show = o.progress
  for b = 0, nb - 1 do
    local first = b * B
    local n = math.min(B, N - first)
    local x = S.sample_batch(model, diff, first, n, {seed = o.seed or 0, clip_denoised = o.clip_denoised ~= false,
      labels = labels, sampler = info.sampler, eta = o.eta,
      on_step = show and function(j)
        local done = b + j / K   -- batches done; the elapsed time includes the finished batches' Inception
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
  local o, flags = F.parse(args, F.EVAL)
  if not o then return end
  if (o.ckpt == nil) == (o.samples == nil) then fail("iddpm fid: give either ckpt= (sample it) or samples=") end
  if o.out then cfg.check_writable_file(o.out, "out") end
  if flags.dry_run then
    print(("dry run: FID of %s against %s"):format(o.ckpt or o.samples, o.stats))
    return
  end
  local mu_r, sigma_r = user(M.load_stats, o.stats)            -- clear errors before any long work
  local rf = o.real_features and user(io_.npz_read, o.real_features).features
  if o.real_features and not rf then fail(("%s has no 'features' array"):format(o.real_features)) end
  local net, w = inception(o)
  local res
  local stream
  if o.ckpt then
    stream = net:stream{batch_size = o.fid_batch, keep = rf ~= nil, label = "fid"}
    res = sample_into(stream, o)
  else
    local images = user(M.read_images, o.samples, {num = o.num_samples > 0 and o.num_samples or nil, split = o.split})
    stream = net:stream{batch_size = o.fid_batch, total = images:shape()[1], progress = o.progress,
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
  if args[1] == "stats" then
    table.remove(args, 1)
    return F.stats(args)
  end
  return F.evaluate(args)
end

return F
