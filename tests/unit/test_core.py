"""The sans-IO core driven by an in-memory client: every request, error and expiry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.core_client import NOW, REALM, CoreClient, error_code, make_core, rest_credential
from turnserver.core import events as ev
from turnserver.core.config import RelayAddress
from turnserver.core.quota import LocalQuotaLedger
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message
from turnserver.stun.message import long_term_key, verify_integrity

PEER = ("198.51.200.7", 5000)  # a public address the default policy allows
PEER2 = ("198.51.200.8", 6000)


def events_of(core, kind):  # type: ignore[no-untyped-def]
    return [e for e in core.drain_events() if isinstance(e, kind)]


def test_binding_reflects_address_and_fingerprint() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    resp = c.request(Method.BINDING, auth=False, fingerprint=True)
    assert resp.message_class == MessageClass.SUCCESS
    assert resp.get(Attr.XOR_MAPPED_ADDRESS) == c.ft.client
    assert resp.get(Attr.SOFTWARE) is None  # kept small: Binding is unauthenticated

    assert resp.fingerprint_offset >= 0
    resp = c.request(Method.BINDING, auth=False)
    assert resp.fingerprint_offset < 0


def test_binding_unknown_required_attribute_gets_420() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    resp = c.request(Method.BINDING, [(0x7F01, b"abcd")], auth=False)
    assert error_code(resp) == 420
    assert resp.get(Attr.UNKNOWN_ATTRIBUTES) == [0x7F01]


def test_rfc3489_binding_gets_mapped_address() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    tid = os.urandom(12)
    req = encode_message(Method.BINDING, MessageClass.REQUEST, tid, magic_cookie=0x01020304)
    resp = core.handle_message(req, c.ft, NOW)
    assert resp is not None and resp[4:8] == b"\x01\x02\x03\x04"
    msg = decode_message(resp)
    assert msg.get(Attr.MAPPED_ADDRESS) == c.ft.client


def test_allocate_challenge_then_success() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    first = c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], auth=False)
    assert error_code(first) == 401
    assert first.get(Attr.REALM) == REALM and first.get(Attr.NONCE)
    assert first.integrity_offset < 0
    refused = events_of(core, ev.AllocationRefused)
    assert refused and refused[0].reason == "unauthenticated"
    resp = c.allocate()
    assert resp.message_class == MessageClass.SUCCESS
    relayed = resp.get(Attr.XOR_RELAYED_ADDRESS)
    assert relayed[0] == "203.0.113.9" and 50000 <= relayed[1] <= 50099
    assert resp.get(Attr.LIFETIME) == 600
    assert resp.get(Attr.XOR_MAPPED_ADDRESS) == c.ft.client
    assert verify_integrity(resp, c.key)
    assert len(opener.live) == 1 and opener.live[0].address == ("127.0.0.1", relayed[1])
    assert events_of(core, ev.AllocationCreated)


def test_allocate_retransmission_gets_same_response_and_new_tid_437() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate()
    tid = os.urandom(12)
    attrs = [
        (Attr.REQUESTED_TRANSPORT, 17),
        (Attr.USERNAME, c.username),
        (Attr.REALM, REALM),
        (Attr.NONCE, c.nonce),
    ]
    core.allocations.clear()  # start afresh with a known transaction id
    core.quotas = LocalQuotaLedger()
    req = encode_message(Method.ALLOCATE, MessageClass.REQUEST, tid, attrs, integrity_key=c.key)
    one = core.handle_message(req, c.ft, NOW)
    two = core.handle_message(req, c.ft, NOW + 0.5)
    assert one == two and one is not None
    assert decode_message(one).message_class == MessageClass.SUCCESS
    assert error_code(c.allocate()) == 437


@pytest.mark.parametrize(
    ("attrs", "code"),
    [
        ([], 400),
        ([(Attr.REQUESTED_TRANSPORT, 132)], 442),
        ([(Attr.REQUESTED_TRANSPORT, 17), (Attr.REQUESTED_ADDRESS_FAMILY, 3)], 440),
        ([(Attr.REQUESTED_TRANSPORT, 17), (Attr.ADDITIONAL_ADDRESS_FAMILY, 1)], 400),
        (
            [
                (Attr.REQUESTED_TRANSPORT, 17),
                (Attr.EVEN_PORT, True),
                (Attr.RESERVATION_TOKEN, b"12345678"),
            ],
            400,
        ),
        ([(Attr.REQUESTED_TRANSPORT, 17), (Attr.RESERVATION_TOKEN, b"12345678")], 508),
        (
            [
                (Attr.REQUESTED_TRANSPORT, 17),
                (Attr.REQUESTED_ADDRESS_FAMILY, 2),
                (Attr.ADDITIONAL_ADDRESS_FAMILY, 2),
            ],
            400,
        ),
        ([(Attr.REQUESTED_TRANSPORT, 17), (0x7F00, b"x")], 420),
        ([(Attr.REQUESTED_TRANSPORT, 17), (Attr.LIFETIME, b"\x01")], 400),
    ],
)
def test_allocate_errors(attrs: list[tuple[int, object]], code: int) -> None:
    core, opener = make_core()
    c = CoreClient(core)
    resp = c.request(Method.ALLOCATE, attrs, fingerprint=True)
    assert error_code(resp) == code
    assert verify_integrity(resp, c.key)  # errors after authentication carry integrity
    assert resp.fingerprint_offset >= 0
    assert not opener.live and not core.allocations
    refused = events_of(core, ev.AllocationRefused)
    assert refused[-1].code == code


def test_lifetime_is_clamped() -> None:
    core, _ = make_core()
    assert CoreClient(core).allocate([(Attr.LIFETIME, 99999)]).get(Attr.LIFETIME) == 3600
    c2 = CoreClient(core, client=("192.0.2.51", 1))
    assert c2.allocate([(Attr.LIFETIME, 10)]).get(Attr.LIFETIME) == 600
    c3 = CoreClient(core, client=("192.0.2.52", 1))
    assert c3.allocate([(Attr.LIFETIME, 1200)]).get(Attr.LIFETIME) == 1200


def test_rest_credentials_forms_rotation_and_expiry() -> None:
    core, _ = make_core()
    user, pw = rest_credential("bob")
    assert CoreClient(core, ("192.0.2.60", 1), user, pw).allocate().message_class == 2
    # <user>:<expiry> and a bare expiry, signed with the second (rotated-in) secret
    from turnserver.core.auth import rest_password

    for i, name in enumerate([f"carol:{int(NOW) + 60}", f"{int(NOW) + 60}"]):
        c = CoreClient(core, ("192.0.2.61", 10 + i), name, rest_password("old", name))
        assert c.allocate().message_class == 2
    core.drain_events()
    expired_user, expired_pw = rest_credential("dave", expires=NOW - 1)
    c = CoreClient(core, ("192.0.2.62", 1), expired_user, expired_pw)
    assert error_code(c.allocate()) == 401
    assert events_of(core, ev.AuthFailed)[0].reason == "expired_credentials"
    bad_user, bad_pw = rest_credential("eve", secret="not-our-secret")
    c = CoreClient(core, ("192.0.2.63", 1), bad_user, bad_pw)
    assert error_code(c.allocate()) == 401
    assert events_of(core, ev.AuthFailed)[0].reason == "bad_credentials"


def test_wrong_password_unknown_user_wrong_realm() -> None:
    core, _ = make_core()
    assert error_code(CoreClient(core, password="nope").allocate()) == 401
    assert error_code(CoreClient(core, username="mallory").allocate()) == 401
    c = CoreClient(core)
    c.realm = "other.org"
    resp = c.allocate()
    assert error_code(resp) == 401 and resp.integrity_offset < 0
    reasons = [e.reason for e in events_of(core, ev.AuthFailed)]
    assert reasons == ["bad_credentials"] * 3


def test_integrity_without_nonce_is_400() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    req = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        [(Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, "alice")],
        integrity_key=c.key,
    )
    resp = c.raw(req)
    assert resp is not None and error_code(resp) == 400


def test_stale_nonce_gets_438_with_fresh_nonce() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate()
    old_nonce = c.nonce
    c.now = NOW + 601
    req = encode_message(
        Method.REFRESH,
        MessageClass.REQUEST,
        os.urandom(12),
        [(Attr.USERNAME, c.username), (Attr.REALM, REALM), (Attr.NONCE, old_nonce)],
        integrity_key=c.key,
    )
    resp = c.raw(req)
    assert resp is not None and error_code(resp) == 438
    assert resp.get(Attr.NONCE) != old_nonce and resp.get(Attr.REALM) == REALM
    assert c.request(Method.REFRESH).message_class == MessageClass.SUCCESS


def test_nonce_is_bound_to_client_address() -> None:
    core, _ = make_core()
    a = CoreClient(core)
    a.allocate()
    b = CoreClient(core, client=("192.0.2.99", 1))
    b.nonce = a.nonce
    req = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        os.urandom(12),
        [
            (Attr.REQUESTED_TRANSPORT, 17),
            (Attr.USERNAME, "alice"),
            (Attr.REALM, REALM),
            (Attr.NONCE, a.nonce),
        ],
        integrity_key=b.key,
    )
    resp = b.raw(req)
    assert resp is not None and error_code(resp) == 438


def test_refresh_and_delete() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    assert error_code(c.request(Method.REFRESH)) == 437
    c.allocate()
    assert c.request(Method.REFRESH, [(Attr.LIFETIME, 1000)]).get(Attr.LIFETIME) == 1000
    port = opener.live[0].address[1]
    resp = c.request(Method.REFRESH, [(Attr.LIFETIME, 0)])
    assert resp.get(Attr.LIFETIME) == 0
    assert not core.allocations and not opener.live
    assert core.port_pools[4].is_free(port)
    ended = events_of(core, ev.AllocationEnded)
    assert ended[0].cause == "deleted"


def test_other_user_on_same_five_tuple_gets_441() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate()
    user, pw = rest_credential("bob")
    other = CoreClient(core, c.ft.client, user, pw)
    assert error_code(other.request(Method.REFRESH)) == 441


def test_even_port_reservation_token() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    resp = c.allocate([(Attr.EVEN_PORT, True)])
    port = resp.get(Attr.XOR_RELAYED_ADDRESS)[1]
    token = resp.get(Attr.RESERVATION_TOKEN)
    assert port % 2 == 0 and len(token) == 8
    assert not core.port_pools[4].is_free(port + 1)
    c2 = CoreClient(core, client=("192.0.2.70", 1))
    resp2 = c2.allocate([(Attr.RESERVATION_TOKEN, token)])
    assert resp2.get(Attr.XOR_RELAYED_ADDRESS)[1] == port + 1
    c3 = CoreClient(core, client=("192.0.2.71", 1))
    assert error_code(c3.allocate([(Attr.RESERVATION_TOKEN, token)])) == 508


def test_reservation_expires_and_port_returns() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    port = c.allocate([(Attr.EVEN_PORT, True)]).get(Attr.XOR_RELAYED_ADDRESS)[1]
    core.handle_timer(NOW + 31)
    assert core.port_pools[4].is_free(port + 1) and not core.reservations


def test_even_port_without_reservation() -> None:
    core, _ = make_core()
    resp = CoreClient(core).allocate([(Attr.EVEN_PORT, False)])
    assert resp.get(Attr.XOR_RELAYED_ADDRESS)[1] % 2 == 0
    assert resp.get(Attr.RESERVATION_TOKEN) is None


def test_ipv6_and_dual_allocations() -> None:
    core, _ = make_core()
    resp = CoreClient(core).allocate([(Attr.REQUESTED_ADDRESS_FAMILY, 2)])
    assert resp.get(Attr.XOR_RELAYED_ADDRESS)[0] == "2001:db8::9"
    dual = CoreClient(core, ("192.0.2.80", 1)).allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)])
    hosts = [a[0] for a in dual.get_all(Attr.XOR_RELAYED_ADDRESS)]
    assert hosts == ["203.0.113.9", "2001:db8::9"]


def test_ipv4_only_server() -> None:
    core, _ = make_core(relay_addresses=(RelayAddress("127.0.0.1", "127.0.0.1", 4),))
    assert error_code(CoreClient(core).allocate([(Attr.REQUESTED_ADDRESS_FAMILY, 2)])) == 440
    dual = CoreClient(core, ("192.0.2.81", 1)).allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)])
    assert dual.message_class == MessageClass.SUCCESS
    assert len(dual.get_all(Attr.XOR_RELAYED_ADDRESS)) == 1
    assert dual.get(Attr.ADDRESS_ERROR_CODE)[1] == 440


def test_quotas() -> None:
    core, _ = make_core(max_allocations_per_user=1, max_allocations=2)
    assert CoreClient(core, ("192.0.2.90", 1)).allocate().message_class == 2
    assert error_code(CoreClient(core, ("192.0.2.90", 2)).allocate()) == 486
    assert events_of(core, ev.AllocationRefused)[-1].reason == "quota_user"
    user, pw = rest_credential("bob")
    assert CoreClient(core, ("192.0.2.91", 1), user, pw).allocate().message_class == 2
    user, pw = rest_credential("carol")
    assert error_code(CoreClient(core, ("192.0.2.92", 1), user, pw).allocate()) == 486
    assert events_of(core, ev.AllocationRefused)[-1].reason == "quota_total"


def test_the_self_probe_has_no_per_user_or_per_address_quota() -> None:
    """The server's internal user (the self-probe) probes every listener of every
    worker at once from one loopback address: only the server's total applies."""
    core, _ = make_core(
        max_allocations_per_user=1, max_allocations_per_client_ip=1, max_allocations=3
    )
    core.auth.internal_keys["probe"] = long_term_key("probe", REALM, "probe-pw")
    for port in (1, 2, 3):
        c = CoreClient(core, ("127.0.0.1", port), "probe", "probe-pw")
        assert c.allocate().message_class == MessageClass.SUCCESS, port
    assert error_code(CoreClient(core, ("127.0.0.1", 4), "probe", "probe-pw").allocate()) == 486
    assert events_of(core, ev.AllocationRefused)[-1].reason == "quota_total"


