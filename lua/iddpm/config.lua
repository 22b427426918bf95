-- iddpm/config.lua — the one key=value parser and config schema of every command
-- (`iddpm train`, `iddpm sample`, the recipes, eval_nll / eval_fid / fid_stats).
--
-- A schema is a list of keys, each {name, type, default, help, ...options}:
--   type     "int" | "num" | "bool" | "str" | "ints" (a "16,8" list, kept as a string)
--            | "nums" (a "0.9999,0.999" list, kept as a string)
--            | "schedule" (a string, or from a recipe a function or a table of numbers, kept as is)
--   min, max          inclusive bounds (for lists: of every item); gt: exclusive lower bound
--   one_of            {allowed values}; also = {values allowed outside min/max} (e.g. -1)
--   nonempty          a string that must not be empty; required: must be given
--   aliases           {old names}; group: the help heading (inherited by the keys after it)
-- A check(c) function given to C.schema runs cross-key checks after the types and ranges.
--
--   C.schema(name, keys, opts)     -> schema {name, keys, by_name, usage, check}
--   C.parse_args(args)             -> {pairs = {{k, v}}, help, dry_run, positional}
--   C.resolve(s, base, args)       -> config (errors name the key, the value and what works)
--   C.command(s, base, args)       -> config, flags; nil when help was printed
--   C.help(s, values)              -> grouped help text (lines < 100 columns)
--   C.describe(s, c, changed_only) -> "  key  value" lines
--   C.error(msg [, exit_code])     raises a user error: the program prints "iddpm: msg"
--                                  without a traceback (IDDPM_DEBUG=1 shows it), exit 2
--   C.check_writable(path, what)   the directory path can be created or written (no junk)
--   C.suggest(word, names)         the nearest name by edit distance, or nil
local C = {}

-- ---------------------------------------------------------------- user errors

local UserError = {__name = "iddpm.user_error"}
UserError.__tostring = function(e) return e.msg end
C.UserError = UserError

-- raise a user error: main.c prints "iddpm: msg" and exits with `code` (2)
function C.error(msg, code)
  error(setmetatable({user_error = true, msg = tostring(msg), exit = code or 2}, UserError), 0)
end

function C.is_user_error(e) return type(e) == "table" and e.user_error == true end

-- ---------------------------------------------------------------- did you mean

