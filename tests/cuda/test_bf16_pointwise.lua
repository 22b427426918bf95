-- test_bf16_pointwise.lua — bfloat16 and channels-last through the generic ops on the
-- GPU against the CPU backend (the reference: the same math on the same bf16 inputs,
-- rounded once): copies and casts between f32/f64/i64/u8/bf16 in any layout (the tiled
-- NCHW <-> NHWC transposes, flat conversions, cat, narrow), fill, binary/unary/affine/
-- clamp with bf16 and mixed operands (flat 16-byte path, its unaligned and tail cases,
-- broadcasts, scalars), reductions of bf16, and gradients through them; then timings
-- of the transposes at the CIFAR UNet's sizes and of a channels-last bf16 add against
-- an NCHW float32 add (GB/s).
-- ./iddpm run tests/cuda/test_bf16_pointwise.lua [quick]   (IDDPM_FAKE_CUDA=1: the CPU
-- stands in for the GPU, checking the script). Error: max |gpu - cpu| / max(max |cpu|, 1);
-- tolerance 0 means bit for bit (one rounding of the same math).
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local args = {...}
local QUICK = args[1] == "quick"

if H.skip_without_cuda() then H.done() return end
print("# device: " .. iddpm.cuda.device_name())
local SEED = 2468
T.manual_seed(SEED)
print("# seed " .. SEED)
local FAKE = iddpm.cuda.device_name() == ""

local EXACT = 0          -- one rounding of the same float math: bit for bit
local TRANS = 2 ^ -8     -- exp/tanh/...: double on both, an ulp of double can flip a bf16 rounding
local SUMS = 1e-6        -- f32 results of double sums of bf16 terms
local GRAD = 2 ^ -7      -- gradients through a few bf16 roundings

local function err(got, want)
  local g, w = got:cpu():double():totable(), want:cpu():double():totable()
  local d, scale = 0, 1
  for i = 1, #w do
    local a, b = g[i], w[i]
    -- equal elements (infinities included) and NaN against NaN count as matches
    if a ~= b and not (a ~= a and b ~= b) then
      local e = math.abs(a - b)
      if e ~= e then e = math.huge end
      if e > d then d = e end
    end
    if math.abs(b) > scale and math.abs(b) < math.huge then scale = math.abs(b) end
  end
  return d / scale
end

