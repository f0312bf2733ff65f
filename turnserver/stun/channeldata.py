"""ChannelData messages (RFC 8656 §12.4)."""

from __future__ import annotations

import struct

from turnserver.stun.errors import StunDecodeError

CHANNEL_HEADER = struct.Struct("!HH")
MIN_CHANNEL = 0x4000
MAX_CHANNEL = 0x7FFF  # RFC 8656 §12: 0x4000-0x4FFF, RFC 5766 allowed up to 0x7FFF


def is_channel_data(data: bytes) -> bool:
    """First two bits 0b01 mark ChannelData (RFC 8656 §12, RFC 7983 demux)."""
    return bool(data) and 0x40 <= data[0] <= 0x7F


def is_valid_channel_number(number: int) -> bool:
    """Numbers a client may bind; we accept RFC 5766's whole range as clients use it."""
    return MIN_CHANNEL <= number <= MAX_CHANNEL


def decode_channel_data(data: bytes) -> tuple[int, bytes]:
    """Return (channel number, application data); padding after the data is ignored."""
    if len(data) < 4:
        raise StunDecodeError("ChannelData shorter than its header")
    number, length = CHANNEL_HEADER.unpack_from(data)
    if not is_valid_channel_number(number):
        raise StunDecodeError(f"ChannelData channel 0x{number:04x} out of range")
    if 4 + length > len(data):
        raise StunDecodeError("ChannelData length exceeds the datagram")
    return number, data[4 : 4 + length]


def encode_channel_data(number: int, payload: bytes, *, pad: bool = False) -> bytes:
    """Build a ChannelData message; streams pad to a multiple of 4 (RFC 8656 §12.5)."""
    header = CHANNEL_HEADER.pack(number, len(payload))
    if pad and len(payload) % 4:
        return b"".join((header, payload, b"\x00" * (-len(payload) % 4)))
    return header + payload
