-- iddpm/train.lua — the training driver (the official train_util.TrainLoop, plus exact
-- resume, progress, logs, sample grids and a loss plot).
--
--   train.main(recipe_table, arg)  resolve (iddpm.recipe), print the config, train
--   train.new(config)              -> trainer (config already resolved); trainer:run()
--   trainer:step_once()            one optimizer step; trainer:save(); trainer:close()
--
-- One step (official order): zero grads; for each microbatch draw t (schedule sampler,
-- generator `gen_t`) and noise (`gen_noise`), loss = mean(loss * importance weight),
-- backward; grad norm (optionally clipped); lr warm-up/anneal; AdamW step; EMA
-- update(s); loss-second-moment history update; log.
-- Microbatches: by default each microbatch's loss is scaled by its share of the batch,
-- so the gradient equals the full-batch mean whatever the microbatch size;
-- microbatch_sum=true reproduces the official quirk (gradients summed over microbatches).
-- Step numbering: `step` counts optimizer updates done; ckpt_<step> holds exactly that
-- many (the official model<N>.pt holds N+1).
--
-- Exact resume: every random draw comes from a counter-based generator whose
-- (seed, stream, offset) is saved: gen_t (stream 1), gen_noise (2), nn.dropout_gen (3),
-- the data order (stream 4, a pure function of the loader position), and the sample
-- grids (5, fresh for each grid, so they never disturb training). The checkpoint holds
-- these, the loader position, the sampler history, model, EMA, AdamW moments and step.
--
-- Devices (config keys device, precision): model, EMA, AdamW moments, batches, timestep
-- weights and noise live on `device`; noise is drawn there (Philox gives the same
-- numbers on every device, so a run resumes across devices). Checkpoints are written
-- from the device tensors (T.save moves them to the CPU) and loaded back onto the
-- device, so a GPU checkpoint resumes or samples on the CPU and vice versa. On a device
-- the per-step losses stay there until the next log line, and the gradient norm (a host
-- wait) is computed on log steps only, unless grad_clip needs it every step.
--
-- Config and outputs: train.main resolves the recipe through iddpm.config (every key
-- checked before data is loaded or a file is written; `help`, --dry-run), prints the
-- keys that differ from the defaults and writes RUN/config.json (the full config),
-- RUN/log.jsonl (with a UTC timestamp and wall_time, the training seconds summed over
-- resumes) and RUN/metrics.csv. A non-finite loss, gradient norm or weight stops
-- training with a user error naming the step, before anything of that state is saved.
-- A resumed run that already reached its last step says so and returns. On a terminal
-- a progress line (rate, ETA) is redrawn after every step between the log lines.
-- Ctrl-C saves the current step and raises a user error with exit status 130.
local T = require "iddpm.tensor"
local io_ = require "iddpm.io"
local nn = require "iddpm.nn"
local D = require "iddpm.diffusion"
local optim = require "iddpm.optim"
local checkpoint = require "iddpm.checkpoint"
local data = require "iddpm.data"
local image = require "iddpm.image"
local recipe = require "iddpm.recipe"
local plot = require "iddpm.plot"
local device = require "iddpm.device"
local dist = require "iddpm.dist"
local fs = require "iddpm.fs"
local cfg = require "iddpm.config"

local train = {}

-- config keys that define the model and the diffusion: a resumed run must agree on them
train.ARCH_KEYS = {"image_size", "in_channels", "num_channels", "num_res_blocks", "channel_mult", "num_heads",
  "num_heads_upsample", "attention_resolutions", "learn_sigma", "sigma_small", "class_cond", "use_scale_shift_norm",
  "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
  "rescale_learned_sigmas", "batch_size", "schedule_sampler", "ema_rate"}

local function say(fmt, ...) io.stdout:write(fmt:format(...), "\n") io.stdout:flush() end

local function fmt_time(s) return require("iddpm.timefmt").duration(s) end

-- ---------------------------------------------------------------- construction

local Trainer = {}
Trainer.__index = Trainer
train.Trainer = Trainer

function train.model_config(c, num_classes)
  return {image_size = c.image_size, in_channels = c.in_channels, num_channels = c.num_channels,
    num_res_blocks = c.num_res_blocks, channel_mult = c.channel_mult ~= "" and c.channel_mult or nil,
    attention_resolutions = c.attention_resolutions, num_heads = c.num_heads, num_heads_upsample = c.num_heads_upsample,
    dropout = c.dropout, learn_sigma = c.learn_sigma, use_scale_shift_norm = c.use_scale_shift_norm,
    num_classes = c.class_cond and num_classes or nil, seed = c.seed}
end

function train.diffusion_config(c, respacing)
  return {steps = c.diffusion_steps, noise_schedule = c.noise_schedule, learn_sigma = c.learn_sigma,
    sigma_small = c.sigma_small, use_kl = c.use_kl, predict_xstart = c.predict_xstart,
    rescale_timesteps = c.rescale_timesteps, rescale_learned_sigmas = c.rescale_learned_sigmas,
    timestep_respacing = respacing or c.timestep_respacing}
