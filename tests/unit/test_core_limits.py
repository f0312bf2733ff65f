"""Limits in the core: bandwidth, challenge rate, response sizes, draining, own addresses."""

from __future__ import annotations

import os

import pytest

from tests.support.core_client import NOW, REALM, CoreClient, error_code, make_core
from turnserver.core import events as ev
from turnserver.core.config import RelayAddress
from turnserver.core.policy import DefaultPeerPolicy
from turnserver.core.server import Reply
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message
from turnserver.stun.constants import AddressFamily
from turnserver.stun.message import long_term_key, verify_integrity

PEER = ("198.51.200.7", 5000)


def test_bandwidth_token_bucket_drops_and_counts() -> None:
    core, opener = make_core(bandwidth=1000)  # bytes per second, one second of burst
    c = CoreClient(core)
    c.allocate()
    c.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)])
    relay = opener.live[0]
    for _ in range(5):
        core.handle_channel_data(0x4000, b"x" * 300, c.ft, NOW)
    assert len(relay.sent) == 3 and core.stats.dropped_rate_limited == 2
    core.handle_channel_data(0x4000, b"x" * 300, c.ft, NOW + 0.5)  # 500 bytes refilled
    assert len(relay.sent) == 4
    alloc = core.allocations[c.ft]
    assert core.data_indication(alloc, b"y" * 900, PEER, NOW + 0.5) is None  # shared budget
    assert core.stats.dropped_rate_limited == 3


def test_unauthenticated_challenges_are_rate_limited_per_address() -> None:
    core, _ = make_core(challenge_rate=1.0, challenge_burst=3)
    c = CoreClient(core)
    req = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12), [(Attr.REQUESTED_TRANSPORT, 17)]
    )
    answers = [core.handle_message(req, c.ft, NOW) for _ in range(5)]
    assert [a is not None for a in answers] == [True, True, True, False, False]
    assert core.stats.dropped_rate_limited == 2
    other = CoreClient(core, client=("192.0.2.77", 1))
    assert core.handle_message(req, other.ft, NOW) is not None  # per source address
    assert core.handle_message(req, c.ft, NOW + 1.0) is not None  # refilled
    discarded = [e for e in core.drain_events() if isinstance(e, ev.MessageDiscarded)]
    assert [e.reason for e in discarded] == ["challenge_rate_limited"] * 2


def test_unauthenticated_answers_stay_small() -> None:
    """No SOFTWARE and a compact nonce: little to amplify (RFC 8656 §21.1)."""
    core, _ = make_core()
    c = CoreClient(core)
    binding = encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
    answer = core.handle_message(binding, c.ft, NOW)
    assert answer is not None and len(answer) <= 1.6 * len(binding)
    # uclient's first Allocate (64 bytes: transport, lifetime, even-port, family, DF, FP)
    allocate = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        [
            (Attr.REQUESTED_TRANSPORT, 17),
            (Attr.LIFETIME, 600),
            (Attr.EVEN_PORT, False),
            (Attr.REQUESTED_ADDRESS_FAMILY, 1),
            (Attr.DONT_FRAGMENT, True),
        ],
        fingerprint=True,
    )
    challenge = core.handle_message(allocate, c.ft, NOW)
    # RFC 8489 §9.2 adds the nonce cookie and PASSWORD-ALGORITHMS to every 401: 1.75x
    assert challenge is not None and len(challenge) <= 1.75 * len(allocate)
    msg = decode_message(challenge)
    assert not msg.has(Attr.SOFTWARE) and msg.get(Attr.REALM) and msg.get(Attr.NONCE)


def test_draining_refuses_or_redirects_new_allocations() -> None:
    core, _ = make_core()
    live = CoreClient(core)
    live.allocate()
    core.accepting = False
    c = CoreClient(core, client=("192.0.2.60", 1))
    assert error_code(c.allocate()) == 508
    assert live.request(Method.REFRESH).message_class == MessageClass.SUCCESS  # still served
    core2, _ = make_core(alternate_server=("203.0.113.50", 3478))
    core2.accepting = False
    c2 = CoreClient(core2)
    resp = c2.allocate()
    assert error_code(resp) == 300
    assert resp.get(Attr.ALTERNATE_SERVER) == ("203.0.113.50", 3478)
    assert verify_integrity(resp, c2.key)  # RFC 8489 §10: authenticated 300


def test_the_server_never_relays_into_itself() -> None:
    """An address of this host is no peer (a second NIC here), nor is a port the server
    listens on; its relayed address is, at relay ports (two clients of one server);
    peers.allow names what the operator wants anyway (core/own_addresses.py)."""
    relay = RelayAddress("198.51.200.1", "198.51.200.1", 4)
    core, opener = make_core(
        relay_addresses=(relay,),
        own_ports=frozenset({3478, 9641}),
        relay_port_range=(50000, 50099),
    )
    core.set_host_addresses(frozenset({"198.51.200.1", "198.51.200.2", "127.0.0.1"}))
    c = CoreClient(core)
    c.allocate()

    def bind(number: int, peer: tuple[str, int]) -> int | None:
        return error_code(
            c.request(
                Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)]
            )
        )

    second_nic = ("198.51.200.2", 3478)
    resp = c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, second_nic)])
    assert error_code(resp) == 403
    assert bind(0x4000, ("198.51.200.2", 50010)) == 403  # any port of the second address
    assert bind(0x4001, ("198.51.200.1", 3478)) == 403  # our listener on the relay address
    assert bind(0x4002, ("198.51.200.1", 9641)) == 403  # our metrics port
    assert bind(0x4003, ("198.51.200.1", 22)) == 403  # outside the relay range
    assert bind(0x4004, ("198.51.200.1", 50010)) is None  # another allocation: relay to relay
    c.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, ("198.51.200.1", 3478)), (Attr.DATA, b"x")])
    assert core.stats.dropped_peer_denied == 1 and not opener.live[0].sent
    denied = [e for e in core.drain_events() if isinstance(e, ev.PeerDenied)]
    assert [e.reason for e in denied] == ["host_address"] * 2 + ["own_port"] * 3
    # an address that appears on the host later ends the permissions to it
    assert c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)]).message_class == (
        MessageClass.SUCCESS
    )
    core.set_host_addresses(frozenset({"198.51.200.1", PEER[0]}))
    assert core.revoke_denied_peers() == 1
    # named by peers.allow: the operator's choice
    core.peer_policy = DefaultPeerPolicy(allow=["198.51.200.2/32"], allow_loopback=True)
    assert c.request(
        Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, second_nic)]
    ).message_class == (MessageClass.SUCCESS)