-- edit distance with transpositions ("nmu" -> "num" is 1)
local function distance(a, b)
  local d = {}
  for i = 0, #a do d[i] = {[0] = i} end
  for j = 0, #b do d[0][j] = j end
  for i = 1, #a do
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      local v = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:sub(i, i) == b:sub(j - 1, j - 1) and a:sub(i - 1, i - 1) == b:sub(j, j) then
        v = math.min(v, d[i - 2][j - 2] + 1)
      end
      d[i][j] = v
    end
  end
  return d[#a][#b]
end

function C.suggest(word, names)
  local best, bd = nil, math.max(2, math.min(4, #word // 3 + 1))   -- accept distances below bd
  for _, n in ipairs(names) do
    local d = distance(word, n)
    if d < bd then best, bd = n, d end
  end
  if not best then   -- a prefix or a part of a longer name ("thread" -> "num_threads")
    for _, n in ipairs(names) do
      if #word >= 3 and n:find(word, 1, true) then return n end
    end
  end
  return best
end

-- ---------------------------------------------------------------- schemas

-- name: the command ("train", "sample", ...); keys: the list; opts.check(c, given):
-- cross-key checks; opts.usage: the usage line of help; opts.help_cmd: how to get help
function C.schema(name, keys, opts)
  opts = opts or {}
  local s = {name = name, keys = keys, by_name = {}, alias = {}, usage = opts.usage, check = opts.check,
    names = {}, help_cmd = opts.help_cmd or ("iddpm " .. name .. " help")}
  local group = "options"
  for _, k in ipairs(keys) do
    group = k.group or group
    k.group = group
    s.by_name[k[1]] = k
    s.names[#s.names + 1] = k[1]
    for _, a in ipairs(k.aliases or {}) do s.alias[a] = k[1] end
  end
  return s
end

function C.defaults(s)
  local t = {}
  for _, k in ipairs(s.keys) do t[k[1]] = k[3] end
  return t
end

local function show(v)
  if type(v) == "string" then return v == "" and '""' or v end
  -- (only a noise schedule may be a function or a table)
  if type(v) == "function" then return "function alpha_bar(t) (from the recipe)" end
  if type(v) == "table" then return ("table of %d betas (from the recipe)"):format(#v) end
  if type(v) == "number" and math.type(v) == "float" then
    for p = 1, 17 do
      local t = ("%." .. p .. "g"):format(v)
      if tonumber(t) == v then return t end
    end
  end
  return tostring(v)
end
C.show = show

local function unknown(s, key, where)
  local cands = {}
  for _, n in ipairs(s.names) do cands[#cands + 1] = n end
  for a in pairs(s.alias) do cands[#cands + 1] = a end
  table.sort(cands)
  local hint = C.suggest(key, cands)
  C.error(("unknown %s key '%s'%s%s; `%s` lists the keys"):format(s.name, key, where or "",
    hint and (" (did you mean '" .. hint .. "'?)") or "", s.help_cmd))
end

-- the canonical name of key (aliases resolved), or an error naming the nearest
function C.canonical(s, key, where)
  if s.by_name[key] then return key end
  if s.alias[key] then return s.alias[key] end
  unknown(s, key, where)
end

local TYPE_WORD = {int = "an integer", num = "a number", bool = "true or false", str = "a string",
  ints = "a comma-separated list of integers (e.g. 1,2,2)", nums = "a comma-separated list of numbers"}

local function range_text(k)
  local parts = {}
  if k.gt ~= nil then parts[#parts + 1] = "> " .. show(k.gt) end
  if k.min ~= nil and k.max ~= nil then parts[#parts + 1] = ("in [%s, %s]"):format(show(k.min), show(k.max))
  elseif k.min ~= nil then parts[#parts + 1] = ">= " .. show(k.min)
  elseif k.max ~= nil then parts[#parts + 1] = "<= " .. show(k.max) end
  local r = table.concat(parts, " and ")
  if k.also then
    local a = {}
    for _, v in ipairs(k.also) do a[#a + 1] = show(v) end
    r = r .. " (or " .. table.concat(a, ", ") .. ")"
  end
  return r
end

local function bad(k, v, what)
  C.error(("%s=%s: %s"):format(k[1], show(v), what))
end

local function in_range(k, x)
  for _, a in ipairs(k.also or {}) do if x == a then return true end end
  if k.gt ~= nil and not (x > k.gt) then return false end
  if k.min ~= nil and x < k.min then return false end
  if k.max ~= nil and x > k.max then return false end
  return true
end

local function to_number(k, v, want_int)
  local n = type(v) == "number" and v or tonumber(type(v) == "string" and v:match("^%s*(.-)%s*$") or nil)
  if n == nil then bad(k, v, "not a number (expected " .. TYPE_WORD[want_int and "int" or "num"] .. ")") end
  if n ~= n or n == math.huge or n == -math.huge then bad(k, v, "not a finite number") end
  if want_int then
    local i = math.tointeger(n)
    if i == nil then bad(k, v, "not an integer") end
    return i
  end
  return n + 0.0
end

local function list_items(k, v, want_int)
  local items = {}
  if type(v) == "table" then
    for i, x in ipairs(v) do items[i] = x end
  elseif type(v) == "number" then items = {v}
  elseif type(v) == "string" then
    for item in v:gmatch("[^,]+") do
      local t = item:match("^%s*(.-)%s*$")
      if t == "" then bad(k, v, "an empty item in the list") end
      items[#items + 1] = t
    end
  else bad(k, tostring(v), "a " .. type(v) .. " (expected " .. TYPE_WORD[k[2]] .. ")") end
  local out = {}
  for i, x in ipairs(items) do
    local n = want_int and math.tointeger(tonumber(x)) or tonumber(x)
    if n == nil or n ~= n or n == math.huge or n == -math.huge then
      bad(k, type(v) == "table" and table.concat(items, ",") or v,
        ("'%s' is not %s (expected %s)"):format(tostring(x), want_int and "an integer" or "a number", TYPE_WORD[k[2]]))
    end
    if not in_range(k, n) then
      bad(k, type(v) == "table" and table.concat(items, ",") or v, ("item %s is out of range (each must be %s)")
        :format(show(n), range_text(k)))
    end
    out[i] = show(n)
  end
  return table.concat(out, ",")
end

-- convert v (a command-line string or a recipe value) to key's type and check its range
function C.convert(s, name, v)
  local k = s.by_name[name]
  local ty = k[2]
  local r
  if ty == "bool" then
    if type(v) == "boolean" then r = v
    else
      local t = tostring(v):lower()
      if t == "true" or t == "1" or t == "yes" then r = true
      elseif t == "false" or t == "0" or t == "no" then r = false
      else bad(k, tostring(v), "not a boolean (expected true or false)") end
    end
  elseif ty == "int" or ty == "num" then
    if type(v) ~= "number" and type(v) ~= "string" then bad(k, tostring(v), "a " .. type(v) .. " (expected " .. TYPE_WORD[ty] .. ")") end
    r = to_number(k, v, ty == "int")
    if not in_range(k, r) then bad(k, v, "out of range (expected " .. range_text(k) .. ")") end
  elseif ty == "ints" or ty == "nums" then
    r = list_items(k, v, ty == "ints")
  elseif ty == "schedule" and type(v) == "function" then
    return v   -- a noise schedule alpha_bar(t), t in [0,1], from a recipe
  elseif ty == "schedule" and type(v) == "table" then
    if #v == 0 then bad(k, "{}", "an empty table (expected a list of betas)") end
    for i = 1, #v do
      if type(v[i]) ~= "number" or not (v[i] > 0 and v[i] <= 1) then
        bad(k, "{...}", ("betas[%d] = %s is not a number in (0, 1]"):format(i, tostring(v[i])))
      end
    end
    return v   -- a table of betas; T is its length
  else
    if type(v) == "table" then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = tostring(x) end
      v = table.concat(parts, ",")
    elseif type(v) ~= "string" and type(v) ~= "number" then
      bad(k, tostring(v), "a " .. type(v) .. " (expected a string)")
    end
    r = tostring(v)
    if k.nonempty and r == "" then bad(k, r, "must not be empty") end
  end
  if k.one_of and not (ty == "str" and r == "" and not k.nonempty and k.empty_ok) then
    local ok = false
    for _, x in ipairs(k.one_of) do if x == r then ok = true end end
    if not ok then
      local names = {}
      for _, x in ipairs(k.one_of) do names[#names + 1] = show(x) end
      local hint = type(r) == "string" and C.suggest(r, k.one_of)
      bad(k, r, ("expected one of %s%s"):format(table.concat(names, ", "), hint and (" (did you mean '" .. hint .. "'?)") or ""))
    end
  end
  return r
end

-- ---------------------------------------------------------------- the command line

local HELP = {help = true, ["--help"] = true, ["-h"] = true, ["-help"] = true}

-- args: the script's `arg` ({"k=v", ...}, maybe with arg[0]) or a list of strings.
-- -> {pairs = {{key, value}, ...}, help = bool, dry_run = bool, positional = {...}}
function C.parse_args(args)
  local r = {pairs = {}, help = false, dry_run = false, positional = {}}
  for i = 1, #(args or {}) do
    local a = tostring(args[i])
    if HELP[a] then r.help = true
    elseif a == "--dry-run" or a == "dry-run" or a == "--dry_run" then r.dry_run = true
    else
      local k, v = a:match("^%-*([%a_][%w_]*)=(.*)$")
      if k then r.pairs[#r.pairs + 1] = {k, v} else r.positional[#r.positional + 1] = a end
    end
  end
  return r
end

-- defaults <- base (a recipe table: typed values) <- args (strings) -> config.
-- args: a `arg` list, a parse_args result or a {key = value} map.
function C.resolve(s, base, args)
  local c = C.defaults(s)
  local given = {}
  for key, v in pairs(base or {}) do
    if type(key) ~= "string" then C.error(("a %s recipe key must be a name, not %s"):format(s.name, tostring(key))) end
    local name = C.canonical(s, key, " in the recipe")
    c[name] = C.convert(s, name, v)
    given[name] = true
  end
  local p
  if type(args) == "table" and args.pairs then p = args
  elseif type(args) == "table" and (#args > 0 or args[0] ~= nil) then p = C.parse_args(args)
  else
    p = {pairs = {}, positional = {}}
    local ks = {}
    for key in pairs(args or {}) do ks[#ks + 1] = key end
    table.sort(ks)
    for _, key in ipairs(ks) do p.pairs[#p.pairs + 1] = {key, args[key]} end
  end
  if #p.positional > 0 then
    local a = p.positional[1]
    C.error(("bad argument '%s': options are key=value (e.g. %s=%s); `help` lists them"):format(a,
      s.keys[1][1], show(s.keys[1][3])))
  end
  for _, kv in ipairs(p.pairs) do
    local name = C.canonical(s, kv[1], " on the command line")
    c[name] = C.convert(s, name, kv[2])
    given[name] = true
  end
  for _, k in ipairs(s.keys) do
    if k.required and (c[k[1]] == nil or c[k[1]] == "") then
      C.error(("%s= is required: %s; `%s` lists the keys"):format(k[1], k[4], s.help_cmd))
    end
  end
  if s.check then s.check(c, given) end
  return c, given
end

-- resolve for a command: help (anywhere) prints the keys with the values they would have
-- and returns nil; otherwise -> config, flags {dry_run}
function C.command(s, base, args)
  local p = (type(args) == "table" and args.pairs) and args or C.parse_args(args)
  if p.help then
    local vals = C.defaults(s)
    local ok = pcall(function()   -- show the recipe's and the line's values where they are valid
      for key, v in pairs(base or {}) do local n = C.canonical(s, key); vals[n] = C.convert(s, n, v) end
      for _, kv in ipairs(p.pairs) do local n = C.canonical(s, kv[1]); vals[n] = C.convert(s, n, kv[2]) end
    end)
    io.stdout:write(C.help(s, ok and vals or C.defaults(s)))
    io.stdout:flush()
    return nil
  end
  local c = C.resolve(s, base, p)
  return c, {dry_run = p.dry_run}
end

-- ---------------------------------------------------------------- help and display

local WIDTH = 99   -- help lines stay under 100 columns
local VALW = 14   -- the value column

local function wrap(text, indent, width)
  local lines, line = {}, ""
  for word in text:gmatch("%S+") do
    if line ~= "" and indent + #line + 1 + #word > width then
      lines[#lines + 1] = line
      line = word
    else
      line = line == "" and word or (line .. " " .. word)
    end
  end
  lines[#lines + 1] = line
  return table.concat(lines, "\n" .. (" "):rep(indent))
end

function C.help(s, values)
  values = values or C.defaults(s)
  local out = {}
  if s.usage then out[#out + 1] = "usage: " .. s.usage end
  out[#out + 1] = wrap("key=value options, with their current values. `help` or --help anywhere on the line prints "
    .. "this; --dry-run resolves and checks the config and lists what would be written.", 0, WIDTH)
  local wname = 0
  for _, k in ipairs(s.keys) do wname = math.max(wname, #k[1]) end
  wname = math.min(wname, 24)
  local group
  for _, k in ipairs(s.keys) do
    if k.group ~= group then
      group = k.group
      out[#out + 1] = ""
      out[#out + 1] = group .. ":"
    end
    local v = values[k[1]]
    local vs = (v == nil or (k.required and v == "")) and "(required)" or show(v)
    local text = k[4]
    if k.aliases and #k.aliases > 0 then text = text .. " (alias: " .. table.concat(k.aliases, ", ") .. ")" end
    local head = ("  %-" .. wname .. "s %-" .. VALW .. "s "):format(k[1], vs)
    if #vs > VALW then   -- a long value gets its own line
      out[#out + 1] = ("  %-" .. wname .. "s %s"):format(k[1], vs)
      head = (" "):rep(wname + VALW + 4)
    end
    out[#out + 1] = head .. wrap(text, #head, WIDTH)
  end
  return table.concat(out, "\n") .. "\n"
end

-- "  key   value" lines of a config; changed_only: only the keys that differ from the defaults
function C.describe(s, c, changed_only)
  local lines = {}
  for _, k in ipairs(s.keys) do
    local v = c[k[1]]
    if not changed_only or v ~= k[3] then
      lines[#lines + 1] = ("  %-24s %s"):format(k[1], show(v))
    end
  end
  return table.concat(lines, "\n")
end

-- ---------------------------------------------------------------- output folders

local fs = require "iddpm.fs"

-- "directory", "file", "fifo", ... or nil (a stat, never an open: a FIFO would block)
local function mode(p) return fs.kind(p) end
C.mode = mode

local function parent(p)
  local d = p:match("^(.*)/[^/]*$")
  if d == nil then return "." end
  if d == "" then return "/" end
  return d
end

-- a directory can be written: it exists and a probe file can be created in it and
-- removed; the probe is the only thing ever created
local function dir_writable(d)
  local probe = ("%s/.iddpm_probe_%d_%d"):format(d, os.time(), math.random(1 << 30))
  if not pcall(fs.write_atomic, probe, "") then return false end   -- exclusive create, no link followed
  fs.remove(probe)
  return true
end

-- path: a directory to write into (created later by the command). Fails, naming the
-- path and the reason, when it is a file, or when the nearest existing folder above
-- it cannot be written. Creates nothing but a probe file it removes again.
function C.check_writable(path, what)
  what = what or "output directory"
  if path == nil or path == "" then C.error(what .. " is empty") end
  path = path:gsub("/+$", "")
  if path == "" then path = "/" end
  local m = mode(path)
  if m == "directory" then
    if not dir_writable(path) then C.error(("%s %s is not writable"):format(what, path)) end
    return
  end
  if m ~= nil then C.error(("%s %s exists and is not a directory"):format(what, path)) end
  local d = parent(path)
  while true do
    local dm = mode(d)
    if dm == "directory" then
      if not dir_writable(d) then
        C.error(("%s %s cannot be created: %s is not writable"):format(what, path, d))
      end
      return
    elseif dm ~= nil then
      C.error(("%s %s cannot be created: %s is not a directory"):format(what, path, d))
    end
    if d == "/" or d == "." then C.error(("%s %s cannot be created"):format(what, path)) end
    d = parent(d)
  end
end

-- a file to be written: its folder must be writable (or creatable)
function C.check_writable_file(path, what)
  what = what or "output file"
  local m = mode(path)
  if m == "directory" then C.error(("%s %s is a directory"):format(what, path)) end
  C.check_writable(parent(path), what .. " " .. path .. ": folder")
end

-- mkdir -p without a shell (iddpm.fs); a failure is a user error naming the path
function C.mkdir_p(p)
  local ok, err = pcall(fs.mkdir_p, p)
  if not ok then C.error(tostring(err)) end
end

return C
