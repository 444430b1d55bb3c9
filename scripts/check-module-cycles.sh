#!/usr/bin/env bash
# Checks two rules of the codebase (run by `just lint`):
#  1. No two modules of the container-orchestrator import each other. A module is a file
#     src/<m>.rs together with its folder src/<m>/ (a folder module counts as one module);
#     "imports" is any `crate::<m>` path in its code, `use` lines or inline.
#  2. No source file in crates/*/src is over 800 lines.
# Exits 1 and names every offender.
set -euo pipefail
cd "$(dirname "$0")/.."

max_lines=800
status=0

# `use crate::{a, b}` would hide which modules are imported from the grep below.
if grep -rnE 'crate::\{' crates/container-orchestrator/src --include='*.rs'; then
    echo "check-module-cycles: write one \`use crate::<module>::...\` per module (above)" >&2
    status=1
fi

src=crates/container-orchestrator/src
edges=$(
    for f in $(find "$src" -name '*.rs' | sort); do
        rel=${f#"$src"/}
        from=${rel%%/*}
        from=${from%.rs}
        case $from in lib | main) continue ;; esac
        grep -oE 'crate::[a-z_][a-z0-9_]*' "$f" | sed "s/^crate::/$from /" || true
    done | awk '$1 != $2' | sort -u
)
cycles=$(awk '{ e[$1 " " $2] = 1 } END { for (k in e) { split(k, p, " "); if (p[1] < p[2] && ((p[2] " " p[1]) in e)) print p[1] " <-> " p[2] } }' <<<"$edges" | sort)
if [[ -n $cycles ]]; then
    echo "check-module-cycles: modules of the orchestrator that import each other:" >&2
    echo "$cycles" >&2
    status=1
fi

long=$(find crates/*/src -name '*.rs' -print0 | xargs -0 wc -l | awk -v max="$max_lines" '$2 != "total" && $1 > max { print "  " $2 ": " $1 " lines" }')
if [[ -n $long ]]; then
    echo "check-module-cycles: source files over $max_lines lines:" >&2
    echo "$long" >&2
    status=1
fi

exit $status
