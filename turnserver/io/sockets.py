"""Binding the sockets every transport uses: non-blocking, IPv6-only for IPv6."""

from __future__ import annotations

import socket


def bind_socket(
    host: str, port: int, kind: int, *, reuse_port: bool = False, reuse_addr: bool = False
) -> socket.socket:
    """A non-blocking socket of `kind` bound to host:port (raises OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # non-blocking from the socket(2) call: one syscall fewer than setblocking(False)
    # for each relay an Allocate opens
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _socket_kind(scheme: str) -> int:
    return socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM


def bind_listener_group(
    scheme: str, host: str, port: int, count: int, *, backlog: int = 1024
) -> list[socket.socket]:
    """`count` SO_REUSEPORT sockets on one listener address, one per worker process.

    The port is first bound without SO_REUSEPORT, so that start-up fails with
    EADDRINUSE when anything else (another instance of ours included) holds it: with
    SO_REUSEPORT alone, a second server of the same user would silently join the group
    and take a share of the traffic. TCP sockets are listening when returned, so
    connections queue while a worker restarts."""
    kind = _socket_kind(scheme)
    probe = bind_socket(host, port, kind, reuse_addr=kind == socket.SOCK_STREAM)
    port = probe.getsockname()[1]  # port 0: the kernel's choice, shared by the group
    probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = bind_socket(
                host, port, kind, reuse_port=True, reuse_addr=kind == socket.SOCK_STREAM
            )
            group.append(sock)
            if kind == socket.SOCK_STREAM:
                sock.listen(backlog)
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group
