-- iddpm/init.lua — the pure-Lua half of the iddpm module: called with the module
-- table made in C (lua/l_iddpm.c), it adds the conveniences and sub-modules.
return function(iddpm)
  local T = iddpm.tensor
  iddpm.no_grad = T.no_grad
  iddpm.manual_seed = T.manual_seed
  iddpm.diffusion = require("iddpm.diffusion")
end
