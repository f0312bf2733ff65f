"""Hostile inputs against the sans-IO core: oversized, repeated, out-of-order and
contradictory requests, each answered with its RFC error and nothing held."""

from __future__ import annotations

import errno
import os
import struct

from tests.support.core_client import CoreClient, error_code, make_core
from turnserver.core import events as ev
from turnserver.core.policy import DefaultPeerPolicy
from turnserver.core.server import MAX_PEERS_PER_REQUEST, TimerKind
from turnserver.stun import Attr, MessageClass, Method, encode_message
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.message import MAX_ATTRIBUTES, decode_message


def _many_attributes(count: int) -> bytes:
    """A Binding request with `count` empty comprehension-optional attributes."""
    body = struct.pack("!HH", 0x8123, 0) * count
    return struct.pack("!HHI12s", 0x0001, len(body), 0x2112A442, os.urandom(12)) + body


def test_attribute_count_is_capped_before_anything_else() -> None:
    assert decode_message(_many_attributes(MAX_ATTRIBUTES)).method == Method.BINDING
    try:
        decode_message(_many_attributes(MAX_ATTRIBUTES + 1))
    except StunDecodeError as exc:
        assert "attributes" in str(exc)
    else:
        raise AssertionError("a message over the attribute cap was decoded")


def test_oversized_and_attribute_flood_datagrams_are_dropped_and_counted() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    assert c.raw(_many_attributes(16_371)) is None  # 64 KB: refused before decoding
    assert core.stats.dropped_oversized == 1
    assert c.raw(_many_attributes(363)) is None  # MTU-sized: too many attributes
    assert core.stats.dropped_malformed == 1
    # Unknown comprehension-optional attributes below the cap are still ignored
    resp = c.raw(_many_attributes(10))
    assert resp is not None and resp.message_class == MessageClass.SUCCESS


def test_duplicate_peers_make_one_permission_and_one_timer() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    assert c.allocate().message_class == MessageClass.SUCCESS
    peer = ("1.2.3.4", 9)
    flood = [(Attr.XOR_PEER_ADDRESS, peer)] * (MAX_PEERS_PER_REQUEST + 1)
    assert error_code(c.request(Method.CREATE_PERMISSION, flood)) == 400
    timers_before = len(core.timers)
    for _ in range(50):  # refreshing never adds timers
        resp = c.request(Method.CREATE_PERMISSION, flood[:MAX_PEERS_PER_REQUEST])
        assert resp.message_class == MessageClass.SUCCESS
    alloc = core.allocations[c.ft]
    assert list(alloc.permissions) == ["1.2.3.4"]
    assert len(core.timers) == timers_before + 1
    permission_timers = [t for t in core.timers if t[2] == TimerKind.PERMISSION]
    assert len(permission_timers) == 1
    # The refreshed permission lives on when its first timer fires, then expires
    c.now += 299
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, peer)])
    core.handle_timer(c.now + 2)
    assert "1.2.3.4" in alloc.permissions
    core.handle_timer(c.now + 301)
    assert not alloc.permissions


def test_refresh_keeps_one_allocation_timer_and_honours_a_shorter_lifetime() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate([(Attr.LIFETIME, 3600)])
    for _ in range(20):
        c.request(Method.REFRESH, [(Attr.LIFETIME, 3600)])
    assert sum(t[2] == TimerKind.ALLOCATION for t in core.timers) == 1
    c.request(Method.REFRESH, [(Attr.LIFETIME, 600)])  # shorter: must fire earlier
    core.handle_timer(c.now + 601)
    assert not core.allocations


def test_permission_cap_counts_new_peers_only() -> None:
    core, _ = make_core(max_permissions_per_allocation=2)
    c = CoreClient(core)
    c.allocate()
    two = [(Attr.XOR_PEER_ADDRESS, ("1.2.3.4", 1)), (Attr.XOR_PEER_ADDRESS, ("1.2.3.5", 1))]
    assert c.request(Method.CREATE_PERMISSION, two * 3).message_class == MessageClass.SUCCESS
    third = [(Attr.XOR_PEER_ADDRESS, ("1.2.3.6", 1))]
    assert error_code(c.request(Method.CREATE_PERMISSION, third)) == 508


