"""The kernel fast path on the NIC path: three network namespaces made for the
test, joined by veth pairs — a client (aioice) in one, our server in the middle, a UDP
echo peer in the third — so that relayed packets leave the server through an interface
(bpf_redirect_neigh), not up its own stack. Needs root, clang, libbpf, ethtool
(.ci/run installs them): fails in CI without them, skips on a laptop.

Two kinds of senders:
- checksums computed by the sender (`ethtool -K tx off`: CHECKSUM_NONE on arrival, what
  a physical NIC delivers): both directions are relayed in the kernel, and the UDP
  checksum the program updates is verified by the receivers' stacks (InCsumErrors 0);
- checksum offload on (CHECKSUM_PARTIAL on arrival, a sender on the same host): the
  program moves the payload, not the UDP header the device will complete the checksum
  at; payloads past 1,536 bytes are passed up (reason checksum_partial).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.kernel import attached_ids, unavailable
from tests.support.server import require_tool
from tests.support.uclient import UclientResult

COUNT = 300
SERVER_IP, CLIENT_IP = "10.80.1.1", "10.80.1.2"
RELAY_IP, PEER_IP = "10.80.2.1", "10.80.2.2"
SERVER6, CLIENT6, RELAY6, PEER6 = "fd00:80:1::1", "fd00:80:1::2", "fd00:80:2::1", "fd00:80:2::2"
METRICS = f"http://{SERVER_IP}:9641/metrics"
ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.80.2.2", 7000))
s.settimeout(120)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def _udp_counters(ns: str) -> dict[str, int]:
    """The namespace's Udp line of /proc/net/snmp."""
    text = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names, values = (line.split()[1:] for line in text.splitlines() if line.startswith("Udp:"))
    return dict(zip(names, map(int, values), strict=True))


@contextmanager
def netlab(sender_checksums: bool, mtu: int = 1500) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    ns = {"srv": f"tsrv-{tag}", "cli": f"tcli-{tag}", "peer": f"tpeer-{tag}"}
    made: list[str] = []
    try:
        for name in ns.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            _ip(name, "link", "set", "lo", "up")
        for side, inner, outer, inner6, outer6 in (
            ("cli", SERVER_IP, CLIENT_IP, SERVER6, CLIENT6),
            ("peer", RELAY_IP, PEER_IP, RELAY6, PEER6),
        ):
            here, there = f"{side}-srv", f"{side}-out"
            link = ["ip", "link", "add", here, "netns", ns["srv"], "type", "veth"]
            subprocess.run([*link, "peer", "name", there, "netns", ns[side]], check=True)
            _ip(ns["srv"], "addr", "add", f"{inner}/24", "dev", here)
            _ip(ns[side], "addr", "add", f"{outer}/24", "dev", there)
            _ip(ns["srv"], "addr", "add", f"{inner6}/64", "dev", here, "nodad")
            _ip(ns[side], "addr", "add", f"{outer6}/64", "dev", there, "nodad")
            _ip(ns["srv"], "link", "set", here, "mtu", str(mtu), "up")
            _ip(ns[side], "link", "set", there, "mtu", str(mtu), "up")
            if sender_checksums:
                subprocess.run(
                    ["ip", "netns", "exec", ns[side], "ethtool", "-K", there, "tx", "off"],
                    check=True,
                    capture_output=True,
                )
        yield ns
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    _, err = proc.communicate()
    return err or ""


def _metrics(ns: dict[str, str], wait: float = 0) -> dict[str, float]:
    """The server's turn_offload_* and turn_relayed_packets_total, read from the client's
    namespace (for up to `wait` seconds while the server starts)."""
    script = "import sys, time, urllib.request\n"
    script += f"deadline = time.monotonic() + {wait}\n"
    script += "while True:\n try:\n"
    script += f"  print(urllib.request.urlopen('{METRICS}', timeout=5).read().decode()); break\n"
    script += " except OSError:\n"
    script += "  if time.monotonic() > deadline: raise\n  time.sleep(0.1)\n"
    text = subprocess.run(
        ["ip", "netns", "exec", ns["cli"], sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=wait + 30,
    ).stdout
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if " " in line)
        if name.startswith(("turn_offload_", "turn_relayed_packets_total"))
    }


