-- iddpm/sample.lua — sampling from a checkpoint.
--
--   local S = require "iddpm.sample"
--   model, diff, info = S.load(path, {use_ema = true, steps = "250", device = "cpu"})
--       path: a run directory (newest ckpt_*.safetensors) or a checkpoint file; the
--       model and diffusion settings come from its config; info.weights says which
--       tensors were loaded ("ema_0.9999" or "model"), info.sampler "ddpm" | "ddim".
--   x, labels = S.generate(model, diff, {num_samples, batch_size, seed, clip_denoised,
--       labels, sampler, eta, progress, on_batch, record})
--       x: (N, C, H, W) float in [-1, 1]. Sample i (0-based) draws its x_T and then
--       its per-step noise from T.generator(seed, i), so the noise does not depend on
--       the batch size. The images then agree across batch sizes up to the rounding of
--       the batched kernels (conv2d folds small images of several samples into one
--       GEMM, ~1e-5); exact = true calls the model one sample at a time and makes them
--       bit-identical for any batch size (slower: ~3x at 32x32 on 2 cores). record = {samples = S, frames = K} keeps x_t and pred_x0 of the
--       first S samples at K steps (returned as the third value).
--   S.main("key=value", ...)   the tool (tools/sample.lua, `iddpm sample`); its keys
--       (S.KEYS, an iddpm.config schema) are checked before anything is loaded or written;
--       `help` lists them, --dry-run loads the checkpoint and lists the outputs
--   device=cuda: the model and every step's tensors on the GPU (the same noise numbers
--   as on the CPU); the images come back to the CPU batch by batch.
--   S.save_denoise(dir, record) -> dir/denoise.png, dir/denoise.gif
--   S.benchmark(model, diff, batch, steps) -> images x steps per second, seconds
--
-- Outputs of S.main in out/: sample_<i, 6 digits>.png, grid.png,
-- samples_NxHxWxC.npz (arr_0 uint8 NHWC, arr_1 int64 labels when class-conditional),
-- settings.json, and with animate=true denoise.png (rows: x_t and pred x_0 of each
-- recorded sample, columns: steps, each labelled with its timestep) and denoise.gif.
-- grid.png and denoise.png are upscaled (nearest) to at least 512 px wide unless grid_scale= says. Every file is written to a
-- temporary name and renamed.
local iddpm = require "iddpm"
local T = iddpm.tensor
local D = require "iddpm.diffusion"
local C = require "iddpm.checkpoint"
local image = require "iddpm.image"
local io_ = iddpm.io
local fs = require "iddpm.fs"

local S = {}

local now = iddpm.wall_time or os.clock

local function fail(msg) require("iddpm.config").error(msg) end

local function fmt_time(s) return require("iddpm.timefmt").duration(s, 1) end
S.fmt_time = fmt_time

-- ---------------------------------------------------------------- files

local is_dir, exists = fs.is_dir, fs.exists

local function mkdir_p(p) fs.mkdir_p(p, "out") end

-- checked: exclusive temp file, every write, flush and close checked, renamed into place
local function write_text(path, text) fs.write_atomic(path, text) end

-- ---------------------------------------------------------------- checkpoints

-- a checkpoint file, or the newest checkpoint of a run directory
function S.resolve(path)
  if type(path) ~= "string" or path == "" then fail("ckpt= is required: a run directory or a checkpoint file") end
  if not exists(path) then fail(("checkpoint %s does not exist"):format(path)) end
  if is_dir(path) then
    local l = C.latest(path)
    if not l then fail(("no checkpoint in %s (expected ckpt_*.safetensors files)"):format(path)) end
    return l.path
  end
  return path
end

-- flat config (model and diffusion keys) from a checkpoint's config, nested or not
function S.flat_config(cfg)
  local r = {}
  for k, v in pairs(cfg) do if type(v) ~= "table" or #v > 0 then r[k] = v end end
  for _, sub in ipairs{"model", "diffusion", "unet"} do
    if type(cfg[sub]) == "table" and #cfg[sub] == 0 then
      for k, v in pairs(cfg[sub]) do if r[k] == nil then r[k] = v end end
    end
  end
  return r
