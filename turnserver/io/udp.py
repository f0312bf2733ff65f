"""UDP listeners and UDP relay sockets, on raw non-blocking sockets with add_reader.

Relay sockets must exist as soon as the core accepts an Allocate, so they are bound
synchronously; add_reader also lets one wakeup drain many datagrams. ChannelData is
recognised by its first byte and relayed with one dict lookup and one send, with no
logging, metrics call or object creation beyond the forwarded slice (RFC 8656 §12).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from time import perf_counter

from turnserver.core.allocation import Allocation, SendTo
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.server import RelayStats, Reply
from turnserver.io.runtime_view import ClientSink, RuntimeView
from turnserver.io.sockets import bind_socket
from turnserver.io.tcp_relay import TcpRelay, open_tcp_relay
from turnserver.stun.attributes import Address
from turnserver.stun.channeldata import CHANNEL_HEADER

READ_BATCH = 64
# Answers of one read batch go out together, at most this many held back:
# sent one by one between requests, each woke a waiting receiver (on loopback the
# sender pays for that wake-up under setup load; benchmarks/README.md)
ANSWER_BATCH = 16
MAX_DATAGRAM = 65535
SOCKET_BUFFER = 4 * 1024 * 1024
_IP_PMTUDISC_DO = 2
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
# ICMP errors about relayed datagrams, read from the error queue (RFC 8656 §11.6)
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_ORIGIN_ICMP, _ORIGIN_ICMP6 = 2, 3


def _tune_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


def bind_udp_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to host:port (raises OSError)."""
    return bind_socket(host, port, socket.SOCK_DGRAM, reuse_port=reuse_port)


class UdpClientSink:
    """Sends to one client over a UDP listener socket."""

    __slots__ = ("addr", "sock", "stats")

    def __init__(self, sock: socket.socket, addr: Address, stats: RelayStats) -> None:
        self.sock = sock
        self.addr = addr
        self.stats = stats

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.addr)
        except OSError:
            self.stats.dropped_send_error += 1

    def send_channel_data(self, number: int, payload: bytes) -> None:
        try:
            self.sock.sendmsg(
                (CHANNEL_HEADER.pack(number, len(payload)), payload), (), 0, self.addr
            )
        except OSError:
            self.stats.dropped_send_error += 1


