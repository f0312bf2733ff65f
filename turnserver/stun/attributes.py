"""Attribute codecs: one table maps each type to (name, encoder, decoder).

Decoders take the raw value and the transaction id and raise only StunDecodeError.
Encoders take a Python value and the transaction id and return the raw value
(without padding). Adding an attribute is one row in ATTRIBUTE_CODECS.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from turnserver.stun.constants import MAGIC_COOKIE, MAGIC_COOKIE_BYTES, AddressFamily, Attr
from turnserver.stun.errors import StunDecodeError

Address = tuple[str, int]

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_ADDR_HEAD = struct.Struct("!xBH")
_ERROR_HEAD = struct.Struct("!HBB")
_XOR_PORT = MAGIC_COOKIE >> 16


def _decode_address(raw: bytes, tid: bytes) -> Address:
    if len(raw) < 4:
        raise StunDecodeError("address attribute too short")
    family, port = _ADDR_HEAD.unpack_from(raw)
    body = raw[4:]
    if family == AddressFamily.IPV4 and len(body) == 4:
        return str(ipaddress.IPv4Address(body)), port
    if family == AddressFamily.IPV6 and len(body) == 16:
        return str(ipaddress.IPv6Address(body)), port
    raise StunDecodeError(f"bad address family {family} or length {len(raw)}")


@lru_cache(maxsize=8192)
def _pack_ip(host: str) -> tuple[int, bytes]:
    """(address family octet, packed address). Dotted quads are parsed here, 6x faster
    than ipaddress (every client address is new to the cache); the rest by ipaddress."""
    parts = host.split(".")
    if len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and (p == "0" or p[0] != "0") for p in parts
    ):
        values = [int(p) for p in parts]
        if max(values) <= 255:
            return AddressFamily.IPV4, bytes(values)
    ip = ipaddress.ip_address(host)
    return (AddressFamily.IPV4 if ip.version == 4 else AddressFamily.IPV6), ip.packed


def _ip_text(packed: bytes) -> str:
    """The text form of a packed IPv4 or IPv6 address."""
    if len(packed) == 4:
        return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}"
    return _ipv6_text(packed)


@lru_cache(maxsize=4096)
def _ipv6_text(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


def _encode_address(value: Address, tid: bytes) -> bytes:
    family, packed = _pack_ip(value[0])
    return _ADDR_HEAD.pack(family, value[1]) + packed


def _xor_bytes(body: bytes, tid: bytes) -> bytes:
    mask = MAGIC_COOKIE_BYTES + tid
    n = len(body)
    return (int.from_bytes(body, "big") ^ int.from_bytes(mask[:n], "big")).to_bytes(n, "big")


def _decode_xor_address(raw: bytes, tid: bytes) -> Address:
    if len(raw) < 4:
        raise StunDecodeError("XOR address attribute too short")
    family, xport = _ADDR_HEAD.unpack_from(raw)
    body = raw[4:]
    if not (
        (family == AddressFamily.IPV4 and len(body) == 4)
        or (family == AddressFamily.IPV6 and len(body) == 16)
    ):
        raise StunDecodeError(f"bad address family {family} or length {len(raw)}")
    return _ip_text(_xor_bytes(body, tid)), xport ^ _XOR_PORT


def _encode_xor_address(value: Address, tid: bytes) -> bytes:
    family, packed = _pack_ip(value[0])
    return _ADDR_HEAD.pack(family, value[1] ^ _XOR_PORT) + _xor_bytes(packed, tid)


def _decode_u32(raw: bytes, tid: bytes) -> int:
    if len(raw) != 4:
        raise StunDecodeError("32-bit attribute must be 4 bytes")
    value: int = _U32.unpack(raw)[0]
    return value


def _encode_u32(value: int, tid: bytes) -> bytes:
    return _U32.pack(value)


def _decode_u64_bytes(raw: bytes, tid: bytes) -> bytes:
    if len(raw) != 8:
        raise StunDecodeError("attribute must be 8 bytes")
    return bytes(raw)


def _decode_bytes(raw: bytes, tid: bytes) -> bytes:
    return bytes(raw)


def _encode_bytes(value: bytes, tid: bytes) -> bytes:
    return bytes(value)


def _string_decoder(limit: int) -> Callable[[bytes, bytes], str]:
    def decode(raw: bytes, tid: bytes) -> str:
        if len(raw) > limit:
            raise StunDecodeError(f"string attribute longer than {limit} bytes")
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StunDecodeError("string attribute is not UTF-8") from exc

    return decode


def _encode_string(value: str, tid: bytes) -> bytes:
    return value.encode("utf-8")


def _decode_flag(raw: bytes, tid: bytes) -> bool:
    if raw:
        raise StunDecodeError("flag attribute must be empty")
    return True


def _encode_flag(value: bool, tid: bytes) -> bytes:
    return b""


def _decode_error_code(raw: bytes, tid: bytes) -> tuple[int, str]:
    if len(raw) < 4:
        raise StunDecodeError("ERROR-CODE too short")
    _, klass, number = _ERROR_HEAD.unpack_from(raw)
    if not 3 <= (klass & 0x7) <= 6 or number > 99:
        raise StunDecodeError("ERROR-CODE out of range")
    return (klass & 0x7) * 100 + number, _string_decoder(763)(raw[4:], tid)


def _encode_error_code(value: tuple[int, str], tid: bytes) -> bytes:
    code, reason = value
    return _ERROR_HEAD.pack(0, code // 100, code % 100) + reason.encode("utf-8")


def _decode_unknown_attributes(raw: bytes, tid: bytes) -> list[int]:
    if len(raw) % 2:
        raise StunDecodeError("UNKNOWN-ATTRIBUTES length must be even")
    return [v for (v,) in _U16.iter_unpack(raw)]


def _encode_unknown_attributes(value: list[int], tid: bytes) -> bytes:
    return b"".join(_U16.pack(v) for v in value)


def _decode_channel_number(raw: bytes, tid: bytes) -> int:
    # RFC 8656 §18.1: 16-bit number then 16 bits RFFU
    if len(raw) != 4:
        raise StunDecodeError("CHANNEL-NUMBER must be 4 bytes")
    value: int = _U16.unpack_from(raw)[0]
    return value


def _encode_channel_number(value: int, tid: bytes) -> bytes:
    return _U16.pack(value) + b"\x00\x00"


def _decode_first_octet(raw: bytes, tid: bytes) -> int:
    # REQUESTED-TRANSPORT, REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY:
    # one octet then three RFFU octets (RFC 8656 §18.6, §18.7, §18.8)
    if len(raw) != 4:
        raise StunDecodeError("attribute must be 4 bytes")
    return raw[0]


def _encode_first_octet(value: int, tid: bytes) -> bytes:
    return bytes((value, 0, 0, 0))


def _decode_even_port(raw: bytes, tid: bytes) -> bool:
    # RFC 8656 §18.9: one octet whose top bit is R
    if len(raw) != 1 and len(raw) != 4:
        raise StunDecodeError("EVEN-PORT must be 1 byte")
    return bool(raw[0] & 0x80)


def _encode_even_port(value: bool, tid: bytes) -> bytes:
    return b"\x80" if value else b"\x00"


def _decode_address_error_code(raw: bytes, tid: bytes) -> tuple[int, int, str]:
    # RFC 8656 §18.13: family, reserved, class, number, reason
    if len(raw) < 4:
        raise StunDecodeError("ADDRESS-ERROR-CODE too short")
    family = raw[0]
    code = (raw[2] & 0x7) * 100 + raw[3]
    return family, code, _string_decoder(763)(raw[4:], tid)


def _encode_address_error_code(value: tuple[int, int, str], tid: bytes) -> bytes:
    family, code, reason = value
    return bytes((family, 0, code // 100, code % 100)) + reason.encode("utf-8")


def _decode_password_algorithms(raw: bytes, tid: bytes) -> list[tuple[int, bytes]]:
    """RFC 8489 §14.11: (algorithm, parameters) pairs, parameters padded to 4."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 4:
            raise StunDecodeError("truncated PASSWORD-ALGORITHMS")
        alg, length = _U16.unpack_from(raw, offset)[0], _U16.unpack_from(raw, offset + 2)[0]
        start = offset + 4
        if start + length > len(raw) or len(out) >= 16:
            raise StunDecodeError("bad PASSWORD-ALGORITHMS")
        out.append((alg, bytes(raw[start : start + length])))
        offset = start + length + (-length % 4)
    return out


