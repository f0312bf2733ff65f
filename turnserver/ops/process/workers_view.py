"""The supervisor's view of its workers, served as one server's: /metrics merged from
every worker's samples (asked over the worker bus, merged by ops/telemetry/worker_metrics.py's
rules, with the supervisor's own series), and /healthz and /readyz over every worker."""

from __future__ import annotations

import asyncio
import json
import socket
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver import __version__
from turnserver.io.handover import (
    LEASE_TIMEOUT,
    SUPERVISOR,
    bus_path,
    bus_sender,
    send_bus_message,
)
from turnserver.ops.fleet.quota import FleetQuota
from turnserver.ops.http.health import ScrapeCollector, ScrapeThrottle
from turnserver.ops.telemetry.service_metrics import ServiceCollector
from turnserver.ops.telemetry.worker_metrics import (
    Family,
    families_of,
    import_families,
    merge_families,
    render_families,
)

BUS_BUFFER = 1 << 22  # a worker's families are ~15 kB of JSON
FAMILIES_TIMEOUT = 3.0


class WorkerPool(Protocol):
    """What the view reads of the supervisor."""

    n: int
    procs: list[BaseProcess | None]
    stopping: bool

    @property
    def ports(self) -> Any:
        """Per worker its metrics port, then (at n + index) its internal admin port."""


