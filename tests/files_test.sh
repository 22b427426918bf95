#!/usr/bin/env bash
# files_test.sh — hostile file names, special files, a second trainer, full disks and
# signals, through the iddpm command line. Every check runs in a scratch folder and
# verifies that nothing is created outside the intended folder and that no command
# hidden in a name runs.
#   - run_dir / out holding quotes, `;`, `$(...)` and globs: no command runs, no other
#     file is touched, the literal folder is used; an empty or blank run_dir is an error
#     that writes nothing (in particular nothing in /)
#   - a symbolic link planted at out/settings.json.tmp: its target is not written
#   - FIFOs named ckpt_*.safetensors / as an IDX file / as ckpt=: never blocked on
#   - a second trainer on a locked run directory fails at once, naming the holder's pid;
#     SIGTERM makes the first one save a checkpoint and exit
#   - full disk (a full tmpfs where mount is allowed; ulimit -f with SIGXFSZ ignored ->
#     EFBIG everywhere): `iddpm sample` fails naming the
#     file and leaves no empty settings.json; a log record is never cut in half; the
#     trainer stops with an error naming log.jsonl
#   - `iddpm sample` removes its stale temp files (dead pid) and keeps others
#
#   tests/files_test.sh path/to/iddpm
set -u
BIN=$(realpath "${1:?usage: $0 path/to/iddpm}")
REPO=$(pwd)
TMP=$(mktemp -d)
PIDS=()
MOUNTED=
trap 'for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; [ -n "$MOUNTED" ] && umount "$MOUNTED"; rm -rf "$TMP"' EXIT
fails=0
LIMIT=${FILES_TEST_LIMIT:-60}   # seconds before a command that should finish at once counts as blocked

ok() { echo "ok - $1"; }
bad() { echo "not ok - $1"; fails=$((fails + 1)); [ -f "$TMP/out" ] && sed 's/^/#   /' "$TMP/out" | tail -n 8; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else bad "$d"; fi; }
# run ARGS...: iddpm in the current folder, output to $TMP/out, rc in $rc
run() { timeout "$LIMIT" "$BIN" "$@" >"$TMP/out" 2>&1 </dev/null; rc=$?; }
has() { grep -qF -- "$1" "$TMP/out"; }
TRAIN="$REPO/recipes/fashion_mnist_demo.lua"
TINY="dataset=random image_size=8 num_images=8 num_channels=32 num_res_blocks=1 channel_mult=1,2
      attention_resolutions=4 batch_size=4 diffusion_steps=20 log_interval=1 num_samples=0"
# shellcheck disable=SC2086
train() { run run "$TRAIN" $TINY "$@"; }

W=$TMP/work
mkdir -p "$W" "$TMP/sentinel"
echo keep >"$TMP/sentinel/a.txt"
echo keep >"$TMP/sentinel/b.tmp.1"
cd "$W" || exit 1

# ---------------------------------------------------------------- hostile names
train max_steps=1 "run_dir=x'; touch INJECTED; echo '"
check "run_dir with '; touch ...': no command runs" eval '[ ! -e INJECTED ] && [ ! -e "$TMP/INJECTED" ]'
check "run_dir with '; touch ...': the literal folder holds the run" \
    eval '[ $rc = 0 ] && [ -f "x'"'"'; touch INJECTED; echo '"'"'/ckpt_00000001.safetensors" ]'

check "run_dir with '; touch ...': nothing else created here" eval '[ "$(ls -A)" = "x'"'"'; touch INJECTED; echo '"'"'" ]'

train max_steps=1 "run_dir=x' $TMP/sentinel/* '"
check "run_dir with a glob: only the literal folder is created" \
    eval '[ $rc = 0 ] && [ "$(ls -A | wc -l)" = 2 ] && [ -f "x'"'"' $TMP/sentinel/* '"'"'/ckpt_00000001.safetensors" ]'
check "run_dir with a glob of another folder: its files stay" \
    eval '[ -f "$TMP/sentinel/a.txt" ] && [ -f "$TMP/sentinel/b.tmp.1" ] && [ "$(ls "$TMP/sentinel" | wc -l)" = 2 ]'

train max_steps=1 "run_dir=bob's run"
check "run_dir=\"bob's run\" trains, no shell error" \
    eval '[ $rc = 0 ] && [ -f "bob'"'"'s run/ckpt_00000001.safetensors" ] && ! has "sh: " && ! grep -qi "syntax error" "$TMP/out"'

