"""STUN message encoding and decoding (RFC 8489 §5, §14).

`decode_message` parses a whole message and keeps each attribute's raw value;
typed values are decoded on demand through the attribute table, so the relay
path pays only for what a handler reads. Every failure is a StunDecodeError.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from turnserver.stun.attributes import ATTRIBUTE_CODECS
from turnserver.stun.constants import (
    FINGERPRINT_XOR,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    Attr,
    MessageClass,
    PasswordAlgorithm,
)
from turnserver.stun.errors import StunDecodeError

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEAD = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_LENGTH = struct.Struct("!H")

MAX_MESSAGE_SIZE = 65535 + HEADER_LENGTH
# No real client sends more than ~20 attributes; without a cap a 64 KB datagram of
# 16,000 empty attributes costs 33 ms to walk: an unauthenticated
# CPU amplification.
MAX_ATTRIBUTES = 64
_CLASSES = tuple(MessageClass(k) for k in range(4))
_SPECIAL = frozenset({Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT})


def message_type(method: int, message_class: int) -> int:
    """Interleave method and class bits into the 14-bit message type (RFC 8489 §5)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 1) << 4)
        | ((message_class & 2) << 7)
    )


def split_message_type(value: int) -> tuple[int, MessageClass]:
    """Return (method, class) of a 14-bit message type."""
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    return method, _CLASSES[((value & 0x0010) >> 4) | ((value & 0x0100) >> 7)]


@dataclass(slots=True)
class StunMessage:
    """A decoded STUN message; attribute values stay raw until asked for."""

    method: int
    message_class: MessageClass
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    raw: bytes = b""
    magic_cookie: bool = True
    integrity_offset: int = -1
    integrity_sha256_offset: int = -1
    fingerprint_offset: int = -1
    # the first value of each type: handlers ask for ~10 attributes a request, and a dict
    # lookup is what a list scan per question cost (benchmarks/README.md)
    first: dict[int, bytes] = field(default_factory=dict)

    def has(self, attr_type: int) -> bool:
        """True when the attribute is present."""
        return attr_type in self.first

    def get(self, attr_type: int) -> Any:
        """The first value of the attribute, decoded; None when absent."""
        raw = self.first.get(attr_type)
        if raw is None:
            return None
        codec = ATTRIBUTE_CODECS.get(attr_type)
        if codec is None:
            return raw
        return codec.decode(raw, self.transaction_id)

    def get_all(self, attr_type: int) -> list[Any]:
        """Every value of a repeated attribute, decoded, in order."""
        codec = ATTRIBUTE_CODECS.get(attr_type)
        out: list[Any] = []
        for t, v in self.attributes:
            if t == attr_type:
                out.append(codec.decode(v, self.transaction_id) if codec else v)
        return out

    def unknown_required_attributes(self) -> list[int]:
        """Comprehension-required attribute types we do not know (RFC 8489 §7.3.1)."""
        return [t for t in self.first if t < 0x8000 and t not in ATTRIBUTE_CODECS]


def is_stun(data: bytes) -> bool:
    """Cheap check: top two bits zero, room for a header, magic cookie present."""
    return len(data) >= HEADER_LENGTH and data[0] < 0x40 and data[4:8] == b"\x21\x12\xa4\x42"


