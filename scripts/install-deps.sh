#!/usr/bin/env bash
# Installs what a fresh Debian machine with Rust and Docker lacks for tether's tests, idempotently:
# nats-server and busybox-static (Debian), just + nats-py + mcp (PyPI), cargo-nextest (crates.io).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else echo "install-deps: not root and no sudo" >&2; exit 1; fi
fi

apt_pkgs=()
command -v nats-server >/dev/null 2>&1 || apt_pkgs+=(nats-server)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx httpd || apt_pkgs+=(busybox-static)
command -v docker >/dev/null 2>&1 || echo "install-deps: warning: docker CLI not found (the engine is expected to be running)" >&2
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  echo "install-deps: apt-get install ${apt_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

py_pkgs=()
command -v just >/dev/null 2>&1 || py_pkgs+=(rust-just)
python3 -c 'import nats' >/dev/null 2>&1 || py_pkgs+=(nats-py)
python3 -c 'import mcp' >/dev/null 2>&1 || py_pkgs+=("mcp>=2")
if [ "${#py_pkgs[@]}" -gt 0 ]; then
  echo "install-deps: pip install ${py_pkgs[*]}"
  python3 -m pip install -q --disable-pip-version-check "${py_pkgs[@]}"
  hash -r
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-nextest"
  cargo install -q cargo-nextest --locked
fi
echo "install-deps: ok ($(nats-server --version 2>&1 | head -1); just $(just --version 2>/dev/null | cut -d' ' -f2))"
