#!/usr/bin/python3
"""make_unet_sample_ref.py — whole sampling loops of a real (small) official UNet.

Builds the official improved-diffusion UNetModel(in 3, model_channels 32, out 6,
num_res_blocks 1, attention at ds 2 (our attention_resolutions {4} at 8x8),
channel_mult (1,2), num_heads 4, num_classes 3, use_scale_shift_norm) at 8x8, with
every parameter perturbed by N(0, 0.05^2) away from its (partly zero) init, and runs
with fixed x_T, labels and per-step noise (cosine T=100, learned-range sigma,
rescaled timesteps):
  - p_sample_loop respaced to "10"
  - ddim_sample_loop respaced to "ddim10", eta 0 and eta 1
each twice: as the official code runs (float32), and in float64 (model.double(), with
GroupNorm32, timestep_embedding and _extract_into_tensor patched to keep float64;
attention's softmax stays float32 as in the original). The float64 run is the
reference; float32 is stored to show how far the official float32 is from it.

Writes tests/ref/unet_sample_ref.safetensors (json+struct+numpy writer from
convert_official.py): param.<official name>, fwd.x/fwd.t/fwd.y/fwd.out (one forward
in float32), x_T, y, noise.p (10,B,C,H,W: noise drawn at loop step i), noise.ddim,
timestep_map.p, timestep_map.ddim, and out.<loop>.f64 / out.<loop>.f32 for loop in
p, ddim_eta0, ddim_eta1; __metadata__ {unet, diffusion} configs as JSON.

The official code comes from a local copy of github.com/openai/improved-diffusion,
extracted at run time (never committed here): $IMPROVED_DIFFUSION (a checkout or a
bare git dir; see official_src.py).
"""
import json, os, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_src  # noqa: E402

official_src.add_to_path()
sys.path.insert(0, here)

import numpy as np
import torch as th
import torch.nn.functional as F
from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion import nn as idnn
from improved_diffusion import unet as idunet
from improved_diffusion.script_util import create_gaussian_diffusion
from convert_official import write_safetensors

th.manual_seed(0)
IMG, B = 8, 2
UNET = dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
            dropout=0.0, channel_mult=(1, 2), num_classes=3, num_heads=4, use_scale_shift_norm=True)
DIFF = dict(steps=100, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True,
            rescale_learned_sigmas=True)
SHAPE = (B, 3, IMG, IMG)

model = idunet.UNetModel(**UNET)
with th.no_grad():
    for p in model.parameters():
        p.add_(th.randn_like(p) * 0.05)
model.eval()

g = th.Generator().manual_seed(7)
y = th.tensor([2, 0], dtype=th.int64)
x_T = th.randn(SHAPE, generator=g)
noise = {"p": [th.randn(SHAPE, generator=g) for _ in range(10)],
         "ddim": [th.randn(SHAPE, generator=g) for _ in range(10)]}
fx = th.randn(SHAPE, generator=g)
ft = th.tensor([3.5, 812.25])
with th.no_grad():
    fout = model(fx, ft, y=y)

orig_extract, orig_gn, orig_emb = gd._extract_into_tensor, idnn.GroupNorm32.forward, idunet.timestep_embedding


def extract64(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].double()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def set_f64(on):
    if on:
        gd._extract_into_tensor = extract64
        idnn.GroupNorm32.forward = lambda self, x: F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        idunet.timestep_embedding = lambda t, dim, max_period=10000: orig_emb(t, dim, max_period).double()
    else:
        gd._extract_into_tensor, idnn.GroupNorm32.forward, idunet.timestep_embedding = orig_extract, orig_gn, orig_emb


def run(diff, loop, noises, f64, **kw):
    set_f64(f64)
    m = model.double() if f64 else model.float()
    dt = th.float64 if f64 else th.float32
    it = iter(noises)   # the loops draw randn_like once per step, from t = T-1 down
    orig = th.randn_like
    th.randn_like = lambda x, *a, **k: next(it).to(x.dtype)
    try:
        with th.no_grad():
            out = loop(m, SHAPE, noise=x_T.to(dt), clip_denoised=True, model_kwargs={"y": y}, **kw)
    finally:
        th.randn_like = orig
        set_f64(False)
        model.float()
    return out.double().numpy()


diff_p = create_gaussian_diffusion(timestep_respacing="10", **DIFF)
diff_d = create_gaussian_diffusion(timestep_respacing="ddim10", **DIFF)
T = {"param." + k: v.detach().numpy().astype("<f4") for k, v in model.state_dict().items()}
T.update({"fwd.x": fx.numpy(), "fwd.t": ft.numpy(), "fwd.y": y.numpy().astype("<i8"), "fwd.out": fout.numpy(),
          "x_T": x_T.numpy(), "y": y.numpy().astype("<i8"),
          "noise.p": th.stack(noise["p"]).numpy(), "noise.ddim": th.stack(noise["ddim"]).numpy(),
          "timestep_map.p": np.array(diff_p.timestep_map, dtype="<i8"),
          "timestep_map.ddim": np.array(diff_d.timestep_map, dtype="<i8")})
worst = {}
for name, diff, loop, kw, nz in [("p", diff_p, "p_sample_loop", {}, noise["p"]),
                                 ("ddim_eta0", diff_d, "ddim_sample_loop", {"eta": 0.0}, noise["ddim"]),
                                 ("ddim_eta1", diff_d, "ddim_sample_loop", {"eta": 1.0}, noise["ddim"])]:
    o64 = run(diff, getattr(diff, loop), nz, True, **kw)
    o32 = run(diff, getattr(diff, loop), nz, False, **kw)
    T[f"out.{name}.f64"] = o64
    T[f"out.{name}.f32"] = o32.astype("<f4")
    worst[name] = float(np.abs(o64 - o32).max())
meta = {"source": "github.com/openai/improved-diffusion", "generator": "tests/ref/make_unet_sample_ref.py",
        "torch": th.__version__, "image_size": str(IMG),
        "unet": json.dumps(dict(UNET, attention_resolutions=list(UNET["attention_resolutions"]),
                                channel_mult=list(UNET["channel_mult"]))),
        "diffusion": json.dumps(DIFF), "f32_vs_f64_max_abs": json.dumps(worst)}
path = os.path.join(here, "unet_sample_ref.safetensors")
write_safetensors(path, T, meta)
print("wrote", path, "official f32 vs f64 max abs:", worst)
