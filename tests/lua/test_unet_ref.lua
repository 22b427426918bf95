-- test_unet_ref.lua — the UNet against the official network and one official
-- training step: tests/ref/unet_public.safetensors (tests/ref/make_unet_public.py) holds an
-- official UNetModel's weights (perturbed away from the zero init), inputs, its
-- forward output, the gradients of sum(out * R), and the hybrid loss (cosine, T=1000,
-- learned range sigma, rescaled timesteps) with the gradients of mean(loss).
-- Also: parameter counts of the paper's configs, the blocks' gradchecks, and where a
-- shape error deep in the network says it happened.
local H = require "harness"
local iddpm = require "iddpm"
local T, nn = iddpm.tensor, iddpm.nn

-- float32 UNet vs float32 PyTorch: different summation orders give ~1e-6 relative
-- differences; 1e-4 (the required bound) leaves room and still catches any wrong term.
-- test_unet_ref_bf16.lua runs this file with bf16 activations and its own bound
local REF_TOL = UNET_REF_TOL or 1e-4

local REF = os.getenv("IDDPM_REFERENCE") or "tests/ref/unet_public.safetensors"
local sd, meta = T.load(REF)
local cfg = iddpm.io.json_decode(meta.unet_config)
print("# reference " .. REF)
-- IDDPM_DEVICE=cuda runs the forward, backward and training step on that device
local DEV = os.getenv("IDDPM_DEVICE") or "cpu"
local function dev(x) if DEV == "cpu" then return x end return x:to(DEV) end
if DEV ~= "cpu" then print("# device " .. DEV) end

-- relative error as ||a - b||_inf / max(||b||_inf, floor) (per tensor)
local function rel(a, b, floor)
  if a:device() ~= "cpu" then a = a:cpu() end
  local d = (a - b):abs():max():item()
  local s = b:abs():max():item()
  return d / math.max(s, floor or 1e-12)
end

