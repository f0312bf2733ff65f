"""The admin HTTP API (aiohttp): who is relaying, how much, and cutting someone off.

    GET    /admin/v1/allocations?user=&client=&peer=&transport=&limit=&cursor=
    GET    /admin/v1/allocations/{id}
    DELETE /admin/v1/allocations/{id}        end it now (cause "admin"; next request: 437)
    GET    /admin/v1/revocations
    POST   /admin/v1/revocations             {"user": U, "for": "2h" | "until": T, "reason": R}
    DELETE /admin/v1/revocations/{user}
    GET    /admin/v1/summary

Bearer tokens distinct from the credentials API's keys, compared in constant time; JSON
in and out; every action is an audit log line and `turn_admin_requests_total{action,
status}`. The same application serves one process (LocalBackend, admin_backend.py) and, with
--workers, the parent (WorkersBackend: it fans out to each worker's copy and merges); a
fleet's node also lists and ends other nodes' allocations (admin_fleet.py).
"""

from __future__ import annotations

import hmac
import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from turnserver.ops.config.values import AdminToken, ConfigError, parse_admin_token  # noqa: F401
from turnserver.ops.http.admin_backend import AdminBackend, Filters, LocalBackend, summarize
from turnserver.ops.http.admin_fleet import FleetAdmin
from turnserver.ops.http.credentials import parse_ttl
from turnserver.ops.http.revocations import Revocations, RevocationStore
from turnserver.ops.telemetry.eventlog import safe_text

__all__ = ["AdminApi", "AdminBackend", "Filters", "LocalBackend", "summarize"]
log = logging.getLogger("turnserver.admin")

MAX_BODY = 16 * 1024
WHO = web.RequestKey("who", str)  # the name of the admin token a request carries
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass
class AdminStats:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)

    def count(self, action: str, status: int) -> None:
        key = (action, status)
        self.requests[key] = self.requests.get(key, 0) + 1


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def user_name_problem(user: object) -> str:
    """Why a revocation's user name is refused ("" when it is fine): 1 to 256
    characters, no control or format characters (they would hide in logs)."""
    if not isinstance(user, str) or not user or len(user) > 256:
        return "user must be a string of 1 to 256 characters"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in user):
        return "user must not contain control or format characters"
    if user in (".", ".."):
        return "user must not be . or .. (a URL path would lose it)"
    return ""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


