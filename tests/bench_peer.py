#!/usr/bin/python3
# tests/bench_peer.py — the official improved-diffusion code's side of `make bench`.
#
# Runs the same steps as tests/bench.lua with the official UNetModel and
# GaussianDiffusion.training_losses (hybrid loss) + torch AdamW, 2 threads.
# The path of a local copy of the official code comes in IDDPM_PEER; nothing is fetched.
#
#   bench_peer.py serve CMD_FIFO REPLY_FIFO   read "ROW" lines, run one step of that row,
#                                             answer the seconds it took ("quit" ends)
#   bench_peer.py mem ROW [STEPS]             run STEPS training steps, print VmHWM (kB)
#
# ROW is one of cifar_train, cifar_sample, small_train, small_sample (see CONFIGS);
# bench.lua keeps the same table.
import os
import sys
import time

os.environ.setdefault("OMP_PROC_BIND", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.environ["IDDPM_PEER"])

import torch as th  # noqa: E402
from improved_diffusion.unet import UNetModel  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

th.set_num_threads(2)

# image, channels, mult, res blocks, attention (resolutions), heads, dropout, diffusion steps, batch
CONFIGS = {
    "cifar": dict(image=32, in_ch=3, ch=128, mult=(1, 2, 2, 2), res=3, attn=(16, 8), heads=4, dropout=0.3, steps=4000),
    "small": dict(image=32, in_ch=1, ch=32, mult=(1, 2, 2), res=1, attn=(16,), heads=4, dropout=0.0, steps=1000),
}
BATCH = {"cifar_train": 8, "cifar_sample": 64, "small_train": 128, "small_sample": 64}


def build(name):
    c = CONFIGS[name]
    th.manual_seed(0)
    model = UNetModel(
        in_channels=c["in_ch"], model_channels=c["ch"], out_channels=2 * c["in_ch"],
        num_res_blocks=c["res"], attention_resolutions=tuple(c["image"] // r for r in c["attn"]),
        dropout=c["dropout"], channel_mult=c["mult"], num_heads=c["heads"],
        use_scale_shift_norm=True)
    diff = create_gaussian_diffusion(steps=c["steps"], learn_sigma=True, noise_schedule="cosine",
                                     rescale_timesteps=True, rescale_learned_sigmas=True)
    opt = th.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    return c, model, diff, opt


_cache = {}


def step_fn(row):
    if row in _cache:
        return _cache[row]
    cfg_name, kind = row.split("_")
    c, model, diff, opt = build(cfg_name)
    b = BATCH[row]
    g = th.Generator().manual_seed(1)
    x = th.rand(b, c["in_ch"], c["image"], c["image"], generator=g) * 2 - 1
    if kind == "train":
        model.train()

        def f():
            t = th.randint(0, diff.num_timesteps, (b,), generator=g)
            opt.zero_grad()
            loss = diff.training_losses(model, x, t)["loss"].mean()
            loss.backward()
            opt.step()
    else:
        model.eval()
        tt = th.randint(0, 1000, (b,), generator=g).float()

        def f():
            with th.no_grad():
                model(x, tt)
    _cache[row] = f
    return f


def vmhwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def main():
    if sys.argv[1] == "serve":
        cmd = open(sys.argv[2], "r")
        reply = open(sys.argv[3], "w")
        for line in cmd:
            row = line.strip()
            if row == "quit" or not row:
                break
            f = step_fn(row)
            t0 = time.perf_counter()
            f()
            reply.write("%.6f\n" % (time.perf_counter() - t0))
            reply.flush()
    elif sys.argv[1] == "mem":
        f = step_fn(sys.argv[2])
        for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
            f()
        print(vmhwm())
    else:
        sys.exit("usage: bench_peer.py serve CMD_FIFO REPLY_FIFO | mem ROW [STEPS]")


if __name__ == "__main__":
    main()
