"""RFC 6062 TCP relays: a listening socket on the relayed address, and per peer one TCP
connection that is piped, once bound, to a client data connection.

Outbound connections (Connect) originate from the relayed transport address, which
shares its port with the listening socket through SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Protocol, cast

from turnserver.core.allocation import Allocation
from turnserver.io.runtime_view import ClientSink, ClientStream, RuntimeView
from turnserver.io.sockets import bind_socket
from turnserver.stun.attributes import Address

PENDING_LIMIT = 64 * 1024  # peer bytes held while waiting for ConnectionBind
CONNECT_TIMEOUT = 30.0  # RFC 6062 §5.2


def _tcp_socket(host: str, port: int) -> socket.socket:
    # The listening relay socket and outbound Connect sockets share the relayed port
    return bind_socket(host, port, socket.SOCK_STREAM, reuse_port=True, reuse_addr=True)


class PeerConnectionOwner(Protocol):
    """Who a peer connection reports to: its allocation's TcpRelay, or (for a
    connection handed over by another worker) the worker bus."""

    runtime: RuntimeView

    def inbound(self, conn: PeerTcpConnection) -> bool: ...

    def lost(self, conn: PeerTcpConnection) -> None: ...


class PeerTcpConnection(asyncio.Protocol):
    """The relay's TCP connection to one peer. It reads nothing until it is bound to a
    client data connection (RFC 6062 §5.4): until then the peer's bytes wait in the
    kernel under TCP flow control, and the socket can move to another worker whole."""

    def __init__(
        self, relay: PeerConnectionOwner, connection_id: int = 0, *, counted: bool = False
    ) -> None:
        self.relay = relay
        self.connection_id = connection_id
        self.counted = counted  # holds one descriptor of the budget
        self.transport: asyncio.Transport | None = None
        self.data_conn: ClientStream | None = None
        self.pending = bytearray()
        self.peer: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # until attach()
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        if not self.connection_id and self.relay.inbound(self):  # a peer dialled in
            self.counted = True
            self.relay.runtime.descriptors.take(1)

    def data_received(self, data: bytes) -> None:
        data_conn = self.data_conn
        if data_conn is not None and data_conn.transport is not None:
            data_conn.transport.write(data)
            return
        self.pending += data
        if len(self.pending) > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def pause_writing(self) -> None:  # the peer reads slower than the client sends
        if self.data_conn is not None and self.data_conn.transport is not None:
            self.data_conn.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.data_conn is not None and self.data_conn.transport is not None:
            self.data_conn.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.counted:
            self.counted = False
            self.relay.runtime.descriptors.give(1)
        self.relay.lost(self)

    def attach(self, data_conn: ClientStream, early: bytes) -> None:
        """Become one pipe with the client's data connection (after ConnectionBind)."""
        self.data_conn = data_conn
        data_conn.pipe = self
        if self.pending and data_conn.transport is not None:
            data_conn.transport.write(bytes(self.pending))
        self.pending.clear()
        if self.transport is not None:
            if early:
                self.transport.write(early)
            self.transport.resume_reading()

    def close(self, graceful: bool = False) -> None:
        if self.transport is not None:
            if graceful:
                self.transport.close()  # flush what the client sent first
            else:
                self.transport.abort()

    def duplicate(self) -> int | None:
        """A new descriptor of the peer socket (to hand over), or None when it is gone."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return None
        try:
            fd: int = os.dup(sock.fileno())
            return fd
        except OSError:
            return None


class TcpRelay:
    """Implements core.allocation.TcpRelayEndpoint."""

    def __init__(self, runtime: RuntimeView, alloc: Allocation, sock: socket.socket) -> None:
        self.runtime = runtime
        runtime.descriptors.take(1)  # the listening socket
        self.alloc = alloc
        host, port = sock.getsockname()[:2]
        self.address: Address = (host, port)
        self.connections: dict[int, PeerTcpConnection] = {}
        # connections handed over to another worker (io/handover.py): id -> its index
        self.handed: dict[int, int] = {}
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._listen_sock = sock
        self._server: asyncio.Server | None = None
        self._spawn(self._serve(sock))

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self.runtime.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        server = await self.runtime.loop.create_server(lambda: PeerTcpConnection(self), sock=sock)
        if self._closed:
            server.close()
        else:
            self._server = server

    def _sink(self) -> ClientSink | None:
        sink = self.alloc.sink
        return sink if isinstance(sink, ClientSink) else None

    def inbound(self, conn: PeerTcpConnection) -> bool:
        """A peer connected: tell the client with ConnectionAttempt, or refuse."""
        core = self.runtime.core
        result = core.peer_connection_received(self.alloc, conn.peer, self.runtime.now())
        sink = self._sink()
        if result is None or sink is None:
            conn.close()
            self.runtime.after_core_call()
            return False
        conn.connection_id, indication = result
        self.connections[conn.connection_id] = conn
        sink.send(indication)
        self.runtime.after_core_call()
        return True

    def connect(self, connection_id: int, peer: Address) -> None:
        self._spawn(self._connect(connection_id, peer))

    async def _connect(self, connection_id: int, peer: Address) -> None:
        loop = self.runtime.loop
        conn: PeerTcpConnection | None = None
        budget = self.runtime.descriptors
        try:
            sock = _tcp_socket(*self.address)
            budget.take(1)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, peer), CONNECT_TIMEOUT)
                _, proto = await loop.create_connection(
                    lambda: PeerTcpConnection(self, connection_id, counted=True), sock=sock
                )
                conn = proto
            except BaseException:
                sock.close()
                budget.give(1)
                raise
        except (TimeoutError, OSError):
            conn = None
        if conn is not None and not self._closed:
            self.connections[connection_id] = conn
        elif conn is not None:
            conn.close()
            conn = None
        response = self.runtime.core.connect_result(
            connection_id, conn is not None, self.runtime.now()
        )
        sink = self._sink()
        if response is not None and sink is not None:
            sink.send(response)
        elif conn is not None:
            self.close_connection(connection_id)
        self.runtime.after_core_call()

    def bind(self, connection_id: int, data_conn: ClientStream, early: bytes) -> bool:
        conn = self.connections.get(connection_id)
        if conn is None:
            return False
        conn.attach(data_conn, early)
        return True

    def hand_over(self, connection_id: int, holder: int) -> int | None:
        """Give a pending peer connection to worker `holder`: a descriptor of its socket
        (ours is closed), or None when the connection is gone."""
        conn = self.connections.pop(connection_id, None)
        if conn is None:
            return None
        fd = conn.duplicate()
        conn.close()  # our descriptor only: the socket lives on in the duplicate
        if fd is not None:
            self.handed[connection_id] = holder
        return fd

    def lost(self, conn: PeerTcpConnection) -> None:
        if self.connections.get(conn.connection_id) is conn:
            del self.connections[conn.connection_id]
            self.runtime.core.peer_connection_closed(conn.connection_id)
        if conn.data_conn is not None:
            conn.data_conn.close("peer_closed")

    def close_connection(self, connection_id: int) -> None:
        holder = self.handed.pop(connection_id, None)
        bus = self.runtime.handover
        if holder is not None and bus is not None:
            bus.close_handed(holder, connection_id)
        conn = self.connections.pop(connection_id, None)
        if conn is not None:
            conn.close()
            if conn.data_conn is not None:
                conn.data_conn.close("peer_closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.runtime.descriptors.give(1)
        if self._server is not None:
            self._server.close()
        else:
            with contextlib.suppress(OSError):
                self._listen_sock.close()
        for task in list(self._tasks):
            task.cancel()
        for cid in [*self.connections, *self.handed]:
            self.close_connection(cid)


def open_tcp_relay(
    runtime: RuntimeView, alloc: Allocation, host: str, port: int
) -> TcpRelay | None:
    """Bind and listen on host:port, or None when the port is taken."""
    try:
        sock = _tcp_socket(host, port)
        sock.listen(128)
    except OSError:
        return None
    return TcpRelay(runtime, alloc, sock)
