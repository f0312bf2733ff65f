"""The 5-tuple that identifies an allocation (RFC 8656 §2, §5)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from turnserver.stun.attributes import Address


class ClientTransport(StrEnum):
    """How the client reaches the server; TLS is TCP on the wire but kept apart for metrics."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class FiveTuple:
    """Client address, server address and the transport between them."""

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
