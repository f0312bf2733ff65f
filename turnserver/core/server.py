"""The TURN server state machine, sans I/O (RFC 8656, RFC 8489).

Callers feed it client messages with the 5-tuple and the time, and get back the
response bytes; relay sockets come from an injected RelayOpener. It owns all
allocations, answers "when is the next expiry?" for one adapter timer, and reports
what happened as events.
"""

from __future__ import annotations

import heapq
from typing import NoReturn

from turnserver.core import events as ev
from turnserver.core.admin import AdminActions
from turnserver.core.allocate import AllocationHandlers
from turnserver.core.allocation import PeerConnection, RelayOpener
from turnserver.core.auth import NO_INTEGRITY, OFFERED_ALGORITHMS, Authenticator
from turnserver.core.auth_hook import AuthHookPending, HookGrant
from turnserver.core.config import CoreConfig
from turnserver.core.errors import (
    CHALLENGE_NOTES,
    BadRequest,
    StaleNonce,
    TryAlternate,
    TurnError,
    Unauthorized,
    UnknownAttribute,
)
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.identity import Identity
from turnserver.core.permissions import PermissionHandlers
from turnserver.core.policy import PeerPolicy
from turnserver.core.state import (
    MAX_CONTROL_MESSAGE,
    MAX_PEERS_PER_REQUEST,
    SEND_INDICATION_TYPE,
    Attributes,
    CoreState,
    DeferredResponse,
    Handler,
    RelayStats,
    Reply,
    TimerKind,
)
from turnserver.core.tcp_connections import TcpConnectionHandlers
from turnserver.core.tenants import DEFAULT_TENANT
from turnserver.stun.attributes import Address
from turnserver.stun.constants import (
    ERROR_REASONS,
    Attr,
    MessageClass,
    Method,
)
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.message import (
    StunMessage,
    decode_message,
    encode_attributes,
    encode_message,
)

__all__ = [
    "MAX_CONTROL_MESSAGE",
    "MAX_PEERS_PER_REQUEST",
    "CoreState",
    "DeferredResponse",
    "RelayStats",
    "Reply",
    "TimerKind",
    "TurnServer",
]


