"""TCP and TLS client connections (RFC 8656 §3.1, §12.5).

Each connection is its own 5-tuple; its allocation dies with it. Frames come out of
a bounded StreamFramer; ChannelData takes the same fast path as over UDP. Writes
that would pile up beyond a high-water mark are dropped and counted, as UDP would.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, cast

from turnserver.core import events as ev
from turnserver.core.allocation import Allocation
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.stun.attributes import Address
from turnserver.stun.channeldata import CHANNEL_HEADER
from turnserver.stun.constants import MessageClass, Method
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.framing import StreamFramer
from turnserver.stun.message import message_type

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime
    from turnserver.io.tcp_relay import PeerTcpConnection

WRITE_HIGH_WATER = 256 * 1024
_CONNECTION_BIND_REQUEST = message_type(Method.CONNECTION_BIND, MessageClass.REQUEST).to_bytes(
    2, "big"
)
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection from a client."""

    def __init__(self, runtime: ServerRuntime, local: Address, kind: ClientTransport) -> None:
        self.runtime = runtime
        self.local = local
        self.kind = kind
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.five_tuple: FiveTuple | None = None
        self.alloc: Allocation | None = None
        self.last_active = 0.0
        self.close_reason = "client_closed"
        self.paused = False
        self.pipe: PeerTcpConnection | None = None  # set once ConnectionBind succeeds

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

        peer = transport.get_extra_info("peername")
        self.five_tuple = FiveTuple((peer[0], peer[1]), self.local, self.kind)
        self.last_active = self.runtime.loop.time()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.runtime.stream_opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.runtime.loop.time()
        pipe = self.pipe
        if pipe is not None:  # RFC 6062 data connection: raw bytes to the peer
            if pipe.transport is not None:
                pipe.transport.write(data)
            return
        framer = self.framer
        framer.append(data)
        runtime = self.runtime
        ft = self.five_tuple
        assert ft is not None
        while True:
            try:
                frame = framer.pop()
            except StunDecodeError as exc:
                self.close("framing_error", str(exc))
                break
            if frame is None:
                break
            if frame[0] >= 0x40:
                self._channel_data(frame)
                continue
            started = perf_counter()
            response = runtime.core.handle_message(frame, ft, runtime.now())
            if response is not None and self.transport is not None:
                self.transport.write(response)
            runtime.after_core_call(perf_counter() - started)
            if self.pipe is not None:  # ConnectionBind made this a data connection
                rest = framer.take_rest()
                if rest and self.pipe.transport is not None:
                    self.pipe.transport.write(rest)
                break

    def _channel_data(self, frame: bytes) -> None:
        runtime = self.runtime
        number = (frame[0] << 8) | frame[1]
        runtime.core.relay_channel_data(self.alloc, number, frame[4:], runtime.now())

    def pause_writing(self) -> None:
        self.paused = True
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.pipe is not None:
            self.pipe.close(graceful=True)

        self.runtime.stream_closed(self, self.close_reason)

    # ---- ClientSink ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is None or self.paused:
            self.runtime.core.stats.dropped_rate_limited += 1
            return
        self.transport.write(data)

    def send_channel_data(self, number: int, payload: bytes) -> None:
        if self.transport is None or self.paused:
            self.runtime.core.stats.dropped_rate_limited += 1
            return
        n = len(payload)
        # RFC 8656 §12.5: pad ChannelData to a multiple of 4 over streams. One write, so
        # that TLS puts the frame in one record (some clients read one record per message).
        self.transport.write(b"".join((CHANNEL_HEADER.pack(number, n), payload, _PAD[n & 3])))

    # ---- helpers ---------------------------------------------------------------------

    def close(self, reason: str, detail: str = "") -> None:
        """Close the connection, reporting why."""
        if self.transport is None:
            return
        self.close_reason = reason
        if self.five_tuple is not None and reason != "client_closed":
            self.runtime.emit(ev.ConnectionClosed(self.five_tuple, reason, detail))
        if reason in ("peer_closed", "shutdown"):
            self.transport.close()  # flush what the peer sent; TLS sends close_notify
        else:
            self.transport.abort()


__all__ = ["StreamConnection"]
