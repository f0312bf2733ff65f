"""The TURN server state machine, sans I/O (RFC 8656, RFC 8489).

Callers feed it client messages with the 5-tuple and the time, and get back the
response bytes; relay sockets come from an injected RelayOpener. It owns all
allocations, answers "when is the next expiry?" for one adapter timer, and reports
what happened as events.
"""

from __future__ import annotations

import heapq
import hmac
import ipaddress
import random
import secrets
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from turnserver.core import events as ev
from turnserver.core.allocation import (
    Allocation,
    ChannelBinding,
    PeerConnection,
    Relay,
    RelayOpener,
)
from turnserver.core.auth import Authenticator, Identity
from turnserver.core.config import CoreConfig, RelayAddress
from turnserver.core.errors import (
    AddressFamilyNotSupported,
    AllocationMismatch,
    AllocationQuotaReached,
    BadRequest,
    ConnectionAlreadyExists,
    ConnectionTimeoutOrFailure,
    Forbidden,
    InsufficientCapacity,
    PeerAddressFamilyMismatch,
    StaleNonce,
    TryAlternate,
    TurnError,
    Unauthorized,
    UnknownAttribute,
    UnsupportedTransport,
    WrongCredentials,
)
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.policy import PeerPolicy
from turnserver.core.ports import RelayPortPool
from turnserver.core.quota import LocalQuotaLedger, QuotaLedger
from turnserver.core.ratelimit import TokenBuckets
from turnserver.stun.attributes import Address
from turnserver.stun.channeldata import is_valid_channel_number
from turnserver.stun.constants import (
    AddressFamily,
    Attr,
    MessageClass,
    Method,
    TransportProtocol,
)
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.message import StunMessage, decode_message, encode_message

Attributes = list[tuple[int, Any]]
Handler = Callable[[StunMessage, FiveTuple, Identity, float], Attributes]

_FAMILY_VERSION = {AddressFamily.IPV4: 4, AddressFamily.IPV6: 6}
_VERSION_FAMILY = {4: AddressFamily.IPV4, 6: AddressFamily.IPV6}
_BIND_ATTEMPTS = 16
CONNECTION_TIMEOUT = 30.0  # RFC 6062 §5.2, §5.3
# Requests and indications other than Send are small; a larger one is refused before
# it is decoded (a Send indication may carry up to a datagram of data).
MAX_CONTROL_MESSAGE = 4096
_SEND_INDICATION_TYPE = b"\x00\x16"
MAX_PEERS_PER_REQUEST = 32  # XOR-PEER-ADDRESS entries in one CreatePermission
SEND_ERROR_LOG_INTERVAL = 60.0  # one log line per allocation and errno per interval


class TimerKind(IntEnum):
    ALLOCATION = 0
    PERMISSION = 1
    CHANNEL = 2
    RESERVATION = 3
    CREDENTIAL = 4
    PEER_CONNECTION = 5


class DeferredResponse(Exception):
    """A handler started work whose outcome (and response) comes later (RFC 6062 Connect)."""


class Reservation:
    """A port held by an EVEN-PORT R-bit allocation for a later RESERVATION-TOKEN."""

    __slots__ = ("expires", "family", "port")

    def __init__(self, family: int, port: int, expires: float) -> None:
        self.family = family
        self.port = port
        self.expires = expires


class RelayStats:
    """Plain-int counters the relay path bumps; folded into metrics on scrape."""

    __slots__ = (
        "dropped_malformed",
        "dropped_no_allocation",
        "dropped_no_permission",
        "dropped_oversized",
        "dropped_peer_denied",
        "dropped_rate_limited",
        "dropped_send_error",
        "dropped_unknown_channel",
        "ended_bytes_to_client",
        "ended_bytes_to_peer",
        "ended_packets_to_client",
        "ended_packets_to_peer",
    )

    def __init__(self) -> None:
        self.dropped_malformed = 0
        self.dropped_no_allocation = 0
        self.dropped_no_permission = 0
        self.dropped_peer_denied = 0
        self.dropped_oversized = 0
        self.dropped_rate_limited = 0
        self.dropped_send_error = 0
        self.dropped_unknown_channel = 0
        self.ended_bytes_to_client = 0
        self.ended_bytes_to_peer = 0
        self.ended_packets_to_client = 0
        self.ended_packets_to_peer = 0


