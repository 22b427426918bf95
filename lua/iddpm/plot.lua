-- iddpm/plot.lua — training curves drawn with iddpm.canvas (no plotting library).
--
--   plot.training(path, records, opts) -> layout
--       records: list of {step = , loss = , mse = , vb = , lr = } (log.jsonl lines).
--       A 2x2 figure: loss, mse, vb and the learning rate against the step. Each panel
--       has axes with numbered ticks, a title (saying "log" when the y axis is
--       logarithmic: all values > 0 and spanning more than LOG_SPAN) and, for the
--       losses, the raw values in a light colour under their exponential moving
--       average (window 1/EMA_FRACTION of the points, debiased) in a dark one, with a legend.
--       The axis ranges go into the PNG's Description text chunk. Returns the layout
--       (per panel: the pixel box and the sx / sy maps from data to pixels), which the
--       tests use to find the curves.
--   plot.loss_curve(path, points, opts): the older one-panel form; points {{step, loss}}.
--   plot.read_log(path) -> the records of a log.jsonl
--   plot.ema(values, window) -> the smoothed values (in the log domain if opts.log)
--   plot.nice_ticks(lo, hi, n), plot.log_ticks(lo, hi), plot.fmt(v): the axis helpers.
local K = require "iddpm.canvas"

local plot = {}

plot.LOG_SPAN = 5            -- max/min above this gives a log axis
plot.EMA_FRACTION = 40       -- the EMA's window: 1/40 of the points
plot.COLORS = {
  axis = {0, 0, 0}, grid = {228, 228, 228}, text = {20, 20, 20},
  raw = {150, 185, 235}, ema = {20, 60, 160}, lr = {170, 60, 20},
}

-- ---------------------------------------------------------------- numbers

-- a short label for a tick value: 0.002, 0.05, 20, 1500, 20K, 1.5M, 2E-5
function plot.fmt(v)
  if v == 0 then return "0" end
  local a = math.abs(v)
  if a >= 1e4 then
    local s, unit = a >= 1e6 and v / 1e6 or v / 1e3, a >= 1e6 and "M" or "K"
    return (("%.2f"):format(s):gsub("%.?0+$", "")) .. unit
  end
  if a >= 1e-3 then
    local s = ("%.4f"):format(v):gsub("0+$", ""):gsub("%.$", "")
    return s
  end
  local e = math.floor(math.log(a, 10) + 1e-9)
  local m = v / 10 ^ e
  return (("%.1f"):format(m):gsub("%.0$", "")) .. "E" .. e
end

