-- test_backend_ops.lua — the CUDA backend against the CPU backend, in the style of
-- ggml's test-backend-ops: every backend op forward and (through the tape) backward
-- on random inputs, CPU vs GPU, with a tolerance per op; then a small UNet forward and
-- backward; then timings of the CIFAR-10 UNet (training step and sampling forward).
-- Run with `make test-cuda` (or ./iddpm run tests/cuda/test_backend_ops.lua [quick]).
-- Error measure: max |gpu - cpu| / max |cpu| over the tensor (1 for all-zero cpu).
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local args = {...}
local QUICK = args[1] == "quick"

if not iddpm.cuda.available() then
  print("# no GPU: " .. tostring(iddpm.cuda.reason()))
  H.raises("x:cuda() without a GPU says so", function() return T.zeros(2):cuda() end, "not available")
  print("ok - skipped: CUDA backend not available")
  H.done()
  return
end
print("# device: " .. iddpm.cuda.device_name())
T.manual_seed(1234)
print("# seed 1234")
-- the tolerances below are fp32 ones: run in fp32 whatever IDDPM_PRECISION says; the
-- tensor-core precisions are tested in their own section with their own tolerances
local START_PRECISION = iddpm.cuda.precision()
iddpm.cuda.precision("fp32")
local FAKE = iddpm.cuda.device_name() == ""   -- IDDPM_FAKE_CUDA=1: the CPU stands in

local F32 = 2e-6       -- pointwise float32
local SUMS = 1e-5      -- reductions / products over many terms
local LAYER = 1e-4     -- layer kernels (different summation order, FMA)

local err = H.rel_err

