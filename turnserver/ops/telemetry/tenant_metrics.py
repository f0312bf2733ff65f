"""Per-tenant series, registered only when the configuration has tenants (the label's
values are the configured tenants' names and `default`, never client input)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.core import events as ev

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime


class TenantMetrics(Collector):
    """Allocations, refusals and relayed bytes by tenant: counted from events, the live
    part summed on scrape."""

    def __init__(self, runtime: ServerRuntime) -> None:
        self.runtime = runtime
        self.created: dict[str, int] = {}
        self.refused: dict[tuple[str, str], int] = {}
        self.ended_bytes: dict[tuple[str, str], int] = {}

    def sink(self) -> ev.EventTable:
        return ev.EventTable(
            {
                ev.AllocationCreated: self._created,
                ev.AllocationRefused: self._refused,
                ev.AllocationEnded: self._ended,
            }
        )

    def _created(self, event: ev.AllocationCreated) -> None:
        if event.username in self.runtime.core.probe_users:
            return  # the self-probe is the server's, no tenant's
        self.created[event.tenant] = self.created.get(event.tenant, 0) + 1

    def _refused(self, event: ev.AllocationRefused) -> None:
        if event.reason == "unauthenticated":  # the first 401 of every allocation
            return
        key = (event.tenant, event.reason)
        self.refused[key] = self.refused.get(key, 0) + 1

    def _ended(self, event: ev.AllocationEnded) -> None:
        if event.username in self.runtime.core.probe_users:
            return
        for direction, n in (
            ("to_peer", event.bytes_to_peer),
            ("to_client", event.bytes_to_client),
        ):
            key = (event.tenant, direction)
            self.ended_bytes[key] = self.ended_bytes.get(key, 0) + n

    def collect(self) -> Iterator[Metric]:
        # (the kernel's counts are folded in already: Metrics' collector, registered
        # before this one, folds them at the start of every scrape)
        core = self.runtime.core
        active: dict[str, int] = dict.fromkeys(core.tenants, 0)
        moved = dict(self.ended_bytes)
        probes = core.probe_users
        for alloc in core.allocations.values():
            if alloc.username in probes:
                continue
            t = alloc.tenant
            active[t] = active.get(t, 0) + 1
            for direction, n in (
                ("to_peer", alloc.bytes_to_peer),
                ("to_client", alloc.bytes_to_client),
            ):
                moved[(t, direction)] = moved.get((t, direction), 0) + n
        gauge = GaugeMetricFamily(
            "turn_tenant_allocations_active", "Live allocations by tenant", labels=["tenant"]
        )
        for tenant, n in sorted(active.items()):
            gauge.add_metric([tenant], n)
        yield gauge
        created = CounterMetricFamily(
            "turn_tenant_allocations", "Allocations created, by tenant", labels=["tenant"]
        )
        for tenant in sorted(set(self.created) | set(core.tenants)):
            created.add_metric([tenant], self.created.get(tenant, 0))
        yield created
        refused = CounterMetricFamily(
            "turn_tenant_allocation_failures",
            "Allocate requests refused after authentication, by tenant and reason",
            labels=["tenant", "reason"],
        )
        for (tenant, reason), n in sorted(self.refused.items()):
            refused.add_metric([tenant, reason], n)
        yield refused
        relayed = CounterMetricFamily(
            "turn_tenant_relayed_bytes",
            "Bytes relayed by tenant and direction (kernel fast path included)",
            labels=["tenant", "direction"],
        )
        for (tenant, direction), n in sorted(moved.items()):
            relayed.add_metric([tenant, direction], n)
        yield relayed
