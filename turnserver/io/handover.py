"""RFC 6062 across worker processes: the peer connection moves to the worker that
accepted the ConnectionBind.

SO_REUSEPORT hands a client's new data connection to any worker, while only the worker
that dialled the peer (Connect) or accepted it holds the peer's TCP connection and knows
its CONNECTION-ID. The CONNECTION-ID names its owner (core.state.CONNECTION_ID_OWNER_SHIFT);
the accepting worker asks the owner over a Unix datagram socket, and the owner checks the
bind, sends the peer socket itself with SCM_RIGHTS and keeps counting it under the
allocation. The pipe then runs in the accepting worker with no extra hop, whatever the
client's transport (TCP or TLS: the TLS session never leaves the process that made it).
Peer connections read nothing before they are bound, so no bytes are left behind.

Messages (JSON, one datagram each; the socket rides on "given"):
  take   {cid, user, req}      accepting worker -> owner
  given  {req, code}  + fd     owner -> accepting worker (code 0: the fd is the peer's)
  close  {cid}                 owner -> holder: the allocation or permission ended
  closed {cid}                 holder -> owner: the pipe ended
  gone   {worker}              supervisor -> every worker: that worker died
  metrics {req}                supervisor -> worker; answered with {req, families}
  lease   {req, user}          worker -> supervisor: a fleet quota lease (ops/fleet/quota.py)
  leased  {req, ok}            supervisor -> worker
  unlease {user}               worker -> supervisor: an allocation with a lease ended
The directory is private to the server (mode 0700), created by the supervisor.
"""

from __future__ import annotations

import array
import asyncio
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from turnserver.core.five_tuple import FiveTuple
from turnserver.io.runtime_view import ClientStream, RuntimeView
from turnserver.io.tcp_relay import PeerTcpConnection, TcpRelay

log = logging.getLogger("turnserver")

BIND_TIMEOUT = 5.0  # the owner's answer to a forwarded ConnectionBind
LEASE_TIMEOUT = 3.0  # the supervisor's answer to a fleet quota lease (it waits ≤ 1 s on Redis)
MAX_MESSAGE = 4096
LOG_INTERVAL = 60.0
BUFFER = 1 << 20


SUPERVISOR = -1


def bus_path(directory: str, worker: int) -> str:
    """The socket a worker (or the supervisor, SUPERVISOR) receives on."""
    return os.path.join(directory, "supervisor" if worker == SUPERVISOR else f"w{worker}")


def send_bus_message(
    sock: socket.socket,
    directory: str,
    worker: int,
    body: dict[str, Any],
    fds: list[int] | tuple[int, ...] = (),
) -> str:
    """Send one message to a worker's bus socket: "" or why not (never raises)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([data], ancillary, 0, bus_path(directory, worker))
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return ""


class _Pending:
    """A forwarded ConnectionBind waiting for the owner's answer."""

    __slots__ = ("connection_id", "five_tuple", "owner", "timer")

    def __init__(
        self, five_tuple: FiveTuple, owner: int, connection_id: int, timer: asyncio.TimerHandle
    ) -> None:
        self.five_tuple = five_tuple
        self.owner = owner
        self.connection_id = connection_id
        self.timer = timer


class HandedOverPeers:
    """What PeerTcpConnection needs of its relay, for peer connections handed over by
    another worker: their end tells the owner, who still counts them."""

    def __init__(self, bus: WorkerBus, owner: int) -> None:
        self.bus = bus
        self.owner = owner
        self.runtime: RuntimeView = bus.runtime

    def inbound(self, conn: PeerTcpConnection) -> bool:
        return False  # handed-over connections are never inbound here

    def lost(self, conn: PeerTcpConnection) -> None:
        if self.bus.pipes.pop((self.owner, conn.connection_id), None) is conn:
            self.bus.send(self.owner, {"op": "closed", "cid": conn.connection_id})
        if conn.data_conn is not None:
            conn.data_conn.close("peer_closed")


