"""The kernel fast path in a running server: which channel flows go to the BPF program,
kept in step with the core, and their counters folded back (issue 16, first part).

A flow is offloaded when its allocation is UDP, IPv4 and without a bandwidth limit, the
channel is bound with a live permission (the allocation's `channel_routes`, which the
core maintains), and the client and the peer are addresses of this host: the program
delivers what it rewrites up this host's stack, and sending to remote hosts needs the
CHECKSUM_PARTIAL case solved first (see the program). Developer mode, which impairs
media in user space, keeps offload off. Everything else keeps the uvloop path.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
from pathlib import Path

from turnserver.core.allocation import Allocation
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.io.offload import (
    TC_ACT_OK,
    ChannelRelayProgram,
    ClientFlow,
    OffloadError,
    PeerFlow,
)

log = logging.getLogger("turnserver")
OBJECT = Path(__file__).parent / "bpf" / "channel_relay.bpf.o"
MODES = ("off", "ebpf", "auto")
_SIOCGIFADDR = 0x8915
Flows = dict[int, tuple[ClientFlow, PeerFlow]]


def local_ipv4_addresses() -> set[str]:
    """This host's IPv4 addresses (every interface), loopback included."""
    out = {"127.0.0.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()))
            except OSError:
                continue
            out.add(socket.inet_ntoa(packed[20:24]))
    return out


def _is_local(ip: str, local: set[str]) -> bool:
    return ip in local or (ip.count(".") == 3 and ipaddress.IPv4Address(ip).is_loopback)


def self_test(prog: ChannelRelayProgram) -> None:
    """Run the loaded program on crafted frames both ways (BPF_PROG_TEST_RUN) and
    compare every byte; raise OffloadError when the kernel does not do what we expect."""
    client, server = ("192.0.2.1", 40000), ("192.0.2.2", 3478)
    relay, peer = ("192.0.2.2", 50000), ("192.0.2.3", 60000)
    flows = (ClientFlow(client, server, 0x7FFF), PeerFlow(relay, peer))
    prog.add(*flows)
    try:
        payload = bytes(range(97))
        cd = struct.pack("!HH", 0x7FFF, len(payload)) + payload
        for src, dst, data, want_src, want_dst, want in (
            (client, server, cd, relay, peer, payload),
            (peer, relay, payload, server, client, cd),
        ):
            verdict, out = prog.test_run(_frame(src, dst, data))
            if verdict != TC_ACT_OK or out != _frame(want_src, want_dst, want):
                raise OffloadError("the BPF program's self-test failed: output differs")
    finally:
        prog.remove(*flows)


def _frame(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            0,
            0,
            64,
            17,
            0,
            socket.inet_aton(src[0]),
            socket.inet_aton(dst[0]),
        )
    )
    total = sum(struct.unpack("!10H", ip))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(12) + b"\x08\x00" + bytes(ip) + udp


