-- test_diffusion_ops.lua — the evaluation-only diffusion ops on the device against the
-- CPU (engine/diffusion/ops_eval.c): vb_terms_bpd (vb and pred_xstart, clip on/off, t
-- = 0 and t > 0), prior_bpd, mean_flat_sq_diff, normal_kl and the discretized Gaussian
-- log-likelihood (full tensors and broadcast scalars, edge bins), and calc_bpd_loop
-- with a fixed "model". Every device result must stay on the device.
-- Run by `make test-cuda`; `make test` runs it with IDDPM_FAKE_CUDA=1 (the CPU backend
-- serves "cuda": the device path's shared kernels, diffusion_kernels.h, against the
-- CPU path's losses.c). Error measure: max |dev - cpu| / max |cpu|.
package.path = "tests/lua/?.lua;" .. package.path
local H = require "harness"
local iddpm = require "iddpm"
local T, D = iddpm.tensor, iddpm.diffusion
local C = require "iddpm._diffusion"

if H.skip_without_cuda() then H.done() return end
local SEED = 4321
print(("# device: %s; seed %d"):format(iddpm.cuda.device_name() ~= "" and iddpm.cuda.device_name() or "cuda (fake: CPU backend)", SEED))
T.manual_seed(SEED)

-- per-element terms in double on both sides; they differ by float32 rounding of the
-- stored terms and the order of the per-sample sums
local ELEM = 2e-6     -- elementwise (normal_kl, dgll, pred_xstart)
local SUMS = 1e-5     -- per-sample sums over C*H*W terms (vb, prior, mean_flat)
local LOOP = 1e-5     -- calc_bpd_loop outputs (sums of the above)

local err = H.rel_err

local function cmp(name, g, c, tol, dev_expected)
  if not T.is_tensor(g) then return H.check(name, false, "not a tensor") end
  if dev_expected ~= false and g:device() ~= "cuda" then return H.check(name .. " stays on cuda", false, g:device()) end
  local e = err(g, c)
  H.check(("%s (err %.2e, tol %.0e)"):format(name, e, tol), e <= tol)
end

local function ints(t) return T.from_table(t, {#t}, "int64") end

-- vb_terms_bpd, prior_bpd, mean_flat for the mean / variance types
local combos = {
  {"epsilon", "learned_range"}, {"epsilon", "fixed_large"}, {"epsilon", "fixed_small"},
  {"start_x", "learned"}, {"previous_x", "learned_range"},
}
for _, cb in ipairs(combos) do
  local tag = ("%s/%s"):format(cb[1], cb[2])
  local ok, e = pcall(function()
    local d = D.new{steps = 40, noise_schedule = "cosine", model_mean_type = cb[1], model_var_type = cb[2]}
    local learned = cb[2] == "learned" or cb[2] == "learned_range"
    local B, Cc, HW = 5, 3, 5
    local x0 = (T.rand({B, Cc, HW, HW}) * 2 - 1):clamp(-1, 1)
    -- exact edge bins: pixels at -1 and +1 exercise the decoder's open-ended bins
    x0:narrow(4, 1, 1):fill_(-1); x0:narrow(4, 2, 1):fill_(1)
    local xt = T.randn({B, Cc, HW, HW})
    local mo = T.randn({B, learned and 2 * Cc or Cc, HW, HW}) * 0.7
    local t = ints({0, 1, 17, 38, 39})
    local g = {x0 = x0:cuda(), xt = xt:cuda(), mo = mo:cuda()}
    for _, clip in ipairs({true, false}) do
      local vc, pc = d._c:vb_terms_bpd(mo, x0, xt, t, clip)
      local vg, pg = d._c:vb_terms_bpd(g.mo, g.x0, g.xt, t, clip)
      cmp(("%s vb_terms_bpd clip=%s vb"):format(tag, tostring(clip)), vg, vc, SUMS)
      cmp(("%s vb_terms_bpd clip=%s pred_xstart"):format(tag, tostring(clip)), pg, pc, ELEM)
    end
    cmp(tag .. " prior_bpd", d._c:prior_bpd(g.x0), d._c:prior_bpd(x0), SUMS)
    cmp(tag .. " mean_flat_sq_diff", C.mean_flat_sq_diff(g.xt, g.x0), C.mean_flat_sq_diff(xt, x0), SUMS)
    -- a non-contiguous input (a permuted view) must give the same
    local xp = xt:permute{1, 2, 4, 3}
    cmp(tag .. " mean_flat_sq_diff (strided input)", C.mean_flat_sq_diff(xp:cuda(), g.x0), C.mean_flat_sq_diff(xp, x0), SUMS)
  end)
  if not ok then H.check(tag, false, e) end
end

-- elementwise losses: full tensors and one-element (broadcast) arguments
do
  local ok, e = pcall(function()
    local shape = {4, 3, 7}
    local m1, m2 = T.randn(shape), T.randn(shape)
    local l1, l2 = T.randn(shape) * 0.5, T.randn(shape) * 0.5
    cmp("normal_kl full", D.normal_kl(m1:cuda(), l1:cuda(), m2:cuda(), l2:cuda()), D.normal_kl(m1, l1, m2, l2), ELEM)
    local z, zg = T.zeros({1}), T.zeros({1}):cuda()
    cmp("normal_kl vs N(0, I) (broadcast scalars)", D.normal_kl(m1:cuda(), l1:cuda(), zg, zg), D.normal_kl(m1, l1, z, z), ELEM)
    cmp("normal_kl scalar first argument", D.normal_kl(zg, l1:cuda(), m2:cuda(), zg), D.normal_kl(z, l1, m2, z), ELEM)
    local x = (T.rand(shape) * 2 - 1)
    x:narrow(3, 1, 1):fill_(-1); x:narrow(3, 2, 1):fill_(1)
    local means, ls = x + T.randn(shape) * 0.05, T.randn(shape) * 0.3 - 3
    cmp("dgll full (edge bins included)", D.discretized_gaussian_log_likelihood(x:cuda(), means:cuda(), ls:cuda()),
      D.discretized_gaussian_log_likelihood(x, means, ls), ELEM)
    local s, sg = T.full({1}, -2.5), T.full({1}, -2.5):cuda()
    cmp("dgll scalar log_scale", D.discretized_gaussian_log_likelihood(x:cuda(), means:cuda(), sg),
      D.discretized_gaussian_log_likelihood(x, means, s), ELEM)
  end)
  if not ok then H.check("elementwise losses", false, e) end
end

-- calc_bpd_loop with a fixed model (a smooth function of x_t and t), CPU vs device:
-- the loop's noise is drawn on x0's device from the same generator stream
do
  local ok, e = pcall(function()
    local d = D.new{steps = 12, noise_schedule = "cosine", learn_sigma = true}
    local B = 3
    local x0 = (T.rand({B, 2, 4, 4}) * 2 - 1):clamp(-1, 1)
    local function model(xt, ts)
      local s = ts:reshape({B, 1, 1, 1}) * (1 / 1000)
      return T.cat({xt * 0.3 + s, (xt * 0.2):tanh()}, 2)
    end
    local rc = d:calc_bpd_loop(model, x0, {generator = T.generator(SEED, 7)})
    local rg = d:calc_bpd_loop(model, x0:cuda(), {generator = T.generator(SEED, 7)})
    for _, k in ipairs({"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}) do
      cmp("calc_bpd_loop " .. k, rg[k], rc[k], LOOP, false)
    end
    H.check("calc_bpd_loop results come back to the CPU", rg.total_bpd:device() == "cpu" and rg.prior_bpd:device() == "cpu")
  end)
  if not ok then H.check("calc_bpd_loop", false, e) end
end

-- errors keep naming the op and the shapes on the device path
H.raises("vb_terms_bpd shape error on the device", function()
  local d = D.new{steps = 10, noise_schedule = "cosine", learn_sigma = true}
  return d._c:vb_terms_bpd(T.zeros({2, 3, 4, 4}):cuda(), T.zeros({2, 3, 4, 4}):cuda(), T.zeros({2, 3, 4, 4}):cuda(),
    ints({0, 1}), true)
end, "model output")
H.raises("vb_terms_bpd t out of range on the device", function()
  local d = D.new{steps = 10, noise_schedule = "cosine"}
  return d._c:vb_terms_bpd(T.zeros({2, 3, 4, 4}):cuda(), T.zeros({2, 3, 4, 4}):cuda(), T.zeros({2, 3, 4, 4}):cuda(),
    ints({0, 10}), true)
end, "10")

H.done()
