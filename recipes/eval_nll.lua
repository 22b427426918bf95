-- recipes/eval_nll.lua — negative log-likelihood in bits/dim over a test set, as the
-- official scripts/image_nll.py: for every image, calc_bpd_loop (the variational bound
-- term by term: L_0 as a discretized Gaussian decoder NLL at t=0, KL terms for t>0, the
-- prior KL at T) with clip_denoised; prints a running mean
--   done N samples: bpd=...
-- and writes OUT/vb_terms.npz, OUT/mse_terms.npz, OUT/xstart_mse_terms.npz with the
-- per-t means over all samples (arrays "vb" etc. of length T, column 1 = t = T-1 as in
-- the official code) and the per-sample totals, plus OUT/nll.json.
--
--   iddpm run recipes/eval_nll.lua checkpoint=runs/fmnist data=/usr/share/datasets/fashion-mnist \
--        [split=test] [num=N (all)] [batch_size=16] [ema=0.9999|model] [out=DIR] [clip_denoised=true]
--   out= defaults to RUN/eval when checkpoint= is a run directory, else "."
--        [device=cpu|cuda] [precision=auto|fp32|tf32|bf16]
-- device=cuda runs the model and every diffusion op of calc_bpd_loop on the GPU.
-- Data go in as the model was trained on them: uint8 -> x/127.5 - 1.
local iddpm = require "iddpm"
local T, M, io_ = iddpm.tensor, iddpm.metrics, iddpm.io

local o = M.parse_args(arg, {split = "test", batch_size = 16, clip_denoised = true, device = "cpu", precision = "auto"})
if not o.checkpoint or not o.data then
  io.stderr:write("usage: iddpm run recipes/eval_nll.lua checkpoint=RUN|FILE data=PATH [split=test] [num=N] "
    .. "[batch_size=16] [ema=RATE|model] [out=DIR] [device=cpu|cuda]\n")
  os.exit(2)
end
local fs = require "iddpm.fs"
if o.out ~= nil then fs.check_path(o.out, "out") end   -- an empty out= fails now, not after the work
local dev, prec = iddpm.device.setup(o.device, o.precision, "eval_nll")

-- the model and its diffusion: iddpm.sample's loader when present, else a small one
local function load(path)
  local ok, S = pcall(require, "iddpm.sample")
  if ok and S.load then
    local model, diff, info = S.load(path, {use_ema = o.ema ~= "model", ema_rate = o.ema ~= "model" and o.ema or nil})
    return model, diff, info.path, info.message or ""
  end
  local C = require "iddpm.checkpoint"
  local file = C.resolve(path)
  local ck = C.read(file)
  local cfg = {}
  for k, v in pairs(ck.config) do cfg[k] = v end
  for _, sub in ipairs{"model", "diffusion", "unet"} do
    if type(ck.config[sub]) == "table" then for k, v in pairs(ck.config[sub]) do if cfg[k] == nil then cfg[k] = v end end end
  end
  local ucfg = {}
  for _, k in ipairs{"image_size", "in_channels", "num_channels", "num_res_blocks", "channel_mult",
    "attention_resolutions", "num_heads", "num_heads_upsample", "dropout", "learn_sigma", "use_scale_shift_norm",
    "num_classes", "out_channels"} do
    if cfg[k] ~= nil and cfg[k] ~= "" then ucfg[k] = cfg[k] end
  end
  local prefix, which = "model.", "raw model weights"
  if o.ema ~= "model" then
    local rate = o.ema and tostring(o.ema) or (ck.ema_rates[1] and tostring(ck.ema_rates[1]))
    if rate then prefix, which = "ema_" .. rate .. ".", "EMA weights (rate " .. rate .. ")" end
  end
  local model = iddpm.nn.unet(ucfg)
  model:load_state_dict(C.subset(ck.tensors, prefix))
  model:eval()
  local diff = iddpm.diffusion.new{steps = math.tointeger(cfg.diffusion_steps or cfg.steps or 1000),
    noise_schedule = cfg.noise_schedule or "linear", learn_sigma = cfg.learn_sigma and true or false,
    sigma_small = cfg.sigma_small and true or false, use_kl = cfg.use_kl and true or false,
    predict_xstart = cfg.predict_xstart and true or false, rescale_timesteps = cfg.rescale_timesteps ~= false,
    rescale_learned_sigmas = cfg.rescale_learned_sigmas ~= false, timestep_respacing = ""}
  return model, diff, file, "using " .. which
end

local model, diff, file, msg = load(o.checkpoint)
if dev ~= "cpu" then
  model:to(dev)
  msg = msg .. (", on %s (%s, %s)"):format(dev, iddpm.cuda.device_name(), prec)
end
local images = M.read_images(o.data, {split = o.split, num = o.num})
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
-- default: RUN/eval when checkpoint= is a run directory (the run report reads RUN/eval/*.json)
local out = o.out or (fs.is_dir(o.checkpoint) and (o.checkpoint .. "/eval") or ".")
fs.mkdir_p(out, "out")   -- no shell: out= is only ever a directory name
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
