"""Convert the FID Inception-v3 weights to safetensors for iddpm.metrics.inception.

    /usr/bin/python3 tools/convert_inception.py pt_inception-2015-12-05-6726825d.pth inception.safetensors

Input: pytorch-fid's FID weights (the TF 'classify_image_graph_def.pb' of 2015-12-05,
ported by pytorch-fid), downloaded from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
The state_dict is loaded strictly into the FID Inception of fid_inception.py (so a wrong
file fails here, with the names that do not match), and every tensor except the unused
classifier (fc.*) and the BN step counters is written as float32 under its torchvision
name (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_var, ...). iddpm folds the
batch norms (eps 1e-3) into the convolutions when it loads the file.

mmgeneration / StyleGAN's TorchScript file (inception-2015-12-05.pt) holds the same TF
graph, but its parameter names could not be checked here (no copy of the file was at
hand), so it is refused with a message rather than converted by guesswork.
Needs python3-torch and python3-torchvision (Debian), no network."""
import os
import sys
import zipfile

import torch

# st_write and the network definition are shared with the reference scripts in tests/ref
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))
import st_write  # noqa: E402
from fid_inception import fid_inception  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    if not os.path.exists(src):
        sys.exit("%s not found; download it from\n  https://github.com/mseitzer/pytorch-fid/releases/download/"
                 "fid_weights/pt_inception-2015-12-05-6726825d.pth" % src)
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                sys.exit("%s is a TorchScript model (StyleGAN/mmgen inception-2015-12-05.pt); only pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth is supported" % src)
    sd = torch.load(src, map_location="cpu")
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    net = fid_inception()
    net.load_state_dict(sd, strict=True)   # raises with the missing/unexpected names
    out = {k: v.detach().float().numpy() for k, v in net.state_dict().items()
           if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    st_write.save(dst, out, {"source": os.path.basename(src), "format": "iddpm-fid-inception-1",
                             "bn_eps": "0.001", "names": "torchvision Inception3 (FID blocks)"})
    print("wrote %s: %d tensors, %d values" % (dst, len(out), sum(v.size for v in out.values())))


if __name__ == "__main__":
    main()
