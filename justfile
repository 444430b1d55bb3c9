# tether: a fleet of NATS JetStream bus nodes giving AI agents isolated workspaces.
# `just up` brings the fleet up locally; `just test` runs every test against real parts.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list --unsorted

# Idempotent; quiet when everything is there.
# Install what a fresh machine (Rust + Docker) lacks: nats-server, busybox-static, just, nats-py, mcp
deps:
    scripts/install-deps.sh

# Build every crate and binary (debug).
build:
    cargo build --workspace

# The Python clients are driven from Rust tests, so nextest runs everything. Timeouts and
# threads: .config/nextest.toml. Every binary is built first: cargo builds a package's binaries
# only for that package's own integration tests, and tests/ runs `tether` from tether-cli.
# Unit, integration (real nats-server, real Docker) and interop (Python clients) tests, first
# on Debian's nats-server (2.9), then through test-compat on a current 2.1x server.
# All tests, on nats-server 2.9 and on a current 2.1x
test: deps
    cargo build --workspace --bins
    cargo nextest run --workspace --no-fail-fast
    just test-compat

# The same tests against the current nats-server that scripts/install-deps.sh keeps apart from
# PATH (the code must work on 2.9 and on 2.1x alike); extra arguments go to nextest.
# Every test again, on a current 2.1x nats-server
test-compat *ARGS: deps
    #!/usr/bin/env bash
    set -euo pipefail
    bin="${TETHER_NATS_CURRENT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tether/nats-current}/bin/nats-server"
    echo "test-compat: $("$bin" --version)"
    cargo build --workspace --bins
    TETHER_NATS_SERVER="$bin" cargo nextest run --workspace --no-fail-fast {{ ARGS }}

# Formatting and lints, warnings as errors (what CI checks); no import cycle between the
# orchestrator's modules and no source file over 800 lines (scripts/check-module-cycles.sh).
lint:
    scripts/check-module-cycles.sh
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Each crate's `[[bench]] harness = false` target (crates/*/benches/*.rs) prints its p50/p99 and
# throughput against its baseline; `--bench '*'` runs every such target in the workspace (and
# not the empty libtest bench harness of each lib/bin).
# Run every benchmark target; extra arguments go to cargo (e.g. `just bench -p tether-bus`)
bench *ARGS: deps
    cargo bench --workspace --bench '*' {{ ARGS }}

# Starts nats-server with nats/nats-server.conf when nothing answers at the bus URL; Ctrl-C
# stops everything. Builds every binary first: `tether up` finds the node binaries next to itself.
# Bring the whole fleet up locally from deploy/bringup.toml
up *ARGS: build
    cargo run -q -p tether-cli --bin tether -- up {{ ARGS }}

# The Dockerfile's base images must be available locally (no registry is reachable here).
# Container image of every node from deploy/Dockerfile
image TAG="tether/nodes:dev":
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -f deploy/Dockerfile ]; then
        echo "just image: deploy/Dockerfile is missing; nothing to build" >&2
        exit 1
    fi
    missing=()
    for base in $(awk 'toupper($1) == "FROM" { print $2 }' deploy/Dockerfile | sort -u); do
        # stage names (FROM build AS x; FROM x) are not images
        if grep -qiE "^FROM[[:space:]].*[[:space:]]AS[[:space:]]+${base}([[:space:]]|$)" deploy/Dockerfile; then continue; fi
        docker image inspect "$base" >/dev/null 2>&1 || missing+=("$base")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "just image: base image(s) not available locally: ${missing[*]} (docker pull or docker load them first)" >&2
        exit 1
    fi
    docker build -f deploy/Dockerfile -t "{{ TAG }}" .