before=$(ls -A "$W" | sort | tr '\n' '|')
rootbefore=$(ls -A / | sort | tr '\n' '|')
train max_steps=1 "run_dir="
check "run_dir= (empty) is an error naming run_dir" eval '[ $rc != 0 ] && has run_dir'
train max_steps=1 "run_dir=   "
check "run_dir=<blanks> is an error" eval '[ $rc != 0 ] && has run_dir'
check "empty run_dir: nothing written here or in /" \
    eval '[ "$(ls -A "$W" | sort | tr "\n" "|")" = "$before" ] && [ "$(ls -A / | sort | tr "\n" "|")" = "$rootbefore" ]'

# eval_nll with a command substitution in out=: a folder of two 8x8 PNGs as data
mkdir -p png
"$BIN" -e 'local T = require("iddpm").tensor; local io_ = require("iddpm").io
  io_.png_write("png/a_1.png", T.full({8, 8, 3}, 100, "uint8")); io_.png_write("png/b_1.png", T.full({8, 8, 3}, 30, "uint8"))'
run run "$REPO/tools/eval_nll.lua" "checkpoint=bob's run" data=png num=2 batch_size=2 'out=nll$(touch F_NLL)'
check "eval_nll out=...\$(touch F): no command runs" eval '[ ! -e F_NLL ] && [ ! -e "$TMP/F_NLL" ]'
check "eval_nll out=...\$(touch F): writes into the literal folder" eval '[ $rc = 0 ] && [ -s "nll\$(touch F_NLL)/nll.json" ]'

# ---------------------------------------------------------------- links and FIFOs
mkdir -p smp
echo precious >"$TMP/victim"
ln -s "$TMP/victim" smp/settings.json.tmp
run sample "ckpt=bob's run" out=smp num_samples=2 steps=5 progress=false overwrite=true
check "sample: a link at out/settings.json.tmp: its target untouched" \
    eval '[ $rc = 0 ] && [ "$(cat "$TMP/victim")" = precious ]'
check "sample: settings.json is a regular, complete file" eval '[ -f smp/settings.json ] && [ ! -L smp/settings.json ] && tail -c 1 smp/settings.json | grep -q "}"'

mkdir -p fiforun
cp "bob's run/ckpt_00000001.safetensors" fiforun/
mkfifo fiforun/ckpt_00000009.safetensors
run sample ckpt=fiforun out=smp2 num_samples=1 steps=5 progress=false
check "sample: a FIFO named ckpt_*.safetensors is skipped, not blocked on" \
    eval '[ $rc = 0 ] && has "ckpt_00000001.safetensors (step 1)"'
run sample ckpt=fiforun/ckpt_00000009.safetensors out=smp3 num_samples=1 steps=5
check "sample: ckpt= a FIFO fails at once: not a regular file" eval '[ $rc != 0 ] && [ $rc != 124 ] && has "not a regular file"'
train max_steps=1 run_dir=fiforun
check "train: resume skips a FIFO checkpoint name" eval '[ $rc = 0 ] && has "resumed from step 1"'
mkdir -p idx
mkfifo idx/train-images-idx3-ubyte
printf '\0\0\10\1\0\0\0\2\1\2' >idx/train-labels-idx1-ubyte
train max_steps=1 run_dir=idxrun dataset=idx data_dir=idx
check "train: an IDX FIFO fails at once: not a regular file" eval '[ $rc != 0 ] && [ $rc != 124 ] && has "not a regular file"'

mkfifo fifo.npz fifo.png fifo.bin
for call in 'io.npz_read("fifo.npz")' 'io.png_read("fifo.png")' 'io.cifar10_read("fifo.bin")' 'tensor.load("fifo.npz")'; do
    run -e "local ok, e = pcall(function() return require('iddpm').$call end) print(ok, e)"
    check "reader $call: a FIFO is refused at once" eval '[ $rc = 0 ] && has "false" && has "not a regular file"'
done

# ---------------------------------------------------------------- lock and SIGTERM
# shellcheck disable=SC2086
"$BIN" run "$TRAIN" $TINY max_steps=100000 save_interval=100000 lr=1e-4 run_dir=locked >"$TMP/first" 2>&1 </dev/null &
first=$!
PIDS+=("$first")
for _ in $(seq 300); do grep -qs "step 2/" "$TMP/first" && break; sleep 0.1; done
start=$(date +%s)
train max_steps=3 lr=2e-4 run_dir=locked
check "lock: a second trainer fails at once, naming the first one's pid" \
    eval '[ $rc != 0 ] && [ $(( $(date +%s) - start )) -lt 30 ] && has "in use by another process (pid $first"'
