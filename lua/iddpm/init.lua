-- iddpm/init.lua — the pure-Lua half of the iddpm module: called with the module
-- table made in C (lua/l_iddpm.c), it adds the conveniences and the Lua sub-modules.
-- Sub-modules load on first use (iddpm.nn, iddpm.diffusion, ...), so `require "iddpm"`
-- stays fast and a module can require "iddpm.tensor" without a cycle.
return function(iddpm)
  local T = iddpm.tensor
  iddpm.no_grad = T.no_grad
  iddpm.manual_seed = T.manual_seed
  T.tensor = require("iddpm.tensor_nested")(T)
  local lazy = {nn = "iddpm.nn", diffusion = "iddpm.diffusion", optim = "iddpm.optim",
                data = "iddpm.data", train = "iddpm.train", sample = "iddpm.sample",
                metrics = "iddpm.metrics", image = "iddpm.image", recipe = "iddpm.recipe",
                device = "iddpm.device", config = "iddpm.config"}
  local names = {}   -- for Tab completion in the REPL (iddpm/repl.lua)
  for k in pairs(lazy) do names[#names + 1] = k end
  -- The C cores of other modules stay reachable (iddpm._data) but out of pairs() and
  -- Tab completion: the public modules are what `iddpm.` lists.
  local internal = {}
  for _, k in ipairs {"optim_c", "_diffusion", "_metrics", "_data", "_fs", "_dist"} do
    internal[k] = rawget(iddpm, k)
    rawset(iddpm, k, nil)
  end
  setmetatable(iddpm, {__complete = names, __index = function(t, k)
    if internal[k] ~= nil then return internal[k] end
    local name = lazy[k]
    if not name then return nil end
    local m = require(name)
    rawset(t, k, m)
    return m
  end})
end
