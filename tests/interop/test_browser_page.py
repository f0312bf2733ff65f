"""The /preflight page in headless Chromium: relay/relay over UDP, TCP and TLS against our
server, and the failure for a bad credential. Driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.browser import chromium_page, evaluate, run_page
from tests.support.procs import free_port, loopback_args, turnserver_process
from tests.support.server import CERT_FILE, KEY_FILE, SECRET, RunningServer

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


@pytest.mark.timeout(240)
async def test_page_connects_relay_relay_over_every_transport(server: RunningServer) -> None:
    report = await run_page(f"{server.api_base}/preflight")
    assert "error" not in report, report
    by_transport = {r["transport"]: r for r in report["results"]}
    assert set(by_transport) == {"udp", "tcp", "tls"}, report
    for transport, r in by_transport.items():
        assert r["ok"], (transport, r)
        assert r["pair"]["localType"] == "relay" and r["pair"]["remoteType"] == "relay"
        assert r["dataEcho"]
        assert r["rttMs"] is not None
        assert r["audioPacketsReceived"] > 0, (transport, r)  # audio plays after the click
    assert report["audioContextState"] == "running"
    assert report["verdict"] == "media flows through udp, tcp, tls"


@pytest.mark.timeout(240)
async def test_page_shows_a_bad_credential(server: RunningServer) -> None:
    report = await run_page(f"{server.api_base}/preflight?bad=1", timeout=180)
    assert report["results"] and not any(r["ok"] for r in report["results"])
    errors = " ".join(e for r in report["results"] for e in r["turnErrors"])
    assert "401" in errors or any(r["error"] for r in report["results"]), report
    assert report["verdict"] == "no media path works"


@pytest.mark.server_settings(preflight_page=False)
async def test_page_can_be_turned_off(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.api_base}/preflight") as resp,
    ):
        assert resp.status == 404


@pytest.mark.timeout(240)
async def test_page_relay_relay_with_the_default_worker_count(tmp_path: Path) -> None:
    """The same page against a server process with the default worker count (one per
    CPU): each transport's relay candidates may come from different workers."""
    api = free_port(socket.SOCK_STREAM)
    tls_port = free_port(socket.SOCK_STREAM)
    lo = 32000 + (os.getpid() * 11) % 3000
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 399),
        "--api-listen",
        f"127.0.0.1:{api}",
        "--cert",
        CERT_FILE,
        "--key",
        KEY_FILE,
        streams=True,
        tls_port=tls_port,
        workers=None,
    ):
        report = await run_page(f"http://127.0.0.1:{api}/preflight")
    assert "error" not in report, report
    by_transport = {r["transport"]: r for r in report["results"]}
    assert set(by_transport) == {"udp", "tcp", "tls"}, report
    for transport, r in by_transport.items():
        assert r["ok"], (transport, r)
        assert r["pair"]["localType"] == "relay" and r["pair"]["remoteType"] == "relay"
        assert r["audioPacketsReceived"] > 0, (transport, r)


async def _quality_in_the_page(ws: aiohttp.ClientWebSocketResponse, cases: list[Any]) -> Any:
    for ident in range(100, 200):  # until the page's script has loaded
        if await evaluate(ws, ident, "typeof quality === 'function'"):
            break
        await asyncio.sleep(0.1)
    cases_js = json.dumps(cases)
    # the page's inputs are those of its media (a loop of two round trips, a -> b's jitter
    # and loss): made here from the one-crossing figures the CLI's Quality takes
    expr = (
        f"JSON.stringify({cases_js}.map(([r, j, l]) =>"
        " quality(2 * r, Math.SQRT2 * j, 1 - (1 - l) ** 2)))"
    )
    return json.loads(await evaluate(ws, 99, expr))


@pytest.mark.timeout(120)
async def test_the_page_and_the_cli_grade_quality_alike(server: RunningServer) -> None:
    """The page's MOS, grade, warnings and verdict words are the CLI's (the same
    E-model constants and thresholds in preflight.js and client/quality.py)."""
    from turnserver.client.quality import Quality

    cases = [
        [rtt, jitter, loss]
        for rtt in (5, 50, 150, 399, 401, 900)
        for jitter in (0, 10, 31)
        for loss in (0, 0.005, 0.011, 0.05, 0.3)
    ]
    async with chromium_page(f"{server.api_base}/preflight", CERT_FILE) as ws:
        page = await _quality_in_the_page(ws, cases)
    for (rtt, jitter, loss), got in zip(cases, page, strict=True):
        want = Quality.of([rtt], jitter, loss)
        assert abs(got["mos"] - want.mos) <= 0.011, (rtt, jitter, loss, got, want)
        assert (got["grade"], got["warnings"], got["verdict"]) == (
            want.grade,
            want.warnings,
            want.verdict,
        ), (rtt, jitter, loss, got, want)


@pytest.mark.timeout(240)
async def test_the_page_and_the_cli_agree_on_a_50ms_path(tmp_path: Path) -> None:
    """Through a 25 ms-each-way forwarder of ours (this kernel has no netem), with the
    default worker count: the page (getStats) and the CLI report the same verdict words
    and about the same round trip per transport."""
    from tests.support.netem import PathSpec, TcpPath, UdpPath
    from turnserver.client.preflight import load_ice_servers, run

    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    api = free_port(socket.SOCK_STREAM)
    udp = await UdpPath.start(("127.0.0.1", port), PathSpec(delay_ms=25, seed=1))
    tcp = await TcpPath.start(("127.0.0.1", port), PathSpec(delay_ms=25, seed=2))
    tls = await TcpPath.start(("127.0.0.1", tls_port), PathSpec(delay_ms=25, seed=3))
    cfg = tmp_path / "uris.yaml"
    cfg.write_text(
        "api:\n  keys: [agree-key]\n  uris:\n"
        f"    - turn:127.0.0.1:{udp.port}?transport=udp\n"
        f"    - turn:127.0.0.1:{tcp.port}?transport=tcp\n"
        f"    - turns:127.0.0.1:{tls.port}?transport=tcp\n"
    )
    lo = 28000 + os.getpid() % 500
    try:
        with turnserver_process(
            tmp_path,
            *loopback_args(SECRET, lo, lo + 399),
            "--config",
            str(cfg),
            "--api-listen",
            f"127.0.0.1:{api}",
            "--cert",
            CERT_FILE,
            "--key",
            KEY_FILE,
            port=port,
            streams=True,
            tls_port=tls_port,
            workers=None,
        ):
            page = await run_page(f"http://127.0.0.1:{api}/preflight")
            uris = load_ice_servers(
                f"http://127.0.0.1:{api}/api/v1/turn-credentials?key=agree-key&username=cli"
            )
            import ssl

            cli = await run(
                uris, packets=100, ssl_context=ssl.create_default_context(cafile=CERT_FILE)
            )
    finally:
        for path in (udp, tcp, tls):
            path.close()
    by_page = {r["transport"]: r for r in page["results"]}
    by_cli = {p.transport: p for p in cli.paths if p.uri.startswith("turn")}
    assert set(by_page) == set(by_cli) == {"udp", "tcp", "tls"}, (page, cli)
    for transport, r in by_page.items():
        c = by_cli[transport]
        assert r["verdict"] == c.verdict == "works", (transport, r, c)
        assert 35 <= r["quality"]["rttMs"] <= 90, (transport, r["quality"])
        assert c.rtt_ms is not None and abs(r["quality"]["rttMs"] - c.rtt_ms) <= 30, (
            transport,
            r["quality"],
            c.quality,
        )
    assert page["verdict"] == cli.verdict == "media flows through udp, tcp, tls"
