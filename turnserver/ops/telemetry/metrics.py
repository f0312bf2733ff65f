"""Prometheus metrics, live: event counters updated as things happen, and the relay's
plain-int counters and state gauges folded in when Prometheus scrapes.

Label values are bounded (transport, family, method, code, reason, direction): no
usernames or addresses.

Longer than 500 lines: every metric family is declared here, names, help and labels
side by side, so that a review sees the whole exported surface in one file.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from turnserver import __version__
from turnserver.core import events as ev
from turnserver.core.five_tuple import ClientTransport
from turnserver.io.stream_admission import PROXY_REFUSALS, STREAM_CAPS
from turnserver.ops.telemetry.process_figures import ProcessFigures
from turnserver.ops.telemetry.service_metrics import ServiceCollector

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series

TRANSPORTS = tuple(t.value for t in ClientTransport)
_TRANSPORT_NAMES = {t: t.value for t in ClientTransport}  # an enum's .value is a descriptor
REQUEST_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
LIFETIME_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)
HANDOVER_RESULTS = {"forwarded": 0, "handed_over": 0, "received": 0, "failed": 0}
TLS_FAILURE_REASONS = (
    "handshake_timeout",
    "certificate_unknown",
    "unknown_ca",
    "bad_certificate",
    "certificate_expired",
    "protocol_version",
    "no_shared_cipher",
    "no_application_protocol",
    "not_tls",
    "client_aborted",
    "ssl_error",
    "other",
)


class TurnCollector(ServiceCollector):
    """Scrape-time values from the running server (and its HTTP services)."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime: ServerRuntime | None = None

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        runtime = self.runtime
        if runtime is None:
            return
        core = runtime.core
        active = GaugeMetricFamily(
            "turn_allocations_active", "Live allocations", labels=["transport", "family"]
        )
        counts: dict[tuple[str, str], int] = {
            (t, f): 0 for t in TRANSPORTS for f in ("ipv4", "ipv6")
        }
        offload = runtime.offload
        if offload is not None:  # what the kernel relayed joins the allocations' counts
            offload.fold(core.allocations)
        # One pass over the allocations for every per-allocation figure: a scrape is
        # O(allocations), and at tens of thousands each step of this loop shows.
        s = core.stats
        pp, bp = s.ended_packets_to_peer, s.ended_bytes_to_peer
        pc, bc = s.ended_packets_to_client, s.ended_bytes_to_client
        permissions = channels = 0
        get = counts.get
        for alloc in core.allocations.values():  # (benchmarks/README.md "Scale")
            key = alloc.kind
            counts[key] = get(key, 0) + 1
            permissions += len(alloc.permissions)
            channels += len(alloc.bindings)
            pp += alloc.packets_to_peer
            bp += alloc.bytes_to_peer
            pc += alloc.packets_to_client
            bc += alloc.bytes_to_client
        for (transport, family), n in sorted(counts.items()):
            active.add_metric([transport, family], n)
        yield active
        yield GaugeMetricFamily(
            "turn_permissions_active", "Installed permissions", value=permissions
        )
        yield GaugeMetricFamily("turn_channels_active", "Bound channels", value=channels)
        packets = CounterMetricFamily(
            "turn_relayed_packets", "Packets relayed", labels=["direction"]
        )
        octets = CounterMetricFamily(
            "turn_relayed_bytes", "Payload bytes relayed", labels=["direction"]
        )
        yield GaugeMetricFamily(
            "turn_offload_enabled",
            "1 when channel-bound UDP flows are relayed in the kernel (relay.offload)",
            value=1 if offload is not None else 0,
        )
        yield GaugeMetricFamily(
            "turn_offload_flows_active",
            "Channel bindings relayed in the kernel now",
            value=offload.active() if offload is not None else 0,
        )
        passed = CounterMetricFamily(
            "turn_offload_passed_up",
            "Packets of kernel-relayed flows passed up to user space, by reason",
            labels=["reason"],
        )
        kernel = CounterMetricFamily(
            "turn_offload_relayed_packets",
            "Packets relayed in the kernel (also counted in turn_relayed_packets_total)",
            labels=["direction"],
        )
        if offload is not None:
            for reason, n in offload.prog.pass_reasons().items():
                passed.add_metric([reason], n)
            kernel.add_metric(["client_to_peer"], offload.relayed[0])
            kernel.add_metric(["peer_to_client"], offload.relayed[2])
        yield passed
        yield kernel
        packets.add_metric(["client_to_peer"], pp)
        packets.add_metric(["peer_to_client"], pc)
        octets.add_metric(["client_to_peer"], bp)
        octets.add_metric(["peer_to_client"], bc)
        yield packets
        yield octets
        dropped = CounterMetricFamily(
            "turn_dropped_packets", "Packets dropped, by reason", labels=["reason"]
        )
        for reason, value in core.stats.drops().items():
            dropped.add_metric([reason], value)
        yield dropped
        yield CounterMetricFamily(
            "turn_icmp_to_client",
            "ICMP errors about relayed datagrams passed to clients (RFC 8656 §11.6)",
            value=core.stats.icmp_to_client,
        )
        yield GaugeMetricFamily(
            "turn_relay_ports_free", "Free relay ports", value=core.relay_ports_free()
        )
        yield GaugeMetricFamily(
            "turn_relay_ports_total",
            "Relay ports configured",
            value=sum(p.size for p in core.port_pools.values()),
        )
        conns = GaugeMetricFamily(
            "turn_stream_connections_active",
            "Open TCP/TLS client connections",
            labels=["transport"],
        )
        per: dict[str, int] = {"tcp": 0, "tls": 0}
        for ft in runtime.stream_connections:
            per[ft.transport.value] = per.get(ft.transport.value, 0) + 1
        for transport, n in sorted(per.items()):
            conns.add_metric([transport], n)
        yield conns
        yield GaugeMetricFamily(
            "turn_peer_connections_active",
            "RFC 6062 peer TCP connections",
            value=len(core.peer_connections),
        )
        yield from self._limits(runtime)
        errors = CounterMetricFamily(
            "turn_internal_errors",
            "Exceptions that escaped the protocol core (bugs), by where the input came from",
            labels=["source"],
        )
        for source in ("udp", "tcp", "tls", "peer"):
            errors.add_metric([source], runtime.internal_errors.get(source, 0))
        yield errors
        yield from self._workers(runtime)

    @staticmethod
    def _workers(runtime: ServerRuntime) -> Iterator[Metric]:
        """The families a supervisor adds for its workers, as one process has them (so
        that one process and several export the same series)."""
        moved = CounterMetricFamily(
            "turn_peer_handovers",
            "RFC 6062 peer connections moved between workers for a ConnectionBind",
            labels=["result"],
        )
        stats = runtime.handover.stats if runtime.handover is not None else HANDOVER_RESULTS
        for result in HANDOVER_RESULTS:
            moved.add_metric([result], stats.get(result, 0))
        yield moved
        if runtime.handover is not None:
            return  # a worker: its supervisor reports the rest
        workers = GaugeMetricFamily(
            "turn_workers", "Worker processes, configured and alive", labels=["state"]
        )
        workers.add_metric(["configured"], 1)
        workers.add_metric(["alive"], 1)
        yield workers
        yield CounterMetricFamily(
            "turn_worker_restarts", "Workers restarted after they exited", value=0
        )
        yield CounterMetricFamily(
            "turn_worker_spawn_failures",
            "Attempts to start a worker process that failed (retried with backoff)",
            value=0,
        )
        yield GaugeMetricFamily(
            "turn_metrics_unmerged_families",
            "Metric families without a declared merge rule across workers (summed)",
            value=0,
        )

    @staticmethod
    def _limits(runtime: ServerRuntime) -> Iterator[Metric]:
        """The limits in force (0: unlimited), so a dashboard can show headroom."""
        budget = runtime.descriptors
        limits = GaugeMetricFamily(
            "turn_limit", "Limits in force (0 means unlimited)", labels=["name"]
        )
        for name, value in runtime.limits().items():
            limits.add_metric([name], value)
        yield limits
        yield GaugeMetricFamily(
            "turn_descriptors_used",
            "File descriptors held for clients (connections, relay sockets)",
            value=budget.used,
        )
        refused = CounterMetricFamily(
            "turn_stream_connections_refused",
            "TCP/TLS connections refused at a cap or by the PROXY listeners' rules",
            labels=["reason"],
        )
        for reason in (*STREAM_CAPS, *PROXY_REFUSALS):
            refused.add_metric([reason], runtime.stream_refusals.get(reason, 0))
        yield refused


