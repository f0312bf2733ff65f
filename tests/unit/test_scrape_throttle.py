"""The /metrics throttle (ops/http/health.py ScrapeThrottle) on its own: no sockets.

Each scenario runs its event loop in a thread joined with a deadline: a throttle that
spins without yielding cannot be interrupted by asyncio's own timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from turnserver.ops.http.health import ScrapeThrottle


def _run(scenario: Callable[[], Awaitable[Any]], deadline: float = 10.0) -> Any:
    out: list[Any] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            out.append(asyncio.run(scenario()))  # type: ignore[arg-type]
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"the event loop did not finish in {deadline} s (spinning?)"
    if errors:
        raise errors[0]
    return out[0]


class _Renderer:
    """Renderings numbered 1, 2, ...; each waits for `gate` (set by default)."""

    def __init__(self) -> None:
        self.count = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.began: list[float] = []

    async def __call__(self) -> bytes:
        self.count += 1
        n = self.count
        self.began.append(time.monotonic())
        await self.gate.wait()
        return str(n).encode()


async def _rendering_begun() -> tuple[_Renderer, ScrapeThrottle, asyncio.Future[bytes]]:
    """A throttle whose first request began rendering 1, held until render.gate is set."""
    render = _Renderer()
    render.gate.clear()
    throttle = ScrapeThrottle(render)
    first = asyncio.ensure_future(throttle.get())
    while render.count == 0:
        await asyncio.sleep(0)
    return render, throttle, first


def test_a_request_after_a_finished_rendering_is_answered_not_spun_on() -> None:
    """The scrape flood that wedged the supervisor: a rendering finishes, and before the
    request that began it resumes, a new request arrives. It must get a rendering of its
    own, with the event loop free meanwhile."""

    async def scenario() -> tuple[bytes, bytes, int]:
        render, throttle, first = await _rendering_begun()
        render.gate.set()  # the rendering finishes on the next turn of the loop...
        second = asyncio.ensure_future(throttle.get())  # ...and this one arrives after
        return await first, await second, throttle.renders

    first, second, renders = _run(scenario)
    assert (first, second, renders) == (b"1", b"2", 2)


def test_requests_during_a_rendering_wait_for_a_newer_one_and_share_it() -> None:
    async def scenario() -> tuple[list[bytes], int, int]:
        render, throttle, first = await _rendering_begun()
        late = [asyncio.ensure_future(throttle.get()) for _ in range(10)]
        await asyncio.sleep(0)
        render.gate.set()
        bodies = [await first] + [await t for t in late]
        return bodies, throttle.renders, throttle.shared

    bodies, renders, shared = _run(scenario)
    # the ten arrived after rendering 1 began: never answered with it; one renders, nine share
    assert bodies == [b"1"] + [b"2"] * 10
    assert (renders, shared) == (2, 9)


def test_a_flood_is_answered_at_the_rate_past_the_burst() -> None:
    """400 requests, 50 at a time, renderings that take 20 ms: every one answered with a
    rendering begun after it arrived, at most burst + rate x elapsed renderings."""

    async def scenario() -> tuple[int, float, bool]:
        count = 0
        began: list[float] = []

        async def render() -> bytes:
            nonlocal count
            count += 1
            began.append(time.monotonic())
            await asyncio.sleep(0.02)
            return str(len(began) - 1).encode()

        throttle = ScrapeThrottle(render, rate=20.0, burst=4)
        fresh = True
        slots = asyncio.Semaphore(50)

        async def one() -> None:
            nonlocal fresh
            async with slots:
                arrived = time.monotonic()
                body = await throttle.get()
                fresh &= began[int(body)] >= arrived

        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(400)))
        return count, time.monotonic() - start, fresh

    renders, elapsed, fresh = _run(scenario, deadline=30.0)
    assert fresh
    assert renders <= 4 + 20.0 * elapsed + 1, (renders, elapsed)


def test_a_caller_gone_mid_rendering_leaves_it_to_the_others() -> None:
    """The request that began a rendering is cancelled (its client hung up): the others
    still get that rendering, and the throttle is ready for the next."""

    async def scenario() -> tuple[list[bytes], bytes, int]:
        render, throttle, owner = await _rendering_begun()
        # these arrive after rendering 1 began, so they wait for rendering 2, which
        # begins once 1 is done whether or not its owner is still there
        others = [asyncio.ensure_future(throttle.get()) for _ in range(3)]
        await asyncio.sleep(0)
        owner.cancel()
        render.gate.set()
        bodies = [await t for t in others]
        return bodies, await throttle.get(), throttle.renders

    bodies, after, renders = _run(scenario)
    assert bodies == [b"2"] * 3
    assert after == b"3" and renders == 3
