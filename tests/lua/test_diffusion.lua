-- test_diffusion.lua — iddpm.diffusion beyond the golden numbers: error messages for
-- bad input, sampling loops (determinism, equality with hand-written loops, a closed
-- form), gradients of training_losses and q_sample, calc_bpd_loop on a tiny process,
-- and the timestep samplers' importance weights and checkpoint state.
local H = require "harness"
local iddpm = require "iddpm"
local T, D = iddpm.tensor, iddpm.diffusion

-- Loops compare equal sequences of float32 ops: bit-exact expected (0), compared
-- with a tiny relative tolerance only to print an error when they are not.
local TOL_EXACT = 1e-7
-- Closed forms computed in double vs float32 results after T steps: 1e-5.
local TOL_CLOSED = 1e-5
-- Central differences of a float32 loss (one rounding ~6e-8 relative of O(1) values)
-- with step 1e-2: roundoff ~1e-5/|grad| plus O(h^2) truncation; 2e-2 relative on
-- gradients of size ~1e-2 is what float32 permits (the C tests check the kernel's
-- backward in double to 2e-4).
local EPS_FD, TOL_FD = 1e-2, 2e-2

print("# seeds: generators 7, 8, 11, 21, 31")

-- ---------------------------------------------------------------- errors

H.raises("schedule: unknown name", function() D.schedule("bogus", 10) end, "bogus")
H.raises("schedule: T < 1", function() D.schedule("cosine", 0) end, "T must be")
H.raises("new: steps < 1", function() D.new{steps = 0} end, "steps must be")
H.raises("new: unknown schedule", function() D.new{steps = 10, noise_schedule = "nope"} end, "nope")
H.raises("new: bad respacing", function() D.new{steps = 10, noise_schedule = "cosine", timestep_respacing = "abc"} end,
  "D.new")
H.raises("new: respacing more than steps", function()
  D.new{steps = 10, noise_schedule = "cosine", timestep_respacing = "20"} end, "D.new")
H.raises("new: unknown loss_type", function() D.new{steps = 10, noise_schedule = "cosine", loss_type = "foo"} end,
  "loss_type")
H.raises("new: betas vs steps", function() D.new{steps = 3, betas = {0.1, 0.2}} end, "betas")
local dl = D.new{steps = 10, noise_schedule = "cosine", learn_sigma = true}
local x = T.zeros({2, 3, 4, 4})
H.raises("t out of range", function() dl:q_sample(x, {0, 10}) end, "outside [0, 10)")
H.raises("t negative", function() dl:q_sample(x, {-1, 0}) end, "outside")
H.raises("t wrong length", function() dl:q_sample(x, {0, 1, 2}) end, "expected (2)")
H.raises("t not integer", function() dl:q_sample(x, {0.5, 1}) end, "not an integer")
H.raises("noise shape", function() dl:q_sample(x, {0, 1}, T.zeros({2, 3, 4, 5})) end, "noise (2,3,4,5)")
H.raises("model wrong channels", function()
  dl:p_sample(function() return T.zeros({2, 3, 4, 4}) end, x, {0, 1}) end, "model output (2,3,4,4)")
H.raises("model returns a number", function() dl:p_sample(function() return 3 end, x, {0, 1}) end, "model returned")
H.raises("model not callable", function() dl:p_sample(42, x, {0, 1}) end, "model must be")
H.raises("training_losses model shape", function()
  dl:training_losses(function() return T.zeros({2, 3, 4, 4}) end, x, {0, 1}) end, "diff:training_losses")
H.raises("ddim_reverse eta", function()
  dl:ddim_reverse_sample(function() return T.zeros({2, 6, 4, 4}) end, x, {0, 1}, {eta = 0.5}) end, "eta")
H.raises("sampler name", function() D.sampler("foo", dl) end, "foo")
H.raises("loop noise shape", function()
  dl:p_sample_loop(function() return T.zeros({2, 6, 4, 4}) end, {2, 3, 4, 4}, {noise = T.zeros({1, 3, 4, 4})}) end,
  "opts.noise")

-- ---------------------------------------------------------------- construction

