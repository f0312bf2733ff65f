"""TCP and TLS client connections (RFC 8656 §3.1, §12.5).

Each connection is its own 5-tuple; its allocation dies with it. Frames come out of
a bounded StreamFramer; ChannelData takes the same fast path as over UDP.

What one connection may cost is bounded: it must finish each frame within
`frame_timeout` and get a successful answer within `first_request_timeout`; when its
write buffer passes the high-water mark the server stops reading from it (so a client
that never reads cannot grow memory) and closes it if the buffer stays full for
`write_timeout`. TLS handshakes run through `loop.start_tls`, so their failures and
timeouts are seen, counted by reason and closed like any other connection.

On a listener with `proxy=` (io/proxy_protocol.py) a connection is held apart until its
PROXY header is read: only trusted proxies may connect, the header must come within
`proxy_header_timeout`, and the client it names is the connection's 5-tuple from then
on (caps, rate limits, XOR-MAPPED-ADDRESS, logs). TLS begins after the header.
"""

from __future__ import annotations

import asyncio
import ssl
from time import perf_counter
from typing import Any, cast

from turnserver.core import events as ev
from turnserver.core.allocation import Allocation
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.io.proxy_protocol import ProxyHeaderError, parse_proxy_header
from turnserver.io.runtime_view import PeerPipe, RuntimeView
from turnserver.stun.attributes import Address
from turnserver.stun.channeldata import CHANNEL_HEADER
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.framing import StreamFramer

WRITE_HIGH_WATER = 256 * 1024
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


def is_success_response(response: bytes) -> bool:
    """STUN class bits C1=1, C0=0 (RFC 8489 §5): a success response."""
    return bool(response[0] & 0x01) and not response[1] & 0x10


