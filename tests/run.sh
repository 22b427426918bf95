#!/bin/sh
# tests/run.sh — run every test program and script, count "ok"/"not ok" lines, and
# finish with "N passed, M failed". A program that exits non-zero without reporting
# a failure (a crash, an uncaught Lua error) counts as one failure.
# Environment: BUILD (build dir with tests/), IDDPM (the program), TESTS (a filter).
BUILD=${BUILD:-build/release}
IDDPM=${IDDPM:-./iddpm}
LOG=$(mktemp)
export LUA_PATH="tests/lua/?.lua;;"
pass=0; fail=0
run_one() {   # name, command...
    name=$1; shift
    start=$(date +%s)
    "$@" >"$LOG" 2>&1
    rc=$?
    p=$(grep -c '^ok ' "$LOG"); f=$(grep -c '^not ok ' "$LOG")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "not ok - $name exited with status $rc" >>"$LOG"; fi
    pass=$((pass + p)); fail=$((fail + f))
    printf '%-40s %4d passed %3d failed  %3ds\n' "$name" "$p" "$f" $(( $(date +%s) - start ))
    [ "$f" -gt 0 ] && grep -E '^not ok |rror|Assertion|Sanitizer' "$LOG" | head -20 | sed 's/^/    /'
}
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    case "$t" in *"${TESTS:-}"*) run_one "$(basename "$t")" "$t" ;; esac
done
for t in tests/lua/test_*.lua; do
    [ -f "$t" ] || continue
    case "$t" in *"${TESTS:-}"*) run_one "$(basename "$t")" "$IDDPM" run "$t" ;; esac
done
for t in tests/*_test.sh; do
    [ -f "$t" ] || continue
    case "$t" in *"${TESTS:-}"*) run_one "$(basename "$t")" bash "$t" "$IDDPM" ;; esac
done
rm -f "$LOG"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
