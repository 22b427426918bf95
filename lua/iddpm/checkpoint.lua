-- iddpm/checkpoint.lua — run-directory checkpoints.
--
-- One safetensors file per save, RUN/ckpt_<step, 8 digits>.safetensors, holding:
--   model.<param>            the model's parameters (official names after the prefix)
--   ema_<rate>.<param>       one EMA copy per rate, e.g. ema_0.9999.input_blocks.0.0.weight
--   opt.m.<param>, opt.v.<param>   AdamW moments
--   extra.<name>             anything else a trainer needs back (RNG state, sampler history)
--   diffusion.betas          the base betas (float64, T); config.noise_schedule is "custom"
--                            when the recipe gave a function or a table
-- and __metadata__ {format = "iddpm-ckpt-1", step, config (JSON of the resolved config),
-- ema_rates (JSON list), settings (JSON of the model's run settings: recompute, dtype,
-- precision; Module:to), plus any string the caller adds}. Files are written to a
-- temporary name and renamed (engine/io), so a crash never damages the previous one.
local T = require "iddpm.tensor"
local io_ = require "iddpm.io"
local fs = require "iddpm.fs"

local C = {}
C.FORMAT = "iddpm-ckpt-1"

function C.filename(dir, step) return ("%s/ckpt_%08d.safetensors"):format(dir, step) end

