"""What the I/O adapters need from the runtime that owns them, and how relay sockets
reach a client: narrow Protocols, so that `udp`, `stream` and `tcp_relay` never import
`runtime` (which imports them)."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from turnserver.core import events as ev
from turnserver.core.server import TurnServer
from turnserver.io.descriptors import DescriptorBudget

if TYPE_CHECKING:
    from turnserver.io.stream import StreamConnection


@runtime_checkable
class ClientSink(Protocol):
    """Sends STUN messages and ChannelData to one client."""

    def send(self, data: bytes) -> None: ...

    def send_channel_data(self, number: int, payload: bytes) -> None: ...


class AdapterHost(Protocol):
    """The runtime as the listeners and relay sockets see it."""

    loop: asyncio.AbstractEventLoop
    core: TurnServer
    descriptors: DescriptorBudget

    def now(self) -> float: ...

    def emit(self, event: ev.Event) -> None:
        """Report an I/O-level event to the sinks (metrics, logs)."""

    def after_core_call(self, duration: float | None = None) -> None:
        """Dispatch the core's events and re-arm its timer."""

    def stream_opened(self, conn: StreamConnection) -> bool:
        """Admit a new TCP/TLS connection (False: refused over a cap)."""

    def stream_closed(self, conn: StreamConnection, reason: str) -> None: ...

    def tls_context(self) -> ssl.SSLContext | None: ...

    @property
    def handshake_timeout(self) -> float: ...