def _encode_password_algorithms(value: list[tuple[int, bytes]], tid: bytes) -> bytes:
    return b"".join(
        _U16.pack(alg) + _U16.pack(len(params)) + params + b"\x00" * (-len(params) % 4)
        for alg, params in value
    )


def _decode_password_algorithm(raw: bytes, tid: bytes) -> tuple[int, bytes]:
    """RFC 8489 §14.12: one algorithm and its parameters."""
    items = _decode_password_algorithms(raw, tid)
    if len(items) != 1:
        raise StunDecodeError("PASSWORD-ALGORITHM must hold exactly one algorithm")
    return items[0]


def _encode_password_algorithm(value: tuple[int, bytes], tid: bytes) -> bytes:
    return _encode_password_algorithms([value], tid)


def _decode_userhash(raw: bytes, tid: bytes) -> bytes:
    if len(raw) != 32:
        raise StunDecodeError("USERHASH must be 32 bytes")
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class AttrCodec:
    """How one attribute type is named, encoded and decoded."""

    name: str
    encode: Callable[[Any, bytes], bytes]
    decode: Callable[[bytes, bytes], Any]


Encoder = Callable[[Any, bytes], bytes]
Decoder = Callable[[bytes, bytes], Any]
_ADDR: tuple[Encoder, Decoder] = (_encode_address, _decode_address)
_XADDR: tuple[Encoder, Decoder] = (_encode_xor_address, _decode_xor_address)
_U32C: tuple[Encoder, Decoder] = (_encode_u32, _decode_u32)
_RAW: tuple[Encoder, Decoder] = (_encode_bytes, _decode_bytes)
_FLAG: tuple[Encoder, Decoder] = (_encode_flag, _decode_flag)
_OCTET: tuple[Encoder, Decoder] = (_encode_first_octet, _decode_first_octet)

