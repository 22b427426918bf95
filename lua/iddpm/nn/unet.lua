-- iddpm/nn/unet.lua — the Improved-DDPM UNet (the official UNetModel), block by block,
-- with the official parameter names: ResBlock, AttentionBlock, Downsample, Upsample,
-- TimestepBlock (a Sequential that hands the timestep embedding to its ResBlocks),
-- and UNet{...} with the keys of model_and_diffusion_defaults().
local T = require "iddpm.tensor"
local nn = require "iddpm.nn.module"

local M = {}

-- ---------------------------------------------------------------- ResBlock

local ResBlock = nn.class("ResBlock")
M.ResBlock = ResBlock
-- ResBlock.new(channels, emb_channels, dropout, {out_channels, use_scale_shift_norm})
function ResBlock.new(ch, emb_ch, dropout, opts)
  opts = opts or {}
  local self = nn.new(ResBlock)
  local out = opts.out_channels or ch
  self.ch, self.out_ch = ch, out
  self.scale_shift = opts.use_scale_shift_norm ~= false
  self.in_layers = self:add("in_layers", nn.Sequential.new{nn.GroupNorm.new(32, ch), nn.SiLU.new(), nn.Conv2d.new(ch, out, 3)})
  self.emb_layers = self:add("emb_layers", nn.Sequential.new{nn.SiLU.new(), nn.Linear.new(emb_ch, self.scale_shift and 2 * out or out)})
  self.out_layers = self:add("out_layers", nn.Sequential.new{nn.GroupNorm.new(32, out), nn.SiLU.new(), nn.Dropout.new(dropout),
    nn.Conv2d.new(out, out, 3, {zero_init = true})})
  if out ~= ch then self.skip = self:add("skip_connection", nn.Conv2d.new(ch, out, 1)) end
  return self
end

local function fail(path, err) error(nn.where(path, err), 0) end

-- Intermediates are freed (t:free()) as soon as the forward no longer needs them: a
-- tensor's memory otherwise waits for Lua's collector, which does not know its size,
-- and on the GPU a training step then held every unsaved intermediate of the forward
-- (about as much again as the activations the tape saves). Freeing drops only this
-- reference: a tensor the tape saved for the backward stays alive. `keep` is a tensor
-- that must survive (e.g. a module that returned its input unchanged).
local function drop(t, keep)
  if t ~= nil and t ~= keep then t:free() end
end

-- Recomputation (training memory): GroupNorm (+scale/shift, SiLU, dropout)
-- followed by a convolution runs as one T.norm_conv, which saves only the norm's input
-- and recomputes the norm (and the dropout mask) in the backward instead of keeping the
-- conv's input, as torch.compile's partitioner does. Same kernels, same results, same
-- random stream. IDDPM_RECOMPUTE=0 (or M.recompute = false) runs the ops one by one.
M.recompute = os.getenv("IDDPM_RECOMPUTE") ~= "0"

-- gn: a GroupNorm, cv: a Conv2d (or the weight and bias of a 1x1 conv given as
-- {weight =, bias =, stride =, padding =}), dr: a Dropout or nil; opts: scale, shift, silu
local function norm_conv(x, gn, cv, opts, dr)
  local p = dr and dr.training and dr.p or 0
  return T.norm_conv(x, gn.groups, gn.weight, gn.bias, cv.weight, cv.bias, {scale = opts.scale, shift = opts.shift,
    silu = opts.silu, eps = gn.eps, dropout = p, generator = nn.dropout_gen, stride = cv.stride, padding = cv.padding})
end

