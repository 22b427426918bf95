#!/usr/bin/env bash
# repl_test.sh — drive the iddpm REPL through tmux the way a person uses it: results,
# multi-line input, readline editing, Tab completion, Ctrl-C during a Lua loop and
# during a C loop,
# Ctrl-C at the prompt, Ctrl-D, and the history file (saved, recalled, capped).
#
#   tests/repl_test.sh path/to/iddpm
#
# Prints "ok - ..." / "not ok - ..." lines; exits 1 if any check failed. The C-loop
# check runs REPL_TEST_BUSY (default `iddpm.busy()`, which tests/stub_iddpm.c has)
# and is skipped when `iddpm.busy` does not exist and REPL_TEST_BUSY is unset.
set -u
BIN=$(realpath "${1:?usage: $0 path/to/iddpm}")
BUSY=${REPL_TEST_BUSY:-iddpm.busy()}
if ! command -v tmux >/dev/null; then
    echo "ok - # SKIP tmux is not installed"
    exit 0
fi

TMP=$(mktemp -d)
HIST=$TMP/history
SOCK=iddpm-repl-test-$$
T() { tmux -L "$SOCK" "$@"; }
trap 'T kill-server 2>/dev/null; rm -rf "$TMP"' EXIT
fails=0

screen() { T capture-pane -p -J -S - -t repl 2>/dev/null; }
dump() { screen | sed '/^[[:space:]]*$/d' | tail -n 15 | sed 's/^/#   /'; }
check() { # check DESCRIPTION COMMAND...
    local desc=$1
    shift
    if "$@"; then
        echo "ok - $desc"
    else
        echo "not ok - $desc"
        fails=$((fails + 1))
        dump
    fi
}
# wait_for ERE [seconds]: some line of the pane matches.
wait_for() {
    local i
    for ((i = 0; i < ${2:-5} * 20; i++)); do
        screen | grep -Eq -- "$1" && return 0
        sleep 0.05
    done
    return 1
}
# wait_more ERE N [seconds]: more than N lines of the pane match.
wait_more() {
    local i
    for ((i = 0; i < ${3:-5} * 20; i++)); do
        [ "$(screen | grep -Ec -- "$1")" -gt "$2" ] && return 0
        sleep 0.05
    done
    return 1
}
nmatch() { screen | grep -Ec -- "$1"; }
last_line() { screen | sed '/^[[:space:]]*$/d' | tail -n 1; }
# wait_last ERE [seconds]: the last non-blank line matches (e.g. an empty prompt).
wait_last() {
    local i
    for ((i = 0; i < ${2:-5} * 20; i++)); do
        last_line | grep -Eq -- "$1" && return 0
        sleep 0.05
    done
    return 1
}
wait_prompt() { wait_last '^> ?$' "${1:-5}"; }
type_line() { T send-keys -t repl -l "$1" && T send-keys -t repl Enter; }
# run_expect INPUT ERE: type a line, then expect a result line and a fresh prompt.
run_expect() { type_line "$1" && wait_for "$2" && wait_prompt; }
# The pane runs iddpm, then writes its exit status to $STATUS (tmux's own
# pane_dead_status is not reliable across versions).
STATUS=$TMP/status
start_repl() {
    T kill-server 2>/dev/null
    rm -f "$STATUS"
    T -f /dev/null new-session -d -s repl -x 150 -y 50 \
        "env HOME='$TMP' IDDPM_HISTORY='$HIST' '$BIN'; echo \$? >'$STATUS'"
}
exited() { [ -s "$STATUS" ]; }
wait_exit() {
    local i
    for ((i = 0; i < 100; i++)); do
        exited && break
        sleep 0.05
    done
    exited && [ "$(cat "$STATUS")" = 0 ]
}
still_running() { sleep 0.7 && ! last_line | grep -Eq '^> ?$' && ! exited; }

# ---- session 1 ----------------------------------------------------------------------
start_repl
check "REPL starts with a banner and a prompt" eval 'wait_prompt && wait_for "^iddpm [0-9]"'
check "1+1 prints 2" run_expect '1+1' '^2$'
check "=expr prints its value" run_expect '=10+11' '^21$'
check "several results are printed" run_expect '"a", 1, nil' '^a[[:space:]]+1[[:space:]]+nil$'

type_line 'function f(x)'
check "incomplete input gives the continuation prompt" wait_last '^>> ?$'
type_line 'return x*2'
type_line 'end'
check "multi-line function definition completes" wait_prompt
check "f(21) prints 42" run_expect 'f(21)' '^42$'

T send-keys -t repl -l 'xx("readline-" .. "edit")'
T send-keys -t repl C-a C-d C-d
T send-keys -t repl -l 'print'
T send-keys -t repl Enter
check "readline editing (Ctrl-A, delete, insert)" eval 'wait_for "^readline-edit$" && wait_prompt'

T send-keys -t repl -l 'string.fo'
T send-keys -t repl Tab
sleep 0.3
T send-keys -t repl -l '("%d-%s", 7, "tab")'
T send-keys -t repl Enter
check "Tab completes a field (string.fo -> string.format)" eval 'wait_for "^7-tab$" && wait_prompt'

# printing, completion of module members and methods, help, did-you-mean
check "a tensor prints its values" \
    run_expect 'iddpm.tensor.tensor{{1,2},{3,4}}' '^        \[3, 4\]\], shape=\(2,2\), int64, cpu\)$'
