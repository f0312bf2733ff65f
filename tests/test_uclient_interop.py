"""coturn's turnutils_uclient (a client we did not write) against our server over UDP."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import require_tool
from .procs import ServerProcess, background, free_port, turnserver_process

SECRET = "uclient-secret"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _ipv6_loopback()


@dataclass
class UclientResult:
    args: list[str]
    output: str

    @property
    def sent_bytes(self) -> int:
        return int(re.findall(r"tot_send_bytes ~ (\d+)", self.output)[-1])

    @property
    def recv_bytes(self) -> int:
        return int(re.findall(r"tot_recv_bytes ~ (\d+)", self.output)[-1])

    @property
    def lost_packets(self) -> int:
        return int(re.findall(r"Total lost packets (\d+)", self.output)[-1])


@dataclass
class Lab:
    server: ServerProcess
    peer_port: int
    uclient: str

    def run(self, *args: str, timeout: float = 120) -> UclientResult:
        cmd = [
            self.uclient,
            "-p",
            str(self.server.port),
            "-r",
            str(self.peer_port),
            *args,
            "127.0.0.1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return UclientResult(list(args), done.stdout + done.stderr)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    uclient = require_tool("turnutils_uclient")
    peer = require_tool("turnutils_peer")
    tmp = tmp_path_factory.mktemp("uclient")
    lo = 30000 + (free_port() % 5000)
    peer_port = free_port()
    v6 = ["-L", "::1"] if HAS_IPV6 else []
    server_args = [
        "--secret",
        SECRET,
        "--user",
        "user:pass",
        "--realm",
        "example.org",
        "--relay-ip",
        "127.0.0.1",
        *(["--relay-ip", "::1"] if HAS_IPV6 else []),
        "--allow-loopback-peers",
        "--min-port",
        str(lo),
        "--max-port",
        str(lo + 999),
        "--log-level",
        "info",
    ]
    with (
        background([peer, "-L", "127.0.0.1", *v6, "-p", str(peer_port)]),
        turnserver_process(Path(tmp), *server_args) as server,
    ):
        yield Lab(server, peer_port, uclient)


BASE = ["-e", "127.0.0.1", "-X", "-g", "-u", "user", "-W", SECRET]
CASES = {
    "channels": BASE,
    "send-indications": [*BASE, "-s"],
    "client-to-client": [*BASE, "-y"],
    "20-clients-200-packets": [*BASE, "-m", "20", "-n", "200"],
    "static-user": ["-e", "127.0.0.1", "-X", "-g", "-u", "user", "-w", "pass"],
    "padding-and-extra-requests": [*BASE, "-D", "-G"],
}
IPV6_CASES = {
    "ipv6-relay": ["-e", "::1", "-x", "-u", "user", "-W", SECRET],
    "dual-allocation": ["-e", "127.0.0.1", "-Z", "-u", "user", "-W", SECRET],
}


def test_uclient_relays_with_zero_loss(lab: Lab) -> None:
    with ThreadPoolExecutor(len(CASES)) as pool:
        results = dict(zip(CASES, pool.map(lambda a: lab.run(*a), CASES.values()), strict=True))
    for name, result in results.items():
        assert "Total lost packets" in result.output, f"{name}: {result.output[-2000:]}"
        assert result.sent_bytes > 0, name
        assert result.recv_bytes == result.sent_bytes, f"{name}: {result.output[-1500:]}"
        assert result.lost_packets == 0, name
    assert results["20-clients-200-packets"].recv_bytes >= 20 * 200 * 100 * 0.99
    log = lab.server.log()
    assert "Traceback" not in log
    assert "allocation created" in log and "allocation ended" in log


@pytest.mark.skipif(not HAS_IPV6, reason="this machine has no IPv6 loopback (::1)")
def test_uclient_ipv6_and_dual_allocations(lab: Lab) -> None:
    with ThreadPoolExecutor(len(IPV6_CASES)) as pool:
        results = dict(
            zip(IPV6_CASES, pool.map(lambda a: lab.run(*a), IPV6_CASES.values()), strict=True)
        )
    for name, result in results.items():
        assert result.sent_bytes > 0, f"{name}: {result.output[-1500:]}"
        assert result.recv_bytes == result.sent_bytes, f"{name}: {result.output[-1500:]}"
        assert result.lost_packets == 0, name


def test_uclient_wrong_password_gets_401(lab: Lab) -> None:
    result = lab.run(
        "-e", "127.0.0.1", "-X", "-u", "user", "-W", "not-the-secret", "-n", "1", timeout=60
    )
    assert "Cannot complete Allocation" in result.output
    assert "tot_recv_bytes" not in result.output
    log = lab.server.log()
    assert re.search(r"allocation refused .*code=401 reason=bad_credentials", log)
