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
-- ema_rates (JSON list), plus any string the caller adds}. Files are written to a
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
      "tests/ref/convert_official.py"):format(path, C.FORMAT), 2)
  end
  return {tensors = tensors, meta = meta, config = io_.json_decode(meta.config or "{}"), step = tonumber(meta.step),
          ema_rates = io_.json_decode(meta.ema_rates or "[]"), opt_step = tonumber(meta.opt_step or "0")}
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

return C
