-- test_graph.lua — CUDA graphs (engine/cuda/graph.cu, iddpm.cuda.graph_capture,
-- D.graphed in lua/iddpm/diffusion.lua): a captured graph replays to the same bits as
-- the eager ops, for several new inputs; ops that cannot be recorded (host waits,
-- uploads, downloads) fail naming the op and leave the stream usable; the blocks of a
-- graph are never handed to tensors outside it; the UNet forward and the sampling loop
-- give identical results with and without graphs (fp32 and bf16).
--   ./iddpm run tests/cuda/test_graph.lua
-- With IDDPM_FAKE_CUDA=1 (the CPU serves "cuda") the graph part is skipped with the
-- reason, and the wrappers are checked to fall back to the eager calls.
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local D = iddpm.diffusion
local cu = iddpm.cuda

if not cu.available() then
  print("# no GPU: " .. tostring(cu.reason()))
  H.raises("graph_capture without a GPU says so", function() cu.graph_capture(function() end) end, "graph_capture:")
  print("ok - skipped: CUDA backend not available")
  H.done()
  return
end
print("# device: " .. (cu.device_name() ~= "" and cu.device_name() or "the CPU backend (IDDPM_FAKE_CUDA=1)"))
local SEED = 4242
T.manual_seed(SEED)
print("# seed " .. SEED)
local START_PRECISION = cu.precision()
local GRAPHS, why = cu.graph_supported()

-- the largest |a - b| (0 = same values; NaN anywhere = inf)
local function maxdiff(a, b)
  local d = (a:cpu():double() - b:cpu():double()):abs():max():item()
  return d ~= d and math.huge or d
end
local function same(name, a, b)
  local d = maxdiff(a, b)
  return H.check(("%s (max diff %.3g, want 0)"):format(name, d), d == 0)
end

local UNet = iddpm.nn.UNet or require("iddpm.nn.unet").UNet
local function small_unet(extra)
  local cfg = {image_size = 16, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2}, learn_sigma = true,
    dropout = 0.3, attention_resolutions = {8}, num_heads = 4}
  for k, v in pairs(extra or {}) do cfg[k] = v end
  local m = UNet.new(cfg):to("cuda")
  m:train(false)
  return m
end
local B = 4
local function batch(i) return T.randn({B, 3, 16, 16}, T.generator(SEED, i), "float32", "cuda") end
local function times(i) local t = {} for k = 1, B do t[k] = (37 * i + 101 * k) % 1000 end return T.from_table(t, {B}):cuda() end

-- ---------------------------------------------------------------- eager fallbacks (every backend)
do
  local m = small_unet()
  local gm = D.graphed(m)
  H.check("D.graphed returns one wrapper per model", D.graphed(m) == gm)
  for i = 1, 4 do
    local x, t = batch(i), times(i)
    local want = T.no_grad(function() return m(x, t) end):clone()
    local got = T.no_grad(function() return gm(x, t) end)
    same(("graphed UNet call %d = eager"):format(i), got, want)
  end
  local info = D.graph_info(m)
  local n, state = 0, nil
  for _, e in pairs(info) do n = n + 1; state = e.state end
  if GRAPHS then H.check("one shape, replayed as a graph", n == 1 and state == "graph", state)
  else H.check("no graph where graphs are not supported (" .. tostring(why) .. ")", n == 0) end
  m:train(true)
  local before = D.graph_info(m)
  T.no_grad(function() return gm(batch(9), times(9)) end)
  local k0, e0 = next(before)
  H.check("training mode: the model is called, not the graph", not k0 or D.graph_info(m)[k0].calls == e0.calls)
end

if not GRAPHS then
  print("# skip: CUDA graph capture and replay: " .. tostring(why))
  H.raises("graph_capture says why it cannot run", function() cu.graph_capture(function() end) end,
    "graph_capture: CUDA graphs need the GPU")
  H.check("not capturing", not cu.capturing())
  H.check("no memory held for graphs", cu.graph_memory() == 0)
  H.done()
  return
end

-- ---------------------------------------------------------------- capture and replay
cu.precision("fp32")
local N = 4099
local x = T.randn({N}, nil, "float32", "cuda")
local g, y = cu.graph_capture(function() return ((x * 2 + 1):exp() - x):sqrt() end)
H.check("graph_capture returns a graph and fn's result", tostring(g) == "cuda graph" and T.is_tensor(y), tostring(g))
for i = 1, 3 do
  x:copy_(T.randn({N}, T.generator(SEED + 1, i), "float32", "cuda"))
  g:replay()
  same(("raw graph replay %d = eager ops"):format(i), y, ((x * 2 + 1):exp() - x):sqrt())
end

-- ops that cannot be recorded: a Lua error naming the op; the stream stays usable
local function usable(name)
  local a = T.randn({257}, T.generator(SEED, 77))
  same(name .. ": the stream is usable after the aborted capture", (a:cuda() * 3 + 1):cpu(), a * 3 + 1)
  H.check(name .. ": capture ended", not cu.capturing())
end
H.raises("item() inside a capture", function() cu.graph_capture(function() return x:sum():item() end, 0) end,
  "graph_capture: download cannot run inside a CUDA graph capture")
usable("item()")
H.raises("upload inside a capture", function() cu.graph_capture(function() return T.ones(4):cuda() + x:narrow(1, 1, 4) end, 0) end,
  "graph_capture: upload cannot run inside a CUDA graph capture")
