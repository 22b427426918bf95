-- test_autograd.lua — every differentiable tensor op against central differences in
-- float64 (T.gradcheck), plus the tape's behaviour: accumulation, no_grad, detach,
-- zero_grad, shared inputs, a second backward. Seed printed below.
local H = require "harness"
local T = require("iddpm").tensor
local SEED = 42
print("# seed " .. SEED)
T.manual_seed(SEED)

-- float64 central differences with eps 1e-6 are accurate to ~1e-8 on smooth functions;
-- 1e-6 leaves room for the curvature of exp/pow without hiding a wrong formula.
local GRAD_TOL = 1e-6

local function x64(...) local t = T.randn({...}, "float64"); t.requires_grad = true; return t end
local function pos64(...) local t = (T.rand({...}, "float64") + 0.5); t.requires_grad = true; return t end

local cases = {
  {"add broadcast", function(a, b) return a + b end, {x64(2, 3), x64(3)}},
  {"sub broadcast", function(a, b) return a - b end, {x64(2, 1, 4), x64(3, 1)}},
  {"mul broadcast", function(a, b) return a * b end, {x64(2, 3), x64(2, 1)}},
  {"div", function(a, b) return a / b end, {x64(2, 3), pos64(2, 3)}},
  {"pow", function(a, b) return a:pow(b) end, {pos64(4), x64(4)}},
  {"maximum", function(a, b) return a:maximum(b) end, {x64(5), x64(5)}},
  {"scalar ops", function(a) return (2 - a) * 3 / 4 + 1 end, {x64(3)}},
  {"neg", function(a) return -a end, {x64(4)}},
  {"exp", function(a) return a:exp() end, {x64(4)}},
  {"log", function(a) return a:log() end, {pos64(4)}},
  {"sqrt", function(a) return a:sqrt() end, {pos64(4)}},
  {"rsqrt", function(a) return a:rsqrt() end, {pos64(4)}},
  {"tanh", function(a) return a:tanh() end, {x64(4)}},
  {"sigmoid", function(a) return a:sigmoid() end, {x64(4)}},
  {"silu", function(a) return a:silu() end, {x64(4)}},
  {"abs", function(a) return a:abs() end, {pos64(4)}},
  {"square", function(a) return a:square() end, {x64(4)}},
  {"sin", function(a) return a:sin() end, {x64(4)}},
  {"cos", function(a) return a:cos() end, {x64(4)}},
  {"reciprocal", function(a) return a:reciprocal() end, {pos64(4)}},
  {"clamp", function(a) return a:clamp(-0.5, 0.5) end, {x64(6)}},
  {"affine", function(a) return a:affine(3, -1) end, {x64(6)}},
  {"sum all", function(a) return a:sum() end, {x64(3, 4)}},
  {"sum dim", function(a) return a:sum(2) end, {x64(3, 4, 2)}},
  {"mean dim keepdim", function(a) return a:mean(1, true) end, {x64(3, 4)}},
  {"max dim", function(a) return (a:max(2)) end, {x64(3, 5)}},
  {"min all", function(a) return a:min() end, {x64(7)}},
  {"var dim", function(a) return a:var(2) end, {x64(3, 5)}},
  {"logsumexp", function(a) return a:logsumexp(2) end, {x64(3, 5)}},
  {"softmax", function(a) return a:softmax(2) end, {x64(3, 5)}},
  {"mean_flat", function(a) return a:mean_flat() end, {x64(2, 3, 4)}},
  {"matmul", function(a, b) return a:matmul(b) end, {x64(3, 4), x64(4, 2)}},
  {"batched matmul, shared b", function(a, b) return a:matmul(b) end, {x64(2, 3, 4), x64(4, 5)}},
  {"batched matmul, broadcast a", function(a, b) return a:matmul(b) end, {x64(3, 4), x64(2, 4, 5)}},
  {"reshape", function(a) return a:reshape(6, 2) * T.arange(12, "float64"):reshape(6, 2) end, {x64(3, 4)}},
  {"narrow", function(a) return a:narrow(2, 2, 2) end, {x64(3, 4)}},
  {"permute", function(a) return a:permute(3, 1, 2) end, {x64(2, 3, 4)}},
  {"transpose + contiguous", function(a) return a:transpose(1, 2):contiguous() end, {x64(2, 3)}},
  {"expand", function(a) return a:expand(4, 3) end, {x64(1, 3)}},
  {"cat", function(a, b) return T.cat({a, b}, 2) end, {x64(2, 3), x64(2, 2)}},
  {"index_select (repeated index)", function(a) return a:index_select(1, T.from_table({2, 0, 2}, {3}, "int64")) end, {x64(4, 2)}},
  {"where", function(a, b) return T.where(a:gt(0), a, b) end, {x64(6), x64(6)}},
  {"cast float64->float32->float64", function(a) return (a:float() * 2):double() end, {x64(4)}},
}
for _, c in ipairs(cases) do
  local tol, eps = GRAD_TOL, 1e-6
  -- the float32 round trip keeps ~7 digits: a 1e-2 step on a linear map gives ~1e-5
  if c[1]:find("float32") then tol, eps = 1e-4, 1e-2 end
  local worst = H.gradcheck(c[2], c[3], eps)
  H.check("gradcheck " .. c[1], worst <= tol, ("worst rel err %.3g > %.3g"):format(worst, tol))
end

