"""Settings the core needs, as a frozen dataclass (built by ops/config/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from turnserver.stun.attributes import Address


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """Where relay sockets bind, and the address advertised to clients (NAT'd deployments)."""

    bind_ip: str
    advertised_ip: str
    family: int  # 4 or 6


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Protocol limits and relay layout for the TURN core."""

    relay_addresses: tuple[RelayAddress, ...]
    min_port: int = 49152
    max_port: int = 65535
    software: str | None = None
    default_lifetime: int = 600  # RFC 8656 §7.2
    max_lifetime: int = 3600
    permission_lifetime: int = 300  # RFC 8656 §9
    channel_lifetime: int = 600  # RFC 8656 §12
    reservation_lifetime: int = 30  # RFC 8656 §7.2 (EVEN-PORT R bit)
    max_allocations: int = 0  # 0: unlimited
    max_allocations_per_user: int = 0
    max_allocations_per_client_ip: int = 0
    max_permissions_per_allocation: int = 0
    max_channels_per_allocation: int = 0
    max_peer_connections_per_allocation: int = 0  # RFC 6062, each one a descriptor
    max_pending_connects_per_allocation: int = 0
    strict_expiry: bool = False
    tcp_relay: bool = True  # RFC 6062 TCP allocations
    bandwidth: int = 0  # bytes per second per allocation, both directions; 0: unlimited
    challenge_rate: float = 1000.0  # 401/438 answers over UDP per second per client IP
    challenge_burst: int = 2000  # (many clients may share one NAT address)

    alternate_server: Address | None = None  # 300 Try Alternate while draining
    other_address: Address | None = None  # RFC 5780 OTHER-ADDRESS in Binding responses
    # RFC 5780: the primary UDP listener, and every listener a CHANGE-REQUEST may be
    # answered from (the four combinations of primary and other IP and port)
    rfc5780_primary: Address | None = None
    rfc5780_addresses: frozenset[Address] = field(default_factory=frozenset)

    # The server's own ports (TURN, metrics, admin, API listeners) and its whole relay
    # port range (a worker's min_port..max_port is its slice): see core/own_addresses.py
    own_ports: frozenset[int] = field(default_factory=frozenset)
    relay_port_range: tuple[int, int] = (49152, 65535)
