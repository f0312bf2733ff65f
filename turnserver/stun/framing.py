"""Splitting a TCP/TLS byte stream into STUN messages and ChannelData (RFC 8656 §12.5).

Messages arrive back to back and split across reads in any way. STUN messages carry
their length in the header; ChannelData is padded to a multiple of 4 over streams.
The buffer is bounded: anything that is neither STUN nor ChannelData, or longer than
one message can be, raises StunDecodeError and the connection should be closed.
"""

from __future__ import annotations

from turnserver.stun.constants import HEADER_LENGTH
from turnserver.stun.errors import StunDecodeError

MAX_FRAME = HEADER_LENGTH + 0xFFFF + 3


class StreamFramer:
    """Accumulates stream bytes and yields complete frames (padding stripped)."""

    __slots__ = ("_buf", "_pos", "limit")

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.limit = limit

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._pos

    def append(self, data: bytes) -> None:
        """Add received bytes."""
        self._buf += data

    def pop(self) -> bytes | None:
        """The next complete frame (ChannelData padding stripped), or None for now."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            return None
        first = buf[pos]
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if first < 0x40:  # STUN: top two bits 00
            if length % 4:
                raise StunDecodeError("STUN length over a stream is not a multiple of 4")
            size = HEADER_LENGTH + length
            padded = size
        elif first < 0x80:  # ChannelData: top two bits 01
            size = 4 + length
            padded = size + (-length % 4)
        else:
            raise StunDecodeError(f"stream byte 0x{first:02x} starts neither STUN nor ChannelData")
        if padded > self.limit:
            raise StunDecodeError(f"frame of {padded} bytes exceeds {self.limit}")
        if avail < padded:
            return None
        frame = bytes(buf[pos : pos + size])
        pos += padded
        if pos == len(buf):
            buf.clear()
            pos = 0
        elif pos > 65536:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return frame

    def take_rest(self) -> bytes:
        """Everything buffered and not yet framed (the stream stops being TURN here)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every complete frame now available, in order."""
        self.append(data)
        frames: list[bytes] = []
        while (frame := self.pop()) is not None:
            frames.append(frame)
        return frames
