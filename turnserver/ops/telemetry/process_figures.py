"""process_* as prometheus_client's ProcessCollector exports them, but for
process_open_fds without listing /proc/self/fd on every scrape.

Every allocation holds a relay socket: at 10,000 allocations the listing took 8-10 ms of
a 21 ms scrape, and at 50,000 it would take about 45 ms on the event loop. The count is
now two parts:
- the client descriptors, which the runtime counts exactly as it opens and closes them
  (DescriptorBudget.used);
- the rest (listeners, the event loop, log files), which the last listing measured.

A listing runs in a thread at most every FD_LIST_INTERVAL seconds. A scrape never waits
for it. A leak outside the budget shows in the count within that interval.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

FD_LIST_INTERVAL = 30.0
FD_DIR = "/proc/self/fd"


class ProcessFigures(ProcessCollector):
    """ProcessCollector with process_open_fds from the budget plus the last listing.

    `used` returns the client descriptors the runtime holds now (0 before it exists).
    """

    def __init__(self, used: Callable[[], int], **kwargs: object) -> None:
        self._used = used
        self._base = 0  # descriptors outside the budget, as of the last listing
        self._listed_at = -FD_LIST_INTERVAL
        self._listing: threading.Thread | None = None
        self._lock = threading.Lock()
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._list_fds()  # the first count is exact (and cheap: nothing is open yet)
        self._listed_at = time.monotonic()

    def _list_fds(self) -> None:
        used = self._used()
        try:
            count = len(os.listdir(FD_DIR))
        except OSError:
            return
        with self._lock:
            self._base = max(0, count - 1 - used)  # (less the listing's own descriptor)

    def open_fds(self) -> int:
        now = time.monotonic()
        listing = self._listing
        if now - self._listed_at >= FD_LIST_INTERVAL and (
            listing is None or not listing.is_alive()
        ):
            self._listed_at = now
            self._listing = threading.Thread(target=self._list_fds, name="fd-count", daemon=True)
            self._listing.start()
        with self._lock:
            return self._base + self._used()

    def collect(self) -> Iterator[Metric]:
        """The parent's families and values, but process_open_fds (see the module)."""
        if not self._btime:
            return
        try:
            with open("/proc/self/stat", "rb") as stat:
                parts = stat.read().split(b")")[-1].split()
            with open("/proc/self/limits", "rb") as limits:
                max_fds = next(
                    float(line.split()[3]) for line in limits if line.startswith(b"Max open file")
                )
        except (OSError, StopIteration, IndexError, ValueError):
            return
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(parts[20])
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            value=float(parts[21]) * self._pagesize,
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            value=float(parts[19]) / self._ticks + self._btime,
        )
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            value=(float(parts[11]) + float(parts[12])) / self._ticks,
        )
        yield GaugeMetricFamily(
            "process_open_fds",
            "Number of open file descriptors (client sockets counted as they change, the "
            f"rest listed every {FD_LIST_INTERVAL:g} s).",
            value=self.open_fds(),
        )
        yield GaugeMetricFamily(
            "process_max_fds", "Maximum number of open file descriptors.", value=max_fds
        )
