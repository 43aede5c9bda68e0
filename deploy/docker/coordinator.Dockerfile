# syntax=docker/dockerfile:1
# The coordinator image: the CPU build of lorasweep on a slim Debian (the binary is built on
# Debian 12, so its glibc matches). No GPU, no Python: the coordinator only schedules and
# stores. Matches deploy/k8s: user 10001, state on /var/lib/lorasweep, gRPC on 7070,
# /metrics and /healthz on 9090, the token at /etc/lorasweep/token/token.
#
# From the repository root (BuildKit; coordinator.Dockerfile.dockerignore keeps the context
# to the one binary):
#   cargo build --release --bin lorasweep
#   docker build -f deploy/docker/coordinator.Dockerfile -t lorasweep-coordinator .
FROM debian:bookworm-slim

RUN groupadd --gid 10001 lorasweep \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/lorasweep --no-create-home \
        --shell /usr/sbin/nologin lorasweep \
    && mkdir -p /var/lib/lorasweep /etc/lorasweep/token \
    && chown 10001:10001 /var/lib/lorasweep

COPY --chmod=0755 target/release/lorasweep /usr/local/bin/lorasweep

USER 10001:10001
WORKDIR /var/lib/lorasweep
VOLUME /var/lib/lorasweep
EXPOSE 7070 9090
ENTRYPOINT ["/usr/local/bin/lorasweep"]
CMD ["coordinator", "--listen=0.0.0.0:7070", "--metrics-listen=0.0.0.0:9090", \
     "--db=/var/lib/lorasweep/state.db", "--artifacts=/var/lib/lorasweep/artifacts", \
     "--token-file=/etc/lorasweep/token/token"]
