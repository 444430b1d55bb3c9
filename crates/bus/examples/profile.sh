#!/usr/bin/env bash
# Instructions per request of a responder, counted by callgrind (see profile.rs).
#   profile.sh <node|raw> <subject> <requests> <in-flight> [outdir]
# Needs the example built: cargo build --release -p tether-bus --example profile
set -euo pipefail
mode=$1 subject=$2 n=$3 inflight=$4 out=${5:-/tmp/tether-profile}
bin=${CARGO_TARGET_DIR:-target}/release/examples/profile
server=${TETHER_NATS_SERVER:-$HOME/.cache/tether/nats-current/bin/nats-server}
warm=300
mkdir -p "$out"
port=$((20000 + RANDOM % 20000))
"$server" -p "$port" -js -sd "$out/js" >"$out/nats.log" 2>&1 &
srv=$!
url=nats://127.0.0.1:$port
trap 'kill $srv 2>/dev/null || true' EXIT
until grep -qs "Server is ready" "$out/nats.log"; do sleep 0.1; kill -0 $srv; done
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/cg.$mode.%p" \
  "$bin" "$mode" "$url" $((warm + n)) "$out/token" >"$out/responder.log" 2>&1 &
vg=$!
until grep -qs ready "$out/responder.log"; do sleep 0.2; kill -0 $vg; done
tok=()
[ "$mode" = node ] && tok=("$out/token")
[ -n "${TOKEN:-}" ] && tok=("$TOKEN")
"$bin" client "$url" "$subject" $warm 1 "${tok[@]}"
callgrind_control -i on $vg >/dev/null
"$bin" client "$url" "$subject" "$n" "$inflight" "${tok[@]}"
wait $vg
f=$(ls -t "$out"/cg.$mode.* | head -1)
total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
echo "$mode $subject n=$n inflight=$inflight: $total Ir, $((total / n)) Ir/request ($f)"
