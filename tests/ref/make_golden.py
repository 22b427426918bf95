#!/usr/bin/python3
"""make_golden.py — the diffusion-math reference tests/ref/golden_public.json, computed by
the official improved-diffusion code (gaussian_diffusion.py, respace.py, losses.py, nn.py).

Read by tests/c/test_diffusion.c and tests/lua/test_diffusion_golden.lua. Layout (every
array a flat row-major list of float64; its shape under "shapes"; "keys" one line per
entry; see meta.conventions in the output):
  schedules  cosine T=4000 (cosine_full), cosine T=1000 (cosine_small), linear T=1000
  respaced   cosine T=4000 respaced to "100" (even), "ddim50" (ddim), "10,20" (sections)
  inputs     x_start (uint8 grid k/127.5-1, holds -1 and +1), noise, model_output (eps then
             variance-interpolation values v in [-1.1, 1.1]), noise_sample
  ops        four diffusion setups x two timestep cases (t_edge = [0, T-1], t_mid = [1, a
             random step]): q_sample, the posterior, p_mean_variance with/without clipping,
             training_losses (mse, vb, loss), p_sample, DDIM eta 0 and eta 1, each as "f32"
             (the official code unchanged) and "f64" (float64 tensors, _extract_into_tensor
             patched to keep float64 coefficients: the exact reference)
  losses     normal_kl, normal_kl against N(0, 1), discretized_gaussian_log_likelihood
  timestep_embedding  nn.timestep_embedding for dims 32 and 33 (float32 in the official code)

Inputs: --inputs-from FILE takes every input (and the t_mid steps) from an existing golden
file and recomputes everything else. The committed tests/ref/golden_public.json was made
that way: its inputs are those of the first golden file computed with the official code
(seed 1234, by a generator not kept here), and this script reproduces every one of that
file's 402 arrays to a relative 6.2e-15 (--compare FILE reports the largest difference).
Without --inputs-from, the inputs are drawn from numpy's RandomState(SEED) and rounded to
float32 (so the f32 and f64 runs see the same numbers): a fresh file of the same layout.
To regenerate the committed file in place:
  IMPROVED_DIFFUSION=... /usr/bin/python3 tests/ref/make_golden.py \
      --inputs-from tests/ref/golden_public.json --compare tests/ref/golden_public.json

Needs Debian's python3-torch and python3-numpy, and the official code through
$IMPROVED_DIFFUSION (see official_src.py). Run:
  IMPROVED_DIFFUSION=/path/to/improved-diffusion /usr/bin/python3 tests/ref/make_golden.py [-o OUT]
"""
import argparse
import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import official_src  # noqa: E402

official_src.add_to_path()

import numpy as np  # noqa: E402
import torch as th  # noqa: E402
from improved_diffusion import gaussian_diffusion as gd  # noqa: E402
from improved_diffusion import losses as idl  # noqa: E402
from improved_diffusion import nn as idnn  # noqa: E402
from improved_diffusion.respace import space_timesteps  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

SEED = 1234
B, C, H, W = 2, 3, 8, 8
SHAPE = [B, C, H, W]
SCHED_FULL = ["betas_raw", "betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"]
SCHED_ARRAYS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"]
HYBRID = dict(learn_sigma=True, rescale_learned_sigmas=True, rescale_timesteps=True, loss_type="RESCALED_MSE",
              model_var_type="LEARNED_RANGE", model_mean_type="EPSILON")
OPS = [("cosine_small_hybrid", "cosine", 1000, ""), ("cifar_hybrid", "cosine", 4000, ""),
       ("linear_hybrid", "linear", 1000, ""), ("spaced_even", "cosine", 4000, "100")]
TEMB_T = [0.0, 1.0, 1.5, 250.0, 999.75]

CONVENTIONS = """* every array is a FLAT list (C/row-major order) of float64 numbers (ints for
    timestep indices); its shape is in top-level "shapes" under the dotted
    path of the array; "keys" is a human-readable listing "path shape note".
  * schedule arrays come from the diffusion object that
    script_util.create_gaussian_diffusion() returns (a SpacedDiffusion even
    without respacing, which RE-DERIVES betas as 1 - abar[i]/abar[i-1]; these
    differ from get_named_beta_schedule() by ~1e-16 relative, the latter is
    stored as 'betas_raw').
  * tensor ops are run twice with identical inputs (all inputs are exactly
    representable in float32):
      f32: the official code unchanged, float32 tensors (as in training);
           note gaussian_diffusion._extract_into_tensor casts the float64
           schedule coefficients to float32.
      f64: float64 tensors, with _extract_into_tensor patched to keep float64
           coefficients (the only change) => mathematically exact reference.
  * the "model" is a fake function returning the fixed model_output
    (eps = first C channels, variance-interpolation values v = last C
    channels, frac = (v+1)/2); it records the timesteps it was called with
    ('model_t': for SpacedDiffusion these are timestep_map[t]*1000/T_orig).
  * p_sample / ddim_sample draw noise with th.randn_like: it is patched to
    return inputs.noise_sample, so the samples are deterministic."""