kill -TERM "$first"
for _ in $(seq 300); do kill -0 "$first" 2>/dev/null || break; sleep 0.1; done
at=$(sed -n 's/.*interrupted at step \([0-9]*\): saving.*/\1/p' "$TMP/first")
check "SIGTERM: the trainer saves the current step and exits" \
    eval '[ -n "$at" ] && [ -f "locked/$(printf "ckpt_%08d.safetensors" "$at")" ] && ! kill -0 $first 2>/dev/null'
train max_steps=$(( ${at:-0} + 1 )) run_dir=locked
check "lock: released when the holder exits; the run resumes" eval '[ $rc = 0 ] && has "resumed from step ${at:-x}"'

# ---------------------------------------------------------------- full disk
# settings.json (~1.3 KB) exceeds a 1 KiB file-size limit; the images (grid_scale=1) and npz do not
mkdir -p full
( ulimit -f 1; trap '' XFSZ; exec timeout "$LIMIT" "$BIN" sample "ckpt=bob's run" out=full num_samples=2 steps=5 progress=false grid_scale=1 ) \
    >"$TMP/out" 2>&1
rc=$?
check "full disk: sample fails, naming the file" eval '[ $rc != 0 ] && has "full/settings.json"'
check "full disk: no empty or partial settings.json, no temp file left" \
    eval '[ ! -e full/settings.json ] && [ -z "$(ls full | grep "\.tmp")" ]'
# a real full disk where mounting is allowed (root): a 64 KiB tmpfs with two pages free
# holds the npz and grid.png; settings.json then fails with ENOSPC
mkdir -p tfs
if mount -t tmpfs -o size=64k tmpfs tfs 2>/dev/null; then
    MOUNTED=$W/tfs
    head -c 57344 /dev/zero >tfs/filler
    run sample "ckpt=bob's run" out=tfs/o num_samples=2 steps=5 progress=false save_each=false grid_scale=1
    check "full tmpfs: sample fails naming settings.json (No space left)" \
        eval '[ $rc != 0 ] && has "tfs/o/settings.json" && has "No space left"'
    check "full tmpfs: no settings.json, no temp file left" eval '[ ! -e tfs/o/settings.json ] && [ -z "$(ls tfs/o | grep "\.tmp")" ]'
    umount tfs && MOUNTED=
else
    echo "# tmpfs cannot be mounted here (not root?): the ulimit checks stand in for it"
fi
head -c 1000 /dev/zero | tr '\0' 'x' >big.log
( ulimit -f 1; trap '' XFSZ; exec "$BIN" -e 'require("iddpm.fs").append("big.log", ("y"):rep(100) .. "\n")' ) >"$TMP/out" 2>&1
rc=$?
check "full disk: an append fails naming the file, and is undone" eval '[ $rc != 0 ] && has big.log && [ $(wc -c <big.log) = 1000 ]'
# a log close to the limit: the trainer's first record does not fit
mkdir -p logfull
for i in $(seq 60); do echo '{"note":"an earlier record, padded to about a hundred bytes .........................."}'; done >logfull/log.jsonl
( ulimit -f 6; trap '' XFSZ; exec timeout "$LIMIT" "$BIN" run "$TRAIN" $TINY max_steps=2 save_interval=1000 run_dir=logfull ) >"$TMP/out" 2>&1
rc=$?
check "full disk: the trainer stops with an error naming log.jsonl" eval '[ $rc != 0 ] && has "logfull/log.jsonl"'
check "full disk: log.jsonl ends with a whole record" eval '[ "$(tail -c 1 logfull/log.jsonl | od -An -c | tr -d " ")" = "\\n" ]'

# ---------------------------------------------------------------- stale temp files
mkdir -p stale
sh -c 'echo $$' >"$TMP/deadpid"
dead=$(cat "$TMP/deadpid")
while kill -0 "$dead" 2>/dev/null; do sleep 0.1; done
touch "stale/grid.png.tmp.$dead.0" "stale/settings.json.tmp.$dead" "stale/grid.png.tmp.$$.0" stale/notes.tmp.txt stale/mine.txt
run sample "ckpt=bob's run" out=stale num_samples=1 steps=5 progress=false overwrite=true
check "sample: removes its stale temp files (dead pid)" \
    eval '[ $rc = 0 ] && [ ! -e "stale/grid.png.tmp.$dead.0" ] && [ ! -e "stale/settings.json.tmp.$dead" ]'
check "sample: keeps a live process's temp file and other files" \
    eval '[ -e "stale/grid.png.tmp.$$.0" ] && [ -e stale/notes.tmp.txt ] && [ -e stale/mine.txt ]'

cd "$REPO" || exit 1
[ "$fails" = 0 ]
