"""Allocation state: relayed transport addresses, permissions and channels (RFC 8656 §5).

The relay fast path in `io/` reads `channel_targets` and `peer_channels` directly and
bumps the plain-int counters; everything else changes only through `core.server`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from turnserver.core.five_tuple import FiveTuple
from turnserver.core.tenants import DEFAULT_TENANT
from turnserver.stun.attributes import Address

SendTo = Callable[[bytes, Address], object]


class RelayEndpoint(Protocol):
    """A bound relay socket, provided by the I/O layer."""

    @property
    def address(self) -> Address: ...

    def close(self) -> None: ...


class UdpRelayEndpoint(RelayEndpoint, Protocol):
    """A UDP relay socket: datagrams go to peers with `sendto`."""

    @property
    def sendto(self) -> SendTo: ...


class TcpRelayEndpoint(RelayEndpoint, Protocol):
    """An RFC 6062 TCP relay: a listening socket plus one connection per peer."""

    def connect(self, connection_id: int, peer: Address) -> None:
        """Start connecting to the peer; report through TurnServer.connect_result."""

    def close_connection(self, connection_id: int) -> None:
        """Close the peer connection (and its data connection)."""


class RelayOpener(Protocol):
    """Binds relay sockets for the core; returns None when the port is taken."""

    def open_relay(
        self, allocation: Allocation, host: str, port: int, *, dont_fragment: bool
    ) -> UdpRelayEndpoint | None: ...

    def open_tcp_relay(
        self, allocation: Allocation, host: str, port: int
    ) -> TcpRelayEndpoint | None: ...

    def has_capacity(self, sockets: int) -> bool:
        """May `sockets` more file descriptors be opened for clients now?"""
        ...

    def port_free(self, host: str, port: int) -> bool:
        """Could a UDP relay bind host:port now? (EVEN-PORT's port+1, before it is
        promised: a sibling worker may hold it through a RESERVATION-TOKEN.)"""
        ...


class Relay:
    """One relayed transport address of an allocation (one per address family)."""

    __slots__ = ("advertised", "endpoint", "family", "port", "sendto", "tcp")

    def __init__(
        self,
        endpoint: UdpRelayEndpoint | TcpRelayEndpoint,
        advertised: Address,
        family: int,
        *,
        sendto: SendTo | None = None,
        tcp: TcpRelayEndpoint | None = None,
    ) -> None:
        self.endpoint: RelayEndpoint = endpoint
        self.advertised = advertised
        self.family = family  # 4 or 6
        self.port = advertised[1]
        self.sendto = sendto  # UDP relays
        self.tcp = tcp  # RFC 6062 TCP relays


class PeerConnection:
    """An RFC 6062 TCP connection between the relay and a peer, with its CONNECTION-ID."""

    __slots__ = (
        "alloc",
        "connect_fingerprint",
        "connect_transaction_id",
        "data_five_tuple",
        "expires",
        "id",
        "peer",
        "state",
    )

    CONNECTING = "connecting"  # Connect request sent us dialling the peer
    PENDING_BIND = "pending_bind"  # waiting for the client's ConnectionBind (30 s)
    BOUND = "bound"  # data connection and peer connection are one pipe

    def __init__(
        self, connection_id: int, alloc: Allocation, peer: Address, state: str, expires: float
    ) -> None:
        self.id = connection_id
        self.alloc = alloc
        self.peer = peer
        self.state = state
        self.expires = expires
        self.connect_transaction_id = b""
        self.connect_fingerprint = False
        self.data_five_tuple: FiveTuple | None = None


class ChannelBinding:
    """A channel number bound to a peer transport address (RFC 8656 §12)."""

    __slots__ = ("expires", "number", "peer")

    def __init__(self, number: int, peer: Address, expires: float) -> None:
        self.number = number
        self.peer = peer
        self.expires = expires


class Allocation:
    """One allocation, keyed by its 5-tuple."""

    __slots__ = (
        "allocate_response",
        "allocate_transaction_id",
        "bindings",
        "bindings_by_peer",
        "bytes_to_client",
        "bytes_to_peer",
        "channel_targets",
        "created",
        "credential_expires",
        "dont_fragment",
        "expires",
        "five_tuple",
        "fleet_lease",
        "icmp_window",
        "id",
        "is_tcp",
        "key",
        "kind",
        "live",
        "packets_to_client",
        "packets_to_peer",
        "peer_channels",
        "peer_connections",
        "permissions",
        "rate",
        "rate_sample",
        "relays",
        "reservation",
        "send_errors",
        "sink",
        "stamp",
        "tenant",
        "timer_at",
        "tokens",
        "user",
        "user_rate",
        "username",
    )

    def __init__(
        self,
        five_tuple: FiveTuple,
        username: str,
        user: str,
        key: bytes,
        now: float,
        lifetime: float,
        credential_expires: float | None,
    ) -> None:
        self.five_tuple = five_tuple
        self.id = ""  # opaque and stable, for the admin API (set by the core)
        self.username = username
        self.user = user
        self.key = key
        self.created = now
        self.expires = now + lifetime
        self.timer_at = self.expires  # when the allocation's one expiry timer fires
        self.credential_expires = credential_expires
        self.relays: dict[int, Relay] = {}
        self.permissions: dict[str, float] = {}  # peer IP -> expiry (RFC 8656 §9)
        self.bindings: dict[int, ChannelBinding] = {}
        self.bindings_by_peer: dict[Address, ChannelBinding] = {}
        # Fast-path routes: only bindings whose peer also has a live permission.
        self.channel_targets: dict[int, tuple[SendTo, Address]] = {}
        self.peer_channels: dict[Address, int] = {}
        self.is_tcp = False  # RFC 6062 TCP allocation
        self.tenant = DEFAULT_TENANT  # core/tenants.py
        # (transport, family) labels, set once its relays are: a scrape counts
        # allocations by them without an Enum property and three tests per allocation
        self.kind = ("", "")
        self.user_rate = 0  # the authorization hook's bandwidth for the user (0: none)
        self.rate = 0  # bandwidth limit in bytes per second (0: none); token bucket below
        self.tokens = 0.0
        self.stamp = 0.0
        self.peer_connections: dict[Address, PeerConnection] = {}
        self.allocate_transaction_id = b""
        self.allocate_response = b""
        self.reservation = b""  # the RESERVATION-TOKEN of the port this allocation holds
        self.fleet_lease = False  # counts in the fleet's per-user quota (fleet_leases.py)
        self.dont_fragment = False
        self.live = True
        # errno -> (last reported, suppressed since): send errors are logged sparingly
        self.send_errors: dict[int, tuple[float, int]] | None = None
        self.icmp_window = (0, 0)  # (second, ICMP errors passed on in it)
        # Opaque to the core: the I/O layer's way back to the client.
        self.sink: object = None
        # (time, bytes both ways) at the last admin read: the current rate is measured
        # between reads, never on the relay path
        self.rate_sample = (now, 0)
        self.packets_to_peer = 0
        self.bytes_to_peer = 0
        self.packets_to_client = 0
        self.bytes_to_client = 0

    def spend(self, nbytes: int, now: float) -> bool:
        """Token bucket (one second of burst): may nbytes more be relayed now?"""
        tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < nbytes:
            self.tokens = tokens
            return False
        self.tokens = tokens - nbytes
        return True

    @property
    def relayed_addresses(self) -> tuple[Address, ...]:

        return tuple(r.advertised for r in self.relays.values())

    def relay_to(self, peer_ip: str) -> Relay | None:
        """The relay of the peer's address family, if this allocation has one."""
        return self.relays.get(6 if ":" in peer_ip else 4)

    def update_routes(self, peer_ip: str) -> None:
        """Recompute fast-path routes for one peer IP after a permission or channel change."""
        allowed = peer_ip in self.permissions
        for binding in self.bindings.values():
            if binding.peer[0] != peer_ip:
                continue
            relay = self.relay_to(peer_ip)
            if allowed and relay is not None and relay.sendto is not None:
                self.channel_targets[binding.number] = (relay.sendto, binding.peer)
                self.peer_channels[binding.peer] = binding.number
            else:
                self._unroute(binding)

    def remove_binding(self, binding: ChannelBinding) -> None:
        """The channel is gone (expired, or its permission revoked): RFC 8656 §12."""
        del self.bindings[binding.number]
        del self.bindings_by_peer[binding.peer]
        self._unroute(binding)

    def _unroute(self, binding: ChannelBinding) -> None:
        """The fast path stops relaying the channel (the binding may stay)."""
        self.channel_targets.pop(binding.number, None)
        self.peer_channels.pop(binding.peer, None)