NOTES = {
    "betas_raw": "get_named_beta_schedule() output",
    "use_timesteps": "sorted(space_timesteps(T, respacing))",
    "x_start": "uint8 grid k/127.5-1 rounded to f32; contains -1 and +1",
    "noise": "N(0,1), f32-exact",
    "model_output": "fake model output [B,2C,...]: eps then variance-interp values in [-1.1,1.1]",
    "noise_sample": "noise returned by patched th.randn_like in p_sample/ddim",
    "t": "timestep indices into this (possibly respaced) diffusion",
    "q_sample": "x_t = q_sample(x_start, t, noise)",
    "q_posterior_mean": "q_posterior_mean_variance(x_start, x_t, t)[0]",
    "q_posterior_variance": "per example ([1], broadcast)",
    "q_posterior_log_variance_clipped": "per example ([2], broadcast)",
    "p_mean_variance_clip": "p_mean_variance(model, x_t, t, clip_denoised=True)",
    "p_mean_variance_noclip": "p_mean_variance(model, x_t, t, clip_denoised=False)",
    "training_losses": "per example; vb already *= num_timesteps/1000 (RESCALED_MSE)",
    "p_sample": "clip_denoised=True, noise=noise_sample",
    "ddim_eta0": "ddim_sample(clip_denoised=True)",
    "ddim_eta1": "ddim_sample(clip_denoised=True, noise=noise_sample)",
    "model_t": "t as passed to the model (f32)",
    "normal_kl": "normal_kl(mean1, logvar1, mean2, logvar2), nats",
    "normal_kl_vs_std": "normal_kl(mean1, logvar1, 0.0, 0.0) (prior-style, scalar args)",
    "discretized_gaussian_log_likelihood": "log-prob in nats",
    "dim32": "nn.timestep_embedding(t, 32) (always f32 in the official code)",
    "dim33": "nn.timestep_embedding(t, 33) (always f32 in the official code)",
}


class Golden:
    """Collects values under dotted paths, with shapes and the "keys" listing."""

    def __init__(self):
        self.root, self.keys, self.shapes = {}, [], {}

    def _slot(self, path):
        d = self.root
        parts = path.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        return d, parts[-1]

    def scalar(self, path, value):
        d, k = self._slot(path)
        d[k] = value
        self.keys.append(f"{path} = {json.dumps(value)}")

    def array(self, path, a, kind="f64", note=None):
        a = np.asarray(a)
        d, k = self._slot(path)
        d[k] = [int(v) for v in a.reshape(-1)] if kind == "int" else [float(v) for v in a.reshape(-1).astype(np.float64)]
        self.shapes[path] = list(a.shape)
        if note is None:
            parts = path.split(".")
            note = next((NOTES[p] for p in reversed(parts) if p in NOTES and p not in ("f32", "f64")), "")
            if parts[0] == "schedules" and parts[-1] != "betas_raw" or parts[0] == "respaced" and parts[-1] != "use_timesteps":
                note = ""
            if parts[0] == "losses" and "inputs" in parts or parts[0] == "timestep_embedding" and parts[-1] == "t":
                note = ""
        self.keys.append(f"{path} {list(a.shape)} {kind}" + (f" {note}" if note else ""))


