-- iddpm/plot.lua — a loss curve drawn straight into a uint8 image (no plotting library):
-- log-scale y, grid lines at powers of ten (and 2x, 5x), the raw points in light blue
-- and a moving average in dark blue. The axis ranges go into a PNG text chunk.
local T = require "iddpm.tensor"
local io_ = require "iddpm.io"

local plot = {}

-- points: list of {x, y}; y > 0. opts: width, height
function plot.loss_curve(path, points, opts)
  opts = opts or {}
  local W, H = opts.width or 640, opts.height or 360
  local L, R, Tm, B = 40, 12, 12, 24    -- margins
  local px = {}
  for i = 1, W * H * 3 do px[i] = 255 end
  local function set(x, y, r, g, b)
    if x < 0 or y < 0 or x >= W or y >= H then return end
    local i = (y * W + x) * 3
    px[i + 1], px[i + 2], px[i + 3] = r, g, b
  end
  local xs, ys = {}, {}
  for i, p in ipairs(points) do xs[i], ys[i] = p[1], math.max(p[2], 1e-12) end
  local x0, x1 = xs[1], xs[#xs]
  if x1 <= x0 then x1 = x0 + 1 end
  local lo, hi = math.huge, -math.huge
  for _, y in ipairs(ys) do lo, hi = math.min(lo, y), math.max(hi, y) end
  local llo, lhi = math.log(lo, 10), math.log(hi, 10)
  if lhi - llo < 0.3 then local m = (lhi + llo) / 2; llo, lhi = m - 0.15, m + 0.15 end
  local pw, ph = W - L - R, H - Tm - B
  local function sx(x) return L + math.floor((x - x0) / (x1 - x0) * (pw - 1) + 0.5) end
  local function sy(y) return Tm + math.floor((lhi - math.log(y, 10)) / (lhi - llo) * (ph - 1) + 0.5) end
  -- grid: powers of ten (dark) and 2x, 5x (light); vertical lines at tenths of the x range
  for e = math.floor(llo), math.ceil(lhi) do
    for _, m in ipairs{1, 2, 5} do
      local v = m * 10 ^ e
      if math.log(v, 10) >= llo and math.log(v, 10) <= lhi then
        local y, c = sy(v), m == 1 and 170 or 225
        for x = L, L + pw - 1 do set(x, y, c, c, c) end
        if m == 1 then for x = L - 6, L - 1 do set(x, y, 0, 0, 0) end end   -- tick
      end
    end
  end
  for k = 0, 10 do
    local x = L + math.floor(k * (pw - 1) / 10 + 0.5)
    for y = Tm, Tm + ph - 1 do set(x, y, 235, 235, 235) end
    for y = Tm + ph, Tm + ph + 4 do set(x, y, 0, 0, 0) end
  end
  -- axes
  for x = L, L + pw - 1 do set(x, Tm + ph, 0, 0, 0) end
  for y = Tm, Tm + ph do set(L - 1, y, 0, 0, 0) end
  -- a line between two points (Bresenham), 2 px thick when bold
  local function line(xa, ya, xb, yb, r, g, b, bold)
    local dx, dy = math.abs(xb - xa), -math.abs(yb - ya)
    local stx, sty = xa < xb and 1 or -1, ya < yb and 1 or -1
    local err = dx + dy
    while true do
      set(xa, ya, r, g, b)
      if bold then set(xa, ya + 1, r, g, b) end
      if xa == xb and ya == yb then break end
      local e2 = 2 * err
      if e2 >= dy then err = err + dy; xa = xa + stx end
      if e2 <= dx then err = err + dx; ya = ya + sty end
    end
  end
  for i = 2, #xs do line(sx(xs[i - 1]), sy(ys[i - 1]), sx(xs[i]), sy(ys[i]), 160, 190, 235) end
  -- moving average of the log over a window of ~5% of the points
  local win = math.max(1, #ys // 20)
  local sm, acc = {}, 0
  for i = 1, #ys do
    acc = acc + math.log(ys[i])
    if i > win then acc = acc - math.log(ys[i - win]) end
    sm[i] = math.exp(acc / math.min(i, win))
  end
  for i = 2, #xs do line(sx(xs[i - 1]), sy(sm[i - 1]), sx(xs[i]), sy(sm[i]), 20, 60, 160, true) end
  local img = T.from_table(px, {H, W, 3}, "uint8")
  local text = ("loss vs step; x %s..%s (linear), y %.4g..%.4g (log10, gridlines at 1,2,5 x 10^k); last %.4g")
    :format(tostring(x0), tostring(xs[#xs]), 10 ^ llo, 10 ^ lhi, ys[#ys])
  io_.png_write(path, img, "Description", text)
  return path
end

return plot
