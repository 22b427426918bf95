-- test_files.lua — files are created, listed, written and replaced safely (in-process
-- half; tests/files_test.sh runs the hostile command lines): iddpm.fs (mkdir -p, sorted
-- listing, walk, empty paths refused), temporary files never written through a planted
-- symbolic link (T.save, png, npz, gif, JSON text), appends only to regular files and
-- never through a link (full-disk writes: files_test.sh), the log rewrite on resume by rename (a new inode, the partial record
-- dropped), the run-directory lock, bfloat16 in safetensors and npz, and full-shape
-- checks when loading weights and resuming.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local fs = require "iddpm.fs"
local checkpoint = require "iddpm.checkpoint"
local recipe, train = iddpm.recipe, iddpm.train

local TMP = os.tmpname()
os.remove(TMP)
fs.mkdir_p(TMP)
print("# scratch dir " .. TMP)

local function read(p) local f = io.open(p, "rb"); if not f then return nil end local s = f:read("a"); f:close(); return s end
local function write(p, s) local f = assert(io.open(p, "wb")); f:write(s); f:close() end
local function has(list, x) for _, v in ipairs(list) do if v == x then return true end end return false end

-- ---------------------------------------------------------------- iddpm.fs

do
  local d = TMP .. "/a/b c/d'e"
  fs.mkdir_p(d)
  H.check("fs.mkdir_p: nested, with a space and a quote", fs.is_dir(d))
  write(d .. "/z.png", "z"); write(d .. "/a.png", "a"); write(TMP .. "/a/x.txt", "x")
  fs.mkdir_p(TMP .. "/a/b c/sub"); write(TMP .. "/a/b c/sub/q.png", "q")
  local l = fs.list(d)
  H.check("fs.list: sorted names", #l == 2 and l[1] == "a.png" and l[2] == "z.png", table.concat(l, ","))
  local w = fs.walk(TMP .. "/a")
  H.check("fs.walk: every regular file below", #w == 4 and has(w, d .. "/a.png") and has(w, TMP .. "/a/b c/sub/q.png"),
    table.concat(w, ","))
  H.check("fs.list: missing directory gives {}", #fs.list(TMP .. "/nope") == 0)
  H.raises("fs.mkdir_p: empty path is an error", function() fs.mkdir_p("", "run_dir") end, "run_dir is empty")
  H.raises("fs.mkdir_p: blank path is an error", function() fs.mkdir_p("  ", "run_dir") end, "run_dir is empty")
  H.raises("fs.write_atomic: empty name is an error", function() fs.write_atomic("", "x") end, "is empty")
end

-- ---------------------------------------------------------------- temp files and links

-- symbolic links planted at every temp name a writer of this process could pick (the old
-- "<path>.tmp" and "<path>.tmp.<pid>", and the first "<path>.tmp.<pid>.<k>"): the writer
-- must create its own file, and the link targets must stay as they were
do
  local victim = TMP .. "/victim.txt"
  local d = TMP .. "/out"
  fs.mkdir_p(d)
  local pid = fs.getpid()
  local function plant(path)
    write(victim, "precious")
    for _, suffix in ipairs{".tmp", ".tmp." .. pid, ".tmp." .. pid .. ".0", ".tmp." .. pid .. ".1"} do
      os.remove(path .. suffix)
      assert(os.execute(("ln -s %s %s"):format(victim, path .. suffix)))   -- fixed test paths only
    end
  end
  local function links_intact(path)
    for _, suffix in ipairs{".tmp", ".tmp." .. pid, ".tmp." .. pid .. ".0", ".tmp." .. pid .. ".1"} do
      if fs.kind(path .. suffix, true) ~= "link" then return false end
    end
    return read(victim) == "precious"
  end
  local cases = {
    {"settings.json (fs.write_atomic)", d .. "/settings.json", function(p) fs.write_atomic(p, "{}") end},
    {"T.save", d .. "/m.safetensors", function(p) T.save(p, {x = T.ones({2})}) end},
    {"png_write", d .. "/g.png", function(p) iddpm.io.png_write(p, T.zeros({2, 2, 3}, "uint8")) end},
    {"npz_write", d .. "/s.npz", function(p) iddpm.io.npz_write(p, {{"arr_0", T.zeros({2}, "uint8")}}) end},
    {"gif_write", d .. "/d.gif", function(p) iddpm.io.gif_write(p, T.zeros({2, 2, 2, 3}, "uint8"), 10) end},
  }
  for _, c in ipairs(cases) do
    plant(c[2])
    local ok, err = pcall(c[3], c[2])
    H.check("temp file: " .. c[1] .. " does not write through a planted link", ok and links_intact(c[2])
      and fs.kind(c[2], true) == "file", tostring(err) .. " victim=" .. tostring(read(victim)))
  end
end

-- ---------------------------------------------------------------- checked writes

do
  H.raises("fs.append: only to a regular file (/dev/full refused, named)", function() fs.append("/dev/full", "x\n") end,
    "/dev/full")
  H.raises("fs.write_atomic: a directory that is not there raises", function() fs.write_atomic(TMP .. "/no/dir/x", "x") end,
    TMP .. "/no/dir/x")
  local p = TMP .. "/log.jsonl"
  fs.append(p, "{\"step\":1}\n"); fs.append(p, "{\"step\":2}\n")
  H.check("fs.append: records appended", read(p) == "{\"step\":1}\n{\"step\":2}\n")
  local link = TMP .. "/log_link.jsonl"
  assert(os.execute(("ln -s %s %s"):format(p, link)))
  H.raises("fs.append: never through a symbolic link", function() fs.append(link, "x\n") end, link)
end

-- ---------------------------------------------------------------- bfloat16

do
  local vals = {1, -2.5, 0.15625, 3e38, -1e-30, 65536}
  local x = T.from_table(vals, {2, 3}):bfloat16()
  local p = TMP .. "/bf16.safetensors"
  local ok, err = pcall(T.save, p, {w = x})
  local hdr = read(p) or ""
  H.check("T.save bf16: header says BF16", ok and hdr:find('"dtype":"BF16"', 1, true) ~= nil and not hdr:find("(null)", 1, true),
    tostring(err) .. " " .. hdr:sub(9, 120))
  local back = ok and T.load(p).w
  local want = x:float():totable()
  H.check("T.save bf16: reads back the same values (as float32)", back and back:dtype() == "float32"
    and table.concat(back:totable(), ",") == table.concat(want, ","), back and table.concat(back:totable(), ","))
  local z = TMP .. "/bf16.npz"
  ok, err = pcall(iddpm.io.npz_write, z, {{"arr_0", x}})
  local r = ok and iddpm.io.npz_read(z).arr_0
  H.check("npz_write bf16: written as float32 with the same values", r and r:dtype() == "float32"
    and table.concat(r:totable(), ",") == table.concat(want, ","), tostring(err))
end

-- ---------------------------------------------------------------- shapes

local TINY = {dataset = "random", image_size = 8, num_images = 8, num_channels = 32, num_res_blocks = 1,
  channel_mult = "1,2", attention_resolutions = "4", dropout = 0, learn_sigma = true, diffusion_steps = 4,
  noise_schedule = "cosine",
  batch_size = 4, log_interval = 1, save_interval = 100, num_samples = 0, seed = 3, keep_checkpoints = 0}
local function tiny(over)
  local c = {}
  for k, v in pairs(TINY) do c[k] = v end
  for k, v in pairs(over) do c[k] = v end
  return recipe.resolve(c)
end

do
  local m = iddpm.nn.unet{image_size = 8, in_channels = 1, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
    attention_resolutions = {}, learn_sigma = false}
  local sd = {}
  for n, p in pairs(m:named_parameters()) do sd[n] = p:clone() end
  local w = sd["input_blocks.0.0.weight"]
  local s = w:shape()
  sd["input_blocks.0.0.weight"] = w:permute({3, 4, 2, 1}):contiguous()   -- (32,1,3,3) stored as (3,3,1,32)
  H.raises("load_state_dict: a permuted conv weight is refused", function() m:load_state_dict(sd) end,
    ("input_blocks.0.0.weight has shape (3,3,1,32) in the file, the model expects (%s)"):format(table.concat(s, ",")))
end

do
  local rd = TMP .. "/shape_run"
  train.run(tiny{run_dir = rd, max_steps = 2}, {quiet = true})
  local path = checkpoint.filename(rd, 2)
  local tz, meta = T.load(path)
  local name = "ema_0.9999.out.2.weight"
  local s = tz[name]:shape()
  tz[name] = tz[name]:reshape(s[2], s[1], s[3], s[4])
  T.save(path, tz, meta)
  H.raises("resume: an EMA tensor of another shape is refused, named with both shapes", function()
    train.run(tiny{run_dir = rd, max_steps = 3}, {quiet = true})
  end, ("%s has shape (%d,%d,%d,%d), the model expects (%d,%d,%d,%d)"):format(name, s[2], s[1], s[3], s[4], s[1], s[2], s[3], s[4]))
  tz[name] = tz[name]:reshape(s)
  local mname = "model.out.2.weight"
  tz[mname] = tz[mname]:reshape(s[2], s[1], s[3], s[4])
  T.save(path, tz, meta)
  H.raises("resume: a model tensor of another shape is refused", function()
    train.run(tiny{run_dir = rd, max_steps = 3}, {quiet = true})
  end, "out.2.weight has shape")
end

-- ---------------------------------------------------------------- the log on resume

do
  local rd = TMP .. "/log_run"
  train.run(tiny{run_dir = rd, max_steps = 2, save_interval = 2}, {quiet = true})
  local logp = rd .. "/log.jsonl"
  -- lines a stopped run wrote after its last checkpoint, and a record cut by a crash
  fs.append(logp, '{"loss":1,"step":3}\n{"loss":1,"step":4}\n{"loss":1,"st')
  local id_before = fs.file_id(logp)
  local tr = train.new(tiny{run_dir = rd, max_steps = 2}, {quiet = true})
  tr:close()
  local id_after = fs.file_id(logp)
  local s = read(logp) or ""
  local steps = {}
  for st in s:gmatch('"step":(%d+)') do steps[#steps + 1] = st end
  H.check("resume: log keeps steps <= the checkpoint, drops the cut record", table.concat(steps, ",") == "1,2"
    and not s:find('"st\n', 1, true) and s:sub(-1) == "\n", s)
  H.check("resume: the log is replaced by rename (a new file), never truncated in place", id_before ~= id_after)
end

-- ---------------------------------------------------------------- the run lock

do
  local rd = TMP .. "/lock_run"
  fs.mkdir_p(rd)
  local a = fs.lock_dir(rd, "run_dir")
  local b = fs.lock_dir(rd, "run_dir")   -- the same process may lock again
  H.check("lock: holder recorded in RUN/lock", (read(rd .. "/lock") or ""):find("pid " .. fs.getpid(), 1, true) ~= nil)
  a:release(); b:release()
end

os.execute(("rm -rf '%s'"):format(TMP))   -- a mktemp name, no user input
H.done()
