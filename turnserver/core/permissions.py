"""Permissions and channels (RFC 8656 §9-§12): CreatePermission, ChannelBind, Send and
Data indications, ChannelData, their expiry and revocation, and failed sends."""

from __future__ import annotations

import random
import struct

from turnserver.core import events as ev
from turnserver.core.allocation import (
    Allocation,
    ChannelBinding,
)
from turnserver.core.errors import (
    BadRequest,
    InsufficientCapacity,
)
from turnserver.core.five_tuple import FiveTuple
from turnserver.core.identity import Identity
from turnserver.core.state import (
    ICMP_PER_SECOND,
    MAX_PEERS_PER_REQUEST,
    SEND_ERROR_LOG_INTERVAL,
    Attributes,
    CoreState,
    TimerKind,
)
from turnserver.stun.attributes import Address
from turnserver.stun.channeldata import is_valid_channel_number
from turnserver.stun.constants import (
    Attr,
    MessageClass,
    Method,
)
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.message import StunMessage, encode_message


class PermissionHandlers:
    """CreatePermission, ChannelBind, Send/Data and ChannelData."""

    def __init__(self, state: CoreState) -> None:
        self.state = state

    def relay_channel_data(
        self, alloc: Allocation | None, number: int, payload: bytes, now: float
    ) -> None:
        """Send a client's ChannelData payload to the channel's peer, or count the drop."""
        if alloc is None:
            self.state.stats.dropped_no_allocation += 1
            return
        target = alloc.channel_targets.get(number)
        if target is None:
            self.state.stats.dropped_unknown_channel += 1
            return
        if alloc.rate and not alloc.spend(len(payload), now):
            self.state.stats.dropped_rate_limited += 1
            return
        try:
            target[0](payload, target[1])
        except OSError as exc:  # a lost datagram, as UDP allows: counted, never fatal
            self.send_failed(alloc, target[1], exc, now)
            return
        alloc.packets_to_peer += 1
        alloc.bytes_to_peer += len(payload)

    def send_failed(self, alloc: Allocation, peer: Address, exc: OSError, now: float) -> bool:
        """Count a failed send on a relay path (either direction); report it at most once
        per allocation, errno and SEND_ERROR_LOG_INTERVAL. True when an event was added."""
        self.state.stats.dropped_send_error += 1
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
        self.state.events.append(
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
            self.state.stats.dropped_no_permission += 1
            return None
        if alloc.rate and not alloc.spend(len(payload), now):
            self.state.stats.dropped_rate_limited += 1
            return None
        alloc.packets_to_client += 1
        alloc.bytes_to_client += len(payload)
        return encode_message(
            Method.DATA,
            MessageClass.INDICATION,
            random.randbytes(12),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, payload)],
        )

    def icmp_indication(
        self,
        alloc: Allocation,
        peer: Address,
        icmp_type: int,
        icmp_code: int,
        error_data: int,
        now: float,
    ) -> bytes | None:
        """RFC 8656 §11.6: an ICMP error about a datagram we relayed to `peer` becomes a
        Data indication with XOR-PEER-ADDRESS and ICMP (§18.13), no DATA; only when the
        peer has a permission, and at most ICMP_PER_SECOND a second per allocation."""
        v6 = ":" in peer[0]
        if icmp_type not in ((1, 2, 3) if v6 else (3, 11)):
            self.state.stats.dropped_icmp += 1
            return None
        if peer[0] not in alloc.permissions:
            self.state.stats.dropped_icmp += 1
            return None
        second = int(now)
        window, count = alloc.icmp_window
        if window == second and count >= ICMP_PER_SECOND:
            self.state.stats.dropped_icmp += 1
            return None
        alloc.icmp_window = (second, count + 1 if window == second else 1)
        self.state.stats.icmp_to_client += 1
        value = struct.pack("!HBBI", 0, icmp_type, icmp_code, error_data & 0xFFFFFFFF)
        return encode_message(
            Method.DATA,
            MessageClass.INDICATION,
            random.randbytes(12),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.ICMP, value)],
        )

    def revoke_denied_peers(self) -> int:
        """After the peer policy or the host's addresses changed: remove at once every
        permission whose peer is now denied, with its channels and RFC 6062 connections.
        Returns how many."""
        removed = 0
        for alloc in list(self.state.allocations.values()):
            probe = alloc.username in self.state.probe_users
            for ip in list(alloc.permissions):
                if probe and ip in self.state.probe_peer_ips:
                    continue
                _, _, allowed, explicit, canon = self.state.policy_verdict(alloc, ip)
                if not allowed:
                    self._revoke_permission(alloc, ip, "peer_policy")
                    removed += 1
                elif self.state.own.refusal(canon, None, explicit, allowed):
                    self._revoke_permission(alloc, ip, "host_address")
                    removed += 1
        return removed

    def _revoke_permission(self, alloc: Allocation, ip: str, reason: str) -> None:
        del alloc.permissions[ip]
        for binding in [b for b in alloc.bindings.values() if b.peer[0] == ip]:
            alloc.remove_binding(binding)
        for pc in [pc for pc in alloc.peer_connections.values() if pc.peer[0] == ip]:
            self.state.forget_peer_connection(pc, close=True)
        self.state.events.append(ev.PermissionRevoked(alloc.five_tuple, alloc.username, ip, reason))

    def create_permission(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 8656 §10.2: all XOR-PEER-ADDRESS must pass, or none is installed."""
        alloc = self.state.allocation_of(ft, ident)
        peers: list[Address] = msg.get_all(Attr.XOR_PEER_ADDRESS)
        if not peers:
            raise BadRequest("CreatePermission without XOR-PEER-ADDRESS")
        if len(peers) > MAX_PEERS_PER_REQUEST:
            raise BadRequest(f"more than {MAX_PEERS_PER_REQUEST} XOR-PEER-ADDRESS attributes")
        ips = list(
            dict.fromkeys(self.state.check_peer(alloc, p, ft, with_port=False) for p in peers)
        )
        limit = self.state.config.max_permissions_per_allocation
        if (
            limit
            and len(alloc.permissions) + sum(ip not in alloc.permissions for ip in ips) > limit
        ):
            raise InsufficientCapacity("too many permissions", reason="quota_permissions")
        for ip in ips:
            self.state.install_permission(alloc, ip, now)
        return []

    def channel_bind(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 8656 §12.2."""
        alloc = self.state.allocation_of(ft, ident)
        number = msg.get(Attr.CHANNEL_NUMBER)
        peer: Address | None = msg.get(Attr.XOR_PEER_ADDRESS)
        if alloc.is_tcp:
            raise BadRequest("ChannelBind does not apply to TCP allocations (RFC 6062)")
        if number is None or peer is None:
            raise BadRequest("ChannelBind needs CHANNEL-NUMBER and XOR-PEER-ADDRESS")
        if not is_valid_channel_number(number):
            raise BadRequest(f"channel number 0x{number:04x} out of range")
        ip = self.state.check_peer(alloc, peer, ft, with_port=True)
        peer = (ip, peer[1])
        binding = alloc.bindings.get(number)
        if binding is not None and binding.peer != peer:
            raise BadRequest(f"channel 0x{number:04x} is bound to another peer")
        other = alloc.bindings_by_peer.get(peer)
        if other is not None and other.number != number:
            raise BadRequest(f"peer is bound to channel 0x{other.number:04x}")
        limit = self.state.config.max_channels_per_allocation
        if binding is None and limit and len(alloc.bindings) >= limit:
            raise InsufficientCapacity("too many channels", reason="quota_channels")
        expires = now + self.state.config.channel_lifetime
        if binding is None:
            binding = ChannelBinding(number, peer, expires)
            alloc.bindings[number] = binding
            alloc.bindings_by_peer[peer] = binding
            self.state.push_timer(
                expires, TimerKind.CHANNEL, alloc, number
            )  # one timer per channel
            self.state.events.append(ev.ChannelBound(ft, number, peer))
        binding.expires = expires
        self.state.install_permission(alloc, ip, now)  # RFC 8656 §12.2 also refreshes it
        alloc.update_routes(ip)
        return []

    def handle_send(self, msg: StunMessage, ft: FiveTuple, now: float) -> None:
        """RFC 8656 §11.2: relay DATA to the peer if a permission exists, else drop."""
        alloc = self.state.allocations.get(ft)
        if alloc is None:
            self.state.stats.dropped_no_allocation += 1
            return
        try:
            peer: Address | None = msg.get(Attr.XOR_PEER_ADDRESS)
            data: bytes | None = msg.get(Attr.DATA)
        except StunDecodeError:
            peer = None
            data = None
        if peer is None or data is None or msg.unknown_required_attributes():
            self.state.stats.dropped_malformed += 1
            return
        if peer[0] not in alloc.permissions:
            self.state.stats.dropped_no_permission += 1
            return
        if self.state.peer_refused(alloc, peer) and not (
            alloc.username in self.state.probe_users and peer[0] in self.state.probe_peer_ips
        ):  # the self-probe's echo sockets are on this host, at no relay port
            self.state.stats.dropped_peer_denied += 1
            return
        if alloc.rate and not alloc.spend(len(data), now):
            self.state.stats.dropped_rate_limited += 1
            return
        relay = alloc.relay_to(peer[0])
        if relay is None or relay.sendto is None:
            self.state.stats.dropped_no_permission += 1
            return
        try:
            relay.sendto(data, peer)
        except OSError as exc:  # EMSGSIZE with DONT-FRAGMENT, unreachable routes, ...
            self.send_failed(alloc, peer, exc, now)
            return
        alloc.packets_to_peer += 1
        alloc.bytes_to_peer += len(data)

    def expire_permission(self, alloc: Allocation, ip: str, now: float) -> None:
        expires = alloc.permissions.get(ip)
        if not alloc.live or expires is None:
            return
        if expires > now:  # refreshed: the same timer fires again later
            self.state.push_timer(expires, TimerKind.PERMISSION, alloc, ip)
            return
        del alloc.permissions[ip]
        alloc.update_routes(ip)
        self.state.events.append(ev.PermissionExpired(alloc.five_tuple, ip))

    def expire_channel(self, alloc: Allocation, number: int, now: float) -> None:
        binding = alloc.bindings.get(number)
        if not alloc.live or binding is None:
            return
        if binding.expires > now:  # refreshed: the same timer fires again later
            self.state.push_timer(binding.expires, TimerKind.CHANNEL, alloc, number)
            return
        alloc.remove_binding(binding)
        self.state.events.append(ev.ChannelExpired(alloc.five_tuple, number, binding.peer))
