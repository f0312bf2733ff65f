"""Preflight on real paths: a delaying, lossy forwarder of ours between the preflight
client and a server with the default worker count (this kernel has no netem). The
verdicts must hold at 0, 50, 150 and 400 ms round trip, with jitter and with loss:
a far server works (with its real round trip), a lossy path works but is poor, a
blocked one does not work."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.netem import PathSpec, TcpPath, UdpPath
from tests.support.procs import free_port, loopback_args, turnserver_process
from tests.support.server import CERT_FILE, KEY_FILE
from turnserver.client.ice_uri import IceUri, parse_uri
from turnserver.client.preflight import PathResult, run
from turnserver.client.quality import FAILS, POOR, WORKS
from turnserver.ops.http.credentials import mint

SECRET = "preflight-paths-secret"
pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


@dataclass
class Target:
    udp: tuple[str, int]
    tcp: tuple[str, int]
    tls: tuple[str, int]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("preflight-paths")
    tls_port = free_port(socket.SOCK_STREAM)
    lo = 27000 + os.getpid() % 500
    with turnserver_process(
        tmp,
        *loopback_args(SECRET, lo, lo + 399),
        "--cert",
        CERT_FILE,
        "--key",
        KEY_FILE,
        "--probe-interval",
        "0",
        streams=True,
        tls_port=tls_port,
        workers=None,
    ) as server:
        yield Target(
            ("127.0.0.1", server.port), ("127.0.0.1", server.port), ("127.0.0.1", tls_port)
        )


def _ctx() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=CERT_FILE)  # the host name is checked too


async def _measure(
    target: Target, transports: tuple[str, ...], timeout: float = 5.0, **spec: float
) -> dict[str, PathResult]:
    """Preflight through forwarders with `spec` on each crossing, one per transport."""
    cred = mint(SECRET, "preflight", 600, time.time())
    paths: list[UdpPath | TcpPath] = []
    uris: list[IceUri] = []
    try:
        for n, transport in enumerate(transports):
            path_spec = PathSpec(seed=n + 1, **spec)
            if transport == "udp":
                udp = await UdpPath.start(target.udp, path_spec)
                paths.append(udp)
                uri = f"turn:127.0.0.1:{udp.port}?transport=udp"
            elif transport == "tcp":
                tcp = await TcpPath.start(target.tcp, path_spec)
                paths.append(tcp)
                uri = f"turn:127.0.0.1:{tcp.port}?transport=tcp"
            else:
                tls = await TcpPath.start(target.tls, path_spec)
                paths.append(tls)
                uri = f"turns:127.0.0.1:{tls.port}?transport=tcp"
            uris.append(parse_uri(uri, cred.username, cred.password))
        report = await run(uris, packets=100, timeout=timeout, ssl_context=_ctx())
    finally:
        for p in paths:
            p.close()
    return {p.transport: p for p in report.paths}


ALL = ("udp", "tcp", "tls")


@pytest.mark.parametrize(
    ("one_way_ms", "low", "high"),
    [(0, 0, 15), (25, 40, 80), (75, 135, 190), (200, 380, 470)],
    ids=["0ms", "50ms-rtt", "150ms-rtt", "400ms-rtt"],
)
async def test_a_far_server_works_with_its_real_round_trip(
    target: Target, one_way_ms: float, low: float, high: float
) -> None:
    got = await _measure(target, ALL, delay_ms=one_way_ms)
    for transport, path in got.items():
        assert path.media_ok and path.received >= 95, (transport, path)
        assert path.verdict in (WORKS, POOR), (transport, path)
        assert path.quality is not None and low <= path.quality.rtt_ms["avg"] <= high, (
            transport,
            path.quality,
        )
        if one_way_ms <= 75:
            assert path.verdict == WORKS, (transport, path)


async def test_jitter_is_measured_and_late_packets_count(target: Target) -> None:
    got = await _measure(target, ("udp", "tcp"), delay_ms=40, jitter_ms=20)
    udp = got["udp"]
    assert udp.media_ok and udp.received >= 95, udp  # reordered ones are not lost
    assert udp.quality is not None and udp.quality.jitter_ms >= 4, udp.quality
    assert udp.quality.out_of_order > 0, udp.quality
    assert got["tcp"].media_ok


@pytest.mark.parametrize("loss", [0.02, 0.10])
async def test_a_lossy_path_works_but_is_poor(target: Target, loss: float) -> None:
    got = await _measure(target, ("udp",), delay_ms=10, loss=loss)
    udp = got["udp"]
    assert udp.media_ok, udp
    assert udp.verdict == POOR and udp.quality is not None, udp
    assert "high-packet-loss" in udp.quality.warnings, udp.quality
    assert loss / 2.5 <= udp.loss <= loss * 2, (loss, udp.loss)  # type: ignore[operator]


async def test_a_blocked_path_does_not_work_and_the_others_do(target: Target) -> None:
    got = await _measure(target, ("udp", "tcp"), timeout=1.5, loss=1.0)
    assert got["udp"].verdict == FAILS and not got["udp"].reachable
    assert got["tcp"].verdict == WORKS  # (TCP has no loss in the forwarder)


async def test_the_cli_reports_a_50ms_path_over_every_transport(
    target: Target, tmp_path: Path
) -> None:
    """The command an engineer runs, through 25 ms each way: works, RTT about 50 ms."""
    root = str(Path(__file__).parents[2])
    script = tmp_path / "run.py"
    script.write_text(
        "import asyncio, sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from tests.support.netem import PathSpec, TcpPath, UdpPath\n"
        "async def main():\n"
        "    spec = lambda n: PathSpec(delay_ms=25, seed=n)\n"
        f"    u = await UdpPath.start({target.udp!r}, spec(1))\n"
        f"    t = await TcpPath.start({target.tcp!r}, spec(2))\n"
        f"    s = await TcpPath.start({target.tls!r}, spec(3))\n"
        "    cmd = [sys.executable, '-m', 'turnserver', 'preflight', '--secret',\n"
        f"           {SECRET!r}, '--ca', {CERT_FILE!r}, '--packets', '100',\n"
        "           f'turn:127.0.0.1:{u.port}?transport=udp',\n"
        "           f'turn:127.0.0.1:{t.port}?transport=tcp', f'turns:127.0.0.1:{s.port}']\n"
        "    p = await asyncio.create_subprocess_exec(*cmd)\n"
        "    sys.exit(await p.wait())\n"
        "asyncio.run(main())\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("turn:", "turns:"))]
    assert len(rows) == 3 and all("  works  " in row for row in rows), out
    for row in rows:
        rtt = next(c for c in row.split() if c.count("/") == 2)
        assert 40 <= float(rtt.split("/")[1]) <= 80, row
    assert "verdict: media flows through udp, tcp, tls" in out
