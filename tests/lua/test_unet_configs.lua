-- test_unet_configs.lua — our UNet against more official configurations:
-- tests/ref/unet_configs_ref.safetensors, made by tests/ref/make_unet_ref.py from the
-- official improved-diffusion UNetModel in float64 (see that script's docstring):
--   cond:   class-conditional (10 classes), 3 res blocks, channel_mult 1,2,2,2, attention
--           at ds 2 and 4, 4 heads, learned sigma, scale-shift norm
--   plain:  unconditional, additive timestep embedding (no scale-shift), 1 head,
--           attention at ds 1 and 2, conv_resample false (avg-pool down, bare upsample)
--   gray28: 1 input channel at 28x28 (7x7 bottom), channel_mult 1,2,3 (3 channels per
--           norm group), num_heads 2 with num_heads_upsample 4, learned sigma
-- No weights are stored: every parameter comes from a formula (a splitmix64 hash of
-- (parameter index, element index)) computed here in double and cast through a float32
-- tensor, exactly as the script does. For each config: the formula's bits, the official
-- parameter names and order, the forward output, the gradient w.r.t. x of
-- sum(out * R), and every parameter's gradient (whole when <= 2048 elements, else its
-- first 1024 elements plus sum g, sum g*c, max|g|).
local H = require "harness"
local iddpm = require "iddpm"
local T, nn = iddpm.tensor, iddpm.nn
local json = iddpm.io.json_decode

