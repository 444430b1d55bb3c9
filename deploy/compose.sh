#!/usr/bin/env bash
# `just compose-up` / `just compose-down`: the fleet of deploy/compose.yaml on this machine.
#
#   deploy/compose.sh up     builds the images when missing (deploy/image.sh), makes the signing
#                            key (.tether/signing-key.pem) and the bus keys (.tether/bus-keys/)
#                            when missing, copies the secrets the containers mount, starts
#                            everything and waits until every container is healthy
#   deploy/compose.sh down   removes the fleet's containers, networks and volumes, and every
#                            container and network the orchestrator made on this host id
#   deploy/compose.sh ARGS   any other compose command for this project (ps, logs -f, ...)
#
# Settings (environment): TETHER_COMPOSE_PROJECT (tether), TETHER_COMPOSE_STATE (the keys'
# directory, .tether), TETHER_IMAGE_TAG (dev),
# TETHER_NATS_PORT (4222; the other two servers take the next two ports), TETHER_MCP_PORT
# (8790), TETHER_A2A_PORT (8791), TETHER_HOST_ID (compose), TETHER_COMPOSE_WAIT (seconds to
# wait for health, 300), TETHER_COMPOSE (the compose command; default `docker compose` when it
# exists, else `docker-compose`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "compose: $*" >&2; exit 1; }

project="${TETHER_COMPOSE_PROJECT:-tether}"
tag="${TETHER_IMAGE_TAG:-dev}"
state="${TETHER_COMPOSE_STATE:-$PWD/.tether}"
export TETHER_IMAGE_TAG="$tag"
export TETHER_HOST_ID="${TETHER_HOST_ID:-compose}"
export TETHER_NATS_PORT="${TETHER_NATS_PORT:-4222}"
export TETHER_NATS_PORT_1=$((TETHER_NATS_PORT + 1)) TETHER_NATS_PORT_2=$((TETHER_NATS_PORT + 2))
export TETHER_COMPOSE_SECRETS="$state/compose/$project"
socket=/var/run/docker.sock
[ -S "$socket" ] || die "no Docker socket at $socket"
TETHER_DOCKER_GID="$(stat -c %g "$socket")"
export TETHER_DOCKER_GID

if [ -n "${TETHER_COMPOSE:-}" ]; then
    read -r -a compose_cmd <<<"$TETHER_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' is installed"
fi
compose() { "${compose_cmd[@]}" -p "$project" -f deploy/compose.yaml "$@"; }

# Runs the image's `tether` as the calling user with .tether/ mounted at /out (no network).
tether_in_image() {
    docker run --rm --network none -u "$(id -u):$(id -g)" -v "$state:/out" \
        "tether/nodes:$tag" tether "$@"
}

up() {
    if ! docker image inspect "tether/nodes:$tag" "tether/nats:$tag" >/dev/null 2>&1; then
        deploy/image.sh "$tag"
    fi
    mkdir -p "$state"
    chmod 700 "$state"
    [ -f "$state/signing-key.pem" ] || tether_in_image keys init --path /out/signing-key.pem
    # Makes the bundle when missing; always writes authorization.conf for this version's nodes.
    tether_in_image bus init --dir /out/bus-keys >/dev/null

    # The containers run as uid 10001 and read their secrets through bind mounts: copies,
    # readable inside, in a directory only the caller can enter.
    rm -rf "$TETHER_COMPOSE_SECRETS"
    mkdir -p -m 700 "$TETHER_COMPOSE_SECRETS"
    cp "$state/signing-key.pem" "$TETHER_COMPOSE_SECRETS/signing-key.pem"
    cp "$state/bus-keys/"*.nk "$state/bus-keys/authorization.conf" "$TETHER_COMPOSE_SECRETS/"
    chmod 444 "$TETHER_COMPOSE_SECRETS"/*

    compose up -d
    wait_healthy
    echo "compose: up (project $project); the bus at nats://127.0.0.1:$TETHER_NATS_PORT,nats://127.0.0.1:$TETHER_NATS_PORT_1,nats://127.0.0.1:$TETHER_NATS_PORT_2"
    echo "compose: TETHER_SIGNING_KEY_FILE=.tether/signing-key.pem tether --server nats://127.0.0.1:$TETHER_NATS_PORT ps"
}

# Waits until every container of the project is running and healthy.
wait_healthy() {
    local deadline=$((SECONDS + ${TETHER_COMPOSE_WAIT:-300})) states bad
    while :; do
        states="$(docker ps -a --filter "label=com.docker.compose.project=$project" \
            --format '{{.Label "com.docker.compose.service"}}: {{.Status}}')"
        bad="$(grep -v '(healthy)' <<<"$states" || true)"
        [ -n "$states" ] && [ -z "$bad" ] && return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$states" >&2
            compose logs --tail 20 >&2 || true
            die "not healthy within ${TETHER_COMPOSE_WAIT:-300} s: $(tr '\n' ';' <<<"$bad")"
        fi
        sleep 2
    done
}

down() {
    compose down --volumes --remove-orphans --timeout 20
    # What the orchestrator made: its containers and session networks carry its host id.
    local made
    made="$(docker ps -aq --filter label=tether.managed=true --filter "label=tether.host=$TETHER_HOST_ID")"
    [ -z "$made" ] || docker rm -f -v $made >/dev/null
    made="$(docker network ls -q --filter "label=tether.host=$TETHER_HOST_ID")"
    [ -z "$made" ] || docker network rm $made >/dev/null
    rm -rf "$TETHER_COMPOSE_SECRETS"
    echo "compose: down (project $project, host id $TETHER_HOST_ID)"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    "") die "usage: deploy/compose.sh up|down|<compose command>" ;;
    *) compose "$@" ;;
esac
