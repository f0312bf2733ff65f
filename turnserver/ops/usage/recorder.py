"""Usage records of one process's allocations (schema in docs/usage.md).

`start` when an allocation is created, `interim` every usage.interim_interval with
its counts so far, `stop` when it ends with its cause. Every record has a unique `id`
(receivers deduplicate: delivery is at least once) and the `allocation_id` its
records share. Counts include what the kernel fast path relayed (folded in before
each interim; at the end the flows are removed with their last counts).

Records are appended to the spool (ops/usage/spool.py) as they are made, and to this
process's crash ledger (`live.jsonl`): start and stop lines, rewritten at each
interim with the interim of every live allocation. A process that starts and finds
a ledger with allocations that never stopped (its predecessor was killed) writes
their `stop` records, cause `worker_crash`, from their last counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turnserver.core import events as ev
from turnserver.core.allocation import Allocation
from turnserver.core.five_tuple import FiveTuple, format_address
from turnserver.ops.usage.ledger import CRASH_CAUSE, CrashLedger
from turnserver.ops.usage.month import MonthlyUsage
from turnserver.ops.usage.sinks import SCHEMA_VERSION, FileSink, Shipper, Sink, WebhookSink
from turnserver.ops.usage.sparse_log import SPARSE
from turnserver.ops.usage.spool import Spool

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime
    from turnserver.ops.config.settings import Settings

log = logging.getLogger("turnserver")
MONTH_TICK = 5.0  # seconds between monthly counts (and quota checks)
MAX_PEERS = 4096  # distinct peers remembered per allocation; counted beyond
SHUTDOWN_FLUSH = 5.0  # seconds a clean stop spends delivering what waits


@dataclass(frozen=True)
class UsageOptions:
    """The usage settings a recorder runs with (reloadable ones are re-read on SIGHUP)."""

    state_dir: str
    interim: float
    file: str | None
    webhook_url: str
    webhook_token: str | None
    webhook_batch: int
    webhook_timeout: float
    retry_max: float
    spool_max_bytes: int
    spool_full: str
    monthly: dict[str, tuple[int, bool]]  # tenant -> (bytes a month, refuse at it)

    @staticmethod
    def of(s: Settings) -> UsageOptions | None:
        monthly = {t.name: (t.monthly_bytes, t.monthly_action == "refuse") for t in s.tenants}
        monthly = {k: v for k, v in monthly.items() if v[0]}
        if not s.usage_state_dir or not (s.usage_file or s.usage_webhook_url or monthly):
            return None
        return UsageOptions(
            state_dir=s.usage_state_dir,
            interim=s.usage_interim,
            file=s.usage_file,
            webhook_url=s.usage_webhook_url,
            webhook_token=s.usage_webhook_token,
            webhook_batch=s.usage_webhook_batch,
            webhook_timeout=s.usage_webhook_timeout,
            retry_max=s.usage_webhook_retry_max,
            spool_max_bytes=s.usage_spool_max_bytes,
            spool_full=s.usage_spool_full,
            monthly=monthly,
        )

    @property
    def records(self) -> bool:
        return bool(self.file or self.webhook_url)


class LiveUsage:
    """What the recorder keeps of one live allocation."""

    __slots__ = ("base", "counted", "peers", "peers_over", "seq")

    def __init__(self, base: dict[str, Any]) -> None:
        self.base = base  # the fields every record of the allocation repeats
        self.seq = 0
        self.counted = 0  # bytes already added to the tenant's month
        self.peers: set[str] = set()
        self.peers_over = 0


class UsageRecorder:
    """Makes the records of one process's allocations and keeps the monthly counts."""

    def __init__(
        self,
        runtime: ServerRuntime,
        options: UsageOptions,
        worker: int,
        workers: int,
        node: str,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.options = options
        self.worker = worker
        self.workers = workers
        self.node = node
        self.wall = wall
        self.boot = secrets.token_hex(4)  # allocation ids are unique across restarts
        self.directory = os.path.join(options.state_dir, f"worker-{worker}")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.live: dict[FiveTuple, LiveUsage] = {}
        self.month = MonthlyUsage(options.state_dir, worker, wall())
        self.records_made: dict[str, int] = {"start": 0, "interim": 0, "stop": 0}
        self.dropped: dict[str, int] = {}
        self.spool: Spool | None = None
        self.shippers: list[Shipper] = []
        self.adopted: list[Shipper] = []
        self.ledger = CrashLedger(os.path.join(self.directory, "live.jsonl"))
        self.warned: set[str] = set()  # warn-only tenants told about this month
        self._last_interim = time.monotonic()
        self._timer: Any = None
        self._full_logged = -60.0
        if options.records:
            self.spool = Spool(os.path.join(self.directory, "spool"), self._sink_names(options))
            self.shippers = [
                Shipper(self.spool, sink, options.webhook_batch, options.retry_max)
                for sink in self._sinks(options)
            ]

    @staticmethod
    def _sink_names(options: UsageOptions) -> tuple[str, ...]:
        return tuple(
            name for name, on in (("file", options.file), ("webhook", options.webhook_url)) if on
        )

    @staticmethod
    def _sinks(options: UsageOptions) -> list[Sink]:
        sinks: list[Sink] = []
        if options.file:
            sinks.append(FileSink(options.file))
        if options.webhook_url:
            sinks.append(
                WebhookSink(options.webhook_url, options.webhook_token, options.webhook_timeout)
            )
        return sinks

    def sink(self) -> ev.EventTable:
        return ev.EventTable(
            {
                ev.AllocationCreated: self._created,
                ev.AllocationEnded: self._ended,
                ev.PermissionInstalled: self._permission,
            }
        )

    # ---- life ----------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a killed predecessor left, then ship and tick."""
        if self.spool is not None:
            self._recover(self.ledger)
            if self.worker == 0:
                self._adopt_orphans()
            self._rewrite_ledger()
            for shipper in (*self.shippers, *self.adopted):
                shipper.on_advance = self._check_full  # refusing ends once they caught up
                shipper.start()
        self._schedule()

    def _schedule(self) -> None:
        self._timer = self.runtime.loop.call_later(
            min(MONTH_TICK, self.options.interim), self._tick
        )

    async def stop(self) -> None:
        """After the runtime stopped (its allocations' stop records are made): deliver
        what waits for a few seconds; the rest stays in the spool for the next start."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._count_month()
        self.month.save_and_sum()
        deadline = time.monotonic() + SHUTDOWN_FLUSH
        for shipper in (*self.shippers, *self.adopted):
            await shipper.flush(deadline)
            await shipper.sink.close()
        if self.spool is not None:
            self.spool.close()
        self.ledger.close(remove=not self.live)  # every allocation stopped: nothing left

    def reconfigure(self, options: UsageOptions) -> None:
        """SIGHUP: the file sink reopens (logrotate), the webhook's address and token,
        the interim interval and the monthly quotas follow; adding or removing a sink
        needs a restart (its spool cursor is made at start)."""
        for shipper in self.shippers:
            sink = shipper.sink
            sink.reopen()
            if isinstance(sink, FileSink) and options.file:
                sink.path = options.file
            if isinstance(sink, WebhookSink) and options.webhook_url:
                sink.url, sink.token = options.webhook_url, options.webhook_token
                sink.timeout = options.webhook_timeout
        if self._sink_names(options) != self._sink_names(self.options):
            log.warning("usage: adding or removing a record sink takes effect at the next start")
        for shipper in (*self.shippers, *self.adopted):
            shipper.retry_max = options.retry_max
        self.options = options
        self._apply_month(self.month.totals)

    # ---- records -------------------------------------------------------------------

    def _base(self, alloc: Allocation, event: ev.AllocationCreated) -> dict[str, Any]:
        ft = alloc.five_tuple
        return {
            "allocation_id": f"{self.node}/{self.boot}/{alloc.id}",
            "node": self.node,
            "worker": self.worker,
            "tenant": alloc.tenant,
            "user": alloc.user,
            "username": alloc.username,
            "client": format_address(ft.client),
            "transport": ft.transport.value,
            "listener": format_address(ft.server),
            "relayed": [format_address(a) for a in event.relayed],
            "tcp_relay": alloc.is_tcp,
            "started": round(self.runtime.core.wall(alloc.created), 3),
        }

    def _record(
        self,
        usage: LiveUsage,
        kind: str,
        counts: tuple[int, int, int, int],
        cause: str = "",
        at: float | None = None,
    ) -> bytes:
        now = self.wall() if at is None else at
        usage.seq += 1
        record = {
            "schema": SCHEMA_VERSION,
            "id": uuid.uuid4().hex,
            "kind": kind,
            "seq": usage.seq,
            "time": round(now, 3),
            **usage.base,
            "duration": round(max(0.0, now - usage.base["started"]), 3),
            "peers": len(usage.peers) + usage.peers_over,
            "packets_to_peer": counts[0],
            "bytes_to_peer": counts[1],
            "packets_to_client": counts[2],
            "bytes_to_client": counts[3],
        }
        if kind == "stop":
            record["cause"] = cause
        self.records_made[kind] += 1
        return json.dumps(record, separators=(",", ":")).encode()

    def _write(self, lines: list[bytes], ledger: bool) -> None:
        """Into the spool (unless it is full and the policy drops), and the ledger."""
        if not lines or self.spool is None:
            return
        data = b"\n".join(lines) + b"\n"
        if ledger:
            self._ledger_append(data)
        if self.spool.size >= self.options.spool_max_bytes and self.options.spool_full == "drop":
            self.dropped["spool_full"] = self.dropped.get("spool_full", 0) + len(lines)
            self._say_full()
            return
        try:
            self.spool.append(data)
        except OSError as exc:
            self.dropped["spool_error"] = self.dropped.get("spool_error", 0) + len(lines)
            SPARSE.error("spool", "usage: writing the spool failed: %s", exc)
            return
        self._check_full()
        for shipper in self.shippers:
            shipper.wake.set()

    def _check_full(self) -> None:
        """usage.spool_full: refuse: new allocations get 508 while the spool is full."""
        spool = self.spool
        full = spool is not None and spool.size >= self.options.spool_max_bytes
        refusing = full and self.options.spool_full == "refuse"
        if refusing != self.runtime.core.usage_full:
            self.runtime.core.usage_full = refusing
            if refusing:
                self._say_full()

    def _say_full(self) -> None:
        now = time.monotonic()
        if now - self._full_logged >= 60.0:
            self._full_logged = now
            log.error(
                "usage: the record spool is full (%d bytes, usage.spool_max_bytes); %s",
                self.spool.size if self.spool else 0,
                "new allocations are refused (usage.spool_full: refuse)"
                if self.options.spool_full == "refuse"
                else "new records are dropped and counted (usage.spool_full: drop)",
            )

    def _created(self, event: ev.AllocationCreated) -> None:
        alloc = self.runtime.core.allocations.get(event.five_tuple)
        if alloc is None or alloc.user in self.runtime.core.probe_users:
            return
        usage = LiveUsage(self._base(alloc, event))
        self.live[event.five_tuple] = usage
        if self.spool is not None:
            self._write([self._record(usage, "start", (0, 0, 0, 0))], ledger=True)

    def _permission(self, event: ev.PermissionInstalled) -> None:
        usage = self.live.get(event.five_tuple)
        if usage is not None and event.peer_ip not in usage.peers:
            if len(usage.peers) < MAX_PEERS:
                usage.peers.add(event.peer_ip)
            else:
                usage.peers_over += 1

    def _ended(self, event: ev.AllocationEnded) -> None:
        usage = self.live.pop(event.five_tuple, None)
        if usage is None:
            return
        total = event.bytes_to_peer + event.bytes_to_client
        self.month.add(event.tenant, total - usage.counted)
        if self.spool is not None:
            counts = (
                event.packets_to_peer,
                event.bytes_to_peer,
                event.packets_to_client,
                event.bytes_to_client,
            )
            self._write([self._record(usage, "stop", counts, event.cause)], ledger=True)

    # ---- the tick: monthly counts, interim records, the ledger ------------------------

    def _count_month(self) -> None:
        runtime = self.runtime
        if runtime.offload is not None:
            runtime.offload.fold(runtime.core.allocations)
        allocations = runtime.core.allocations
        for ft, usage in self.live.items():
            alloc = allocations.get(ft)
            if alloc is not None:
                total = alloc.bytes_to_peer + alloc.bytes_to_client
                self.month.add(alloc.tenant, total - usage.counted)
                usage.counted = total

    def _tick(self) -> None:
        try:
            self._count_month()
            if self.month.roll(self.wall()):
                self.warned.clear()
                for usage in self.live.values():
                    usage.counted = 0  # (what they relayed last month stays there)
            self._apply_month(self.month.save_and_sum())
            now = time.monotonic()
            if self.spool is not None and now - self._last_interim >= self.options.interim:
                self._last_interim = now
                self._interim()
            if self.spool is not None:
                self._check_full()
        except Exception as exc:  # a bug or the disk: say so, keep ticking
            self.runtime.core_failed("usage", exc)
        finally:
            self._schedule()

    def _interim(self) -> None:
        allocations = self.runtime.core.allocations
        lines = []
        for ft, usage in self.live.items():
            alloc = allocations.get(ft)
            if alloc is not None:
                counts = (
                    alloc.packets_to_peer,
                    alloc.bytes_to_peer,
                    alloc.packets_to_client,
                    alloc.bytes_to_client,
                )
                lines.append(self._record(usage, "interim", counts))
        self._write(lines, ledger=False)
        self._rewrite_ledger(lines)

    def _apply_month(self, totals: dict[str, int]) -> None:
        """Tenants at their monthly bytes: refused new allocations, or warned about."""
        refused = set()
        for tenant, (limit, refuse) in self.options.monthly.items():
            if totals.get(tenant, 0) < limit:
                continue
            if refuse:
                refused.add(tenant)
            elif tenant not in self.warned and self.worker == 0:
                self.warned.add(tenant)
                log.warning(
                    "tenant %s relayed %d bytes this month, its quota is %d (warn only)",
                    tenant,
                    totals.get(tenant, 0),
                    limit,
                )
        core = self.runtime.core
        if frozenset(refused) != core.month_exceeded:
            for tenant in refused - core.month_exceeded:
                log.warning(
                    "tenant %s used its %d bytes for the month: new allocations refused (486)",
                    tenant,
                    self.options.monthly[tenant][0],
                )
            core.month_exceeded = frozenset(refused)

    # ---- the crash ledger ------------------------------------------------------------

    def _ledger_append(self, data: bytes) -> None:
        if not self.ledger.append(data):
            self.dropped["ledger_error"] = self.dropped.get("ledger_error", 0) + 1

    def _rewrite_ledger(self, lines: list[bytes] | None = None) -> None:
        """The ledger holds the live allocations' latest records only."""
        if lines is None:
            lines = [self._snapshot(usage) for usage in self.live.values()]
        self.ledger.rewrite(lines)

    def _snapshot(self, usage: LiveUsage) -> bytes:
        record = {"kind": "interim", "time": round(self.wall(), 3), **usage.base}
        return json.dumps(record, separators=(",", ":")).encode()

    def _recover(self, ledger: CrashLedger) -> int:
        """Stop records for the allocations a killed process left in its ledger."""
        lines = ledger.recover()
        self.records_made["stop"] += len(lines)
        if lines:
            log.warning(
                "usage: %d allocations of a process that did not stop cleanly ended; "
                "their stop records (cause %s) carry the last interim counts",
                len(lines),
                CRASH_CAUSE,
            )
            self._write(lines, ledger=False)
        return len(lines)

    def _adopt_orphans(self) -> None:
        """Worker directories beyond today's worker count (the server ran with more):
        their crash ledgers are recovered here and their spools shipped."""
        assert self.spool is not None
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.options.state_dir)):
                index = name.removeprefix("worker-")
                if not name.startswith("worker-") or not index.isdigit():
                    continue
                if int(index) < self.workers:
                    continue
                directory = os.path.join(self.options.state_dir, name)
                self._recover(CrashLedger(os.path.join(directory, "live.jsonl")))
                if os.path.isdir(os.path.join(directory, "spool")):
                    spool = Spool(os.path.join(directory, "spool"), self.spool.sinks)
                    self.adopted += [
                        Shipper(spool, sink, self.options.webhook_batch, self.options.retry_max)
                        for sink in self._sinks(self.options)
                    ]
