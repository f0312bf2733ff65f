"""Test media like a call's, and what came back of it: 50 packets a second of 160
bytes through a TURN channel, every echo matched by sequence number whenever it arrives
(RFC 3550 §6.4.1 jitter, loss, reordering, duplicates), reduced to one round trip to
the server (client/quality.py grades it)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from turnserver.client.quality import Quality
from turnserver.client.turnclient import TurnClient, TurnClientError

MEDIA_RATE = 50  # packets a second, 160 bytes each: a call's pace (G.711, 20 ms frames)
MEDIA_SIZE = 160


@dataclass
class MediaLoop:
    """What came back of the test media, by sequence number, whenever it arrived."""

    sent_at: dict[int, float] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    out_of_order: int = 0
    duplicates: int = 0
    jitter: float = 0.0  # RFC 3550 §6.4.1 interarrival jitter of the loop, seconds
    _transit: float | None = None
    _highest: int = -1

    def on_arrival(self, seq: int, now: float) -> None:
        if seq not in self.sent_at:
            return
        if seq in self.arrived:
            self.duplicates += 1
            return
        self.arrived[seq] = now
        if seq < self._highest:
            self.out_of_order += 1
        self._highest = max(self._highest, seq)
        transit = now - self.sent_at[seq]
        if self._transit is not None:
            self.jitter += (abs(transit - self._transit) - self.jitter) / 16
        self._transit = transit


def media_round_trips(loop: MediaLoop) -> Quality:
    """What a call between us and the server would see: the test media's loop crosses
    the path four times (to the server, to our second allocation, back to the server,
    back to us), twice each way. So a round trip is half the loop, the jitter of one
    crossing about half the loop's (independent variations add as variances), and the
    loss of one crossing 1 - (1 - p) ** (1/4) for a loop loss p."""
    rtts = [(loop.arrived[s] - loop.sent_at[s]) * 500 for s in sorted(loop.arrived)]
    sent = len(loop.sent_at)
    loop_loss = 1 - len(loop.arrived) / sent if sent else 1.0
    loss = 1 - max(0.0, 1 - loop_loss) ** 0.25
    return Quality.of(rtts, loop.jitter * 500, loss, loop.out_of_order, loop.duplicates)


async def send_call_media(
    client: TurnClient, channel: int, packets: int, timeout: float
) -> MediaLoop:
    """Send `packets` at MEDIA_RATE through the channel and collect every echo that comes
    back until a horizon after the last one (the longer of 2 s and four times the
    slowest loop seen, at most `timeout`): a late echo still counts."""
    loop = MediaLoop()
    receiving = True

    async def receive() -> None:
        while receiving:
            try:
                _, data = await client.receive(0.25)
            except TurnClientError:
                continue
            if len(data) >= 4:
                loop.on_arrival(int.from_bytes(data[:4], "big"), time.perf_counter())

    receiver = asyncio.get_running_loop().create_task(receive())
    try:
        start = time.perf_counter()
        for seq in range(packets):
            wake = start + seq / MEDIA_RATE
            await asyncio.sleep(max(0.0, wake - time.perf_counter()))
            loop.sent_at[seq] = time.perf_counter()
            client.send_channel(channel, seq.to_bytes(4, "big") + os.urandom(MEDIA_SIZE - 4))
        last = time.perf_counter()
        while len(loop.arrived) < packets:
            slowest = max((loop.arrived[s] - loop.sent_at[s] for s in loop.arrived), default=0)
            horizon = min(max(2.0, 4 * slowest), max(timeout, 2.0))
            if time.perf_counter() - last > horizon:
                break
            await asyncio.sleep(0.05)
    finally:
        receiving = False
        await receiver
    return loop