-- x (N, ch, H, W), emb (N, emb_ch) -> (N, out, H, W)
function ResBlock:forward(x, emb)
  local ok, r = pcall(function()
    local il = self.in_layers
    if M.recompute then return norm_conv(x, il:child(0), il:child(2), {silu = true}) end
    local h = il:child(0):forward(x, {silu = true})             -- GN + SiLU fused
    local o = il:call("2", h)
    drop(h, o)
    return o
  end)
  if not ok then fail("in_layers", r) end
  local h = r
  local e = self:call("emb_layers", emb)                          -- (N, out or 2*out)
  local ol = self.out_layers
  ok, r = pcall(function()
    local n = ol:child(0)
    local g
    if self.scale_shift then
      local scale, shift = e:narrow(2, 1, self.out_ch), e:narrow(2, self.out_ch + 1, self.out_ch)
      if M.recompute then
        local o = norm_conv(h, n, ol:child(3), {scale = scale, shift = shift, silu = true}, ol:child(2))
        drop(h, o)
        return o
      end
      g = n:forward(h, {scale = scale, shift = shift, silu = true})
    else
      local er = e:reshape(e:size(1), self.out_ch, 1, 1)
      if h:dtype() ~= er:dtype() then er = er:to(h:dtype()) end   -- bf16 activations stay bf16
      local he = h + er
      if M.recompute then
        local o = norm_conv(he, n, ol:child(3), {silu = true}, ol:child(2))
        drop(he, o)
        drop(h, o)
        return o
      end
      g = n:forward(he, {silu = true})
      drop(he, g)
    end
    drop(h, g)
    local d = ol:call("2", g)                                     -- dropout
    drop(g, d)
    local o = ol:call("3", d)
    drop(d, o)
    return o
  end)
  if not ok then fail("out_layers", r) end
  h = r
  drop(e)
  local skip = self.skip and self:call("skip_connection", x) or x
  local out = skip + h
  drop(h)
  drop(skip, x)
  return out
end
function ResBlock:describe() return ("ResBlock(%d -> %d)"):format(self.ch, self.out_ch) end

-- ---------------------------------------------------------------- AttentionBlock

local AttentionBlock = nn.class("AttentionBlock")
M.AttentionBlock = AttentionBlock
function AttentionBlock.new(ch, num_heads)
  local self = nn.new(AttentionBlock)
  self.ch, self.heads = ch, num_heads or 1
  if ch % self.heads ~= 0 then error(("AttentionBlock: %d channels not divisible by %d heads"):format(ch, self.heads), 2) end
  self.norm = self:add("norm", nn.GroupNorm.new(32, ch))
  self.qkv = self:add("qkv", nn.Conv1d.new(ch, 3 * ch))
  self.proj_out = self:add("proj_out", nn.Conv1d.new(ch, ch, {zero_init = true}))
  return self
end
-- x (N, C, H, W) -> same
function AttentionBlock:forward(x)
  local s = x:shape()
  local xf = x:reshape(s[1], s[2], s[3] * s[4])
  local qkv
  if M.recompute then
    -- norm + the 1x1 Conv1d over (N, C, H*W) as Conv1d runs it: a conv2d over (N, C, H*W, 1)
    -- (a view of x; the same kernels and shapes as the unfused pair)
    local q = self.qkv
    local x4 = x:reshape(s[1], s[2], s[3] * s[4], 1)
    local ok, r = pcall(norm_conv, x4, self.norm, {weight = q.weight:reshape(q.cout, q.cin, 1, 1), bias = q.bias,
      stride = 1, padding = 0}, {})
    if not ok then fail("qkv", r) end
    drop(x4, r)
    qkv = r:reshape(s[1], 3 * s[2], s[3] * s[4])
    drop(r, qkv)
  else
    local normed = self:call("norm", xf)
    qkv = self:call("qkv", normed)
    drop(normed, qkv)
  end
  local a = T.qkv_attention(qkv, self.heads)
  drop(qkv, a)
  local h = self:call("proj_out", a)
  drop(a, h)
  local sum = xf + h
  drop(h)
  local out = sum:reshape(s)
  drop(sum, out)
  return out
end
function AttentionBlock:describe() return ("AttentionBlock(%d, heads %d)"):format(self.ch, self.heads) end

-- ---------------------------------------------------------------- resampling

local Downsample = nn.class("Downsample")
M.Downsample = Downsample
function Downsample.new(ch, use_conv)
  local self = nn.new(Downsample)
  self.use_conv = use_conv ~= false
  if self.use_conv then self.op = self:add("op", nn.Conv2d.new(ch, ch, 3, {stride = 2, padding = 1})) end
  return self
end
function Downsample:forward(x)
  if self.use_conv then return self:call("op", x) end
  return T.avg_pool2d(x, 2)
end

local Upsample = nn.class("Upsample")
M.Upsample = Upsample
function Upsample.new(ch, use_conv)
  local self = nn.new(Upsample)
  self.use_conv = use_conv ~= false
  if self.use_conv then self.conv = self:add("conv", nn.Conv2d.new(ch, ch, 3)) end
  return self
