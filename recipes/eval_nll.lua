-- recipes/eval_nll.lua — negative log-likelihood in bits/dim over a test set, as the
-- official scripts/image_nll.py: for every image, calc_bpd_loop (the variational bound
-- term by term: L_0 as a discretized Gaussian decoder NLL at t=0, KL terms for t>0, the
-- prior KL at T) with clip_denoised; prints a running mean
--   done N samples: bpd=...
-- and writes OUT/vb_terms.npz, OUT/mse_terms.npz, OUT/xstart_mse_terms.npz with the
-- per-t means over all samples (arrays "vb" etc. of length T, column 1 = t = T-1 as in
-- the official code) and the per-sample totals, plus OUT/nll.json.
--
--   iddpm run recipes/eval_nll.lua ckpt=runs/fmnist data=/usr/share/datasets/fashion-mnist \
--        [split=test] [num_samples=N (all)] [batch_size=16] [use_ema=true] [ema_rate=R] [out=DIR (RUN/eval)]
--        [clip_denoised=true] [device=cpu|cuda] [precision=auto|fp32|tf32|bf16] [num_threads=N]
--   `help` lists the keys (the old names checkpoint=, num=, ema= still work); --dry-run checks them.
-- device=cuda runs the model and every diffusion op of calc_bpd_loop on the GPU.
-- Data go in as the model was trained on them: uint8 -> x/127.5 - 1.
local iddpm = require "iddpm"
local T, M, io_ = iddpm.tensor, iddpm.metrics, iddpm.io

local cfg = require "iddpm.config"
local fs = require "iddpm.fs"
local S = require "iddpm.sample"

local schema = cfg.schema("eval_nll", {
  {"ckpt", "str", "", "run directory (newest checkpoint) or checkpoint file", required = true, aliases = {"checkpoint"},
    group = "model"},
  {"use_ema", "bool", true, "true: EMA weights, false: raw model weights"},
  {"ema_rate", "str", "", "which EMA rate (empty: 0.9999 or the only one)"},
  {"ema", "str", "", "old form: a rate, or model (= use_ema=false)"},
  {"clip_denoised", "bool", true, "clip predicted x_0 to [-1,1] (as the official image_nll)"},
  {"data", "str", "", "dataset: IDX / CIFAR folder or file, .npz, or a folder of PNGs", required = true, group = "data"},
  {"split", "str", "test", "train or test", one_of = {"train", "test"}},
  {"num_samples", "int", 0, "images to evaluate (0 = all)", min = 0, aliases = {"num"}},
  {"batch_size", "int", 16, "images per batch", min = 1, max = 100000},
  {"out", "str", "", "output directory (empty: eval/ in the checkpoint's run directory, which the run report reads)", group = "output"},
  {"num_threads", "int", 0, "engine threads (0 = all cores)", min = 0, max = 4096, aliases = {"threads"}, group = "machine"},
  {"device", "str", "cpu", "cpu or cuda", one_of = {"cpu", "cuda"}},
  {"precision", "str", "auto", "GPU precision: auto, fp32, tf32 or bf16", one_of = {"auto", "fp32", "tf32", "bf16"}},
}, {usage = "iddpm run recipes/eval_nll.lua ckpt=RUN|FILE data=PATH [key=value ...]",
    help_cmd = "iddpm run recipes/eval_nll.lua help",
    check = function(c)
      if c.out == "" then c.out = S.default_out(c.ckpt):gsub("/samples$", "/eval") end
      cfg.check_writable(c.out, "out")
      if cfg.mode(c.data) == nil then cfg.error(("data=%s does not exist"):format(c.data)) end
    end})
local o, flags = cfg.command(schema, nil, arg)
if not o then return end
if o.ema == "model" then o.use_ema = false elseif o.ema ~= "" then o.ema_rate = o.ema end
if o.num_threads > 0 then iddpm.num_threads(o.num_threads) end
local dev, prec = iddpm.device.setup(o.device, o.precision, "eval_nll")
local model, diff, info = S.load(o.ckpt, {use_ema = o.use_ema, ema_rate = o.ema_rate ~= "" and o.ema_rate or nil})
local file, msg = info.path, info.message or ""
if flags.dry_run then
  print(("dry run: %s, %s; would write %s/{vb,mse,xstart_mse}_terms.npz and %s/nll.json"):format(file, msg, o.out, o.out))
  return
end
if dev ~= "cpu" then
  model:to(dev)
  msg = msg .. (", on %s (%s, %s)"):format(dev, iddpm.cuda.device_name(), prec)
end
local images = M.read_images(o.data, {split = o.split, num = o.num_samples > 0 and o.num_samples or nil})
local N, Tn = images:shape()[1], diff.num_timesteps
print(("eval_nll: %s, %s; %d images from %s [%s], T = %d, clip_denoised = %s"):format(file, msg, N, o.data, o.split,
  Tn, tostring(o.clip_denoised)))

local sums = {vb = T.zeros({Tn}, "float64"), mse = T.zeros({Tn}, "float64"), xstart_mse = T.zeros({Tn}, "float64")}
local totals, priors = {}, {}
local running, t0 = 0, os.time()
for i = 1, N, o.batch_size do
  local n = math.min(o.batch_size, N - i + 1)
  local x = images:narrow(1, i, n):float():affine(1 / 127.5, -1)
  if dev ~= "cpu" then x = x:to(dev) end
  local r = diff:calc_bpd_loop(model, x, {clip_denoised = o.clip_denoised})
  for k, acc in pairs(sums) do sums[k] = acc + r[k]:double():sum(1) end
  local tb, pb = r.total_bpd:totable(), r.prior_bpd:totable()
  for j = 1, n do
    totals[#totals + 1] = tb[j]; priors[#priors + 1] = pb[j]
    running = running + tb[j]
  end
  local done, dt = i + n - 1, math.max(os.time() - t0, 1)
  print(("done %d samples: bpd=%.6f  (%.2f img/s, ETA %ds)"):format(done, running / done, done / dt,
    math.floor((N - done) * dt / done)))
end

local bpd = running / N
local out = o.out
cfg.mkdir_p(out)
local tot, pri = T.from_table(totals, {N}):double(), T.from_table(priors, {N}):double()
for k, acc in pairs(sums) do
  io_.npz_write(("%s/%s_terms.npz"):format(out, k), {{k, acc / N}, {"total_bpd", tot}, {"prior_bpd", pri}})
end
local vb = (sums.vb / N):totable()
local res = {bpd = bpd, n = N, checkpoint = file, weights = msg, data = o.data, split = o.split, T = Tn,
  prior_bpd = (pri:sum():item()) / N, decoder_bpd_t0 = vb[#vb], kl_terms_bpd = bpd - vb[#vb] - pri:sum():item() / N,
  clip_denoised = o.clip_denoised}
fs.write_atomic(out .. "/nll.json", io_.json_encode(res) .. "\n")
print(("eval_nll: NLL %.4f bits/dim over %d images (prior %.4f, L_0 %.4f, sum of KL terms %.4f); wrote %s/"
  .. "{vb,mse,xstart_mse}_terms.npz, nll.json"):format(bpd, N, res.prior_bpd, res.decoder_bpd_t0, res.kl_terms_bpd, out))
