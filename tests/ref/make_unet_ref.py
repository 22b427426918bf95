#!/usr/bin/python3
"""make_unet_ref.py — more official UNetModel configurations, with formula weights.

For each configuration below, builds the official improved-diffusion UNetModel and sets
EVERY parameter from a formula (so nothing is zero-initialised and no weights need to be
stored): element i (row-major, 0-based) of the k-th parameter in state-dict order
(0-based) is

    float32(a_k + b_k * (2 u(k, i) - 1)),   u(k, i) = splitmix64(k * 2^32 + i) >> 11, times 2^-53

(splitmix64 as in Vigna's reference: wrapping 64-bit integer arithmetic, so Lua 5.4's
integers give the same bits; u is exact in double, so is a + b*(2u - 1) up to one
rounding), with

    conv / linear weight (ndim >= 2):  a = 0, b = 1 / sqrt(fan_in)   fan_in = numel / shape[0]
    label_emb.weight (embedding):      a = 0, b = 1
    bias (1-D, name ends in .bias):    a = 0, b = 0.1
    norm weight (other 1-D):           a = 1, b = 0.1

A hash, not a smooth formula such as sin(0.37 i + 1.3 k): a smooth sequence makes
neighbouring output channels of a conv nearly identical (the phase advances by almost a
multiple of 2 pi per row), the GroupNorms then cancel most of the signal, and the
gradients of the inner blocks come out ~1e-10 of the largest one, below what float32 can
resolve. The hash gives weights like PyTorch's default uniform init.

conv_resample=False needs one patch of an official bug (see avg_pool_fixed below).

tests/lua/test_unet_configs.lua recomputes the same numbers (double, then cast through a
float32 tensor). The (name, a, b) list is stored in the metadata so the test can also
check that our parameter order and names are the official ones.

The model runs twice on fixed inputs x, t (and labels y for the class-conditional one):
as the official code runs (float32) and in float64 (model.double(), GroupNorm32 patched
not to cast to float32). The float64 run is the reference. In both runs the sinusoidal
timestep embedding is the official float32 one (it is part of the official model's
definition, and our engine computes it in float32 too), and the attention softmax keeps
its official float32 cast (a ~6e-8 relative rounding, far below the tests' 1e-4).

Stored per configuration <c> (float64 unless said):
  <c>.x, <c>.t, <c>.y (int64, conditional configs only), <c>.R (the fixed weight of the
  loss L = sum(out * R)), <c>.out (forward), <c>.grad_x (dL/dx), and for every parameter
  <name> of the model, under <c>.g.<name>:
    numel <= 2048: the whole gradient (<c>.g.<name>, flat)
    otherwise:     <c>.g.<name>.head = its first 1024 elements (rounded to float32 to halve
                   the file: a 6e-8 relative rounding of the float64 result), and
                   <c>.g.<name>.stats = [sum g, sum g*c, max|g|, sum|g|]
                   with c_i = cos(0.23 * i + 0.5) (0-based i, math.cos)
  <c>.f32.out, <c>.f32.grad_x: the official float32 results (float32), to show how far
  the official float32 model itself is from the reference.
__metadata__: configs (JSON: name -> official constructor kwargs + image_size + batch),
  params.<c> (JSON list of [name, shape, a, b] in state-dict order),
  weight_probe.<c> (JSON [k, i, float32 value] samples of the formula, checked bit-exactly),
  exact_zero.<c> (JSON list of parameters whose float64 gradient is zero up to rounding,
  max|g| < 1e-10 * the largest gradient in the network), f32_vs_f64.<c> (the official
  float32 run's errors measured the way the Lua test measures ours).

The official code comes from a local copy of github.com/openai/improved-diffusion,
extracted at run time into a temp dir (never committed here): $IMPROVED_DIFFUSION
(a checkout or a bare git dir; see official_src.py).
Needs Debian's python3-torch and python3-numpy. Run: /usr/bin/python3 tests/ref/make_unet_ref.py
"""
import json, math, os, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import official_src  # noqa: E402

official_src.add_to_path()

import numpy as np
import torch as th
import torch.nn.functional as F
from improved_diffusion import nn as idnn
from improved_diffusion import unet as idunet
from convert_official import write_safetensors

FULL_MAX, HEAD = 2048, 1024
EXACT_ZERO_REL = 1e-10

