"""What the I/O adapters need from the runtime that owns them, and how relay sockets
reach a client: narrow Protocols, so that `udp`, `stream` and `tcp_relay` never import
`runtime` (which imports them)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol, runtime_checkable

from turnserver.core import events as ev
from turnserver.core.five_tuple import FiveTuple
from turnserver.core.server import TurnServer
from turnserver.io.descriptors import DescriptorBudget
from turnserver.io.kernel.flows import OffloadFlows


@runtime_checkable
class ClientSink(Protocol):
    """Sends STUN messages and ChannelData to one client."""

    def send(self, data: bytes) -> None: ...

    def send_channel_data(self, number: int, payload: bytes) -> None: ...


class PeerPipe(Protocol):
    """An RFC 6062 peer connection, as the client's data connection sees it."""

    transport: asyncio.Transport | None

    def close(self, graceful: bool = False) -> None: ...

    def attach(self, data_conn: ClientStream, early: bytes) -> None:
        """Become one pipe with the data connection; `early`: client bytes read already."""


class ClientStream(Protocol):
    """A client's TCP/TLS connection, as the runtime and RFC 6062 relays see it."""

    five_tuple: FiveTuple | None
    transport: asyncio.Transport | None
    pipe: PeerPipe | None

    def close(self, reason: str, detail: str = "") -> None: ...

    def hold(self) -> None:
        """Stop reading and answering until release_hold (a ConnectionBind in flight)."""

    def release_hold(self, pipe: PeerPipe | None = None) -> None:
        """Go on; with `pipe`, as an RFC 6062 data connection joined to it."""


class PeerHandover(Protocol):
    """The worker bus (io/handover.py), as a relay sees it: tells the worker holding a
    handed-over peer connection to close it."""

    def close_handed(self, holder: int, connection_id: int) -> None: ...


class RuntimeView(Protocol):
    """The runtime as the listeners and relay sockets see it."""

    loop: asyncio.AbstractEventLoop
    core: TurnServer
    descriptors: DescriptorBudget
    offload: OffloadFlows | None  # the kernel fast path, when on

    @property
    def handover(self) -> PeerHandover | None:
        """The worker bus (RFC 6062 across worker processes), if there are workers."""

    def now(self) -> float: ...

    def emit(self, event: ev.Event) -> None:
        """Report an I/O-level event to the sinks (metrics, logs)."""

    def core_failed(self, where: str, exc: Exception) -> None:
        """A bug: the core raised on input from `where` (counted, logged once a minute)."""

    def after_core_call(self, duration: float | None = None) -> None:
        """Dispatch the core's events and re-arm its timer."""

    def stream_opened(self, conn: ClientStream) -> bool:
        """Admit a new TCP/TLS connection (False: refused over a cap)."""

    def stream_closed(self, conn: ClientStream, reason: str) -> None: ...

    def proxy_admit(self, conn: ClientStream) -> bool:
        """A connection to a PROXY listener: from a trusted proxy and under the caps,
        held until its header arrives (False: refused, counted)."""

    def proxy_release(self, conn: ClientStream, refused: str = "", detail: str = "") -> bool:
        """Its header arrived (or it ended: `refused` says why, counted when it is a
        refusal). False: its client is already connected through this proxy."""

    def tls_context(self) -> ssl.SSLContext | None: ...

    @property
    def handshake_timeout(self) -> float: ...
