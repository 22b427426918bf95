-- test_unet_ref_bf16.lua — test_unet_ref.lua with the UNet's activations in bfloat16
-- channels-last (device.set_activations("bf16"): what precision=bf16 does on the GPU;
-- on the CPU each layer computes in float32 and rounds its output to bf16, so this
-- checks the bf16 graph: dtypes, layouts, casts and gradients through them). With
-- IDDPM_DEVICE=cuda the GPU's bf16 kernels run. Against the official float32 network.
-- Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per stored
-- value). Measured worst relative errors: output 0.0096 (CPU) / 0.014 (H100); a parameter
-- gradient 0.040 (CPU) and 0.039-0.055 on the H100 over six processes (cuDNN times its
-- algorithms afresh in each, and the choice changes the summation order). 8e-2 is the
-- bound, 1.45x the worst seen; a wrong or missing term (errors of order 1) still fails.
-- The gradients that are exactly zero (a conv bias feeding a one-channel-per-group
-- norm, see test_unet_ref.lua) come out as bf16 cancellation noise of ~5e-2 absolute,
-- 1e-3 of the largest gradient (45): their floor is 3% of the largest gradient here
-- instead of 1% (worst then 0.036).
UNET_REF_TOL = 8e-2
UNET_ZERO_GRAD_FLOOR = 3e-2
local H = require "harness"
local iddpm = require "iddpm"
local T = iddpm.tensor
local device = require "iddpm.device"

-- the switch: auto is float32 on the CPU; bf16 forces it anywhere; bad names are errors
local probe = T.zeros({1, 3, 4, 4})
device.set_activations("auto")
H.check("activations auto: float32 on the CPU", device.activation_dtype(probe) == nil)
device.set_activations("fp32")
H.check("activations fp32", device.activation_dtype(probe) == nil)
H.raises("activations: a bad name", function() device.set_activations("fp16") end, "expected auto, bf16 or fp32")
device.set_activations("bf16")
H.check("activations bf16", device.activation_dtype(probe) == "bfloat16")

-- inside the UNet the blocks see bf16 channels-last; the caller gets float32 NCHW back
local small = iddpm.nn.unet{image_size = 8, num_channels = 32, num_res_blocks = 1, channel_mult = {1, 2},
  attention_resolutions = {4}, num_heads = 2, learn_sigma = true}
local xin = T.randn({2, 3, 8, 8}, T.generator(11))
local hb = small.input_blocks:child(1):forward(T.randn({2, 32, 8, 8}, T.generator(12)):channels_last("bfloat16"), small.time_embed(
  T.timestep_embedding(T.from_table({1, 2}), 32)))
H.check("a ResBlock keeps bf16 channels-last", hb:dtype() == "bfloat16" and hb:is_channels_last(),
  hb:dtype() .. (hb:is_channels_last() and " channels-last" or " not channels-last"))
local ob = small(xin, {3, 7})
H.check("UNet output is float32 contiguous", ob:dtype() == "float32" and ob:is_contiguous(), ob:dtype())
print("# activations: bfloat16 channels-last")
dofile("tests/lua/test_unet_ref.lua")