def test_the_self_probe_reaches_its_echo_socket_on_this_host() -> None:
    """The self-probe's echo socket is on the relay address (a host address) at a port
    outside the relay range: its own user may create a permission there and Send to it,
    by indication as by channel; nobody else may (regression: Send indications of the
    probe were dropped as peer_denied, so /readyz failed under the default policy)."""
    relay = RelayAddress("198.51.200.1", "198.51.200.1", 4)
    core, opener = make_core(relay_addresses=(relay,), relay_port_range=(50000, 50099))
    core.set_host_addresses(frozenset({"198.51.200.1", "127.0.0.1"}))
    core.probe_users.add("probe")
    core.probe_peer_ips.add("198.51.200.1")
    core.auth.internal_keys["probe"] = long_term_key("probe", REALM, "probe-pw")
    echo = ("198.51.200.1", 40123)
    probe = CoreClient(core, ("198.51.200.1", 40000), "probe", "probe-pw")
    probe.allocate()
    assert (
        error_code(probe.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, echo)])) is None
    )
    probe.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, echo), (Attr.DATA, b"probe")])
    assert opener.live[0].sent == [(b"probe", echo)]
    assert core.stats.dropped_peer_denied == 0
    other = CoreClient(core)
    other.allocate()  # a permission to the relay address is fine (relay to relay) ...
    assert (
        error_code(other.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, echo)])) is None
    )
    other.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, echo), (Attr.DATA, b"x")])
    assert core.stats.dropped_peer_denied == 1  # ... but not at a port outside the range
    assert len(opener.live[1].sent) == 0
    channel = [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, echo)]
    assert error_code(other.request(Method.CHANNEL_BIND, channel)) == 403
    assert error_code(probe.request(Method.CHANNEL_BIND, channel)) is None


@pytest.mark.parametrize(
    "peer",
    [
        "0.0.0.0",  # CVE-2020-26262
        "::",
        "::ffff:127.0.0.1",  # CVE-2026-27624
        "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254 (cloud metadata)
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "2001:0:a9fe:a9fe::1",  # Teredo, server 169.254.169.254
        "3fff::1",  # RFC 9637 documentation
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    ],
)
def test_addresses_that_reach_this_host_or_private_ranges_are_denied(peer: str) -> None:
    core, _ = make_core(allow_loopback=False)
    c = CoreClient(core)
    c.allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY, AddressFamily.IPV6)])
    resp = c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, (peer, 5000))])
    assert error_code(resp) == 403, peer


def test_binding_names_the_other_address_when_configured() -> None:
    core, _ = make_core(other_address=("192.0.2.2", 3479))
    c = CoreClient(core)
    resp = c.request(Method.BINDING, auth=False)
    assert resp.get(Attr.OTHER_ADDRESS) == ("192.0.2.2", 3479)  # RFC 5780 §7.3


def test_change_request_is_refused_not_ignored() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    resp = c.request(Method.BINDING, [(Attr.CHANGE_REQUEST, 0x06)], auth=False)
    assert error_code(resp) == 420 and resp.get(Attr.UNKNOWN_ATTRIBUTES) == [Attr.CHANGE_REQUEST]
    ok = c.request(Method.BINDING, [(Attr.CHANGE_REQUEST, 0)], auth=False)
    assert ok.message_class == MessageClass.SUCCESS


def test_change_request_is_answered_from_the_other_address() -> None:
    """RFC 5780 §6.1 with primary 192.0.2.1:3478 and OTHER-ADDRESS 192.0.2.2:3479."""
    primary, other = ("192.0.2.1", 3478), ("192.0.2.2", 3479)
    core, _ = make_core(
        other_address=other,
        rfc5780_primary=primary,
        rfc5780_addresses=frozenset({primary, other, ("192.0.2.1", 3479), ("192.0.2.2", 3478)}),
    )
    c = CoreClient(core)  # its requests arrive at 192.0.2.1:3478
    for flags, origin in (
        (0x06, other),
        (0x02, ("192.0.2.1", 3479)),
        (0x04, ("192.0.2.2", 3478)),
        (0x00, primary),
    ):
        resp = c.request(Method.BINDING, [(Attr.CHANGE_REQUEST, flags)], auth=False)
        assert resp.message_class == MessageClass.SUCCESS, flags
        assert resp.get(Attr.RESPONSE_ORIGIN) == origin
        assert resp.get(Attr.OTHER_ADDRESS) == other
        # the adapter sends from `origin` only when the reply says so
        sent = c.last_reply
        assert (sent.origin if isinstance(sent, Reply) else primary) == origin
