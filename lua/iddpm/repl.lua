-- iddpm/repl.lua — what the REPL (lua/main.c) calls into: show() prints results
-- (tables as tables, bounded and cycle-safe; tensors with their values), complete()
-- lists Tab completions, help() prints docstrings from iddpm.doc, and no_method()
-- words the error for a misspelt method with a did-you-mean (Levenshtein distance).
local M = {}

M.MAX_DEPTH = 3     -- nested tables shown this deep, then "{...}"
M.MAX_ITEMS = 30    -- entries shown per table, then "... (N more)"
M.WIDTH = 80        -- a table fits one line up to this width, else one entry a line

-- ---------------------------------------------------------------- did you mean

-- Edit distance (insert, delete, substitute: each 1).
function M.levenshtein(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = {[0] = i}
    local ca = a:byte(i)
    for j = 1, #b do
      local cost = ca == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

-- The closest names (distance at most a third of the name's length, at least 1, at
-- most 3), best first, ties alphabetical.
function M.suggest(name, candidates)
  local limit = math.max(1, math.min(3, #name // 3))
  local best = {}
  for _, c in ipairs(candidates) do
    local d = M.levenshtein(name, c)
    if d <= limit then best[#best + 1] = {c, d} end
  end
  table.sort(best, function(x, y) return x[2] < y[2] or (x[2] == y[2] and x[1] < y[1]) end)
  local out = {}
  for i = 1, math.min(3, #best) do out[i] = best[i][1] end
  return out
end

local TENSOR_FIELDS = {"requires_grad", "grad", "is_leaf", "grad_fn"}

-- The message for x:NAME() when NAME is not a method of the class (methods: its table).
function M.no_method(name, methods, class)
  local names = {}
  for k in pairs(methods) do if type(k) == "string" and k:sub(1, 1) ~= "_" then names[#names + 1] = k end end
  if class == "Tensor" then for _, f in ipairs(TENSOR_FIELDS) do names[#names + 1] = f end end
  local s = M.suggest(name, names)
  local msg = ("no method '%s' on %s"):format(name, class)
  if #s > 0 then
    msg = msg .. "; did you mean '" .. table.concat(s, "' or '") .. "'?"
  else
    msg = msg .. " (help(x) lists the methods)"
  end
  return msg
end

-- ---------------------------------------------------------------- printing values

local function is_tensor(v)
  local T = package.loaded["iddpm.tensor"] or (package.loaded.iddpm or {}).tensor
  return T and T.is_tensor(v)
end

local function is_ident(k)
  return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

local function quote(s) return (string.format("%q", s):gsub("\\\n", "\\n")) end

local function scalar(v)
  if type(v) == "string" then return quote(v) end
  if is_tensor(v) then return v:summary() end
  return tostring(v)
end

local function sorted_keys(t)
  local n = #t
  local keys = {}
  for k in pairs(t) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "string" or ta == "number" then return a < b end
    return tostring(a) < tostring(b)
  end)
  return n, keys
end

-- A table as Lua-like text: {1, 2, x = {...}}; one line if it fits, else indented.
local function show_table(t, depth, path, indent)
  local mt = getmetatable(t)
  if mt and mt.__tostring then return tostring(t) end
  if path[t] then return "<cycle>" end
  if depth >= M.MAX_DEPTH then return next(t) == nil and "{}" or "{...}" end
  path[t] = true
  local n, keys = sorted_keys(t)
  local items, total = {}, n + #keys
  local function value(v)
    if type(v) == "table" then return show_table(v, depth + 1, path, indent + 2) end
    return scalar(v)
  end
  for i = 1, math.min(n, M.MAX_ITEMS) do items[#items + 1] = value(t[i]) end
  for _, k in ipairs(keys) do
    if #items >= M.MAX_ITEMS then break end
    local ks = is_ident(k) and k or "[" .. (type(k) == "table" and "{...}" or scalar(k)) .. "]"
    items[#items + 1] = ks .. " = " .. value(t[k])
  end
  if total > #items then items[#items + 1] = ("... (%d more)"):format(total - #items) end
  path[t] = nil
  if #items == 0 then return "{}" end
  local one = "{" .. table.concat(items, ", ") .. "}"
  if #one + indent <= M.WIDTH and not one:find("\n") then return one end
  local pad = string.rep(" ", indent + 2)
  return "{\n" .. pad .. table.concat(items, ",\n" .. pad) .. "\n" .. string.rep(" ", indent) .. "}"
end

function M.tostring(v)
  if type(v) == "table" then return show_table(v, 0, {}, 0) end
  return tostring(v)
end

-- The REPL's printer: the results, tab-separated, one call to print.
function M.show(...)
  local n = select("#", ...)
  local out = {}
  for i = 1, n do out[i] = M.tostring((select(i, ...))) end
  print(table.concat(out, "\t"))
end

-- ---------------------------------------------------------------- Tab completion

-- Names reachable from value v (table fields through __index tables, a metatable's
-- __complete list, a userdata's methods table: the first upvalue of its __index).
local function members(v, out, seen)
  seen = seen or {}
  for _ = 1, 8 do
    if v == nil or seen[v] then return end
    seen[v] = true
    if type(v) == "table" then for k in pairs(v) do if type(k) == "string" then out[k] = true end end end
    local mt = getmetatable(v)
    if type(mt) ~= "table" then return end
    if type(mt.__complete) == "table" then for _, k in ipairs(mt.__complete) do out[k] = true end end
    local idx = rawget(mt, "__index")
    if type(idx) == "function" then
      local ok, _, up = pcall(debug.getupvalue, idx, 1)
      if type(v) == "userdata" then
        if ok and type(up) == "table" then members(up, out, seen) end
        if is_tensor(v) then for _, f in ipairs(TENSOR_FIELDS) do out[f] = true end end
      end
      return
    end
    v = idx
  end
end

-- Completions of text ("iddpm.tensor.ra", "x:su", "pri"): full strings, sorted.
-- Names starting with "_" show only when the typed part starts with "_".
function M.complete(text)
  local head, sep, tail = text:match("^(.*)([.:])([%w_]*)$")
  local base
  if head then
    base = _G
    for part in head:gmatch("[^.:]+") do
      if type(base) ~= "table" and type(base) ~= "userdata" then return {} end
      local ok, v = pcall(function() return base[part] end)
      if not ok then return {} end
      base = v
    end
    if not head:match("^[%w_]+[%w_.:]*$") then return {} end
  else
    base, head, sep, tail = _G, "", "", text
  end
  local names = {}
  members(base, names)
  local out = {}
  local hide = tail:sub(1, 1) ~= "_"
  for k in pairs(names) do
    if k:sub(1, #tail) == tail and is_ident(k) and not (hide and k:sub(1, 1) == "_") then
      out[#out + 1] = head .. sep .. k
    end
  end
  table.sort(out)
  return out
end

-- ---------------------------------------------------------------- help

local function doc() return require "iddpm.doc" end

-- The documented name of a value: "tensor.zeros", "Tensor:sum", "tensor", ...
local function name_of(v)
  local iddpm = require "iddpm"
  if is_tensor(v) then return "Tensor" end
  if v == iddpm then return "iddpm" end
  for mod, t in pairs(doc().modules_loaded(iddpm)) do
    if v == t then return mod end
    for k, f in pairs(t) do if f == v then return mod .. "." .. k end end
  end
  for k, f in pairs(iddpm.tensor.methods) do if f == v then return "Tensor:" .. k end end
end

-- help(x) | help "T.conv2d" | help "x:sum" | help(): prints the docstring.
function M.help(what)
  local D = doc()
  if what == nil then print(D.text("iddpm")) return end
  local name = type(what) == "string" and D.normalize(what) or name_of(what)
  local text = name and D.text(name)
  if text then print(text) return end
  if type(what) == "table" or type(what) == "userdata" then   -- a model, an object: its members
    local names, list = {}, {}
    members(what, names)
    for k in pairs(names) do if is_ident(k) and k:sub(1, 1) ~= "_" then list[#list + 1] = k end end
    table.sort(list)
    print(("%s (no docstring); members:\n  %s"):format(M.tostring(what):sub(1, 60), table.concat(list, " ")))
    return
  end
  local shown = type(what) == "string" and what or (name or type(what))
  local s = M.suggest(D.normalize(shown), D.names())
  print(("no help for %s%s"):format(shown, #s > 0 and "; did you mean " .. table.concat(s, ", ") .. "?" or ""))
end

return M
