"""The kernel fast path in a running server: which channel flows go to the BPF program,
kept in step with the core, and their counters folded back (docs/scale.md).

A flow is offloaded when its allocation is UDP and without a bandwidth limit, the
client, relayed address and peer are of one family (IPv4 or IPv6), and the channel is
bound with a live permission (the allocation's `channel_targets`, which the
core maintains). Each direction's next hop is asked of the kernel's routing table when
the flow is installed: an address of this host (the program delivers up the stack) or
the interface the route leaves through (the program redirects there). The program is
attached to the ingress of every interface that is up and carries an Ethernet header
(loopback included) when the server starts, and to those that come up later (looked for
every 10 s). Developer mode, which impairs media in user space, keeps
offload off. Everything else keeps the uvloop path.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path

from turnserver.core.allocation import Allocation
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.io.kernel.program import (
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    ChannelRelayProgram,
    ClientFlow,
    FlowMaps,
    OffloadError,
    PeerFlow,
)
from turnserver.io.kernel.routes import RouteLookup, ethernet_links

log = logging.getLogger("turnserver")
OBJECT = Path(__file__).parent / "channel_relay.bpf.o"
MODES = ("off", "ebpf", "auto")
Flows = dict[int, tuple[ClientFlow, PeerFlow]]


def self_test(prog: ChannelRelayProgram) -> None:
    """Run the loaded program on crafted frames both ways (BPF_PROG_TEST_RUN), IPv4 and
    IPv6, for a local destination and for one behind an interface, and compare every
    byte (checksums included); raise OffloadError when the kernel does not do what we
    expect."""
    payload = bytes(range(97))
    cd = struct.pack("!HH", 0x7FFF, len(payload)) + payload
    lo = socket.if_nametoindex("lo")
    for client_ip, server_ip, peer_ip in (
        ("192.0.2.1", "192.0.2.2", "192.0.2.3"),
        ("2001:db8::1", "2001:db8::2", "2001:db8::3"),
    ):
        client, server = (client_ip, 40000), (server_ip, 3478)
        relay, peer = (server_ip, 50000), (peer_ip, 60000)
        v6 = ":" in client_ip
        for ifindex, verdict in ((0, TC_ACT_OK), (lo, TC_ACT_REDIRECT)):
            flows = (ClientFlow(client, server, 0x7FFF, ifindex), PeerFlow(relay, peer, ifindex))
            prog.add(*flows)
            try:
                for src, dst, data, want_src, want_dst, want in (
                    (client, server, cd, relay, peer, payload),
                    (peer, relay, payload, server, client, cd),
                ):
                    got = prog.test_run(frame(src, dst, data, checked=True))
                    checked = bool(ifindex) or v6  # IPv4 up the stack: no checksum
                    if got != (verdict, frame(want_src, want_dst, want, 63, checked)):
                        raise OffloadError("the BPF program's self-test failed: output differs")
            finally:
                prog.remove(*flows)


def _sum(data: bytes) -> int:
    data += bytes(len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def frame(
    src: tuple[str, int],
    dst: tuple[str, int],
    payload: bytes,
    ttl: int = 64,
    checked: bool = False,
) -> bytes:
    """An Ethernet frame with an IPv4 or IPv6 header and UDP; the UDP checksum computed
    (RFC 768, RFC 8200 §8.1) when `checked`, else 0."""
    v6 = ":" in src[0]
    family = socket.AF_INET6 if v6 else socket.AF_INET
    addresses = socket.inet_pton(family, src[0]) + socket.inet_pton(family, dst[0])
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    if checked:
        length = struct.pack("!II", len(udp), 17) if v6 else struct.pack("!HH", 17, len(udp))
        check = ~_sum(addresses + length + udp) & 0xFFFF or 0xFFFF
        udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    if v6:
        return (
            bytes(12)
            + b"\x86\xdd"
            + struct.pack("!IHBB", 6 << 28, len(udp), 17, ttl)
            + (addresses + udp)
        )
    ip = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(udp), 0, 0, ttl, 17, 0))
    ip += addresses
    ip[10:12] = struct.pack("!H", ~_sum(bytes(ip)) & 0xFFFF)
    return bytes(12) + b"\x08\x00" + bytes(ip) + udp


class OffloadFlows:
    """The flows one process installed per allocation, in the program's maps (its own
    program, attached to `interfaces`, or with --workers the supervisor's, shared)."""

    def __init__(self, prog: FlowMaps, interfaces: list[str]) -> None:
        self.prog = prog
        self.interfaces = interfaces
        self.routes = RouteLookup()
        self._links_checked = time.monotonic()
        self._indices = {i for i, name in ethernet_links() if name in interfaces}
        self.installed: dict[FiveTuple, Flows] = {}
        self.add_failures = 0  # flows the maps refused (full): relayed in user space
        self.wildcard_skipped = 0  # flows of wildcard listeners: relayed in user space
        self.mixed_skipped = 0  # one end on this host, the other not: relayed in user space
        # what the kernel relayed, folded so far: packets and bytes to the peer, to the client
        self.relayed = [0, 0, 0, 0]
        self._seen: dict[tuple[FiveTuple, int], tuple[int, int, int, int]] = {}

    @classmethod
    def start(cls, obj: Path = OBJECT) -> OffloadFlows:
        """Load, self-test and attach (raises OffloadError saying why not)."""
        if not obj.exists():
            raise OffloadError(
                f"{obj} is missing (the package ships it; in a checkout: make bpf, with clang "
                "and libbpf-dev)"
            )
        prog = ChannelRelayProgram(obj)
        attached = []
        try:
            self_test(prog)
            for index, name in ethernet_links():
                try:
                    prog.attach(index)
                except OffloadError as exc:
                    if name == "lo":
                        raise
                    log.warning("kernel fast path: not on %s: %s", name, exc)
                    continue
                attached.append(name)
        except OffloadError:
            prog.close()
            raise
        return cls(prog, attached)

    def cover_new_links(self, every: float = 10.0) -> list[str]:
        """In the process that owns the program: attach it to interfaces that came up
        since (a new VLAN, a container's veth), looked for at most every `every`
        seconds; returns their names."""
        now = time.monotonic()
        if not isinstance(self.prog, ChannelRelayProgram) or now - self._links_checked < every:
            return []
        self._links_checked = now
        added = []
        for index, name in ethernet_links():
            if index in self._indices:
                continue
            try:
                self.prog.attach(index)
            except OffloadError as exc:
                log.warning("kernel fast path: not on %s: %s", name, exc)
                continue
            self._indices.add(index)
            self.interfaces.append(name)
            added.append(name)
            log.info("kernel fast path: now also on %s", name)
        return added

    def close(self) -> None:
        self.prog.close()
        self.routes.close()
        self.installed.clear()

    def active(self) -> int:
        return sum(len(f) for f in self.installed.values())

    def _eligible(self, alloc: Allocation) -> int:
        """The address family (4, 6) whose flows this allocation may offload, or 0:
        UDP, no bandwidth limit, a relayed address of the client's family."""
        ft = alloc.five_tuple
        family = 6 if ":" in ft.client[0] else 4
        if (
            alloc.live
            and ft.transport == ClientTransport.UDP
            and not alloc.rate
            and family in alloc.relays
            and "%" not in ft.client[0]  # scoped (link-local) addresses stay in user space
        ):
            if ft.server[0] in ("0.0.0.0", "::"):
                # a wildcard listener: the address the client sent to is not known here,
                # and the kernel would answer from 0.0.0.0; user space relays these
                self.wildcard_skipped += 1
                if self.wildcard_skipped == 1:
                    log.warning(
                        "kernel fast path: flows of a wildcard listener (%s) stay in user "
                        "space; listen on the host's addresses to relay them in the kernel",
                        ft.server[0],
                    )
                return 0
            return family
        return 0

    def sync(self, alloc: Allocation) -> None:
        """Make the kernel's flows for this allocation match its live channels."""
        ft = alloc.five_tuple
        have = self.installed.get(ft, {})
        want: Flows = {}
        family = self._eligible(alloc)
        to_client = self.routes.next_hop(ft.client[0]) if family else None
        if to_client is not None:
            relay = alloc.relays[family]
            relayed = (_bound_ip(relay.endpoint, ft.server[0]), relay.port)
            for number, (_, peer) in alloc.channel_targets.items():
                if (":" in peer[0]) != (family == 6) or "%" in peer[0]:
                    continue  # across families (a header rewrite cannot), scoped
                to_peer = self.routes.next_hop(peer[0])
                if to_peer is None:  # no unicast route: user space relays and says why
                    continue
                if (to_peer == 0) != (to_client == 0):
                    # One end is an address of this host and the other is not: a packet the
                    # program delivers up the stack would carry our relayed (or listener)
                    # address as its source on the interface it came in by, which the
                    # kernel drops as a martian (only `lo` may bring those). User space
                    # relays these.
                    self.mixed_skipped += 1
                    if self.mixed_skipped == 1:
                        log.info(
                            "kernel fast path: flows between a host on this machine and one "
                            "behind an interface stay in user space"
                        )
                    continue
                want[number] = (
                    ClientFlow(ft.client, ft.server, number, to_client),
                    PeerFlow(relayed, peer, to_peer),
                )
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
        for i, n in enumerate((pp, bp, pc, bc)):
            self.relayed[i] += n
        self._seen[key] = now


def _bound_ip(endpoint: object, fallback: str) -> str:
    """The relay socket's own address; the listener's when it is bound to a wildcard."""
    address = getattr(endpoint, "address", None)
    if not address or address[0] in ("0.0.0.0", "::"):
        return fallback
    return str(address[0])


def start_offload(mode: str, dev: bool) -> OffloadFlows | None:
    """`relay.offload`: off, ebpf (must work: raises OffloadError) or auto (logs why
    not and keeps the uvloop path). With --workers the supervisor calls this and hands
    each worker the maps (FlowMaps.for_worker)."""
    if mode == "off":
        return None
    if dev:
        why = "developer mode impairs media in user space"
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
    assert isinstance(flows.prog, ChannelRelayProgram)
    log.info(
        "kernel fast path on: channel-bound UDP flows, IPv4 and IPv6 (%s ingress on %s)",
        "tcx" if flows.prog.links else "tc",
        ", ".join(flows.interfaces),
    )
    return flows
