"""The supervisor of worker processes: it binds every listener socket once and keeps
them (a crashed worker's share of each SO_REUSEPORT group waits for its replacement),
loads the kernel fast path, spawns and restarts workers (with backoff when the system
refuses a process), serves the credentials and admin APIs and the merged /metrics,
/healthz and /readyz (process/workers_view.py), forwards signals and coordinates the
drain: every listener socket is read until the whole server has drained.

Longer than 500 lines: start, restart with backoff, signals, reload and drain act on
the same few fields (the workers, their sockets, the stop and drain deadlines); kept
in one class so that each transition can be read against all of them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from aiohttp import web

from turnserver.io.descriptors import tighter
from turnserver.io.kernel.flows import start_offload
from turnserver.io.sockets import bind_listener_group
from turnserver.io.tls import build_context
from turnserver.ops.config.nodes import cross_node_warnings
from turnserver.ops.config.settings import (
    Settings,
    admin_certificate,
    all_listeners,
    api_certificate,
    read_settings,
)
from turnserver.ops.config.values import ConfigError, parse_admin_token
from turnserver.ops.fleet.node import FleetNode, join_fleet
from turnserver.ops.fleet.quota import FleetQuota
from turnserver.ops.http import serve as http_serve
from turnserver.ops.http.admin_api import AdminApi
from turnserver.ops.http.admin_service import AdminService
from turnserver.ops.http.admin_workers import WorkersBackend
from turnserver.ops.http.revocations import RevocationStore
from turnserver.ops.http.serve import serve_app
from turnserver.ops.process.shared_quota import clear_worker, ledger_size, table_slots
from turnserver.ops.process.state_file import remove_state, write_state
from turnserver.ops.process.systemd import notify, start_watchdog
from turnserver.ops.process.worker import Shared, worker_main
from turnserver.ops.process.workers_view import WorkersView
from turnserver.ops.telemetry.eventlog import quiet_loop_errors

log = logging.getLogger("turnserver")
MAX_RESTARTS_PER_MINUTE = 10
SPAWN_RETRY = (0.5, 30.0)  # first and longest wait before spawning a worker again
SPAWN_LOG_INTERVAL = 60.0


class Supervisor:
    """The parent process."""

    def __init__(
        self,
        settings: Settings,
        config_path: str | None,
        overrides: dict[str, Any],
        show_credential: str | None,
    ) -> None:
        if (settings.admin_listen or settings.fleet_redis) and not settings.internal_admin_token:
            settings = replace(settings, internal_admin_token=secrets.token_urlsafe(32))
        for warning in cross_node_warnings(settings, os.environ):
            log.warning("%s", warning)
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
        # Quotas: room for as many live allocations as there are relay ports (each
        # allocation holds one) or the configured total, whichever is fewer
        ports_in_range = settings.max_port - settings.min_port + 1
        slots = table_slots(tighter(settings.max_allocations, ports_in_range))
        self.shm = SharedMemory(create=True, size=ledger_size(self.n, slots))
        # the workers' bus for RFC 6062 connections that span workers (io/handover.py)
        try:
            bus_dir = tempfile.mkdtemp(prefix="turnserver-bus-")
        except OSError as exc:
            self.close_listeners()
            self.shm.close()
            self.shm.unlink()
            raise OSError(
                exc.errno,
                f"workers: no writable directory for the workers' bus ({exc.strerror or exc}); "
                "on a read-only root filesystem mount a tmpfs (Kubernetes: an emptyDir) at "
                "/tmp or set TMPDIR, or run one worker (--workers 1)",
            ) from None
        self.shared = Shared(
            self.n,
            self.shm.name,
            slots,
            secrets.token_bytes(32),
            self.ctx.Lock(),
            self.ctx.Array("i", 2 * self.n),
            bus_dir,
        )
        self.admin: AdminService | None = None
        self.fleet: FleetNode | None = None
        self.procs: list[BaseProcess | None] = [None] * self.n
        self.spawn_at: list[float] = [0.0] * self.n  # retry time of a failed spawn
        self.spawn_wait: list[float] = [SPAWN_RETRY[0]] * self.n
        self._spawn_logged = -SPAWN_LOG_INTERVAL
        self._spawn_suppressed = 0
        self.stopping = False
        self.restarts: list[float] = []
        self.view = WorkersView(self, bus_dir, settings.max_allocations)
        self.view.quota = FleetQuota.from_settings(settings)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ports(self) -> Any:
        return self.shared.ports

    # ---- workers ------------------------------------------------------------------------

    def _spawn(self, index: int) -> bool:
        """Start worker `index`; False (counted, retried with backoff) when the system
        refuses a process or its pipes (descriptors, memory, process limits)."""
        self.ports[index] = 0
        self.ports[self.n + index] = 0
        revocations = self.admin.api.revocations if self.admin is not None else {}
        try:
            proc = self.ctx.Process(
                target=worker_main,
                name=f"turnserver-worker-{index}",
                args=(
                    self.settings,
                    index,
                    self.shared,
                    self.config_path,
                    self.overrides,
                    self.listeners[index],
                    self.offload.prog.for_worker(index) if self.offload is not None else None,
                    revocations,
                ),
            )
            proc.start()
        except OSError as exc:
            self.procs[index] = None
            self.view.spawn_failures.inc()
            now = time.monotonic()
            self.spawn_at[index] = now + self.spawn_wait[index]
            self.spawn_wait[index] = min(SPAWN_RETRY[1], self.spawn_wait[index] * 2)
            if now - self._spawn_logged >= SPAWN_LOG_INTERVAL:
                more = (
                    f" ({self._spawn_suppressed} more failures)" if self._spawn_suppressed else ""
                )
                log.error(
                    "cannot start worker %d: %s; retrying in %.1f s%s",
                    index,
                    exc.strerror or exc,
                    self.spawn_at[index] - now,
                    more,
                )
                self._spawn_logged = now
                self._spawn_suppressed = 0
            else:
                self._spawn_suppressed += 1
            return False
        self.procs[index] = proc
        self.spawn_wait[index] = SPAWN_RETRY[0]
        log.info("worker %d started (pid %d)", index, proc.pid)
        return True

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        """Restart workers that exited (or forget them while stopping) and retry failed
        spawns whose time has come."""
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc is None:
                if not self.stopping and self.spawn_at[i] and now >= self.spawn_at[i]:
                    self.spawn_at[i] = 0.0
                    self._spawn(i)
                continue
            if proc.is_alive():
                continue
            proc.join()
            code = proc.exitcode
            clear_worker(self.shm, self.n, self.shared.slots, i, self.shared.lock)
            self.view.gone(i)  # its RFC 6062 pipes and peer connections end
            if self.offload is not None:  # its allocations are gone: so are its flows
                self.offload.prog.purge(i)
            self.procs[i] = None
            if self.stopping:
                # nobody will read its listener sockets again: out of the SO_REUSEPORT
                # groups, so the kernel sends what it would have had to the others
                for sock in self.listeners[i]:
                    sock.close()
                self.listeners[i] = []
                continue
            self.restarts = [t for t in self.restarts if now - t < 60] + [now]
            self.view.restarts.inc()
            log.error("worker %d (pid %d) exited with %s; restarting", i, proc.pid, code)
            if len(self.restarts) > MAX_RESTARTS_PER_MINUTE:
                log.error("workers keep crashing; giving up")
                self.stopping = True
                self._forward(signal.SIGINT)
                continue
            self._spawn(i)

    def _forward(self, sig: int) -> None:
        for p in self.procs:
            if p is not None and p.is_alive() and p.pid:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def allocations(self) -> int:
        """Live allocations of all workers (the shared quota ledger's totals)."""
        buf = self.shm.buf
        assert buf is not None
        totals = memoryview(buf)[: 4 * self.n].cast("I")
        try:
            return sum(totals)
        finally:
            totals.release()

    # ---- HTTP -----------------------------------------------------------------------------

    async def _start_admin(self) -> None:
        """The admin API of all the workers: fans out to their internal copies."""
        s = self.settings
        if not s.internal_admin_token:
            return
        file = RevocationStore(s.revocations_file)
        api = AdminApi(
            WorkersBackend(
                lambda: [self.ports[self.n + i] for i in range(self.n)], s.internal_admin_token
            ),
            [parse_admin_token(t) for t in s.admin_tokens],
            file,
        )
        self.admin = AdminService(api, file)
        self.admin.load()
        self.admin.watch()
        if not s.admin_listen:  # the fleet's revocations only
            return
        self.view.services.admin = api
        cert = admin_certificate(s)
        await self.admin.start(*s.admin_listen, build_context(*cert, alpn=None) if cert else None)
        log.info("admin API on %s:%d (all workers)", s.admin_listen[0], self.admin.port)

    async def _sync_revocations(self, index: int) -> None:
        """A (re)started worker gets the API-made revocations again once its admin
        listener is up (what was revoked while it started included)."""
        admin = self.admin
        backend = admin.api.backend if admin is not None else None
        if admin is None or not isinstance(backend, WorkersBackend):
            return
        api = admin.api
        if not await backend.sync_revocations(index, lambda: api.pushed):
            log.warning("worker %d: revocations not synchronised", index)

    async def _join_fleet(self, api: Any) -> None:
        """fleet.redis: this node of the fleet is the supervisor (its workers are not)."""
        if self.admin is None:
            return
        from turnserver.ops.config.uris import server_uris

        s = self.settings
        admin = self.admin.api

        async def ready() -> bool:
            return (await self.view.readiness()) and not self.stopping

        self.fleet = await join_fleet(
            s,
            lambda: server_uris(s, list(s.listen)),
            ready,
            admin.backend.summary,
            admin,
            self.view.registry,
            self.view.quota,
        )
        if api is not None and self.fleet is not None:
            api.fleet = self.fleet

    async def _release(self, *runners: web.AppRunner | None) -> None:
        """Stop the HTTP servers, free the shared memory and the listener sockets."""
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None
        if self.admin is not None:
            await self.admin.stop()
        for runner in runners:
            if runner is not None:
                await runner.cleanup()
        await self.view.close()
        self.shm.close()
        self.shm.unlink()
        self.close_listeners()
        shutil.rmtree(self.shared.bus_dir, ignore_errors=True)
        if self.offload is not None:
            self.offload.close()  # detaches the program
            self.offload = None

    def close_listeners(self) -> None:
        for group in self.listeners:
            for sock in group:
                sock.close()
        self.listeners = [[] for _ in range(self.n)]

    async def _serve_http(self) -> tuple[web.AppRunner | None, web.AppRunner | None, Any]:
        """Metrics, the credentials API and the admin API, before any worker starts (a
        port that is taken stops the start with one line); raises OSError."""
        from turnserver.ops.config.uris import api_config
        from turnserver.ops.http.credentials_api import CredentialsApi, start_api

        s = self.settings
        runner = api_runner = api = None
        try:
            if s.metrics_listen:
                app = self.view.app()
                host, port = s.metrics_listen
                try:
                    runner, _ = await serve_app(app, host, port, name="metrics")
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot bind metrics on {host}:{port}: {exc.strerror}"
                    ) from exc
                log.info("metrics, /healthz and /readyz on http://%s:%d (all workers)", host, port)
            if s.api_listen:
                api = CredentialsApi(api_config(s, list(s.listen)))
                self.view.services.api = api
                api_cert = api_certificate(s)
                api_ctx = build_context(*api_cert, alpn=None) if api_cert else None
                host, port = s.api_listen
                try:
                    api_runner, bound = await start_api(api, host, port, api_ctx)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot bind the API on {host}:{port}: {exc.strerror}"
                    ) from exc
                scheme = "https" if api_ctx else "http"
                shown = f"[{host}]" if ":" in host else host
                log.info("credentials API on %s://%s:%d (all workers)", scheme, shown, bound)
            try:
                await self._start_admin()
            except OSError as exc:
                host, port = s.admin_listen or ("", 0)
                raise OSError(
                    exc.errno, f"cannot bind the admin API on {host}:{port}: {exc.strerror}"
                ) from exc
        except BaseException:
            for r in (runner, api_runner):
                if r is not None:
                    await r.cleanup()
            raise
        return runner, api_runner, api

    async def run(self) -> int:
        from turnserver.ops.config.uris import api_config
        from turnserver.ops.dev.banner import credential_banner_text

        loop = asyncio.get_running_loop()
        quiet_loop_errors(loop)
        # Signals that arrive while the workers start are kept and acted on once the
        # handlers below are in place (SIGHUP's default action would end the process)
        early: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, early.append, sig)
        s = self.settings
        http_serve.configure(
            s.http_max_connections, s.http_max_connections_per_ip, s.http_idle_timeout
        )
        self.view.start(loop)
        try:
            runner, api_runner, api = await self._serve_http()
        except (OSError, ValueError) as exc:
            log.error("%s", exc)
            await self._release()
            return 1
        for i in range(self.n):
            self._spawn(i)
        synced = [False] * self.n
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
            self._reap(loop)
            await asyncio.sleep(0.05)

        log.info("%d workers serving %s", self.n, ", ".join(str(s) for s in self.settings.listen))
        try:
            await self._join_fleet(api)
        except OSError as exc:  # fleet.required and Redis unreachable
            log.error("%s", exc)
            self.stopping = True
            self._forward(signal.SIGINT)
            for p in self.procs:
                if p is not None:
                    p.join(10)
            await self._release(runner, api_runner)
            return 1
        metrics = self.settings.metrics_listen
        state = write_state(
            (metrics[0], runner.addresses[0][1]) if metrics and runner is not None else None,
            [(s.host, s.port) for s in all_listeners(self.settings) if s.scheme == "udp"],
        )
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
        drain_until: list[float] = []  # set by SIGTERM: when the drain ends at the latest

        def on_term() -> None:
            self.stopping = True
            if drain_until:
                log.info("second SIGTERM: stopping now")
                self._forward(signal.SIGINT)
                stop.set()
            else:
                drain_until.append(time.monotonic() + self.settings.drain_timeout)
                self._forward(signal.SIGTERM)
                if self.fleet is not None:
                    self.fleet.set_draining()  # out of every node's credentials now

        def on_int() -> None:
            self.stopping = True
            self._forward(signal.SIGINT)
            stop.set()

        def on_hup() -> None:
            self._forward(signal.SIGHUP)
            try:
                fresh: Settings | None = read_settings(self.config_path, self.overrides)
            except ConfigError as exc:
                log.error("SIGHUP: configuration rejected, keeping the old one: %s", exc)
                fresh = None
            if self.admin is not None:
                if fresh is not None:
                    self.admin.file.path = fresh.revocations_file
                    if fresh.admin_tokens:
                        self.admin.api.tokens = [parse_admin_token(t) for t in fresh.admin_tokens]
                self.admin.load()
            if api is not None and fresh is not None:
                api.reconfigure(api_config(fresh, list(fresh.listen)))

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for pending in early:
            {signal.SIGTERM: on_term, signal.SIGINT: on_int, signal.SIGHUP: on_hup}[pending]()
        drained_logged = False
        while True:
            self._reap(loop)
            for i in range(self.n):  # a (re)started worker: the API-made revocations
                up = bool(self.ports[self.n + i])
                if up and not synced[i]:
                    task = loop.create_task(self._sync_revocations(i))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                synced[i] = up
            if self.stopping and all(p is None for p in self.procs):
                break
            # the drain ends for every worker at once: no listener socket goes unread
            if (
                drain_until
                and not stop.is_set()
                and (not self.allocations() or time.monotonic() >= drain_until[0])
            ):
                if not drained_logged:
                    left = self.allocations()
                    log.info(
                        "drain over%s: stopping the workers",
                        f" with {left} allocations left" if left else "",
                    )
                    drained_logged = True
                self._forward(signal.SIGINT)
                stop.set()
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
        if state is not None:
            remove_state(state)
        notify("STOPPING=1")
        log.info("all workers stopped")
        return 0
