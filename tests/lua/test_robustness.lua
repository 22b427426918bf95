-- test_robustness.lua — nothing a script can pass crashes the process: every tensor
-- function and method is called with random combinations of bad and odd arguments
-- (nil, numbers, strings, tables, tensors of other shapes and dtypes, freed tensors).
-- Each call must either succeed or raise a Lua error with a message. Seed printed.
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local SEED = 2024
print("# seed " .. SEED)
math.randomseed(SEED)

local freed = T.randn(2); freed:free()
local function pool()
  return {nil, 0, -1, 1, 2, 3, 2.5, 1e300, "x", "float64", {}, {1, 2}, {2, 3}, {-1}, {0},
    T.randn(2, 3), T.zeros(0), T.randn(3), T.randn(1, 3, 4, 4), T.zeros(2, "int64"), T.zeros(2, 2, "uint8"),
    T.randn(2, 3, "float64"), freed, function() return T.randn(2) end, true}
end

local skip = {free = true}   -- (freeing the shared pool tensors is fine but makes later picks boring)
local names = {}
for k, v in pairs(T) do if type(v) == "function" then names[#names + 1] = {"T." .. k, v, false} end end
for k, v in pairs(T.methods) do if type(v) == "function" and not skip[k] then names[#names + 1] = {"method " .. k, v, true} end end
-- the other C modules (writers excluded: a random string would become a file name)
local writers = {save = true, png_write = true, gif_write = true, npz_write = true}
for _, m in ipairs({"io", "_diffusion", "optim_c", "_metrics"}) do
  local mod = package.loaded["iddpm." .. m]
  if type(mod) == "table" then
    for k, v in pairs(mod) do
      if type(v) == "function" and not writers[k] then names[#names + 1] = {("iddpm.%s.%s"):format(m, k), v, false} end
    end
  end
end
table.sort(names, function(a, b) return a[1] < b[1] end)

local calls, errors, bad_msgs = 0, 0, {}
for _, entry in ipairs(names) do
  local name, fn, is_method = entry[1], entry[2], entry[3]
  for _ = 1, 40 do
    local p = pool()
    local args, n = {}, math.random(0, 4)
    if is_method then args[1] = p[math.random(16, 22)] end   -- a tensor receiver
    for i = #args + 1, n + (is_method and 1 or 0) do args[i] = p[math.random(1, #p)] end
    local ok, err = pcall(fn, table.unpack(args, 1, math.max(n, #args)))
    calls = calls + 1
    if not ok then
      errors = errors + 1
      if type(err) ~= "string" or #err == 0 then bad_msgs[#bad_msgs + 1] = name end
    end
  end
end
print(("# %d calls over %d functions, %d raised errors"):format(calls, #names, errors))
H.check("no crash from random arguments", true)
H.check("every error carries a message", #bad_msgs == 0, table.concat(bad_msgs, ", "))
H.done()
