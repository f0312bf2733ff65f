"""Builds a running server from Settings: core, listeners, logs; handles signals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import signal
import sys
import time

from turnserver.core.auth import Authenticator, Credentials, NonceIssuer
from turnserver.core.config import CoreConfig, RelayAddress
from turnserver.core.policy import DefaultPeerPolicy
from turnserver.io.loop import loop_factory
from turnserver.io.runtime import ServerRuntime
from turnserver.ops.config import Settings, relay_layout
from turnserver.ops.credentials import mint
from turnserver.ops.eventlog import log, log_event, setup_logging


def core_config(settings: Settings) -> CoreConfig:
    """The core's view of the settings."""
    return CoreConfig(
        relay_addresses=tuple(RelayAddress(b, a, f) for b, a, f in relay_layout(settings)),
        min_port=settings.min_port,
        max_port=settings.max_port,
        software=settings.software,
        default_lifetime=settings.default_lifetime,
        max_lifetime=settings.max_lifetime,
        max_allocations=settings.max_allocations,
        max_allocations_per_user=settings.max_allocations_per_user,
        max_permissions_per_allocation=settings.max_permissions_per_allocation,
        max_channels_per_allocation=settings.max_channels_per_allocation,
        strict_expiry=settings.strict_expiry,
        reserved_peers=frozenset((spec.host, spec.port) for spec in settings.listen),
    )


def credentials(settings: Settings) -> Credentials:
    """Static users and shared secrets of the settings."""
    return Credentials.build(
        settings.realm,
        passwords={u.name: u.password for u in settings.users if u.password is not None},
        keys={u.name: u.key for u in settings.users if u.key is not None},
        secrets=settings.secrets,
    )


def nonce_key(settings: Settings) -> bytes:
    """A configured nonce secret lets several servers accept each other's nonces."""
    if settings.nonce_secret:
        return hashlib.sha256(b"turnserver-nonce:" + settings.nonce_secret.encode()).digest()
    return secrets.token_bytes(32)


def build_runtime(settings: Settings, loop: asyncio.AbstractEventLoop) -> ServerRuntime:
    """A ServerRuntime wired to logging; listeners not yet bound."""
    policy = DefaultPeerPolicy(
        allow=settings.allow_peers,
        deny=settings.deny_peers,
        allow_loopback=settings.allow_loopback_peers,
    )
    auth = Authenticator(
        credentials(settings), NonceIssuer(nonce_key(settings), settings.nonce_lifetime)
    )
    runtime = ServerRuntime(core_config(settings), auth, policy, list(settings.listen), loop)
    runtime.event_sinks.append(log_event)
    return runtime


def credential_banner(settings: Settings, runtime: ServerRuntime, user: str) -> str:
    """A ready-to-use credential and iceServers JSON for a developer."""
    listen = runtime.bound_addresses()
    urls: list[str] = []
    for spec in listen:
        host = spec.host
        if host in ("0.0.0.0", "::"):
            host = relay_layout(settings)[0][1]
        hostport = f"[{host}]:{spec.port}" if ":" in host else f"{host}:{spec.port}"
        urls.append(f"turn:{hostport}?transport=udp")
    lines = []
    if settings.secrets:
        cred = mint(settings.secrets[0], user, 86400, time.time())
        username, password = cred.username, cred.password
        note = "valid for 24 h, minted from the shared secret"
    else:
        first = settings.users[0]
        username, password = first.name, first.password or "<precomputed key>"
        note = "static user"
    ice = {
        "iceServers": [{"urls": urls, "username": username, "credential": password}],
        "iceTransportPolicy": "relay",
    }
    lines.append(f"TURN server ready on {', '.join(str(s) for s in listen)}")
    lines.append(f"  realm:    {settings.realm}")
    lines.append(f"  username: {username}")
    lines.append(f"  password: {password}   ({note})")
    lines.append("  RTCPeerConnection config:")
    lines.append("  " + json.dumps(ice))
    return "\n".join(lines)


async def _serve(settings: Settings, show_credential: str | None) -> int:
    loop = asyncio.get_running_loop()
    runtime = build_runtime(settings, loop)
    try:
        runtime.start()
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    log.info(
        "listening on %s; relaying on %s ports %d-%d",
        ", ".join(str(s) for s in runtime.bound_addresses()),
        ", ".join(f"{b} (advertised {a})" for b, a, _ in relay_layout(settings)),
        settings.min_port,
        settings.max_port,
    )
    if show_credential:
        print(credential_banner(settings, runtime, show_credential), file=sys.stdout, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: %d allocations", len(runtime.core.allocations))
    runtime.stop()
    return 0


def serve(settings: Settings, show_credential: str | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit code."""
    setup_logging(settings.log_level, settings.log_format)
    name, factory = loop_factory(settings.loop)
    logging.getLogger("turnserver").debug("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(settings, show_credential))
