"""Serving an aiohttp application on one address (the credentials API, the admin API,
metrics and health), inside the process's descriptor budget.

Every HTTP listener of a process shares one HttpGuard: at most `max_connections` open
connections in all and `max_per_ip` from one address; a connection that sends nothing
(or never finishes its headers) is closed after `idle_timeout`. At a cap a new
connection takes the place of the longest-idle one that is not being answered (of its
own address at the per-address cap), so idle or slow connections, of one address or
many, can never keep /healthz, the Kubernetes liveness probe, from being answered.
Refusals are counted by listener and reason (turn_http_connections_refused_total) and
logged once per interval.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from turnserver.io.descriptors import reserve_for

log = logging.getLogger("turnserver")
LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Caps of the HTTP listeners of one process."""

    max_connections: int = 64  # in all, every HTTP listener of the process
    max_per_ip: int = 16  # from one client address
    idle_timeout: float = 15.0  # nothing sent, headers unfinished, or idle keep-alive


class _Conn:
    __slots__ = ("busy", "handler", "ip", "last", "listener", "transport")

    def __init__(
        self, handler: RequestHandler, transport: asyncio.Transport, ip: str, listener: str
    ) -> None:
        self.handler = handler
        self.transport = transport
        self.ip = ip
        self.listener = listener
        self.busy = 0  # requests being answered
        self.last = time.monotonic()


class HttpGuard:
    """Connection caps shared by every HTTP listener of a process."""

    def __init__(self, limits: HttpLimits | None = None) -> None:
        self.limits = limits or HttpLimits()
        self.conns: dict[RequestHandler, _Conn] = {}
        self.per_ip: dict[str, int] = {}
        # (listener, reason) -> connections refused or evicted
        self.refused: dict[tuple[str, str], int] = {}
        self._logged: dict[str, float] = {}

    def active(self) -> dict[str, int]:
        """Open connections by listener."""
        out: dict[str, int] = {}
        for c in self.conns.values():
            out[c.listener] = out.get(c.listener, 0) + 1
        return out

    def _count(self, listener: str, reason: str, ip: str) -> None:
        key = (listener, reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged[reason] = now
            log.warning(
                "http %s: connection from %s %s (counted in "
                "turn_http_connections_refused_total; logged once a minute)",
                listener,
                ip,
                "refused: too many from this address"
                if reason == "per_ip_limit"
                else "closed to make room (connection limit)",
            )

    def admit(self, handler: RequestHandler, transport: asyncio.Transport, listener: str) -> bool:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        limits = self.limits
        at_cap = limits.max_connections and len(self.conns) >= limits.max_connections
        if at_cap or (limits.max_per_ip and self.per_ip.get(ip, 0) >= limits.max_per_ip):
            self._purge()
        # at a cap, the longest-idle connection (of this address, at its own cap) makes
        # room, or the new one is refused
        mine = [c for c in self.conns.values() if c.ip == ip]
        over_ip = bool(limits.max_per_ip) and len(mine) >= limits.max_per_ip
        if over_ip and not self._evict(listener, ip, mine):
            self._count(listener, "per_ip_limit", ip)
            return False
        over_all = bool(limits.max_connections) and len(self.conns) >= limits.max_connections
        if over_all and not self._evict(listener, ip, list(self.conns.values())):
            self._count(listener, "limit", ip)
            return False
        self.conns[handler] = _Conn(handler, transport, ip, listener)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def _evict(self, listener: str, ip: str, among: list[_Conn]) -> bool:
        """Close the longest-idle connection of `among` that is not being answered;
        False when every one is."""
        idle = [c for c in among if not c.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last)
        self._count(victim.listener, "evicted", victim.ip)
        self.forget(victim.handler)
        victim.transport.abort()
        return True

    def _purge(self) -> None:
        """Forget connections whose transport closed without telling us (a listener
        torn down with its event loop)."""
        for handler, conn in list(self.conns.items()):
            if conn.transport.is_closing():
                self.forget(handler)

    def forget(self, handler: RequestHandler) -> None:
        conn = self.conns.pop(handler, None)
        if conn is None:
            return
        left = self.per_ip.get(conn.ip, 1) - 1
        if left > 0:
            self.per_ip[conn.ip] = left
        else:
            self.per_ip.pop(conn.ip, None)

    def touch(self, handler: RequestHandler, delta: int) -> None:
        conn = self.conns.get(handler)
        if conn is not None:
            conn.busy += delta
            conn.last = time.monotonic()


# The guard of this process: every serve_app shares it (the descriptor budget is per process)
GUARD = HttpGuard()


def configure(max_connections: int, max_per_ip: int, idle_timeout: float) -> HttpLimits:
    """Set this process's HTTP caps (http.* settings); max_connections 0: half the
    descriptors kept back from clients (io/descriptors.py), at most 256."""
    if not max_connections:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nofile = nofile if nofile != resource.RLIM_INFINITY else 1 << 20
        max_connections = max(8, min(256, reserve_for(nofile) // 2))
    GUARD.limits = HttpLimits(max_connections, max_per_ip, idle_timeout)
    return GUARD.limits


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler, admitted by the process's HttpGuard first."""

    listener = ""
    guard = GUARD

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw: Any = transport
        if not self.guard.admit(self, raw, self.listener):
            self._refused = True
            raw.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if getattr(self, "_refused", False):
            return
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return
        conn = self.guard.conns.get(self)
        if conn is not None:
            conn.last = time.monotonic()
        super().data_received(data)


@web.middleware
async def _busy(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Marks a connection as being answered (it is never evicted meanwhile)."""
    protocol = request.protocol
    GUARD.touch(protocol, 1)
    try:
        return await handler(request)
    finally:
        GUARD.touch(protocol, -1)


class _GuardedSite(web.BaseSite):
    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        factory: Callable[[], RequestHandler],
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=128)
        self._host = host
        self._port = port
        self._factory = factory

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
        )


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    *,
    name: str = "http",
) -> tuple[web.AppRunner, int]:
    """Start serving `app` on host:port (HTTPS with ssl_context) under the process's
    connection caps; returns the runner (to clean up) and the bound port (port 0: the
    kernel's choice). `name` labels the listener in metrics and logs."""
    if _busy not in app.middlewares:
        app.middlewares.append(_busy)
    timeout = GUARD.limits.idle_timeout
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=timeout)
    await runner.setup()
    manager = runner.server
    assert manager is not None
    loop = asyncio.get_running_loop()
    handler_class = type("Handler", (_GuardedHandler,), {"listener": name})

    def factory() -> RequestHandler:
        handler: RequestHandler = handler_class(
            manager, loop=loop, access_log=None, keepalive_timeout=timeout
        )
        return handler

    site = _GuardedSite(runner, host, port, ssl_context, factory)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound: int = runner.addresses[0][1] if runner.addresses else port
    return runner, bound
