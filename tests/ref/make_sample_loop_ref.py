#!/usr/bin/python3
"""make_sample_loop_ref.py — a whole-loop reference from the official improved-diffusion.

Runs a respaced (cosine T=100 -> "10") p_sample_loop and DDIM loops (eta 0 and 1)
with learn_sigma (learned range), a fixed fake model and fixed noise, in float64
(_extract_into_tensor patched to keep float64 coefficients, as golden_public.json's
"f64"), and writes tests/ref/sample_loop_ref.json for tests/lua/test_sample_loop_ref.lua.

The official code is read from a local copy of github.com/openai/improved-diffusion
(never committed here): $IMPROVED_DIFFUSION (a checkout or a bare git dir; see
official_src.py). Needs Debian's python3-torch.

Fake model (x, t) -> cat([0.3 x + 0.001 t, tanh(x) * 0.5], channels): eps half
depends on x and on the timestep the model sees (map[t] * 1000 / T_original), and
the variance-interpolation half v on x.
"""
import json, os, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_src  # noqa: E402

official_src.add_to_path()

import numpy as np
import torch as th
from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.script_util import create_gaussian_diffusion


def extract64(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].double()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


gd._extract_into_tensor = extract64
SHAPE = (2, 3, 4, 4)
STEPS, RESPACING = 100, "10"


class Model(th.nn.Module):   # the loops ask the model for its device
    def __init__(self):
        super().__init__()
        self.dummy = th.nn.Parameter(th.zeros(1))

    def forward(self, x, t, **kw):
        eps = 0.3 * x + 0.001 * t.double()[:, None, None, None]
        return th.cat([eps, th.tanh(x) * 0.5], dim=1)


model = Model()


def flat(x):
    return [float(v) for v in x.detach().reshape(-1).tolist()]


diff = create_gaussian_diffusion(steps=STEPS, learn_sigma=True, noise_schedule="cosine",
                                 rescale_timesteps=True, rescale_learned_sigmas=True,
                                 timestep_respacing=RESPACING)
g = th.Generator().manual_seed(2024)
x_T = th.randn(SHAPE, generator=g, dtype=th.float64).float().double()   # float32-representable
steps = diff.num_timesteps
step_noise = [th.randn(SHAPE, generator=g, dtype=th.float64).float().double() for _ in range(steps)]


def run(loop, **kw):
    it = iter(step_noise)   # the loop draws randn_like once per step, from t = T-1 down
    orig = th.randn_like
    th.randn_like = lambda x, *a, **k: next(it).to(x.dtype)
    try:
        return loop(model, SHAPE, noise=x_T, clip_denoised=True, **kw)
    finally:
        th.randn_like = orig


out = {
    "meta": {"source": "github.com/openai/improved-diffusion", "generator": "tests/ref/make_sample_loop_ref.py",
             "torch": th.__version__, "steps": STEPS, "timestep_respacing": RESPACING, "shape": list(SHAPE),
             "schedule": "cosine", "learn_sigma": True, "dtype": "float64",
             "model": "cat([0.3 x + 0.001 t_model, 0.5 tanh(x)], dim=1)",
             "noise": "step_noise[i] is drawn at the i-th loop step (t = T-1-i)"},
    "x_T": flat(x_T),
    "step_noise": [flat(n) for n in step_noise],
    "timestep_map": [int(v) for v in diff.timestep_map],
    "p_sample_loop": flat(run(diff.p_sample_loop)),
    "ddim_eta0": flat(run(diff.ddim_sample_loop, eta=0.0)),
    "ddim_eta1": flat(run(diff.ddim_sample_loop, eta=1.0)),
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_loop_ref.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
