"""Self-probe: a real TURN client against each of our own listeners, every N seconds.

Allocate, CreatePermission to a local echo socket, one round trip through the relay,
Refresh 0. It turns "the port is open" into "media can flow" and feeds /readyz and the
turn_probe_* metrics. The probe uses an internal user; only its allocations may reach
the echo socket, whatever the peer policy says.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.io.proxy_protocol import encode_v1, encode_v2, parse_versions
from turnserver.io.runtime import ListenAddress
from turnserver.stun.attributes import Address
from turnserver.stun.message import long_term_key

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime
    from turnserver.ops.telemetry.metrics import Metrics

log = logging.getLogger("turnserver.probe")
_LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
PROBE_USER = "turnserver-self-probe"
SIBLING_WAIT = 30.0  # at most, for the other workers to listen before the first probe


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One listener's last probe."""

    listener: str
    transport: str
    ok: bool
    rtt: float | None
    error: str
    at: float
    probed: bool = True  # False: a PROXY listener no local address may reach (see _source)


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


def _unverified_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we probe our own listener, not its certificate
    return ctx


class SelfProbe:
    """Runs probes on a schedule and keeps the last result per listener."""

    def __init__(
        self,
        runtime: ServerRuntime,
        interval: float,
        timeout: float = 5.0,
        metrics: Metrics | None = None,
        password: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.interval = interval
        self.timeout = timeout
        self.metrics = metrics
        # Worker processes share one password, so any of them accepts any probe
        self.password = password or secrets.token_urlsafe(24)

        self.results: dict[str, ProbeResult] = {}
        self._echoes: list[asyncio.BaseTransport] = []
        self.echo_addresses: dict[int, Address] = {}
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        # Workers: the first probe waits until every sibling listens (a probe may land
        # on any of them), see ops/process/
        self.siblings_ready: Callable[[], bool] = lambda: True
        self.register()

    def register(self) -> None:
        """Make the probe's user and echo addresses known to the core before any
        listener answers: a sibling worker's probe may reach this process first."""
        core = self.runtime.core
        core.probe_users.add(PROBE_USER)
        core.auth.internal_keys[PROBE_USER] = long_term_key(
            PROBE_USER, core.auth.realm, self.password
        )
        for relay in core.relay_addresses.values():
            loopback = "127.0.0.1" if relay.family == 4 else "::1"
            core.probe_peer_ips.add(loopback)  # the fallback of an echo socket
            if relay.bind_ip not in ("0.0.0.0", "::"):
                core.probe_peer_ips.add(relay.bind_ip)

    async def start(self) -> None:
        """Open the echo sockets and schedule the first probe."""
        loop = self.runtime.loop
        core = self.runtime.core
        self.register()
        for relay in core.relay_addresses.values():
            host = relay.bind_ip
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1" if relay.family == 4 else "::1"
            try:
                transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(host, 0))
            except OSError as exc:
                fallback = "127.0.0.1" if relay.family == 4 else "::1"
                log.warning(
                    "self-probe: cannot bind an echo socket on %s (%s); using %s",
                    host,
                    exc.strerror or exc,
                    fallback,
                )
                try:
                    transport, _ = await loop.create_datagram_endpoint(
                        _Echo, local_addr=(fallback, 0)
                    )
                except OSError:
                    continue

            addr = transport.get_extra_info("sockname")
            self.echo_addresses[relay.family] = (addr[0], addr[1])
            core.probe_peer_ips.add(addr[0])
            self._echoes.append(transport)
        self._task = loop.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for echo in self._echoes:
            echo.close()
        self._echoes.clear()

    @property
    def ready(self) -> tuple[bool, str]:
        """(every listener's last probe passed, why not)."""
        if not self.results:
            return False, "no probe has finished yet"
        failed = [r for r in self.results.values() if not r.ok]
        if failed:
            return False, "; ".join(f"{r.listener}: {r.error}" for r in failed)
        return True, ""

    async def _loop(self) -> None:
        for _ in range(int(SIBLING_WAIT / 0.05)):
            if self.siblings_ready():
                break
            await asyncio.sleep(0.05)
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)

    async def run_once(self) -> dict[str, ProbeResult]:
        """Probe every bound listener once."""
        self.register()  # the realm may have changed on reload
        specs = self.runtime.bound_addresses()
        results = await asyncio.gather(*(self._probe(spec) for spec in specs))
        self.results = {r.listener: r for r in results}
        self.runs += 1
        if self.metrics is not None:
            by_transport: dict[str, list[ProbeResult]] = {}
            for r in results:
                if r.probed:
                    by_transport.setdefault(r.transport, []).append(r)
            for transport, rs in by_transport.items():
                ok = all(r.ok for r in rs)
                self.metrics.probe_success.labels(transport).set(1 if ok else 0)
                rtts = [r.rtt for r in rs if r.rtt is not None]
                if rtts:
                    self.metrics.probe_rtt.labels(transport).set(max(rtts))
                for r in rs:
                    self.metrics.probe_runs.labels(transport, "ok" if r.ok else "fail").inc()
        return self.results

    def _proxy_source(self, host: str) -> Address | None:
        """A source address a PROXY listener trusts: the listener's own address, or
        one in a trusted loopback network (a proxy on this host), or None."""
        trusted = self.runtime.stream_options.proxy_trusted
        ip = ipaddress.ip_address(host)
        if any(ip in net for net in trusted):
            return (host, 0)
        for net in trusted:
            if net.version == ip.version and net.subnet_of(_LOOPBACK[net.version]):  # type: ignore[arg-type]
                first = net.network_address if net.num_addresses == 1 else net.network_address + 1
                return (str(first), 0)
        return None

    async def _probe(self, spec: ListenAddress) -> ProbeResult:
        host = spec.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        family = 6 if ":" in host else 4
        echo = self.echo_addresses.get(family) or next(iter(self.echo_addresses.values()), None)
        started = time.time()
        client: TurnClient | None = None
        local: Address | None = None
        preamble: Callable[[Address], bytes] | None = None
        if spec.proxy:
            local = self._proxy_source(host)
            if local is None:
                why = "not probed: no local address is in stream.proxy_trusted"
                return ProbeResult(str(spec), spec.scheme, True, None, why, started, False)
            versions = parse_versions(spec.proxy)
            server: Address = (host, spec.port)
            preamble = partial(encode_v2 if 2 in versions else encode_v1, destination=server)
        try:
            if echo is None:
                raise TurnClientError("no relay address to probe through")
            client = await TurnClient.connect(
                spec.scheme,
                (host, spec.port),
                PROBE_USER,
                self.password,
                ssl_context=_unverified_tls() if spec.scheme == "tls" else None,
                timeout=self.timeout,
                local=local,
                preamble=preamble,
            )
            # In-process, so skip the 401 round trip: a nonce for our own address
            auth = self.runtime.core.auth
            client.realm = auth.realm
            client.nonce = auth.nonces.issue(client.local[0], time.time())
            await client.allocate(lifetime=60, family=2 if ":" in echo[0] else None)

            await client.create_permission(echo)
            payload = os.urandom(16)
            sent = time.perf_counter()
            client.send_indication(echo, payload)
            while True:
                _, data = await client.receive(self.timeout)
                if data == payload:
                    break
            rtt = time.perf_counter() - sent
            await client.refresh(0)
            return ProbeResult(str(spec), spec.scheme, True, rtt, "", started)
        except TurnClientError as exc:
            log.warning("self-probe of %s failed: %s", spec, exc)
            return ProbeResult(str(spec), spec.scheme, False, None, str(exc), started)
        finally:
            if client is not None:
                client.close()