local worst = {}
-- compare a GPU result with the CPU one: dtype, layout (channels-last or not) and values
local function same(name, g, c, tol)
  if g:device() ~= "cuda" then return H.check(name .. ": stays on cuda", false, g:device()) end
  if g:dtype() ~= c:dtype() then return H.check(name .. ": dtype", false, g:dtype() .. " vs cpu " .. c:dtype()) end
  if g:is_channels_last() ~= c:is_channels_last() or g:is_contiguous() ~= c:is_contiguous() then
    return H.check(name .. ": layout", false, table.concat(g:stride(), ",") .. " vs cpu " .. table.concat(c:stride(), ","))
  end
  local e = err(g, c)
  worst[#worst + 1] = {name, e, tol}
  return H.check(("%s (%s, err %.2e, tol %.0e)"):format(name, g:dtype(), e, tol), e <= tol)
end

-- a pair (cpu, gpu) of the same tensor: kind "n" normal, "p" positive, "big" spans
-- magnitudes with a few specials; layout "cl" channels-last, "nchw" contiguous
local function pair(shape, dt, layout, kind)
  local x = T.randn(shape)
  if kind == "p" then x = x:abs() + 0.25
  elseif kind == "big" then x = x * T.randn(shape):mul(6):exp() end
  if layout == "cl" then x = x:channels_last(dt) else x = x:to(dt) end
  return x, x:cuda()
end

-- ---------------------------------------------------------------- copies and casts
local SHAPES = {{2, 8, 4, 4}, {3, 5, 7, 9}, {2, 40, 33, 3}, {1, 64, 32, 32}, {4, 3, 6}}
for _, sh in ipairs(SHAPES) do
  local tag = table.concat(sh, "x")
  local xc, xg = pair(sh, "float32", "nchw", "big")
  same("f32 nchw -> bf16 channels-last " .. tag, xg:channels_last("bf16"), xc:channels_last("bf16"), EXACT)
  same("f32 nchw -> f32 channels-last " .. tag, xg:channels_last(), xc:channels_last(), EXACT)
  local bc, bg = xc:channels_last("bf16"), xg:channels_last("bf16")
  same("bf16 channels-last -> f32 nchw " .. tag, bg:float(), bc:float(), EXACT)
  same("bf16 channels-last -> bf16 nchw " .. tag, bg:contiguous(), bc:contiguous(), EXACT)
  same("bf16 nchw -> bf16 channels-last " .. tag, bg:contiguous():channels_last(), bc:contiguous():channels_last(), EXACT)
  same("f32 channels-last -> bf16 channels-last (flat) " .. tag, xg:channels_last():channels_last("bf16"),
    xc:channels_last():channels_last("bf16"), EXACT)
  same("bf16 channels-last -> f32 channels-last (flat) " .. tag, bg:channels_last("float32"), bc:channels_last("float32"), EXACT)
  same("bf16 channels-last -> f64 " .. tag, bg:double(), bc:double(), EXACT)
  same("f64 -> bf16 " .. tag, xg:double():bfloat16(), xc:double():bfloat16(), EXACT)
  same("narrow along C of channels-last, contiguous " .. tag, bg:narrow(2, 2, sh[2] - 2):contiguous(),
    bc:narrow(2, 2, sh[2] - 2):contiguous(), EXACT)
  same("cat along C of channels-last bf16 " .. tag, T.cat({bg, bg:narrow(2, 1, 3)}, 2), T.cat({bc, bc:narrow(2, 1, 3)}, 2), EXACT)
  same("cat along C of channels-last bf16, 8-wide rows when C % 8 == 0 " .. tag, T.cat({bg, bg * 2}, 2),
    T.cat({bc, bc * 2}, 2), EXACT)
  same("cat along dim 3 of channels-last bf16 " .. tag, T.cat({bg, bg}, 3), T.cat({bc, bc}, 3), EXACT)
  same("upload / download keep channels-last " .. tag, bg, bc, EXACT)
  same("bf16 channels-last permuted copy " .. tag, bg:transpose(1, 3):contiguous(), bc:transpose(1, 3):contiguous(), EXACT)
end
do
  local v = T.from_table({0 / 0, 1 / 0, -1 / 0, 1e-40, -1e-45, 3.4e38, 1 + 2 ^ -8, 1 + 3 * 2 ^ -8}, {8})
  same("specials f32 -> bf16 (NaN, inf, denormals, overflow, ties)", v:cuda():bfloat16(), v:bfloat16(), EXACT)
  local i = T.from_table({3, 257, -2, 1000001}, {4}, "int64")
  same("int64 -> bf16", i:cuda():bfloat16(), i:bfloat16(), EXACT)
  local w = T.from_table({1.5, -2.7, 1000.6, 3.2e5, -0.4}, {5}):bfloat16()
  same("bf16 -> int64 (truncates)", w:cuda():long(), w:long(), EXACT)
  local u = T.from_table({7, 255, 0}, {3}, "uint8")
  same("uint8 -> bf16 -> uint8", u:cuda():bfloat16():byte(), u:bfloat16():byte(), EXACT)
  -- flat conversions: unaligned starts and tails of n % 8
  local r = T.randn(1037)
  for _, off in ipairs({0, 1, 3, 8}) do
    same("flat f32 -> bf16, offset " .. off, r:cuda():narrow(1, off + 1, 1037 - off):bfloat16(),
      r:narrow(1, off + 1, 1037 - off):bfloat16(), EXACT)
    local rb = r:bfloat16()
    same("flat bf16 -> f32, offset " .. off, rb:cuda():narrow(1, off + 1, 1037 - off):float(),
      rb:narrow(1, off + 1, 1037 - off):float(), EXACT)
  end
  -- fill
  same("fill_ bf16", T.zeros({5, 7}, "bfloat16"):cuda():fill_(0.1), T.zeros({5, 7}, "bfloat16"):fill_(0.1), EXACT)
  local zc = T.zeros({2, 6, 3, 3}):channels_last("bf16")
  local zg = zc:cuda()
  zc:narrow(2, 2, 3):fill_(-1.7); zg:narrow(2, 2, 3):fill_(-1.7)
  same("fill_ of a narrow of channels-last bf16", zg, zc, EXACT)
  same("zero fill of channels-last bf16", zg:clone():channels_last():fill_(0), zc:clone():channels_last():fill_(0), EXACT)
end

-- ---------------------------------------------------------------- binary
local binops = {
  {"add", function(a, b) return a + b end}, {"sub", function(a, b) return a - b end},
  {"mul", function(a, b) return a * b end}, {"div", function(a, b) return a / b end, "p"},
  {"pow", function(a, b) return a:pow(b) end, "p", TRANS}, {"maximum", function(a, b) return a:maximum(b) end},
  {"minimum", function(a, b) return a:minimum(b) end}, {"gt", function(a, b) return a:gt(b) end},
  {"eq", function(a, b) return a:eq(b) end},
}
local BSH = {{2, 16, 4, 4}, {3, 5, 7, 9}, {2, 24, 5, 1}}
for _, op in ipairs(binops) do
  for _, sh in ipairs(BSH) do
    local tag = op[1] .. " " .. table.concat(sh, "x")
    local tol = op[4] or EXACT
    local ac, ag = pair(sh, "bfloat16", "cl", op[3])
    local bc, bg = pair(sh, "bfloat16", "cl", op[3])
    same(tag .. " bf16 cl . bf16 cl", op[2](ag, bg), op[2](ac, bc), tol)
    local fc, fg = pair(sh, "float32", "cl", op[3])
    same(tag .. " bf16 cl . f32 cl -> f32", op[2](ag, fg), op[2](ac, fc), tol)
    local nc, ng = pair(sh, "bfloat16", "nchw", op[3])
    same(tag .. " bf16 cl . bf16 nchw (strided)", op[2](ag, ng), op[2](ac, nc), tol)
    local ec, eg = pair({sh[1], sh[2], 1, 1}, "bfloat16", "nchw", op[3])
    same(tag .. " bf16 cl . (N,C,1,1) bf16", op[2](ag, eg), op[2](ac, ec), tol)
    same(tag .. " (N,C,1,1) bf16 . bf16 cl", op[2](eg, ag), op[2](ec, ac), tol)
    local fnc, fng = pair(sh, "float32", "nchw", op[3])
    local fec, feg = pair({sh[1], sh[2], 1, 1}, "float32", "nchw", op[3])
    same(tag .. " f32 nchw . (N,C,1,1) f32", op[2](fng, feg), op[2](fnc, fec), tol)
    local cc, cg = pair({1, sh[2], 1, 1}, "float32", "nchw", op[3])
    same(tag .. " bf16 cl . (1,C,1,1) f32 -> f32", op[2](ag, cg), op[2](ac, cc), tol)
    same(tag .. " bf16 cl . scalar 0.3", op[2](ag, op[3] and 1.3 or 0.3), op[2](ac, op[3] and 1.3 or 0.3), tol)
  end
end
do
  -- flat path: unaligned views and tails
  local a, b = T.randn(2077):bfloat16(), T.randn(2077):bfloat16()
  for _, off in ipairs({0, 1, 5, 8}) do
    local n = 2077 - off
    same("flat bf16 add, offset " .. off, a:cuda():narrow(1, off + 1, n) + b:cuda():narrow(1, 1, n),
      a:narrow(1, off + 1, n) + b:narrow(1, 1, n), EXACT)
    same("flat bf16 * f32 -> f32, offset " .. off, a:cuda():narrow(1, off + 1, n) * b:float():cuda():narrow(1, 1, n),
      a:narrow(1, off + 1, n) * b:float():narrow(1, 1, n), EXACT)
  end
  same("2 - bf16 (scalar first)", 2 - a:cuda(), 2 - a, EXACT)
  -- in-place accumulation through the tape's add (acc += g)
  local x = T.randn(2, 8, 3, 3):channels_last("bf16")
  same("bf16 add of one element", (x:cuda():narrow(1, 1, 1):narrow(2, 1, 1):narrow(3, 1, 1):narrow(4, 1, 1) + 1),
    (x:narrow(1, 1, 1):narrow(2, 1, 1):narrow(3, 1, 1):narrow(4, 1, 1) + 1), EXACT)
end

-- ---------------------------------------------------------------- unary, affine, clamp
local unops = {
  {"neg", function(a) return -a end, EXACT}, {"abs", function(a) return a:abs() end, EXACT},
  {"square", function(a) return a:square() end, EXACT}, {"sqrt", function(a) return a:sqrt() end, EXACT, "p"},
  {"exp", function(a) return a:exp() end, TRANS}, {"log", function(a) return a:log() end, TRANS, "p"},
  {"tanh", function(a) return a:tanh() end, TRANS}, {"sigmoid", function(a) return a:sigmoid() end, TRANS},
  {"silu", function(a) return a:silu() end, TRANS}, {"sin", function(a) return a:sin() end, TRANS},
  {"affine", function(a) return a:affine(0.7, -0.2) end, EXACT}, {"clamp", function(a) return a:clamp(-0.5, 0.8) end, EXACT},
  {"floor", function(a) return (a * 4):floor() end, EXACT},
}
for _, op in ipairs(unops) do
  for _, sh in ipairs({{2, 16, 4, 4}, {3, 5, 7, 9}}) do
    local tag = op[1] .. " " .. table.concat(sh, "x")
    local ac, ag = pair(sh, "bfloat16", "cl", op[4])
    same(tag .. " bf16 cl", op[2](ag), op[2](ac), op[3])
    same(tag .. " bf16 transposed view", op[2](ag:transpose(2, 4)), op[2](ac:transpose(2, 4)), op[3])
  end
end

-- ---------------------------------------------------------------- reductions
for _, sh in ipairs({{4, 32, 8, 8}, {3, 5, 7, 9}}) do
  local tag = table.concat(sh, "x")
  local ac, ag = pair(sh, "bfloat16", "cl")
  same("sum all bf16 cl " .. tag, ag:sum(), ac:sum(), SUMS)
  for d = 1, 4 do same(("sum dim %d bf16 cl %s"):format(d, tag), ag:sum(d, true), ac:sum(d, true), SUMS) end
  same("max dim 2 bf16 cl " .. tag, (ag:max(2)), (ac:max(2)), EXACT)
  same("mean dim 4 bf16 cl " .. tag, ag:mean(4), ac:mean(4), SUMS)
  same("logsumexp dim 2 " .. tag, ag:logsumexp(2), ac:logsumexp(2), 1e-6)
end
do   -- a long reduced dim (block-per-output schedule) and bias-like sums over (N,H,W)
  local ac, ag = pair({2, 4096}, "bfloat16", "nchw")
  same("sum of 4096 bf16 (block schedule)", ag:sum(2), ac:sum(2), SUMS)
  local bc, bg = pair({8, 64, 16, 16}, "bfloat16", "cl")
  same("bias grad sum over N,H,W of bf16 cl", bg:sum(1, true):sum(3, true):sum(4, true),
    bc:sum(1, true):sum(3, true):sum(4, true), SUMS)
end

-- ---------------------------------------------------------------- gradients
do
  local function chain(x, y, e)
    local h = x:channels_last("bf16")
    local k = T.cat({h * y, (h + e):silu()}, 2)
    return (k:narrow(2, 3, 6):reshape(2, 6, 20):float() * T.arange(240):reshape(2, 6, 20):to(x:device())):sum()
  end
  local x0, y0, e0 = T.randn(2, 4, 4, 5), T.randn(2, 4, 4, 5):channels_last("bf16"), T.randn(2, 4, 1, 1):bfloat16()
  local ins = {{x0:detach(), y0:detach(), e0:detach()}, {x0:cuda(), y0:cuda(), e0:cuda()}}
  for _, set in ipairs(ins) do for _, t in ipairs(set) do t.requires_grad = true end end
  chain(table.unpack(ins[1])):backward()
  chain(table.unpack(ins[2])):backward()
  local names = {"x (f32 nchw)", "y (bf16 cl)", "e (bf16 N,C,1,1)"}
  for i = 1, 3 do
    local gc, gg = ins[1][i].grad, ins[2][i].grad
    if not gg then H.check("grad " .. names[i], false, "no gpu grad")
    else same("grad " .. names[i], gg, gc, GRAD) end
  end
end

-- worst errors
table.sort(worst, function(a, b) return a[2] / math.max(a[3], 1e-30) > b[2] / math.max(b[3], 1e-30) end)
print("# largest errors (relative to tolerance; tolerance 0 = bit for bit):")
for i = 1, math.min(6, #worst) do print(("#   %-64s err %.2e tol %.0e"):format(worst[i][1], worst[i][2], worst[i][3])) end

-- ---------------------------------------------------------------- timings
if QUICK or FAKE or os.getenv("IDDPM_BENCH") == "0" then H.done() return end
local wall = iddpm.cuda.wall_time
local function time_once(fn, iters)
  fn(); iddpm.cuda.synchronize()
  local t0 = wall()
  for _ = 1, iters do fn() end
  iddpm.cuda.synchronize()
  return (wall() - t0) / iters
end
local function time_it(fn, iters) return math.min(time_once(fn, iters), time_once(fn, iters)) end
print("# timings (ms, GB/s = bytes read + written / time), batch 256:")
print("#   C x HxW     | f32 nchw->bf16 cl | bf16 cl->f32 nchw | bf16 cl->bf16 nchw | bf16 cl+bf16 cl | f32 nchw+f32 nchw | bf16 cl + (N,C,1,1) bf16")
local B = 256
for _, C in ipairs({128, 256, 384, 512}) do
  for _, S in ipairs({32, 16, 8, 4}) do
    local n = B * C * S * S
    local x = T.randn({B, C, S, S}, nil, "float32", "cuda")
    local xb = x:channels_last("bf16")
    local yb = (x * 0.5):channels_last("bf16")
    local e = T.randn({B, C, 1, 1}, nil, "float32", "cuda"):bfloat16()
    local iters = n > 2e7 and 10 or 40
    local t1 = time_it(function() return x:channels_last("bf16") end, iters)
    local t2 = time_it(function() return xb:float() end, iters)
    local t3 = time_it(function() return xb:contiguous() end, iters)
    local t4 = time_it(function() return xb + yb end, iters)
    local y = x * 0.5
    local t5 = time_it(function() return x + y end, iters)
    local t6 = time_it(function() return xb + e end, iters)
    local function f(t, bytes) return ("%7.3f %5.0f"):format(t * 1e3, bytes * n / t / 1e9) end
    print(("#   %3d x %2dx%-2d  | %s     | %s     | %s      | %s   | %s     | %s"):format(C, S, S, f(t1, 6), f(t2, 6),
      f(t3, 4), f(t4, 6), f(t5, 12), f(t6, 4)))
    x, xb, yb, y, e = nil, nil, nil, nil, nil
    collectgarbage()
  end
end
H.done()
