-- iddpm/image.lua — images between tensors and files: [-1,1] float <-> uint8 (the
-- official export rule: trunc(clamp((x+1)*127.5, 0, 255))), NCHW <-> NHWC, grids of
-- samples, PNG and GIF writing. Used by training (sample grids), sampling and the
-- denoising animations.
local T = require "iddpm.tensor"
local io_ = require "iddpm.io"

local image = {}

-- x (N,C,H,W) float in [-1,1] -> uint8 (N,C,H,W), truncating as image_sample.py does
function image.to_uint8(x)
  return T.no_grad(function() return ((x + 1) * 127.5):clamp(0, 255):floor():byte() end)
end

-- uint8 (N,C,H,W) -> float (N,C,H,W) in [-1,1]
function image.from_uint8(u) return u:float() / 127.5 - 1 end

-- uint8 (N,C,H,W) -> uint8 (N,H,W,C)
function image.nhwc(u) return u:permute(1, 3, 4, 2):contiguous() end

image.MIN_GRID_WIDTH = 512   -- scale = 0 (auto): upscale until a grid is at least this wide
image.MAX_SCALE = 16

-- the integer upscale that makes `width` pixels at least image.MIN_GRID_WIDTH wide
function image.auto_scale(width, min_width)
  return math.max(1, math.min(image.MAX_SCALE, math.ceil((min_width or image.MIN_GRID_WIDTH) / math.max(width, 1))))
end

-- u8 (H,W,C) -> each pixel an s x s block (nearest neighbour)
function image.upscale(g, s)
  if s == 1 then return g end
  local sh = g:shape()
  local H, W, C = sh[1], sh[2], sh[3]
  return g:reshape(H, 1, W, 1, C):expand({H, s, W, s, C}):contiguous():reshape(H * s, W * s, C)
end

-- x (N,C,H,W) (float in [-1,1] or uint8) -> uint8 (rows*H + pad, cols*W + pad, C) grid;
-- opts.scale: upscale the whole grid by this integer (nearest; default 1), 0 = auto
-- (image.auto_scale: at least MIN_GRID_WIDTH pixels wide); opts.cols, pad, pad_value
function image.grid(x, opts)
  opts = opts or {}
  local u = x:dtype() == "uint8" and x or image.to_uint8(x)
  local s = u:shape()
  local n, c, h, w = s[1], s[2], s[3], s[4]
  local cols = opts.cols or math.ceil(math.sqrt(n))
  local rows = math.ceil(n / cols)
  local pad = opts.pad or 2
  local H, W = rows * (h + pad) + pad, cols * (w + pad) + pad
  local g = T.full({c, H, W}, opts.pad_value or 255, "uint8")
  for i = 0, n - 1 do
    local r, q = i // cols, i % cols
    g:narrow(2, pad + r * (h + pad) + 1, h):narrow(3, pad + q * (w + pad) + 1, w):copy_(u:narrow(1, i + 1, 1):reshape(c, h, w))
  end
  g = g:permute(2, 3, 1):contiguous()
  local scale = opts.scale or 1
  if math.type(scale) ~= "integer" or scale < 0 then
    error(("image.grid: scale = %s (expected an integer >= 1, or 0 for auto)"):format(tostring(scale)), 2)
  end
  if scale == 0 then scale = image.auto_scale(W) end
  return image.upscale(g, scale), scale
end

function image.save_grid(path, x, opts)
  io_.png_write(path, (image.grid(x, opts)))
  return path
end

-- one PNG per image: dir/<prefix><index, 6 digits>.png ; returns the count
function image.save_each(dir, x, prefix, first_index)
  local u = image.nhwc(x:dtype() == "uint8" and x or image.to_uint8(x))
  local n = u:size(1)
  for i = 1, n do
    io_.png_write(("%s/%s%06d.png"):format(dir, prefix or "", (first_index or 0) + i - 1), u:narrow(1, i, 1):reshape(u:size(2), u:size(3), u:size(4)))
  end
  return n
end

-- frames: list of (N,C,H,W) tensors (one per step) -> animated GIF of their grids
function image.save_gif(path, frames, opts)
  opts = opts or {}
  local gs = {}
  for i, f in ipairs(frames) do
    local g = image.grid(f, opts)
    local s = g:shape()
    gs[i] = g:reshape(1, s[1], s[2], s[3])
  end
  local all = gs[1]
  -- T.cat takes at most 8 tensors at once: fold
  for i = 2, #gs, 7 do
    local group = {all}
    for j = i, math.min(i + 6, #gs) do group[#group + 1] = gs[j] end
    all = T.cat(group, 1)
  end
  io_.gif_write(path, all, opts.delay or 10)
  return path
end

return image
