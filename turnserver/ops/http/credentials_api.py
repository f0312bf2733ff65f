"""The credentials HTTP API (aiohttp): Twilio-compatible Tokens, the TURN REST API draft,
and ready-made RTCConfiguration objects.

Secrets are compared in constant time and never logged. Every response is JSON, every
request is counted (`ApiStats`, folded into Prometheus on scrape), and each client
address is rate limited.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import ssl
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from turnserver.core.ratelimit import TokenBuckets
from turnserver.ops.http.credentials import (
    ServerUris,
    ice_servers_config,
    mint,
    rest_api_credential,
    twilio_token,
)
from turnserver.ops.http.serve import serve_app
from turnserver.ops.telemetry.eventlog import safe_text

log = logging.getLogger("turnserver.api")

MAX_BODY = 16 * 1024
_TTL = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() takes '²' and '٣'


def parse_ttl_param(raw: str, max_ttl: int) -> int | None:
    """A ttl query/form value in 1..max_ttl, or None when it is not one."""
    if not _TTL.fullmatch(raw):
        return None
    ttl = int(raw)
    return ttl if 1 <= ttl <= max_ttl else None


def username_problem(username: str) -> str | None:
    """Why a requested username is refused: too long, ':' (the REST separator), or
    control, format (bidi overrides) and line-separator characters that would let it
    forge or reorder log lines."""
    if len(username) > 128:
        return "username must be at most 128 characters"
    if ":" in username:
        return "username must not contain ':'"
    for ch in username:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return f"username must not contain control or formatting characters (U+{ord(ch):04X})"
    return None


TWILIO_DOCS = "https://www.twilio.com/docs/errors/"


@dataclass
class ApiConfig:
    """What the API needs; replaced as a whole on SIGHUP."""

    secrets: tuple[str, ...]
    accounts: dict[str, tuple[str, ...]]  # account SID -> auth tokens (rotation)
    api_keys: tuple[str, ...]
    uris: ServerUris
    default_ttl: int = 86400
    max_ttl: int = 86400
    rate_per_second: float = 10.0
    rate_burst: int = 20
    preflight_page: bool = True
    # a tenant's account SIDs and API keys mint with the tenant's secrets (tenants:)
    account_secrets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    key_secrets: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class ApiStats:
    """Plain counters: (endpoint, status) -> requests."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    rate_limited: int = 0

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _static(name: str) -> str:
    return resources.files("turnserver.client").joinpath("static", name).read_text("utf-8")


def twilio_error(status: int, code: int, message: str) -> web.Response:
    """Twilio's error body: code, message, more_info, status."""
    return web.json_response(
        {"code": code, "message": message, "more_info": f"{TWILIO_DOCS}{code}", "status": status},
        status=status,
    )


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Fleet(Protocol):
    """Which servers to hand out when this one is one of several (ops/fleet/node.py)."""

    def uris_for(self, region: str | None) -> ServerUris: ...

    def region_of(self, headers: Any, client_ip: str | None) -> str | None: ...


