"""Headless Chromium for tests: found (fail in CI, skip on a laptop), started with its own
profile, driven over the DevTools protocol, and stopped with every child it started."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.server import CERT_FILE, missing
from turnserver.ops.dev.selfsigned import spki_sha256


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    missing(
        "chromium not found (apt-get install chromium)",
        "chromium not found (apt-get install chromium); .ci/run installs it",
    )


async def stop_group(proc: asyncio.subprocess.Process) -> None:
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


async def evaluate(ws: aiohttp.ClientWebSocketResponse, ident: int, expr: str) -> Any:
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
            await stop_group(proc)


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
            # The button is in the HTML before the page's script gives it its handler:
            # click only once the handler is there (a click before it does nothing).
            clicked = await evaluate(
                ws,
                ident,
                "(() => { const b = document.getElementById('start');"
                " if (!b || !b.onclick) return false; b.click(); return true; })()",
            )
            await asyncio.sleep(0.1)
        while asyncio.get_running_loop().time() < deadline:
            ident += 1
            value = await evaluate(ws, ident, "JSON.stringify(window.preflightReport || null)")
            if value and value != "null":
                report: dict[str, Any] = json.loads(value)
                return report
            await asyncio.sleep(0.5)
        status = await evaluate(ws, ident + 1, "document.getElementById('status').textContent")
    raise AssertionError(f"the page did not finish; its status line: {status!r}")
