# tether: a fleet of NATS JetStream bus nodes giving AI agents isolated workspaces.
# `just up` brings the fleet up locally; `just test` runs every test against real parts.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list --unsorted

# Idempotent; quiet when everything is there.
# Install what a fresh machine (Rust + Docker) lacks: nats-server 2.15 + 2.10, busybox-static, just, nats-py, mcp
deps:
    scripts/install-deps.sh

# Build every crate and binary (debug).
build:
    cargo build --workspace

# The space daemon as a static binary (glibc, crt-static): what the orchestrator puts into space
# containers, whose images may have no libc at all. Only the target's own crates get the flag
# (`--target`), so build scripts and proc macros stay dynamic. `--release` for the benches.
# The static space daemon, target/x86_64-unknown-linux-gnu/<profile>/tether-spaced
spaced *ARGS:
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" cargo build --target x86_64-unknown-linux-gnu -p tether-space-daemon --bin tether-spaced {{ ARGS }}

# The nats-server lines scripts/install-deps.sh keeps apart from PATH (tether needs >= 2.10, for
# auth callout): the current one (2.15.1) and the oldest supported one (2.10.26).
nats_current := env("TETHER_NATS_CURRENT_DIR", env("XDG_CACHE_HOME", env("HOME") / ".cache") / "tether/nats-current") / "bin/nats-server"
nats_oldest := env("TETHER_NATS_OLDEST_DIR", env("XDG_CACHE_HOME", env("HOME") / ".cache") / "tether/nats-2.10") / "bin/nats-server"

# The Python clients are driven from Rust tests, so nextest runs everything. Timeouts and
# threads: .config/nextest.toml. Every binary is built first: cargo builds a package's binaries
# only for that package's own integration tests, and tests/ runs `tether` from tether-cli.
# Unit, integration (real nats-server, real Docker) and interop (Python clients) tests, first
# on the current nats-server line (2.15.1), then through test-compat on the oldest supported
# one (2.10.26). TETHER_NATS_SERVER is set for both, so `tether up` in tests/ finds it too.
# Space containers run the space daemon in tests (`just spaced`), so exec takes its path; the
# exec, shell and MCP tests then run again with TETHER_TEST_SPACE_DAEMON=off, on the engine's
# exec API (`exec_engine_filter`).
# All tests, on nats-server 2.15 (current) and then on 2.10 (oldest supported)
test: deps
    @echo "test: $({{ quote(nats_current) }} --version)"
    cargo build --workspace --bins
    just spaced
    deploy/image.sh dev
    TETHER_NATS_SERVER={{ quote(nats_current) }} cargo nextest run --workspace --no-fail-fast
    TETHER_TEST_SPACE_DAEMON=off TETHER_NATS_SERVER={{ quote(nats_current) }} cargo nextest run --workspace --no-fail-fast -E {{ quote(exec_engine_filter) }}
    just test-compat

# The test binaries of exec, shell and MCP: what runs a second time on the engine's exec path.
exec_engine_filter := "(package(tether-container-orchestrator) & binary(orchestrator)) | package(tether-shell-server)"

# The same tests against the oldest supported nats-server (2.10.26) that
# scripts/install-deps.sh keeps apart from PATH; extra arguments go to nextest. The compose
# test is not among them: its fleet runs the nats-server of the image (`just image`).
# Every test again, on the oldest supported nats-server (2.10)
test-compat *ARGS: deps
    @echo "test-compat: $({{ quote(nats_oldest) }} --version)"
    cargo build --workspace --bins
    just spaced
    TETHER_NATS_SERVER={{ quote(nats_oldest) }} cargo nextest run --workspace --no-fail-fast -E 'not binary(compose)' {{ ARGS }}

# Formatting and lints, warnings as errors (what CI checks); no import cycle between the
# orchestrator's modules and no source file over 800 lines (scripts/check-module-cycles.sh).
lint:
    scripts/check-module-cycles.sh
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Renders deploy/k8s with `kubectl kustomize`, validates every object against Kubernetes
# 1.30's schemas (kubernetes-validate, strict) and checks what schemas cannot: non-root
# read-only containers, probes, the bus URL, the orchestrator's socket and host id, a 3-member
# NATS (scripts/check-k8s.py). `just test` runs the same check (tests/k8s.rs).
# Render and validate the Kubernetes manifests (deploy/k8s)
k8s-check: deps
    python3 scripts/check-k8s.py deploy/k8s

# Each crate's `[[bench]] harness = false` target (crates/*/benches/*.rs) prints its p50/p99 and
# throughput against its baseline; `--bench '*'` runs every such target in the workspace (and
# not the empty libtest bench harness of each lib/bin). The release binaries are built first:
# benches that run a node or worker binary (benches/workers.rs) take it from target/release.
# Run every benchmark target; extra arguments go to cargo instead of `--workspace` (e.g.
# `just bench -p tether-bus`)
bench *ARGS: deps
    cargo build --release --workspace --bins
    just spaced --release
    cargo bench {{ if ARGS == "" { "--workspace" } else { "" } }} --bench '*' {{ ARGS }}

# Starts nats-server with nats/nats-server.conf when nothing answers at the bus URL (the current
# line from scripts/install-deps.sh unless TETHER_NATS_SERVER names another); Ctrl-C stops
# everything. Builds every binary first: `tether up` finds the node binaries next to itself.
# Bring the whole fleet up locally from deploy/bringup.toml
up *ARGS: build
    TETHER_NATS_SERVER="${TETHER_NATS_SERVER:-{{ nats_current }}}" cargo run -q -p tether-cli --bin tether -- up {{ ARGS }}

# No registry needed: release binaries built once on the host, FROM scratch with exactly the
# libraries they load (deploy/image.sh; TETHER_IMAGE_BASE=<image> puts them on a base of yours).
# Images tether/nodes:TAG (every node, the CLI) and tether/nats:TAG (nats-server); sizes printed
image TAG="dev": deps
    deploy/image.sh {{ TAG }}

# Makes .tether/signing-key.pem and the bus keys when missing; settings in deploy/compose.sh.
# Then `TETHER_SIGNING_KEY_FILE=.tether/signing-key.pem tether --server nats://127.0.0.1:4222 ps`.
# 3-node NATS cluster and the whole fleet in Docker (deploy/compose.yaml), healthy when it returns
compose-up:
    deploy/compose.sh up

# Remove the compose fleet: containers, networks, volumes, and what its orchestrator made
compose-down:
    deploy/compose.sh down
