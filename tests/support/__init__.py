"""Helpers the tests share: waiting for a condition, the worker counts every operations
and interop test runs with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

# None: no --workers flag, the default (one per CPU: 2 in CI); 1: one process
WORKER_COUNTS = [
    pytest.param(None, id="default-workers"),
    pytest.param(1, id="one-worker"),
]


async def eventually(
    check: Callable[[], Awaitable[T]] | Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Call `check` until it returns a true value (awaiting it if it is a coroutine
    function) and return that value; an AssertionError or OSError it raises counts as
    not yet. AssertionError after `timeout` seconds, with the last value or exception."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            last = value
        except (AssertionError, OSError) as exc:  # OSError: a server not listening yet
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"not true within {timeout:g} s{f' ({what})' if what else ''}: {last!r}"
            )
        await asyncio.sleep(interval)


class Collector(asyncio.DatagramProtocol):
    """Keeps every datagram it receives, in order, on `queue`."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


def wait_until(
    check: Callable[[], T], timeout: float = 10.0, what: str = "", interval: float = 0.05
) -> T:
    """eventually() for synchronous code."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except (AssertionError, OSError) as exc:  # OSError: not listening (or 503) yet
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"not true within {timeout:g} s{f' ({what})' if what else ''}: {last!r}"
            )
        time.sleep(interval)
