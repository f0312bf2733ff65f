"""The kernel fast path's BPF program (io/kernel/channel_relay.bpf.c): BPF_PROG_TEST_RUN on
crafted frames (byte-exact strip and add, IP checksums, counters, every pass-up case),
then real sockets on the `lo` of a network namespace made for the test. Needs root,
clang and libbpf (.ci/run installs them): fails in CI without them, skips on a laptop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.kernel import attached_ids, unavailable
from turnserver.io.kernel.program import (
    SOURCE,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_UNSPEC,
    ChannelRelayProgram,
    ClientFlow,
    OffloadError,
    PeerFlow,
    clang_command,
)

CLIENT, SERVER = ("127.0.0.2", 40000), ("127.0.0.1", 3478)
RELAY, PEER = ("127.0.0.1", 50000), ("127.0.0.3", 60000)
CHANNEL = 0x4000


@pytest.fixture
def program(bpf_object: Path) -> Iterator[ChannelRelayProgram]:
    try:
        prog = ChannelRelayProgram(bpf_object)
    except OffloadError as exc:
        unavailable(str(exc))
    prog.add(ClientFlow(CLIENT, SERVER, CHANNEL), PeerFlow(RELAY, PEER))
    yield prog
    prog.close()


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(
    src: tuple[str, int],
    dst: tuple[str, int],
    payload: bytes,
    *,
    options: bytes = b"",
    frag: int = 0,
    udp_check: int | None = 0x1234,
    ttl: int = 64,
) -> bytes:
    """Ethernet + IPv4 + UDP, IP checksum right; the UDP checksum as given (delivered
    locally the program writes 0), or None: computed (RFC 768, pseudo-header)."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), udp_check or 0) + payload
    if udp_check is None:
        pseudo = socket.inet_aton(src[0]) + socket.inet_aton(dst[0])
        pseudo += struct.pack("!HH", 17, len(udp))
        check = checksum(pseudo + udp + b"\0" * (len(udp) % 2)) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ihl = 5 + len(options) // 4
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(udp),
        7,
        frag,
        ttl,
        17,
        0,
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    ip += options
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytes(12) + b"\x08\x00" + ip + udp


