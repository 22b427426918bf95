-- iddpm/nn/module.lua — the Module base and the generic layers (Linear, Conv2d,
-- Conv1d, GroupNorm, SiLU, Dropout, Embedding, Sequential, Identity).
--
-- A module keeps its parameters and children in insertion order under the official
-- PyTorch names, so named_parameters() gives "input_blocks.1.0.in_layers.2.weight"
-- exactly as improved-diffusion's state_dict does. forward(...) is also __call.
-- Errors raised inside a child are re-raised with the child's path in front:
-- "output_blocks.4.0.in_layers.2: conv2d: input (2,512,8,8) has 512 channels, ...".
local T = require "iddpm.tensor"

local nn = {}

local Module = {}
Module.__index = Module
nn.Module = Module

-- Make a class: nn.class("Conv2d") returns a table whose instances are modules.
function nn.class(name, parent)
  local cls = setmetatable({}, {__index = parent or Module})
  cls.__index = cls
  cls.__name = name
  cls.__call = function(self, ...) return self:forward(...) end
  cls.__tostring = function(self) return self:describe() end
  return cls
end

function nn.new(cls)
  return setmetatable({_params = {}, _param_names = {}, _children = {}, _child_names = {}, training = true}, cls)
end

function Module:add_param(name, t)
  t.requires_grad = true
  if self._params[name] == nil then table.insert(self._param_names, name) end
  self._params[name] = t
  self[name] = t
  return t
end

function Module:add(name, child)
  name = tostring(name)
  if self._children[name] == nil then table.insert(self._child_names, name) end
  self._children[name] = child
  return child
end

function Module:child(name) return self._children[tostring(name)] end

-- "path: message" (or "path.inner.path: message" when the message already starts with a
-- module path), dropping the "file.lua:123: " position of errors raised inside modules
function nn.where(path, err)
  local msg = tostring(err):gsub("^[^%s:]+%.lua:%d+: ", "")
  local inner = msg:match("^([%w_]+[%.%w_]*): ")
  local is_path = inner and (inner:find("^%d") or inner:find("%.") or inner:find("^[%w_]+_blocks") or inner:find("_layers"))
  return path .. (is_path and "." or ": ") .. msg
end

-- run child:forward(...) and put the child's path in front of any error
function Module:call(name, ...)
  local child = self._children[name]
  local ok, a, b = pcall(child.forward, child, ...)
  if not ok then error(nn.where(name, a), 0) end
  return a, b
end

