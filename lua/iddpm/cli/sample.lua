-- iddpm/cli/sample.lua — `iddpm sample key=value ...`: the sampling recipe
-- (iddpm.sample.main; the same as `iddpm run recipes/sample.lua ...`).
return function(...)
  local S = require "iddpm.sample"
  local args = {...}
  if #args == 0 or args[1] == "help" or args[1] == "--help" or args[1] == "-h" then
    local keys = {}
    for k in pairs(S.OPTIONS) do keys[#keys + 1] = k end
    table.sort(keys)
    print("usage: iddpm sample ckpt=RUN_DIR_OR_FILE [key=value ...]\n\noptions:")
    for _, k in ipairs(keys) do print(("  %-16s %s"):format(k, S.OPTIONS[k])) end
    if #args == 0 then error("ckpt= is required", 0) end
    return
  end
  S.main(...)
end