class AdminApi(FleetAdmin):
    """The aiohttp application; `store` persists revocations (None in a worker)."""

    def __init__(
        self,
        backend: AdminBackend,
        tokens: list[AdminToken],
        store: RevocationStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.tokens = tokens
        self.store = store
        self.clock = clock
        self.stats = AdminStats()
        # applies the revocations in force to this process's core (set by AdminService)
        self.on_change: Callable[[Revocations], int] | None = None
        # Revocations in force: the file's, and those made through this API that the file
        # does not hold (no file, a read-only one, or a worker's copy): a reload of the
        # file never drops the latter, and a restarted worker gets them from its
        # supervisor (replace_api_revocations)
        self.from_file: Revocations = {}
        self.from_api: Revocations = {}
        # the fleet's (ops/fleet/node.py): made on any node, read from Redis
        self.from_fleet: Revocations = {}
        # a revocation made (until) or lifted (None) here, to the fleet
        self.publish: Callable[[str, float | None, str], None] | None = None
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        r = self.app.router
        # the fleet (ops/fleet/node.py): listings fan out to, and ids name, its nodes
        self.fleet = None
        r.add_get("/admin/v1/allocations", self.list_allocations)
        r.add_get("/admin/v1/allocations/{id}", self.get_allocation)
        r.add_delete("/admin/v1/allocations/{id}", self.delete_allocation)
        r.add_get("/admin/v1/revocations", self.list_revocations)
        r.add_post("/admin/v1/revocations", self.add_revocation)
        r.add_delete("/admin/v1/revocations/{user}", self.delete_revocation)
        r.add_get("/admin/v1/summary", self.summary)
        if store is None:  # a worker's internal copy: its supervisor sets them all at once
            r.add_put("/admin/v1/revocations", self.put_revocations)

    def who(self, request: web.Request) -> str | None:
        """The name of the token the request carries, or None (constant-time compare)."""
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        given_b = given.strip().encode()
        name = None
        for t in self.tokens:
            if hmac.compare_digest(given_b, t.token.encode()):
                name = t.name
        return name

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route_handler = request.match_info.route.handler
        action = ACTIONS.get((request.method, getattr(route_handler, "__name__", "")), "unknown")
        who = self.who(request)
        if who is None:
            response: web.StreamResponse = _error(401, "missing or wrong admin token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="turnserver-admin"'
        else:
            request[WHO] = who
            try:
                response = await handler(request)
            except web.HTTPRequestEntityTooLarge:
                response = _error(413, "request body too large")
            except web.HTTPException as exc:
                response = _error(exc.status, exc.reason)
            except Exception:  # a bug: answered, counted and logged, never a crash
                log.exception("admin %s %s failed", request.method, safe_text(request.path))
                response = _error(500, "internal server error")
        self.stats.count(action, response.status)
        if action != "unknown" or response.status != 401:
            level = logging.INFO if request.method != "GET" else logging.DEBUG
            log.log(
                level,
                "admin action=%s by=%s path=%s status=%d",
                action,
                safe_text(who or "-"),
                safe_text(request.path),
                response.status,
            )
        return response

    # ---- allocations --------------------------------------------------------------------

    async def list_allocations(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be between 1 and {MAX_LIMIT}")
        transport = q.get("transport", "")
        if transport not in ("", "udp", "tcp", "tls"):
            return _error(400, "transport must be udp, tcp or tls")
        filters = Filters(
            q.get("user", ""),
            q.get("client", ""),
            q.get("peer", ""),
            transport,
            q.get("tenant", ""),
        )
        if q.get("fleet") in ("1", "true"):
            if self.fleet is None:
                return _error(400, "fleet=1: this server is not in a fleet (fleet.redis)")
            return await self._fleet_allocations(request, filters, limit)
        items = await self.backend.allocations(filters, limit, q.get("cursor", ""))
        body: dict[str, Any] = {"allocations": items}
        if len(items) == limit:
            body["next_cursor"] = items[-1]["id"]
        return web.json_response(body)

    async def get_allocation(self, request: web.Request) -> web.Response:
        allocation_id = request.match_info["id"]
        forwarded = await self._on_owner(request, allocation_id)
        if forwarded is not None:
            return forwarded
        info = await self.backend.allocation(self._local_id(allocation_id))
        if info is None:
            return _error(404, "no such allocation")
        return web.json_response(info)

    async def delete_allocation(self, request: web.Request) -> web.Response:
        allocation_id = request.match_info["id"]
        forwarded = await self._on_owner(request, allocation_id)
        if forwarded is not None:  # the owning node ended it (and logged who asked)
            return forwarded
        if not await self.backend.end(self._local_id(allocation_id)):
            return _error(404, "no such allocation")
        log.warning("admin ended allocation id=%s by=%s", safe_text(allocation_id), request[WHO])
        return web.json_response({"ended": allocation_id})

    # ---- revocations --------------------------------------------------------------------

    @property
    def revocations(self) -> Revocations:
        """Every revocation in force (the file's and the API's), expired ones dropped."""
        now = self.clock()
        merged = {u: e for u, e in self.from_file.items() if e[0] > now}
        return _merge(merged, self.pushed, now)

    @property
    def pushed(self) -> Revocations:
        """The revocations a supervisor gives its workers: the API's and the fleet's (a
        worker reads the file itself)."""
        return _merge(dict(self.from_fleet), self.from_api, self.clock())

    async def list_revocations(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "revocations": [
                    {"user": u, "until": int(until), "reason": reason}
                    for u, (until, reason) in sorted(self.revocations.items())
                ]
            }
        )

    async def add_revocation(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        user = body.get("user")
        why = user_name_problem(user)
        if why or not isinstance(user, str):
            return _error(400, why)
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 512:
            return _error(400, "reason must be a string of at most 512 characters")
        now = self.clock()
        try:
            if "until" in body:
                until = float(body["until"])
            else:
                duration = body.get("for")
                seconds = duration if isinstance(duration, int) else parse_ttl(str(duration))
                until = now + seconds
        except (TypeError, ValueError):
            return _error(400, "give until (Unix time) or for (seconds, or 30m, 2h, 1d)")
        if not now < until < now + 10 * 365 * 86400:
            return _error(400, "until must be in the future (and within ten years)")
        # in force here before it goes out (a worker synchronised meanwhile gets it too)
        self.from_api[user] = (until, reason)
        ended = await self.backend.revoke(user, until, reason)
        warning = None
        if self.store is not None and body.get("persist", True):
            warning = self.store.save(self.revocations)
            if warning is None:  # the file holds it now: the file is the truth
                self.from_file[user] = self.from_api.pop(user)
        log.warning(
            "admin revoked user=%s until=%d reason=%s by=%s ended=%d",
            safe_text(user),
            until,
            safe_text(reason or "-"),
            request[WHO],
            ended,
        )
        if self.publish is not None:
            self.publish(user, until, reason)
        out: dict[str, Any] = {"user": user, "until": int(until), "ended": ended}
        if warning:
            out["warning"] = warning
        return web.json_response(out, status=201)

    async def delete_revocation(self, request: web.Request) -> web.Response:
        user = request.match_info["user"]
        why = user_name_problem(user)
        if why:
            return _error(400, why)
        in_file = self.from_file.pop(user, None) is not None
        in_api = self.from_api.pop(user, None) is not None
        in_fleet = self.from_fleet.pop(user, None) is not None
        known = await self.backend.unrevoke(user) or in_file or in_api or in_fleet
        if not known:
            return _error(404, "no such revocation")
        if self.publish is not None:
            self.publish(user, None, "")
        warning = None
        if self.store is not None and request.query.get("persist") != "false":
            warning = self.store.save(self.revocations)
        log.warning("admin unrevoked user=%s by=%s", safe_text(user), request[WHO])
        return web.json_response({"user": user, **({"warning": warning} if warning else {})})

    def apply_file(self, entries: Revocations) -> None:
        """Revocations as loaded from the file (start, SIGHUP, change); what changed in
        the file goes to the fleet as if it were made through the API."""
        before, self.from_file = self.from_file, dict(entries)
        if self.publish is None:
            return
        for user, (until, reason) in entries.items():
            if before.get(user) != (until, reason):
                self.publish(user, until, reason)
        for user in before.keys() - entries.keys():
            self.publish(user, None, "")

    async def apply_fleet(self, entries: Revocations, lifted: set[str]) -> int:
        """The fleet's revocations, as read from Redis: what is new here is revoked (live
        allocations end); what another node lifted (`lifted`) is lifted here too, from
        this node's file as well."""
        before = self.revocations
        self.from_fleet = dict(entries)
        in_file = [u for u in lifted if u in self.from_file]
        for user in lifted:
            self.from_file.pop(user, None)
            self.from_api.pop(user, None)
        if in_file and self.store is not None:
            warning = self.store.save(self.revocations)
            if warning:
                log.warning("fleet: lifted revocations of %d users: %s", len(in_file), warning)
        after = self.revocations
        ended = 0
        for user, entry in after.items():
            if before.get(user) != entry:
                ended += await self.backend.revoke(user, *entry)
        for user in before.keys() - after.keys():
            await self.backend.unrevoke(user)
        if ended:
            log.warning("fleet revocations: %d allocations of revoked users ended", ended)
        return ended

    async def put_revocations(self, request: web.Request) -> web.Response:
        """PUT (internal, supervisor to worker): the API-made revocations, all of them."""
        try:
            body = await request.json()
            entries = {
                str(e["user"]): (float(e["until"]), str(e.get("reason", "")))
                for e in body["revocations"]
            }
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return _error(400, 'the body must be {"revocations": [{"user", "until"}]}')
        ended = self.replace_api_revocations(entries)
        return web.json_response({"revocations": len(entries), "ended": ended})

    def replace_api_revocations(self, entries: Revocations) -> int:
        """Set the API-made revocations (a worker, from its supervisor) and apply."""
        self.from_api = dict(entries)
        return self.on_change(self.revocations) if self.on_change is not None else 0

    async def summary(self, request: web.Request) -> web.Response:
        if request.query.get("raw") and isinstance(self.backend, LocalBackend):
            return web.json_response({"raw": await self.backend.summary()})
        if isinstance(self.backend, LocalBackend):
            return web.json_response(summarize([await self.backend.summary()]))
        return web.json_response(await self.backend.summary())


def _merge(base: Revocations, more: Revocations, now: float) -> Revocations:
    """`base` with the live entries of `more`; the later `until` wins."""
    for user, entry in more.items():
        if entry[0] > now and entry[0] >= base.get(user, (0.0, ""))[0]:
            base[user] = entry
    return base


ACTIONS = {
    ("GET", "list_allocations"): "list",
    ("GET", "get_allocation"): "get",
    ("DELETE", "delete_allocation"): "end",
    ("GET", "list_revocations"): "revocations",
    ("POST", "add_revocation"): "revoke",
    ("DELETE", "delete_revocation"): "unrevoke",
    ("GET", "summary"): "summary",
    ("PUT", "put_revocations"): "sync_revocations",
}
