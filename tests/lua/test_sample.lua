-- test_sample.lua — iddpm.sample and the sampling recipe on tiny checkpoints made here
-- with iddpm.checkpoint.save: batch-size independence, the npz read back by numpy,
-- errors on bad input (nothing written), the denoising strip and GIF, the CLI end to end.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local S = require "iddpm.sample"
local CK = require "iddpm.checkpoint"

local tmp = os.tmpname(); os.remove(tmp)
os.execute("mkdir -p " .. tmp)
print("# scratch dir " .. tmp)

local function exists(p) local f = io.open(p, "rb"); if f then f:close() return true end return false end
local function read(p) local f = assert(io.open(p, "rb")); local s = f:read("a"); f:close(); return s end

-- a tiny UNet, perturbed away from the zero init; EMA = model weights + 0.01
local function make_ckpt(dir, num_classes)
  local cfg = {image_size = 8, in_channels = 3, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
    attention_resolutions = {4}, num_heads = 2, dropout = 0.1, learn_sigma = true, num_classes = num_classes,
    diffusion_steps = 20, noise_schedule = "cosine", rescale_timesteps = true, rescale_learned_sigmas = true,
    use_kl = false, predict_xstart = false, sigma_small = false}
  local ucfg = S.unet_config(cfg)
  local m = iddpm.nn.unet(ucfg)
  local g = T.generator(11, 0)
  local shadow = {}
  T.no_grad(function()
    for i, n in ipairs(m:parameter_names()) do
      local p = m:named_parameters()[n]
      p:copy_(p + T.randn(p:shape(), g) * 0.05)
      shadow[i] = p + 0.01
    end
  end)
  os.execute("mkdir -p " .. dir)
  return CK.save(dir, {model = m, emas = {{rate = 0.9999, ema = {shadow = shadow}}}, step = 123, config = cfg})
end

local uncond = tmp .. "/run_uncond"
local cond = tmp .. "/run_cond"
make_ckpt(uncond)
local cond_file = make_ckpt(cond, 3)
H.check("checkpoint saved", exists(cond_file))

-- ---- loading
local model, diff, info = S.load(uncond, {steps = "5"})
H.check("load: EMA by default, rate 0.9999", info.weights == "ema_0.9999" and info.message == "using EMA weights (rate 0.9999)", info.message)
H.check("load: respaced 20 -> 5 steps, ddpm", diff.num_timesteps == 5 and diff.original_num_steps == 20 and info.sampler == "ddpm")
local mraw, _, iraw = S.load(uncond, {steps = "5", use_ema = false})
H.check("load: use_ema=false says raw weights", iraw.weights == "model" and iraw.message == "using raw model weights", iraw.message)
local _, dd, idd = S.load(uncond, {steps = "ddim5"})
H.check("load: ddim5 -> DDIM sampler with 5 steps", idd.sampler == "ddim" and dd.num_timesteps == 5)

-- ---- batch-size independence
local function gen(m, d, B, sampler, extra)
  local o = {num_samples = 4, batch_size = B, seed = 42, sampler = sampler}
  for k, v in pairs(extra or {}) do o[k] = v end
  return (S.generate(m, d, o))
end
local function max_abs(a, b) return (a - b):abs():max():item() end
-- exact = true: one model call per sample, bit-identical for any batch size
local EX = {exact = true}
local a2, a4, a1 = gen(model, diff, 2, "ddpm", EX), gen(model, diff, 4, "ddpm", EX), gen(model, diff, 3, "ddpm", EX)
H.check("ddpm exact: batch 2 vs batch 4 give identical images", max_abs(a2, a4) == 0, max_abs(a2, a4))
H.check("ddpm exact: batch 3 (ragged) vs batch 4 identical", max_abs(a1, a4) == 0, max_abs(a1, a4))
local d2, d4 = gen(model, dd, 2, "ddim", {eta = 1, exact = true}), gen(model, dd, 4, "ddim", {eta = 1, exact = true})
H.check("ddim eta=1 exact: batch 2 vs batch 4 identical", max_abs(d2, d4) == 0, max_abs(d2, d4))
-- default (batched model calls): the same noise, so the images differ only by the
-- batched kernels' float32 rounding (conv2d folds several 4x4 maps into one GEMM):
-- ~1e-5 after 5 steps; 1e-4 leaves room, anything larger means different noise
local TOL_BATCHED = 1e-4
local n2, n4 = gen(model, diff, 2, "ddpm"), gen(model, diff, 4, "ddpm")
H.check(("ddpm batched: batch 2 vs 4 agree to %.1e (max abs %.2e)"):format(TOL_BATCHED, max_abs(n2, n4)), max_abs(n2, n4) < TOL_BATCHED)
H.check("ddpm batched vs exact agree", max_abs(n4, a4) < TOL_BATCHED, max_abs(n4, a4))
local b4 = S.generate(model, diff, {num_samples = 4, batch_size = 4, seed = 43, exact = true})
H.check("another seed gives other images", max_abs(b4, a4) > 1e-3)
H.check("raw weights give other images than EMA", max_abs(gen(mraw, diff, 4, "ddpm", EX), a4) > 1e-6)
local xs = a4:shape()
H.check("images (4,3,8,8) in [-1,1]", xs[1] == 4 and xs[2] == 3 and xs[3] == 8 and a4:abs():max():item() <= 1 + 1e-6)

