"""A network path with delay, jitter and loss between a client and a server on loopback,
for the tests that measure media (this kernel has no netem): a UDP forwarder with one
upstream socket per client address (the server sees each client's own 5-tuple), and a
TCP forwarder (TLS passes through) that delays each chunk in order. Both directions are
impaired alike; the random generator is seeded."""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass, field
from typing import Any

Address = tuple[str, int]


@dataclass
class PathSpec:
    """One crossing of the path: delay and jitter in ms, loss a fraction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    seed: int = 1
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def lost(self) -> bool:
        return self.loss > 0 and self.rng.random() < self.loss

    def wait(self) -> float:
        jitter = self.rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.delay_ms + jitter) / 1000


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, forwarder: UdpPath, client: Address) -> None:
        self.forwarder, self.client = forwarder, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.forwarder.later(self.forwarder.down, data, self.client)


class UdpPath(asyncio.DatagramProtocol):
    """127.0.0.1:port -> server, each datagram delayed (and maybe dropped) both ways."""

    def __init__(self, server: Address, spec: PathSpec) -> None:
        self.server, self.spec = server, spec
        self.down: asyncio.DatagramTransport | None = None  # the listening socket
        self.ups: dict[Address, _Upstream] = {}
        self.port = 0
        self.loop = asyncio.get_event_loop()

    @classmethod
    async def start(cls, server: Address, spec: PathSpec) -> UdpPath:
        loop = asyncio.get_running_loop()
        path = cls(server, spec)
        path.loop = loop
        transport, _ = await loop.create_datagram_endpoint(
            lambda: path, local_addr=("127.0.0.1", 0)
        )
        path.down = transport
        path.port = transport.get_extra_info("sockname")[1]
        return path

    def later(self, via: asyncio.DatagramTransport | None, data: bytes, to: Address) -> None:
        if self.spec.lost() or via is None:
            return
        self.loop.call_later(self.spec.wait(), _send, via, data, to)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        client = (addr[0], addr[1])
        up = self.ups.get(client)
        if up is None:
            up = self.ups[client] = _Upstream(self, client)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            self.loop.create_task(self.loop.create_datagram_endpoint(lambda: up, sock=sock))
        if up.transport is None:  # the upstream socket is a moment away: after it
            self.loop.call_soon(self.datagram_received, data, addr)
            return
        self.later(up.transport, data, self.server)

    def close(self) -> None:
        if self.down is not None:
            self.down.close()
        for up in self.ups.values():
            if up.transport is not None:
                up.transport.close()


def _send(via: asyncio.DatagramTransport, data: bytes, to: Address) -> None:
    if not via.is_closing():
        via.sendto(data, to)


class TcpPath:
    """127.0.0.1:port -> server over TCP, every chunk delayed (in order) both ways."""

    def __init__(self, server: Address, spec: PathSpec) -> None:
        self.server, self.spec = server, spec
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, server: Address, spec: PathSpec) -> TcpPath:
        path = cls(server, spec)
        path._server = await asyncio.start_server(path._accept, "127.0.0.1", 0)
        path.port = path._server.sockets[0].getsockname()[1]
        return path

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.server)
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        due = 0.0
        try:
            while data := await reader.read(65536):
                due = max(due, loop.time() + self.spec.wait())  # TCP keeps the order
                loop.call_at(due, _write, writer, data)
            loop.call_at(max(due, loop.time()), _close, writer)
        except (OSError, asyncio.CancelledError):
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()


def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


def _close(writer: asyncio.StreamWriter) -> None:
    if not writer.is_closing():
        writer.close()
