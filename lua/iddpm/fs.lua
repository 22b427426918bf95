-- iddpm/fs.lua — every file-system operation of the Lua side, made by direct calls
-- (lua/l_fs.c, engine/io), never through a shell: a path is only ever a path, whatever
-- quotes, spaces, `$(...)` or globs it holds.
--
--   fs.check_path(p, what)     error unless p is a non-empty, not all-blank string
--   fs.kind(p [, nofollow])    "file" | "directory" | "link" | "fifo" | ... | nil
--   fs.is_dir(p), fs.is_file(p) (regular file), fs.exists(p)   (follow links; never open)
--   fs.file_id(p)              "dev:ino" of p itself (a rename over p gives a new one)
--   fs.mkdir_p(p, what)        create p and its parents (error names p and what)
--   fs.list(dir)               sorted names in dir ({} if dir is missing)
--   fs.walk(dir)               sorted paths of the regular files below dir (recursive;
--                              symbolic links to directories are not followed)
--   fs.write_atomic(p, s)      exclusive temp file + checked writes + fsync + rename
--   fs.append(p, s)            append one whole record or raise (nothing half-written)
--   fs.rewrite_lines(p, keep)  keep(line) -> bool; the kept lines are written to a new
--                              file renamed over p (p is never truncated in place)
--   fs.remove(p)               unlink a file or link; nil, message if that fails
--   fs.lock_dir(dir, what)     exclusive lock on dir/lock for this process (see below)
--   fs.clean_stale_temps(dir)  remove dir's temp files (<name>.tmp.<pid>[.<k>]) whose
--                              writer process is gone; returns how many
--   fs.TEMP_PATTERN            the Lua pattern of those temp names
--
-- Locks: flock(2) on RUN/lock, held until every lock_dir of it in this process is
-- :release()d (a trainer never releases: the lock lasts until the process exits). A
-- second process fails at once with an error naming the holder ("pid 1234 on host h");
-- within one process the same directory may be locked again (a count goes up).
local C = require "iddpm._fs"

local fs = {}
fs.getpid, fs.hostname, fs.pid_alive = C.getpid, C.hostname, C.pid_alive

function fs.check_path(p, what)
  what = what or "path"
  if type(p) ~= "string" then error(("%s must be a path string, got %s"):format(what, type(p)), 0) end
  if p == "" or not p:find("%S") then
    error(("%s is empty: give a directory or file name (%s=\"%s\")"):format(what, what, p), 0)
  end
  if p:find("\0", 1, true) then error(("%s contains a NUL byte"):format(what), 0) end
  return p
end

function fs.kind(p, nofollow)
  if type(p) ~= "string" or p == "" then return nil end
  return (C.kind(p, nofollow))
end
function fs.file_id(p) local _, id = C.kind(p, true) return id end   -- "dev:ino" or nil
function fs.is_dir(p) return fs.kind(p) == "directory" end
function fs.is_file(p) return fs.kind(p) == "file" end
function fs.exists(p) return fs.kind(p, true) ~= nil end

function fs.mkdir_p(p, what)
  fs.check_path(p, what or "directory")
  if fs.is_dir(p) then return p end
  local acc = p:sub(1, 1) == "/" and "" or nil
  for part in p:gmatch("[^/]+") do
    acc = acc and (acc .. "/" .. part) or part
    if part ~= "." and part ~= ".." and not fs.is_dir(acc) then
      local ok, err = C.mkdir(acc)
      if not ok and not fs.is_dir(acc) then
        error(("cannot create %s%s: %s"):format(what and (what .. " ") or "directory ", p, err), 0)
      end
    end
  end
  return p
end

function fs.list(dir)
  local names = C.list(dir)
  return names or {}
end

function fs.walk(dir, out)
  out = out or {}
  for _, name in ipairs(fs.list(dir)) do
    local p = dir .. "/" .. name
    local k = fs.kind(p, true)
    if k == "directory" then fs.walk(p, out)
    elseif fs.kind(p) == "file" then out[#out + 1] = p end
  end
  return out
end

-- errors of the C calls carry the file name; the Lua position is left off
local function call(f, ...)
  local ok, err = pcall(f, ...)
  if not ok then error((tostring(err):gsub("^[^:]*fs%.lua:%d+: ", "")), 0) end
end
function fs.write_atomic(p, s) fs.check_path(p, "file"); call(C.write_atomic, p, s) end
function fs.append(p, s) fs.check_path(p, "file"); call(C.append, p, s) end
function fs.remove(p) return C.remove(p) end

function fs.rewrite_lines(p, keep)
  if fs.kind(p) ~= "file" then return false end
  local f, err = io.open(p, "rb")
  if not f then error(("cannot read %s: %s"):format(p, err), 0) end
  local kept, dropped = {}, 0
  for line in f:lines() do
    if keep(line) then kept[#kept + 1] = line else dropped = dropped + 1 end
  end
  f:close()
  if dropped == 0 then return false end
  call(C.write_atomic, p, #kept > 0 and (table.concat(kept, "\n") .. "\n") or "")
  return true
end

fs.TEMP_PATTERN = "^.+%.tmp%.(%d+)%.?%d*$"

function fs.clean_stale_temps(dir)
  local me, n = C.getpid(), 0
  for _, name in ipairs(fs.list(dir)) do
    local pid = tonumber(name:match(fs.TEMP_PATTERN))
    local p = dir .. "/" .. name
    if pid and pid ~= me and not C.pid_alive(pid) and fs.kind(p, true) == "file" then
      if C.remove(p) then n = n + 1 end
    end
  end
  return n
end

-- ---------------------------------------------------------------- locks

local held = {}   -- "dev:ino" of a lock file -> {handle, count}

local Lock = {}
Lock.__index = Lock
function Lock:release()
  local h = held[self.id]
  if not h or self.released then return end
  self.released = true
  h.count = h.count - 1
  if h.count == 0 then h.handle:close(); held[self.id] = nil end
end

function fs.lock_dir(dir, what)
  local path = dir .. "/lock"
  local _, id = C.kind(path, true)
  local h = id and held[id]
  if not h then
    local handle, holder, nolocks = C.lock(path)
    if not handle and nolocks then   -- e.g. an NFS mount without lock support: go on unlocked
      io.stderr:write(("warning: cannot lock %s (%s): nothing stops a second trainer here\n"):format(dir, nolocks))
      return setmetatable({released = true}, Lock)
    end
    if not handle then
      error(("%s %s is in use by another process (%s holds %s); wait for it to finish, " ..
        "stop it, or use another %s"):format(what or "directory", dir, holder, path, what or "directory"), 0)
    end
    _, id = C.kind(path, true)
    h = {handle = handle, count = 0}
    held[id] = h
  end
  h.count = h.count + 1
  return setmetatable({id = id, path = path}, Lock)
end

return fs