def test_rest_quota_counts_user_part() -> None:
    core, _ = make_core(max_allocations_per_user=1)
    u1, p1 = rest_credential("bob", expires=NOW + 100)
    u2, p2 = rest_credential("bob", expires=NOW + 200)
    assert CoreClient(core, ("192.0.2.93", 1), u1, p1).allocate().message_class == 2
    assert error_code(CoreClient(core, ("192.0.2.93", 2), u2, p2).allocate()) == 486


def test_relay_port_exhaustion_is_508() -> None:
    core, opener = make_core()
    opener.busy = set(range(50000, 50100))
    resp = CoreClient(core).allocate()
    assert error_code(resp) == 508
    assert events_of(core, ev.AllocationRefused)[-1].reason == "no_relay_port"
    assert len(core.port_pools[4]) == 100  # busy ports went back to the pool


def test_create_permission_and_send_indication() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    c.allocate()
    relay = opener.live[0]
    c.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, PEER), (Attr.DATA, b"early")])
    assert relay.sent == [] and core.stats.dropped_no_permission == 1
    resp = c.request(
        Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER), (Attr.XOR_PEER_ADDRESS, PEER2)]
    )
    assert resp.message_class == MessageClass.SUCCESS
    assert set(core.allocations[c.ft].permissions) == {PEER[0], PEER2[0]}
    c.indication(Method.SEND, [(Attr.XOR_PEER_ADDRESS, PEER), (Attr.DATA, b"hello")])
    assert relay.sent == [(b"hello", PEER)]
    # Peer data comes back as a Data indication
    alloc = core.allocations[c.ft]
    out = core.data_indication(alloc, b"pong", (PEER[0], 9999), NOW)
    assert out is not None
    msg = decode_message(out)
    assert msg.method == Method.DATA and msg.get(Attr.DATA) == b"pong"
    assert msg.get(Attr.XOR_PEER_ADDRESS) == (PEER[0], 9999)
    assert core.data_indication(alloc, b"x", ("198.51.200.99", 1), NOW) is None


