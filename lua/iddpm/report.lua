-- iddpm/report.lua — a run report: one self-contained HTML page (every image inlined as
-- a base64 data URI) about a run directory, written at the end of training and by
-- `iddpm report RUN`.
--
--   report.write(run_dir [, out_path]) -> path (default RUN/report.html; written to a
--       temporary name and renamed)
--   report.html(run_dir) -> the page as a string, and a summary table
--   report.base64(bytes), report.escape(text), report.header(ckpt_path) -> metadata
--
-- What it shows, from the files a run leaves:
--   summary      steps, last loss/mse/vb, images/s, training time (log.jsonl)
--   config       the resolved config stored in the newest checkpoint (non-defaults marked)
--   curves       loss.png (re-drawn from log.jsonl when missing)
--   samples      samples_<step>.png over time (at most MAX_GRIDS, evenly spaced, the last
--                always), upscaled as they are, shown pixelated
--   throughput   images/s over the run (first, median, last), device and precision
--   checkpoints  ckpt_*.safetensors: step, size, EMA rates
--   evaluation   RUN/eval/*.json: any JSON object (tools/eval_nll.lua writes
--                RUN/eval/nll.json when given a run directory; eval_fid.lua writes where
--                out= says, so out=RUN/eval/fid.json); bpd and fid go into the summary
-- Only the checkpoint headers are read (not their tensors), so it is cheap on big runs.
local io_ = require "iddpm.io"
local plot = require "iddpm.plot"
local fs = require "iddpm.fs"

local report = {}
report.MAX_GRIDS = 8

-- ---------------------------------------------------------------- helpers

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64C = {}
for i = 1, 64 do B64C[i - 1] = B64:sub(i, i) end

function report.base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    out[#out + 1] = B64C[n >> 18] .. B64C[(n >> 12) & 63] .. (b and B64C[(n >> 6) & 63] or "=") .. (c and B64C[n & 63] or "=")
  end
  return table.concat(out)
end

function report.escape(s)
  return (tostring(s):gsub("[&<>\"']", {["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;"}))
end
local esc = report.escape

local function read_all(path)
  if not fs.is_file(path) then return nil end   -- a FIFO would block
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function list_dir(dir) return fs.list(dir) end   -- sorted

local function size_of(path)
  local f = fs.is_file(path) and io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

local function img_tag(path, alt, class)
  local bytes = read_all(path)
  if not bytes then return ("<p class=missing>%s: not found</p>"):format(esc(path)) end
  return ('<img class="%s" alt="%s" src="data:image/png;base64,%s">'):format(class or "", esc(alt), report.base64(bytes))
end

local function fmt_num(v)
  if type(v) ~= "number" then return tostring(v) end
  if math.type(v) == "integer" then return tostring(v) end
  if v ~= v then return "NaN" end
  local a = math.abs(v)
  if a ~= 0 and (a < 1e-3 or a >= 1e6) then return ("%.4g"):format(v) end
  return ("%.4f"):format(v):gsub("0+$", ""):gsub("%.$", "")
end

local function fmt_time(s) return require("iddpm.timefmt").duration(s, 0, " ") end

-- the __metadata__ of a safetensors file, reading only its header
function report.header(path)
  local f = fs.is_file(path) and io.open(path, "rb")
  if not f then return nil, "cannot open " .. path end
  local head = f:read(8)
  if not head or #head < 8 then f:close() return nil, path .. ": too short for safetensors" end
  local n = string.unpack("<I8", head)
  if n > 100 * 1024 * 1024 then f:close() return nil, path .. ": implausible header size" end
  local js = f:read(n)
  f:close()
  local ok, h = pcall(io_.json_decode, js or "")
  if not ok or type(h) ~= "table" then return nil, path .. ": header is not JSON" end
  return h.__metadata__ or {}
end

-- ---------------------------------------------------------------- sections

local function section(title, body, id)
  return ('<section id="%s"><h2>%s</h2>\n%s\n</section>\n'):format(id, esc(title), body)
end

local function kv_table(rows, class)
  local out = {('<table class="%s">'):format(class or "kv")}
  for _, r in ipairs(rows) do
    out[#out + 1] = ("<tr><th>%s</th><td>%s</td></tr>"):format(esc(r[1]), r[3] and r[2] or esc(r[2]))
  end
  out[#out + 1] = "</table>"
  return table.concat(out, "\n")
end

local function config_section(cfg)
  if not cfg then return "<p>No checkpoint yet: the resolved config is stored in each checkpoint.</p>" end
  local R = require "iddpm.recipe"
  local rows, seen = {}, {}
  for _, k in ipairs(R.KEYS) do
    local v = cfg[k[1]]
    if v ~= nil then
      seen[k[1]] = true
      local s = type(v) == "string" and ('"' .. v .. '"') or tostring(v)
      local changed = v ~= k[3] and not (type(v) == "number" and v == k[3])
      rows[#rows + 1] = {k[1], ('<code>%s</code>%s'):format(esc(s), changed and ' <span class=chg>*</span>' or ""), true}
    end
  end
  local extra = {}
  for k in pairs(cfg) do if not seen[k] then extra[#extra + 1] = k end end
  table.sort(extra)
  for _, k in ipairs(extra) do rows[#rows + 1] = {k, ("<code>%s</code>"):format(esc(tostring(cfg[k]))), true} end
  return "<p><span class=chg>*</span> differs from the default.</p>\n" .. kv_table(rows, "kv config")
end

local function median(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c[(#c + 1) // 2]
end

-- ---------------------------------------------------------------- the page

local CSS = [[
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse} th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}
th{font-weight:600} table.kv th{color:#555} code{font-size:.95em}
.chg{color:#b04000;font-weight:bold} .missing{color:#a00}
img.plot{max-width:100%;border:1px solid #ddd}
img.grid{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}
.grids{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0} figcaption{text-align:center;color:#555}
.summary td{font-size:1.1em} .muted{color:#777}
]]

function report.html(run_dir)
  local names = list_dir(run_dir)
  local ckpts, grids, evals = {}, {}, {}
  for _, f in ipairs(names) do
    local s = f:match("^ckpt_(%d+)%.safetensors$")
    if s then ckpts[#ckpts + 1] = {step = tonumber(s), path = run_dir .. "/" .. f, name = f} end
    local g = f:match("^samples_(%d+)%.png$")
    if g then grids[#grids + 1] = {step = tonumber(g), path = run_dir .. "/" .. f} end
  end
  table.sort(ckpts, function(a, b) return a.step < b.step end)
  table.sort(grids, function(a, b) return a.step < b.step end)
  for _, f in ipairs(list_dir(run_dir .. "/eval")) do
    if f:match("%.json$") then
      local ok, v = pcall(io_.json_decode, read_all(run_dir .. "/eval/" .. f) or "")
      evals[#evals + 1] = {name = f, value = ok and v or nil, err = not ok and tostring(v) or nil}
    end
  end
  local recs = plot.read_log(run_dir .. "/log.jsonl")
  local last = recs[#recs]
  -- the config of the newest checkpoint
  local cfg, meta
  for i = #ckpts, 1, -1 do
    local m = report.header(ckpts[i].path)
    if m then
      meta = m
      local ok, c = pcall(io_.json_decode, m.config or "{}")
      cfg = ok and c or nil
      break
    end
  end
  -- the loss plot: the run's, or drawn now from the log
  local loss_png = run_dir .. "/loss.png"
  if not size_of(loss_png) and #recs >= 2 then pcall(plot.training, loss_png, recs) end

  local parts = {}
  local summary = {}
  local function add(k, v) summary[#summary + 1] = {k, v} end
  add("run directory", run_dir)
  if last then
    add("steps", tostring(math.tointeger(last.step) or last.step) .. (cfg and cfg.max_steps and cfg.max_steps > 0
      and (" of " .. cfg.max_steps) or ""))
    add("last loss / mse / vb", ("%s / %s / %s"):format(fmt_num(last.loss), fmt_num(last.mse), fmt_num(last.vb)))
    add("images per second (last log line)", fmt_num(last.images_per_s))
    add("training time (this process's clock)", fmt_time(last.time))
  elseif ckpts[#ckpts] then
    add("steps", tostring(ckpts[#ckpts].step))
  end
  for _, e in ipairs(evals) do
    if type(e.value) == "table" then
      for _, k in ipairs{"bpd", "fid", "precision", "recall"} do
        if type(e.value[k]) == "number" then add(("%s (eval/%s)"):format(k, e.name), fmt_num(e.value[k])) end
      end
    end
  end
  parts[#parts + 1] = section("Summary", kv_table(summary, "kv summary"), "summary")
  parts[#parts + 1] = section("Training curves", size_of(loss_png) and img_tag(loss_png, "loss, mse, vb and learning rate", "plot")
    or "<p>No log yet (log.jsonl has fewer than two lines).</p>", "curves")
  -- samples over time
  local shown = {}
  if #grids <= report.MAX_GRIDS then shown = grids
  else
    local used = {}
    for k = 0, report.MAX_GRIDS - 1 do
      local i = 1 + math.floor(k * (#grids - 1) / (report.MAX_GRIDS - 1) + 0.5)
      if not used[i] then used[i] = true; shown[#shown + 1] = grids[i] end
    end
  end
  local gb = {}
  if #shown == 0 then gb[1] = "<p>No sample grids yet (samples_&lt;step&gt;.png: every sample_interval steps and at the end).</p>"
  else
    gb[1] = ('<p class=muted>%d grid%s from the EMA weights%s.</p><div class="grids">'):format(#grids, #grids == 1 and "" or "s",
      #grids > #shown and (", %d of them shown"):format(#shown) or "")
    for _, g in ipairs(shown) do
      gb[#gb + 1] = ("<figure>%s<figcaption>step %d</figcaption></figure>"):format(img_tag(g.path, "samples at step " .. g.step, "grid"), g.step)
    end
    gb[#gb + 1] = "</div>"
  end
  parts[#parts + 1] = section("Samples over time", table.concat(gb, "\n"), "samples")
  -- throughput
  local tp = {}
  if #recs > 0 then
    local ips = {}
    for _, r in ipairs(recs) do if tonumber(r.images_per_s) then ips[#ips + 1] = r.images_per_s end end
    if #ips > 0 then
      tp[#tp + 1] = {"images per second: first / median / last log line", ("%s / %s / %s"):format(fmt_num(ips[1]),
        fmt_num(median(ips)), fmt_num(ips[#ips]))}
    end
    if cfg and cfg.batch_size then tp[#tp + 1] = {"batch size", tostring(cfg.batch_size)} end
    tp[#tp + 1] = {"log lines", tostring(#recs)}
  end
  if cfg then tp[#tp + 1] = {"device / precision", ("%s / %s"):format(tostring(cfg.device or "cpu"), tostring(cfg.precision or "auto"))} end
  parts[#parts + 1] = section("Throughput", #tp > 0 and kv_table(tp, "kv") or "<p>No log yet.</p>", "throughput")
  -- checkpoints
  local cb = {"<table><tr><th>file</th><th>step</th><th>size</th><th>EMA rates</th></tr>"}
  for _, c in ipairs(ckpts) do
    local m = report.header(c.path) or {}
    local ok, rates = pcall(io_.json_decode, m.ema_rates or "[]")
    cb[#cb + 1] = ("<tr><td><code>%s</code></td><td>%d</td><td>%.1f MiB</td><td>%s</td></tr>"):format(esc(c.name), c.step,
      (size_of(c.path) or 0) / 2 ^ 20, esc(ok and type(rates) == "table" and table.concat(rates, ", ") or "?"))
  end
  cb[#cb + 1] = "</table>"
  parts[#parts + 1] = section("Checkpoints", #ckpts > 0 and table.concat(cb, "\n") or "<p>No checkpoints.</p>", "checkpoints")
  -- evaluation
  local eb = {}
  if #evals == 0 then
    eb[1] = "<p>No evaluation yet. <code>iddpm run tools/eval_nll.lua checkpoint=RUN data=...</code> writes RUN/eval/nll.json; " ..
      "<code>iddpm run tools/eval_fid.lua samples=... stats=... out=RUN/eval/fid.json</code> the FID.</p>"
  end
  for _, e in ipairs(evals) do
    local rows = {}
    if type(e.value) == "table" then
      local keys = {}
      for k, v in pairs(e.value) do if type(v) ~= "table" then keys[#keys + 1] = k end end
      table.sort(keys)
      for _, k in ipairs(keys) do rows[#rows + 1] = {k, fmt_num(e.value[k])} end
    end
    eb[#eb + 1] = ("<h3>eval/%s</h3>\n%s"):format(esc(e.name), e.err and ("<p class=missing>not JSON: %s</p>"):format(esc(e.err))
      or kv_table(rows, "kv"))
  end
  parts[#parts + 1] = section("Evaluation", table.concat(eb, "\n"), "evaluation")
  parts[#parts + 1] = section("Config", config_section(cfg), "config")
  local title = "iddpm run " .. run_dir:gsub("/+$", ""):match("[^/]*$")
  local page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>%s</title>\n<style>%s</style></head>\n' ..
    '<body>\n<h1>%s</h1>\n<p class=muted>iddpm %s%s</p>\n%s</body></html>\n'):format(esc(title), CSS, esc(title),
    esc(require("iddpm").version or ""), meta and meta.dataset and (" &middot; data: " .. esc(meta.dataset)) or "",
    table.concat(parts))
  return page, {steps = last and last.step, checkpoints = #ckpts, grids = #grids, shown_grids = #shown, evals = #evals}
end

function report.write(run_dir, out)
  if type(run_dir) ~= "string" or run_dir == "" then error("report.write: run_dir must be a directory name", 2) end
  if not fs.is_dir(run_dir) then
    error(("report: %s is not a run directory"):format(run_dir), 2)
  end
  out = out or (run_dir .. "/report.html")
  local page = report.html(run_dir)
  -- exclusive temp file, checked writes, fsync, rename (never through a planted link)
  local ok, err = pcall(fs.write_atomic, out, page)
  if not ok then error(("report: %s"):format(tostring(err)), 2) end
  return out
end

return report
