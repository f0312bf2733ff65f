"""Sequences, not single messages: a hypothesis state machine drives the
sans-IO core with random sequences of Allocate (UDP, TCP, EVEN-PORT, RESERVATION-TOKEN),
Refresh, CreatePermission, ChannelBind, Send, ChannelData, Connect, ConnectionBind and
steps of time from several clients, and checks after every step:

- no allocation, permission, channel or reservation outlives its lifetime;
- no quota or cap is exceeded (per user, per client address, in all, per allocation);
- nothing is relayed to a peer without a permission, denied by the policy, or this
  server itself (an address of the host, a port it listens on);
- every relay port is free, in use by a live relay, or held by a live reservation
  (none leaks); no exception escapes the core.

`make fuzz` runs it longer (HYPOTHESIS_PROFILE=long)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.support.core_client import NOW, SECRET, CoreClient, FakeRelay, make_core
from turnserver.core.allocation import PeerConnection
from turnserver.core.auth import rest_password
from turnserver.core.config import RelayAddress
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.own_addresses import OwnAddresses
from turnserver.stun import Attr, MessageClass, Method, encode_message

settings.register_profile(
    "ci", max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile(
    "long", max_examples=3000, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HOST = "198.51.200.1"  # the relay address, an address of the host
OTHER_HOST = "198.51.200.2"  # a second address of the host
PEERS = [
    ("198.51.200.7", 5000),  # allowed
    ("198.51.200.8", 5001),  # allowed
    ("10.0.0.1", 5000),  # private: policy
    ("127.0.0.1", 3478),  # loopback: policy
    ("0.0.0.0", 9),  # unspecified
    (OTHER_HOST, 5000),  # this host
    (HOST, 3478),  # our listener
    (HOST, 50010),  # a relay port: another allocation
    ("::ffff:10.0.0.1", 5000),  # mapped private
]
USERS = ["ann", "bob", "cy"]
MAX_PER_USER, MAX_PER_IP, MAX_TOTAL, MAX_PERMISSIONS, MAX_CHANNELS = 3, 4, 6, 4, 3


def _allowed(peer: tuple[str, int], own: OwnAddresses) -> bool:
    ip = ipaddress.ip_address(peer[0])
    v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    text = str(v4 or ip)
    if text.startswith(("10.", "127.", "0.")):
        return False
    if text == OTHER_HOST:
        return False
    return not (text == HOST and (peer[1] in own.ports or not 50000 <= peer[1] <= 50099))


def _deferrable(c: CoreClient, method: Method, attrs: list[tuple[int, Any]]) -> None:
    """A request whose answer may come later (RFC 6062 Connect): authenticated, and no
    answer is fine."""
    if c.nonce is None:
        c.nonce = c.core.auth.nonces.issue(c.ft.client[0], c.now + c.core.wall_offset)
    data = encode_message(
        method,
        MessageClass.REQUEST,
        os.urandom(12),
        [*attrs, (Attr.USERNAME, c.username), (Attr.REALM, c.realm), (Attr.NONCE, c.nonce)],
        integrity_key=c.key,
    )
    c.raw(data)


class CoreSequences(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core, self.opener = make_core(
            relay_addresses=(RelayAddress(HOST, HOST, 4),),
            allow_loopback=False,
            max_allocations=MAX_TOTAL,
            max_allocations_per_user=MAX_PER_USER,
            max_allocations_per_client_ip=MAX_PER_IP,
            max_permissions_per_allocation=MAX_PERMISSIONS,
            max_channels_per_allocation=MAX_CHANNELS,
            own_ports=frozenset({3478, 9641}),
            relay_port_range=(50000, 50099),
        )
        self.core.set_host_addresses(frozenset({HOST, OTHER_HOST}))
        self.now = NOW
        self.clients: list[CoreClient] = []
        self.tokens: list[bytes] = []

    def _client(self, index: int, user: int, transport: ClientTransport) -> CoreClient:
        ip = f"192.0.2.{50 + index % 3}"
        c = CoreClient(self.core, client=(ip, 40000 + index))
        if transport != ClientTransport.UDP:
            c.ft = FiveTuple((ip, 40000 + index), ("198.51.200.1", 3478), transport)
        c.username = f"{int(NOW) + 86400}:{USERS[user]}"
        c.password = rest_password(SECRET, c.username)
        c.now = self.now
        return c

    def _sync(self) -> None:
        for c in self.clients:
            c.now = self.now

    # ---- rules ------------------------------------------------------------------------

    @rule(
        index=st.integers(0, 20),
        user=st.integers(0, 2),
        tcp=st.booleans(),
        even=st.sampled_from([None, False, True]),
        use_token=st.booleans(),
    )
    def allocate(
        self, index: int, user: int, tcp: bool, even: bool | None, use_token: bool
    ) -> None:
        transport = ClientTransport.TCP if tcp else ClientTransport.UDP
        c = self._client(index, user, transport)
        attrs: list[tuple[int, Any]] = [(Attr.REQUESTED_TRANSPORT, 6 if tcp else 17)]
        if not tcp and use_token and self.tokens:
            attrs.append((Attr.RESERVATION_TOKEN, self.tokens[-1]))
        elif not tcp and even is not None:
            attrs.append((Attr.EVEN_PORT, even))
        resp = c.request(Method.ALLOCATE, attrs)
        if resp.message_class == MessageClass.SUCCESS:
            self.clients.append(c)
            token = resp.get(Attr.RESERVATION_TOKEN)
            if token is not None:
                self.tokens.append(token)

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100), lifetime=st.sampled_from([0, 30, 600, 100000]))
    def refresh(self, pick: int, lifetime: int) -> None:
        c = self.clients[pick % len(self.clients)]
        c.request(Method.REFRESH, [(Attr.LIFETIME, lifetime)])

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100), peers=st.lists(st.sampled_from(PEERS), min_size=1, max_size=3))
    def create_permission(self, pick: int, peers: list[tuple[str, int]]) -> None:
        c = self.clients[pick % len(self.clients)]
        c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, p) for p in peers])

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100), number=st.integers(0x4000, 0x4004), peer=st.sampled_from(PEERS))
    def channel_bind(self, pick: int, number: int, peer: tuple[str, int]) -> None:
        c = self.clients[pick % len(self.clients)]
        c.request(
            Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)]
        )

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100), peer=st.sampled_from(PEERS))
    def send(self, pick: int, peer: tuple[str, int]) -> None:
        c = self.clients[pick % len(self.clients)]
        data = encode_message(
            Method.SEND,
            MessageClass.INDICATION,
            os.urandom(12),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, b"payload")],
        )
        assert self.core.handle_message(data, c.ft, self.now) is None

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100), number=st.integers(0x4000, 0x4004))
    def channel_data(self, pick: int, number: int) -> None:
        c = self.clients[pick % len(self.clients)]
        alloc = self.core.allocations.get(c.ft)
        self.core.relay_channel_data(alloc, number, b"media", self.now)
        self.core.handle_channel_data(number, b"media", c.ft, self.now)

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100), peer=st.sampled_from(PEERS), ok=st.booleans())
    def connect(self, pick: int, peer: tuple[str, int], ok: bool) -> None:
        c = self.clients[pick % len(self.clients)]
        _deferrable(c, Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, peer)])
        for pc in list(self.core.peer_connections.values()):
            if pc.state == PeerConnection.CONNECTING:
                self.core.connect_result(pc.id, ok, self.now)

    @precondition(lambda self: self.core.peer_connections)
    @rule(index=st.integers(21, 40), user=st.integers(0, 2), stale=st.booleans())
    def connection_bind(self, index: int, user: int, stale: bool) -> None:
        c = self._client(index, user, ClientTransport.TCP)
        cid = next(iter(self.core.peer_connections)) if not stale else 0x7FFFFF
        _deferrable(c, Method.CONNECTION_BIND, [(Attr.CONNECTION_ID, cid)])

    @rule(seconds=st.sampled_from([1, 29, 31, 299, 301, 599, 601, 3601]))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds
        self._sync()

    @precondition(lambda self: self.clients)
    @rule(pick=st.integers(0, 100))
    def connection_closed(self, pick: int) -> None:
        c = self.clients.pop(pick % len(self.clients))
        self.core.close_five_tuple(c.ft, self.now)

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def expiries_hold(self) -> None:
        core = self.core
        core.handle_timer(self.now)
        for alloc in core.allocations.values():
            assert alloc.expires > self.now
            assert len(alloc.permissions) <= MAX_PERMISSIONS
            assert len(alloc.bindings) <= MAX_CHANNELS
            for expiry in alloc.permissions.values():
                assert expiry > self.now
            for binding in alloc.bindings.values():
                assert binding.expires > self.now
        for res in core.reservations.values():
            assert res.expires > self.now
            assert res.owner is None or res.owner.live

    @invariant()
    def quotas_hold(self) -> None:
        allocs = list(self.core.allocations.values())
        held = [r for r in self.core.reservations.values() if r.owner is not None]
        assert len(allocs) + len(held) <= MAX_TOTAL
        for user in USERS:
            mine = sum(a.user.endswith(user) for a in allocs)
            mine += sum(r.user.endswith(user) for r in held)
            assert mine <= MAX_PER_USER, user

    @invariant()
    def nothing_relayed_where_it_must_not_go(self) -> None:
        for relay in self.opener.opened:
            assert isinstance(relay, FakeRelay)
            for _, peer in relay.sent:
                assert _allowed(peer, self.core.own), peer

    @invariant()
    def ports_are_accounted_for(self) -> None:
        core = self.core
        pool = core.port_pools[4]
        in_use = {r.port for a in core.allocations.values() for r in a.relays.values()}
        held = {r.port for r in core.reservations.values() if r.family == 4}
        free = set(pool._free)
        assert not (free & in_use) and not (free & held) and not (in_use & held)
        assert free | in_use | held == set(range(50000, 50100))
        live = [r for r in self.opener.opened if not r.closed]
        assert len(live) == sum(
            1 for a in core.allocations.values() for r in a.relays.values() if not a.is_tcp
        )


TestCoreSequences = CoreSequences.TestCase
