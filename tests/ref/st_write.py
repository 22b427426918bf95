"""Minimal safetensors writer (numpy arrays -> file), so the reference scripts need only
numpy and torch. Format: 8-byte little-endian header length, JSON header with
dtype/shape/data_offsets per tensor (and __metadata__), then the raw little-endian data."""
import json
import struct

import numpy as np

_DT = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64",
       np.dtype("uint8"): "U8", np.dtype("float16"): "F16"}


def save(path, arrays, metadata=None):
    header, blobs, off = {}, [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DT[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
