-- test_bf16_conv.lua — conv2d and QKV attention on bf16 channels-last tensors (the GPU's
-- bf16 activations): the device result against the CPU's float32 kernels run
-- on the same bf16-rounded inputs (and weights), the reference output rounded to bf16
-- as the device's is. Forward and backward (dx, dw, db; dqkv) at the UNet's shapes and
-- some small odd ones; outputs and input gradients must come back bf16 channels-last.
-- With IDDPM_FAKE_CUDA=1 the CPU backend stands in and the layers take their float32
-- fallback (result converted back to bf16 in x's layout).
-- Error measure: max |got - ref| / max |ref| over the tensor; tolerances in TOL.
--   ./iddpm run tests/cuda/test_bf16_conv.lua            checks
--   IDDPM_CUDA_PROFILE=1 ./iddpm run tests/cuda/test_bf16_conv.lua bench CASE B fwd|fb
--       per-op timing of one case, old path (float32 NCHW tensors, precision bf16) and
--       new (bf16 channels-last): wall ms/iter here, per-op ms in the profile at exit
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local args = {...}

if H.skip_without_cuda() then H.done() return end
local FAKE = iddpm.cuda.device_name() == ""
print("# device: " .. (FAKE and "IDDPM_FAKE_CUDA (CPU backend)" or iddpm.cuda.device_name()))
local SEED = tonumber(os.getenv("SEED") or "") or 4242
T.manual_seed(SEED)
print("# seed " .. SEED)

-- relative to max |ref|; bf16 keeps 8 bits (half an ulp = 2^-9 = 0.002 of a value), the
-- device rounds its output (and W, dS in attention, dw in scratch) once more
local TOL = {
  conv_fwd = 1e-2,   -- output rounded to bf16 on both sides, sums in a different order
  conv_dx = 1e-2,
  conv_dw = 1.5e-2,  -- cuDNN writes dw in bf16 before it is added to the float32 grad
  conv_db = 1e-3,    -- float32 sums of the same bf16 values
  att_fwd = 2e-2,    -- softmax weights rounded to bf16 before the V product
  att_dqkv = 4e-2,   -- dS rounded to bf16 as well
}

local err = H.rel_err
local function record(name, e, tol)
  H.check(("%s (err %.2e, tol %.0e)"):format(name, e, tol), e <= tol)
end

local P_IN = {[3] = {1, 3, 2}, [4] = {1, 3, 4, 2}}    -- NCHW -> NHWC order
local P_OUT = {[3] = {1, 3, 2}, [4] = {1, 4, 2, 3}}   -- and back
-- float32 CPU x (N,C,H,W) / (B,C,T) -> bf16 channels-last leaf on dev (NHWC memory made
-- on the CPU, moved, then viewed as NCHW: no device conversion involved)
local function cl(x, dev)
  local nd = #x:shape()
  local m = x:permute(P_IN[nd]):contiguous():bfloat16()
  if dev ~= "cpu" then m = m:to(dev) end
  return m:permute(P_OUT[nd]):detach()
end
local function is_cl(y)
  return y:permute(P_IN[#y:shape()]):is_contiguous() and not y:is_contiguous()
end
local function layout_ok(name, y)
  H.check(name .. " is bf16 channels-last", y:dtype() == "bfloat16" and is_cl(y),
    y:dtype() .. (y:is_contiguous() and " contiguous" or ""))
end
-- a leaf's .grad: the layer hands back bf16 channels-last; the layout the leaf finally
-- holds is the autograd's accumulate (engine/core/autograd.c) and only noted here
local function grad_ok(name, gr)
  H.check(name .. " is bf16", gr:dtype() == "bfloat16", gr:dtype())
  if not is_cl(gr) then print("# note: " .. name .. " held contiguous by the leaf (autograd accumulate)") end
end

-- ---------------------------------------------------------------- conv2d
local function conv_case(name, N, C, Hh, Ww, O, K, stride, pad, bias)
  local x = T.randn({N, C, Hh, Ww})
  local w = T.randn({O, C, K, K}) * (1 / math.sqrt(C * K * K))
  local b = bias and T.randn({O}) or nil
  local xr, wr = x:bfloat16():float(), w:bfloat16():float()
  xr.requires_grad = true; wr.requires_grad = true
  local br = b and b:clone()
  if br then br.requires_grad = true end
  local yr = T.conv2d(xr, wr, br, stride, pad)
  local g = T.randn(yr:shape()):bfloat16():float()
  yr:backward(g)

  local xg, wg = cl(x, "cuda"), w:cuda()
  xg.requires_grad = true; wg.requires_grad = true
  local bg = b and b:cuda()
  if bg then bg.requires_grad = true end
  local ok, y = pcall(T.conv2d, xg, wg, bg, stride, pad)
  if not ok then return H.check(name .. " fwd", false, y) end
  layout_ok(name .. " out", y)
  record(name .. " fwd", err(y, yr:bfloat16()), TOL.conv_fwd)
  local okb, eb = pcall(function() y:backward(cl(g, "cuda")) end)
  if not okb then return H.check(name .. " bwd", false, eb) end
  grad_ok(name .. " dx", xg.grad)
  H.check(name .. " dw is float32", wg.grad:dtype() == "float32")
  record(name .. " dx", err(xg.grad, xr.grad:bfloat16()), TOL.conv_dx)
  record(name .. " dw", err(wg.grad, wr.grad), TOL.conv_dw)
  if b then record(name .. " db", err(bg.grad, br.grad), TOL.conv_db) end
end

local function run_checks()
  -- name, N, C, H, W, O, K, stride, pad, bias: the CIFAR-10 UNet's convs, then odd ones
  local convs = {
    {"3x3 3->128 @32 (input conv)", 2, 3, 32, 32, 128, 3, 1, 1, true},
    {"3x3 128->128 @32", 2, 128, 32, 32, 128, 3, 1, 1, true},
    {"3x3 384->128 @32", 2, 384, 32, 32, 128, 3, 1, 1, true},
    {"3x3 256->256 @16", 2, 256, 16, 16, 256, 3, 1, 1, true},
    {"3x3 512->256 @16", 2, 512, 16, 16, 256, 3, 1, 1, true},
    {"3x3 256->256 @8", 4, 256, 8, 8, 256, 3, 1, 1, true},
    {"3x3 256->256 @4", 4, 256, 4, 4, 256, 3, 1, 1, true},
    {"3x3 stride 2 128 @32->16", 2, 128, 32, 32, 128, 3, 2, 1, true},
    {"1x1 384->128 @32 (skip)", 2, 384, 32, 32, 128, 1, 1, 0, true},
    {"1x1 512->256 @16 no bias", 2, 512, 16, 16, 256, 1, 1, 0, false},
    {"3x3 128->6 @32 (output conv)", 2, 128, 32, 32, 6, 3, 1, 1, true},
    {"3x3 5->7 @9x7 odd", 3, 5, 9, 7, 7, 3, 1, 1, true},
    {"3x3 stride 2 6->10 @9x9 odd", 2, 6, 9, 9, 10, 3, 2, 1, true},
    {"1x1 6->6 @5x5 no bias", 3, 6, 5, 5, 6, 1, 1, 0, false},
    {"5x5 pad 2 8->16 @11x11", 2, 8, 11, 11, 16, 5, 1, 2, true},
  }
  for _, c in ipairs(convs) do conv_case("conv2d " .. c[1], table.unpack(c, 2)) end

  -- a bf16 input that is not channels-last is converted; the result is the same
  do
    local x, w = T.randn({2, 16, 8, 8}), T.randn({32, 16, 3, 3}) * 0.1
    local ref = T.conv2d(x:bfloat16():float(), w:bfloat16():float(), nil, 1, 1):bfloat16()
    local y = T.conv2d(x:bfloat16():cuda(), w:cuda(), nil, 1, 1)
    H.check("conv2d of a contiguous bf16 input gives bf16", y:dtype() == "bfloat16", y:dtype())
    record("conv2d contiguous bf16 input fwd", err(y, ref), TOL.conv_fwd)
    -- and float32 tensors keep today's path: float32 contiguous out
    local y32 = T.conv2d(x:cuda(), w:cuda(), nil, 1, 1)
    H.check("conv2d float32 input stays float32 contiguous", y32:dtype() == "float32" and y32:is_contiguous())
  end

  -- ---------------------------------------------------------------- attention
  local function att_case(name, B, C, Tn, heads)
    local q = T.randn({B, 3 * C, Tn})
    local qr = q:bfloat16():float()
    qr.requires_grad = true
    local yr = T.qkv_attention(qr, heads)
    local g = T.randn(yr:shape()):bfloat16():float()
    yr:backward(g)
    local qg = cl(q, "cuda")
    qg.requires_grad = true
    local ok, y = pcall(T.qkv_attention, qg, heads)
    if not ok then return H.check(name .. " fwd", false, y) end
    layout_ok(name .. " out", y)
    record(name .. " fwd", err(y, yr:bfloat16()), TOL.att_fwd)
    local okb, eb = pcall(function() y:backward(cl(g, "cuda")) end)
    if not okb then return H.check(name .. " bwd", false, eb) end
    grad_ok(name .. " dqkv", qg.grad)
    record(name .. " dqkv", err(qg.grad, qr.grad:bfloat16()), TOL.att_dqkv)
  end
  att_case("qkv_attention 4 heads C256 T256 (16x16)", 2, 256, 256, 4)
  att_case("qkv_attention 4 heads C256 T64 (8x8)", 3, 256, 64, 4)
  att_case("qkv_attention 2 heads C64 T20 odd", 2, 64, 20, 2)
  att_case("qkv_attention 3 heads C48 T16", 2, 48, 16, 3)
  att_case("qkv_attention 1 head C8 T5", 1, 8, 5, 1)
end

-- ---------------------------------------------------------------- timing (one case per process)
local BENCH = {
  c128_32 = {"conv 3x3 128->128 @32x32", {128, 32, 32}, {128, 128, 3, 3}, 1, 1},
  c384_32 = {"conv 3x3 384->128 @32x32", {384, 32, 32}, {128, 384, 3, 3}, 1, 1},
  c256_16 = {"conv 3x3 256->256 @16x16", {256, 16, 16}, {256, 256, 3, 3}, 1, 1},
  c512_16 = {"conv 3x3 512->256 @16x16", {512, 16, 16}, {256, 512, 3, 3}, 1, 1},
  c256_8 = {"conv 3x3 256->256 @8x8", {256, 8, 8}, {256, 256, 3, 3}, 1, 1},
  s2_32 = {"conv 3x3 s2 128 @32x32->16x16", {128, 32, 32}, {128, 128, 3, 3}, 2, 1},
  k1_32 = {"conv 1x1 384->128 @32x32", {384, 32, 32}, {128, 384, 1, 1}, 1, 0},
  a16 = {"qkv_attention 4 heads C256 T256", {768, 256}, nil, 4},
  a8 = {"qkv_attention 4 heads C256 T64", {768, 64}, nil, 4},
  a4 = {"qkv_attention 4 heads C256 T16", {768, 16}, nil, 4},
}
local function bench(case, B, mode)
  local c = assert(BENCH[case], "bench: unknown case " .. tostring(case))
  iddpm.cuda.precision("bf16")
  local xs = {B, table.unpack(c[2])}
  local x32 = T.randn(xs, nil, "float32", "cuda")
  local nd = #xs
  local xb = T.randn(xs):permute(P_IN[nd]):contiguous():bfloat16():cuda():permute(P_OUT[nd]):detach()
  local w = c[3] and T.randn(c[3], nil, "float32", "cuda") * 0.05
  local b = c[3] and T.randn({c[3][1]}, nil, "float32", "cuda")
  local fn = c[3] and function(x) return T.conv2d(x, w, b, c[4], c[5]) end
    or function(x) return T.qkv_attention(x, c[4]) end
  local fb = mode == "fb"
  if fb then x32.requires_grad = true; xb.requires_grad = true; if w then w.requires_grad = true; b.requires_grad = true end end
  local g32, gb
  local function step(x, old)
    if not fb then return T.no_grad(function() fn(x) end) end
    local y = fn(x)
    if old then g32 = g32 or T.randn(y:shape(), nil, "float32", "cuda"); y:backward(g32)
    else gb = gb or T.randn(y:shape()):permute(P_IN[#y:shape()]):contiguous():bfloat16():cuda():permute(P_OUT[#y:shape()]); y:backward(gb) end
  end
  local function time(x, old, n)
    step(x, old); step(x, old); iddpm.cuda.synchronize()
    local t0 = iddpm.cuda.wall_time()
    for _ = 1, n do step(x, old) end
    iddpm.cuda.synchronize()
    return (iddpm.cuda.wall_time() - t0) / n * 1e3
  end
  time(x32, true, 2); time(xb, false, 2)
  iddpm.cuda.profile_reset()
  local N = 20
  local t_old, t_new = time(x32, true, N), time(xb, false, N)
  print(("# bench %-34s b%d %-3s old (fp32 NCHW, bf16 products) %7.3f ms  new (bf16 channels-last) %7.3f ms"):format(
    c[1], B, mode, t_old, t_new))
end

if args[1] == "bench" then
  bench(args[2], tonumber(args[3]) or 128, args[4] or "fwd")
  return
end
run_checks()
H.done()
