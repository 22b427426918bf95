-- iddpm/device.lua — the `device` and `precision` settings of recipes and the sampler:
-- checks at start that the device exists (a clear error, never a crash later) and sets
-- the GPU's matmul/conv precision.
--
--   device.setup(dev, precision [, who])  -> dev, precision actually used
--       dev: "cpu" | "cuda"; precision: "auto" | "fp32" | "tf32" | "bf16" ("auto" = bf16
--       on the GPU, fp32 on the CPU). Errors (naming `who` and the reason) when the device
--       is missing; prints one line when a precision falls back.
--   device.check(dev [, who])             -> dev, or an error when it is not available
--   device.set_precision(p)               -> the precision in effect on the GPU
--   device.precision()                    -> the GPU precision now ("fp32" on the CPU)
--   device.activation_dtype(x [, dtype])  -> "bfloat16" when the UNet should run its activations in
--                                          bf16 channels-last for input x, else nil (float32 as given).
--                                          dtype: the model's setting (Module:to): "bfloat16" or
--                                          "float32" decide; "auto"/nil: the process default below,
--                                          then bf16 for x on the GPU in precision bf16
--   device.set_activations(a)             the process default for models whose dtype is "auto":
--                                          "auto" | "bf16" | "fp32"; for benchmarks and tests (a
--                                          model's own setting is the way: model:to(dev, {dtype =});
--                                          IDDPM_ACTIVATIONS sets it, for benchmarking)
--
-- Memory is not handled here: tensor scopes release intermediates (lua/l_scope.c, T.scope).
-- Precision goes through iddpm.cuda.precision(name) when the build has it; otherwise
-- "tf32" maps to iddpm.cuda.tf32(true) and "bf16" falls back to tf32 with a warning.
local iddpm = require "iddpm"

local M = {}

M.DEVICES = {cpu = true, cuda = true}
M.PRECISIONS = {auto = true, fp32 = true, tf32 = true, bf16 = true}

local warned = {}
local function warn_once(msg)
  if warned[msg] then return end
  warned[msg] = true
  io.stderr:write("warning: ", msg, "\n")
end

function M.check(dev, who)
  who = who or "device"
  if not M.DEVICES[dev] then
    error(("%s: device=%s is not a device (expected cpu or cuda)"):format(who, tostring(dev)), 0)
  end
  if dev == "cuda" and not iddpm.cuda.available() then
    error(("%s: device=cuda, but no CUDA GPU can be used: %s. Run with device=cpu"):format(who,
      tostring(iddpm.cuda.reason() or "unknown reason")), 0)
  end
  return dev
end

function M.precision()
  local c = iddpm.cuda
  if c.precision and c.available() then
    local ok, p = pcall(c.precision)
    if ok and p then return p end
  end
  return M._current or "fp32"
end

function M.set_precision(p)
  local c = iddpm.cuda
  if not M.PRECISIONS[p] or p == "auto" then
    error(("precision=%s: expected fp32, tf32 or bf16"):format(tostring(p)), 0)
  end
  if c.precision then
    local ok, err = pcall(c.precision, p)
    if ok then M._current = p; return p end
    if p ~= "bf16" then error(("precision=%s: %s"):format(p, tostring(err)), 0) end
    warn_once(("precision=bf16 is not available (%s): using tf32"):format(tostring(err)))
  elseif p == "bf16" then
    warn_once("precision=bf16 is not in this build: using tf32 (fp32 storage, TF32 matmuls and convolutions)")
  end
  if p == "fp32" then c.tf32(false); M._current = "fp32"; return "fp32" end
  if c.precision then pcall(c.precision, "tf32") else c.tf32(true) end
  M._current = "tf32"
  return "tf32"
end

local ACTIVATIONS = {auto = true, bf16 = true, fp32 = true}
local FAKE_CUDA = os.getenv("IDDPM_FAKE_CUDA") == "1"
M._activations = os.getenv("IDDPM_ACTIVATIONS")
if M._activations and not ACTIVATIONS[M._activations] then
  error(("IDDPM_ACTIVATIONS=%s: expected auto, bf16 or fp32"):format(M._activations), 0)
end

function M.set_activations(a)
  if not ACTIVATIONS[a] then error(("activations=%s: expected auto, bf16 or fp32"):format(tostring(a)), 2) end
  M._activations = a
  return a
end

function M.activation_dtype(x, dtype)
  if dtype == "bfloat16" then return "bfloat16" end   -- a model's own setting (Module:to) wins
  if dtype == "float32" then return nil end
  local a = M._activations or "auto"
  if a == "bf16" then return "bfloat16" end
  if a == "fp32" then return nil end
  -- IDDPM_FAKE_CUDA=1 serves "cuda" with the CPU backend, whose precision switch has no
  -- effect: it keeps float32 activations too (tests compare it with CPU runs exactly)
  if x:device() == "cuda" and M.precision() == "bf16" and not FAKE_CUDA then return "bfloat16" end
  return nil
end

function M.setup(dev, precision, who)
  M.check(dev, who)
  precision = precision or "auto"
  if not M.PRECISIONS[precision] then
    error(("%s: precision=%s is not a precision (expected auto, fp32, tf32 or bf16)"):format(who or "device",
      tostring(precision)), 0)
  end
  if dev == "cpu" then
    if precision ~= "auto" and precision ~= "fp32" then
      warn_once(("precision=%s applies to device=cuda only: the CPU computes in fp32"):format(precision))
    end
    return dev, "fp32"
  end
  if precision == "auto" then precision = "bf16" end
  return dev, M.set_precision(precision)
end

return M
