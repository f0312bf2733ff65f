"""The metrics listener: /metrics (Prometheus), /healthz (alive, loop responsive) and
/readyz (listeners bound, last self-probe passed, not draining)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.ops.http.serve import serve_app
from turnserver.ops.telemetry.certcheck import CertificateCheck
from turnserver.ops.telemetry.worker_metrics import families_of, render_families

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime
    from turnserver.ops.telemetry.metrics import Metrics
    from turnserver.ops.telemetry.probe import SelfProbe

SCRAPE_RATE = 4.0  # renderings of /metrics a second past a burst; more requests wait
SCRAPE_BURST = 8
HEARTBEAT = 0.5
UNRESPONSIVE_AFTER = 5.0
CERTIFICATE_WARNING_INTERVAL = 6 * 3600
log = logging.getLogger("turnserver")


class ScrapeThrottle:
    """Renders a scrape body at most SCRAPE_RATE times a second past a burst of
    SCRAPE_BURST: a request beyond that waits for the next rendering, and every request
    that arrived before a rendering began shares it. Every answer is rendered after its
    request arrived (never stale), and a flood of unauthenticated GET /metrics costs a
    bounded share of a core (the HTTP caps bound how many wait)."""

    def __init__(
        self,
        render: Callable[[], Awaitable[bytes]],
        rate: float = SCRAPE_RATE,
        burst: int = SCRAPE_BURST,
    ) -> None:
        self.render = render
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._inflight: asyncio.Future[bytes] | None = None
        self._started = 0.0  # when the rendering in flight began
        self.renders = 0
        self.shared = 0  # answers that shared a rendering with others

    async def get(self) -> bytes:
        arrived = time.monotonic()
        while True:
            inflight, started = self._inflight, self._started
            # A rendering that is done but still recorded (its callback not yet run) and
            # began before we arrived is skipped: awaiting a done future never yields, so
            # waiting on it again would spin the event loop
            if inflight is not None and (started >= arrived or not inflight.done()):
                body = await asyncio.shield(inflight)
                if started >= arrived:
                    self.shared += 1
                    return body
                continue  # it began before we arrived: wait for a newer one
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return await self._render_now(now)
            await asyncio.sleep((1.0 - self._tokens) / self.rate)

    async def _render_now(self, now: float) -> bytes:
        future: asyncio.Future[bytes] = asyncio.ensure_future(self.render())
        self._inflight, self._started = future, now
        future.add_done_callback(self._rendered)  # whether or not our caller waits on
        return await asyncio.shield(future)

    def _rendered(self, future: asyncio.Future[bytes]) -> None:
        self.renders += 1
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # retrieved: every waiter has its own answer


class ScrapeCollector(Collector):
    """turn_metrics_scrapes_total{result}: scrapes rendered, and served the last body."""

    def __init__(self, throttle: ScrapeThrottle) -> None:
        self.throttle = throttle

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "turn_metrics_scrapes",
            "GET /metrics renderings, and answers that shared one with other requests "
            "(throttled: at most 4 renderings a second past a burst of 8)",
            labels=["result"],
        )
        family.add_metric(["rendered"], self.throttle.renders)
        family.add_metric(["shared"], self.throttle.shared)
        yield family


class Health:
    """Liveness and readiness, and the HTTP endpoints that report them."""

    def __init__(
        self,
        runtime: ServerRuntime,
        metrics: Metrics,
        probe: SelfProbe | None,
        public_host: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.certificate = (
            CertificateCheck(runtime.tls.cert_file, public_host) if runtime.tls else None
        )
        self._warned: dict[str, float] = {}
        self._beats = 0
        self.metrics = metrics
        self.probe = probe
        self.last_beat = runtime.loop.time()
        self.lag = 0.0
        self._beat: asyncio.TimerHandle | None = None
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.handle_metrics)
        self.app.router.add_get("/healthz", self.handle_healthz)
        self.app.router.add_get("/readyz", self.handle_readyz)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scrapes = ScrapeThrottle(self._render)
        metrics.registry.register(ScrapeCollector(self.scrapes))

    async def _render(self) -> bytes:
        return render_families(families_of(self.metrics.registry))

    def certificate_check(self) -> dict[str, Any] | None:
        """The TLS certificate's expiry and problems; warns in the log now and then."""
        if self.certificate is None:
            return None
        if self.runtime.tls is not None:  # follows SIGHUP reloads
            self.certificate.cert_file = self.runtime.tls.cert_file
        now = time.time()
        status = self.certificate.status(now)
        self.metrics.certificate_expiry.set(status.not_after)
        for problem in status.problems:
            if now - self._warned.get(problem, 0.0) > CERTIFICATE_WARNING_INTERVAL:
                self._warned[problem] = now
                log.warning("tls certificate: %s", problem)
        out: dict[str, Any] = {"ok": not status.expired, "expires_at": int(status.not_after)}
        if status.problems:
            out["warnings"] = status.problems
        return out

    def _heartbeat(self) -> None:
        now = self.runtime.loop.time()
        self.lag = max(0.0, now - self.last_beat - HEARTBEAT)
        self.metrics.loop_lag.set(self.lag)
        self.last_beat = now
        self._beats += 1
        if self._beats % 120 == 1:  # every minute: the certificate's expiry and name
            self.certificate_check()
        self._beat = self.runtime.loop.call_later(HEARTBEAT, self._heartbeat)

    async def start(self, host: str, port: int) -> None:
        self.last_beat = self.runtime.loop.time()
        self._beat = self.runtime.loop.call_later(HEARTBEAT, self._heartbeat)
        self._runner, self.port = await serve_app(self.app, host, port, name="metrics")

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = self.runtime.loop.time() - self.last_beat
        ok = age < UNRESPONSIVE_AFTER
        return ok, {
            "status": "ok" if ok else "unresponsive",
            "loop_lag_seconds": round(self.lag, 4),
            "heartbeat_age_seconds": round(age, 3),
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        bound = self.runtime.listeners_bound
        checks["listeners"] = {
            "ok": bound,
            "bound": [str(s) for s in self.runtime.bound_addresses()],
        }
        if self.probe is not None:
            ok, why = self.probe.ready
            checks["probe"] = {
                "ok": ok,
                **({"error": why} if why else {}),
                "listeners": {
                    name: {
                        "ok": r.ok,
                        "rtt_seconds": r.rtt,
                        **({"error": r.error} if r.error else {}),
                    }
                    for name, r in self.probe.results.items()
                },
            }
        checks["capacity"] = self.capacity()
        certificate = self.certificate_check()
        if certificate is not None:
            checks["certificate"] = certificate
        checks["draining"] = {"ok": not self.runtime.draining}
        ready = all(c["ok"] for c in checks.values())
        failed = [name for name, c in checks.items() if not c["ok"]]
        return ready, {
            "status": "ready" if ready else "not ready",
            "failed": failed,
            "checks": checks,
        }

    def capacity(self) -> dict[str, Any]:
        """Not ready while the stream or descriptor caps are reached; a per-IP cap that
        refused someone recently is reported but keeps the server ready (one abusive
        address must not take the server out of a load balancer)."""
        rt = self.runtime
        budget = rt.descriptors
        streams = len(rt.stream_connections)
        limit = rt.stream_limit
        at_stream_cap = bool(limit) and streams >= limit
        at_fd_cap = bool(budget.limit) and budget.used >= budget.limit
        recent = rt.last_cap_hit and rt.loop.time() - rt.last_cap_hit < 60
        out: dict[str, Any] = {
            "ok": not (at_stream_cap or at_fd_cap),
            "stream_connections": streams,
            "stream_limit": limit,
            "descriptors_used": budget.used,
            "descriptor_limit": budget.limit,
        }
        if recent:
            out["refused_last_minute"] = dict(rt.stream_refusals)
        if at_stream_cap:
            out["error"] = "TCP/TLS connection limit reached"
        elif at_fd_cap:
            out["error"] = "file descriptor budget spent"
        return out

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = await self.scrapes.get()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_healthz(self, request: web.Request) -> web.Response:
        ok, body = self.liveness()
        return web.json_response(body, status=200 if ok else 503)

    async def handle_readyz(self, request: web.Request) -> web.Response:
        ok, body = self.readiness()
        return web.json_response(body, status=200 if ok else 503)