def test_send_errors_are_counted_and_reported_once_per_interval() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate()
    peer = ("1.2.3.4", 9)
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, peer)])

    def fail(data: bytes, addr: tuple[str, int]) -> None:
        raise OSError(errno.EMSGSIZE, "Message too long")

    alloc = core.allocations[c.ft]
    for r in alloc.relays.values():
        r.sendto = fail
    core.drain_events()
    for _ in range(100):
        c.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, b"x" * 2000)])
    assert core.stats.dropped_send_error == 100
    assert c.ft in core.allocations  # the allocation lives on
    reported = [e for e in core.drain_events() if isinstance(e, ev.RelaySendFailed)]
    assert len(reported) == 1 and reported[0].errno == errno.EMSGSIZE
    c.now += 61
    c.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, peer), (Attr.DATA, b"x")])
    again = [e for e in core.drain_events() if isinstance(e, ev.RelaySendFailed)]
    assert len(again) == 1 and again[0].suppressed == 99


def test_revoke_denied_peers_cuts_permissions_and_channels_at_once() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate()
    peer = ("1.2.3.4", 9)
    assert (
        c.request(
            Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, peer)]
        ).message_class
        == MessageClass.SUCCESS
    )
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, ("5.6.7.8", 1))])
    alloc = core.allocations[c.ft]
    assert 0x4000 in alloc.channel_targets
    core.peer_policy = DefaultPeerPolicy(deny=["1.2.3.0/24"], allow_loopback=True)
    core.drain_events()
    assert core.revoke_denied_peers() == 1
    assert not alloc.channel_targets and not alloc.bindings
    assert list(alloc.permissions) == ["5.6.7.8"]
    revoked = [e for e in core.drain_events() if isinstance(e, ev.PermissionRevoked)]
    assert [(e.peer_ip, e.reason) for e in revoked] == [("1.2.3.4", "peer_policy")]
    # New binds to the peer are refused too
    resp = c.request(
        Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, peer)]
    )
    assert error_code(resp) == 403


def test_descriptor_budget_refuses_allocations_with_508() -> None:
    core, opener = make_core()
    opener.max_sockets = 1
    a = CoreClient(core, client=("192.0.2.50", 1))
    assert a.allocate().message_class == MessageClass.SUCCESS
    b = CoreClient(core, client=("192.0.2.50", 2))
    resp = b.allocate()
    assert error_code(resp) == 508
    refused = [e for e in core.drain_events() if isinstance(e, ev.AllocationRefused)]
    assert refused[-1].reason == "fd_limit"


def test_per_client_ip_allocation_cap() -> None:
    core, _ = make_core(max_allocations_per_client_ip=2)
    for port in (1, 2):
        assert CoreClient(core, client=("192.0.2.7", port)).allocate().message_class == 2
    assert error_code(CoreClient(core, client=("192.0.2.7", 3)).allocate()) == 486
    other = CoreClient(core, client=("192.0.2.8", 1))
    assert other.allocate().message_class == MessageClass.SUCCESS


def test_usernames_with_newlines_cannot_forge_log_lines() -> None:
    from turnserver.ops.telemetry.eventlog import _quote

    assert _quote("alice") == "alice"
    assert "\n" not in _quote("a\nINFO allocation created user=root")
    assert "\u202e" not in _quote("evil\u202etxt.exe")
    assert "\x00" not in _quote("nul\x00")
    data = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        [(Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, "x\nforged line")],
    )
    assert "\n" not in _quote(decode_message(data).get(Attr.USERNAME))


def test_binding_with_a_malformed_change_request_gets_400() -> None:
    """Found by the extended fuzz harness: the decode error escaped the core."""
    core, _ = make_core()
    c = CoreClient(core)
    data = encode_message(
        Method.BINDING, MessageClass.REQUEST, os.urandom(12), [(Attr.CHANGE_REQUEST, b"\x00\x06")]
    )
    resp = c.raw(data)
    assert resp is not None and error_code(resp) == 400
