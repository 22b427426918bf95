-- test_tensor.lua — the Lua tensor API against naive Lua loops: creation,
-- broadcasting arithmetic, unary math, reductions along every dim, matmul, views,
-- concat, index_select, random streams, errors, memory. Seed printed below.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local SEED = 1234
print("# seed " .. SEED)
T.manual_seed(SEED)

local F32 = 1e-6      -- float32 results of exact float64 math: a few ulps
local F32_SUM = 1e-5  -- float32 results of sums/products over tens of terms

-- helpers: naive row-major index math
local function strides(shape)
  local st, s = {}, 1
  for i = #shape, 1, -1 do st[i] = s; s = s * shape[i] end
  return st
end
local function unflat(i, shape) -- 0-based flat -> 1-based multi-index
  local idx = {}
  for d = #shape, 1, -1 do idx[d] = i % shape[d] + 1; i = i // shape[d] end
  return idx
end
local function numel(shape) local n = 1 for _, s in ipairs(shape) do n = n * s end return n end

-- creation
local x = T.from_table({1, 2, 3, 4, 5, 6}, {2, 3})
H.check("from_table shape", table.concat(x:shape(), ",") == "2,3")
H.check("totable round trip", table.concat(x:totable(), ",") == "1.0,2.0,3.0,4.0,5.0,6.0" or
  table.concat(x:totable(), ",") == "1,2,3,4,5,6", table.concat(x:totable(), ","))
H.check("zeros/ones/full", T.zeros(2, 2):sum():item() == 0 and T.ones({2, 3}):sum():item() == 6 and
  T.full({2}, 2.5):sum():item() == 5)
H.check("dtypes", T.zeros(2, "float64"):dtype() == "float64" and T.zeros(2, "int64"):dtype() == "int64" and
  T.zeros(2, "uint8"):dtype() == "uint8")
H.check("arange", table.concat(T.arange(4):totable(), ",") == "0,1,2,3")

-- broadcasting binary ops vs naive loops
local function check_broadcast(sa, sb, op, name, fn)
  local a, b = T.randn(sa), T.randn(sb)
  if name == "div" then b = b:abs() + 0.5 end
  local r = op(a, b)
  local rs = r:shape()
  local at, bt, want = a:totable(), b:totable(), {}
  local sta, stb = strides(sa), strides(sb)
  for i = 0, numel(rs) - 1 do
    local idx = unflat(i, rs)
    local ia, ib = 0, 0
    for d = 1, #sa do local k = idx[d + #rs - #sa]; ia = ia + (sa[d] == 1 and 0 or (k - 1) * sta[d]) end
    for d = 1, #sb do local k = idx[d + #rs - #sb]; ib = ib + (sb[d] == 1 and 0 or (k - 1) * stb[d]) end
    want[i + 1] = fn(at[ia + 1], bt[ib + 1])
  end
  H.close(("%s broadcast %s %s"):format(name, table.concat(sa, "x"), table.concat(sb, "x")), r, want, F32)
end
local ops = {
  {"add", function(a, b) return a + b end, function(a, b) return a + b end},
  {"sub", function(a, b) return a - b end, function(a, b) return a - b end},
  {"mul", function(a, b) return a * b end, function(a, b) return a * b end},
  {"div", function(a, b) return a / b end, function(a, b) return a / b end},
  {"maximum", function(a, b) return a:maximum(b) end, math.max},
}
for _, o in ipairs(ops) do
  check_broadcast({2, 3, 4}, {2, 3, 4}, o[2], o[1], o[3])
  check_broadcast({2, 3, 4}, {3, 1}, o[2], o[1], o[3])
  check_broadcast({4}, {2, 1, 4}, o[2], o[1], o[3])
