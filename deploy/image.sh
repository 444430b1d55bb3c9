#!/usr/bin/env bash
# `just image`: the node image and the NATS server image, built on a machine with Docker and no
# registry. Nothing is compiled inside a container: the release binaries are built once on the
# host (cargo, `target/release`), and each image is `FROM scratch` with the binaries, exactly
# the shared libraries they load (read off `ldd`), a passwd entry for uid 10001 and the CA
# bundle. The root filesystem is staged under target/image/ and reused while nothing changed.
#
#   deploy/image.sh [TAG]                 tether/nodes:TAG and tether/nats:TAG (TAG: dev)
#   TETHER_IMAGE_BASE=debian:bookworm-slim deploy/image.sh
#                                         the same binaries on a registry base of your choice
#                                         (its glibc must be at least the build host's); only
#                                         the binaries are copied then
#   TETHER_NATS_SERVER=/path/nats-server  the nats-server binary to put in tether/nats
#                                         (default: the one scripts/install-deps.sh keeps)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tag="${1:-dev}"
base="${TETHER_IMAGE_BASE:-scratch}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/tether"
nats_bin="${TETHER_NATS_SERVER:-$cache/nats-current/bin/nats-server}"
busybox="${TETHER_BUSYBOX:-/bin/busybox}"
target="${CARGO_TARGET_DIR:-target}"
stage="$target/image"
nodes=(permission-node container-orchestrator shell-server model-gateway a2a-gateway tether)
uid=10001

die() { echo "just image: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed"
[ -x "$nats_bin" ] || die "no nats-server at $nats_bin (run scripts/install-deps.sh or set TETHER_NATS_SERVER)"
[ -x "$busybox" ] || die "no static busybox at $busybox (Debian's busybox-static; the NATS image's health check uses its wget)"

echo "image: cargo build --release (${nodes[*]})"
cargo build --release --locked $(printf -- '--bin %s ' "${nodes[@]}")
# The space daemon the orchestrator puts into space containers, static (their images may have
# no libc; `just spaced`): next to the orchestrator, where it looks for it.
echo "image: cargo build --release tether-spaced (static)"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p tether-space-daemon --bin tether-spaced
spaced="$target/x86_64-unknown-linux-gnu/release/tether-spaced"

# Copies a file to the same path under the root filesystem $1, following symlinks.
put() {
    local root="$1" src="$2" dst="${3:-$2}"
    mkdir -p "$root$(dirname "$dst")"
    cp -L --preserve=mode "$src" "$root$dst"
}

# The shared libraries a dynamically linked binary loads, and its loader, as absolute paths.
libs_of() {
    ldd "$1" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' || true
}

# A root filesystem for uid 10001: /etc/passwd, /etc/group, nsswitch (files then DNS), /tmp.
base_fs() {
    local root="$1"
    mkdir -p "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/:/sbin/nologin\ntether:x:%d:%d:tether:/tmp:/sbin/nologin\n' "$uid" "$uid" >"$root/etc/passwd"
    printf 'root:x:0:\ntether:x:%d:\n' "$uid" >"$root/etc/group"
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

rm -rf "$stage"
mkdir -p "$stage/nodes/rootfs" "$stage/nats/rootfs"

# tether/nodes: every node binary and the CLI (`tether ping` is the containers' health check).
root="$stage/nodes/rootfs"
for n in "${nodes[@]}"; do
    put "$root" "$target/release/$n" "/usr/local/bin/$n"
    # Symbols are for debugging the host's copy; panics still name their file and line.
    strip --strip-unneeded "$root/usr/local/bin/$n"
done
put "$root" "$spaced" /usr/local/bin/tether-spaced
strip --strip-unneeded "$root/usr/local/bin/tether-spaced"
if [ "$base" = scratch ]; then
    base_fs "$root"
    for n in "${nodes[@]}"; do
        for lib in $(libs_of "$target/release/$n"); do put "$root" "$lib"; done
    done
    # The model gateway's HTTPS back ends are checked against the system's CA bundle.
    ca=/etc/ssl/certs/ca-certificates.crt
    [ -f "$ca" ] && put "$root" "$ca"
fi

# tether/nats: the nats-server binary (static) and busybox's wget for the health check.
root="$stage/nats/rootfs"
put "$root" "$nats_bin" /usr/local/bin/nats-server
put "$root" "$busybox" /bin/busybox
ln -s busybox "$root/bin/wget"
if [ "$base" = scratch ]; then
    base_fs "$root"
    for lib in $(libs_of "$nats_bin"); do put "$root" "$lib"; done
fi
# JetStream's store (copied apart, owned by uid 10001: a named volume mounted there starts so).
mkdir -p "$stage/nats/data/jetstream"

build() { # name dockerfile
    echo "image: tether/$1:$tag (FROM $base)"
    # The files are owned by whoever built them; in the image they are root's, read-only to
    # uid 10001 except /tmp and /data (see the Dockerfiles).
    docker build -q --build-arg "BASE=$base" -f "$2" -t "tether/$1:$tag" "$stage/$1" >/dev/null
}
build nodes deploy/Dockerfile
build nats deploy/nats.Dockerfile

for i in nodes nats; do
    size=$(docker image inspect -f '{{.Size}}' "tether/$i:$tag")
    printf 'image: tether/%s:%s  %d MB\n' "$i" "$tag" $(((size + 524288) / 1048576))
done