def f32(a):
    """Round to float32 and back: every input is float32-exact."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def uint8_grid(rng):
    k = rng.randint(0, 256, size=SHAPE)
    k.reshape(-1)[:2] = [0, 255]  # the grid's ends -1 and +1 are always present
    return f32(k / 127.5 - 1.0)


def make_inputs(rng):
    inp = {"x_start": uint8_grid(rng), "noise": f32(rng.randn(*SHAPE)),
           "model_output": f32(np.concatenate([rng.randn(*SHAPE), rng.uniform(-1.1, 1.1, SHAPE)], axis=1)),
           "noise_sample": f32(rng.randn(*SHAPE))}
    t_mid = {}
    for name, _, T, respacing in OPS:
        n = int(respacing) if respacing else T
        t_mid[name] = [1, int(rng.randint(2, n - 1))]
    losses = {"normal_kl": {"mean1": f32(rng.randn(*SHAPE)), "logvar1": f32(rng.uniform(-8, 1, SHAPE)),
                            "mean2": f32(rng.randn(*SHAPE)), "logvar2": f32(rng.uniform(-8, 1, SHAPE))},
              "discretized_gaussian_log_likelihood": {"x": uint8_grid(rng), "means": f32(rng.uniform(-1, 1, SHAPE)),
                                                      "log_scales": f32(rng.uniform(-7, 0, SHAPE))}}
    return inp, t_mid, losses


def inputs_from(path):
    G = json.load(open(path))
    sh = G["shapes"]

    def arr(dotted):
        d = G
        for p in dotted.split("."):
            d = d[p]
        return np.array(d, dtype=np.float64).reshape(sh[dotted])

    inp = {k: arr("inputs." + k) for k in ("x_start", "noise", "model_output", "noise_sample")}
    t_mid = {name: G["ops"][name]["cases"]["t_mid"]["t"] for name, _, _, _ in OPS}
    losses = {"normal_kl": {k: arr("losses.normal_kl.inputs." + k) for k in ("mean1", "logvar1", "mean2", "logvar2")},
              "discretized_gaussian_log_likelihood": {
                  k: arr("losses.discretized_gaussian_log_likelihood.inputs." + k) for k in ("x", "means", "log_scales")}}
    return inp, t_mid, losses


def diffusion(schedule, T, respacing):
    return create_gaussian_diffusion(steps=T, learn_sigma=True, sigma_small=False, noise_schedule=schedule,
                                     use_kl=False, predict_xstart=False, rescale_timesteps=True,
                                     rescale_learned_sigmas=True, timestep_respacing=respacing)


_orig_extract = gd._extract_into_tensor


def _extract_f64(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps]
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def run_ops(G, base, dif, t, inp, dtype):
    """Every tensor op of one setup and timestep case, in dtype (float32: unchanged official code)."""
    gd._extract_into_tensor = _extract_f64 if dtype == th.float64 else _orig_extract
    tt = th.tensor(t, dtype=th.int64)
    x0, noise = th.tensor(inp["x_start"], dtype=dtype), th.tensor(inp["noise"], dtype=dtype)
    mo, z = th.tensor(inp["model_output"], dtype=dtype), th.tensor(inp["noise_sample"], dtype=dtype)
    seen_t = []

    def model(x, ts, **kw):
        seen_t.append(ts.detach().clone())
        return mo.clone()

    orig_randn_like = th.randn_like
    th.randn_like = lambda x, *a, **k: z.clone().to(x.dtype)
    try:
        xt = dif.q_sample(x0, tt, noise=noise)
        G.array(f"{base}.q_sample", xt)
        pm, pv, plv = dif.q_posterior_mean_variance(x0, xt, tt)
        G.array(f"{base}.q_posterior_mean", pm)
        G.array(f"{base}.q_posterior_variance", pv[:, 0, 0, 0])
        G.array(f"{base}.q_posterior_log_variance_clipped", plv[:, 0, 0, 0])
        for clip, tag in ((True, "clip"), (False, "noclip")):
            out = dif.p_mean_variance(model, xt, tt, clip_denoised=clip)
            for k in ("mean", "variance", "log_variance", "pred_xstart"):
                G.array(f"{base}.p_mean_variance_{tag}.{k}", out[k].expand(xt.shape))
        model_t = seen_t[0]
        tl = dif.training_losses(model, x0, tt, noise=noise)
        for k in ("mse", "vb", "loss"):
            G.array(f"{base}.training_losses.{k}", tl[k])
        G.array(f"{base}.p_sample", dif.p_sample(model, xt, tt, clip_denoised=True)["sample"])
        G.array(f"{base}.ddim_eta0", dif.ddim_sample(model, xt, tt, clip_denoised=True, eta=0.0)["sample"])
        G.array(f"{base}.ddim_eta1", dif.ddim_sample(model, xt, tt, clip_denoised=True, eta=1.0)["sample"])
    finally:
        th.randn_like = orig_randn_like
        gd._extract_into_tensor = _orig_extract
    return model_t


def build(inp, t_mid, loss_in):
    G = Golden()
    for name, T, schedule in (("cosine_full", 4000, "cosine"), ("cosine_small", 1000, "cosine"),
                              ("linear", 1000, "linear")):
        dif = diffusion(schedule, T, "")
        G.scalar(f"schedules.{name}.spec", {"schedule": schedule, "T": T})
        G.scalar(f"schedules.{name}.num_timesteps", dif.num_timesteps)
        G.array(f"schedules.{name}.betas_raw", gd.get_named_beta_schedule(schedule, T))
        for k in (SCHED_FULL[1:] if name == "cosine_full" else SCHED_ARRAYS):
            G.array(f"schedules.{name}.{k}", getattr(dif, k))
    for name, respacing in (("even", "100"), ("ddim", "ddim50"), ("sections", "10,20")):
        dif = diffusion("cosine", 4000, respacing)
        G.scalar(f"respaced.{name}.spec", {"schedule": "cosine", "T": 4000, "timestep_respacing": respacing})
        G.array(f"respaced.{name}.use_timesteps", sorted(space_timesteps(4000, respacing)), "int")
        G.array(f"respaced.{name}.timestep_map", dif.timestep_map, "int")
        G.scalar(f"respaced.{name}.num_timesteps", dif.num_timesteps)
        for k in SCHED_ARRAYS:
            G.array(f"respaced.{name}.{k}", getattr(dif, k))
    for k in ("x_start", "noise", "model_output", "noise_sample"):
        G.array(f"inputs.{k}", inp[k])
    for name, schedule, T, respacing in OPS:
        dif = diffusion(schedule, T, respacing)
        G.scalar(f"ops.{name}.spec", dict({"schedule": schedule, "T": T, "timestep_respacing": respacing}, **HYBRID))
        G.scalar(f"ops.{name}.num_timesteps", dif.num_timesteps)
        for case, t in (("t_edge", [0, dif.num_timesteps - 1]), ("t_mid", t_mid[name])):
            base = f"ops.{name}.cases.{case}"
            G.array(f"{base}.t", t, "int")
            run_ops(G, f"{base}.f64", dif, t, inp, th.float64)
            model_t = run_ops(G, f"{base}.f32", dif, t, inp, th.float32)
            G.array(f"{base}.model_t", model_t)
    kl, dg = loss_in["normal_kl"], loss_in["discretized_gaussian_log_likelihood"]
    for k in ("mean1", "logvar1", "mean2", "logvar2"):
        G.array(f"losses.normal_kl.inputs.{k}", kl[k])
    for k in ("x", "means", "log_scales"):
        G.array(f"losses.discretized_gaussian_log_likelihood.inputs.{k}", dg[k])
    for tag, dtype in (("f64", th.float64), ("f32", th.float32)):
        T_ = {k: th.tensor(v, dtype=dtype) for k, v in kl.items()}
        G.array(f"losses.normal_kl.{tag}", idl.normal_kl(T_["mean1"], T_["logvar1"], T_["mean2"], T_["logvar2"]))
        G.array(f"losses.normal_kl_vs_std.{tag}", idl.normal_kl(T_["mean1"], T_["logvar1"], 0.0, 0.0))
        D_ = {k: th.tensor(v, dtype=dtype) for k, v in dg.items()}
        G.array(f"losses.discretized_gaussian_log_likelihood.{tag}",
                idl.discretized_gaussian_log_likelihood(D_["x"], means=D_["means"], log_scales=D_["log_scales"]))
    tt = th.tensor(TEMB_T, dtype=th.float32)
    G.array("timestep_embedding.t", tt)
    for d in (32, 33):
        G.array(f"timestep_embedding.dim{d}", idnn.timestep_embedding(tt, d))
    return G


def compare(G, ref_path):
    """Largest |a - b| / max(|b|, 1e-6) of every array in G against the file at ref_path."""
    R = json.load(open(ref_path))
    worst, where, count = 0.0, "", 0
    for path, shape in G.shapes.items():
        a, b = G.root, R
        for p in path.split("."):
            a, b = a[p], b[p]
        a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
        if a.shape != b.shape:
            sys.exit(f"compare: {path}: {a.shape} here vs {b.shape} in {ref_path}")
        both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
        err = np.where(both_inf, 0.0, np.abs(a - b) / np.maximum(np.abs(b), 1e-6))
        e = float(err.max()) if err.size else 0.0
        count += 1
        if e > worst:
            worst, where = e, path
    missing = sorted(set(R["shapes"]) - set(G.shapes))
    print(f"compare: {count} arrays, worst relative difference {worst:.3e} at {where}; "
          f"{len(missing)} arrays of {ref_path} not produced here {missing[:5]}")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default=os.path.join(here, "golden_public.json"))
    ap.add_argument("--inputs-from", help="take the inputs and t_mid steps from this golden file")
    ap.add_argument("--compare", help="report the largest difference against this golden file")
    a = ap.parse_args()
    th.set_num_threads(1)
    seed = SEED
    if a.inputs_from:
        inp, t_mid, loss_in = inputs_from(a.inputs_from)
        seed = json.load(open(a.inputs_from))["meta"].get("seed")
    else:
        inp, t_mid, loss_in = make_inputs(np.random.RandomState(SEED))
    G = build(inp, t_mid, loss_in)
    out = dict(G.root)
    out = {"meta": {"generator": "tests/ref/make_golden.py", "preset": "public",
                    "source": f"github.com/openai/improved-diffusion@{official_src.COMMIT}",
                    "torch": th.__version__.split("+")[0], "numpy": np.__version__,
                    "seed": seed, "shape": SHAPE, "conventions": CONVENTIONS},
           **out, "keys": G.keys, "shapes": G.shapes}
    if a.compare:
        compare(G, a.compare)
    with open(a.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {a.out}: {len(G.shapes)} arrays")


if __name__ == "__main__":
    main()