-- about n "nice" ticks (1, 2, 5 x 10^k apart) covering [lo, hi]
function plot.nice_ticks(lo, hi, n)
  n = n or 5
  if hi <= lo then return {lo} end
  local raw = (hi - lo) / n
  local p = 10 ^ math.floor(math.log(raw, 10))
  local step = p
  for _, m in ipairs{1, 2, 5, 10} do if m * p >= raw then step = m * p break end end
  local t, out = math.ceil(lo / step - 1e-9) * step, {}
  while t <= hi + step * 1e-9 do
    out[#out + 1] = math.abs(t) < step * 1e-9 and 0 or t
    t = t + step
  end
  return out
end

-- ticks of a log axis over [lo, hi] (values, lo > 0): the powers of ten, plus 2x and 5x
-- when fewer than three powers fall inside; -> list of {value, labelled}
function plot.log_ticks(lo, hi)
  local out, decades = {}, 0
  for e = math.floor(math.log(lo, 10)), math.ceil(math.log(hi, 10)) do
    local v = 10 ^ e
    if v >= lo * (1 - 1e-9) and v <= hi * (1 + 1e-9) then decades = decades + 1 end
  end
  for e = math.floor(math.log(lo, 10)), math.ceil(math.log(hi, 10)) do
    for _, m in ipairs{1, 2, 5} do
      local v = m * 10 ^ e
      if v >= lo * (1 - 1e-9) and v <= hi * (1 + 1e-9) then out[#out + 1] = {v, m == 1 or decades < 3} end
    end
  end
  return out
end

-- exponential moving average with bias correction; window ~ the effective span
function plot.ema(values, window, log)
  local a = 1 - 1 / math.max(1, window)
  local out, acc, w = {}, 0, 0
  for i, v in ipairs(values) do
    local x = log and math.log(v) or v
    acc, w = a * acc + (1 - a) * x, a * w + (1 - a)
    out[i] = log and math.exp(acc / w) or acc / w
  end
  return out
end

local function finite(v) return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge end

-- ---------------------------------------------------------------- one panel

-- draw series {xs, ys} in the box (x, y, w, h) of canvas cv. p: title, log (nil = auto),
-- smooth (draw raw + EMA), color, xlo, xhi. Returns the panel's layout or nil (no data).
local function panel(cv, box, xs, ys, p)
  local C = plot.COLORS
  local fs = p.font or 2
  local th = K.text_height(fs)
  -- keep the finite points (and, for a log axis, the positive ones)
  local px, py = {}, {}
  local allpos = true
  for i = 1, #xs do
    if finite(xs[i]) and finite(ys[i]) then
      px[#px + 1], py[#py + 1] = xs[i], ys[i]
      if ys[i] <= 0 then allpos = false end
    end
  end
  local lo, hi = math.huge, -math.huge
  for _, v in ipairs(py) do lo, hi = math.min(lo, v), math.max(hi, v) end
  local log = p.log
  if log == nil then log = #py > 0 and allpos and hi / lo > plot.LOG_SPAN end
  if log and not allpos then log = false end
  local title = p.title .. (log and " (LOG)" or "")
  cv:label(box.x + box.w // 2, box.y + 4, title, C.text, fs, "center", "top")
  local L = box.x + K.text_width("0.0000", fs) + 10      -- room for the y tick labels
  local top = box.y + th + 14
  local R = box.x + box.w - K.text_width("0000", fs) // 2 - 8   -- half a tick label past the end
  local B = box.y + box.h - th - 12                       -- room for the x tick labels
  local pw, ph = R - L, B - top
  if #py == 0 then
    cv:box(L, top, pw, ph, C.axis)
    cv:label(L + pw // 2, top + ph // 2, p.empty or "NO DATA", C.text, fs, "center", "middle")
    return nil
  end
  local x0, x1 = p.xlo or px[1], p.xhi or px[#px]
  if x1 <= x0 then x1 = x0 + 1 end
  local ylo, yhi
  if log then
    ylo, yhi = math.log(lo, 10), math.log(hi, 10)
    if yhi - ylo < 0.3 then local m = (ylo + yhi) / 2; ylo, yhi = m - 0.15, m + 0.15 end
    local pad = (yhi - ylo) * 0.04
    ylo, yhi = ylo - pad, yhi + pad
  else
    ylo, yhi = lo, hi
    if yhi - ylo < math.max(math.abs(yhi), 1e-30) * 1e-6 then   -- constant: show it mid-height from 0
      ylo, yhi = math.min(0, lo), math.max(hi * 1.25, hi + 1e-30)
      if hi < 0 then ylo, yhi = lo * 1.25, 0 end
    else
      local pad = (yhi - ylo) * 0.05
      ylo, yhi = ylo - pad, yhi + pad
    end
  end
  local function sx(x) return L + (x - x0) / (x1 - x0) * (pw - 1) end
  local function sy(v)
    local u = log and math.log(v, 10) or v
    return top + (yhi - u) / (yhi - ylo) * (ph - 1)
  end
  -- grid and y ticks
  local yt = {}
  if log then
    for _, t in ipairs(plot.log_ticks(10 ^ ylo, 10 ^ yhi)) do yt[#yt + 1] = t end
  else
    for _, v in ipairs(plot.nice_ticks(ylo, yhi, 5)) do yt[#yt + 1] = {v, true} end
  end
  local ticks = {y = {}, x = {}}
  for _, t in ipairs(yt) do
    local y = math.floor(sy(t[1]) + 0.5)
    cv:rect(L, y, pw, 1, C.grid)
    cv:rect(L - 5, y, 5, 1, C.axis)
    if t[2] then
      cv:label(L - 8, y, plot.fmt(t[1]), C.text, fs, "right", "middle")
      ticks.y[#ticks.y + 1] = {value = t[1], y = y, label = plot.fmt(t[1])}
    end
  end
  for _, v in ipairs(plot.nice_ticks(x0, x1, math.max(2, pw // 110))) do
    local x = math.floor(sx(v) + 0.5)
    cv:rect(x, top, 1, ph, C.grid)
    cv:rect(x, B, 1, 5, C.axis)
    cv:label(x, B + 8, plot.fmt(v), C.text, fs, "center", "top")
    ticks.x[#ticks.x + 1] = {value = v, x = x, label = plot.fmt(v)}
  end
  -- curves
  -- more points than pixel columns: each column gets one vertical span from the lowest
  -- to the highest value that falls in it (raw) or the column's last value (lines)
  local function columns(vals)
    local lo_, hi_, last, order = {}, {}, {}, {}
    for i = 1, #px do
      local c = math.floor(sx(px[i]) + 0.5)
      local y = sy(vals[i])
      if not last[c] then order[#order + 1] = c; lo_[c], hi_[c] = y, y end
      lo_[c], hi_[c], last[c] = math.min(lo_[c], y), math.max(hi_[c], y), y
    end
    return order, lo_, hi_, last
  end
  local function polyline(vals, color, thick, span)
    if #px > 2 * pw then
      local order, lo_, hi_, last = columns(vals)
      for k, c in ipairs(order) do
        if span then cv:line(c, lo_[c], c, hi_[c], color) end
        if k > 1 then cv:line(order[k - 1], last[order[k - 1]], c, last[c], color, thick) end
      end
      return
    end
    for i = 2, #px do cv:line(sx(px[i - 1]), sy(vals[i - 1]), sx(px[i]), sy(vals[i]), color, thick) end
    if #px == 1 then cv:rect(math.floor(sx(px[1])) - 1, math.floor(sy(vals[1])) - 1, 3, 3, color) end
  end
  local sm
  if p.smooth then
    polyline(py, C.raw, 1, true)
    sm = plot.ema(py, math.max(1, #py // plot.EMA_FRACTION), log)
    polyline(sm, C.ema, 2)
  else
    polyline(py, p.color or C.ema, 2)
  end
  -- axes (last, over the grid)
  cv:rect(L - 1, top, 1, ph + 1, C.axis)
  cv:rect(L - 1, B, pw + 1, 1, C.axis)
  -- legend
  if p.smooth then
    local lw = K.text_width("EMA", fs) + 40
    local lx, ly = R - lw - 6, top + 6
    cv:rect(lx - 4, ly - 4, lw + 8, 2 * th + 14, {255, 255, 255})
    cv:box(lx - 4, ly - 4, lw + 8, 2 * th + 14, C.grid)
    cv:rect(lx, ly + th // 2, 26, 2, C.raw)
    cv:text(lx + 32, ly, "RAW", C.text, fs)
    cv:rect(lx, ly + th + 6 + th // 2, 26, 2, C.ema)
    cv:text(lx + 32, ly + th + 6, "EMA", C.text, fs)
  end
  return {x = L, y = top, w = pw, h = ph, bottom = B, log = log, sx = sx, sy = sy, ylo = ylo, yhi = yhi,
    x0 = x0, x1 = x1, ticks = ticks, smoothed = sm, xs = px, ys = py,
    range = ("%s: x %s..%s, y %.4g..%.4g%s"):format(p.title, plot.fmt(x0), plot.fmt(x1),
      log and 10 ^ ylo or ylo, log and 10 ^ yhi or yhi, log and " (log10)" or "")}
end

-- ---------------------------------------------------------------- figures

plot.PANELS = {
  {key = "loss", title = "LOSS", smooth = true},
  {key = "mse", title = "MSE", smooth = true},
  {key = "vb", title = "VB", smooth = true, empty = "VB = 0 (NO LEARNED SIGMA)"},
  {key = "lr", title = "LEARNING RATE", log = false, color = plot.COLORS.lr},
}

-- the canvas and layout, without writing (for tests and for the report)
function plot.training_canvas(records, opts)
  opts = opts or {}
  local W, H = opts.width or 1200, opts.height or 760
  local cv = K.new(W, H, {255, 255, 255})
  local fs = opts.font or 2
  local foot = K.text_height(fs) + 10
  local cols, rows = 2, 2
  local pw, ph = W // cols, (H - foot) // rows
  local xs = {}
  for i, r in ipairs(records) do xs[i] = r.step end
  local layout = {panels = {}, canvas = cv}
  local ranges = {}
  for k, P in ipairs(plot.PANELS) do
    local ys = {}
    for i, r in ipairs(records) do ys[i] = tonumber(r[P.key]) or (0 / 0) end
    local allzero = true
    for _, v in ipairs(ys) do if finite(v) and v ~= 0 then allzero = false end end
    local box = {x = ((k - 1) % cols) * pw, y = ((k - 1) // cols) * ph, w = pw, h = ph}
    local lay = panel(cv, box, xs, allzero and P.key == "vb" and {} or ys, {title = P.title, log = P.log,
      smooth = P.smooth, color = P.color, empty = P.empty, font = fs, xlo = xs[1], xhi = xs[#xs]})
    layout.panels[P.key] = lay
    if lay then ranges[#ranges + 1] = lay.range end
  end
  cv:label(W // 2, H - 4, "STEP", plot.COLORS.text, fs, "center", "bottom")
  layout.description = "training curves vs step; " .. table.concat(ranges, "; ")
  return cv, layout
end

function plot.training(path, records, opts)
  local cv, layout = plot.training_canvas(records, opts)
  cv:png(path, "Description", layout.description)
  return layout
end

-- the records of a log.jsonl file (lines that are not JSON objects are skipped)
function plot.read_log(path)
  local recs = {}
  local f = require("iddpm.fs").is_file(path) and io.open(path, "r")   -- never a FIFO
  if not f then return recs end
  local json_decode = require("iddpm.io").json_decode
  for line in f:lines() do
    local ok, r = pcall(json_decode, line)
    if ok and type(r) == "table" and tonumber(r.step) then recs[#recs + 1] = r end
  end
  f:close()
  return recs
end

-- one panel: {{step, loss}, ...}
function plot.loss_curve(path, points, opts)
  opts = opts or {}
  local cv = K.new(opts.width or 640, opts.height or 400, {255, 255, 255})
  local xs, ys = {}, {}
  for i, p in ipairs(points) do xs[i], ys[i] = p[1], p[2] end
  local lay = panel(cv, {x = 0, y = 0, w = cv.W, h = cv.H}, xs, ys, {title = opts.title or "LOSS", smooth = true, font = opts.font})
  cv:png(path, "Description", lay and lay.range or "no data")
  return path, lay
end

return plot