class WorkerBus:
    """One worker's end of the bus: forwards ConnectionBinds, hands over and receives
    peer connections, and keeps both ends' books when a pipe or allocation ends."""

    def __init__(
        self,
        runtime: RuntimeView,
        directory: str,
        index: int,
        workers: int,
        streams: Callable[[FiveTuple], ClientStream | None],
    ) -> None:
        self.runtime = runtime
        self.directory = directory
        self.index = index
        self.workers = workers
        self.streams = streams
        path = bus_path(directory, index)
        try:
            os.unlink(path)  # a crashed predecessor's
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        self._req = 0
        self.pending: dict[int, _Pending] = {}
        # (owner, connection id) -> the peer connection handed to us
        self.pipes: dict[tuple[int, int], PeerTcpConnection] = {}
        self._holders = {w: HandedOverPeers(self, w) for w in range(workers) if w != index}
        self.stats = {"forwarded": 0, "handed_over": 0, "received": 0, "failed": 0}
        self._errors: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases: dict[int, asyncio.Future[bool]] = {}  # asked of the supervisor
        # the worker's metric families, for its supervisor's /metrics (ops/process/)
        self.metrics_source: Callable[[], object] | None = None
        runtime.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        self.runtime.loop.remove_reader(self.sock.fileno())
        for p in self.pending.values():
            p.timer.cancel()
        self.pending.clear()
        for conn in list(self.pipes.values()):
            conn.close()
        self.sock.close()
        try:
            os.unlink(bus_path(self.directory, self.index))
        except OSError:
            pass

    def send(
        self, worker: int, body: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
    ) -> bool:
        why = send_bus_message(self.sock, self.directory, worker, body, fds)
        if why:
            self.stats["failed"] += 1
            self._log_once(why, f"worker bus: cannot reach worker {worker} ({why})")
        return not why

    # ---- fleet quota leases (asked of the supervisor, the fleet's node) ---------------------

    async def ask_lease(self, user: str) -> bool:
        """A fleet quota lease for one more allocation of `user`; False when refused or
        when the supervisor does not answer in time (486: the client may retry)."""
        self._req += 1
        req = self._req
        waiter: asyncio.Future[bool] = self.runtime.loop.create_future()
        self._leases[req] = waiter
        try:
            if not self.send(SUPERVISOR, {"op": "lease", "req": req, "user": user}):
                return False
            return await asyncio.wait_for(waiter, LEASE_TIMEOUT)
        except TimeoutError:
            self._log_once("lease", "worker bus: no fleet quota answer from the supervisor")
            return False
        finally:
            self._leases.pop(req, None)

    def give_back_lease(self, user: str) -> None:
        self.send(SUPERVISOR, {"op": "unlease", "user": user})

    def _log_once(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._errors.get(key, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._errors[key] = now
            log.warning("%s", message)

    # ---- the accepting worker ---------------------------------------------------------

    def forward_bind(self, ft: FiveTuple, connection_id: int, owner: int, username: str) -> None:
        """A ConnectionBind for another worker's connection: ask the owner."""
        self._req += 1
        req = self._req
        timer = self.runtime.loop.call_later(BIND_TIMEOUT, self._answer, req, 447, None)
        self.pending[req] = _Pending(ft, owner, connection_id, timer)
        self.stats["forwarded"] += 1
        body = {"op": "take", "cid": connection_id, "user": username, "req": req}
        if not self.send(owner, body):
            self._answer(req, 447, None)

    def _answer(self, req: int, code: int, fd: int | None) -> None:
        pending = self.pending.pop(req, None)
        if pending is None:
            if fd is not None:
                os.close(fd)  # too late: the peer connection is closed (owner told below)
            return
        pending.timer.cancel()
        ft = pending.five_tuple
        conn = self.streams(ft)
        runtime = self.runtime
        core = runtime.core
        if conn is None or conn.transport is None:
            core.finish_remote_bind(ft, 447)
            if fd is not None:
                os.close(fd)
            runtime.after_core_call()
            return
        if fd is None:
            self._refuse(conn, ft, code or 447)
            return
        task = runtime.loop.create_task(self._adopt(pending, conn, fd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, pending: _Pending, conn: ClientStream, fd: int) -> None:
        """Take over the peer socket, answer the ConnectionBind and join the two."""
        runtime = self.runtime
        owner, cid, ft = pending.owner, pending.connection_id, pending.five_tuple
        holder = self._holders[owner]
        runtime.descriptors.take(1)  # given back when the connection is lost
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            sock = None
        try:
            if sock is None:
                raise OSError(errno.ENOTSOCK, "not a socket")
            _, peer = await runtime.loop.create_connection(
                lambda: PeerTcpConnection(holder, cid, counted=True), sock=sock
            )
        except OSError:
            if sock is not None:
                sock.close()
            runtime.descriptors.give(1)
            self.send(owner, {"op": "closed", "cid": cid})
            self._refuse(conn, ft, 447)
            return
        self.stats["received"] += 1
        self.pipes[(owner, cid)] = peer
        response = runtime.core.finish_remote_bind(ft, 0)
        if response is None or conn.transport is None:
            peer.close()  # the data connection went meanwhile: lost() tells the owner
            runtime.after_core_call()
            return
        conn.transport.write(response)
        conn.release_hold(pipe=peer)
        runtime.after_core_call()

    def _refuse(self, conn: ClientStream, ft: FiveTuple, code: int) -> None:
        response = self.runtime.core.finish_remote_bind(ft, code)
        if response is not None and conn.transport is not None:
            conn.transport.write(response)
        conn.release_hold()
        self.runtime.after_core_call()

    # ---- the owner --------------------------------------------------------------------

    def _take(self, sender: int, body: dict[str, Any]) -> None:
        cid, user, req = body.get("cid"), body.get("user"), body.get("req")
        if not isinstance(cid, int) or not isinstance(user, str) or not isinstance(req, int):
            return
        core = self.runtime.core
        code = core.hand_over_peer_connection(cid, user)
        fd: int | None = None
        if code == 0:
            pc = core.peer_connections[cid]
            relay = pc.alloc.relay_to(pc.peer[0])
            tcp = relay.tcp if relay is not None else None
            fd = tcp.hand_over(cid, sender) if isinstance(tcp, TcpRelay) else None
            if fd is None:  # the peer went meanwhile
                core.peer_connection_closed(cid)
                code = 447
        try:
            self.send(sender, {"op": "given", "req": req, "code": code}, [fd] if fd else [])
            if fd is not None:
                self.stats["handed_over"] += 1
        finally:
            if fd is not None:
                os.close(fd)
        self.runtime.after_core_call()

    def _closed(self, sender: int, cid: int) -> None:
        """The holder's pipe ended: the allocation stops counting the connection."""
        core = self.runtime.core
        pc = core.peer_connections.get(cid)
        if pc is None:
            return
        relay = pc.alloc.relay_to(pc.peer[0])
        if relay is not None and isinstance(relay.tcp, TcpRelay):
            relay.tcp.handed.pop(cid, None)
        core.peer_connection_closed(cid)
        self.runtime.after_core_call()

    def close_handed(self, holder: int, cid: int) -> None:
        """Our allocation ended (or lost the permission): the holder closes the pipe."""
        self.send(holder, {"op": "close", "cid": cid})

    # ---- receiving --------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, fds, _, addr = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError:
                return
            try:
                body = json.loads(data)
                sender = bus_sender(addr)
                self._dispatch(sender, body, fds[0] if fds else None)
            except (ValueError, TypeError, KeyError, AttributeError):
                for fd in fds:
                    os.close(fd)
                self._log_once("bad", "worker bus: a malformed message was dropped")

    def _dispatch(self, sender: int, body: dict[str, Any], fd: int | None) -> None:
        op = body.get("op")
        if op == "given":
            self._answer(int(body["req"]), int(body["code"]), fd)
            return
        if fd is not None:
            os.close(fd)
        if op == "take" and 0 <= sender < self.workers:
            self._take(sender, body)
        elif op == "closed" and 0 <= sender < self.workers:
            self._closed(sender, int(body["cid"]))
        elif op == "close" and 0 <= sender < self.workers:
            conn = self.pipes.get((sender, int(body["cid"])))
            if conn is not None:
                conn.close()
        elif op == "gone" and sender == SUPERVISOR:
            self._gone(int(body["worker"]))
        elif op == "leased" and sender == SUPERVISOR:
            waiter = self._leases.get(int(body["req"]))
            if waiter is not None and not waiter.done():
                waiter.set_result(bool(body["ok"]))
        elif op == "metrics" and sender == SUPERVISOR and self.metrics_source is not None:
            reply = {"op": "metrics", "req": int(body["req"]), "families": self.metrics_source()}
            self.send(SUPERVISOR, reply)

    def _gone(self, worker: int) -> None:
        """A worker died: its allocations (and their pipes here) are gone, and so is
        every pipe we had handed to it."""
        for (owner, cid), conn in list(self.pipes.items()):
            if owner == worker:
                self.pipes.pop((owner, cid), None)
                conn.close()
        core = self.runtime.core
        for alloc in list(core.allocations.values()):
            for relay in alloc.relays.values():
                tcp = relay.tcp
                if isinstance(tcp, TcpRelay):
                    for cid in [c for c, w in tcp.handed.items() if w == worker]:
                        del tcp.handed[cid]
                        core.peer_connection_closed(cid)
        self.runtime.after_core_call()


def bus_sender(addr: Any) -> int:
    """The worker index of a bus address (`.../w3`); SUPERVISOR for the supervisor's,
    -2 for an unbound sender."""
    name = os.path.basename(addr) if isinstance(addr, str) else ""
    if name == "supervisor":
        return SUPERVISOR
    if name[:1] == "w" and name[1:].isascii() and name[1:].isdigit():
        return int(name[1:])
    return -2
