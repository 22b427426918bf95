#!/usr/bin/env bash
# standalone_test.sh — the repository stands alone: no file of it names a path outside it
# (a sibling shared/ folder, a work folder or a repository mirror of the machine it was
# written on), a tracker's issue number, or a Markdown document that is not in it.
#
#   tests/standalone_test.sh [ignored]       (run from anywhere; tests/run.sh passes the binary)
#
# Files scanned: git's tracked and untracked-but-not-ignored files (so a new file is caught
# before it is committed); outside a git checkout, every file under the root except build
# outputs, this script included: its patterns and planted samples are spelt so that they do
# not match themselves (a bracket class, a split string). Binary files are skipped.
# First it checks the scanner on a planted file in a temporary folder, so the test can
# fail. Prints "ok - ..." / "not ok - ..." lines and the offending lines; exits 1 on any.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
fails=0

# one extended regular expression per kind of forbidden reference (matched without case)
PATTERNS=(
    '\.\./share[d]'            # a folder beside the repository
    '/wor[k]/'                 # this machine's work folders
    'share[d]/reference'       # the reference folder outside the repository
    '\.mirro[r]'               # local mirrors of other repositories
    'issu[e] #?[0-9]'          # an issue number, with or without '#', any case
)

list_files() { # list_files DIR: the files to scan, relative to DIR, one per line
    if git -C "$1" rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
        [ "$(git -C "$1" rev-parse --show-toplevel)" = "$(cd "$1" && pwd -P)" ]; then
        git -C "$1" ls-files --cached --others --exclude-standard
    else
        (cd "$1" && find . -type f -not -path './.git/*' -not -path './build/*' -not -name '*.o' \
            -not -name iddpm -not -name iddpm.so | sed 's|^\./||')
    fi
}

scan() { # scan DIR: print "path:line: text" for every forbidden reference; status 1 if any
    local dir=$1 args=() pat docs out
    for pat in "${PATTERNS[@]}"; do args+=(-e "$pat"); done
    docs=$(list_files "$dir" | grep -E '\.md$' | sed 's|.*/||' | sort -u)
    out=$(list_files "$dir" | (cd "$dir" && xargs -r -d '\n' grep -snHIiE "${args[@]}" --) |
        cut -c1-200)
    # a Markdown document named here must be one of the repository's (by file name)
    out+=$'\n'$(list_files "$dir" |
        (cd "$dir" && xargs -r -d '\n' grep -snHIoE '[A-Za-z0-9_./-]+\.md\b' --) |
        awk -F: -v docs="$docs" 'BEGIN { n = split(docs, d, "\n"); for (i = 1; i <= n; i++) ok[d[i]] = 1 }
            { m = $3; sub(/.*\//, "", m); if (!(m in ok)) print $1 ":" $2 ": names " $3 ", not in the repository" }')
    out=$(grep -v '^$' <<<"$out")
    [ -z "$out" ] && return 0
    printf '%s\n' "$out"
    return 1
}

report() { # report STATUS DESCRIPTION
    if [ "$1" -eq 0 ]; then echo "ok - $2"; else echo "not ok - $2"; fails=$((fails + 1)); fi
}

# the scanner itself: a clean tree passes, each kind of planted reference is caught
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/tree/src"
printf 'clean text, see README.md\n' >"$TMP/tree/src/a.c"
printf '# readme\n' >"$TMP/tree/README.md"
scan "$TMP/tree" >/dev/null
report $? "scanner: a clean tree passes"
for planted in 'see ../sha''red/reference/x.json' 'path /wo''rk/main/x' 'fixed in iss''ue #12' 'as in Iss''ue 4' \
    'from the .mir''ror folder' 'see docs/NOTES''.md'; do
    printf '%s\n' "$planted" >"$TMP/tree/src/b.lua"
    out=$(scan "$TMP/tree")
    st=$?
    [ $st -ne 0 ] && grep -q '^src/b.lua:1:' <<<"$out"
    report $? "scanner: catches a planted \"$planted\""
done

# the repository
out=$(scan "$ROOT")
st=$?
if [ $st -ne 0 ]; then
    echo "# forbidden references (name what the thing is instead):"
    sed 's/^/#   /' <<<"$out"
fi
[ $st -eq 0 ]
report $? "repository names no outside path, issue number or missing document ($(list_files "$ROOT" | wc -l) files)"

[ "$fails" -eq 0 ]
