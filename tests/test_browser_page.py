"""The /preflight page in headless Chromium: relay/relay over UDP, TCP and TLS against our
server, and the failure for a bad credential. Driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from turnserver.ops.selfsigned import spki_sha256

from .conftest import CERT_FILE, IN_CI, KEY_FILE, SECRET, RunningServer
from .procs import free_port, loopback_args, turnserver_process

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if IN_CI:
        pytest.fail("chromium not found (apt-get install chromium); .ci/run installs it")
    pytest.skip("chromium not found (apt-get install chromium)")


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """Stop Chromium and every child it started, and wait until none is left: its
    children write into the profile until they exit (removing it earlier raced)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        pass
    for _ in range(100):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)


async def _evaluate(ws: aiohttp.ClientWebSocketResponse, ident: int, expr: str) -> Any:
    await ws.send_json(
        {
            "id": ident,
            "method": "Runtime.evaluate",
            "params": {"expression": expr, "returnByValue": True, "userGesture": True},
        }
    )
    while True:
        msg = await ws.receive_json(timeout=10)
        if msg.get("id") == ident:
            return msg["result"]["result"].get("value")


@contextlib.asynccontextmanager
async def chromium_page(
    url: str, cert_file: str, *flags: str
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """Headless Chromium on `url` (trusting cert_file's key for turns:), and a DevTools
    websocket to that page; Chromium is stopped as a process group at the end."""
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--ignore-certificate-errors-spki-list={spki_sha256(cert_file)}",
            *flags,
            url,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": profile},  # its scratch files go with the profile
            start_new_session=True,  # its own process group, stopped as a whole
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            for _ in range(200):
                if port_file.exists() and port_file.read_text().strip():
                    break
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            path = url.split("/", 3)[-1].split("?")[0]
            async with aiohttp.ClientSession() as session:
                pages: list[dict[str, Any]] = []
                for _ in range(100):
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                        pages = [p for p in await resp.json() if path in p.get("url", "")]
                    if pages:
                        break
                    await asyncio.sleep(0.1)
                async with session.ws_connect(
                    pages[0]["webSocketDebuggerUrl"], max_msg_size=0
                ) as ws:
                    yield ws
        finally:
            await _stop_group(proc)


async def run_page(url: str, timeout: float = 90.0) -> dict[str, Any]:
    """Open the page, click Start (a user gesture, so audio may play) and wait for the
    report. No autoplay flag: the page must work as in a normal browser."""
    flags = [
        "--allow-loopback-in-peer-connection",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ]
    async with chromium_page(url, CERT_FILE, *flags) as ws:
        deadline = asyncio.get_running_loop().time() + timeout
        ident = 1
        clicked = None
        while not clicked and asyncio.get_running_loop().time() < deadline:
            ident += 1
            clicked = await _evaluate(
                ws,
                ident,
                "(() => { const b = document.getElementById('start');"
                " if (!b) return false; b.click(); return true; })()",
            )
            await asyncio.sleep(0.1)
        while asyncio.get_running_loop().time() < deadline:
            ident += 1
            value = await _evaluate(ws, ident, "JSON.stringify(window.preflightReport || null)")
            if value and value != "null":
                report: dict[str, Any] = json.loads(value)
                return report
            await asyncio.sleep(0.5)
        status = await _evaluate(ws, ident + 1, "document.getElementById('status').textContent")
    raise AssertionError(f"the page did not finish; its status line: {status!r}")


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
        if await _evaluate(ws, ident, "typeof quality === 'function'"):
            break
        await asyncio.sleep(0.1)
    cases_js = json.dumps(cases)
    # the page's inputs are those of its media (a loop of two round trips, a -> b's jitter
    # and loss): made here from the one-crossing figures the CLI's Quality takes
    expr = (
        f"JSON.stringify({cases_js}.map(([r, j, l]) =>"
        " quality(2 * r, Math.SQRT2 * j, 1 - (1 - l) ** 2)))"
    )
    return json.loads(await _evaluate(ws, 99, expr))


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
    from turnserver.client.preflight import load_ice_servers, run

    from .support.netem import PathSpec, TcpPath, UdpPath

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
