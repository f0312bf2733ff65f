# turnserver container image.
#
#   docker build -t turnserver .
#   docker run --network host -v /etc/turnserver:/etc/turnserver:ro turnserver
#
# Networking: TURN hands clients relay addresses; with --network host the container
# binds the host's addresses directly and the whole relay range just works (recommended).
# Without it, publish the listeners and the relay range and advertise the host address:
#   docker run -p 3478:3478/udp -p 3478:3478/tcp -p 5349:5349/tcp \
#     -p 49152-49407:49152-49407/udp -p 9641:9641/tcp turnserver \
#     serve --config /etc/turnserver/turnserver.yaml --min-port 49152 --max-port 49407 \
#     --external-ip <host public IP>
# (publishing thousands of ports is slow in Docker: keep the range small, or use host).
# The image's example config names relay.ip 192.0.2.10, a placeholder: the server
# refuses to start until it is an address of the host (mount your own config, or add
# --relay-ip <host address> to the command).
#
# Ports: 3478/udp and 3478/tcp (TURN, STUN), 5349/tcp (TURN over TLS), the relay range
# (UDP, default 49152-65535), 9641/tcp (metrics, /healthz, /readyz), and the credentials
# API if api.listen is set. Mount the config (and certificates) read-only at
# /etc/turnserver; the image runs as an unprivileged user.

# The kernel fast path's BPF object is compiled here; the server loads it through
# libbpf.so.1 at run time (relay.offload), with no compiler in the final image.
FROM debian:bookworm-slim AS bpf
RUN apt-get update && apt-get install -y --no-install-recommends clang libbpf-dev \
    && rm -rf /var/lib/apt/lists/*
COPY turnserver/io/bpf/channel_relay.bpf.c /src/
RUN clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu \
    -c /src/channel_relay.bpf.c -o /src/channel_relay.bpf.o

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY turnserver ./turnserver
COPY --from=bpf /src/channel_relay.bpf.o ./turnserver/io/bpf/
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libbpf1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin turnserver \
    && mkdir -p /etc/turnserver
COPY --from=build /install /usr/local
COPY config/turnserver.yaml /etc/turnserver/turnserver.yaml
USER turnserver
EXPOSE 3478/udp 3478/tcp 5349/tcp 9641/tcp
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9641/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["turnserver"]
CMD ["serve", "--config", "/etc/turnserver/turnserver.yaml"]
