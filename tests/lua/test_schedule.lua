-- test_schedule.lua — custom noise schedules where users write them: D.new's option
-- check ("did you mean"), the 0-based schedule accessors (diff:alpha_bar(t), ...)
-- against plain array indexing, noise_schedule as a function alpha_bar(t) or a table of
-- betas (against betas computed here by the formula), and a tiny training run whose
-- recipe gives a function: its checkpoint stores the betas, and sampling from it with
-- the recipe file deleted rebuilds the same schedule, and so does recipes/eval_nll.lua.
local H = require "harness"
local iddpm = require "iddpm"
local D = iddpm.diffusion
local recipe = require "iddpm.recipe"
local checkpoint = require "iddpm.checkpoint"
local S = require "iddpm.sample"

-- betas computed twice by the same double-precision formula: only rounding differs
local TOL_BETAS = 1e-12
-- betas stored as float64 in the checkpoint and read back: no rounding at all
local TOL_STORED = 0
-- the prior term in the engine runs on float32 images: relative rounding ~1e-6
local TOL_PRIOR = 1e-5

local TMP = os.tmpname()
os.remove(TMP)
assert(require("lfs").mkdir(TMP))
local BIN = "./iddpm"
if arg then local i = -1; while arg[i - 1] do i = i - 1 end; if arg[i] then BIN = arg[i] end end
print("# seeds: 0 (tiny training run); tmp " .. TMP)

-- ---------------------------------------------------------------- option names

H.raises("D.new: misspelt option suggests the right one", function() D.new{steps = 10, noise_schedul = "cosine"} end,
  "did you mean 'noise_schedule'?")
H.raises("D.new: unknown option is named", function() D.new{steps = 10, noise_schedul = "cosine"} end,
  "unknown option 'noise_schedul'")
H.raises("D.new: a beta outside (0,1]", function() D.new{noise_schedule = {0.1, 0, 0.2}} end, "betas[2]")

-- ---------------------------------------------------------------- accessors

local d = D.new{steps = 12, noise_schedule = "cosine", learn_sigma = true}
do
  local worst = 0
  for t = 0, 11 do
    for m, name in pairs(D.ACCESSORS) do
      worst = math.max(worst, math.abs(d[m](d, t) - d[name][t + 1]))
    end
    worst = math.max(worst, math.abs(d:at("alphas_cumprod", t) - d.alphas_cumprod[t + 1]))
  end
  H.check("accessors: diff:<name>(t) == array[t + 1] for every array and t = 0..T-1", worst == 0, worst)
  local l = d:alpha_bar({0, 5, 11})
  H.check("accessors: a list of timesteps gives a list", #l == 3 and l[1] == d.alphas_cumprod[1] and
    l[3] == d.alphas_cumprod[12])
end
H.raises("accessors: t = T is out of range", function() return d:alpha_bar(12) end, "0..11")
H.raises("accessors: t = -1 is out of range", function() return d:beta(-1) end, "diff:beta")
H.raises("accessors: a fractional t", function() return d:alpha_bar(1.5) end, "0-based")
do
  local r = D.new{steps = 12, noise_schedule = "cosine", timestep_respacing = "4"}
  H.check("accessors: a respaced process is indexed by its own 0-based t", r:alpha_bar(3) == r.alphas_cumprod[4]
    and r.num_timesteps == 4)
end

-- ---------------------------------------------------------------- function and table schedules

local TT = 50
-- the official betas_for_alpha_bar, written out here
local function naive_betas(f, n)
  local b = {}
  for i = 0, n - 1 do b[i + 1] = math.min(1 - f((i + 1) / n) / f(i / n), 0.999) end
  return b
end
local function sigmoid_ab(u) return 1 / (1 + math.exp(12 * u - 6)) / (1 / (1 + math.exp(-6))) end
local want = naive_betas(sigmoid_ab, TT)
local df = D.new{steps = TT, noise_schedule = sigmoid_ab}
H.close("function schedule: betas == formula", df.base_betas, want, TOL_BETAS)
H.close("function schedule: alpha_bar(t) == prod(1 - beta)", {df:alpha_bar(TT - 1)},
  {(function() local p = 1 for i = 1, TT do p = p * (1 - want[i]) end return p end)()}, TOL_BETAS)
local dt = D.new{noise_schedule = want}
H.check("table schedule: T is the table's length", dt.num_timesteps == TT)
H.close("table schedule: the same process as the function", dt.alphas_cumprod, df.alphas_cumprod, TOL_BETAS)
local cos = function(u) return math.cos((u + 0.008) / 1.008 * math.pi / 2) ^ 2 end
H.close("function schedule: the cosine written in Lua == the named cosine", D.new{steps = TT, noise_schedule = cos}.betas,
  D.new{steps = TT, noise_schedule = "cosine"}.betas, TOL_BETAS)