class TurnServer(CoreState):
    """All allocations of one process and the rules that change them: the sans-IO entry
    points (handle_message, handle_timer, next_timer, drain_events) over the request
    handlers, which hold this state (pion's internal/server: handlers by composition)."""

    def __init__(
        self,
        config: CoreConfig,
        authenticator: Authenticator,
        relay_opener: RelayOpener,
        peer_policy: PeerPolicy,
    ) -> None:
        super().__init__(config, authenticator, relay_opener, peer_policy)
        self.allocating = AllocationHandlers(self)  # RFC 8656 §7: Allocate, Refresh
        self.permitting = PermissionHandlers(self)  # §9-§12: permissions, channels, data
        self.tcp_relaying = TcpConnectionHandlers(self)  # RFC 6062: Connect, ConnectionBind
        self.admin = AdminActions(self, self.allocating)  # what an operator may do
        # STUN method -> handler: every request the server answers (RFC 8656 §5)
        self.handlers: dict[int, Handler] = {
            Method.ALLOCATE: self.allocating.allocate,
            Method.REFRESH: self.allocating.refresh,
            Method.CREATE_PERMISSION: self.permitting.create_permission,
            Method.CHANNEL_BIND: self.permitting.channel_bind,
            Method.CONNECT: self.tcp_relaying.connect,
            Method.CONNECTION_BIND: self.tcp_relaying.connection_bind,
        }
        # what the I/O and operations layers call on the handlers, named here
        p, tcp, admin = self.permitting, self.tcp_relaying, self.admin
        self.relay_channel_data = p.relay_channel_data
        self.send_failed = p.send_failed
        self.data_indication = p.data_indication
        self.icmp_indication = p.icmp_indication
        self.revoke_denied_peers = p.revoke_denied_peers
        self.connect_result = tcp.connect_result
        self.peer_connection_received = tcp.peer_connection_received
        self.hand_over_peer_connection = tcp.hand_over_peer_connection
        self.finish_remote_bind = tcp.finish_remote_bind
        self.peer_connection_closed = tcp.peer_connection_closed
        self.end_allocation = admin.end_allocation
        self.revoke = admin.revoke
        self.unrevoke = admin.unrevoke
        self.set_revocations = admin.set_revocations
        self.apply_bandwidth = admin.apply_bandwidth
        self.allocation_info = admin.allocation_info

    def handle_message(self, data: bytes, five_tuple: FiveTuple, now: float) -> bytes | None:
        """A STUN message from a client; returns the response to send back, if any."""
        if len(data) > MAX_CONTROL_MESSAGE and data[:2] != SEND_INDICATION_TYPE:
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
            self.permitting.handle_send(msg, five_tuple, now)
        return None

    def handle_channel_data(
        self, number: int, payload: bytes, five_tuple: FiveTuple, now: float
    ) -> None:
        """ChannelData from a client when the I/O fast path did not take it (RFC 8656 §12.6)."""
        self.permitting.relay_channel_data(self.allocations.get(five_tuple), number, payload, now)

    def fleet_lease_result(
        self, ft: FiveTuple, transaction_id: bytes, user: str, message: bytes, ok: bool, now: float
    ) -> bytes | None:
        """The fleet answered the lease a FleetLeaseNeeded asked for (`message` is that
        event's Allocate): the Allocate runs again and its response, for the client of
        `ft`, is returned. A granted lease the request no longer takes (its nonce went
        stale, the client allocated meanwhile, the fleet quota was switched off) is
        given back at once."""
        leases = self.fleet_leases
        key = (ft, transaction_id)
        if leases is None or key not in leases.pending:
            if ok:
                self.allocating.fleet_release(user)
            return None
        leases.pending.discard(key)
        (leases.granted if ok else leases.refused).add(key)
        try:
            return self.handle_message(message, ft, now)
        finally:
            if key in leases.granted:  # not taken
                leases.granted.discard(key)
                self.allocating.fleet_release(user)
            leases.refused.discard(key)

    def _await_hook(self, pending: AuthHookPending, msg: StunMessage, ft: FiveTuple) -> NoReturn:
        """Hold the request for the hook's answer (asked once per user); raises
        DeferredResponse, or Unauthorized when too many users wait."""
        book = self.auth.hook
        assert book is not None
        if book.wait(pending.key, ft, msg.raw):
            self.events.append(ev.AuthHookNeeded(pending.key[0], pending.key[1], ft))
        raise DeferredResponse

    def auth_hook_result(
        self, username: str, realm: str, grant: HookGrant | None, refused_until: float, now: float
    ) -> list[tuple[FiveTuple, bytes]]:
        """The hook answered for (username, realm): a grant, a refusal until
        `refused_until` (Unix time), or neither (it failed). The requests that waited
        run again; their responses are returned, for the I/O layer to send."""
        book = self.auth.hook
        if book is None:
            return []
        out: list[tuple[FiveTuple, bytes]] = []
        for ft, message in book.answer(
            (username, realm), grant, refused_until, now + self.wall_offset
        ):
            response = self.handle_message(message, ft, now)
            if response is not None:
                out.append((ft, response))
        return out

    def close_five_tuple(self, five_tuple: FiveTuple, now: float) -> None:
        """The client's connection closed: its allocation goes with it (RFC 6062 §2)."""
        self.remote_binds.pop(five_tuple, None)
        alloc = self.allocations.get(five_tuple)
        if alloc is not None:
            self.allocating.delete(alloc, now, "connection_closed")

    def next_timer(self) -> float | None:
        """When the earliest expiry is due, for the adapter's one timer."""
        return self.timers[0][0] if self.timers else None

    def handle_timer(self, now: float) -> None:
        """Expire allocations, permissions, channels and reservations that are due."""
        timers = self.timers
        while timers and timers[0][0] <= now:
            when, _, kind, owner, key = heapq.heappop(timers)
            if kind == TimerKind.ALLOCATION:
                if not owner.live:
                    continue
                if owner.expires <= now:
                    self.allocating.delete(owner, now, "expired")
                elif when == owner.timer_at:  # refreshed since: one entry, moved later
                    self.arm_allocation(owner)
            elif kind == TimerKind.CREDENTIAL:
                if owner.live:
                    self.allocating.delete(owner, now, "credential_expired")
            elif kind == TimerKind.PERMISSION:
                self.permitting.expire_permission(owner, key, now)
            elif kind == TimerKind.CHANNEL:
                self.permitting.expire_channel(owner, key, now)
            elif kind == TimerKind.PEER_CONNECTION:
                pc = self.peer_connections.get(key)
                pending = pc is not None and pc.state == PeerConnection.PENDING_BIND
                if pc is not None and pending and pc.expires <= now:
                    self.forget_peer_connection(pc, close=True)

            elif kind == TimerKind.RESERVATION:
                res = self.reservations.get(key)
                if res is not None and res.expires <= now:
                    self.release_reservation(key)

    def drain_events(self) -> list[ev.Event]:
        """Events since the last call, oldest first."""
        out, self.events = self.events, []
        return out

    def relay_ports_free(self) -> int:
        """Free relay ports summed over address families."""
        return sum(len(p) for p in self.port_pools.values())

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
        handler = self.handlers.get(method)
        method_name = _method_name(method)
        if handler is not None and msg.integrity_offset < 0 and msg.integrity_sha256_offset < 0:
            # what authenticate() would raise first, without the exception path: the
            # first request of every allocation (benchmarks/README.md)
            if self._challenge_dropped(ft, now):
                return None
            self._report_failure(msg, ft, None, _CHALLENGE, method_name)
            return self._challenge_answer(msg, ft, _CHALLENGE.code, now)
        identity: Identity | None = None
        try:
            if handler is None:
                raise BadRequest(f"unsupported method 0x{method:03x}")
            wall = now + self.wall_offset
            try:
                identity = self.auth.authenticate(msg, ft.client[0], wall)
            except AuthHookPending as pending:  # a user only the hook may know: wait
                self._await_hook(pending, msg, ft)
            if self.revocations:
                self.admin.check_revoked(identity.user, wall)
            unknown = msg.unknown_required_attributes()
            if unknown:
                raise UnknownAttribute(unknown)
            attrs = handler(msg, ft, identity, now)
        except DeferredResponse:
            return None
        except TurnError as err:
            if isinstance(err, Unauthorized | StaleNonce) and self._challenge_dropped(ft, now):
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
            integrity_sha256=identity.sha256_integrity,
        )
        if method == Method.ALLOCATE:
            alloc = self.allocations[ft]
            alloc.allocate_response = response
        elif method == Method.CONNECTION_BIND:
            self.tcp_relaying.finish_connection_bind(msg, ft)
        self.events.append(ev.RequestHandled(ft, method_name, 0, "", identity.username))
        return response

    def _challenge_dropped(self, ft: FiveTuple, now: float) -> bool:
        """RFC 8656 §21.1: bound what spoofed UDP senders can make us reflect in 401/438
        answers (over TCP/TLS the handshake proves the source, and a dropped answer
        would hang); True when this one is dropped (counted)."""
        if ft.transport != ClientTransport.UDP or self._challenge_allowed(ft.client[0], now):
            return False
        self.stats.dropped_rate_limited += 1
        self.events.append(ev.MessageDiscarded(ft, "challenge_rate_limited", ""))
        return True

    def _challenge_answer(
        self, msg: StunMessage, ft: FiveTuple, code: int, now: float, note: str = ""
    ) -> bytes:
        """RFC 8489 §9.2.4: a 401/438 carries REALM, a fresh NONCE and PASSWORD-ALGORITHMS,
        never integrity. All but the nonce are encoded once per realm and code (the 401
        is the first answer of every allocation)."""
        realm = self.auth.realm_for(msg)
        fixed = self._challenge_attributes.get((realm, code, note))
        if fixed is None:
            if len(self._challenge_attributes) >= 1024:  # realms change only on reload
                self._challenge_attributes.clear()
            # an expired credential says so (only its holder, whose MAC verified, gets
            # it), as does an authorization hook that did not answer
            words = ERROR_REASONS.get(code, "Error") + (f" ({note})" if note else "")
            fixed = self._challenge_attributes[(realm, code, note)] = encode_attributes(
                [
                    (Attr.ERROR_CODE, (code, words)),
                    (Attr.REALM, realm),
                    (Attr.PASSWORD_ALGORITHMS, OFFERED_ALGORITHMS),
                ]
            )
        return encode_message(
            msg.method,
            MessageClass.ERROR,
            msg.transaction_id,
            [(Attr.NONCE, self.auth.nonces.issue(ft.client[0], now + self.wall_offset))],
            fingerprint=msg.fingerprint_offset >= 0,
            encoded=fixed,
        )

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
            tenant = identity.tenant if identity else DEFAULT_TENANT
            self.events.append(
                ev.AllocationRefused(ft, username, err.code, err.reason, err.detail, tenant)
            )

    def _error_response(
        self,
        msg: StunMessage,
        ft: FiveTuple,
        err: TurnError,
        identity: Identity | None,
        now: float,
    ) -> bytes:
        if isinstance(err, Unauthorized | StaleNonce):
            return self._challenge_answer(
                msg, ft, err.code, now, CHALLENGE_NOTES.get(err.reason, "")
            )
        attrs: Attributes = [(Attr.ERROR_CODE, (err.code, err.phrase))]
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
            integrity_sha256=identity.sha256_integrity if identity else False,
        )

    def _binding(self, msg: StunMessage, ft: FiveTuple) -> bytes:
        """RFC 8489 §6.3: reflect the source address; no authentication."""
        unknown = msg.unknown_required_attributes()
        try:
            change = msg.get(Attr.CHANGE_REQUEST) if msg.has(Attr.CHANGE_REQUEST) else 0
        except StunDecodeError:  # found by the fuzzer: a CHANGE-REQUEST of the wrong size
            change = None
        origin = ft.server
        if change:
            # RFC 5780 §6.1: answer from the other IP and/or port; 420 when we have none
            target = self._change_origin(ft, bool(change & 0x4), bool(change & 0x2))
            if target is None:
                unknown = [*unknown, Attr.CHANGE_REQUEST]
            else:
                origin = target
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
                # RFC 5780 §7.3: where a client can test its NAT's mapping from, and
                # where this answer comes from (it may not be where the request went)
                attrs.append((Attr.OTHER_ADDRESS, self.config.other_address))
                attrs.append((Attr.RESPONSE_ORIGIN, origin))
            klass = MessageClass.SUCCESS

        else:  # RFC 3489 client: MAPPED-ADDRESS, echo its 16-byte transaction id
            attrs = [(Attr.MAPPED_ADDRESS, ft.client)]
            klass = MessageClass.SUCCESS
        # No SOFTWARE here: a Binding answer should not be much larger than its request.
        cookie = int.from_bytes(msg.raw[4:8], "big")
        code = 0 if klass == MessageClass.SUCCESS else 420 if change is not None else 400
        reason = {0: "", 420: "unknown_attribute"}.get(code, "bad_request")
        self.events.append(ev.RequestHandled(ft, "binding", code, reason))
        data = encode_message(
            Method.BINDING,
            klass,
            msg.transaction_id,
            attrs,
            fingerprint=msg.fingerprint_offset >= 0,
            magic_cookie=cookie,
        )
        return data if origin == ft.server else Reply(data, origin)

    def _change_origin(self, ft: FiveTuple, change_ip: bool, change_port: bool) -> Address | None:
        """RFC 5780 §6.1: the address to answer a CHANGE-REQUEST from: the other IP
        and/or the other port of (primary, OTHER-ADDRESS), if we listen there."""
        cfg = self.config
        primary, other = cfg.rfc5780_primary, cfg.other_address
        if ft.transport != ClientTransport.UDP or primary is None or other is None:
            return None
        ip, port = ft.server
        if change_ip:
            if primary[0] == other[0]:
                return None
            ip = other[0] if ip == primary[0] else primary[0]
        if change_port:
            if primary[1] == other[1]:
                return None
            port = other[1] if port == primary[1] else primary[1]
        target = (ip, port)
        return target if target in cfg.rfc5780_addresses else None

    def shutdown(self, now: float) -> None:
        """Delete every allocation (process exit)."""
        for alloc in list(self.allocations.values()):
            self.allocating.delete(alloc, now, "shutdown")


_METHOD_NAMES = {m.value: m.name.lower() for m in Method}
# the refusal of a request without MESSAGE-INTEGRITY, reported but never raised
_CHALLENGE = Unauthorized(NO_INTEGRITY, reason="unauthenticated")


def _method_name(method: int) -> str:
    return _METHOD_NAMES.get(method, "unknown")


def _safe_username(msg: StunMessage) -> str:
    try:
        name = msg.get(Attr.USERNAME)
    except StunDecodeError:
        return ""
    return name if isinstance(name, str) else ""
