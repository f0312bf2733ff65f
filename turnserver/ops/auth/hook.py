"""The authorization hook's client: asks an HTTP endpoint about users the
configuration does not know, without blocking anyone (core/auth_hook.py holds the
waiting requests).

`POST {url}` with `{"username", "realm", "client", "client_ip", "transport"}`; the
answer `{"allow": true, "password": "..."}` (or `"key"`: the MD5 long-term key in hex),
with optional `"ttl"` (seconds) or `"expires"` (Unix time), `"tenant"` and
`"quotas": {"max_allocations", "bandwidth_kbps"}`; `{"allow": false}`, 401, 403 or 404
refuse. Anything else, or no answer within the timeout, is a failure: the request gets
401 "authorization hook unavailable" (fail closed: a 500 could not carry integrity for a
user we cannot verify, and clients drop it), or with auth_hook.fail_open the user's last
good answer.

In front of it: a token bucket for the whole server (each worker has its share) and
one per client address, so a flood of unknown usernames cannot become a flood against
the identity system; a cap on questions in flight; a circuit breaker that stops
asking for open_seconds after failures_to_open failures in a row, then lets one
question through to see whether the hook is back. Keys and passwords are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turnserver.core import events as ev
from turnserver.core.auth_hook import HookGrant
from turnserver.core.ratelimit import TokenBuckets
from turnserver.core.tenants import DEFAULT_TENANT
from turnserver.stun.constants import PasswordAlgorithm
from turnserver.stun.message import long_term_key

if TYPE_CHECKING:
    from turnserver.io.runtime import ServerRuntime
    from turnserver.ops.config.settings import Settings

log = logging.getLogger("turnserver")
OUTCOMES = ("allowed", "refused", "error", "timeout", "rate_limited", "circuit_open", "stale")
PER_IP_RATE, PER_IP_BURST = 2.0, 10  # questions a second from one client address
STALE_TTL = 30.0  # how long a stale answer (fail_open) is used before asking again
MAX_REMEMBERED = 10_000  # last good answers kept for fail_open
MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class HookOptions:
    url: str
    token: str | None
    timeout: float
    concurrency: int
    rate: float  # this process's share
    burst: int
    cache_ttl: float
    negative_ttl: float
    failures_to_open: int
    open_time: float
    fail_open: bool
    tenants: frozenset[str]

    @staticmethod
    def of(s: Settings, workers: int) -> HookOptions:
        return HookOptions(
            url=s.auth_hook_url,
            token=s.auth_hook_token,
            timeout=s.auth_hook_timeout,
            concurrency=max(1, s.auth_hook_concurrency // workers),
            rate=s.auth_hook_rate / workers,
            burst=max(1, s.auth_hook_burst // workers),
            cache_ttl=s.auth_hook_cache_ttl,
            negative_ttl=s.auth_hook_negative_ttl,
            failures_to_open=s.auth_hook_failures,
            open_time=s.auth_hook_open_time,
            fail_open=s.auth_hook_fail_open,
            tenants=frozenset({DEFAULT_TENANT, *(t.name for t in s.tenants)}),
        )


class BadAnswer(ValueError):
    """The hook answered something we cannot use (a failure, never shown to clients)."""


class AuthHookAgent:
    """Answers the core's AuthHookNeeded events (see the module docstring)."""

    def __init__(self, runtime: ServerRuntime, options: HookOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._bucket = (float(options.burst), time.monotonic())
        self._per_ip = TokenBuckets(PER_IP_RATE, PER_IP_BURST, max_keys=10_000)
        self._in_flight = 0
        self._failures = 0  # in a row
        self._open_until = 0.0
        self._trial = False  # a half-open circuit's one question is out
        self._last_good: OrderedDict[tuple[str, str], HookGrant] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def sink(self) -> ev.EventTable:
        return ev.EventTable({ev.AuthHookNeeded: self._needed})

    def reconfigure(self, options: HookOptions) -> None:
        self.options = options

    @property
    def circuit_open(self) -> bool:
        return self._open_until > time.monotonic() or self._trial

    def _take(self, now: float) -> bool:
        tokens, last = self._bucket
        tokens = min(float(self.options.burst), tokens + (now - last) * self.options.rate)
        if tokens < 1.0:
            self._bucket = (tokens, now)
            return False
        self._bucket = (tokens - 1.0, now)
        return True

    def _needed(self, event: ev.AuthHookNeeded) -> None:
        now = time.monotonic()
        key = (event.username, event.realm)
        if now < self._open_until or self._trial:
            self._failed(key, "circuit_open")
            return
        if self._in_flight >= self.options.concurrency:
            self._failed(key, "rate_limited")
            return
        if not self._per_ip.allow(event.five_tuple.client[0], now) or not self._take(now):
            self._failed(key, "rate_limited")
            return
        if self._open_until:  # the open time is over: this question is the trial
            self._trial = True
        self._in_flight += 1
        task = self.runtime.loop.create_task(self._ask(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _failed(self, key: tuple[str, str], outcome: str) -> None:
        """No answer from the hook: fail closed, or the last good answer (fail_open).
        Delivered on the next loop turn (we are inside the core's event dispatch)."""
        grant = self._last_good.get(key) if self.options.fail_open else None
        if grant is not None:
            self.outcomes["stale"] += 1
            grant = replace(grant, until=time.time() + STALE_TTL)
        else:
            self.outcomes[outcome] += 1
        self.runtime.loop.call_soon(self._deliver, key, grant, 0.0)

    async def _ask(self, event: ev.AuthHookNeeded) -> None:
        key = (event.username, event.realm)
        outcome = "error"
        grant: HookGrant | None = None
        refused_until = 0.0
        try:
            async with asyncio.timeout(self.options.timeout):
                grant, refused = await self._post(event)
            outcome = "allowed" if grant is not None else "refused"
            if refused:
                refused_until = time.time() + self.options.negative_ttl
        except TimeoutError:
            outcome = "timeout"
        except (aiohttp.ClientError, BadAnswer, ValueError) as exc:
            outcome = "error"
            log.debug("authorization hook: %s", exc)
        except Exception as exc:  # a bug: fail closed for this one, say so
            self.runtime.core_failed("auth_hook", exc)
        finally:
            self._in_flight -= 1
            self._trial = False
        if outcome in ("allowed", "refused"):
            if self._failures >= self.options.failures_to_open:
                log.warning("authorization hook answers again: circuit closed")
            self._failures, self._open_until = 0, 0.0
            self.outcomes[outcome] += 1
            if grant is not None:
                self._remember(key, grant)
            self._deliver(key, grant, refused_until)
            return
        self._failures += 1
        if self._failures >= self.options.failures_to_open:
            if not self._open_until or self._open_until <= time.monotonic():
                log.warning(
                    "authorization hook failed %d times in a row (last: %s): circuit open "
                    "for %g s, users it would vouch for get 401%s",
                    self._failures,
                    outcome,
                    self.options.open_time,
                    " (or their last good answer)" if self.options.fail_open else "",
                )
            self._open_until = time.monotonic() + self.options.open_time
        self._failed(key, outcome)

    def _remember(self, key: tuple[str, str], grant: HookGrant) -> None:
        self._last_good[key] = grant
        self._last_good.move_to_end(key)
        while len(self._last_good) > MAX_REMEMBERED:
            self._last_good.popitem(last=False)

    async def _post(self, event: ev.AuthHookNeeded) -> tuple[HookGrant | None, bool]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.options.concurrency)
            )
        client = event.five_tuple.client
        body = {
            "username": event.username,
            "realm": event.realm,
            "client": f"[{client[0]}]:{client[1]}"
            if ":" in client[0]
            else f"{client[0]}:{client[1]}",
            "client_ip": client[0],
            "transport": event.five_tuple.transport.value,
        }
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        async with self._session.post(self.options.url, json=body, headers=headers) as resp:
            if resp.status in (401, 403, 404):
                return None, True
            if resp.status != 200:
                raise BadAnswer(f"HTTP {resp.status}")
            raw = await resp.content.read(MAX_ANSWER + 1)
            if len(raw) > MAX_ANSWER:
                raise BadAnswer("answer too large")
        return self._grant(event, _json_object(raw))

    def _grant(
        self, event: ev.AuthHookNeeded, answer: dict[str, Any]
    ) -> tuple[HookGrant | None, bool]:
        if answer.get("allow") is not True:
            return None, True
        now = time.time()
        until = now + self.options.cache_ttl
        expires: float | None = None
        if "expires" in answer:
            expires = _number(answer["expires"], "expires")
        elif "ttl" in answer:
            expires = now + _number(answer["ttl"], "ttl")
        if expires is not None:
            if expires <= now:
                return None, True  # already expired: a refusal
            until = min(until, expires)
        tenant = answer.get("tenant", DEFAULT_TENANT)
        if tenant not in self.options.tenants:
            raise BadAnswer(f"tenant {str(tenant)[:64]!r} is not configured")
        quotas = answer.get("quotas") or {}
        if not isinstance(quotas, dict):
            raise BadAnswer("quotas is not an object")
        password, hexkey = answer.get("password"), answer.get("key")
        if isinstance(password, str) and password:
            key = long_term_key(event.username, event.realm, password)
            sha = long_term_key(event.username, event.realm, password, PasswordAlgorithm.SHA256)
        elif isinstance(hexkey, str):
            try:
                key, sha = bytes.fromhex(hexkey), None
            except ValueError:
                raise BadAnswer("key is not hex") from None
            if len(key) != 16:
                raise BadAnswer("key is not an MD5 key (32 hex digits)")
        else:
            raise BadAnswer("an allowed user needs a password or a key")
        return (
            HookGrant(
                key,
                sha,
                until,
                expires,
                str(tenant),
                int(_number(quotas.get("max_allocations", 0), "max_allocations")),
                int(_number(quotas.get("bandwidth_kbps", 0), "bandwidth_kbps")) * 1000 // 8,
            ),
            False,
        )

    def _deliver(self, key: tuple[str, str], grant: HookGrant | None, refused_until: float) -> None:
        runtime = self.runtime
        try:
            responses = runtime.core.auth_hook_result(
                key[0], key[1], grant, refused_until, runtime.now()
            )
        except Exception as exc:
            runtime.core_failed("auth_hook", exc)
            return
        for ft, response in responses:
            runtime.answer(ft, response)
        runtime.after_core_call()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise BadAnswer("not JSON") from None
    if not isinstance(value, dict):
        raise BadAnswer("not a JSON object")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadAnswer(f"{name} is not a number")
    return float(value)


class AuthHookCollector(Collector):
    def __init__(self, agent: AuthHookAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        asked = CounterMetricFamily(
            "turn_auth_hook_requests",
            "Users the authorization hook was asked about, by outcome (rate_limited and "
            "circuit_open were not asked; stale: fail_open used a last good answer)",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            asked.add_metric([outcome], agent.outcomes[outcome])
        yield asked
        circuit = GaugeMetricFamily(
            "turn_auth_hook_circuit_open", "1 while the hook's circuit breaker is open"
        )
        circuit.add_metric([], 1 if agent.circuit_open else 0)
        yield circuit
        book = agent.runtime.core.auth.hook
        cached = GaugeMetricFamily(
            "turn_auth_hook_cached", "Answers of the hook cached, by kind", labels=["kind"]
        )
        for kind, table in (
            ("granted", book.granted if book else {}),
            ("refused", book.refused if book else {}),
        ):
            cached.add_metric([kind], len(table))
        yield cached
