"""The usage recorder's numbers on /metrics: records made and dropped, each sink's
deliveries, failures and backlog, the spool's size, and each tenant's month."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.ops.usage.recorder import UsageRecorder

# failure reasons exported at 0 before anything failed (rate() over them works from the
# start); others (os_error_N) appear when they happen
FIRST_REASONS = {
    "webhook": ("connection", "timeout", "http_4xx", "http_5xx"),
    "file": ("short_write",),
}


class UsageCollector(Collector):
    """Read on scrape from the recorder's plain counters."""

    def __init__(self, recorder: UsageRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        rec = self.recorder
        made = CounterMetricFamily(
            "turn_usage_records",
            "Usage records made, by kind (start, interim, stop)",
            labels=["kind"],
        )
        for kind, n in sorted(rec.records_made.items()):
            made.add_metric([kind], n)
        yield made
        dropped = CounterMetricFamily(
            "turn_usage_records_dropped",
            "Usage records not kept: spool_full (usage.spool_full: drop), spool_error, "
            "ledger_error (disk), corrupt (spool lines that were not records, skipped)",
            labels=["reason"],
        )
        corrupt = sum(s.corrupt for s in (*rec.shippers, *rec.adopted))
        for reason in ("spool_full", "spool_error", "ledger_error"):
            dropped.add_metric([reason], rec.dropped.get(reason, 0))
        dropped.add_metric(["corrupt"], corrupt)
        yield dropped
        sent = CounterMetricFamily(
            "turn_usage_sink_sent", "Usage records a sink took", labels=["sink"]
        )
        failed = CounterMetricFamily(
            "turn_usage_sink_failures",
            "Deliveries a sink refused or that failed (retried with backoff), by why",
            labels=["sink", "reason"],
        )
        queued = GaugeMetricFamily(
            "turn_usage_sink_queued_bytes",
            "Bytes of records in the spool a sink has not taken yet",
            labels=["sink"],
        )
        for shipper in (*rec.shippers, *rec.adopted):
            name = shipper.sink.name
            sent.add_metric([name], shipper.sent)
            queued.add_metric([name], shipper.pending())
            reasons = dict.fromkeys(FIRST_REASONS.get(name, ()), 0) | shipper.failures
            for reason, n in sorted(reasons.items()):
                failed.add_metric([name, reason], n)
        yield sent
        yield failed
        yield queued
        spool = GaugeMetricFamily(
            "turn_usage_spool_bytes", "Bytes in the usage record spool (all sinks)"
        )
        spool.add_metric([], rec.spool.size if rec.spool is not None else 0)
        yield spool
        month = GaugeMetricFamily(
            "turn_tenant_month_bytes",
            "Bytes a tenant relayed this calendar month (UTC), all processes",
            labels=["tenant"],
        )
        quota = GaugeMetricFamily(
            "turn_tenant_month_quota_bytes", "A tenant's bytes a month", labels=["tenant"]
        )
        over = GaugeMetricFamily(
            "turn_tenant_month_exceeded",
            "1 when a tenant reached its monthly bytes",
            labels=["tenant"],
        )
        totals = rec.month.totals
        for tenant in sorted(set(totals) | set(rec.options.monthly)):
            month.add_metric([tenant], totals.get(tenant, 0))
        for tenant, (limit, _) in sorted(rec.options.monthly.items()):
            quota.add_metric([tenant], limit)
            over.add_metric([tenant], 1 if totals.get(tenant, 0) >= limit else 0)
        yield month
        yield quota
        yield over
