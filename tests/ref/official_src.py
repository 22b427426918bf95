"""official_src.py — find the official improved-diffusion code for the reference scripts.

The official code (github.com/openai/improved-diffusion, commit
1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5) is never committed here. Point the environment
variable IMPROVED_DIFFUSION at a local copy: either a checkout (a folder holding
improved_diffusion/) or a bare git directory, whose HEAD's improved_diffusion/ is then
extracted into a temporary folder. Without it the scripts stop with a message saying so.
"""
import os
import subprocess
import sys
import tarfile
import tempfile

COMMIT = "1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5"


def add_to_path():
    """Put the official improved_diffusion package on sys.path; return the folder used."""
    src = os.environ.get("IMPROVED_DIFFUSION")
    if not src:
        sys.exit("error: set IMPROVED_DIFFUSION to a local copy of github.com/openai/improved-diffusion "
                 f"(a checkout or a bare git dir, commit {COMMIT}); e.g.\n"
                 "  git clone https://github.com/openai/improved-diffusion /tmp/improved-diffusion\n"
                 "  IMPROVED_DIFFUSION=/tmp/improved-diffusion /usr/bin/python3 " + sys.argv[0])
    if os.path.isdir(os.path.join(src, "improved_diffusion")):
        sys.path.insert(0, src)
        return src
    if not os.path.isdir(os.path.join(src, "objects")):
        sys.exit(f"error: IMPROVED_DIFFUSION={src!r} is neither a checkout holding improved_diffusion/ "
                 "nor a bare git dir")
    tmp = tempfile.mkdtemp(prefix="improved_diffusion_")
    tar_path = os.path.join(tmp, "src.tar")
    with open(tar_path, "wb") as f:
        subprocess.run(["git", "--git-dir", src, "archive", "HEAD", "improved_diffusion"], stdout=f, check=True)
    with tarfile.open(tar_path) as t:
        t.extractall(tmp)
    sys.path.insert(0, tmp)
    return tmp