-- ---- benchmark
local ips, secs = S.benchmark(model, diff, 2, 3)
H.check(("benchmark: %.1f images x steps / s"):format(ips), ips > 0 and secs > 0)

-- ---- errors: clear message, out/ not created
local function fails(name, args, pattern)
  local out = tmp .. "/err_" .. name:gsub("%W", "_")
  args[#args + 1] = "out=" .. out
  args[#args + 1] = "progress=false"
  local ok, err = pcall(S.main, table.unpack(args))
  H.check("error: " .. name, not ok and tostring(err):find(pattern, 1, true) ~= nil,
    ok and "no error" or ("%q does not mention %q"):format(tostring(err), pattern))
  H.check("error: " .. name .. ": nothing written", not exists(out))
end
local foreign = tmp .. "/foreign.safetensors"
T.save(foreign, {w = T.zeros({2})}, {format = "something-else"})
local text = tmp .. "/notes.txt"
local f = io.open(text, "w"); f:write("hello"); f:close()
fails("missing checkpoint", {"ckpt=" .. tmp .. "/nope"}, "does not exist")
fails("empty run dir", {"ckpt=" .. tmp}, "no checkpoint in")
fails("foreign safetensors", {"ckpt=" .. foreign}, "not an iddpm checkpoint")
fails("not safetensors", {"ckpt=" .. text}, "notes.txt")
fails("steps > T", {"ckpt=" .. uncond, "steps=30"}, "steps=30 does not fit this checkpoint (T = 20")
fails("ddim without stride", {"ckpt=" .. uncond, "steps=ddim8"}, "steps=ddim8 does not fit")
fails("class on unconditional", {"ckpt=" .. uncond, "steps=5", "class=1"}, "unconditional")
fails("class missing on conditional", {"ckpt=" .. cond, "steps=5"}, "class-conditional (3 classes)")
fails("class out of range", {"ckpt=" .. cond, "steps=5", "class=3"}, "not a class of this model")
fails("unknown key", {"ckpt=" .. uncond, "stepz=5"}, "unknown sample key 'stepz' on the command line (did you mean 'steps'?)")
fails("bad boolean", {"ckpt=" .. uncond, "use_ema=maybe"}, "use_ema=maybe: not a boolean (expected true or false)")
fails("ema rate absent", {"ckpt=" .. uncond, "ema_rate=0.999"}, "no EMA weights with rate 0.999")

-- ---- the recipe in-process: conditional, animate
local out = tmp .. "/out_cond"
local r = S.main("ckpt=" .. cond, "num_samples=5", "batch_size=2", "steps=5", "seed=1", "class=1,2",
  "out=" .. out, "animate=true", "frames=3", "animate_samples=2", "progress=false")
H.check("conditional: labels cycle 1,2", r.labels[1] == 1 and r.labels[2] == 2 and r.labels[5] == 1)
for _, name in ipairs{"samples_5x8x8x3.npz", "grid.png", "sample_000000.png", "sample_000004.png",
                      "denoise.png", "denoise.gif", "settings.json"} do
  H.check("written: " .. name, exists(out .. "/" .. name))
end
H.check("denoise.gif is a GIF", read(out .. "/denoise.gif"):sub(1, 6) == "GIF89a")
H.check("no temporary files left", not exists(out .. "/grid.png.tmp") and not exists(out .. "/settings.json.tmp"))
local g = iddpm.io.png_read(out .. "/denoise.png")
local gs = g:shape()
-- 2 samples x 2 rows (x_t, x_0) = 4 rows of 8px + pad 2; 3 columns; upscaled (auto) by
-- ceil(512 / 32) = 16; a band of column labels on top (font scale 2: 7*2 + 8 = 22 px) and
-- of row labels on the left ("X_0" at scale 2: (3*6 - 1)*2 + 10 = 44 px)
H.check(("denoise.png is 4 rows x 3 columns, x16, with label bands (%s)"):format(table.concat(gs, "x")),
  gs[1] == 22 + 16 * (4 * 10 + 2) and gs[2] == 44 + 16 * (3 * 10 + 2))
do   -- every column has ink in the band above it (its "T=..." label)
  local inked = 0
  for q = 0, 2 do
    local cx = 44 + 16 * (2 + q * 10 + 4)
    local band = g:narrow(1, 1, 22):narrow(2, cx - 20 + 1, 40):float()
    if band:min():item() < 128 then inked = inked + 1 end
  end
  H.check("denoise.png: a timestep label above each column", inked == 3, inked)
  local gg = iddpm.io.png_read(out .. "/grid.png"):shape()
  H.check(("grid.png upscaled to >= 512 px wide (%s)"):format(table.concat(gg, "x")), gg[2] >= 512)
end
local z = iddpm.io.npz_read(out .. "/samples_5x8x8x3.npz")
H.check("npz read back: arr_0 uint8 (5,8,8,3)", z.arr_0:dtype() == "uint8" and table.concat(z.arr_0:shape(), ",") == "5,8,8,3")
H.check("npz equals the images", max_abs(z.arr_0:float(), iddpm.image.nhwc(r.images):float()) == 0)
local rr = S.make_labels("random", 6, 3, 9)
local rr2 = S.make_labels("random", 6, 3, 9)
H.check("class=random: labels in range, fixed by seed", table.concat(rr, ",") == table.concat(rr2, ",") and math.max(table.unpack(rr)) < 3)

-- ---- numpy reads the npz
local py = io.popen("/usr/bin/python3 -c 'import numpy' 2>/dev/null && echo yes"):read("a")
if not py:find("yes") then
  print("ok - # SKIP numpy check: /usr/bin/python3 with numpy not found")
else
  local cmd = ([[/usr/bin/python3 -c "
import numpy as np
z = np.load('%s/samples_5x8x8x3.npz')
a, l = z['arr_0'], z['arr_1']
assert sorted(z.files) == ['arr_0', 'arr_1'], z.files
assert a.dtype == np.uint8 and a.shape == (5, 8, 8, 3), (a.dtype, a.shape)
assert l.dtype == np.int64 and l.tolist() == [1, 2, 1, 2, 1], (l.dtype, l)
print('numpy ok')
"]]):format(out)
  local p = io.popen(cmd .. " 2>&1")
  local res = p:read("a"); p:close()
  H.check("numpy loads the npz: arr_0 uint8 (5,8,8,3), arr_1 int64 labels", res:find("numpy ok") ~= nil, res)
end

-- ---- the CLI end to end (a subprocess; `iddpm sample` and the recipe file)
local exe = os.getenv("IDDPM") or "./iddpm"
local cli_out = tmp .. "/cli"
local p = io.popen(("%s sample ckpt=%s num_samples=3 batch_size=2 steps=ddim4 seed=5 exact=true out=%s 2>&1; echo rc=$?"):format(exe, uncond, cli_out))
local log = p:read("a"); p:close()
H.check("iddpm sample exits 0", log:find("rc=0") ~= nil, log)
H.check("iddpm sample says which weights", log:find("using EMA weights (rate 0.9999)", 1, true) ~= nil, log)
H.check("iddpm sample prints the expected time", log:find("expected time:", 1, true) ~= nil, log)
H.check("iddpm sample shows progress", log:find("steps/s", 1, true) ~= nil, log)
H.check("iddpm sample into a pipe: no carriage-return redraws", log:find("\r", 1, true) == nil, log)
H.check("iddpm sample wrote the npz", exists(cli_out .. "/samples_3x8x8x3.npz"))
p = io.popen(("%s run tools/sample.lua ckpt=%s num_samples=3 batch_size=3 steps=ddim4 seed=5 exact=true out=%s2 progress=false 2>&1; echo rc=$?"):format(exe, uncond, cli_out))
log = p:read("a"); p:close()
H.check("tools/sample.lua exits 0", log:find("rc=0") ~= nil, log)
p = io.popen(("%s run recipes/sample.lua ckpt=%s --dry-run 2>&1; echo rc=$?"):format(exe, uncond))
log = p:read("a"); p:close()
H.check("recipes/sample.lua (the old path) forwards to tools/sample.lua with a note", log:find("rc=0") ~= nil
  and log:find("now tools/sample.lua", 1, true) ~= nil and log:find("dry run:", 1, true) ~= nil, log)
H.check("CLI exact=true: batch 2 and batch 3 give the same npz", exists(cli_out .. "2/samples_3x8x8x3.npz") and
  read(cli_out .. "/samples_3x8x8x3.npz") == read(cli_out .. "2/samples_3x8x8x3.npz"))
p = io.popen(("%s sample ckpt=%s/nope out=%s3 2>&1; echo rc=$?"):format(exe, tmp, cli_out))
log = p:read("a"); p:close()
H.check("CLI: missing checkpoint exits 2 with the message", log:find("rc=2") ~= nil and log:find("does not exist", 1, true) ~= nil, log)

os.execute("rm -rf " .. tmp)
-- a training run's config writes attention_resolutions = "" for "no attention"
do
  local u = require("iddpm.sample").unet_config({image_size = 8, attention_resolutions = "", channel_mult = ""})
  H.check("empty attention_resolutions means none (not the default)", type(u.attention_resolutions) == "table"
    and #u.attention_resolutions == 0 and u.channel_mult == nil)
end
H.done()
