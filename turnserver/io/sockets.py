"""Binding the sockets every transport uses: non-blocking, IPv6-only for IPv6."""

from __future__ import annotations

import socket


def bind_socket(
    host: str, port: int, kind: int, *, reuse_port: bool = False, reuse_addr: bool = False
) -> socket.socket:
    """A non-blocking socket of `kind` bound to host:port (raises OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
