#!/usr/bin/env bash
# oom_test.sh — training under an address-space limit (ulimit -v) stops with a clean
# "out of memory" error or finishes; it never hangs. (OpenBLAS retries a failed
# allocation of its GEMM work buffer forever; the CPU allocator keeps room for those
# buffers under such a limit, see engine/cpu/backend.c.) Each run is bounded by a
# timeout: a run that reaches it is the hang this test is about.
#
#   tests/oom_test.sh path/to/iddpm
set -u
BIN=$(realpath "${1:?usage: $0 path/to/iddpm}")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
HANG_S=90   # a 2-step tiny training takes a few seconds; far more is a hang
fails=0
# an AddressSanitizer build cannot start under ulimit -v (it reserves terabytes of shadow)
if (ulimit -v 2000000; "$BIN" -e 'print(1)' >"$TMP/probe" 2>&1); then :; else
    if grep -q AddressSanitizer "$TMP/probe"; then echo "ok - skipped: sanitizer build cannot run under ulimit -v"; exit 0; fi
fi
# limits (KiB) around where this model's run runs out: before the fix, the two lower
# ones spun in sgemm's buffer allocation
for kb in 350000 550000 900000; do
    rd=$TMP/run$kb
    (ulimit -v $kb; exec timeout $HANG_S "$BIN" run recipes/fashion_mnist_demo.lua dataset=random image_size=32 \
        num_images=64 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=8 batch_size=16 \
        log_interval=1 num_samples=0 max_steps=2 run_dir="$rd") >"$TMP/out" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "not ok - ulimit -v $kb: training hung (killed after ${HANG_S}s)"; fails=$((fails + 1))
    elif [ $rc -eq 0 ] || grep -q "out of memory" "$TMP/out"; then
        echo "ok - ulimit -v $kb: training ends (status $rc)"
    else
        echo "not ok - ulimit -v $kb: status $rc without an out-of-memory message"; fails=$((fails + 1))
        grep -v '^  ' "$TMP/out" | head -n 8 | sed 's/^/#   /'
    fi
done
[ $fails -eq 0 ]
