-- test_metrics.lua — iddpm.metrics: the layer ops of the FID Inception against naive
-- loops and PyTorch, the whole FID Inception against torchvision's Inception3 blocks
-- (FID configuration) with the same seed-regenerable random weights, the Fréchet
-- distance against scipy, precision/recall on point sets with a known answer, and the
-- error messages for missing files.
-- References: tests/ref/inception_ref.safetensors (make_inception_ref.py, float64
-- PyTorch), tests/ref/fid_ref.safetensors (make_fid_ref.py, numpy/scipy).
local H = require "harness"
local iddpm = require "iddpm"
local T, M = iddpm.tensor, iddpm.metrics

-- float32 kernels vs float64 loops / PyTorch float64 on values of size ~1: a few ulps
local TOL_OP = 1e-5
-- features after ~100 float32 conv/pool layers vs PyTorch float64: the required bound,
-- absolute, on features of size ~1 (max |f| = 3.4); observed ~1e-6
local TOL_FEAT = 1e-4
-- Fréchet distance vs scipy on the same float64 mu/sigma: the required bound (relative);
-- observed ~1e-12 (well-conditioned) and ~4e-9 (rank-deficient)
local TOL_FID = 1e-6
-- our float64 statistics from float32 features vs np.mean (float32) / np.cov (float64)
local TOL_FID_FROM_FEATS = 1e-6

print("# seeds: hash_uniform names (tests/ref/make_inception_ref.py), T.manual_seed 5")
T.manual_seed(5)

local function max_abs(a, b)
  a, b = a:totable(), b:totable()
  if #a ~= #b then return math.huge end
  local w = 0
  for i = 1, #a do
    local d = math.abs(a[i] - b[i])
    if d ~= d then return math.huge end
    if d > w then w = d end
  end
  return w
end

local function check_abs(name, got, want, tol)
  local e = max_abs(got, want)
  print(("# %s: max abs err %.3g"):format(name, e))
  return H.check(name, e <= tol, ("max abs err %.3g > %.3g"):format(e, tol))
end

-- ---------------------------------------------------------------- naive loops

local function at(t, s, n, c, y, x) return t[((n * s[2] + c) * s[3] + y) * s[4] + x + 1] end