end

local UNET_KEYS = {"image_size", "in_channels", "num_channels", "num_res_blocks", "channel_mult",
  "attention_resolutions", "num_heads", "num_heads_upsample", "dropout", "learn_sigma",
  "use_scale_shift_norm", "num_classes", "conv_resample", "out_channels"}

function S.unet_config(cfg)
  local u = {}
  for _, k in ipairs(UNET_KEYS) do if cfg[k] ~= nil and cfg[k] ~= "" then u[k] = cfg[k] end end
  -- an empty attention_resolutions means no attention (an empty channel_mult means the default)
  if cfg.attention_resolutions == "" then u.attention_resolutions = {} end
  if u.num_classes == 0 or u.num_classes == false then u.num_classes = nil end
  if u.num_classes == nil and cfg.class_cond == true then u.num_classes = 1000 end
  if u.num_classes then u.num_classes = math.tointeger(u.num_classes) end
  if not u.image_size then fail("checkpoint config has no image_size: cannot build the model") end
  return u
end

-- steps: nil/"" (the checkpoint's timestep_respacing, else every step), a number of
-- steps, a section list "10,15,20", or "ddimN" (DDIM). -> diffusion, sampler name
-- betas: the checkpoint's diffusion.betas (a Lua array), which win over the config's
-- noise_schedule (required when that is "custom": a recipe's function or table)
function S.diffusion(cfg, steps, sampler, betas)
  local T0 = math.tointeger(cfg.diffusion_steps or cfg.steps or 1000)
  if betas then T0 = #betas end
  local sched = betas or cfg.noise_schedule or "linear"
  if sched == "custom" then
    fail("this checkpoint's noise_schedule is \"custom\" (a recipe's function or table) but it holds no diffusion.betas")
  end
  local resp = steps
  if resp == nil or resp == "" then resp = cfg.timestep_respacing or "" end
  resp = tostring(resp)
  if resp == tostring(T0) then resp = "" end
  local ok, diff = pcall(D.new, {steps = T0, noise_schedule = sched,
    learn_sigma = cfg.learn_sigma and true or false, sigma_small = cfg.sigma_small and true or false,
    use_kl = cfg.use_kl and true or false, predict_xstart = cfg.predict_xstart and true or false,
    rescale_timesteps = cfg.rescale_timesteps ~= false, rescale_learned_sigmas = cfg.rescale_learned_sigmas ~= false,
    timestep_respacing = resp})
  if not ok then
    fail(("steps=%s does not fit this checkpoint (T = %d diffusion steps): %s. Use a number of steps <= %d, "
      .. "a list like 10,15,20, or ddimN where some integer stride gives N steps"):format(
      resp, T0, tostring(diff):gsub("^D%.new: ", ""), T0))
  end
  sampler = sampler or (resp:match("^ddim") and "ddim" or "ddpm")
  return diff, sampler
end

-- -> model, diff, info: the one checkpoint loader, iddpm.checkpoint.load_model
function S.load(path, opts) return C.load_model(path, opts) end

-- ---------------------------------------------------------------- sampling

-- the device of a model's parameters
local function model_device(model)
  local p = model.parameters and model:parameters()[1]
  return p and p:device() or "cpu"
end
S.model_device = model_device

local function batch_noise(gens, chw, dev)
  local x = T.empty({#gens, chw[1], chw[2], chw[3]})
  if dev ~= "cpu" then x = x:to(dev) end
  local one = {1, chw[1], chw[2], chw[3]}
  for i, g in ipairs(gens) do x:narrow(1, i, 1):copy_(T.randn(one, g, "float32", dev)) end
  return x
end

-- the loop indices (0 = first step) at which frames are recorded: K evenly spaced,
-- first and last included
function S.frame_steps(nsteps, k)
  local r, set = {}, {}
  k = math.max(1, math.min(k, nsteps))
  for i = 0, k - 1 do
    local j = k == 1 and nsteps - 1 or math.floor(i * (nsteps - 1) / (k - 1) + 0.5)
    if not set[j] then set[j] = true; r[#r + 1] = j end
  end
  return r, set
end

-- one batch: samples first .. first+n-1 (0-based global indices)
-- -> x (n,C,H,W), record {xt = {tensor (S,C,H,W) per frame}, x0 = {...}, t = {timesteps}} or nil
function S.sample_batch(model, diff, first, n, opts)
  local cfg = model.config
  local chw = {cfg.in_channels, cfg.image_size, cfg.image_size}
  local gens = {}
  for i = 1, n do gens[i] = T.generator(opts.seed or 0, first + i - 1) end
  local dev = model_device(model)
  local xT = batch_noise(gens, chw, dev)
  local y
  if opts.labels then
    local l = {}
    for i = 1, n do l[i] = opts.labels[first + i] end
    y = T.from_table(l, {n}, "int64")
    if dev ~= "cpu" then y = y:to(dev) end
  end
  local rec, rset, rs
  if opts.record and first == 0 then
    rs = math.min(opts.record.samples or 4, n)
    local _
    _, rset = S.frame_steps(diff.num_timesteps, opts.record.frames or 8)
    rec = {xt = {}, x0 = {}, t = {}}
  end
  local K, j = diff.num_timesteps, 0
  local net = model
  if opts.exact and n > 1 then
    -- one model call per sample: the batched kernels (conv2d folds samples into one
    -- GEMM whose shape depends on the batch) then cannot change the rounding
    net = function(x, t, yy)
      local o
      for i = 1, n do
        local oi = model(x:narrow(1, i, 1), t:narrow(1, i, 1), yy and yy:narrow(1, i, 1))
        if not o then local s = oi:shape(); o = T.empty({n, s[2], s[3], s[4]}); if dev ~= "cpu" then o = o:to(dev) end end
        o:narrow(1, i, 1):copy_(oi)
      end
      return o
    end
  end
  local loop_opts = {noise = xT, y = y, clip_denoised = opts.clip_denoised ~= false, eta = opts.eta or 0,
    graph = opts.graph and net == model,   -- CUDA graph of the model call (D.graphed; not per-sample calls)
    step_noise = function() return batch_noise(gens, chw, dev) end,
    callback = function(step)
      if rec and rset[j] then
        rec.xt[#rec.xt + 1] = step.sample:narrow(1, 1, rs):contiguous():to("cpu")
        rec.x0[#rec.x0 + 1] = step.pred_xstart:narrow(1, 1, rs):contiguous():to("cpu")
        rec.t[#rec.t + 1] = diff.timestep_map[step.t + 1]
      end
      j = j + 1
      if opts.on_step then opts.on_step(j, K) end
    end}
  local x
  if opts.sampler == "ddim" then x = diff:ddim_sample_loop(net, {n, chw[1], chw[2], chw[3]}, loop_opts)
  else x = diff:p_sample_loop(net, {n, chw[1], chw[2], chw[3]}, loop_opts) end
  return x:to("cpu"), rec
end

-- labels: nil, a number (every sample), a Lua array (cycled), or "random" (drawn
-- from T.generator(seed, 2^40), the same for any batch size)
function S.make_labels(spec, n, num_classes, seed)
  if spec == nil then return nil end
  local l = {}
  if spec == "random" then
    local r = T.randint(0, num_classes, {n}, T.generator(seed or 0, 1 << 40)):totable()
    for i = 1, n do l[i] = math.tointeger(r[i]) end
    return l
  end
  local list = type(spec) == "table" and spec or {spec}
  for i = 1, n do l[i] = math.tointeger(list[(i - 1) % #list + 1]) end
  return l
end

-- -> x (N,C,H,W) float, labels (Lua array or nil), record
function S.generate(model, diff, opts)
  opts = opts or {}
  local N = opts.num_samples or 16
  local B = math.min(opts.batch_size or 16, N)
  local xs, rec = {}, nil
  local K = diff.num_timesteps
  local nb = (N + B - 1) // B
  local t0, calls = now(), 0
  local isatty = require("iddpm").isatty
  local tty, last_line = isatty ~= nil and isatty(2), now()
  for b = 0, nb - 1 do
    local n = math.min(B, N - b * B)
    local first = (opts.first or 0) + b * B   -- opts.first: the global index of sample 1 (ranks)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.on_step = function(j)
      calls = calls + 1
      -- on a terminal one line redrawn every step; into a file or pipe a line every 10 s
      if opts.progress and (tty or now() - last_line >= 10) then
        local dt = now() - t0
        local rate = calls / math.max(dt, 1e-9)
        local eta = (nb * K - calls) / rate
        io.stderr:write((tty and "\r" or ""), ("%d/%d images  batch %d/%d step %d/%d  %.2f steps/s  %.1f images x steps/s  ETA %s   ")
          :format(first, N, b + 1, nb, j, K, rate, rate * B, fmt_time(eta)), tty and "" or "\n")
        last_line = now()
      end
    end
    local x, r = S.sample_batch(model, diff, first, n, o)
    rec = rec or r
    xs[#xs + 1] = x
    if opts.on_batch then opts.on_batch(first, x) end
  end
  if opts.progress then
    local dt = now() - t0
    io.stderr:write(("%s%d/%d images in %s (%.2f steps/s)%s\n"):format(tty and "\r" or "", N, N, fmt_time(dt),
      calls / math.max(dt, 1e-9), tty and (" "):rep(30) or ""))
  end
  local x
  if #xs == 1 then x = xs[1] else
    local s = xs[1]:shape()
    x = T.empty({N, s[2], s[3], s[4]})
    local at = 1
    for _, t in ipairs(xs) do x:narrow(1, at, t:size(1)):copy_(t); at = at + t:size(1) end
  end
  return x, opts.labels, rec
end

-- seconds per model call for a batch (one warm-up call, then the mean of `reps`)
function S.time_model_call(model, diff, batch, reps, y)
  local cfg = model.config
  local dev = model_device(model)
  local x = T.randn({batch, cfg.in_channels, cfg.image_size, cfg.image_size}, T.generator(0, 0), "float32", dev)
  local t = {}
  for i = 1, batch do t[i] = diff.num_timesteps - 1 end
  local tm = diff._c:model_t(T.from_table(t, {batch}, "int64")):to(dev)
  local yt = y and T.from_table((function() local l = {} for i = 1, batch do l[i] = y[(i - 1) % #y + 1] end return l end)(), {batch}, "int64"):to(dev)
  T.no_grad(function() model(x, tm, yt) end)
  reps = reps or 1
  local sync = dev ~= "cpu" and iddpm.cuda.synchronize or function() end
  sync()
  local t0 = now()
  T.no_grad(function() for _ = 1, reps do model(x, tm, yt) end end)
  sync()
  return (now() - t0) / reps
end

-- images x steps per second of the sampling loop (steps reverse steps on a batch)
function S.benchmark(model, diff, batch, steps)
  steps = math.min(steps or 10, diff.num_timesteps)
  local cfg = model.config
  local y
  if cfg.num_classes then y = {} for i = 1, batch do y[i] = (i - 1) % cfg.num_classes end end
  local gen = T.generator(0, 0)
  local dev = model_device(model)
  local x = T.randn({batch, cfg.in_channels, cfg.image_size, cfg.image_size}, gen, "float32", dev)
  local yt = y and T.from_table(y, {batch}, "int64"):to(dev)
  local sync = dev ~= "cpu" and iddpm.cuda.synchronize or function() end
  T.no_grad(function() diff:p_sample(model, x, diff.num_timesteps - 1, {y = yt, generator = gen}) end)  -- warm-up
  sync()
  local t0 = now()
  T.no_grad(function()
    for i = 1, steps do
      x = diff:p_sample(model, x, diff.num_timesteps - i, {y = yt, generator = gen})
    end
  end)
  sync()
  local dt = now() - t0
  return batch * steps / dt, dt
end

-- ---------------------------------------------------------------- the recipe

local cfg = require "iddpm.config"

-- the keys of `iddpm sample` / tools/sample.lua (iddpm.config schema)
S.KEYS = {
  {"ckpt", "str", "", "run directory (its newest ckpt_*.safetensors) or checkpoint file", required = true,
    aliases = {"checkpoint"}, group = "model"},
  {"use_ema", "bool", true, "true: EMA weights, false: raw model weights"},
  {"ema_rate", "str", "", "which EMA rate (empty: 0.9999 or the only one)"},
  {"steps", "str", "", "sampling steps: empty = the checkpoint's respacing (else all), a number like 250, "
    .. "sections 10,15,20, or ddim50"},
  {"sampler", "str", "", "ddpm | ddim (empty: ddim for steps=ddimN, else ddpm)", one_of = {"ddpm", "ddim"}, empty_ok = true},
  {"eta", "num", 0.0, "DDIM eta", min = 0},
  {"clip_denoised", "bool", true, "clip predicted x_0 to [-1,1]"},
  {"class", "str", "", "class-conditional models: K, a list 1,5,7 (cycled) or random"},
  {"num_samples", "int", 16, "number of images", min = 1, max = 10000000, aliases = {"num"}, group = "samples"},
  {"batch_size", "int", 16, "images per model call; does not change the images", min = 1, max = 100000},
  {"seed", "int", 0, "seed; sample i uses stream i", min = 0},
  {"exact", "bool", false, "bit-identical images for any batch_size: one model call per sample (slower)"},
  {"out", "str", "", "output directory (empty: samples/ in the checkpoint's run directory)", group = "output"},
  {"overwrite", "bool", false, "out may hold an earlier run's files: remove those sampling writes (nothing else)"},
  {"grid_max", "int", 64, "images in grid.png", min = 1, max = 4096},
  {"grid_scale", "int", 0, "upscale grid.png and denoise.png this many times, nearest (0 = auto: at least 512 px wide)",
    min = 0, max = 64},
  {"save_each", "bool", true, "one PNG per image"},
  {"animate", "bool", false, "also write denoise.png and denoise.gif"},
  {"frames", "int", 10, "steps shown by animate", min = 1, max = 1000},
  {"animate_samples", "int", 4, "samples shown by animate", min = 1, max = 64},
  {"gif_delay", "int", 20, "GIF frame delay in 1/100 s", min = 0, max = 65535},
  {"progress", "bool", true, "progress line"},
  {"num_threads", "int", 0, "engine threads (0 = all cores)", min = 0, max = 4096, aliases = {"threads"}, group = "machine"},
  {"device", "str", "cpu", "cpu or cuda: where the model runs", one_of = {"cpu", "cuda"}},
  {"precision", "str", "auto", "GPU precision: auto (= bf16: bf16 channels-last activations and products), fp32, tf32 "
    .. "or bf16", one_of = {"auto", "fp32", "tf32", "bf16"}},
  {"graph", "bool", true, "cuda: replay each step's model call as a CUDA graph (same images, less host time)"},
  {"gpus", "int", 0, "split the samples over this many ranks, one GPU each (or start under mpirun); same images, one npz",
    min = 0, max = 256},
  {"nproc", "int", 0, "the same as gpus; on the CPU run under mpirun -np N instead", min = 0, max = 256},
  {"dist_timeout", "num", 600.0, "seconds a rank waits for the others when the samples are gathered", gt = 0},
}

-- name -> help text, for scripts that listed the options
S.OPTIONS = {}
for _, k in ipairs(S.KEYS) do S.OPTIONS[k[1]] = k[4] end

-- out= default: samples/ beside the checkpoint (in its run directory)
function S.default_out(ckpt)
  if cfg.mode(ckpt) == "directory" then return (ckpt:gsub("/+$", "")) .. "/samples" end
  local d = ckpt:match("^(.*)/[^/]*$")
  return (d and d ~= "" and d or ".") .. "/samples"
end

S.SCHEMA = cfg.schema("sample", S.KEYS, {usage = "iddpm sample ckpt=RUN_DIR_OR_FILE [key=value ...] [help] [--dry-run]\n"
  .. "       iddpm run tools/sample.lua ckpt=... [key=value ...]",
  check = function(c)
    if c.out == "" then c.out = S.default_out(c.ckpt) end
    cfg.check_writable(c.out, "out")
  end})

-- the names of the files sampling writes into out/ (for overwrite=true and the
-- non-empty check)
local function ours(name)
  return name:match("^sample_%d+%.png$") or name:match("^samples_[%dx]+%.npz$") or name == "grid.png"
    or name == "settings.json" or name == "denoise.png" or name == "denoise.gif" or name:match("%.tmp$")
end

-- out/ must be new or empty; overwrite=true removes sampling's own files (iddpm.fs, no shell)
function S.prepare_out(out, overwrite)
  if not fs.is_dir(out) then return end
  local names = fs.list(out)
  if #names == 0 then return end
  if not overwrite then
    cfg.error(("out=%s is not empty (%d entries, e.g. %s): new samples would mix with old ones; give another out= "
      .. "or overwrite=true (removes the files sampling writes: sample_*.png, grid.png, samples_*.npz, settings.json, "
      .. "denoise.*)"):format(out, #names, names[1]))
  end
  for _, f in ipairs(names) do
    if ours(f) then
      local ok, err = fs.remove(out .. "/" .. f)
      if not ok then cfg.error(("overwrite: cannot remove %s/%s: %s"):format(out, f, tostring(err))) end
    end
  end
end

-- "key=value" strings (or one {key = value} table) -> options with types and ranges
-- checked; nil when `help` was asked for (printed). Empty strings mean "not given".
function S.parse_args(...)
  local args = {...}
  local src = (#args == 1 and type(args[1]) == "table") and args[1] or args
  local c, flags = cfg.command(S.SCHEMA, nil, src)
  if not c then return nil end
  for _, k in ipairs{"ema_rate", "steps", "sampler", "class"} do if c[k] == "" then c[k] = nil end end
  c.threads = c.num_threads > 0 and c.num_threads or nil
  c.dry_run = flags.dry_run
  return c
end

local function parse_class(spec, num_classes)
  if spec == nil then
    if num_classes then
      fail(("this checkpoint is class-conditional (%d classes): give class=K (0..%d), a list class=1,5,7 or class=random")
        :format(num_classes, num_classes - 1))
    end
    return nil
  end
  if not num_classes then
    fail(("class=%s given, but this checkpoint is unconditional (no num_classes in its config)"):format(spec))
  end
  if spec == "random" then return "random" end
  local list = {}
  for item in spec:gmatch("[^,]+") do
    local n = math.tointeger(tonumber(item))
    if not n or n < 0 or n >= num_classes then
      fail(("class=%s: %s is not a class of this model (0..%d)"):format(spec, item, num_classes - 1))
    end
    list[#list + 1] = n
  end
  if #list == 0 then fail("class= is empty") end
  return list
end

-- rows: for each recorded sample, x_t then pred x_0; columns: recorded steps
local function denoise_strip(rec)
  local K, rs = #rec.xt, rec.xt[1]:size(1)
  local s = rec.xt[1]:shape()
  local all = T.empty({2 * rs * K, s[2], s[3], s[4]})
  for i = 1, rs do
    for k = 1, K do
      all:narrow(1, (2 * (i - 1)) * K + k, 1):copy_(rec.xt[k]:narrow(1, i, 1))
      all:narrow(1, (2 * (i - 1) + 1) * K + k, 1):copy_(rec.x0[k]:narrow(1, i, 1))
    end
  end
  return all, K
end

-- frames of the GIF: row 1 x_t, row 2 pred x_0 of the recorded samples
local function denoise_frames(rec)
  local frames = {}
  for k = 1, #rec.xt do frames[k] = T.cat({rec.xt[k], rec.x0[k]}, 1) end
  for _ = 1, 5 do frames[#frames + 1] = frames[#rec.xt] end   -- hold the end
  return frames, rec.xt[1]:size(1)
end

-- write dir/denoise.png (strip) and dir/denoise.gif of a record from S.generate
-- (opts.record); opts.delay in 1/100 s (20), opts.name ("denoise") -> the two paths
-- the strip as a labelled picture: the grid (upscaled, opts.scale or auto) with a band
-- on top naming each column's timestep ("T=999") and one on the left naming the rows
-- ("X_T": the noisy x_t, "X_0": the predicted x_0) -> u8 (H,W,C), layout
function S.denoise_picture(rec, opts)
  opts = opts or {}
  local K = require "iddpm.canvas"
  local strip, cols = denoise_strip(rec)
  local pad = 2
  local g, sc = image.grid(strip, {cols = cols, scale = opts.scale or 0, pad = pad})
  local sh, s1 = g:shape(), rec.xt[1]:shape()
  local H, W, C, h, w = sh[1], sh[2], sh[3], s1[3], s1[4]
  local colw = sc * w
  local widest = ("T=%d"):format(rec.t[1] or 0)
  local fs = K.text_width(widest, 2) <= colw - 2 and 2 or 1
  local band_h, left_w = K.text_height(fs) + 8, K.text_width("X_0", fs) + 10
  local top = K.new(left_w + W, band_h, {255, 255, 255}, C)
  local layout = {scale = sc, font = fs, band_h = band_h, left_w = left_w, columns = {}}
  for q = 0, cols - 1 do
    local cx = left_w + sc * (pad + q * (w + pad)) + colw // 2
    top:label(cx, band_h // 2, ("T=%d"):format(rec.t[q + 1] or 0), {0, 0, 0}, fs, "center", "middle")
    layout.columns[q + 1] = cx
  end
  local left = K.new(left_w, H, {255, 255, 255}, C)
  local rows = H // sc // (h + pad)
  for r = 0, rows - 1 do
    local cy = sc * (pad + r * (h + pad)) + sc * h // 2
    left:label(left_w - 6, cy, r % 2 == 0 and "X_T" or "X_0", {0, 0, 0}, fs, "right", "middle")
  end
  return T.cat({top:tensor(), T.cat({left:tensor(), g}, 2)}, 1), layout
end

function S.save_denoise(dir, rec, opts)
  opts = opts or {}
  local name = opts.name or "denoise"
  local png, gif = ("%s/%s.png"):format(dir, name), ("%s/%s.gif"):format(dir, name)
  io_.png_write(png, (S.denoise_picture(rec, {scale = opts.scale})))
  local frames, rs = denoise_frames(rec)
  image.save_gif(gif, frames, {cols = rs, delay = opts.delay or 20})
  return png, gif
end

function S.main(...)
  local o = S.parse_args(...)
  if not o then return end   -- help was printed
  -- several ranks (gpus=N, or under mpirun): each samples its share, rank 0 writes
  local dist = require "iddpm.dist"
  local launched = dist.setup({device = o.device or "cpu", gpus = o.gpus, nproc = o.nproc, dist_timeout = o.dist_timeout})
  if launched then
    if launched ~= 0 then fail(("sample: a rank failed (exit status %d)"):format(launched)) end
    return {launched = true}
  end
  local Wd = dist.world()
  local print = Wd.main and print or function() end
  if o.threads then iddpm.num_threads(o.threads) end
  local dev, prec = require("iddpm.device").setup(o.device or "cpu", o.precision or "auto", "sample")
  local N, B = o.num_samples or 16, o.batch_size or 16
  local out = o.out
  -- everything that can fail on user input is checked before out/ is created
  local model, diff, info = S.load(o.ckpt, {use_ema = o.use_ema, steps = o.steps, sampler = o.sampler, ema_rate = o.ema_rate,
    device = dev, settings = {precision = prec}})
  local nc = info.unet.num_classes
  local cls = parse_class(o.class, nc)
  local labels = S.make_labels(cls, N, nc, o.seed)
  fs.check_path(out, "out")
  if exists(out) and not is_dir(out) then fail(("out=%s exists and is not a directory"):format(out)) end
  if o.dry_run then
    print(("dry run: %s (step %s), %s; %d samples with %d steps would be written to %s/: sample_*.png, grid.png, "
      .. "samples_%dx%dx%dx%d.npz, settings.json%s"):format(info.path, tostring(info.step), info.message, N,
      diff.num_timesteps, out, N, model.config.image_size, model.config.image_size, model.config.in_channels,
      o.animate and ", denoise.png, denoise.gif" or ""))
    return {dry_run = true, out = out}
  end
  -- temp files of an earlier run that crashed (<name>.tmp.<pid>[.<k>], pid no longer alive)
  if Wd.main and is_dir(out) then fs.clean_stale_temps(out) end
  if Wd.main then S.prepare_out(out, o.overwrite) end
  local cfg = model.config
  local K = diff.num_timesteps
  print(("checkpoint %s (step %s): %s"):format(info.path, tostring(info.step), model:describe()))
  print(info.message)
  if dev ~= "cpu" then print(("device %s (%s), precision %s"):format(dev, iddpm.cuda.device_name(), prec)) end
  print(("sampler %s, %d of %d steps%s, %d samples, batch %d, seed %d, clip_denoised %s%s"):format(info.sampler, K,
    diff.original_num_steps, diff.timestep_respacing ~= "" and (" (respacing " .. diff.timestep_respacing .. ")") or "",
    N, math.min(B, N), o.seed or 0, tostring(o.clip_denoised ~= false),
    info.sampler == "ddim" and (", eta " .. (o.eta or 0)) or ""))
  local per_call = o.exact and math.min(B, N) * S.time_model_call(model, diff, 1, 1, labels)
    or S.time_model_call(model, diff, math.min(B, N), 1, labels)
  local nb = (N + B - 1) // B
  print(("expected time: %s (%d batches x %d steps x %.3fs per model call)"):format(
    fmt_time(per_call * nb * K), nb, K, per_call))
  if Wd.main then mkdir_p(out) end
  local save_each = o.save_each ~= false
  local rec_opts = o.animate and {samples = o.animate_samples or 4, frames = o.frames or 10} or nil
  local u8s = {}
  local gen = Wd.size > 1 and function(m, d, go) return dist.generate(S.generate, m, d, go, dev) end or S.generate
  local x, _, rec = gen(model, diff, {num_samples = N, batch_size = B, seed = o.seed or 0,
    clip_denoised = o.clip_denoised ~= false, labels = labels, sampler = info.sampler, eta = o.eta or 0,
    exact = o.exact, progress = o.progress ~= false, record = rec_opts,
    graph = dev == "cuda" and o.graph ~= false,
    on_batch = Wd.size == 1 and function(first, xb)
      local u = image.to_uint8(xb)
      u8s[#u8s + 1] = u
      if save_each then image.save_each(out, u, "sample_", first) end
    end or nil})
  if not Wd.main then dist.finalize() return {rank = Wd.rank} end
  local u = image.to_uint8(x)
  if Wd.size > 1 and save_each then image.save_each(out, u, "sample_", 0) end
  local nhwc = image.nhwc(u)
  local H, W, Cc = cfg.image_size, cfg.image_size, cfg.in_channels
  local npz = ("%s/samples_%dx%dx%dx%d.npz"):format(out, N, H, W, Cc)
  local arrays = {{"arr_0", nhwc}}
  if labels then arrays[2] = {"arr_1", T.from_table(labels, {N}, "int64")} end
  io_.npz_write(npz, arrays)
  local gm = math.min(N, o.grid_max or 64)
  image.save_grid(out .. "/grid.png", u:narrow(1, 1, gm), {scale = o.grid_scale or 0})
  local written = {npz, out .. "/grid.png"}
  if rec then
    local png, gif = S.save_denoise(out, rec, {delay = o.gif_delay, scale = o.grid_scale})
    written[#written + 1] = png
    written[#written + 1] = gif
    print(("denoise.png: rows x_t and predicted x_0 of %d samples; columns at timesteps %s"):format(
      rec.xt[1]:size(1), table.concat(rec.t, ",")))
  end
  local settings = {checkpoint = info.path, step = info.step, weights = info.weights, sampler = info.sampler,
    steps = K, timestep_respacing = diff.timestep_respacing, original_steps = diff.original_num_steps,
    num_samples = N, batch_size = B, seed = o.seed or 0, clip_denoised = o.clip_denoised ~= false,
    eta = o.eta or 0, labels = labels, config = info.config, device = dev, precision = prec}
  write_text(out .. "/settings.json", io_.json_encode(settings))
  print(("wrote %s%s"):format(table.concat(written, ", "), save_each and (", and %d sample_*.png"):format(N) or ""))
  dist.finalize()
  return {out = out, npz = npz, images = u, labels = labels}
end

return S
