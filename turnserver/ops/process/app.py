"""Builds a running server from Settings: core, listeners, logs; handles signals."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

from turnserver.io.kernel.flows import OffloadFlows, start_offload
from turnserver.io.kernel.program import FlowMaps
from turnserver.io.loop import loop_factory, tune_gc
from turnserver.io.tls import ReloadableTLS, build_context
from turnserver.ops.auth.hook import AuthHookAgent, AuthHookCollector, HookOptions
from turnserver.ops.config.nodes import cross_node_warnings
from turnserver.ops.config.settings import (
    Settings,
    admin_certificate,
    api_certificate,
    check_certificate,
    relay_layout,
)
from turnserver.ops.config.uris import api_config, server_uris
from turnserver.ops.config.values import AdminToken, ConfigError, parse_admin_token
from turnserver.ops.dev import impairment_api
from turnserver.ops.dev.banner import log_limits, print_banner
from turnserver.ops.fleet.node import FleetNode, join_fleet
from turnserver.ops.fleet.quota import OWN, FleetQuota, enforce_fleet_quota
from turnserver.ops.http import serve as http_serve
from turnserver.ops.http.admin_api import AdminApi, LocalBackend
from turnserver.ops.http.admin_service import AdminService
from turnserver.ops.http.credentials_api import CredentialsApi, start_api
from turnserver.ops.http.health import Health
from turnserver.ops.http.revocations import Revocations, RevocationStore
from turnserver.ops.process.runtime_setup import apply_reload, build_runtime
from turnserver.ops.process.state_file import remove_state, write_state
from turnserver.ops.process.systemd import notify, start_watchdog
from turnserver.ops.telemetry.eventlog import log, setup_logging
from turnserver.ops.telemetry.metrics import Metrics
from turnserver.ops.telemetry.probe import PROBE_USER, SelfProbe
from turnserver.ops.telemetry.tenant_metrics import TenantMetrics
from turnserver.ops.usage.metrics import UsageCollector
from turnserver.ops.usage.recorder import UsageOptions, UsageRecorder

ReloadSettings = Callable[[], Settings]


class Server:
    """A TURN server and its credentials API in one event loop."""

    def __init__(
        self,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        inherited: dict[int, socket.socket] | None = None,
    ) -> None:
        self.settings = settings
        self.loop = loop
        self.runtime = build_runtime(settings, loop, inherited)
        self.metrics = Metrics()
        self.metrics.collector.runtime = self.runtime
        self.runtime.event_sinks.append(self.metrics.on_event)
        self.metrics.internal_users = frozenset({PROBE_USER})
        if settings.tenants:  # (no tenants: no tenant series, nothing more per event)
            tenants = TenantMetrics(self.runtime)
            self.metrics.registry.register(tenants)
            self.runtime.event_sinks.append(tenants.sink())
        self.dev = impairment_api.attach(settings, self.runtime, self.metrics.registry)
        self.shared_offload: FlowMaps | None = None  # set by a worker before start
        self.probe: SelfProbe | None = None
        if settings.probe_interval > 0:
            shared = (
                hashlib.sha256(b"turnserver-probe:" + settings.nonce_secret.encode()).hexdigest()
                if settings.nonce_secret
                else None
            )
            self.probe = SelfProbe(
                self.runtime,
                settings.probe_interval,
                settings.probe_timeout,
                self.metrics,
                password=shared,
            )

        self.health = Health(self.runtime, self.metrics, self.probe, settings.public_host)
        self.api: CredentialsApi | None = None
        self.admin: AdminService | None = None
        self.fleet: FleetNode | None = None  # fleet.redis: one of several servers
        # fleet.max_allocations_per_user
        quota = self.fleet_quota = FleetQuota.from_settings(settings)
        if quota is not None:
            enforce_fleet_quota(
                self.runtime,
                quota.limit,
                lambda user: quota.lease(user, OWN),
                lambda user: quota.release(user, OWN),
            )
        self.worker_index = 0
        self.worker_count = 1  # set by a worker before start
        self.usage: UsageRecorder | None = None  # usage records, monthly tenant quotas
        self.hook: AuthHookAgent | None = None  # auth_hook.url
        # revocations made through the admin API that a worker inherits from its supervisor
        self.initial_revocations: Revocations = {}
        self._api_runner: web.AppRunner | None = None
        self.api_port = 0
        api_cert = api_certificate(settings)
        # HTTPS for the API: reloadable like the TURN certificate, no TURN ALPN
        self.api_tls = ReloadableTLS(*api_cert, alpn=None) if api_cert else None

    async def start(self) -> None:
        """Bind listeners, then the API (raises OSError/ValueError naming what failed)."""
        self._prepare_admin()
        settings = self.settings
        http_serve.configure(
            settings.http_max_connections,
            settings.http_max_connections_per_ip,
            settings.http_idle_timeout,
        )
        await self.runtime.start()
        self._start_usage()
        if settings.auth_hook_url:
            self.hook = AuthHookAgent(self.runtime, HookOptions.of(settings, self.worker_count))
            self.runtime.event_sinks.append(self.hook.sink())
            self.metrics.registry.register(AuthHookCollector(self.hook))
        try:  # --offload ebpf that cannot work stops the start (auto falls back)
            if self.shared_offload is not None:  # a worker: the supervisor's program
                self.runtime.offload = OffloadFlows(self.shared_offload, [])
            else:
                self.runtime.offload = start_offload(settings.offload, settings.dev)
        except OSError:
            self.runtime.stop()
            raise
        if self.dev is not None:
            self.dev.start()
        if settings.metrics_listen:
            host, port = settings.metrics_listen
            try:
                await self.health.start(host, port)
            except OSError as exc:
                self.runtime.stop()
                raise OSError(
                    exc.errno, f"cannot bind metrics on {host}:{port}: {exc.strerror}"
                ) from exc
            log.log(
                logging.DEBUG if settings.reuse_port else logging.INFO,  # a worker's is internal
                "metrics, /healthz and /readyz on http://%s:%d",
                host,
                self.health.port,
            )
        if self.probe is not None:
            await self.probe.start()
        if settings.api_listen:
            self.api = CredentialsApi(api_config(settings, self.runtime.bound_addresses()))
            if self.dev is not None:
                self.dev.add_routes(self.api)
            try:
                self._api_runner, self.api_port = await start_api(
                    self.api,
                    *settings.api_listen,
                    self.api_tls.listener_context if self.api_tls else None,
                )
            except OSError as exc:
                self.runtime.stop()
                host, port = settings.api_listen
                raise OSError(
                    exc.errno, f"cannot bind the API on {host}:{port}: {exc.strerror}"
                ) from exc
            self.metrics.collector.api = self.api
            log.info("credentials API on %s", self.api_base)
        await self._start_admin()
        await self._join_fleet()
        bound = {spec.port for spec in self.runtime.bound_addresses()}
        bound |= {self.health.port, self.api_port, self.admin_port} - {0}
        self.runtime.core.add_own_ports(bound)  # ephemeral ports, known now

    def _start_usage(self) -> None:
        options = UsageOptions.of(self.settings)
        if options is None:
            return
        node = self.settings.fleet_node or socket.gethostname()
        try:
            self.usage = UsageRecorder(
                self.runtime, options, self.worker_index, self.worker_count, node
            )
        except OSError as exc:
            self.runtime.stop()
            raise OSError(
                exc.errno, f"usage.state_dir: cannot use {options.state_dir}: {exc.strerror}"
            ) from exc
        self.runtime.event_sinks.append(self.usage.sink())
        self.metrics.registry.register(UsageCollector(self.usage))
        self.usage.start()

    async def _join_fleet(self) -> None:
        if not self.settings.fleet_redis or self.admin is None:
            return

        async def ready() -> bool:
            return self.health.readiness()[0]

        try:
            self.fleet = await join_fleet(
                self.settings,
                lambda: server_uris(self.settings, self.runtime.bound_addresses()),
                ready,
                LocalBackend(self.runtime).summary,
                self.admin.api,
                self.metrics.registry,
                self.fleet_quota,
            )
        except OSError:
            self.runtime.stop()
            raise
        if self.api is not None:
            self.api.fleet = self.fleet

    def _prepare_admin(self) -> None:
        """Revocations (admin.revocations_file) apply before any listener answers; the
        admin API itself: on admin.listen for one process, and for a worker of a
        supervisor on an internal loopback port the supervisor fans out to."""
        s = self.settings
        if not (s.admin_listen or s.revocations_file or s.fleet_redis or s.internal_admin_token):
            return
        core = self.runtime.core
        internal = s.internal_admin_token is not None
        tokens = (
            [AdminToken("supervisor", s.internal_admin_token or "")]
            if internal
            else [parse_admin_token(t) for t in s.admin_tokens]
        )

        def apply(entries: Revocations) -> int:
            ended = core.set_revocations(entries, self.runtime.now())
            self.runtime.after_core_call()
            return ended

        file = RevocationStore(s.revocations_file)
        api = AdminApi(
            LocalBackend(self.runtime, self.worker_index), tokens, None if internal else file
        )
        api.from_api = dict(self.initial_revocations)
        self.admin = AdminService(api, file, apply)
        self.admin.load()

    async def _start_admin(self) -> None:
        s = self.settings
        if self.admin is None:
            return
        self.admin.watch()
        if not s.admin_listen and s.internal_admin_token is None:
            return
        if s.internal_admin_token is not None:
            host, port, ctx = "127.0.0.1", 0, None
        else:
            assert s.admin_listen is not None
            host, port = s.admin_listen
            cert = admin_certificate(s)
            ctx = build_context(*cert, alpn=None) if cert else None
        try:
            await self.admin.start(host, port, ctx)
        except OSError as exc:
            self.runtime.stop()
            raise OSError(
                exc.errno, f"cannot bind the admin API on {host}:{port}: {exc.strerror}"
            ) from exc
        if s.internal_admin_token is None:
            self.metrics.collector.admin = self.admin.api
            scheme = "https" if ctx else "http"
            log.info("admin API on %s://%s:%d", scheme, host, self.admin.port)

    @property
    def admin_port(self) -> int:
        return self.admin.port if self.admin is not None else 0

    @property
    def api_base(self) -> str:
        if self.settings.api_listen is None:
            return ""  # no API listener
        host = self.settings.api_listen[0]
        scheme = "https" if self.api_tls else "http"
        hostport = f"[{host}]:{self.api_port}" if ":" in host else f"{host}:{self.api_port}"
        return f"{scheme}://{hostport}"

    def reload(self, new: Settings) -> None:
        """Apply a new configuration (SIGHUP); listeners and allocations stay."""
        apply_reload(self.runtime, new)
        if self.hook is not None and new.auth_hook_url:
            self.hook.reconfigure(HookOptions.of(new, self.worker_count))
        elif bool(self.hook) != bool(new.auth_hook_url):
            log.warning("SIGHUP: turning the authorization hook on or off needs a restart")
        options = UsageOptions.of(new)
        if self.usage is not None and options is not None:
            self.usage.reconfigure(options)
        elif (self.usage is None) != (options is None):
            log.warning("SIGHUP: turning usage records or monthly quotas on or off needs a restart")
        if self.admin is not None:
            if new.internal_admin_token is None and new.admin_tokens:
                self.admin.api.tokens = [parse_admin_token(t) for t in new.admin_tokens]
            self.admin.file.path = new.revocations_file
            self.admin.load()
        cert = api_certificate(new)
        if self.api_tls is not None and cert is not None:
            try:
                check_certificate(*cert)
                self.api_tls.reload(*cert)
            except (ConfigError, OSError, ssl.SSLError) as exc:
                log.error("API certificate reload failed, keeping the old one: %s", exc)
        if self.api is not None:
            self.api.reconfigure(api_config(new, self.runtime.bound_addresses()))
        self.settings = new

    def user_allocations(self) -> int:
        """Live allocations other than the self-probe's."""
        return sum(1 for a in self.runtime.core.allocations.values() if a.username != PROBE_USER)

    async def drain(self, timeout: float, stop: asyncio.Event) -> None:
        """SIGTERM: not ready, refuse (or redirect) new allocations, let live ones finish."""
        self.runtime.draining = True
        core = self.runtime.core
        core.accepting = False
        if self.fleet is not None:
            self.fleet.set_draining()  # out of every node's credentials now
        if self.probe is not None:
            await self.probe.stop()
        # the probes' allocations (any worker's probe may have one here) end now
        now = self.runtime.now()
        for alloc in [a for a in core.allocations.values() if a.username == PROBE_USER]:
            core.end_allocation(alloc.id, "shutdown", now)
        self.runtime.after_core_call()
        left = self.user_allocations()
        log.info(
            "draining: readiness off, new allocations refused%s; waiting up to %g s "
            "for %d allocations",
            " (sent to the alternate server)" if self.settings.alternate_server else "",
            timeout,
            left,
        )
        deadline = self.loop.time() + timeout
        while self.user_allocations() and self.loop.time() < deadline and not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), min(0.5, max(0.0, deadline - self.loop.time())))
            except TimeoutError:
                pass
        left = self.user_allocations()
        if left:
            log.warning("drain timeout: ending %d allocations", left)
        else:
            log.info("drained: no allocations left")

    async def stop(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
        if self.probe is not None:
            await self.probe.stop()
        self.runtime.stop()
        if self.usage is not None:  # the runtime's stop made every stop record
            await self.usage.stop()
        if self.hook is not None:
            await self.hook.close()
        await self.health.stop()
        if self._api_runner is not None:
            await self._api_runner.cleanup()
            self._api_runner = None
        if self.admin is not None:
            await self.admin.stop()


async def _serve(
    settings: Settings,
    show_credential: str | None,
    reload_settings: ReloadSettings | None,
    on_ready: Callable[[Server], None] | None,
) -> int:
    loop = asyncio.get_running_loop()
    early_hup: list[bool] = []  # SIGHUP's default action would end a starting server
    loop.add_signal_handler(signal.SIGHUP, early_hup.append, True)
    try:
        server = Server(settings, loop)
        await server.start()
    except (OSError, ValueError, ssl.SSLError) as exc:
        log.error("%s", exc)
        return 1
    runtime = server.runtime
    log.info(
        "listening on %s; relaying on %s ports %d-%d",
        ", ".join(str(s) for s in runtime.bound_addresses()),
        ", ".join(f"{b} (advertised {a})" for b, a, _ in relay_layout(settings)),
        settings.min_port,
        settings.max_port,
    )
    log_limits(server.runtime)
    for warning in cross_node_warnings(settings, os.environ):
        log.warning("%s", warning)
    state = write_state(
        (settings.metrics_listen[0], server.health.port) if settings.metrics_listen else None,
        [(s.host, s.port) for s in runtime.bound_addresses() if s.scheme == "udp"],
    )
    notify(f"READY=1\nSTATUS=serving {len(runtime.bound_addresses())} listeners")
    start_watchdog(loop)
    if on_ready is not None:
        on_ready(server)
    if show_credential:
        print_banner(settings, runtime, show_credential, server.api_base)
    stop = asyncio.Event()
    drain = asyncio.Event()

    def on_term() -> None:
        if drain.is_set():
            log.info("second SIGTERM: stopping now")
            stop.set()
        else:
            drain.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup() -> None:
        if reload_settings is None:
            log.warning("SIGHUP: nothing to reload (no config source)")
            return
        try:
            new = reload_settings()
        except ConfigError as exc:
            log.error("SIGHUP: configuration rejected, keeping the old one: %s", exc)
            return
        server.reload(new)
        log.info(
            "SIGHUP: configuration reloaded (%d allocations kept)", len(runtime.core.allocations)
        )

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if early_hup:  # the file may have changed after it was read: read it again
        on_hup()
    gc.freeze()  # what start-up built lives as long as the process: never scan it again
    stop_task = loop.create_task(stop.wait())
    drain_task = loop.create_task(drain.wait())
    await asyncio.wait({stop_task, drain_task}, return_when=asyncio.FIRST_COMPLETED)
    if drain.is_set() and not stop.is_set():
        await server.drain(settings.drain_timeout, stop)
    stop_task.cancel()
    drain_task.cancel()
    notify("STOPPING=1")
    log.info("shutting down: %d allocations", len(runtime.core.allocations))
    await server.stop()
    if state is not None:
        remove_state(state)
    return 0


def serve(
    settings: Settings,
    show_credential: str | None = None,
    reload_settings: ReloadSettings | None = None,
    on_ready: Callable[[Server], None] | None = None,
) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit code. `on_ready` is
    called once every listener is bound."""
    setup_logging(settings.log_level, settings.log_format)
    tune_gc()
    name, factory = loop_factory(settings.loop)
    logging.getLogger("turnserver").debug("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(settings, show_credential, reload_settings, on_ready))