def test_create_permission_errors() -> None:
    core, _ = make_core(allow_loopback=False)
    c = CoreClient(core)
    c.allocate()
    assert error_code(c.request(Method.CREATE_PERMISSION)) == 400
    resp = c.request(
        Method.CREATE_PERMISSION,
        [(Attr.XOR_PEER_ADDRESS, PEER), (Attr.XOR_PEER_ADDRESS, ("127.0.0.1", 9))],
    )
    assert error_code(resp) == 403
    assert not core.allocations[c.ft].permissions  # all or nothing
    assert events_of(core, ev.PeerDenied)[0].peer_ip == "127.0.0.1"
    mapped = ("::ffff:127.0.0.1", 9)
    assert error_code(c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, mapped)])) in (
        403,
        443,
    )
    v4only = CoreClient(core, ("192.0.2.95", 1))
    v4only.allocate()
    resp = v4only.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, ("2001:4860::1", 1))])
    assert error_code(resp) == 443


def test_permission_quota_is_508() -> None:
    core, _ = make_core(max_permissions_per_allocation=1)
    c = CoreClient(core)
    c.allocate()
    assert c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)]).message_class == 2
    resp = c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER2)])
    assert error_code(resp) == 508


def test_channel_bind_rules_and_channel_data() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    c.allocate()
    relay = opener.live[0]

    def bind(number: int, peer: tuple[str, int]) -> int | None:
        resp = c.request(
            Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)]
        )
        return error_code(resp)

    assert bind(0x4000, PEER) is None
    assert bind(0x7584, PEER2) is None  # uclient picks from the whole 0x4000-0x7FFF range
    assert bind(0x4000, PEER) is None  # refresh is fine
    assert bind(0x4000, PEER2) == 400  # channel bound to another peer
    assert bind(0x4001, PEER) == 400  # peer bound to another channel
    assert bind(0x3FFF, ("198.51.200.9", 1)) == 400
    assert bind(0x8000, ("198.51.200.9", 1)) == 400
    assert error_code(c.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4002)])) == 400
    alloc = core.allocations[c.ft]
    assert PEER[0] in alloc.permissions  # ChannelBind installs the permission
    assert alloc.channel_targets[0x4000][1] == PEER
    assert alloc.peer_channels[PEER] == 0x4000
    core.handle_channel_data(0x4000, b"media", c.ft, NOW)
    assert relay.sent[-1] == (b"media", PEER)
    core.handle_channel_data(0x4444, b"x", c.ft, NOW)
    assert core.stats.dropped_unknown_channel == 1


