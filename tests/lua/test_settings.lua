-- tests/lua/test_settings.lua — how a model runs is a property of the model: recompute,
-- activation dtype and precision set by model:to(device, opts), shared by submodules,
-- saved in checkpoints and restored by the one checkpoint loader
-- (iddpm.checkpoint.load_model), which sampling, evaluation and resume all go through.
local H = require "harness"
local iddpm = require "iddpm"
local T, nn = iddpm.tensor, iddpm.nn
local checkpoint = require "iddpm.checkpoint"
local recipe = require "iddpm.recipe"
local train = require "iddpm.train"
local S = require "iddpm.sample"

local SEED = 5
print("# seed " .. SEED)
local TMP = os.tmpname()
os.remove(TMP)
require("lfs").mkdir(TMP)

local CFG = {image_size = 8, in_channels = 3, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
  attention_resolutions = {4}, num_heads = 2, learn_sigma = true, seed = SEED}

-- defaults, and settings reaching every submodule
local m = nn.unet(CFG)
local d = m:get_settings()
H.check("settings: defaults", d.recompute == nn.SETTINGS.recompute and d.dtype == "auto" and d.precision == "auto")
m:to("cpu", {recompute = false, dtype = "bf16"})
local rb = m.input_blocks:child(1):child(0)
H.check("settings: model:to sets them on every submodule (bf16 -> bfloat16)",
  rb:setting("recompute") == false and rb:setting("dtype") == "bfloat16")
m:to({recompute = true})
H.check("settings: model:to{...} changes only what it names", m:setting("recompute") == true and rb:setting("dtype") == "bfloat16")
m:to("cpu", {recompute = false})

-- never silently ignored
H.raises("settings: iddpm.nn.recompute = false is an error", function() iddpm.nn.recompute = false end,
  "model:to(device, {recompute = false})")
H.raises("settings: iddpm.nn.activations = ... is an error", function() iddpm.nn.activations = "bf16" end,
  "dtype")
H.raises("settings: an unknown setting", function() m:to("cpu", {precison = "fp32"}) end, "unknown setting 'precison'")
H.raises("settings: a bad value", function() m:to("cpu", {precision = "fp8"}) end, "precision=fp8 is not one of")

-- round trip through a checkpoint
local x = T.randn({2, 3, 8, 8}, T.generator(SEED))
T.no_grad(function() for _, p in ipairs(m:parameters()) do p:copy_(p + T.randn(p:shape(), T.generator(SEED + 1)) * 0.05) end end)
local y = T.no_grad(function() return m(x, {1, 2}) end)
local path = checkpoint.save(TMP, {model = m, step = 1, config = {image_size = 8, in_channels = 3, num_channels = 32,
  num_res_blocks = 1, channel_mult = "1,2", attention_resolutions = "4", num_heads = 2, learn_sigma = true,
  diffusion_steps = 10, noise_schedule = "cosine"}})
local m2, _, info = checkpoint.load_model(path, {use_ema = false})
local s2 = m2:get_settings()
H.check("settings: round trip through a checkpoint", s2.recompute == false and s2.dtype == "bfloat16" and s2.precision == "auto",
  ("recompute %s dtype %s precision %s"):format(tostring(s2.recompute), s2.dtype, s2.precision))
H.check("settings: info.settings is what the model runs with", info.settings.dtype == "bfloat16")
local y2 = T.no_grad(function() return m2(x, {1, 2}) end)
H.check("settings: the loaded model computes the same (bf16 activations)", (y2 - y):abs():max():item() == 0)
local m3 = checkpoint.load_model(path, {use_ema = false, settings = {dtype = "float32", recompute = true}})
H.check("settings: opts.settings override the stored ones", m3:setting("dtype") == "float32" and m3:setting("recompute") == true)
local y3 = T.no_grad(function() return m3(x, {1, 2}) end)
-- bf16 activations round to 8 bits of mantissa: the float32 run differs, but not by much
local BF16_TOL = 0.05
H.check("settings: dtype changes the computation (float32 vs bf16)", (y3 - y):abs():max():item() > 0
  and (y3 - y):abs():max():item() < BF16_TOL)

-- the one loader: sampling (S.load), evaluation and resume call checkpoint.load_model
local calls = 0
local real = checkpoint.load_model
checkpoint.load_model = function(...) calls = calls + 1; return real(...) end
S.load(path, {use_ema = false})
H.check("loader: iddpm.sample's S.load goes through checkpoint.load_model", calls == 1)
local TINY = {dataset = "random", image_size = 8, num_images = 16, num_channels = 32, num_res_blocks = 1,
  channel_mult = "1,2", attention_resolutions = "", learn_sigma = true, diffusion_steps = 4, noise_schedule = "cosine",
  batch_size = 4,
  log_interval = 1, save_interval = 100, num_samples = 0, seed = 3, keep_checkpoints = 0, recompute = false}
local function tiny(over)
  local c = {}
  for k, v in pairs(TINY) do c[k] = v end
  for k, v in pairs(over) do c[k] = v end
  return recipe.resolve(c)
end
calls = 0
train.run(tiny{run_dir = TMP .. "/run", max_steps = 1}, {quiet = true})
H.check("loader: a fresh run loads nothing", calls == 0)
local ck = checkpoint.read(checkpoint.latest(TMP .. "/run").path)
H.check("settings: the recipe's recompute=false is saved with the run", ck.settings and ck.settings.recompute == false)
train.run(tiny{run_dir = TMP .. "/run", max_steps = 2}, {quiet = true})
H.check("loader: resume goes through checkpoint.load_model", calls == 1)
calls = 0
local out = TMP .. "/nll"
io.open(TMP .. "/none.npz", "w"):close()   -- --dry-run only checks that data exists
local ok, err = pcall(function()
  arg = {"ckpt=" .. TMP .. "/run", "data=" .. TMP .. "/none.npz", "out=" .. out, "--dry-run"}
  dofile("tools/eval_nll.lua")
end)
H.check("loader: tools/eval_nll.lua goes through checkpoint.load_model", calls == 1, tostring(err))
checkpoint.load_model = real

-- tools/: the user tools are there, the old recipe paths forward (test_sample and
-- test_config run tools/sample.lua and tools/eval_nll.lua; test_sample_ref runs
-- tools/convert_official.py where torch is installed)
for _, f in ipairs{"tools/sample.lua", "tools/eval_nll.lua", "tools/eval_fid.lua", "tools/fid_stats.lua",
                   "tools/convert_official.py", "tools/convert_inception.py",
                   "recipes/sample.lua", "recipes/eval_nll.lua", "recipes/eval_fid.lua", "recipes/fid_stats.lua"} do
  H.check("tools: " .. f .. " exists", io.open(f) ~= nil)
end
-- convert_inception.py imports the network definition from tests/ref
H.check("tools: convert_inception.py finds fid_inception.py and st_write.py", io.open("tests/ref/fid_inception.py") ~= nil
  and io.open("tests/ref/st_write.py") ~= nil)
local py = io.popen("python3 -c \"import ast, sys; [ast.parse(open(f).read()) for f in sys.argv[1:]]; print('parsed')\" "
  .. "tools/convert_official.py tools/convert_inception.py 2>&1")
local pr = py and py:read("a") or ""
if py then py:close() end
if pr:find("not found") or pr == "" then print("ok - # SKIP tools: no python3 to parse the converters")
else H.check("tools: the converters parse", pr:find("parsed") ~= nil, pr) end

os.execute("rm -rf '" .. TMP .. "'")
H.done()
