"""The PROXY protocol parser (io/proxy_protocol.py): v1 and v2 as HAProxy's
proxy-protocol.txt defines them, byte by byte, and hostile input."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnserver.io.proxy_protocol import (
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
    parse_versions,
)

BOTH = frozenset({1, 2})
STUN_BINDING = bytes.fromhex("000100002112a442") + bytes(12)


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def test_v1_tcp4_and_the_bytes_after_it() -> None:
    head = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    got = parse_proxy_header(head + STUN_BINDING, BOTH)
    assert got == ProxyHeader(1, len(head), ("203.0.113.7", 56324), ("192.0.2.1", 443))


def test_v1_tcp6_and_unknown() -> None:
    head = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 3478\r\n"
    got = parse_proxy_header(head, BOTH)
    assert got is not None and got.source == ("2001:db8::7", 4000)
    unknown = b"PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 65535 65535\r\n"
    assert parse_proxy_header(unknown, BOTH) == ProxyHeader(1, len(unknown))


def test_v2_inet_inet6_with_tlvs_skipped() -> None:
    body = (
        socket.inet_aton("198.51.100.9") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 1, 2)
    )
    tlvs = b"\x01\x00\x08stun.turn" + b"\x03\x00\x04abcd"  # ALPN, CRC32C: skipped
    head = v2(0x21, 0x11, body + tlvs)
    assert parse_proxy_header(head + b"rest", BOTH) == ProxyHeader(
        2, len(head), ("198.51.100.9", 1), ("10.0.0.1", 2)
    )
    body6 = socket.inet_pton(socket.AF_INET6, "2001:db8::9") * 2 + struct.pack("!HH", 9, 10)
    got = parse_proxy_header(v2(0x21, 0x21, body6), BOTH)
    assert got is not None and got.source == ("2001:db8::9", 9)


def test_v2_local_unspec_and_unix_use_the_real_endpoints() -> None:
    assert parse_proxy_header(v2(0x20, 0x00, b""), BOTH) == ProxyHeader(2, 16)
    assert parse_proxy_header(v2(0x20, 0x11, bytes(12)), BOTH) == ProxyHeader(2, 28)
    assert parse_proxy_header(v2(0x21, 0x00, b"xyz"), BOTH) == ProxyHeader(2, 19)
    assert parse_proxy_header(v2(0x21, 0x31, bytes(216)), BOTH) == ProxyHeader(2, 232)


def test_ipv4_mapped_sources_are_ipv4() -> None:
    body = socket.inet_pton(socket.AF_INET6, "::ffff:203.0.113.5") * 2 + bytes(4)
    got = parse_proxy_header(v2(0x21, 0x21, body), BOTH)
    assert got is not None and got.source == ("203.0.113.5", 0)


@pytest.mark.parametrize(
    "head",
    [
        encode_v1(("203.0.113.7", 5000), ("192.0.2.1", 443)),
        encode_v2(("203.0.113.7", 5000), ("192.0.2.1", 443)),
        encode_v2(("2001:db8::1", 5000), ("2001:db8::2", 443)),
        encode_v2(None, None),
    ],
)
def test_every_prefix_asks_for_more_and_never_guesses(head: bytes) -> None:
    for i in range(len(head)):
        assert parse_proxy_header(head[:i], BOTH) is None
    got = parse_proxy_header(head, BOTH)
    assert got is not None and got.length == len(head)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (STUN_BINDING, "does not begin"),  # no header at all: refused on the first byte
        (b"\x16\x03\x01\x02\x00", "does not begin"),  # a bare TLS ClientHello
        (b"GET / HTTP/1.1\r\n", "does not begin"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "is not TCP4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xb9 2\r\n", "not ASCII"),
        (b"PROXY TCP4 1.2.3.4\n", "bare LF"),
        (b"PROXY " + b"A" * 120, "without CRLF"),
        (v2(0x11, 0x11, bytes(12)), "version 1"),
        (v2(0x22, 0x11, bytes(12)), "command"),
        (v2(0x21, 0x41, bytes(12)), "family"),
        (v2(0x21, 0x11, bytes(8)), "needs 12"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
    ],
)
def test_bad_headers_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse_proxy_header(data, BOTH)


def test_a_listener_takes_only_its_version() -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)), frozenset({2}))
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2)), frozenset({1}))
    assert parse_versions("any") == BOTH and parse_versions("V2") == frozenset({2})
    with pytest.raises(ValueError, match="v1, v2 or any"):
        parse_versions("v3")


def test_the_header_is_capped_before_it_is_buffered() -> None:
    """A v2 length beyond V2_MAX is refused from its 16 fixed bytes, before any TLV
    arrives (a trusted proxy cannot make us hold 64 KiB per connection)."""
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX)
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(fixed, BOTH)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", V2_SIGNATURE, b"PROXY ", b"PROXY TCP4 "]))
def test_hostile_bytes_raise_only_proxy_header_error(data: bytes, prefix: bytes) -> None:
    try:
        got = parse_proxy_header(prefix + data, BOTH)
    except ProxyHeaderError:
        return
    if got is not None:
        assert 0 < got.length <= len(prefix + data)
