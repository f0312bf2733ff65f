"""The usage spool, crash ledger and monthly counts on disk: delivery cursors survive a
restart, a line cut short is never delivered, segments go once every sink has them;
a killed process's ledger turns into stop records; months sum across processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from turnserver.core.auth_hook import MAX_PENDING_USERS, MAX_WAITING, HookBook, HookGrant
from turnserver.core.errors import Unauthorized
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.ops.usage import spool as spool_module
from turnserver.ops.usage.ledger import CRASH_CAUSE, CrashLedger
from turnserver.ops.usage.month import MonthlyUsage
from turnserver.ops.usage.sinks import Shipper
from turnserver.ops.usage.spool import Cursor, Spool

JAN, FEB = 1_798_761_600.0, 1_801_440_000.0  # 2027-01-01, 2027-02-01 (UTC)


def _line(i: int) -> bytes:
    return json.dumps({"id": f"r{i}", "n": i}).encode()


def test_records_reach_each_sink_once_across_restarts(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), ("file", "webhook"))
    spool.append(b"".join(_line(i) + b"\n" for i in range(10)))
    batch = spool.read("file", 4)
    assert [json.loads(x)["n"] for x in batch.lines] == [0, 1, 2, 3]
    spool.advance("file", batch.end)
    spool.close()
    again = Spool(str(tmp_path), ("file", "webhook"))  # a restart
    rest = again.read("file", 100)
    assert [json.loads(x)["n"] for x in rest.lines] == list(range(4, 10))
    assert len(again.read("webhook", 100).lines) == 10  # each sink its own cursor


def test_a_partial_line_waits_for_its_end(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), ("file",))
    spool.append(_line(1) + b"\n" + b'{"id": "half')
    batch = spool.read("file", 10)
    assert len(batch.lines) == 1
    spool.advance("file", batch.end)
    spool.append(b'"}\n')
    assert spool.read("file", 10).lines == [b'{"id": "half"}']


def test_segments_go_once_every_sink_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 200)
    spool = Spool(str(tmp_path), ("file", "webhook"))
    for i in range(30):
        spool.append(_line(i) + b"\n")
    assert len(spool.segments()) > 3
    while (batch := spool.read("file", 7)).lines:
        spool.advance("file", batch.end)
    assert len(spool.segments()) > 3  # the webhook has not read them
    got: list[bytes] = []
    while (batch := spool.read("webhook", 5)).lines:
        got += batch.lines
        spool.advance("webhook", batch.end)
    assert [json.loads(x)["n"] for x in got] == list(range(30))
    assert len(spool.segments()) <= 1 and spool.size == 0  # all delivered: all gone
    spool.append(_line(99) + b"\n")
    assert spool.read("file", 5).lines == [_line(99)]


def test_a_killed_processs_ledger_becomes_stop_records(tmp_path: Path) -> None:
    path = str(tmp_path / "live.jsonl")
    ledger = CrashLedger(path)
    base = {"allocation_id": "n/b/w0-1", "started": 100.0, "tenant": "acme"}
    ledger.append(json.dumps({**base, "kind": "start", "seq": 1, "time": 100.0}).encode() + b"\n")
    other = {**base, "allocation_id": "n/b/w0-2"}
    ledger.append(json.dumps({**other, "kind": "start", "seq": 1, "time": 101.0}).encode() + b"\n")
    ledger.rewrite(
        [
            json.dumps(
                {**base, "kind": "interim", "seq": 2, "time": 160.0, "bytes_to_peer": 5}
            ).encode(),
            json.dumps({**other, "kind": "interim", "seq": 2, "time": 160.0}).encode(),
        ]
    )
    ledger.append(json.dumps({**other, "kind": "stop", "seq": 3}).encode() + b"\n")
    ledger.append(b'{"allocation_id": "cut sho')  # the kill
    lines = CrashLedger(path).recover()
    assert not os.path.exists(path)
    (stop,) = [json.loads(x) for x in lines]
    assert stop["allocation_id"] == "n/b/w0-1" and stop["cause"] == CRASH_CAUSE
    assert stop["kind"] == "stop" and stop["seq"] == 3 and stop["bytes_to_peer"] == 5
    assert stop["duration"] == 60.0 and stop["tenant"] == "acme" and len(stop["id"]) == 32


def test_monthly_counts_sum_processes_and_start_again_each_month(tmp_path: Path) -> None:
    one = MonthlyUsage(str(tmp_path), 0, JAN)
    two = MonthlyUsage(str(tmp_path), 1, JAN)
    one.add("acme", 700)
    two.add("acme", 300)
    two.add("beta", 5)
    one.save_and_sum()
    assert two.save_and_sum() == {"acme": 1000, "beta": 5}
    assert MonthlyUsage(str(tmp_path), 0, JAN + 86400).own == {"acme": 700}  # a restart
    assert one.roll(FEB) and one.save_and_sum() == {}  # last month's files do not count
    assert not one.roll(FEB + 3600)


def test_hook_book_holds_requests_and_remembers_answers() -> None:
    book = HookBook()
    ft = FiveTuple(("192.0.2.1", 1), ("192.0.2.2", 3478), ClientTransport.UDP)
    key = ("zed", "example.org")
    assert book.wait(key, ft, b"allocate")  # the first: ask the hook
    assert not book.wait(key, ft, b"allocate")  # its retransmission waits, once
    for i in range(MAX_WAITING + 3):
        book.wait(key, ft, b"other %d" % i)
    assert len(book.pending[key]) == MAX_WAITING
    waiting = book.answer(key, None, 0.0, 1000.0)  # the hook failed
    assert len(waiting) == MAX_WAITING and key not in book.pending
    assert book.failed[key] == 1001.0
    book.answer(key, HookGrant(b"k" * 16, None, 2000.0, None), 0.0, 1000.0)
    assert key in book.granted and key not in book.failed
    for i in range(MAX_PENDING_USERS):
        book.wait((f"u{i}", "r"), ft, b"x")
    with pytest.raises(Unauthorized, match="too many users"):
        book.wait(("one-too-many", "r"), ft, b"x")
    book.answer(("no", "r"), None, 5000.0, 1000.0)
    with pytest.raises(Unauthorized):
        book.identity(None, "no", "r", 1, False, 1000.0)  # type: ignore[arg-type]
    assert Cursor(1, 5) < Cursor(2, 0)


class _Taker:
    name = "file"

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def deliver(self, lines: list[bytes]) -> str:
        self.got += lines
        return ""

    def reopen(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_line_that_is_not_a_record_is_skipped_not_a_poison_pill(tmp_path: Path) -> None:
    """A write cut short (a full disk) leaves half a line that the next record continues:
    that line is skipped and counted; what follows is delivered."""
    spool = Spool(str(tmp_path), ("file",))
    spool.append(_line(1) + b"\n" + b'{"id": "cut')  # the short write
    spool.append(_line(2) + b"\n" + _line(3) + b"\n")
    sink = _Taker()
    shipper = Shipper(spool, sink, 100)
    assert await shipper.ship_once() == 2
    assert [json.loads(x)["n"] for x in sink.got] == [1, 3]
    assert shipper.corrupt == 1 and shipper.sent == 2
    assert await shipper.ship_once() == 0
