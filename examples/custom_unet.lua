-- examples/custom_unet.lua — compose a small network of your own from the UNet's
-- building blocks and train it a few steps on a toy task with the hybrid loss.
--   iddpm run examples/custom_unet.lua [steps]
local iddpm = require "iddpm"
local T, nn, D = iddpm.tensor, iddpm.nn, iddpm.diffusion

local steps = tonumber(arg and arg[1]) or 20
T.manual_seed(0)
nn.manual_seed(0)

-- A tiny denoiser: conv in, one ResBlock, one attention block, a 2x down/up pair, conv out.
local Net = nn.class("TinyNet")
function Net.new(ch)
  local self = nn.new(Net)
  self.ch = ch
  self.time_embed = self:add("time_embed", nn.Sequential.new{nn.Linear.new(ch, 4 * ch), nn.SiLU.new(), nn.Linear.new(4 * ch, 4 * ch)})
  self.inp = self:add("inp", nn.Conv2d.new(1, ch, 3))
  self.res = self:add("res", nn.ResBlock.new(ch, 4 * ch, 0.0))
  self.down = self:add("down", nn.Downsample.new(ch))
  self.attn = self:add("attn", nn.AttentionBlock.new(ch, 2))
  self.up = self:add("up", nn.Upsample.new(ch))
  self.norm = self:add("norm", nn.GroupNorm.new(32, ch))
  self.outc = self:add("outc", nn.Conv2d.new(ch, 2, 3, {zero_init = true}))   -- eps and v: learned sigma
  return self
end
function Net:forward(x, t)
  local emb = self.time_embed(T.timestep_embedding(T.is_tensor(t) and t or T.from_table(t), self.ch))
  local h = self.res(self.inp(x), emb)
  h = h + self.up(self.attn(self.down(h)))
  return self.outc(self.norm(h, {silu = true}))
end

local net = Net.new(32)
print(("TinyNet: %d parameters"):format(net:num_params()))
local diff = D.new{steps = 100, noise_schedule = "cosine", learn_sigma = true}
local opt = iddpm.optim.adamw(net:parameters(), {lr = 1e-3})
local gen = T.generator(1)

-- toy data: bright squares at random places on a dark 16x16 background
local function batch(n)
  local x = T.full({n, 1, 16, 16}, -1)
  for i = 1, n do
    local r, c = math.random(1, 9), math.random(1, 9)
    x:narrow(1, i, 1):narrow(3, r, 8):narrow(4, c, 8):fill_(1)
  end
  return x
end

math.randomseed(0)
for step = 1, steps do
  local x0 = batch(8)
  local t = T.randint(0, diff.num_timesteps, {8}, gen)
  opt:zero_grad()
  local l = diff:training_losses(net, x0, t, {generator = gen})
  local loss = l.loss:mean()
  loss:backward()
  opt:step()
  if step == 1 or step % 5 == 0 then
    print(("step %3d  loss %.4f  mse %.4f  vb %.4f"):format(step, loss:item(), l.mse:mean():item(), l.vb:mean():item()))
  end
end
