-- iddpm/nn.lua — the iddpm.nn namespace: generic layers (nn/module.lua) and the
-- Improved-DDPM UNet and its blocks (nn/unet.lua).
local nn = require "iddpm.nn.module"
local unet = require "iddpm.nn.unet"
for k, v in pairs(unet) do nn[k] = v end
return nn