end
function Upsample:forward(x)
  local h = T.upsample_nearest(x, 2)
  if self.use_conv then return self:call("conv", h) end
  return h
end

-- a Sequential whose ResBlocks also receive the timestep embedding
local TimestepBlock = nn.class("TimestepBlock", nn.Sequential)
M.TimestepBlock = TimestepBlock
function TimestepBlock.new(list)
  local self = nn.Sequential.new(list)
  return setmetatable(self, TimestepBlock)
end
function TimestepBlock:forward(x, emb)
  local cur = x
  for _, name in ipairs(self._child_names) do
    local c = self._children[name]
    local nxt
    if getmetatable(c) == ResBlock then nxt = self:call(name, cur, emb) else nxt = self:call(name, cur) end
    if cur ~= x then drop(cur, nxt) end   -- the caller's x is not ours to free
    cur = nxt
  end
  return cur
end

-- ---------------------------------------------------------------- UNet

local UNet = nn.class("UNet")
M.UNet = UNet

local DEFAULTS = {
  image_size = 64, in_channels = 3, num_channels = 128, num_res_blocks = 2, channel_mult = nil,
  attention_resolutions = {16, 8}, num_heads = 4, num_heads_upsample = -1, dropout = 0.0,
  learn_sigma = false, use_scale_shift_norm = true, num_classes = nil, conv_resample = true,
  out_channels = nil, seed = 0,
}
M.DEFAULTS = DEFAULTS

local function default_mult(size)
  if size == 256 then return {1, 1, 2, 2, 4, 4} end
  if size == 64 then return {1, 2, 3, 4} end
  if size == 32 then return {1, 2, 2, 2} end
  if size == 28 then return {1, 2, 2} end
  error(("unet: no default channel_mult for image_size %d; give channel_mult"):format(size), 3)
end