class UdpListener:
    """A TURN/STUN listener on one UDP address."""

    def __init__(self, runtime: RuntimeView, sock: socket.socket) -> None:
        self.runtime = runtime
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.local: Address = (host, port)
        self.v6 = sock.family == socket.AF_INET6
        self.by_client: dict[Address, Allocation] = {}
        self._answers: list[tuple[bytes, Address]] = []  # held until the batch ends
        self.siblings: dict[Address, UdpListener] = {}  # every UDP listener, by address
        self.dropped_blocked = 0  # developer mode `udp=block`
        _tune_buffers(sock)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def set_blocked(self, loop: asyncio.AbstractEventLoop, blocked: bool) -> None:
        """Developer mode: read and drop every datagram (a firewall blocking UDP)."""
        loop.remove_reader(self.sock.fileno())
        loop.add_reader(self.sock.fileno(), self._drop_all if blocked else self._on_readable)

    def _drop_all(self) -> None:
        for _ in range(READ_BATCH):
            try:
                self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.dropped_blocked += 1

    def sink_for(self, client: Address) -> UdpClientSink:
        return UdpClientSink(self.sock, client, self.runtime.core.stats)

    def _on_readable(self) -> None:
        recvfrom = self.sock.recvfrom
        by_client = self.by_client
        core = self.runtime.core
        stats = core.stats
        v6 = self.v6
        now = self.runtime.now

        # The receive loop is written out here and in UdpRelay rather than shared as a
        # generator, and the ChannelData rule (PermissionHandlers.relay_channel_data, which
        # TCP and TLS clients take) inlined: each call would cost a measurable share of
        # a relayed datagram (benchmarks/README.md).
        try:
            for _ in range(READ_BATCH):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue  # e.g. an ICMP error queued on the socket
                if v6:
                    addr = addr[:2]
                if data and 0x40 <= data[0] <= 0x7F:
                    # ChannelData fast path (RFC 8656 §12.6)
                    alloc = by_client.get(addr)
                    if alloc is None:
                        stats.dropped_no_allocation += 1
                        continue
                    target = (
                        alloc.channel_targets.get((data[0] << 8) | data[1])
                        if len(data) > 3
                        else None
                    )
                    if target is None:
                        stats.dropped_unknown_channel += 1
                        continue
                    length = (data[2] << 8) | data[3]
                    if length + 4 > len(data):
                        stats.dropped_malformed += 1
                        continue
                    if alloc.rate and not alloc.spend(length, now()):
                        stats.dropped_rate_limited += 1
                        continue
                    try:
                        target[0](data[4 : 4 + length], target[1])
                    except OSError as exc:  # counted; never ends the allocation
                        if core.send_failed(alloc, target[1], exc, now()):
                            self.runtime.after_core_call()
                        continue
                    alloc.packets_to_peer += 1
                    alloc.bytes_to_peer += length
                    continue
                self._on_message(data, addr)
        finally:
            if self._answers:  # what this batch answered, in the order asked
                self._send_answers()

    def _send_answers(self) -> None:
        sendto = self.sock.sendto
        for response, addr in self._answers:
            try:
                sendto(response, addr)
            except OSError:
                self.runtime.core.stats.dropped_send_error += 1
        self._answers.clear()

    def _on_message(self, data: bytes, addr: Address) -> None:
        runtime = self.runtime
        ft = FiveTuple(addr, self.local, ClientTransport.UDP)
        started = perf_counter()
        core = runtime.core
        try:
            response = core.handle_message(data, ft, runtime.now())
        except Exception as exc:  # a bug: never a crash, never a traceback a datagram
            runtime.core_failed("udp", exc)
            response = None
        if response is not None:
            sock = self.sock
            if type(response) is Reply:  # RFC 5780 CHANGE-REQUEST: from another of ours
                origin = self.siblings.get(response.origin)
                if origin is not None:
                    sock = origin.sock
            if sock is self.sock:
                answers = self._answers
                answers.append((response, addr))
                if len(answers) >= ANSWER_BATCH:
                    self._send_answers()
            else:
                try:
                    sock.sendto(response, addr)
                except OSError:
                    core.stats.dropped_send_error += 1
        runtime.after_core_call(perf_counter() - started)


