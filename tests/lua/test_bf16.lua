-- test_bf16.lua — bfloat16 and channels-last through the generic tensor machinery on
-- the CPU (the reference the GPU tests compare with): conversions bit-exact against a
-- Lua round-to-nearest-even (ties, NaN, inf, denormals, overflow), dtype promotion,
-- layout-preserving outputs, reshape views of channels-last tensors, gradients in the
-- tensor's dtype and layout (channels_last / float / bfloat16 / contiguous / cat /
-- narrow / reductions), float64 gradchecks of the layout ops. Seed printed below.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local SEED = 4321
print("# seed " .. SEED)
T.manual_seed(SEED)

local function f32bits(v) return (string.unpack("<I4", string.pack("<f", v))) end
local function bits2f32(u) return (string.unpack("<f", string.pack("<I4", u))) end
-- the reference: include/iddpm/bf16.h written again in Lua integers
local function ref_bf16(v)
  local u = f32bits(v)
  if (u & 0x7fffffff) > 0x7f800000 then return (u >> 16) | 0x40 end
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffffffff
  return u >> 16
end
local function bf16bits(v) return f32bits(v) >> 16 end   -- v holds a bf16 value exactly
local function seq(t) return table.concat(t, ",") end

-- ---------------------------------------------------------------- conversions
do
  local vals = {0.0, -0.0, 1.0, -1.0, 1 + 2^-8, 1 + 3 * 2^-8, 1 + 2^-8 + 2^-20, -(1 + 2^-8), 1 + 2^-9,
    3.140625, 65504.0, 3.3895313892515355e38, bits2f32(0x7f7fffff), -bits2f32(0x7f7fffff), 1 / 0, -1 / 0,
    bits2f32(0x00000001), bits2f32(0x00008000), bits2f32(0x00018000), bits2f32(0x007fffff), -bits2f32(0x00400001),
    bits2f32(0x0080ffff), 1e-45, 0.1, -0.3, 123456.789}
  local x = T.from_table(vals, {#vals})
  local got = x:bfloat16():float():totable()
  local bad = {}
  for i, v in ipairs(vals) do
    local want = ref_bf16(x:totable()[i])
    if bf16bits(got[i]) ~= want then bad[#bad + 1] = ("%d: %a -> %04x want %04x"):format(i, v, bf16bits(got[i]), want) end
  end
  H.check("bf16 rounding: ties to even, inf, overflow, denormals (" .. #vals .. " values)", #bad == 0, seq(bad))
  -- NaN (quiet, payload top kept)
  local nan = T.from_table({0 / 0, bits2f32(0x7f800001), bits2f32(0xffc01234)}, {3}):bfloat16():float():totable()
  local nb = {}
  for i = 1, 3 do nb[i] = bf16bits(nan[i]) end
  H.check("bf16 NaN stays NaN (quiet)", nan[1] ~= nan[1] and nan[2] ~= nan[2] and nan[3] ~= nan[3] and
    nb[2] == 0x7fc0 and nb[3] == 0xffc0, ("%04x %04x %04x"):format(nb[1], nb[2], nb[3]))
  -- random values across magnitudes, bit for bit
  local r = (T.randn(4096) * T.randn(4096):mul(8):exp()):float()
  local rv, rb = r:totable(), r:bfloat16():float():totable()
  local nbad = 0
  for i = 1, #rv do if bf16bits(rb[i]) ~= ref_bf16(rv[i]) then nbad = nbad + 1 end end
  H.check("bf16 rounding of 4096 random floats (1e-7..1e7) is round-to-nearest-even", nbad == 0, nbad .. " differ")
  -- float64 -> bf16 rounds through float32 (as the GPU's cu_store)
  local d = T.from_table({1 + 2^-8 + 2^-30}, {1}, "float64")
  H.check("float64 -> bf16 goes through float32", d:bfloat16():float():item() == bits2f32(ref_bf16(1 + 2^-8) << 16))
  H.check("bf16 -> float32 -> bf16 is the identity", seq(r:bfloat16():float():bfloat16():float():totable()) == seq(rb))
  -- other dtypes
  H.check("int64 / uint8 -> bf16", seq(T.from_table({3, 257, -2}, {3}, "int64"):bfloat16():double():totable()) == "3.0,256.0,-2.0"
    and seq(T.from_table({7, 255}, {2}, "uint8"):bfloat16():long():totable()) == "7,255")
  local f = T.full({3}, 0.1, "bfloat16")
  H.check("full / fill in bf16 rounds", f:dtype() == "bfloat16" and f:float():totable()[3] == bits2f32(ref_bf16(0.1) << 16))
end

-- ---------------------------------------------------------------- promotion
do
  local b = T.randn(2, 3):bfloat16()
  local f, d, l = T.randn(2, 3), T.randn(2, 3):double(), T.from_table({1, 2, 3}, {3}, "int64")
  H.check("bf16 + bf16 is bf16", (b + b):dtype() == "bfloat16", (b + b):dtype())
  H.check("bf16 * f32 and f32 - bf16 are f32", (b * f):dtype() == "float32" and (f - b):dtype() == "float32")
  H.check("bf16 / f64 is f64", (b / d):dtype() == "float64")
  H.check("bf16 + int64 is bf16", (b + l):dtype() == "bfloat16")
  H.check("bf16 with a scalar stays bf16", (b * 0.1):dtype() == "bfloat16" and (2 - b):dtype() == "bfloat16" and
    (b:pow(2)):dtype() == "bfloat16" and b:maximum(0):dtype() == "bfloat16")
  H.check("bf16 comparisons give bf16 0/1", b:gt(0):dtype() == "bfloat16")
  H.check("unary / affine / clamp keep bf16", b:exp():dtype() == "bfloat16" and b:silu():dtype() == "bfloat16" and
    b:affine(2, 1):dtype() == "bfloat16" and b:clamp(-1, 1):dtype() == "bfloat16" and b:neg():dtype() == "bfloat16")
  -- the scalar is held in f32: bf16 * 0.1 == bf16(bf16 as f32 * 0.1)
  local want = (b:float() * 0.1):bfloat16()
  H.check("bf16 * 0.1 rounds once from the f32 product", seq((b * 0.1):float():totable()) == seq(want:float():totable()))
  -- + - * / of bf16 operands: the f32 result rounded (one rounding)
  local b2 = T.randn(2, 3):bfloat16()
  local ok = true
  for _, op in ipairs({"add", "sub", "mul", "div"}) do
    ok = ok and seq(b[op](b, b2):float():totable()) == seq(b:float()[op](b:float(), b2:float()):bfloat16():float():totable())
  end
  H.check("bf16 + - * / equal f32 math rounded to bf16", ok)
  H.check("cat promotes: bf16,bf16 -> bf16; bf16,f32 -> f32",
    T.cat({b, b2}, 1):dtype() == "bfloat16" and T.cat({b, f}, 1):dtype() == "float32")
  H.check("reductions of bf16 return f32", b:sum():dtype() == "float32" and b:sum(2):dtype() == "float32" and
    b:mean(1):dtype() == "float32" and b:max():dtype() == "float32" and b:logsumexp(2):dtype() == "float32")
  H.close("sum of bf16 accumulates exactly", b:sum(2), b:float():sum(2), 1e-6)
  H.check("where of bf16 is bf16", T.where(b:gt(0), b, b2):dtype() == "bfloat16")
  H.close("where of bf16 values", T.where(b:gt(0), b, b2):float(), T.where(b:float():gt(0), b:float(), b2:float()), 0)
end

-- ---------------------------------------------------------------- channels-last layout
local function cl_of(shape, dt) return T.randn(shape):channels_last(dt) end
do
  local x = T.randn(2, 3, 4, 5)
  local c = x:channels_last()
  H.check("channels_last strides (HWC,1,WC,C)", seq(c:stride()) == "60,1,15,3" and c:is_channels_last() and
    not c:is_contiguous(), seq(c:stride()))
  H.check("channels_last keeps values", seq(c:totable()) == seq(x:totable()))
  H.check("channels_last of a channels-last tensor is itself", c:channels_last():is_channels_last())
  local c3 = T.randn(2, 3, 7):channels_last()
  H.check("3-d channels_last strides (LC,1,C)", seq(c3:stride()) == "21,1,3")
  local cb = x:channels_last("bf16")
  H.check("channels_last(bf16) converts", cb:dtype() == "bfloat16" and cb:is_channels_last() and
    seq(cb:float():totable()) == seq(x:bfloat16():float():totable()))
  local ct = c:contiguous()
  H.check("contiguous() of channels-last is NCHW contiguous", ct:is_contiguous() and seq(ct:totable()) == seq(x:totable()))
  H.check(":float() of bf16 channels-last is contiguous f32", cb:float():is_contiguous() and cb:float():dtype() == "float32")
  -- outputs keep the layout
  local bias = T.randn(1, 3, 1, 1)
  local e = T.randn(2, 3, 1, 1):bfloat16()
  local outs = {
    {"add", c + c}, {"add bias", c + bias}, {"bias + x", bias + c}, {"bf16 + emb (N,C,1,1)", cb + e},
    {"scalar", cb * 2}, {"exp", c:exp()}, {"silu bf16", cb:silu()}, {"affine", c:affine(2, 1)},
    {"clamp", cb:clamp(-0.5, 0.5)}, {"gt", cb:gt(0)}, {"where", T.where(c:gt(0), c, c:neg())}}
  for _, o in ipairs(outs) do H.check("channels-last out: " .. o[1], o[2]:is_channels_last()) end
  local xc = x:contiguous()
  H.close("channels-last add values", c + bias, xc + bias, 0)
  H.close("channels-last bf16 + emb values", (cb + e):float(), (x:bfloat16() + e):float(), 0)
  H.check("contiguous operands stay contiguous", (xc + bias):is_contiguous())
  -- cat along C (and along H) of channels-last inputs
  local a, b = cl_of({2, 3, 4, 5}, "bf16"), cl_of({2, 2, 4, 5}, "bf16")
  local k = T.cat({a, b}, 2)
  H.check("cat along C of channels-last is channels-last", k:is_channels_last() and k:dtype() == "bfloat16")
  H.check("cat along C values", seq(k:float():totable()) == seq(T.cat({a:float(), b:float()}, 2):totable()))
  local kh = T.cat({a, a}, 3)
  H.check("cat along H of channels-last is channels-last", kh:is_channels_last() and
    seq(kh:float():totable()) == seq(T.cat({a:float(), a:float()}, 3):totable()))
  H.check("cat of mixed layouts is contiguous", T.cat({a, b:contiguous()}, 2):is_contiguous())
end

-- ---------------------------------------------------------------- reshape views
do
  local x = T.randn(2, 3, 4, 5)
  local c = x:channels_last()
  local v = c:reshape(2, 3, 20)
  H.check("channels-last (N,C,H,W) -> (N,C,HW) is a view with strides (HWC,1,C)", seq(v:stride()) == "60,1,3",
    seq(v:stride()))
  H.check("the view reads the same values", seq(v:totable()) == seq(x:reshape(2, 3, 20):totable()))
  local v4 = c:reshape(2, 3, 20, 1)
  H.check("(N,C,H,W) -> (N,C,HW,1) is a view", v4:stride()[1] == 60 and v4:stride()[2] == 1 and v4:stride()[3] == 3)
  local back = v:reshape(2, 3, 4, 5)
  H.check("(N,C,HW) -> (N,C,H,W) back is channels-last", back:is_channels_last() and seq(back:stride()) == "60,1,15,3")
  c:fill_(1)   -- a view shares storage
  H.check("reshape view shares storage", v:sum():item() == 120)
  local x2 = T.randn(2, 3, 4, 5)
  local flat = x2:channels_last():reshape(2, 60)
  H.check("(N,C,H,W) -> (N,CHW) of channels-last copies (NCHW order)", flat:is_contiguous() and
    seq(flat:totable()) == seq(x2:reshape(2, 60):totable()))
  local t = T.randn(4, 6):transpose(1, 2)   -- (6,4) strides (1,6)
  local tv = t:reshape(2, 3, 4)
  H.check("split of a transposed dim is a view (strides (3,1,6))", seq(tv:stride()) == "3,1,6")
  H.check("its values", seq(tv:totable()) == seq(t:contiguous():reshape(2, 3, 4):totable()))
  local m = T.randn(3, 4)
  H.check("contiguous reshape keeps contiguous strides", seq(m:reshape(2, 6):stride()) == "6,1" and
    seq(m:reshape(12):stride()) == "1" and seq(m:reshape(1, 3, 1, 4):stride()) == "12,4,4,1")
  H.check("reshape of a narrowed tensor copies when it must", seq(m:narrow(2, 1, 2):reshape(6):totable()) ==
    seq(m:narrow(2, 1, 2):contiguous():reshape(6):totable()))
end

-- ---------------------------------------------------------------- autograd
do
  -- f32 leaf -> channels_last(bf16) -> square -> float -> sum
  local x = T.randn(2, 3, 4, 5)
  x.requires_grad = true
  local y = x:channels_last("bf16")
  ;(y * y):float():sum():backward()
  H.check("grad of a f32 leaf through channels_last(bf16) is f32 contiguous",
    x.grad:dtype() == "float32" and x.grad:is_contiguous())
  H.close("its values are 2*bf16(x)", x.grad, x:detach():bfloat16():float() * 2, 0)
  -- bf16 channels-last leaf
  local xb = cl_of({2, 3, 4, 5}, "bf16")
  xb.requires_grad = true
  local w = T.randn(2, 3, 4, 5)
  ;(xb * w):sum():backward()
  H.check("a bf16 channels-last leaf gets a bf16 channels-last grad", xb.grad:dtype() == "bfloat16" and
    xb.grad:is_channels_last(), xb.grad:dtype())
  H.close("its values are bf16(w)", xb.grad:float(), w:bfloat16():float(), 0)
  -- accumulation keeps dtype/layout, bf16 grad through sum
  xb.grad = nil
  xb:sum():backward()
  xb:float():sum():backward()
  H.check("accumulated grads stay bf16 channels-last", xb.grad:dtype() == "bfloat16" and xb.grad:is_channels_last())
  H.close("accumulated values (1 + 1)", xb.grad:float(), T.full({2, 3, 4, 5}, 2), 0)
  -- through reshape view, narrow, cat, contiguous, unary, affine
  local a = cl_of({2, 4, 3, 3}, "bf16")
  local b = cl_of({2, 2, 3, 3}, "bf16")
  a.requires_grad = true; b.requires_grad = true
  local k = T.cat({a, b}, 2)
  local h = k:narrow(2, 2, 4):silu():reshape(2, 4, 9):affine(3, 0)
  local g = T.randn(2, 4, 9)
  ;(h:float() * g):sum():backward()
  H.check("grads through cat/narrow/silu/reshape: bf16 channels-last", a.grad:dtype() == "bfloat16" and
    a.grad:is_channels_last() and b.grad:dtype() == "bfloat16" and b.grad:is_channels_last())
  -- the same in f32 from the same bf16 values
  local af, bf = a:detach():float(), b:detach():float()
  af.requires_grad = true; bf.requires_grad = true
  local hf = T.cat({af, bf}, 2):narrow(2, 2, 4):silu():reshape(2, 4, 9):affine(3, 0)
  ;(hf * g):sum():backward()
  -- the bf16 backward rounds each of silu's intermediate terms: a few bf16 ulps of the O(1) scale
  H.close("their values vs f32 (err / max(|f32|, 1) <= 2^-5)", a.grad:float(), af.grad, 2 ^ -5, 1)
  H.close("b's values vs f32", b.grad:float(), bf.grad, 2 ^ -5, 1)
  H.check("a's first channel got no gradient", a.grad:narrow(2, 1, 1):abs():sum():item() == 0)
  -- contiguous() of channels-last: grad returns channels-last
  local c = cl_of({2, 3, 2, 2})
  c.requires_grad = true
  c:contiguous():sum():backward()
  H.check("contiguous(): grad back in channels-last", c.grad:is_channels_last() and c.grad:sum():item() == 24)
  -- a bf16 reduction's grad
  local r = T.randn(3, 5):bfloat16()
  r.requires_grad = true
  r:max(2):sum():backward()
  H.check("max over bf16: grad bf16, one per row", r.grad:dtype() == "bfloat16" and r.grad:sum():item() == 3)
  -- index_select of bf16
  local tab = T.randn(4, 2):bfloat16()
  tab.requires_grad = true
  tab:index_select(1, T.from_table({2, 0, 2}, {3}, "int64")):float():sum():backward()
  H.check("index_select of bf16: grad bf16 with repeated rows summed", tab.grad:dtype() == "bfloat16" and
    seq(tab.grad:float():sum(2):totable()) == "2.0,0.0,4.0,0.0")
  -- bf16 root with implicit grad
  local s = T.randn(4):bfloat16()
  s.requires_grad = true
  (s * s):sum():backward()
  H.close("bf16 root of a f32 sum", s.grad:float(), s:detach():float() * 2, 0)
end

-- float64 gradchecks of the layout ops (float64 keeps the finite differences meaningful)
do
  local function x64(...) local t = T.randn({...}, "float64"); t.requires_grad = true; return t end
  local cases = {
    {"channels_last", function(a) return a:channels_last():exp() end, {x64(2, 3, 2, 2)}},
    {"channels_last -> reshape view -> contiguous", function(a)
      return a:channels_last():reshape(2, 3, 4):contiguous() * T.arange(24, "float64"):reshape(2, 3, 4) end,
      {x64(2, 3, 2, 2)}},
    {"cat of channels-last along C", function(a, b)
      return T.cat({a:channels_last(), b:channels_last()}, 2):sin() end, {x64(2, 2, 2, 3), x64(2, 3, 2, 3)}},
    {"channels-last + broadcast bias", function(a, b) return a:channels_last() * b end, {x64(2, 3, 2, 2), x64(1, 3, 1, 1)}},
  }
  for _, c in ipairs(cases) do
    local worst = H.gradcheck(c[2], c[3], 1e-6)
    H.check("gradcheck " .. c[1], worst <= 1e-6, ("worst rel err %.3g"):format(worst))
  end
  -- through bf16 and back: the rounding makes it a step function; f32 central
  -- differences with a step of 2^-4 on values that are multiples of 2^-3 see the identity
  local q = (T.randn(2, 3, 2, 2):mul(8):clamp(-31, 31):floor() / 8):float()   -- |q| < 4: q +- 2^-4 is exact in bf16
  q.requires_grad = true
  local worst = H.gradcheck(function(a) return a:channels_last("bf16"):float() * 3 end, {q}, 2 ^ -4)
  -- the gradient itself passes through bf16 (the bf16 tensor's grad): one bf16 rounding, 2^-8
  H.check("gradcheck f32 -> bf16 channels-last -> f32 on bf16-exact values (tol 2^-8)", worst <= 2 ^ -8,
    ("worst rel err %.3g"):format(worst))
end

H.check("bf16 tensors can require grad", pcall(function() local t = T.randn(2):bfloat16(); t.requires_grad = true end))
H.done()