def tls_failure_reason(exc: BaseException) -> str:
    """A bounded label for why a TLS handshake failed."""
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)
    ):
        return "handshake_timeout"
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        for needle, label in (
            ("CERTIFICATE_UNKNOWN", "certificate_unknown"),
            ("UNKNOWN_CA", "unknown_ca"),
            ("BAD_CERTIFICATE", "bad_certificate"),
            ("CERTIFICATE_EXPIRED", "certificate_expired"),
            ("UNSUPPORTED_PROTOCOL", "protocol_version"),
            ("PROTOCOL_VERSION", "protocol_version"),
            ("NO_SHARED_CIPHER", "no_shared_cipher"),
            ("NO_APPLICATION_PROTOCOL", "no_application_protocol"),
            ("HTTP_REQUEST", "not_tls"),
            ("WRONG_VERSION_NUMBER", "not_tls"),
            ("UNEXPECTED_EOF", "client_aborted"),
        ):
            if needle in text:
                return label
        return "ssl_error"
    if isinstance(exc, ConnectionError | EOFError):
        return "client_aborted"  # often a client that refused our certificate
    return "other"


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection from a client."""

    def __init__(
        self,
        runtime: RuntimeView,
        local: Address,
        kind: ClientTransport,
        proxy: frozenset[int] = frozenset(),
    ) -> None:
        self.runtime = runtime
        self.local = local
        self.kind = kind
        self.proxy = proxy  # PROXY header versions this listener requires (none: direct)
        self.proxy_header: bytearray | None = None  # set while the header is awaited
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None  # the TCP transport under TLS
        self.five_tuple: FiveTuple | None = None
        self.alloc: Allocation | None = None
        self.opened_at = 0.0
        self.last_active = 0.0
        self.frame_started = 0.0  # when the unfinished frame in the framer began
        self.answered = False  # a request of this connection got a success response
        self.paused_since = 0.0  # write buffer above the high-water mark since (0: not)
        self.close_reason = "client_closed"
        self.closing = False
        self.closed_by_server = False
        self.registered = False
        self.pipe: PeerPipe | None = None  # set once ConnectionBind succeeds
        self.held = False  # a ConnectionBind is with another worker (io/handover.py)

    @property
    def paused(self) -> bool:
        return self.paused_since > 0.0

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        raw = cast(asyncio.Transport, transport)
        self._raw = raw
        peer = raw.get_extra_info("peername")
        self.five_tuple = FiveTuple((peer[0], peer[1]), self.local, self.kind)
        now = self.runtime.loop.time()
        self.opened_at = self.last_active = now
        if self.proxy:
            if self.runtime.proxy_admit(self):  # a trusted proxy: wait for its header
                self.proxy_header = bytearray()
            else:
                raw.abort()  # refused, counted and logged by the runtime
            return
        self._admit(raw, b"")

    def _admit(self, raw: asyncio.Transport, early: bytes) -> None:
        """Admit the client (caps, rate limits by its address); `early` is what it sent
        after a PROXY header, in the same read."""
        if not self.runtime.stream_opened(self):
            raw.abort()  # over a connection cap: refused and counted by the runtime
            return
        self.registered = True
        if self.kind == ClientTransport.TLS:
            self._start_tls(raw, early)
            return
        self.framer.append(early)
        self._ready(raw)

    def _proxy_received(self, data: bytes) -> None:
        """Bytes before the PROXY header is complete (proxy-protocol.txt: the receiver
        reads the whole header before anything else)."""
        buf = self.proxy_header
        raw = self._raw
        assert buf is not None and raw is not None and self.five_tuple is not None
        buf += data
        try:
            header = parse_proxy_header(buf, self.proxy)
        except ProxyHeaderError as exc:
            self.proxy_header = None
            self.runtime.proxy_release(self, "proxy_header_invalid", str(exc))
            raw.abort()
            return
        if header is None:
            return
        self.proxy_header = None
        if header.source is not None:
            self.five_tuple = FiveTuple(header.source, self.local, self.kind)
        if not self.runtime.proxy_release(self):
            raw.abort()  # the same client twice at once (a confused or lying proxy)
            return
        self._admit(raw, bytes(buf[header.length :]))

    def _ready(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.framer.buffered:  # asyncio may deliver data before start_tls returns
            self._process()

    def _start_tls(self, raw: asyncio.Transport, early: bytes = b"") -> None:
        """Begin the TLS handshake inside connection_made. loop.start_tls is driven by
        hand rather than as a Task: its first step swaps the transport's protocol, and
        it must do so before the loop reads the ClientHello (uvloop starts reading right
        after connection_made returns, and bytes read before the swap would be lost).
        `early`, the start of a ClientHello read with a PROXY header, goes to the TLS
        protocol right after its connection_made, before anything more is read."""
        ctx = self.runtime.tls_context()
        if ctx is None:
            raw.abort()
            return
        coro = self.runtime.loop.start_tls(
            raw, self, ctx, server_side=True, ssl_handshake_timeout=self.runtime.handshake_timeout
        )
        self._drive_handshake(raw, coro)
        if early and not self.closing:
            # start_tls scheduled the TLS protocol's connection_made (call_soon, FIFO),
            # and reading resumes only after it: this runs between the two
            self.runtime.loop.call_soon(_feed, raw, early)

    def _drive_handshake(self, raw: asyncio.Transport, coro: Any) -> None:
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            if self.closing or done.value is None:
                # closed mid-handshake (e.g. by the sweeper): the aborted transport may
                # finish start_tls with no transport and no exception, so nothing else
                # would release the connection (a 1-in-5 leak under the idle test)
                raw.abort()
                self._lost()
            else:
                self._ready(done.value)
            return
        except (OSError, ssl.SSLError, TimeoutError, EOFError, RuntimeError) as exc:
            self._handshake_failed(raw, exc)
            return
        waiting.add_done_callback(lambda _: self._drive_handshake(raw, coro))

    def _handshake_failed(self, raw: asyncio.Transport, exc: BaseException) -> None:
        reason = tls_failure_reason(exc)
        assert self.five_tuple is not None
        if not self.closed_by_server:  # (connection_lost may have come first)
            self.closing = self.closed_by_server = True
            self.close_reason = "handshake_timeout" if reason == "handshake_timeout" else "tls"
            self.runtime.emit(ev.TlsHandshakeFailed(self.five_tuple, reason, str(exc)[:200]))
            self.runtime.emit(ev.ConnectionClosed(self.five_tuple, self.close_reason, reason))
        raw.abort()
        self._lost()  # start_tls took the transport: connection_lost may never reach us

    def data_received(self, data: bytes) -> None:
        self.last_active = self.runtime.loop.time()
        if self.proxy_header is not None:
            self._proxy_received(data)
            return
        pipe = self.pipe
        if pipe is not None:  # RFC 6062 data connection: raw bytes to the peer
            if pipe.transport is not None:
                pipe.transport.write(data)
            return
        self.framer.append(data)
        if self.transport is not None:
            self._process()

    def _process(self) -> None:
        framer = self.framer
        runtime = self.runtime
        ft = self.five_tuple
        assert ft is not None
        while not self.paused:  # a client that does not read gets no more answers
            try:
                frame = framer.pop()
            except StunDecodeError as exc:
                self.close("framing_error", str(exc))
                return
            if frame is None:
                break
            if frame[0] >= 0x40:
                self._channel_data(frame)
                continue
            started = perf_counter()
            try:
                response = runtime.core.handle_message(frame, ft, runtime.now())
            except Exception as exc:  # a bug: the connection ends, the server goes on
                runtime.core_failed(self.kind.value, exc)
                self.close("internal_error")
                return
            if response is not None:
                if self.transport is not None:
                    self.transport.write(response)
                if not self.answered and is_success_response(response):
                    self.answered = True
            runtime.after_core_call(perf_counter() - started)
            if self.held:  # the ConnectionBind went to the worker that owns it
                break
            if self.pipe is not None:  # ConnectionBind made this a data connection
                rest = framer.take_rest()
                if rest and self.pipe.transport is not None:
                    self.pipe.transport.write(rest)
                break
        self.frame_started = (self.frame_started or self.last_active) if framer.buffered else 0.0

    def _channel_data(self, frame: bytes) -> None:
        runtime = self.runtime
        number = (frame[0] << 8) | frame[1]
        core = runtime.core
        try:
            core.relay_channel_data(self.alloc, number, frame[4:], runtime.now())
        except Exception as exc:  # a bug: counted, logged once a minute
            runtime.core_failed(self.kind.value, exc)
        if core.events:
            runtime.after_core_call()

    def pause_writing(self) -> None:
        self.paused_since = self.runtime.loop.time()
        if self.pipe is not None:  # RFC 6062: stop reading the peer instead
            if self.pipe.transport is not None:
                self.pipe.transport.pause_reading()
        elif self.transport is not None:
            self.transport.pause_reading()  # backpressure: stop taking requests

    def resume_writing(self) -> None:
        self.paused_since = 0.0
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.resume_reading()
        if self.transport is not None and not self.closing and not self.held:
            self.transport.resume_reading()
            if self.pipe is None and self.framer.buffered:
                self._process()  # frames read before the pause

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        if self.proxy_header is not None:  # gone before its PROXY header was complete
            self.proxy_header = None
            self.runtime.proxy_release(self)  # (a proxy's plain TCP health check)
        if not self.registered:
            return
        self.registered = False
        self.closing = True
        self.transport = None
        if self.pipe is not None:
            self.pipe.close(graceful=True)
        self.runtime.stream_closed(self, self.close_reason)

    def hold(self) -> None:
        """A ConnectionBind is with another worker: read and answer nothing more until
        release_hold (what the client sends meanwhile waits in the kernel)."""
        self.held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def release_hold(self, pipe: PeerPipe | None = None) -> None:
        """The ConnectionBind was answered; with `pipe`, this is now its data connection."""
        self.held = False
        if self.closing or self.transport is None:
            if pipe is not None:
                pipe.close()
            return
        if pipe is not None:
            pipe.attach(self, self.framer.take_rest())
        if not self.paused:
            self.transport.resume_reading()
        if pipe is None and self.framer.buffered:
            self._process()

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
        """Close the connection, reporting why (once, however often it is called)."""
        if self.closing:
            return
        self.closing = self.closed_by_server = True
        self.close_reason = reason
        if self.five_tuple is not None and reason != "client_closed":
            self.runtime.emit(ev.ConnectionClosed(self.five_tuple, reason, detail))
        if self.proxy_header is not None:  # the PROXY header never came in time
            self.proxy_header = None
            self.runtime.proxy_release(self, reason, detail)
        transport = self.transport
        if transport is None:  # TLS handshake not done yet
            if self._raw is not None:
                self._raw.abort()
            return
        if reason in ("peer_closed", "shutdown"):
            transport.close()  # flush what the peer sent; TLS sends close_notify
        else:
            transport.abort()


def _feed(raw: asyncio.Transport, data: bytes) -> None:
    """Hand bytes already read to the transport's current protocol (the TLS one)."""
    if raw.is_closing():
        return
    proto: Any = raw.get_protocol()
    if hasattr(proto, "get_buffer"):  # asyncio's and uvloop's SSLProtocol are buffered
        view = memoryview(data)
        while view:
            buf = proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
    else:
        proto.data_received(data)


__all__ = ["StreamConnection"]
