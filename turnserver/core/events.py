"""Events the core reports; metrics and logs consume these, handlers never log.

Past tense and slotted; never changed once emitted (not frozen: a frozen dataclass
takes four times as long to make, and several are made per request). Nothing here is
emitted per relayed packet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from turnserver.core.five_tuple import FiveTuple
from turnserver.core.tenants import DEFAULT_TENANT
from turnserver.stun.attributes import Address


@dataclass(slots=True)
class AllocationCreated:
    five_tuple: FiveTuple
    username: str
    relayed: tuple[Address, ...]
    lifetime: int
    tenant: str = DEFAULT_TENANT


@dataclass(slots=True)
class AllocationRefused:
    five_tuple: FiveTuple
    username: str
    code: int
    reason: str
    detail: str
    tenant: str = DEFAULT_TENANT


@dataclass(slots=True)
class AllocationRefreshed:
    five_tuple: FiveTuple
    lifetime: int


@dataclass(slots=True)
class AllocationEnded:
    five_tuple: FiveTuple
    username: str
    relayed: tuple[Address, ...]
    cause: str  # "deleted", "expired", "connection_closed", "credential_expired"
    duration: float
    packets_to_peer: int
    bytes_to_peer: int
    packets_to_client: int
    bytes_to_client: int
    tenant: str = DEFAULT_TENANT


@dataclass(slots=True)
class RequestHandled:
    five_tuple: FiveTuple
    method: str
    code: int  # 0 for success
    reason: str  # "" for success, else the failure label
    username: str = ""  # "" when the request was not authenticated
    # how long the core took over the request, in seconds: the adapter that timed the
    # call sets it before the event reaches a sink (None: not timed)
    duration: float | None = None


@dataclass(slots=True)
class AuthFailed:
    five_tuple: FiveTuple
    username: str
    reason: str
    method: str = ""


@dataclass(slots=True)
class PeerIpEvent:
    """Something about one allocation and one peer IP (a permission)."""

    five_tuple: FiveTuple
    peer_ip: str


@dataclass(slots=True)
class PermissionInstalled(PeerIpEvent):
    """A new permission for a peer IP (RFC 8656 §9)."""


@dataclass(slots=True)
class PermissionExpired(PeerIpEvent):
    """A permission ran out without a refresh (RFC 8656 §9)."""


@dataclass(slots=True)
class PermissionRevoked:
    """A permission (with its channels and RFC 6062 connections) removed before it
    expired, e.g. because a reloaded peer policy now denies the peer."""

    five_tuple: FiveTuple
    username: str
    peer_ip: str
    reason: str


@dataclass(slots=True)
class RelaySendFailed:
    """A relayed packet could not be sent (EMSGSIZE, unreachable route, ...); reported at
    most once per allocation, errno and interval, with how many were not reported."""

    five_tuple: FiveTuple
    username: str
    peer: Address
    errno: int
    detail: str
    suppressed: int


@dataclass(slots=True)
class ChannelEvent:
    """Something about one channel of an allocation (RFC 8656 §12)."""

    five_tuple: FiveTuple
    number: int
    peer: Address


@dataclass(slots=True)
class ChannelBound(ChannelEvent):
    """A channel number now stands for a peer (RFC 8656 §12.2)."""


@dataclass(slots=True)
class ChannelExpired(ChannelEvent):
    """A channel binding ran out without a refresh (RFC 8656 §12)."""


@dataclass(slots=True)
class PeerDenied(PeerIpEvent):
    """A peer refused with 403 (RFC 8656 §21.2.3): by the peer policy ("policy"), or as
    an address of this host ("host_address") or a port this server listens on
    ("own_port"), see core/own_addresses.py."""

    reason: str = "policy"


@dataclass(slots=True)
class PeerConnectionBound:
    """RFC 6062: a client data connection now carries one peer TCP connection."""

    data_five_tuple: FiveTuple
    five_tuple: FiveTuple  # the allocation's control connection
    connection_id: int
    peer: Address


@dataclass(slots=True)
class ConnectionBindForwarded:
    """RFC 6062 §5.4 across workers: a ConnectionBind names a CONNECTION-ID that another
    worker process owns; the I/O layer asks that worker for the peer connection and
    reports back through TurnServer.finish_remote_bind."""

    five_tuple: FiveTuple  # the client's new data connection
    connection_id: int
    owner: int  # the index of the worker that owns the connection
    username: str


@dataclass(slots=True)
class ReasonEvent:
    """Something that happened to a 5-tuple, with a bounded reason and free detail."""

    five_tuple: FiveTuple
    reason: str
    detail: str


@dataclass(slots=True)
class ConnectionClosed(ReasonEvent):
    """A TCP/TLS client connection closed by the server (framing error, idle, ...)."""


@dataclass(slots=True)
class TlsHandshakeFailed(ReasonEvent):
    """A TLS client connection whose handshake failed or timed out (`reason` is bounded:
    handshake_timeout, certificate_unknown, unknown_ca, not_tls, ...)."""


@dataclass(slots=True)
class MessageDiscarded(ReasonEvent):
    """A datagram or message from a client that was dropped (malformed, no allocation...)."""


@dataclass(slots=True)
class FleetLeaseNeeded:
    """An Allocate waits for a fleet-wide per-user lease (core/fleet_leases.py)."""

    five_tuple: FiveTuple
    transaction_id: bytes
    user: str
    message: bytes  # the Allocate, run again with the answer


@dataclass(slots=True)
class AuthHookNeeded:
    """A user the configuration does not know: the authorization hook is asked, and
    the request waits (core/auth_hook.py; TurnServer.auth_hook_result answers)."""

    username: str
    realm: str
    five_tuple: FiveTuple


@dataclass(slots=True)
class FleetLeaseReleased:
    """An allocation that held a fleet lease ended (or its Allocate failed after all)."""

    user: str


Event = (
    AllocationCreated
    | AllocationRefused
    | AllocationRefreshed
    | AllocationEnded
    | RequestHandled
    | AuthFailed
    | PermissionInstalled
    | PermissionExpired
    | PermissionRevoked
    | RelaySendFailed
    | ChannelBound
    | ChannelExpired
    | PeerDenied
    | MessageDiscarded
    | ConnectionClosed
    | TlsHandshakeFailed
    | PeerConnectionBound
    | ConnectionBindForwarded
    | FleetLeaseNeeded
    | FleetLeaseReleased
    | AuthHookNeeded
)


class EventTable:
    """An event sink that is a table of handlers, one per event type it acts on: the
    I/O layer looks the handler up once per type and calls it directly (no isinstance
    chain per event; several events every setup). Calling the table works too. A sink
    that is a plain callable gets every event."""

    __slots__ = ("handlers",)

    def __init__(self, handlers: Mapping[type, Callable[..., None]]) -> None:
        self.handlers = dict(handlers)

    def __call__(self, event: Event) -> None:
        handler = self.handlers.get(type(event))
        if handler is not None:
            handler(event)
