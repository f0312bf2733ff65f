"""What every TURN request handler shares: the allocations, quotas, timers, statistics
and events of one process, and the small steps several handlers take (the one expiry
timer heap, peer checks, permissions, RFC 6062 connection bookkeeping). The handlers
live beside it, one module per concern (`allocate`, `permissions`, `tcp_connections`);
`server.TurnServer` combines them behind the sans-IO entry points.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable
from dataclasses import replace
from enum import IntEnum
from typing import Any

from turnserver.core import events as ev
from turnserver.core.allocation import (
    Allocation,
    PeerConnection,
    RelayOpener,
)
from turnserver.core.auth import Authenticator
from turnserver.core.config import CoreConfig, RelayAddress
from turnserver.core.errors import (
    AllocationMismatch,
    Forbidden,
    InsufficientCapacity,
    PeerAddressFamilyMismatch,
    WrongCredentials,
)
from turnserver.core.five_tuple import FiveTuple
from turnserver.core.fleet_leases import FleetLeases
from turnserver.core.identity import Identity
from turnserver.core.own_addresses import OwnAddresses
from turnserver.core.policy import PeerPolicy, canonical_ip
from turnserver.core.ports import RelayPortPool, random_bytes
from turnserver.core.quota import LocalQuotaLedger, QuotaLedger, tenant_key
from turnserver.core.ratelimit import TokenBuckets
from turnserver.core.tenants import TenantRules
from turnserver.stun.attributes import Address
from turnserver.stun.constants import (
    AddressFamily,
)
from turnserver.stun.message import StunMessage

Attributes = list[tuple[int, Any]]
Handler = Callable[[StunMessage, FiveTuple, Identity, float], Attributes]

FAMILY_VERSION = {AddressFamily.IPV4: 4, AddressFamily.IPV6: 6}
VERSION_FAMILY = {4: AddressFamily.IPV4, 6: AddressFamily.IPV6}
BIND_ATTEMPTS = 16
CONNECTION_TIMEOUT = 30.0  # RFC 6062 §5.2, §5.3
# A CONNECTION-ID names the worker process that owns it in its top byte, so that a
# ConnectionBind accepted by another worker can be sent to the owner (RFC 6062 §5.4)
CONNECTION_ID_OWNER_SHIFT = 24
MAX_WORKERS = 1 << (32 - CONNECTION_ID_OWNER_SHIFT)
# Requests and indications other than Send are small; a larger one is refused before
# it is decoded (a Send indication may carry up to a datagram of data).
MAX_CONTROL_MESSAGE = 4096
SEND_INDICATION_TYPE = b"\x00\x16"
MAX_PEERS_PER_REQUEST = 32  # XOR-PEER-ADDRESS entries in one CreatePermission
RESERVED_PORTS_SHARE = 8  # EVEN-PORT reservations hold at most 1/8 of the relay ports
SEND_ERROR_LOG_INTERVAL = 60.0  # one log line per allocation and errno per interval
ICMP_PER_SECOND = 10  # ICMP errors passed to one client a second (RFC 8656 §11.6)


class TimerKind(IntEnum):
    ALLOCATION = 0
    PERMISSION = 1
    CHANNEL = 2
    RESERVATION = 3
    CREDENTIAL = 4
    PEER_CONNECTION = 5


class Reply(bytes):
    """A response to send from another of our addresses than the request reached: the
    bytes, and `origin` (RFC 5780 §6.1 CHANGE-REQUEST). Every other response is plain
    bytes, answered from where the request came in."""

    origin: Address

    def __new__(cls, data: bytes, origin: Address) -> Reply:
        reply = super().__new__(cls, data)
        reply.origin = origin
        return reply


class DeferredResponse(Exception):
    """A handler started work whose outcome (and response) comes later (RFC 6062 Connect)."""


class RemoteBind:
    """A ConnectionBind waiting for the worker that owns its CONNECTION-ID."""

    __slots__ = ("connection_id", "fingerprint", "identity", "owner", "transaction_id")

    def __init__(
        self,
        connection_id: int,
        owner: int,
        transaction_id: bytes,
        fingerprint: bool,
        identity: Identity,
    ) -> None:
        self.connection_id = connection_id
        self.owner = owner
        self.transaction_id = transaction_id
        self.fingerprint = fingerprint
        self.identity = identity


class Reservation:
    """A port held by an EVEN-PORT R-bit allocation for a later RESERVATION-TOKEN
    (RFC 8656 §7.2). It counts against its owner's quotas like an allocation, and lasts
    until it is used, its ~30 s run out, or the allocation that made it ends."""

    __slots__ = ("client_ip", "expires", "family", "owner", "port", "tenant", "token", "user")

    def __init__(self, family: int, port: int, expires: float) -> None:
        self.family = family
        self.port = port
        self.expires = expires
        self.token = b""
        self.owner: Allocation | None = None  # None: another worker's, met by its token
        self.user = ""
        self.client_ip = ""
        self.tenant = ""  # quota.tenant_key


class RelayStats:
    """Plain-int counters the relay path bumps; folded into metrics on scrape."""

    dropped_malformed: int
    dropped_no_allocation: int
    dropped_no_permission: int
    dropped_oversized: int
    dropped_peer_denied: int
    dropped_rate_limited: int
    dropped_send_error: int
    dropped_unknown_channel: int
    dropped_icmp: int
    icmp_to_client: int
    ended_bytes_to_client: int
    ended_bytes_to_peer: int
    ended_packets_to_client: int
    ended_packets_to_peer: int

    __slots__ = (
        "dropped_icmp",
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
        "icmp_to_client",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def drops(self) -> dict[str, int]:
        """Dropped packets by reason: each `dropped_<reason>` counter under its reason."""
        return {
            name.removeprefix("dropped_"): getattr(self, name)
            for name in self.__slots__
            if name.startswith("dropped_")
        }


class CoreState:
    """The state of one process's TURN server and the steps handlers share."""

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
        self._verdicts: dict[str, tuple[int, str, bool, bool, str]] = {}
        self._verdicts_for: PeerPolicy | None = None
        # tenants with rules of their own (core/tenants.py), and the verdicts of their
        # peer policies (emptied when the tenants change)
        self.tenants: dict[str, TenantRules] = {}
        self._tenant_verdicts: dict[str, dict[str, tuple[int, str, bool, bool, str]]] = {}
        # tenants past their monthly bytes whose action is to refuse (ops/usage/ sets it)
        self.month_exceeded: frozenset[str] = frozenset()
        # the usage record spool is full and usage.spool_full says refuse (ops/usage/)
        self.usage_full = False
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.quotas: QuotaLedger = LocalQuotaLedger()
        self.fleet_leases: FleetLeases | None = None  # fleet.max_allocations_per_user
        self.reservations: dict[bytes, Reservation] = {}
        self.relay_addresses: dict[int, RelayAddress] = {
            r.family: r for r in config.relay_addresses
        }
        self.own = OwnAddresses(
            relay=frozenset(
                str(canonical_ip(ipaddress.ip_address(a)))
                for r in config.relay_addresses
                for a in (r.bind_ip, r.advertised_ip)
            ),
            relay_ports=config.relay_port_range,
            ports=config.own_ports,
        )
        self.port_pools: dict[int, RelayPortPool] = {
            r.family: RelayPortPool(config.min_port, config.max_port)
            for r in config.relay_addresses
        }
        self.stats = RelayStats()
        self.events: list[ev.Event] = []
        self.accepting = True
        self.timers: list[tuple[float, int, TimerKind, Any, Any]] = []
        self._seq = 0
        self._ended_since_compaction = 0  # allocations whose timer entries may linger
        self.peer_connections: dict[int, PeerConnection] = {}
        # Worker processes: this one's index and how many there are (CONNECTION-IDs)
        self.worker_index = 0
        self.worker_count = 1
        self.remote_binds: dict[FiveTuple, RemoteBind] = {}
        # The self-probe may reach its own echo socket whatever the peer policy says.
        self.probe_users: set[str] = set()
        self._challenges = TokenBuckets(config.challenge_rate, config.challenge_burst)
        self.probe_peer_ips: set[str] = set()
        # Admin API: allocations by their opaque id; revoked users -> (until, reason)
        self.allocations_by_id: dict[str, Allocation] = {}
        self.id_prefix = "w0-"  # a worker's index, so a supervisor can route by id
        self.revocations: dict[str, tuple[float, str]] = {}
        # `now` is monotonic everywhere in the core (lifetimes survive a clock step); the
        # wall clock is now + wall_offset, set by the I/O layer, where a protocol needs it:
        # REST credential expiry, nonce cookies, revocations (Unix times)
        self.wall_offset = 0.0
        # 401/438 attributes but the nonce, by (realm, code) (server._challenge_answer)
        self._challenge_attributes: dict[tuple[str, int, str], bytes] = {}

    def wall(self, now: float) -> float:
        """The wall-clock (Unix) time at monotonic time `now`."""
        return now + self.wall_offset

    def push_timer(self, when: float, kind: TimerKind, owner: Any, key: Any) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (when, self._seq, kind, owner, key))

    def forget_timers_of_ended(self) -> None:
        """An allocation ended: its entries (allocation, credential, permissions,
        channels) would stay in the heap until due, up to its credential's expiry a day
        later, and keep it alive. Once ended ones could be an eighth of the heap, the
        heap is rebuilt without them: O(1) amortized per ended allocation, and memory
        comes back under churn."""
        self._ended_since_compaction += 1
        timers = self.timers
        if self._ended_since_compaction < max(64, len(timers) // 8):
            return
        self._ended_since_compaction = 0
        # in place: handle_timer may be popping this very list (an expiry ends one)
        timers[:] = [t for t in timers if t[3] is None or getattr(t[3], "live", True)]
        heapq.heapify(timers)

    def register(self, alloc: Allocation) -> None:
        """A new allocation joins the tables (its quota is already counted)."""
        self.allocations[alloc.five_tuple] = alloc
        relays = alloc.relays
        family = "dual" if len(relays) > 1 else ("ipv6" if 6 in relays else "ipv4")
        alloc.kind = (alloc.five_tuple.transport.value, family)
        while True:
            alloc.id = self.id_prefix + random_bytes(6).hex()
            if alloc.id not in self.allocations_by_id:
                break
        self.allocations_by_id[alloc.id] = alloc
        self.arm_allocation(alloc)

    def arm_allocation(self, alloc: Allocation) -> None:
        alloc.timer_at = alloc.expires
        self.push_timer(alloc.expires, TimerKind.ALLOCATION, alloc, None)

    def allocation_of(self, ft: FiveTuple, identity: Identity) -> Allocation:
        alloc = self.allocations.get(ft)
        if alloc is None:
            raise AllocationMismatch("no allocation for this 5-tuple")
        if identity.username != alloc.username:
            raise WrongCredentials("username differs from the allocation's")  # RFC 8656 §5
        return alloc

    def check_descriptors(self, sockets: int) -> None:
        """Refuse with 508 before the process would run out of file descriptors."""
        if not self.relay_opener.has_capacity(sockets):
            raise InsufficientCapacity("file descriptor limit reached", reason="fd_limit")

    def set_tenants(self, tenants: dict[str, TenantRules]) -> None:
        """The tenants' rules (start, SIGHUP); live allocations keep their tenant."""
        self.tenants = tenants
        self._tenant_verdicts = {}

    def new_allocation(
        self, ft: FiveTuple, ident: Identity, now: float, lifetime: float
    ) -> Allocation:
        """An allocation for the identity: its tenant and its bandwidth limit."""
        alloc = Allocation(ft, ident.username, ident.user, ident.key, now, lifetime, ident.expires)
        alloc.tenant = ident.tenant
        alloc.user_rate = ident.bandwidth
        alloc.rate = self.rate_for(alloc, self.config.bandwidth)
        alloc.tokens, alloc.stamp = float(alloc.rate), now
        return alloc

    def rate_for(self, alloc: Allocation, server_rate: int) -> int:
        """Bytes a second an allocation may relay: its user's (the hook's), its
        tenant's, else the server's (0: unlimited)."""
        if alloc.user_rate:
            return alloc.user_rate
        rules = self.tenants.get(alloc.tenant)
        return rules.bandwidth if rules is not None and rules.bandwidth else server_rate

    def reserve_quota(self, ident: Identity, client_ip: str) -> str | None:
        """Count one more allocation of the identity (server, user, client address and
        tenant quotas), or say which quota is full."""
        cfg = self.config
        if ident.internal:  # the self-probe: only the server's total applies to it
            return self.quotas.reserve(ident.user, client_ip, cfg.max_allocations, 0, 0)
        rules = self.tenants.get(ident.tenant)
        return self.quotas.reserve(
            ident.user,
            client_ip,
            cfg.max_allocations,
            ident.max_allocations or cfg.max_allocations_per_user,
            cfg.max_allocations_per_client_ip,
            tenant_key(ident.tenant),
            rules.max_allocations if rules is not None else 0,
        )

    def policy_verdict(self, alloc: Allocation, host: str) -> tuple[int, str, bool, bool, str]:
        """_peer_verdict under the allocation's tenant's peer policy, if it has one."""
        rules = self.tenants.get(alloc.tenant) if self.tenants else None
        if rules is None or rules.peer_policy is None:
            return self._peer_verdict(host)
        cache = self._tenant_verdicts.setdefault(alloc.tenant, {})
        verdict = cache.get(host)
        if verdict is None:
            verdict = self._judge(rules.peer_policy, host)
            if len(cache) >= 10_000:
                cache.clear()
            cache[host] = verdict
        return verdict

    def check_peer(
        self, alloc: Allocation, peer: Address, ft: FiveTuple, *, with_port: bool
    ) -> str:
        """Family, policy and own-address checks shared by CreatePermission (any port of
        the peer: with_port False), ChannelBind and Connect; the peer's canonical IP."""
        version, ip, allowed, explicit, canon = self.policy_verdict(alloc, peer[0])
        if version not in alloc.relays:
            raise PeerAddressFamilyMismatch(f"peer {peer[0]} has no relay of its family")
        if alloc.username in self.probe_users and peer[0] in self.probe_peer_ips:
            return ip  # the self-probe's echo sockets (any worker's)
        reason = (
            self.own.refusal(canon, peer[1] if with_port else None, explicit, allowed)
            if allowed
            else "policy"
        )
        if reason:
            self.events.append(ev.PeerDenied(ft, peer[0], reason))
            why = "is not allowed by the peer policy" if reason == "policy" else "is this server"
            raise Forbidden(f"peer {peer[0]} {why}", reason="peer_denied")
        return ip

    def peer_refused(self, alloc: Allocation, peer: Address) -> str:
        """Why a peer transport address may not be relayed to ("" when it may): the
        Send indication's check, where a permission already exists."""
        _, _, allowed, explicit, canon = self.policy_verdict(alloc, peer[0])
        if not allowed:
            return "policy"
        return self.own.refusal(canon, peer[1], explicit, allowed)

    def _peer_verdict(self, host: str) -> tuple[int, str, bool, bool, str]:
        """(IP version, text, allowed by the policy, named by its allow list, canonical
        text) of a peer address, cached per policy: parsing with ipaddress is slow next to
        a dict hit, and peers repeat across requests."""
        policy = self.peer_policy
        if self._verdicts_for is not policy:
            self._verdicts = {}
            self._verdicts_for = policy
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._judge(policy, host)
            if len(self._verdicts) >= 10_000:  # bounded whatever peers clients name
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict

    @staticmethod
    def _judge(policy: PeerPolicy, host: str) -> tuple[int, str, bool, bool, str]:
        ip = ipaddress.ip_address(host)
        return (
            ip.version,
            str(ip),
            policy.is_allowed(ip),
            policy.explicitly_allowed(ip),
            str(canonical_ip(ip)),
        )

    def set_host_addresses(self, addresses: frozenset[str]) -> None:
        """Every address of this host now (the I/O layer follows interface changes)."""
        self.own = replace(self.own, host=frozenset(addresses))

    def add_own_ports(self, ports: set[int]) -> None:
        """Ports this process listens on, known once bound (an ephemeral port)."""
        self.own = replace(self.own, ports=self.own.ports | ports)

    def install_permission(self, alloc: Allocation, ip: str, now: float) -> None:
        new = ip not in alloc.permissions
        expires = now + self.config.permission_lifetime
        alloc.permissions[ip] = max(expires, alloc.permissions.get(ip, 0.0))
        if new:  # one timer per permission; a refresh moves it when it fires
            self.push_timer(expires, TimerKind.PERMISSION, alloc, ip)
            alloc.update_routes(ip)
            self.events.append(ev.PermissionInstalled(alloc.five_tuple, ip))

    def forget_peer_connection(self, pc: PeerConnection, *, close: bool) -> None:
        self.peer_connections.pop(pc.id, None)
        alloc = pc.alloc
        if alloc.peer_connections.get(pc.peer) is pc:
            del alloc.peer_connections[pc.peer]
        if close:
            relay = alloc.relay_to(pc.peer[0])
            if relay is not None and relay.tcp is not None:
                relay.tcp.close_connection(pc.id)

    def release_reservation(self, token: bytes) -> None:
        """A reservation ends unused: its port and its quota go back."""
        res = self.reservations.pop(token, None)
        if res is None:
            return
        self.port_pools[res.family].give_back(res.port)
        if res.owner is not None:
            res.owner.reservation = b""
            self.quotas.release(res.user, res.client_ip, res.tenant)

    def close_relays(self, alloc: Allocation) -> None:
        for version, relay in alloc.relays.items():
            relay.endpoint.close()
            self.port_pools[version].give_back(relay.port)
        alloc.relays.clear()