local function naive_pool(x, k, st, pad, kind, cip)
  local s, v = x:shape(), x:totable()
  local Ho, Wo = (s[3] + 2 * pad - k) // st + 1, (s[4] + 2 * pad - k) // st + 1
  local out = {}
  for n = 0, s[1] - 1 do for c = 0, s[2] - 1 do for oy = 0, Ho - 1 do for ox = 0, Wo - 1 do
    local acc, cnt, m = 0, 0, -math.huge
    for i = 0, k - 1 do for j = 0, k - 1 do
      local y, xx = oy * st - pad + i, ox * st - pad + j
      if y >= 0 and y < s[3] and xx >= 0 and xx < s[4] then
        local e = at(v, s, n, c, y, xx)
        acc, cnt, m = acc + e, cnt + 1, math.max(m, e)
      end
    end end
    out[#out + 1] = kind == "max" and m or acc / (cip and k * k or cnt)
  end end end end
  return T.from_table(out, {s[1], s[2], Ho, Wo})
end

local function naive_resize(x, Ho, Wo, mode)
  local s, v = x:shape(), x:totable()
  local function taps(inn, out, j)
    local src = mode == "tf1" and j * inn / out or math.max((j + 0.5) * inn / out - 0.5, 0)
    src = math.min(src, inn - 1)
    local a = math.floor(src)
    return a, math.min(a + 1, inn - 1), src - a
  end
  local out = {}
  for n = 0, s[1] - 1 do for c = 0, s[2] - 1 do for i = 0, Ho - 1 do
    local y0, y1, fy = taps(s[3], Ho, i)
    for j = 0, Wo - 1 do
      local x0, x1, fx = taps(s[4], Wo, j)
      local top = at(v, s, n, c, y0, x0) * (1 - fx) + at(v, s, n, c, y0, x1) * fx
      local bot = at(v, s, n, c, y1, x0) * (1 - fx) + at(v, s, n, c, y1, x1) * fx
      out[#out + 1] = top * (1 - fy) + bot * fy
    end
  end end end
  return T.from_table(out, {s[1], s[2], Ho, Wo})
end

local function naive_conv(x, w, b, st, ph, pw)
  local s, ws, xv, wv, bv = x:shape(), w:shape(), x:totable(), w:totable(), b:totable()
  local Ho, Wo = (s[3] + 2 * ph - ws[3]) // st + 1, (s[4] + 2 * pw - ws[4]) // st + 1
  local out = {}
  for n = 0, s[1] - 1 do for o = 0, ws[1] - 1 do for oy = 0, Ho - 1 do for ox = 0, Wo - 1 do
    local acc = bv[o + 1]
    for c = 0, s[2] - 1 do for i = 0, ws[3] - 1 do for j = 0, ws[4] - 1 do
      local y, xx = oy * st - ph + i, ox * st - pw + j
      if y >= 0 and y < s[3] and xx >= 0 and xx < s[4] then
        acc = acc + at(xv, s, n, c, y, xx) * at(wv, ws, o, c, i, j)
      end
    end end end
    out[#out + 1] = acc
  end end end end
  return T.from_table(out, {s[1], ws[1], Ho, Wo})
end

-- ---------------------------------------------------------------- layer ops

do
  local x = T.randn({2, 3, 7, 6})
  for _, cfg in ipairs{{3, 2, 0}, {3, 1, 1}, {2, 1, 0}, {5, 2, 2}} do
    local k, st, pad = cfg[1], cfg[2], cfg[3]
    local tag = ("k%d s%d p%d"):format(k, st, pad)
    check_abs("max_pool2d " .. tag .. " vs naive loop", T.max_pool2d(x, k, st, pad), naive_pool(x, k, st, pad, "max"),
      TOL_OP)
    check_abs("avg_pool2d " .. tag .. " exclude pad vs naive loop", T.avg_pool2d(x, k, st, pad, false),
      naive_pool(x, k, st, pad, "avg", false), TOL_OP)
    check_abs("avg_pool2d " .. tag .. " include pad vs naive loop", T.avg_pool2d(x, k, st, pad, true),
      naive_pool(x, k, st, pad, "avg", true), TOL_OP)
  end
  for _, m in ipairs{"tf1", "half_pixel"} do
    check_abs("resize_bilinear " .. m .. " up 7x6 -> 13x17", T.resize_bilinear(x, {13, 17}, m),
      naive_resize(x, 13, 17, m), TOL_OP)
    check_abs("resize_bilinear " .. m .. " down 7x6 -> 4x3", T.resize_bilinear(x, {4, 3}, m),
      naive_resize(x, 4, 3, m), TOL_OP)
  end
  local u8 = (T.rand({1, 3, 5, 4}) * 255):floor():byte()
  check_abs("resize_bilinear takes uint8", T.resize_bilinear(u8, {9, 9}), naive_resize(u8:float(), 9, 9, "tf1"), 1e-4)
  for _, cfg in ipairs{{1, 7, 1, 0, 3}, {7, 1, 1, 3, 0}, {1, 3, 2, 0, 1}, {3, 3, 2, 1, 1}} do
    local kh, kw, st, ph, pw = table.unpack(cfg)
    local xx, w, b = T.randn({2, 3, 9, 8}), T.randn({4, 3, kh, kw}), T.randn({4})
    check_abs(("conv2d %dx%d stride %d pad {%d,%d} vs naive loop"):format(kh, kw, st, ph, pw),
      T.conv2d(xx, w, b, st, {ph, pw}), naive_conv(xx, w, b, st, ph, pw), 1e-4)
  end
  -- conv2d_relu (the Inception's BN-folded conv) = max(0, conv2d), NaN kept; forward only
  for _, cfg in ipairs{{3, 3, 1, 1, 1}, {1, 7, 1, 0, 3}, {3, 3, 2, 0, 0}} do
    local kh, kw, st, ph, pw = table.unpack(cfg)
    local xx, w, b = T.randn({4, 5, 9, 8}), T.randn({6, 5, kh, kw}), T.randn({6})
    check_abs(("conv2d_relu %dx%d stride %d = max(0, conv2d)"):format(kh, kw, st),
      T.conv2d_relu(xx, w, b, st, {ph, pw}), T.conv2d(xx, w, b, st, {ph, pw}):maximum(0), 0)
  end
  do
    local w = T.randn({2, 1, 1, 1}); w.requires_grad = true
    H.raises("conv2d_relu: forward only", function() T.conv2d_relu(T.randn({1, 1, 2, 2}), w) end, "forward-only")
    local xn = T.from_table({0 / 0, 1, -1, 2}, {1, 1, 2, 2})
    local mp = T.max_pool2d(xn, 2, 1, 0):totable()[1]
    H.check("max_pool2d: a NaN in the window gives NaN (as PyTorch)", mp ~= mp, tostring(mp))
    local mq = T.max_pool2d(T.from_table({-3, -1, -2, -5}, {1, 1, 2, 2}), 2, 1, 0):totable()[1]
    H.check("max_pool2d: all-negative window", mq == -1, tostring(mq))
  end
  -- the square-padding conv keeps working, with gradients through the new path
  local xx, w = T.randn({2, 3, 6, 6}), T.randn({4, 3, 1, 7})
  xx.requires_grad = true; w.requires_grad = true
  -- the loss is quadratic, so central differences are exact up to float32 rounding of
  -- the loss (~1e-5 of it, divided by the step 1e-2): 1e-2 relative is ample
  local err = H.gradcheck(function(a, b) return T.conv2d(a, b, nil, 1, {0, 3}):square():sum() end, {xx, w}, 1e-2)
  H.check("conv2d {0,3} padding: gradients vs central differences", err < 1e-2, ("rel err %.3g"):format(err))
end

-- ---------------------------------------------------------------- vs PyTorch ops

local ref = T.load("tests/ref/inception_ref.safetensors")
do
  local x = ref.resize_in
  check_abs("resize tf1 5x7 -> 11x11 = affine_grid/grid_sample (StyleGAN model)", T.resize_bilinear(x, {11, 11}, "tf1"),
    ref.resize_tf1, TOL_OP)
  check_abs("resize half_pixel 5x7 -> 9x13 = F.interpolate(align_corners=False)",
    T.resize_bilinear(x, {9, 13}, "half_pixel"), ref.resize_half_pixel, TOL_OP)
  check_abs("max_pool2d(3,2,0) = F.max_pool2d", T.max_pool2d(x, 3, 2, 0), ref.maxpool_3_2_0, TOL_OP)
  check_abs("max_pool2d(3,1,1) = F.max_pool2d", T.max_pool2d(x, 3, 1, 1), ref.maxpool_3_1_1, TOL_OP)
  check_abs("avg_pool2d(3,1,1,false) = F.avg_pool2d(count_include_pad=False)", T.avg_pool2d(x, 3, 1, 1, false),
    ref.avgpool_3_1_1_excl, TOL_OP)
  check_abs("avg_pool2d(3,1,1,true) = F.avg_pool2d", T.avg_pool2d(x, 3, 1, 1, true), ref.avgpool_3_1_1_incl, TOL_OP)
end

-- ---------------------------------------------------------------- the FID Inception

local function ranges(name, s)
  if name:match("conv%.weight$") then local a = math.sqrt(6 / (s[2] * s[3] * s[4])); return -a, a end
  if name:match("bn%.weight$") or name:match("running_var$") then return 0.8, 1.2 end
  return -0.1, 0.1
end

do
  -- the regenerated values are the Python ones bit for bit: spot values from numpy
  local h = M.hash_uniform({4}, "images", 0, 256):totable()
  local want = ref.images:reshape{6144}:narrow(1, 1, 4):totable()
  local same = true
  for i = 1, 4 do same = same and math.floor(h[i]) == want[i] end
  H.check("hash_uniform reproduces numpy's values", same, table.concat(h, " "))

  local w = {}
  local nparams, ntensors = 0, 0
  for name, s in pairs(M.inception_param_shapes()) do
    ntensors = ntensors + 1
    local lo, hi = ranges(name, s)
    w[name] = M.hash_uniform(s, name, lo, hi)
    local n = 1
    for _, d in ipairs(s) do n = n * d end
    nparams = nparams + n
  end
  -- the FID Inception3 state_dict without fc and num_batches_tracked: 470 tensors,
  -- 21,820,000 values (counted with fid_inception.py)
  H.check("inception: tensors and values as torchvision's state_dict", nparams == 21820000 and ntensors == 470,
    ("%d tensors, %d values"):format(ntensors, nparams))
  local net = M.inception(w)
  local t0 = os.time()
  local f = net:features(ref.images)
  print(("# inception forward of 2 images: %ds"):format(os.time() - t0))
  H.check("inception: features are (2,2048)", f:shape()[1] == 2 and f:shape()[2] == 2048)
  check_abs("inception 32x32 uint8 -> pool3 = torchvision FID Inception (float64)", f, ref.features, TOL_FEAT)
  check_abs("inception 64x48 uint8 -> pool3 = torchvision FID Inception (float64)", net:features(ref.images64),
    ref.features64, TOL_FEAT)
  -- batching does not change features; gray images are repeated to 3 channels
  local fb = net:features(ref.images, {batch_size = 1, progress = false})
  check_abs("inception: batch size 1 gives the same features", fb, f, 1e-5)
  local gray = ref.images:narrow(2, 1, 1)
  check_abs("inception: a gray image equals its 3-channel repeat", net:features(gray),
    net:features(T.cat({gray, gray, gray}, 2)), 1e-6)
  H.raises("inception: NHWC input names the fix", function() net:features(ref.images:permute{1, 3, 4, 2}) end,
    "permute")
  local w2 = {}
  for k, v in pairs(w) do w2[k] = v end
  w2["Mixed_6b.branch7x7_2.conv.weight"] = nil
  H.raises("inception: a missing tensor names it and the conversion command", function() M.inception(w2) end,
    "Mixed_6b.branch7x7_2.conv.weight")
end

H.raises("inception: a missing weights file names it and the conversion command",
  function() M.inception("/nonexistent/inception.safetensors") end, "convert_inception.py")
H.raises("inception: a missing weights file names the file",
  function() M.inception("/nonexistent/inception.safetensors") end, "/nonexistent/inception.safetensors")
H.raises("load_stats: a missing stats file names it and the recipe", function() M.load_stats("/nonexistent/s.npz") end,
  "fid_stats.lua")

-- ---------------------------------------------------------------- Fréchet distance

do
  local r = T.load("tests/ref/fid_ref.safetensors")
  for _, c in ipairs{"a", "b"} do
    local want = r[c .. "_fid"]:item()
    local f = M.frechet_distance(r[c .. "_mu1"], r[c .. "_sigma1"], r[c .. "_mu2"], r[c .. "_sigma2"])
    H.check(("frechet_distance case %s = scipy (%.10g)"):format(c, want), math.abs(f - want) / want <= TOL_FID,
      ("got %.12g, rel err %.3g"):format(f, math.abs(f - want) / want))
    local mu1, s1 = M.feature_stats(r[c .. "_feats1"])
    local mu2, s2 = M.feature_stats(r[c .. "_feats2"])
    check_abs("feature_stats case " .. c .. ": cov = np.cov (N-1)", s1, r[c .. "_sigma1"], 1e-12)
    check_abs("feature_stats case " .. c .. ": mean = np.mean", mu2, r[c .. "_mu2"], 1e-6)
    local g = M.frechet_distance(mu1, s1, mu2, s2)
    H.check("FID from features, case " .. c, math.abs(g - want) / want <= TOL_FID_FROM_FEATS,
      ("got %.12g, rel err %.3g"):format(g, math.abs(g - want) / want))
    -- streaming statistics over uneven batches equal the one-shot ones
    local st = M.stats(48)
    local n = r[c .. "_feats1"]:shape()[1]
    local i = 1
    for _, b in ipairs{7, 1, 13, n} do
      local len = math.min(b, n - i + 1)
      if len > 0 then st:add(r[c .. "_feats1"]:narrow(1, i, len)); i = i + len end
    end
    local smu, ss = st:get()
    check_abs("stats:add over batches = one shot, case " .. c, ss, s1, 1e-12)
    check_abs("stats:add over batches: mean, case " .. c, smu, mu1, 1e-12)
  end
  local mu, s = M.feature_stats(r.a_feats1)
  local f0 = M.frechet_distance(mu, s, mu, s)
  H.check("frechet_distance of a distribution with itself is ~0", math.abs(f0) < 1e-8, f0)
  H.raises("frechet_distance: mismatched shapes", function() M.frechet_distance(mu, s, r.b_mu1:narrow(1, 1, 3), s) end,
    "shapes differ")
  -- save / load both layouts
  local tmp = os.tmpname()
  for _, ext in ipairs{".npz", ".safetensors"} do
    M.save_stats(tmp .. ext, mu, s, 400)
    local lmu, ls = M.load_stats(tmp .. ext)
    check_abs("save_stats/load_stats round trip " .. ext, ls, s, 0)
    check_abs("save_stats/load_stats round trip " .. ext .. " (mu)", lmu, mu, 0)
    os.remove(tmp .. ext)
  end
  os.remove(tmp)
end

-- ---------------------------------------------------------------- precision / recall

do
  -- real: 10 points on a line at 0..9 (k=3 radius: 3 for the ends... computed below),
  -- fake: 4 points, two inside the real manifold, two far away.
  local D = 5
  local function pts(xs)
    local t = {}
    for _, v in ipairs(xs) do t[#t + 1] = v; for _ = 2, D do t[#t + 1] = 0 end end
    return T.from_table(t, {#xs, D})
  end
  local real = pts{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
  -- radii (k=3): point 0 -> 3rd nearest other is 3; point 4 -> neighbours 3,5,2|6 -> 2.
  -- fake at 12 is within radius 3 of 9 (9's 3rd neighbour is 6): inside. 13.5 and -20 not.
  local fake = pts{4.5, 12, 13.5, -20}
  local p, r = M.precision_recall(real, fake, {k = 3})
  H.check("precision (k=3) on a line: 2 of 4 fake points inside", math.abs(p - 0.5) < 1e-12, p)
  -- fake radii (k=3) = distance to the 3rd nearest other fake: 4.5 -> 24.5 (|4.5+20|),
  -- 12 -> 32, 13.5 -> 33.5, -20 -> 33.5: every real point in 0..9 is inside
  H.check("recall (k=3) on a line: all real points covered", math.abs(r - 1) < 1e-12, r)
  local p1, r1 = M.precision_recall(real, real, {k = 3})
  H.check("precision = recall = 1 for identical sets", p1 == 1 and r1 == 1, p1 .. " " .. r1)

  -- random sets against a naive Lua count
  local a, b = T.randn({60, 8}), T.randn({50, 8}) * 1.5 + 0.5
  local function naive(real_, fake_, k)
    local R, F = real_:totable(), fake_:totable()
    local nr, nf, d = real_:shape()[1], fake_:shape()[1], real_:shape()[2]
    local function dist(X, i, Y, j)
      local s = 0
      for c = 1, d do local e = X[(i - 1) * d + c] - Y[(j - 1) * d + c]; s = s + e * e end
      return s
    end
    local function radii(X, n)
      local rr = {}
      for i = 1, n do
        local ds = {}
        for j = 1, n do ds[#ds + 1] = dist(X, i, X, j) end
        table.sort(ds)
        rr[i] = ds[k + 1]
      end
      return rr
    end
    local function cover(Q, nq, X, nx, rad)
      local c = 0
      for i = 1, nq do
        for j = 1, nx do if dist(Q, i, X, j) <= rad[j] then c = c + 1; break end end
      end
      return c / nq
    end
    return cover(F, nf, R, nr, radii(R, nr)), cover(R, nr, F, nf, radii(F, nf))
  end
  local np_, nr_ = naive(a, b, 3)
  local gp, gr = M.precision_recall(a, b, {k = 3})
  H.check(("precision/recall of random sets = naive loops (%.3f, %.3f)"):format(np_, nr_),
    math.abs(gp - np_) < 1e-12 and math.abs(gr - nr_) < 1e-12, ("got %.4f %.4f"):format(gp, gr))
  H.raises("precision_recall: too few points", function() M.precision_recall(a:narrow(1, 1, 3), b) end, "more than k")
end

H.done()