def channel_data(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HH", CHANNEL, len(payload) if length is None else length) + payload


@pytest.mark.parametrize("size", [1, 4, 100, 1000, 1472])
def test_client_to_peer_strips_the_header(program: ChannelRelayProgram, size: int) -> None:
    payload = os.urandom(size)
    verdict, out = program.test_run(frame(CLIENT, SERVER, channel_data(payload)))
    assert verdict == TC_ACT_OK
    # what a packet from the relayed address to the peer is, built independently
    assert out == frame(RELAY, PEER, payload, udp_check=0, ttl=63)
    assert checksum(out[14:34]) == 0
    assert program.counters(ClientFlow(CLIENT, SERVER, CHANNEL), PeerFlow(RELAY, PEER))[:2] == (
        1,
        size,
    )


@pytest.mark.parametrize("size", [1, 4, 100, 1000, 1468])
def test_peer_to_client_adds_the_header(program: ChannelRelayProgram, size: int) -> None:
    payload = os.urandom(size)
    verdict, out = program.test_run(frame(PEER, RELAY, payload))
    assert verdict == TC_ACT_OK
    assert out == frame(SERVER, CLIENT, channel_data(payload), udp_check=0, ttl=63)
    assert checksum(out[14:34]) == 0
    assert program.counters(ClientFlow(CLIENT, SERVER, CHANNEL), PeerFlow(RELAY, PEER))[2:] == (
        1,
        size,
    )


@pytest.fixture
def remote(bpf_object: Path) -> Iterator[ChannelRelayProgram]:
    """The same binding with client and peer behind an interface (lo's index: the test
    run reports the redirect and does not perform it)."""
    try:
        prog = ChannelRelayProgram(bpf_object)
    except OffloadError as exc:
        unavailable(str(exc))
    lo = socket.if_nametoindex("lo")
    prog.add(ClientFlow(CLIENT, SERVER, CHANNEL, lo), PeerFlow(RELAY, PEER, lo))
    yield prog
    prog.close()


@pytest.mark.parametrize("size", [0, 1, 3, 100, 1000, 1472])
def test_to_another_host_the_udp_checksum_is_updated(
    remote: ChannelRelayProgram, size: int
) -> None:
    payload = os.urandom(size)
    cd = channel_data(payload)
    for src, dst, data, want_src, want_dst, want in (
        (CLIENT, SERVER, cd, RELAY, PEER, payload),
        (PEER, RELAY, payload, SERVER, CLIENT, cd),
    ):
        verdict, out = remote.test_run(frame(src, dst, data, udp_check=None))
        assert verdict == TC_ACT_REDIRECT
        # the checksum computed independently over the new packet
        assert out == frame(want_src, want_dst, want, udp_check=None, ttl=63)
        # a sender without a checksum (IPv4 allows 0) gets none
        verdict, out = remote.test_run(frame(src, dst, data, udp_check=0))
        assert (verdict, out[40:42]) == (TC_ACT_REDIRECT, b"\0\0")


def test_to_another_host_ttl_1_goes_up(remote: ChannelRelayProgram) -> None:
    for packet in (
        frame(CLIENT, SERVER, channel_data(b"abc"), ttl=1),
        frame(PEER, RELAY, b"abc", ttl=0),
    ):
        assert remote.test_run(packet) == (TC_ACT_UNSPEC, packet)
    assert remote.pass_reasons()["ttl"] == 2


CLIENT6, SERVER6 = ("fd00:80::2", 40000), ("fd00:80::1", 3478)
RELAY6, PEER6 = ("fd00:80::1", 50000), ("fd00:80::3", 60000)


def frame6(
    src: tuple[str, int],
    dst: tuple[str, int],
    payload: bytes,
    *,
    hops: int = 64,
    next_header: int = 17,
    udp_check: int | None = None,
) -> bytes:
    """Ethernet + IPv6 + UDP; the UDP checksum computed (RFC 8200 §8.1) unless given."""
    addresses = socket.inet_pton(socket.AF_INET6, src[0]) + socket.inet_pton(
        socket.AF_INET6, dst[0]
    )
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    if udp_check is None:
        pseudo = addresses + struct.pack("!II", len(udp), 17)
        udp_check = checksum(pseudo + udp + b"\0" * (len(udp) % 2)) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_check) + udp[8:]
    ip = struct.pack("!IHBB", 0x6000_0000 | 0x12345, len(udp), next_header, hops) + addresses
    return bytes(12) + b"\x86\xdd" + ip + udp


@pytest.mark.parametrize("where", ["local", "remote"])
@pytest.mark.parametrize("size", [0, 1, 3, 100, 1000, 1452])
def test_ipv6_both_ways_with_checksums(bpf_object: Path, where: str, size: int) -> None:
    """IPv6: no header checksum, the UDP checksum mandatory, so it is updated whether the
    packet goes up this host's stack or out of an interface; hop limit decremented."""
    try:
        prog = ChannelRelayProgram(bpf_object)
    except OffloadError as exc:
        unavailable(str(exc))
    ifindex = socket.if_nametoindex("lo") if where == "remote" else 0
    flows = ClientFlow(CLIENT6, SERVER6, CHANNEL, ifindex), PeerFlow(RELAY6, PEER6, ifindex)
    prog.add(*flows)
    try:
        verdict_ok = TC_ACT_REDIRECT if ifindex else TC_ACT_OK
        payload = os.urandom(size)
        cd = channel_data(payload)
        verdict, out = prog.test_run(frame6(CLIENT6, SERVER6, cd))
        assert (verdict, out) == (verdict_ok, frame6(RELAY6, PEER6, payload, hops=63))
        verdict, out = prog.test_run(frame6(PEER6, RELAY6, payload))
        assert (verdict, out) == (verdict_ok, frame6(SERVER6, CLIENT6, cd, hops=63))
        assert prog.counters(*flows) == (1, size, 1, size)
        for packet, reason in (
            (frame6(CLIENT6, SERVER6, cd, hops=1), "ttl"),
            (frame6(PEER6, RELAY6, payload, udp_check=0), "ipv6_zero_checksum"),  # RFC 8200
            (frame6(PEER6, RELAY6, payload, next_header=0), None),  # an extension header
            (frame6(CLIENT6, SERVER6, cd + b"\0"), "length"),
        ):
            before = prog.pass_reasons()
            assert prog.test_run(packet) == (TC_ACT_UNSPEC, packet)
            after = prog.pass_reasons()
            assert {k for k in after if after[k] != before[k]} == ({reason} if reason else set())
        assert prog.remove(*flows) == (1, size, 1, size)
    finally:
        prog.close()


