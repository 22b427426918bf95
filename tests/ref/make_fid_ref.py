"""Reference for the Fréchet distance (tests/lua/test_metrics.lua): two fixed feature sets
and the FID computed the way pytorch-fid / the ADM evaluator / mmgen compute it
(np.cov rowvar=False, scipy.linalg.sqrtm of the product, 1e-6 offset retry when not
finite, real part). Writes tests/ref/fid_ref.safetensors.
Cases: 'a' well-conditioned (N=400, D=48, correlated features, shifted means);
'b' rank-deficient covariances (N=30 < D=48), which the reference handles with
complex sqrtm and a discarded imaginary part.
Run: /usr/bin/python3 tests/ref/make_fid_ref.py   (python3-numpy, python3-scipy)"""
import os
import sys

import numpy as np
from scipy import linalg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_write  # noqa: E402


def fid(mu1, s1, mu2, s2, eps=1e-6):
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    offset = 0.0
    if not np.isfinite(covmean).all():
        offset = eps
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    imag = float(np.max(np.abs(covmean.imag))) if np.iscomplexobj(covmean) else 0.0
    covmean = covmean.real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), offset, imag


def main():
    rng = np.random.default_rng(1234)
    out = {}
    meta = {"generator": "tests/ref/make_fid_ref.py", "scipy": __import__("scipy").__version__}
    for case, n, d in (("a", 400, 48), ("b", 30, 48)):
        mix1 = rng.standard_normal((d, d)) / np.sqrt(d)
        mix2 = mix1 + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
        f1 = (rng.standard_normal((n, d)) @ mix1 + 0.5).astype(np.float32)
        f2 = (rng.standard_normal((n, d)) @ mix2 + 0.4 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        mu1, mu2 = np.mean(f1, axis=0), np.mean(f2, axis=0)       # float32, as the references
        s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
        v, off, imag = fid(mu1.astype(np.float64), s1, mu2.astype(np.float64), s2)
        out[case + "_feats1"], out[case + "_feats2"] = f1, f2
        out[case + "_mu1"], out[case + "_sigma1"] = mu1.astype(np.float64), s1
        out[case + "_mu2"], out[case + "_sigma2"] = mu2.astype(np.float64), s2
        out[case + "_fid"] = np.array([v], dtype=np.float64)
        meta[case] = "fid %.12g offset %g max|imag| %.3g" % (v, off, imag)
        print(case, meta[case])
    st_write.save(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fid_ref.safetensors"), out, meta)


if __name__ == "__main__":
    main()