def _run(
    ns: dict[str, str],
    client: list[str],
    workers: int = 1,
    peer: list[str] | None = None,
    on_lo: bool = False,
    wildcard: bool = False,
) -> tuple[str, dict[str, float], str, list[list[str]]]:
    """Server and peer started, `client` run in the client's namespace (with `on_lo`,
    client and peer on the server's loopback): its output, the server's metrics after
    it, the server's log, and the programs left attached after stop."""
    serve = ["ip", "netns", "exec", ns["srv"], sys.executable, "-m", "turnserver", "serve"]
    listen = "0.0.0.0" if wildcard else SERVER_IP
    serve += ["--secret", "s", "--listen", f"udp://{listen}:3478", "--relay-ip", RELAY_IP]
    serve += ["--listen", f"udp://[{SERVER6}]:3478", "--relay-ip", RELAY6]
    serve += ["--allow-peer", "10.80.2.0/24", "--allow-peer", "fd00:80:2::/64"]
    serve += ["--offload", "ebpf", "--workers", str(workers)]
    if on_lo:
        serve += ["--listen", "udp://127.0.0.1:3478", "--allow-loopback-peers"]
    serve += ["--metrics-listen", f"{SERVER_IP}:9641", "--probe-interval", "0"]
    where = {"cli": ns["srv"], "peer": ns["srv"]} if on_lo else ns
    echo = ["ip", "netns", "exec", where["peer"], *(peer or [sys.executable, "-c", ECHO])]
    procs = [
        subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for cmd in (serve, echo)
    ]
    try:
        _metrics(ns, wait=30)  # the server is up
        result = subprocess.run(
            ["ip", "netns", "exec", where["cli"], *client],
            capture_output=True,
            text=True,
            timeout=180,
        )
        after = _metrics(ns)
    finally:
        server_log = _stop(procs[0])
        _stop(procs[1])
    assert result.returncode == 0, result.stdout + result.stderr + server_log
    left = [attached_ids(ns["srv"], dev) for dev in ("cli-srv", "peer-srv", "lo")]
    return result.stdout + result.stderr, after, server_log, left


def _aioice(allocations: int, big: bool = False, userspace: bool = False) -> list[str]:
    """The aioice client; `userspace`: no kernel flow is expected (none waited for)."""
    script = str(Path(__file__).parent / "offload_netlab_client.py")
    args = [SERVER_IP, f"{PEER_IP}:7000", METRICS, str(COUNT), str(allocations)]
    return [sys.executable, script, *args, *(["big"] if big else []), *(["userspace"] * userspace)]


@pytest.fixture
def tools(packaged_object: Path) -> None:
    if shutil.which("ethtool") is None:
        unavailable("ethtool is needed to switch the senders' checksum offload")


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize("workers", [1, 2])
def test_nic_path_relays_both_ways_in_the_kernel_with_valid_checksums(workers: int) -> None:
    """With --workers 2 the supervisor loads and attaches the one program and each
    worker installs its allocations' flows in the shared maps."""
    allocations = 1 if workers == 1 else 4
    total = COUNT * allocations
    with netlab(sender_checksums=True) as ns:
        output, _, log, filters = _run(ns, _aioice(allocations), workers)
        counters = {side: _udp_counters(ns[side]) for side in ("cli", "peer")}
    out = json.loads(output.strip().splitlines()[-1])
    m: dict[str, float] = out["metrics"]  # while the allocations were live
    assert out["echoed"] == total, (out, log)
    assert re.search(r"kernel fast path on: .* \(tcx? ingress on lo, cli-srv, peer-srv\)", log)
    assert m["turn_offload_enabled"] == 1 and m["turn_offload_flows_active"] == allocations, m
    kernel_to_peer = m['turn_offload_relayed_packets_total{direction="client_to_peer"}']
    kernel_to_client = m['turn_offload_relayed_packets_total{direction="peer_to_client"}']
    # aioice sends its first datagrams as Send indications, then binds a channel
    assert total - 10 * allocations <= kernel_to_peer <= total, m
    assert total - 10 * allocations <= kernel_to_client <= total, m
    assert m['turn_relayed_packets_total{direction="client_to_peer"}'] == total, m
    assert m['turn_relayed_packets_total{direction="peer_to_client"}'] == total, m
    assert m['turn_offload_passed_up_total{reason="checksum_partial"}'] == 0, m
    # the receivers' stacks verified every checksum the program wrote
    for side, udp in counters.items():
        assert udp["InCsumErrors"] == 0 and udp["InErrors"] == 0, (side, udp)
        assert udp["InDatagrams"] >= total, (side, udp)
    assert filters == [[], [], []]  # detached from every interface on stop


