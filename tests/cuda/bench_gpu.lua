-- bench_gpu.lua — GPU throughput of the CIFAR-10 recipe (the issue 9 targets):
--   training: one full step (q_sample, UNet forward, hybrid loss, backward, AdamW,
--   EMA), batch 128, img/s; only the loss value comes back to the host;
--   sampling: one p_sample step (UNet forward + p_mean_variance + p_sample),
--   batch 256, images x steps / s; and the device memory the allocator holds.
-- ./iddpm run tests/cuda/bench_gpu.lua [iters]   (IDDPM_PRECISION=fp32|tf32|bf16 picks
-- the arithmetic of convs/matmuls/attention, IDDPM_CUDA_CONV=im2col the old conv;
-- SMALL=1 shrinks the model for a smoke test; OPS=1 adds per-op conv timings, cuDNN
-- and im2col, in the current precision; PART=train or PART=sample runs only that part,
-- e.g. under IDDPM_CUDA_PROFILE=1 for a per-op table of one of them)
local PART = os.getenv("PART")
local iddpm = require "iddpm"
local T = iddpm.tensor
if not iddpm.cuda.available() then print("# no GPU: " .. tostring(iddpm.cuda.reason())); return end
local ITERS = tonumber(({...})[1]) or 10
local SMALL = os.getenv("SMALL") == "1"
local UNet = iddpm.nn.UNet or require("iddpm.nn.unet").UNet
local wall, sync = iddpm.cuda.wall_time, iddpm.cuda.synchronize
print(("# device: %s, precision %s, conv %s"):format(iddpm.cuda.device_name(), iddpm.cuda.precision(),
  iddpm.cuda.conv_impl()))

local cfg = {image_size = 32, num_channels = 128, num_res_blocks = 3, learn_sigma = true, dropout = 0.3,
  attention_resolutions = {16, 8}, num_heads = 4}
local TB, SB = 128, 256
if SMALL then cfg.num_channels, cfg.num_res_blocks, cfg.channel_mult, TB, SB = 32, 1, {1, 2}, 4, 4 end
local diff = iddpm.diffusion.new{steps = 4000, noise_schedule = "cosine", learn_sigma = true}
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
  opt:step()
  ema:update()
  return loss
end
local function time_it(fn, n)
  fn(); fn(); sync()
  iddpm.cuda.profile_reset()   -- IDDPM_CUDA_PROFILE=1: count the timed calls only (cuDNN's search is in the warm-up)
  local t0 = wall()
  local last
  for _ = 1, n do last = fn() end
  local v = last and last.item and last:item()   -- the one host round trip: the loss for logging
  sync()
  return (wall() - t0) / n, v
end
model:train(true)
if PART ~= "sample" then
  local s, loss = time_it(train_step, ITERS)
  print(("# bench train step (hybrid loss + AdamW + EMA) batch %d: %.1f ms/step, %.0f img/s, loss %.4f"):format(TB,
    s * 1e3, TB / s, loss or 0/0))
  local used, cached = iddpm.cuda.memory()
  print(("# bench memory after training: %.0f MiB in use + %.0f MiB cached = %.0f MiB reserved (the peak)"):format(used / 2^20,
    cached / 2^20, (used + cached) / 2^20))
end

model:train(false)
if PART ~= "train" then
  local x = T.randn({SB, 3, 32, 32}, nil, "float32", "cuda")
  local ss = time_it(function()
    T.no_grad(function() diff:p_sample(model, x, 500, {generator = gen}) end)
  end, ITERS)
  print(("# bench sample p_sample step batch %d: %.1f ms, %.0f images x steps/s"):format(SB, ss * 1e3, SB / ss))
  local sf = time_it(function() T.no_grad(function() model:forward(x, T.full({SB}, 500):cuda()) end) end, ITERS)
  print(("# bench sample forward only batch %d: %.1f ms, %.0f images x steps/s"):format(SB, sf * 1e3, SB / sf))
  -- host cost: how long queuing one forward takes, against the forward (CUDA graphs
  -- would only remove the former, and only matter when it is close to the latter)
  local tt = T.full({SB}, 500):cuda()
  sync()
  local h0 = wall()
  T.no_grad(function() model:forward(x, tt) end)
  local enq = wall() - h0
  sync()
  print(("# bench sample forward batch %d: host queues it in %.1f ms, the GPU finishes at %.1f ms"):format(SB,
    enq * 1e3, (wall() - h0) * 1e3))
  local used, cached = iddpm.cuda.memory()
  print(("# bench memory after sampling: %.0f MiB in use + %.0f MiB cached = %.0f MiB reserved"):format(used / 2^20,
    cached / 2^20, (used + cached) / 2^20))
end

-- per-op conv timings at CIFAR-10 sizes (batch 128): forward, and forward + backward
-- (dx, dw, db), for cuDNN and im2col, minimum over 3 rounds of ITERS calls each
if os.getenv("OPS") == "1" and not SMALL then
  local ops = {
    {"conv3x3 128->128 @32x32", {128, 128, 32, 32}, {128, 128, 3, 3}, 1},
    {"conv3x3 256->256 @16x16", {128, 256, 16, 16}, {256, 256, 3, 3}, 1},
    {"conv3x3 256->256 @8x8", {128, 256, 8, 8}, {256, 256, 3, 3}, 1},
    {"conv3x3 384->256 @16x16", {128, 384, 16, 16}, {256, 384, 3, 3}, 1},
    {"conv1x1 384->256 @16x16", {128, 384, 16, 16}, {256, 384, 1, 1}, 0},
  }
  local function best(fn)
    local m = math.huge
    for _ = 1, 3 do m = math.min(m, (time_it(fn, ITERS))) end
    return m
  end
  for _, o in ipairs(ops) do
    local x = T.randn(o[2], nil, "float32", "cuda")
    local w = T.randn(o[3], nil, "float32", "cuda")
    local b = T.randn({o[3][1]}, nil, "float32", "cuda")
    x.requires_grad, w.requires_grad, b.requires_grad = true, true, true
    local line = ("# op %-26s"):format(o[1])
    for _, impl in ipairs({"cudnn", "im2col"}) do
      iddpm.cuda.conv_impl(impl)
      local f = best(function() T.no_grad(function() T.conv2d(x, w, b, 1, o[4]) end) end)
      local g
      local fb = best(function()
        local y = T.conv2d(x, w, b, 1, o[4])
        g = g or T.randn(y:shape(), nil, "float32", "cuda")
        y:backward(g)
      end)
      line = line .. ("  %s fwd %6.3f fwd+bwd %6.3f ms"):format(impl, f * 1e3, fb * 1e3)
    end
    iddpm.cuda.conv_impl("cudnn")
    print(line)
  end
end