_TABLE: dict[Attr, tuple[Encoder, Decoder]] = {
    Attr.MAPPED_ADDRESS: _ADDR,
    Attr.CHANGE_REQUEST: _U32C,
    Attr.USERNAME: (_encode_string, _string_decoder(513)),
    Attr.MESSAGE_INTEGRITY: _RAW,
    Attr.ERROR_CODE: (_encode_error_code, _decode_error_code),
    Attr.UNKNOWN_ATTRIBUTES: (_encode_unknown_attributes, _decode_unknown_attributes),
    Attr.CHANNEL_NUMBER: (_encode_channel_number, _decode_channel_number),
    Attr.LIFETIME: _U32C,
    Attr.XOR_PEER_ADDRESS: _XADDR,
    Attr.DATA: _RAW,
    Attr.REALM: (_encode_string, _string_decoder(763)),
    Attr.NONCE: (_encode_string, _string_decoder(763)),
    Attr.XOR_RELAYED_ADDRESS: _XADDR,
    Attr.REQUESTED_ADDRESS_FAMILY: _OCTET,
    Attr.EVEN_PORT: (_encode_even_port, _decode_even_port),
    Attr.REQUESTED_TRANSPORT: _OCTET,
    Attr.DONT_FRAGMENT: _FLAG,
    Attr.MESSAGE_INTEGRITY_SHA256: _RAW,
    Attr.PASSWORD_ALGORITHM: (_encode_password_algorithm, _decode_password_algorithm),
    Attr.USERHASH: (_encode_bytes, _decode_userhash),
    Attr.XOR_MAPPED_ADDRESS: _XADDR,
    Attr.RESERVATION_TOKEN: (_encode_bytes, _decode_u64_bytes),
    Attr.PRIORITY: _U32C,
    Attr.USE_CANDIDATE: _FLAG,
    Attr.PADDING: _RAW,
    Attr.RESPONSE_PORT: _RAW,
    Attr.CONNECTION_ID: _U32C,
    Attr.ADDITIONAL_ADDRESS_FAMILY: _OCTET,
    Attr.ADDRESS_ERROR_CODE: (_encode_address_error_code, _decode_address_error_code),
    Attr.ADDITIONAL_ADDRESS_FAMILY_DRAFT: _OCTET,
    Attr.ADDRESS_ERROR_CODE_DRAFT: (_encode_address_error_code, _decode_address_error_code),
    Attr.PASSWORD_ALGORITHMS: (_encode_password_algorithms, _decode_password_algorithms),
    Attr.ALTERNATE_DOMAIN: (_encode_string, _string_decoder(763)),
    Attr.ICMP: _RAW,
    Attr.SOFTWARE: (_encode_string, _string_decoder(763)),
    Attr.ALTERNATE_SERVER: _ADDR,
    Attr.TRANSACTION_TRANSMIT_COUNTER: _RAW,
    Attr.CACHE_TIMEOUT: _U32C,
    Attr.FINGERPRINT: _U32C,
    Attr.ICE_CONTROLLED: (_encode_bytes, _decode_u64_bytes),
    Attr.ICE_CONTROLLING: (_encode_bytes, _decode_u64_bytes),
    Attr.RESPONSE_ORIGIN: _ADDR,
    Attr.OTHER_ADDRESS: _ADDR,
}

ATTRIBUTE_CODECS: dict[int, AttrCodec] = {
    a: AttrCodec(a.name.replace("_", "-"), enc, dec) for a, (enc, dec) in _TABLE.items()
}