def test_channel_quota_is_508() -> None:
    core, _ = make_core(max_channels_per_allocation=1)
    c = CoreClient(core)
    c.allocate()
    ok = c.request(
        Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)]
    )
    assert ok.message_class == 2
    resp = c.request(
        Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4001), (Attr.XOR_PEER_ADDRESS, PEER2)]
    )
    assert error_code(resp) == 508


def test_expiry_of_permissions_channels_and_allocations() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    c.allocate()
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER2)])
    c.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)])
    alloc = core.allocations[c.ft]
    core.drain_events()
    assert core.next_timer() == NOW + 30 or core.next_timer() == NOW + 300
    core.handle_timer(NOW + 299)
    assert set(alloc.permissions) == {PEER[0], PEER2[0]}
    core.handle_timer(NOW + 300)
    assert not alloc.permissions
    assert not alloc.channel_targets  # the channel stays bound but cannot relay
    assert 0x4000 in alloc.bindings
    expired = {e.peer_ip for e in events_of(core, ev.PermissionExpired)}
    assert expired == {PEER[0], PEER2[0]}
    # Refreshing the channel brings the permission and route back
    c.now = NOW + 400
    c.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)])
    c.request(Method.REFRESH, [(Attr.LIFETIME, 700)])  # allocation now ends at NOW+1100
    assert 0x4000 in alloc.channel_targets
    core.handle_timer(NOW + 999)
    assert 0x4000 in alloc.bindings
    core.handle_timer(NOW + 1000)
    assert 0x4000 not in alloc.bindings and not alloc.channel_targets
    assert events_of(core, ev.ChannelExpired)
    assert core.allocations
    core.handle_timer(NOW + 1100)
    assert not core.allocations and not opener.live
    assert [e.cause for e in events_of(core, ev.AllocationEnded)] == ["expired"]


