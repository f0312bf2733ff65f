"""The server's own addresses as peers: a TURN server must never relay into itself.

A relayed datagram or RFC 6062 connection to an address of this host reaches the server
from inside, past any firewall that filters by source: to one of its own listeners
(allocations nest, each one's client the previous one's relayed address), its metrics
or admin port, or any other service of the host. So an address of this host, on any
interface (the I/O layer learns them at start and follows their changes), is never a
peer, but:
- the relayed addresses, at ports of the relay range: two clients of this server reach
  each other there (both relay-only, the usual WebRTC call through one TURN server);
- an address the operator names in peers.allow (the explicit choice), and loopback with
  peers.allow_loopback (development), except at a port this process listens on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOST_ADDRESS = "host_address"
OWN_PORT = "own_port"
UNSPECIFIED = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class OwnAddresses:
    """What the core knows of the server's own addresses and ports."""

    host: frozenset[str] = field(default_factory=frozenset)  # canonical text
    relay: frozenset[str] = field(default_factory=frozenset)  # bind and advertised IPs
    relay_ports: tuple[int, int] = (1, 65535)  # the whole server's relay range
    ports: frozenset[int] = field(default_factory=frozenset)  # TURN, metrics, admin, API

    def refusal(self, ip: str, port: int | None, explicit: bool, loopback_ok: bool) -> str:
        """ "" when `ip` (canonical text) at `port` (None: any port, as for a permission)
        may be a peer, else why not: HOST_ADDRESS or OWN_PORT."""
        if ip in UNSPECIFIED:
            return HOST_ADDRESS  # reaches this host whatever peers.allow says
        if ip not in self.host and ip not in self.relay:
            return ""
        if explicit:
            return ""  # named by peers.allow: the operator's choice
        if port is not None and port in self.ports:
            return OWN_PORT
        if loopback_ok and (ip.startswith("127.") or ip == "::1"):
            return ""
        if ip in self.relay:  # relayed addresses (the advertised ones behind NAT too)
            lo, hi = self.relay_ports
            return OWN_PORT if port is not None and not lo <= port <= hi else ""
        return HOST_ADDRESS
