"""Allocate and Refresh (RFC 8656 §7, RFC 6062 §5.1): relayed addresses, lifetimes,
EVEN-PORT reservations, quotas, and the end of an allocation."""

from __future__ import annotations

import hmac

from turnserver.core import events as ev
from turnserver.core.allocation import (
    Allocation,
    Relay,
)
from turnserver.core.errors import (
    AddressFamilyNotSupported,
    AllocationMismatch,
    AllocationQuotaReached,
    BadRequest,
    InsufficientCapacity,
    PeerAddressFamilyMismatch,
    TryAlternate,
    UnsupportedTransport,
)
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.fleet_leases import MAX_PENDING
from turnserver.core.identity import Identity
from turnserver.core.quota import tenant_key
from turnserver.core.state import (
    BIND_ATTEMPTS,
    FAMILY_VERSION,
    RESERVED_PORTS_SHARE,
    VERSION_FAMILY,
    Attributes,
    CoreState,
    DeferredResponse,
    Reservation,
    TimerKind,
)
from turnserver.stun.constants import (
    AddressFamily,
    Attr,
    TransportProtocol,
)
from turnserver.stun.message import StunMessage


class AllocationHandlers:
    """Allocate, Refresh and deletion."""

    def __init__(self, state: CoreState) -> None:
        self.state = state

    def _lifetime(self, requested: int | None) -> int:
        """RFC 8656 §7.2/§7.4: min(requested, max), but never below the default."""
        cfg = self.state.config
        if requested is None:
            return min(cfg.default_lifetime, cfg.max_lifetime)
        return max(min(requested, cfg.max_lifetime), min(cfg.default_lifetime, cfg.max_lifetime))

    def allocate(self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float) -> Attributes:
        """RFC 8656 §7.2."""
        cfg = self.state.config
        if ft in self.state.allocations:
            raise AllocationMismatch("5-tuple already has an allocation")
        if not self.state.accepting:
            if cfg.alternate_server is not None:
                raise TryAlternate(cfg.alternate_server, "server is draining")
            raise InsufficientCapacity("server is draining", reason="draining")
        transport = msg.get(Attr.REQUESTED_TRANSPORT)
        if transport is None:
            raise BadRequest("missing REQUESTED-TRANSPORT")
        tcp = transport == TransportProtocol.TCP and cfg.tcp_relay
        if not tcp and transport != TransportProtocol.UDP:
            raise UnsupportedTransport(f"REQUESTED-TRANSPORT {transport} is not supported")
        if self.state.usage_full:  # no record could be kept of it (usage.spool_full)
            raise InsufficientCapacity("the usage record spool is full", reason="usage_spool_full")
        if ident.tenant in self.state.month_exceeded:  # a refusing tenant past its bytes
            raise AllocationQuotaReached(
                f"tenant {ident.tenant!r} used its bytes for the month", reason="quota_tenant_month"
            )
        leased = self._fleet_admit(msg, ft, ident)
        try:
            if tcp:
                attrs = self._allocate_tcp(msg, ft, ident, now)
            else:
                attrs = self._allocate_udp(msg, ft, ident, now)
        except Exception:
            if leased:
                self.fleet_release(ident.user)
            raise
        if leased:
            self.state.allocations[ft].fleet_lease = True
        return attrs

    def _fleet_admit(self, msg: StunMessage, ft: FiveTuple, ident: Identity) -> bool:
        """The fleet's per-user quota (core/fleet_leases.py): True when this Allocate
        takes a lease granted for it; refused, 486; not asked yet, ask and answer later."""
        leases = self.state.fleet_leases
        if leases is None or ident.internal:
            return False
        key = (ft, msg.transaction_id)
        if key in leases.granted:
            leases.granted.discard(key)
            return True
        if key in leases.refused:  # (fleet_lease_result forgets it)
            raise AllocationQuotaReached(
                f"user {ident.user!r} has {leases.limit} allocations across the fleet",
                reason="quota_fleet_user",
            )
        if key not in leases.pending:  # else a retransmission: its answer is coming
            if len(leases.pending) >= MAX_PENDING:
                raise AllocationQuotaReached(
                    "too many Allocates waiting for the fleet's quota", reason="quota_fleet_busy"
                )
            leases.pending.add(key)
            self.state.events.append(
                ev.FleetLeaseNeeded(ft, msg.transaction_id, ident.user, msg.raw)
            )
        raise DeferredResponse

    def fleet_release(self, user: str) -> None:
        self.state.events.append(ev.FleetLeaseReleased(user))

    def _allocate_udp(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 8656 §7.2, a UDP relayed address (or two)."""
        cfg = self.state.config
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
        if requested_family is not None and requested_family not in FAMILY_VERSION:
            raise AddressFamilyNotSupported(f"unknown address family {requested_family}")

        reservation: Reservation | None = None
        if token is not None:
            reservation = self.state.reservations.pop(token, None)
            if reservation is not None and reservation.owner is not None:
                # used: its quota goes back (this allocation takes its own below)
                reservation.owner.reservation = b""
                self.state.quotas.release(
                    reservation.user, reservation.client_ip, reservation.tenant
                )
            if reservation is None:
                # Another worker process may have issued it: tokens are stateless. A port
                # of our own range whose reservation is gone was used or released already
                reservation = self._check_reservation_token(token, now)
                if reservation is not None:
                    pool = self.state.port_pools[reservation.family]
                    if pool.min_port <= reservation.port <= pool.max_port:
                        reservation = None

            if reservation is None:
                raise InsufficientCapacity(
                    "unknown or expired RESERVATION-TOKEN", reason="bad_reservation"
                )
            families = [reservation.family]
        elif requested_family is not None:
            families = [FAMILY_VERSION[AddressFamily(requested_family)]]
        elif additional_family is not None:
            families = [4, 6]
        else:
            families = [4]
        address_error: int | None = None
        if families[0] not in self.state.relay_addresses:
            raise AddressFamilyNotSupported(f"no IPv{families[0]} relay address configured")
        if len(families) == 2 and 6 not in self.state.relay_addresses:
            families = [4]
            address_error = 6  # RFC 8656 §7.2: ADDRESS-ERROR-CODE for the missing family

        self.state.check_descriptors(len(families))
        lifetime = self._lifetime(msg.get(Attr.LIFETIME))
        alloc = self.state.new_allocation(ft, ident, now, lifetime)
        alloc.allocate_transaction_id = msg.transaction_id
        alloc.dont_fragment = msg.has(Attr.DONT_FRAGMENT)
        new_token: bytes | None = None
        try:
            for i, version in enumerate(families):
                if reservation is not None:
                    relay = self._open_relay(alloc, version, port=reservation.port)
                elif i == 0 and even_port is not None:
                    if even_port and len(self.state.reservations) >= self._reservation_cap():
                        raise InsufficientCapacity(
                            "too many ports held by EVEN-PORT reservations",
                            reason="quota_reservations",
                        )
                    relay, reserved = self._open_even_relay(alloc, version, even_port)
                    if reserved is not None:
                        held = Reservation(version, reserved, now + cfg.reservation_lifetime)
                        new_token = self._reservation_token(version, reserved, now)
                        alloc.relays[version] = relay  # (closed with the rest on failure)
                        held.token = new_token
                        self.state.reservations[new_token] = held
                else:
                    relay = self._open_relay(alloc, version)
                alloc.relays[version] = relay
        except InsufficientCapacity:
            self.state.close_relays(alloc)
            raise

        try:
            self._reserve_quota(alloc, ident)
        except AllocationQuotaReached:
            if new_token is not None:
                self.state.release_reservation(new_token)
            raise
        if new_token is not None:
            self._hold_reservation(alloc, ident, new_token, now)
        self.state.register(alloc)
        if cfg.strict_expiry and ident.expires is not None:  # a Unix time: when it comes
            self.state.push_timer(
                now + ident.expires - self.state.wall(now), TimerKind.CREDENTIAL, alloc, None
            )
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
                    (VERSION_FAMILY[address_error], 440, "Address Family not Supported"),
                )
            )
        self.state.events.append(
            ev.AllocationCreated(
                ft, ident.username, alloc.relayed_addresses, lifetime, alloc.tenant
            )
        )
        return attrs

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
        cfg = self.state.config
        family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if family is not None and family not in FAMILY_VERSION:
            raise AddressFamilyNotSupported(f"unknown address family {family}")
        version = FAMILY_VERSION[AddressFamily(family)] if family is not None else 4
        if version not in self.state.relay_addresses:
            raise AddressFamilyNotSupported(f"no IPv{version} relay address configured")
        self.state.check_descriptors(1)
        lifetime = self._lifetime(msg.get(Attr.LIFETIME))
        alloc = self.state.new_allocation(ft, ident, now, lifetime)
        alloc.is_tcp = True
        alloc.allocate_transaction_id = msg.transaction_id
        alloc.relays[version] = self._open_relay(alloc, version, tcp=True)
        self._reserve_quota(alloc, ident)
        self.state.register(alloc)
        if cfg.strict_expiry and ident.expires is not None:  # a Unix time: when it comes
            self.state.push_timer(
                now + ident.expires - self.state.wall(now), TimerKind.CREDENTIAL, alloc, None
            )
        self.state.events.append(
            ev.AllocationCreated(
                ft, ident.username, alloc.relayed_addresses, lifetime, alloc.tenant
            )
        )
        return [
            (Attr.XOR_RELAYED_ADDRESS, alloc.relays[version].advertised),
            (Attr.LIFETIME, lifetime),
            (Attr.XOR_MAPPED_ADDRESS, ft.client),
        ]

    def _reserve_quota(self, alloc: Allocation, ident: Identity) -> None:
        """Count the allocation against the quotas, last, so no failure needs undoing."""
        why = self.state.reserve_quota(ident, alloc.five_tuple.client[0])
        if why is not None:
            self.state.close_relays(alloc)
            if why == "quota_total":
                raise AllocationQuotaReached("server allocation limit reached", reason=why)
            if why == "quota_client_ip":
                raise AllocationQuotaReached(
                    f"client address {alloc.five_tuple.client[0]} has too many allocations",
                    reason=why,
                )
            if why == "quota_tenant":
                raise AllocationQuotaReached(
                    f"tenant {ident.tenant!r} has too many allocations", reason=why
                )
            raise AllocationQuotaReached(
                f"user {ident.user!r} has too many allocations", reason=why
            )

    def _reservation_cap(self) -> int:
        """At most 1/RESERVED_PORTS_SHARE of the relay ports held by reservations."""
        ports = sum(p.size for p in self.state.port_pools.values())
        return max(4, ports // RESERVED_PORTS_SHARE)

    def _hold_reservation(
        self, alloc: Allocation, ident: Identity, token: bytes, now: float
    ) -> None:
        """The reserved port counts against the owner's quotas like an allocation (so a
        user cannot hold ports beyond them); over them, the Allocate is refused."""
        res = self.state.reservations[token]
        client_ip = alloc.five_tuple.client[0]
        why = self.state.reserve_quota(ident, client_ip)
        if why is not None:
            self.state.release_reservation(token)
            self.state.quotas.release(ident.user, client_ip, tenant_key(ident.tenant))
            self.state.close_relays(alloc)
            raise AllocationQuotaReached(
                "the reserved port (EVEN-PORT R) would exceed the quota", reason=why
            )
        res.owner, res.user, res.client_ip = alloc, ident.user, client_ip
        res.tenant = tenant_key(ident.tenant)
        alloc.reservation = token
        self.state.push_timer(res.expires, TimerKind.RESERVATION, None, token)

    def _token_mac(self, family: int, port: int, window: int) -> bytes:
        return self.state.auth.nonces.sign(b"reservation|%d|%d|%d" % (family, port, window))[:6]

    def _reservation_token(self, family: int, port: int, now: float) -> bytes:
        """RFC 8656 §14.9: 8 bytes, here the port and a MAC over it and the time window,
        so that any worker process sharing the key can honour it."""
        window = int(now // self.state.config.reservation_lifetime)
        return port.to_bytes(2, "big") + self._token_mac(family, port, window)

    def _check_reservation_token(self, token: bytes, now: float) -> Reservation | None:
        port = int.from_bytes(token[:2], "big")
        window = int(now // self.state.config.reservation_lifetime)
        for family in self.state.relay_addresses:
            for w in (window, window - 1):
                if hmac.compare_digest(token[2:], self._token_mac(family, port, w)):
                    return Reservation(family, port, now)
        return None

    def _bind_relay(self, alloc: Allocation, version: int, port: int, tcp: bool) -> Relay | None:
        """Ask the I/O layer for a relay socket on `port`; None when it is taken."""
        addr = self.state.relay_addresses[version]
        advertised = (addr.advertised_ip, port)
        if tcp:
            tcp_endpoint = self.state.relay_opener.open_tcp_relay(alloc, addr.bind_ip, port)
            return (
                Relay(tcp_endpoint, advertised, version, tcp=tcp_endpoint) if tcp_endpoint else None
            )
        endpoint = self.state.relay_opener.open_relay(
            alloc, addr.bind_ip, port, dont_fragment=alloc.dont_fragment
        )
        return Relay(endpoint, advertised, version, sendto=endpoint.sendto) if endpoint else None

    def _open_relay(
        self, alloc: Allocation, version: int, port: int | None = None, *, tcp: bool = False
    ) -> Relay:
        pool = self.state.port_pools[version]
        if port is not None:  # a reserved port: already out of the pool
            relay = self._bind_relay(alloc, version, port, tcp)
            if relay is None:
                pool.give_back(port)
                raise InsufficientCapacity("reserved relay port could not be bound")
            return relay
        busy: list[int] = []
        try:
            for _ in range(BIND_ATTEMPTS):
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
        pool = self.state.port_pools[version]
        bind_ip = self.state.relay_addresses[version].bind_ip
        busy: list[int] = []
        try:
            for _ in range(BIND_ATTEMPTS):
                port = pool.take_even(reserve_next)
                if port is None:
                    break
                # port+1 is promised only if it can be bound: a sibling worker may hold
                # it through a token for our range whose reservation we since released
                if reserve_next and not self.state.relay_opener.port_free(bind_ip, port + 1):
                    busy += (port, port + 1)
                    continue
                relay = self._bind_relay(alloc, version, port, tcp=False)
                if relay is not None:
                    return relay, (port + 1 if reserve_next else None)
                busy += (port, port + 1) if reserve_next else (port,)
        finally:
            for p in busy:
                pool.give_back(p)
        raise InsufficientCapacity("no free even relay port")

    def refresh(self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float) -> Attributes:
        """RFC 8656 §7.4; LIFETIME 0 deletes the allocation."""
        alloc = self.state.allocation_of(ft, ident)
        family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        version = FAMILY_VERSION.get(family) if family is not None else None
        if family is not None and version not in alloc.relays:
            raise PeerAddressFamilyMismatch("REQUESTED-ADDRESS-FAMILY not in this allocation")
        requested = msg.get(Attr.LIFETIME)
        if requested == 0:
            if version is not None and len(alloc.relays) > 1:
                # RFC 8656 §7.4: delete one family of a dual allocation
                relay = alloc.relays.pop(version)
                relay.endpoint.close()
                self.state.port_pools[version].give_back(relay.port)
                for ip in [ip for ip in alloc.permissions if (":" in ip) == (version == 6)]:
                    del alloc.permissions[ip]
                    alloc.update_routes(ip)
                return [(Attr.LIFETIME, 0)]
            self.delete(alloc, now, "deleted")
            return [(Attr.LIFETIME, 0)]
        lifetime = self._lifetime(requested)
        alloc.expires = now + lifetime
        if alloc.expires < alloc.timer_at:  # shortened: fire earlier; a later expiry waits
            self.state.arm_allocation(alloc)
        self.state.events.append(ev.AllocationRefreshed(ft, lifetime))
        return [(Attr.LIFETIME, lifetime)]

    def delete(self, alloc: Allocation, now: float, cause: str) -> None:
        if not alloc.live:
            return
        alloc.live = False
        self.state.forget_timers_of_ended()
        self.state.allocations.pop(alloc.five_tuple, None)
        self.state.allocations_by_id.pop(alloc.id, None)
        self.state.quotas.release(alloc.user, alloc.five_tuple.client[0], tenant_key(alloc.tenant))
        if alloc.fleet_lease:
            self.fleet_release(alloc.user)
        if alloc.reservation:  # an unused EVEN-PORT reservation ends with its allocation
            self.state.release_reservation(alloc.reservation)
        relayed = alloc.relayed_addresses
        for pc in list(alloc.peer_connections.values()):
            self.state.forget_peer_connection(pc, close=False)  # closing the relay closes them
        self.state.close_relays(alloc)

        alloc.channel_targets.clear()
        alloc.peer_channels.clear()
        alloc.bindings.clear()
        alloc.bindings_by_peer.clear()
        alloc.permissions.clear()
        stats = self.state.stats
        stats.ended_packets_to_peer += alloc.packets_to_peer
        stats.ended_bytes_to_peer += alloc.bytes_to_peer
        stats.ended_packets_to_client += alloc.packets_to_client
        stats.ended_bytes_to_client += alloc.bytes_to_client
        self.state.events.append(
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
                alloc.tenant,
            )
        )