-- ordered list of {name, tensor}
function Module:named_parameter_list(prefix, out)
  out = out or {}
  prefix = prefix or ""
  for _, n in ipairs(self._param_names) do out[#out + 1] = {prefix .. n, self._params[n]} end
  for _, c in ipairs(self._child_names) do self._children[c]:named_parameter_list(prefix .. c .. ".", out) end
  return out
end

-- name -> tensor
function Module:named_parameters()
  local r = {}
  for _, p in ipairs(self:named_parameter_list()) do r[p[1]] = p[2] end
  return r
end

function Module:parameters()
  local r = {}
  for _, p in ipairs(self:named_parameter_list()) do r[#r + 1] = p[2] end
  return r
end

function Module:parameter_names()
  local r = {}
  for _, p in ipairs(self:named_parameter_list()) do r[#r + 1] = p[1] end
  return r
end

function Module:num_params()
  local n = 0
  for _, p in ipairs(self:named_parameter_list()) do n = n + p[2]:numel() end
  return n
end

-- name -> detached tensor sharing storage (save with T.save)
function Module:state_dict()
  local r = {}
  for _, p in ipairs(self:named_parameter_list()) do r[p[1]] = p[2]:detach() end
  return r
end

-- copies values in; every parameter must be present with its shape unless strict=false;
-- keys may carry a prefix (e.g. "param." in reference dumps) given as opts.prefix
function Module:load_state_dict(sd, opts)
  opts = opts or {}
  local prefix = opts.prefix or ""
  local strict = opts.strict ~= false
  local missing, seen = {}, {}
  T.no_grad(function()
    for _, p in ipairs(self:named_parameter_list()) do
      local name, t = p[1], p[2]
      local src = sd[prefix .. name]
      if src == nil then
        missing[#missing + 1] = name
      else
        seen[prefix .. name] = true
        -- the full shape must match (the same element count in another layout, say a conv
        -- weight stored (3,3,1,32) for (32,1,3,3), would load scrambled weights)
        local ss, ts = src:shape(), t:shape()
        local same = #ss == #ts
        for i = 1, #ts do if ss[i] ~= ts[i] then same = false end end
        if not same then
          error(("load_state_dict: %s%s has shape (%s) in the file, the model expects (%s)"):format(
            prefix, name, table.concat(ss, ","), table.concat(ts, ",")), 2)
        end
        t:copy_(src)
      end
    end
  end)
  if strict and #missing > 0 then
    error(("load_state_dict: %d parameters missing, first: %s"):format(#missing, missing[1]), 2)
  end
  if strict then
    for k in pairs(sd) do
      if k:sub(1, #prefix) == prefix and not seen[k] and not k:find("^__") then
        error("load_state_dict: unexpected key " .. k .. " (not a parameter of this model)", 2)
      end
    end
  end
  return missing
end

function Module:train(on)
  if on == nil then on = true end
  self.training = on
  for _, c in ipairs(self._child_names) do self._children[c]:train(on) end
  return self
end

function Module:eval() return self:train(false) end

-- move every parameter to device ("cpu" or "cuda") in place; returns self
function Module:to(device)
  T.no_grad(function()
    for _, n in ipairs(self._param_names) do
      local p = self._params[n]
      if p:device() ~= device then
        local q = p:to(device)
        q.requires_grad = true
        self._params[n] = q
        self[n] = q
      end
    end
  end)
  for _, n in ipairs(self._child_names) do self._children[n]:to(device) end
  return self
end

function Module:zero_grad()
  for _, p in ipairs(self:parameters()) do p:zero_grad() end
end

function Module:describe() return self.__name or "Module" end

-- ---------------------------------------------------------------- initialisation

-- PyTorch's default for conv/linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
local function uniform(shape, bound, gen)
  return T.rand(shape, gen) * (2 * bound) - bound
end
nn.init_gen = T.generator(0)
function nn.manual_seed(seed) nn.init_gen = T.generator(seed) end

-- ---------------------------------------------------------------- layers

local Linear = nn.class("Linear")
nn.Linear = Linear
function Linear.new(nin, nout, opts)
  local self = nn.new(Linear)
  local b = 1 / math.sqrt(nin)
  self.nin, self.nout = nin, nout
  self:add_param("weight", uniform({nout, nin}, b, nn.init_gen))
  self:add_param("bias", uniform({nout}, b, nn.init_gen))
  return self
end
function Linear:forward(x) return x:matmul(self.weight:transpose(1, 2)) + self.bias end
function Linear:describe() return ("Linear(%d, %d)"):format(self.nin, self.nout) end

local Conv2d = nn.class("Conv2d")
nn.Conv2d = Conv2d
-- opts: stride (1), padding (k//2), zero_init (false)
function Conv2d.new(cin, cout, k, opts)
  opts = opts or {}
  local self = nn.new(Conv2d)
  self.cin, self.cout, self.k = cin, cout, k
  self.stride = opts.stride or 1
  self.padding = opts.padding or k // 2
  local b = 1 / math.sqrt(cin * k * k)
  self:add_param("weight", opts.zero_init and T.zeros(cout, cin, k, k) or uniform({cout, cin, k, k}, b, nn.init_gen))
  self:add_param("bias", opts.zero_init and T.zeros(cout) or uniform({cout}, b, nn.init_gen))
  return self
end
function Conv2d:forward(x) return T.conv2d(x, self.weight, self.bias, self.stride, self.padding) end
function Conv2d:describe() return ("Conv2d(%d, %d, %d, stride %d)"):format(self.cin, self.cout, self.k, self.stride) end

-- 1x1 Conv1d over (B, C, N): weight (out, in, 1) as in PyTorch
local Conv1d = nn.class("Conv1d")
nn.Conv1d = Conv1d
function Conv1d.new(cin, cout, opts)
  opts = opts or {}
  local self = nn.new(Conv1d)
  self.cin, self.cout = cin, cout
  local b = 1 / math.sqrt(cin)
  self:add_param("weight", opts.zero_init and T.zeros(cout, cin, 1) or uniform({cout, cin, 1}, b, nn.init_gen))
  self:add_param("bias", opts.zero_init and T.zeros(cout) or uniform({cout}, b, nn.init_gen))
  return self
end
-- x (B, in, N) -> (B, out, N), as a 1x1 conv2d over (B, in, N, 1): its kernel sums the
-- weight gradient over the batch in place (a batched matmul made a (B, out, in)
-- gradient and reduced it) and fuses the bias
function Conv1d:forward(x)
  local s = x:shape()
  if #s ~= 3 then error(("Conv1d: input %s must be (B, %d, N)"):format(tostring(x), self.cin), 2) end
  local y = T.conv2d(x:reshape(s[1], s[2], s[3], 1), self.weight:reshape(self.cout, self.cin, 1, 1), self.bias)
  return y:reshape(s[1], self.cout, s[3])
end

local GroupNorm = nn.class("GroupNorm")
nn.GroupNorm = GroupNorm
function GroupNorm.new(groups, channels, opts)
  opts = opts or {}
  local self = nn.new(GroupNorm)
  if channels % groups ~= 0 then error(("GroupNorm: %d channels are not divisible into %d groups"):format(channels, groups), 2) end
  self.groups, self.channels, self.eps = groups, channels, opts.eps or 1e-5
  self:add_param("weight", T.ones(channels))
  self:add_param("bias", T.zeros(channels))
  return self
end
-- opts: scale, shift (N, C) for (1+scale)*y+shift; silu = true fuses the activation
function GroupNorm:forward(x, opts)
  opts = opts or {}
  return T.group_norm(x, self.groups, self.weight, self.bias, opts.scale, opts.shift, opts.silu or false, self.eps)
end

local SiLU = nn.class("SiLU")
nn.SiLU = SiLU
function SiLU.new() return nn.new(SiLU) end
function SiLU:forward(x) return x:silu() end

local Identity = nn.class("Identity")
nn.Identity = Identity
function Identity.new() return nn.new(Identity) end
function Identity:forward(x) return x end

-- inverted dropout: active only in training mode; draws from nn.dropout_gen
local Dropout = nn.class("Dropout")
nn.Dropout = Dropout
nn.dropout_gen = T.generator(0x5eed)
function Dropout.new(p) local self = nn.new(Dropout); self.p = p or 0.5; return self end
function Dropout:forward(x)
  if not self.training or self.p == 0 then return x end
  return T.dropout(x, self.p, nn.dropout_gen)
end

local Embedding = nn.class("Embedding")
nn.Embedding = Embedding
function Embedding.new(n, dim)
  local self = nn.new(Embedding)
  self.n, self.dim = n, dim
  self:add_param("weight", T.randn({n, dim}, nn.init_gen))
  return self
end
function Embedding:forward(idx)   -- idx: int64 tensor (N) of 0-based ids
  return self.weight:index_select(1, idx)
end

local Sequential = nn.class("Sequential")
nn.Sequential = Sequential
function Sequential.new(list)
  local self = nn.new(Sequential)
  for i, m in ipairs(list or {}) do self:add(i - 1, m) end
  return self
end
function Sequential:forward(x, ...)
  for _, name in ipairs(self._child_names) do x = self:call(name, x, ...) end
  return x
end
function Sequential:len() return #self._child_names end

return nn
