-- test_sample_loop_ref.lua — whole sampling loops against the official improved-diffusion
-- run in float64 (tests/ref/sample_loop_ref.json, made by tests/ref/make_sample_loop_ref.py):
-- cosine T=100 respaced to "10", learned-range sigma, a fixed fake model
-- cat([0.3 x + 0.001 t_model, 0.5 tanh(x)]), fixed x_T and per-step noise.
local H = require "harness"
local iddpm = require "iddpm"
local cjson = require "cjson"
local T, D = iddpm.tensor, iddpm.diffusion

-- Ten float32 steps against a float64 run: each step rounds x_t to float32 and
-- pred_xstart amplifies that by sqrt(1/abar) (<= ~1e2 here at t = T-1 of "10");
-- clipping then bounds it. 1e-4 relative (floor 1e-4) is the brief's bound.
local TOL_LOOP, FLOOR_LOOP = 1e-4, 1e-4

local f = assert(io.open("tests/ref/sample_loop_ref.json", "r"))
local R = cjson.decode(f:read("a"))
f:close()
local m = R.meta
local shape = {}
for i, v in ipairs(m.shape) do shape[i] = math.tointeger(v) end
local diff = D.new{steps = math.tointeger(m.steps), noise_schedule = m.schedule, learn_sigma = true,
  timestep_respacing = m.timestep_respacing}
H.close("timestep_map", diff.timestep_map, R.timestep_map, 0, 1)

local model = function(x, t, y)
  local tb = T.from_table(t:totable(), {shape[1], 1, 1, 1})
  return T.cat({x * 0.3 + tb * 0.001, x:tanh() * 0.5}, 2)
end
local xT = T.from_table(R.x_T, shape)
local noises = {}
for i, n in ipairs(R.step_noise) do noises[i] = T.from_table(n, shape) end
local N = diff.num_timesteps
local step_noise = function(t) return noises[N - t] end   -- t = N-1 is the first step

local s = diff:p_sample_loop(model, shape, {noise = xT, step_noise = step_noise, clip_denoised = true})
H.close("p_sample_loop (10 respaced steps)", s, R.p_sample_loop, TOL_LOOP, FLOOR_LOOP)
for _, eta in ipairs{0, 1} do
  local d = diff:ddim_sample_loop(model, shape, {noise = xT, step_noise = step_noise, clip_denoised = true, eta = eta})
  H.close("ddim_sample_loop eta=" .. eta, d, R["ddim_eta" .. eta], TOL_LOOP, FLOOR_LOOP)
end
print(("# worst rel err: p_sample_loop %.2e, ddim eta0 %.2e, eta1 %.2e"):format(H.max_rel(s, R.p_sample_loop, FLOOR_LOOP),
  H.max_rel(diff:ddim_sample_loop(model, shape, {noise = xT, step_noise = step_noise, eta = 0}), R.ddim_eta0, FLOOR_LOOP),
  H.max_rel(diff:ddim_sample_loop(model, shape, {noise = xT, step_noise = step_noise, eta = 1}), R.ddim_eta1, FLOOR_LOOP)))
H.done()
