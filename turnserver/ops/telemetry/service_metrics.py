"""Metrics of the HTTP services a process runs: the credentials and admin APIs'
counters and the HTTP listeners' connection caps (a supervisor exports these for the
APIs it serves; a single process as part of its TurnCollector)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.ops.http.serve import GUARD

if TYPE_CHECKING:
    from turnserver.ops.http.admin_api import AdminApi
    from turnserver.ops.http.credentials_api import CredentialsApi


def admin_requests(admin: AdminApi) -> Metric:
    """turn_admin_requests_total{action,status}."""
    family = CounterMetricFamily(
        "turn_admin_requests",
        "Admin API requests, by action and status",
        labels=["action", "status"],
    )
    for (action, status), n in sorted(admin.stats.requests.items()):
        family.add_metric([action, str(status)], n)
    return family


def api_families(api: CredentialsApi) -> Iterator[Metric]:
    """turn_api_requests_total{endpoint,status} and turn_api_rate_limited_total."""
    requests = CounterMetricFamily(
        "turn_api_requests", "Credentials API requests", labels=["endpoint", "status"]
    )
    for (endpoint, status), n in sorted(api.stats.requests.items()):
        requests.add_metric([endpoint, str(status)], n)
    yield requests
    yield CounterMetricFamily(
        "turn_api_rate_limited", "API requests refused with 429", value=api.stats.rate_limited
    )


def http_families() -> Iterator[Metric]:
    """The HTTP listeners' connections and refusals (ops/http/serve.py)."""
    active = GaugeMetricFamily(
        "turn_http_connections_active", "Open HTTP connections, by listener", labels=["listener"]
    )
    for listener, n in sorted(GUARD.active().items()):
        active.add_metric([listener], n)
    yield active
    refused = CounterMetricFamily(
        "turn_http_connections_refused",
        "HTTP connections refused or closed at a cap, by listener and reason",
        labels=["listener", "reason"],
    )
    for (listener, reason), n in sorted(GUARD.refused.items()):
        refused.add_metric([listener, reason], n)
    yield refused


class ServiceCollector(Collector):
    """The HTTP services of a process: the credentials and admin APIs' counters (a
    supervisor's own, beside its workers' metrics) and the HTTP listeners' caps."""

    def __init__(self) -> None:
        self.api: CredentialsApi | None = None
        self.admin: AdminApi | None = None

    def collect(self) -> Iterator[Metric]:
        if self.admin is not None:
            yield admin_requests(self.admin)
        if self.api is not None:
            yield from api_families(self.api)
        yield from http_families()