local worst = {}
local function record(name, e, tol)
  H.check(("%s (err %.2e, tol %.0e)"):format(name, e, tol), e <= tol)
  worst[#worst + 1] = {name, e, tol}
end

-- inputs: list of {shape, kind} ; kind: "n" normal, "p" positive, "u" uniform [0,1), or a tensor
-- fn(inputs...) -> tensor ; grads = true runs a backward with a random upstream gradient
local function case(name, specs, fn, tol, opts)
  opts = opts or {}
  local cpu, gpu = {}, {}
  for i, s in ipairs(specs) do
    local x
    if T.is_tensor(s) then x = s
    else
      x = T.randn(s[1])
      if s[2] == "p" then x = x:abs() + 0.5 elseif s[2] == "u" then x = T.rand(s[1]) end
      if s.f64 then x = x:double() end
    end
    cpu[i] = x:detach()
    gpu[i] = x:cuda()
    local want_grad = opts.grads ~= false and (cpu[i]:dtype() == "float32" or cpu[i]:dtype() == "float64")
    if want_grad and not (opts.nograd_inputs and opts.nograd_inputs[i]) then
      cpu[i].requires_grad = true; gpu[i].requires_grad = true
    end
  end
  local ok, yc = pcall(fn, table.unpack(cpu))
  if not ok then return H.check(name .. " (cpu)", false, yc) end
  local ok2, yg = pcall(fn, table.unpack(gpu))
  if not ok2 then return H.check(name .. " (gpu)", false, yg) end
  if yg:device() ~= "cuda" then return H.check(name .. " stays on cuda", false, yg:device()) end
  record(name .. " fwd", err(yg, yc), tol)
  if opts.grads == false or not yc.requires_grad then return end
  local g = T.randn(yc:shape()):to(yc:dtype())
  local okb, eb = pcall(function()
    (yc * g):sum():backward()
    ;(yg * g:cuda()):sum():backward()
  end)
  if not okb then return H.check(name .. " bwd", false, eb) end
  for i = 1, #cpu do
    if cpu[i].requires_grad and cpu[i].grad then
      if not gpu[i].grad then H.check(name .. " bwd grad " .. i, false, "no gpu grad")
      else record(("%s bwd d%d"):format(name, i), err(gpu[i].grad, cpu[i].grad), opts.btol or tol * 2) end
    end
  end
end

-- ---------------------------------------------------------------- memory, copies, dtypes
do
  local x = T.randn({3, 4, 5})
  record("upload/download round trip", err(x:cuda():cpu(), x), 0)
  record("permuted copy", err(x:cuda():permute({3, 1, 2}):contiguous(), x:permute({3, 1, 2}):contiguous()), 0)
  record("narrow copy", err(x:cuda():narrow(2, 2, 2):contiguous(), x:narrow(2, 2, 2):contiguous()), 0)
  record("expand copy", err(x:narrow(1, 1, 1):cuda():expand({3, 4, 5}):contiguous(), x:narrow(1, 1, 1):expand({3, 4, 5}):contiguous()), 0)
  -- 3-4 dims that do not coalesce: the 32-bit index walk (cu_offsets32) splits the
  -- index over every dim; each must land on the CPU's element exactly
  local y = T.randn({3, 4, 5, 6})
  record("permuted 4-d copy", err(y:cuda():permute({4, 2, 1, 3}):contiguous(), y:permute({4, 2, 1, 3}):contiguous()), 0)
  record("narrow of a permuted 4-d view", err(y:cuda():permute({2, 4, 1, 3}):narrow(2, 2, 4):contiguous(),
    y:permute({2, 4, 1, 3}):narrow(2, 2, 4):contiguous()), 0)
  record("cat 4-d dim 3", err(T.cat({y:cuda(), y:cuda() * 3}, 3), T.cat({y, y * 3}, 3)), 0)
  record("cat 4-d dim 4", err(T.cat({y:cuda(), y:cuda():narrow(4, 2, 3)}, 4), T.cat({y, y:narrow(4, 2, 3)}, 4)), 0)
  record("float64 cast", err(x:cuda():double(), x:double()), 0)
  record("int64 cast", err((x * 10):cuda():long(), (x * 10):long()), 0)
  record("uint8 cast (saturating)", err((x * 100):cuda():byte(), (x * 100):byte()), 0)
  record("fill_", err(T.zeros(5, 7):cuda():fill_(2.5), T.full({5, 7}, 2.5)), 0)
  record("non-contiguous fill_", err((function() local z = T.zeros(4, 6):cuda(); z:narrow(2, 2, 3):fill_(1); return z end)(),
    (function() local z = T.zeros(4, 6); z:narrow(2, 2, 3):fill_(1); return z end)()), 0)
  local c = T.cat({x:cuda(), x:cuda() * 2}, 2)
  record("cat", err(c, T.cat({x, x * 2}, 2)), 0)
  H.check("mixed devices raise", not pcall(function() return x + x:cuda() end))
  local used = iddpm.cuda.memory()
  H.check("allocator reports bytes in use", used > 0 or iddpm.cuda.device_name() == "", used)
end

-- ---------------------------------------------------------------- random streams
do
  for _, dt in ipairs({"float32", "float64"}) do
    local g1, g2 = T.generator(77, 3), T.generator(77, 3)
    local a, b = T.randn({1001}, g1, dt), T.randn({1001}, g2, dt, "cuda")
    record("randn same numbers " .. dt, err(b, a), dt == "float32" and 1e-7 or 1e-13)
    local u1, u2 = T.rand({777}, g1, dt), T.rand({777}, g2, dt, "cuda")
    record("rand same numbers " .. dt, err(u2, u1), 0)
  end
end

-- ---------------------------------------------------------------- pointwise
local bshapes = {{{4, 3, 5}, {3, 1}}, {{2, 1, 4}, {1, 3, 1}}, {{6, 7}, {6, 7}}, {{5}, {}}}
local binops = {
  {"add", function(a, b) return a + b end}, {"sub", function(a, b) return a - b end},
  {"mul", function(a, b) return a * b end}, {"div", function(a, b) return a / b end, "p"},
  {"pow", function(a, b) return a:pow(b) end, "p", "p"},
  {"maximum", function(a, b) return a:maximum(b) end}, {"minimum", function(a, b) return a:minimum(b) end},
}
for _, op in ipairs(binops) do
  for _, sh in ipairs(bshapes) do
    case(("%s %s %s"):format(op[1], table.concat(sh[1], "x"), table.concat(sh[2], "x")),
      {{sh[1], op[3] or "n"}, {sh[2], op[4] or op[3] or "n"}}, op[2], F32)
  end
end
for _, name in ipairs({"gt", "lt", "ge", "le", "eq", "ne"}) do
  case("compare " .. name, {{{4, 5}}, {{5}}}, function(a, b) return a[name](a, b) end, 0, {grads = false})
end
-- broadcasts over several dims that do not coalesce (the time-embedding add is 4x3x5x7 + 4x3x1x1)
case("add 4-d time-embedding broadcast", {{{4, 3, 5, 7}}, {{4, 3, 1, 1}}}, function(a, b) return a + b end, F32)
case("mul 4-d two-sided broadcast", {{{2, 1, 4, 1}}, {{1, 3, 1, 5}}}, function(a, b) return a * b end, F32)
case("sub 4-d broadcast, permuted view", {{{3, 4, 5, 6}}, {{5, 1, 3, 1}}},
  function(a, b) return a:permute({3, 2, 1, 4}) - b end, F32)
-- the contiguous float4 path: a tail of n % 4 elements, and operands at offsets that are
-- not 16-byte aligned (narrow along dim 1 keeps a view contiguous)
case("add 1027 contiguous (float4 + tail)", {{{1027}}, {{1027}}}, function(a, b) return a + b end, F32)
case("mul unaligned contiguous views", {{{9, 13}}, {{9, 13}}},
  function(a, b) return a:narrow(1, 2, 7) * b:narrow(1, 3, 7) end, F32)
case("binary on transposed views", {{{5, 6}}, {{6, 5}}}, function(a, b) return a + b:transpose(1, 2) end, F32)
case("binary float64", {{{3, 4}, f64 = true}, {{4}, f64 = true}}, function(a, b) return a * b + a end, 1e-15)
case("scalar ops", {{{3, 4}}}, function(a) return (a * 3 + 1) / 2 - 0.5 end, F32)
local unops = {"neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "abs", "square", "sin", "cos",
  "reciprocal", "floor", "sign"}
for _, name in ipairs(unops) do
  local pos = name == "log" or name == "sqrt" or name == "rsqrt" or name == "reciprocal"
  case("unary " .. name, {{{7, 9}, pos and "p" or "n"}}, function(a) return a[name](a) end, F32)
end
case("unary on a permuted view", {{{4, 5, 6}}}, function(a) return a:permute({3, 1, 2}):exp() end, F32)
case("clamp", {{{8, 8}}}, function(a) return a:clamp(-0.5, 0.7) end, F32)
case("affine", {{{8, 8}}}, function(a) return a:affine(1.5, -2) end, F32)
case("where", {{{4, 5}}, {{4, 5}}, {{4, 5}}}, function(c, a, b) return T.where(c:gt(0), a, b) end, F32,
  {nograd_inputs = {true}})

-- ---------------------------------------------------------------- reductions
for _, d in ipairs({1, 2, 3}) do
  case("sum dim " .. d, {{{6, 7, 8}}}, function(a) return a:sum(d) end, SUMS)
  case("mean dim " .. d, {{{6, 7, 8}}}, function(a) return a:mean(d, true) end, SUMS)
  case("max dim " .. d, {{{6, 7, 8}}}, function(a) return a:max(d) end, 0)
  case("min dim " .. d, {{{6, 7, 8}}}, function(a) return a:min(d) end, 0)
  case("logsumexp dim " .. d, {{{6, 7, 8}}}, function(a) return a:logsumexp(d) end, SUMS)
  case("softmax dim " .. d, {{{6, 7, 8}}}, function(a) return a:softmax(d) end, SUMS)
  case("var dim " .. d, {{{6, 7, 8}}}, function(a) return a:var(d) end, SUMS)
end
case("sum all (long, block path)", {{{300, 400}}}, function(a) return a:sum() end, SUMS)
case("max of a long row (block path)", {{{3, 5000}}}, function(a) return a:max(2) end, 0)
case("logsumexp of a long row (block path)", {{{3, 5000}}}, function(a) return a:logsumexp(2) end, SUMS)
case("mean_flat", {{{4, 3, 8, 8}}}, function(a) return a:mean_flat() end, SUMS)
do
  local x = T.randn({5, 300})
  local _, ic = x:max(2)
  local _, ig = x:cuda():max(2)
  if ic and ig then record("argmax indices", err(ig, ic), 0) end
end

-- ---------------------------------------------------------------- matmul
case("matmul 2d", {{{17, 33}}, {{33, 9}}}, function(a, b) return a:matmul(b) end, SUMS)
case("matmul batched", {{{4, 17, 33}}, {{4, 33, 9}}}, function(a, b) return a:matmul(b) end, SUMS)
case("matmul shared right matrix", {{{4, 17, 33}}, {{33, 9}}}, function(a, b) return a:matmul(b) end, SUMS)
case("matmul shared left matrix", {{{17, 33}}, {{4, 33, 9}}}, function(a, b) return a:matmul(b) end, SUMS)
case("matmul broadcast batch", {{{2, 1, 5, 6}}, {{1, 3, 6, 4}}}, function(a, b) return a:matmul(b) end, SUMS)
case("matmul of transposed views", {{{33, 17}}, {{9, 33}}}, function(a, b) return a:transpose(1, 2):matmul(b:transpose(1, 2)) end, SUMS)
case("matmul float64", {{{8, 12}, f64 = true}, {{12, 5}, f64 = true}}, function(a, b) return a:matmul(b) end, 1e-14)
case("index_select", {{{10, 6}}, T.from_table({3, 0, 9, 3}, {4}, "int64")}, function(a, i) return a:index_select(1, i) end, 0)

-- ---------------------------------------------------------------- layer kernels
local convs = {
  {"3x3 pad 1", {2, 5, 9, 11}, {7, 5, 3, 3}, 1, 1},
  {"3x3 stride 2 pad 1", {3, 4, 9, 8}, {6, 4, 3, 3}, 2, 1},
  {"1x1", {2, 12, 6, 6}, {5, 12, 1, 1}, 1, 0},
  {"5x3 no pad", {2, 3, 10, 7}, {4, 3, 5, 3}, 1, 0},
  {"3x3 64ch 16x16", {4, 64, 16, 16}, {64, 64, 3, 3}, 1, 1},
  {"3x3 96->160ch 8x8", {3, 96, 8, 8}, {160, 96, 3, 3}, 1, 1},
}
-- tol, btol: forward and gradient tolerances; every conv runs cuDNN (the default) and
-- the im2col fallback, each against the CPU
local function conv_cases(tag, tol, btol)
  for _, c in ipairs(convs) do
    case(tag .. "conv2d " .. c[1], {{c[2]}, {c[3]}, {{c[3][1]}}}, function(x, w, b) return T.conv2d(x, w, b, c[4], c[5]) end,
      tol, {btol = btol})
    case(tag .. "conv2d " .. c[1] .. " no bias", {{c[2]}, {c[3]}}, function(x, w) return T.conv2d(x, w, nil, c[4], c[5]) end,
      tol, {btol = btol})
  end
end
H.check("conv_impl() defaults to cudnn", iddpm.cuda.conv_impl() == (os.getenv("IDDPM_CUDA_CONV") or "cudnn"),
  iddpm.cuda.conv_impl())
for _, impl in ipairs({"cudnn", "im2col"}) do
  H.check("conv_impl(" .. impl .. ") returns it", iddpm.cuda.conv_impl(impl) == impl or FAKE)
  conv_cases(impl .. " ", LAYER)
end
iddpm.cuda.conv_impl("cudnn")
H.raises("conv_impl with a bad name", function() return iddpm.cuda.conv_impl("winograd") end, "invalid option")
for _, g in ipairs({{"plain", false, false}, {"silu", true, false}, {"scale-shift silu", true, true}}) do
  case("group_norm " .. g[1], {{{3, 16, 5, 6}}, {{16}}, {{16}}, {{3, 16}}, {{3, 16}}},
    function(x, ga, be, sc, sh)
      if g[3] then return T.group_norm(x, 4, ga, be, sc, sh, g[2]) end
      return T.group_norm(x, 4, ga, be, nil, nil, g[2])
    end, LAYER)
end
-- the CIFAR-10 shape (4 channels x 1024 pixels per group) and a wide group (24 channels)
case("group_norm scale-shift silu 128ch 32x32", {{{2, 128, 32, 32}}, {{128}}, {{128}}, {{2, 128}},
  {{2, 128}}}, function(x, ga, be, sc, sh) return T.group_norm(x, 32, ga, be, sc, sh, true) end, LAYER)
case("group_norm 96ch 4 groups 4x4", {{{3, 96, 4, 4}}, {{96}}, {{96}}},
  function(x, ga, be) return T.group_norm(x, 4, ga, be, nil, nil, true) end, LAYER)
-- groups of 3230, 6630 and 18432 elements (not multiples of the 256 threads of a block)
case("group_norm group of 3230", {{{2, 30, 17, 19}}, {{30}}, {{30}}},
  function(x, ga, be) return T.group_norm(x, 3, ga, be, nil, nil, true) end, LAYER)
case("group_norm group of 6630", {{{2, 60, 13, 17}}, {{60}}, {{60}}, {{2, 60}}, {{2, 60}}},
  function(x, ga, be, sc, sh) return T.group_norm(x, 2, ga, be, sc, sh, true) end, LAYER)
case("group_norm group of 18432", {{{1, 64, 24, 24}}, {{64}}, {{64}}},
  function(x, ga, be) return T.group_norm(x, 2, ga, be, nil, nil, false) end, LAYER)
case("group_norm 32 groups 128ch 8x8", {{{2, 128, 8, 8}}, {{128}}, {{128}}}, function(x, ga, be) return T.group_norm(x, 32, ga, be, nil, nil, true) end, LAYER)
for _, a in ipairs({{1, 8, 16}, {2, 16, 64}, {4, 32, 20}}) do
  local heads, C, Tn = a[1], a[2], a[3]
  case(("qkv_attention heads %d C %d T %d"):format(heads, C, Tn), {{{3, 3 * C, Tn}}},
    function(q) return T.qkv_attention(q, heads) end, LAYER)
end
case("upsample_nearest", {{{2, 3, 5, 7}}}, function(x) return T.upsample_nearest(x, 2) end, F32)
case("avg_pool2d odd sizes", {{{2, 3, 7, 9}}}, function(x) return T.avg_pool2d(x, 2) end, F32)
case("upsample_nearest 3x5x4x6", {{{3, 5, 4, 6}}}, function(x) return T.upsample_nearest(x, 2) end, F32)
case("avg_pool2d 3x5x6x10", {{{3, 5, 6, 10}}}, function(x) return T.avg_pool2d(x, 2) end, F32)
case("timestep_embedding", {T.from_table({0, 1, 17, 999, 3999}, {5})}, function(t) return T.timestep_embedding(t, 33) end, 1e-5,
  {grads = false})
do
  local x = T.randn({4, 1001})
  local xc, xg = x:detach(), x:cuda()
  xc.requires_grad = true; xg.requires_grad = true
  local yc = T.dropout(xc, 0.3, T.generator(5, 1))
  local yg = T.dropout(xg, 0.3, T.generator(5, 1))
  record("dropout same mask fwd", err(yg, yc), 0)
  local g = T.randn({4, 1001})
  ;(yc * g):sum():backward(); (yg * g:cuda()):sum():backward()
  record("dropout same mask bwd", err(xg.grad, xc.grad), 0)
end

-- errors name the op and the sizes
H.raises("conv2d channel mismatch on cuda", function()
  return T.conv2d(T.zeros(1, 3, 4, 4):cuda(), T.zeros(2, 4, 3, 3):cuda())
end, "channels")

-- ---------------------------------------------------------------- small UNet
local UNet = iddpm.nn.UNet or require("iddpm.nn.unet").UNet
local function unet_case(name, cfg, N, tol, gtol, gfloor)
  local mc = UNet.new(cfg)
  -- the zero-initialised layers (out conv, each block's last conv, proj_out) get small
  -- random weights, else the output is exactly 0 and the forward check says nothing
  local pgen = T.generator(31)
  for _, p in ipairs(mc:parameters()) do
    if p:abs():max():item() == 0 then p:copy_(T.randn(p:shape(), pgen) * 0.05) end
  end
  local mg = UNet.new(cfg)
  mg:load_state_dict(mc:state_dict())
  mg:to("cuda")
  mc:train(false); mg:train(false)
  local x = T.randn({N, cfg.in_channels or 3, cfg.image_size, cfg.image_size})
  local t = T.from_table({1, 250, 500, 999, 3, 17, 40, 800}, {8}):narrow(1, 1, N)
  local yc = mc:forward(x, t)
  local yg = mg:forward(x:cuda(), t:cuda())
  record(name .. " forward", err(yg, yc), tol)
  local g = T.randn(yc:shape())
  ;(yc * g):sum():backward(); (yg * g:cuda()):sum():backward()
  local pc, pg = mc:named_parameters(), mg:named_parameters()
  local we, wn = 0, ""
  local names = mc:parameter_names()
  -- a conv bias just before a one-channel-per-group norm has an exactly-zero gradient
  -- (roundoff on both sides): each parameter's error is taken relative to at least
  -- GRAD_FLOOR x the largest gradient of the network (gfloor: bf16 activations leave
  -- cancellation noise of ~1e-3 x the largest gradient there)
  local GRAD_FLOOR, gmax = gfloor or 1e-3, 0
  for _, n in ipairs(names) do if pc[n].grad then gmax = math.max(gmax, pc[n].grad:abs():max():item()) end end
  for _, n in ipairs(names) do
    local a, b = pc[n].grad, pg[n].grad
    if a and b then
      local scale = math.max(a:abs():max():item(), GRAD_FLOOR * gmax)
      local e = (b:cpu():double() - a:double()):abs():max():item() / (scale > 0 and scale or 1)
      if e ~= e then e = math.huge end
      if e > we then we, wn = e, n end
    elseif a or b then we, wn = math.huge, n .. " (grad missing on one side)" end
  end
  record(name .. " backward, worst param grad " .. wn, we, gtol or tol * 10)
end
local ok, e = pcall(unet_case, "UNet 32px ch32 attn16", {image_size = 32, num_channels = 32, num_res_blocks = 1,
  channel_mult = {1, 2}, attention_resolutions = {16}, num_heads = 2, learn_sigma = true}, 2, 1e-4)
if not ok then H.check("UNet small config", false, e) end

-- ---------------------------------------------------------------- tensor-core precisions
-- iddpm.cuda.precision("tf32" | "bf16"): convs, matmuls and attention on tensor cores,
-- tensors stay float32. Tolerances per op (relative to max |cpu|): TF32 keeps 10
-- mantissa bits of each operand (rounding 2^-11), bf16 7 (2^-8); sums are fp32, so the
-- error of a K-term product grows like sqrt(K) * rounding, and a UNet compounds layers.
local PREC_TOL = {
  tf32 = {conv = 2e-3, matmul = 2e-3, attention = 5e-3, unet = 2e-3, unet_grad = 2e-2},
  bf16 = {conv = 2e-2, matmul = 2e-2, attention = 3e-2, unet = 4e-2, unet_grad = 1e-1, grad_floor = 3e-2},
}
do
  H.check("precision() is fp32 here", iddpm.cuda.precision() == "fp32")
  H.check("precision(bf16) returns bf16", iddpm.cuda.precision("bf16") == "bf16")
  H.check("precision() queries", iddpm.cuda.precision() == "bf16")
  iddpm.cuda.tf32(true)
  H.check("tf32(true) is precision tf32", iddpm.cuda.precision() == "tf32")
  iddpm.cuda.tf32(false)
  H.check("tf32(false) is precision fp32", iddpm.cuda.precision() == "fp32")
  H.raises("precision with a bad name", function() return iddpm.cuda.precision("fp8") end, "not fp32, tf32 or bf16")
  H.check("a bad name leaves the precision", iddpm.cuda.precision() == "fp32")
end
for _, pr in ipairs({"tf32", "bf16"}) do
  local tol = PREC_TOL[pr]
  iddpm.cuda.precision(pr)
  for _, impl in ipairs({"cudnn", "im2col"}) do
    iddpm.cuda.conv_impl(impl)
    conv_cases(pr .. " " .. impl .. " ", tol.conv, tol.conv)
  end
  iddpm.cuda.conv_impl("cudnn")
  case(pr .. " matmul batched", {{{3, 40, 70}}, {{3, 70, 24}}}, function(a, b) return a:matmul(b) end, tol.matmul)
  case(pr .. " matmul shared left (conv1d)", {{{48, 96}}, {{4, 96, 50}}}, function(a, b) return a:matmul(b) end, tol.matmul)
  case(pr .. " qkv_attention heads 2 C 64 T 64", {{{2, 192, 64}}}, function(q) return T.qkv_attention(q, 2) end,
    tol.attention)
  local okp, ep = pcall(unet_case, pr .. " UNet 32px ch32 attn16", {image_size = 32, num_channels = 32,
    num_res_blocks = 1, channel_mult = {1, 2}, attention_resolutions = {16}, num_heads = 2, learn_sigma = true}, 2,
    tol.unet, tol.unet_grad, tol.grad_floor)
  if not okp then H.check(pr .. " UNet small config", false, ep) end
  iddpm.cuda.precision("fp32")
end
-- the switch must really change the arithmetic: a 576-term conv differs from the CPU
-- by bf16 rounding (far above fp32's error), and fp32 again afterwards is exact-ish
if not FAKE then
  local x, w = T.randn({4, 64, 16, 16}), T.randn({64, 64, 3, 3})
  local want = T.conv2d(x, w, nil, 1, 1)
  local function gpu_err(pr)
    iddpm.cuda.precision(pr)
    local e = err(T.conv2d(x:cuda(), w:cuda(), nil, 1, 1), want)
    iddpm.cuda.precision("fp32")
    return e
  end
  local e32, ebf = gpu_err("fp32"), gpu_err("bf16")
  H.check(("bf16 conv rounds (err %.2e) and fp32 does not (err %.2e)"):format(ebf, e32), ebf > 1e-4 and e32 < 1e-5)
end

-- ---------------------------------------------------------------- diffusion kernels
-- every device diffusion op against the CPU one, for the mean/variance/loss types;
-- results must stay on the device. Inputs in [-1, 1] like data; t includes 0 and T-1.
local D = iddpm.diffusion
local function cmp(name, g, c, tol)
  if not T.is_tensor(g) then return H.check(name, false, "not a tensor") end
  if g:device() ~= "cuda" then return H.check(name .. " stays on cuda", false, g:device()) end
  record(name, err(g, c), tol)
end
local combos = {
  {"epsilon", "learned_range", "rescaled_mse"}, {"epsilon", "learned_range", "mse"}, {"epsilon", "fixed_large", "mse"},
  {"epsilon", "fixed_small", "kl"}, {"start_x", "learned", "rescaled_kl"}, {"previous_x", "learned_range", "rescaled_mse"},
  {"epsilon", "learned", "kl"},
}
for _, cb in ipairs(combos) do
  local mean, var, loss = cb[1], cb[2], cb[3]
  local tag = ("diff %s/%s/%s"):format(mean, var, loss)
  local ok, e = pcall(function()
    local d = D.new{steps = 50, noise_schedule = "cosine", model_mean_type = mean, model_var_type = var, loss_type = loss}
    local B, C, HW = 4, 3, 6
    local learned = var == "learned" or var == "learned_range"
    local x0 = (T.rand({B, C, HW, HW}) * 2 - 1):clamp(-1, 1)
    local noise = T.randn({B, C, HW, HW})
    local mo = T.randn({B, learned and 2 * C or C, HW, HW}) * 0.5
    local t = {0, 1, 25, 49}
    local g = {x0 = x0:cuda(), noise = noise:cuda(), mo = mo:cuda()}
    -- q_sample forward and backward
    local a, b = x0:detach(), noise:detach()
    a.requires_grad = true; b.requires_grad = true
    local ag, bg = g.x0:detach(), g.noise:detach()
    ag.requires_grad = true; bg.requires_grad = true
    local xc, xg = d:q_sample(a, t, b), d:q_sample(ag, t, bg)
    cmp(tag .. " q_sample", xg, xc, F32)
    local R = T.randn(xc:shape())
    ;(xc * R):sum():backward(); (xg * R:cuda()):sum():backward()
    cmp(tag .. " q_sample bwd x0", ag.grad, a.grad, F32)
    cmp(tag .. " q_sample bwd noise", bg.grad, b.grad, F32)
    local xt, xtg = xc:detach(), xg:detach()
    -- the training loss and its gradient w.r.t. the model output
    local mc, mg = mo:detach(), g.mo:detach()
    mc.requires_grad = true; mg.requires_grad = true
    local lc = d:training_losses(function() return mc end, x0, t, {noise = noise})
    local lg = d:training_losses(function() return mg end, g.x0, t, {noise = g.noise})
    for _, k in ipairs({"loss", "mse", "vb"}) do cmp(tag .. " training_losses " .. k, lg[k], lc[k], SUMS) end
    local w = T.from_table({1, -2, 0.5, 3}, {4})
    ;(lc.loss * w):sum():backward(); (lg.loss * w:cuda()):sum():backward()
    cmp(tag .. " training_losses bwd", mg.grad, mc.grad, SUMS)
    -- q posterior / q mean-variance / predictions
    local pc, pg = {d:q_posterior_mean_variance(x0, xt, t)}, {d:q_posterior_mean_variance(g.x0, xtg, t)}
    for k = 1, 3 do cmp(tag .. " q_posterior " .. k, pg[k], pc[k], F32) end
    pc, pg = {d:q_mean_variance(x0, t)}, {d:q_mean_variance(g.x0, t)}
    for k = 1, 3 do cmp(tag .. " q_mean_variance " .. k, pg[k], pc[k], F32) end
    cmp(tag .. " predict_xstart_from_eps", d:predict_xstart_from_eps(xtg, t, g.noise), d:predict_xstart_from_eps(xt, t, noise), F32)
    cmp(tag .. " predict_eps_from_xstart", d:predict_eps_from_xstart(xtg, t, g.x0), d:predict_eps_from_xstart(xt, t, x0), F32)
    -- reverse process with a fixed "model"
    local mdc, mdg = function() return mo end, function() return g.mo end
    for _, clip in ipairs({true, false}) do
      local oc = d:p_mean_variance(mdc, xt, t, {clip_denoised = clip})
      local og = d:p_mean_variance(mdg, xtg, t, {clip_denoised = clip})
      for _, k in ipairs({"mean", "variance", "log_variance", "pred_xstart"}) do
        cmp(("%s p_mean_variance clip=%s %s"):format(tag, tostring(clip), k), og[k], oc[k], 1e-5)
      end
    end
    cmp(tag .. " p_sample", (d:p_sample(mdg, xtg, t, {noise = g.noise})), (d:p_sample(mdc, xt, t, {noise = noise})), 1e-5)
    for _, eta in ipairs({0, 0.5}) do
      cmp(tag .. " ddim_sample eta " .. eta, (d:ddim_sample(mdg, xtg, t, {noise = g.noise, eta = eta})),
        (d:ddim_sample(mdc, xt, t, {noise = noise, eta = eta})), 1e-5)
    end
    cmp(tag .. " ddim_reverse_sample", (d:ddim_reverse_sample(mdg, xtg, t)), (d:ddim_reverse_sample(mdc, xt, t)), 1e-5)
  end)
  if not ok then H.check(tag, false, e) end
end

-- ---------------------------------------------------------------- optimizer kernels
do
  local ok, e = pcall(function()
    local shapes = {{7}, {33, 5}, {4096 + 17}, {3, 3, 3, 3}, {1}, {70000}}
    local pc, pg = {}, {}
    for i, sh in ipairs(shapes) do
      pc[i] = T.randn(sh); pc[i].requires_grad = true
      pg[i] = pc[i]:cuda(); pg[i].requires_grad = true
    end
    local oc = iddpm.optim.adamw(pc, {lr = 1e-2, weight_decay = 0.1})
    local og = iddpm.optim.adamw(pg, {lr = 1e-2, weight_decay = 0.1})
    H.check("adamw state on the device", og.m[1]:device() == "cuda" and og.v[6]:device() == "cuda")
    local ec, eg = iddpm.optim.ema(pc, 0.9), iddpm.optim.ema(pg, 0.9)
    for step = 1, 3 do
      for i, sh in ipairs(shapes) do
        if not (step == 2 and i == 2) then   -- a parameter without a gradient is skipped
          local gr = T.randn(sh)
          pc[i].grad = gr; pg[i].grad = gr:cuda()
        else pc[i].grad = nil; pg[i].grad = nil end
      end
      local nc, ng = iddpm.optim.clip_grad_norm(pc, 50), iddpm.optim.clip_grad_norm(pg, 50)
      record("grad_norm step " .. step, math.abs(nc - ng) / nc, 1e-12)
      oc:step(); og:step(); ec:update(); eg:update()
    end
    local we, wm = 0, 0
    for i = 1, #shapes do
      we = math.max(we, err(pg[i], pc[i]), err(og.m[i], oc.m[i]), err(og.v[i], oc.v[i]))
      wm = math.max(wm, err(eg.shadow[i], ec.shadow[i]))
    end
    record("adamw 3 steps (params, m, v)", we, 1e-6)
    record("ema 3 steps", wm, 1e-6)
  end)
  if not ok then H.check("optimizer kernels", false, e) end
end

-- ---------------------------------------------------------------- one full hybrid training step
-- small UNet, learned-range sigma, rescaled MSE + VLB: loss and every gradient, then
-- AdamW + EMA, GPU vs CPU; nothing but the loss value leaves the device.
do
  local ok, e = pcall(function()
    local cfg = {image_size = 16, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
      attention_resolutions = {8}, num_heads = 2, learn_sigma = true, dropout = 0.1}
    T.manual_seed(77)
    local mc = UNet.new(cfg)
    local mg = UNet.new(cfg)
    mg:load_state_dict(mc:state_dict())
    mg:to("cuda")
    mc:train(true); mg:train(true)
    local d = D.new{steps = 1000, noise_schedule = "cosine", learn_sigma = true}
    local B = 4
    local x0 = (T.rand({B, 3, 16, 16}) * 2 - 1)
    local t = {0, 10, 500, 999}
    local noise = T.randn({B, 3, 16, 16})
    local function step(model, x, nz, dev)
      local oc = iddpm.optim.adamw(model:parameters(), {lr = 1e-3})
      local em = iddpm.optim.ema(model, 0.99)
      model:zero_grad()
      local l = d:training_losses(model, x, t, {noise = nz, generator = T.generator(3)})
      local loss = l.loss:mean()
      loss:backward()
      local gn = iddpm.optim.grad_norm(model:parameters())
      local grads = {}
      for n, p in pairs(model:named_parameters()) do grads[n] = p.grad and p.grad:cpu() end
      oc:step(); em:update()
      return loss:item(), l, grads, gn, em
    end
    local lc, llc, gc, nc, emc = step(mc, x0, noise)
    local lg, llg, gg, ng, emg = step(mg, x0:cuda(), noise:cuda())
    H.check("train step: losses on the device", llg.loss:device() == "cuda" and llg.vb:device() == "cuda")
    record("train step loss", math.abs(lg - lc) / math.abs(lc), 1e-4)
    record("train step per-example vb", err(llg.vb, llc.vb), 1e-3)
    local we, wn = 0, ""
    for n, a in pairs(gc) do
      local b = gg[n]
      local ee = b and err(b, a) or math.huge
      if ee > we then we, wn = ee, n end
    end
    record("train step worst param grad " .. wn, we, 2e-3)
    record("train step grad norm", math.abs(ng - nc) / nc, 1e-4)
    local pc, pg = mc:named_parameters(), mg:named_parameters()
    local wp = 0
    for n, p in pairs(pc) do wp = math.max(wp, err(pg[n], p)) end
    record("train step params after AdamW", wp, 1e-4)
    local ws = 0
    for i = 1, #emc.shadow do ws = math.max(ws, err(emg.shadow[i], emc.shadow[i])) end
    record("train step EMA", ws, 1e-4)
    H.check("train step: parameters and EMA stay on the device", pg[mc:parameter_names()[1]]:device() == "cuda"
      and emg.shadow[1]:device() == "cuda")
  end)
  if not ok then H.check("full training step", false, e) end
end

-- ---------------------------------------------------------------- bf16 training reaches the fp32 loss
-- The same small UNet (same initial weights) and data trained STEPS AdamW steps in fp32
-- and in bf16 on the GPU, each with two seeds for timesteps and noise (the same two for
-- both precisions); every model is then scored in fp32 on one fixed evaluation set
-- (every data image at EVAL_T timesteps, fixed noise). Training is chaotic: two fp32
-- seeds already end a few percent apart. So the mean bf16 evaluation loss must be
-- within TRAIN_REL of the mean fp32 one, TRAIN_REL = max(REL_FLOOR, 2 x the fp32
-- seed-to-seed spread), and every model must have learnt (below LEARNT x untrained).
if not QUICK and not FAKE then
  local ok, e = pcall(function()
    local cfg = {image_size = 16, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
      attention_resolutions = {8}, num_heads = 2, learn_sigma = true, dropout = 0}
    local d = D.new{steps = 1000, noise_schedule = "cosine", learn_sigma = true}
    local STEPS, B, NDATA, REL_FLOOR, LEARNT = 300, 16, 64, 0.05, 0.5
    local EVAL_T = {5, 50, 150, 300, 500, 700, 900, 990}
    math.randomseed(21)
    print("# bf16 training: seeds 21 (data), 5/6 (t), generators 11/13 (noise), 12 (eval noise), weights seed 99")
    -- data: smooth random waves, so that denoising is learnable
    local vals = {}
    for _ = 1, NDATA do
      local a, b, c = math.random() * 0.8, math.random() * 0.8, math.random() * 6
      for ch = 0, 2 do
        for y = 0, 15 do
          for xx = 0, 15 do vals[#vals + 1] = math.sin(a * xx + b * y + c + ch) * 0.9 end
        end
      end
    end
    local data = T.from_table(vals, {NDATA, 3, 16, 16}):cuda()
    T.manual_seed(99)
    local init = UNet.new(cfg):state_dict()
    local function eval_loss(m)
      iddpm.cuda.precision("fp32")
      m:train(false)
      local gen, sum = T.generator(12), 0
      T.no_grad(function()
        for _, tv in ipairs(EVAL_T) do
          local t = {}
          for i = 1, NDATA do t[i] = tv end
          sum = sum + d:training_losses(m, data, t, {generator = gen}).loss:mean():item() / #EVAL_T
        end
      end)
      return sum
    end
    local function run(pr, seed)
      local m = UNet.new(cfg)
      m:load_state_dict(init)
      m:to("cuda")
      local before = eval_loss(m)
      iddpm.cuda.precision(pr)
      m:train(true)
      local opt = iddpm.optim.adamw(m:parameters(), {lr = 1e-3})
      local gen = T.generator(seed == 1 and 11 or 13)
      math.randomseed(seed == 1 and 5 or 6)
      for s = 1, STEPS do
        local x0 = data:narrow(1, ((s - 1) * B) % NDATA + 1, B)
        local t = {}
        for i = 1, B do t[i] = math.random(0, 999) end
        m:zero_grad()
        d:training_losses(m, x0, t, {generator = gen}).loss:mean():backward()
        opt:step()
      end
      return before, eval_loss(m)
    end
    local before, l32, lbf, learnt = nil, {}, {}, true
    for k = 1, 2 do
      local b0
      b0, l32[k] = run("fp32", k)
      before = b0
      learnt = learnt and l32[k] < LEARNT * b0
      b0, lbf[k] = run("bf16", k)
      learnt = learnt and lbf[k] < LEARNT * b0
    end
    local m32, mbf = (l32[1] + l32[2]) / 2, (lbf[1] + lbf[2]) / 2
    local spread = math.abs(l32[1] - l32[2]) / m32
    local TRAIN_REL = math.max(REL_FLOOR, 2 * spread)
    print(("# bf16 training: eval loss untrained %.4f; after %d steps fp32 %.4f %.4f, bf16 %.4f %.4f (fp32 seed spread %.1f%%)")
      :format(before, STEPS, l32[1], l32[2], lbf[1], lbf[2], 100 * spread))
    H.check("fp32 and bf16 training both learn", learnt)
    record("bf16 training mean eval loss vs fp32", math.abs(mbf - m32) / m32, TRAIN_REL)
  end)
  if not ok then H.check("bf16 training run", false, e) end
end
iddpm.cuda.precision(START_PRECISION)

-- ---------------------------------------------------------------- worst errors
table.sort(worst, function(a, b) return a[2] / math.max(a[3], 1e-30) > b[2] / math.max(b[3], 1e-30) end)
print("# closest to tolerance:")
for i = 1, math.min(8, #worst) do print(("#   %-60s err %.2e tol %.0e"):format(worst[i][1], worst[i][2], worst[i][3])) end

-- ---------------------------------------------------------------- timings
local wall = iddpm.cuda.wall_time
local function time_it(fn, iters)
  fn(); iddpm.cuda.synchronize()
  local t0 = wall()
  for _ = 1, iters do fn() end
  iddpm.cuda.synchronize()
  return (wall() - t0) / iters
end

if not QUICK and os.getenv("IDDPM_BENCH") ~= "0" then
  local cifar = {image_size = 32, num_channels = 128, num_res_blocks = 3, learn_sigma = true, dropout = 0.3,
    attention_resolutions = {16, 8}, num_heads = 4}
  local SMALL = os.getenv("IDDPM_BENCH_SMALL") == "1"   -- smoke test of this section without a GPU
  if SMALL then cifar.num_channels, cifar.num_res_blocks, cifar.channel_mult = 32, 1, {1, 2} end
  local TRAIN_B, SAMPLE_B = SMALL and {2} or {128}, SMALL and {2} or {128, 256}
  local model = UNet.new(cifar):to("cuda")
  model:train(true)
  local params = model:parameters()
  for _, B in ipairs(TRAIN_B) do
    local x0 = T.randn({B, 3, 32, 32}, nil, "float32", "cuda")
    local t = T.rand({B}, nil, "float32", "cuda"):affine(3999, 0):floor()
    local ca = T.rand({B, 1, 1, 1}, nil, "float32", "cuda")
    local step = function()
      for _, p in ipairs(params) do p:zero_grad() end
      local noise = T.randn({B, 3, 32, 32}, nil, "float32", "cuda")
      local xt = x0 * ca:sqrt() + noise * (1 - ca):sqrt()
      local out = model:forward(xt, t)
      local loss = (out:narrow(2, 1, 3) - noise):square():mean()
      loss:backward()
      return loss
    end
    local s = time_it(step, 5)
    print(("# bench train fwd+bwd (eps MSE, no optimizer) batch %d: %.1f ms/step, %.0f img/s (fp32%s)"):format(B, s * 1e3,
      B / s, os.getenv("IDDPM_TF32") == "1" and ", TF32 on" or ""))
    local used, cached = iddpm.cuda.memory()
    print(("# bench memory after training steps: %.0f MiB in use, %.0f MiB cached"):format(used / 2^20, cached / 2^20))
  end
  -- where the time goes: single layer ops at CIFAR-10 sizes (batch 128), fwd and fwd+bwd
  if not SMALL then
    local function op_bench(name, shapes, fn)
      local ins = {}
      for i, sh in ipairs(shapes) do ins[i] = T.randn(sh, nil, "float32", "cuda"); ins[i].requires_grad = true end
      local f = time_it(function() T.no_grad(function() fn(table.unpack(ins)) end) end, 10)
      local g
      local fb = time_it(function()
        local y = fn(table.unpack(ins))
        g = g or T.randn(y:shape(), nil, "float32", "cuda")
        y:backward(g)
      end, 5)
      print(("# op %-44s fwd %7.3f ms  fwd+bwd %7.3f ms"):format(name, f * 1e3, fb * 1e3))
    end
    op_bench("conv2d 3x3 128->128 @32x32 N128", {{128, 128, 32, 32}, {128, 128, 3, 3}, {128}}, function(x, w, b) return T.conv2d(x, w, b, 1, 1) end)
    op_bench("conv2d 3x3 256->256 @8x8 N128", {{128, 256, 8, 8}, {256, 256, 3, 3}, {256}}, function(x, w, b) return T.conv2d(x, w, b, 1, 1) end)
    op_bench("conv2d 1x1 384->256 @16x16 N128", {{128, 384, 16, 16}, {256, 384, 1, 1}, {256}}, function(x, w, b) return T.conv2d(x, w, b, 1, 0) end)
    op_bench("group_norm+ss+silu 128ch @32x32 N128", {{128, 128, 32, 32}, {128}, {128}, {128, 128}, {128, 128}},
      function(x, ga, be, sc, sh) return T.group_norm(x, 32, ga, be, sc, sh, true) end)
    op_bench("qkv_attention 4 heads C256 T256 N128", {{128, 768, 256}}, function(q) return T.qkv_attention(q, 4) end)
    op_bench("add 128x128x32x32", {{128, 128, 32, 32}, {128, 128, 32, 32}}, function(a, b) return a + b end)
    op_bench("cat 2x(128x128x16x16) dim 2", {{128, 128, 16, 16}, {128, 128, 16, 16}}, function(a, b) return T.cat({a, b}, 2) end)
    op_bench("linear 512->256 N128 (emb_layers)", {{128, 512}, {256, 512}}, function(a, w) return a:matmul(w:transpose(1, 2)) end)
  end

  model:train(false)
  for _, B in ipairs(SAMPLE_B) do
    local x = T.randn({B, 3, 32, 32}, nil, "float32", "cuda")
    local t = T.full({B}, 500):cuda()
    local s = time_it(function() T.no_grad(function() model:forward(x, t) end) end, 5)
    print(("# bench sample forward batch %d: %.1f ms, %.0f images x steps/s"):format(B, s * 1e3, B / s))
  end
end

H.done()
