-- test_config.lua — config resolution and the command line of every tool: the schema
-- (types, ranges, "did you mean", aliases, help anywhere, help lines < 100 columns),
-- user errors (exit 2, "iddpm: msg", no traceback unless IDDPM_DEBUG=1, nothing written
-- in run_dir / out), --dry-run, the training run's config.json / log.jsonl /
-- metrics.csv, a finished run, a diverging run (lr=1e30) that stops naming the step
-- and keeps only finite checkpoints, sampling that refuses NaN weights and non-empty
-- folders, Ctrl-C -> exit 130, the UNet's image-size check and shortest JSON floats.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local cfg = require "iddpm.config"
local recipe = require "iddpm.recipe"

local TMP = os.tmpname()
os.remove(TMP)
os.execute("mkdir -p " .. TMP)
local BIN = "./iddpm"
if arg then local i = -1; while arg[i - 1] do i = i - 1 end; if arg[i] then BIN = arg[i] end end
print("# seeds: 0 (tiny runs), 7 (JSON round trip); tmp " .. TMP)

local function read(path) local f = io.open(path) if not f then return "" end local s = f:read("a") f:close() return s end
local function exists(p) return cfg.mode(p) ~= nil end
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- run the program; -> exit code, stdout, stderr
local function run(args, env)
  local o, e = TMP .. "/stdout", TMP .. "/stderr"
  local ok, _, code = os.execute(("%s %s %s >%s 2>%s </dev/null"):format(env or "", q(BIN), args, o, e))
  return ok and 0 or code, read(o), read(e)
end

-- a user error: exit 2, one "iddpm: " message naming `want`, no traceback
local function user_error(name, args, want, must_not_exist, env)
  local rc, out, err = run(args, env)
  H.check(name .. ": exit 2", rc == 2, ("rc %s; %s"):format(rc, err:sub(1, 300)))
  H.check(name .. ": says " .. want, err:find("iddpm: ", 1, true) == 1 and err:find(want, 1, true) ~= nil,
    err:sub(1, 400))
  H.check(name .. ": no traceback", not err:find("traceback", 1, true), err:sub(1, 400))
  if must_not_exist then H.check(name .. ": nothing written", not exists(must_not_exist), must_not_exist) end
  return out, err
end

-- ---------------------------------------------------------------- the schema in-process