class _WorkerStates(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(
            "turn_workers", "Worker processes, configured and alive", labels=["state"]
        )
        family.add_metric(["configured"], self.pool.n)
        alive = sum(1 for p in self.pool.procs if p is not None and p.is_alive())
        family.add_metric(["alive"], alive)
        return [family]


class WorkersView:
    """Merged /metrics, /healthz and /readyz of a supervisor and its workers."""

    def __init__(self, pool: WorkerPool, bus_dir: str, allocations_configured: int) -> None:
        self.pool = pool
        self.bus_dir = bus_dir
        self.allocations_configured = allocations_configured
        self.bus = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.bus.bind(bus_path(bus_dir, SUPERVISOR))
        self.bus.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUS_BUFFER)
        self._req = 0
        self._waiting: dict[int, asyncio.Future[list[Family]]] = {}
        self.session: aiohttp.ClientSession | None = None
        # the supervisor's own series, merged with its workers' on every scrape
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.services = ServiceCollector()
        self.registry.register(self.services)
        self.registry.register(_WorkerStates(pool))
        self.restarts = Counter(
            "turn_worker_restarts_total",
            "Workers restarted after they exited",
            registry=self.registry,
        )
        self.spawn_failures = Counter(
            "turn_worker_spawn_failures_total",
            "Attempts to start a worker process that failed (retried with backoff)",
            registry=self.registry,
        )
        info = Gauge("turn_build_info", "Build information", ["version"], registry=self.registry)
        info.labels(__version__).set(1)
        self.scrapes = ScrapeThrottle(self._render)
        self.registry.register(ScrapeCollector(self.scrapes))
        self.quota: FleetQuota | None = None  # fleet.max_allocations_per_user: workers ask
        self._lease_tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.session = aiohttp.ClientSession()
        loop.add_reader(self.bus.fileno(), self._bus_readable)

    async def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.bus.fileno())
        except (RuntimeError, ValueError):
            pass
        self.bus.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    def gone(self, worker: int) -> None:
        """Tell every other worker that `worker` died (its RFC 6062 pipes end); its
        fleet quota leases end with its allocations."""
        if self.quota is not None:
            self.quota.owner_gone(worker)
        for other in range(self.pool.n):
            if other != worker:
                send_bus_message(self.bus, self.bus_dir, other, {"op": "gone", "worker": worker})

    # ---- /metrics ---------------------------------------------------------------------

    def _bus_readable(self) -> None:
        """Workers' answers on the bus: their metric families."""
        for _ in range(64):
            try:
                data, addr = self.bus.recvfrom(BUS_BUFFER)
            except OSError:
                return
            try:
                body = json.loads(data)
                op = body.get("op")
                if op in ("lease", "unlease"):
                    self._lease_message(bus_sender(addr), op, body)
                    continue
                waiter = self._waiting.pop(int(body["req"]), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(import_families(body["families"]))
            except (ValueError, KeyError, TypeError):
                continue

    def _lease_message(self, worker: int, op: str, body: dict[str, Any]) -> None:
        """A worker's fleet quota lease asked for, or given back."""
        quota = self.quota
        if quota is None or not 0 <= worker < self.pool.n:
            return
        user = str(body["user"])
        if op == "unlease":
            quota.release(user, worker)
            return
        task = asyncio.get_running_loop().create_task(
            self._lease(quota, worker, int(body["req"]), user)
        )
        self._lease_tasks.add(task)
        task.add_done_callback(self._lease_tasks.discard)

    async def _lease(self, quota: FleetQuota, worker: int, req: int, user: str) -> None:
        loop = asyncio.get_running_loop()
        asked = loop.time()
        ok = await quota.lease(user, worker)
        if ok and loop.time() - asked > LEASE_TIMEOUT - 1.0:
            quota.release(user, worker)  # too late: the worker has refused already
            ok = False
        answer = {"op": "leased", "req": req, "ok": ok}
        if send_bus_message(self.bus, self.bus_dir, worker, answer) and ok:
            quota.release(user, worker)  # the worker will never know it has it

    async def _worker_families(self, index: int) -> list[Family] | None:
        """One worker's metric families over the bus (a datagram each way: no HTTP)."""
        if not self.pool.ports[index]:
            return None
        self._req += 1
        req = self._req
        waiter: asyncio.Future[list[Family]] = asyncio.get_running_loop().create_future()
        self._waiting[req] = waiter
        if send_bus_message(self.bus, self.bus_dir, index, {"op": "metrics", "req": req}):
            self._waiting.pop(req, None)
            return None
        try:
            return await asyncio.wait_for(waiter, FAMILIES_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(req, None)

    async def _render(self) -> bytes:
        got = await asyncio.gather(*(self._worker_families(i) for i in range(self.pool.n)))
        parts = [families for families in got if families is not None]
        parts.append(families_of(self.registry))
        return render_families(merge_families(parts, self.allocations_configured))

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = await self.scrapes.get()
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    # ---- /healthz and /readyz ---------------------------------------------------------------

    async def _fetch(self, index: int, path: str) -> tuple[int, bytes]:
        port = self.pool.ports[index]
        if not port or self.session is None:
            return 503, b""
        try:
            async with self.session.get(
                f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=3)
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return 503, b""

    async def _combined(self, path: str) -> web.Response:
        pool = self.pool
        got = await asyncio.gather(*(self._fetch(i, path) for i in range(pool.n)))
        workers = {}
        for i, (status, body) in enumerate(got):
            proc = pool.procs[i]
            try:
                detail = json.loads(body) if body else {}
            except ValueError:
                detail = {}
            workers[str(i)] = {
                "ok": status == 200,
                "pid": proc.pid if proc else None,
                "metrics_port": pool.ports[i],
                "alive": bool(proc and proc.is_alive()),
                **({"detail": detail} if detail else {}),
            }
        ok = all(w["ok"] for w in workers.values())
        failed_workers = [k for k, w in workers.items() if not w["ok"]]
        # what failed, in one process's words: each worker's failed checks, together
        failed: set[str] = set()
        for w in workers.values():
            if not w["ok"]:
                failed.update(w.get("detail", {}).get("failed", ["unreachable"]))
        if path == "/readyz" and pool.stopping:
            ok = False
            failed.add("draining")
        # the same words as one process's /healthz ("ok") and /readyz ("ready")
        good, bad = ("ready", "not ready") if path == "/readyz" else ("ok", "not ok")
        return web.json_response(
            {
                "status": good if ok else bad,
                "failed": sorted(failed),
                "failed_workers": failed_workers,
                "workers": workers,
            },
            status=200 if ok else 503,
        )

    async def readiness(self) -> bool:
        """Every worker ready (what /readyz answers 200 for)."""
        return (await self._combined("/readyz")).status == 200

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return await self._combined("/healthz")

    async def handle_readyz(self, request: web.Request) -> web.Response:
        return await self._combined("/readyz")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        return app
