#!/usr/bin/python3
"""make_unet_public.py — tests/ref/unet_public.safetensors: one official UNet, its forward
and backward, and one official training step, computed by the official improved-diffusion
code (float32, on the CPU, as the official code runs).

Read by tests/lua/test_unet_ref.lua (and its bf16 variant) and tests/c/test_io.c.
The model is UNetModel(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
attention_resolutions=(2,), dropout=0, channel_mult=(1,2), num_heads=4,
use_scale_shift_norm=True) at 16x16, every parameter perturbed by N(0, 0.05^2) away from
its (partly zero) init so that every layer matters. Tensors (all float32 but input.t):
  param.<official name>   the weights, under the official state-dict names
  input.x (2,3,16,16), input.t (int64 timesteps)
  fwd.out = model(x, t) with the raw timesteps; fwd.R a fixed random tensor;
  fwd.grad_x, fwd.grad.<name>   the gradients of sum(out * R)
  train.noise; train.loss, train.mse, train.vb (per example) of the hybrid objective
  (cosine, T=1000, learned-range sigma, rescaled timesteps: the model sees t*1000/T,
  training_losses(model, input.x, input.t, noise=train.noise));
  train.grad.<name>   the gradients of mean(loss)
  __metadata__: unet_config, diffusion (JSON) and a note.

Inputs (weights, x, t, R, noise): --inputs-from FILE takes them from an existing file of
this layout and recomputes every output. The committed file was made that way from the
first such file computed with the official code (by a generator not kept here); this
script reproduces each of its outputs (fwd.*, train.*) to float32 rounding (--compare FILE
prints the largest relative difference per group). Without --inputs-from, the inputs are
drawn with torch.manual_seed(SEED): a fresh file of the same layout.
To regenerate the committed file in place:
  IMPROVED_DIFFUSION=... /usr/bin/python3 tests/ref/make_unet_public.py \\
      --inputs-from tests/ref/unet_public.safetensors --compare tests/ref/unet_public.safetensors

Needs Debian's python3-torch and python3-numpy, and the official code through
$IMPROVED_DIFFUSION (see official_src.py).
"""
import argparse
import json
import os
import struct
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import official_src  # noqa: E402

official_src.add_to_path()

import numpy as np  # noqa: E402
import torch as th  # noqa: E402
from improved_diffusion import unet as idunet  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
import st_write  # noqa: E402

SEED = 0
PERTURB = 0.05   # std of the N(0, PERTURB^2) added to every parameter
UNET = dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=[2],
            dropout=0.0, channel_mult=[1, 2], num_classes=None, num_heads=4, use_scale_shift_norm=True)
IMAGE = 16
DIFFUSION = dict(steps=1000, noise_schedule="cosine", learn_sigma=True, rescale_timesteps=True,
                 rescale_learned_sigmas=True)
NOTE = "fwd.* uses raw timesteps t; train.* calls the model with t*1000/steps as the official code does; " \
       "train.grad is of mean(loss)"
_NP = {"F32": np.float32, "F64": np.float64, "I64": np.int64}


