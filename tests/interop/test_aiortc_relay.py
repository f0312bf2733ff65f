"""aiortc (a real WebRTC stack we did not write) relay-only through the TurnServerFixture:
a data channel and an audio track; `udp=block` makes UDP-only iceServers fail while TCP
and TLS ones connect; `loss:20` shows in aiortc's packet-loss stats, `delay:100` in its
round-trip time. This is the docs/testing-relay-only.md example, run for real."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support import eventually
from turnserver.testing import TurnServerFixture

aiortc = pytest.importorskip("aiortc", reason="pip install aiortc (the test extra has it)")
from aiortc import (  # noqa: E402
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack  # noqa: E402
from aiortc.rtcconfiguration import RTCIceTransportPolicy  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_loop]


def relay_only(turn: TurnServerFixture, transport: str) -> RTCConfiguration:
    """An RTCConfiguration with one TURN URI (aiortc uses the first TURN server only)."""
    servers = turn.ice_servers(transports=(transport,))
    return RTCConfiguration(
        iceServers=[RTCIceServer(**s) for s in servers],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )


@dataclass
class Call:
    caller: RTCPeerConnection
    callee: RTCPeerConnection
    replies: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    channel: Any = None
    frames: int = 0


async def _drain(track: MediaStreamTrack, call: Call) -> None:
    with contextlib.suppress(Exception):  # ends with the track
        while True:
            await track.recv()
            call.frames += 1


@contextlib.asynccontextmanager
async def call(
    caller: RTCConfiguration, callee: RTCConfiguration, *, audio: bool, timeout: float = 20
) -> AsyncIterator[Call]:
    """Two peers in this process, offer/answer passed by hand; the data channel echoes."""
    c = Call(RTCPeerConnection(caller), RTCPeerConnection(callee))
    tasks: list[asyncio.Task[None]] = []
    try:
        c.channel = c.caller.createDataChannel("chat")
        opened = asyncio.Event()
        c.channel.on("open", opened.set)
        c.channel.on("message", c.replies.put_nowait)

        @c.callee.on("datachannel")
        def on_channel(channel: Any) -> None:
            channel.on("message", lambda m: channel.send(f"pong {m}"))

        @c.callee.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            tasks.append(asyncio.ensure_future(_drain(track, c)))

        if audio:
            c.caller.addTrack(AudioStreamTrack())

        async def negotiate() -> None:
            await c.caller.setLocalDescription(await c.caller.createOffer())
            await c.callee.setRemoteDescription(c.caller.localDescription)
            await c.callee.setLocalDescription(await c.callee.createAnswer())
            await c.caller.setRemoteDescription(c.callee.localDescription)
            await opened.wait()

        await asyncio.wait_for(negotiate(), timeout)
        yield c
    finally:
        for task in tasks:
            task.cancel()
        await c.caller.close()
        await c.callee.close()


async def _ping(c: Call) -> None:
    c.channel.send("ping")
    assert await asyncio.wait_for(c.replies.get(), 5) == "pong ping"


async def _stats(pc: RTCPeerConnection, kind: str) -> list[Any]:
    report = await pc.getStats()
    return [s for s in report.values() if s.type == kind]


async def test_data_channel_and_audio_relay_only() -> None:
    turn = TurnServerFixture()
    async with turn, call(relay_only(turn, "udp"), relay_only(turn, "udp"), audio=True) as c:
        await _ping(c)
        for _ in range(100):
            if c.frames >= 25:
                break
            await asyncio.sleep(0.05)
        assert c.frames >= 25  # half a second of audio arrived through the relay
        pair = c.caller.sctp.transport.transport.iceGatherer  # type: ignore[union-attr]
        local = pair.getLocalCandidates()
        assert local and all(x.type == "relay" for x in local)
        allocations = turn.allocations()
        assert len(allocations) >= 2 and {a["transport"] for a in allocations} == {"udp"}


async def test_udp_block_leaves_tcp_and_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    async with TurnServerFixture() as turn:
        # aiortc verifies turns: certificates against the default store
        monkeypatch.setenv("SSL_CERT_FILE", turn.info["cert"])
        turn.impair(udp="block")
        with pytest.raises(TimeoutError):
            async with call(
                relay_only(turn, "udp"), relay_only(turn, "udp"), audio=False, timeout=8
            ):
                pass
        for transport in ("tcp", "tls"):
            cfg = relay_only(turn, transport)
            async with call(cfg, cfg, audio=False) as c:
                await _ping(c)
        counts = turn.impairment()["counts"]
        assert counts["udp"]["blocked"] >= 1


async def test_loss_and_delay_show_in_aiortc_stats() -> None:
    """Caller on UDP, callee on TCP, UDP impaired: each direction crosses the impaired
    transport once, so aiortc sees the configured loss and one added delay each way."""
    async with TurnServerFixture(seed=3) as turn:
        udp, tcp = relay_only(turn, "udp"), relay_only(turn, "tcp")
        async with call(udp, tcp, audio=True) as c:

            async def first_rtt() -> tuple[float] | None:  # the first report with an RTT
                stats = await _stats(c.caller, "remote-inbound-rtp")
                rtt = stats[0].roundTripTime if stats else None
                return (rtt,) if rtt is not None else None  # (an RTT of 0.0 counts)

            (before,) = await eventually(first_rtt, timeout=15, interval=0.1, what="an RTT")
            assert before < 0.1
            turn.impair(udp="delay:100")
            rtt = 0.0
            for _ in range(250):  # a report every 0.5-1.5 s; aiortc smooths the RTT
                await asyncio.sleep(0.1)
                stats = await _stats(c.caller, "remote-inbound-rtp")
                rtt = stats[0].roundTripTime or 0.0
                if rtt >= 0.15:
                    break
            # 100 ms on the way out and 100 ms back: the smoothed RTT climbs toward 0.2 s
            assert 0.15 <= rtt < 0.25
            turn.impair(udp="loss:20")
            first = (await _stats(c.callee, "inbound-rtp"))[0]
            await asyncio.sleep(8)
            last = (await _stats(c.callee, "inbound-rtp"))[0]
        received = last.packetsReceived - first.packetsReceived
        lost = last.packetsLost - first.packetsLost
        assert received > 250
        assert 0.12 < lost / (received + lost) < 0.28
        assert turn.impairment()["counts"]["udp"]["lost"] > 0