@pytest.mark.usefixtures("tools")
def test_a_wildcard_listener_keeps_its_flows_in_user_space() -> None:
    """udp://0.0.0.0 with the kernel path: the program cannot know which of the host's
    addresses a client sent to (it answered from 0.0.0.0, one-way media), so these flows
    stay in user space, say so once, and every datagram comes back."""
    with netlab(sender_checksums=True) as ns:
        output, _, log, filters = _run(ns, _aioice(2, userspace=True), workers=2, wildcard=True)
    out = json.loads(output.strip().splitlines()[-1])
    m: dict[str, float] = out["metrics"]
    assert out["echoed"] == 2 * COUNT, (out, log)
    assert m["turn_offload_enabled"] == 1 and m["turn_offload_flows_active"] == 0, m
    assert m['turn_relayed_packets_total{direction="peer_to_client"}'] == 2 * COUNT, m
    assert m['turn_offload_relayed_packets_total{direction="peer_to_client"}'] == 0, m
    assert "flows of a wildcard listener (0.0.0.0) stay in user space" in log
    assert filters == [[], [], []]


@pytest.mark.usefixtures("tools")
def test_nic_path_moves_the_payload_of_checksum_partial_packets() -> None:
    """Senders on this host (checksum offload on): relayed in the kernel all the same,
    checksums completed right by the devices; 3,000-byte datagrams (MTU 4,000) are
    past what the program moves and go up, counted."""
    big = COUNT // 10
    with netlab(sender_checksums=False, mtu=4000) as ns:
        output, _, log, filters = _run(ns, _aioice(1, big=True))
        counters = {side: _udp_counters(ns[side]) for side in ("cli", "peer")}
    out = json.loads(output.strip().splitlines()[-1])
    m: dict[str, float] = out["metrics"]
    assert out["echoed"] == COUNT, (out, log)
    assert m["turn_offload_flows_active"] == 1, m
    for direction in ("client_to_peer", "peer_to_client"):
        kernel = m[f'turn_offload_relayed_packets_total{{direction="{direction}"}}']
        assert COUNT - big - 10 <= kernel <= COUNT - big, m
        assert m[f'turn_relayed_packets_total{{direction="{direction}"}}'] == COUNT, m
    assert m['turn_offload_passed_up_total{reason="checksum_partial"}'] == 2 * big, m
    for side, udp in counters.items():
        assert udp["InCsumErrors"] == 0 and udp["InErrors"] == 0, (side, udp)
        assert udp["InDatagrams"] >= COUNT, (side, udp)
    assert filters == [[], [], []]


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize(
    ("family", "sender_checksums"),
    [(4, True), (6, False), ("lo", False)],  # IPv4 PARTIAL: the aioice tests above
    ids=["ipv4-csum-none", "ipv6-csum-partial", "lo"],
)
def test_uclient_relays_through_the_kernel_path_with_zero_loss(
    family: int | str, sender_checksums: bool
) -> None:
    """coturn's turnutils_uclient (channels, 10 clients x 100 packets of 100 bytes) and
    turnutils_peer across the namespaces; IPv4, and IPv6 end to end (client, relayed
    address and peer); checksums computed by the senders or left to the devices; and
    all three on the server's loopback (delivered up its own stack)."""
    uclient, peer = require_tool("turnutils_uclient"), require_tool("turnutils_peer")
    server, peer_ip, relay_family = {
        4: (SERVER_IP, PEER_IP, "-X"),
        6: (SERVER6, PEER6, "-x"),
        "lo": ("127.0.0.1", "127.0.0.1", "-X"),
    }[family]
    client = [uclient, "-e", peer_ip, "-r", "7000", relay_family, "-g", "-u", "user", "-W", "s"]
    client += ["-m", "10", "-n", "100", "-p", "3478", server]
    peer_cmd = [peer, "-L", peer_ip, "-p", "7000"]
    with netlab(sender_checksums) as ns:
        output, m, log, filters = _run(ns, client, peer=peer_cmd, on_lo=family == "lo")
        counters = {side: _udp_counters(ns[side]) for side in ("cli", "srv", "peer")}
    result = UclientResult([], output)
    assert result.lost_packets == 0 and result.sent_bytes >= 10 * 100 * 100, output[-1500:]
    assert result.recv_bytes == result.sent_bytes, output[-1500:]
    sent = m['turn_relayed_packets_total{direction="client_to_peer"}']
    kernel = m['turn_offload_relayed_packets_total{direction="client_to_peer"}']
    # uclient binds its channels before sending: nearly all of it went through the kernel
    assert sent >= 10 * 100 and kernel >= 0.9 * sent, m
    assert m['turn_offload_relayed_packets_total{direction="peer_to_client"}'] >= 0.9 * sent, m
    assert m["turn_offload_flows_active"] == 0, m  # uclient ended its allocations
    for side, udp in counters.items():
        assert udp["InCsumErrors"] == 0, (side, udp)
    assert filters == [[], [], []] and "Traceback" not in log