check "a table prints as a table" run_expect '{1, "a", k = {2}}' '^\{1, "a", k = \{2\}\}$'
T send-keys -t repl -l 'iddpm.tensor.ara'
T send-keys -t repl Tab
sleep 0.3
T send-keys -t repl -l '(3)'
T send-keys -t repl Enter
check "Tab completes a module member (iddpm.tensor.ara -> arange)" \
    eval 'wait_for "^tensor\(\[0, 1, 2\], shape=\(3\), int64, cpu\)$" && wait_prompt'
type_line 'x = iddpm.tensor.ones(2, 2)'
wait_prompt
T send-keys -t repl -l 'x:su'
T send-keys -t repl Tab
T send-keys -t repl Tab
check "Tab Tab lists a tensor's methods (x:su -> x:sub x:sum x:summary)" \
    eval 'wait_for "x:sub[[:space:]]+x:sum[[:space:]]+x:summary"'
T send-keys -t repl -l 'm():item()'
T send-keys -t repl Enter
check "the completed method runs (x:sum():item())" eval 'wait_for "^4.0$" && wait_prompt'
check "help prints a docstring" run_expect 'help "T.conv2d"' '^2-D convolution'
check "a misspelt method says did you mean" \
    run_expect 'x:sume()' "no method 'sume' on Tensor; did you mean 'sum'\?"
check "x[i] is a row" run_expect 'x[-1]' '^tensor\(\[1\., 1\.\], shape=\(2\), float32, cpu\)$'

check "a runtime error is reported and the REPL goes on" \
    eval 'type_line "error(\"oops-1\")" && wait_for "oops-1$" && wait_prompt && run_expect "3*11" "^33$"'

type_line 'while true do end'
check "a Lua loop runs" still_running
T send-keys -t repl C-c
check "Ctrl-C stops a Lua loop with 'interrupted!'" eval 'wait_for "interrupted!" && wait_prompt'
check "2+2 works after the interrupt" run_expect '2+2' '^4$'

type_line 'for i = 1, 1e12 do local t = {i} end'
n=$(nmatch 'interrupted!')
sleep 0.5
T send-keys -t repl C-c
check "Ctrl-C stops a second loop too" eval 'wait_more "interrupted!" $n && wait_prompt'

type_line 'print(type(iddpm), type(iddpm and iddpm.busy))'
wait_for '^table[[:space:]]' 3
if [ -n "${REPL_TEST_BUSY:-}" ] || screen | grep -Eq '^table[[:space:]]+function$'; then
    n=$(nmatch ": interrupted$")
    type_line "$BUSY"
    check "a long C computation runs" still_running
    T send-keys -t repl C-c
    check "Ctrl-C stops a C loop (idd_interrupted)" eval 'wait_more ": interrupted$" $n && wait_prompt'
    check "5*5 works after the C interrupt" run_expect '5*5' '^25$'
else
    echo "ok - # SKIP no iddpm.busy() in this build (set REPL_TEST_BUSY to a long C call)"
fi

T send-keys -t repl -l 'junk text'
sleep 0.3
T send-keys -t repl C-c
check "Ctrl-C at the prompt discards the line" eval 'wait_for "junk text\^C$" && wait_prompt'
check "the next line runs alone" run_expect '5+5' '^10$'

type_line 'function g()'
wait_last '^>> ?$'
T send-keys -t repl C-c
check "Ctrl-C at '>>' drops the pending chunk" wait_prompt
check "the next chunk runs alone" run_expect '7*7' '^49$'

T send-keys -t repl C-d
check "Ctrl-D exits with status 0" wait_exit

hist_has() { grep -qxF -- "$1" "$HIST"; }
check "history file holds the lines typed" eval \
    'hist_has "1+1" && hist_has "function f(x)" && hist_has "return x*2" && hist_has "f(21)" &&
     hist_has "print(\"readline-\" .. \"edit\")" && hist_has "2+2" && hist_has "7*7"'
check "history file leaves out discarded input" eval '! grep -q "junk text" "$HIST"'

# ---- session 2: history is loaded ------------------------------------------------
start_repl
wait_prompt
T send-keys -t repl Up
check "Up recalls the last line of the previous session" wait_last '^> 7\*7$'
T send-keys -t repl Enter
check "the recalled line runs" wait_more '^49$' 0
wait_prompt
T send-keys -t repl C-d
wait_exit
check "a new session appends to the history file" eval \
    '[ "$(grep -cxF "7*7" "$HIST")" = 2 ] && hist_has "1+1"'

# ---- session 3: the history file is capped ---------------------------------------
for i in $(seq 1 1500); do echo "filler$i"; done >>"$HIST"
start_repl
wait_prompt
run_expect '8+8' '^16$' >/dev/null
T send-keys -t repl C-d
wait_exit
check "history file is capped at 1000 lines" eval \
    '[ "$(wc -l <"$HIST")" -le 1000 ] && [ "$(tail -n 1 "$HIST")" = "8+8" ]'

# ---- -e code sees the same globals as the REPL --------------------------------------
check "iddpm -e has the iddpm and help globals" \
    eval '[ "$("$BIN" -e "print(type(iddpm.tensor), type(help))")" = "$(printf "table\tfunction")" ]'
check "iddpm -e prints a tensor's values" \
    eval '"$BIN" -e "print(iddpm.tensor.tensor{1.5, 2})" | grep -qxF "tensor([1.5000, 2.0000], shape=(2), float32, cpu)"'

if [ "$fails" -gt 0 ]; then
    echo "# $fails REPL check(s) failed"
    exit 1
fi
exit 0