-- list {step, path} of the checkpoints in dir, oldest first (regular files only: a FIFO
-- or directory named like a checkpoint is skipped, never opened)
function C.list(dir)
  local r = {}
  for _, f in ipairs(fs.list(dir)) do
    local s = f:match("^ckpt_(%d+)%.safetensors$")
    local path = dir .. "/" .. f
    if s and fs.is_file(path) then r[#r + 1] = {step = tonumber(s), path = path} end
  end
  table.sort(r, function(a, b) return a.step < b.step end)
  return r
end

function C.latest(dir)
  local l = C.list(dir)
  return l[#l]
end

-- parts: {model = module, emas = {{rate=, ema=obj}}, opt = adamw, extra = {name = tensor},
--         step = n, config = table, meta = {key = string}}
function C.save(dir, parts)
  local tensors = {}
  local names = parts.model:parameter_names()
  local params = parts.model:named_parameters()
  for _, n in ipairs(names) do tensors["model." .. n] = params[n] end
  local rates = {}
  for _, e in ipairs(parts.emas or {}) do
    rates[#rates + 1] = e.rate
    for i, n in ipairs(names) do tensors[("ema_%s.%s"):format(e.rate, n)] = e.ema.shadow[i] end
  end
  if parts.opt then
    for k, v in pairs(parts.opt:state_tensors(names, "opt.")) do tensors[k] = v end
  end
  for k, v in pairs(parts.extra or {}) do tensors["extra." .. k] = v end
  -- the diffusion's base betas (float64, length T): sampling and evaluation rebuild the
  -- schedule from them, so a schedule written as a function in a recipe needs no script
  if parts.betas then tensors["diffusion.betas"] = T.from_table(parts.betas, {#parts.betas}, "float64") end
  local meta = {format = C.FORMAT, step = tostring(parts.step), config = io_.json_encode(parts.config or {}),
                ema_rates = io_.json_encode(rates), opt_step = tostring(parts.opt and parts.opt.step_count or 0)}
  if parts.model.get_settings then meta.settings = io_.json_encode(parts.model:get_settings()) end
  for k, v in pairs(parts.meta or {}) do meta[k] = v end
  local path = C.filename(dir, parts.step)
  T.save(path, tensors, meta)
  return path
end

-- remove all but the newest `keep` checkpoints
function C.prune(dir, keep)
  local l = C.list(dir)
  for i = 1, #l - keep do fs.remove(l[i].path) end
end

-- read a checkpoint file: returns {tensors, meta, config (table), step, ema_rates}
function C.read(path)
  local ok, tensors, meta = pcall(T.load, path)
  if not ok then error(("checkpoint %s: %s"):format(path, tostring(tensors)), 2) end
  if meta.format ~= C.FORMAT then
    error(("%s is not an iddpm checkpoint (no __metadata__ format = %q); convert official .pt files with " ..
      "tools/convert_official.py"):format(path, C.FORMAT), 2)
  end
  return {tensors = tensors, meta = meta, config = io_.json_decode(meta.config or "{}"), step = tonumber(meta.step),
          ema_rates = io_.json_decode(meta.ema_rates or "[]"), opt_step = tonumber(meta.opt_step or "0"),
          settings = meta.settings and io_.json_decode(meta.settings) or nil}
end

-- error unless tensor src (name in the checkpoint at path) has exactly dst's shape:
-- copy_ would broadcast a (1,C) into (C,C) or a numel-equal reshape would scramble
function C.check_shape(path, name, src, dst)
  local a, b = src:shape(), dst:shape()
  local same = #a == #b
  for i = 1, #b do if a[i] ~= b[i] then same = false end end
  if not same then
    error(("checkpoint %s: %s has shape (%s), the model expects (%s)"):format(path, name,
      table.concat(a, ","), table.concat(b, ",")), 0)
  end
  return src
end

-- the tensors under a prefix ("model." or "ema_0.9999."), prefix removed
function C.subset(tensors, prefix)
  local r = {}
  for k, v in pairs(tensors) do
    if k:sub(1, #prefix) == prefix then r[k:sub(#prefix + 1)] = v end
  end
  return r
end

-- resolve a path that may be a run directory (newest checkpoint) or a file
function C.resolve(path)
  if fs.is_file(path) and path:match("%.safetensors$") then return path end
  local l = fs.is_dir(path) and C.latest(path)
  if l then return l.path end
  error(("no checkpoint found at %s (expected a .safetensors file or a run directory with ckpt_*.safetensors)"):format(path), 2)
end

-- ---------------------------------------------------------------- the model loader

local function fail(msg) require("iddpm.config").error(msg) end

-- the EMA rate to use: `want` (a string or number) or 0.9999 or the newest; nil = none
local function pick_rate(ck, file, want)
  local rates = {}
  for _, r in ipairs(ck.ema_rates or {}) do rates[#rates + 1] = tostring(r) end
  if #rates == 0 then
    local seen = {}
    for k in pairs(ck.tensors) do
      local r = k:match("^ema_([%d.]-)%.%a")
      if r and not seen[r] then seen[r] = true; rates[#rates + 1] = r end
    end
    table.sort(rates)
  end
  if want then
    for _, r in ipairs(rates) do if r == tostring(want) or tonumber(r) == tonumber(want) then return r end end
    fail(("no EMA weights with rate %s in %s (rates: %s)"):format(tostring(want), file,
      #rates > 0 and table.concat(rates, ", ") or "none"))
  end
  local rate
  for _, r in ipairs(rates) do if tonumber(r) == 0.9999 then rate = r end end
  return rate or rates[#rates]
end

-- The one way from a checkpoint to a model: sampling (iddpm sample), evaluation
-- (tools/eval_nll.lua) and training's resume all load through it.
--   model, diffusion, info = C.load_model(path, opts)
-- path: a checkpoint file or a run directory (its newest checkpoint). opts:
--   use_ema (true): EMA weights (ema_rate picks the rate; else 0.9999 or the newest),
--     false: the raw model weights
--   model: load into this model (resume: the trainer's own, built from its recipe and
--     checked against the checkpoint) instead of building one from the stored config
--   steps, sampler: the diffusion's respacing (iddpm.sample's rules; nil = the stored one)
--   device: where the model goes ("cpu" default)
--   settings: {recompute, dtype, precision} over the checkpoint's stored settings (a
--     built model only: a given model keeps its own)
--   checkpoint: the C.read table when the caller read the file already
-- info: {path, step, config (flat), unet (its config), weights ("model" or "ema_<rate>"),
--   rate, sampler, message, settings, checkpoint (the C.read table: EMA, optimizer and
--   extra tensors for resume)}. Errors are user errors naming the file and what is wrong.
function C.load_model(path, opts)
  opts = opts or {}
  local S = require "iddpm.sample"
  local file = opts.checkpoint and path or S.resolve(path)
  local ck = opts.checkpoint
  if not ck then
    local ok, r = pcall(C.read, file)
    if not ok then fail(tostring(r):gsub("^[^:]*checkpoint%.lua:%d+: ", "")) end
    ck = r
  end
  local cfg = S.flat_config(ck.config)
  local betas = ck.tensors["diffusion.betas"] and ck.tensors["diffusion.betas"]:totable()
  local diff, sampler = S.diffusion(cfg, opts.steps, opts.sampler, betas)
  local ucfg = S.unet_config(cfg)
  local rate = opts.use_ema ~= false and pick_rate(ck, file, opts.ema_rate) or nil
  local prefix = rate and ("ema_" .. rate .. ".") or "model."
  local weights = prefix:sub(1, -2)
  local sd = C.subset(ck.tensors, prefix)
  if next(sd) == nil then fail(("%s has no %s* tensors"):format(file, prefix)) end
  local model = opts.model
  local settings
  if not model then
    local ok, m = pcall(require("iddpm").nn.unet, ucfg)
    if not ok then fail(("cannot build the model of %s: %s"):format(file, tostring(m))) end
    model = m
    for _, name in ipairs(model:parameter_names()) do
      local t = sd[name]
      if t then
        local d = t:float()
        if (d - d):sum():item() ~= 0 then
          fail(("%s: the %s weights hold NaN or Inf (%s): the run diverged before this checkpoint; use an earlier one")
            :format(file, weights, name))
        end
      end
    end
    settings = {}
    for k, v in pairs(ck.settings or {}) do settings[k] = v end
    for k, v in pairs(opts.settings or {}) do settings[k] = v end
  end
  local ok, err = pcall(model.load_state_dict, model, sd)
  if not ok then fail(("%s (%s weights) does not fit its config: %s"):format(file, weights, tostring(err))) end
  if settings then
    local ok2, e2 = pcall(model.to, model, opts.device or "cpu", settings)
    if not ok2 then fail(("%s: %s"):format(file, tostring(e2))) end
    model:eval()
  elseif opts.device then
    model:to(opts.device)
  end
  local msg = rate and ("using EMA weights (rate %s)"):format(rate)
    or (opts.use_ema ~= false and "no EMA weights in the checkpoint: using raw model weights" or "using raw model weights")
  return model, diff, {path = file, step = ck.step, config = cfg, unet = ucfg, weights = weights, rate = rate,
    sampler = sampler, message = msg, settings = model.get_settings and model:get_settings() or nil, checkpoint = ck}
end

return C
