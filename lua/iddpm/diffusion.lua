-- iddpm/diffusion.lua — Improved DDPM's Gaussian diffusion for Lua.
--
-- The mathematics is in C (engine/diffusion, bound as iddpm._diffusion by
-- lua/l_diffusion.c); this module is the official code's API around it:
--
--   D.schedule(name | alpha_bar_fn, T)          -> Lua array of betas
--   D.space_timesteps(T, spec)                  -> Lua array of retained 0-based steps
--   D.new{steps, noise_schedule, learn_sigma, sigma_small, use_kl, predict_xstart,
--         rescale_timesteps, rescale_learned_sigmas, timestep_respacing, betas}
--       noise_schedule: "linear" | "cosine" | a function alpha_bar(u), u in [0,1] |
--       a table of betas; an unknown option is an error ("did you mean ...?")
--   diff:alpha_bar(t), diff:beta(t), ... (D.ACCESSORS): schedule values at 0-based t;
--   diff.base_betas: the betas before respacing (what a checkpoint stores)
--   diff:q_sample, q_mean_variance, q_posterior_mean_variance, p_mean_variance,
--        p_sample, ddim_sample, ddim_reverse_sample, training_losses,
--        p_sample_loop(_progressive), ddim_sample_loop(_progressive), calc_bpd_loop
--   D.normal_kl, D.discretized_gaussian_log_likelihood, D.sampler(name, diff)
--
-- As in the official create_gaussian_diffusion(), every diffusion is "spaced": the
-- base schedule is always re-derived through respacing (even for ""), and the model
-- sees timestep_map[t] * 1000 / T_original (rescale_timesteps) or timestep_map[t].
-- t is a Lua array of 0-based timesteps, one integer (broadcast to the batch), or an
-- int64 tensor. `model` is any callable (function or table with __call):
-- model(x_t, t_model, y) -> tensor of x_t's shape (2C channels if learn_sigma).
-- Noise comes from opts.generator (T.generator(seed)) or the default generator.
local T = package.loaded["iddpm.tensor"] or require("iddpm").tensor
local C = package.loaded["iddpm._diffusion"] or require("iddpm")._diffusion

local D = {}

-- ---------------------------------------------------------------- helpers

local function is_callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return mt ~= nil and type(mt) == "table" and mt.__call ~= nil
end

local function shape_str(s) return "(" .. table.concat(s, ",") .. ")" end

-- call a C method; an error comes back naming the Lua API function, at the caller
local function ccall(fname, f, ...)
  local r = table.pack(pcall(f, ...))
  if not r[1] then
    local msg = tostring(r[2]):gsub("^[^:]*:%d+: ", ""):gsub("^diffusion%.[%w_]+: ", "")
    error(fname .. ": " .. msg, 3)
  end
  return table.unpack(r, 2, r.n)
end

local function batch_of(x) return x:shape()[1] end

