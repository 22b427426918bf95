#!/bin/sh
# tests/cuda/bundle.sh — `make cuda-bundle`: a folder that runs the CUDA build on a
# machine without Lua, OpenBLAS, libpng, libgif or readline packages (a GPU image with
# only the CUDA runtime, cuBLAS and cuDNN): the program, iddpm.so, lua/, recipes/,
# tests/, examples/, and every shared library the program needs (from ldd) except the
# C library, the CUDA runtime / cuBLAS / cuDNN (the GPU machine's own) and the driver.
#   sh tests/cuda/bundle.sh [OUT (build/cuda-bundle)] [--tar]
# --tar also writes OUT.tar.xz (the libraries compress ~4x; OpenBLAS alone is ~36 MB).
# On the GPU machine:  sh OUT/run.sh run tests/cuda/bench_gpu.lua   (or ./run.sh inside)
set -e
OUT=build/cuda-bundle
TAR=0
for a in "$@"; do
    case "$a" in --tar) TAR=1 ;; *) OUT=$a ;; esac
done
BUILD=${BUILD:-build/release-cuda}
[ -x "$BUILD/iddpm" ] || { echo "bundle.sh: $BUILD/iddpm not found: run make CUDA=1 first" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT/lib"
cp "$BUILD/iddpm" "$BUILD/iddpm.so" "$OUT/"
cp -r lua recipes tests examples "$OUT/"
ldd "$BUILD/iddpm" | while read -r name arrow path rest; do
    case "$name" in
    linux-vdso* | ld-linux* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so*) continue ;;
    libcuda.so* | libcudart* | libcublas* | libcudnn* | libnvrtc* | libnvJitLink*) continue ;;
    esac
    [ "$arrow" = "=>" ] && [ -f "$path" ] && cp -L "$path" "$OUT/lib/"
done
cat >"$OUT/run.sh" <<'RUN'
#!/bin/sh
# run.sh — the bundled iddpm with its libraries: sh run.sh run SCRIPT.lua [args]
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export IDDPM_NO_REEXEC=1
exec "$here/iddpm" "$@"
RUN
chmod +x "$OUT/run.sh"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)); libraries: $(ls "$OUT/lib" | tr '\n' ' ')"
if [ "$TAR" = 1 ]; then
    tar -C "$(dirname "$OUT")" -cJf "$OUT.tar.xz" "$(basename "$OUT")"
    echo "bundle: $OUT.tar.xz ($(du -sh "$OUT.tar.xz" | cut -f1))"
fi
