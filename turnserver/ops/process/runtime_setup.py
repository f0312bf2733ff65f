"""From Settings to a running core: the core's view of the settings, credentials,
nonce key, peer policy and stream limits, the ServerRuntime wired to logging, and what
SIGHUP changes in a live one (allocations stay)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
import ssl
from dataclasses import replace

from turnserver.core.auth import Authenticator, Credentials, NonceIssuer
from turnserver.core.auth_hook import HookBook
from turnserver.core.config import CoreConfig, RelayAddress
from turnserver.core.policy import DefaultPeerPolicy, parse_networks
from turnserver.core.tenants import TenantRules
from turnserver.io.descriptors import DescriptorBudget
from turnserver.io.runtime import ServerRuntime
from turnserver.io.stream_admission import StreamOptions
from turnserver.io.tls import ReloadableTLS
from turnserver.ops.config.settings import (
    Settings,
    all_listeners,
    check_certificate,
    relay_layout,
    rfc5780_primary,
)
from turnserver.ops.config.values import ConfigError
from turnserver.ops.telemetry.eventlog import log, log_event


def core_config(settings: Settings) -> CoreConfig:
    """The core's view of the settings."""
    primary = rfc5780_primary(settings)
    return CoreConfig(
        relay_addresses=tuple(RelayAddress(b, a, f) for b, a, f in relay_layout(settings)),
        min_port=settings.min_port,
        max_port=settings.max_port,
        software=settings.software,
        default_lifetime=settings.default_lifetime,
        max_lifetime=settings.max_lifetime,
        max_allocations=settings.max_allocations,
        max_allocations_per_user=settings.max_allocations_per_user,
        max_allocations_per_client_ip=settings.max_allocations_per_client_ip,
        max_permissions_per_allocation=settings.max_permissions_per_allocation,
        max_channels_per_allocation=settings.max_channels_per_allocation,
        max_peer_connections_per_allocation=settings.max_peer_connections_per_allocation,
        max_pending_connects_per_allocation=settings.max_pending_connects_per_allocation,
        strict_expiry=settings.strict_expiry,
        own_ports=own_ports(settings),
        relay_port_range=settings.full_port_range or (settings.min_port, settings.max_port),
        bandwidth=settings.bandwidth_kbps * 1000 // 8,
        challenge_rate=settings.challenge_rate,
        challenge_burst=settings.challenge_burst,
        alternate_server=settings.alternate_server,
        other_address=settings.other_address,
        rfc5780_primary=(primary.host, primary.port) if primary else None,
        rfc5780_addresses=frozenset(
            (spec.host, spec.port) for spec in all_listeners(settings) if spec.scheme == "udp"
        )
        if primary
        else frozenset(),
    )


def own_ports(settings: Settings) -> frozenset[int]:
    """Every port this server listens on (TURN, metrics, admin, API): never a peer's
    port on an address of this host (core/own_addresses.py). Ephemeral ones (0) are
    added once bound."""
    ports = {spec.port for spec in all_listeners(settings)}
    for listen in (settings.metrics_listen, settings.api_listen, settings.admin_listen):
        if listen is not None:
            ports.add(listen[1])
    ports.discard(0)
    return frozenset(ports)


def credentials(settings: Settings) -> Credentials:
    """Static users and shared secrets of the settings."""
    return Credentials.build(
        settings.realm,
        passwords={u.name: u.password for u in settings.users if u.password is not None},
        keys={u.name: u.key for u in settings.users if u.key is not None},
        secrets=settings.secrets,
        rest_order=settings.rest_username_format,
    )


def tenant_credentials(settings: Settings) -> tuple[Credentials, ...]:
    """Each tenant's credentials under its own realm, then under the server's (the
    realm every 401 names; core/auth.py Authenticator.configure). A precomputed MD5
    key holds one realm: the tenant's."""
    out: list[Credentials] = []
    for realm_of in (lambda t: t.realm, lambda t: settings.realm):
        for t in settings.tenants:
            realm = realm_of(t)
            out.append(
                Credentials.build(
                    realm,
                    passwords={u.name: u.password for u in t.users if u.password is not None},
                    keys={u.name: u.key for u in t.users if u.key is not None}
                    if realm == t.realm
                    else {},
                    secrets=t.secrets,
                    rest_order=settings.rest_username_format,
                    tenant=t.name,
                )
            )
    return tuple(out)


