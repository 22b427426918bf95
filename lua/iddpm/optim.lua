-- iddpm/optim.lua — AdamW (torch.optim.AdamW semantics, official defaults lr 1e-4,
-- betas 0.9/0.999, eps 1e-8, no weight decay) and EMA of model weights at a given
-- rate (the official update ema = rate*ema + (1-rate)*param, started from a copy).
-- Both keep their state in tensors so checkpoints save and restore it exactly.
local T = require "iddpm.tensor"
local C = require "iddpm.optim_c"

local optim = {}

-- ---------------------------------------------------------------- AdamW

local AdamW = {}
AdamW.__index = AdamW

-- params: list of tensors (model:parameters()); opts: lr, betas = {b1, b2}, eps, weight_decay
function optim.adamw(params, opts)
  opts = opts or {}
  local self = setmetatable({params = params, m = {}, v = {}, step_count = 0}, AdamW)
  self.lr = opts.lr or 1e-4
  local betas = opts.betas or {0.9, 0.999}
  self.beta1, self.beta2 = betas[1], betas[2]
  self.eps = opts.eps or 1e-8
  self.weight_decay = opts.weight_decay or 0.0
  for i, p in ipairs(params) do
    if p:dtype() ~= "float32" then error(("adamw: parameter %d is %s, expected float32"):format(i, p:dtype()), 2) end
    self.m[i] = T.zeros(p:shape())
    self.v[i] = T.zeros(p:shape())
    if p:device() ~= "cpu" then   -- optimizer state lives with the parameter
      self.m[i] = self.m[i]:to(p:device()); self.v[i] = self.v[i]:to(p:device())
    end
  end
  return self
end

function AdamW:zero_grad()
  for _, p in ipairs(self.params) do p:zero_grad() end
end

function AdamW:step()
  self.step_count = self.step_count + 1
  C.adamw_step(self.params, self.m, self.v, {lr = self.lr, beta1 = self.beta1, beta2 = self.beta2, eps = self.eps,
    weight_decay = self.weight_decay, step = self.step_count})
end

-- tensors named "<prefix>m.<name>" / "<prefix>v.<name>" with names from the model
function AdamW:state_tensors(names, prefix)
  local r = {}
  for i, n in ipairs(names) do r[prefix .. "m." .. n] = self.m[i]; r[prefix .. "v." .. n] = self.v[i] end
  return r
end

function AdamW:load_state_tensors(sd, names, prefix, step)
  T.no_grad(function()
    for i, n in ipairs(names) do
      local m, v = sd[prefix .. "m." .. n], sd[prefix .. "v." .. n]
      if not m or not v then error("adamw: checkpoint has no optimizer state for " .. n, 2) end
      self.m[i]:copy_(m); self.v[i]:copy_(v)
    end
  end)
  self.step_count = step
end

-- ---------------------------------------------------------------- gradients

function optim.grad_norm(params) return C.grad_norm(params) end

-- scale gradients so their global norm is at most max_norm; returns the norm before
function optim.clip_grad_norm(params, max_norm)
  local n = C.grad_norm(params)
  if n > max_norm and n > 0 then C.grad_scale(params, max_norm / (n + 1e-6)) end
  return n
end

-- ---------------------------------------------------------------- EMA

local EMA = {}
EMA.__index = EMA

-- model: a module (or a list of tensors); rate: e.g. 0.9999
function optim.ema(model, rate)
  local params = model.parameters and model:parameters() or model
  local self = setmetatable({params = params, rate = rate or 0.9999, shadow = {}}, EMA)
  T.no_grad(function()
    for i, p in ipairs(params) do self.shadow[i] = p:detach():clone() end
  end)
  return self
end

function EMA:update() C.ema_update(self.shadow, self.params, self.rate) end

-- copy the EMA weights into the model (e.g. for sampling); returns a restore function
function EMA:apply()
  local backup = {}
  T.no_grad(function()
    for i, p in ipairs(self.params) do backup[i] = p:detach():clone(); p:copy_(self.shadow[i]) end
  end)
  return function()
    T.no_grad(function() for i, p in ipairs(self.params) do p:copy_(backup[i]) end end)
  end
end

return optim
