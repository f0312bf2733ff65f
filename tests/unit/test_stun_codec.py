"""Codec: RFC 5769 vectors, captured real-client traffic, malformed input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from turnserver.stun import (
    ATTRIBUTE_CODECS,
    Attr,
    MessageClass,
    Method,
    StunDecodeError,
    decode_channel_data,
    decode_message,
    encode_channel_data,
    encode_message,
    is_channel_data,
    long_term_key,
    verify_integrity,
)

DATA = Path(__file__).parent.parent / "data"

# RFC 5769 §2.1
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
# RFC 5769 §2.2
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# RFC 5769 §2.3
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
# RFC 5769 §2.4
SAMPLE_LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b39353464364f4c33346f4c394653547679363473410"
    "014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)
SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"


def test_rfc5769_sample_request() -> None:
    msg = decode_message(SAMPLE_REQUEST)
    assert msg.method == Method.BINDING and msg.message_class == MessageClass.REQUEST
    assert msg.get(Attr.SOFTWARE) == "STUN test client"
    assert msg.get(Attr.USERNAME) == "evtj:h6vY"
    assert msg.get(Attr.PRIORITY) == 0x6E0001FF
    assert verify_integrity(msg, SHORT_TERM_PASSWORD)
    assert not verify_integrity(msg, b"wrong")


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses(vector: bytes, address: tuple[str, int]) -> None:
    msg = decode_message(vector)
    assert msg.message_class == MessageClass.SUCCESS
    assert msg.get(Attr.XOR_MAPPED_ADDRESS) == address
    assert msg.get(Attr.SOFTWARE) == "test vector"
    assert verify_integrity(msg, SHORT_TERM_PASSWORD)
    # Our encoder produces the same integrity and fingerprint (padding aside).
    again = encode_message(
        msg.method,
        msg.message_class,
        msg.transaction_id,
        [(Attr.SOFTWARE, "test vector"), (Attr.XOR_MAPPED_ADDRESS, address)],
        integrity_key=SHORT_TERM_PASSWORD,
        fingerprint=True,
    )
    assert verify_integrity(decode_message(again), SHORT_TERM_PASSWORD)
    assert again[-12:-8] != b""  # decodes with a valid FINGERPRINT


def test_rfc5769_long_term_request() -> None:
    msg = decode_message(SAMPLE_LONG_TERM_REQUEST)
    username = msg.get(Attr.USERNAME)
    assert username == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert msg.get(Attr.REALM) == "example.org"
    assert msg.get(Attr.NONCE) == "f//499k954d6OL34oL9FSTvy64sA"
    # "TheMatrIX" is the SASLprep'd password of RFC 5769 §2.4
    assert verify_integrity(msg, long_term_key(username, "example.org", "TheMatrIX"))
    assert not verify_integrity(msg, long_term_key(username, "example.org", "thematrix"))


def test_fingerprint_mismatch_is_rejected() -> None:
    bad = bytearray(SAMPLE_IPV4_RESPONSE)
    bad[-1] ^= 1
    with pytest.raises(StunDecodeError, match="FINGERPRINT"):
        decode_message(bytes(bad))


def _captured(folder: str) -> list[tuple[str, bytes]]:
    index = json.loads((DATA / folder / "index.json").read_text())
    return [(m["file"], (DATA / folder / m["file"]).read_bytes()) for m in index["messages"]]


def _rest_key(username: str) -> bytes:
    password = base64.b64encode(
        hmac.new(b"capsecret", username.encode(), hashlib.sha1).digest()
    ).decode()
    return long_term_key(username, "example.org", password)


@pytest.mark.parametrize("folder", ["turn-udp-chromium", "turn-udp-uclient"])
def test_captured_traffic_decodes_and_verifies(folder: str) -> None:
    seen_integrity = 0
    for name, data in _captured(folder):
        if is_channel_data(data):
            number, payload = decode_channel_data(data)
            assert 0x4000 <= number <= 0x7FFF
            assert encode_channel_data(number, bytes(payload)) == data[: 4 + len(payload)]
            continue
        msg = decode_message(data)
        assert msg.magic_cookie, name
        username = msg.get(Attr.USERNAME)
        if username is not None and msg.integrity_offset >= 0:
            assert verify_integrity(msg, _rest_key(username)), name
            seen_integrity += 1
    assert seen_integrity > 10


@pytest.mark.parametrize("folder", ["turn-udp-chromium", "turn-udp-uclient"])
def test_captured_requests_reencode_byte_for_byte(folder: str) -> None:
    for name, data in _captured(folder):
        if is_channel_data(data) or "to-server" not in name:
            continue
        msg = decode_message(data)
        attrs = [
            (t, ATTRIBUTE_CODECS[t].decode(v, msg.transaction_id) if t in ATTRIBUTE_CODECS else v)
            for t, v in msg.attributes
            if t not in (Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
        ]
        username = msg.get(Attr.USERNAME)
        key = _rest_key(username) if username and msg.integrity_offset >= 0 else None
        again = encode_message(
            msg.method,
            msg.message_class,
            msg.transaction_id,
            attrs,
            integrity_key=key,
            fingerprint=msg.fingerprint_offset >= 0,
        )
        assert again == data, name


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x00",
        b"\xc0\x01\x00\x00" + b"\x21\x12\xa4\x42" + bytes(12),  # top bits set
        b"\x00\x01\x00\x03" + b"\x21\x12\xa4\x42" + bytes(12) + b"abc",  # length % 4
        b"\x00\x01\x00\x08" + b"\x21\x12\xa4\x42" + bytes(12),  # length overruns
        b"\x00\x01\x00\x04" + b"\x21\x12\xa4\x42" + bytes(12) + b"\x00\x06\x00\x08",
        b"\x00\x01\x00\x08" + b"\x21\x12\xa4\x42" + bytes(12) + b"\x00\x08\x00\x04abcd",
    ],
)
def test_malformed_messages_raise_decode_error(data: bytes) -> None:
    with pytest.raises(StunDecodeError):
        decode_message(data)


def test_attribute_value_errors_are_decode_errors() -> None:
    tid = bytes(12)
    msg = decode_message(
        encode_message(Method.ALLOCATE, MessageClass.REQUEST, tid, [(Attr.LIFETIME, b"\x00\x01")])
    )
    with pytest.raises(StunDecodeError):
        msg.get(Attr.LIFETIME)
    msg = decode_message(
        encode_message(
            Method.ALLOCATE,
            MessageClass.REQUEST,
            tid,
            [(Attr.XOR_PEER_ADDRESS, b"\x00\x03\x00\x00abcd")],
        )
    )
    with pytest.raises(StunDecodeError):
        msg.get(Attr.XOR_PEER_ADDRESS)


def test_attributes_after_integrity_are_ignored() -> None:
    tid = bytes(range(12))
    data = encode_message(
        Method.BINDING, MessageClass.REQUEST, tid, [(Attr.USERNAME, "u")], integrity_key=b"k"
    )
    data = bytearray(data + b"\x80\x22\x00\x04abcd")
    data[2:4] = (len(data) - 20).to_bytes(2, "big")
    msg = decode_message(bytes(data))
    assert not msg.has(Attr.SOFTWARE)
    assert verify_integrity(msg, b"k")


def test_unknown_comprehension_required_attributes() -> None:
    tid = bytes(12)
    msg = decode_message(
        encode_message(
            Method.BINDING,
            MessageClass.REQUEST,
            tid,
            [(0x7777, b"x"), (0xC057, b"\x00\x01\x00\x00")],
        )
    )
    assert msg.unknown_required_attributes() == [0x7777]


def test_channel_data_padding() -> None:
    assert encode_channel_data(0x4001, b"abc", pad=True) == b"\x40\x01\x00\x03abc\x00"
    assert decode_channel_data(b"\x40\x01\x00\x03abc\x00") == (0x4001, b"abc")
    with pytest.raises(StunDecodeError):
        decode_channel_data(b"\x40\x01\x00\x09abc")
    with pytest.raises(StunDecodeError):
        decode_channel_data(b"\x80\x01\x00\x00")


def test_precomputed_hmac_matches_the_standard_library() -> None:
    """hmac_digest keeps each key's inner/outer states (RFC 2104); it must give exactly
    hmac.digest's answer for short, block-sized and over-long keys, in parts or whole."""
    import hmac as std_hmac
    import os as _os

    from turnserver.stun.message import hmac_digest

    for size in (0, 1, 16, 20, 32, 63, 64, 65, 200):
        key = _os.urandom(size)
        for name in ("sha1", "sha256"):
            msg = _os.urandom(97)
            want = std_hmac.digest(key, msg, name)
            assert hmac_digest(key, name, msg) == want
            assert hmac_digest(key, name, msg[:10], msg[10:50], msg[50:]) == want
            assert hmac_digest(key, name, msg) == want  # cached state is not consumed
