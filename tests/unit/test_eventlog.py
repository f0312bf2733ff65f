"""The server's log lines (ops/telemetry/eventlog.py): the same text and JSON whether a line comes
through logging or the event fast path, flushed once per event-loop iteration, at
once for warnings and outside a loop."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator

import pytest

from turnserver.core import events as ev
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.ops.telemetry import eventlog

FT = FiveTuple(("192.0.2.7", 40000), ("192.0.2.1", 3478), ClientTransport.UDP)
CREATED = ev.AllocationCreated(FT, 'mallory"\nforged line', (("192.0.2.1", 50000),), 600)
TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO allocation created "
    r"five_tuple=udp:192\.0\.2\.7:40000->192\.0\.2\.1:3478 "
    r'user="mallory\\"\\nforged line" tenant=default relayed=192\.0\.2\.1:50000 lifetime=600'
)


class Stream:
    """stderr stand-in that records each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return "".join(self.writes).splitlines()


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stream]:
    out = Stream()
    root = logging.getLogger(eventlog.LOGGER_NAME)
    saved = root.handlers[:], root.level, root.propagate
    yield out
    root.handlers[:], root.level, root.propagate = saved
    monkeypatch.setattr(eventlog, "_handler", None)


def setup(level: str, fmt: str, stream: Stream) -> None:
    """setup_logging, writing to `stream` (pytest owns sys.stderr during the test)."""
    eventlog.setup_logging(level, fmt)
    assert eventlog._handler is not None
    eventlog._handler.setStream(stream)  # type: ignore[arg-type]


def test_text_line_through_both_paths(stream: Stream) -> None:
    setup("info", "text", stream)
    eventlog.log_event(CREATED)  # the fast path
    assert eventlog._handler is not None
    eventlog.log.removeHandler(eventlog._handler)  # now through logging itself
    eventlog.log.addHandler(logging.StreamHandler(stream))  # type: ignore[arg-type]
    eventlog.log.handlers[-1].setFormatter(eventlog.TextFormatter())
    eventlog.log_event(CREATED)
    fast, slow = stream.lines()
    assert TEXT_LINE.fullmatch(fast), fast
    assert TEXT_LINE.fullmatch(slow), slow  # a client's newline never splits a line


def test_json_line_through_both_paths(stream: Stream) -> None:
    setup("info", "json", stream)
    eventlog.log_event(CREATED)
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(eventlog.JsonFormatter())
    eventlog.log.handlers[:] = [handler]
    eventlog.log_event(CREATED)
    fast, slow = (json.loads(line) for line in stream.lines())
    for line in (fast, slow):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("time"))
    assert fast == slow
    assert fast["event"] == "allocation created" and fast["level"] == "info"
    assert fast["user"] == 'mallory"\nforged line' and fast["lifetime"] == 600


def test_lines_are_flushed_once_per_loop_iteration(stream: Stream) -> None:
    setup("info", "text", stream)

    async def burst() -> tuple[int, int, int]:
        eventlog.log_event(CREATED)
        eventlog.log.info("a line through logging")
        held = len(stream.writes)
        await asyncio.sleep(0)
        after_iteration = len(stream.writes)
        eventlog.log.warning("a warning")  # never held back
        return held, after_iteration, len(stream.writes)

    assert asyncio.run(burst()) == (0, 1, 2)
    lines = stream.lines()
    assert len(lines) == 3 and lines[1].endswith("INFO a line through logging")
    assert lines[2].endswith("WARNING a warning")
    eventlog.log_event(CREATED)  # no loop running: written at once
    assert len(stream.writes) == 3


def test_levels_and_quiet_users_hold(stream: Stream) -> None:
    setup("warning", "text", stream)
    eventlog.log_event(CREATED)  # info: below the level
    probe = ev.AllocationCreated(FT, "turnserver-self-probe", (), 600)
    setup("info", "text", stream)
    eventlog.log_event(probe)  # the self-probe logs at debug
    assert stream.writes == []
    eventlog.log_event(CREATED)  # the control: the same setup writes an ordinary user
    assert len(stream.lines()) == 1 and "allocation created" in stream.lines()[0]