class UdpRelay:
    """A relayed transport address: one UDP socket bound for one allocation."""

    __slots__ = ("_fd", "_loop", "_runtime", "address", "alloc", "sendto", "sock", "v6")

    def __init__(
        self,
        runtime: RuntimeView,
        loop: asyncio.AbstractEventLoop,
        alloc: Allocation,
        sock: socket.socket,
        address: Address,
    ) -> None:
        self._runtime = runtime
        self._loop = loop
        self.alloc = alloc
        self.sock = sock
        self.v6 = ":" in address[0]  # sock.family builds an enum on each read
        self.address = address  # where it is bound (port 0 is never asked for)
        self.sendto: SendTo = sock.sendto
        self._fd = sock.fileno()
        runtime.descriptors.take(1)
        loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        if self._fd >= 0:
            offload = self._runtime.offload
            if offload is not None:  # the kernel's flows go first, their counts folded in
                offload.release(self.alloc)
            self._loop.remove_reader(self._fd)
            self._fd = -1
            self.sock.close()
            self._runtime.descriptors.give(1)

    def _on_readable(self) -> None:
        """Peer datagrams to the client: ChannelData when the peer has a channel (one
        sendmsg of header and payload over UDP), else a Data indication (RFC 8656 §11.3,
        §12.6). Stream clients get the same through their sink's buffered writes."""
        alloc = self.alloc
        sink = alloc.sink
        client_sock: socket.socket | None = None
        client_addr: Address = ("", 0)
        stream: ClientSink | None = None
        if isinstance(sink, UdpClientSink):
            client_sock, client_addr = sink.sock, sink.addr
        elif isinstance(sink, ClientSink):
            stream = sink
        recvfrom = self.sock.recvfrom
        peer_channels = alloc.peer_channels
        pack = CHANNEL_HEADER.pack
        v6 = self.v6
        now = self._runtime.now
        core = self._runtime.core
        stats = core.stats
        for _ in range(READ_BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error about a datagram we relayed
                self._drain_errors(client_sock, client_addr, stream)
                continue
            if v6:
                addr = addr[:2]
            number = peer_channels.get(addr)
            if number is not None:
                if alloc.rate and not alloc.spend(len(data), now()):
                    stats.dropped_rate_limited += 1
                    continue
                if client_sock is not None:
                    try:
                        client_sock.sendmsg((pack(number, len(data)), data), (), 0, client_addr)
                    except OSError as exc:
                        if core.send_failed(alloc, client_addr, exc, now()):
                            self._runtime.after_core_call()
                        continue
                elif stream is not None:
                    stream.send_channel_data(number, data)
                else:
                    continue  # no way back to the client (its connection is closing)
                alloc.packets_to_client += 1
                alloc.bytes_to_client += len(data)
                continue
            try:
                indication = core.data_indication(alloc, data, addr, now())
            except Exception as exc:  # a bug: counted, logged once a minute
                self._runtime.core_failed("peer", exc)
                continue
            if indication is not None:
                self._to_client(indication, client_sock, client_addr, stream)

    def _to_client(
        self,
        message: bytes,
        client_sock: socket.socket | None,
        client_addr: Address,
        stream: ClientSink | None,
    ) -> None:
        """A STUN message (Data indication) to the client, over UDP or its stream."""
        if client_sock is not None:
            try:
                client_sock.sendto(message, client_addr)
            except OSError as exc:
                core = self._runtime.core
                if core.send_failed(self.alloc, client_addr, exc, self._runtime.now()):
                    self._runtime.after_core_call()
        elif stream is not None:
            stream.send(message)

    def _drain_errors(
        self, client_sock: socket.socket | None, client_addr: Address, stream: ClientSink | None
    ) -> None:
        """Read the socket's error queue: each ICMP error goes to the client as a Data
        indication with the ICMP attribute (when the peer has a permission); local send
        errors were counted when the send failed."""
        core = self._runtime.core
        now = self._runtime.now()
        for _ in range(READ_BATCH):
            try:
                _, ancdata, _, addr = self.sock.recvmsg(1, 512, _MSG_ERRQUEUE)
            except OSError:  # BlockingIOError included: the queue is empty
                return
            for _level, kind, data in ancdata:
                if kind not in (_IP_RECVERR, _IPV6_RECVERR) or len(data) < _EXTENDED_ERR.size:
                    continue
                _, origin, icmp_type, code, _, info, _ = _EXTENDED_ERR.unpack_from(data)
                if origin not in (_ORIGIN_ICMP, _ORIGIN_ICMP6) or not addr:
                    continue
                too_big = (origin == _ORIGIN_ICMP and (icmp_type, code) == (3, 4)) or (
                    origin == _ORIGIN_ICMP6 and icmp_type == 2
                )
                indication = core.icmp_indication(
                    self.alloc, (addr[0], addr[1]), icmp_type, code, info if too_big else 0, now
                )
                if indication is not None:
                    self._to_client(indication, client_sock, client_addr, stream)


class SocketRelayOpener:
    """Implements core.allocation.RelayOpener: UDP relays, and RFC 6062 TCP relays."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.runtime = runtime

    def has_capacity(self, sockets: int) -> bool:
        return self.runtime.descriptors.has(sockets)

    def port_free(self, host: str, port: int) -> bool:
        try:
            bind_udp_socket(host, port).close()
        except OSError:
            return False
        return True

    def open_relay(
        self, allocation: Allocation, host: str, port: int, *, dont_fragment: bool
    ) -> UdpRelay | None:
        try:
            sock = bind_udp_socket(host, port)
        except OSError:
            return None
        try:  # ICMP errors about relayed datagrams reach us (RFC 8656 §11.6)
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        except OSError:
            pass
        if dont_fragment:
            # RFC 8656 §7.2 DONT-FRAGMENT: set DF on relayed datagrams
            try:
                if sock.family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DONTFRAG, 1)
            except (OSError, AttributeError):
                pass
        return UdpRelay(self.runtime, self.runtime.loop, allocation, sock, (host, port))

    def open_tcp_relay(self, allocation: Allocation, host: str, port: int) -> TcpRelay | None:
        return open_tcp_relay(self.runtime, allocation, host, port)
