"""coturn's turnutils_uclient (a client we did not write) against our server:
UDP, TCP and TLS, channels and Send indications, client-to-client, IPv6 and dual
allocations, many clients; zero loss, parsed from its output (its exit code is 0
even on loss)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import ServerProcess, background, free_port, turnserver_process
from tests.support.server import require_tool
from tests.support.uclient import UclientResult
from turnserver.ops.dev.selfsigned import ensure_self_signed

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
class Lab:
    server: ServerProcess
    peer_port: int
    tls_port: int
    uclient: str

    def run(self, *args: str, timeout: float = 120) -> UclientResult:
        port = self.tls_port if "-S" in args else self.server.port
        cmd = [self.uclient, "-p", str(port), "-r", str(self.peer_port), *args, "127.0.0.1"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return UclientResult(list(args), done.stdout + done.stderr)

    def run_all(self, cases: dict[str, list[str]]) -> dict[str, UclientResult]:
        with ThreadPoolExecutor(len(cases)) as pool:
            results = pool.map(lambda a: self.run(*a), cases.values())
            return dict(zip(cases, results, strict=True))


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("uvloop", None), id="uvloop-default-workers"),
        pytest.param(("uvloop", 1), id="uvloop-one-worker"),
        pytest.param(("asyncio", None), id="asyncio-default-workers"),
    ],
)
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """Our server (as a process, on each event loop, with the default worker count and
    with one) with coturn's echo peer."""
    loop, workers = request.param
    uclient = require_tool("turnutils_uclient")
    peer = require_tool("turnutils_peer")
    tmp = tmp_path_factory.mktemp("uclient")
    # below the ephemeral range (32768-60999), where client sockets could hold a reserved
    # relay port (RFC 8656 EVEN-PORT) between its reservation and its use
    lo = 20000 + (os.getpid() % 10) * 1000
    peer_port = free_port()
    tls_port = free_port(socket.SOCK_STREAM)
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    ensure_self_signed(cert, key, ["localhost", "127.0.0.1"])
    v6 = ["-L", "::1"] if HAS_IPV6 else []
    server_args = [
        "--secret", SECRET, "--user", "user:pass", "--realm", "example.org",
        "--relay-ip", "127.0.0.1", *(["--relay-ip", "::1"] if HAS_IPV6 else []),
        "--allow-loopback-peers", "--min-port", str(lo), "--max-port", str(lo + 999),
        "--log-level", "info", "--cert", cert, "--key", key, "--loop", loop,
    ]  # fmt: skip

    with (
        background([peer, "-L", "127.0.0.1", *v6, "-p", str(peer_port)]),
        turnserver_process(
            Path(tmp), *server_args, streams=True, tls_port=tls_port, workers=workers
        ) as server,
    ):
        yield Lab(server, peer_port, tls_port, uclient)


BASE = ["-e", "127.0.0.1", "-X", "-g", "-u", "user", "-W", SECRET]
CASES = {
    "channels": BASE,
    "send-indications": [*BASE, "-s"],
    "client-to-client": [*BASE, "-y"],
    "20-clients-200-packets": [*BASE, "-m", "20", "-n", "200"],
    "static-user": ["-e", "127.0.0.1", "-X", "-g", "-u", "user", "-w", "pass"],
    "padding-and-extra-requests": [*BASE, "-D", "-G"],
}
STREAM_CASES = {
    "tcp": [*BASE, "-t"],
    "tcp-10-clients-odd-size": [*BASE, "-t", "-m", "10", "-n", "100", "-l", "101"],
    "tcp-send-indications": [*BASE, "-t", "-s"],
    "tls": [*BASE, "-t", "-S"],
    "tls-10-clients": [*BASE, "-t", "-S", "-m", "10", "-n", "100"],
    "tls-client-to-client": [*BASE, "-t", "-S", "-y"],
    "rfc6062-tcp-relay": ["-e", "127.0.0.1", "-u", "user", "-W", SECRET, "-T"],
    "rfc6062-tcp-relay-5-clients": ["-e", "127.0.0.1", "-u", "user", "-W", SECRET, "-T", "-m", "5"],
    "rfc6062-over-tls": ["-e", "127.0.0.1", "-u", "user", "-W", SECRET, "-T", "-S"],
}

IPV6_CASES = {
    "ipv6-relay": ["-e", "::1", "-x", "-u", "user", "-W", SECRET],
    "dual-allocation": ["-e", "127.0.0.1", "-Z", "-u", "user", "-W", SECRET],
}


def _assert_zero_loss(results: dict[str, UclientResult], server_log: str = "") -> None:
    for name, result in results.items():
        refused = [ln for ln in server_log.splitlines() if "refused" in ln or "WARNING" in ln]
        assert "Total lost packets" in result.output, (
            f"{name}: {result.output[-2000:]}\nserver: {refused[-20:]}"
        )
        assert result.sent_bytes > 0, name
        assert result.recv_bytes == result.sent_bytes, f"{name}: {result.output[-1500:]}"
        assert result.lost_packets == 0, name


def test_uclient_udp_relays_with_zero_loss(lab: Lab) -> None:
    results = lab.run_all(CASES)
    _assert_zero_loss(results, lab.server.log())
    assert results["20-clients-200-packets"].recv_bytes >= 20 * 200 * 100
    log = lab.server.log()
    assert "Traceback" not in log
    assert "allocation created" in log and "allocation ended" in log


def test_uclient_tcp_and_tls_relay_with_zero_loss(lab: Lab) -> None:
    results = lab.run_all(STREAM_CASES)
    _assert_zero_loss(results, lab.server.log())
    log = lab.server.log()
    assert "five_tuple=tls:" in log and "five_tuple=tcp:" in log
    assert "Traceback" not in log


@pytest.mark.skipif(not HAS_IPV6, reason="this machine has no IPv6 loopback (::1)")
def test_uclient_ipv6_and_dual_allocations(lab: Lab) -> None:
    _assert_zero_loss(lab.run_all(IPV6_CASES), lab.server.log())


def test_uclient_wrong_password_gets_401(lab: Lab) -> None:
    result = lab.run(
        "-e", "127.0.0.1", "-X", "-u", "user", "-W", "not-the-secret", "-n", "1", timeout=60
    )
    assert "Cannot complete Allocation" in result.output
    assert "tot_recv_bytes" not in result.output
    log = lab.server.log()
    assert re.search(r"allocation refused .*code=401 reason=bad_credentials", log)


def test_uclient_rfc6062_client_to_client_in_a_loop(lab: Lab) -> None:
    """uclient -T without -e: its TCP allocations Connect to each other's relayed
    addresses on this same server. Run repeatedly, two at a time, so a race between
    ConnectionAttempt and ConnectionBind would show (it was reported in 2 of 4 runs)."""
    cases = {f"c2c-{i}": ["-u", "user", "-W", SECRET, "-T"] for i in range(6)}
    results = lab.run_all(dict(list(cases.items())[:3]))
    results |= lab.run_all(dict(list(cases.items())[3:]))
    for name, result in results.items():
        assert "bind error" not in result.output, f"{name}: {result.output[-1500:]}"
    _assert_zero_loss(results, lab.server.log())
