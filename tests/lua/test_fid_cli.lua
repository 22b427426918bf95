-- test_fid_cli.lua — `iddpm fid` (iddpm.cli.fid): option parsing and its errors, and with
-- the FID Inception weights (`make fid-weights`; skipped without them) the whole line:
-- reference statistics of a small .npz dataset, then a tiny checkpoint sampled batch by
-- batch into the Inception, whose FID must equal the FID of the same images sampled by
-- `iddpm sample` and evaluated from its .npz (samples=).
local H = require "harness"
local iddpm = require "iddpm"
local T, M = iddpm.tensor, iddpm.metrics
local F = require "iddpm.cli.fid"
local S = require "iddpm.sample"
local CK = require "iddpm.checkpoint"

-- the two routes see bit-identical images (same seeds, same batches) and run the same
-- Inception batches, so the FIDs agree to rounding of the float64 distance
local TOL_SAME = 1e-9

local tmp = os.tmpname(); os.remove(tmp)
assert(require("lfs").mkdir(tmp))
print("# scratch dir " .. tmp .. "; seeds: T.generator(11, 0) weights, sampling seed 3")
local function exists(p) local f = io.open(p, "rb"); if f then f:close() return true end return false end
local function rm_tree(d)   -- the scratch dir, at the end
  local lfs = require "lfs"
  for f in lfs.dir(d) do
    if f ~= "." and f ~= ".." then
      local q = d .. "/" .. f
      if lfs.attributes(q, "mode") == "directory" then rm_tree(q) else os.remove(q) end
    end
  end
  lfs.rmdir(d)
end

-- ---------------------------------------------------------------- parsing and errors

local o = F.parse({"stats=s.npz", "num_samples=12", "steps=ddim5", "use_ema=false", "eta=0.5", "seed=0"}, F.EVAL)
H.check("parse: types converted, unset strings nil", o.num_samples == 12 and o.steps == "ddim5" and o.use_ema == false
  and o.eta == 0.5 and o.seed == 0 and o.ckpt == nil and o.fid_batch == 50)
H.raises("parse: unknown key names the nearest", function() F.parse({"stats=s", "stepz=5"}, F.EVAL) end,
  "did you mean 'steps'")
H.raises("parse: bad integer", function() F.parse({"stats=s", "num_samples=-1"}, F.EVAL) end, "num_samples=-1")
H.raises("parse: not key=value", function() F.parse({"stats=s", "oops"}, F.EVAL) end, "key=value")
H.raises("fid: stats= required", function() F.main("ckpt=x") end, "stats= is required")
H.raises("fid: a missing stats file names the command that makes it",
  function() F.main("samples=x.npz", "stats=" .. tmp .. "/none.npz") end, "iddpm fid stats data=")
H.raises("fid: ckpt= and samples= exclusive", function() F.main("ckpt=a", "samples=b", "stats=c") end, "either ckpt=")
H.raises("fid stats: out= required", function() F.main("stats", "data=x") end, "out= is required")
H.raises("fid stats: a missing weights file names make fid-weights",
  function() F.main("stats", "data=x", "out=y", "weights=" .. tmp .. "/none.safetensors") end, "make fid-weights")

local exe = os.getenv("IDDPM") or "./iddpm"
local p = io.popen(exe .. " fid help 2>&1; echo rc=$?")
local log = p:read("a"); p:close()
H.check("iddpm fid help: usage and exit 0", log:find("usage: iddpm fid ckpt=RUN", 1, true) ~= nil
  and log:find("rc=0", 1, true) ~= nil, log)

-- the downsampled-ImageNet npz layout: data (N, 3*S*S), R, G, B planes per row
do
  local flat = M.hash_uniform({4, 3 * 8 * 8}, "imagenet_npz", 0, 256):floor():byte()
  local path = tmp .. "/imagenet_like.npz"
  iddpm.io.npz_write(path, {{"data", flat}})
  local x = M.read_images(path)
  local v, f = x:float():totable(), flat:float():totable()
  local same = #v == #f
  for i = 1, #f do same = same and v[i] == f[i] end
  H.check("read_images: npz 'data' (N, 3*S*S) -> (N,3,S,S), planes in order",
    table.concat(x:shape(), ",") == "4,3,8,8" and same, table.concat(x:shape(), ","))
  os.remove(path)