-- parse "16,8" or {16, 8}
local function int_list(v)
  if type(v) == "table" then return v end
  local r = {}
  for n in tostring(v):gmatch("%d+") do r[#r + 1] = tonumber(n) end
  return r
end

-- Check that a configuration can be built before any work is done: the image side
-- must halve cleanly at every downsampling (else the decoder's skip connections do
-- not line up), every level's channels must split into the 32 groups of the group
-- norm and into the attention heads. Raises a user error (iddpm.config) naming the
-- value and what would work. cfg: image_size, num_channels, channel_mult (list or
-- "1,2,2"; nil = the default), attention_resolutions, num_heads, num_heads_upsample.
function M.check_config(cfg)
  local E = require("iddpm.config").error
  local size = cfg.image_size or DEFAULTS.image_size
  local mult = cfg.channel_mult and int_list(cfg.channel_mult)
  if not mult or #mult == 0 then
    local ok, m = pcall(default_mult, size)
    if not ok then
      E(("image_size=%d has no default channel_mult (defaults exist for 28, 32, 64 and 256): give channel_mult, "
        .. "e.g. channel_mult=1,2,2"):format(size))
    end
    mult = m
  end
  local downs = #mult - 1
  local f = 1 << downs
  if size % f ~= 0 then
    local lo, hi = size - size % f, size - size % f + f
    local fits = {}
    for d = downs - 1, 0, -1 do
      if size % (1 << d) == 0 then fits = d + 1; break end
    end
    E(("image_size=%d cannot go through the UNet's %d downsamplings (channel_mult %s has %d levels): the side "
      .. "must be a multiple of %d, e.g. %s%d; at %d px a channel_mult of at most %d entr%s works")
      :format(size, downs, table.concat(mult, ","), #mult, f, lo > 0 and (lo .. " or ") or "", hi,
        size, fits, fits == 1 and "y" or "ies"))
  end
  local mc = cfg.num_channels or DEFAULTS.num_channels
  local heads = cfg.num_heads or DEFAULTS.num_heads
  local heads_up = (cfg.num_heads_upsample == nil or cfg.num_heads_upsample == -1) and heads or cfg.num_heads_upsample
  local attn = {}
  for _, r in ipairs(int_list(cfg.attention_resolutions or DEFAULTS.attention_resolutions)) do attn[size // r] = true end
  for level, m in ipairs(mult) do
    local ch = m * mc
    if ch % 32 ~= 0 then
      E(("num_channels=%d with channel_mult %s gives %d channels at level %d: every level needs a multiple of 32 "
        .. "(the group norm's 32 groups)"):format(mc, table.concat(mult, ","), ch, level))
    end
    local ds = 1 << (level - 1)
    if ((attn[ds] or level == #mult) and ch % heads ~= 0) or (attn[ds] and ch % heads_up ~= 0) then
      E(("%d channels at level %d (attention there) do not split into num_heads=%d / num_heads_upsample=%d heads")
        :format(ch, level, heads, heads_up))
    end
  end
end

function UNet.new(cfg)
  M.check_config(cfg or {})
  local c = {}
  for k, v in pairs(DEFAULTS) do c[k] = v end
  for k, v in pairs(cfg or {}) do
    if DEFAULTS[k] == nil and k ~= "channel_mult" and k ~= "num_classes" and k ~= "out_channels" then
      error(("unet: unknown option '%s'"):format(k), 3)
    end
    c[k] = v
  end
  c.channel_mult = c.channel_mult and int_list(c.channel_mult) or default_mult(c.image_size)
  c.attention_resolutions = int_list(c.attention_resolutions)
  if c.num_heads_upsample == -1 then c.num_heads_upsample = c.num_heads end
  c.out_channels = c.out_channels or (c.learn_sigma and 2 * c.in_channels or c.in_channels)
  nn.manual_seed(c.seed)

  local self = nn.new(UNet)
  self.config = c
  local mc = c.num_channels
  local emb = 4 * mc
  self.time_embed = self:add("time_embed", nn.Sequential.new{nn.Linear.new(mc, emb), nn.SiLU.new(), nn.Linear.new(emb, emb)})
  if c.num_classes then self.label_emb = self:add("label_emb", nn.Embedding.new(c.num_classes, emb)) end
  local attn_ds = {}
  for _, r in ipairs(c.attention_resolutions) do attn_ds[c.image_size // r] = true end

  local input_blocks = self:add("input_blocks", nn.Sequential.new())
  self.input_blocks = input_blocks
  input_blocks:add(0, TimestepBlock.new{nn.Conv2d.new(c.in_channels, mc, 3)})
  local chans, ch, ds = {mc}, mc, 1
  for level, mult in ipairs(c.channel_mult) do
    for _ = 1, c.num_res_blocks do
      local layers = {ResBlock.new(ch, emb, c.dropout, {out_channels = mult * mc, use_scale_shift_norm = c.use_scale_shift_norm})}
      ch = mult * mc
      if attn_ds[ds] then layers[#layers + 1] = AttentionBlock.new(ch, c.num_heads) end
      input_blocks:add(input_blocks:len(), TimestepBlock.new(layers))
      chans[#chans + 1] = ch
    end
    if level ~= #c.channel_mult then
      input_blocks:add(input_blocks:len(), TimestepBlock.new{Downsample.new(ch, c.conv_resample)})
      chans[#chans + 1] = ch
      ds = ds * 2
    end
  end
  self.middle_block = self:add("middle_block", TimestepBlock.new{
    ResBlock.new(ch, emb, c.dropout, {use_scale_shift_norm = c.use_scale_shift_norm}),
    AttentionBlock.new(ch, c.num_heads),
    ResBlock.new(ch, emb, c.dropout, {use_scale_shift_norm = c.use_scale_shift_norm})})
  local output_blocks = self:add("output_blocks", nn.Sequential.new())
  self.output_blocks = output_blocks
  for level = #c.channel_mult, 1, -1 do
    local mult = c.channel_mult[level]
    for i = 0, c.num_res_blocks do
      local skip = table.remove(chans)
      local layers = {ResBlock.new(ch + skip, emb, c.dropout, {out_channels = mc * mult, use_scale_shift_norm = c.use_scale_shift_norm})}
      ch = mc * mult
      if attn_ds[ds] then layers[#layers + 1] = AttentionBlock.new(ch, c.num_heads_upsample) end
      if level > 1 and i == c.num_res_blocks then
        layers[#layers + 1] = Upsample.new(ch, c.conv_resample)
        ds = ds // 2
      end
      output_blocks:add(output_blocks:len(), TimestepBlock.new(layers))
    end
  end
  self.out = self:add("out", nn.Sequential.new{nn.GroupNorm.new(32, ch), nn.SiLU.new(),
    nn.Conv2d.new(mc, c.out_channels, 3, {zero_init = true})})
  return self
end

local function as_float_t(t, n)
  if T.is_tensor(t) then return t:dtype() == "float32" and t or t:float() end
  if type(t) == "number" then return T.full({n}, t) end
  return T.from_table(t, {#t})
end

local function as_labels(y)
  if y == nil then return nil end
  if T.is_tensor(y) then return y:dtype() == "int64" and y or y:long() end
  return T.from_table(y, {#y}, "int64")
end

-- x (N, in_channels, H, W); t: N timesteps (tensor, Lua array or number; already
-- rescaled as the diffusion hands them); y: class labels (0-based) for conditional models
function UNet:forward(x, t, y)
  local c = self.config
  local s = x:shape()
  if #s ~= 4 or s[2] ~= c.in_channels then
    error(("unet: input %s, expected (N, %d, H, W)"):format(tostring(x), c.in_channels), 2)
  end
  local n = s[1]
  local tt = as_float_t(t, n)
  if tt:numel() ~= n then error(("unet: %d timesteps for a batch of %d"):format(tt:numel(), n), 2) end
  y = as_labels(y)
  if (y ~= nil) ~= (c.num_classes ~= nil) then
    error(c.num_classes and "unet: this model is class-conditional: pass labels y" or
      "unet: labels given to an unconditional model (num_classes is not set)", 2)
  end
  local emb = self:call("time_embed", T.timestep_embedding(tt, c.num_channels))
  if y then
    if y:numel() ~= n then error(("unet: %d labels for a batch of %d"):format(y:numel(), n), 2) end
    -- the range check reads two numbers back from the device: not inside a CUDA graph
    -- capture (the sampler's graphed model checked the same labels on its warm-up call)
    local cu = require("iddpm").cuda
    if not (cu.capturing and cu.capturing()) then
      local lo, hi = y:min():item(), y:max():item()
      if lo < 0 or hi >= c.num_classes then error(("unet: label %d out of range [0, %d)"):format(lo < 0 and lo or hi, c.num_classes), 2) end
    end
    emb = emb + self:call("label_emb", y)
  end
  -- bf16 activations (GPU, precision bf16): the input goes to bf16 channels-last (NHWC
  -- memory) once, every layer keeps that dtype and layout, the output comes back float32
  local act = require("iddpm.device").activation_dtype(x)
  if act and x:dtype() ~= act then x = x:channels_last(act) end
  local hs = {}
  local h = x
  local ib = self.input_blocks
  for _, name in ipairs(ib._child_names) do
    local ok, r = pcall(ib._children[name].forward, ib._children[name], h, emb)
    if not ok then fail("input_blocks." .. name, r) end
    h = r
    hs[#hs + 1] = h
  end
  h = self:call("middle_block", h, emb)
  local ob = self.output_blocks
  for _, name in ipairs(ob._child_names) do
    local skip = table.remove(hs)
    local ok, r = pcall(function()
      local cat = T.cat({h, skip}, 2)
      drop(skip, x)
      drop(h, x)
      local o = ob._children[name]:forward(cat, emb)
      drop(cat, o)
      return o
    end)
    if not ok then fail("output_blocks." .. name, r) end
    h = r
  end
  local o = self.out
  local ok, r = pcall(function()
    if M.recompute then return norm_conv(h, o:child(0), o:child(2), {silu = true}) end
    local g = o:child(0):forward(h, {silu = true})
    local out = o:call("2", g)
    drop(g, out)
    return out
  end)
  if not ok then fail("out", r) end
  drop(h, x)
  drop(emb)
  if act and r:dtype() ~= "float32" then
    local f = r:float()
    r = f:contiguous()
    drop(f, r)
  end
  return r
end

function UNet:describe()
  local c = self.config
  return ("UNet(%dx%d, %d channels, mult {%s}, %d res blocks, %d params)"):format(c.image_size, c.image_size,
    c.num_channels, table.concat(c.channel_mult, ","), c.num_res_blocks, self:num_params())
end

M.unet = UNet.new
return M
