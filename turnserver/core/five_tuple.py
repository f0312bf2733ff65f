"""The 5-tuple that identifies an allocation (RFC 8656 §2, §5)."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from turnserver.stun.attributes import Address


class ClientTransport(StrEnum):
    """How the client reaches the server; TLS is TCP on the wire but kept apart for metrics."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


class FiveTuple(NamedTuple):
    """Client address, server address and the transport between them (a NamedTuple:
    made for every request and hashed for every lookup, at half a frozen dataclass's
    cost)."""

    client: Address
    server: Address
    transport: ClientTransport

    def __str__(self) -> str:
        return f"{self.transport.value}:{_fmt(self.client)}->{_fmt(self.server)}"


def _fmt(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(addr: Address) -> str:
    """host:port, with IPv6 hosts in brackets."""
    return _fmt(addr)