-- Some gradients are exactly zero in exact arithmetic: a conv bias followed directly
-- by a GroupNorm with one channel per group (32 channels, 32 groups) is removed by the
-- normalisation. Both float32 implementations then return cancellation noise (~1e-6
-- against a largest gradient of ~45). Such tensors are compared against 1% of the
-- largest gradient in the network instead of their own (noise) magnitude.
local ZERO_GRAD_FLOOR = UNET_ZERO_GRAD_FLOOR or 1e-2
local function grad_floor(prefix)
  local g = 0
  for k, v in pairs(sd) do if k:sub(1, #prefix) == prefix then g = math.max(g, v:abs():max():item()) end end
  return ZERO_GRAD_FLOOR * g
end

-- the official constructor takes attention downsample rates; ours takes resolutions
local res = {}
for i, ds in ipairs(cfg.attention_resolutions) do res[i] = cfg.image_size // ds end
local function make()
  return nn.unet{image_size = cfg.image_size, in_channels = cfg.in_channels, num_channels = cfg.model_channels,
    out_channels = cfg.out_channels, num_res_blocks = cfg.num_res_blocks, attention_resolutions = res,
    channel_mult = cfg.channel_mult, num_heads = cfg.num_heads, dropout = cfg.dropout,
    use_scale_shift_norm = cfg.use_scale_shift_norm}
end
local unet = make()
unet:load_state_dict(sd, {prefix = "param."})
if DEV ~= "cpu" then unet:to(DEV) end
local nref = 0
for k in pairs(sd) do if k:find("^param%.") then nref = nref + 1 end end
H.check("every official parameter has a place", #unet:parameter_names() == nref, #unet:parameter_names() .. " vs " .. nref)

-- forward and every gradient of sum(out * R)
local x = dev(sd["input.x"]:clone())
x.requires_grad = true
local out = unet(x, dev(sd["input.t"]:float()))
H.check("forward output on the device", out:device() == DEV, out:device())
local r = rel(out, sd["fwd.out"])
print(("# forward: rel err %.3g (tol %.0e)"):format(r, REF_TOL))
H.check("forward matches the official output", r < REF_TOL, ("rel err %.3g"):format(r))
;(out * dev(sd["fwd.R"])):sum():backward()
r = rel(x.grad, sd["fwd.grad_x"])
H.check("gradient w.r.t. the input", r < REF_TOL, ("rel err %.3g"):format(r))
-- compare every parameter's gradient with the reference tensors under prefix
local function check_param_grads(label, prefix)
  local worst, worst_name, nchecked = 0, "", 0
  local floor = grad_floor(prefix)
  for name, p in pairs(unet:named_parameters()) do
    local want = sd[prefix .. name]
    if want then
      local e = rel(p.grad, want, floor)
      nchecked = nchecked + 1
      if e > worst then worst, worst_name = e, name end
    end
  end
  print(("# %s: worst rel err %.3g at %s (tol %.0e)"):format(label, worst, worst_name, REF_TOL))
  H.check(("%s (%d)"):format(label, nchecked), nchecked == nref and worst < REF_TOL,
    ("worst %.3g at %s"):format(worst, worst_name))
end
check_param_grads("every parameter gradient", "fwd.grad.")

-- one training step: hybrid loss with the official diffusion
local dcfg = iddpm.io.json_decode(meta.diffusion)
local diff = iddpm.diffusion.new{steps = dcfg.steps, noise_schedule = dcfg.noise_schedule, learn_sigma = dcfg.learn_sigma,
  rescale_timesteps = dcfg.rescale_timesteps, rescale_learned_sigmas = dcfg.rescale_learned_sigmas}
unet:zero_grad()
local t = sd["input.t"]:totable()
local losses = diff:training_losses(unet, dev(sd["input.x"]), t, {noise = dev(sd["train.noise"])})
H.check("training losses on the device", losses.loss:device() == DEV, losses.loss:device())
for _, k in ipairs({"loss", "mse", "vb"}) do
  local e = rel(losses[k], sd["train." .. k])
  H.check("training step " .. k, e < REF_TOL, ("rel err %.3g"):format(e))
end
losses.loss:mean():backward()
check_param_grads("training step: every parameter gradient", "train.grad.")

if DEV ~= "cpu" then unet:to("cpu") end   -- the checks below feed CPU inputs

-- parameter counts of the paper's configurations (the paper's CIFAR-10 and ImageNet 64x64 models)
local function count(c) return nn.unet(c):num_params() end
H.check("CIFAR-10 config has 52,546,438 parameters", count{image_size = 32, num_channels = 128, num_res_blocks = 3,
  channel_mult = {1, 2, 2, 2}, attention_resolutions = {16, 8}, num_heads = 4, learn_sigma = true} == 52546438)
H.check("ImageNet-64 config has 121,063,942 parameters", count{image_size = 64, num_channels = 128, num_res_blocks = 3,
  channel_mult = {1, 2, 3, 4}, attention_resolutions = {16, 8}, num_heads = 4, learn_sigma = true} == 121063942)

-- errors say where they happened
H.raises("a shape error names the block", function()
  unet(T.randn(1, 3, 16, 9), {1})   -- 9 -> 5 -> upsampled 10: the skip concat fails
end, "output_blocks.")
H.raises("wrong input channels", function() unet(T.randn(1, 4, 16, 16), {1}) end, "expected (N, 3, H, W)")
H.raises("labels for an unconditional model", function() unet(T.randn(1, 3, 16, 16), {1}, {0}) end, "unconditional")

-- blocks: gradchecks through the tape in float32 (central differences with step 1e-2:
-- the float32 forward keeps ~1e-7 relative, so the difference quotient is good to ~1e-4
-- on these near-linear maps; 5e-3 still fails on any wrong or missing term)
local BLOCK_TOL = 5e-3
local function randp(...) local t = T.randn({...}, T.generator(5)); t.requires_grad = true; return t end
local gcases = {
  {"conv2d 3x3 stride 1", function(a, w, b) return T.conv2d(a, w, b, 1, 1) end, {randp(2, 3, 5, 5), randp(4, 3, 3, 3), randp(4)}},
  {"conv2d 3x3 stride 2", function(a, w, b) return T.conv2d(a, w, b, 2, 1) end, {randp(2, 3, 6, 6), randp(4, 3, 3, 3), randp(4)}},
  {"conv2d 1x1", function(a, w, b) return T.conv2d(a, w, b, 1, 0) end, {randp(2, 4, 3, 3), randp(2, 4, 1, 1), randp(2)}},
  {"group_norm + scale-shift + silu", function(a, g, b, s, h) return T.group_norm(a, 2, g, b, s, h, true) end,
    {randp(2, 4, 3, 3), randp(4), randp(4), randp(2, 4), randp(2, 4)}},
  {"group_norm plain", function(a, g, b) return T.group_norm(a, 4, g, b) end, {randp(2, 8, 2, 2), randp(8), randp(8)}},
  {"qkv_attention 2 heads", function(q) return T.qkv_attention(q, 2) end, {randp(2, 12, 5)}},
  {"upsample_nearest", function(a) return T.upsample_nearest(a, 2) end, {randp(1, 2, 3, 3)}},
  {"avg_pool2d", function(a) return T.avg_pool2d(a, 2) end, {randp(1, 2, 4, 4)}},
  {"dropout (same mask both ways)", function(a) return T.dropout(a, 0.3, T.generator(9)) end, {randp(3, 7)}},
}
for _, c in ipairs(gcases) do
  local w = T.gradcheck(c[2], c[3], {eps = 1e-2, nmax = 40, seed = 3})
  H.check("gradcheck " .. c[1], w < BLOCK_TOL, ("worst %.3g"):format(w))
end
-- a ResBlock and an AttentionBlock as whole modules
do
  nn.manual_seed(4)
  local rb = nn.ResBlock.new(32, 16, 0, {out_channels = 64})
  local emb = randp(2, 16)
  local xin = randp(2, 32, 4, 4)
  local w = T.gradcheck(function(a, e) return rb(a, e) end, {xin, emb}, {eps = 1e-2, nmax = 30, seed = 3})
  H.check("gradcheck ResBlock (input and embedding)", w < BLOCK_TOL, ("worst %.3g"):format(w))
  local ab = nn.AttentionBlock.new(32, 4)
  w = T.gradcheck(function(a) return ab(a) end, {randp(2, 32, 3, 3)}, {eps = 1e-2, nmax = 30, seed = 3})
  H.check("gradcheck AttentionBlock", w < BLOCK_TOL, ("worst %.3g"):format(w))
end
H.done()
