-- tests/lua/test_scope.lua — tensor memory owned by scopes (T.scope, lua/l_scope.c):
-- what a scope releases and what it keeps, and that a network written with no frees
-- and no collector calls peaks at the same tensor memory as the same network freeing
-- its intermediates by hand, in a no-grad forward, in a sampling loop and in a
-- training step (T.peak_bytes: live tensor bytes, counted at every tensor creation).
local H = require "harness"
local iddpm = require "iddpm"
local T, nn, D = iddpm.tensor, iddpm.nn, iddpm.diffusion

local SEED = 11
print("# seed " .. SEED)
local MiB = 2 ^ 20

-- ---------------------------------------------------------------- T.scope itself

collectgarbage(); collectgarbage()
local base = T.live_bytes()
for _ = 1, 20 do T.scope(function() local a = T.randn({256, 1024}); local b = a * 2; return nil end) end
H.check("scope: unreturned tensors are released at once (no collection)", T.live_bytes() - base == 0,
  ("%d bytes left"):format(T.live_bytes() - base))

local leak
local r = T.scope(function()
  local a = T.randn({4}, T.generator(SEED))
  leak = a * 3                                    -- stored outside, not returned: released
  return {out = a + 1, nested = {a * 2}}, 7
end)
H.check("scope: returned tensors (also inside tables) survive", T.is_tensor(r.out) and r.nested[1]:numel() == 4)
H.raises("scope: a tensor kept past its scope without T.keep raises, never reads freed memory",
  function() return leak + 1 end, "tensor was freed")

local kept = T.scope(function() local k = T.randn({3}); T.keep(k); leak = k; return nil end)
H.check("scope: T.keep keeps a tensor that is not returned", kept == nil and leak:numel() == 3)

local inner_out
local outer = T.scope(function()
  inner_out = T.scope(function() return T.ones({2}) end)   -- escapes to the outer scope
  return inner_out:sum()
end)
H.check("scope: nested: the inner result is released with the outer scope", outer:item() == 2)
H.raises("scope: nested: not returned by the outer scope", function() return inner_out + 1 end, "tensor was freed")

collectgarbage(); base = T.live_bytes()
H.raises("scope: an error propagates", function()
  T.scope(function() local _ = T.randn({1024, 256}); error("boom in scope") end)
end, "boom in scope")
H.check("scope: an error releases what the scope made", T.live_bytes() - base == 0)
H.check("scope: depth back to 0", T.scope_depth() == 0)

-- the tape owns what the backward needs: a scope around forward + backward
local w = T.randn({8, 8}, T.generator(SEED + 1)); w.requires_grad = true
local lv = T.scope(function()
  local h = T.randn({4, 8}, T.generator(SEED + 2)):matmul(w)
  local y = (h:silu() * h):sum()
  y:backward()
  return y:item()
end)
H.check("scope: backward inside a scope fills the gradient", type(lv) == "number" and w.grad:abs():sum():item() > 0)

-- ---------------------------------------------------------------- a network with no frees

-- A small denoiser written as the math reads, with no frees and no collector calls,
-- out of small modules the way the UNet is (each forward's locals are released when it
-- returns, so a module whose forward is one block keeps little alive; see README
-- "Memory").
local Enc, Mid, Dec, Net = nn.class("Enc"), nn.class("Mid"), nn.class("Dec"), nn.class("PlainNet")
local CH = 32
function Enc.new()
  local self = nn.new(Enc)
  self.inp = self:add("inp", nn.Conv2d.new(1, CH, 3))
  self.res = self:add("res", nn.ResBlock.new(CH, 4 * CH, 0.0))
  return self
end
function Enc:forward(x, emb) return self.res(self.inp(x), emb) end
function Mid.new()
  local self = nn.new(Mid)
  self.down = self:add("down", nn.Downsample.new(CH))
  self.res = self:add("res", nn.ResBlock.new(CH, 4 * CH, 0.0))
  self.up = self:add("up", nn.Upsample.new(CH))
  return self
