"""Headless Chromium against `turnserver dev`: a relay-only call (two peers in one page)
connects over TURN/UDP; `udp=block` through the live endpoint breaks it, as a firewall
would, and after an ICE restart that also offers TURN/TCP and TURN/TLS the call recovers
over one of them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.browser import chromium_page
from turnserver.testing import TurnServerFixture

pytestmark = [pytest.mark.asyncio(loop_factories=["asyncio"]), pytest.mark.timeout(240)]

PAGE = """<!doctype html><meta charset="utf-8"><title>relay-only call</title><script>
let a, b, ch;
window.replies = [];
async function negotiate(restart) {
  const offer = await a.createOffer({iceRestart: !!restart});
  await a.setLocalDescription(offer);
  await b.setRemoteDescription(offer);
  const answer = await b.createAnswer();
  await b.setLocalDescription(answer);
  await a.setRemoteDescription(answer);
}
window.startCall = async (iceServers) => {
  const cfg = {iceServers, iceTransportPolicy: "relay"};
  a = new RTCPeerConnection(cfg);
  b = new RTCPeerConnection(cfg);
  a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
  b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send("pong " + m.data); };
  ch = a.createDataChannel("chat");
  ch.onmessage = (m) => window.replies.push(m.data);
  const open = new Promise((r) => { ch.onopen = r; });
  await negotiate(false);
  await open;
  return "open";
};
window.restartIce = async (iceServers) => {
  for (const pc of [a, b]) pc.setConfiguration({iceServers, iceTransportPolicy: "relay"});
  a.restartIce();
  await negotiate(true);
  return "restarted";
};
window.ping = (n) => { ch.send("ping " + n); return true; };
window.state = async () => {
  const stats = await a.getStats();
  let pair = null, local = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      pair = stats.get(s.selectedCandidatePairId);
    }
  });
  if (pair) local = stats.get(pair.localCandidateId);
  return JSON.stringify({
    ice: a.iceConnectionState,
    localType: local ? local.candidateType : null,
    relayProtocol: local ? local.relayProtocol : null,
    replies: window.replies,
  });
};
</script>"""


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ident = 0

    async def eval(self, expr: str, timeout: float = 30) -> Any:
        self.ident += 1
        await self.ws.send_json(
            {
                "id": self.ident,
                "method": "Runtime.evaluate",
                "params": {"expression": expr, "returnByValue": True, "awaitPromise": True},
            }
        )
        while True:
            msg = await self.ws.receive_json(timeout=timeout)
            if msg.get("id") == self.ident:
                result = msg["result"]
                if "exceptionDetails" in result:
                    raise AssertionError(f"{expr}: {result['exceptionDetails']}")
                return result["result"].get("value")

    async def state(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(await self.eval("window.state()"))
        return value

    async def wait_for(self, check: Any, timeout: float) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        state = await self.state()
        while not check(state) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.25)
            state = await self.state()
        assert check(state), state
        return state


async def test_chromium_call_recovers_over_tcp_or_tls_after_udp_block() -> None:
    async def call_page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/call", call_page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    page_port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{page_port}/call"
    async with TurnServerFixture() as turn, chromium_page(url, turn.info["cert"]) as ws:
        await _call_then_block(Page(ws), turn)
    await runner.cleanup()


async def _call_then_block(page: Page, turn: TurnServerFixture) -> None:
    # The call starts on TURN/UDP (given alone: with all three, Chromium may settle on
    # any of them); the ICE restart then offers turn: tcp and turns: as well.
    udp_only = json.dumps(turn.ice_servers(transports=("udp",)))
    every = json.dumps(turn.ice_servers())
    for _ in range(100):  # the page's script may still be loading
        if await page.eval("typeof window.startCall") == "function":
            break
        await asyncio.sleep(0.1)
    assert await page.eval(f"window.startCall({udp_only})", timeout=60) == "open"
    state = await page.wait_for(lambda s: s["relayProtocol"] is not None, 20)
    assert state["localType"] == "relay" and state["relayProtocol"] == "udp", state
    await page.eval("window.ping(1)")
    await page.wait_for(lambda s: "pong ping 1" in s["replies"], 10)

    blocked = turn.impair(udp="block")  # the firewall starts dropping UDP, mid-call
    assert blocked["impairment"]["udp"] == "block"
    await page.eval("window.ping(2)")
    # ICE notices the loss only after seconds without a reply: by then the ping has had
    # all that time to come back, and must not have
    await page.wait_for(lambda s: s["ice"] in ("disconnected", "failed"), 60)
    assert "pong ping 2" not in (await page.state())["replies"]  # media no longer flows

    assert await page.eval(f"window.restartIce({every})", timeout=60) == "restarted"
    state = await page.wait_for(
        lambda s: s["ice"] in ("connected", "completed") and s["relayProtocol"] in ("tcp", "tls"),
        90,
    )
    assert state["localType"] == "relay", state
    await page.eval("window.ping(3)")
    await page.wait_for(lambda s: "pong ping 3" in s["replies"], 10)
    counts = turn.impairment()["counts"]["udp"]
    assert counts.get("blocked", 0) > 0, counts
    tcp_or_tls = [a for a in turn.allocations() if a["transport"] in ("tcp", "tls")]
    assert tcp_or_tls, turn.allocations()
