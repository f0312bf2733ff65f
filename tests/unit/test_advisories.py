"""One regression test per class of TURN server advisory of the last years (coturn's
among them), against the sans-IO core: sequences and address forms rather than single
malformed frames."""

from __future__ import annotations

import os
import struct

from tests.support.core_client import NOW, SECRET, CoreClient, error_code, make_core
from turnserver.core.auth import rest_password
from turnserver.stun import Attr, MessageClass, Method, encode_message

ALLOWED = ("198.51.200.7", 5000)
OTHER = ("198.51.200.8", 5000)


def _append_attribute(data: bytes, attr_type: int, value: bytes) -> bytes:
    """An attribute after MESSAGE-INTEGRITY, the header's length grown to cover it."""
    padded = value + b"\x00" * (-len(value) % 4)
    extra = struct.pack("!HH", attr_type, len(value)) + padded
    length = struct.unpack("!H", data[2:4])[0] + len(extra)
    return data[:2] + struct.pack("!H", length) + data[4:] + extra


def test_attributes_after_message_integrity_are_not_acted_upon() -> None:
    """RFC 8489 §14.5: what follows MESSAGE-INTEGRITY (but FINGERPRINT) is ignored: a
    man in the middle cannot add a permission to a signed CreatePermission."""
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate()
    signed = encode_message(
        Method.CREATE_PERMISSION,
        MessageClass.REQUEST,
        os.urandom(12),
        [
            (Attr.XOR_PEER_ADDRESS, ALLOWED),
            (Attr.USERNAME, c.username),
            (Attr.REALM, c.realm),
            (Attr.NONCE, c.nonce),
        ],
        integrity_key=c.key,
    )
    xor = bytearray(encode_message(1, 0, b"\x00" * 12, [(Attr.XOR_PEER_ADDRESS, OTHER)])[24:])
    tampered = _append_attribute(signed, Attr.XOR_PEER_ADDRESS, bytes(xor))
    resp = c.raw(tampered)
    alloc = next(iter(core.allocations.values()))
    assert resp is not None and error_code(resp) is None  # the signed part is valid
    assert ALLOWED[0] in alloc.permissions and OTHER[0] not in alloc.permissions


def test_even_port_without_reservation_leaks_no_port() -> None:
    """EVEN-PORT with R=0 (and R=1) cycled with Refresh 0 must give every port back
    (ports leaked until every allocation failed)."""
    core, _ = make_core()
    free = core.relay_ports_free()
    for i in range(500):
        c = CoreClient(core, client=("192.0.2.50", 30000 + i))
        resp = c.allocate([(Attr.EVEN_PORT, i % 2 == 0)])
        assert error_code(resp) is None, i
        assert error_code(c.request(Method.REFRESH, [(Attr.LIFETIME, 0)])) is None
    assert core.relay_ports_free() == free and not core.reservations


def test_a_flood_with_mobility_tickets_does_not_bypass_quotas() -> None:
    """RFC 8016 mobility is not offered: MOBILITY-TICKET is ignored (comprehension
    optional), and a flood of Allocates carrying it from new ports of one user still
    meets the per-user quota."""
    core, _ = make_core(max_allocations_per_user=3)
    codes = []
    for i in range(50):
        c = CoreClient(core, client=("192.0.2.50", 31000 + i))
        c.username = f"{int(NOW) + 3600}:mallory"
        c.password = rest_password(SECRET, c.username)
        resp = c.allocate([(0x8030, os.urandom(16))])  # MOBILITY-TICKET
        codes.append(error_code(resp))
        assert resp.get(0x8030) is None  # no ticket handed out
    assert codes.count(None) == 3 and codes.count(486) == 47


def test_unspecified_addresses_are_never_peers() -> None:
    """CVE-2020-26262: 0.0.0.0 and [::] as peers reach the server's own host."""
    core, _ = make_core()
    c = CoreClient(core)
    c.allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)])
    for peer in (("0.0.0.0", 3478), ("::", 3478), ("0.0.0.0", 9641)):
        resp = c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, peer)])
        assert error_code(resp) == 403, peer


def test_ipv4_mapped_loopback_is_loopback() -> None:
    """CVE-2026-27624: ::ffff:127.0.0.1 judged as the IPv6 address it is written as
    reached the loopback interface."""
    core, _ = make_core(allow_loopback=False)
    c = CoreClient(core)
    c.allocate([(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)])
    for peer in ("::ffff:127.0.0.1", "::127.0.0.1", "::ffff:0:127.0.0.1", "::ffff:7f00:1"):
        resp = c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, (peer, 3478))])
        assert error_code(resp) == 403, peer
