"""Stream framing: every message fed whole, one byte at a time, and with trailing bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnserver.stun import StunDecodeError, encode_channel_data
from turnserver.stun.framing import StreamFramer

DATA = Path(__file__).parent.parent / "data"


def _messages() -> list[bytes]:
    out = []
    for folder in ("turn-udp-chromium", "turn-udp-uclient"):
        index = json.loads((DATA / folder / "index.json").read_text())
        for m in index["messages"]:
            raw = (DATA / folder / m["file"]).read_bytes()
            if 0x40 <= raw[0] <= 0x7F:  # ChannelData: re-frame with stream padding
                length = int.from_bytes(raw[2:4], "big")
                raw = encode_channel_data(
                    int.from_bytes(raw[:2], "big"), raw[4 : 4 + length], pad=True
                )
            out.append(raw)
    out.append(encode_channel_data(0x4001, b"odd", pad=True))
    out.append(encode_channel_data(0x4002, b"", pad=True))
    return out


MESSAGES = _messages()


def _unpadded(frame: bytes) -> bytes:
    if 0x40 <= frame[0] <= 0x7F:
        return frame[: 4 + int.from_bytes(frame[2:4], "big")]
    return frame


def test_whole_messages() -> None:
    framer = StreamFramer()
    for msg in MESSAGES:
        assert framer.feed(msg) == [_unpadded(msg)]
    assert framer.buffered == 0


def test_one_byte_at_a_time() -> None:
    framer = StreamFramer()
    stream = b"".join(MESSAGES)
    frames: list[bytes] = []
    for i in range(len(stream)):
        frames += framer.feed(stream[i : i + 1])
    assert frames == [_unpadded(m) for m in MESSAGES]


def test_all_at_once_with_trailing_bytes() -> None:
    framer = StreamFramer()
    trailing = MESSAGES[0][:7]
    frames = framer.feed(b"".join(MESSAGES) + trailing)
    assert frames == [_unpadded(m) for m in MESSAGES]
    assert framer.buffered == 7
    assert framer.feed(MESSAGES[0][7:]) == [MESSAGES[0]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=50))
def test_any_split(cuts: list[int]) -> None:
    stream = b"".join(MESSAGES)
    framer = StreamFramer()
    frames: list[bytes] = []
    pos = 0
    for cut in cuts:
        frames += framer.feed(stream[pos : pos + cut])
        pos += cut
    frames += framer.feed(stream[pos:])
    assert frames == [_unpadded(m) for m in MESSAGES]


@pytest.mark.parametrize(
    "garbage", [b"\x80\x00\x00\x00", b"\xff" * 10, b"\x16\x03\x01\x02\x01\x01\x00\x01\xfc\x03\x03"]
)
def test_garbage_is_an_error(garbage: bytes) -> None:
    with pytest.raises(StunDecodeError):
        StreamFramer().feed(garbage)


def test_oversized_frames_are_refused() -> None:
    framer = StreamFramer(limit=1000)
    with pytest.raises(StunDecodeError, match="exceeds"):
        framer.feed(b"\x40\x00\x10\x00")
    with pytest.raises(StunDecodeError, match="multiple of 4"):
        StreamFramer().feed(b"\x00\x01\x00\x03" + bytes(16))