CONFIGS = {
    # class-conditional, 3 res blocks, the CIFAR-10 channel_mult, attention at two levels,
    # learned sigma, scale-shift norm
    "cond": dict(image_size=16, batch=2, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=3,
                 attention_resolutions=(2, 4), dropout=0.0, channel_mult=(1, 2, 2, 2), conv_resample=True,
                 num_classes=10, num_heads=4, use_scale_shift_norm=True),
    # unconditional, additive timestep embedding (no scale-shift), one head, attention at
    # full resolution, avg-pool downsampling and plain nearest upsampling (conv_resample False)
    "plain": dict(image_size=16, batch=2, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
                  attention_resolutions=(1, 2), dropout=0.0, channel_mult=(1, 2), conv_resample=False,
                  num_classes=None, num_heads=1, use_scale_shift_norm=False),
    # grayscale 28x28 (odd 7x7 bottom), channel_mult (1,2,3): 96 channels = 3 per group,
    # num_heads_upsample differs from num_heads, learned sigma
    "gray28": dict(image_size=28, batch=2, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                   attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2, 3), conv_resample=True,
                   num_classes=None, num_heads=2, num_heads_upsample=4, use_scale_shift_norm=True),
}


M64 = (1 << 64) - 1


def hash_u(k, n):
    """u(k, i) for i = 0..n-1: splitmix64(k * 2^32 + i), top 53 bits, in [0, 1)."""
    z = (np.uint64(k) << np.uint64(32)) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def formula(k, name, shape):
    n = int(np.prod(shape))
    if len(shape) >= 2:
        a, b = (0.0, 1.0) if name == "label_emb.weight" else (0.0, 1.0 / math.sqrt(n // shape[0]))
    elif name.endswith(".bias"):
        a, b = 0.0, 0.1
    else:
        a, b = 1.0, 0.1
    v = a + b * (2.0 * hash_u(k, n) - 1.0)
    return a, b, v.astype(np.float32).reshape(shape)


# The official Downsample with use_conv=False (conv_resample=False) calls avg_pool_nd(stride),
# which passes the stride as `dims` and no kernel size, so the official constructor raises
# TypeError. The evident intent (and the later fix in openai/guided-diffusion) is a 2x2
# average pool with stride 2: patch the name the official unet module looks up, for
# exactly that call.
def avg_pool_fixed(stride, *args, **kwargs):
    assert stride == 2 and not args and not kwargs, "only the conv_resample=False Downsample call is patched"
    return th.nn.AvgPool2d(kernel_size=stride, stride=stride)


idunet.avg_pool_nd = avg_pool_fixed

orig_gn = idnn.GroupNorm32.forward
orig_emb = idunet.timestep_embedding


def set_f64(on):
    if on:
        idnn.GroupNorm32.forward = lambda self, x: F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        idunet.timestep_embedding = lambda t, dim, max_period=10000: orig_emb(t, dim, max_period).double()
    else:
        idnn.GroupNorm32.forward, idunet.timestep_embedding = orig_gn, orig_emb


def run(model, x, t, y, R, f64):
    set_f64(f64)
    dt = th.float64 if f64 else th.float32
    m = model.double() if f64 else model.float()
    try:
        m.zero_grad()
        xx = x.to(dt).clone().requires_grad_(True)
        out = m(xx, t, y=y) if y is not None else m(xx, t)
        (out * R.to(dt)).sum().backward()
        grads = {k: p.grad.detach().double().numpy().copy() for k, p in m.named_parameters()}
    finally:
        set_f64(False)
        model.float()
    return out.detach().double().numpy(), xx.grad.double().numpy(), grads


def cvec(n):
    return np.array([math.cos(0.23 * i + 0.5) for i in range(n)], dtype=np.float64)


def stats(g):
    g = g.reshape(-1)
    return np.array([g.sum(), (g * cvec(g.size)).sum(), np.abs(g).max(), np.abs(g).sum()], dtype=np.float64)


T, meta, cfg_json = {}, {"source": "github.com/openai/improved-diffusion", "torch": th.__version__,
                          "generator": "tests/ref/make_unet_ref.py"}, {}
for ci, (cname, cfg) in enumerate(CONFIGS.items()):
    kw = {k: v for k, v in cfg.items() if k not in ("image_size", "batch")}
    model = idunet.UNetModel(**kw)
    plist, probes = [], []
    with th.no_grad():
        for k, (name, p) in enumerate(model.state_dict().items()):
            a, b, v = formula(k, name, tuple(p.shape))
            p.copy_(th.from_numpy(v))
            plist.append([name, list(p.shape), a, b])
            if k % 37 == 0 or name == "label_emb.weight":   # a few exact values for the test
                for i in (0, v.size // 2, v.size - 1):
                    probes.append([k, i, float(v.reshape(-1)[i])])
    assert [n for n, _ in model.named_parameters()] == [p[0] for p in plist], "state dict holds non-parameters"
    model.eval()
    g = th.Generator().manual_seed(100 + ci)
    B, S = cfg["batch"], cfg["image_size"]
    x = th.randn((B, cfg["in_channels"], S, S), generator=g, dtype=th.float64).float()
    t = th.tensor([3.5, 812.25][:B])
    y = th.tensor([7, 2][:B], dtype=th.int64) if cfg["num_classes"] else None
    R = th.randn((B, cfg["out_channels"], S, S), generator=g, dtype=th.float64)
    out64, gx64, g64 = run(model, x, t, y, R, True)
    out32, gx32, g32 = run(model, x, t, y, R, False)

    p = cname + "."
    T[p + "x"] = x.numpy()
    T[p + "t"] = t.double().numpy()
    if y is not None:
        T[p + "y"] = y.numpy().astype("<i8")
    T[p + "R"] = R.numpy()
    T[p + "out"] = out64
    T[p + "grad_x"] = gx64
    T[p + "f32.out"] = out32.astype("<f4")
    T[p + "f32.grad_x"] = gx32.astype("<f4")
    gmax = max(np.abs(v).max() for v in g64.values())
    zeros = [n for n, v in g64.items() if np.abs(v).max() < EXACT_ZERO_REL * gmax]
    for n, v in g64.items():
        if v.size <= FULL_MAX:
            T[p + "g." + n] = v.reshape(-1)
        else:
            T[p + "g." + n + ".head"] = v.reshape(-1)[:HEAD].astype("<f4")   # see the docstring
            T[p + "g." + n + ".stats"] = stats(v)

    # the official float32 run, measured like the Lua test measures ours
    def rel(a, b, floor=0.0):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), floor, 1e-300))
    floor = 1e-2 * gmax
    worst_g, worst_s = 0.0, 0.0
    for n, v in g64.items():
        w = g32[n]
        fl = floor if n in zeros else 0.0
        if v.size <= FULL_MAX:
            worst_g = max(worst_g, rel(w, v, fl))
        else:
            worst_g = max(worst_g, float(np.abs(w.reshape(-1)[:HEAD] - v.reshape(-1)[:HEAD]).max()
                                         / max(np.abs(v).max(), fl)))
            s64, s32 = stats(v), stats(w)
            scale = max(s64[3], v.size * fl)
            worst_s = max(worst_s, abs(s32[0] - s64[0]) / scale, abs(s32[1] - s64[1]) / scale,
                          abs(s32[2] - s64[2]) / max(s64[2], fl))
    f32err = {"out": rel(out32, out64), "grad_x": rel(gx32, gx64), "param_grad": worst_g, "param_stats": worst_s}
    meta["params." + cname] = json.dumps(plist)
    meta["exact_zero." + cname] = json.dumps(zeros)
    meta["weight_probe." + cname] = json.dumps(probes)
    meta["f32_vs_f64." + cname] = json.dumps(f32err)
    cfg_json[cname] = dict(cfg, attention_resolutions=list(cfg["attention_resolutions"]),
                           channel_mult=list(cfg["channel_mult"]))
    print(f"{cname}: {len(plist)} params, {sum(np.prod(s) for _, s, _, _ in plist)} weights, max|out| "
          f"{np.abs(out64).max():.4g}, max|grad| {gmax:.4g}, exact zeros {len(zeros)}, official f32 vs f64 {f32err}")
meta["configs"] = json.dumps(cfg_json)
path = os.path.join(here, "unet_configs_ref.safetensors")
write_safetensors(path, T, meta)
print("wrote", path, os.path.getsize(path), "bytes")