end
function Mid:forward(h, emb) return self.up(self.res(self.down(h), emb)) end
function Dec.new()
  local self = nn.new(Dec)
  self.res = self:add("res", nn.ResBlock.new(2 * CH, 4 * CH, 0.0, {out_channels = CH}))
  self.norm = self:add("norm", nn.GroupNorm.new(32, CH))
  self.outc = self:add("outc", nn.Conv2d.new(CH, 2, 3))
  return self
end
function Dec:forward(h, skip, emb) return self.outc(self.norm(self.res(T.cat({h, skip}, 2), emb), {silu = true})) end
function Net.new()
  local self = nn.new(Net)
  self.temb = self:add("temb", nn.Sequential.new{nn.Linear.new(CH, 4 * CH), nn.SiLU.new(), nn.Linear.new(4 * CH, 4 * CH)})
  self.enc = self:add("enc", Enc.new())
  self.mid = self:add("mid", Mid.new())
  self.dec = self:add("dec", Dec.new())
  return self
end
function Net:forward(x, t)
  local emb = self.temb(T.timestep_embedding(t, CH))
  local h1 = self.enc(x, emb)
  return self.dec(self.mid(h1, emb), h1, emb)
end

-- The same network by hand: plain functions (no module forwards, so no scopes) that
-- free every intermediate as soon as it is dead, as unet.lua used to.
local function drop(t, keep) if t ~= nil and t ~= keep then t:free() end end
local function res_by_hand(rb, x, emb)
  local il, ol = rb.in_layers, rb.out_layers
  local g = T.group_norm(x, 32, il:child(0).weight, il:child(0).bias, nil, nil, true, 1e-5)
  local c = il:child(2)
  local h = T.conv2d(g, c.weight, c.bias, 1, 1); drop(g)
  local e1 = emb:silu()
  local l = rb.emb_layers:child(1)
  local e = e1:matmul(l.weight:transpose(1, 2)) + l.bias; drop(e1)
  local sc, sh = e:narrow(2, 1, rb.out_ch), e:narrow(2, rb.out_ch + 1, rb.out_ch)
  local n = ol:child(0)
  local g2 = T.group_norm(h, 32, n.weight, n.bias, sc, sh, true, 1e-5); drop(h); drop(sc); drop(sh); drop(e)
  local c2 = ol:child(3)
  local o = T.conv2d(g2, c2.weight, c2.bias, 1, 1); drop(g2)
  local skip = rb.skip and T.conv2d(x, rb.skip.weight, rb.skip.bias, 1, 0) or x
  local out = skip + o; drop(o); drop(skip, x)
  return out
end
local function by_hand(m, x, t)
  local te = T.timestep_embedding(t, CH)
  local a = m.temb:child(0)
  local e1 = te:matmul(a.weight:transpose(1, 2)) + a.bias; drop(te)
  local e2 = e1:silu(); drop(e1)
  local b = m.temb:child(2)
  local emb = e2:matmul(b.weight:transpose(1, 2)) + b.bias; drop(e2)
  local i = T.conv2d(x, m.enc.inp.weight, m.enc.inp.bias, 1, 1)
  local h1 = res_by_hand(m.enc.res, i, emb); drop(i)
  local d = T.conv2d(h1, m.mid.down.op.weight, m.mid.down.op.bias, 2, 1)
  local r2 = res_by_hand(m.mid.res, d, emb); drop(d)
  local u = T.upsample_nearest(r2, 2); drop(r2)
  local h2 = T.conv2d(u, m.mid.up.conv.weight, m.mid.up.conv.bias, 1, 1); drop(u)
  local c = T.cat({h2, h1}, 2); drop(h2); drop(h1)
  local h = res_by_hand(m.dec.res, c, emb); drop(c); drop(emb)
  local g = T.group_norm(h, 32, m.dec.norm.weight, m.dec.norm.bias, nil, nil, true, 1e-5); drop(h)
  local out = T.conv2d(g, m.dec.outc.weight, m.dec.outc.bias, 1, 1); drop(g)
  return out
