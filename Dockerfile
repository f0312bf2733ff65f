# turnserver container image (docs/install.md "Container" has the whole story).
#
#   podman build --format docker -t turnserver .        (or: docker build -t turnserver .)
#   docker run -d --name turn --network host --stop-timeout 75 \
#       -v /etc/turnserver:/etc/turnserver:ro turnserver
#
# Configuration: mount a directory at /etc/turnserver holding turnserver.yaml (start
# from config/turnserver.yaml, the reference: it names relay.ip 192.0.2.10 and
# /etc/turnserver/secrets, which you replace) and what it names (secrets file,
# certificates). `docker run --rm -v ... turnserver check-config /etc/turnserver/turnserver.yaml`
# checks it without starting.
#
# Networking: TURN hands clients relay addresses; with --network host the container
# binds the host's addresses directly and the whole relay range just works (recommended).
# On a bridge network the relay address must be the container's own, so give it a fixed
# one, publish the listeners and a small relay range, and advertise the host's address:
#   docker network create --subnet 172.30.0.0/24 turn
#   docker run --network turn --ip 172.30.0.10 -p 3478:3478/udp -p 3478:3478/tcp \
#     -p 49152-49407:49152-49407/udp -p 127.0.0.1:9641:9641/tcp ... turnserver \
#     serve --config /etc/turnserver/turnserver.yaml --relay-ip 172.30.0.10 \
#     --external-ip <host public IP> --min-port 49152 --max-port 49407 \
#     --metrics-listen 0.0.0.0:9641
# (metrics listen on 127.0.0.1 by default, which a published port cannot reach; publish
# 9641 on the host's loopback or a private address only. Publishing thousands of ports
# is slow in Docker: keep the range small, or use host networking.)
#
# Stopping: SIGTERM drains (readiness off, new allocations refused, live calls end or
# drain.timeout passes, 60 s by default). Docker and podman wait 10 s before SIGKILL:
# run with --stop-timeout 75 (compose: stop_grace_period: 75s; Kubernetes:
# terminationGracePeriodSeconds: 90), or shorten drain.timeout to fit.
#
# Health: HEALTHCHECK runs `turnserver healthcheck`, which asks the /healthz of this
# container's server wherever metrics.listen puts it (the server records it in
# /tmp/turnserver-<uid>/state.json; with --read-only add --tmpfs /tmp).
#
# The kernel fast path (relay.offload: auto, the default; README "Kernel fast path") needs
# CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, which a non-root user in a container never
# gets, and a seccomp profile that allows bpf(2):
#   docker run --network host --user root --cap-add BPF --cap-add NET_ADMIN \
#       --cap-add PERFMON --security-opt seccomp=unconfined ... turnserver \
#       serve --config /etc/turnserver/turnserver.yaml --offload auto
# Without them `--offload auto` says what is missing and relays in user space.
#
# Ports: 3478/udp and 3478/tcp (TURN, STUN), 5349/tcp (TURN over TLS), the relay range
# (UDP, default 49152-65535), 9641/tcp (metrics, /healthz, /readyz; 127.0.0.1 unless
# metrics.listen says otherwise), and the credentials API if api.listen is set.

# Installs the package and its pinned dependencies into a virtualenv that the final
# stage copies. The kernel fast path's BPF object ships compiled in the package
# (turnserver/io/kernel/channel_relay.bpf.o, checked against its source by the tests).
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/turnserver
COPY constraints.txt ./
COPY pyproject.toml README.md ./
COPY turnserver ./turnserver
RUN /opt/turnserver/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c constraints.txt .

FROM python:3.11-slim
# libbpf1: the kernel fast path loads its program through libbpf.so.1
RUN apt-get update && apt-get install -y --no-install-recommends libbpf1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin turnserver \
    && mkdir -p /etc/turnserver
COPY --from=build /opt/turnserver /opt/turnserver
COPY config/turnserver.yaml /etc/turnserver/turnserver.yaml
ENV PATH=/opt/turnserver/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
USER turnserver
EXPOSE 3478/udp 3478/tcp 5349/tcp 9641/tcp
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["turnserver", "healthcheck", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["turnserver"]
CMD ["serve", "--config", "/etc/turnserver/turnserver.yaml"]
