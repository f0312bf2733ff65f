"""Worker processes: N servers sharing each listener port with SO_REUSEPORT, each with
its own slice of the relay port range, so every packet of an allocation stays in one
process (the kernel keeps a 5-tuple on one socket). Quotas hold across workers through a
shared-memory ledger. The parent restarts crashed workers, serves the credentials API and
one /metrics, /healthz and /readyz that sum or combine the workers'.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import secrets
import signal
import socket
import sys
from dataclasses import replace
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from turnserver.io.offload import FlowMaps
from turnserver.io.offload_flows import start_offload
from turnserver.io.sockets import bind_listener_group
from turnserver.io.tls import build_context
from turnserver.ops.admin import AdminApi, AdminService
from turnserver.ops.admin_fleet import FleetBackend
from turnserver.ops.config import (
    Settings,
    admin_certificate,
    all_listeners,
    api_certificate,
    build_settings,
    load_file,
)
from turnserver.ops.config_values import ConfigError, parse_admin_token
from turnserver.ops.eventlog import setup_logging
from turnserver.ops.http import serve_app
from turnserver.ops.metrics import AdminCollector
from turnserver.ops.revocations import RevocationStore
from turnserver.ops.shared_quota import SharedQuotaLedger, clear_worker
from turnserver.ops.systemd import notify, start_watchdog
from turnserver.ops.worker_metrics import merge_metrics

log = logging.getLogger("turnserver")
MAX_RESTARTS_PER_MINUTE = 10


def port_slice(settings: Settings, index: int, workers: int) -> tuple[int, int]:
    """The index-th contiguous slice of the relay port range."""
    total = settings.max_port - settings.min_port + 1
    size = total // workers
    lo = settings.min_port + index * size
    hi = settings.max_port if index == workers - 1 else lo + size - 1
    return lo, hi


def _worker_main(
    settings: Settings,
    index: int,
    workers: int,
    shm_name: str,
    lock: multiprocessing.synchronize.Lock,
    ports: Any,
    config_path: str | None,
    overrides: dict[str, Any],
    listeners: list[socket.socket],
    offload: FlowMaps | None,
) -> None:
    """Entry point of one worker process; `listeners` are its sockets, one per
    configured listener, owned by the parent (they outlive a crash of this worker);
    `offload` the kernel fast path's maps when the parent loaded the program."""
    from turnserver.io.loop import loop_factory, tune_gc
    from turnserver.ops.app import Server
    from turnserver.ops.banner import log_limits

    setup_logging(settings.log_level, settings.log_format)
    tune_gc()  # as in one process: workers went without it (user CPU per setup +30 %)
    lo, hi = port_slice(settings, index, workers)
    mine = replace(
        settings,
        min_port=lo,
        max_port=hi,
        reuse_port=True,
        api_listen=None,
        metrics_listen=("127.0.0.1", 0),
        workers=1,
    )
    _, factory = loop_factory(settings.loop)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server = Server(mine, loop, inherited=dict(enumerate(listeners)))
        server.worker_index = index
        server.shared_offload = offload
        server.runtime.core.id_prefix = f"w{index}-"  # the supervisor routes admin calls by id
        ledger = SharedQuotaLedger(shm_name, workers, index, lock)
        server.runtime.core.quotas = ledger
        # Signals count from the first moment (the default action of SIGHUP would end
        # the process); a SIGHUP before the listeners are up is applied once they are
        stop = asyncio.Event()
        drain = asyncio.Event()
        early_hup: list[bool] = []
        loop.add_signal_handler(signal.SIGTERM, drain.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, early_hup.append, True)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            log.error("worker %d: %s", index, exc)
            ledger.close()
            return 1
        if index == 0:
            log_limits(server.runtime)
        ports[workers + index] = server.admin.port if server.admin is not None else 0
        ports[index] = server.health.port

        def on_hup() -> None:
            try:
                values = load_file(config_path) if config_path else {}
                new = build_settings(values, overrides, config_path or "flags")
            except ConfigError as exc:
                log.error("worker %d: SIGHUP: configuration rejected: %s", index, exc)
                return
            server.reload(
                replace(
                    new,
                    min_port=lo,
                    max_port=hi,
                    reuse_port=True,
                    api_listen=None,
                    metrics_listen=mine.metrics_listen,
                    internal_admin_token=settings.internal_admin_token,
                )
            )
            log.info("worker %d: configuration reloaded", index)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        if early_hup:
            on_hup()
        gc.freeze()  # what start-up built lives as long as the worker: never scan it again
        parent = multiprocessing.parent_process()
        if parent is not None:
            # The supervisor's end of this pipe closes when it dies (SIGKILL, OOM killer):
            # stop at once rather than live on as an orphan holding ports and allocations
            def parent_gone() -> None:
                loop.remove_reader(parent.sentinel)
                log.error("worker %d: the supervisor is gone; stopping", index)
                stop.set()

            loop.add_reader(parent.sentinel, parent_gone)
        waiters = {loop.create_task(stop.wait()), loop.create_task(drain.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if drain.is_set() and not stop.is_set():
            await server.drain(settings.drain_timeout, stop)
        for w in waiters:
            w.cancel()
        await server.stop()
        ledger.close()
        return 0

    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(main()))


class Supervisor:
    """The parent process."""

    def __init__(
        self,
        settings: Settings,
        config_path: str | None,
        overrides: dict[str, Any],
        show_credential: str | None,
    ) -> None:
        if settings.admin_listen and not settings.internal_admin_token:
            settings = replace(settings, internal_admin_token=secrets.token_urlsafe(32))
        if not settings.nonce_secret:
            # One nonce key (and self-probe password) for all workers: a client's 5-tuple
            # stays on one worker, but the self-probe's may land on any.
            settings = replace(settings, nonce_secret=secrets.token_urlsafe(32))
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.show_credential = show_credential
        self.n = settings.workers
        # The parent binds every worker's listener sockets and keeps them: a worker that
        # dies leaves its sockets in the SO_REUSEPORT group, so the kernel keeps hashing
        # every other client to the same socket as before (survivors lose nothing), and
        # its replacement takes over the same socket with the datagrams queued meanwhile.
        # (A reuseport BPF program could steer instead; owning the sockets needs no
        # privilege and keeps the queued packets.) Raises OSError naming the listener.
        self.listeners: list[list[socket.socket]] = [[] for _ in range(self.n)]
        try:
            for spec in all_listeners(settings):
                try:
                    group = bind_listener_group(spec.scheme, spec.host, spec.port, self.n)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot bind {spec}: {exc.strerror}") from exc
                for i, sock in enumerate(group):
                    self.listeners[i].append(sock)
        except OSError:
            self.close_listeners()
            raise
        # the kernel fast path: one program, attached by this process; the workers
        # install their flows in its maps (raises OffloadError for ebpf that cannot work)
        try:
            self.offload = start_offload(settings.offload, settings.dev)
        except OSError:
            self.close_listeners()
            raise
        if self.offload is None:
            self.settings = settings = replace(settings, offload="off")
        self.ctx = multiprocessing.get_context("spawn")
        self.lock = self.ctx.Lock()
        self.shm = SharedMemory(create=True, size=SharedQuotaLedger.size(self.n))
        # per worker: its metrics port, then (at n + index) its internal admin port
        self.ports = self.ctx.Array("i", 2 * self.n)
        self.admin: AdminService | None = None
        self.admin_registry = CollectorRegistry()
        self.procs: list[BaseProcess | None] = [None] * self.n
        self.stopping = False
        self.restarts: list[float] = []

    def _spawn(self, index: int) -> None:
        self.ports[index] = 0
        self.ports[self.n + index] = 0
        proc = self.ctx.Process(
            target=_worker_main,
            name=f"turnserver-worker-{index}",
            args=(
                self.settings,
                index,
                self.n,
                self.shm.name,
                self.lock,
                self.ports,
                self.config_path,
                self.overrides,
                self.listeners[index],
                self.offload.prog.for_worker(index) if self.offload is not None else None,
            ),
        )
        proc.start()
        self.procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    async def _start_admin(self) -> None:
        """The admin API of the fleet of workers: fans out to their internal copies."""
        s = self.settings
        if not s.admin_listen or not s.internal_admin_token:
            return
        cert = admin_certificate(s)
        file = RevocationStore(s.revocations_file)
        api = AdminApi(
            FleetBackend(
                lambda: [self.ports[self.n + i] for i in range(self.n)], s.internal_admin_token
            ),
            [parse_admin_token(t) for t in s.admin_tokens],
            file,
        )
        self.admin_registry.register(AdminCollector(api))
        self.admin = AdminService(api, file)
        self.admin.load()
        self.admin.watch()
        await self.admin.start(*s.admin_listen, build_context(*cert, alpn=None) if cert else None)
        log.info("admin API on %s:%d (all workers)", s.admin_listen[0], self.admin.port)

    async def _release(self, *runners: web.AppRunner | None) -> None:
        """Stop the HTTP servers, free the shared memory and the listener sockets."""
        if self.admin is not None:
            await self.admin.stop()
        for runner in runners:
            if runner is not None:
                await runner.cleanup()
        self.shm.close()
        self.shm.unlink()
        self.close_listeners()
        if self.offload is not None:
            self.offload.close()  # detaches the program
            self.offload = None

    def close_listeners(self) -> None:
        for group in self.listeners:
            for sock in group:
                sock.close()
        self.listeners = []

    async def _fetch(
        self, session: aiohttp.ClientSession, index: int, path: str
    ) -> tuple[int, str]:
        port = self.ports[index]
        if not port:
            return 503, ""
        try:
            async with session.get(
                f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=3)
            ) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return 503, ""

    async def handle_metrics(self, request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as session:
            got = await asyncio.gather(
                *(self._fetch(session, i, "/metrics") for i in range(self.n))
            )
        texts = [body for status, body in got if status == 200]
        if self.admin is not None:  # the supervisor's own admin API counters
            texts.append(generate_latest(self.admin_registry).decode())
        text = merge_metrics(texts)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _combined(self, path: str) -> web.Response:
        async with aiohttp.ClientSession() as session:
            got = await asyncio.gather(*(self._fetch(session, i, path) for i in range(self.n)))
        workers = {}
        for i, (status, body) in enumerate(got):
            proc = self.procs[i]
            try:
                detail = json.loads(body) if body else {}
            except ValueError:
                detail = {}
            workers[str(i)] = {
                "ok": status == 200,
                "pid": proc.pid if proc else None,
                "metrics_port": self.ports[i],
                "alive": bool(proc and proc.is_alive()),
                **({"detail": detail} if detail else {}),
            }
        ok = all(w["ok"] for w in workers.values())
        failed = [k for k, w in workers.items() if not w["ok"]]
        # the same words as one process's /healthz ("ok") and /readyz ("ready")
        good, bad = ("ready", "not ready") if path == "/readyz" else ("ok", "not ok")
        return web.json_response(
            {"status": good if ok else bad, "failed_workers": failed, "workers": workers},
            status=200 if ok else 503,
        )

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return await self._combined("/healthz")

    async def handle_readyz(self, request: web.Request) -> web.Response:
        return await self._combined("/readyz")

    async def run(self) -> int:
        from turnserver.ops.api import CredentialsApi, start_api
        from turnserver.ops.banner import credential_banner_text
        from turnserver.ops.uris import api_config

        loop = asyncio.get_running_loop()
        # Signals that arrive while the workers start are kept and acted on once the
        # handlers below are in place (SIGHUP's default action would end the process)
        early: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, early.append, sig)
        for i in range(self.n):
            self._spawn(i)
        runner = None
        if self.settings.metrics_listen:
            app = web.Application()
            app.router.add_get("/metrics", self.handle_metrics)
            app.router.add_get("/healthz", self.handle_healthz)
            app.router.add_get("/readyz", self.handle_readyz)
            runner, _ = await serve_app(app, *self.settings.metrics_listen)
            log.info(
                "metrics, /healthz and /readyz on http://%s:%d (all workers)",
                *self.settings.metrics_listen,
            )
        api = None
        api_runner = None
        if self.settings.api_listen:
            api = CredentialsApi(api_config(self.settings, list(self.settings.listen)))
            api_cert = api_certificate(self.settings)
            api_ctx = build_context(*api_cert, alpn=None) if api_cert else None
            api_runner, _ = await start_api(api, *self.settings.api_listen, api_ctx)
        await self._start_admin()
        # Wait until every worker reports its metrics port (its listeners are bound)
        for _ in range(600):
            if all(self.ports[i] for i in range(self.n)):
                break
            failed = [p for p in self.procs if p is not None and p.exitcode not in (None, 0)]
            if failed:
                # A worker could not start (the reason is in its log line): give up
                log.error("a worker failed to start; stopping")
                self.stopping = True
                for p in self.procs:
                    if p is not None and p.is_alive():
                        p.terminate()
                    if p is not None:
                        p.join(10)
                await self._release(runner, api_runner)
                return 1
            await asyncio.sleep(0.05)

        log.info("%d workers serving %s", self.n, ", ".join(str(s) for s in self.settings.listen))
        notify(f"READY=1\nSTATUS={self.n} workers")
        start_watchdog(loop)
        if self.show_credential:
            print(
                credential_banner_text(
                    self.settings, list(self.settings.listen), self.show_credential
                ),
                flush=True,
            )
        stop = asyncio.Event()
        drain = asyncio.Event()

        def forward(sig: int) -> None:
            for p in self.procs:
                if p is not None and p.is_alive() and p.pid:
                    os.kill(p.pid, sig)

        def on_term() -> None:
            self.stopping = True
            if drain.is_set():
                forward(signal.SIGINT)
                stop.set()
            else:
                drain.set()
                forward(signal.SIGTERM)

        def on_int() -> None:
            self.stopping = True
            forward(signal.SIGINT)
            stop.set()

        def on_hup() -> None:
            forward(signal.SIGHUP)
            if self.admin is not None:
                try:
                    values = load_file(self.config_path) if self.config_path else {}
                    fresh = build_settings(values, self.overrides, self.config_path or "flags")
                    self.admin.file.path = fresh.revocations_file
                    if fresh.admin_tokens:
                        self.admin.api.tokens = [parse_admin_token(t) for t in fresh.admin_tokens]
                except ConfigError as exc:
                    log.error("SIGHUP: configuration rejected for the admin API: %s", exc)
                self.admin.load()
            if api is not None:
                try:
                    values = load_file(self.config_path) if self.config_path else {}
                    new = build_settings(values, self.overrides, self.config_path or "flags")
                    api.reconfigure(api_config(new, list(new.listen)))
                except ConfigError as exc:
                    log.error("SIGHUP: configuration rejected for the API: %s", exc)

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for pending in early:
            {signal.SIGTERM: on_term, signal.SIGINT: on_int, signal.SIGHUP: on_hup}[pending]()
        while True:
            for i, proc in enumerate(self.procs):
                if proc is None or proc.is_alive():
                    continue
                proc.join()
                code = proc.exitcode
                clear_worker(self.shm, i, self.lock)
                if self.offload is not None:  # its allocations are gone: so are its flows
                    self.offload.prog.purge(i)
                if self.stopping:
                    self.procs[i] = None
                    continue
                now = loop.time()
                self.restarts = [t for t in self.restarts if now - t < 60] + [now]
                log.error("worker %d (pid %d) exited with %s; restarting", i, proc.pid, code)
                if len(self.restarts) > MAX_RESTARTS_PER_MINUTE:
                    log.error("workers keep crashing; giving up")
                    self.stopping = True
                    forward(signal.SIGINT)
                    continue
                self._spawn(i)
            if self.stopping and all(p is None for p in self.procs):
                break
            if self.offload is not None:
                self.offload.cover_new_links()  # every 10 s at most
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
            if stop.is_set() and all(p is None or not p.is_alive() for p in self.procs):
                for i, p in enumerate(self.procs):
                    if p is not None:
                        p.join()
                        self.procs[i] = None
                break
        await self._release(runner, api_runner)
        notify("STOPPING=1")
        log.info("all workers stopped")

        return 0
