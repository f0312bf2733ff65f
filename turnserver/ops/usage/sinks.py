"""Where usage records go: a JSON-lines file and an HTTP webhook, each fed from the
spool by its own Shipper (a slow or failing webhook never holds up the file, nor the
relay: shipping runs beside it and only reads the spool)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp

from turnserver.ops.usage.sparse_log import SPARSE
from turnserver.ops.usage.spool import Spool

log = logging.getLogger("turnserver")
SCHEMA_VERSION = 1
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
LOG_INTERVAL = 60.0


class Sink(Protocol):
    name: str

    async def deliver(self, lines: list[bytes]) -> str:
        """Deliver the records; "" when they arrived, else why not (bounded words)."""

    def reopen(self) -> None: ...

    async def close(self) -> None: ...


class FileSink:
    """Appends records to a file, one JSON object a line; reopened on SIGHUP, so
    logrotate may move it away (several worker processes append whole batches with
    one O_APPEND write each: their lines never interleave)."""

    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def _open(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        return self._fd

    async def deliver(self, lines: list[bytes]) -> str:
        data = b"\n".join(lines) + b"\n"
        try:
            fd = self._open()
            written = os.write(fd, data)
            if written != len(data):
                return "short_write"  # delivered again whole: readers deduplicate by id
        except OSError as exc:
            self.reopen()
            return f"os_error_{exc.errno}"
        return ""

    def reopen(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    async def close(self) -> None:
        self.reopen()


class WebhookSink:
    """POSTs batches as `{"schema": 1, "records": [...]}` (JSON); any 2xx takes them,
    anything else (or no answer within the timeout) is a failure, tried again later."""

    name = "webhook"

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, lines: list[bytes]) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=2),
            )
        body = b'{"schema":%d,"records":[' % SCHEMA_VERSION + b",".join(lines) + b"]}"
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                return "" if 200 <= resp.status < 300 else f"http_{resp.status // 100}xx"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError:
            return "connection"

    def reopen(self) -> None:
        pass

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _whole_record(line: bytes) -> bool:
    """A spool line that is one JSON object: anything else would make every batch it is
    in fail at the receiver, for ever (a poison pill), so it is skipped and counted."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class Shipper:
    """Feeds one sink from the spool: batches in order, retried with exponential
    backoff and jitter, the cursor moved only after the sink took a batch."""

    def __init__(
        self, spool: Spool, sink: Sink, batch: int, retry_max: float = BACKOFF_MAX
    ) -> None:
        self.spool = spool
        self.retry_max = retry_max
        self.sink = sink
        self.batch = batch
        self.wake = asyncio.Event()  # set when records are appended
        self.on_advance: Callable[[], None] | None = None  # the spool may have shrunk
        self.sent = 0  # records delivered
        self.failures: dict[str, int] = {}  # why -> failed deliveries
        self.corrupt = 0  # spool lines that were not whole records (skipped, counted)
        self.backoff = 0.0
        self._logged = -LOG_INTERVAL
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def pending(self) -> int:
        return self.spool.pending(self.sink.name)

    async def ship_once(self) -> int:
        """Deliver one batch: records delivered (0 when none waited), -1 on failure."""
        batch = self.spool.read(self.sink.name, self.batch)
        if not batch.lines:
            if batch.end != self.spool.cursors[self.sink.name]:
                self.spool.advance(self.sink.name, batch.end)  # past empty segments
            return 0
        lines = [line for line in batch.lines if _whole_record(line)]
        if len(lines) < len(batch.lines):  # (a write cut short by a full disk, say)
            self.corrupt += len(batch.lines) - len(lines)
            SPARSE.error(
                "spool-corrupt",
                "usage records: %d lines of the spool are not records; skipped",
                len(batch.lines) - len(lines),
            )
        if not lines:
            self.spool.advance(self.sink.name, batch.end)
            return 0
        why = await self.sink.deliver(lines)
        if why:
            self.failures[why] = self.failures.get(why, 0) + 1
            now = time.monotonic()
            if now - self._logged >= LOG_INTERVAL:
                self._logged = now
                log.warning(
                    "usage records: %s sink failed (%s); %d bytes wait in the spool, retrying",
                    self.sink.name,
                    why,
                    self.pending(),
                )
            return -1
        self.spool.advance(self.sink.name, batch.end)
        self.sent += len(lines)
        if self.on_advance is not None:
            self.on_advance()
        return len(lines)

    async def _run(self) -> None:
        while True:
            try:
                shipped = await self.ship_once()
            except OSError as exc:  # the spool itself (disk): say so, keep trying
                self.failures["spool"] = self.failures.get("spool", 0) + 1
                SPARSE.error("spool-read", "usage records: reading the spool failed: %s", exc)
                shipped = -1
            if shipped > 0:
                self.backoff = 0.0
                continue
            if shipped < 0:
                self.backoff = min(self.retry_max, max(BACKOFF_FIRST, self.backoff * 2))
                await asyncio.sleep(self.backoff * random.uniform(0.5, 1.0))
                continue
            self.wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # meets the event being set, and stop() would wait for this task forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.wake.wait()

    async def flush(self, deadline: float) -> None:
        """Ship what waits until done or the (monotonic) deadline: shutdown."""
        await self.stop()
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    shipped = await self.ship_once()
            except (TimeoutError, OSError):
                return
            if shipped <= 0:
                return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(2.0):  # (never wait on it for ever)
                    await self._task
            self._task = None