class CredentialsApi:
    """The aiohttp application and its handlers."""

    def __init__(self, config: ApiConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.stats = ApiStats()
        self.limiter = TokenBuckets(config.rate_per_second, config.rate_burst, max_keys=10_000)
        self.fleet: Fleet | None = None
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        self.app.router.add_post(
            "/2010-04-01/Accounts/{account_sid}/Tokens.json", self.twilio_tokens
        )
        self.app.router.add_get("/api/v1/turn-credentials", self.turn_credentials)
        self.app.router.add_get("/api/v1/ice-servers", self.ice_servers)
        # The browser network test page (plain HTML and JS, no build step)
        self.app.router.add_get("/preflight", self.preflight_page)
        self.app.router.add_get("/preflight.js", self.preflight_script)
        self.app.router.add_get("/preflight/credentials", self.preflight_credentials)

    def uris_for(self, request: web.Request) -> ServerUris:
        """This server's URIs; in a fleet, healthy nodes' (the caller's region first)."""
        if self.fleet is None:
            return self.config.uris
        return self.fleet.uris_for(self.fleet.region_of(request.headers, request.remote))

    def reconfigure(self, config: ApiConfig) -> None:
        """New secrets, accounts, keys or URIs (SIGHUP)."""
        self.config = config
        self.limiter.rate = config.rate_per_second
        self.limiter.burst = config.rate_burst

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "unmatched"
        )
        twilio = request.path.startswith("/2010-04-01/")
        peer = request.remote or "?"
        if not self.limiter.allow(peer, time.monotonic()):
            self.stats.rate_limited += 1
            response: web.StreamResponse = (
                twilio_error(429, 20429, "Too many requests")
                if twilio
                else json_error(429, "too many requests")
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPRequestEntityTooLarge:
                response = (
                    twilio_error(413, 20001, "Request body too large")
                    if twilio
                    else json_error(413, "request body too large")
                )
            except web.HTTPException as exc:
                response = (
                    twilio_error(exc.status, 20404 if exc.status == 404 else 20001, exc.reason)
                    if twilio
                    else json_error(exc.status, exc.reason)
                )
            except Exception:  # a bug: answered and counted like any other request
                log.exception("api %s %s failed", request.method, safe_text(request.path))
                response = (
                    twilio_error(500, 20500, "Internal server error")
                    if twilio
                    else json_error(500, "internal server error")
                )
        self.stats.count(endpoint, response.status)
        log.info(
            "api %s %s -> %d from %s",
            request.method,
            safe_text(request.path),
            response.status,
            peer,
        )
        return response

    # ---- Twilio -----------------------------------------------------------------------

    def _basic_auth(self, request: web.Request) -> str | None:
        """The account SID whose auth token the request carries, or None."""
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        sid, sep, token = decoded.partition(":")
        if not sep:
            return None
        ok = False
        for known_sid, tokens in self.config.accounts.items():
            sid_match = _equal(sid, known_sid)
            for known in tokens:
                ok |= sid_match and _equal(token, known)
        return sid if ok else None

    async def twilio_tokens(self, request: web.Request) -> web.Response:
        """POST /2010-04-01/Accounts/{AccountSid}/Tokens.json (Twilio's Tokens resource)."""
        sid = request.match_info["account_sid"]
        authed = self._basic_auth(request)
        if authed is None:
            response = twilio_error(401, 20003, "Authenticate")
            response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
            return response
        if sid not in self.config.accounts or not _equal(sid, authed):
            return twilio_error(
                404,
                20404,
                f"The requested resource /2010-04-01/Accounts/{sid}/Tokens.json was not found",
            )
        form = await request.post()
        raw_ttl = form.get("Ttl", None)
        ttl = self.config.default_ttl
        if raw_ttl is not None:
            parsed = (
                parse_ttl_param(raw_ttl.strip(), self.config.max_ttl)
                if isinstance(raw_ttl, str)
                else None
            )
            if parsed is None:
                return twilio_error(
                    400, 20001, f"Ttl must be an integer between 1 and {self.config.max_ttl}"
                )
            ttl = parsed
        secrets = self.config.account_secrets.get(sid, self.config.secrets)
        if not secrets:
            return twilio_error(503, 20500, "No shared secret configured")
        now = self.clock()
        cred = mint(secrets[0], sid, ttl, now)
        return web.json_response(twilio_token(cred, self.uris_for(request), sid, now), status=201)

    # ---- TURN REST API draft and RTCConfiguration ---------------------------------------

    def api_key_ok(self, request: web.Request) -> bool:
        return self.api_key_of(request) is not None

    def api_key_of(self, request: web.Request) -> str | None:
        """The configured API key the request carries, or None."""
        given = request.headers.get("X-API-Key") or request.query.get("key", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        found = None
        for key in self.config.api_keys:
            if _equal(given, key):  # (every key compared: no early exit)
                found = key
        return found if given else None

    def _mint_from_query(self, request: web.Request) -> tuple[web.Response | None, Any]:
        api_key = self.api_key_of(request)
        if api_key is None:
            return json_error(401, "missing or wrong API key (X-API-Key header or key=)"), None
        username = request.query.get("username", "")
        problem = username_problem(username)
        if problem is not None:
            return json_error(400, problem), None
        ttl = self.config.default_ttl
        if "ttl" in request.query:
            parsed = parse_ttl_param(request.query["ttl"], self.config.max_ttl)
            if parsed is None:
                return json_error(
                    400, f"ttl must be an integer between 1 and {self.config.max_ttl}"
                ), None
            ttl = parsed
        secrets = self.config.key_secrets.get(api_key, self.config.secrets)
        if not secrets:
            return json_error(503, "no shared secret configured"), None
        return None, mint(secrets[0], username, ttl, self.clock())

    async def preflight_page(self, request: web.Request) -> web.Response:
        if not self.config.preflight_page:
            return json_error(404, "the network test page is turned off (api.preflight_page)")
        return web.Response(text=_static("preflight.html"), content_type="text/html")

    async def preflight_script(self, request: web.Request) -> web.Response:
        if not self.config.preflight_page:
            return json_error(404, "the network test page is turned off (api.preflight_page)")
        return web.Response(text=_static("preflight.js"), content_type="application/javascript")

    async def preflight_credentials(self, request: web.Request) -> web.Response:
        """A 5-minute credential for the test page (rate limited like every endpoint).
        `?bad=1` hands out a wrong password, to show what a credential failure looks like."""
        if not self.config.preflight_page:
            return json_error(404, "the network test page is turned off (api.preflight_page)")
        if not self.config.secrets:
            return json_error(503, "no shared secret configured")
        cred = mint(self.config.secrets[0], "preflight-page", 300, self.clock())
        body = rest_api_credential(cred, self.config.uris)
        if request.query.get("bad"):
            body["password"] = "deliberately-wrong"
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def turn_credentials(self, request: web.Request) -> web.Response:
        """GET /api/v1/turn-credentials?service=turn&username=ID (TURN REST API draft)."""
        service = request.query.get("service", "turn")
        if service != "turn":
            return json_error(400, "service must be 'turn'")
        error, cred = self._mint_from_query(request)
        if error is not None:
            return error
        return web.json_response(rest_api_credential(cred, self.uris_for(request)))

    async def ice_servers(self, request: web.Request) -> web.Response:
        """GET /api/v1/ice-servers?username=ID[&policy=relay]: an RTCConfiguration."""
        policy = request.query.get("policy", "all")
        if policy not in ("all", "relay"):
            return json_error(400, "policy must be 'all' or 'relay'")
        error, cred = self._mint_from_query(request)
        if error is not None:
            return error
        return web.json_response(
            ice_servers_config(cred, self.uris_for(request), policy == "relay")
        )


async def start_api(
    api: CredentialsApi, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Serve the API on host:port (HTTPS with ssl_context); returns the runner and port."""
    return await serve_app(api.app, host, port, ssl_context, name="api")
