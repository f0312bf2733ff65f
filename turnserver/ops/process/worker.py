"""One worker process: a Server on its share of every listener socket (SO_REUSEPORT)
and its slice of the relay port range, joined to its siblings by the shared quota
ledger and the worker bus (io/handover.py), and stopped by its supervisor."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.synchronize
import signal
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any

from turnserver.io.handover import WorkerBus
from turnserver.io.kernel.program import FlowMaps
from turnserver.ops.config.settings import Settings, read_settings
from turnserver.ops.config.values import ConfigError
from turnserver.ops.fleet.quota import enforce_fleet_quota
from turnserver.ops.http.revocations import Revocations
from turnserver.ops.process.runtime_setup import own_ports
from turnserver.ops.process.shared_quota import SharedQuotaLedger
from turnserver.ops.telemetry.eventlog import quiet_loop_errors, setup_logging
from turnserver.ops.telemetry.worker_metrics import families_of

log = logging.getLogger("turnserver")


def port_slice(settings: Settings, index: int, workers: int) -> tuple[int, int]:
    """The index-th contiguous slice of the relay port range."""
    total = settings.max_port - settings.min_port + 1
    size = total // workers
    lo = settings.min_port + index * size
    hi = settings.max_port if index == workers - 1 else lo + size - 1
    return lo, hi


@dataclass
class Shared:
    """What the supervisor shares with every worker (passed when it is spawned)."""

    workers: int
    shm_name: str
    slots: int  # per quota table
    quota_secret: bytes
    lock: multiprocessing.synchronize.Lock
    ports: Any  # multiprocessing Array: per worker its metrics port, then its admin port
    bus_dir: str

    def all_listening(self) -> bool:
        return all(self.ports[i] for i in range(self.workers))


def worker_main(
    settings: Settings,
    index: int,
    shared: Shared,
    config_path: str | None,
    overrides: dict[str, Any],
    listeners: list[socket.socket],
    offload: FlowMaps | None,
    revocations: Revocations,
) -> None:
    """Entry point of one worker process; `listeners` are its sockets, one per
    configured listener, owned by the parent (they outlive a crash of this worker);
    `offload` the kernel fast path's maps when the parent loaded the program;
    `revocations` those made through the supervisor's admin API."""
    from turnserver.io.loop import loop_factory, tune_gc
    from turnserver.ops.dev.banner import log_limits
    from turnserver.ops.process.app import Server

    workers = shared.workers
    setup_logging(settings.log_level, settings.log_format, worker=index)
    tune_gc()
    lo, hi = port_slice(settings, index, workers)
    mine = replace(
        settings,
        min_port=lo,
        max_port=hi,
        full_port_range=(settings.min_port, settings.max_port),
        reuse_port=True,
        api_listen=None,
        metrics_listen=("127.0.0.1", 0),
        workers=1,
        fleet_redis=None,  # the supervisor is this node of the fleet
        # its quota leases are asked of the supervisor over the worker bus
        fleet_max_allocations_per_user=(
            settings.fleet_max_allocations_per_user if settings.fleet_redis else 0
        ),
    )
    _, factory = loop_factory(settings.loop)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        quiet_loop_errors(loop)
        server = Server(mine, loop, inherited=dict(enumerate(listeners)))
        server.worker_index = index
        server.worker_count = workers
        server.shared_offload = offload
        server.initial_revocations = revocations
        runtime = server.runtime
        core = runtime.core
        core.id_prefix = f"w{index}-"  # the supervisor routes admin calls by id
        core.worker_index, core.worker_count = index, workers  # RFC 6062 CONNECTION-IDs
        core.add_own_ports(set(own_ports(settings)))  # the supervisor's API, admin, metrics
        if server.probe is not None:  # a probe may land on any worker: all must listen
            server.probe.siblings_ready = shared.all_listening
        ledger = SharedQuotaLedger(
            shared.shm_name, workers, index, shared.lock, shared.slots, shared.quota_secret
        )
        core.quotas = ledger
        runtime.handover = WorkerBus(
            runtime, shared.bus_dir, index, workers, runtime.stream_connections.get
        )
        runtime.handover.metrics_source = lambda: families_of(server.metrics.registry)
        if mine.fleet_max_allocations_per_user:
            bus = runtime.handover
            enforce_fleet_quota(
                runtime, mine.fleet_max_allocations_per_user, bus.ask_lease, bus.give_back_lease
            )
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
            runtime.stop()
            ledger.close()
            return 1
        if index == 0:
            log_limits(runtime)
        shared.ports[workers + index] = server.admin.port if server.admin is not None else 0
        shared.ports[index] = server.health.port

        def on_hup() -> None:
            try:
                new = read_settings(config_path, overrides)
            except ConfigError as exc:
                log.error("worker %d: SIGHUP: configuration rejected: %s", index, exc)
                return
            server.reload(
                replace(
                    new,
                    min_port=lo,
                    max_port=hi,
                    full_port_range=(new.min_port, new.max_port),
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
            # Our listener sockets stay in their SO_REUSEPORT groups until the whole
            # server has drained: keep reading them (Binding answered, Allocate 508 or
            # the alternate server) until the supervisor says stop
            await stop.wait()
        for w in waiters:
            w.cancel()
        await server.stop()
        ledger.close()
        return 0

    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(main()))
