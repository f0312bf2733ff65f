"""Each tenant's relayed bytes in the calendar month (UTC), across worker processes
and restarts: every process writes its own counts to `month-<worker>.json` in the
state directory and sums everyone's of the same month. A crashed worker's file keeps
what it had counted at its last save (every few seconds); its replacement goes on
from there."""

from __future__ import annotations

import contextlib
import json
import os
import time

from turnserver.ops.usage.spool import _write_atomic


def month_of(wall: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(wall))


class MonthlyUsage:
    """This process's bytes per tenant this month, and the sum over all processes."""

    def __init__(self, directory: str, worker: int, wall: float) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"month-{worker}.json")
        self.month = month_of(wall)
        self.own: dict[str, int] = {}
        saved = self._read(self.path)
        if saved is not None and saved[0] == self.month:
            self.own = saved[1]
        self.dirty = False
        self.totals: dict[str, int] = dict(self.own)

    @staticmethod
    def _read(path: str) -> tuple[str, dict[str, int]] | None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            counts = {str(k): int(v) for k, v in data["bytes"].items()}
            return str(data["month"]), counts
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def add(self, tenant: str, nbytes: int) -> None:
        if nbytes > 0:
            self.own[tenant] = self.own.get(tenant, 0) + nbytes
            self.dirty = True

    def roll(self, wall: float) -> bool:
        """A new month began: every count starts again at 0 (True when it did)."""
        month = month_of(wall)
        if month == self.month:
            return False
        self.month, self.own, self.dirty = month, {}, True
        return True

    def save_and_sum(self) -> dict[str, int]:
        """Write our counts (when they changed), then the month's totals of every
        process's file."""
        if self.dirty:
            data = json.dumps({"month": self.month, "bytes": self.own}).encode()
            with contextlib.suppress(OSError):
                _write_atomic(self.path, data)
                self.dirty = False
        totals = dict(self.own)
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if not (name.startswith("month-") and name.endswith(".json")) or path == self.path:
                    continue
                saved = self._read(path)
                if saved is None or saved[0] != self.month:
                    continue
                for tenant, n in saved[1].items():
                    totals[tenant] = totals.get(tenant, 0) + n
        self.totals = totals
        return totals
