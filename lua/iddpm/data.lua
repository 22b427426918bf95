-- iddpm/data.lua — training datasets and the batch loader.
--
--   data.load{dataset, data_dir, image_size, class_cond, in_channels, pad}
--       -> ds {images = uint8 (N,C,H,W), labels = int64 (N) or nil, num_classes, name, files}
--     dataset: "auto" (from what data_dir holds), "cifar10" (binary batches
--     data_batch_1..5.bin), "fashion_mnist" / "mnist" / "idx" (train-images-idx3-ubyte[.gz]
--     + train-labels-idx1-ubyte[.gz]), "folder" (PNG files, recursively; class = file name
--     prefix before "_", as the official loader), "imagenet64" (downsampled-ImageNet npz
--     files: data (N, 3*S*S) uint8 CHW planes, labels 1-based), "random" (a fixed fake
--     dataset for tests and benchmarks).
--     Images smaller than image_size by an even margin (28 -> 32 for MNIST-like data) are
--     zero-padded when pad ~= false (black, which is the background of those datasets);
--     PNGs of any size are centre-cropped and resized to image_size.
--   data.loader(ds, {batch_size, shuffle, flip, seed, stream, rank, world_size}) -> loader
--     rank/world_size (data parallelism): this rank's slice of each global batch of
--     world_size x batch_size slots of the epoch's permutation (engine/io/loader.c)
--     loader:next() -> x float32 (B,C,H,W) in [-1,1], y int64 (B) (nil without labels)
--     loader:state() -> {epoch, index}; loader:set_state(s); loader:close()
--     Batches are built by a background thread (engine/io/loader.c); the order is a pure
--     function of (seed, stream, epoch, index), so the state above resumes it exactly.
local T = require "iddpm.tensor"
local io_ = require "iddpm.io"
local C = require "iddpm._data"
local fs = require "iddpm.fs"

local data = {}
data.now = C.now
data.clear_interrupt = C.clear_interrupt
data.defer_interrupt = C.defer_interrupt

data.CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
data.FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

-- (no file is opened to test it, so a FIFO never blocks; readers refuse non-regular files)
local function exists(path) return fs.kind(path) ~= nil end
local function isdir(path) return fs.is_dir(path) end

