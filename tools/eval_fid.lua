-- tools/eval_fid.lua — FID of samples against saved reference statistics, and
-- optionally precision/recall (k=3) against saved reference features.
--
--   iddpm run tools/eval_fid.lua samples=samples_10000x28x28x1.npz stats=stats/fmnist_train.safetensors \
--        [weights=FILE] [num_samples=N] [batch_size=50] [resize=tf1] \
--        [real_features=feats.npz] [k=3] [out=fid.json]
-- samples: the samples .npz (arr_0 NHWC uint8, as iddpm sample and the standard
-- evaluators write it), any source fid_stats reads, or a folder of PNGs.
-- stats: .safetensors or pytorch-fid .npz (mu, sigma). Prints the protocol with the number.
-- `help` lists the keys (num= still works); --dry-run checks them.
local iddpm = require "iddpm"
local M, io_ = iddpm.metrics, iddpm.io

local cfg = require "iddpm.config"

local schema = cfg.schema("eval_fid", M.inception_keys({
  {"samples", "str", "", "the samples: .npz (arr_0 NHWC uint8), any source fid_stats reads, or a folder of PNGs",
    required = true, group = "inputs"},
  {"stats", "str", "", "reference statistics: .safetensors (fid_stats.lua) or pytorch-fid .npz (mu, sigma)",
    required = true},
  {"split", "str", "test", "split when samples= is a dataset", one_of = {"train", "test"}},
  {"num_samples", "int", 0, "samples to use (0 = all)", min = 0, aliases = {"num"}},
  {"real_features", "str", "", "reference features .npz: also precision and recall"},
  {"k", "int", 3, "neighbours for precision/recall", min = 1, max = 1000},
  {"out", "str", "", "also write the results as JSON to this file", group = "output"},
}, "batch_size"), {usage = "iddpm run tools/eval_fid.lua samples=NPZ|DIR stats=STATS [key=value ...]",
    help_cmd = "iddpm run tools/eval_fid.lua help",
    check = function(c)
      for _, k in ipairs{"samples", "stats", "real_features"} do
        if c[k] ~= "" and cfg.mode(c[k]) == nil then cfg.error(("%s=%s does not exist"):format(k, c[k])) end
      end
      if c.out ~= "" then cfg.check_writable_file(c.out, "out") end
    end})
local o, flags = cfg.command(schema, nil, arg)
if not o then return end
if o.num_threads > 0 then iddpm.num_threads(o.num_threads) end
o.num = o.num_samples > 0 and o.num_samples or nil
for _, k in ipairs{"out", "real_features"} do if o[k] == "" then o[k] = nil end end
if flags.dry_run then
  print(("dry run: FID of %s against %s%s"):format(o.samples, o.stats, o.out and ("; would write " .. o.out) or ""))
  return
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
  -- exclusive temp file, checked writes, renamed into place (no half-written file on a full disk)
  local fs = require "iddpm.fs"
  fs.write_atomic(fs.check_path(o.out, "out"), io_.json_encode(res) .. "\n")
end