-- t (array, integer or tensor) -> int64 tensor of length B
local function to_t(t, B, fname)
  if T.is_tensor(t) then
    if t:dtype() == "int64" then return t end
    local v = t:totable()
    for i, x in ipairs(v) do
      if x ~= math.floor(x) then error(("%s: t[%d] = %s is not an integer timestep"):format(fname, i, x), 3) end
    end
    return t:long()
  elseif math.type(t) == "integer" or (type(t) == "number" and t == math.floor(t)) then
    local v = {}
    for i = 1, B do v[i] = math.tointeger(t) end
    return T.from_table(v, {B}, "int64")
  elseif type(t) == "table" then
    for i = 1, #t do
      if math.type(t[i]) ~= "integer" and not (type(t[i]) == "number" and t[i] == math.floor(t[i])) then
        error(("%s: t[%d] = %s is not an integer timestep"):format(fname, i, tostring(t[i])), 3)
      end
    end
    if #t == 0 then error(fname .. ": t is empty", 3) end
    return T.from_table(t, {#t}, "int64")
  end
  error(("%s: t must be a Lua array of 0-based timesteps, an integer or an int64 tensor, got %s"):format(fname, type(t)), 3)
end

local function to_y(y)
  if y == nil or T.is_tensor(y) then return y end
  if type(y) == "table" then return T.from_table(y, {#y}, "int64") end
  return y
end

local function check_tensor(x, fname, what)
  if not T.is_tensor(x) then error(("%s: %s must be a tensor, got %s"):format(fname, what, type(x)), 3) end
  return x
end

local function get_y(opts)
  return to_y(opts.y ~= nil and opts.y or (opts.model_kwargs and opts.model_kwargs.y))
end

-- noise on x's device (the same numbers on every device: counter-based Philox)
local function randn_like(x, gen)
  local dev = x:device()
  if dev ~= "cpu" then return T.randn(x:shape(), gen, "float32", dev) end
  return gen and T.randn(x:shape(), gen) or T.randn(x:shape())
end

-- call the model and check what it returns
local function call_model(self, model, fname, xt, t, y)
  if not is_callable(model) then error(fname .. ": model must be a function or a callable object", 3) end
  local mt = ccall("diff:model_t", self._c.model_t, self._c, t)
  if mt:device() ~= xt:device() then mt = mt:to(xt:device()) end
  if y ~= nil and y:device() ~= xt:device() then y = y:to(xt:device()) end
  local out = model(xt, mt, y)
  if not T.is_tensor(out) then
    error(("%s: model returned a %s, expected a tensor of shape %s%s"):format(fname, type(out),
      shape_str(xt:shape()), self.learned_sigma and " with twice the channels" or ""), 3)
  end
  return out
end

-- ---------------------------------------------------------------- schedules

local function int(v) return type(v) == "number" and math.tointeger(v) or v end

function D.schedule(name, steps, max_beta)
  steps = int(steps)
  if math.type(steps) ~= "integer" or steps < 1 then
    error(("D.schedule: T must be an integer >= 1, got %s"):format(tostring(steps)), 2)
  end
  if type(name) == "function" then return C.betas_from_alpha_bar(steps, name, max_beta or 0.999) end
  if type(name) ~= "string" then error("D.schedule: name must be \"linear\", \"cosine\" or a function alpha_bar(u)", 2) end
  local ok, res = pcall(C.betas_named, name, steps)
  if not ok then error("D.schedule: " .. tostring(res), 2) end
  return res
end

function D.space_timesteps(steps, spec)
  steps = int(steps)
  if type(spec) == "table" then spec = table.concat(spec, ",") end
  if spec ~= nil and type(spec) ~= "string" then spec = tostring(spec) end
  local ok, res = pcall(C.space_timesteps, steps, spec or "")
  if not ok then error("D.space_timesteps: " .. tostring(res), 2) end
  return res
end

-- ---------------------------------------------------------------- construction

local Diffusion = {}
Diffusion.__index = Diffusion
D.Diffusion = Diffusion

local DEFAULTS = {
  steps = 1000, noise_schedule = "linear", learn_sigma = false, sigma_small = false, use_kl = false,
  predict_xstart = false, rescale_timesteps = true, rescale_learned_sigmas = true, timestep_respacing = "",
}
D.defaults = DEFAULTS

local function opt(cfg, k) if cfg[k] == nil then return DEFAULTS[k] end return cfg[k] end

-- every key D.new understands; anything else is a typo and an error
D.KEYS = {"steps", "diffusion_steps", "noise_schedule", "betas", "learn_sigma", "sigma_small", "use_kl",
  "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas", "timestep_respacing", "model_mean_type",
  "model_var_type", "loss_type"}
local KNOWN = {}
for _, k in ipairs(D.KEYS) do KNOWN[k] = true end

-- edit distance, for "did you mean"
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = {[0] = i}
    for j = 1, #b do
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a:sub(i, i) == b:sub(j, j) and 0 or 1))
    end
    prev = cur
  end
  return prev[#b]
end

local function check_keys(cfg)
  for k in pairs(cfg) do
    if not KNOWN[k] then
      local best, bd = nil, 4
      for _, n in ipairs(D.KEYS) do
        local d = type(k) == "string" and distance(k, n) or math.huge
        if d < bd then best, bd = n, d end
      end
      error(("D.new: unknown option '%s'%s; valid options: %s"):format(tostring(k),
        best and (" (did you mean '" .. best .. "'?)") or "", table.concat(D.KEYS, ", ")), 3)
    end
  end
end

-- noise_schedule may be a name, a function alpha_bar(u) (u in [0,1]) or a table of betas
function D.new(cfg)
  cfg = cfg or {}
  if type(cfg) ~= "table" then error("D.new: expected a table of options", 2) end
  check_keys(cfg)
  local steps = int(cfg.steps or cfg.diffusion_steps or DEFAULTS.steps)
  local betas
  if type(cfg.betas) ~= "table" and type(cfg.noise_schedule) == "table" and cfg.betas == nil then
    cfg = setmetatable({betas = cfg.noise_schedule}, {__index = cfg})
  end
  if type(cfg.betas) == "table" then
    betas = cfg.betas
    for i = 1, #betas do
      local b = betas[i]
      if type(b) ~= "number" or not (b > 0 and b <= 1) then
        error(("D.new: betas[%d] = %s is not in (0, 1]"):format(i, tostring(b)), 2)
      end
    end
    if #betas == 0 then error("D.new: betas is empty", 2) end
    if cfg.steps ~= nil and int(cfg.steps) ~= #betas then
      error(("D.new: steps = %s but betas has %d entries"):format(tostring(cfg.steps), #betas), 2)
    end
    steps = #betas
  else
    if math.type(steps) ~= "integer" or steps < 1 then
      error(("D.new: steps must be an integer >= 1, got %s"):format(tostring(steps)), 2)
    end
    local sched = cfg.betas or opt(cfg, "noise_schedule")
    local ok, res = pcall(D.schedule, sched, steps)
    if not ok then error("D.new: noise_schedule: " .. tostring(res):gsub("^D%.schedule: ", ""), 2) end
    betas = res
  end
  local learn_sigma, sigma_small = opt(cfg, "learn_sigma"), opt(cfg, "sigma_small")
  local mean = cfg.model_mean_type or (opt(cfg, "predict_xstart") and "start_x" or "epsilon")
  local var = cfg.model_var_type or (learn_sigma and "learned_range" or (sigma_small and "fixed_small" or "fixed_large"))
  local loss = cfg.loss_type or (opt(cfg, "use_kl") and "rescaled_kl"
    or (opt(cfg, "rescale_learned_sigmas") and "rescaled_mse" or "mse"))
  local respacing = opt(cfg, "timestep_respacing")
  if type(respacing) == "table" then respacing = table.concat(respacing, ",") end
  if type(respacing) ~= "string" then
    error("D.new: timestep_respacing must be a string (\"\", \"100\", \"ddim50\", \"10,20\") or a list", 2)
  end
  local ok, c = pcall(C.new, betas, respacing, mean, var, loss, opt(cfg, "rescale_timesteps"))
  if not ok then error(tostring(c):gsub("^diffusion%.new", "D.new"), 2) end
  local self = setmetatable({_c = c, base_betas = betas}, Diffusion)
  local arrays, n, n_orig, map = c:arrays()
  for k, v in pairs(arrays) do self[k] = v end
  self.num_timesteps, self.original_num_steps, self.timestep_map = n, n_orig, map
  self.use_timesteps = map
  self.model_mean_type, self.model_var_type, self.loss_type, self.learned_sigma = c:config()
  self.rescale_timesteps = opt(cfg, "rescale_timesteps") and true or false
  self.timestep_respacing = respacing
  return self
end

-- ---------------------------------------------------------------- schedule accessors

-- diff:alpha_bar(t), diff:beta(t), ...: the schedule arrays indexed by a 0-based
-- timestep t (as everywhere else in the diffusion API), so that nobody writes
-- alphas_cumprod[t + 1]. t may also be a Lua array of timesteps (-> a Lua array).
-- The arrays are those of the (respaced) process: t runs over 0 .. num_timesteps-1.
D.ACCESSORS = {beta = "betas", alpha = "alphas", alpha_bar = "alphas_cumprod",
  alpha_bar_prev = "alphas_cumprod_prev", alpha_bar_next = "alphas_cumprod_next",
  sqrt_alpha_bar = "sqrt_alphas_cumprod", sqrt_one_minus_alpha_bar = "sqrt_one_minus_alphas_cumprod",
  posterior_log_variance = "posterior_log_variance_clipped"}
-- (arrays whose name is already short, e.g. posterior_variance: diff:at("posterior_variance", t))

local function lookup(self, method, name, t)
  local arr = self[name]
  if type(arr) ~= "table" then error(("diff:at: no schedule array '%s'"):format(tostring(name)), 3) end
  local n = self.num_timesteps
  local function one(v, i)
    local ti = math.type(v) == "integer" and v or (type(v) == "number" and math.tointeger(v))
    if not ti or ti < 0 or ti >= n then
      error(("diff:%s: t%s = %s is not a timestep in 0..%d (timesteps are 0-based)"):format(method,
        i and ("[" .. i .. "]") or "", tostring(v), n - 1), 4)
    end
    return arr[ti + 1]
  end
  if type(t) == "table" then
    local r = {}
    for i = 1, #t do r[i] = one(t[i], i) end
    return r
  end
  return one(t)
end

-- diff:at("alphas_cumprod", t): any schedule array at 0-based t
function Diffusion:at(name, t) return lookup(self, "at", name, t) end

for method, name in pairs(D.ACCESSORS) do
  Diffusion[method] = function(self, t) return lookup(self, method, name, t) end
end

function Diffusion:__tostring()
  return ("GaussianDiffusion(T=%d of %d, mean=%s, var=%s, loss=%s)"):format(self.num_timesteps,
    self.original_num_steps, self.model_mean_type, self.model_var_type, self.loss_type)
end

-- ---------------------------------------------------------------- forward process

function Diffusion:q_sample(x0, t, noise, gen)
  check_tensor(x0, "diff:q_sample", "x_start")
  t = to_t(t, batch_of(x0), "diff:q_sample")
  noise = noise or randn_like(x0, gen)
  return ccall("diff:q_sample", self._c.q_sample, self._c, x0, t, check_tensor(noise, "diff:q_sample", "noise"))
end

function Diffusion:q_mean_variance(x0, t)
  check_tensor(x0, "diff:q_mean_variance", "x_start")
  return ccall("diff:q_mean_variance", self._c.q_mean_variance, self._c, x0, to_t(t, batch_of(x0), "diff:q_mean_variance"))
end

function Diffusion:q_posterior_mean_variance(x0, xt, t)
  check_tensor(x0, "diff:q_posterior_mean_variance", "x_start")
  check_tensor(xt, "diff:q_posterior_mean_variance", "x_t")
  return ccall("diff:q_posterior_mean_variance", self._c.q_posterior, self._c, x0, xt, to_t(t, batch_of(x0), "diff:q_posterior_mean_variance"))
end

function Diffusion:predict_xstart_from_eps(xt, t, eps)
  return ccall("diff:predict_xstart_from_eps", self._c.predict_xstart_from_eps, self._c, xt, to_t(t, batch_of(xt), "diff:predict_xstart_from_eps"), eps)
end

function Diffusion:predict_eps_from_xstart(xt, t, x0)
  return ccall("diff:predict_eps_from_xstart", self._c.predict_eps_from_xstart, self._c, xt, to_t(t, batch_of(xt), "diff:predict_eps_from_xstart"), x0)
end

-- ---------------------------------------------------------------- reverse process

-- opts: clip_denoised (default true), denoised_fn, y, model_kwargs
function Diffusion:p_mean_variance(model, xt, t, opts)
  opts = opts or {}
  local fname = opts._fname or "diff:p_mean_variance"
  check_tensor(xt, fname, "x_t")
  t = to_t(t, batch_of(xt), fname)
  local mo = call_model(self, model, fname, xt, t, get_y(opts))
  local raw = ccall(fname, self._c.pred_xstart_raw, self._c, mo, xt, t)
  if opts.denoised_fn then
    raw = opts.denoised_fn(raw)
    check_tensor(raw, fname, "denoised_fn's result")
  end
  local clip = opts.clip_denoised
  if clip == nil then clip = true end
  local mean, var, logvar, pred = ccall(fname, self._c.p_finish, self._c, mo, xt, t, raw, clip)
  return {mean = mean, variance = var, log_variance = logvar, pred_xstart = pred, model_output = mo}
end

-- the common start of one sampling step: check x_t and t, run p_mean_variance
local function step_start(self, fname, model, xt, t, opts)
  check_tensor(xt, fname, "x_t")
  t = to_t(t, batch_of(xt), fname)
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o._fname = fname
  return t, self:p_mean_variance(model, xt, t, o)
end

-- -> sample, pred_xstart
function Diffusion:p_sample(model, xt, t, opts)
  opts = opts or {}
  local out
  t, out = step_start(self, "diff:p_sample", model, xt, t, opts)
  local noise = opts.noise or randn_like(xt, opts.generator)
  return ccall("diff:p_sample", self._c.p_sample_step, self._c, out.mean, out.log_variance, noise, t), out.pred_xstart
end

-- -> sample, pred_xstart. opts.eta (default 0)
function Diffusion:ddim_sample(model, xt, t, opts)
  opts = opts or {}
  local out
  t, out = step_start(self, "diff:ddim_sample", model, xt, t, opts)
  local noise = opts.noise or randn_like(xt, opts.generator)
  return ccall("diff:ddim_sample", self._c.ddim_step, self._c, xt, out.pred_xstart, noise, t, opts.eta or 0), out.pred_xstart
end

-- x_t -> x_{t+1} by the reverse ODE (eta must be 0) -> sample, pred_xstart
function Diffusion:ddim_reverse_sample(model, xt, t, opts)
  opts = opts or {}
  local out
  t, out = step_start(self, "diff:ddim_reverse_sample", model, xt, t, opts)
  return ccall("diff:ddim_reverse_sample", self._c.ddim_reverse_step, self._c, xt, out.pred_xstart, t, opts.eta or 0),
    out.pred_xstart
end

-- ---------------------------------------------------------------- CUDA graphs for the model call

-- D.graphed(model) -> a callable with the model's signature (x_t, t, y) that replays the
-- model's forward as a CUDA graph (iddpm.cuda.graph_capture, engine/cuda/graph.cu):
-- per (x_t, t, y shapes and dtypes, precision, conv implementation) the first call runs
-- as usual (the warm-up: cuDNN's search, workspaces), the second copies its inputs into
-- fixed device tensors and captures the forward (under no_grad), and every later call
-- copies x_t, t, y in and replays. The result is the graph's output tensor, rewritten by
-- the next call of the same shape: use it (or clone it) before then. The same results as
-- the eager forward, bit for bit (the same kernels, inputs and algorithms). Where no
-- graph can be used the model is simply called: not on a GPU (CPU, IDDPM_FAKE_CUDA=1),
-- a model in training mode (dropout draws would be frozen), or a forward that cannot be
-- captured (e.g. a class-conditional UNet checks its labels on the host);
-- D.graph_info(model) tells which. One wrapper (and its graphs) per model, collected
-- with it or freed by D.graph_free(model); at most MAX_GRAPHS shapes are kept per model.
local graph_cache = setmetatable({}, {__mode = "k"})
local MAX_GRAPHS = 4

local function graph_key(cu, x, t, y)
  local function d(v) return v == nil and "-" or (shape_str(v:shape()) .. v:dtype()) end
  -- the activation dtype (bf16 channels-last or float32) changes the captured kernels too
  return table.concat({d(x), d(t), d(y), cu.precision(), cu.conv_impl(),
    tostring(require("iddpm.device").activation_dtype(x))}, " ")
end

function D.graphed(model)
  if not is_callable(model) then error("D.graphed: model must be a function or a callable object", 2) end
  local c = graph_cache[model]
  if c then return c.call end
  local cu = require("iddpm").cuda
  local entries, count = {}, 0
  local function eager(x, t, y) return model(x, t, y) end
  local function call(x, t, y)
    if x:device() ~= "cuda" or not cu.graph_supported() or cu.capturing()
      or (type(model) == "table" and model.training) then
      return eager(x, t, y)
    end
    local key = graph_key(cu, x, t, y)
    local e = entries[key]
    if e == nil then   -- the warm-up call of this shape
      if count >= MAX_GRAPHS then
        for k, v in pairs(entries) do if v.graph then v.graph:free() end; entries[k] = nil end
        count = 0
      end
      entries[key] = {state = "warm", calls = 1}
      count = count + 1
      return eager(x, t, y)
    end
    e.calls = e.calls + 1
    if e.state == "eager" then return eager(x, t, y) end
    if e.state == "warm" then
      local sx, st, sy = x:clone(), t:clone(), y and y:clone()
      local ok, g, out = pcall(cu.graph_capture, function()
        return T.no_grad(function() return model(sx, st, sy) end)
      end, 0)
      if not ok or not T.is_tensor(out) then
        if ok then g:free() end
        e.state, e.reason = "eager", ok and "the model returned no tensor" or tostring(g)
        return eager(x, t, y)
      end
      e.state, e.graph, e.out, e.x, e.t, e.y = "graph", g, out, sx, st, sy
    else
      e.x:copy_(x)
      e.t:copy_(t)
      if y ~= nil then e.y:copy_(y) end
    end
    e.graph:replay()
    return e.out
  end
  graph_cache[model] = {call = call, entries = entries}
  return call
end

-- free the graphs of D.graphed(model) now (their memory goes back; the next calls
-- warm up and capture again)
function D.graph_free(model)
  local c = graph_cache[model]
  if not c then return end
  for k, e in pairs(c.entries) do
    if e.graph then e.graph:free() end
    c.entries[k] = nil
  end
  graph_cache[model] = nil
end

-- -> {[key] = {state = "warm" | "graph" | "eager", calls =, reason =}} of D.graphed(model)
function D.graph_info(model)
  local c = graph_cache[model]
  local r = {}
  if c then for k, e in pairs(c.entries) do r[k] = {state = e.state, calls = e.calls, reason = e.reason} end end
  return r
end

-- ---------------------------------------------------------------- sampling loops

-- wall-clock seconds (os.clock is CPU time summed over the engine's threads)
local function now() return require("iddpm").wall_time() end
-- a GC when much tensor memory waits in Lua garbage (iddpm/device.lua)
local function collect() require("iddpm.device").collect() end

local function progress_line(i, n, t0)
  local dt = now() - t0
  io.stderr:write(("\rsampling step %d/%d  %.1fs"):format(i, n, dt))
  if i == n then io.stderr:write("\n") end
end

-- An iterator: each call runs one reverse step (under no_grad) and returns
-- {sample =, pred_xstart =, t =} (t the 0-based step just taken), nil when done.
local function progressive(self, model, shape, opts, step, fname)
  opts = opts or {}
  if type(shape) ~= "table" then
    if T.is_tensor(opts.noise) then shape = opts.noise:shape()
    else error(fname .. ": shape must be a table like {N, C, H, W}", 3) end
  end
  local img = opts.noise
  if img == nil then   -- x_T on opts.device (the same numbers on every device)
    img = T.randn(shape, opts.generator, "float32", opts.device or "cpu")
  else
    check_tensor(img, fname, "opts.noise")
    local s = img:shape()
    if shape_str(s) ~= shape_str(shape) then
      error(("%s: opts.noise has shape %s but shape is %s"):format(fname, shape_str(s), shape_str(shape)), 3)
    end
  end
  local B, i, n, t0 = shape[1], self.num_timesteps - 1, self.num_timesteps, now()
  return function()
    if i < 0 then return nil end
    local prev = T.set_grad_enabled(false)
    local ok, sample, pred = pcall(step, img, i, B)
    T.set_grad_enabled(prev)
    if not ok then error(sample, 2) end
    collect()   -- the step's intermediate tensors (Lua garbage) give their memory back
    img = sample
    local res = {sample = sample, pred_xstart = pred, t = i}
    i = i - 1
    if opts.progress then progress_line(n - i - 1, n, t0) end
    return res
  end
end

local function sample_opts(opts)
  return {clip_denoised = opts.clip_denoised, denoised_fn = opts.denoised_fn, y = opts.y,
    model_kwargs = opts.model_kwargs, generator = opts.generator, eta = opts.eta}
end

-- a progressive loop whose every step is self[step](model, img, i, opts)
local function progressive_with(self, step, model, shape, opts, fname)
  opts = opts or {}
  local so = sample_opts(opts)
  if opts.graph then model = D.graphed(model) end   -- CUDA graphs where possible (D.graphed)
  return progressive(self, model, shape, opts, function(img, i)
    so.noise = opts.step_noise and opts.step_noise(i) or nil
    return self[step](self, model, img, i, so)
  end, fname)
end

function Diffusion:p_sample_loop_progressive(model, shape, opts)
  return progressive_with(self, "p_sample", model, shape, opts, "diff:p_sample_loop")
end

function Diffusion:ddim_sample_loop_progressive(model, shape, opts)
  return progressive_with(self, "ddim_sample", model, shape, opts, "diff:ddim_sample_loop")
end

local function run_loop(it, opts)
  local final
  for step in it do
    if opts and opts.callback then opts.callback(step) end
    final = step
  end
  return final.sample, final
end

-- opts: noise (x_T), clip_denoised, denoised_fn, y, generator, progress, callback(step),
-- step_noise (a function(t) -> the noise tensor for step t, instead of the generator),
-- device (where x_T is drawn when opts.noise is not given: "cpu" or "cuda"),
-- graph (true: replay the model call as a CUDA graph where possible, D.graphed)
function Diffusion:p_sample_loop(model, shape, opts)
  return (run_loop(self:p_sample_loop_progressive(model, shape, opts), opts))
end

-- opts as p_sample_loop plus eta (default 0)
function Diffusion:ddim_sample_loop(model, shape, opts)
  return (run_loop(self:ddim_sample_loop_progressive(model, shape, opts), opts))
end

-- ---------------------------------------------------------------- training and evaluation

-- -> {loss =, mse =, vb =} per-example float32 tensors; loss carries the gradient into
-- the model output (and so into the model's parameters). opts: noise, y, generator.
function Diffusion:training_losses(model, x0, t, opts)
  opts = opts or {}
  local fname = "diff:training_losses"
  check_tensor(x0, fname, "x_start")
  t = to_t(t, batch_of(x0), fname)
  local noise = opts.noise or randn_like(x0, opts.generator)
  check_tensor(noise, fname, "opts.noise")
  local xt = ccall(fname, self._c.q_sample, self._c, x0, t, noise)
  local mo = call_model(self, model, fname, xt, t, get_y(opts))
  local loss, mse, vb = ccall(fname, self._c.training_losses, self._c, mo, x0, xt, noise, t)
  return {loss = loss, mse = mse, vb = vb}
end

-- The variational bound in bits/dim, step by step (official calc_bpd_loop).
-- -> {total_bpd (B), prior_bpd (B), vb (B,T), xstart_mse (B,T), mse (B,T)}; columns
-- run from t = T-1 down to 0, as in the official code. opts: clip_denoised (true),
-- y, generator, progress. With x0 on a device the whole loop runs there (the model,
-- the noise, every term); the results come back to the CPU.
function Diffusion:calc_bpd_loop(model, x0, opts)
  opts = opts or {}
  local fname = "diff:calc_bpd_loop"
  check_tensor(x0, fname, "x_start")
  local B, n = batch_of(x0), self.num_timesteps
  local clip = opts.clip_denoised
  if clip == nil then clip = true end
  local y = get_y(opts)
  local vb, xmse, mse = {}, {}, {}
  local total = {}
  for b = 1, B do total[b] = 0 end
  local t0 = now()
  -- on a device every op stays there; the (B) columns are read back after the loop
  local cols = {}
  local function read(col, c)
    c = {c[1]:totable(), c[2]:totable(), c[3]:totable()}
    for b = 1, B do
      vb[(b - 1) * n + col] = c[1][b]
      xmse[(b - 1) * n + col] = c[2][b]
      mse[(b - 1) * n + col] = c[3][b]
      total[b] = total[b] + c[1][b]
    end
  end
  local on_cpu = x0:device() == "cpu"
  T.no_grad(function()
    for col = 1, n do
      local step = n - col
      local t = to_t(step, B, fname)
      local noise = randn_like(x0, opts.generator)
      local xt = ccall("diff:q_sample", self._c.q_sample, self._c, x0, t, noise)
      local mo = call_model(self, model, fname, xt, t, y)
      local v, pred = ccall("diff:calc_bpd_loop", self._c.vb_terms_bpd, self._c, mo, x0, xt, t, clip)
      local eps = ccall("diff:predict_eps_from_xstart", self._c.predict_eps_from_xstart, self._c, xt, t, pred)
      cols[col] = {v, C.mean_flat_sq_diff(pred, x0), C.mean_flat_sq_diff(eps, noise)}
      collect()
      if on_cpu then read(col, cols[col]); cols[col] = nil end
      if opts.progress then progress_line(col, n, t0) end
    end
  end)
  if not on_cpu then for col = 1, n do read(col, cols[col]) end end
  local prior = ccall("diff:calc_bpd_loop", self._c.prior_bpd, self._c, x0)
  local p = prior:totable()
  for b = 1, B do total[b] = total[b] + p[b] end
  return {
    total_bpd = T.from_table(total, {B}), prior_bpd = prior:to("cpu"),
    vb = T.from_table(vb, {B, n}), xstart_mse = T.from_table(xmse, {B, n}), mse = T.from_table(mse, {B, n}),
  }
end

-- ---------------------------------------------------------------- elementwise losses

function D.normal_kl(mean1, logvar1, mean2, logvar2) return C.normal_kl(mean1, logvar1, mean2, logvar2) end

-- D.discretized_gaussian_log_likelihood(x, means, log_scales) or (x, {means=, log_scales=})
function D.discretized_gaussian_log_likelihood(x, means, log_scales)
  if type(means) == "table" and not T.is_tensor(means) then means, log_scales = means.means, means.log_scales end
  return C.dgll(x, means, log_scales)
end

-- ---------------------------------------------------------------- timestep samplers

local Sampler = {}
Sampler.__index = Sampler

-- D.sampler("uniform" | "loss-second-moment", diff_or_T)
function D.sampler(name, diff)
  local steps = int(type(diff) == "table" and diff.num_timesteps or diff)
  if math.type(steps) ~= "integer" then error("D.sampler: second argument must be a diffusion or a number of steps", 2) end
  local ok, c = pcall(C.sampler, name, steps)
  if not ok then error(tostring(c):gsub("^diffusion%.sampler", "D.sampler"), 2) end
  return setmetatable({_c = c, name = name, num_timesteps = steps}, Sampler)
end

-- -> t (int64 tensor), weights (float32 tensor: 1 / (T p(t)))
function Sampler:sample(batch, gen) return ccall("sampler:sample", self._c.sample, self._c, batch, gen) end

-- raw per-example losses for the drawn t (tensors or Lua arrays)
function Sampler:update(t, losses)
  if not T.is_tensor(t) then t = T.from_table(t, {#t}, "int64") end
  if not T.is_tensor(losses) then losses = T.from_table(losses, {#losses}, "float64") end
  ccall("sampler:update", self._c.update, self._c, t, losses:detach())
end

function Sampler:weights() return ccall("sampler:weights", self._c.weights, self._c) end
function Sampler:warmed_up() local _, _, w = ccall("sampler:info", self._c.info, self._c); return w end
function Sampler:state() return ccall("sampler:state", self._c.state, self._c) end
function Sampler:load_state(s)
  if type(s) ~= "table" then error("sampler:load_state: expected the table from sampler:state()", 2) end
  if s.name and s.name ~= ccall("sampler:info", self._c.info, self._c) then
    error(("sampler:load_state: state of a %s sampler given to a %s sampler"):format(s.name, (ccall("sampler:info", self._c.info, self._c))), 2)
  end
  ccall("sampler:load_state", self._c.load_state, self._c, s)
end

return D