def decode_message(data: bytes) -> StunMessage:
    """Parse one complete STUN message; raise StunDecodeError on anything malformed."""
    if len(data) < HEADER_LENGTH:
        raise StunDecodeError("shorter than a STUN header")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise StunDecodeError("top two bits of a STUN message must be zero")
    if length % 4:
        raise StunDecodeError("STUN message length is not a multiple of 4")
    if HEADER_LENGTH + length != len(data):
        raise StunDecodeError(
            f"STUN length field {length} does not match {len(data) - HEADER_LENGTH} bytes"
        )
    method, klass = split_message_type(msg_type)
    data = bytes(data)
    msg = StunMessage(method, klass, tid, raw=data, magic_cookie=cookie == MAGIC_COOKIE)
    attributes = msg.attributes
    first = msg.first
    offset = HEADER_LENGTH
    end = len(data)
    after_integrity = False
    count = 0
    unpack_head = _ATTR_HEAD.unpack_from
    while offset < end:
        count += 1
        if count > MAX_ATTRIBUTES:
            raise StunDecodeError(f"more than {MAX_ATTRIBUTES} attributes")
        if end - offset < 4:
            raise StunDecodeError("truncated attribute header")
        attr_type, attr_len = unpack_head(data, offset)
        value_start = offset + 4
        value_end = value_start + attr_len
        if value_end > end:
            raise StunDecodeError(f"attribute 0x{attr_type:04x} overruns the message")
        if msg.fingerprint_offset >= 0:
            raise StunDecodeError("FINGERPRINT must be the last attribute")
        value = data[value_start:value_end]
        if attr_type not in _SPECIAL:  # the common case: an ordinary attribute
            if not after_integrity:  # RFC 8489 §14.5: later ones are ignored
                attributes.append((attr_type, value))
                if attr_type not in first:
                    first[attr_type] = value
        elif attr_type == Attr.FINGERPRINT:
            if attr_len != 4:
                raise StunDecodeError("FINGERPRINT must be 4 bytes")
            msg.fingerprint_offset = offset
            expected = (binascii.crc32(data[:offset]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if _U32.unpack(value)[0] != expected:
                raise StunDecodeError("FINGERPRINT mismatch")
            attributes.append((attr_type, value))
            first.setdefault(attr_type, value)
        elif attr_type == Attr.MESSAGE_INTEGRITY:
            if attr_len != 20:
                raise StunDecodeError("MESSAGE-INTEGRITY must be 20 bytes")
            if not after_integrity:
                msg.integrity_offset = offset
                attributes.append((attr_type, value))
                first.setdefault(attr_type, value)
                after_integrity = True
        elif attr_type == Attr.MESSAGE_INTEGRITY_SHA256:
            if attr_len < 16 or attr_len > 32 or attr_len % 4:
                raise StunDecodeError("MESSAGE-INTEGRITY-SHA256 has a bad length")
            if msg.integrity_sha256_offset < 0:
                msg.integrity_sha256_offset = offset
                attributes.append((attr_type, value))
                first.setdefault(attr_type, value)
                after_integrity = True
        offset = value_end + (-attr_len % 4)
    if offset != end:
        raise StunDecodeError("attribute padding overruns the message")
    return msg


_PADDING = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")


class _HmacKey:
    """HMAC (RFC 2104) with the key's inner and outer hash states computed once: a
    message then costs two state copies and two short hashes, where the one-shot
    hmac.digest sets up a fresh OpenSSL context each call (benchmarks/README.md); a TURN
    request is verified and its answer signed with the same long-term key, a few times
    per allocation."""

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes, name: str) -> None:
        block = 64  # both SHA-1 and SHA-256
        if len(key) > block:
            key = hashlib.new(name, key).digest()
        key = key.ljust(block, b"\x00")
        self.inner = hashlib.new(name, key.translate(_IPAD))
        self.outer = hashlib.new(name, key.translate(_OPAD))

    def mac(self, *parts: bytes) -> bytes:
        inner = self.inner.copy()
        for part in parts:
            inner.update(part)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_IPAD = bytes(b ^ 0x36 for b in range(256))  # RFC 2104 ipad/opad as translate tables
_OPAD = bytes(b ^ 0x5C for b in range(256))
_HMAC_KEYS: dict[tuple[bytes, str], _HmacKey] = {}
_HMAC_KEYS_MAX = 20_000  # about 8 MB at most; emptied when full


def hmac_digest(key: bytes, name: str, *parts: bytes) -> bytes:
    """HMAC-`name` of the concatenated parts under `key` (sha1 or sha256)."""
    state = _HMAC_KEYS.get((key, name))
    if state is None:
        if len(_HMAC_KEYS) >= _HMAC_KEYS_MAX:
            _HMAC_KEYS.clear()
        state = _HMAC_KEYS[(key, name)] = _HmacKey(key, name)
    return state.mac(*parts)


def encode_message(
    method: int,
    message_class: int,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, Any]] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
    magic_cookie: int = MAGIC_COOKIE,
    integrity_sha256: bool = False,
    encoded: bytes = b"",
) -> bytes:
    """Build a message; MESSAGE-INTEGRITY (or -SHA256, RFC 8489 §14.6) and FINGERPRINT
    are appended when asked. `encoded`: attributes already encoded (encode_attributes),
    placed first; for parts of an answer that do not change between requests."""
    codecs = ATTRIBUTE_CODECS
    pack_head = _ATTR_HEAD.pack
    parts: list[bytes] = [encoded]
    for attr_type, value in attributes:
        codec = codecs.get(attr_type)
        if codec is None or isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)  # raw values pass through for every type
        else:
            raw = codec.encode(value, transaction_id)
        n = len(raw)
        parts.append(pack_head(attr_type, n))
        parts.append(raw)
        if n % 4:
            parts.append(_PADDING[-n % 4])
    body = b"".join(parts)
    mtype = message_type(method, message_class)
    if integrity_key is not None and integrity_sha256:
        header = _HEADER.pack(mtype, len(body) + 36, magic_cookie, transaction_id)
        mac = hmac_digest(integrity_key, "sha256", header, body)
        body += _ATTR_HEAD.pack(Attr.MESSAGE_INTEGRITY_SHA256, 32) + mac
    elif integrity_key is not None:
        header = _HEADER.pack(mtype, len(body) + 24, magic_cookie, transaction_id)
        mac = hmac_digest(integrity_key, "sha1", header, body)
        body += _MI_HEAD + mac
    if fingerprint:
        header = _HEADER.pack(mtype, len(body) + 8, magic_cookie, transaction_id)
        crc = (binascii.crc32(body, binascii.crc32(header)) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _ATTR_HEAD.pack(Attr.FINGERPRINT, 4) + _U32.pack(crc)
    return _HEADER.pack(mtype, len(body), magic_cookie, transaction_id) + body


_MI_HEAD = _ATTR_HEAD.pack(Attr.MESSAGE_INTEGRITY, 20)


def encode_attributes(attributes: Iterable[tuple[int, Any]]) -> bytes:
    """Attributes that do not depend on the transaction id, encoded once, for the
    `encoded` argument of encode_message."""
    return encode_message(0, 0, bytes(12), attributes)[HEADER_LENGTH:]


def long_term_key(
    username: str, realm: str, password: str, algorithm: int = PasswordAlgorithm.MD5
) -> bytes:
    """RFC 8489 §9.2.2: MD5 or SHA-256 of username ":" realm ":" password."""
    text = f"{username}:{realm}:{password}".encode()
    if algorithm == PasswordAlgorithm.SHA256:
        return hashlib.sha256(text).digest()
    return hashlib.md5(text, usedforsecurity=False).digest()


def userhash(username: str, realm: str) -> bytes:
    """RFC 8489 §14.4 USERHASH: SHA-256(username ":" realm)."""
    return hashlib.sha256(f"{username}:{realm}".encode()).digest()


def verify_integrity(msg: StunMessage, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY (or -SHA256) in constant time (RFC 8489 §14.5, §14.6)."""
    raw = msg.raw
    if msg.integrity_offset >= 0:
        offset = msg.integrity_offset
        expected = raw[offset + 4 : offset + 24]
        adjusted = _LENGTH.pack(offset + 24 - HEADER_LENGTH)
        mac = hmac_digest(key, "sha1", raw[:2], adjusted, raw[4:offset])
        return hmac.compare_digest(mac, expected)
    if msg.integrity_sha256_offset >= 0:
        offset = msg.integrity_sha256_offset
        size = _ATTR_HEAD.unpack_from(raw, offset)[1]
        expected = raw[offset + 4 : offset + 4 + size]
        adjusted = _LENGTH.pack(offset + 4 + size - HEADER_LENGTH)
        mac256 = hmac_digest(key, "sha256", raw[:2], adjusted, raw[4:offset])
        return hmac.compare_digest(mac256[:size], expected)
    return False