do
  local p = cfg.parse_args({"a=1", "help", "--b=2", "--dry-run"})
  H.check("parse_args: help anywhere, --key=value, --dry-run", p.help and p.dry_run and #p.pairs == 2
    and p.pairs[2][1] == "b" and p.pairs[2][2] == "2")
  for _, case in ipairs{
    {"lr=-1", "lr=-1: out of range (expected > 0)"},
    {"lr=1e999", "not a finite number"},
    {"warmup_steps=-1", "warmup_steps=-1: out of range (expected >= 0)"},
    {"lr_anneal_steps=-2", "lr_anneal_steps=-2: out of range"},
    {"max_steps=-5", "max_steps=-5: out of range (expected >= 0)"},
    {"channel_mult=a,b", "'a' is not an integer"},
    {"channel_mult=1,0", "item 0 is out of range"},
    {"save_interval=0", "save_interval=0: out of range (expected >= 1)"},
    {"log_interval=0", "log_interval=0: out of range"},
    {"num_heads=0", "num_heads=0: out of range"},
    {"batch_size=1.5", "not an integer"},
    {"learn_sigma=maybe", "not a boolean"},
    {"sample_steps=abc", "sample_steps=abc does not fit diffusion_steps=1000"},
    {"noise_schedule=cosin", "did you mean 'cosine'?"},
    {"num_chanels=3", "did you mean 'num_channels'?"},
    {"microbatch=8", "microbatch=8 is larger than batch_size=1"},
    {"image_size=27", "image_size=27 has no default channel_mult"},
  } do
    H.raises("train config: " .. case[1], function() recipe.resolve({}, {case[1]}) end, case[2])
  end
  local ok, e = pcall(recipe.resolve, {}, {"lr=0"})
  H.check("a config error is a user error object", not ok and cfg.is_user_error(e) and e.exit == 2, tostring(e))
  local c = recipe.resolve({channel_mult = {1, 2}}, {"ema_rate=0.99,0.999", "microbatch=-1"})
  H.check("lists kept as official strings", c.channel_mult == "1,2" and c.ema_rate == "0.99,0.999")
  local S = require "iddpm.sample"
  local o = S.parse_args("ckpt=" .. TMP, "threads=2", "num=5", "checkpoint=" .. TMP)
  H.check("sample: old names are aliases (threads, num, checkpoint)", o.num_threads == 2 and o.num_samples == 5
    and o.ckpt == TMP)
  H.check("sample: out defaults to samples/ in the run directory", o.out == TMP .. "/samples", o.out)
  H.raises("sample: grid_max=0 refused", function() S.parse_args("ckpt=x", "grid_max=0") end, "grid_max=0: out of range")
  H.raises("sample: a huge gif_delay refused", function() S.parse_args("ckpt=x", "gif_delay=70000") end,
    "gif_delay=70000: out of range (expected in [0, 65535])")
  -- writability: the nearest existing folder decides; nothing is created
  local file = TMP .. "/a_file"
  io.open(file, "w"):close()
  H.raises("check_writable: below a file", function() cfg.check_writable(file .. "/run", "run_dir") end, "is not a directory")
  H.raises("check_writable: a file", function() cfg.check_writable(file, "run_dir") end, "exists and is not a directory")
  cfg.check_writable(TMP .. "/new/deeper", "run_dir")
  H.check("check_writable creates nothing", not exists(TMP .. "/new"))
  local names = {}
  for f in require("lfs").dir(TMP) do if f:find("iddpm_probe", 1, true) then names[#names + 1] = f end end
  H.check("check_writable leaves no probe file", #names == 0, names[1])
end

-- the UNet refuses image sizes it cannot take, naming the size and what works
H.raises("unet: 27 px with 3 downsamplings refused", function()
  iddpm.nn.unet{image_size = 27, channel_mult = {1, 2, 2, 2}, num_channels = 32}
end, "image_size=27 cannot go through the UNet's 3 downsamplings")
H.raises("unet: ... and what would work", function()
  iddpm.nn.unet{image_size = 27, channel_mult = {1, 2, 2, 2}, num_channels = 32}
end, "multiple of 8, e.g. 24 or 32")
H.raises("unet: channels not in 32 groups", function() iddpm.nn.unet{image_size = 8, channel_mult = {1, 2}, num_channels = 20} end,
  "every level needs a multiple of 32")

-- JSON floats: the shortest text that reads back as the same double
do
  local js = iddpm.io.json_encode
  H.check("json: 0.1 is written 0.1", js({0.1, 1e-4, 0.9999}) == "[0.1,0.0001,0.9999]", js({0.1, 1e-4, 0.9999}))
  local g = T.generator(7)
  local xs = T.randn({200}, g):double():totable()
  local bad
  for i, x in ipairs(xs) do
    local v = x * 10.0 ^ ((i % 40) - 20)
    local back = iddpm.io.json_decode(js({v}))[1]
    if back ~= v then bad = ("%.17g -> %s"):format(v, js({v})) end
  end
  H.check("json: 200 random doubles round-trip exactly", bad == nil, bad)
end

-- ---------------------------------------------------------------- help

do
  local rc, out = run("run recipes/fashion_mnist_demo.lua run_dir=" .. TMP .. "/h help")
  H.check("run RECIPE help: exit 0, the recipe's values", rc == 0 and out:find("num_channels%s+32%s") ~= nil
    and out:find("run_dir%s+" .. TMP:gsub("%p", "%%%0") .. "/h") ~= nil, out:sub(1, 300))
  H.check("run RECIPE help: grouped", out:find("\nmodel:\n", 1, true) and out:find("\ndiffusion:\n", 1, true))
  H.check("run RECIPE help: writes nothing", not exists(TMP .. "/h"))
  for _, cmd in ipairs{"train --help", "sample help", "sample ckpt=x -h", "run tools/eval_nll.lua help",
                       "run tools/eval_fid.lua --help", "run tools/fid_stats.lua help", "train lr=3 help"} do
    local rc2, o2 = run(cmd)
    local long
    for line in o2:gmatch("[^\n]+") do if utf8.len(line) >= 100 then long = line end end
    H.check(("help: `iddpm %s` exits 0 with lines under 100 columns"):format(cmd), rc2 == 0 and #o2 > 200 and not long,
      long or o2:sub(1, 200))
  end
  local _, o3 = run("run tools/eval_nll.lua help")
  H.check("eval_nll help: the shared names", o3:find("ckpt ", 1, true) and o3:find("num_samples ", 1, true)
    and o3:find("num_threads ", 1, true) and o3:find("use_ema ", 1, true) and o3:find("alias:%s+checkpoint") and o3:find("ckpt%s+%(required%)"))
end

-- ---------------------------------------------------------------- user errors from the program

local TINY = "dataset=random image_size=8 num_images=16 num_channels=32 num_res_blocks=1 channel_mult=1,2 "
  .. "attention_resolutions=4 batch_size=4 diffusion_steps=20 noise_schedule=cosine num_samples=0 log_interval=1"
do
  local rd = TMP .. "/bad"
  for _, case in ipairs{
    {"sample_steps=abc num_samples=4", "sample_steps=abc does not fit diffusion_steps=20"},
    {"save_interval=0", "save_interval=0: out of range"},
    {"log_interval=0", "log_interval=0: out of range"},
    {"num_heads=0", "num_heads=0: out of range"},
    {"lr=-1", "lr=-1: out of range"},
    {"warmup_steps=-1", "warmup_steps=-1"},
    {"lr_anneal_steps=-1", "lr_anneal_steps=-1"},
    {"max_steps=-5", "max_steps=-5"},
    {"channel_mult=a,b", "channel_mult=a,b"},
    {"image_size=27 channel_mult=1,2,2,2", "image_size=27 cannot go through"},
    {"bogus_key=1", "unknown train key 'bogus_key'"},
    {"dataset=cifar", "did you mean 'cifar10'?"},
    {"noise_schedule=linear", "noise_schedule=linear needs diffusion_steps > 20"},
  } do
    user_error("train " .. case[1], ("train %s run_dir=%s %s"):format(TINY, rd, case[1]), case[2], rd)
  end
  io.open(TMP .. "/plain_file", "w"):close()
  user_error("train: run_dir below a file", ("train %s run_dir=%s/plain_file/run"):format(TINY, TMP),
    "run_dir " .. TMP .. "/plain_file/run cannot be created", TMP .. "/plain_file/run")
  local rc, _, err = run(("train %s run_dir=%s lr=-1"):format(TINY, rd), "IDDPM_DEBUG=1")
  H.check("IDDPM_DEBUG=1 shows the traceback of a user error", rc == 2 and err:find("traceback", 1, true) ~= nil, err)
  user_error("train: a missing recipe", "train " .. TMP .. "/nope.lua", "recipe " .. TMP .. "/nope.lua does not exist")
  user_error("eval_nll: unknown key", "run tools/eval_nll.lua ckpt=x data=y nmu=3", "did you mean 'num'?")
  user_error("eval_fid: a typo is no longer accepted", "run tools/eval_fid.lua samples=a stats=b bach_size=5",
    "did you mean 'batch_size'?")
  user_error("fid_stats: required key", "run tools/fid_stats.lua data=" .. TMP, "out= is required")
  user_error("a stray word", "train " .. TMP .. "/x.txt", "bad argument")
  -- --dry-run: validated, nothing written
  local rc2, out = run(("train %s run_dir=%s/dry --dry-run"):format(TINY, TMP))
  H.check("train --dry-run: exit 0, lists the outputs, writes nothing", rc2 == 0 and out:find("dry run", 1, true)
    and out:find(TMP .. "/dry/config.json", 1, true) and not exists(TMP .. "/dry"), out:sub(-400))
  user_error("train --dry-run still validates", ("train %s run_dir=%s/dry lr=-1 --dry-run"):format(TINY, TMP), "lr=-1",
    TMP .. "/dry")
end

-- ---------------------------------------------------------------- a tiny run: files, resume, finished

local rd = TMP .. "/run"
do
  local rc, out, err = run(("train %s run_dir=%s max_steps=2 save_interval=2"):format(TINY, rd))
  H.check("tiny run: exit 0", rc == 0, err:sub(-400))
  H.check("start prints only the keys that differ from the defaults", out:find("num_channels%s+32") ~= nil
    and not out:find("use_scale_shift_norm", 1, true), out:sub(1, 600))
  local c = iddpm.io.json_decode(read(rd .. "/config.json"))
  H.check("RUN/config.json holds the full resolved config", c.num_channels == 32 and c.use_scale_shift_norm == true
    and c.sample_steps == "100" and c.in_channels == 3)
  rc, out, err = run(("train %s run_dir=%s max_steps=4 save_interval=2"):format(TINY, rd))
  H.check("resume to step 4: exit 0", rc == 0 and out:find("resumed from step 2", 1, true), err:sub(-300))
  local recs = {}
  for line in read(rd .. "/log.jsonl"):gmatch("[^\n]+") do recs[#recs + 1] = iddpm.io.json_decode(line) end
  H.check("log.jsonl: 4 lines with timestamps", #recs == 4 and tostring(recs[4].timestamp):match("^%d%d%d%d%-%d%d%-%d%dT") ~= nil,
    #recs)
  H.check("log.jsonl: wall time accumulates across the resume (time restarts)", #recs == 4
    and recs[3].wall_time > recs[2].wall_time and recs[3].time < recs[3].wall_time,
    #recs == 4 and ("%s %s %s"):format(recs[2].wall_time, recs[3].wall_time, recs[3].time))
  local text = read(rd .. "/log.jsonl")
  H.check("log.jsonl: floats are shortest round-trip (no 17-digit 0.1)", text:find('"lr":0.0001', 1, true) ~= nil
    and not text:find("00000000001", 1, true), text:sub(1, 200))
  local rows = {}
  for line in read(rd .. "/metrics.csv"):gmatch("[^\n]+") do rows[#rows + 1] = line end
  H.check("metrics.csv: a header and one row per log line", #rows == 5 and rows[1]:find("^step,samples,loss,") ~= nil
    and rows[5]:find("^4,16,") ~= nil, rows[1])
  rc, out = run(("train %s run_dir=%s max_steps=4 save_interval=2"):format(TINY, rd))
  H.check("a finished run says so and does not train again", rc == 0 and out:find("is finished: step 4 >= max_steps 4", 1, true)
    and #read(rd .. "/log.jsonl"):gsub("[^\n]", "") == 4, out:sub(-300))
end

-- ---------------------------------------------------------------- sampling

do
  local out = TMP .. "/s1"
  local rc, _, err = run(("sample ckpt=%s num_samples=2 batch_size=2 steps=2 out=%s progress=false"):format(rd, out))
  H.check("sample: writes into a new folder", rc == 0 and exists(out .. "/grid.png"), err)
  io.open(out .. "/mine.txt", "w"):close()
  user_error("sample: a non-empty out is refused", ("sample ckpt=%s num_samples=2 steps=2 out=%s"):format(rd, out),
    "is not empty")
  rc, _, err = run(("sample ckpt=%s num_samples=1 batch_size=1 steps=2 out=%s overwrite=true progress=false"):format(rd, out))
  H.check("sample overwrite=true: removes its own files only", rc == 0 and exists(out .. "/mine.txt")
    and exists(out .. "/sample_000000.png") and not exists(out .. "/sample_000001.png"), err)
  rc = run(("sample ckpt=%s num_samples=1 steps=2 progress=false"):format(rd))
  H.check("sample: default out is samples/ in the run directory", rc == 0 and exists(rd .. "/samples/grid.png"))
  local out3, err3
  rc, out3, err3 = run(("sample ckpt=%s num_samples=3 steps=2 out=%s/dry --dry-run"):format(rd, TMP))
  H.check("sample --dry-run: loads, lists the outputs, writes nothing", rc == 0 and out3:find("dry run", 1, true)
    and out3:find("samples_3x8x8x3.npz", 1, true) and not exists(TMP .. "/dry"), out3 .. err3)
  user_error("sample --dry-run still checks the steps", ("sample ckpt=%s steps=50 out=%s/dry --dry-run"):format(rd, TMP),
    "steps=50 does not fit this checkpoint (T = 20", TMP .. "/dry")
  rc, out3 = run(("run tools/eval_nll.lua ckpt=%s data=%s --dry-run"):format(rd, rd))
  H.check("eval_nll --dry-run: writes into RUN/eval by default", rc == 0
    and out3:find(rd .. "/eval/nll.json", 1, true) and not exists(rd .. "/eval/nll.json"), out3)
  io.open(TMP .. "/f", "w"):close()
  user_error("sample: out below a file", ("sample ckpt=%s out=%s/f/x"):format(rd, TMP), "is not a directory")
  user_error("sample: grid_max=0", ("sample ckpt=%s grid_max=0 out=%s/s2"):format(rd, TMP), "grid_max=0", TMP .. "/s2")
  -- NaN weights are refused when the checkpoint is loaded
  local ck = require("iddpm.checkpoint")
  local tz, meta = T.load(ck.latest(rd).path)
  local bad = TMP .. "/nan_run"
  os.execute("mkdir -p " .. bad)
  local w = tz["ema_0.9999.out.2.weight"]
  w:narrow(1, 1, 1):copy_(T.full(w:narrow(1, 1, 1):shape(), 0 / 0))
  T.save(bad .. "/ckpt_00000004.safetensors", tz, meta)
  user_error("sample: NaN weights refused", ("sample ckpt=%s out=%s/s3"):format(bad, TMP), "hold NaN or Inf (out.2.weight)",
    TMP .. "/s3")
  user_error("eval_nll: unwritable out found before the evaluation",
    ("run tools/eval_nll.lua ckpt=%s data=%s out=%s/f/nll"):format(rd, rd, TMP), "is not a directory")
end

-- ---------------------------------------------------------------- a diverging run

do
  local dv = TMP .. "/diverge"
  local rc, out, err = run(("train %s run_dir=%s max_steps=30 save_interval=1 lr=1e30 keep_checkpoints=0"):format(TINY, dv))
  local step = tonumber(err:match("at step (%d+)"))
  H.check("lr=1e30: stops with a message naming the step (exit 1, no traceback)", rc == 1 and step
    and err:find("training stopped:", 1, true) and not err:find("traceback", 1, true), err:sub(1, 400))
  local ck = require("iddpm.checkpoint")
  local all_ok, n = true, 0
  for _, e in ipairs(ck.list(dv)) do
    n = n + 1
    for name, t in pairs(T.load(e.path)) do
      if name:match("^model%.") or name:match("^ema_") then
        local d = t:float()
        if (d - d):sum():item() ~= 0 then all_ok = false end
      end
    end
  end
  H.check(("lr=1e30: every checkpoint kept is finite (%d)"):format(n), all_ok and (not step or ck.latest(dv) == nil
    or ck.latest(dv).step < step), out:sub(-200))
  H.check("lr=1e30: the log holds no NaN", not read(dv .. "/log.jsonl"):lower():find("nan", 1, true))
end

-- ---------------------------------------------------------------- Ctrl-C: exit 130

do
  local ri = TMP .. "/int"
  local pidf, rcf, logf = TMP .. "/int.pid", TMP .. "/int.rc", TMP .. "/int.log"
  os.execute(("sh -c '%s train %s run_dir=%s max_steps=100000 save_interval=100000 >%s 2>&1 & echo $! >%s; wait $!; echo $? >%s' &")
    :format(BIN, TINY, ri, logf, pidf, rcf))
  local pid
  for _ = 1, 600 do
    os.execute("sleep 0.1")
    pid = read(pidf):match("%d+")
    if pid and read(logf):find("step 3", 1, true) then break end
  end
  if pid then os.execute("kill -INT " .. pid) end
  for _ = 1, 300 do if read(rcf):match("%d+") then break end os.execute("sleep 0.1") end
  local s = read(logf)
  local at = tonumber(s:match("saved checkpoint at step (%d+); run the same command to resume"))
  H.check("Ctrl-C: exit 130 and the resume hint", read(rcf):match("%d+") == "130" and at ~= nil
    and exists(("%s/ckpt_%08d.safetensors"):format(ri, at or 0)), ("rc %s: %s"):format(read(rcf), s:sub(-300)))
end

-- ---------------------------------------------------------------- the progress line on a terminal

do
  local f = io.popen("command -v script 2>/dev/null")
  local have = f:read("a"); f:close()
  if have == "" then print("ok - # SKIP progress line: `script` (util-linux) not found")
  else
    local cmd = ("%s train %s log_interval=3 run_dir=%s/tty max_steps=4"):format(BIN, TINY, TMP)
    local p = io.popen(("script -qec %s /dev/null 2>&1"):format(q(cmd)))
    local s = p:read("a"); p:close()
    H.check("a terminal gets a per-step progress line (\\r), cleared before log lines",
      s:find("\27[Kstep 1/4  ", 1, true) ~= nil and s:find("\r\27[Kstep 3/4 |", 1, true) ~= nil, s:sub(1, 400))
  end
end

os.execute("rm -rf " .. TMP)
H.done()