def test_everything_else_goes_up_unchanged_and_counted(program: ChannelRelayProgram) -> None:
    cases = {
        # unknown flows: another channel, another client, a peer without a binding
        "other channel": (frame(CLIENT, SERVER, b"\x40\x01\x00\x02ab"), None),
        "other client": (frame(("127.0.0.9", 1), SERVER, channel_data(b"ab")), None),
        "other peer": (frame(("127.0.0.9", 1), RELAY, b"data"), None),
        "a STUN message": (frame(CLIENT, SERVER, b"\x00\x01\x00\x00" + bytes(16)), None),
        # known flows the program is not sure of
        "padded": (frame(CLIENT, SERVER, channel_data(b"abc") + b"\x00"), "length"),
        "truncated": (frame(CLIENT, SERVER, channel_data(b"abc", 9)), "length"),
        "fragment (MF)": (frame(PEER, RELAY, b"data", frag=0x2000), "fragment"),
        "fragment (offset)": (frame(CLIENT, SERVER, channel_data(b"ab"), frag=5), "fragment"),
        "IP options": (frame(PEER, RELAY, b"data", options=b"\x01\x01\x01\x00"), "ip_options"),
    }
    for name, (packet, reason) in cases.items():
        before = program.pass_reasons()
        verdict, out = program.test_run(packet)
        assert verdict == TC_ACT_UNSPEC and out == packet, name
        after = program.pass_reasons()
        changed = {k for k in after if after[k] != before[k]}
        assert changed == ({reason} if reason else set()), (name, changed)
    packet = frame(PEER, RELAY, b"x" * 600)  # a GSO super-packet of two segments
    verdict, out = program.test_run(packet, gso_size=300)
    assert verdict == TC_ACT_UNSPEC and out == packet
    assert program.pass_reasons()["gso"] == 1
    assert program.counters(ClientFlow(CLIENT, SERVER, CHANNEL), PeerFlow(RELAY, PEER)) == (
        0,
        0,
        0,
        0,
    )


def test_removed_flows_are_not_relayed_and_keep_their_last_counts(
    program: ChannelRelayProgram,
) -> None:
    client, peer = ClientFlow(CLIENT, SERVER, CHANNEL), PeerFlow(RELAY, PEER)
    program.test_run(frame(CLIENT, SERVER, channel_data(b"12345")))
    program.test_run(frame(PEER, RELAY, b"123"))
    assert program.remove(client, peer) == (1, 5, 1, 3)
    packet = frame(CLIENT, SERVER, channel_data(b"12345"))
    assert program.test_run(packet) == (TC_ACT_UNSPEC, packet)
    assert program.remove(client, peer) == (0, 0, 0, 0)


def test_real_sockets_on_lo_in_a_namespace(bpf_object: Path) -> None:
    """Locally generated datagrams (CHECKSUM_PARTIAL on lo), both ways, byte-exact."""
    if shutil.which("ip") is None:
        unavailable("iproute2 is needed for network namespaces")
    ns = f"turnoffload-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                str(Path(__file__).parent / "offload_lo_check.py"),
                str(bpf_object),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["to_peer_exact"] == 100 and out["to_client_exact"] == 100, out
    assert out["user_space_saw_nothing"], out
    assert out["udp_errors"] == [0, 0], out  # InErrors, InCsumErrors
    sizes = sum(1 + i * 13 for i in range(100))
    assert out["counters"] == [100, sizes, 100, sizes], out
    assert out["mtu_passed_up"] and out["pass_reasons"]["mtu"] == 1, out
    assert out["removed"] == [100, sizes, 100, sizes]
    assert out["after_removal_user_space"], out


# ---- the server with relay.offload ---------------------------------------------------