def test_allocation_expiry_event_and_refresh_extends() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    c.allocate()
    c.now = NOW + 500
    c.request(Method.REFRESH)
    core.drain_events()
    core.handle_timer(NOW + 600)
    assert core.allocations
    core.handle_timer(NOW + 1100)
    assert not core.allocations and not opener.live
    ended = events_of(core, ev.AllocationEnded)
    assert ended[0].cause == "expired" and ended[0].duration == 1100


def test_strict_expiry_ends_allocation_with_credential() -> None:
    core, _ = make_core(strict_expiry=True)
    user, pw = rest_credential("bob", expires=NOW + 100)
    CoreClient(core, ("192.0.2.96", 1), user, pw).allocate()
    core.handle_timer(NOW + 100)
    assert not core.allocations
    assert events_of(core, ev.AllocationEnded)[0].cause == "credential_expired"


def test_connection_close_deletes_allocation() -> None:
    core, opener = make_core()
    c = CoreClient(core)
    c.allocate()
    core.close_five_tuple(c.ft, NOW + 1)
    assert not core.allocations and not opener.live


def test_indications_and_responses_from_clients_are_ignored() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    resp = encode_message(Method.BINDING, MessageClass.SUCCESS, os.urandom(12))
    assert core.handle_message(resp, c.ft, NOW) is None
    c.indication(Method.SEND, [(Attr.DATA, b"x")])  # no allocation: dropped
    assert core.stats.dropped_no_allocation == 1


