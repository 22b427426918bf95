#!/usr/bin/env python3
# tests/cuda/bench_peer_gpu.py — the official improved-diffusion code on the GPU, the
# peer of the GPU rows of `make bench` (tests/bench.lua, tests/cuda/bench_gpu.lua).
#
# CIFAR-10 config (128 channels, mult 1,2,2,2, 3 res blocks, attention at 16 and 8,
# 4 heads, dropout 0.3, learned sigmas, cosine schedule with 4000 steps). Modes:
#   eager     autocast bf16, the official UNetModel
#   compiled  autocast bf16, torch.compile(model) (default mode)
# Rows: train = GaussianDiffusion.training_losses (hybrid loss) + backward + AdamW
# (lr 1e-4) at batch 128; sample = one UNet forward without grad at batch 256.
# No EMA update in the peer's step (ours includes one: the comparison is conservative).
# Timing: CUDA-synchronised wall time of `iters` steps after `warmup` steps, best of
# `windows` windows. Memory: torch.cuda.max_memory_reserved / _allocated after the
# training steps of each mode (reset before it).
#
#   IDDPM_PEER=/path/to/improved-diffusion python3 bench_peer_gpu.py [modes=eager,compiled]
#        [rows=train,sample] [iters=10] [windows=3] [warmup=3]
# Prints one JSON object per line: {"mode", "row", "batch", "per_s", "ms", "mem_reserved",
# "mem_allocated", "device", "torch"}. The official code is used unchanged; its
# dist_util imports mpi4py, which is stubbed here if absent (nothing here uses MPI).
import json
import os
import sys
import time
import types

if "mpi4py" not in sys.modules:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        stub = types.ModuleType("mpi4py")
        stub.MPI = types.SimpleNamespace(COMM_WORLD=types.SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 1))
        sys.modules["mpi4py"] = stub
        sys.modules["mpi4py.MPI"] = stub.MPI

sys.path.insert(0, os.environ["IDDPM_PEER"])

import torch as th  # noqa: E402
from improved_diffusion.unet import UNetModel  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: E402

ARGS = dict(modes="eager,compiled", rows="train,sample", iters="10", windows="3", warmup="3")
for a in sys.argv[1:]:
    k, _, v = a.partition("=")
    if k not in ARGS:
        sys.exit("bench_peer_gpu.py: unknown argument %s (keys: %s)" % (a, ", ".join(ARGS)))
    ARGS[k] = v
ITERS, WINDOWS, WARMUP = int(ARGS["iters"]), int(ARGS["windows"]), int(ARGS["warmup"])
TRAIN_B, SAMPLE_B = 128, 256
DEV = th.device("cuda")


def build():
    th.manual_seed(0)
    model = UNetModel(in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
                      attention_resolutions=(32 // 16, 32 // 8), dropout=0.3, channel_mult=(1, 2, 2, 2),
                      num_heads=4, use_scale_shift_norm=True).to(DEV)
    diff = create_gaussian_diffusion(steps=4000, learn_sigma=True, noise_schedule="cosine",
                                     rescale_timesteps=True, rescale_learned_sigmas=True)
    return model, diff


def timed(fn):
    for _ in range(WARMUP):
        fn()
    th.cuda.synchronize()
    best = float("inf")
    for _ in range(WINDOWS):
        t0 = time.perf_counter()
        for _ in range(ITERS):
            fn()
        th.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / ITERS)
    return best


def emit(mode, row, batch, sec, **extra):
    rec = dict(mode=mode, row=row, batch=batch, per_s=batch / sec, ms=sec * 1e3, device=th.cuda.get_device_name(),
               torch=th.__version__)
    rec.update(extra)
    print(json.dumps(rec), flush=True)


def run(mode, rows):
    model, diff = build()
    net = th.compile(model) if mode == "compiled" else model
    g = th.Generator(device=DEV).manual_seed(1)
    if "train" in rows:
        model.train()
        opt = th.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        x = th.rand(TRAIN_B, 3, 32, 32, device=DEV, generator=g) * 2 - 1

        def step():
            t = th.randint(0, diff.num_timesteps, (TRAIN_B,), device=DEV, generator=g)
            opt.zero_grad(set_to_none=True)
            with th.autocast("cuda", dtype=th.bfloat16):
                loss = diff.training_losses(net, x, t)["loss"].mean()
            loss.backward()
            opt.step()

        th.cuda.empty_cache()
        th.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()   # first step: compiles in the compiled mode
        th.cuda.synchronize()
        first = time.perf_counter() - t0
        sec = timed(step)
        emit(mode, "train", TRAIN_B, sec, first_step_s=first, mem_reserved=th.cuda.max_memory_reserved(),
             mem_allocated=th.cuda.max_memory_allocated())
        del opt
    if "sample" in rows:
        model.eval()
        x = th.randn(SAMPLE_B, 3, 32, 32, device=DEV, generator=g)
        ts = th.full((SAMPLE_B,), 500.0, device=DEV)

        def fwd():
            with th.no_grad(), th.autocast("cuda", dtype=th.bfloat16):
                net(x, ts)

        th.cuda.empty_cache()
        th.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fwd()
        th.cuda.synchronize()
        first = time.perf_counter() - t0
        sec = timed(fwd)
        emit(mode, "sample", SAMPLE_B, sec, first_step_s=first, mem_reserved=th.cuda.max_memory_reserved(),
             mem_allocated=th.cuda.max_memory_allocated())
    del model, net
    th.cuda.empty_cache()


def main():
    if not th.cuda.is_available():
        sys.exit("bench_peer_gpu.py: torch sees no CUDA device")
    th.backends.cudnn.benchmark = True
    rows = ARGS["rows"].split(",")
    for mode in ARGS["modes"].split(","):
        if mode not in ("eager", "compiled"):
            sys.exit("bench_peer_gpu.py: unknown mode %s (eager, compiled)" % mode)
        try:
            run(mode, rows)
        except Exception as e:  # report and go on with the next mode
            print(json.dumps(dict(mode=mode, error="%s: %s" % (type(e).__name__, e))), flush=True)


if __name__ == "__main__":
    main()