def _in_netns(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    ns = f"turnoffload-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        script = " && ".join(["ip link set lo up", *cmd])
        return subprocess.run(
            ["ip", "netns", "exec", ns, "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_server_relays_channels_in_the_kernel(packaged_object: Path) -> None:
    """aioice through our server with relay.offload ebpf: the channel's packets are
    relayed by the kernel, counted in the allocation and the metrics; an expired
    permission removes the flow at once and aioice's channel refresh brings it back; a
    peer policy that now denies the peer removes the flow at once; Refresh 0 ends it with the
    kernel's counts in the allocation's last numbers; stopping detaches the program."""
    script = Path(__file__).parent / "offload_server_check.py"
    result = _in_netns(f"{sys.executable} {script}")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["echoed"] == 200, out
    assert out["flows"] == 1
    assert out["kernel_counts"][0] >= 190 and out["kernel_counts"][2] >= 190, out
    assert out["alloc_counts"] == [200, 200], out  # user-space and kernel counts together
    assert "turn_offload_enabled 1.0" in out["metrics"]
    assert "turn_offload_flows_active 1.0" in out["metrics"]
    assert out["flows_after_expiry"] == 0 and out["expired_delivered"] is False, out
    assert out["refreshed_delivered"] is True and out["flows_after_refresh"] == 1, out
    assert out["flows_after_deny"] == 0 and out["denied_delivered"] is False, out
    assert out["ended_counts"] == [201, 201], out  # the refreshed packet, both ways
    assert out["flows_at_end"] == 0 and out["tc_after_stop"] == "", out


def test_a_killed_server_leaves_one_program_at_most(packaged_object: Path) -> None:
    """SIGKILL gives no chance to detach: with a tcx link the kernel detaches the
    program when the process's descriptors close; with a TC filter (kernels before 6.6)
    the next start replaces the stale one. One program at most, the new one; a clean
    stop leaves none."""
    ns = f"turnoffload-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    serve = ["ip", "netns", "exec", ns, sys.executable, "-m", "turnserver", "serve"]
    serve += ["--secret", "s", "--listen", "udp://127.0.0.1:3478", "--offload", "ebpf"]
    serve += ["--metrics-listen", "off", "--workers", "1", "--probe-interval", "0"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        procs.append(subprocess.Popen(serve, stderr=subprocess.DEVNULL))
        wait_until(lambda: len(attached_ids(ns)) == 1, 15)
        (first,) = attached_ids(ns)
        procs[0].kill()
        procs[0].wait()
        left = attached_ids(ns)
        # a link goes with the process; a TC filter stays until someone removes it
        assert left == ([] if first.startswith("tcx:") else [first])
        procs.append(subprocess.Popen(serve, stderr=subprocess.DEVNULL))
        wait_until(lambda: attached_ids(ns) not in ([], [first]), 15)
        assert len(attached_ids(ns)) == 1
        procs[1].send_signal(signal.SIGINT)
        procs[1].wait(15)
        assert attached_ids(ns) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_without_privileges_auto_falls_back_and_ebpf_refuses(packaged_object: Path) -> None:
    """No CAP_BPF/CAP_NET_ADMIN (every capability dropped): `auto` logs why and serves
    on the uvloop path; `ebpf` refuses to start and says why."""
    if shutil.which("setpriv") is None:
        unavailable("setpriv (util-linux) is needed to drop capabilities")
    from turnserver.testing import free_port, stun_ping

    drop = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"]
    port = free_port()
    base = [sys.executable, "-m", "turnserver", "serve", "--secret", "s", "--workers", "1"]
    base += ["--listen", f"udp://127.0.0.1:{port}", "--metrics-listen", "off"]
    refused = subprocess.run(
        [*drop, *base, "--offload", "ebpf"], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 1
    assert "cannot load the BPF program (it needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON" in (
        refused.stderr
    )
    assert "this process lacks CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF" in refused.stderr
    proc = subprocess.Popen([*drop, *base, "--offload", "auto"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not stun_ping(("127.0.0.1", port)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stun_ping(("127.0.0.1", port))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert "kernel fast path off (auto): cannot load the BPF program" in err


def test_a_full_map_refuses_a_flow_whole(program: ChannelRelayProgram) -> None:
    """65,536 bindings fill the maps: the next add fails with OffloadError and leaves no
    half-installed direction behind (the server then keeps that flow in user space)."""
    added = 1  # the fixture's flow
    for i in range(70_000):
        client = ClientFlow(("127.0.1.1", 1 + i % 60000), SERVER, 0x4000 + i // 60000)
        peer = PeerFlow(RELAY, ("127.0.2.1", 1 + i % 60000 + (i // 60000)))
        try:
            program.add(client, peer)
        except OffloadError:
            assert program.counters(client, peer) == (0, 0, 0, 0)
            packet = frame(client.client, SERVER, struct.pack("!HH", client.channel, 1) + b"x")
            assert program.test_run(packet) == (TC_ACT_UNSPEC, packet)  # not half relayed
            break
        added += 1
    assert added == 65536


def _install_in_child(maps: Any, port: int) -> None:  # runs in a spawned process
    maps.add(ClientFlow(("127.0.5.1", port), SERVER, CHANNEL), PeerFlow(RELAY, ("127.0.6.1", port)))


def test_workers_share_the_maps_and_a_dead_workers_flows_are_purged(
    program: ChannelRelayProgram,
) -> None:
    """The supervisor hands each spawned worker the maps (the descriptors go with the
    pickle); what a worker installs is relayed by the one program, marked as its own,
    and removed by purge(index) when it dies, leaving the others' flows alone."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for index, port in ((1, 1001), (2, 1002)):
        proc = ctx.Process(target=_install_in_child, args=(program.for_worker(index), port))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
    packet = frame(("127.0.5.1", 1001), SERVER, channel_data(b"from worker 1"))
    assert program.test_run(packet)[1] == frame(
        RELAY, ("127.0.6.1", 1001), b"from worker 1", udp_check=0, ttl=63
    )
    assert program.purge(1) == 2  # both directions of worker 1's flow
    assert program.test_run(packet) == (TC_ACT_UNSPEC, packet)
    flows = (ClientFlow(("127.0.5.1", 1002), SERVER, CHANNEL), PeerFlow(RELAY, ("127.0.6.1", 1002)))
    program.test_run(frame(("127.0.5.1", 1002), SERVER, channel_data(b"still here")))
    assert program.counters(*flows)[:2] == (1, 10)
    assert program.purge(0) == 2  # the fixture's flow, installed by this process
    assert program.counters(*flows)[:2] == (1, 10)


COVER = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from turnserver.io.kernel.flows import OffloadFlows
flows = OffloadFlows.start()
print(flows.interfaces)
subprocess.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
print(flows.cover_new_links(every=60))  # checked less than a minute ago: not yet
subprocess.run(["ip", "link", "set", "d0", "up"], check=True)
print(flows.cover_new_links(every=0))
print(flows.cover_new_links(every=0))
import socket
from turnserver.io.kernel.program import tcx_program_ids
def ours():
    tc = subprocess.run(["tc", "filter", "show", "dev", "d0", "ingress"],
                        capture_output=True, text=True).stdout
    return bool(tcx_program_ids(socket.if_nametoindex("d0"))) or "0x7475" in tc
print("ours" if ours() else "none")
flows.close()
print("attached" if ours() else "detached")
"""


def test_an_interface_that_comes_up_later_is_covered(packaged_object: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    result = _in_netns(f"{sys.executable} -c '{COVER}' {root}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:6] == ["['lo']", "[]", "['d0']", "[]", "ours", "detached"]


def test_the_shipped_object_is_built_from_its_source(tmp_path: Path) -> None:
    """The package ships channel_relay.bpf.o (installed servers need no compiler); it
    must be what `make bpf` builds from the C source of the same tree, byte for byte."""
    if shutil.which("clang") is None or not Path("/usr/include/bpf/bpf_helpers.h").exists():
        unavailable("clang and libbpf-dev are needed to rebuild the BPF object")
    from turnserver.io.kernel.flows import OBJECT

    rebuilt = tmp_path / "channel_relay.bpf.o"
    subprocess.run(clang_command(SOURCE, rebuilt), check=True)
    assert OBJECT.read_bytes() == rebuilt.read_bytes(), (
        "turnserver/io/kernel/channel_relay.bpf.o is out of date: run `make bpf` and commit it"
    )


@pytest.mark.parametrize(
    ("cap_eff", "seccomp", "said"),
    [
        ("0000000000000000", "0", "lacks CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF"),
        ("0000000000001000", "2", "lacks CAP_PERFMON, CAP_BPF"),  # NET_ADMIN only
        ("000000c000001000", "2", "a seccomp filter refuses bpf(2)"),  # a container's default
        ("000000c000001000", "0", ""),  # nothing visible is missing
        ("0000000000200000", "0", ""),  # CAP_SYS_ADMIN covers both (kernels before 5.8)
    ],
)
def test_auto_says_which_privilege_is_missing(
    tmp_path: Path, cap_eff: str, seccomp: str, said: str
) -> None:
    from turnserver.io.kernel.program import privileges_missing

    status = tmp_path / "status"
    status.write_text(f"Name:\tpython3\nCapEff:\t{cap_eff}\nSeccomp:\t{seccomp}\n")
    found = privileges_missing(str(status))
    assert (said in found) if said else found == "", found
