"""Ties the sans-IO core to the event loop: listeners, the one timer, event dispatch."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from turnserver.core import events as ev
from turnserver.core.allocation import Allocation
from turnserver.core.auth import Authenticator
from turnserver.core.config import CoreConfig
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.policy import PeerPolicy
from turnserver.core.server import TurnServer
from turnserver.io.descriptors import DescriptorBudget, tighter
from turnserver.io.handover import WorkerBus
from turnserver.io.host_addresses import HostAddresses
from turnserver.io.impairment import Impairments
from turnserver.io.kernel.flows import OffloadFlows
from turnserver.io.proxy_protocol import parse_versions
from turnserver.io.runtime_view import ClientSink, ClientStream
from turnserver.io.stream import StreamConnection
from turnserver.io.stream_admission import StreamAdmission, StreamOptions
from turnserver.io.tcp_relay import TcpRelay
from turnserver.io.tls import ReloadableTLS
from turnserver.io.udp import SocketRelayOpener, UdpListener, bind_udp_socket
from turnserver.stun.attributes import Address

EventSink = Callable[[ev.Event], None]
CORE_ERROR_INTERVAL = 60.0
WALL_CLOCK_INTERVAL = 1.0
log = logging.getLogger("turnserver")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener: scheme (udp, tcp, tls), host and port; `proxy` (v1, v2, any) when
    every connection must begin with a PROXY header from a trusted proxy."""

    scheme: str
    host: str
    port: int
    proxy: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?proxy={self.proxy}" if self.proxy else ""
        return f"{self.scheme}://{host}:{self.port}{query}"