-- tape behaviour
do
  local x = x64(3)
  local y = (x * x):sum()
  y:backward()
  local g1 = x.grad:totable()
  ;(x * 3):sum():backward()
  local g2 = x.grad:totable()
  local xs = x:totable()
  H.close("gradients accumulate across backward calls", g2, {2 * xs[1] + 3, 2 * xs[2] + 3, 2 * xs[3] + 3}, 1e-12)
  H.close("first gradient", g1, {2 * xs[1], 2 * xs[2], 2 * xs[3]}, 1e-12)
  x:zero_grad()
  H.check("zero_grad clears", x.grad == nil)
  local z = T.no_grad(function() return x * 2 end)
  H.check("no_grad records nothing", not z.requires_grad)
  local d = x:detach()
  H.check("detach cuts the graph", not d.requires_grad and (d * 2).grad_fn == nil)
  local a = x * 2
  local b = (a + a * a):sum()   -- a used twice
  b:backward()
  H.close("shared intermediate", x.grad, {2 + 8 * xs[1], 2 + 8 * xs[2], 2 + 8 * xs[3]}, 1e-12)
  H.raises("second backward through a consumed graph", function() b:backward() end, "no backward")
  H.raises("backward on a non-scalar needs a gradient", function() (x * 2):backward() end, "1-element")
  H.raises("backward without requires_grad", function() T.ones(2):sum():backward() end, "does not require grad")
  H.raises("requires_grad on ints", function() local t = T.zeros(2, "int64"); t.requires_grad = true end, "only float")
  local w = T.ones(2); w.requires_grad = true
  local ok = pcall(T.no_grad, function() error("boom") end)
  H.check("no_grad restores the mode after an error", not ok and (w * 2).requires_grad)
end

-- a node's incoming gradient may alias another tensor (the same g handed to both
-- inputs of an add, a reshaped view): a later gradient must be added out of place, so
-- the aliased tensor keeps its value. Each case against its closed form (exact in
-- float64 up to rounding: 1e-12).
do
  local x = x64(4)
  local xs = x:totable()
  local h = x * 2
  local y = h + h                                 -- dh = 2 dy, both halves alias dy
  local u = h:reshape(2, 2):reshape(4) * 3        -- a third path into h through views
  ;((y * y):sum() + (u + y):sum()):backward()
  -- L = sum (4x)^2 + sum 6x + sum 4x  -> dL/dx = 32x + 10
  local want = {}
  for i = 1, 4 do want[i] = 32 * xs[i] + 10 end
  H.close("aliased node gradients: add of a tensor to itself plus a view path", x.grad, want, 1e-12)
  local a = x64(3)
  local as = a:totable()
  local r = a * 1
  local s = r + r:reshape(3)                      -- residual-style: both inputs are r
  local t = (s + r):sum() + (r * r):sum()         -- r's gradient: 1+1+1 from adds, 2r
  t:backward()
  local w2 = {}
  for i = 1, 3 do w2[i] = 3 + 2 * as[i] end
  H.close("aliased node gradients: residual adds accumulate", a.grad, w2, 1e-12)
  -- z = p + q hands one g to p and q; the tape reaches the add first, then p*p (a
  -- second gradient for p), then q*1.5: adding p's second gradient in place would
  -- change q's (the same tensor) before q's backward reads it
  local v = x64(3)
  local vs = v:totable()
  local p, q = v * 2, v * 3
  local z = p + q
  ;((q * 1.5):sum() + (p * p):sum() + (z * z):sum()):backward()
  -- L = 4.5 sum v + 4 sum v^2 + 25 sum v^2  -> dL/dv = 4.5 + 58v
  local w3 = {}
  for i = 1, 3 do w3[i] = 4.5 + 58 * vs[i] end
  H.close("aliased node gradients: a sibling's gradient is not changed", v.grad, w3, 1e-12)
end

-- backward releases each node's inputs once the node is done: the activations go even
-- while the loss (which holds the graph) is still referenced
do
  collectgarbage(); collectgarbage()
  local w = T.randn({256, 256}); w.requires_grad = true
  local base = T.live_bytes()
  local function chain()
    local h = T.randn({64, 256})
    for _ = 1, 8 do h = (h:matmul(w)):tanh() end   -- 16 activations of 64 KiB
    return h:sum()
  end
  local loss = chain()
  collectgarbage(); collectgarbage()                 -- only the graph holds them now
  local before = T.live_bytes() - base
  loss:backward()
  collectgarbage(); collectgarbage()
  local after = T.live_bytes() - base
  -- left: w.grad (256 KiB) and the scalar loss
  H.check("backward frees the activations while the loss is alive", after <= 256 * 1024 + 4096,
    ("live bytes over the start: %d before backward, %d after"):format(before, after))
  H.raises("the consumed graph still refuses a second backward", function() loss:backward() end, "no backward")
end

-- gradients handed over without a copy (a gradient that reaches a tensor once) must not
-- leak: repeated steps leave the live tensor bytes where they were
do
  local w = T.randn({64, 64}); w.requires_grad = true
  local x = T.randn({8, 64})
  local function step()
    w:zero_grad()
    local h = (x:matmul(w) * 2 + 1):tanh()
    h:sum():backward()
  end
  step(); collectgarbage(); collectgarbage()
  local before = T.live_bytes()
  for _ = 1, 20 do step() end
  collectgarbage(); collectgarbage()
  H.check("backward leaks no tensor memory over 20 steps", T.live_bytes() <= before,
    ("live bytes %d -> %d"):format(before, T.live_bytes()))
end
H.done()
