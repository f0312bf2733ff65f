"""The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt): the header an
L4 load balancer or TLS router puts in front of a TCP connection to tell the server
who the client really is.

Sans-IO: `parse_proxy_header` looks at the bytes received so far and says "need more",
"this header, N bytes long" or raises ProxyHeaderError. The stream adapter
(io/stream.py) decides whom to believe (only trusted proxy addresses) and for how long
to wait.

There is no standard PROXY header for UDP datagrams (v2's DGRAM transport describes a
connection, not each datagram); listeners accept `proxy=` only on tcp:// and tls://.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum

from turnserver.stun.attributes import Address

# proxy-protocol.txt §2.2: the v2 signature, then ver_cmd, fam, len (16 bytes in all)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
V1_PREFIX = b"PROXY "
V1_MAX = 107  # §2.1: the longest v1 line, CRLF included
# A cap on v2's TLVs: HAProxy's SSL and authority TLVs fit in a few hundred bytes; a
# header longer than this is refused rather than buffered (§2.2 allows up to 64 KiB).
V2_MAX = 4096


class ProxyCommand(IntEnum):
    """v2 command (low nibble of byte 13)."""

    LOCAL = 0x0  # the proxy's own connection (health check): use the real endpoints
    PROXY = 0x1  # relayed on behalf of the client in the address block


class ProxyFamily(IntEnum):
    """v2 address family (high nibble of byte 14)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


_ADDRESS_BLOCK = {ProxyFamily.INET: 12, ProxyFamily.INET6: 36, ProxyFamily.UNIX: 216}


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header of an accepted version."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` is None when the header names no IP client (LOCAL,
    UNSPEC, UNKNOWN, AF_UNIX): the connection's own endpoints are then the truth."""

    version: int
    length: int  # bytes the header took; what follows is the client's stream
    source: Address | None = None
    destination: Address | None = None


def parse_proxy_header(data: bytes | bytearray, versions: frozenset[int]) -> ProxyHeader | None:
    """The header at the start of `data`, or None if more bytes are needed.

    Raises ProxyHeaderError for bytes that cannot begin an accepted header, so that a
    connection without one is refused on its first byte rather than at a deadline."""
    n = len(data)
    if 2 in versions and data[:12] == V2_SIGNATURE[: min(n, 12)]:
        return _parse_v2(data) if n >= V2_FIXED else None
    if 1 in versions and data[:6] == V1_PREFIX[: min(n, 6)]:
        return _parse_v1(data) if n >= 6 else None
    raise ProxyHeaderError("the connection does not begin with a PROXY header")


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    ver_cmd, fam, length = data[12], data[13], (data[14] << 8) | data[15]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {ver_cmd >> 4}")
    total = V2_FIXED + length
    if total > V2_MAX:
        raise ProxyHeaderError(f"v2 header of {total} bytes (at most {V2_MAX})")
    if len(data) < total:
        return None
    try:
        command = ProxyCommand(ver_cmd & 0x0F)
        family = ProxyFamily(fam >> 4)
    except ValueError:
        raise ProxyHeaderError(f"v2 command/family {ver_cmd:#04x}/{fam:#04x}") from None
    block = _ADDRESS_BLOCK.get(family, 0)
    if length < block:
        raise ProxyHeaderError(f"v2 {family.name} header of {length} bytes (needs {block})")
    # Whatever follows the address block is TLVs (§2.2.7): skipped unread.
    if command == ProxyCommand.LOCAL or family in (ProxyFamily.UNSPEC, ProxyFamily.UNIX):
        return ProxyHeader(2, total)
    body = bytes(data[V2_FIXED : V2_FIXED + block])
    size = 4 if family == ProxyFamily.INET else 16
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(2, total, (_plain(src), sport), (_plain(dst), dport))


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header without CRLF in {V1_MAX} bytes")
        if b"\n" in data:
            raise ProxyHeaderError("v1 header with a bare LF")
        return None
    try:
        line = bytes(data[6:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    parts = line.split(" ")
    if parts[0] == "UNKNOWN":  # §2.1: ignore the rest, use the real endpoints
        return ProxyHeader(1, end + 2)
    if len(parts) != 5 or parts[0] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1 header {line[:60]!r} is not TCP4/TCP6 with 4 fields")
    want = 4 if parts[0] == "TCP4" else 6
    try:
        src = ipaddress.ip_address(parts[1])
        dst = ipaddress.ip_address(parts[2])
    except ValueError:
        raise ProxyHeaderError(f"v1 header {line[:60]!r} has a bad address") from None
    if src.version != want or dst.version != want:
        raise ProxyHeaderError(f"v1 header {line[:60]!r}: address is not {parts[0]}")
    return ProxyHeader(1, end + 2, (_plain(src), _port(parts[3])), (_plain(dst), _port(parts[4])))


def _port(text: str) -> int:
    # §2.1: decimal, no leading zero, 0..65535
    if (
        not text.isdigit()
        or not text.isascii()
        or len(text) > 5
        or (text[0] == "0" and text != "0")
    ):
        raise ProxyHeaderError(f"v1 header has a bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header has a bad port {text!r}")
    return port


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """IPv4-mapped IPv6 as IPv4: the client is then judged as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def encode_v1(source: Address, destination: Address) -> bytes:
    """A v1 line (the probe's, and what nginx sends)."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(source: Address | None, destination: Address | None) -> bytes:
    """A v2 header: PROXY over TCP for `source`, or LOCAL when source is None."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    six = ":" in source[0]
    pack = ipaddress.IPv6Address if six else ipaddress.IPv4Address
    body = (
        pack(source[0]).packed
        + pack(destination[0]).packed
        + source[1].to_bytes(2, "big")
        + destination[1].to_bytes(2, "big")
    )
    fam = (ProxyFamily.INET6 if six else ProxyFamily.INET) << 4 | 0x1  # STREAM
    return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body


def parse_versions(text: str) -> frozenset[int]:
    """A listener's `proxy=` value: v1, v2 or any (either)."""
    value = text.strip().lower()
    if value == "any":
        return frozenset({1, 2})
    if value in ("v1", "v2"):
        return frozenset({int(value[1])})
    raise ValueError(f"proxy={text!r}: expected v1, v2 or any")


__all__ = [
    "ProxyCommand",
    "ProxyFamily",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "parse_proxy_header",
    "parse_versions",
]
