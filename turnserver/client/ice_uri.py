"""STUN and TURN URIs (RFC 7064, RFC 7065) with their credentials, as preflight takes
them."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class IceUri:
    """A parsed stun:, turn: or turns: URI (RFC 7064, RFC 7065)."""

    scheme: str  # stun, turn, turns
    host: str
    port: int
    transport: str  # udp, tcp, tls
    username: str = ""
    credential: str = ""

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = (
            ""
            if self.scheme == "stun"
            else (f"?transport={'tcp' if self.transport == 'tls' else self.transport}")
        )
        return f"{self.scheme}:{host}:{self.port}{query}"


def parse_uri(uri: str, username: str = "", credential: str = "") -> IceUri:
    """stun:host[:port], turn:host[:port][?transport=udp|tcp], turns:host[:port]."""
    scheme, sep, rest = uri.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
        raise ValueError(f"not a STUN/TURN URI: {uri!r}")
    rest, _, query = rest.partition("?")
    params = urllib.parse.parse_qs(query)
    transport = params.get("transport", ["udp" if scheme in ("stun", "turn") else "tcp"])[0]
    if transport not in ("udp", "tcp"):
        raise ValueError(f"unknown transport in {uri!r}")
    secure = scheme in ("turns", "stuns")
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = rest.partition(":")
    port = int(port_text) if port_text else (5349 if secure else 3478)
    return IceUri(
        "stun" if scheme.startswith("stun") else scheme,
        host,
        port,
        "tls" if secure else transport,
        username,
        credential,
    )
