# tether: a fleet of NATS JetStream bus nodes giving AI agents isolated workspaces.
# `just up` brings the fleet up locally; `just test` runs every test against real parts.

set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# Install what a fresh machine (Rust + Docker) lacks: nats-server, busybox-static, just, nats-py, mcp.
deps:
    scripts/install-deps.sh

build:
    cargo build --workspace --bins

# Bring the whole fleet up from deploy/bringup.toml (starts nats-server when none answers).
up *ARGS: build
    target/debug/tether up {{ARGS}}

# All tests: unit, integration (real nats-server, real Docker) and interop (Python clients).
test: deps
    # Process-level tests run the workspace's binaries (tether, permission-node, …): build them all.
    cargo build --workspace --bins
    cargo nextest run --workspace --no-fail-fast

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks: each node's bench target prints p50/p99 and throughput against its baseline.
bench: deps
    cargo bench --workspace

# Container images of the nodes (needs a base image available locally; see deploy/Dockerfile).
image:
    docker build -f deploy/Dockerfile -t tether/nodes:dev .
