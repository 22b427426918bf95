#!/usr/bin/env bash
# program_test.sh — the iddpm command line without a terminal: run/FILE.lua and `arg`,
# -e, --version, help, usage errors, stdin scripts, piped -i, IDDPM_LUA_PATH, the
# sample/train shorthands and SIGINT during a script.
#
#   tests/program_test.sh path/to/iddpm
#
# Prints "ok - ..." / "not ok - ..." lines; exits 1 if any check failed.
set -u
BIN=$(realpath "${1:?usage: $0 path/to/iddpm}")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0
OUT=$TMP/out
ERR=$TMP/err

check() { # check DESCRIPTION COMMAND...
    local desc=$1
    shift
    if "$@"; then
        echo "ok - $desc"
    else
        echo "not ok - $desc"
        fails=$((fails + 1))
        sed 's/^/#   out: /' "$OUT" | head -n 10
        sed 's/^/#   err: /' "$ERR" | head -n 10
    fi
}
# r ARGS...: run iddpm, stdout/stderr to files; sets $rc.
r() {
    "$BIN" "$@" >"$OUT" 2>"$ERR" </dev/null
    rc=$?
}
out_is() { [ "$(cat "$OUT")" = "$1" ]; }
has() { grep -qF -- "$2" "$1"; }

cat >"$TMP/args.lua" <<'EOF'
local t = {}
for i = -2, #arg do t[#t + 1] = tostring(arg[i]) end
print(table.concat(t, " "))
print(select("#", ...), ...)
EOF
cd "$TMP"
r run args.lua a b=2
check "run: arg[-2..n] and ... as lua.c gives them" \
    out_is "$(printf '%s\n%s' "$BIN run args.lua a b=2" "2	a	b=2")"
r args.lua x
check "FILE.lua works without run" out_is "$(printf '%s\n%s' "nil $BIN args.lua x" "1	x")"

echo 'local function f() error("bad thing") end f()' >err.lua
r run err.lua
check "a script error exits 1 with 'iddpm: msg' and a traceback" \
    eval '[ $rc = 1 ] && has "$ERR" "iddpm: err.lua:1: bad thing" && has "$ERR" "stack traceback:"'
r run missing.lua
check "a missing script exits 1 and says so" eval '[ $rc = 1 ] && has "$ERR" "cannot open missing.lua"'

r -e 'x = 20' -e 'print(x + 1)'
check "-e runs code in order" eval '[ $rc = 0 ] && out_is 21'
r -e 'error("e-fail")'
check "-e errors exit 1" eval '[ $rc = 1 ] && has "$ERR" "iddpm: (command line):1: e-fail"'
r -e 'require("iddpm.config").error("bad value")'
check "a user error exits 2 with 'iddpm: msg' and no traceback" \
    eval '[ $rc = 2 ] && [ "$(cat "$ERR")" = "iddpm: bad value" ]'
IDDPM_DEBUG=1 "$BIN" -e 'require("iddpm.config").error("bad value")' >"$OUT" 2>"$ERR" </dev/null
rc=$?
check "IDDPM_DEBUG=1: a user error shows its traceback" eval '[ $rc = 2 ] && has "$ERR" "stack traceback:"'
r -e 'require("iddpm.config").error("stopped", 130)'
check "a user error carries its exit status" eval '[ $rc = 130 ] && has "$ERR" "iddpm: stopped"'
r -e 'local m = require "iddpm"; print(type(m), m == iddpm)'
check "-e code has the global iddpm, as the REPL" eval '[ $rc = 0 ] && out_is "table	true"'
echo 'print(type(require "iddpm"), iddpm)' >"$TMP/noglobal.lua"
r run "$TMP/noglobal.lua"
check "scripts require iddpm; no global iddpm in a script" eval '[ $rc = 0 ] && out_is "table	nil"'

r --version
check "--version prints 'iddpm V (Lua 5.4.x)'" \
    eval '[ $rc = 0 ] && grep -Eq "^iddpm [0-9]+\.[0-9]+\.[0-9]+.* \(Lua 5\.4\.[0-9]+\)$" "$OUT"'
for h in --help help; do
    r $h
    check "$h lists every command and points at the README" eval \
        '[ $rc = 0 ] && has "$OUT" "run FILE.lua" && has "$OUT" "sample" && has "$OUT" "train" &&
         has "$OUT" "-e CODE" && has "$OUT" "-i" && has "$OUT" "--version" && has "$OUT" "README"'
done
r --frobnicate
check "an unknown option exits 2 with the usage" \
    eval '[ $rc = 2 ] && has "$ERR" "unknown option '"'"'--frobnicate'"'"'" && has "$ERR" "usage:"'
r frobnicate
check "an unknown command exits 2 with the usage" \
    eval '[ $rc = 2 ] && has "$ERR" "unknown command" && has "$ERR" "usage:"'
r run
check "run without a script exits 2" eval '[ $rc = 2 ]'

echo 'print("from stdin", ...)' | "$BIN" >"$OUT" 2>"$ERR"
check "stdin that is not a terminal runs as a script" out_is "from stdin"
printf '1+1\n=2*3\nfunction f(x)\nreturn x*2\nend\nprint(f(21))\n' | "$BIN" -i >"$OUT" 2>"$ERR"
check "-i with piped input prints results and handles multi-line chunks" \
    eval 'has "$OUT" "> 2" && has "$OUT" "> 6" && has "$OUT" "42"'

mkdir -p dev/iddpm
echo 'return { where = "dev" }' >dev/iddpm/devonly.lua
IDDPM_LUA_PATH="$TMP/dev/?.lua" "$BIN" -e \
    'print(package.path:find(os.getenv("IDDPM_LUA_PATH"), 1, true), require("iddpm.devonly").where)' \
    >"$OUT" 2>"$ERR"
check "IDDPM_LUA_PATH is prepended to package.path" out_is "1	dev"

for cmd in sample train; do
    r $cmd --definitely-not-an-option=1
    check "'$cmd' runs its recipe or says it is not available" \
        eval '[ $rc = 0 ] || has "$ERR" "not available" || has "$ERR" "iddpm: "'
done

echo 'while true do end' >loop.lua
"$BIN" run loop.lua >"$OUT" 2>"$ERR" &
pid=$!
sleep 0.5
kill -INT $pid
wait $pid
rc=$?
check "SIGINT stops a script: exit 1 with 'interrupted!'" \
    eval '[ $rc = 1 ] && has "$ERR" "iddpm: interrupted!"'

if [ "$fails" -gt 0 ]; then
    echo "# $fails program check(s) failed"
    exit 1
fi
exit 0
