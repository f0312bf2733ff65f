"""Ties the sans-IO core to the event loop: listeners, the one timer, event dispatch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from turnserver.core import events as ev
from turnserver.core.auth import Authenticator
from turnserver.core.config import CoreConfig
from turnserver.core.five_tuple import ClientTransport
from turnserver.core.policy import PeerPolicy
from turnserver.core.server import TurnServer
from turnserver.io.sinks import ClientSink
from turnserver.io.udp import UdpListener, UdpRelay, UdpRelayOpener, bind_udp_socket
from turnserver.stun.attributes import Address

EventSink = Callable[[ev.Event], None]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener: scheme (udp, tcp, tls), host and port."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class ServerRuntime:
    """One process's TURN server: a core, its listeners and its timer."""

    def __init__(
        self,
        core_config: CoreConfig,
        authenticator: Authenticator,
        peer_policy: PeerPolicy,
        listen: list[ListenAddress],
        loop: asyncio.AbstractEventLoop,
        *,
        reuse_port: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.loop = loop
        self.listen = listen
        self.reuse_port = reuse_port
        self.now = clock
        self.core = TurnServer(core_config, authenticator, UdpRelayOpener(self), peer_policy)
        self.udp_listeners: dict[Address, UdpListener] = {}
        self.event_sinks: list[EventSink] = []
        self.listeners_bound = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None

    def start(self) -> None:
        """Bind every listener (raises OSError naming the address that failed)."""
        for spec in self.listen:
            if spec.scheme != "udp":
                raise ValueError(f"{spec}: only udp:// listeners are supported so far")
            try:
                sock = bind_udp_socket(spec.host, spec.port, reuse_port=self.reuse_port)
            except OSError as exc:
                self.stop()
                raise OSError(exc.errno, f"cannot bind {spec}: {exc.strerror}") from exc
            listener = UdpListener(self, sock)
            listener.start(self.loop)
            self.udp_listeners[listener.local] = listener
        self.listeners_bound = True

    def stop(self) -> None:
        """Delete all allocations and close every socket."""
        self.core.shutdown(self.now())
        self.after_core_call()
        for listener in self.udp_listeners.values():
            listener.close(self.loop)
        self.udp_listeners.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.listeners_bound = False

    def bound_addresses(self) -> list[ListenAddress]:
        """The addresses actually bound (port 0 resolved)."""
        return [ListenAddress("udp", h, p) for (h, p) in self.udp_listeners]

    def after_core_call(self) -> None:
        """Dispatch the core's events and re-arm the single expiry timer."""
        core = self.core
        if core.events:
            for event in core.drain_events():
                self._route(event)
                for sink in self.event_sinks:
                    sink(event)
        when = core.next_timer()
        if when != self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_when = when
            if when is not None:
                delay = max(0.0, when - self.now())
                self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        self.core.handle_timer(self.now())
        self.after_core_call()

    def _route(self, event: ev.Event) -> None:
        """Keep the listeners' fast-path tables in step with allocations."""
        if isinstance(event, ev.AllocationCreated):
            ft = event.five_tuple
            alloc = self.core.allocations.get(ft)
            if alloc is None:
                return
            if ft.transport == ClientTransport.UDP:
                listener = self.udp_listeners.get(ft.server)
                if listener is not None:
                    listener.by_client[ft.client] = alloc
                    alloc.sink = listener.sink_for(ft.client)
        elif isinstance(event, ev.AllocationEnded):
            ft = event.five_tuple
            if ft.transport == ClientTransport.UDP:
                listener = self.udp_listeners.get(ft.server)
                if listener is not None:
                    listener.by_client.pop(ft.client, None)


__all__ = ["ClientSink", "ListenAddress", "ServerRuntime", "UdpRelay"]
