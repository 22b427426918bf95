-- bench_gpu.lua — GPU throughput of the CIFAR-10 recipe (the README's GPU targets), per
-- precision (fp32, tf32, bf16 where the build has it):
--   train: one full step (q_sample, UNet forward, hybrid loss, backward, AdamW, EMA),
--   batch 128, img/s; only the loss value comes back to the host, once per window;
--   sample: one p_sample step (UNet forward + p_mean_variance + p_sample) and the UNet
--   forward alone, batch 256, images x steps / s;
-- and the memory of the caching allocator: peak in use and peak reserved during the
-- training steps (the cache emptied and the peaks reset before each precision).
-- Timing: synchronised wall time of `iters` steps after 2 warm-up steps, best of
-- `windows` windows.
--   ./iddpm run tests/cuda/bench_gpu.lua [iters=10] [windows=3] [precisions=fp32,tf32,bf16]
--       [rows=train,sample] [small=1] [graph=1]
-- graph=1 adds the sampling rows with the UNet forward replayed as a CUDA graph
-- (D.graphed: the same kernels, one launch per step; host queue time of a step too).
-- (a bare number as the first argument is iters, as before). Loaded by tests/bench.lua,
-- which passes the same arguments and gets the results table back.
-- IDDPM_CUDA_CONV=im2col picks the old conv; IDDPM_CUDA_PROFILE=1 prints a per-op table
-- of the timed calls; OPS=1 adds per-op conv timings (cuDNN and im2col) at CIFAR sizes.
local iddpm = require "iddpm"
local T = iddpm.tensor
local device = require "iddpm.device"
local args = {...}
if not iddpm.cuda.available() then print("# no GPU: " .. tostring(iddpm.cuda.reason())); return {} end

local o = {iters = 10, windows = 3, precisions = "fp32,tf32,bf16", rows = "train,sample", small = os.getenv("SMALL") == "1",
  graph = false}
for i, a in ipairs(args) do
  local k, v = tostring(a):match("^(%w+)=(.*)$")
  if not k and i == 1 and tonumber(a) then k, v = "iters", a end
  if k == "iters" or k == "windows" then o[k] = tonumber(v)
  elseif k == "precisions" or k == "rows" then o[k] = v
  elseif k == "small" then o.small = v == "1"
  elseif k == "graph" then o.graph = v == "1"
  elseif k then error("bench_gpu: unknown argument " .. a .. " (iters, windows, precisions, rows, small, graph)") end
end
local function has(list, x) return ("," .. list .. ","):find("," .. x .. ",", 1, true) ~= nil end
local wall, sync = iddpm.cuda.wall_time, iddpm.cuda.synchronize
local GiB = 2 ^ 30
print(("# device: %s; conv %s; %d iters x best of %d windows"):format(iddpm.cuda.device_name(),
  iddpm.cuda.conv_impl(), o.iters, o.windows))

local cfg = {image_size = 32, num_channels = 128, num_res_blocks = 3, learn_sigma = true, dropout = 0.3,
  attention_resolutions = {16, 8}, num_heads = 4}
local TB, SB = 128, 256
if o.small then cfg.num_channels, cfg.num_res_blocks, cfg.channel_mult, TB, SB = 32, 1, {1, 2}, 4, 4 end
local diff = iddpm.diffusion.new{steps = 4000, noise_schedule = "cosine", learn_sigma = true}
local UNet = iddpm.nn.UNet or require("iddpm.nn.unet").UNet
local model = UNet.new(cfg):to("cuda")
print(("# model: %.1fM parameters"):format(model:num_params() / 1e6))
local opt = iddpm.optim.adamw(model:parameters(), {lr = 1e-4})
local ema = iddpm.optim.ema(model, 0.9999)

local x0 = (T.rand({TB, 3, 32, 32}, nil, "float32", "cuda") * 2 - 1)
local gen = T.generator(1)
local function train_step()
  local t = {}
  for i = 1, TB do t[i] = math.random(0, 3999) end
  model:zero_grad()
  local l = diff:training_losses(model, x0, t, {generator = gen})
  local loss = l.loss:mean()
  loss:backward()
  local value = loss:detach()
  l, loss = nil, nil
  device.collect()   -- as the trainer does: the graph and the activations it holds go back
  opt:step()
  ema:update()
  return value
end
local function time_it(fn, n)
  fn(); fn(); sync()
  iddpm.cuda.profile_reset()   -- IDDPM_CUDA_PROFILE=1: count the timed calls only (cuDNN's search is in the warm-up)
  local best, v = math.huge, nil
  for _ = 1, o.windows do
    local t0 = wall()
    local last
    for _ = 1, n do last = fn() end
    v = last and last.item and last:item()   -- the one host round trip: the loss for logging
    sync()
    best = math.min(best, (wall() - t0) / n)
  end
  return best, v
end

local results = {device = iddpm.cuda.device_name(), rows = {}}
local function add(r) results.rows[#results.rows + 1] = r end
local xs = T.randn({SB, 3, 32, 32}, nil, "float32", "cuda")
local ts = T.full({SB}, 500):cuda()
for p in o.precisions:gmatch("[%w]+") do
  local got = device.set_precision(p)
  if got ~= p then
    print(("# precision %s: not available in this build (it runs as %s); row skipped"):format(p, got))
  else
    if has(o.rows, "train") then
      model:train(true)
      iddpm.cuda.empty_cache(); iddpm.cuda.reset_peak_memory()
      local s, loss = time_it(train_step, o.iters)
      local _, _, peak_used, peak_res = iddpm.cuda.memory()
      print(("# bench train step %s (hybrid loss + AdamW + EMA) batch %d: %.1f ms/step, %.0f img/s, loss %.4f; "
        .. "peak %.2f GiB in use, %.2f GiB reserved"):format(p, TB, s * 1e3, TB / s, loss or 0 / 0, peak_used / GiB, peak_res / GiB))
      add{row = "train", precision = p, batch = TB, per_s = TB / s, ms = s * 1e3, peak_in_use = peak_used, peak_reserved = peak_res}
    end
    if has(o.rows, "sample") then
      model:train(false)
      iddpm.cuda.reset_peak_memory()
      local ss = time_it(function()
        T.no_grad(function() diff:p_sample(model, xs, 500, {generator = gen}) end)
        device.collect()
      end, o.iters)
      local sf = time_it(function() T.no_grad(function() model:forward(xs, ts) end); device.collect() end, o.iters)
      local _, _, peak_used, peak_res = iddpm.cuda.memory()
      print(("# bench sample %s batch %d: p_sample step %.1f ms, %.0f images x steps/s; forward only %.1f ms, %.0f images x steps/s")
        :format(p, SB, ss * 1e3, SB / ss, sf * 1e3, SB / sf))
      -- host cost: how long queuing one forward takes, against the forward (CUDA graphs
      -- would only remove the former, and only matter when it is close to the latter)
      sync()
      local h0 = wall()
      T.no_grad(function() model:forward(xs, ts) end)
      local enq = wall() - h0
      sync()
      print(("# bench sample forward %s batch %d: the host queues it in %.1f ms, the GPU finishes at %.1f ms"):format(p, SB,
        enq * 1e3, (wall() - h0) * 1e3))
      device.collect()
      local row = {row = "sample", precision = p, batch = SB, per_s = SB / sf, ms = sf * 1e3, p_sample_per_s = SB / ss,
        peak_in_use = peak_used, peak_reserved = peak_res}
      if o.graph then
        -- the same with the forward as a CUDA graph (D.graphed: warm-up, capture, replays)
        local gm = iddpm.diffusion.graphed(model)
        local gs = time_it(function()
          T.no_grad(function() diff:p_sample(gm, xs, 500, {generator = gen}) end)
          device.collect()
        end, o.iters)
        local gf = time_it(function() T.no_grad(function() gm(xs, ts) end) end, o.iters)
        local gmem = iddpm.cuda.graph_memory()
        local k, e = next(iddpm.diffusion.graph_info(model))
        sync()
        local h0 = wall()
        T.no_grad(function() gm(xs, ts) end)
        local genq = wall() - h0
        sync()
        local gdone = wall() - h0
        local same = (T.no_grad(function() return gm(xs, ts) end):clone() - T.no_grad(function() return model:forward(xs, ts) end))
          :abs():max():item()
        print(("# bench sample graph %s batch %d: p_sample step %.1f ms, %.0f images x steps/s; forward only %.1f ms, "
          .. "%.0f images x steps/s (eager %.0f / %.0f); state %s%s; max |graph - eager| %g"):format(p, SB, gs * 1e3, SB / gs,
          gf * 1e3, SB / gf, SB / ss, SB / sf, e and e.state or "none", e and e.reason and (" (" .. e.reason .. ")") or "", same))
        print(("# bench sample graph forward %s batch %d: the host queues it in %.2f ms, the GPU finishes at %.1f ms; "
          .. "graphs hold %.2f GiB"):format(p, SB, genq * 1e3, gdone * 1e3, gmem / GiB))
        row.graph_per_s, row.graph_p_sample_per_s, row.graph_queue_ms, row.graph_bytes = SB / gf, SB / gs, genq * 1e3, gmem
        iddpm.diffusion.graph_free(model)
        device.collect()
      end
      add(row)
    end
  end
end

-- per-op conv timings at CIFAR-10 sizes (batch 128), in the last precision: forward, and
-- forward + backward (dx, dw, db), for cuDNN and im2col, the best window of each
if os.getenv("OPS") == "1" and not o.small then
  local ops = {
    {"conv3x3 128->128 @32x32", {128, 128, 32, 32}, {128, 128, 3, 3}, 1},
    {"conv3x3 256->256 @16x16", {128, 256, 16, 16}, {256, 256, 3, 3}, 1},
    {"conv3x3 256->256 @8x8", {128, 256, 8, 8}, {256, 256, 3, 3}, 1},
    {"conv3x3 384->256 @16x16", {128, 384, 16, 16}, {256, 384, 3, 3}, 1},
    {"conv1x1 384->256 @16x16", {128, 384, 16, 16}, {256, 384, 1, 1}, 0},
  }
  for _, c in ipairs(ops) do
    local x = T.randn(c[2], nil, "float32", "cuda")
    local w = T.randn(c[3], nil, "float32", "cuda")
    local b = T.randn({c[3][1]}, nil, "float32", "cuda")
    x.requires_grad, w.requires_grad, b.requires_grad = true, true, true
    local line = ("# op %-26s"):format(c[1])
    for _, impl in ipairs({"cudnn", "im2col"}) do
      iddpm.cuda.conv_impl(impl)
      local f = time_it(function() T.no_grad(function() T.conv2d(x, w, b, 1, c[4]) end) end, o.iters)
      local g
      local fb = time_it(function()
        local y = T.conv2d(x, w, b, 1, c[4])
        g = g or T.randn(y:shape(), nil, "float32", "cuda")
        y:backward(g)
      end, o.iters)
      line = line .. ("  %s fwd %6.3f fwd+bwd %6.3f ms"):format(impl, f * 1e3, fb * 1e3)
    end
    iddpm.cuda.conv_impl("cudnn")
    print(line)
  end
end
device.set_precision("fp32")
return results
