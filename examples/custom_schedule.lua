-- examples/custom_schedule.lua — a noise schedule of your own, written in Lua: a sigmoid
-- alpha_bar(u) instead of the cosine. Trains a tiny UNet with the hybrid loss on a toy
-- image set (shows the vb term falling) and samples with a respaced 25-step process.
--   iddpm run examples/custom_schedule.lua [steps] [out.png]
local iddpm = require "iddpm"
local T, nn, D = iddpm.tensor, iddpm.nn, iddpm.diffusion

local steps = tonumber(arg and arg[1]) or 300
local out = arg and arg[2] or "custom_schedule.png"

-- alpha_bar(u), u in [0, 1]: a sigmoid from ~1 down to ~0, normalised to alpha_bar(0) = 1
local function sigmoid(z) return 1 / (1 + math.exp(-z)) end
local function alpha_bar(u)
  local lo, hi = sigmoid(-6), sigmoid(6)
  return (sigmoid(6 - 12 * u) - lo) / (hi - lo) * 0.9999 + 1e-6
end
local cfg = {image_size = 16, in_channels = 1, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
             attention_resolutions = {8}, num_heads = 2, learn_sigma = true, seed = 0}
local unet = nn.unet(cfg)
-- noise_schedule: "linear", "cosine", a function alpha_bar(u) or a table of betas. In a
-- training recipe the same key takes the function, and the checkpoint stores the betas,
-- so `iddpm sample` needs no copy of this script.
local diff = D.new{noise_schedule = alpha_bar, steps = 200, learn_sigma = true}
-- timesteps are 0-based: diff:beta(t), diff:alpha_bar(t) for t = 0 .. T-1
print(("sigmoid schedule: beta(0) = %.3g, beta(99) = %.3g, beta(199) = %.3g; alpha_bar(99) = %.3g"):format(
  diff:beta(0), diff:beta(99), diff:beta(199), diff:alpha_bar(99)))
local opt = iddpm.optim.adamw(unet:parameters(), {lr = 2e-3})
local gen = T.generator(7)

-- toy data: a bright disc of random radius in the middle of a 16x16 image
local function batch(n)
  local x = T.full({n, 1, 16, 16}, -1)
  for i = 1, n do
    local r = 3 + (i % 4)
    for yy = 1, 16 do for xx = 1, 16 do
      if (yy - 8.5) ^ 2 + (xx - 8.5) ^ 2 <= r * r then x:narrow(1, i, 1):narrow(3, yy, 1):narrow(4, xx, 1):fill_(1) end
    end end
  end
  return x
end
local data = batch(16)

local vb_first, vb_last, acc, cnt = nil, nil, 0, 0
for step = 1, steps do
  local t = T.randint(0, diff.num_timesteps, {16}, gen)
  opt:zero_grad()
  local l = diff:training_losses(unet, data, t, {generator = gen})
  l.loss:mean():backward()
  opt:step()
  acc, cnt = acc + l.vb:mean():item(), cnt + 1
  if step % 50 == 0 then
    local vb = acc / cnt
    vb_first = vb_first or vb
    vb_last = vb
    print(("step %4d  loss %.4f  mse %.4f  vb (mean of the last 50) %.4f"):format(step, l.loss:mean():item(),
      l.mse:mean():item(), vb))
    acc, cnt = 0, 0
  end
end
if vb_first then print(("vb went from %.4f to %.4f"):format(vb_first, vb_last)) end

unet:eval()
local fast = D.new{noise_schedule = alpha_bar, steps = 200, learn_sigma = true, timestep_respacing = "25"}
local x = T.no_grad(function() return fast:p_sample_loop(unet, {8, 1, 16, 16}, {generator = T.generator(1)}) end)
iddpm.image.save_grid(out, x)
print("samples: " .. out)