def test_unknown_method_is_400() -> None:
    core, _ = make_core()
    c = CoreClient(core)
    resp = c.request(0x07F, auth=False)  # type: ignore[arg-type]
    assert error_code(resp) == 400


def test_chromium_capture_sequence_gets_sensible_answers() -> None:
    """Chromium's requests (signed with coturn's nonces) replayed into our core."""
    core, _ = make_core()
    data = Path(__file__).parent.parent / "data" / "turn-udp-chromium"
    index = json.loads((data / "index.json").read_text())
    c = CoreClient(core, client=("127.0.0.1", 50000))
    seen: dict[str, set[int]] = {}
    for m in index["messages"]:
        if m["direction"] != "to-server":
            continue
        raw = (data / m["file"]).read_bytes()
        out = core.handle_message(raw, c.ft, 1795540000.0)
        kind = m["kind"]
        if out is None:
            seen.setdefault(kind, set()).add(-1)
            continue
        msg = decode_message(out)
        seen.setdefault(kind, set()).add(error_code(msg) or 0)
    assert seen["Binding-request"] == {0}
    # Unauthenticated Allocates get 401; signed ones carry coturn's nonce, so 438
    assert seen["Allocate-request"] == {401, 438}
    assert seen["CreatePermission-request"] == {438}
    assert seen["Send-indication"] == {-1}


def test_dual_allocation_draft_attribute_and_family_delete() -> None:
    """coturn's clients send ADDITIONAL-ADDRESS-FAMILY as 0x8032 (pre-RFC 8656)."""
    core, opener = make_core()
    c = CoreClient(core)
    resp = c.allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY_DRAFT, 2)])
    assert len(resp.get_all(Attr.XOR_RELAYED_ADDRESS)) == 2
    ok = c.request(Method.REFRESH, [(Attr.LIFETIME, 600), (Attr.REQUESTED_ADDRESS_FAMILY, 2)])
    assert ok.message_class == MessageClass.SUCCESS
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, ("2001:4860::1", 1))])
    gone = c.request(Method.REFRESH, [(Attr.LIFETIME, 0), (Attr.REQUESTED_ADDRESS_FAMILY, 2)])
    assert gone.get(Attr.LIFETIME) == 0
    alloc = core.allocations[c.ft]
    assert list(alloc.relays) == [4] and not alloc.permissions
    assert len(opener.live) == 1
    bad = c.request(Method.REFRESH, [(Attr.REQUESTED_ADDRESS_FAMILY, 2)])
    assert error_code(bad) == 443


