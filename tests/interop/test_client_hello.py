"""What TURN clients put in their TLS ClientHello (ALPN, SNI), measured rather than
assumed: the 443-sharing rules in docs/behind-a-proxy.md depend on it, and its table
must say what these measurements find."""

from __future__ import annotations

import asyncio
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.browser import chromium, stop_group
from tests.support.server import require_tool

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])
DOC = Path(__file__).resolve().parents[2] / "docs" / "behind-a-proxy.md"


def parse_client_hello(data: bytes) -> tuple[list[str] | None, str | None]:
    """(ALPN protocols or None, SNI host name or None) of a TLS ClientHello record."""
    assert len(data) >= 9 and data[0] == 0x16 and data[5] == 0x01, data[:16].hex()
    p = 9 + 2 + 32  # record and handshake headers, client_version, random
    p += 1 + data[p]  # session id
    p += 2 + struct.unpack_from("!H", data, p)[0]  # cipher suites
    p += 1 + data[p]  # compression methods
    end = p + 2 + struct.unpack_from("!H", data, p)[0]
    p += 2
    alpn: list[str] | None = None
    sni: str | None = None
    while p + 4 <= end:
        kind, size = struct.unpack_from("!HH", data, p)
        body = data[p + 4 : p + 4 + size]
        p += 4 + size
        if kind == 16:  # RFC 7301
            alpn, q = [], 2
            while q < len(body):
                alpn.append(body[q + 1 : q + 1 + body[q]].decode())
                q += 1 + body[q]
        elif kind == 0:  # RFC 6066 server_name: list length, type, name length, name
            sni = body[5 : 5 + struct.unpack_from("!H", body, 3)[0]].decode()
    return alpn, sni


class HelloRecorder:
    """A TCP listener that keeps the first ClientHello sent to it."""

    def __init__(self) -> None:
        self.hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.server: asyncio.Server | None = None

    async def start(self, hosts: list[str]) -> int:
        self.server = await asyncio.start_server(self._client, hosts, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readexactly(5), 10)
            body = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head[3:5])[0]), 10)
            if not self.hello.done():
                self.hello.set_result(head + body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


PAGE = """<!doctype html><script>
const pc = new RTCPeerConnection({iceServers: [{urls: "%s", username: "u", credential: "p"}],
                                  iceTransportPolicy: "relay"});
pc.createDataChannel("x");
pc.createOffer().then(offer => pc.setLocalDescription(offer));
</script>"""


async def chromium_hello(recorder: HelloRecorder, turns_url: str) -> bytes:
    """The ClientHello headless Chromium's WebRTC sends to `turns_url`'s server."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE % turns_url, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with tempfile.TemporaryDirectory() as profile:
            proc = await asyncio.create_subprocess_exec(
                chromium(),
                *["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"],
                *["--disable-background-networking", f"--user-data-dir={profile}"],
                f"http://127.0.0.1:{port}/",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, "TMPDIR": profile},
                start_new_session=True,
            )
            try:
                return await asyncio.wait_for(recorder.hello, 60)
            finally:
                await stop_group(proc)
    finally:
        await runner.cleanup()


async def _measure_chromium(host: str, listen: list[str]) -> tuple[list[str] | None, str | None]:
    recorder = HelloRecorder()
    port = await recorder.start(listen)
    try:
        url = f"turns:{host}:{port}?transport=tcp"
        return parse_client_hello(await chromium_hello(recorder, url))
    finally:
        recorder.close()


def _doc_row(client: str) -> str:
    row = next((ln for ln in DOC.read_text().splitlines() if ln.startswith(f"| {client}")), "")
    assert row, f"docs/behind-a-proxy.md has no row for {client}"
    return row


@pytest.mark.timeout(180)
async def test_chromium_sends_no_alpn_and_sni_only_for_a_name() -> None:
    alpn, sni = await _measure_chromium("127.0.0.1", ["127.0.0.1"])
    assert (alpn, sni) == (None, None)
    alpn, sni = await _measure_chromium("localhost", ["127.0.0.1", "::1"])
    assert (alpn, sni) == (None, "localhost")
    row = _doc_row("Chromium")
    version = subprocess.run(
        [chromium(), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    major = re.search(r"Chromium (\d+)", version)
    assert major and f"Chromium {major.group(1)} " in row, (version, row)
    assert "| none | the host name of the `turns:` URL; none for an IP address |" in row


async def test_coturn_uclient_offers_http_before_stun_turn() -> None:
    """Why the proxy rules test stun.turn before http/1.1."""
    uclient = require_tool("turnutils_uclient")
    recorder = HelloRecorder()
    port = await recorder.start(["127.0.0.1"])
    proc = await asyncio.create_subprocess_exec(
        *[uclient, "-t", "-S", "-p", str(port), "-e", "127.0.0.1", "-u", "u", "-w", "p"],
        *["-n", "1", "127.0.0.1"],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        alpn, sni = parse_client_hello(await asyncio.wait_for(recorder.hello, 30))
    finally:
        recorder.close()
        await stop_group(proc)
    assert alpn is not None and alpn.index("http/1.1") < alpn.index("stun.turn"), alpn
    assert sni is None
    row = _doc_row("coturn")
    assert ", ".join(f"`{p}`" for p in alpn) in row and row.rstrip().endswith("| none |"), row
