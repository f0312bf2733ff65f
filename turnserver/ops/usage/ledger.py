"""A process's crash ledger (`live.jsonl`): what a `stop` record needs of each live
allocation, should the process be killed before it can write one.

Start and stop records are appended as they are made (one write each: they reach the
kernel, and survive a kill -9); at every interim the file is replaced by the interim
records of the allocations still live. The process that starts next in the same place
reads it: every allocation with no stop gets one, cause `worker_crash`, with the counts
and time of its last record.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any

from turnserver.ops.usage.sinks import SCHEMA_VERSION
from turnserver.ops.usage.sparse_log import SPARSE
from turnserver.ops.usage.spool import _write_atomic

CRASH_CAUSE = "worker_crash"
COUNTS = ("packets_to_peer", "bytes_to_peer", "packets_to_client", "bytes_to_client", "peers")


class CrashLedger:
    """One process's ledger file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def append(self, data: bytes) -> bool:
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, data)
        except OSError as exc:
            SPARSE.error("ledger", "usage: writing the crash ledger failed: %s", exc)
            return False
        return True

    def rewrite(self, lines: list[bytes]) -> None:
        try:
            _write_atomic(self.path, b"".join(line + b"\n" for line in lines))
        except OSError as exc:
            SPARSE.error("ledger", "usage: rewriting the crash ledger failed: %s", exc)
        self._close_fd()  # the next append goes to the new file

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def close(self, remove: bool) -> None:
        self._close_fd()
        if remove:
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def recover(self) -> list[bytes]:
        """Stop records (JSON lines) for the allocations the ledger shows live; the
        ledger is removed (they are the caller's to keep now)."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
            stamp = os.path.getmtime(self.path)
        except OSError:
            return []
        latest: dict[str, dict[str, Any]] = {}
        for line in raw.splitlines():
            try:
                record = json.loads(line)
                aid = str(record["allocation_id"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
            if record.get("kind") == "stop":
                latest.pop(aid, None)
            else:
                latest[aid] = record
        lines = []
        for record in latest.values():
            at = float(record.get("time", stamp))
            stop = {
                **{k: v for k, v in record.items() if k not in ("id", "kind", "seq", "time")},
                "schema": SCHEMA_VERSION,
                "id": uuid.uuid4().hex,
                "kind": "stop",
                "seq": int(record.get("seq", 0)) + 1,
                "time": round(at, 3),
                "duration": round(max(0.0, at - float(record.get("started", at))), 3),
                "cause": CRASH_CAUSE,
            }
            for key in COUNTS:
                stop.setdefault(key, 0)
            lines.append(json.dumps(stop, separators=(",", ":")).encode())
        with contextlib.suppress(OSError):
            os.remove(self.path)
        return lines
