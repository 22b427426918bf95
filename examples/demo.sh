#!/bin/sh
# examples/demo.sh — `make demo`: train the Fashion-MNIST demo recipe end to end on the
# CPU (recipes/fashion_mnist_demo.lua) into runs/fashion_demo, sample a grid with the
# EMA weights and a respaced 50-step sampler, and print where the grid is.
# Needs Debian's dataset-fashion-mnist (installed here when run as root).
# Extra arguments are recipe overrides, e.g. `sh examples/demo.sh max_steps=200`.
set -e
cd "$(dirname "$0")/.."
DATA=/usr/share/datasets/fashion-mnist
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing dataset-fashion-mnist (Debian package) ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "the demo needs Fashion-MNIST from Debian; install it with:"
        echo "  sudo apt-get install -y dataset-fashion-mnist"
        exit 1
    fi
fi
[ -x ./iddpm ] || make
RUN=runs/fashion_demo
start=$(date +%s)
# resume=none: a fresh run every time (an old run directory is moved aside)
if [ -d "$RUN" ]; then rm -rf "$RUN.old"; mv "$RUN" "$RUN.old"; fi
./iddpm run recipes/fashion_mnist_demo.lua run_dir="$RUN" "$@"
end=$(date +%s)
grid=$(ls "$RUN"/samples_*.png | tail -n 1)
echo
echo "demo finished in $(( (end - start) / 60 ))m$(( (end - start) % 60 ))s (training + sampling)"
echo "loss curve:        $RUN/loss.png"
echo "log:               $RUN/log.jsonl"
echo "final sample grid: $grid"