class OffloadFlows:
    """The program attached to `lo`, and the flows installed per allocation."""

    def __init__(self, prog: ChannelRelayProgram) -> None:
        self.prog = prog
        self.local = local_ipv4_addresses()
        self.installed: dict[FiveTuple, Flows] = {}
        self.add_failures = 0  # flows the maps refused (full): relayed in user space
        self._seen: dict[tuple[FiveTuple, int], tuple[int, int, int, int]] = {}

    @classmethod
    def start(cls, obj: Path = OBJECT) -> OffloadFlows:
        """Load, self-test and attach (raises OffloadError saying why not)."""
        if not obj.exists():
            raise OffloadError(f"{obj} is not built (make bpf; the Dockerfile builds it)")
        prog = ChannelRelayProgram(obj)
        try:
            self_test(prog)
            prog.attach(socket.if_nametoindex("lo"))
        except OffloadError:
            prog.close()
            raise
        return cls(prog)

    def close(self) -> None:
        self.prog.close()
        self.installed.clear()

    def active(self) -> int:
        return sum(len(f) for f in self.installed.values())

    def _eligible(self, alloc: Allocation) -> bool:
        ft = alloc.five_tuple
        return (
            alloc.live
            and ft.transport == ClientTransport.UDP
            and not alloc.rate
            and 4 in alloc.relays
            and ":" not in ft.client[0]
            and _is_local(ft.client[0], self.local)
        )

    def sync(self, alloc: Allocation) -> None:
        """Make the kernel's flows for this allocation match its live channels."""
        ft = alloc.five_tuple
        have = self.installed.get(ft, {})
        want: Flows = {}
        if self._eligible(alloc):
            relay = alloc.relays[4]
            relayed = (_bound_ip(relay.endpoint, ft.server[0]), relay.port)
            for number, (_, peer) in alloc.channel_routes.items():
                if ":" in peer[0] or not _is_local(peer[0], self.local):
                    continue
                want[number] = (ClientFlow(ft.client, ft.server, number), PeerFlow(relayed, peer))
        for number, flows in list(have.items()):
            if want.get(number) != flows:
                self._remove(alloc, number, flows)
                del have[number]
        for number, flows in want.items():
            if number not in have:
                try:
                    self.prog.add(*flows)
                except OffloadError as exc:  # e.g. the maps are full: user space relays it
                    self.add_failures += 1
                    if self.add_failures == 1:
                        log.warning("kernel fast path: flow kept in user space: %s", exc)
                    continue
                have[number] = flows
        if have:
            self.installed[ft] = have
        else:
            self.installed.pop(ft, None)

    def release(self, alloc: Allocation) -> None:
        """The allocation ends: remove its flows, its last kernel counts folded in."""
        for number, flows in self.installed.pop(alloc.five_tuple, {}).items():
            self._remove(alloc, number, flows)

    def fold(self, allocations: dict[FiveTuple, Allocation]) -> None:
        """Add what the kernel relayed since the last fold to the allocations' counters
        (on scrape and before an admin read)."""
        for ft, flows in self.installed.items():
            alloc = allocations.get(ft)
            if alloc is None:
                continue
            for number, pair in flows.items():
                self._add(alloc, (ft, number), self.prog.counters(*pair))

    def _remove(self, alloc: Allocation, number: int, flows: tuple[ClientFlow, PeerFlow]) -> None:
        self._add(alloc, (alloc.five_tuple, number), self.prog.remove(*flows))
        self._seen.pop((alloc.five_tuple, number), None)

    def _add(
        self, alloc: Allocation, key: tuple[FiveTuple, int], now: tuple[int, int, int, int]
    ) -> None:
        before = self._seen.get(key, (0, 0, 0, 0))
        pp, bp, pc, bc = (n - b for n, b in zip(now, before, strict=True))
        alloc.packets_to_peer += pp
        alloc.bytes_to_peer += bp
        alloc.packets_to_client += pc
        alloc.bytes_to_client += bc
        self._seen[key] = now


def _bound_ip(endpoint: object, fallback: str) -> str:
    address = getattr(endpoint, "address", None)
    return str(address[0]) if address else fallback


def start_offload(mode: str, workers: int, dev: bool) -> OffloadFlows | None:
    """`relay.offload`: off, ebpf (must work: raises OffloadError) or auto (logs why
    not and keeps the uvloop path)."""
    if mode == "off":
        return None
    why = ""
    if workers > 1:
        why = "one worker only in this version (workers share no BPF maps yet)"
    elif dev:
        why = "developer mode impairs media in user space"
    if why:
        if mode == "ebpf":
            raise OffloadError(f"--offload ebpf: {why}")
        log.info("kernel fast path off: %s", why)
        return None
    try:
        flows = OffloadFlows.start()
    except OffloadError as exc:
        if mode == "ebpf":
            raise
        log.info("kernel fast path off (auto): %s", exc)
        return None
    log.info("kernel fast path on: channel-bound UDP flows between local addresses (tc ingress lo)")
    return flows
