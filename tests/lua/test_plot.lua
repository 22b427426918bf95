-- test_plot.lua — the pictures a person reads: the bitmap font against its glyph table,
-- the training figure (loss.png) drawn from known data and checked pixel by pixel (axis
-- lines, curve pixels where the data put them, tick labels inked beside their ticks),
-- nearest-neighbour upscaling of grids against a naive loop, and the run report (every
-- section present, every image an inlined PNG whose bytes decode back to the file's,
-- eval results and config shown, `iddpm report RUN` from the command line).
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local K = require "iddpm.canvas"
local plot = require "iddpm.plot"
local image = require "iddpm.image"
local report = require "iddpm.report"
local lfs = require "lfs"

local TMP = os.tmpname()
os.remove(TMP)
assert(lfs.mkdir(TMP))
local BIN = "./iddpm"
if arg then local i = -1; while arg[i - 1] do i = i - 1 end; if arg[i] then BIN = arg[i] end end
print("# seeds: 1 (noise on the test curves); tmp " .. TMP)

-- a curve pixel may sit one pixel off the exact position: the lines are rounded to whole
-- pixels and the EMA is drawn 2 px thick
local TOL_PX = 1

local function same(a, b) return a[1] == b[1] and a[2] == b[2] and a[3] == b[3] end
local function rgb(cv, x, y) return {cv:get(x, y)} end
local function near(cv, x, y, color, r)
  for dy = -r, r do for dx = -r, r do
    local xx, yy = math.floor(x + 0.5) + dx, math.floor(y + 0.5) + dy
    if xx >= 0 and yy >= 0 and xx < cv.W and yy < cv.H and same(rgb(cv, xx, yy), color) then return true end
  end end
  return false
end
-- count non-background pixels in a box
local function ink(cv, x, y, w, h)
  local n = 0
  for yy = math.max(0, y), math.min(cv.H - 1, y + h - 1) do
    for xx = math.max(0, x), math.min(cv.W - 1, x + w - 1) do
      local r, g, b = cv:get(xx, yy)
      if r < 100 and g < 100 and b < 100 then n = n + 1 end
    end
  end
  return n
end

-- ---------------------------------------------------------------- font

do
  local cv = K.new(40, 12, {255, 255, 255})
  cv:text(2, 3, "7a", {0, 0, 0}, 1)
  local bad = 0
  for k, ch in ipairs{"7", "A"} do
    local g = K.glyph(ch)
    for r = 1, 7 do for c = 1, 5 do
      local x, y = 2 + (k - 1) * K.ADVANCE + c - 1, 3 + r - 1
      if (cv:get(x, y) == 0) ~= g[r][c] then bad = bad + 1 end
    end end
  end
  H.check("font: '7a' drawn exactly as the glyph table (lower case in capitals)", bad == 0, bad .. " wrong pixels")
  H.check("font: text_width", K.text_width("LOSS", 2) == (4 * 6 - 1) * 2)
  local cv2 = K.new(30, 20, {255, 255, 255})
  cv2:text(1, 1, "8", {0, 0, 0}, 2)
  H.check("font: scale 2 makes 2x2 blocks", cv2:get(1 + 2, 1) == 0 and cv2:get(1 + 3, 1) == 0 and cv2:get(1 + 3, 2) == 0
    and cv2:get(1, 1) == 255)
end

-- ---------------------------------------------------------------- ticks and numbers

H.check("fmt: 0.05, 20K, 1.5M, 2E-5", plot.fmt(0.05) == "0.05" and plot.fmt(20000) == "20K" and plot.fmt(1.5e6) == "1.5M"
  and plot.fmt(2e-5) == "2E-5", plot.fmt(0.05) .. " " .. plot.fmt(20000) .. " " .. plot.fmt(1.5e6) .. " " .. plot.fmt(2e-5))
