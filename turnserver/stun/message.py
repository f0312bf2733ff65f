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

from turnserver.stun.attributes import ATTRIBUTE_CODECS, is_comprehension_required
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
# 16,000 empty attributes costs 33 ms to walk (issue: unauthenticated CPU amplification).
MAX_ATTRIBUTES = 64


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
    klass = ((value & 0x0010) >> 4) | ((value & 0x0100) >> 7)
    return method, MessageClass(klass)


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

    def has(self, attr_type: int) -> bool:
        """True when the attribute is present."""
        return any(t == attr_type for t, _ in self.attributes)

    def get_raw(self, attr_type: int) -> bytes | None:
        """The first raw value of the attribute, or None."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def get(self, attr_type: int) -> Any:
        """The first value of the attribute, decoded; None when absent."""
        raw = self.get_raw(attr_type)
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
        seen: list[int] = []
        for t, _ in self.attributes:
            if is_comprehension_required(t) and t not in ATTRIBUTE_CODECS and t not in seen:
                seen.append(t)
        return seen


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
    msg = StunMessage(method, klass, tid, raw=bytes(data), magic_cookie=cookie == MAGIC_COOKIE)
    attributes = msg.attributes
    offset = HEADER_LENGTH
    end = len(data)
    after_integrity = False
    count = 0
    while offset < end:
        count += 1
        if count > MAX_ATTRIBUTES:
            raise StunDecodeError(f"more than {MAX_ATTRIBUTES} attributes")
        if end - offset < 4:
            raise StunDecodeError("truncated attribute header")
        attr_type, attr_len = _ATTR_HEAD.unpack_from(data, offset)
        value_start = offset + 4
        value_end = value_start + attr_len
        if value_end > end:
            raise StunDecodeError(f"attribute 0x{attr_type:04x} overruns the message")
        if msg.fingerprint_offset >= 0:
            raise StunDecodeError("FINGERPRINT must be the last attribute")
        value = bytes(data[value_start:value_end])
        if attr_type == Attr.FINGERPRINT:
            if attr_len != 4:
                raise StunDecodeError("FINGERPRINT must be 4 bytes")
            msg.fingerprint_offset = offset
            expected = (binascii.crc32(data[:offset]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if _U32.unpack(value)[0] != expected:
                raise StunDecodeError("FINGERPRINT mismatch")
            attributes.append((attr_type, value))
        elif attr_type == Attr.MESSAGE_INTEGRITY:
            if attr_len != 20:
                raise StunDecodeError("MESSAGE-INTEGRITY must be 20 bytes")
            if not after_integrity:
                msg.integrity_offset = offset
                attributes.append((attr_type, value))
                after_integrity = True
        elif attr_type == Attr.MESSAGE_INTEGRITY_SHA256:
            if attr_len < 16 or attr_len > 32 or attr_len % 4:
                raise StunDecodeError("MESSAGE-INTEGRITY-SHA256 has a bad length")
            if msg.integrity_sha256_offset < 0:
                msg.integrity_sha256_offset = offset
                attributes.append((attr_type, value))
                after_integrity = True
        elif not after_integrity:
            # RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored
            attributes.append((attr_type, value))
        offset = value_end + (-attr_len % 4)
    if offset != end:
        raise StunDecodeError("attribute padding overruns the message")
    return msg


def _encode_attribute(attr_type: int, value: Any, tid: bytes) -> bytes:
    codec = ATTRIBUTE_CODECS.get(attr_type)
    if codec is None or isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)  # raw values pass through for every type
    else:
        raw = codec.encode(value, tid)
    return _ATTR_HEAD.pack(attr_type, len(raw)) + raw + b"\x00" * (-len(raw) % 4)


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
) -> bytes:
    """Build a message; MESSAGE-INTEGRITY (or -SHA256, RFC 8489 §14.6) and FINGERPRINT
    are appended when asked."""
    body = b"".join(_encode_attribute(t, v, transaction_id) for t, v in attributes)
    mtype = message_type(method, message_class)
    if integrity_key is not None and integrity_sha256:
        header = _HEADER.pack(mtype, len(body) + 36, magic_cookie, transaction_id)
        mac = hmac.digest(integrity_key, header + body, "sha256")
        body += _ATTR_HEAD.pack(Attr.MESSAGE_INTEGRITY_SHA256, 32) + mac
    elif integrity_key is not None:
        header = _HEADER.pack(mtype, len(body) + 24, magic_cookie, transaction_id)
        mac = hmac.digest(integrity_key, header + body, "sha1")
        body += _ATTR_HEAD.pack(Attr.MESSAGE_INTEGRITY, 20) + mac
    if fingerprint:
        header = _HEADER.pack(mtype, len(body) + 8, magic_cookie, transaction_id)
        crc = (binascii.crc32(header + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _ATTR_HEAD.pack(Attr.FINGERPRINT, 4) + _U32.pack(crc)
    return _HEADER.pack(mtype, len(body), magic_cookie, transaction_id) + body


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
        mac = hmac.digest(key, raw[:2] + adjusted + raw[4:offset], "sha1")
        return hmac.compare_digest(mac, expected)
    if msg.integrity_sha256_offset >= 0:
        offset = msg.integrity_sha256_offset
        size = _ATTR_HEAD.unpack_from(raw, offset)[1]
        expected = raw[offset + 4 : offset + 4 + size]
        adjusted = _LENGTH.pack(offset + 4 + size - HEADER_LENGTH)
        mac256 = hmac.digest(key, raw[:2] + adjusted + raw[4:offset], "sha256")
        return hmac.compare_digest(mac256[:size], expected)
    return False
