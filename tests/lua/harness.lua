-- harness.lua — the Lua test helpers: check() prints "ok - name" / "not ok - name:
-- detail" (counted by tests/run.sh); close() compares tensors or arrays with a named
-- relative tolerance; raises() checks an error message; gradcheck() compares the
-- tape's gradients with central differences (T.gradcheck, in C).
local H = {}
local iddpm = require "iddpm"
local T = iddpm.tensor
local failed = 0

function H.check(name, cond, detail)
  if cond then print("ok - " .. name)
  else failed = failed + 1; print("not ok - " .. name .. (detail and (": " .. tostring(detail)) or "")) end
  return cond
end

local function flat(x) if T.is_tensor(x) then return x:totable() end return x end

-- max |a-b| / max(|b|, floor)
function H.max_rel(a, b, floor)
  a, b = flat(a), flat(b)
  floor = floor or 1e-6
  if #a ~= #b then return math.huge, ("length %d vs %d"):format(#a, #b) end
  local worst, at = 0, 0
  for i = 1, #a do
    local r = math.abs(a[i] - b[i]) / math.max(math.abs(b[i]), floor)
    if r ~= r then return math.huge, ("NaN at %d"):format(i) end
    if r > worst then worst, at = r, i end
  end
  return worst, at > 0 and ("worst at %d: %.9g vs %.9g"):format(at, a[at], b[at]) or ""
end

function H.close(name, got, want, rtol, floor)
  local r, where = H.max_rel(got, want, floor)
  return H.check(name, r <= rtol, ("max rel err %.3g > %.3g; %s"):format(r, rtol, where))
end

function H.raises(name, fn, pattern)
  local ok, err = pcall(fn)
  if ok then return H.check(name, false, "no error raised") end
  return H.check(name, tostring(err):find(pattern, 1, true) ~= nil,
    ("error %q does not mention %q"):format(tostring(err), pattern))
end

-- worst relative error between the tape and central differences (engine gradcheck)
function H.gradcheck(f, inputs, eps, nmax)
  return T.gradcheck(f, inputs, {eps = eps or 1e-6, nmax = nmax or 64, seed = 99})
end

-- GPU-vs-CPU error of one tensor: max |got - want| / max |want| (want all zero: the
-- plain max difference), in double on the host; NaN anywhere in got is infinitely wrong
function H.rel_err(got, want)
  got = got:cpu():double(); want = want:cpu():double()
  local scale = want:abs():max():item()
  local d = (got - want):abs():max():item()
  if d ~= d then return math.huge end
  return d / (scale > 0 and scale or 1)
end

-- the GPU test scripts' opening: where no CUDA backend can be used, say why and report
-- one skip; true means "return now"
function H.skip_without_cuda()
  if iddpm.cuda.available() then return false end
  print("# no GPU: " .. tostring(iddpm.cuda.reason()))
  print("ok - skipped: CUDA backend not available")
  return true
end

function H.done()
  if failed > 0 then os.exit(1) end
end

return H
