-- test_bf16_norm.lua — bf16 channels-last activations through group norm
-- (+ scale/shift, SiLU), dropout, nearest 2x upsample and 2x2 average pool: the GPU's
-- bf16 kernels against the CPU, which runs the float32 kernels on the same bf16-rounded
-- inputs and rounds the result to bf16 (the layers' fallback), forward and every
-- gradient; then per-op timings (b256, b128) of the float32 kernels against the bf16 ones.
-- Run: ./iddpm run tests/cuda/test_bf16_norm.lua [quick] [seed=N] [tests=0] [time=0] [b=256|128] [only=K]
-- (quick: fewer shapes, no timings; tests=0 / time=0 skip a part; b, only: time one batch size /
-- the K-th op only, e.g. one process per op under IDDPM_CUDA_PROFILE=1 for kernel-only times;
-- IDDPM_FAKE_CUDA=1: the CPU backend stands in for the GPU and both sides take the fallback).
-- Error measure: max |gpu - cpu| / max |cpu| over the tensor (1 for an all-zero cpu).
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local QUICK, SEED, TESTS, TIME, ONLY_B, ONLY = false, 4321, true, true, nil, nil
for _, a in ipairs({...}) do
  a = tostring(a)
  if a == "quick" then QUICK = true end
  local k, v = a:match("^(%w+)=(%d+)$")
  if k == "seed" then SEED = tonumber(v)
  elseif k == "tests" then TESTS = v ~= "0"
  elseif k == "time" then TIME = v ~= "0"
  elseif k == "b" then ONLY_B = tonumber(v)
  elseif k == "only" then ONLY = tonumber(v) end
end

if H.skip_without_cuda() then H.done() return end
local FAKE = iddpm.cuda.device_name() == ""
print("# device: " .. (FAKE and "IDDPM_FAKE_CUDA (CPU backend)" or iddpm.cuda.device_name()))
print("# seed " .. SEED)
T.manual_seed(SEED)
iddpm.cuda.precision("fp32")

-- tolerances (relative to the largest |cpu| value of the tensor). One bf16 ulp is 2^-8
-- of a value; the two sides round float results that differ in the last float bits
-- (sum order, FMA), so an element may land one bf16 ulp apart.
local ULP = 2 ^ -8
local TOL = {
  gn_fwd = 2 * ULP,        -- bf16 output of group norm (+ scale-shift, SiLU)
  gn_dx = 3 * ULP,         -- bf16 dx (cancelling sums k1, k2 in float per thread vs double)
  gn_param = 2e-4,         -- float32 dgamma, dbeta, dscale, dshift (float partial sums vs double)
  resample = ULP,          -- upsample / pool forward and backward (float sums of 4, rounded)
  dropout = 0,             -- same mask, same float product, same rounding
}

local NHWC = {[3] = {1, 3, 2}, [4] = {1, 3, 4, 2}}
local NCHW = {[3] = {1, 3, 2}, [4] = {1, 4, 2, 3}}

-- a bf16 channels-last tensor on the CPU from a float32 one (NHWC memory, NCHW shape)
local function cl_bf16(x) return x:permute(NHWC[x:dim()]):contiguous():bfloat16():permute(NCHW[x:dim()]) end
-- the same memory on the device (uploading the NHWC view keeps the layout)
local function to_dev(x)
  if x:dtype() ~= "bfloat16" then return x:cuda() end
  local p = x:permute(NHWC[x:dim()])
  if p:is_contiguous() then return p:cuda():permute(NCHW[x:dim()]) end
  return x:cuda()
end
-- any result to a float32 CPU tensor (bf16 channels-last downloaded as its NHWC view)
local function host(y)
  if y:dtype() == "bfloat16" and (y:dim() == 3 or y:dim() == 4) then
    local p = y:permute(NHWC[y:dim()])
    if p:is_contiguous() and not y:is_contiguous() then return p:cpu():float():permute(NCHW[y:dim()]) end
  end
  if not y:is_contiguous() then y = y:contiguous() end
  return y:cpu():float()
end
local function is_cl(y)
  local p = y:permute(NHWC[y:dim()])
  return p:is_contiguous()
end

local err = H.rel_err
local function record(name, e, tol)
  H.check(("%s (err %.2e, tol %.1e)"):format(name, e, tol), e <= tol)
end

if TESTS then
-- ---------------------------------------------------------------- group norm
-- {N, C, spatial..., scale-shift, silu}; scale/shift are narrow views of one (N, 2C)
-- float32 tensor as the UNet's time-embedding chunk gives them (row stride 2C)
local gn_cases = {
  {{2, 128, 32, 32}, false, true},
  {{3, 128, 32, 32}, true, true},
  {{4, 256, 16, 16}, true, true},
  {{2, 384, 16, 16}, true, false},     -- 12 channels per group
  {{2, 512, 8, 8}, true, true},
  {{5, 512, 4, 4}, false, true},
  {{2, 256, 64}, false, false},        -- the attention block's (N, C, L) norm
  {{256, 128, 8, 8}, true, true},
  {{2, 256, 1, 1}, true, true},        -- HW = 1 (contiguous = channels-last memory)
}
if QUICK then gn_cases = {gn_cases[2], gn_cases[4], gn_cases[7]} end
for _, gc in ipairs(gn_cases) do
  local shape, ss, silu = gc[1], gc[2], gc[3]
  local N, C = shape[1], shape[2]
  local name = ("group_norm %s%s%s"):format(table.concat(shape, "x"), ss and " scale-shift" or "", silu and " silu" or "")
  local xb = cl_bf16(T.randn(shape) * 2 + 0.5)
  local ga, be, emb = T.randn({C}) * 0.5 + 1, T.randn({C}) * 0.3, T.randn({N, 2 * C}) * 0.5
  local side = {}
  for _, dev in ipairs({"cpu", "gpu"}) do
    local mv = dev == "cpu" and function(t) return t:detach() end or function(t) return to_dev(t:detach()) end
    local s = {x = mv(xb), ga = mv(ga), be = mv(be), emb = mv(emb)}
    for _, k in ipairs({"x", "ga", "be", "emb"}) do s[k].requires_grad = true end
    local sc = ss and s.emb:narrow(2, 1, C) or nil
    local sh = ss and s.emb:narrow(2, C + 1, C) or nil
    local ok, y = pcall(T.group_norm, s.x, 32, s.ga, s.be, sc, sh, silu)
    if not ok then H.check(name .. " " .. dev, false, y); goto next_case end
    s.y = y
    side[dev] = s
  end
  do
    local c, g = side.cpu, side.gpu
    H.check(name .. " output bf16 channels-last", g.y:dtype() == "bfloat16" and is_cl(g.y) and c.y:dtype() == "bfloat16",
      g.y:dtype())
    record(name .. " fwd", err(g.y, c.y), TOL.gn_fwd)
    local gy = cl_bf16(T.randn(shape))
    local ok, e = pcall(function() c.y:backward(gy); g.y:backward(to_dev(gy)) end)
    if not H.check(name .. " backward runs", ok, e) then goto next_case end
    H.check(name .. " dx bf16 channels-last", g.x.grad and g.x.grad:dtype() == "bfloat16" and is_cl(g.x.grad),
      g.x.grad and g.x.grad:dtype())
    record(name .. " dx", err(g.x.grad, c.x.grad), TOL.gn_dx)
    record(name .. " dgamma", err(g.ga.grad, c.ga.grad), TOL.gn_param)
    record(name .. " dbeta", err(g.be.grad, c.be.grad), TOL.gn_param)
    if ss then record(name .. " dscale/dshift", err(g.emb.grad, c.emb.grad), TOL.gn_param) end
  end
  ::next_case::
end

-- a contiguous (not channels-last) bf16 input still works and gets a gradient in its layout
do
  local x = T.randn({2, 64, 8, 8}):bfloat16()
  local xc, xg = x:detach(), x:cuda()
  xc.requires_grad = true; xg.requires_grad = true
  local yc, yg = T.group_norm(xc, 32, nil, nil, nil, nil, true), T.group_norm(xg, 32, nil, nil, nil, nil, true)
  record("group_norm contiguous bf16 input fwd", err(yg, yc), TOL.gn_fwd)
  local gy = T.randn({2, 64, 8, 8}):bfloat16()
  yc:backward(gy); yg:backward(gy:cuda())
  H.check("group_norm contiguous bf16 input: dx bf16 contiguous", xg.grad:dtype() == "bfloat16" and xg.grad:is_contiguous())
  record("group_norm contiguous bf16 input dx", err(xg.grad, xc.grad), TOL.gn_dx)
end

-- ---------------------------------------------------------------- upsample / avg pool
local rs_cases = {{2, 128, 8, 8}, {3, 256, 16, 16}, {2, 512, 4, 4}, {2, 128, 7, 9}, {256, 128, 4, 4}}
if QUICK then rs_cases = {rs_cases[1], rs_cases[4]} end
for _, shape in ipairs(rs_cases) do
  for _, op in ipairs({{"upsample_nearest", T.upsample_nearest}, {"avg_pool2d", T.avg_pool2d}}) do
    local name = ("%s %s"):format(op[1], table.concat(shape, "x"))
    local xb = cl_bf16(T.randn(shape))
    local xc, xg = xb:detach(), to_dev(xb:detach())
    xc.requires_grad = true; xg.requires_grad = true
    local yc, yg = op[2](xc), op[2](xg)
    H.check(name .. " output bf16 channels-last", yg:dtype() == "bfloat16" and is_cl(yg), yg:dtype())
    record(name .. " fwd", err(yg, yc), TOL.resample)
    local gy = cl_bf16(T.randn(yc:shape()))
    yc:backward(gy); yg:backward(to_dev(gy))
    H.check(name .. " dx bf16 channels-last", xg.grad:dtype() == "bfloat16" and is_cl(xg.grad))
    record(name .. " bwd", err(xg.grad, xc.grad), TOL.resample)
  end
end

-- ---------------------------------------------------------------- dropout
do
  local p = 0.3
  -- contiguous bf16: memory order = logical order, so the mask is the CPU's exactly
  local x = T.randn({4, 128, 8, 8}):bfloat16()
  local xc, xg = x:detach(), x:cuda()
  xc.requires_grad = true; xg.requires_grad = true
  local yc, yg = T.dropout(xc, p, T.generator(99, 5)), T.dropout(xg, p, T.generator(99, 5))
  H.check("dropout contiguous bf16 stays bf16 contiguous", yg:dtype() == "bfloat16" and yg:is_contiguous())
  record("dropout contiguous bf16: CPU's mask and values", err(yg, yc), TOL.dropout)
  local gy = T.randn({4, 128, 8, 8}):bfloat16()
  yc:backward(gy); yg:backward(gy:cuda())
  record("dropout contiguous bf16 bwd", err(xg.grad, xc.grad), TOL.dropout)

  -- channels-last bf16: the GPU masks NHWC memory order (the CPU fallback, logical order);
  -- check the mask's keep fraction, the kept values, and that the backward reuses it
  local shape = {8, 128, 16, 16}
  local xb = cl_bf16(T.randn(shape) + 3)        -- no zeros: a zero output means dropped
  local xd = to_dev(xb:detach())
  xd.requires_grad = true
  local y = T.dropout(xd, p, T.generator(7, 1))
  H.check("dropout channels-last bf16 stays channels-last", y:dtype() == "bfloat16" and is_cl(y))
  local yh, xh = host(y), host(xb)
  local kept = yh:ne(0):float()
  local n = kept:numel()
  local frac = kept:sum():item() / n
  local sd = math.sqrt(p * (1 - p) / n)
  H.check(("dropout keep fraction %.4f vs %.2f (4 sigma %.4f)"):format(frac, 1 - p, 4 * sd), math.abs(frac - (1 - p)) < 4 * sd)
  local want = (xh * (1 / (1 - p))):bfloat16():float() * kept
  record("dropout kept values x/(1-p)", err(yh, want), ULP)
  local gy2 = cl_bf16(T.randn(shape))
  y:backward(to_dev(gy2))
  local dh = host(xd.grad)
  local gmask = dh:ne(0):float()
  record("dropout backward uses the forward's mask", err(gmask, kept), 0)
  record("dropout backward values g/(1-p)", err(dh, (host(gy2) * (1 / (1 - p))):bfloat16():float() * kept), ULP)
  H.check("dropout dx bf16 channels-last", xd.grad:dtype() == "bfloat16" and is_cl(xd.grad))
end

end -- TESTS

-- ---------------------------------------------------------------- timings
if TIME and not FAKE and not QUICK then
  local wall, sync = iddpm.cuda.wall_time, iddpm.cuda.synchronize
  local function timeit(fn, iters)
    fn(); sync()
    local best = math.huge
    for _ = 1, 3 do
      local t0 = wall()
      for _ = 1, iters do fn() end
      sync()
      best = math.min(best, (wall() - t0) / iters)
    end
    return best * 1e3
  end
  local function bw(b, ms) return b / (ms * 1e-3) / 1e9 end
  print("# per-op timings, ms per call (best of 3 windows; every result freed at once so the allocator reuses it);")
  print("# bwd = (fwd + bwd) - fwd - the autograd's copy of the upstream gradient; GB/s on nominal bytes")
  print("# (fwd: read x, write out; bwd: read x and dout, write dx; bf16 half of float32)")
  local k = 0
  for _, B in ipairs({256, 128}) do
    local shapes = {
      {"group_norm ss silu", {B, 128, 32, 32}, function(x, e) return T.group_norm(x, 32, e.ga, e.be, e.sc, e.sh, true) end},
      {"group_norm ss silu", {B, 256, 16, 16}, function(x, e) return T.group_norm(x, 32, e.ga, e.be, e.sc, e.sh, true) end},
      {"group_norm ss silu", {B, 512, 8, 8}, function(x, e) return T.group_norm(x, 32, e.ga, e.be, e.sc, e.sh, true) end},
      {"group_norm silu", {B, 384, 16, 16}, function(x, e) return T.group_norm(x, 32, e.ga, e.be, nil, nil, true) end},
      {"group_norm (attn)", {B, 256, 64}, function(x, e) return T.group_norm(x, 32, e.ga, e.be) end},
      {"upsample_nearest", {B, 256, 16, 16}, function(x) return T.upsample_nearest(x) end, 4},
      {"avg_pool2d", {B, 128, 32, 32}, function(x) return T.avg_pool2d(x) end, 0.25},
      {"dropout 0.1", {B, 128, 32, 32}, function(x) return T.dropout(x, 0.1) end},
    }
    for _, s in ipairs(shapes) do
      k = k + 1
      if (ONLY_B and ONLY_B ~= B) or (ONLY and ONLY ~= k) then goto skip end
      do
        local shape, fn = s[2], s[3]
        local C = shape[2]
        local e = {ga = T.randn({C}):cuda(), be = T.randn({C}):cuda()}
        local emb = T.randn({B, 2 * C}):cuda()
        e.sc, e.sh = emb:narrow(2, 1, C), emb:narrow(2, C + 1, C)
        local x32 = T.randn(shape):cuda()
        local x16 = to_dev(cl_bf16(T.randn(shape)))
        local y32 = fn(x32, e)
        local oshape = y32:shape()
        y32:free()
        local g32, g16 = T.randn(oshape):cuda(), to_dev(cl_bf16(T.randn(oshape)))
        local it = B == 256 and 20 or 40
        local f32 = timeit(function() fn(x32, e):free() end, it)
        local f16 = timeit(function() fn(x16, e):free() end, it)
        local c32 = timeit(function() g32:clone():free() end, it)
        local c16 = timeit(function() g16:clone():free() end, it)
        local a32, a16 = x32:detach(), x16:detach()
        a32.requires_grad = true; a16.requires_grad = true
        local function fb(a, g) return function() local y = fn(a, e); y:backward(g); y:free(); a.grad = nil end end
        local b32 = timeit(fb(a32, g32), it) - f32 - c32
        local b16 = timeit(fb(a16, g16), it) - f16 - c16
        local numel = 1
        for _, d in ipairs(shape) do numel = numel * d end
        local r = s[4] or 1                    -- out/x size ratio
        local fbytes, bbytes = numel * 4 * (1 + r), numel * 4 * (1 + 2 * r)
        print(("# %2d %-36s fwd f32 %.3f (%4.0f GB/s) bf16 %.3f (%4.0f GB/s) x%.2f | bwd f32 %.3f (%4.0f GB/s) bf16 %.3f (%4.0f GB/s) x%.2f")
          :format(k, ("%s %s"):format(s[1], table.concat(shape, "x")), f32, bw(fbytes, f32), f16, bw(fbytes / 2, f16),
            f32 / f16, b32, bw(bbytes, b32), b16, bw(bbytes / 2, b16), b32 / b16))
        x32, x16, a32, a16, g32, g16 = nil, nil, nil, nil, nil, nil
        collectgarbage()
      end
      ::skip::
    end
  end
end

H.done()