def read_st(path):
    """safetensors file -> ({name: numpy array}, metadata)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype=np.dtype(_NP[v["dtype"]]).newbyteorder("<")).reshape(v["shape"])
    return out, meta


def make_model(inputs):
    cfg = dict(UNET, attention_resolutions=tuple(UNET["attention_resolutions"]),
               channel_mult=tuple(UNET["channel_mult"]))
    model = idunet.UNetModel(**cfg)
    with th.no_grad():
        for name, p in model.state_dict().items():
            if inputs is not None:
                p.copy_(th.from_numpy(np.array(inputs["param." + name])))
            else:
                p.add_(th.randn_like(p) * PERTURB)
    return model


def build(inputs):
    th.manual_seed(SEED)
    model = make_model(inputs)
    if inputs is not None:
        x = th.from_numpy(np.array(inputs["input.x"]))
        t = th.from_numpy(np.array(inputs["input.t"]))
        R = th.from_numpy(np.array(inputs["fwd.R"]))
        noise = th.from_numpy(np.array(inputs["train.noise"]))
    else:
        x = th.randn(2, 3, IMAGE, IMAGE)
        t = th.tensor([17, 803], dtype=th.int64)
        R = th.randn(2, 6, IMAGE, IMAGE)
        noise = th.randn(2, 3, IMAGE, IMAGE)
    out = {"param." + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    out.update({"input.x": x.numpy(), "input.t": t.numpy(), "fwd.R": R.numpy(), "train.noise": noise.numpy()})

    xg = x.clone().requires_grad_(True)
    model.zero_grad()
    y = model(xg, t)
    (y * R).sum().backward()
    out["fwd.out"] = y.detach().numpy()
    out["fwd.grad_x"] = xg.grad.numpy()
    for k, p in model.named_parameters():
        out["fwd.grad." + k] = p.grad.detach().numpy().copy()

    diffusion = create_gaussian_diffusion(steps=DIFFUSION["steps"], learn_sigma=True, sigma_small=False,
                                          noise_schedule=DIFFUSION["noise_schedule"], use_kl=False,
                                          predict_xstart=False, rescale_timesteps=True,
                                          rescale_learned_sigmas=True, timestep_respacing="")
    model.zero_grad()
    terms = diffusion.training_losses(model, x, t, noise=noise)
    terms["loss"].mean().backward()
    for k in ("loss", "mse", "vb"):
        out["train." + k] = terms[k].detach().numpy()
    for k, p in model.named_parameters():
        out["train.grad." + k] = p.grad.detach().numpy().copy()
    return {k: np.ascontiguousarray(v.astype(np.int64 if k == "input.t" else np.float32)) for k, v in out.items()}


def compare(arrays, ref_path):
    ref, _ = read_st(ref_path)
    if set(ref) != set(arrays):
        sys.exit(f"compare: names differ: only here {sorted(set(arrays) - set(ref))[:5]}, "
                 f"only in {ref_path} {sorted(set(ref) - set(arrays))[:5]}")
    def group(k):
        return ".".join(k.split(".")[:2]) if k.startswith(("fwd.grad.", "train.grad.")) else k.split(".")[0]

    # A tensor is measured against max(its own largest |ref|, GROUP_FLOOR x the largest
    # in its group): some biases (those just before a GroupNorm) have gradients that are
    # zero up to float32 rounding, ~1e-6 of the group's largest, and differ from run to
    # run with the summation order (thread count, BLAS).
    GROUP_FLOOR = 1e-4
    scale = {}
    for k, b in ref.items():
        scale[group(k)] = max(scale.get(group(k), 0.0), float(np.abs(b.astype(np.float64)).max()))
    groups = {}
    for k, a in arrays.items():
        b = ref[k].astype(np.float64)
        if a.shape != b.shape:
            sys.exit(f"compare: {k}: shape {a.shape} here vs {b.shape} in {ref_path}")
        e = float(np.abs(a - b).max() / max(np.abs(b).max(), GROUP_FLOOR * scale[group(k)], 1e-30))
        if e >= groups.get(group(k), (-1, ""))[0]:
            groups[group(k)] = (e, k)
    for g, (e, k) in sorted(groups.items()):
        print(f"compare: {g:12s} worst max|diff| / max(max|ref|, {GROUP_FLOOR} x group max) {e:.3e} ({k})")
    return max(e for e, _ in groups.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default=os.path.join(here, "unet_public.safetensors"))
    ap.add_argument("--inputs-from", help="take weights, x, t, R and noise from this file")
    ap.add_argument("--compare", help="report the largest differences against this file")
    a = ap.parse_args()
    th.set_num_threads(1)
    inputs = read_st(a.inputs_from)[0] if a.inputs_from else None
    arrays = build(inputs)
    if a.compare:
        compare(arrays, a.compare)
    meta = {"unet_config": json.dumps(dict(UNET, image_size=IMAGE)), "diffusion": json.dumps(DIFFUSION),
            "note": NOTE}
    st_write.save(a.out, arrays, meta)
    print(f"wrote {a.out}: {len(arrays)} tensors")


if __name__ == "__main__":
    main()
