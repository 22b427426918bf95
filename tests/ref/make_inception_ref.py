"""Reference for tests/lua/test_metrics.lua: the FID Inception (torchvision Inception3
blocks, FID configuration, fid_inception.py) with seed-regenerable random weights, run in
float64 on a few uint8 images; writes tests/ref/inception_ref.safetensors.

The weights (~24M values, 95 MB) are NOT stored: every tensor is filled with
  lo + (hi-lo) * u_i,  u_i = top 24 bits of splitmix64(fnv1a64(name) + (i+1)*0x9E3779B97F4A7C15) / 2^24
rounded to float32, which the engine reproduces bit for bit (M.hash_uniform,
engine/metrics/fid.c). Ranges: conv weights +-sqrt(6/fan_in) (He uniform), BN weight and
running_var in [0.8, 1.2], BN bias and running_mean in [-0.1, 0.1].
Also dumps small resize and pooling checks against PyTorch's own ops.

Run: /usr/bin/python3 tests/ref/make_inception_ref.py   (python3-torch, python3-torchvision)"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_write  # noqa: E402
from fid_inception import fid_inception, pool3_features, tf1_resize  # noqa: E402

M64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for c in s.encode():
        h = ((h ^ c) * 0x100000001B3) & M64
    return h


def hash_uniform(shape, name, lo, hi):
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        z = np.uint64(fnv1a64(name)) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / 16777216.0
    return (lo + (hi - lo) * u).astype(np.float32).reshape(shape)


def ranges(name, shape):
    if name.endswith("conv.weight"):
        a = float(np.sqrt(6.0 / np.prod(shape[1:])))
        return -a, a
    if name.endswith("bn.weight") or name.endswith("running_var"):
        return 0.8, 1.2
    return -0.1, 0.1


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "inception_ref.safetensors")
    torch.manual_seed(0)
    net = fid_inception()
    sd = net.state_dict()
    for name, t in sd.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        lo, hi = ranges(name, tuple(t.shape))
        t.copy_(torch.from_numpy(hash_uniform(tuple(t.shape), name, lo, hi)))
    net = net.double()
    images = torch.from_numpy(hash_uniform((2, 3, 32, 32), "images", 0, 256).astype(np.uint8))
    images64 = torch.from_numpy(hash_uniform((1, 3, 64, 48), "images64", 0, 256).astype(np.uint8))
    with torch.no_grad():
        feats = pool3_features(net, images).numpy()
        feats64 = pool3_features(net, images64).numpy()
    # small op checks against PyTorch itself
    x = torch.from_numpy(hash_uniform((2, 3, 5, 7), "resize_in", -1, 1)).double()
    arrays = {
        "images": images.numpy(), "features": feats, "images64": images64.numpy(), "features64": feats64,
        "resize_in": x.float().numpy(),
        "resize_tf1": tf1_resize(x, 11).float().numpy(),   # square output, as the model does
        "resize_half_pixel": F.interpolate(x, size=(9, 13), mode="bilinear", align_corners=False).float().numpy(),
        "maxpool_3_2_0": F.max_pool2d(x, 3, 2, 0).float().numpy(),
        "maxpool_3_1_1": F.max_pool2d(x, 3, 1, 1).float().numpy(),
        "avgpool_3_1_1_excl": F.avg_pool2d(x, 3, 1, 1, count_include_pad=False).float().numpy(),
        "avgpool_3_1_1_incl": F.avg_pool2d(x, 3, 1, 1, count_include_pad=True).float().numpy(),
    }
    st_write.save(out, arrays, {"generator": "tests/ref/make_inception_ref.py", "torch": torch.__version__})
    print("wrote", out, "features max |f| = %.4g, mean = %.4g" % (np.abs(feats).max(), feats.mean()))


if __name__ == "__main__":
    main()