def tenant_rules(settings: Settings) -> dict[str, TenantRules]:
    """The core's view of each tenant's quotas and peer-policy additions."""
    rules: dict[str, TenantRules] = {}
    for t in settings.tenants:
        policy = None
        if t.allow_peers or t.deny_peers:
            policy = DefaultPeerPolicy(
                allow=(*settings.allow_peers, *t.allow_peers),
                deny=(*settings.deny_peers, *t.deny_peers),
                allow_loopback=settings.allow_loopback_peers,
            )
        rules[t.name] = TenantRules(
            t.name,
            max_allocations=t.max_allocations,
            bandwidth=t.bandwidth_kbps * 1000 // 8,
            peer_policy=policy,
            monthly_refuse=t.monthly_action == "refuse",
        )
    return rules


def nonce_key(settings: Settings) -> bytes:
    """A configured nonce secret lets several servers accept each other's nonces."""
    if settings.nonce_secret:
        return hashlib.sha256(b"turnserver-nonce:" + settings.nonce_secret.encode()).digest()
    return secrets.token_bytes(32)


def peer_policy(settings: Settings) -> DefaultPeerPolicy:
    """The peer policy of the settings."""
    return DefaultPeerPolicy(
        allow=settings.allow_peers,
        deny=settings.deny_peers,
        allow_loopback=settings.allow_loopback_peers,
    )


def stream_options(settings: Settings) -> StreamOptions:
    """Limits and deadlines of TCP/TLS client connections."""
    return StreamOptions(
        idle_timeout=settings.idle_timeout,
        handshake_timeout=settings.handshake_timeout,
        frame_timeout=settings.frame_timeout,
        first_request_timeout=settings.first_request_timeout,
        write_timeout=settings.write_timeout,
        max_connections=settings.max_stream_connections,
        max_connections_per_ip=settings.max_stream_connections_per_ip,
        tls_handshake_rate=settings.tls_handshake_rate,
        tls_handshake_burst=settings.tls_handshake_burst,
        proxy_trusted=parse_networks(settings.proxy_trusted),
        proxy_header_timeout=settings.proxy_header_timeout,
    )


def build_runtime(
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    inherited: dict[int, socket.socket] | None = None,
) -> ServerRuntime:
    """A ServerRuntime wired to logging; listeners not yet bound (raises on a bad cert)."""
    auth = Authenticator(
        credentials(settings),
        NonceIssuer(nonce_key(settings), settings.nonce_lifetime),
        tenant_credentials(settings),
    )
    if settings.auth_hook_url:
        auth.hook = HookBook()
    tls = None
    if settings.cert_file and settings.key_file:
        tls = ReloadableTLS(settings.cert_file, settings.key_file)
    runtime = ServerRuntime(
        core_config(settings),
        auth,
        peer_policy(settings),
        all_listeners(settings),
        loop,
        tls=tls,
        stream_options=stream_options(settings),
        reuse_port=settings.reuse_port,
        descriptors=DescriptorBudget.from_rlimit(),
        inherited=inherited,
    )

    runtime.core.set_tenants(tenant_rules(settings))
    runtime.event_sinks.append(log_event)
    return runtime


def apply_reload(runtime: ServerRuntime, new: Settings) -> None:
    """SIGHUP: new credentials, peer policy, limits and certificate; allocations stay."""
    runtime.core.auth.configure(credentials(new), tenant_credentials(new))
    if new.auth_hook_url and runtime.core.auth.hook is None:
        runtime.core.auth.hook = HookBook()
    elif not new.auth_hook_url:
        runtime.core.auth.hook = None
    runtime.core.peer_policy = peer_policy(new)
    runtime.core.set_tenants(tenant_rules(new))
    runtime.stream_options = stream_options(new)
    fresh = core_config(new)
    old = runtime.core.config
    # what the listeners and relay sockets were made with stays as it is; the rest reloads
    runtime.core.config = replace(
        fresh,
        relay_addresses=old.relay_addresses,
        min_port=old.min_port,
        max_port=old.max_port,
        other_address=old.other_address,
        rfc5780_primary=old.rfc5780_primary,
        rfc5780_addresses=old.rfc5780_addresses,
        own_ports=old.own_ports,
        relay_port_range=old.relay_port_range,
        tcp_relay=old.tcp_relay,
    )
    # a changed bandwidth limit applies to live allocations at once (and a flow that is
    # now limited leaves the kernel fast path)
    changed = runtime.core.apply_bandwidth(fresh.bandwidth, runtime.now())
    if runtime.offload is not None:
        for alloc in changed:
            runtime.offload.sync(alloc)
    # Flows to peers the new policy denies end now, not when their permission expires
    runtime.core.revoke_denied_peers()
    runtime.after_core_call()

    if runtime.tls is not None and new.cert_file and new.key_file:
        try:
            check_certificate(new.cert_file, new.key_file)
            runtime.tls.reload(new.cert_file, new.key_file)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.error("certificate reload failed, keeping the old one: %s", exc)
