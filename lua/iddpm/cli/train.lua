-- iddpm/cli/train.lua — `iddpm train [RECIPE.lua] key=value ...`: train from a recipe file
-- (the same as `iddpm run RECIPE.lua key=value ...`) or from the defaults plus overrides;
-- `iddpm train help` lists every key with its default.
return function(...)
  local R = require "iddpm.recipe"
  local args = {...}
  if args[1] == "help" or args[1] == "--help" or args[1] == "-h" then
    print("usage: iddpm train [RECIPE.lua] [key=value ...]\n\nkeys (default):")
    for _, k in ipairs(R.KEYS) do
      local d = type(k[3]) == "string" and ("%q"):format(k[3]) or tostring(k[3])
      print(("  %-24s %-14s %s"):format(k[1], d, k[4]))
    end
    return
  end
  local cfg = {}
  if args[1] and args[1]:match("%.lua$") then cfg = R.load(table.remove(args, 1)) end
  return require("iddpm.train").main(cfg, args)
end
