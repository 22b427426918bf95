-- test_fuzz_checkpoint.lua — the Lua checkpoint path (iddpm.checkpoint.read: the
-- safetensors loader, then __metadata__ format/step/config/ema_rates decoded from JSON)
-- against mutated checkpoint files: bit flips, overwritten bytes, inserted and deleted
-- bytes and truncations, mostly inside the JSON header where the metadata lives. Every
-- read must return or raise a Lua error with a message; a crash fails the program.
-- Environment: IDDPM_FUZZ_ITERS (default 300). Seed printed.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local io_ = require "iddpm.io"
local C = require "iddpm.checkpoint"

local SEED = 4242
local ITERS = tonumber(os.getenv("IDDPM_FUZZ_ITERS") or "") or 300
print(("# seed %d, %d mutations"):format(SEED, ITERS))
math.randomseed(SEED)

local path = os.tmpname()
local tensors = {["model.w"] = T.randn(3, 4), ["model.b"] = T.zeros(4), ["opt.step"] = T.arange(0, 3)}
local meta = {format = C.FORMAT, step = "120", opt_step = "120",
              config = io_.json_encode({lr = 1e-4, channels = {1, 2, 2}, attention = {16}, name = "cifar"}),
              ema_rates = io_.json_encode({0.9999, 0.999})}
T.save(path, tensors, meta)
local ok, ck = pcall(C.read, path)
H.check("seed checkpoint reads", ok and ck.step == 120 and ck.config.lr == 1e-4 and #ck.ema_rates == 2, ck)

local f = assert(io.open(path, "rb"))
local src = f:read("a")
f:close()
local hlen = string.unpack("<I8", src)   -- the JSON header follows the 8-byte length

local function mutate(s)
  local b = {s:byte(1, -1)}
  for _ = 1, math.random(1, 3) do
    -- three edits in four land in the header (bytes 1..8+hlen)
    local lim = math.random() < 0.75 and math.min(#b, 8 + hlen) or #b
    local pos = math.random(1, math.max(lim, 1))
    local kind = math.random(1, 5)
    if kind == 1 and #b > 0 then b[pos] = b[pos] ~ (1 << math.random(0, 7))
    elseif kind == 2 and #b > 0 then b[pos] = math.random(0, 255)
    elseif kind == 3 then
      local ins = {'"', "{", "}", "[", "]", ",", ":", "\\", "\\u", "0", "-", "1e999", "null", string.char(0), "\xff"}
      local t = ins[math.random(#ins)]
      for k = #t, 1, -1 do table.insert(b, pos, t:byte(k)) end
    elseif kind == 4 then for _ = 1, math.min(math.random(1, 16), #b - pos + 1) do table.remove(b, pos) end
    else for k = #b, math.random(0, #b) + 1, -1 do b[k] = nil end end
  end
  local parts = {}
  for i = 1, #b, 4096 do parts[#parts + 1] = string.char(table.unpack(b, i, math.min(i + 4095, #b))) end
  return table.concat(parts)
end

local loaded, failed, silent = 0, 0, 0
local mpath = path .. ".mutant"
for _ = 1, ITERS do
  local g = assert(io.open(mpath, "wb"))
  g:write(mutate(src))
  g:close()
  local okr, r = pcall(C.read, mpath)
  if okr then loaded = loaded + 1
  elseif type(r) == "string" and #r > 0 then failed = failed + 1
  else silent = silent + 1 end
end
H.check(("checkpoint fuzz: %d mutants loaded (%d) or raised a message (%d)"):format(ITERS, loaded, failed), silent == 0)
os.remove(mpath)
os.remove(path)
H.done()