def test_ipv4_only_server_answers_draft_address_error_code() -> None:
    core, _ = make_core(relay_addresses=(RelayAddress("127.0.0.1", "127.0.0.1", 4),))
    dual = CoreClient(core).allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY_DRAFT, 2)])
    assert dual.get(Attr.ADDRESS_ERROR_CODE_DRAFT)[1] == 440


def test_reservation_tokens_work_across_worker_processes() -> None:
    """Workers share the nonce key; a token one issued is honoured by another."""
    from turnserver.core.config import RelayAddress as RA

    a, _ = make_core(relay_addresses=(RA("127.0.0.1", "127.0.0.1", 4),))
    b, _ = make_core(relay_addresses=(RA("127.0.0.1", "127.0.0.1", 4),))
    b.port_pools[4] = type(b.port_pools[4])(50100, 50199)  # b's own slice
    port = CoreClient(a).allocate([(Attr.EVEN_PORT, True)]).get(Attr.XOR_RELAYED_ADDRESS)[1]
    token = a.drain_events() and CoreClient(a).core.reservations and next(iter(a.reservations))
    resp = CoreClient(b, client=("192.0.2.9", 7)).allocate([(Attr.RESERVATION_TOKEN, token)])
    assert resp.get(Attr.XOR_RELAYED_ADDRESS)[1] == port + 1
    forged = bytes(8)
    assert (
        error_code(CoreClient(b, ("192.0.2.9", 8)).allocate([(Attr.RESERVATION_TOKEN, forged)]))
        == 508
    )
    stale = CoreClient(b, ("192.0.2.9", 9))
    stale.now = NOW + 120  # two windows later
    assert error_code(stale.allocate([(Attr.RESERVATION_TOKEN, token)])) == 508


def test_even_port_never_promises_a_port_a_sibling_holds() -> None:
    """Worker B bound our port+1 through a token; we released the reservation since
    (its allocation ended) and the port came back to our pool. A new EVEN-PORT R must
    not promise that port+1 again: its token would fail with 508 (seen with uclient -S)."""
    core, opener = make_core()
    core.port_pools[4] = type(core.port_pools[4])(50000, 50003)
    opener.busy.add(50001)  # held by the sibling: bind fails
    for i in range(5):
        resp = CoreClient(core, ("192.0.2.60", i)).allocate([(Attr.EVEN_PORT, True)])
        if i == 0:
            assert resp.get(Attr.XOR_RELAYED_ADDRESS)[1] == 50002
            token = resp.get(Attr.RESERVATION_TOKEN)
        else:  # only 50000-50001 is left, and 50001 cannot be bound
            assert error_code(resp) == 508
    assert core.port_pools[4].is_free(50000) and core.port_pools[4].is_free(50001)
    used = CoreClient(core, ("192.0.2.61", 1)).allocate([(Attr.RESERVATION_TOKEN, token)])
    assert used.get(Attr.XOR_RELAYED_ADDRESS)[1] == 50003


def test_ended_allocations_leave_the_timer_heap_before_their_deadlines() -> None:
    """A released allocation's timer entries (allocation, credential, permission) stay
    in the heap until due, up to a day for a REST credential, and kept the allocation in
    memory: under churn each worker's RSS rose ~1.6 kB per released setup."""
    core, _ = make_core()
    core.port_pools[4] = type(core.port_pools[4])(50000, 51999)
    for i in range(1000):
        c = CoreClient(core, ("192.0.2.90", 1000 + i))
        c.allocate()
        c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)])
        c.request(Method.REFRESH, [(Attr.LIFETIME, 0)])
    assert not core.allocations
    dead = {id(t[3]) for t in core.timers if t[3] is not None}
    assert len(dead) <= 1000 // 8, len(dead)  # those the last compaction did not reach
    # a live allocation's timers survive compaction and still fire
    c = CoreClient(core, ("192.0.2.91", 1))
    c.allocate()
    for i in range(200):
        d = CoreClient(core, ("192.0.2.92", i))
        d.allocate()
        d.request(Method.REFRESH, [(Attr.LIFETIME, 0)])
    assert c.ft in core.allocations
    core.handle_timer(NOW + 3601)
    assert c.ft not in core.allocations
