-- test_safety.lua — inputs that used to crash the process or silently give wrong
-- numbers now give a clean Lua error (naming the op and the shape) or the right
-- values: bf16 arange/from_table, shape overflow, negative expand, thread counts,
-- deep and cyclic json_encode, NaN/out-of-range casts, cat of many tensors, dropping a
-- long autograd chain, and in-place writes into tensors saved for backward.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local io_ = require "iddpm.io"

-- bf16: 8 significand bits, so integers up to 256 are exact and larger ones round to
-- a relative step of 2^-8
local BF16_REL = 2 ^ -8
do
  local n = 100000
  local t = T.arange(0, n, 1, "bfloat16")
  H.check("arange bf16 numel", t:numel() == n, t:numel())
  local v = t:to("float64"):totable()
  local worst = 0
  for i = 1, n, 997 do worst = math.max(worst, math.abs(v[i] - (i - 1)) / math.max(i - 1, 1)) end
  H.check("arange bf16 values within bf16 rounding", worst <= BF16_REL, worst)
  local s = T.arange(0, 5, 1, "bfloat16"):to("float64"):totable()
  H.check("arange bf16 small exact", s[1] == 0 and s[2] == 1 and s[5] == 4, table.concat(s, ","))
  local f = T.from_table({1, 2, 3, 4.5}, {4}, "bfloat16"):to("float64"):totable()
  H.check("from_table bf16 exact", f[1] == 1 and f[2] == 2 and f[3] == 3 and f[4] == 4.5, table.concat(f, ","))
  local u = T.arange(0, 4, 1, "uint8"):to("float64"):totable()
  H.check("arange uint8", u[4] == 3, table.concat(u, ","))
end

-- shape overflow and absurd sizes
H.raises("zeros 2^62+1 elements", function() return T.zeros({4611686018427387905}) end, "too large")
H.raises("zeros (2^62,4) overflows", function()
  return T.zeros({4611686018427387904, 4}):narrow(1, 1099511627776, 1):sum() end, "(4611686018427387904,4)")
H.raises("zeros 2^50 float32 bytes", function() return T.zeros({2 ^ 25 | 0, 2 ^ 25 | 0}) end, "too large")
H.raises("expand negative size", function() return T.zeros(3, 1):expand(3, -4) end, "negative size -4")
H.raises("reshape overflow", function() return T.zeros(4):reshape(4611686018427387904, 4, 0, -1) end, "reshape")
H.raises("narrow start+length overflow", function() return T.zeros(4):narrow(1, 2, math.maxinteger) end, "out of bounds")
H.raises("arange huge", function() return T.arange(0, 1e300) end, "arange")
H.raises("arange nan", function() return T.arange(0, 0 / 0) end, "arange")

-- threads
H.raises("num_threads 100000", function() return iddpm.num_threads(100000) end, "num_threads: 100000")
H.raises("num_threads 0", function() return iddpm.num_threads(0) end, "must be 1 to")
do
  local before = iddpm.num_threads()
  H.check("num_threads valid", iddpm.num_threads(1) == 1)
  iddpm.num_threads(before)
end

-- json_encode: depth and cycles
do
  local t, c = {}, nil
  c = t
  for _ = 1, 25 do c.a = {}; c = c.a end
  local s = io_.json_encode(t)
  H.check("json_encode 25 deep", select(2, s:gsub("{", "")) == 26, s)
  local d = {}
  c = d
  for _ = 1, 1000 do c.a = {1, {}}; c = c.a[2] end
  H.raises("json_encode 1000 deep", function() return io_.json_encode(d) end, "nested deeper than")
  local cyc = {}
  cyc.x = {cyc}
  H.raises("json_encode cycle", function() return io_.json_encode(cyc) end, "cycle")
  local shared = {1, 2}
  H.check("json_encode shared (not a cycle)", io_.json_encode({a = shared, b = shared}) == '{"a":[1,2],"b":[1,2]}')
end

-- casts: float -> integer truncates toward zero and saturates; NaN is an error
do
  local v = T.from_table({1e30, -1e30, 300.7, -5.5, 2.9}, {5}, "float64")
  local i = v:to("int64"):to("float64"):totable()
  H.check("cast int64 saturates", i[1] >= 9.2e18 and i[2] <= -9.2e18 and i[3] == 300 and i[4] == -5 and i[5] == 2,
    table.concat(i, ","))
  local u = v:to("uint8"):to("float64"):totable()
  H.check("cast uint8 saturates", u[1] == 255 and u[2] == 0 and u[3] == 255 and u[4] == 0 and u[5] == 2,
    table.concat(u, ","))
  local m = v:to("int64")
  H.check("int64 extremes read back exactly", m:totable()[1] == math.maxinteger and m:totable()[2] == math.mininteger
    and m:narrow(1, 1, 1):item() == math.maxinteger, tostring(m:totable()[1]))
  local big = T.from_table({(1 << 53) + 1}, {1}, "int64")
  H.check("int64 above 2^53 exact", big:item() == (1 << 53) + 1 and big:totable()[1] == (1 << 53) + 1)
  H.raises("cast NaN to int64", function() return T.from_table({1, 0 / 0}):to("int64") end, "NaN")
  H.raises("cast NaN to uint8", function() return T.from_table({0 / 0}, {1}, "float64"):to("uint8") end, "NaN")
  H.raises("fill NaN int64", function() return T.zeros(2, "int64"):fill_(0 / 0) end, "NaN")
end

-- cat of more than 8 tensors, with gradients through the grouping
do
  local n = 21
  local list, want = {}, 0
  for k = 1, n do
    list[k] = T.full({1, 2}, k); list[k].requires_grad = true
    want = want + 2 * k * k
  end
  local c = T.cat(list, 1)
  H.check("cat 21 shape", c:size(1) == n and c:size(2) == 2)
  local w = T.arange(1, n + 1, 1, "float32"):reshape(n, 1)
  local loss = (c * w):sum()   -- d loss / d list[k] = k
  H.check("cat 21 value", loss:item() == want, loss:item())
  loss:backward()
  local ok = true
  for k = 1, n do ok = ok and list[k].grad:totable()[1] == k end
  H.check("cat 21 grads", ok)
  local big = {}
  for k = 1, 300 do big[k] = T.full({1}, k) end
  H.check("cat 300 no grad", T.cat(big):sum():item() == 300 * 301 / 2)
end

-- dropping a 300k-op autograd chain (recursively: ~20 MB of C stack) frees it without recursion
do
  local a = T.randn(1); a.requires_grad = true
  local c = a
  for _ = 1, 300000 do c = c * 1.0 end
  c = nil
  collectgarbage(); collectgarbage()
  H.check("300k-op chain dropped", true)
end

-- in-place writes into what backward needs: an error, not a wrong gradient
do
  local x = T.randn(3); x.requires_grad = true
  local y = x * 2
  local z = (y * y):sum()
  y:fill_(1)
  H.raises("backward after fill_ of a saved tensor", function() z:backward() end,
    "modified by an inplace operation: mul input (3) at version 0, now 1")
  local x2 = T.randn(2, 2); x2.requires_grad = true
  local e = x2:exp()
  local l2 = e:sum()
  e:copy_(T.zeros(2, 2))
  H.raises("backward after copy_ into exp's output", function() l2:backward() end, "inplace operation")
  local x3 = T.randn(4); x3.requires_grad = true
  local y3 = x3 * 3
  local l3 = (y3 * y3):sum()
  l3:backward()   -- untouched: fine, and the gradient is 18 x
  H.close("backward without in-place write", x3.grad, (x3 * 18):detach(), 1e-6)
end

H.done()