do
  local t = plot.nice_ticks(0, 4000, 5)
  H.check("nice_ticks(0, 4000): 0, 1000, ..., 4000", #t == 5 and t[1] == 0 and t[5] == 4000, table.concat(t, ","))
  local lt = plot.log_ticks(0.003, 2)
  local labelled = {}
  for _, x in ipairs(lt) do if x[2] then labelled[#labelled + 1] = plot.fmt(x[1]) end end
  H.check("log_ticks(0.003, 2): powers of ten labelled", table.concat(labelled, ",") == "0.01,0.1,1", table.concat(labelled, ","))
  local e = plot.ema({1, 1, 1, 1}, 3)
  H.check("ema of a constant is the constant (debiased)", math.abs(e[1] - 1) < 1e-12 and math.abs(e[4] - 1) < 1e-12)
end

-- ---------------------------------------------------------------- the training figure

local recs = {}
local noise = T.randn({200}, T.generator(1)):totable()
for i = 1, 200 do
  local s = 10 * i
  recs[i] = {step = s, loss = 0.5 * 10 ^ (-s / 1000) * math.exp(0.2 * noise[i]), mse = 0.1, vb = 0.02 * 10 ^ (-s / 1000),
    lr = 1e-4 * math.min(1, s / 500)}
end
local cv, lay = plot.training_canvas(recs)
local C = plot.COLORS
do
  local P = lay.panels
  H.check("figure: four panels", P.loss and P.mse and P.vb and P.lr)
  H.check("figure: loss and vb on log axes, mse (constant) and lr linear", P.loss.log and P.vb.log and not P.mse.log and not P.lr.log)
  for name, p in pairs(P) do
    local ax = 0
    for y = p.y, p.bottom do if same(rgb(cv, p.x - 1, y), C.axis) then ax = ax + 1 end end
    local bx = 0
    for x = p.x - 1, p.x + p.w - 1 do if same(rgb(cv, x, p.bottom), C.axis) then bx = bx + 1 end end
    H.check(("figure %s: y axis line (%d of %d px) and x axis line (%d of %d px)"):format(name, ax, p.bottom - p.y + 1, bx, p.w + 1),
      ax == p.bottom - p.y + 1 and bx == p.w + 1)
    -- every y tick label has ink left of the axis at its height; x labels below the axis
    local missing = 0
    for _, t in ipairs(p.ticks.y) do if ink(cv, p.x - 8 - K.text_width(t.label, 2), t.y - 7, K.text_width(t.label, 2), 14) == 0 then missing = missing + 1 end end
    for _, t in ipairs(p.ticks.x) do if ink(cv, t.x - 20, p.bottom + 8, 40, 14) == 0 then missing = missing + 1 end end
    H.check(("figure %s: %d y and %d x tick labels drawn"):format(name, #p.ticks.y, #p.ticks.x),
      #p.ticks.y >= 2 and #p.ticks.x >= 3 and missing == 0, missing .. " without ink")
  end
  -- curves where the data put them: the raw loss (or the EMA drawn over it) at every point
  local off = 0
  for i = 1, 200, 7 do
    local p = P.loss
    if not (near(cv, p.sx(recs[i].step), p.sy(recs[i].loss), C.raw, TOL_PX) or near(cv, p.sx(recs[i].step), p.sy(recs[i].loss), C.ema, TOL_PX)) then
      off = off + 1
    end
  end
  H.check("figure loss: a curve pixel at each sampled (step, loss)", off == 0, off .. " points without one")
  -- the EMA of a constant mse lies on the constant: its colour at sy(0.1) across the panel
  local ema_off = 0
  for i = 1, 200, 11 do
    if not near(cv, P.mse.sx(recs[i].step), P.mse.sy(0.1), C.ema, TOL_PX) then ema_off = ema_off + 1 end
  end
  H.check("figure mse: the EMA of a constant is drawn at that constant", ema_off == 0, ema_off)
  -- the EMA of the loss is the debiased EMA in the log domain, recomputed here
  local a, acc, w, worst = 1 - 1 / (200 // plot.EMA_FRACTION), 0, 0, 0
  for i = 1, 200 do
    acc, w = a * acc + (1 - a) * math.log(recs[i].loss), a * w + (1 - a)
    worst = math.max(worst, math.abs(P.loss.smoothed[i] - math.exp(acc / w)) / math.exp(acc / w))
  end
  H.check("figure loss: EMA = naive debiased EMA of log(loss)", worst < 1e-12, worst)
  -- lr: the line at the warm-up's end (step 500, lr 1e-4)
  H.check("figure lr: curve at (500, 1e-4)", near(cv, P.lr.sx(500), P.lr.sy(1e-4), C.lr, TOL_PX))
  -- the legend says RAW and EMA
  H.check("figure: legend swatches in the raw and EMA colours", near(cv, P.loss.x + P.loss.w - 60, P.loss.y + 13, C.raw, 25)
    and near(cv, P.loss.x + P.loss.w - 60, P.loss.y + 33, C.ema, 25))
  -- written as a PNG with the ranges in its text chunk
  local path = TMP .. "/loss.png"
  plot.training(path, recs)
  local back = iddpm.io.png_read(path)
  H.check("figure: PNG read back equals the canvas", (back:float() - cv:tensor():float()):abs():max():item() == 0)
  -- more points than pixels: each column spans its lowest and highest raw value
  local many = {}
  for i = 1, 5000 do many[i] = {step = i, loss = i % 2 == 0 and 0.1 or 0.2, mse = 0.1, vb = 0.01, lr = 1e-4} end
  local cm, lm = plot.training_canvas(many)
  local pl, miss = lm.panels.loss, 0
  for _, st in ipairs{100, 1000, 2500, 4000} do
    for _, v in ipairs{0.1, 0.2} do
      if not near(cm, pl.sx(st), pl.sy(v), C.raw, TOL_PX) then miss = miss + 1 end
    end
  end
  H.check("figure, 5000 points: every column spans the raw minimum and maximum", miss == 0, miss)
  -- vb = 0 throughout (no learned sigma): an empty panel, not a crash
  local z = {}
  for i = 1, 5 do z[i] = {step = i, loss = 1 / i, mse = 1 / i, vb = 0, lr = 1e-3} end
  local _, lz = plot.training_canvas(z)
  H.check("figure: vb all zero gives an empty vb panel", lz.panels.vb == nil and lz.panels.loss ~= nil)
end

-- ---------------------------------------------------------------- grids

do
  local u = T.from_table((function() local t = {} for i = 1, 2 * 3 * 4 * 5 do t[i] = (i * 37) % 256 end return t end)(),
    {2, 3, 4, 5}, "uint8")
  local g1 = image.grid(u, {cols = 2, pad = 1})
  local g3 = image.grid(u, {cols = 2, pad = 1, scale = 3})
  local a, b = g1:totable(), g3:totable()
  local s1, s3 = g1:shape(), g3:shape()
  local bad = 0
  for y = 0, s3[1] - 1 do for x = 0, s3[2] - 1 do for c = 0, 2 do
    if b[(y * s3[2] + x) * 3 + c + 1] ~= a[((y // 3) * s1[2] + x // 3) * 3 + c + 1] then bad = bad + 1 end
  end end end
  H.check("grid scale 3 == naive nearest-neighbour upscale", s3[1] == 3 * s1[1] and s3[2] == 3 * s1[2] and bad == 0, bad)
  local _, sc = image.grid(T.zeros({16, 1, 28, 28}), {scale = 0})
  H.check("grid scale 0 (auto): 4 x 28 px columns -> x5 (>= 512 px)", sc == 5, sc)
  H.raises("grid: a bad scale", function() image.grid(u, {scale = 1.5}) end, "scale")
end

-- ---------------------------------------------------------------- the report

local function b64decode(s)
  local map = {}
  local A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  for i = 1, 64 do map[A:sub(i, i)] = i - 1 end
  local out = {}
  for i = 1, #s, 4 do
    local q = s:sub(i, i + 3)
    local n, pad = 0, 0
    for j = 1, 4 do
      local ch = q:sub(j, j)
      if ch == "=" then pad = pad + 1; n = n * 64 else n = n * 64 + map[ch] end
    end
    local bytes = string.char((n >> 16) & 255, (n >> 8) & 255, n & 255)
    out[#out + 1] = bytes:sub(1, 3 - pad)
  end
  return table.concat(out)
end
H.check("base64: RFC 4648 vectors", report.base64("") == "" and report.base64("f") == "Zg==" and report.base64("fo") == "Zm8="
  and report.base64("foobar") == "Zm9vYmFy")

do
  local run = TMP .. "/run"
  local c = require("iddpm.recipe").resolve({dataset = "random", image_size = 8, num_images = 8, in_channels = 1,
    num_channels = 32, num_res_blocks = 1, channel_mult = "1,2", attention_resolutions = "", learn_sigma = true,
    diffusion_steps = 20, noise_schedule = "cosine", batch_size = 4, max_steps = 4, log_interval = 1, save_interval = 2, sample_interval = 2,
    num_samples = 4, sample_steps = "5", seed = 0, run_dir = run})
  require("iddpm.train").run(c, {quiet = true})
  assert(lfs.mkdir(run .. "/eval"))
  local f = assert(io.open(run .. "/eval/nll.json", "w"))
  f:write('{"bpd": 3.25, "n": 10}\n')
  f:close()
  local html = assert(io.open(run .. "/report.html")):read("a")
  H.check("report: written at the end of training", #html > 1000)
  local ok = os.execute(("%s report %s > %s/report.txt 2>&1"):format(BIN, run, TMP))
  H.check("report: `iddpm report RUN` succeeds", ok)
  html = assert(io.open(run .. "/report.html")):read("a")
  for _, id in ipairs{"summary", "curves", "samples", "throughput", "checkpoints", "evaluation", "config"} do
    H.check("report: section " .. id, html:find('<section id="' .. id .. '">', 1, true) ~= nil)
  end
  local imgs, decoded_ok, files = 0, 0, {}
  for src in html:gmatch('<img[^>]- src="([^"]*)"') do
    imgs = imgs + 1
    local b64 = src:match("^data:image/png;base64,(.*)$")
    local bytes = b64 and b64decode(b64)
    if bytes and bytes:sub(1, 8) == "\137PNG\r\n\26\n" then decoded_ok = decoded_ok + 1; files[bytes] = true end
  end
  H.check(("report: %d images, all inlined PNG data URIs"):format(imgs), imgs == 3 and decoded_ok == imgs, decoded_ok)
  local want = {"loss.png", "samples_00000002.png", "samples_00000004.png"}
  local found = 0
  for _, n in ipairs(want) do if files[assert(io.open(run .. "/" .. n, "rb")):read("a")] then found = found + 1 end end
  H.check("report: the inlined bytes are loss.png and both sample grids", found == 3, found)
  H.check("report: no link to another file", not html:find('src="[^d]') and not html:find('href="', 1, true))
  H.check("report: eval/nll.json shown (bpd 3.25 in the summary)", html:find("bpd (eval/nll.json)", 1, true)
    and html:find("3.25", 1, true))
  H.check("report: config from the checkpoint (num_channels 32, changed from the default)",
    html:find("<th>num_channels</th><td><code>32</code> <span class=chg>*</span>", 1, true) ~= nil)
  H.check("report: checkpoints listed", html:find("ckpt_00000004.safetensors", 1, true) and html:find("ckpt_00000002.safetensors", 1, true))
  H.check("report: throughput", html:find("images per second: first / median / last", 1, true) ~= nil)
  H.check("report: no temporary file left", io.open(run .. "/report.html.tmp") == nil)
  -- more grids than MAX_GRIDS: evenly spaced, the first and the last kept
  for s = 6, 40, 2 do
    local src = assert(io.open(run .. "/samples_00000004.png", "rb")):read("a")
    local g = assert(io.open(("%s/samples_%08d.png"):format(run, s), "wb")); g:write(src); g:close()
  end
  local _, info = report.html(run)
  H.check(("report: %d grids, %d shown"):format(info.grids, info.shown_grids), info.grids == 20 and info.shown_grids == report.MAX_GRIDS)
  local okb = os.execute(("%s report %s/nonexistent > %s/bad.txt 2>&1"):format(BIN, TMP, TMP))
  local msg = assert(io.open(TMP .. "/bad.txt")):read("a")
  H.check("report: a missing run directory is an error that names it", not okb and msg:find("is not a run directory", 1, true), msg)
end

os.execute(("rm -rf '%s'"):format(TMP))
H.done()
