"""The STUN and TURN URIs (RFC 7064, RFC 7065) clients are given for our listeners."""

from __future__ import annotations

from turnserver.io.runtime import ListenAddress
from turnserver.ops.config.settings import (
    Settings,
    preflight_page_enabled,
    relay_layout,
    rfc5780_listeners,
)
from turnserver.ops.http.credentials import ServerUris
from turnserver.ops.http.credentials_api import ApiConfig


def server_uris(settings: Settings, listen: list[ListenAddress]) -> ServerUris:
    """STUN and TURN URIs (RFC 7064, RFC 7065) for the listeners.

    `api.uris` wins when set; otherwise the host is `api.public_host`, or the
    advertised relay address for wildcard listeners, or the listener's address."""
    if settings.uris:
        return ServerUris(
            tuple(u for u in settings.uris if u.startswith("stun")),
            tuple(u for u in settings.uris if u.startswith("turn")),
        )
    stun: list[str] = []
    turn: list[str] = []
    layout = relay_layout(settings)
    rfc5780 = {(x.host, x.port) for x in rfc5780_listeners(settings)}
    for spec in listen:
        if spec.scheme == "udp" and (spec.host, spec.port) in rfc5780:
            continue  # RFC 5780 test addresses, not for TURN clients
        host = settings.public_host or spec.host
        if host in ("0.0.0.0", "::") and layout:
            host = layout[0][1]
        hostport = f"[{host}]:{spec.port}" if ":" in host else f"{host}:{spec.port}"
        if spec.scheme == "tls":
            turn.append(f"turns:{hostport}?transport=tcp")
        else:
            turn.append(f"turn:{hostport}?transport={spec.scheme}")
            if spec.scheme == "udp":
                stun.append(f"stun:{hostport}")
    return ServerUris(tuple(stun), tuple(turn))


def ice_uris(settings: Settings, listen: list[ListenAddress]) -> list[str]:
    """TURN URIs for the listeners (see server_uris)."""
    return list(server_uris(settings, listen).turn)


def api_config(settings: Settings, listen: list[ListenAddress]) -> ApiConfig:
    """The credentials API's view of the settings."""
    accounts: dict[str, tuple[str, ...]] = {}
    for sid, token in settings.accounts:
        accounts[sid] = (*accounts.get(sid, ()), token)
    account_secrets: dict[str, tuple[str, ...]] = {}
    key_secrets: dict[str, tuple[str, ...]] = {}
    for t in settings.tenants:  # a tenant's accounts and keys mint with its secrets
        for sid, token in t.accounts:
            accounts[sid] = (*accounts.get(sid, ()), token)
            account_secrets[sid] = t.secrets
        for key in t.api_keys:
            key_secrets[key] = t.secrets
    return ApiConfig(
        secrets=settings.secrets,
        accounts=accounts,
        api_keys=(*settings.api_keys, *key_secrets),
        account_secrets=account_secrets,
        key_secrets=key_secrets,
        uris=server_uris(settings, listen),
        default_ttl=settings.api_default_ttl,
        max_ttl=settings.api_max_ttl,
        rate_per_second=settings.api_rate,
        rate_burst=settings.api_burst,
        preflight_page=preflight_page_enabled(settings),
    )