end

-- c: a resolved config (recipe.resolve). opts.quiet: no config dump
function train.new(c, opts)
  opts = opts or {}
  local W = dist.world()   -- data parallelism (iddpm.dist): rank 0 alone prints and writes
  local self = setmetatable({c = c, step = 0, quiet = opts.quiet or not W.main, dist = W}, Trainer)
  if c.num_threads > 0 then require("iddpm").num_threads(c.num_threads) end
  -- a missing GPU fails here, before any file is written
  self.device, self.precision = device.setup(c.device or "cpu", c.precision or "auto", "train")
  if not opts.quiet and self.device ~= "cpu" then
    say("device: %s (%s), precision %s", self.device, require("iddpm").cuda.device_name(), self.precision)
  end
  -- data (before run_dir is created: a missing dataset leaves nothing behind)
  local t0 = data.now()
  local ok, ds = pcall(data.load, {dataset = c.dataset, data_dir = c.data_dir, image_size = c.image_size,
    in_channels = c.in_channels, pad = c.pad, num_images = c.num_images, seed = c.seed})
  if not ok then   -- the dataset's messages are about the user's files: no traceback
    if cfg.is_user_error(ds) or tostring(ds):find("interrupted", 1, true) then error(ds, 0) end
    cfg.error(tostring(ds))
  end
  self.ds = ds
  -- the run directory: created (no shell), locked against a second trainer for the life
  -- of this process, then cleared of the temp files of a killed save
  if W.main then
    fs.mkdir_p(fs.check_path(c.run_dir, "run_dir"), "run_dir")
    self.lock = fs.lock_dir(c.run_dir, "run_dir")
    fs.clean_stale_temps(c.run_dir)
  end
  if c.in_channels == 0 then c.in_channels = self.ds.channels end
  self.num_classes = c.class_cond and self.ds.num_classes or nil
  c.num_classes = self.num_classes or 0
  self.loader = data.loader(self.ds, {batch_size = c.batch_size, flip = c.random_flip, seed = c.seed, stream = 4,
    rank = W.rank, world_size = W.size})
  if not opts.quiet then
    say("data: %s, %d images %s%s (%.1fs)", self.ds.name, self.ds.images:size(1), table.concat(self.ds.images:shape(), "x", 2),
      self.ds.padded_from and (" (padded from %d)"):format(self.ds.padded_from) or "", data.now() - t0)
  end
  -- model, diffusion, optimizer, EMA
  self.model = nn.unet(train.model_config(c, self.num_classes))
  self.model:to(self.device, {precision = self.precision, recompute = c.recompute ~= false})
  self.model:train()
  self.names = self.model:parameter_names()
  self.diffusion = D.new(train.diffusion_config(c))
  self.sampler = D.sampler(c.schedule_sampler, self.diffusion)
  self.opt = optim.adamw(self.model:parameters(), {lr = c.lr, weight_decay = c.weight_decay})
  self.emas = {}
  for r in c.ema_rate:gmatch("[^,%s]+") do
    self.emas[#self.emas + 1] = {rate = r, ema = optim.ema(self.model, tonumber(r))}
  end
  -- generators
  self.gen_t = T.generator(c.seed, 1)
  self.gen_noise = T.generator(c.seed, 2)
  nn.dropout_gen = T.generator(c.seed, 3)
  for _, g in ipairs{self.gen_t, self.gen_noise, nn.dropout_gen} do g:set_shard(W.rank, W.size) end
  self.curve = {}        -- {step, loss} at every log line, for loss.png
  self.acc = nil
  self.last_saved = nil
  self:resume()
  if W.size > 1 then self:broadcast_state() end
  if W.main then self:write_config() end
  return self
end

-- RUN/config.json: the full resolved config of this run (exclusive temporary file,
-- checked writes, renamed; a failure is an error naming the file)
function Trainer:write_config()
  fs.write_atomic(self.c.run_dir .. "/config.json", io_.json_encode(self:stored_config()) .. "\n")
end

-- ---------------------------------------------------------------- state

local GENS = {"gen_t", "gen_noise", "dropout"}

function Trainer:gen(name) return name == "dropout" and nn.dropout_gen or self[name] end

function Trainer:rng_state()
  local v = {}
  for _, n in ipairs(GENS) do
    local s, st, off = self:gen(n):state()
    v[#v + 1], v[#v + 2], v[#v + 3] = s, st, off
  end
  return v
end

function Trainer:set_rng_state(v)
  for i, n in ipairs(GENS) do self:gen(n):set_state(v[3 * i - 2], v[3 * i - 1], v[3 * i]) end
end

function Trainer:extra()
  local ls = self.loader:state()
  local e = {
    rng = T.from_table(self:rng_state(), {#GENS, 3}, "int64"),
    data_pos = T.from_table({ls.epoch, ls.index}, {2}, "int64"),
    world = T.from_table({self.dist.size, self.c.batch_size}, {2}, "int64"),   -- ranks, per-rank batch
  }
  if self.c.schedule_sampler ~= "uniform" then
    local s = self.sampler:state()
    e.sampler_history = T.from_table(s.history, {#s.history}, "float64")
    e.sampler_counts = T.from_table(s.counts, {#s.counts}, "float64")
  end
  if #self.curve > 0 then
    local flat = {}
    for i, p in ipairs(self.curve) do flat[2 * i - 1], flat[2 * i] = p[1], p[2] end
    e.loss_curve = T.from_table(flat, {#self.curve, 2}, "float64")
  end
  return e
end

function Trainer:stored_config()
  local c = {}
  for k, v in pairs(self.c) do c[k] = v end
  -- a function or table schedule lives on as the checkpoint's diffusion.betas
  if type(c.noise_schedule) ~= "string" then c.noise_schedule = "custom" end
  return c
end

-- a tensor holds only finite values (x - x is 0 for finite x, NaN for Inf and NaN)
local function all_finite(t)
  local d = t:detach()
  return (d - d):sum():item() == 0
end
train.all_finite = all_finite

-- raise the divergence error: nothing is saved, the last good checkpoint stays.
-- step: the step that went wrong (default: the one being computed)
function Trainer:diverged(what, step)
  cfg.error(("training stopped: %s at step %d (lr %s); the last good checkpoint is %s and nothing was saved after it; "
    .. "lower lr (or set grad_clip) and resume from it"):format(what, step or self.step + 1, cfg.show(self.opt.lr or self.c.lr),
    self.last_saved and ("step " .. self.last_saved) or "none (no checkpoint was written)"), 1)
end

-- the accumulated losses since the last log line are finite (reads them on a device,
-- where a bad value is found at the log or save step after it: step names that one)
function Trainer:check_losses(step)
  self:flush()
  local acc = self.acc
  if not acc then return end
  for _, k in ipairs{"loss", "mse", "vb"} do
    local v = acc.sum[k]
    if v ~= v or v == math.huge or v == -math.huge then
      self:diverged(("the %s is not finite (%s)"):format(k, tostring(v)), step)
    end
  end
end

function Trainer:save()
  if self.last_saved == self.step then return end
  if not self.dist.main then self.last_saved = self.step return end
  self:check_losses(self.step)
  for i, p in ipairs(self.model:parameters()) do
    if not all_finite(p) then self:diverged(("the weights are not finite (%s)"):format(self.names[i]), self.step) end
  end
  self.wall_saved = self:wall_time()
  local path = checkpoint.save(self.c.run_dir, {model = self.model, emas = self.emas, opt = self.opt, extra = self:extra(),
    step = self.step, config = self:stored_config(), betas = self.diffusion.base_betas,
    meta = {dataset = self.ds.name, iddpm_version = require("iddpm").version, wall_time = ("%.3f"):format(self.wall_saved)}})
  self.last_saved = self.step
  if self.c.keep_checkpoints > 0 then checkpoint.prune(self.c.run_dir, self.c.keep_checkpoints) end
  self:plot_loss()
  if not self.quiet then self:clear_progress(); say("saved %s", path) end
  return path
end

function Trainer:resume()
  local c = self.c
  local path
  if c.resume_checkpoint ~= "" then
    path = c.resume_checkpoint
  elseif c.resume == "auto" then
    local l = checkpoint.latest(c.run_dir)
    path = l and l.path
  elseif c.resume ~= "none" and c.resume ~= "" and c.resume ~= "false" then
    path = checkpoint.resolve(c.resume)
  end
  if not path then
    if not self.quiet then say("starting from scratch (no checkpoint in %s)", c.run_dir) end
    return
  end
  local ck = checkpoint.read(path)
  local stored_betas = ck.tensors["diffusion.betas"]
  if stored_betas then   -- the schedule itself must agree, whatever wrote it
    local a, b = stored_betas:totable(), self.diffusion.base_betas
    local same = #a == #b
    for i = 1, same and #a or 0 do if math.abs(a[i] - b[i]) > 1e-12 * math.max(1, math.abs(b[i])) then same = false end end
    if not same then
      error(("resume: %s was saved with another noise schedule (its diffusion.betas differ from this run's); use another " ..
        "run_dir, or resume=none to start over"):format(path), 0)
    end
  end
  local saved_world = ck.tensors["extra.world"] and ck.tensors["extra.world"]:totable()[1] or 1
  for _, k in ipairs(train.ARCH_KEYS) do
    local a, b = ck.config[k], c[k]
    if k == "noise_schedule" and type(b) ~= "string" then b = "custom" end
    if k == "batch_size" and saved_world ~= self.dist.size then a = b end   -- per rank: changes with the ranks
    if a ~= nil and a ~= b and not (type(a) == "number" and type(b) == "number" and a == b) then
      cfg.error(("resume: %s was saved with %s=%s but this run has %s=%s; use another run_dir, or resume=none to start over")
        :format(path, k, tostring(a), k, tostring(b)))
    end
  end
  local tz = ck.tensors
  checkpoint.load_model(path, {checkpoint = ck, model = self.model, use_ema = false})   -- the raw weights
  for _, e in ipairs(self.emas) do
    local sd = checkpoint.subset(tz, "ema_" .. e.rate .. ".")
    T.no_grad(function()
      for i, n in ipairs(self.names) do
        local src = sd[n]
        if not src then cfg.error(("resume: %s has no EMA %s weights for %s"):format(path, e.rate, n)) end
        e.ema.shadow[i]:copy_(checkpoint.check_shape(path, "ema_" .. e.rate .. "." .. n, src, e.ema.shadow[i]))
      end
    end)
  end
  for i, n in ipairs(self.names) do
    for _, mv in ipairs{"m", "v"} do
      local src = tz["opt." .. mv .. "." .. n]
      if src then checkpoint.check_shape(path, "opt." .. mv .. "." .. n, src, self.opt[mv][i]) end
    end
  end
  self.opt:load_state_tensors(tz, self.names, "opt.", ck.opt_step)
  local ex = checkpoint.subset(tz, "extra.")
  if ex.rng then self:set_rng_state(ex.rng:totable()) end
  if ex.data_pos then
    local p = ex.data_pos:totable()
    if saved_world ~= self.dist.size then p = self:other_world_position(p, ex.world:totable()) end
    self.loader:set_state{epoch = p[1], index = p[2]}
  end
  if ex.sampler_history then
    self.sampler:load_state{name = c.schedule_sampler, history = ex.sampler_history:totable(), counts = ex.sampler_counts:totable()}
  end
  if ex.loss_curve then
    local f = ex.loss_curve:totable()
    for i = 1, #f, 2 do self.curve[#self.curve + 1] = {f[i], f[i + 1]} end
  end
  self.step = ck.step
  self.last_saved = ck.step
  self.resumed_from = ck.step
  self.wall_before = tonumber(ck.meta.wall_time) or 0   -- training wall time of the runs before this one
  -- drop log lines written after this checkpoint by the run that stopped (and a record
  -- cut short by a crash): the kept lines go to a new file renamed over the old one, so
  -- a crash here leaves the old file or the new one, never a truncated file
  if self.dist.main then self:trim_logs(ck.step) end
  if not self.quiet then say("resumed from step %d (%s)", ck.step, path) end
end

-- a data position saved by another number of ranks (global slots either way): the
-- next batch start of this run; said once, as the resume is then not bit-exact
function Trainer:other_world_position(p, wv)
  local c = self.c
  if self.dist.size == 1 and (p[2] % c.batch_size ~= 0 or p[2] + c.batch_size > self.loader.size) then
    p[2] = -(-p[2] // c.batch_size) * c.batch_size
    if p[2] + c.batch_size > self.loader.size then p[1], p[2] = p[1] + 1, 0 end
  end
  if not self.quiet then
    say("resume: the checkpoint was written by %d ranks x batch %d, this run has %d x %d: continuing from its data " ..
      "position and generator offsets (not bit-exact)", wv[1], wv[2], self.dist.size, c.batch_size)
  end
  return p
end

-- every rank takes rank 0's weights, EMAs and AdamW moments (at the start and after a
-- resume), so that all ranks hold identical state
function Trainer:broadcast_state()
  local ts = {}
  for _, p in ipairs(self.model:parameters()) do ts[#ts + 1] = p end
  for _, e in ipairs(self.emas) do for _, sh in ipairs(e.ema.shadow) do ts[#ts + 1] = sh end end
  for i = 1, #self.opt.m do ts[#ts + 1] = self.opt.m[i]; ts[#ts + 1] = self.opt.v[i] end
  T.no_grad(function() dist.broadcast(ts) end)
end

function Trainer:trim_logs(step)
  local c, ck = self.c, {step = step}
  fs.rewrite_lines(c.run_dir .. "/log.jsonl", function(line)
    if not line:match("^{.*}$") then return false end
    local st = tonumber(line:match('"step":(%d+)'))
    return not st or st <= ck.step
  end)
  local header_commas
  fs.rewrite_lines(c.run_dir .. "/metrics.csv", function(line)
    local _, commas = line:gsub(",", "")
    local st = tonumber(line:match("^(%d+),"))
    if not st then header_commas = header_commas or commas; return true end   -- the header
    return st <= ck.step and commas == header_commas
  end)
end

-- ---------------------------------------------------------------- one step

function Trainer:lr_at(step)
  local c, lr = self.c, self.c.lr
  if c.warmup_steps > 0 then lr = lr * math.min(1, (step + 1) / c.warmup_steps) end
  if c.lr_anneal_steps > 0 then lr = lr * (1 - step / c.lr_anneal_steps) end
  return lr
end

local TERMS = {"loss", "mse", "vb"}

local function new_acc()
  local acc = {n = 0, steps = 0, sum = {}, qsum = {}, qn = {0, 0, 0, 0}, grad_norm = 0, gn_steps = 0, pending = {}}
  for _, k in ipairs(TERMS) do acc.sum[k] = 0; acc.qsum[k] = {0, 0, 0, 0} end
  return acc
end

-- t, w (CPU) and the per-example losses of one microbatch; on a device the losses are
-- kept (detached) until flush() reads them, so that a step does not wait for the GPU
function Trainer:accumulate(t, w, losses)
  self.acc = self.acc or new_acc()
  local l = {}
  for _, k in ipairs(TERMS) do l[k] = losses[k]:detach() end
  local p = self.acc.pending
  p[#p + 1] = {t = t, w = w, losses = l}
  if self.device == "cpu" then self:flush() end
end

function Trainer:flush()
  local acc = self.acc
  if not acc then return end
  for _, e in ipairs(acc.pending) do self:accumulate_now(e.t, e.w, e.losses) end
  acc.pending = {}
end

function Trainer:accumulate_now(t, w, losses)
  local acc = self.acc
  local tv, wv = t:totable(), w:totable()
  local nT = self.diffusion.num_timesteps
  for _, k in ipairs(TERMS) do
    local v = losses[k]:totable()
    for i = 1, #v do
      local x = v[i] * wv[i]
      local q = math.floor(4 * tv[i] / nT) + 1
      acc.sum[k] = acc.sum[k] + x
      acc.qsum[k][q] = acc.qsum[k][q] + x
      if k == "loss" then acc.qn[q] = acc.qn[q] + 1 end
    end
  end
  acc.n = acc.n + #tv
end

function Trainer:step_once()
  local c, model, diff = self.c, self.model, self.diffusion
  -- state at the start of the step, to roll back to if interrupted before the update
  self.snapshot = {rng = self:rng_state(), data = self.loader:state()}
  self.phase = "forward"
  local x, y = self.loader:next()
  if self.device ~= "cpu" then
    x = x:to(self.device)
    if y then y = y:to(self.device) end
  end
  self.opt:zero_grad()
  local B = x:size(1)
  local mb = (c.microbatch > 0 and c.microbatch < B) and c.microbatch or B
  local updates = {}
  for i = 1, B, mb do
    local n = math.min(mb, B - i + 1)
    local xm = n == B and x or x:narrow(1, i, n)
    local ym = (self.num_classes and y) and (n == B and y or y:narrow(1, i, n)) or nil
    local t, w = self.sampler:sample(n, self.gen_t)
    local noise = T.randn(xm:shape(), self.gen_noise, "float32", self.device)
    -- forward + backward in one tensor scope: the graph and every intermediate are
    -- released when it returns; only the detached per-example losses come out
    local losses = T.scope(function()
      local l = diff:training_losses(model, xm, t, {noise = noise, y = ym})
      local wd = self.device == "cpu" and w or w:to(self.device)
      local loss = (l.loss * wd):mean()
      if not c.microbatch_sum and n ~= B then loss = loss * (n / B) end
      loss:backward()
      return {loss = l.loss:detach(), mse = l.mse:detach(), vb = l.vb:detach()}
    end)
    if c.schedule_sampler ~= "uniform" then updates[#updates + 1] = {t, losses.loss} end
    self:accumulate(t, w, losses)   -- keeps detached copies
  end
  if self.dist.size > 1 then
    dist.allreduce_grads(model:parameters())   -- the mean gradient over the global batch
    for _, u in ipairs(updates) do u[1], u[2] = dist.allgather(u[1], self.device), dist.allgather(u[2], self.device) end
  end
  -- the norm waits for the device: there, only on log steps (unless clipping needs it)
  local gn
  if c.grad_clip > 0 then gn = optim.clip_grad_norm(model:parameters(), c.grad_clip)
  elseif self.device == "cpu" or (self.step + 1) % c.log_interval == 0 then gn = optim.grad_norm(model:parameters()) end
  if gn and (gn ~= gn or gn == math.huge) then self:diverged(("the gradient norm is not finite (%s)"):format(tostring(gn))) end
  if self.device == "cpu" then self:check_losses() end   -- on a device: at log and save steps
  if gn then self.acc.grad_norm, self.acc.gn_steps = self.acc.grad_norm + gn, self.acc.gn_steps + 1 end
  self.acc.steps = self.acc.steps + 1
  self.opt.lr = self:lr_at(self.step)
  -- the update: from here on the step must complete. A Ctrl-C is held back until the
  -- weights, EMAs and sampler are updated, then raised (and run() saves this step).
  self.phase = "update"
  data.defer_interrupt(true)
  local ok, err = pcall(function()
    self.opt:step()
    for _, e in ipairs(self.emas) do e.ema:update() end
    for _, u in ipairs(updates) do self.sampler:update(u[1], u[2]:to("cpu")) end
  end)
  if ok then self.step, self.phase = self.step + 1, "idle" end
  data.defer_interrupt(false)   -- raises "interrupted!" here if Ctrl-C came during the update
  if not ok then error(err, 0) end
end

-- ---------------------------------------------------------------- logging and samples

function Trainer:log(t_start, step_start)
  local acc, c = self.acc, self.c
  self:flush()
  if not acc then return end
  if self.dist.size > 1 then self:reduce_acc() end
  if acc.n == 0 then return end
  local now = data.now()
  local steps_done = self.step - step_start
  local gb = c.batch_size * self.dist.size   -- the global batch
  local ips = steps_done * gb / math.max(now - t_start, 1e-9)
  self:check_losses(self.step)
  local rec = {step = self.step, samples = self.step * gb, global_batch = gb, lr = self.opt.lr, grad_norm = acc.gn_steps > 0 and acc.grad_norm / acc.gn_steps or nil,
    images_per_s = ips, time = now - self.t0, wall_time = self:wall_time(), timestamp = os.date("!%Y-%m-%dT%H:%M:%SZ")}
  for _, k in ipairs(TERMS) do
    rec[k] = acc.sum[k] / acc.n
    for q = 1, 4 do
      if acc.qn[q] > 0 then rec[("%s_q%d"):format(k, q - 1)] = acc.qsum[k][q] / acc.qn[q] end
    end
  end
  local stop = self:stop_step()
  local eta = stop and (stop - self.step) * gb / ips or nil
  if c.max_minutes > 0 then eta = math.min(eta or math.huge, math.max(0, 60 * c.max_minutes - (now - self.t0))) end
  local line = ("step %d%s | loss %.4f mse %.4f vb %.4f | %.1f img/s | %s"):format(self.step,
    stop and ("/" .. stop) or "", rec.loss, rec.mse, rec.vb, ips, eta and ("ETA " .. fmt_time(eta)) or ("elapsed " .. fmt_time(now - self.t0)))
  if not self.quiet then self:clear_progress(); say("%s", line) end
  if self.dist.main then
    fs.append(c.run_dir .. "/log.jsonl", io_.json_encode(rec) .. "\n")   -- a failed write raises
    self:write_csv(rec)
  end
  self.curve[#self.curve + 1] = {self.step, rec.loss}
  self.last_log = rec
  self.acc = nil
end

-- the log sums of every rank added up (grad_norm is the same on every rank)
function Trainer:reduce_acc()
  local acc, v = self.acc, {}
  v[1] = acc.n
  for q = 1, 4 do v[#v + 1] = acc.qn[q] end
  for _, k in ipairs(TERMS) do
    v[#v + 1] = acc.sum[k]
    for q = 1, 4 do v[#v + 1] = acc.qsum[k][q] end
  end
  v = dist.sum_numbers(v, self.device)
  local i = 1
  acc.n = v[1]
  for q = 1, 4 do i = i + 1; acc.qn[q] = v[i] end
  for _, k in ipairs(TERMS) do
    i = i + 1; acc.sum[k] = v[i]
    for q = 1, 4 do i = i + 1; acc.qsum[k][q] = v[i] end
  end
end

-- RUN/metrics.csv: the log.jsonl columns as a table (header on the first line)
train.CSV_COLUMNS = {"step", "samples", "loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "mse_q0",
  "mse_q1", "mse_q2", "mse_q3", "vb_q0", "vb_q1", "vb_q2", "vb_q3", "grad_norm", "lr", "images_per_s", "time",
  "wall_time", "timestamp"}

function Trainer:write_csv(rec)
  local path = self.c.run_dir .. "/metrics.csv"
  local row = {}
  for i, k in ipairs(train.CSV_COLUMNS) do row[i] = rec[k] == nil and "" or cfg.show(rec[k]) end
  local text = table.concat(row, ",") .. "\n"
  if not fs.exists(path) then text = table.concat(train.CSV_COLUMNS, ",") .. "\n" .. text end
  fs.append(path, text)   -- one whole record (a failed write raises, naming the file)
end

-- seconds of training over every run of this run directory (resumes included)
function Trainer:wall_time()
  return (self.wall_before or 0) + (self.t0 and (data.now() - self.t0) or 0)
end

-- the per-step progress line on a terminal (carriage return, no newline), cleared
-- before any other output
function Trainer:progress(t_start, step_start)
  if self.quiet or not self.tty then return end
  local now = data.now()
  local done = self.step - step_start
  local ips = done * self.c.batch_size / math.max(now - t_start, 1e-9)
  local stop = self:stop_step()
  local eta = stop and ips > 0 and (stop - self.step) * self.c.batch_size / ips or nil
  io.stdout:write(("\r\27[Kstep %d%s  %.1f img/s%s"):format(self.step, stop and ("/" .. stop) or "", ips,
    eta and ("  ETA " .. fmt_time(eta)) or ""))
  io.stdout:flush()
  self.progress_shown = true
end

function Trainer:clear_progress()
  if self.progress_shown then io.stdout:write("\r\27[K"); io.stdout:flush(); self.progress_shown = false end
end

-- RUN/loss.png: loss, mse, vb and lr from log.jsonl (iddpm.plot.training); a run
-- whose log is gone falls back to the loss curve kept in the checkpoints
function Trainer:plot_loss()
  if not self.dist.main then return end
  local recs = plot.read_log(self.c.run_dir .. "/log.jsonl")
  if #recs < 2 then
    recs = {}
    for i, p in ipairs(self.curve) do recs[i] = {step = p[1], loss = p[2]} end
  end
  if #recs < 2 then return end
  local ok, err = pcall(plot.training, self.c.run_dir .. "/loss.png", recs)
  if not ok and not self.quiet then say("loss.png not written: %s", tostring(err)) end
end

-- a grid of samples from the (first) EMA weights with the respaced sampler
function Trainer:sample_grid()
  local c = self.c
  if not self.dist.main then return end
  local respacing = c.sample_steps
  local sd = D.new(train.diffusion_config(c, respacing))
  local restore = self.emas[1] and self.emas[1].ema:apply()
  self.model:eval()
  local n = c.num_samples
  local y
  if self.num_classes then
    y = {}
    for i = 1, n do y[i] = (i - 1) % self.num_classes end
  end
  local t0 = data.now()
  local ok, x = pcall(function()
    local shape = {n, c.in_channels, c.image_size, c.image_size}
    local o = {generator = T.generator(c.seed, 5), clip_denoised = true, y = y, device = self.device}
    if respacing:match("^ddim") then return sd:ddim_sample_loop(self.model, shape, o) end
    return sd:p_sample_loop(self.model, shape, o)
  end)
  if restore then restore() end
  self.model:train()
  if not ok then error(x, 0) end
  x = x:to("cpu")
  local path = ("%s/samples_%08d.png"):format(c.run_dir, self.step)
  image.save_grid(path, x, {cols = math.ceil(math.sqrt(n)), scale = c.grid_scale})
  if not self.quiet then self:clear_progress(); say("sample grid (EMA %s, %d steps, %.1fs): %s", self.emas[1] and self.emas[1].rate or "off",
    sd.num_timesteps, data.now() - t0, path) end
  self.last_grid, self.last_grid_step = path, self.step
  return path
end

-- ---------------------------------------------------------------- the loop

function Trainer:stop_step()
  local c = self.c
  local s
  if c.max_steps > 0 then s = c.max_steps end
  if c.lr_anneal_steps > 0 and (not s or c.lr_anneal_steps < s) then s = c.lr_anneal_steps end
  return s
end

-- max_minutes passed (on any rank: the ranks must stop at the same step)
function Trainer:time_up()
  local up = data.now() - self.t0 > 60 * self.c.max_minutes
  if self.dist.size > 1 then up = dist.sum_numbers({up and 1 or 0}, self.device)[1] > 0 end
  return up
end

function Trainer:run()
  local c = self.c
  local stop = self:stop_step()
  if stop and self.step >= stop and self.resumed_from then
    if not self.quiet then
      say("run %s is finished: step %d >= %s %d (nothing to do; raise max_steps to train further, sample with "
        .. "`iddpm sample ckpt=%s`)", c.run_dir, self.step, c.max_steps > 0 and stop == c.max_steps and "max_steps"
        or "lr_anneal_steps", stop, c.run_dir)
    end
    return {step = self.step, run_dir = c.run_dir, finished = true, checkpoint = checkpoint.filename(c.run_dir, self.step)}
  end
  self.t0 = data.now()
  self.tty = require("iddpm").isatty and require("iddpm").isatty(1)
  local t_start, step_start = self.t0, self.step
  local function loop()
    while not stop or self.step < stop do
      if c.max_minutes > 0 and self:time_up() then
        if not self.quiet then self:clear_progress(); say("max_minutes=%g reached at step %d", c.max_minutes, self.step) end
        break
      end
      self:step_once()
      if self.step % c.log_interval == 0 then
        self:log(t_start, step_start)
      else
        self:progress(t_start, step_start)
      end
      if self.step % c.save_interval == 0 then self:save() end
      if c.sample_interval > 0 and self.step % c.sample_interval == 0 then self:sample_grid() end
    end
  end
  -- Ctrl-C inside an engine call makes that call fail ("backward: interrupted") and
  -- leaves the interpreter's hook armed: it raises "interrupted!" at the next Lua
  -- instruction. The nested pcall makes sure that happens inside the outer one.
  local ok, err = pcall(function()
    local ok1, err1 = pcall(loop)
    if not ok1 then error(err1, 0) end
  end)
  if not ok then
    local msg = tostring(err)
    if msg:find("interrupted", 1, true) and not cfg.is_user_error(err) then
      data.clear_interrupt()
      self:clear_progress()
      if self.phase == "update" then
        say("\ninterrupted while updating the weights at step %d: not saving (the last checkpoint is step %s)",
          self.step, tostring(self.last_saved))
        cfg.error(("interrupted: the last checkpoint is step %s; run the same command to resume")
          :format(tostring(self.last_saved)), 130)
      else
        if self.phase == "forward" then
          self:set_rng_state(self.snapshot.rng)
          self.loader:set_state(self.snapshot.data)
        end
        self.phase = "idle"
        if self.dist.main then say("\ninterrupted at step %d: saving a checkpoint", self.step) end
        self:save()
        cfg.error(("interrupted: saved checkpoint at step %d; run the same command to resume"):format(self.step), 130)
      end
    end
    self:clear_progress()
    error(err, 0)
  end
  if self.acc then self:log(t_start, step_start) end
  self:clear_progress()
  self:save()
  self:plot_loss()
  -- the final grid, unless the last step already drew it (sample_interval dividing it)
  if c.num_samples > 0 and self.last_grid_step ~= self.step then self:sample_grid() end
  local okr, rep = true, nil
  if self.dist.main then okr, rep = pcall(function() return require("iddpm.report").write(c.run_dir) end) end
  if not self.quiet then say(okr and "run report: %s" or "run report not written: %s", tostring(rep)) end
  return {step = self.step, loss = self.last_log and self.last_log.loss, log = self.last_log, run_dir = c.run_dir,
    checkpoint = checkpoint.filename(c.run_dir, self.step), grid = self.last_grid}
end

-- (the run_dir lock stays with the process until it exits: the report and anything
-- else written after training are covered too; this process may lock it again)
function Trainer:close() self.loader:close() end

-- ---------------------------------------------------------------- entry point

function train.run(c, opts)
  local tr = train.new(c, opts)
  local res = tr:run()
  tr:close()
  return res
end

-- what a run writes into run_dir (for --dry-run)
function train.outputs(c)
  local r = c.run_dir
  local list = {r .. "/config.json (the full resolved config)",
    ("%s/ckpt_<step>.safetensors every %d steps and at the end (%s)"):format(r, c.save_interval,
      c.keep_checkpoints > 0 and ("the newest " .. c.keep_checkpoints .. " kept") or "all kept"),
    ("%s/log.jsonl and %s/metrics.csv (every %d steps)"):format(r, r, c.log_interval), r .. "/loss.png"}
  if c.num_samples > 0 then
    list[#list + 1] = ("%s/samples_<step>.png (%d images, sampler steps %s)%s"):format(r, c.num_samples, c.sample_steps,
      c.sample_interval > 0 and (" every " .. c.sample_interval .. " steps and at the end") or " at the end")
  end
  return list
end

function train.main(recipe_cfg, args)
  local c, flags = cfg.command(recipe.SCHEMA, recipe_cfg, args)
  if not c then return end   -- help was printed
  if not flags.dry_run then
    local launched = dist.setup(c)   -- gpus=N: this process starts the ranks and waits
    if launched then
      if launched ~= 0 then cfg.error(("train: a rank failed (exit status %d)"):format(launched), launched) end
      return {launched = true}
    end
    if dist.world().size > 1 then return train.main_rank(c) end
  end
  device.check(c.device, "train")   -- a missing GPU is the first thing said
  local changed = recipe.describe(c, true)
  say("iddpm train: config (the keys that differ from the defaults; all of them go to %s/config.json)", c.run_dir)
  if changed ~= "" then say("%s", changed) end
  if flags.dry_run then
    say("dry run: the config is valid; a run would write")
    for _, l in ipairs(train.outputs(c)) do say("  %s", l) end
    return {dry_run = true, config = c}
  end
  say("loss: %s", c.use_kl and "L_vlb (rescaled KL, bits/dim x T)" or (c.learn_sigma and
    ("L_hybrid = mse(eps) + %s * L_t (vb in bits/dim, stop-gradient on the mean; lambda = 0.001 x T)"):format(
      c.rescale_learned_sigmas and ("T/1000 = " .. (c.diffusion_steps / 1000)) or "1") or "L_simple = mse(eps)"))
  local res = train.run(c)
  if res.finished then return res end
  say("done: step %d, final loss %s; run directory %s", res.step, res.loss and ("%.4f"):format(res.loss) or "?", res.run_dir)
  if res.grid then say("final sample grid: %s", res.grid) end
  return res
end

-- one rank of a data-parallel run: rank 0 prints; an error on any rank ends them all
function train.main_rank(c)
  local W = dist.world()
  device.check(c.device, "train")
  if W.main then
    say("iddpm train: rank 0 of %d, global batch %d = %d x batch_size %d", W.size, W.size * c.batch_size, W.size,
      c.batch_size)
    local changed = recipe.describe(c, true)
    if changed ~= "" then say("%s", changed) end
  end
  local ok, res = pcall(train.run, c, {quiet = not W.main})
  if not ok then
    local msg = type(res) == "table" and res.msg or tostring(res)
    if not W.main and msg:find("^interrupted") then msg = "interrupted" end   -- rank 0 says what was saved
    dist.abort(msg)
  end
  if W.main and not res.finished then
    say("done: step %d, final loss %s; run directory %s", res.step, res.loss and ("%.4f"):format(res.loss) or "?", res.run_dir)
  end
  dist.finalize()
  return res
end

return train
