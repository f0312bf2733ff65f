"""Developer mode: live impairment (`/dev/v1/impairment`) and its metrics.

Off unless `--dev` (dev.enabled): a server in developer mode logs a warning at start and
every impairment change, because it degrades media on purpose.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.io.impairment import (
    ACTIONS,
    TRANSPORTS,
    Impairment,
    ImpairmentError,
    Impairments,
    parse_assignments,
    parse_impairment,
)
from turnserver.io.runtime import ServerRuntime
from turnserver.ops.telemetry.eventlog import log, safe_text

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from turnserver.ops.config.settings import Settings
    from turnserver.ops.http.credentials_api import CredentialsApi


MAX_DEV_BODY = 4096


class DevMode:
    """The impairments of one server and the endpoint that changes them."""

    def __init__(self, settings: Settings, runtime: ServerRuntime) -> None:
        self.runtime = runtime
        self.impairments = Impairments(
            runtime.loop,
            runtime.core.stats,
            settings.impair_seed,
            parse_assignments(settings.impairments),
        )
        self.impairments.on_block = runtime.set_blocked
        runtime.impairments = self.impairments
        self.api: CredentialsApi | None = None
        # with no API key, only a loopback-only API listener may change impairments
        host = settings.api_listen[0] if settings.api_listen else ""
        self.loopback_api = _is_loopback(host)

    def start(self) -> None:
        """After the listeners are bound: apply start-up blocks, warn loudly."""
        for transport, spec in self.impairments.specs.items():
            if spec.block:
                self.runtime.set_blocked(transport, True)
        log.warning(
            "DEVELOPER MODE: relayed media is impaired on purpose when asked "
            "(seed %d; now %s); never run this in production",
            self.impairments.seed,
            self._summary(),
        )

    def _summary(self) -> str:
        return " ".join(f"{t}={d}" for t, d in self.impairments.describe().items())

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {t: {} for t in TRANSPORTS}
        for (transport, action), n in self.impairments.counts.items():
            out[transport][action] = n
        blocked_udp = sum(x.dropped_blocked for x in self.runtime.udp_listeners.values())
        if blocked_udp:
            out["udp"]["blocked"] = out["udp"].get("blocked", 0) + blocked_udp
        refused = self.runtime.stream_refusals.get("dev_block", 0)
        if refused:
            out["tcp"]["connections_refused"] = refused  # TCP and TLS together
        return out

    def add_routes(self, api: CredentialsApi) -> None:
        self.api = api
        api.app.router.add_get("/dev/v1/impairment", self.get_impairment)
        api.app.router.add_put("/dev/v1/impairment", self.put_impairment)

    def state(self) -> dict[str, Any]:
        imp = self.impairments
        return {
            "impairment": imp.describe(),
            "detail": {t: s.as_dict() for t, s in imp.specs.items()},
            "seed": imp.seed,
            "counts": self.counts(),
        }

    def _authorized(self, request: web.Request) -> bool:
        """An API key when keys are configured; without any, the API listener must be
        loopback-only (anyone who reaches it could otherwise cut every call's media)."""
        api = self.api
        if api is None:
            return False
        if api.config.api_keys:
            return api.api_key_ok(request)
        return self.loopback_api

    async def get_impairment(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _refused(self.api)
        return web.json_response(self.state())

    async def put_impairment(self, request: web.Request) -> web.Response:
        """Body: {"udp": "block", "tls": "loss:5,delay:80", "all": "none"}; transports
        not named keep their impairment; a "seed" restarts the random generator."""
        if not self._authorized(request):
            return _refused(self.api)
        if (request.content_length or 0) > MAX_DEV_BODY:
            return web.json_response({"error": "body too large"}, status=413)
        try:
            return web.json_response(self.apply(json.loads(await request.read() or b"{}")))
        except (ValueError, ImpairmentError) as exc:
            return web.json_response({"error": str(exc)}, status=400)

    def apply(self, body: Any) -> dict[str, Any]:
        """Change impairments as the endpoint's body says (raises ValueError naming the
        bad part, changing nothing); returns the new state."""
        changes = _parse_body(body)
        seed = body.get("seed")
        if seed is not None:
            self.impairments.rng.seed(seed)
            self.impairments.seed = seed
        self.impairments.set(changes)
        log.warning("DEVELOPER MODE: impairment now %s", safe_text(self._summary()))
        return self.state()


def _parse_body(body: Any) -> dict[str, Impairment]:
    if not isinstance(body, dict):
        raise ValueError('expected a JSON object such as {"udp": "block"}')
    out: dict[str, Impairment] = {}
    for key, value in body.items():
        if key == "seed":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                raise ValueError("seed must be an integer between 0 and 2**32 - 1")
            continue
        if key not in (*TRANSPORTS, "all"):
            raise ValueError(f"unknown transport {key!r} (udp, tcp, tls or all)")
        if isinstance(value, dict):
            value = ",".join(f"{k}:{v}" for k, v in value.items()) or "none"
        if not isinstance(value, str):
            raise ValueError(f'{key}: expected a string such as "loss:5,delay:80"')
        spec = parse_impairment(value)
        for t in TRANSPORTS if key == "all" else (key,):
            out[t] = spec
    return out


class DevCollector(Collector):
    """turn_dev_impaired_packets_total{transport, action}."""

    def __init__(self, dev: DevMode) -> None:
        self.dev = dev

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "turn_dev_impaired_packets",
            "Developer mode: relayed packets impaired on purpose, by client transport and action",
            labels=["transport", "action"],
        )
        for transport, actions in self.dev.counts().items():
            for action in (*ACTIONS, "connections_refused"):
                if action in actions or action in ACTIONS:
                    family.add_metric([transport, action], actions.get(action, 0))
        yield family


def attach(
    settings: Settings, runtime: ServerRuntime, registry: CollectorRegistry
) -> DevMode | None:
    """Developer mode for a server, when its settings ask for it."""
    if not settings.dev:
        return None
    dev = DevMode(settings, runtime)
    registry.register(DevCollector(dev))
    return dev


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _refused(api: CredentialsApi | None) -> web.Response:
    if api is not None and not api.config.api_keys:
        return web.json_response(
            {
                "error": "the API listens beyond loopback and has no API key: set api.keys "
                "(or listen on 127.0.0.1) to change impairments"
            },
            status=403,
        )
    return web.json_response({"error": "missing or wrong API key"}, status=401)