_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "allocations": ("turn_allocations", "Allocations created", ("transport",)),
    "allocation_failures": (
        "turn_allocation_failures",
        "Allocate requests refused, by check that failed",
        ("transport", "code", "reason"),
    ),
    "auth_failures": (
        "turn_auth_failures",
        "Requests whose credentials were refused",
        ("reason",),
    ),
    "requests": ("turn_requests", "STUN/TURN requests answered", ("method", "result")),
    "request_failures": (
        "turn_request_failures",
        "Requests other than Allocate refused, by method, code and reason",
        ("method", "code", "reason"),
    ),
}


class EventCounts(Collector):
    """Counters and the request-duration histogram as plain ints, read on scrape (the
    event sink and the metrics listener share the event loop: no lock needed)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], int]] = {k: {} for k in _FAMILIES}
        self.buckets: dict[str, list[int]] = {}  # method -> count per bucket (+Inf last)
        self.sums: dict[str, float] = {}

    def touch(self, family: str, *labels: str) -> None:
        """Export the label set at 0 before anything happened."""
        self.values[family].setdefault(labels, 0)

    def inc(self, family: str, *labels: str) -> None:
        values = self.values[family]
        values[labels] = values.get(labels, 0) + 1

    def observe(self, method: str, seconds: float) -> None:
        counts = self.buckets.get(method)
        if counts is None:
            counts = self.buckets[method] = [0] * (len(REQUEST_BUCKETS) + 1)
            self.sums[method] = 0.0
        counts[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self.sums[method] += seconds

    def collect(self) -> Iterator[Metric]:
        for key, (name, doc, labels) in _FAMILIES.items():
            family = CounterMetricFamily(name, doc, labels=list(labels))
            for label_values, value in sorted(self.values[key].items()):
                family.add_metric(list(label_values), value)
            yield family
        hist = HistogramMetricFamily(
            "turn_request_duration_seconds", "Time to answer a request", labels=["method"]
        )
        for method, counts in sorted(self.buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip((*REQUEST_BUCKETS, float("inf")), counts, strict=True):
                running += n
                cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            hist.add_metric([method], cumulative, self.sums[method])
        yield hist


class Metrics:
    """The registry and the event sink that keeps it current."""

    def _descriptors_used(self) -> int:
        """The runtime's client descriptors now (ops/telemetry/process_figures.py)."""
        collector = getattr(self, "collector", None)  # (not yet while __init__ runs)
        runtime = collector.runtime if collector is not None else None
        return runtime.descriptors.used if runtime is not None else 0

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessFigures(self._descriptors_used, registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)  # python_gc_*: a busy collector costs setups
        r = self.registry
        info = Gauge("turn_build_info", "Build information", ["version"], registry=r)
        info.labels(__version__).set(1)
        # The per-request families are plain ints bumped by the event sink and exposed on
        # scrape (EventCounts): prometheus_client's inc()/observe() take a lock each, a
        # measurable share of an allocation setup's CPU (benchmarks/README.md).
        self.counts = EventCounts()
        r.register(self.counts)
        self.allocation_lifetime = Histogram(
            "turn_allocation_lifetime_seconds",
            "How long allocations lived",
            buckets=LIFETIME_BUCKETS,
            registry=r,
        )
        self.peer_denied = Counter(
            "turn_peer_denied_total",
            "Peers refused with 403: by the peer policy, as an address of this host, or at "
            "a port this server listens on",
            ["reason"],
            registry=r,
        )
        for reason in ("policy", "host_address", "own_port"):
            self.peer_denied.labels(reason)
        self.connections_closed = Counter(
            "turn_connections_closed_total",
            "TCP/TLS client connections closed, by reason: the server's decision (timeouts, "
            "caps, framing errors, shutdown) or peer_closed (the RFC 6062 peer side ended)",
            ["reason"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "turn_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out, by reason",
            ["reason"],
            registry=r,
        )
        self.permissions_revoked = Counter(
            "turn_permissions_revoked_total",
            "Permissions removed before they expired (e.g. a reloaded peer policy)",
            ["reason"],
            registry=r,
        )
        self.probe_success = Gauge(
            "turn_probe_success", "1 if the last self-probe passed", ["transport"], registry=r
        )
        self.probe_rtt = Gauge(
            "turn_probe_rtt_seconds",
            "Round trip through the relay in the last self-probe",
            ["transport"],
            registry=r,
        )
        self.probe_runs = Counter(
            "turn_probe_runs_total", "Self-probes run", ["transport", "result"], registry=r
        )
        self.certificate_expiry = Gauge(
            "turn_tls_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate expires (Unix time; 0: unreadable)",
            registry=r,
        )
        self.loop_lag = Gauge(
            "turn_event_loop_lag_seconds", "How late the event loop ran its heartbeat", registry=r
        )
        for transport in TRANSPORTS:
            self.counts.touch("allocations", transport)
        for reason in ("unauthenticated", "bad_credentials", "expired_credentials", "stale_nonce"):
            self.counts.touch("auth_failures", reason)
        for reason in TLS_FAILURE_REASONS:
            self.tls_handshake_failures.labels(reason)
        self.collector = TurnCollector()
        r.register(self.collector)
        self.internal_users: frozenset[str] = frozenset()
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self.on_event = self._event_table()

    def _child(self, metric: Counter, *labels: str) -> Counter:
        """metric.labels(...) with a cache: the lookup is slow on the request path."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _event_table(self) -> ev.EventTable:
        """The event sink: one counter update per control-plane event, a handler per
        type. Events of internal users (the self-probe) are not user traffic: it
        reports through turn_probe_*."""
        return ev.EventTable(
            {
                ev.RequestHandled: self._request_handled,
                ev.AllocationCreated: self._allocation_created,
                ev.AllocationRefused: self._allocation_refused,
                ev.AuthFailed: self._auth_failed,
                ev.AllocationEnded: self._allocation_ended,
                ev.PeerDenied: self._by_reason(self.peer_denied),
                ev.ConnectionClosed: self._by_reason(self.connections_closed),
                ev.TlsHandshakeFailed: self._by_reason(self.tls_handshake_failures),
                ev.PermissionRevoked: self._by_reason(self.permissions_revoked),
            }
        )

    def _request_handled(self, event: ev.RequestHandled) -> None:
        if event.username in self.internal_users:
            return
        code = event.code
        method = event.method
        result = "success" if code == 0 else str(int(code))
        self.counts.inc("requests", method, result)
        if code and method != "allocate" and code not in (401, 438):
            self.counts.inc("request_failures", method, result, event.reason)
        if event.duration is not None:
            self.counts.observe(method, event.duration)

    def _allocation_created(self, event: ev.AllocationCreated) -> None:
        if event.username not in self.internal_users:
            self.counts.inc("allocations", _TRANSPORT_NAMES[event.five_tuple.transport])

    def _allocation_refused(self, event: ev.AllocationRefused) -> None:
        if event.username in self.internal_users:
            return
        transport = _TRANSPORT_NAMES[event.five_tuple.transport]
        self.counts.inc("allocation_failures", transport, str(int(event.code)), event.reason)
        if event.reason == "unauthenticated":
            self.counts.inc("auth_failures", "unauthenticated")

    def _auth_failed(self, event: ev.AuthFailed) -> None:
        if event.username not in self.internal_users:
            self.counts.inc("auth_failures", event.reason)

    def _allocation_ended(self, event: ev.AllocationEnded) -> None:
        if event.username not in self.internal_users:
            self.allocation_lifetime.observe(event.duration)

    def _by_reason(self, metric: Counter) -> Callable[[Any], None]:
        def count(event: Any) -> None:  # ReasonEvent, PermissionRevoked
            if getattr(event, "username", "") not in self.internal_users:
                self._child(metric, event.reason).inc()

        return count