usable("upload")
H.raises("synchronize inside a capture", function() cu.graph_capture(function() cu.synchronize() end, 0) end,
  "graph_capture: synchronize cannot run inside a CUDA graph capture")
usable("synchronize")
H.raises("captures do not nest", function()
  cu.graph_capture(function() return cu.graph_capture(function() return x * 2 end, 0) end, 0)
end, "captures do not nest")
usable("nested")
H.raises("an error in fn aborts the capture", function() cu.graph_capture(function() error("boom") end, 0) end, "boom")
usable("error")
same("the first graph still replays after the failed captures", (function() g:replay(); return y end)(),
  ((x * 2 + 1):exp() - x):sqrt())

-- the graph's blocks (freed intermediates included) are not handed out after the capture
do
  local g2, out = cu.graph_capture(function()
    local a = x * 3
    local b = a + 1
    a:free()
    local c = b * b
    b:free()
    local d = c - 2
    c:free()
    return d
  end)
  local others = {}
  for i = 1, 12 do others[i] = x * 0 + i end   -- tensors of the same size, allocated after the capture
  x:copy_(T.randn({N}, T.generator(SEED + 2, 0), "float32", "cuda"))
  g2:replay()
  local ok = true
  for i = 1, 12 do
    if maxdiff(others[i], T.full({N}, i)) ~= 0 then ok = false end
  end
  H.check("tensors allocated after a capture are untouched by its replays", ok)
  same("the replay with freed intermediates", out, (x * 3 + 1) * (x * 3 + 1) - 2)
  g2:free()
  H.raises("replay after free", function() g2:replay() end, "freed")
end

-- a graph collected during another capture is destroyed after it (no wait inside)
do
  local g3 = cu.graph_capture(function() return x + 7 end)
  H.check("made a graph to drop", g3 ~= nil)
  g3 = nil   -- luacheck: ignore
  local g4, out = cu.graph_capture(function() collectgarbage(); collectgarbage(); return x * 5 end, 0)
  g4:replay()
  same("capture with a graph collected during it", out, x * 5)
  g4:free()
end

-- ---------------------------------------------------------------- the UNet forward and the sampler
local function unet_case(prec)
  if cu.precision(prec) ~= prec then print("# precision " .. prec .. " not in this build: skipped"); return end
  local m = small_unet()
  local gm = D.graphed(m)
  local ref = {}
  for i = 1, 5 do ref[i] = T.no_grad(function() return m(batch(i), times(i)) end):clone() end
  for i = 1, 5 do
    local got = T.no_grad(function() return gm(batch(i), times(i)) end)
    same(("%s UNet forward, call %d (%s): graph = eager"):format(prec, i, i == 1 and "warm-up" or i == 2 and "capture"
      or "replay"), got, ref[i])
  end
  local k, e = next(D.graph_info(m))
  H.check(prec .. " UNet: replayed as a graph", e and e.state == "graph", e and (e.reason or e.state))
  print("# key " .. tostring(k))
  -- the sampling loop (p_sample and DDIM), graph on and off, same noise
  local diff = D.new{steps = 1000, noise_schedule = "cosine", learn_sigma = true, timestep_respacing = "6"}
  for _, loop in ipairs({"p_sample_loop", "ddim_sample_loop"}) do
    local res = {}
    for _, gr in ipairs({false, true}) do
      local xT = T.randn({B, 3, 16, 16}, T.generator(SEED, 100), "float32", "cuda")
      res[gr] = diff[loop](diff, m, {B, 3, 16, 16}, {noise = xT, generator = T.generator(SEED, 101), graph = gr, eta = 0.5})
    end
    same(("%s %s: graph=true = graph=false"):format(prec, loop), res[true], res[false])
  end
  local held = cu.graph_memory()
  D.graph_free(m)
  H.check(prec .. " D.graph_free gives the graph's memory back", cu.graph_memory() < held,
    ("%d -> %d bytes"):format(held, cu.graph_memory()))
  H.check(prec .. " D.graph_free: no graph left for the model", next(D.graph_info(m)) == nil)
  -- a class-conditional UNet checks its labels on the host: no graph, the same results
  local mc = small_unet({num_classes = 3})
  local gmc = D.graphed(mc)
  local yl = T.from_table({0, 1, 2, 1}, {B}, "int64"):cuda()
  for i = 1, 3 do
    same(("%s class-conditional call %d: wrapper = eager"):format(prec, i),
      T.no_grad(function() return gmc(batch(i), times(i), yl) end),
      T.no_grad(function() return mc(batch(i), times(i), yl) end))
  end
  local _, ec = next(D.graph_info(mc))
  H.check(prec .. " class-conditional: falls back to eager, with the reason", ec and ec.state == "eager"
    and tostring(ec.reason):find("graph_capture:", 1, true) ~= nil, ec and ec.reason)
  print("# fallback reason: " .. tostring(ec and ec.reason))
end
unet_case("fp32")
unet_case("bf16")

H.check("not capturing at the end", not cu.capturing())
H.check("live graphs hold memory", cu.graph_memory() > 0, cu.graph_memory())
g:free()
collectgarbage(); collectgarbage()
H.check("every graph freed or collected: no memory held for graphs", cu.graph_memory() == 0, cu.graph_memory())
cu.precision(START_PRECISION)
H.done()
