"""process_open_fds without listing /proc/self/fd on every scrape: the client
descriptors as the runtime counts them, plus the rest as the last listing found them;
and the same families as prometheus_client's ProcessCollector."""

from __future__ import annotations

import os
import socket

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector

from turnserver.ops.telemetry import process_figures
from turnserver.ops.telemetry.process_figures import ProcessFigures


def _open_fds(collector: ProcessFigures) -> float:
    family = next(f for f in collector.collect() if f.name == "process_open_fds")
    return family.samples[0].value


def test_client_sockets_count_at_once_and_leaks_at_the_next_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    used = [0]
    figures = ProcessFigures(lambda: used[0], registry=None)
    before = _open_fds(figures)
    assert abs(before - len(os.listdir("/proc/self/fd"))) <= 2
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
    try:
        used[0] = 50  # the runtime counts its relay sockets as it opens them
        assert _open_fds(figures) == before + 50  # no listing needed
        leaked = [socket.socket() for _ in range(7)]  # outside the budget
        monkeypatch.setattr(process_figures, "FD_LIST_INTERVAL", 0.0)
        _open_fds(figures)  # starts a listing in a thread; this scrape does not wait
        assert figures._listing is not None
        figures._listing.join(5)
        monkeypatch.setattr(process_figures, "FD_LIST_INTERVAL", 3600.0)
        # (a descriptor the scrape itself had open while the thread listed may count)
        assert 0 <= _open_fds(figures) - (before + 57) <= 2
        for s in leaked:
            s.close()
    finally:
        for s in socks:
            s.close()


def test_the_same_families_as_prometheus_clients() -> None:
    ours = {f.name for f in ProcessFigures(lambda: 0, registry=None).collect()}
    theirs = {f.name for f in ProcessCollector(registry=CollectorRegistry()).collect()}
    assert ours == theirs