-- float32 UNet vs the float64 official model. The official float32 model itself is
-- within ~2e-5 of the float64 reference on every quantity below (printed from the file's
-- f32_vs_f64 metadata); 1e-4 (the required bound) leaves room for a different summation
-- order and still catches any wrong term.
local REF_TOL = 1e-4
-- Gradients that are exactly zero in exact arithmetic (the script lists them: float64
-- max|g| < 1e-10 of the network's largest gradient): a bias followed by a GroupNorm with
-- one channel per group (conv biases of 32-channel blocks, the last block's output bias
-- before `out`'s norm) and, without scale-shift norm, the whole timestep-embedding
-- projection of 32-channel blocks (a per-channel constant the norm removes). Both
-- float32 implementations return rounding noise there (~1e-7 of the largest gradient).
-- They are judged against 1% of the network's largest gradient, as in test_unet_ref.lua;
-- every other gradient against its own magnitude (the float64 reference's max|g|, or
-- for sums, sum|g|: the natural scale of a sum's rounding error).
local ZERO_GRAD_FLOOR = 1e-2
local HEAD = 1024

local REF = "tests/ref/unet_configs_ref.safetensors"
local sd, meta = T.load(REF)
local configs = json(meta.configs)
print("# reference " .. REF .. " (" .. meta.generator .. ", torch " .. meta.torch .. ")")

-- u(k, i) = splitmix64(k * 2^32 + i) >> 11, times 2^-53 (Lua integers wrap like uint64)
local function hash_u(k, i)
  local z = (k << 32) + i + 0x9E3779B97F4A7C15
  z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
  z = (z ~ (z >> 27)) * 0x94D049BB133111EB
  z = z ~ (z >> 31)
  return (z >> 11) * 2.0 ^ -53
end

-- the formula's a, b for parameter `name` of shape `shape` (see make_unet_ref.py)
local function coeffs(name, shape)
  if #shape >= 2 then
    if name == "label_emb.weight" then return 0.0, 1.0 end
    local fan_in = 1
    for d = 2, #shape do fan_in = fan_in * shape[d] end
    return 0.0, 1.0 / math.sqrt(fan_in)
  elseif name:sub(-5) == ".bias" then return 0.0, 0.1 end
  return 1.0, 0.1
end

local function formula_tensor(k, name, shape)
  local a, b = coeffs(name, shape)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  local v = {}
  for i = 0, n - 1 do v[i + 1] = a + b * (2.0 * hash_u(k, i) - 1.0) end
  return T.from_table(v, shape, "float32"), a, b
end

local function maxabs(t) return t:abs():max():item() end
-- ||a - b||_inf / max(||b||_inf, floor), in double
local function rel(a, b, floor)
  a, b = a:double(), b:double()
  return maxabs(a - b) / math.max(maxabs(b), floor or 1e-300)
end

local function shape_str(s) return "(" .. table.concat(s, ",") .. ")" end

local function run_config(cname)
  local cfg = configs[cname]
  local plist = json(meta["params." .. cname])
  local zero = {}
  for _, n in ipairs(json(meta["exact_zero." .. cname])) do zero[n] = true end
  local f32 = json(meta["f32_vs_f64." .. cname])
  print(("# %s: official float32 vs float64: out %.2g, grad_x %.2g, parameter grads %.2g, sums %.2g"):format(
    cname, f32.out, f32.grad_x, f32.param_grad, f32.param_stats))

  -- the official constructor takes attention downsample rates; ours takes resolutions
  local res = {}
  for i, ds in ipairs(cfg.attention_resolutions) do res[i] = cfg.image_size // ds end
  local unet = nn.unet{image_size = cfg.image_size, in_channels = cfg.in_channels, num_channels = cfg.model_channels,
    out_channels = cfg.out_channels, num_res_blocks = cfg.num_res_blocks, attention_resolutions = res,
    channel_mult = cfg.channel_mult, num_heads = cfg.num_heads, num_heads_upsample = cfg.num_heads_upsample,
    dropout = cfg.dropout, use_scale_shift_norm = cfg.use_scale_shift_norm, conv_resample = cfg.conv_resample,
    num_classes = cfg.num_classes}

  -- names, order and shapes are the official state dict's; weights from the formula
  local ours = unet:named_parameter_list()
  local bad
  if #ours ~= #plist then bad = ("%d parameters, official %d"):format(#ours, #plist) end
  local ab = {}
  T.no_grad(function()
    for k = 1, math.min(#ours, #plist) do
      local name, p = ours[k][1], ours[k][2]
      local oname, oshape = plist[k][1], plist[k][2]
      if not bad and (name ~= oname or shape_str(p:shape()) ~= shape_str(oshape)) then
        bad = ("#%d is %s %s, official %s %s"):format(k - 1, name, shape_str(p:shape()), oname, shape_str(oshape))
      end
      local w, a, b = formula_tensor(k - 1, oname, oshape)
      ab[k] = {a, b}
      if not bad and (a ~= plist[k][3] or b ~= plist[k][4]) then bad = oname .. ": formula coefficients differ" end
      if not bad then p:copy_(w) end
    end
  end)
  H.check(("%s: %d parameters with the official names, order and shapes"):format(cname, #plist), bad == nil, bad)
  if bad then return end
  -- the formula reproduces the script's float32 values bit for bit
  local probes, wrong = json(meta["weight_probe." .. cname]), nil
  for _, pr in ipairs(probes) do
    local k, i, want = pr[1], pr[2], pr[3]
    local got = ours[k + 1][2]:reshape{-1}:get(i + 1)
    if got ~= want and not wrong then wrong = ("param #%d element %d: %.9g vs %.9g"):format(k, i, got, want) end
  end
  H.check(("%s: formula weights bit-exact (%d probes)"):format(cname, #probes), wrong == nil, wrong)

  -- forward and gradients of sum(out * R)
  local x = sd[cname .. ".x"]:float()
  x.requires_grad = true
  local y = sd[cname .. ".y"]
  local out = unet(x, sd[cname .. ".t"]:float(), y)
  local e = rel(out, sd[cname .. ".out"])
  H.check(cname .. ": forward matches the official output", e < REF_TOL, ("rel err %.3g"):format(e))
  print(("# %s: forward rel err %.3g"):format(cname, e))
  ;(out:double() * sd[cname .. ".R"]):sum():backward()
  e = rel(x.grad, sd[cname .. ".grad_x"])
  H.check(cname .. ": gradient w.r.t. the input", e < REF_TOL, ("rel err %.3g"):format(e))
  print(("# %s: grad x rel err %.3g"):format(cname, e))

  -- the network's largest reference gradient (for the exact-zero floor)
  local gmax = 0
  for _, pl in ipairs(plist) do
    local full, st = sd[cname .. ".g." .. pl[1]], sd[cname .. ".g." .. pl[1] .. ".stats"]
    gmax = math.max(gmax, full and maxabs(full) or st:get(3))
  end
  local floor0 = ZERO_GRAD_FLOOR * gmax

  local worst, worst_at, nfull, nhead = 0, "", 0, 0
  local worst_s, worst_s_at = 0, ""
  local nzero = 0
  for k, pl in ipairs(plist) do
    local name = pl[1]
    local g = ours[k][2].grad
    local floor = zero[name] and floor0 or 1e-300
    if zero[name] then nzero = nzero + 1 end
    local full = sd[cname .. ".g." .. name]
    if g == nil then
      worst, worst_at = math.huge, name .. " (no gradient)"
    elseif full then
      nfull = nfull + 1
      local r = rel(g:reshape{-1}, full, floor)
      if not (r <= worst) then worst, worst_at = r, name end
    else
      nhead = nhead + 1
      local st = sd[cname .. ".g." .. name .. ".stats"]:totable()   -- sum g, sum g*c, max|g|, sum|g|
      local gt = g:reshape{-1}:totable()
      local head = sd[cname .. ".g." .. name .. ".head"]:totable()
      local d = 0
      for i = 1, HEAD do d = math.max(d, math.abs(gt[i] - head[i])) end
      local r = d / math.max(st[3], floor)
      if not (r <= worst) then worst, worst_at = r, name .. " (first 1024)" end
      local s, sc, mx = 0, 0, 0
      for i = 1, #gt do
        local v = gt[i]
        s = s + v
        sc = sc + v * math.cos(0.23 * (i - 1) + 0.5)
        mx = math.max(mx, math.abs(v))
      end
      local scale = math.max(st[4], #gt * floor)   -- a sum's error scales with sum|g|
      for _, c in ipairs({{math.abs(s - st[1]) / scale, "sum g"}, {math.abs(sc - st[2]) / scale, "sum g*c"},
                          {math.abs(mx - st[3]) / math.max(st[3], floor), "max|g|"}}) do
        if not (c[1] <= worst_s) then worst_s, worst_s_at = c[1], name .. " " .. c[2] end
      end
    end
  end
  H.check(("%s: every parameter gradient (%d whole, %d first-1024; %d exact zeros on the floor)"):format(
    cname, nfull, nhead, nzero), worst < REF_TOL, ("worst %.3g at %s"):format(worst, worst_at))
  print(("# %s: worst parameter-gradient rel err %.3g at %s"):format(cname, worst, worst_at))
  H.check(("%s: sum, weighted sum and max of the %d large gradients"):format(cname, nhead), worst_s < REF_TOL,
    ("worst %.3g at %s"):format(worst_s, worst_s_at))
  print(("# %s: worst fingerprint rel err %.3g at %s"):format(cname, worst_s, worst_s_at))
end

for _, cname in ipairs({"cond", "plain", "gray28"}) do
  H.check("reference holds config " .. cname, configs[cname] ~= nil)
  if configs[cname] then run_config(cname) end
  collectgarbage()
end
H.done()