class TurnServer:
    """All allocations of one process and the rules that change them."""

    def __init__(
        self,
        config: CoreConfig,
        authenticator: Authenticator,
        relay_opener: RelayOpener,
        peer_policy: PeerPolicy,
    ) -> None:
        self.config = config
        self.auth = authenticator
        self.relay_opener = relay_opener
        self.peer_policy = peer_policy
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.quotas: QuotaLedger = LocalQuotaLedger()
        self.reservations: dict[bytes, Reservation] = {}
        self.relay_addresses: dict[int, RelayAddress] = {
            r.family: r for r in config.relay_addresses
        }
        self.port_pools: dict[int, RelayPortPool] = {
            r.family: RelayPortPool(config.min_port, config.max_port)
            for r in config.relay_addresses
        }
        self.stats = RelayStats()
        self.events: list[ev.Event] = []
        self.accepting = True
        self._timers: list[tuple[float, int, TimerKind, Any, Any]] = []
        self._seq = 0
        self._handlers: dict[int, Handler] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
            Method.CONNECT: self._connect,
            Method.CONNECTION_BIND: self._connection_bind,
        }
        self.peer_connections: dict[int, PeerConnection] = {}
        # The self-probe may reach its own echo socket whatever the peer policy says.
        self.probe_users: set[str] = set()
        self._challenges = TokenBuckets(config.challenge_rate, config.challenge_burst)
        self.probe_peer_ips: set[str] = set()

    # ---- entry points -------------------------------------------------------------

    def handle_message(self, data: bytes, five_tuple: FiveTuple, now: float) -> bytes | None:
        """A STUN message from a client; returns the response to send back, if any."""
        if len(data) > MAX_CONTROL_MESSAGE and data[:2] != _SEND_INDICATION_TYPE:
            self.stats.dropped_oversized += 1
            return None
        try:
            msg = decode_message(data)
        except StunDecodeError as exc:
            self.stats.dropped_malformed += 1
            self.events.append(ev.MessageDiscarded(five_tuple, "malformed", str(exc)))
            return None
        if msg.message_class == MessageClass.REQUEST:
            return self._handle_request(msg, five_tuple, now)
        if msg.message_class == MessageClass.INDICATION and msg.method == Method.SEND:
            self._handle_send(msg, five_tuple, now)
        return None

    def handle_channel_data(
        self, number: int, payload: bytes, five_tuple: FiveTuple, now: float
    ) -> None:
        """ChannelData from a client when the I/O fast path did not take it (RFC 8656 §12.6)."""
        self.relay_channel_data(self.allocations.get(five_tuple), number, payload, now)

    def relay_channel_data(
        self, alloc: Allocation | None, number: int, payload: bytes, now: float
    ) -> None:
        """Send a client's ChannelData payload to the channel's peer, or count the drop."""
        if alloc is None:
            self.stats.dropped_no_allocation += 1
            return
        route = alloc.channel_routes.get(number)
        if route is None:
            self.stats.dropped_unknown_channel += 1
            return
        if alloc.rate and not alloc.spend(len(payload), now):
            self.stats.dropped_rate_limited += 1
            return
        try:
            route[0](payload, route[1])
        except OSError as exc:  # a lost datagram, as UDP allows: counted, never fatal
            self.send_failed(alloc, route[1], exc, now)
            return
        alloc.packets_to_peer += 1
        alloc.bytes_to_peer += len(payload)

    def send_failed(self, alloc: Allocation, peer: Address, exc: OSError, now: float) -> bool:
        """Count a failed send on a relay path (either direction); report it at most once
        per allocation, errno and SEND_ERROR_LOG_INTERVAL. True when an event was added."""
        self.stats.dropped_send_error += 1
        errno = exc.errno or 0
        log = alloc.send_errors
        if log is None:
            log = alloc.send_errors = {}
        last = log.get(errno)
        if last is not None and now - last[0] < SEND_ERROR_LOG_INTERVAL:
            log[errno] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        if len(log) < 16:  # bounded: errno values are few
            log[errno] = (now, 0)
        self.events.append(
            ev.RelaySendFailed(
                alloc.five_tuple, alloc.username, peer, errno, exc.strerror or "", suppressed
            )
        )
        return True

    def data_indication(
        self, alloc: Allocation, payload: bytes, peer: Address, now: float
    ) -> bytes | None:
        """Wrap peer data in a Data indication when a permission exists (RFC 8656 §11.3)."""
        if peer[0] not in alloc.permissions:
            self.stats.dropped_no_permission += 1
            return None
        if alloc.rate and not alloc.spend(len(payload), now):
            self.stats.dropped_rate_limited += 1
            return None
        alloc.packets_to_client += 1
        alloc.bytes_to_client += len(payload)
        return encode_message(
            Method.DATA,
            MessageClass.INDICATION,
            random.randbytes(12),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, payload)],
        )

    def close_five_tuple(self, five_tuple: FiveTuple, now: float) -> None:
        """The client's connection closed: its allocation goes with it (RFC 6062 §2)."""
        alloc = self.allocations.get(five_tuple)
        if alloc is not None:
            self._delete(alloc, now, "connection_closed")

    def next_timer(self) -> float | None:
        """When the earliest expiry is due, for the adapter's one timer."""
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        """Expire allocations, permissions, channels and reservations that are due."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, owner, key = heapq.heappop(timers)
            if kind == TimerKind.ALLOCATION:
                if not owner.live:
                    continue
                if owner.expires <= now:
                    self._delete(owner, now, "expired")
                elif when == owner.timer_at:  # refreshed since: one entry, moved later
                    self._arm_allocation(owner)
            elif kind == TimerKind.CREDENTIAL:
                if owner.live:
                    self._delete(owner, now, "credential_expired")
            elif kind == TimerKind.PERMISSION:
                self._expire_permission(owner, key, now)
            elif kind == TimerKind.CHANNEL:
                self._expire_channel(owner, key, now)
            elif kind == TimerKind.PEER_CONNECTION:
                pc = self.peer_connections.get(key)
                pending = pc is not None and pc.state == PeerConnection.PENDING_BIND
                if pc is not None and pending and pc.expires <= now:
                    self._forget_peer_connection(pc, close=True)

            elif kind == TimerKind.RESERVATION:
                res = self.reservations.get(key)
                if res is not None and res.expires <= now:
                    del self.reservations[key]
                    self.port_pools[res.family].give_back(res.port)

    def drain_events(self) -> list[ev.Event]:
        """Events since the last call, oldest first."""
        out, self.events = self.events, []
        return out

    def relay_ports_free(self) -> int:
        """Free relay ports summed over address families."""
        return sum(len(p) for p in self.port_pools.values())

    # ---- requests -------------------------------------------------------------------

    def _handle_request(self, msg: StunMessage, ft: FiveTuple, now: float) -> bytes | None:
        method = msg.method
        if not msg.magic_cookie and method != Method.BINDING:
            self.stats.dropped_malformed += 1
            return None
        if method == Method.BINDING:
            return self._binding(msg, ft)
        if method == Method.ALLOCATE:
            existing = self.allocations.get(ft)
            if existing is not None and existing.allocate_transaction_id == msg.transaction_id:
                return existing.allocate_response  # retransmission (RFC 8656 §7.2)
        handler = self._handlers.get(method)
        method_name = _method_name(method)
        identity: Identity | None = None
        try:
            if handler is None:
                raise BadRequest(f"unsupported method 0x{method:03x}")
            identity = self.auth.authenticate(msg, ft.client[0], now)
            unknown = msg.unknown_required_attributes()
            if unknown:
                raise UnknownAttribute(unknown)
            attrs = handler(msg, ft, identity, now)
        except DeferredResponse:
            return None
        except TurnError as err:
            if (
                isinstance(err, Unauthorized | StaleNonce)
                and ft.transport == ClientTransport.UDP
                and not self._challenge_allowed(ft.client[0], now)
            ):
                # RFC 8656 §21.1: bound what spoofed UDP senders can make us reflect (over
                # TCP/TLS the handshake proves the source, and a dropped answer would hang)

                self.stats.dropped_rate_limited += 1
                self.events.append(ev.MessageDiscarded(ft, "challenge_rate_limited", ""))
                return None
            self._report_failure(msg, ft, identity, err, method_name)
            return self._error_response(msg, ft, err, identity, now)
        except StunDecodeError as exc:  # a malformed attribute value
            bad = BadRequest(str(exc))
            self._report_failure(msg, ft, identity, bad, method_name)
            return self._error_response(msg, ft, bad, identity, now)
        if self.config.software:
            attrs.append((Attr.SOFTWARE, self.config.software))
        response = encode_message(
            method,
            MessageClass.SUCCESS,
            msg.transaction_id,
            attrs,
            integrity_key=identity.key,
            fingerprint=msg.fingerprint_offset >= 0,
        )
        if method == Method.ALLOCATE:
            alloc = self.allocations[ft]
            alloc.allocate_response = response
        elif method == Method.CONNECTION_BIND:
            self._finish_connection_bind(msg, ft)
        self.events.append(ev.RequestHandled(ft, method_name, 0, "", identity.username))
        return response

    def _challenge_allowed(self, client_ip: str, now: float) -> bool:
        """Token bucket per client IP for answers to unauthenticated requests."""
        limiter = self._challenges
        limiter.rate = self.config.challenge_rate  # follows reloads
        limiter.burst = self.config.challenge_burst
        return limiter.allow(client_ip, now)

    def _report_failure(
        self,
        msg: StunMessage,
        ft: FiveTuple,
        identity: Identity | None,
        err: TurnError,
        method_name: str,
    ) -> None:
        username = identity.username if identity else (_safe_username(msg))
        self.events.append(ev.RequestHandled(ft, method_name, err.code, err.reason, username))
        if isinstance(err, Unauthorized | StaleNonce) and err.reason != "unauthenticated":
            self.events.append(ev.AuthFailed(ft, username, err.reason, method_name))
        if msg.method == Method.ALLOCATE:
            self.events.append(ev.AllocationRefused(ft, username, err.code, err.reason, err.detail))

    def _error_response(
        self,
        msg: StunMessage,
        ft: FiveTuple,
        err: TurnError,
        identity: Identity | None,
        now: float,
    ) -> bytes:
        attrs: Attributes = [(Attr.ERROR_CODE, (err.code, err.phrase))]
        if isinstance(err, Unauthorized | StaleNonce):
            # RFC 8489 §9.2.4: 401/438 carry REALM and a fresh NONCE, never integrity
            attrs.append((Attr.REALM, self.auth.realm))
            attrs.append((Attr.NONCE, self.auth.nonces.issue(ft.client[0], now)))
            identity = None
        if isinstance(err, UnknownAttribute):
            attrs.append((Attr.UNKNOWN_ATTRIBUTES, err.attributes))
        if isinstance(err, TryAlternate):
            attrs.append((Attr.ALTERNATE_SERVER, err.server))  # RFC 8489 §10
        if self.config.software and identity is not None:
            attrs.append((Attr.SOFTWARE, self.config.software))
        return encode_message(
            msg.method,
            MessageClass.ERROR,
            msg.transaction_id,
            attrs,
            integrity_key=identity.key if identity else None,
            fingerprint=msg.fingerprint_offset >= 0,
        )

    def _binding(self, msg: StunMessage, ft: FiveTuple) -> bytes:
        """RFC 8489 §6.3: reflect the source address; no authentication."""
        unknown = msg.unknown_required_attributes()
        try:
            change = msg.get(Attr.CHANGE_REQUEST) if msg.has(Attr.CHANGE_REQUEST) else 0
        except StunDecodeError:  # found by the fuzzer: a CHANGE-REQUEST of the wrong size
            change = None
        if change:
            # RFC 5780 §6.1: we cannot answer from another address or port
            unknown = [*unknown, Attr.CHANGE_REQUEST]
        if change is None:
            attrs: Attributes = [(Attr.ERROR_CODE, (400, "Bad Request"))]
            klass = MessageClass.ERROR
        elif unknown:
            attrs = [
                (Attr.ERROR_CODE, (420, "Unknown Attribute")),
                (Attr.UNKNOWN_ATTRIBUTES, unknown),
            ]
            klass = MessageClass.ERROR
        elif msg.magic_cookie:
            attrs = [(Attr.XOR_MAPPED_ADDRESS, ft.client)]
            if self.config.other_address is not None and ft.transport == ClientTransport.UDP:
                # RFC 5780 §7.3: where a client can test its NAT's mapping from
                attrs.append((Attr.OTHER_ADDRESS, self.config.other_address))
            klass = MessageClass.SUCCESS

        else:  # RFC 3489 client: MAPPED-ADDRESS, echo its 16-byte transaction id
            attrs = [(Attr.MAPPED_ADDRESS, ft.client)]
            klass = MessageClass.SUCCESS
        # No SOFTWARE here: a Binding answer should not be much larger than its request.
        cookie = int.from_bytes(msg.raw[4:8], "big")
        code = 0 if klass == MessageClass.SUCCESS else 420 if change is not None else 400
        reason = {0: "", 420: "unknown_attribute"}.get(code, "bad_request")
        self.events.append(ev.RequestHandled(ft, "binding", code, reason))
        return encode_message(
            Method.BINDING,
            klass,
            msg.transaction_id,
            attrs,
            fingerprint=msg.fingerprint_offset >= 0,
            magic_cookie=cookie,
        )

    def _allocation_of(self, ft: FiveTuple, identity: Identity) -> Allocation:
        alloc = self.allocations.get(ft)
        if alloc is None:
            raise AllocationMismatch("no allocation for this 5-tuple")
        if identity.username != alloc.username:
            raise WrongCredentials("username differs from the allocation's")  # RFC 8656 §5
        return alloc

    def _lifetime(self, requested: int | None) -> int:
        """RFC 8656 §7.2/§7.4: min(requested, max), but never below the default."""
        cfg = self.config
        if requested is None:
            return min(cfg.default_lifetime, cfg.max_lifetime)
        return max(min(requested, cfg.max_lifetime), min(cfg.default_lifetime, cfg.max_lifetime))

    def _allocate(self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float) -> Attributes:
        """RFC 8656 §7.2."""
        cfg = self.config
        if ft in self.allocations:
            raise AllocationMismatch("5-tuple already has an allocation")
        if not self.accepting:
            if cfg.alternate_server is not None:
                raise TryAlternate(cfg.alternate_server, "server is draining")
            raise InsufficientCapacity("server is draining", reason="draining")
        transport = msg.get(Attr.REQUESTED_TRANSPORT)
        if transport is None:
            raise BadRequest("missing REQUESTED-TRANSPORT")
        if transport == TransportProtocol.TCP and cfg.tcp_relay:
            return self._allocate_tcp(msg, ft, ident, now)
        if transport != TransportProtocol.UDP:
            raise UnsupportedTransport(f"REQUESTED-TRANSPORT {transport} is not supported")
        token: bytes | None = msg.get(Attr.RESERVATION_TOKEN)
        even_port: bool | None = msg.get(Attr.EVEN_PORT)
        requested_family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        additional_family = msg.get(Attr.ADDITIONAL_ADDRESS_FAMILY)
        address_error_attr = Attr.ADDRESS_ERROR_CODE
        if additional_family is None:
            additional_family = msg.get(Attr.ADDITIONAL_ADDRESS_FAMILY_DRAFT)
            address_error_attr = Attr.ADDRESS_ERROR_CODE_DRAFT
        if token is not None and even_port is not None:
            raise BadRequest("RESERVATION-TOKEN together with EVEN-PORT")
        if token is not None and (requested_family is not None or additional_family is not None):
            raise BadRequest("RESERVATION-TOKEN together with an address family")
        if requested_family is not None and additional_family is not None:
            raise BadRequest("REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together")
        if additional_family is not None and additional_family != AddressFamily.IPV6:
            raise BadRequest("ADDITIONAL-ADDRESS-FAMILY must be IPv6")
        if requested_family is not None and requested_family not in _FAMILY_VERSION:
            raise AddressFamilyNotSupported(f"unknown address family {requested_family}")

        reservation: Reservation | None = None
        if token is not None:
            reservation = self.reservations.pop(token, None)
            if reservation is None:
                # Another worker process may have issued it: tokens are stateless
                reservation = self._check_reservation_token(token, now)
                if reservation is not None:
                    self.port_pools[reservation.family].take(reservation.port)

            if reservation is None:
                raise InsufficientCapacity(
                    "unknown or expired RESERVATION-TOKEN", reason="bad_reservation"
                )
            families = [reservation.family]
        elif requested_family is not None:
            families = [_FAMILY_VERSION[AddressFamily(requested_family)]]
        elif additional_family is not None:
            families = [4, 6]
        else:
            families = [4]
        address_error: int | None = None
        if families[0] not in self.relay_addresses:
            raise AddressFamilyNotSupported(f"no IPv{families[0]} relay address configured")
        if len(families) == 2 and 6 not in self.relay_addresses:
            families = [4]
            address_error = 6  # RFC 8656 §7.2: ADDRESS-ERROR-CODE for the missing family

        self._check_descriptors(len(families))
        lifetime = self._lifetime(msg.get(Attr.LIFETIME))
        alloc = Allocation(ft, ident.username, ident.user, ident.key, now, lifetime, ident.expires)
        alloc.rate, alloc.tokens, alloc.stamp = cfg.bandwidth, float(cfg.bandwidth), now
        alloc.allocate_transaction_id = msg.transaction_id
        alloc.dont_fragment = msg.has(Attr.DONT_FRAGMENT)
        new_token: bytes | None = None
        try:
            for i, version in enumerate(families):
                if reservation is not None:
                    relay = self._open_relay(alloc, version, port=reservation.port)
                elif i == 0 and even_port is not None:
                    relay, reserved = self._open_even_relay(alloc, version, even_port)
                    if reserved is not None:
                        new_token = self._reservation_token(version, reserved, now)
                        self.reservations[new_token] = Reservation(
                            version, reserved, now + cfg.reservation_lifetime
                        )
                        self._push(
                            now + cfg.reservation_lifetime, TimerKind.RESERVATION, None, new_token
                        )
                else:
                    relay = self._open_relay(alloc, version)
                alloc.relays[version] = relay
        except InsufficientCapacity:
            self._close_relays(alloc)
            raise

        self._reserve_quota(alloc, ident)
        self.allocations[ft] = alloc
        self._arm_allocation(alloc)
        if cfg.strict_expiry and ident.expires is not None:
            self._push(ident.expires, TimerKind.CREDENTIAL, alloc, None)
        attrs: Attributes = [
            (Attr.XOR_RELAYED_ADDRESS, r.advertised) for r in alloc.relays.values()
        ]
        attrs.append((Attr.LIFETIME, lifetime))
        if new_token is not None:
            attrs.append((Attr.RESERVATION_TOKEN, new_token))
        attrs.append((Attr.XOR_MAPPED_ADDRESS, ft.client))
        if address_error is not None:
            attrs.append(
                (
                    address_error_attr,
                    (_VERSION_FAMILY[address_error], 440, "Address Family not Supported"),
                )
            )
        self.events.append(
            ev.AllocationCreated(ft, ident.username, alloc.relayed_addresses, lifetime)
        )
        return attrs

    # ---- RFC 6062 TCP allocations ---------------------------------------------------------

    def _allocate_tcp(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 6062 §5.1: a TCP relayed address, only for clients on TCP or TLS."""
        if ft.transport == ClientTransport.UDP:
            raise BadRequest("TCP allocations need a TCP or TLS control connection")
        if msg.has(Attr.EVEN_PORT) or msg.has(Attr.RESERVATION_TOKEN):
            raise BadRequest("EVEN-PORT and RESERVATION-TOKEN do not apply to TCP allocations")
        if msg.has(Attr.ADDITIONAL_ADDRESS_FAMILY) or msg.has(Attr.ADDITIONAL_ADDRESS_FAMILY_DRAFT):
            raise BadRequest("dual allocations are UDP only")
        cfg = self.config
        family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if family is not None and family not in _FAMILY_VERSION:
            raise AddressFamilyNotSupported(f"unknown address family {family}")
        version = _FAMILY_VERSION[AddressFamily(family)] if family is not None else 4
        if version not in self.relay_addresses:
            raise AddressFamilyNotSupported(f"no IPv{version} relay address configured")
        self._check_descriptors(1)
        lifetime = self._lifetime(msg.get(Attr.LIFETIME))
        alloc = Allocation(ft, ident.username, ident.user, ident.key, now, lifetime, ident.expires)
        alloc.rate, alloc.tokens, alloc.stamp = cfg.bandwidth, float(cfg.bandwidth), now
        alloc.is_tcp = True
        alloc.allocate_transaction_id = msg.transaction_id
        alloc.relays[version] = self._open_relay(alloc, version, tcp=True)
        self._reserve_quota(alloc, ident)
        self.allocations[ft] = alloc
        self._arm_allocation(alloc)
        if cfg.strict_expiry and ident.expires is not None:
            self._push(ident.expires, TimerKind.CREDENTIAL, alloc, None)
        self.events.append(
            ev.AllocationCreated(ft, ident.username, alloc.relayed_addresses, lifetime)
        )
        return [
            (Attr.XOR_RELAYED_ADDRESS, alloc.relays[version].advertised),
            (Attr.LIFETIME, lifetime),
            (Attr.XOR_MAPPED_ADDRESS, ft.client),
        ]

    def _check_descriptors(self, sockets: int) -> None:
        """Refuse with 508 before the process would run out of file descriptors."""
        if not self.relay_opener.has_capacity(sockets):
            raise InsufficientCapacity("file descriptor limit reached", reason="fd_limit")

    def _check_peer_connection_limits(self, alloc: Allocation, connecting: bool) -> None:
        """RFC 6062 limits per allocation: peer connections, and Connects in flight."""
        cfg = self.config
        conns = alloc.peer_connections
        if cfg.max_peer_connections_per_allocation and (
            len(conns) >= cfg.max_peer_connections_per_allocation
        ):
            raise InsufficientCapacity("too many peer connections", reason="quota_connections")
        if connecting and cfg.max_pending_connects_per_allocation:
            pending = sum(pc.state == PeerConnection.CONNECTING for pc in conns.values())
            if pending >= cfg.max_pending_connects_per_allocation:
                raise InsufficientCapacity(
                    "too many Connect requests in progress", reason="quota_pending_connects"
                )
        self._check_descriptors(1)

    def _new_connection_id(self) -> int:
        while True:
            cid = secrets.randbits(32)
            if cid and cid not in self.peer_connections:
                return cid

    def _connect(self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float) -> Attributes:
        """RFC 6062 §5.2: dial the peer from the relayed address; answer when it is done."""
        alloc = self._allocation_of(ft, ident)
        if not alloc.is_tcp:
            raise BadRequest("Connect needs a TCP allocation")
        peer: Address | None = msg.get(Attr.XOR_PEER_ADDRESS)
        if peer is None:
            raise BadRequest("Connect without XOR-PEER-ADDRESS")
        ip = self._check_peer(alloc, peer, ft)
        peer = (ip, peer[1])
        if peer in alloc.peer_connections:
            raise ConnectionAlreadyExists(f"a connection to {peer[0]}:{peer[1]} exists")
        self._check_peer_connection_limits(alloc, connecting=True)
        relay = alloc.relays.get(6 if ":" in ip else 4)
        assert relay is not None and relay.tcp is not None
        pc = PeerConnection(
            self._new_connection_id(),
            alloc,
            peer,
            PeerConnection.CONNECTING,
            now + CONNECTION_TIMEOUT,
        )
        pc.connect_transaction_id = msg.transaction_id
        pc.connect_fingerprint = msg.fingerprint_offset >= 0
        self.peer_connections[pc.id] = pc
        alloc.peer_connections[peer] = pc
        self._install_permission(alloc, ip, now)
        relay.tcp.connect(pc.id, peer)
        raise DeferredResponse

    def connect_result(self, connection_id: int, ok: bool, now: float) -> bytes | None:
        """The I/O layer finished dialling; returns the Connect response for the client."""
        pc = self.peer_connections.get(connection_id)
        if pc is None or pc.state != PeerConnection.CONNECTING:
            return None
        alloc = pc.alloc
        ft = alloc.five_tuple
        if ok:
            pc.state = PeerConnection.PENDING_BIND
            pc.expires = now + CONNECTION_TIMEOUT
            self._push(pc.expires, TimerKind.PEER_CONNECTION, None, pc.id)
            attrs: Attributes = [(Attr.CONNECTION_ID, pc.id)]
            klass = MessageClass.SUCCESS
            self.events.append(ev.RequestHandled(ft, "connect", 0, "", alloc.username))
        else:
            self._forget_peer_connection(pc, close=False)
            err = ConnectionTimeoutOrFailure(f"could not connect to {pc.peer[0]}:{pc.peer[1]}")
            attrs = [(Attr.ERROR_CODE, (err.code, err.phrase))]
            klass = MessageClass.ERROR
            self.events.append(
                ev.RequestHandled(ft, "connect", err.code, err.reason, alloc.username)
            )
        if self.config.software:
            attrs.append((Attr.SOFTWARE, self.config.software))
        return encode_message(
            Method.CONNECT,
            klass,
            pc.connect_transaction_id,
            attrs,
            integrity_key=alloc.key,
            fingerprint=pc.connect_fingerprint,
        )

    def peer_connection_received(
        self, alloc: Allocation, peer: Address, now: float
    ) -> tuple[int, bytes] | None:
        """A peer connected to a TCP relayed address (RFC 6062 §5.3).

        Returns the CONNECTION-ID and the ConnectionAttempt indication for the client, or
        None when the peer has no permission (the I/O layer closes the connection)."""
        if not alloc.live or peer[0] not in alloc.permissions or peer in alloc.peer_connections:
            self.stats.dropped_no_permission += 1
            return None
        try:
            self._check_peer_connection_limits(alloc, connecting=False)
        except InsufficientCapacity as err:
            self.events.append(ev.MessageDiscarded(alloc.five_tuple, err.reason, err.detail))
            return None
        pc = PeerConnection(
            self._new_connection_id(),
            alloc,
            peer,
            PeerConnection.PENDING_BIND,
            now + CONNECTION_TIMEOUT,
        )
        self.peer_connections[pc.id] = pc
        alloc.peer_connections[peer] = pc
        self._push(pc.expires, TimerKind.PEER_CONNECTION, None, pc.id)
        return pc.id, encode_message(
            Method.CONNECTION_ATTEMPT,
            MessageClass.INDICATION,
            random.randbytes(12),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.CONNECTION_ID, pc.id)],
        )

    def _connection_bind(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 6062 §5.4: a new client connection takes over one peer connection."""
        if ft.transport == ClientTransport.UDP or ft in self.allocations:
            raise BadRequest("ConnectionBind must come on a new TCP connection")
        cid = msg.get(Attr.CONNECTION_ID)
        pc = self.peer_connections.get(cid) if cid is not None else None
        if pc is None or pc.state != PeerConnection.PENDING_BIND:
            raise BadRequest("unknown or already bound CONNECTION-ID")
        if ident.username != pc.alloc.username:
            raise WrongCredentials("username differs from the allocation's")
        return []

    def _finish_connection_bind(self, msg: StunMessage, ft: FiveTuple) -> None:
        pc = self.peer_connections[msg.get(Attr.CONNECTION_ID)]
        pc.state = PeerConnection.BOUND
        pc.data_five_tuple = ft
        self.events.append(ev.PeerConnectionBound(ft, pc.alloc.five_tuple, pc.id, pc.peer))

    def peer_connection_closed(self, connection_id: int) -> None:
        """The peer side or the data connection closed; forget the connection."""
        pc = self.peer_connections.get(connection_id)
        if pc is not None:
            self._forget_peer_connection(pc, close=False)

    def _forget_peer_connection(self, pc: PeerConnection, *, close: bool) -> None:
        self.peer_connections.pop(pc.id, None)
        alloc = pc.alloc
        if alloc.peer_connections.get(pc.peer) is pc:
            del alloc.peer_connections[pc.peer]
        if close:
            relay = alloc.relays.get(6 if ":" in pc.peer[0] else 4)
            if relay is not None and relay.tcp is not None:
                relay.tcp.close_connection(pc.id)

    def _reserve_quota(self, alloc: Allocation, ident: Identity) -> None:
        """Count the allocation against the quotas, last, so no failure needs undoing."""
        cfg = self.config
        why = self.quotas.reserve(
            ident.user,
            alloc.five_tuple.client[0],
            cfg.max_allocations,
            cfg.max_allocations_per_user,
            cfg.max_allocations_per_client_ip,
        )
        if why is not None:
            self._close_relays(alloc)
            if why == "quota_total":
                raise AllocationQuotaReached("server allocation limit reached", reason=why)
            if why == "quota_client_ip":
                raise AllocationQuotaReached(
                    f"client address {alloc.five_tuple.client[0]} has too many allocations",
                    reason=why,
                )
            raise AllocationQuotaReached(
                f"user {ident.user!r} has too many allocations", reason=why
            )

    def _token_mac(self, family: int, port: int, window: int) -> bytes:
        return self.auth.nonces.sign(b"reservation|%d|%d|%d" % (family, port, window))[:6]

    def _reservation_token(self, family: int, port: int, now: float) -> bytes:
        """RFC 8656 §14.9: 8 bytes, here the port and a MAC over it and the time window,
        so that any worker process sharing the key can honour it."""
        window = int(now // self.config.reservation_lifetime)
        return port.to_bytes(2, "big") + self._token_mac(family, port, window)

    def _check_reservation_token(self, token: bytes, now: float) -> Reservation | None:
        port = int.from_bytes(token[:2], "big")
        window = int(now // self.config.reservation_lifetime)
        for family in self.relay_addresses:
            for w in (window, window - 1):
                if hmac.compare_digest(token[2:], self._token_mac(family, port, w)):
                    return Reservation(family, port, now)
        return None

    def _bind_relay(self, alloc: Allocation, version: int, port: int, tcp: bool) -> Relay | None:
        """Ask the I/O layer for a relay socket on `port`; None when it is taken."""
        addr = self.relay_addresses[version]
        advertised = (addr.advertised_ip, port)
        if tcp:
            tcp_endpoint = self.relay_opener.open_tcp_relay(alloc, addr.bind_ip, port)
            return (
                Relay(tcp_endpoint, advertised, version, tcp=tcp_endpoint) if tcp_endpoint else None
            )
        endpoint = self.relay_opener.open_relay(
            alloc, addr.bind_ip, port, dont_fragment=alloc.dont_fragment
        )
        return Relay(endpoint, advertised, version, sendto=endpoint.sendto) if endpoint else None

    def _open_relay(
        self, alloc: Allocation, version: int, port: int | None = None, *, tcp: bool = False
    ) -> Relay:
        pool = self.port_pools[version]
        if port is not None:  # a reserved port: already out of the pool
            relay = self._bind_relay(alloc, version, port, tcp)
            if relay is None:
                pool.give_back(port)
                raise InsufficientCapacity("reserved relay port could not be bound")
            return relay
        busy: list[int] = []
        try:
            for _ in range(_BIND_ATTEMPTS):
                candidate = pool.take_random()
                if candidate is None:
                    break
                relay = self._bind_relay(alloc, version, candidate, tcp)
                if relay is not None:
                    return relay
                busy.append(candidate)
        finally:
            for p in busy:
                pool.give_back(p)
        raise InsufficientCapacity(f"no free {'TCP ' if tcp else ''}relay port for IPv{version}")

    def _open_even_relay(
        self, alloc: Allocation, version: int, reserve_next: bool
    ) -> tuple[Relay, int | None]:
        """RFC 8656 §7.2 EVEN-PORT: an even port, and port+1 held when R is set."""
        pool = self.port_pools[version]
        for _ in range(_BIND_ATTEMPTS):
            port = pool.take_even(reserve_next)
            if port is None:
                break
            relay = self._bind_relay(alloc, version, port, tcp=False)
            if relay is not None:
                return relay, (port + 1 if reserve_next else None)
            pool.give_back(port)
            if reserve_next:
                pool.give_back(port + 1)
        raise InsufficientCapacity("no free even relay port")

    def _close_relays(self, alloc: Allocation) -> None:
        for version, relay in alloc.relays.items():
            relay.endpoint.close()
            self.port_pools[version].give_back(relay.port)
        alloc.relays.clear()

    def _refresh(self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float) -> Attributes:
        """RFC 8656 §7.4; LIFETIME 0 deletes the allocation."""
        alloc = self._allocation_of(ft, ident)
        family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        version = _FAMILY_VERSION.get(family) if family is not None else None
        if family is not None and version not in alloc.relays:
            raise PeerAddressFamilyMismatch("REQUESTED-ADDRESS-FAMILY not in this allocation")
        requested = msg.get(Attr.LIFETIME)
        if requested == 0:
            if version is not None and len(alloc.relays) > 1:
                # RFC 8656 §7.4: delete one family of a dual allocation
                relay = alloc.relays.pop(version)
                relay.endpoint.close()
                self.port_pools[version].give_back(relay.port)
                for ip in [ip for ip in alloc.permissions if (":" in ip) == (version == 6)]:
                    del alloc.permissions[ip]
                    alloc.update_routes(ip)
                return [(Attr.LIFETIME, 0)]
            self._delete(alloc, now, "deleted")
            return [(Attr.LIFETIME, 0)]
        lifetime = self._lifetime(requested)
        alloc.expires = now + lifetime
        if alloc.expires < alloc.timer_at:  # shortened: fire earlier; a later expiry waits
            self._arm_allocation(alloc)
        self.events.append(ev.AllocationRefreshed(ft, lifetime))
        return [(Attr.LIFETIME, lifetime)]

    def _check_peer(self, alloc: Allocation, peer: Address, ft: FiveTuple) -> str:
        """Family and policy checks shared by CreatePermission and ChannelBind."""
        ip = ipaddress.ip_address(peer[0])
        if ip.version not in alloc.relays:
            raise PeerAddressFamilyMismatch(f"peer {peer[0]} has no relay of its family")
        if alloc.username in self.probe_users and peer[0] in self.probe_peer_ips:
            return str(ip)  # the self-probe's echo sockets (any worker's)
        if not self.peer_policy.is_allowed(ip) or peer in self.config.reserved_peers:
            self.events.append(ev.PeerDenied(ft, peer[0]))
            raise Forbidden(f"peer {peer[0]} is not allowed by the peer policy")
        return str(ip)

    def revoke_denied_peers(self) -> int:
        """After the peer policy changed (SIGHUP): remove at once every permission whose
        peer it now denies, with its channels and RFC 6062 connections. Returns how many."""
        removed = 0
        policy = self.peer_policy
        for alloc in list(self.allocations.values()):
            probe = alloc.username in self.probe_users
            for ip in list(alloc.permissions):
                if probe and ip in self.probe_peer_ips:
                    continue
                if not policy.is_allowed(ipaddress.ip_address(ip)):
                    self._revoke_permission(alloc, ip, "peer_policy")
                    removed += 1
        return removed

    def _revoke_permission(self, alloc: Allocation, ip: str, reason: str) -> None:
        del alloc.permissions[ip]
        for binding in [b for b in alloc.bindings.values() if b.peer[0] == ip]:
            del alloc.bindings[binding.number]
            del alloc.bindings_by_peer[binding.peer]
            alloc.channel_routes.pop(binding.number, None)
            alloc.peer_channels.pop(binding.peer, None)
        for pc in [pc for pc in alloc.peer_connections.values() if pc.peer[0] == ip]:
            self._forget_peer_connection(pc, close=True)
        self.events.append(ev.PermissionRevoked(alloc.five_tuple, alloc.username, ip, reason))

    def _install_permission(self, alloc: Allocation, ip: str, now: float) -> None:
        new = ip not in alloc.permissions
        expires = now + self.config.permission_lifetime
        alloc.permissions[ip] = max(expires, alloc.permissions.get(ip, 0.0))
        if new:  # one timer per permission; a refresh moves it when it fires
            self._push(expires, TimerKind.PERMISSION, alloc, ip)
            alloc.update_routes(ip)
            self.events.append(ev.PermissionInstalled(alloc.five_tuple, ip))

    def _create_permission(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 8656 §10.2: all XOR-PEER-ADDRESS must pass, or none is installed."""
        alloc = self._allocation_of(ft, ident)
        peers: list[Address] = msg.get_all(Attr.XOR_PEER_ADDRESS)
        if not peers:
            raise BadRequest("CreatePermission without XOR-PEER-ADDRESS")
        if len(peers) > MAX_PEERS_PER_REQUEST:
            raise BadRequest(f"more than {MAX_PEERS_PER_REQUEST} XOR-PEER-ADDRESS attributes")
        ips = list(dict.fromkeys(self._check_peer(alloc, p, ft) for p in peers))
        limit = self.config.max_permissions_per_allocation
        if (
            limit
            and len(alloc.permissions) + sum(ip not in alloc.permissions for ip in ips) > limit
        ):
            raise InsufficientCapacity("too many permissions", reason="quota_permissions")
        for ip in ips:
            self._install_permission(alloc, ip, now)
        return []

    def _channel_bind(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 8656 §12.2."""
        alloc = self._allocation_of(ft, ident)
        number = msg.get(Attr.CHANNEL_NUMBER)
        peer: Address | None = msg.get(Attr.XOR_PEER_ADDRESS)
        if alloc.is_tcp:
            raise BadRequest("ChannelBind does not apply to TCP allocations (RFC 6062)")
        if number is None or peer is None:
            raise BadRequest("ChannelBind needs CHANNEL-NUMBER and XOR-PEER-ADDRESS")
        if not is_valid_channel_number(number):
            raise BadRequest(f"channel number 0x{number:04x} out of range")
        ip = self._check_peer(alloc, peer, ft)
        peer = (ip, peer[1])
        binding = alloc.bindings.get(number)
        if binding is not None and binding.peer != peer:
            raise BadRequest(f"channel 0x{number:04x} is bound to another peer")
        other = alloc.bindings_by_peer.get(peer)
        if other is not None and other.number != number:
            raise BadRequest(f"peer is bound to channel 0x{other.number:04x}")
        limit = self.config.max_channels_per_allocation
        if binding is None and limit and len(alloc.bindings) >= limit:
            raise InsufficientCapacity("too many channels", reason="quota_channels")
        expires = now + self.config.channel_lifetime
        if binding is None:
            binding = ChannelBinding(number, peer, expires)
            alloc.bindings[number] = binding
            alloc.bindings_by_peer[peer] = binding
            self._push(expires, TimerKind.CHANNEL, alloc, number)  # one timer per channel
            self.events.append(ev.ChannelBound(ft, number, peer))
        binding.expires = expires
        self._install_permission(alloc, ip, now)  # RFC 8656 §12.2 also refreshes it
        alloc.update_routes(ip)
        return []

    def _handle_send(self, msg: StunMessage, ft: FiveTuple, now: float) -> None:
        """RFC 8656 §11.2: relay DATA to the peer if a permission exists, else drop."""
        alloc = self.allocations.get(ft)
        if alloc is None:
            self.stats.dropped_no_allocation += 1
            return
        try:
            peer: Address | None = msg.get(Attr.XOR_PEER_ADDRESS)
            data: bytes | None = msg.get(Attr.DATA)
        except StunDecodeError:
            peer = None
            data = None
        if peer is None or data is None or msg.unknown_required_attributes():
            self.stats.dropped_malformed += 1
            return
        if peer[0] not in alloc.permissions:
            self.stats.dropped_no_permission += 1
            return
        if peer in self.config.reserved_peers:
            self.stats.dropped_peer_denied += 1
            return
        if alloc.rate and not alloc.spend(len(data), now):
            self.stats.dropped_rate_limited += 1
            return
        relay = alloc.relays.get(6 if ":" in peer[0] else 4)
        if relay is None or relay.sendto is None:
            self.stats.dropped_no_permission += 1
            return
        try:
            relay.sendto(data, peer)
        except OSError as exc:  # EMSGSIZE with DONT-FRAGMENT, unreachable routes, ...
            self.send_failed(alloc, peer, exc, now)
            return
        alloc.packets_to_peer += 1
        alloc.bytes_to_peer += len(data)

    # ---- expiry ---------------------------------------------------------------------

    def _push(self, when: float, kind: TimerKind, owner: Any, key: Any) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, owner, key))

    def _arm_allocation(self, alloc: Allocation) -> None:
        alloc.timer_at = alloc.expires
        self._push(alloc.expires, TimerKind.ALLOCATION, alloc, None)

    def _expire_permission(self, alloc: Allocation, ip: str, now: float) -> None:
        expires = alloc.permissions.get(ip)
        if not alloc.live or expires is None:
            return
        if expires > now:  # refreshed: the same timer fires again later
            self._push(expires, TimerKind.PERMISSION, alloc, ip)
            return
        del alloc.permissions[ip]
        alloc.update_routes(ip)
        self.events.append(ev.PermissionExpired(alloc.five_tuple, ip))

    def _expire_channel(self, alloc: Allocation, number: int, now: float) -> None:
        binding = alloc.bindings.get(number)
        if not alloc.live or binding is None:
            return
        if binding.expires > now:  # refreshed: the same timer fires again later
            self._push(binding.expires, TimerKind.CHANNEL, alloc, number)
            return
        del alloc.bindings[number]
        del alloc.bindings_by_peer[binding.peer]
        alloc.channel_routes.pop(number, None)
        alloc.peer_channels.pop(binding.peer, None)
        self.events.append(ev.ChannelExpired(alloc.five_tuple, number, binding.peer))

    def _delete(self, alloc: Allocation, now: float, cause: str) -> None:
        if not alloc.live:
            return
        alloc.live = False
        self.allocations.pop(alloc.five_tuple, None)
        self.quotas.release(alloc.user, alloc.five_tuple.client[0])
        relayed = alloc.relayed_addresses
        for pc in list(alloc.peer_connections.values()):
            self._forget_peer_connection(pc, close=False)  # closing the relay closes them
        self._close_relays(alloc)

        alloc.channel_routes.clear()
        alloc.peer_channels.clear()
        alloc.bindings.clear()
        alloc.bindings_by_peer.clear()
        alloc.permissions.clear()
        stats = self.stats
        stats.ended_packets_to_peer += alloc.packets_to_peer
        stats.ended_bytes_to_peer += alloc.bytes_to_peer
        stats.ended_packets_to_client += alloc.packets_to_client
        stats.ended_bytes_to_client += alloc.bytes_to_client
        self.events.append(
            ev.AllocationEnded(
                alloc.five_tuple,
                alloc.username,
                relayed,
                cause,
                now - alloc.created,
                alloc.packets_to_peer,
                alloc.bytes_to_peer,
                alloc.packets_to_client,
                alloc.bytes_to_client,
            )
        )

    def shutdown(self, now: float) -> None:
        """Delete every allocation (process exit)."""
        for alloc in list(self.allocations.values()):
            self._delete(alloc, now, "shutdown")

    def relay_totals(self) -> tuple[int, int, int, int]:
        """(packets to peer, bytes to peer, packets to client, bytes to client) so far."""
        s = self.stats
        pp, bp, pc, bc = (
            s.ended_packets_to_peer,
            s.ended_bytes_to_peer,
            s.ended_packets_to_client,
            s.ended_bytes_to_client,
        )
        for a in self.allocations.values():
            pp += a.packets_to_peer
            bp += a.bytes_to_peer
            pc += a.packets_to_client
            bc += a.bytes_to_client
        return pp, bp, pc, bc


def _method_name(method: int) -> str:
    try:
        return Method(method).name.lower()
    except ValueError:
        return "unknown"


def _safe_username(msg: StunMessage) -> str:
    try:
        name = msg.get(Attr.USERNAME)
    except StunDecodeError:
        return ""
    return name if isinstance(name, str) else ""