local d = D.new{steps = 20, noise_schedule = "cosine", timestep_respacing = "5"}
H.check("respaced num_timesteps", d.num_timesteps == 5 and #d.betas == 5 and d.original_num_steps == 20)
H.check("respaced timestep_map", table.concat(d.timestep_map, ",") == table.concat(D.space_timesteps(20, "5"), ","),
  table.concat(d.timestep_map, ","))
local fnb = D.schedule(function(u) return math.cos((u + 0.008) / 1.008 * math.pi / 2) ^ 2 end, 50)
H.close("schedule from a Lua alpha_bar == cosine", fnb, D.schedule("cosine", 50), 1e-12, 1e-300)
local db = D.new{betas = D.schedule("linear", 100), rescale_timesteps = false}
H.close("new{betas = ...}", db.betas, D.new{steps = 100}.betas, 1e-12, 1e-300)

-- ---------------------------------------------------------------- sampling loops

local shape = {2, 3, 4, 4}
local df = D.new{steps = 8, noise_schedule = "cosine", learn_sigma = false}   -- fixed_large, epsilon
local calls = 0
local affine = function(xx, tm, y) calls = calls + 1; return xx * 0.3 + 0.05 end   -- a fixed fake eps model

local s1 = df:p_sample_loop(affine, shape, {generator = T.generator(7)})
local s2 = df:p_sample_loop(affine, shape, {generator = T.generator(7)})
local s3 = df:p_sample_loop(affine, shape, {generator = T.generator(8)})
H.close("p_sample_loop deterministic for a seed", s1, s2, 0, 1)
H.check("p_sample_loop differs for another seed", H.max_rel(s1, s3) > 1e-3)
-- the same loop by hand: x_T then one draw per step, as the loop does
do
  local g = T.generator(7)
  local img = T.randn(shape, g)
  for i = df.num_timesteps - 1, 0, -1 do
    img = T.no_grad(function() return df:p_sample(affine, img, i, {noise = T.randn(shape, g)}) end)
  end
  H.close("p_sample_loop == hand-written loop of p_sample", s1, img, TOL_EXACT, 1e-6)
end
calls = 0
local steps_seen, ts = 0, {}
df:p_sample_loop(affine, shape, {generator = T.generator(7), callback = function(st)
  steps_seen = steps_seen + 1; ts[#ts + 1] = st.t
  assert(T.is_tensor(st.sample) and T.is_tensor(st.pred_xstart)) end})
H.check("callback once per step, t from T-1 down to 0", steps_seen == 8 and ts[1] == 7 and ts[8] == 0 and calls == 8,
  table.concat(ts, ","))
local n_it = 0
for st in df:p_sample_loop_progressive(affine, shape, {generator = T.generator(7)}) do n_it = n_it + 1 end
H.check("p_sample_loop_progressive iterates T steps", n_it == 8)

-- DDIM eta = 0 with eps = 0 and no clipping telescopes to x_T / sqrt(abar[T-1])
do
  local g = T.generator(11)
  local xT = T.randn(shape, g)
  local zero = function(xx) return xx * 0 end
  local out = df:ddim_sample_loop(zero, shape, {noise = xT, clip_denoised = false, eta = 0})
  local want = xT:totable()
  local k = 1 / math.sqrt(df.alphas_cumprod[df.num_timesteps])
  for i = 1, #want do want[i] = want[i] * k end
  H.close("ddim_sample_loop closed form (eps = 0)", out, want, TOL_CLOSED, 1e-6)
  local e1 = df:ddim_sample_loop(affine, shape, {generator = T.generator(21), eta = 1})
  local e2 = df:ddim_sample_loop(affine, shape, {generator = T.generator(21), eta = 1})
  H.close("ddim_sample_loop eta=1 deterministic for a seed", e1, e2, 0, 1)
  -- the reverse ODE undoes one DDIM step (to float32 rounding) when eps is exact
  local x1 = T.randn(shape, g)
  local fwd = df:ddim_reverse_sample(zero, x1, 2, {clip_denoised = false})
  local back = df:ddim_sample(zero, fwd, 3, {clip_denoised = false, eta = 0})
  H.close("ddim_reverse_sample then ddim_sample round trip", back, x1, TOL_CLOSED, 1e-5)
end

-- denoised_fn runs on pred_xstart before clipping; y reaches the model
do
  local got_y
  local m = function(xx, tm, y) got_y = y; return xx * 0.3 end
  local out = df:p_mean_variance(m, T.randn(shape, T.generator(31)), {3, 5},
    {denoised_fn = function(p) return p * 0 + 0.25 end, y = {1, 2}})
  local pv = out.pred_xstart:totable()
  local okp = true
  for i = 1, #pv do okp = okp and math.abs(pv[i] - 0.25) < 1e-7 end
  H.check("denoised_fn applied to pred_xstart", okp)
  H.check("y passed to the model as an int64 tensor", T.is_tensor(got_y) and got_y:dtype() == "int64"
    and got_y:totable()[2] == 2)
end

-- ---------------------------------------------------------------- gradients

do
  local dg = D.new{steps = 10, noise_schedule = "cosine", learn_sigma = true}   -- hybrid, rescaled_mse
  local g = T.generator(21)
  local x0 = T.randn({2, 2, 3, 3}, g) * 0.5
  local nz = T.randn({2, 2, 3, 3}, g)
  local mo = T.randn({2, 4, 3, 3}, g) * 0.5
  mo.requires_grad = true
  local t = {0, 6}
  local f = function(m) return dg:training_losses(function() return m end, x0, t, {noise = nz}).loss end
  local w = H.gradcheck(f, {mo}, EPS_FD, 72)
  H.check(("training_losses gradcheck w.r.t. model output (worst rel %.2e)"):format(w), w <= TOL_FD)
  -- the mean half sees only the mse term (the stop-gradient on vb): 2 (out - noise) / n
  mo.grad = nil
  f(mo):sum():backward()
  local gm, mv, nv = mo.grad:totable(), mo:totable(), nz:totable()
  local want, got = {}, {}
  for b = 0, 1 do
    for i = 1, 18 do
      got[#got + 1] = gm[b * 36 + i]
      want[#want + 1] = 2 * (mv[b * 36 + i] - nv[b * 18 + i]) / 18
    end
  end
  H.close("hybrid loss: mean-half gradient is the mse gradient only", got, want, 1e-5, 1e-6)
  -- KL loss: the mean half gets the vb gradient too
  local dk = D.new{steps = 10, noise_schedule = "cosine", learn_sigma = true, use_kl = true}
  local fk = function(m) return dk:training_losses(function() return m end, x0, t, {noise = nz}).loss end
  local wk = H.gradcheck(fk, {mo}, EPS_FD, 72)
  H.check(("rescaled_kl gradcheck (worst rel %.2e)"):format(wk), wk <= TOL_FD)
  -- into a model's parameter
  local dp = D.new{steps = 10, noise_schedule = "cosine"}
  local wpar = T.from_table({0.7}, {1})
  wpar.requires_grad = true
  local L = dp:training_losses(function(xx) return xx * wpar end, x0, t, {noise = nz})
  L.loss:mean():backward()
  H.check("training loss reaches the model's parameters", wpar.grad ~= nil and math.abs(wpar.grad:item()) > 0)
  H.check("mse and vb carry no gradient", not L.mse.requires_grad and not L.vb.requires_grad)
  -- q_sample is linear in x_start and noise
  local xg = x0:clone(); xg.requires_grad = true
  local ng = nz:clone(); ng.requires_grad = true
  local wq = H.gradcheck(function(a, b) return dg:q_sample(a, t, b) end, {xg, ng}, EPS_FD, 36)
  H.check(("q_sample gradcheck (worst rel %.2e)"):format(wq), wq <= TOL_FD)
end

-- ---------------------------------------------------------------- calc_bpd_loop

do
  local dbpd = D.new{steps = 4, noise_schedule = "cosine", learn_sigma = true}
  local g = T.generator(31)
  local x0 = (T.rand({2, 3, 4, 4}, g) * 2 - 1)
  local m = function(xx) return T.cat({xx * 0.2, xx * 0 + 0.1}, 2) end
  local r1 = dbpd:calc_bpd_loop(m, x0, {generator = T.generator(5)})
  local r2 = dbpd:calc_bpd_loop(m, x0, {generator = T.generator(5)})
  H.check("calc_bpd_loop shapes", table.concat(r1.vb:shape(), ",") == "2,4" and
    table.concat(r1.total_bpd:shape(), ",") == "2" and table.concat(r1.mse:shape(), ",") == "2,4"
    and table.concat(r1.xstart_mse:shape(), ",") == "2,4")
  H.close("calc_bpd_loop deterministic for a seed", r1.total_bpd, r2.total_bpd, 0, 1)
  local vb, pr, tot = r1.vb:totable(), r1.prior_bpd:totable(), r1.total_bpd:totable()
  local sums = {}
  for b = 1, 2 do
    sums[b] = pr[b]
    for j = 1, 4 do sums[b] = sums[b] + vb[(b - 1) * 4 + j] end
  end
  H.close("total_bpd = sum(vb) + prior_bpd", tot, sums, 1e-6, 1e-6)
  -- prior: KL(q(x_{T-1} | x0) || N(0, 1)) averaged over elements, in bits
  local qm, _, qlv = dbpd:q_mean_variance(x0, 3)
  local kl = D.normal_kl(qm, qlv, 0, 0)
  local want = (kl:reshape({2, 48}):mean(2) * (1 / math.log(2))):totable()
  H.close("prior_bpd = mean KL to N(0,1) / ln 2", r1.prior_bpd, want, 1e-5, 1e-6)
  local okm = true
  for _, v in ipairs(r1.mse:totable()) do okm = okm and v >= 0 end
  H.check("calc_bpd_loop mse >= 0", okm)
end

-- ---------------------------------------------------------------- timestep samplers

do
  local dT = D.new{steps = 6, noise_schedule = "cosine"}
  local u = D.sampler("uniform", dT)
  local t, w = u:sample(64, T.generator(8))
  local tv, ok = t:totable(), t:dtype() == "int64"
  for _, v in ipairs(tv) do ok = ok and v >= 0 and v < 6 end
  H.check("uniform sampler: int64 t in [0, T)", ok)
  H.close("uniform sampler: weights are 1", w, (T.zeros({64}) + 1), 0, 1)
  local t2 = u:sample(64, T.generator(8))
  H.close("sampler deterministic for a seed", t, t2, 0, 1)

  local s = D.sampler("loss-second-moment", dT)
  H.check("loss-second-moment: not warmed up at first", not s:warmed_up())
  local losses = {}
  local allt = {}
  for k = 1, 10 do
    for tt = 0, 5 do allt[#allt + 1] = tt; losses[#losses + 1] = (tt + 1) * (1 + 0.1 * k) end
  end
  s:update(allt, losses)
  H.check("loss-second-moment: warmed up after 10 losses per step", s:warmed_up())
  -- expected weights: sqrt(mean(loss^2)) per step, normalised, mixed with 0.001 uniform
  local wexp, sum = {}, 0
  for tt = 0, 5 do
    local acc = 0
    for k = 1, 10 do acc = acc + ((tt + 1) * (1 + 0.1 * k)) ^ 2 end
    wexp[tt + 1] = math.sqrt(acc / 10); sum = sum + wexp[tt + 1]
  end
  for i = 1, 6 do wexp[i] = wexp[i] / sum * (1 - 0.001) + 0.001 / 6 end
  local wgot = s:weights()
  local wsum = 0
  for i = 1, 6 do wsum = wsum + wgot[i] end
  for i = 1, 6 do wgot[i] = wgot[i] / wsum end
  H.close("loss-second-moment weights", wgot, wexp, 1e-9, 1e-12)
  local ts, ws = s:sample(32, T.generator(9))
  local iw, want = {}, {}
  for i, tt in ipairs(ts:totable()) do iw[i] = ws:totable()[i]; want[i] = 1 / (6 * wexp[tt + 1]) end
  H.close("importance weights = 1 / (T p(t))", iw, want, 1e-6, 1e-6)
  local st = s:state()
  local s2 = D.sampler("loss-second-moment", dT)
  s2:load_state(st)
  H.close("sampler state round trip", s2:weights(), s:weights(), 0, 1)
  H.raises("load_state of another kind", function() u:load_state(st) end, "loss-second-moment")
end

H.done()