end

-- ---------------------------------------------------------------- end to end

if not exists(M.default_weights()) then
  print(("ok - skipped: no FID Inception weights at %s (run `make fid-weights`)"):format(M.default_weights()))
  rm_tree(tmp)
  H.done()
  return
end

local cfg = {image_size = 8, in_channels = 3, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
  attention_resolutions = {4}, num_heads = 2, dropout = 0, learn_sigma = true, diffusion_steps = 20,
  noise_schedule = "cosine", rescale_timesteps = true, rescale_learned_sigmas = true, use_kl = false,
  predict_xstart = false, sigma_small = false}
local m = iddpm.nn.unet(S.unet_config(cfg))
local g = T.generator(11, 0)
T.no_grad(function()
  for _, n in ipairs(m:parameter_names()) do
    local q = m:named_parameters()[n]
    q:copy_(q + T.randn(q:shape(), g) * 0.05)
  end
end)
local run = tmp .. "/run"
assert(require("lfs").mkdir(run))
CK.save(run, {model = m, step = 7, config = cfg})

-- a "dataset": 6 RGB 8x8 images, NHWC uint8 in an .npz like sample files
local data = tmp .. "/data.npz"
local imgs = M.hash_uniform({6, 8, 8, 3}, "fid_cli_data", 0, 256):floor():byte()
iddpm.io.npz_write(data, {{"arr_0", imgs}})
F.main("stats", "data=" .. data, "out=" .. tmp .. "/ref", "batch_size=4", "progress=false",
  "features=" .. tmp .. "/ref_feats.npz")
H.check("fid stats: out=X writes X.npz and X.safetensors", exists(tmp .. "/ref.npz") and exists(tmp .. "/ref.safetensors"))
local z = iddpm.io.npz_read(tmp .. "/ref.npz")
H.check("fid stats: npz holds mu (2048) and sigma (2048,2048) float64",
  z.mu and z.sigma and z.mu:dtype() == "float64" and z.sigma:shape()[1] == 2048 and z.mu:shape()[1] == 2048)
local mu_r, s_r = M.load_stats(tmp .. "/ref.safetensors")
local net = M.inception()
local mu_w, s_w = net:feature_stats(imgs:permute{1, 4, 2, 3}:contiguous(), {progress = false})
H.check("fid stats: = feature_stats of the images", (mu_r - mu_w):abs():max():item() < 1e-6
  and (s_r - s_w):abs():max():item() < 1e-6)

local r1 = F.main("ckpt=" .. run, "num_samples=5", "batch_size=2", "steps=4", "seed=3", "stats=" .. tmp .. "/ref.npz",
  "fid_batch=2", "progress=false", "out=" .. tmp .. "/fid.json", "real_features=" .. tmp .. "/ref_feats.npz", "k=2")
H.check(("fid ckpt=: a finite positive FID (%.4f) from 5 images"):format(r1.fid), r1.fid == r1.fid and r1.fid > 0
  and r1.n == 5)
H.check("fid ckpt=: precision and recall in [0,1]", r1.precision >= 0 and r1.precision <= 1 and r1.recall >= 0
  and r1.recall <= 1)
H.check("fid ckpt=: out= JSON written", exists(tmp .. "/fid.json"))
local sm = S.main("ckpt=" .. run, "num_samples=5", "batch_size=2", "steps=4", "seed=3", "out=" .. tmp .. "/samples",
  "progress=false", "save_each=false")
local r2 = F.main("samples=" .. sm.npz, "stats=" .. tmp .. "/ref.npz", "fid_batch=2", "progress=false")
local rel = math.abs(r1.fid - r2.fid) / r2.fid
H.check(("fid ckpt= streams the same images as iddpm sample + fid samples= (%.6f vs %.6f)"):format(r1.fid, r2.fid),
  rel <= TOL_SAME, ("rel diff %.3g"):format(rel))
rm_tree(tmp)
H.done()