_OFFLOAD_EVENTS = (
    ev.ChannelBound,
    ev.ChannelExpired,
    ev.PermissionInstalled,
    ev.PermissionExpired,
    ev.PermissionRevoked,
)
# the events that change what the fast paths must know (wire_fast_paths)
_WIRING_EVENTS = frozenset(
    {
        ev.AllocationCreated,
        ev.AllocationEnded,
        ev.PeerConnectionBound,
        ev.ConnectionBindForwarded,
        *_OFFLOAD_EVENTS,
    }
)


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
        tls: ReloadableTLS | None = None,
        stream_options: StreamOptions | None = None,
        reuse_port: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        descriptors: DescriptorBudget | None = None,
        inherited: dict[int, socket.socket] | None = None,
    ) -> None:
        self.loop = loop
        self.listen = listen
        self.tls = tls
        self.stream_options = stream_options or StreamOptions()
        self.reuse_port = reuse_port
        self.now = clock  # monotonic: lifetimes and timers survive a clock step
        self.wall = wall  # Unix time, for the core's wall_offset (_track_wall_clock)
        self.descriptors = descriptors or DescriptorBudget(0)
        # Listener sockets made by a parent process, by index in `listen` (workers)
        self.inherited = inherited or {}
        self.core = TurnServer(core_config, authenticator, SocketRelayOpener(self), peer_policy)
        self.udp_listeners: dict[Address, UdpListener] = {}
        self.stream_servers: list[tuple[ListenAddress, asyncio.Server]] = []
        self.streams = StreamAdmission(self)  # caps, deadlines, PROXY trust
        self.stream_connections = self.streams.connections
        self.streams_per_ip = self.streams.per_ip
        self.stream_refusals = self.streams.refusals  # reason -> connections refused
        self.proxy_pending = self.streams.proxy_pending  # PROXY header not yet read
        self.event_sinks: list[EventSink] = []
        self._sinks_seen: list[EventSink] = []
        self._sinks_by_type: dict[type, tuple[EventSink, ...]] = {}
        self.impairments: Impairments | None = None  # developer mode only
        self.offload: OffloadFlows | None = None  # the kernel fast path, when on
        self.handover: WorkerBus | None = None  # RFC 6062 across workers (io/handover.py)
        self.host_addresses: HostAddresses | None = None  # never peers (started by start)
        self.draining = False
        self.internal_errors: dict[str, int] = {}  # core_failed: where -> count
        self._errors_logged: dict[str, tuple[float, int]] = {}

        self.listeners_bound = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._wall_timer: asyncio.TimerHandle | None = None
        self.core.wall_offset = wall() - clock()

    @property
    def stream_limit(self) -> int:
        """TCP/TLS client connections allowed in all (configured, or half the fd budget)."""
        return tighter(self.stream_options.max_connections, self.descriptors.limit // 2)

    @property
    def allocation_limit(self) -> int:
        """Allocations allowed in all: allocations.max_total, never beyond the fd budget
        (every allocation holds at least one relay socket)."""
        return tighter(self.core.config.max_allocations, self.descriptors.limit)

    def limits(self) -> dict[str, int]:
        """Every limit in force (0: unlimited), for the start-up log and turn_limit."""
        cfg = self.core.config
        return {
            "descriptors": self.descriptors.limit,
            "allocations": self.allocation_limit,
            "allocations_per_user": cfg.max_allocations_per_user,
            "allocations_per_client_ip": cfg.max_allocations_per_client_ip,
            "permissions_per_allocation": cfg.max_permissions_per_allocation,
            "channels_per_allocation": cfg.max_channels_per_allocation,
            "peer_connections_per_allocation": cfg.max_peer_connections_per_allocation,
            "pending_connects_per_allocation": cfg.max_pending_connects_per_allocation,
            "stream_connections": self.stream_limit,
            "stream_connections_per_ip": self.stream_options.max_connections_per_ip,
        }

    @property
    def handshake_timeout(self) -> float:
        return self.stream_options.handshake_timeout

    def tls_context(self) -> ssl.SSLContext | None:
        return self.tls.listener_context if self.tls is not None else None

    async def start(self) -> None:
        """Learn the host's addresses (never peers), then bind every listener (raises
        OSError naming the address that failed)."""
        known = {spec.host for spec in self.listen} | {"127.0.0.1", "::1"}
        for relay in self.core.config.relay_addresses:
            known |= {relay.bind_ip, relay.advertised_ip}
        self.host_addresses = HostAddresses(known - {"0.0.0.0", "::"})
        self.host_addresses.on_change = self._host_addresses_changed
        self.core.set_host_addresses(self.host_addresses.start(self.loop))
        try:
            for index, spec in enumerate(self.listen):
                await self._bind(spec, self.inherited.get(index))
        except BaseException:
            self.stop()
            raise
        self.listeners_bound = True
        self._schedule_sweep()
        self._track_wall_clock()

    async def _bind(self, spec: ListenAddress, sock: socket.socket | None = None) -> None:
        try:
            if spec.scheme == "udp":
                if sock is None:
                    sock = bind_udp_socket(spec.host, spec.port, reuse_port=self.reuse_port)
                listener = UdpListener(self, sock)
                listener.siblings = self.udp_listeners  # shared: RFC 5780 answers
                listener.start(self.loop)
                self.udp_listeners[listener.local] = listener
                return
            if spec.scheme == "tls" and self.tls is None:
                raise ValueError(f"{spec}: a tls:// listener needs --cert and --key")
            kind = ClientTransport.TLS if spec.scheme == "tls" else ClientTransport.TCP
            holder: list[Address] = []
            proxy = parse_versions(spec.proxy) if spec.proxy else frozenset()
            # TLS runs through start_tls in StreamConnection, where failures are visible
            if sock is not None:
                server = await self.loop.create_server(
                    lambda: StreamConnection(self, holder[0], kind, proxy),
                    sock=sock,
                    backlog=self.stream_options.backlog,
                )
            else:
                server = await self.loop.create_server(
                    lambda: StreamConnection(self, holder[0], kind, proxy),
                    spec.host,
                    spec.port,
                    reuse_port=self.reuse_port or None,
                    backlog=self.stream_options.backlog,
                )
            host, port = server.sockets[0].getsockname()[:2]
            holder.append((host, port))
            self.stream_servers.append((ListenAddress(spec.scheme, host, port, spec.proxy), server))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind {spec}: {exc.strerror}") from exc

    def _track_wall_clock(self) -> None:
        """The core's wall clock follows a step of the system clock (NTP, a VM resumed)
        within a second; its lifetimes, on the monotonic clock, do not move."""
        self.core.wall_offset = self.wall() - self.now()
        self._wall_timer = self.loop.call_later(WALL_CLOCK_INTERVAL, self._track_wall_clock)

    def _host_addresses_changed(self, addresses: frozenset[str]) -> None:
        """An address came or went: permissions to what is now this host's end at once."""
        self.core.set_host_addresses(addresses)
        self.core.revoke_denied_peers()
        self.after_core_call()

    def stop(self) -> None:
        """Delete all allocations and close every socket."""
        self.core.shutdown(self.now())
        self.after_core_call()
        if self.handover is not None:
            self.handover.close()
            self.handover = None
        if self.host_addresses is not None:
            self.host_addresses.close()
            self.host_addresses = None
        for listener in self.udp_listeners.values():
            listener.close(self.loop)
        self.udp_listeners.clear()
        for _, server in self.stream_servers:
            server.close()
        self.stream_servers.clear()
        for conn in list(self.stream_connections.values()) + list(self.proxy_pending):
            conn.close("shutdown")
        for handle in (self._timer, self._sweeper, self._wall_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._sweeper = self._wall_timer = None
        self.listeners_bound = False
        if self.offload is not None:
            self.offload.close()  # detaches the program from tc
            self.offload = None

    def bound_addresses(self) -> list[ListenAddress]:
        """The addresses actually bound (port 0 resolved), in configuration order."""
        out = [ListenAddress("udp", h, p) for (h, p) in self.udp_listeners]
        out += [spec for spec, _ in self.stream_servers]
        return out

    def core_failed(self, where: str, exc: Exception) -> None:
        """The boundary of the sans-IO core: whatever escapes it (a bug; nothing a client
        sends should) is counted by where it came from and logged once a minute per
        place, its traceback in the line (a field of JSON lines), never once a packet."""
        self.internal_errors[where] = self.internal_errors.get(where, 0) + 1
        now = self.loop.time()
        last, suppressed = self._errors_logged.get(where, (-CORE_ERROR_INTERVAL, 0))
        if now - last < CORE_ERROR_INTERVAL:
            self._errors_logged[where] = (last, suppressed + 1)
            return
        self._errors_logged[where] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.error("internal error handling %s input%s: %r", where, more, exc, exc_info=exc)

    def emit(self, event: ev.Event) -> None:
        """Report an I/O-level event to the sinks (metrics, logs)."""
        for sink in self.event_sinks:
            sink(event)

    def answer(self, ft: FiveTuple, response: bytes) -> None:
        """Send a response the core produced later than its request (a deferred
        Allocate) to the client of `ft`, by the listener or connection it came on."""
        if ft.transport == ClientTransport.UDP:
            listener = self.udp_listeners.get(ft.server)
            if listener is None:
                return
            try:
                listener.sock.sendto(response, ft.client)
            except OSError:
                self.core.stats.dropped_send_error += 1
            return
        stream = self.stream_connections.get(ft)
        if stream is not None and stream.transport is not None:
            stream.transport.write(response)

    def after_core_call(self, duration: float | None = None) -> None:
        """Dispatch the core's events and re-arm the single expiry timer.

        `duration` is how long the core took for the request whose events these are."""
        core = self.core
        if core.events:
            if self._sinks_seen != self.event_sinks:
                self._sinks_seen = list(self.event_sinks)
                self._sinks_by_type.clear()
            by_type = self._sinks_by_type
            for event in core.drain_events():
                kind = type(event)
                if kind in _WIRING_EVENTS:  # the fast paths follow the core before any sink
                    self.wire_fast_paths(event)
                elif kind is ev.RequestHandled and duration is not None:
                    event.duration = duration  # type: ignore[union-attr]
                sinks = by_type.get(kind)
                if sinks is None:
                    sinks = by_type[kind] = self._sinks_for(kind)
                for sink in sinks:
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

    # ---- stream connections ------------------------------------------------------------

    def stream_opened(self, conn: ClientStream) -> bool:
        """Admit a new TCP/TLS connection, or refuse it (counted) over a cap."""
        return self.streams.opened(conn)

    def proxy_admit(self, conn: ClientStream) -> bool:
        return self.streams.proxy_admit(conn)

    def proxy_release(self, conn: ClientStream, refused: str = "", detail: str = "") -> bool:
        return self.streams.proxy_release(conn, refused, detail)

    def stream_closed(self, conn: ClientStream, reason: str) -> None:
        ft = conn.five_tuple
        if ft is not None and self.streams.closed(conn):
            self.core.close_five_tuple(ft, self.now())
            self.after_core_call()

    @property
    def last_cap_hit(self) -> float:
        """Loop time a stream cap last refused a connection (0: never)."""
        return self.streams.last_cap_hit

    def _schedule_sweep(self) -> None:
        interval = max(0.2, min(5.0, self.streams.shortest_deadline() / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self.streams.sweep(self.loop.time())
        if self.offload is not None:
            self.offload.cover_new_links()  # every 10 s at most
        self._schedule_sweep()

    # ---- routing ---------------------------------------------------------------------

    def _impair(self, alloc: Allocation, transport: str) -> None:
        imp = self.impairments
        assert imp is not None
        if isinstance(alloc.sink, ClientSink):
            alloc.sink = imp.peer_to_client(transport, alloc.sink)
        for relay in alloc.relays.values():
            if relay.sendto is not None:
                relay.sendto = imp.client_to_peer(transport, relay.sendto)

    def set_blocked(self, transport: str, blocked: bool) -> None:
        """Developer mode `block`: drop the transport's datagrams or connections, as a
        firewall would (new TCP/TLS connections are closed at accept)."""
        if transport == "udp":
            for listener in self.udp_listeners.values():
                listener.set_blocked(self.loop, blocked)
        elif blocked:
            for conn in list(self.stream_connections.values()):
                ft = conn.five_tuple
                if ft is not None and ft.transport.value == transport:
                    conn.close("dev_block")

    def _sinks_for(self, kind: type) -> tuple[EventSink, ...]:
        """The sinks that take events of this type: a table's handler for the type, if it
        has one (ev.EventTable), and every plain callable (each event goes only to the
        sinks that act on it)."""
        sinks: list[EventSink] = []
        for sink in self.event_sinks:
            handler = sink.handlers.get(kind) if isinstance(sink, ev.EventTable) else sink
            if handler is not None:
                sinks.append(handler)
        return tuple(sinks)

    def wire_fast_paths(self, event: ev.Event) -> None:
        """Keep the fast paths in step with the core: a new allocation's client entry in
        its listener (or its connection) and its sink, the kernel path's flows, RFC 6062
        pipes; undone when it ends."""
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
            else:
                conn = self.stream_connections.get(ft)
                if conn is not None:
                    conn.alloc = alloc
                    alloc.sink = conn
            if self.impairments is not None:  # developer mode: media through the impairer
                self._impair(alloc, ft.transport.value)
        elif self.offload is not None and isinstance(event, _OFFLOAD_EVENTS):
            alloc = self.core.allocations.get(event.five_tuple)
            if alloc is not None:  # channels and permissions changed: the kernel follows
                self.offload.sync(alloc)
        elif isinstance(event, ev.PeerConnectionBound):
            data_conn = self.stream_connections.get(event.data_five_tuple)
            pc = self.core.peer_connections.get(event.connection_id)
            relay = pc.alloc.relay_to(pc.peer[0]) if pc else None
            tcp = relay.tcp if relay is not None else None
            bound = (
                isinstance(tcp, TcpRelay)
                and data_conn is not None
                and tcp.bind(event.connection_id, data_conn, b"")
            )
            if not bound:
                self.core.peer_connection_closed(event.connection_id)
                if data_conn is not None:
                    data_conn.close("peer_closed")
        elif isinstance(event, ev.ConnectionBindForwarded):
            conn = self.stream_connections.get(event.five_tuple)
            bus = self.handover
            if conn is None:
                self.core.finish_remote_bind(event.five_tuple, 447)
            elif bus is None:
                response = self.core.finish_remote_bind(event.five_tuple, 400)
                if response is not None and conn.transport is not None:
                    conn.transport.write(response)
            else:
                conn.hold()
                bus.forward_bind(event.five_tuple, event.connection_id, event.owner, event.username)
        elif isinstance(event, ev.AllocationEnded):
            ft = event.five_tuple
            if ft.transport == ClientTransport.UDP:
                listener = self.udp_listeners.get(ft.server)
                if listener is not None:
                    listener.by_client.pop(ft.client, None)
            else:
                conn = self.stream_connections.get(ft)
                if conn is not None:
                    conn.alloc = None
                    conn.last_active = self.loop.time()