-- sorted list of the regular files under dir (recursively, no shell) whose name matches
-- one of the patterns; sorted by the whole path, byte order
local function list_files(dir, patterns)
  local out = {}
  for _, f in ipairs(fs.walk(dir)) do
    local lower = f:lower()
    for _, pat in ipairs(patterns) do
      if lower:match(pat) then out[#out + 1] = f break end
    end
  end
  table.sort(out)
  return out
end

local function cat(list, dim)
  local all = list[1]
  for i = 2, #list, 7 do
    local group = {all}
    for j = i, math.min(i + 6, #list) do group[#group + 1] = list[j] end
    all = T.cat(group, dim)
  end
  return all
end

-- ---------------------------------------------------------------- formats

function data.cifar10(dir)
  local files = {}
  for i = 1, 5 do
    local f = ("%s/data_batch_%d.bin"):format(dir, i)
    if exists(f) then files[#files + 1] = f end
  end
  if #files == 0 then
    local hint = ""
    if exists(dir .. "/cifar-10-batches-bin/data_batch_1.bin") then
      hint = ("\n(found %s/cifar-10-batches-bin/: use data_dir=%s/cifar-10-batches-bin)"):format(dir, dir)
    elseif exists(dir .. "/data_batch_1") then
      hint = "\n(this looks like the Python (pickle) version; iddpm reads the binary version)"
    end
    error(("cifar10: no data_batch_1.bin in %s.\n" ..
      "Download the CIFAR-10 binary version (162 MB) from %s and unpack it:\n" ..
      "  mkdir -p data && curl -L %s | tar xz -C data\n" ..
      "which gives data/cifar-10-batches-bin/{data_batch_1.bin .. data_batch_5.bin, test_batch.bin, batches.meta.txt}\n" ..
      "(each batch 10000 records of 1 label byte + 3072 pixel bytes = 30730000 bytes); then pass\n" ..
      "  data_dir=data/cifar-10-batches-bin%s"):format(dir, data.CIFAR10_URL, data.CIFAR10_URL, hint), 0)
  end
  local ims, lbs = {}, {}
  for i, f in ipairs(files) do
    local ok, im, lb = pcall(io_.cifar10_read, f)
    if not ok then error(tostring(im), 0) end
    ims[i], lbs[i] = im, lb
  end
  return {images = cat(ims, 1), labels = cat(lbs, 1), num_classes = 10, name = "cifar10", files = files}
end

function data.idx(dir, name)
  local function find(base)
    for _, f in ipairs{dir .. "/" .. base .. ".gz", dir .. "/" .. base} do if exists(f) then return f end end
    for _, f in ipairs{dir .. "/" .. base:gsub("%-idx", ".idx") .. ".gz", dir .. "/" .. base:gsub("%-idx", ".idx")} do
      if exists(f) then return f end
    end
  end
  local im, lb = find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte")
  if not im or not lb then
    error(("%s: %s needs train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] (IDX files as " ..
      "distributed for MNIST / Fashion-MNIST; on Debian: apt-get install dataset-fashion-mnist puts them in %s)")
      :format(name or "idx", dir, data.FASHION_MNIST_DIR), 0)
  end
  local ok, x, y = pcall(io_.mnist_read, im, lb)
  if not ok then error(tostring(x), 0) end
  local s = x:shape()
  return {images = x:reshape(s[1], 1, s[2], s[3]), labels = y, num_classes = 10, name = name or "idx", files = {im, lb}}
end

function data.folder(dir, size, opts)
  opts = opts or {}
  local files = list_files(dir, {"%.png$"})
  if #files == 0 then error(("folder: no .png files under %s"):format(dir), 0) end
  local ch = opts.in_channels
  if not ch or ch == 0 then
    local ok, first = pcall(io_.png_read, files[1], 0)
    if not ok then error(("folder: %s: %s"):format(files[1], tostring(first)), 0) end
    ch = first:shape()[3]
  end
  local out = T.empty({#files, ch, size, size}, "uint8")
  local classes, names, labels = {}, {}, {}
  for i, f in ipairs(files) do
    local ok, im = pcall(io_.png_read, f, ch)
    if not ok then error(("folder: %s: %s (expected a PNG image)"):format(f, tostring(im)), 0) end
    out:narrow(1, i, 1):copy_(C.resize_center_crop(im, size):reshape(1, ch, size, size))
    local base = f:match("([^/]+)$")
    local cls = base:match("^(.-)_") or base
    if not classes[cls] then classes[cls] = true; names[#names + 1] = cls end
    labels[i] = cls
  end
  table.sort(names)
  local index = {}
  for i, n in ipairs(names) do index[n] = i - 1 end
  local lab = {}
  for i = 1, #files do lab[i] = index[labels[i]] end
  return {images = out, labels = T.from_table(lab, {#lab}, "int64"), num_classes = #names, class_names = names,
          name = "folder", files = files}
end

function data.imagenet64(dir)
  local files = isdir(dir) and list_files(dir, {"%.npz$"}) or (exists(dir) and {dir} or {})
  if #files == 0 then
    error(("imagenet64: no .npz files in %s (expected the downsampled ImageNet 64x64 npz batches, " ..
      "train_data_batch_1.npz .. 10, each with data (N,12288) uint8 in R,G,B planes and labels 1..1000)"):format(dir), 0)
  end
  local ims, lbs = {}, {}
  for i, f in ipairs(files) do
    local ok, z = pcall(io_.npz_read, f)
    if not ok then error(("imagenet64: %s: %s"):format(f, tostring(z)), 0) end
    local x, y = z.data, z.labels
    if not x or x:dtype() ~= "uint8" or x:dim() ~= 2 then
      error(("imagenet64: %s: expected an array 'data' of shape (N, 3*S*S) uint8"):format(f), 0)
    end
    local n, d = x:size(1), x:size(2)
    local s = math.floor(math.sqrt(d / 3) + 0.5)
    if 3 * s * s ~= d then error(("imagenet64: %s: data has rows of %d bytes, not 3*S*S"):format(f, d), 0) end
    if not y or y:numel() ~= n then error(("imagenet64: %s: expected 'labels' with %d entries"):format(f, n), 0) end
    ims[i] = x:reshape(n, 3, s, s)
    lbs[i] = y:reshape(n):long() - 1
    lbs[i] = lbs[i]:long()
  end
  return {images = cat(ims, 1), labels = cat(lbs, 1), num_classes = 1000, name = "imagenet64", files = files}
end

-- a fixed fake dataset: n images of smooth random blobs (deterministic in seed)
function data.random(n, ch, size, seed)
  local g = T.generator(seed or 0, 77)
  local x = T.no_grad(function() return (T.rand({n, ch, size, size}, g) * 255):floor():byte() end)
  local y = T.randint(0, 10, {n}, g)
  return {images = x, labels = y, num_classes = 10, name = "random", files = {}}
end

-- zero-pad u8 (N,C,h,w) to (N,C,size,size), centred
function data.pad(images, size)
  local s = images:shape()
  local dy, dx = (size - s[3]) // 2, (size - s[4]) // 2
  local out = T.zeros({s[1], s[2], size, size}, "uint8")
  out:narrow(3, dy + 1, s[3]):narrow(4, dx + 1, s[4]):copy_(images)
  return out
end

-- ---------------------------------------------------------------- dispatch

local function detect(dir)
  if exists(dir .. "/data_batch_1.bin") then return "cifar10" end
  if exists(dir .. "/train-images-idx3-ubyte.gz") or exists(dir .. "/train-images-idx3-ubyte") then return "idx" end
  if #list_files(dir, {"%.npz$"}) > 0 then return "imagenet64" end
  if #list_files(dir, {"%.png$"}) > 0 then return "folder" end
  error(("data: cannot tell what dataset %s holds (looked for data_batch_1.bin, train-images-idx3-ubyte[.gz], " ..
    "*.npz, *.png); set dataset=cifar10|fashion_mnist|mnist|folder|imagenet64"):format(dir), 0)
end

-- cfg: dataset, data_dir, image_size, class_cond, in_channels, pad, num_images (random)
function data.load(cfg)
  local kind, dir, size = cfg.dataset or "auto", cfg.data_dir or "", cfg.image_size
  if kind == "fashion_mnist" and dir == "" then dir = data.FASHION_MNIST_DIR end
  if kind ~= "random" then
    if dir == "" then error(("data: dataset=%s needs data_dir=<path>"):format(kind), 0) end
    if not isdir(dir) and not exists(dir) then
      if kind == "cifar10" then data.cifar10(dir) end   -- raises the download help
      local hint = (kind == "fashion_mnist" or kind == "mnist" or kind == "idx")
        and (" (Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist -> %s)"):format(data.FASHION_MNIST_DIR) or ""
      error(("data: data_dir %s does not exist%s"):format(dir, hint), 0)
    end
  end
  if kind == "auto" then kind = detect(dir) end
  local ds
  if kind == "cifar10" then ds = data.cifar10(dir)
  elseif kind == "fashion_mnist" or kind == "mnist" or kind == "idx" then ds = data.idx(dir, kind)
  elseif kind == "folder" then ds = data.folder(dir, size, cfg)
  elseif kind == "imagenet64" then ds = data.imagenet64(dir)
  elseif kind == "random" then ds = data.random(cfg.num_images or 64, (cfg.in_channels ~= 0 and cfg.in_channels) or 3, size, cfg.seed)
  else
    error(("data: unknown dataset %q (auto, cifar10, fashion_mnist, mnist, idx, folder, imagenet64, random)"):format(kind), 0)
  end
  local s = ds.images:shape()
  if s[3] ~= size or s[4] ~= size then
    if s[3] < size and s[4] < size and cfg.pad ~= false and (size - s[3]) % 2 == 0 and (size - s[4]) % 2 == 0 then
      ds.images = data.pad(ds.images, size)
      ds.padded_from = s[3]
    else
      error(("data: %s images are %dx%d but image_size is %d (set image_size=%d)"):format(ds.name, s[3], s[4], size, s[3]), 0)
    end
  end
  if cfg.in_channels and cfg.in_channels ~= 0 and cfg.in_channels ~= s[2] then
    error(("data: %s images have %d channels but in_channels = %d"):format(ds.name, s[2], cfg.in_channels), 0)
  end
  ds.channels = s[2]
  return ds
end

-- ---------------------------------------------------------------- loader

local Loader = {}
Loader.__index = Loader

function data.loader(ds, opts)
  opts = opts or {}
  local b = opts.batch_size or 1
  if b > ds.images:size(1) then
    error(("data: batch_size %d is larger than the dataset (%d images)"):format(b, ds.images:size(1)), 2)
  end
  local c = C.loader(ds.images, ds.labels, {batch_size = b, shuffle = opts.shuffle == false and 0 or 1,
    flip = opts.flip and 1 or 0, seed = opts.seed or 0, stream = opts.stream or 0,
    rank = opts.rank or 0, world_size = opts.world_size or 1})
  return setmetatable({_c = c, has_labels = ds.labels ~= nil, batch_size = b, size = ds.images:size(1)}, Loader)
end

function Loader:next()
  local x, y = self._c:next()
  return x, self.has_labels and y or nil
end
function Loader:state() local e, i = self._c:position(); return {epoch = e, index = i} end
function Loader:set_state(s) self._c:set_position(s.epoch or s[1], s.index or s[2]) end
function Loader:close() self._c:close() end

return data
