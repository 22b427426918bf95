-- iddpm/tensor_print.lua — how a tensor prints (its __tostring): the values, nested,
-- with PyTorch's layout and number formatting (torch/_tensor_str.py, default options):
--   tensor([[ 0.1000, -1.5000],
--           [ 2.0000,  3.2500]], shape=(2,2), float32, cpu)
-- More than THRESHOLD elements: each dim longer than 2*EDGE shows its first and last
-- EDGE items around "...". One number format per tensor, chosen from its (shown)
-- nonzero finite values: integral floats print "1.", a ratio max/min over 1000, a max
-- over 1e8 or (non-integral) a min under 1e-4 switch to "%.4e", else "%.4f"; ints as
-- ints. GPU tensors are copied to the host once; bf16 prints through float32.
local M = {}

M.THRESHOLD = 1000   -- PyTorch's print threshold (elements)
M.EDGE = 3           -- items kept at each end of a summarised dim
M.PRECISION = 4      -- digits after the point
M.LINEWIDTH = 80

local ELL = {}       -- marks the "..." of a summarised dim

-- The shown values as nested Lua lists (ELL where items are left out); flat: all of
-- them, for the formatter. c is a CPU tensor.
local function gather(c, summarize, flat)
  local n = c:dim() == 0 and 0 or c:size(1)
  local edge = M.EDGE
  local cut = summarize and n > 2 * edge
  if c:dim() == 1 then
    local vals
    if cut then
      vals = c:narrow(1, 1, edge):totable()
      vals[#vals + 1] = ELL
      for _, v in ipairs(c:narrow(1, n - edge + 1, edge):totable()) do vals[#vals + 1] = v end
    else
      vals = c:totable()
    end
    for _, v in ipairs(vals) do if v ~= ELL then flat[#flat + 1] = v end end
    return vals
  end
  local out = {}
  local function add(i) out[#out + 1] = gather(c[i], summarize, flat) end
  if cut then
    for i = 1, edge do add(i) end
    out[#out + 1] = ELL
    for i = n - edge + 1, n do add(i) end
  else
    for i = 1, n do add(i) end
  end
  return out
end

local function isfinite(v) return v == v and v ~= math.huge and v ~= -math.huge end

local function special(v)   -- nan / inf as Python writes them (C may write "-nan")
  if v ~= v then return "nan" end
  if v == math.huge then return "inf" end
  if v == -math.huge then return "-inf" end
end

-- A formatter for these values: returns fmt(v) -> string padded to a common width.
local function formatter(flat, floating)
  local width, fmt = 1, nil
  if not floating then
    for _, v in ipairs(flat) do width = math.max(width, #string.format("%d", v)) end
    fmt = function(v) return string.format("%d", v) end
  else
    local lo, hi, int_mode, any = math.huge, 0, true, false
    for _, v in ipairs(flat) do
      if isfinite(v) and v ~= 0 then
        any = true
        local a = math.abs(v)
        if a < lo then lo = a end
        if a > hi then hi = a end
        if v ~= math.ceil(v) then int_mode = false end
      end
    end
    local sci_f = "%." .. M.PRECISION .. "e"
    local fix_f = "%." .. M.PRECISION .. "f"
    local sci = any and (hi / lo > 1000 or hi > 1e8 or (not int_mode and lo < 1e-4))
    local function each(f, extra)
      for _, v in ipairs(flat) do
        if isfinite(v) and v ~= 0 then width = math.max(width, #string.format(f, v) + extra) end
      end
    end
    if not any then
      int_mode = true   -- all zero / non-finite: "0.", "nan"
    elseif sci then
      each(sci_f, 0)
    elseif int_mode then
      each("%.0f", 1)
    else
      each(fix_f, 0)
    end
    fmt = function(v)
      local s = special(v)
      if s then return s end
      if sci then return string.format(sci_f, v) end
      if int_mode then return string.format("%.0f", v) .. "." end
      return string.format(fix_f, v)
    end
  end
  return function(v)
    local s = fmt(v)
    return string.rep(" ", width - #s) .. s
  end, width
end

local function vector_str(vals, indent, fmt, width)
  local per_line = math.max(1, (M.LINEWIDTH - indent) // (width + 2))
  local data = {}
  for _, v in ipairs(vals) do data[#data + 1] = v == ELL and " ..." or fmt(v) end
  local lines = {}
  for i = 1, #data, per_line do
    lines[#lines + 1] = table.concat(data, ", ", i, math.min(#data, i + per_line - 1))
  end
  return "[" .. table.concat(lines, ",\n" .. string.rep(" ", indent + 1)) .. "]"
end

local function nested_str(vals, dim, indent, fmt, width)
  if dim == 1 then return vector_str(vals, indent, fmt, width) end
  local parts = {}
  for _, v in ipairs(vals) do
    parts[#parts + 1] = v == ELL and "..." or nested_str(v, dim - 1, indent + 1, fmt, width)
  end
  return "[" .. table.concat(parts, "," .. string.rep("\n", dim - 1) .. string.rep(" ", indent + 1)) .. "]"
end

local function host(x)
  local c = x:detach()
  if c:device() ~= "cpu" then c = c:cpu() end
  if c:dtype() == "bfloat16" then c = c:float() end
  return c
end

-- The values part alone (PyTorch's _tensor_str(x, indent)): "[[1., 2.],\n [3., 4.]]".
function M.values(x, indent)
  indent = indent or 7
  local c = host(x)
  local n = c:numel()
  if n == 0 then return "[]" end
  local dt = c:dtype()
  local floating = dt ~= "int64" and dt ~= "uint8"
  local flat = {}
  if c:dim() == 0 then
    local v = c:item()
    local fmt = formatter({v}, floating)
    return fmt(v)
  end
  local vals = gather(c, n > M.THRESHOLD, flat)
  local fmt, width = formatter(flat, floating)
  return nested_str(vals, c:dim(), indent, fmt, width)
end

-- The suffixes go on the last line while it stays within LINEWIDTH, else on new lines.
local function add_suffixes(s, suffixes, indent)
  local out = {s}
  local last_nl = s:match(".*()\n")
  local last = #s - (last_nl or 0) + 2   -- PyTorch counts this way
  for _, suf in ipairs(suffixes) do
    if last + #suf + 2 > M.LINEWIDTH then
      out[#out + 1] = ",\n" .. string.rep(" ", indent) .. suf
      last = indent + #suf
    else
      out[#out + 1] = ", " .. suf
      last = last + #suf + 2
    end
  end
  out[#out + 1] = ")"
  return table.concat(out)
end

function M.shape_str(x)
  return "(" .. table.concat(x:shape(), ",") .. ")"
end

-- tensor([...], shape=(2,3), float32, cpu[, requires_grad=true | grad_fn=<name>])
function M.tostring(x)
  local prefix = "tensor("
  local indent = #prefix
  local suffixes = {"shape=" .. M.shape_str(x), x:dtype(), x:device()}
  if x.grad_fn then
    suffixes[#suffixes + 1] = "grad_fn=<" .. x.grad_fn .. ">"
  elseif x.requires_grad then
    suffixes[#suffixes + 1] = "requires_grad=true"
  end
  return add_suffixes(prefix .. M.values(x, indent), suffixes, indent)
end

return M
