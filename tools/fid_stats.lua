-- tools/fid_stats.lua — reference statistics for FID (like mmgeneration's
-- tools/utils/inception_stat.py): Inception pool3 features of a whole dataset (the
-- training split by default, in order, no shuffling), then mean and covariance (N-1)
-- in float64, saved as
--   OUT.safetensors   mu, sigma (float64) + metadata n, source, resize, weights
--   OUT.npz           mu, sigma — the pytorch-fid layout
--
--   iddpm run tools/fid_stats.lua data=/usr/share/datasets/fashion-mnist out=stats/fmnist_train \
--        [split=train] [num_samples=N] [weights=FILE] [batch_size=50] [resize=tf1] \
--        [features=feats.npz]   (also keep the features, e.g. for precision/recall)
--   `help` lists the keys (num= still works); --dry-run checks them.
-- data: a folder with Fashion-MNIST/MNIST IDX files or CIFAR-10 batches, one IDX/.bin
-- file, an .npz (arr_0, NHWC uint8) or a folder of PNGs. Gray images are repeated to 3
-- channels by the network.
local iddpm = require "iddpm"
local M, io_ = iddpm.metrics, iddpm.io

local cfg = require "iddpm.config"

local schema = cfg.schema("fid_stats", M.inception_keys({
  {"data", "str", "", "dataset: IDX / CIFAR folder or file, .npz (arr_0 NHWC uint8) or a folder of PNGs",
    required = true, group = "data"},
  {"split", "str", "train", "train or test", one_of = {"train", "test"}},
  {"num_samples", "int", 0, "images to use (0 = all)", min = 0, aliases = {"num"}},
  {"out", "str", "", "output base name: writes OUT.safetensors and OUT.npz", required = true, group = "output"},
  {"features", "str", "", "also keep the features in this .npz (e.g. for precision/recall)"},
}, "batch_size"), {usage = "iddpm run tools/fid_stats.lua data=PATH out=STATS [key=value ...]",
    help_cmd = "iddpm run tools/fid_stats.lua help",
    check = function(c)
      if cfg.mode(c.data) == nil then cfg.error(("data=%s does not exist"):format(c.data)) end
      cfg.check_writable_file(c.out, "out")
      if c.features ~= "" then cfg.check_writable_file(c.features, "features") end
    end})
local o, flags = cfg.command(schema, nil, arg)
if not o then return end
if o.num_threads > 0 then iddpm.num_threads(o.num_threads) end
o.num = o.num_samples > 0 and o.num_samples or nil
if o.features == "" then o.features = nil end
local base = tostring(o.out):gsub("%.safetensors$", ""):gsub("%.npz$", "")

local net = M.inception(o.weights, {resize = o.resize})   -- clear error if the file is missing
if flags.dry_run then
  print(("dry run: would write %s.safetensors and %s.npz%s"):format(base, base, o.features and (" and " .. o.features) or ""))
  return
end
local images = M.read_images(o.data, {split = o.split, num = o.num})
local s = images:shape()
print(("fid_stats: %d images (%dx%dx%d) from %s [%s], Inception %s, resize %s"):format(s[1], s[2], s[3], s[4],
  o.data, o.split, o.weights, o.resize))
if s[1] < 50000 then
  print(("fid_stats: note: %d reference images; published FIDs use the whole training set (50k for CIFAR-10)")
    :format(s[1]))
end

local stream = net:stream{batch_size = o.batch_size, total = s[1], progress = true, keep = o.features ~= nil,
  label = "fid_stats"}
stream:add(images)
local mu, sigma = stream:get()
M.save_stats(base .. ".safetensors", mu, sigma, s[1], {source = o.data, split = o.split, resize = o.resize,
  weights = o.weights})
M.save_stats(base .. ".npz", mu, sigma, s[1])
if o.features then io_.npz_write(o.features, {{"features", stream:features()}}) end
print(("fid_stats: wrote %s.safetensors and %s.npz (n = %d, %ds)"):format(base, base, s[1], math.floor(stream:seconds())))
