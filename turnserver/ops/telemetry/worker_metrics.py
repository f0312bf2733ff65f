"""One /metrics for a supervisor and its workers: every metric family has a declared
rule for combining the processes' values (MERGE_RULES), the workers hand their samples
over as JSON (no exposition text parsed on the way), and the supervisor adds its own
series (the credentials and admin APIs it serves, its workers, its process).

A family without a rule is still exported (summed) and counted in
turn_metrics_unmerged_families, and the test of the merge fails on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from enum import Enum
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from turnserver.io.descriptors import tighter

_go_float = cast(Callable[[float], str], floatToGoString)  # untyped in prometheus_client
_SPECIAL = frozenset({"inf", "-inf", "nan"})


class Merge(Enum):
    """How the workers' values of one series become the server's."""

    SUM = "sum"  # counts and sizes: the server's is the total
    MAX = "max"  # the worst of them (lag, round trip), or one shared value
    MIN = "min"  # the weakest (probe success, the first certificate to expire)
    IDENTICAL = "identical"  # the same in every process (configuration, versions)
    LIMIT = "limit"  # turn_limit: by its name label (see LIMIT_RULES)


MERGE_RULES: dict[str, Merge] = {
    # process and runtime
    "process_cpu_seconds": Merge.SUM,
    "process_resident_memory_bytes": Merge.SUM,
    "process_virtual_memory_bytes": Merge.SUM,
    "process_open_fds": Merge.MAX,  # with process_max_fds: the process nearest its limit
    "process_max_fds": Merge.MIN,
    "process_start_time_seconds": Merge.MIN,  # the service's start (the supervisor)
    "python_info": Merge.IDENTICAL,
    "python_gc_objects_collected": Merge.SUM,
    "python_gc_objects_uncollectable": Merge.SUM,
    "python_gc_collections": Merge.SUM,
    "turn_build_info": Merge.IDENTICAL,
    # event counters and histograms
    "turn_allocations": Merge.SUM,
    "turn_allocation_failures": Merge.SUM,
    "turn_auth_failures": Merge.SUM,
    "turn_requests": Merge.SUM,
    "turn_request_failures": Merge.SUM,
    "turn_request_duration_seconds": Merge.SUM,
    "turn_allocation_lifetime_seconds": Merge.SUM,
    "turn_peer_denied": Merge.SUM,
    "turn_connections_closed": Merge.SUM,
    "turn_tls_handshake_failures": Merge.SUM,
    "turn_permissions_revoked": Merge.SUM,
    "turn_probe_runs": Merge.SUM,
    "turn_relayed_packets": Merge.SUM,
    "turn_relayed_bytes": Merge.SUM,
    "turn_dropped_packets": Merge.SUM,
    "turn_icmp_to_client": Merge.SUM,
    "turn_stream_connections_refused": Merge.SUM,
    "turn_offload_relayed_packets": Merge.SUM,  # each worker folds its own flows
    "turn_dev_impaired_packets": Merge.SUM,
    "turn_api_requests": Merge.SUM,  # the supervisor's (it serves the API)
    "turn_api_rate_limited": Merge.SUM,
    "turn_admin_requests": Merge.SUM,  # the supervisor's (workers' copies are internal)
    "turn_worker_restarts": Merge.SUM,
    "turn_worker_spawn_failures": Merge.SUM,
    "turn_peer_handovers": Merge.SUM,
    "turn_internal_errors": Merge.SUM,
    "turn_metrics_unmerged_families": Merge.SUM,
    "turn_metrics_scrapes": Merge.SUM,
    "turn_http_connections_refused": Merge.SUM,
    "turn_fleet_redis_errors": Merge.SUM,  # the fleet is the supervisor's (one node)
    "turn_fleet_quota_leases": Merge.SUM,
    "turn_tenant_allocations": Merge.SUM,
    "turn_tenant_allocation_failures": Merge.SUM,
    "turn_tenant_relayed_bytes": Merge.SUM,
    "turn_usage_records": Merge.SUM,
    "turn_usage_records_dropped": Merge.SUM,
    "turn_usage_sink_sent": Merge.SUM,
    "turn_usage_sink_failures": Merge.SUM,
    "turn_auth_hook_requests": Merge.SUM,
    # state
    "turn_allocations_active": Merge.SUM,
    "turn_permissions_active": Merge.SUM,
    "turn_channels_active": Merge.SUM,
    "turn_stream_connections_active": Merge.SUM,
    "turn_peer_connections_active": Merge.SUM,
    "turn_descriptors_used": Merge.SUM,
    "turn_relay_ports_free": Merge.SUM,
    "turn_relay_ports_total": Merge.SUM,  # each worker has its slice of the range
    "turn_offload_flows_active": Merge.SUM,
    "turn_offload_enabled": Merge.MAX,  # one program for all workers
    "turn_offload_passed_up": Merge.MAX,  # read from the one program's shared counters
    "turn_workers": Merge.SUM,
    "turn_http_connections_active": Merge.SUM,
    "turn_fleet_redis_connected": Merge.MAX,
    "turn_fleet_nodes": Merge.MAX,
    "turn_fleet_quota_held": Merge.SUM,
    "turn_fleet_quota_unwritten_users": Merge.SUM,
    "turn_tenant_allocations_active": Merge.SUM,
    "turn_usage_sink_queued_bytes": Merge.SUM,
    "turn_usage_spool_bytes": Merge.SUM,
    "turn_tenant_month_bytes": Merge.MAX,  # each process sums every process's month file
    "turn_tenant_month_quota_bytes": Merge.IDENTICAL,
    "turn_tenant_month_exceeded": Merge.MAX,
    "turn_auth_hook_circuit_open": Merge.MAX,
    "turn_auth_hook_cached": Merge.SUM,
    "turn_limit": Merge.LIMIT,
    "turn_probe_success": Merge.MIN,
    "turn_probe_rtt_seconds": Merge.MAX,
    "turn_event_loop_lag_seconds": Merge.MAX,
    "turn_tls_certificate_expiry_timestamp_seconds": Merge.MIN,
}

# turn_limit{name}: per-process budgets add up; configured limits are the same everywhere
LIMIT_RULES: dict[str, Merge] = {
    "descriptors": Merge.SUM,
    "stream_connections": Merge.SUM,
    "stream_connections_per_ip": Merge.SUM,  # counted by each worker for its connections
}

Samples = list[tuple[str, str, float]]  # sample name, its label text, value
Family = tuple[str, str, str, Samples]  # name, type, help, samples

_label_texts: dict[tuple[tuple[str, str], ...], str] = {}


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: dict[str, str]) -> str:
    """`a="1",b="2"`: labels sorted and escaped as the text format has them, made once
    per label set (label values are bounded: no client input)."""
    if not labels:
        return ""
    key = tuple(labels.items())
    text = _label_texts.get(key)
    if text is None:
        if len(_label_texts) >= 20_000:
            _label_texts.clear()
        text = _label_texts[key] = ",".join(
            f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items())
        )
    return text


def families_of(registry: CollectorRegistry) -> list[Family]:
    """A registry's samples as plain data: [(name, type, help, [(sample, label text,
    value), ...]), ...] (what a worker hands its supervisor, as JSON)."""
    return [
        (
            m.name,
            m.type,
            m.documentation,
            [(s.name, label_text(s.labels), s.value) for s in m.samples],
        )
        for m in registry.collect()
    ]


def export_families(registry: CollectorRegistry) -> bytes:
    """families_of as JSON."""
    return json.dumps(families_of(registry), separators=(",", ":")).encode()


def import_families(raw: object) -> list[Family]:
    """Families from JSON text or from the decoded list, as a worker of ours sent them
    over the bus (a private socket): the shape is checked, the samples are used as they
    are (ValueError or TypeError for anything else)."""
    if isinstance(raw, bytes | str):
        raw = json.loads(raw)
    if not isinstance(raw, list) or not all(
        isinstance(f, list) and len(f) == 4 and isinstance(f[3], list) for f in raw
    ):
        raise ValueError("not a list of metric families")
    return cast(list[Family], raw)


def _combine(rule: Merge, values: list[float]) -> float:
    if rule is Merge.MAX:
        return max(values)
    if rule is Merge.MIN:
        return min(values)
    if rule is Merge.IDENTICAL:
        return values[0]
    return sum(values)


LabelKey = tuple[tuple[str, str], ...]


def merge_families(parts: Iterable[list[Family]], allocations_configured: int = 0) -> list[Family]:
    """Combine the processes' families by MERGE_RULES. `allocations_configured` is
    allocations.max_total (0: unlimited): the server's allocation limit is the tighter of
    it and the workers' descriptor budgets together."""
    families: dict[str, tuple[str, str, dict[tuple[str, str], list[float]]]] = {}
    for part in parts:
        for name, kind, doc, samples in part:
            entry = families.get(name)
            if entry is None:
                entry = families[name] = (kind, doc, {})
            values = entry[2]
            for sample, labels, value in samples:
                seen = values.get((sample, labels))
                if seen is None:
                    values[(sample, labels)] = [value]
                else:
                    seen.append(value)
    out: list[Family] = []
    unmerged = 0
    for name, (kind, doc, values) in families.items():
        rule = MERGE_RULES.get(name)
        if rule is None:
            unmerged += 1
            rule = Merge.SUM
        if rule is Merge.LIMIT:  # one label, name="..."
            limits: dict[str, tuple[str, str, float]] = {}
            for (sample, labels), vals in values.items():
                limit = labels.partition('"')[2].rpartition('"')[0]
                rule_of = LIMIT_RULES.get(limit, Merge.IDENTICAL)
                limits[limit] = (sample, labels, _combine(rule_of, vals))
            if "allocations" in limits:
                descriptors = int(limits["descriptors"][2]) if "descriptors" in limits else 0
                sample, labels, _ = limits["allocations"]
                cap = tighter(allocations_configured, descriptors)
                limits["allocations"] = (sample, labels, float(cap))
            merged: Samples = list(limits.values())
        else:
            merged = [
                (sample, labels, _combine(rule, vals)) for (sample, labels), vals in values.items()
            ]
        out.append((name, kind, doc, merged))
    out.append(
        (
            "turn_metrics_unmerged_families",
            "gauge",
            "Metric families without a declared merge rule across workers (summed)",
            [("turn_metrics_unmerged_families", "", float(unmerged))],
        )
    )
    return out


def render_families(families: Iterable[Family]) -> bytes:
    """The Prometheus text format (0.0.4) of plain families, as prometheus_client's
    generate_latest writes it (counters named with _total, labels sorted)."""
    lines: list[str] = []
    for name, kind, doc, samples in families:
        shown = name + "_total" if kind == "counter" else name
        shown_kind = {"info": "gauge", "unknown": "untyped"}.get(kind, kind)
        help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {shown} {help_text}\n# TYPE {shown} {shown_kind}\n")
        for sample, labels, value in samples:
            text = repr(float(value))
            if (value > 0 and text.find(".") > 6) or text in _SPECIAL:
                text = _go_float(value)  # Go's exponent form, +Inf, NaN
            if labels:
                lines.append(f"{sample}{{{labels}}} {text}\n")
            else:
                lines.append(f"{sample} {text}\n")
    return "".join(lines).encode()


__all__ = [
    "LIMIT_RULES",
    "MERGE_RULES",
    "Merge",
    "export_families",
    "families_of",
    "import_families",
    "label_text",
    "merge_families",
    "render_families",
]