end

nn.manual_seed(SEED)
local net = Net.new():to("cpu", {recompute = false})   -- the hand version runs the ops one by one too
local NB, S = 16, 32
local x = T.randn({NB, 1, S, S}, T.generator(SEED + 3))
local tt = T.full({NB}, 5)

-- peak live tensor bytes above what was live before fn ran
local function peak(fn)
  collectgarbage(); collectgarbage()
  local b = T.live_bytes()
  T.peak_bytes(true)
  local res = fn()
  return (T.peak_bytes() - b) / MiB, res
end

-- The scoped forward releases a module's intermediates when its forward returns, the
-- hand version right after their last use. The difference is what a forward keeps in
-- its locals past their last use: here Net:forward keeps h1 and the middle's output
-- (two activations of (NB, CH, S, S) float32) while the decoder runs; inside the blocks
-- (ResBlock, Sequential) nothing more is alive than by hand. Allowed: those two
-- activations plus this slack for the small (N, 4*CH) embeddings.
local ACT = NB * CH * S * S * 4 / MiB
local SLACK = 0.25
local ALLOWED = 2 * ACT + SLACK
local p_auto, y_auto = peak(function() return T.no_grad(function() return net(x, tt) end) end)
local p_hand, y_hand = peak(function() return T.no_grad(function() return by_hand(net, x, tt) end) end)
H.check("no frees: the same output as the hand-freed forward", (y_auto - y_hand):abs():max():item() == 0)
H.check("no frees: no-grad forward peak within the hand-tuned one + the top-level locals",
  p_auto <= p_hand + ALLOWED, ("%.2f MiB vs %.2f MiB by hand (+%.2f allowed)"):format(p_auto, p_hand, ALLOWED))
print(("# peak no-grad forward: scoped %.2f MiB, by hand %.2f MiB"):format(p_auto, p_hand))

-- a sampling loop: its steps are scopes too
local diff = D.new{steps = 10, noise_schedule = "cosine", learn_sigma = true}
local p_loop = peak(function() return diff:p_sample_loop(net, {NB, 1, S, S}, {generator = T.generator(SEED + 4)}) end)
local p_loop_hand = peak(function()
  return diff:p_sample_loop(function(xx, t) return by_hand(net, xx, t) end, {NB, 1, S, S}, {generator = T.generator(SEED + 4)})
end)
H.check("no frees: sampling loop peak within the hand-tuned one + the top-level locals",
  p_loop <= p_loop_hand + ALLOWED, ("%.2f MiB vs %.2f MiB by hand (+%.2f allowed)"):format(p_loop, p_loop_hand, ALLOWED))

-- a training step (forward + backward in a scope, as train.lua runs it)
local function train_step(model)
  return T.scope(function()
    local t = T.randint(0, 10, {NB}, T.generator(SEED + 5))
    local l = diff:training_losses(model, x, t, {generator = T.generator(SEED + 6)}).loss:mean()
    l:backward()
    return l:item()
  end)
end
local p_train, l_auto = peak(function() return train_step(net) end)
net:zero_grad()
local p_train_hand, l_hand = peak(function() return train_step(function(xx, t) return by_hand(net, xx, t) end) end)
H.check("no frees: training step loss equals the hand version", l_auto == l_hand, ("%.9g vs %.9g"):format(l_auto, l_hand))
H.check("no frees: training step peak equals the hand-tuned one (the tape keeps what the backward needs)",
  p_train <= p_train_hand,
  ("%.2f MiB vs %.2f MiB by hand"):format(p_train, p_train_hand))
print(("# peak: sampling %.2f / %.2f MiB, training %.2f / %.2f MiB (scoped / by hand)"):format(p_loop, p_loop_hand,
  p_train, p_train_hand))
H.done()
