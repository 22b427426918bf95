-- iddpm/cli/train.lua — `iddpm train [RECIPE.lua] key=value ...`: train from a recipe file
-- (the same as `iddpm run RECIPE.lua key=value ...`) or from the defaults plus overrides;
-- `help` anywhere lists every key with its value (the recipe's, if one is given), and
-- --dry-run checks the config and lists what would be written.
return function(...)
  local R = require "iddpm.recipe"
  local args = {...}
  local cfg = {}
  for i, a in ipairs(args) do
    if a:match("%.lua$") and not a:find("=", 1, true) then
      cfg = R.load(table.remove(args, i))
      break
    end
  end
  return require("iddpm.train").main(cfg, args)
end