-- recipes
do
  local c = recipe.resolve({noise_schedule = sigmoid_ab, diffusion_steps = TT, num_samples = 0})
  H.check("recipe: a function noise_schedule is kept", c.noise_schedule == sigmoid_ab)
  H.check("recipe: describe names it", recipe.describe(c):find("function alpha_bar", 1, true) ~= nil)
  local ct = recipe.resolve({noise_schedule = want, num_samples = 0})
  H.check("recipe: a table of betas sets diffusion_steps", ct.diffusion_steps == TT, ct.diffusion_steps)
  H.raises("recipe: table length vs diffusion_steps", function() recipe.resolve({noise_schedule = want, diffusion_steps = 7}) end,
    "has 50 betas")
  H.raises("recipe: a bad beta in the table", function() recipe.resolve({noise_schedule = {0.1, 2}}) end, "betas[2]")
  H.raises("recipe: a schedule of the wrong type", function() recipe.resolve({noise_schedule = true}) end, "noise_schedule")
end

-- ---------------------------------------------------------------- train, delete the script, sample

do
  local run = TMP .. "/run"
  local script = TMP .. "/my_schedule.lua"
  local f = assert(io.open(script, "w"))
  f:write([[
local function alpha_bar(t) return 1 / (1 + math.exp(12 * t - 6)) / (1 / (1 + math.exp(-6))) end
return require("iddpm.recipe").run({dataset = "random", image_size = 8, num_images = 8, in_channels = 1,
  num_channels = 32, num_res_blocks = 1, channel_mult = "1,2", attention_resolutions = "", learn_sigma = true,
  diffusion_steps = 50, noise_schedule = alpha_bar, batch_size = 4, max_steps = 2, log_interval = 1,
  save_interval = 1000, num_samples = 0, seed = 0}, arg)
]])
  f:close()
  local ok = os.execute(("%s run %s run_dir=%s > %s/train.txt 2>&1"):format(BIN, script, run, TMP))
  H.check("train: a recipe with a function schedule trains", ok)
  os.remove(script)
  local l = checkpoint.latest(run)
  H.check("train: wrote a checkpoint", l ~= nil)
  if l then
    local ck = checkpoint.read(l.path)
    H.check("checkpoint: config.noise_schedule is \"custom\"", ck.config.noise_schedule == "custom", ck.config.noise_schedule)
    H.check("checkpoint: holds diffusion.betas", ck.tensors["diffusion.betas"] ~= nil)
    local _, diff = S.load(run, {steps = ""})
    H.close("sample.load without the script: the recipe's betas", diff.base_betas, want, TOL_BETAS)
    H.close("sample.load: the stored betas exactly", diff.base_betas, ck.tensors["diffusion.betas"]:totable(), TOL_STORED)
    local _, fast = S.load(run, {steps = "10"})
    local ref = D.new{noise_schedule = want, timestep_respacing = "10"}
    H.close("sample.load: respacing the stored schedule", fast.alphas_cumprod, ref.alphas_cumprod, TOL_BETAS)
    -- eval_nll from the run directory (script gone): its prior term depends on the
    -- schedule alone (KL of q(x_T | x_0) from N(0, I)), recomputed here by the formula
    local imgs = {}
    for i = 1, 2 * 64 do imgs[i] = (i * 53) % 256 end
    local npz = TMP .. "/two.npz"
    iddpm.io.npz_write(npz, {{"arr_0", iddpm.tensor.from_table(imgs, {2, 8, 8, 1}, "uint8")}})
    local okn = os.execute(("%s run recipes/eval_nll.lua checkpoint=%s data=%s num=2 batch_size=2 > %s/nll.txt 2>&1")
      :format(BIN, run, npz, TMP))
    H.check("eval_nll: runs on the run directory", okn)
    local jf = io.open(run .. "/eval/nll.json")
    H.check("eval_nll: writes RUN/eval/nll.json by default", jf ~= nil)
    if jf then
      local res = iddpm.io.json_decode(jf:read("a"))
      jf:close()
      local ab = 1
      for i = 1, TT do ab = ab * (1 - want[i]) end
      local kl = 0
      for i = 1, #imgs do
        local x = imgs[i] / 127.5 - 1
        local m, v = math.sqrt(ab) * x, 1 - ab
        kl = kl + 0.5 * (-1 - math.log(v) + v + m * m) / math.log(2)
      end
      H.check("eval_nll: T = 50 from the stored betas", res.T == TT, res.T)
      H.close("eval_nll: prior bpd == the formula with the recipe's alpha_bar(T-1)", {res.prior_bpd}, {kl / #imgs}, TOL_PRIOR)
    end
    -- resuming with another schedule is refused
    local c = recipe.resolve({dataset = "random", image_size = 8, num_images = 8, in_channels = 1, num_channels = 32,
      num_res_blocks = 1, channel_mult = "1,2", attention_resolutions = "", learn_sigma = true, diffusion_steps = 50,
      noise_schedule = cos, batch_size = 4, max_steps = 3, num_samples = 0, run_dir = run})
    H.raises("resume: another function schedule is refused", function() require("iddpm.train").new(c, {quiet = true}) end,
      "another noise schedule")
  end
end

os.execute(("rm -rf '%s'"):format(TMP))
H.done()
