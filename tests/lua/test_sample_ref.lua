-- test_sample_ref.lua — whole sampling loops of a real UNet against the official
-- improved-diffusion (tests/ref/unet_sample_ref.safetensors, made by
-- tests/ref/make_unet_sample_ref.py): an 8x8 class-conditional UNet perturbed away from
-- its zero init, cosine T=100, learned-range sigma; p_sample_loop respaced to "10" and
-- DDIM ("ddim10", eta 0 and 1) from fixed x_T, labels and per-step noise. Also checks
-- tools/convert_official.py: a torch .pt of the same weights, converted, loads
-- into iddpm.sample and gives the official forward.
local H = require "harness"
local iddpm = require "iddpm"
local T, D = iddpm.tensor, iddpm.diffusion
local S = require "iddpm.sample"

-- Ten float32 steps of a float32 UNet (forward ~1e-6 relative to the official) against
-- the official run in float64: x_t rounding is amplified by sqrt(1/abar_t) in
-- pred_xstart at the noisiest steps, then damped by clipping; the official float32 run
-- itself is ~3e-6 from float64. 1e-4 absolute on images in [-1,1] is the brief's bound.
local TOL_LOOP = 1e-4
local TOL_FWD = 1e-4   -- one UNet forward, absolute, outputs O(1)

local R, meta = T.load("tests/ref/unet_sample_ref.safetensors")
local uc = iddpm.io.json_decode(meta.unet)
local dc = iddpm.io.json_decode(meta.diffusion)
local img = tonumber(meta.image_size)
-- the official constructor takes attention ds values; ours takes resolutions
local attn = {}
for i, ds in ipairs(uc.attention_resolutions) do attn[i] = img // ds end
local cfg = {image_size = img, in_channels = uc.in_channels, num_channels = uc.model_channels,
  num_res_blocks = uc.num_res_blocks, channel_mult = uc.channel_mult, attention_resolutions = attn,
  num_heads = uc.num_heads, dropout = uc.dropout, learn_sigma = true, num_classes = uc.num_classes,
  use_scale_shift_norm = uc.use_scale_shift_norm}
local unet = iddpm.nn.unet(cfg)
unet:load_state_dict(R, {prefix = "param.", strict = false})
unet:eval()

local function max_abs(a, b)
  local d = (a:double() - b:double()):abs():max():item()
  return d
end

local fo = T.no_grad(function() return unet(R["fwd.x"], R["fwd.t"], R["fwd.y"]) end)
local e = max_abs(fo, R["fwd.out"])
H.check(("unet forward vs official (max abs %.2e)"):format(e), e < TOL_FWD)

local shape = R.x_T:shape()
local function noises(key)
  local all, K = R[key], R[key]:size(1)
  return function(t) return all:narrow(1, K - t, 1):reshape(shape) end   -- t = K-1 first
end
local worst = {}
for _, case in ipairs{{"p", "10", "p_sample_loop", nil, "noise.p"},
                      {"ddim_eta0", "ddim10", "ddim_sample_loop", 0, "noise.ddim"},
                      {"ddim_eta1", "ddim10", "ddim_sample_loop", 1, "noise.ddim"}} do
  local name, resp, loop, eta, nkey = table.unpack(case)
  local diff = D.new{steps = dc.steps, noise_schedule = dc.noise_schedule, learn_sigma = true,
    rescale_timesteps = dc.rescale_timesteps, rescale_learned_sigmas = dc.rescale_learned_sigmas,
    timestep_respacing = resp}
  H.close("timestep_map " .. resp, diff.timestep_map, R["timestep_map." .. (name == "p" and "p" or "ddim")]:totable(), 0, 1)
  local out = diff[loop](diff, unet, shape, {noise = R.x_T, y = R.y, step_noise = noises(nkey),
    clip_denoised = true, eta = eta})
  local e64 = max_abs(out, R["out." .. name .. ".f64"])
  local e32 = max_abs(out, R["out." .. name .. ".f32"])
  worst[#worst + 1] = ("%s %.2e (vs official f32 %.2e)"):format(name, e64, e32)
  H.check(("%s (%s) vs official float64: max abs %.2e"):format(loop, name, e64), e64 < TOL_LOOP)
end
print("# worst abs err vs official: " .. table.concat(worst, ", "))

-- the converter: .pt written by torch from the same weights -> our checkpoint
local py = io.popen("/usr/bin/python3 -c 'import torch, numpy' 2>/dev/null && echo yes"):read("a")
if not py:find("yes") then
  print("ok - # SKIP convert_official.py: /usr/bin/python3 with torch and numpy not found")
else
  local dir = os.tmpname(); os.remove(dir); os.execute("mkdir -p " .. dir)
  local cmd = ([==[/usr/bin/python3 - <<'PY'
import sys, collections, torch
sys.path.insert(0, "tools")
from convert_official import *
import json, struct, numpy as np
raw = open("tests/ref/unet_sample_ref.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]; h = json.loads(raw[8:8+n]); data = raw[8+n:]
sd = collections.OrderedDict()
for k, v in h.items():
    if k.startswith("param."):
        b, e = v["data_offsets"]
        sd[k[6:]] = torch.from_numpy(np.frombuffer(data[b:e], dtype="<f4").reshape(v["shape"]).copy())
torch.save(sd, "%s/model.pt")
PY
/usr/bin/python3 tools/convert_official.py %s/model.pt %s/conv.safetensors --image_size 8 --num_channels 32 \
  --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 --learn_sigma True --class_cond True \
  --num_classes 3 --diffusion_steps 100 --noise_schedule cosine >/dev/null]==]):format(dir, dir, dir)
  local ok = os.execute(cmd)
  H.check("convert_official.py runs", ok)
  if ok then
    local m, diff, info = S.load(dir .. "/conv.safetensors", {steps = "10"})
    H.check("converted checkpoint: EMA weights, rate 0.9999", info.weights == "ema_0.9999")
    local co = T.no_grad(function() return m(R["fwd.x"], R["fwd.t"], R["fwd.y"]) end)
    local ec = max_abs(co, R["fwd.out"])
    H.check(("converted .pt forward vs official (max abs %.2e)"):format(ec), ec < TOL_FWD)
    H.check("converted config: T=100 cosine respaced to 10", diff.original_num_steps == 100 and diff.num_timesteps == 10)
  end
  os.execute("rm -rf " .. dir)
end
H.done()