end
-- strided (non-contiguous) operands
do
  local a = T.randn(3, 4)
  local at = a:transpose(1, 2)         -- (4,3) view
  local r = at + T.ones(4, 3)
  local want = {}
  local av = a:totable()
  for i = 1, 4 do for j = 1, 3 do want[#want + 1] = av[(j - 1) * 4 + i] + 1 end end
  H.close("add on a transposed view", r, want, F32)
  local n = a:narrow(2, 2, 2)          -- columns 2..3
  local wantn = {}
  for i = 1, 3 do for j = 2, 3 do wantn[#wantn + 1] = av[(i - 1) * 4 + j] * 2 end end
  H.close("mul on a narrowed view", n * 2, wantn, F32)
end
-- scalars on either side
H.close("scalar ops", (2 - T.from_table({1, 2}) * 3) / 2, {-0.5, -2}, F32)

-- unary vs math
local u = T.rand({64}) * 4 - 2
local up = u:abs() + 0.1
local un = {
  {"exp", u, math.exp}, {"tanh", u, function(v) return (math.exp(v) - math.exp(-v)) / (math.exp(v) + math.exp(-v)) end},
  {"sigmoid", u, function(v) return 1 / (1 + math.exp(-v)) end}, {"silu", u, function(v) return v / (1 + math.exp(-v)) end},
  {"abs", u, math.abs}, {"sin", u, math.sin}, {"cos", u, math.cos}, {"log", up, math.log},
  {"sqrt", up, math.sqrt}, {"rsqrt", up, function(v) return 1 / math.sqrt(v) end}, {"neg", u, function(v) return -v end},
  {"square", u, function(v) return v * v end},
}
for _, c in ipairs(un) do
  local want = {}
  for i, v in ipairs(c[2]:totable()) do want[i] = c[3](v) end
  H.close("unary " .. c[1], c[2][c[1]](c[2]), want, F32, 1e-3)
end
H.close("clamp", T.from_table({-2, 0.5, 3}):clamp(-1, 1), {-1, 0.5, 1}, 0)

-- reductions along every dim vs naive
do
  local shape = {3, 4, 5}
  local a = T.randn(shape, "float64")
  local av = a:totable()
  for d = 1, 3 do
    local rs = {table.unpack(shape)}; rs[d] = 1
    local sums, maxs, cnt = {}, {}, shape[d]
    for i = 0, numel(shape) - 1 do
      local idx = unflat(i, shape); idx[d] = 1
      local j = 0
      local st = strides(rs)
      for k = 1, 3 do j = j + (idx[k] - 1) * st[k] end
      sums[j + 1] = (sums[j + 1] or 0) + av[i + 1]
      maxs[j + 1] = math.max(maxs[j + 1] or -math.huge, av[i + 1])
    end
    local means, lse = {}, {}
    for i, s in ipairs(sums) do means[i] = s / cnt end
    H.close("sum dim " .. d, a:sum(d), sums, 1e-12)
    H.close("mean dim " .. d, a:mean(d), means, 1e-12)
    H.close("max dim " .. d, (a:max(d)), maxs, 0)
    H.check("keepdim dim " .. d, #a:sum(d, true):shape() == 3 and a:sum(d, true):size(d) == 1)
  end
  H.close("sum all", a:sum(), {(function() local s = 0 for _, v in ipairs(av) do s = s + v end return s end)()}, 1e-12)
  local v = T.from_table({1, 2, 3, 4}, {4}, "float64")
  H.close("var unbiased", v:var(), {5 / 3}, 1e-12)
  H.close("var biased", v:var(1, false, false), {1.25}, 1e-12)
  H.close("logsumexp", v:logsumexp(1), {math.log(math.exp(1) + math.exp(2) + math.exp(3) + math.exp(4))}, 1e-12)
  H.close("softmax sums to 1", T.randn(3, 7):softmax(2):sum(2), {1, 1, 1}, F32_SUM)
  local _, idx = T.from_table({3, 9, 1, 9.5}, {2, 2}):max(2)
  H.check("max returns 1-based indices", table.concat(idx:totable(), ",") == "2,2")
end

-- matmul vs naive (plain, batched, broadcast batch)
local function naive_mm(a, b, M, K, N)
  local c = {}
  for i = 1, M do for j = 1, N do
    local s = 0
    for k = 1, K do s = s + a[(i - 1) * K + k] * b[(k - 1) * N + j] end
    c[(i - 1) * N + j] = s
  end end
  return c
end
do
  local a, b = T.randn(5, 7), T.randn(7, 3)
  H.close("matmul", a:matmul(b), naive_mm(a:totable(), b:totable(), 5, 7, 3), F32_SUM, 1e-3)
  local A, B = T.randn(2, 4, 6), T.randn(6, 5)
  local C = A:matmul(B)
  local ok = true
  for i = 1, 2 do
    local Ai = A:narrow(1, i, 1):reshape(4, 6)
    local r = H.max_rel(C:narrow(1, i, 1):reshape(4, 5), naive_mm(Ai:totable(), B:totable(), 4, 6, 5), 1e-3)
    ok = ok and r < F32_SUM
  end
  H.check("batched matmul with a shared right matrix", ok)
  H.raises("matmul shape error names both shapes", function() return T.randn(2, 3):matmul(T.randn(4, 5)) end,
    "inner dims differ: a (2,3) vs b (4,5)")
end

-- views and copies
do
  local a = T.from_table({1, 2, 3, 4, 5, 6}, {2, 3})
  H.check("reshape -1", table.concat(a:reshape(3, -1):shape(), ",") == "3,2")
  H.close("permute", a:permute(2, 1):contiguous(), {1, 4, 2, 5, 3, 6}, 0)
  H.close("narrow", a:narrow(2, 2, 2):contiguous(), {2, 3, 5, 6}, 0)
  H.check("expand", a:narrow(1, 1, 1):expand(4, 3):sum():item() == 24)
  local c = T.cat({a, a * 10}, 1)
  H.check("cat dim 1", table.concat(c:shape(), ",") == "4,3" and c:get(3, 1) == 10)
  local c2 = T.cat({a, a}, 2)
  H.check("cat dim 2", table.concat(c2:shape(), ",") == "2,6" and c2:get(2, 4) == 4)
  local sel = T.arange(10, "float32"):index_select(1, T.from_table({0, 9, 3}, {3}, "int64"))
  H.close("index_select", sel, {0, 9, 3}, 0)
  local v = a:narrow(1, 2, 1)
  v:fill_(0)
  H.check("narrow is a view (fill_ writes through)", a:sum():item() == 6)
  H.check("dtype casts", a:double():dtype() == "float64" and a:long():dtype() == "int64" and (a:byte() + 0):dtype() == "uint8")
end

-- random: determinism, independence of draw shape, moments
do
  local g1, g2 = T.generator(7), T.generator(7)
  local a, b = T.randn({1000}, g1), T.randn({1000}, g2)
  H.close("same seed same numbers", a, b, 0)
  local big = T.randn({100000}, T.generator(3))
  H.check("randn mean ~ 0", math.abs(big:mean():item()) < 0.02, big:mean():item())   -- 4.5 sigma of 1/sqrt(1e5)
  H.check("randn var ~ 1", math.abs(big:var():item() - 1) < 0.02, big:var():item())
  local un2 = T.rand({100000}, T.generator(4))
  H.check("rand in [0,1), mean ~ 0.5", un2:min():item() >= 0 and un2:max():item() < 1 and math.abs(un2:mean():item() - 0.5) < 0.01)
  local ri = T.randint(0, 10, {1000}, T.generator(5))
  H.check("randint range", ri:min():item() >= 0 and ri:max():item() <= 9 and ri:dtype() == "int64")
  -- counter-based: first 4 of a 6-draw equal a 4-draw from a fresh generator
  local c6, c4 = T.randn({6}, T.generator(11)), T.randn({4}, T.generator(11))
  H.close("draw does not depend on size", c6:narrow(1, 1, 4), c4, 0)
end

-- errors name the op and shapes; nothing crashes
H.raises("broadcast error", function() return T.randn(2, 3) + T.randn(4) end, "add: shapes (2,3) and (4) do not broadcast")
H.raises("reshape error", function() return T.randn(2, 3):reshape(4, 2) end, "reshape: cannot reshape (2,3)")
H.raises("narrow error", function() return T.randn(2, 3):narrow(2, 3, 2) end, "narrow: positions 3..4 out of bounds for dim 2 of (2,3)")
H.raises("dim 0 is refused", function() return T.randn(2, 3):sum(0) end, "1-based")
H.raises("bad dim (numbered from 1, as given)", function() return T.randn(2, 3):sum(5) end, "dim 5 out of range")
H.raises("item of many", function() return T.randn(2, 3):item() end, "item: tensor of shape (2,3)")
H.raises("index out of range", function() return T.randn(3):index_select(1, T.from_table({3}, {1}, "int64")) end,
  "index_select: index 3 out of range")
H.raises("cat mismatch", function() return T.cat({T.randn(2, 3), T.randn(2, 4)}, 1) end, "concat: tensor 2 has shape (2,4)")
H.raises("not a tensor", function() return T.randn(2):matmul(3) end, "iddpm.Tensor expected")
H.raises("freed tensor", function() local t = T.randn(2); t:free(); return t + 1 end, "freed")

-- memory: unreachable tensors are freed without an explicit collectgarbage
do
  local base = T.live_bytes()
  for _ = 1, 200 do local _ = T.zeros(1024, 1024) end   -- 4 MiB each, 800 MiB total
  H.check("memory is reclaimed under pressure", T.live_bytes() - base < 300 * 1024 * 1024,
    ("%d MiB live"):format((T.live_bytes() - base) // 1048576))
  do local t <close> = T.zeros(1024, 1024) end
  H.check("<close> frees", T.live_bytes() - base < 300 * 1024 * 1024)
end
-- a script that requires a sub-module first gets this binary's engine, never a second
-- copy from ./iddpm.so (two engines in one process would not share their state)
do
  local ok = os.execute([[./iddpm -e "require 'iddpm.recipe'; for l in io.lines('/proc/self/maps') do ]] ..
    [[if l:find('iddpm%.so') then os.exit(3) end end" 2>/dev/null]])
  H.check("require 'iddpm.recipe' first does not load iddpm.so", ok == true)
end

-- strided copies coalesce the dims they can (a C-narrow of NCHW copies C*H*W runs):
-- UNet-sized skip concats and a permuted copy against element-wise loops, large
-- enough for the threaded path; exact (a copy changes no value)
do
  local a, b = T.randn({3, 5, 6, 7}), T.randn({3, 2, 6, 7})
  local c = T.cat({a, b}, 2)
  local at, bt, ct = a:totable(), b:totable(), c:totable()
  local bad = 0
  for n = 0, 2 do for ch = 0, 6 do for i = 0, 41 do
    local want = ch < 5 and at[(n * 5 + ch) * 42 + i + 1] or bt[(n * 2 + ch - 5) * 42 + i + 1]
    if ct[(n * 7 + ch) * 42 + i + 1] ~= want then bad = bad + 1 end
  end end end
  H.check("cat of NCHW along C, element by element", bad == 0, bad .. " elements differ")
  local big = T.randn({4, 64, 16, 16})
  local halves = T.cat({big:narrow(2, 33, 32), big:narrow(2, 1, 32)}, 2)
  local back = T.cat({halves:narrow(2, 33, 32), halves:narrow(2, 1, 32)}, 2)
  H.check("cat of channel halves, threaded, round trip", (back - big):abs():max():item() == 0)
  local p = T.randn({2, 3, 4, 5})
  local q = p:permute(1, 3, 2, 4):contiguous()
  local pt, qt = p:totable(), q:totable()
  bad = 0
  for n = 0, 1 do for h = 0, 3 do for ch = 0, 2 do for w = 0, 4 do
    if qt[((n * 4 + h) * 3 + ch) * 5 + w + 1] ~= pt[((n * 3 + ch) * 4 + h) * 5 + w + 1] then bad = bad + 1 end
  end end end end
  H.check("permute (1,3,2,4) then contiguous, element by element", bad == 0, bad .. " elements differ")
end
H.done()
