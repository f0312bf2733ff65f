"""Disk and sink trouble is logged once a minute per kind, with how many more there
were: a full disk must not turn every record into a log line."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("turnserver")
INTERVAL = 60.0


class SparseLog:
    """Error lines by kind, at most one per INTERVAL each."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def error(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(kind, (-INTERVAL, 0))
        if now - last < INTERVAL:
            self._last[kind] = (last, suppressed + 1)
            return
        self._last[kind] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.error(message + more, *args)


SPARSE = SparseLog()
