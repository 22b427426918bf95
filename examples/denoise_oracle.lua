-- examples/denoise_oracle.lua — the sampler and the denoising pictures without a trained
-- model: the "data set" is one 32x32 picture x0 and the model is the exact eps
-- predictor for it, eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Every sample
-- must therefore end at x0 (printed: the largest difference), and out/denoise.png and
-- out/denoise.gif show noise turning into x0.
--
--   iddpm run examples/denoise_oracle.lua [out=oracle] [steps=50]
local iddpm = require "iddpm"
local T, D = iddpm.tensor, iddpm.diffusion
local S = require "iddpm.sample"
local image = require "iddpm.image"

local opt = {out = "oracle", steps = "50"}
for _, a in ipairs{...} do
  local k, v = a:match("^([%w_]+)=(.*)$")
  if not k or opt[k] == nil then error("usage: iddpm run examples/denoise_oracle.lua [out=DIR] [steps=N]", 0) end
  opt[k] = v
end

local H, TSTEPS = 32, 1000
local flat = {}
for c = 1, 3 do for y = 0, H - 1 do for x = 0, H - 1 do   -- a disc on a vertical gradient
  local r = math.sqrt((x - 15.5) ^ 2 + (y - 15.5) ^ 2)
  flat[#flat + 1] = r < 10 and ({0.8, -0.6, -0.2})[c] or ({-0.5, 0.3, 0.7})[c] * (y / H * 2 - 1)
end end end
local x0 = T.from_table(flat, {1, 3, H, H})

local base = D.new{steps = TSTEPS, noise_schedule = "cosine", learn_sigma = true}
-- the model sees t * 1000 / T (rescale_timesteps); the learned-variance half is 0
local model = setmetatable({config = {in_channels = 3, image_size = H}}, {__call = function(_, x, t)
  local n, tv = x:size(1), t:totable()
  local out = T.zeros({n, 6, H, H})
  for i = 1, n do
    local ab = base.alphas_cumprod[math.floor(tv[i] * TSTEPS / 1000 + 0.5) + 1]
    out:narrow(1, i, 1):narrow(2, 1, 3):copy_((x:narrow(1, i, 1) - x0 * math.sqrt(ab)) / math.sqrt(1 - ab))
  end
  return out
end})

local diff = D.new{steps = TSTEPS, noise_schedule = "cosine", learn_sigma = true, timestep_respacing = opt.steps}
local x, _, rec = S.generate(model, diff, {num_samples = 3, batch_size = 3, seed = 1, record = {samples = 3, frames = 8}})
print(("%d steps: largest |sample - x0| = %.2e"):format(diff.num_timesteps, (x - x0:expand({3, 3, H, H})):abs():max():item()))
require("iddpm.fs").mkdir_p(opt.out, "out")
image.save_grid(opt.out .. "/grid.png", x)
local png, gif = S.save_denoise(opt.out, rec)
print(("wrote %s/grid.png, %s, %s (columns at timesteps %s)"):format(opt.out, png, gif, table.concat(rec.t, ",")))
