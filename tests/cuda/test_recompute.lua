-- test_recompute.lua — T.norm_conv on the GPU (engine/ops/norm_conv.c: group norm (+scale/shift,
-- SiLU) -> dropout -> conv2d, the norm and the dropout mask recomputed in the backward)
-- against the unfused T.group_norm -> T.dropout -> T.conv2d on the same device, float32
-- and bf16 channels-last: output and every gradient. Both sides run the same kernels on
-- the same inputs, so the expected difference is zero; the tolerances only allow for
-- kernels whose reductions are not run-to-run deterministic (cuDNN's weight gradient).
-- Then a small bf16 UNet with recomputation on and off, and the timing of one fused op
-- against the unfused sequence (forward + backward, b128 bf16).
-- Run: ./iddpm run tests/cuda/test_recompute.lua [seed=N] [time=0]
-- (IDDPM_FAKE_CUDA=1: the CPU backend stands in for the GPU; everything must be exact).
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local unet = require "iddpm.nn.unet"
local device = require "iddpm.device"
local SEED, TIME = 4321, true
for _, a in ipairs({...}) do
  local k, v = tostring(a):match("^(%w+)=(%d+)$")
  if k == "seed" then SEED = tonumber(v) elseif k == "time" then TIME = v ~= "0" end
end
if H.skip_without_cuda() then H.done() return end
local FAKE = iddpm.cuda.device_name() == ""
print("# device: " .. (FAKE and "IDDPM_FAKE_CUDA (CPU backend)" or iddpm.cuda.device_name()))
print("# seed " .. SEED)

-- tolerances, relative to the largest |value| of the unfused result
local TOL = {
  out = 0,                        -- the same kernels on the same inputs
  grad_f32 = FAKE and 0 or 1e-5,  -- float32 gradients (a reduction's order may vary per run)
  grad_bf16 = FAKE and 0 or 2 ^ -8,  -- bf16 dx: one bf16 ulp where a float sum came out differently
  unet = FAKE and 0 or 2e-2,      -- a whole bf16 UNet's gradients (a ulp early grows through the layers)
}

local err = H.rel_err
local function record(name, e, tol)
  H.check(("%s (err %.2e, tol %.1e)"):format(name, e, tol), e <= tol)
end

local function run(fused, o, inputs)
  local x = inputs.x:detach():cuda()
  if o.act then x = x:channels_last(o.act) end
  x = x:detach(); x.requires_grad = true
  local t = {}
  for _, k in ipairs({"gamma", "beta", "emb", "w", "b"}) do t[k] = inputs[k]:cuda(); t[k].requires_grad = true end
  local C = x:size(2)
  local scale = o.scale and t.emb:narrow(2, 1, C) or nil
  local shift = o.scale and t.emb:narrow(2, C + 1, C) or nil
  local gen = T.generator(SEED + 7)
  local pad = t.w:size(3) // 2
  local y
  if fused then
    y = T.norm_conv(x, 32, t.gamma, t.beta, t.w, t.b, {scale = scale, shift = shift, silu = o.silu, dropout = o.p,
      generator = gen, padding = pad})
  else
    local h = T.group_norm(x, 32, t.gamma, t.beta, scale, shift, o.silu)
    if (o.p or 0) > 0 then h = T.dropout(h, o.p, gen) end
    y = T.conv2d(h, t.w, t.b, 1, pad)
  end
  local gy = inputs.gy:cuda()
  if o.act then gy = gy:channels_last(o.act) end
  y:backward(gy)
  return {y = y, dx = x.grad, dgamma = t.gamma.grad, dbeta = t.beta.grad, demb = t.emb.grad, dw = t.w.grad,
    db = t.b.grad, after = T.rand({4}, gen)}
end

local cases = {
  {"GN+SiLU+conv3x3 128x64x16x16 -> 128", {N = 16, C = 128, HW = 16, O = 128, k = 3, silu = true}},
  {"GN+scale/shift+SiLU+dropout+conv3x3 8x256x16x16", {N = 8, C = 256, HW = 16, O = 256, k = 3, silu = true,
    scale = true, p = 0.3}},
  {"GN+conv1x1 (qkv) 8x256x8x8 -> 768", {N = 8, C = 256, HW = 8, O = 768, k = 1}},
}
for _, c in ipairs(cases) do
  for _, act in ipairs({false, "bfloat16"}) do
    local o = c[2]
    o.act = act or nil
    local name = c[1] .. (act and " bf16" or " fp32")
    local g = T.generator(SEED)
    local inputs = {x = T.randn({o.N, o.C, o.HW, o.HW}, g) * 2 + 0.5, gamma = T.rand({o.C}, g) + 0.5,
      beta = T.randn({o.C}, g) * 0.1, emb = T.randn({o.N, 2 * o.C}, g) * 0.3, w = T.randn({o.O, o.C, o.k, o.k}, g) * 0.05,
      b = T.randn({o.O}, g) * 0.1, gy = T.randn({o.N, o.O, o.HW, o.HW}, g)}
    local ok, a = pcall(run, true, o, inputs)
    if not H.check(name .. ": fused runs", ok, a) then goto continue end
    local b = run(false, o, inputs)
    H.check(name .. ": same dtype and layout", a.y:dtype() == b.y:dtype() and a.y:is_channels_last() == b.y:is_channels_last())
    record(name .. ": out", err(a.y, b.y), TOL.out)
    record(name .. ": dx", err(a.dx, b.dx), act and TOL.grad_bf16 or TOL.grad_f32)
    for _, k in ipairs({"dgamma", "dbeta", "dw", "db"}) do record(name .. ": " .. k, err(a[k], b[k]), TOL.grad_f32) end
    if o.scale then record(name .. ": dscale/dshift", err(a.demb, b.demb), TOL.grad_f32) end
    record(name .. ": generator advanced the same", err(a.after, b.after), 0)
    ::continue::
  end
end

-- a small UNet, bf16 activations, on the GPU: recompute on vs off
do
  local res = {}
  for _, on in ipairs({true, false}) do
    local m = iddpm.nn.unet{image_size = 16, num_channels = 64, num_res_blocks = 1, channel_mult = {1, 2},
      attention_resolutions = {8}, num_heads = 2, learn_sigma = true, dropout = 0.2, seed = 3}
      :to("cuda", {recompute = on, dtype = "bfloat16"})
    -- the zero-initialised convs would leave most gradients zero: perturb every parameter
    local pg = T.generator(SEED + 9)
    T.no_grad(function()
      for _, q in ipairs(m:parameters()) do q:copy_(q + T.randn(q:shape(), pg):to(q:device()) * 0.05) end
    end)
    iddpm.nn.dropout_gen = T.generator(77)
    local x = T.randn({4, 3, 16, 16}, T.generator(SEED + 3)):cuda()
    local out = m(x, T.from_table({3, 7, 11, 500}):cuda())
    local loss = (out * T.randn(out:shape(), T.generator(SEED + 4)):cuda()):sum()
    loss:backward()
    local grads = {}
    for _, p in ipairs(m:named_parameter_list()) do grads[p[1]] = p[2].grad end
    res[on] = {loss = loss:item(), grads = grads}
  end
  record("UNet bf16: loss", math.abs(res[true].loss - res[false].loss) / math.abs(res[false].loss), TOL.unet)
  local worst, at = 0, ""
  for name, g in pairs(res[false].grads) do
    local e = res[true].grads[name] and err(res[true].grads[name], g) or math.huge
    if e > worst then worst, at = e, name end
  end
  record("UNet bf16: every gradient (worst " .. at .. ")", worst, TOL.unet)
end

-- timing: fused vs unfused forward + backward (bf16 b128, a CIFAR ResBlock's out_layers)
if TIME and not FAKE then
  local sync, wall = iddpm.cuda.synchronize, iddpm.cuda.wall_time
  for _, shp in ipairs({{128, 128, 32, 32}, {128, 256, 16, 16}}) do
    local N, C, HW = shp[1], shp[2], shp[3]
    local o = {silu = true, scale = true, p = 0.3, act = "bfloat16"}
    local g = T.generator(SEED)
    local inputs = {x = T.randn({N, C, HW, HW}, g), gamma = T.ones({C}), beta = T.zeros({C}),
      emb = T.randn({N, 2 * C}, g) * 0.3, w = T.randn({C, C, 3, 3}, g) * 0.05, b = T.zeros({C}), gy = T.randn({N, C, HW, HW}, g)}
    for _, fused in ipairs({false, true}) do
      for _ = 1, 2 do run(fused, o, inputs) end
      collectgarbage(); sync()
      local best = math.huge
      for _ = 1, 3 do
        sync()
        local t0 = wall()
        for _ = 1, 5 do run(fused, o, inputs) end
        sync()
        best = math.min(best, (wall() - t0) / 5)
        collectgarbage()
      end
      print(("# %s %dx%dx%dx%d GN+ss+SiLU+dropout+conv3x3 fwd+bwd (incl. input upload): %.3f ms"):format(
        fused and "fused  " or "unfused", N, C, HW, HW, best * 1e3))
    end
  end
end
H.done()
