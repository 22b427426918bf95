#!/usr/bin/env python3
"""check_npz.py DIR — cross-check engine/io against numpy (run by tests/c/test_io.c).

1. Reads what the C writers left in DIR: samples_4x8x8x3.npz (arr_0 uint8 NHWC, arr_1
   int64), f64.npy, and out.safetensors, parsed by hand with json + numpy (no safetensors
   package), checking dtype, shape, values, packing and alignment.
2. Writes files for the C readers to check: py_compressed.npz (savez_compressed, the
   ImageNet-64 layout: data (N,12288) uint8, labels, mean), py_f16.npy, py_i4.npy and
   py.safetensors with F16, BF16, I32 and U8 entries.
Prints 'ok - ...' / 'not ok - ...' lines like the C harness; exit 1 on failure."""
import json, struct, sys
import numpy as np

d = sys.argv[1]
fails = 0

def check(cond, name):
    global fails
    print(("ok - " if cond else "not ok - ") + "py: " + name)
    fails += 0 if cond else 1

z = np.load(f"{d}/samples_4x8x8x3.npz")
a0, a1 = z["arr_0"], z["arr_1"]
check(sorted(z.files) == ["arr_0", "arr_1"], "npz keys arr_0, arr_1")
check(a0.dtype == np.uint8 and a0.shape == (4, 8, 8, 3), f"arr_0 uint8 (4,8,8,3), got {a0.dtype} {a0.shape}")
check(a1.dtype == np.int64 and a1.shape == (4,), f"arr_1 int64 (4,), got {a1.dtype} {a1.shape}")
check(np.array_equal(a0.reshape(-1), (np.arange(4 * 8 * 8 * 3) * 7 % 256).astype(np.uint8)), "arr_0 values")
check(np.array_equal(a1, np.array([3, 1, 4, 1])), "arr_1 values")
f = np.load(f"{d}/f64.npy")
check(f.dtype == np.float64 and f.shape == (5,) and np.array_equal(f, np.arange(5) / 4.0), "f64.npy")

raw = open(f"{d}/out.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
check(n % 8 == 0, "safetensors header length multiple of 8")
hdr = json.loads(raw[8:8 + n])
data = raw[8 + n:]
meta = hdr.pop("__metadata__")
cfg = json.loads(meta["config"])
check(cfg["model_channels"] == 32 and cfg["name"] == 'q"uote\n\u00e9', "metadata config JSON string")
ends = sorted((v["data_offsets"][0], v["data_offsets"][1]) for v in hdr.values())
check(ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == len(data),
      "tensors packed from 0 to end of file")
np_dt = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "U8": "u1"}
arrs = {}
for k, v in hdr.items():
    b, e = v["data_offsets"]
    dt = np.dtype(np_dt[v["dtype"]])
    check(b % dt.itemsize == 0, f"tensor {k} aligned to {dt.itemsize}")
    arrs[k] = np.frombuffer(data[b:e], dtype=dt).reshape(v["shape"])
check(np.array_equal(arrs["w.f32"], (np.arange(6, dtype=np.float32) * 0.5 - 1).reshape(2, 3)), "st F32")
check(np.array_equal(arrs["w.f64"], np.arange(3) / 3.0), "st F64")
check(np.array_equal(arrs["step"], np.array(123456789012, dtype=np.int64)) and arrs["step"].shape == (), "st I64 scalar")
check(np.array_equal(arrs["rng"], (np.arange(5) * 51).astype(np.uint8)), "st U8")
check(arrs["empty"].shape == (0, 4), "st empty tensor")

# ---- files for the C side
N = 3
data = (np.arange(N * 12288) % 251).astype(np.uint8).reshape(N, 12288)
np.savez_compressed(f"{d}/py_compressed.npz", data=data, labels=[1, 1000, 7],
                    mean=np.linspace(0, 1, 12288))
np.save(f"{d}/py_f16.npy", np.array([1.5, -2.0, 65504.0, 2.0 ** -24], dtype=np.float16))
np.save(f"{d}/py_i4.npy", np.array([[-1, 2], [3, -4]], dtype=np.int32))
ents = [("h", "F16", [3], np.array([0.5, -1.0, 3.0], dtype="<f2").tobytes()),
        ("b", "BF16", [2], (np.array([1.5, -256.0], dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()),
        ("i", "I32", [2], np.array([-7, 1 << 30], dtype="<i4").tobytes()),
        ("u", "U8", [3], bytes([1, 2, 3]))]
h, blob = {"__metadata__": {"who": "python"}}, b""
for name, dt, shape, bts in ents:
    h[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(blob), len(blob) + len(bts)]}
    blob += bts
hj = json.dumps(h).encode()
hj += b" " * (-len(hj) % 8)
open(f"{d}/py.safetensors", "wb").write(struct.pack("<Q", len(hj)) + hj + blob)
sys.exit(1 if fails else 0)
