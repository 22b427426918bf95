-- recipes/eval_fid.lua — FID of samples against saved reference statistics, and
-- optionally precision/recall (k=3) against saved reference features.
--
--   iddpm run recipes/eval_fid.lua samples=samples_10000x28x28x1.npz stats=stats/fmnist_train.safetensors \
--        [weights=inception.safetensors] [num=N] [batch_size=50] [resize=tf1] \
--        [real_features=feats.npz] [k=3] [out=fid.json]
-- samples: the samples .npz (arr_0 NHWC uint8, as iddpm sample and the standard
-- evaluators write it), any source fid_stats reads, or a folder of PNGs.
-- stats: .safetensors or pytorch-fid .npz (mu, sigma). Prints the protocol with the number.
local iddpm = require "iddpm"
local M, io_ = iddpm.metrics, iddpm.io

local o = M.parse_args(arg, {weights = M.default_weights(), batch_size = 50,
  resize = "tf1", k = 3, split = "test"})
if not o.samples or not o.stats then
  io.stderr:write("usage: iddpm run recipes/eval_fid.lua samples=NPZ|DIR stats=STATS [weights=...] [num=N] "
    .. "[real_features=F.npz] [k=3] [out=fid.json]\n")
  os.exit(2)
end
local mu_r, sigma_r = M.load_stats(o.stats)          -- clear error if missing
local net = M.inception(o.weights, {resize = o.resize})
local images = M.read_images(o.samples, {num = o.num, split = o.split})
local n = images:shape()[1]
if n < 50000 then
  print(("eval_fid: warning: %d samples; FID is biased upwards at small n (published numbers use 50,000)"):format(n))
end
local stream = net:stream{batch_size = o.batch_size, total = n, progress = true, keep = o.real_features ~= nil,
  label = "eval_fid"}
stream:add(images)
local mu, sigma = stream:get()
local fid, parts = M.frechet_distance(mu, sigma, mu_r, sigma_r)
local res = {fid = fid, mean_term = parts.mean, trace_term = parts.trace, offset = parts.offset, n = n,
  samples = o.samples, stats = o.stats, weights = o.weights, resize = o.resize}
print(("eval_fid: FID %.4f (%.4f/%.4f)  n=%d samples=%s stats=%s inception=%s resize=%s%s"):format(fid, parts.mean,
  parts.trace, n, o.samples, o.stats, o.weights, o.resize, parts.offset > 0 and " (1e-6 offset used)" or ""))
if o.real_features then
  local rf = io_.npz_read(o.real_features).features
  local p, r = M.precision_recall(rf, stream:features(), {k = o.k})
  res.precision, res.recall = p, r
  print(("eval_fid: precision %.4f recall %.4f (k=%d, %d real features)"):format(p, r, o.k, rf:shape()[1]))
end
if o.out then
  local f = assert(io.open(o.out, "w"))
  f:write(io_.json_encode(res), "\n")
  f:close()
end
