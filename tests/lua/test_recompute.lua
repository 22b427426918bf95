-- test_recompute.lua — T.norm_conv (engine/ops/norm_conv.c: group norm (+scale/shift, SiLU) ->
-- dropout -> conv2d, the norm and mask recomputed in the backward) against the unfused
-- sequence T.group_norm -> T.dropout -> T.conv2d: the output and every gradient must be
-- exactly equal (same kernels, same order, same dropout mask), in float32 and with bf16
-- channels-last activations (the CPU's fallback), and the generator must advance by the
-- same amount. Then a small UNet with recomputation on and off: the same loss and the
-- same parameter gradients, exactly (float32 and bf16 activations).
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local unet = require "iddpm.nn.unet"
local device = require "iddpm.device"

local SEED = tonumber(os.getenv("SEED") or "") or 2024
print("# seed " .. SEED)

local function maxdiff(a, b)
  if a == nil or b == nil then return (a == nil and b == nil) and 0 or math.huge end
  return (a:float() - b:float()):abs():max():item()
end

-- one case: shapes and options; act: nil (float32) or "bfloat16" (channels-last x)
local function case(name, o)
  local g = T.generator(SEED)
  local N, C, H_, W, O, k = o.N or 2, o.C or 64, o.H or 6, o.W or 6, o.O or 32, o.k or 3
  local x0 = T.randn({N, C, H_, W}, g) * 2 + 0.5
  local gamma0, beta0 = T.rand({C}, g) + 0.5, T.randn({C}, g) * 0.1
  local emb0 = T.randn({N, 2 * C}, g) * 0.3
  local w0, b0 = T.randn({O, C, k, k}, g) * 0.05, T.randn({O}, g) * 0.1
  local pad = k // 2
  local runs = {}
  for pass = 1, 2 do
    local x = o.act and x0:channels_last(o.act) or x0:clone()
    x = x:detach(); x.requires_grad = true
    local gamma, beta, emb, w, b = gamma0:clone(), beta0:clone(), emb0:clone(), w0:clone(), b0:clone()
    for _, t in ipairs({gamma, beta, emb, w, b}) do t.requires_grad = true end
    local scale, shift
    if o.scale then scale, shift = emb:narrow(2, 1, C), emb:narrow(2, C + 1, C) end
    local gen = T.generator(SEED + 7)
    local y
    if pass == 1 then
      y = T.norm_conv(x, 32, gamma, beta, w, b, {scale = scale, shift = shift, silu = o.silu, dropout = o.p,
        generator = gen, stride = o.stride or 1, padding = pad})
    else
      local h = T.group_norm(x, 32, gamma, beta, scale, shift, o.silu)
      if (o.p or 0) > 0 then h = T.dropout(h, o.p, gen) end
      y = T.conv2d(h, w, b, o.stride or 1, pad)
    end
    local R = T.randn(y:shape(), T.generator(SEED + 1))
    local loss = (y:float() * R):sum()
    loss:backward()
    runs[pass] = {y = y, dx = x.grad, dgamma = gamma.grad, dbeta = beta.grad, demb = emb.grad, dw = w.grad, db = b.grad,
      after = T.rand({4}, gen), dtype = y:dtype(), cl = y:is_channels_last()}
  end
  local a, b = runs[1], runs[2]
  H.check(name .. ": output dtype and layout", a.dtype == b.dtype and a.cl == b.cl,
    ("%s %s vs %s %s"):format(a.dtype, tostring(a.cl), b.dtype, tostring(b.cl)))
  for _, key in ipairs({"y", "dx", "dgamma", "dbeta", "demb", "dw", "db"}) do
    if key ~= "demb" or o.scale then
      local d = maxdiff(a[key], b[key])
      H.check(name .. ": " .. key .. " equal", d == 0, ("max |diff| %g"):format(d))
    end
  end
  H.check(name .. ": generator advanced the same", maxdiff(a.after, b.after) == 0)
end

case("fp32 GN+SiLU+conv3x3", {silu = true})
case("fp32 GN+scale/shift+SiLU+dropout+conv3x3", {silu = true, scale = true, p = 0.3})
case("fp32 GN+dropout+conv stride 2", {silu = false, p = 0.1, stride = 2})
case("fp32 GN+conv1x1 (attention qkv)", {k = 1, O = 192, H = 4, W = 4})
case("bf16 GN+SiLU+conv3x3", {silu = true, act = "bfloat16"})
case("bf16 GN+scale/shift+SiLU+dropout+conv3x3", {silu = true, scale = true, p = 0.3, act = "bfloat16"})
case("bf16 GN+conv1x1", {k = 1, O = 192, H = 4, W = 4, act = "bfloat16"})

-- no grad: the same forward, nothing recorded
T.no_grad(function()
  local x = T.randn({1, 32, 4, 4}, T.generator(SEED))
  local w = T.randn({8, 32, 3, 3}, T.generator(SEED + 1))
  local y = T.norm_conv(x, 32, nil, nil, w, nil, {silu = true, padding = 1})
  local r = T.conv2d(T.group_norm(x, 32, nil, nil, nil, nil, true), w, nil, 1, 1)
  H.check("no_grad: equal, no graph", maxdiff(y, r) == 0 and not y.requires_grad)
end)
H.raises("bad dropout p", function()
  T.norm_conv(T.zeros({1, 32, 4, 4}), 32, nil, nil, T.zeros({8, 32, 3, 3}), nil, {dropout = 1.5})
end, "norm_conv: dropout p = 1.5")
H.raises("conv shape error names conv2d", function()
  T.norm_conv(T.zeros({1, 32, 4, 4}), 32, nil, nil, T.zeros({8, 16, 3, 3}), nil)
end, "conv2d: input (1,32,4,4) has 32 channels")

-- a small UNet: recomputation on and off give the same loss and gradients
local function unet_run(recompute, act, scale_shift)
  local m = iddpm.nn.unet{image_size = 8, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
    attention_resolutions = {4}, num_heads = 2, learn_sigma = true, dropout = 0.2, seed = 3,
    use_scale_shift_norm = scale_shift}:to("cpu", {recompute = recompute, dtype = act or "float32"})
    -- the zero-initialised convs would leave most gradients zero: perturb every parameter
    local pg = T.generator(SEED + 9)
    T.no_grad(function()
      for _, q in ipairs(m:parameters()) do q:copy_(q + T.randn(q:shape(), pg):to(q:device()) * 0.05) end
    end)
  iddpm.nn.dropout_gen = T.generator(77)
  local x = T.randn({2, 3, 8, 8}, T.generator(SEED + 3))
  local out = m(x, {3, 7})
  local loss = (out * T.randn(out:shape(), T.generator(SEED + 4))):sum()
  loss:backward()
  local grads = {}
  for _, p in ipairs(m:named_parameter_list()) do grads[p[1]] = p[2].grad end
  return loss:item(), grads, T.rand({2}, iddpm.nn.dropout_gen)
end
for _, v in ipairs({{"fp32", nil, true}, {"fp32 no scale-shift", nil, false}, {"bf16", "bf16", true}}) do
  local l1, g1, r1 = unet_run(true, v[2], v[3])
  local l0, g0, r0 = unet_run(false, v[2], v[3])
  H.check("UNet " .. v[1] .. ": loss equal", l1 == l0, ("%.9g vs %.9g"):format(l1, l0))
  local worst, at = 0, ""
  for name, g in pairs(g0) do
    local d = maxdiff(g1[name], g)
    if d > worst then worst, at = d, name end
  end
  H.check("UNet " .. v[1] .. ": every gradient equal", worst == 0, ("max |diff| %g at %s"):format(worst, at))
  H.check("UNet " .. v[1] .. ": dropout generator advanced the same", maxdiff(r1, r0) == 0)
end

-- recompute is a setting of the model: a module-level assignment is an error, never ignored
H.raises("iddpm.nn.recompute = false is an error", function() iddpm.nn.recompute = false end,
  "settings belong to a model")
H.raises("iddpm.nn.unet.recompute = false is an error", function() unet.recompute = false end,
  "settings belong to a model")
H.raises("model:to: an unknown setting", function() iddpm.nn.unet{image_size = 8, num_channels = 32,
  num_res_blocks = 1, channel_mult = {1, 2}, attention_resolutions = {}}:to("cpu", {recomput = true}) end,
  "unknown setting 'recomput'")
H.raises("model:to: a bad value", function() iddpm.nn.unet{image_size = 8, num_channels = 32,
  num_res_blocks = 1, channel_mult = {1, 2}, attention_resolutions = {}}:to("cpu", {dtype = "fp16"}) end,
  "dtype=fp16 is not one of")
H.done()
