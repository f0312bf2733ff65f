"""The `tenants:` section: one TURN service shared by departments or products, each
with its realm, credentials, Tokens-API accounts, quotas and peer-policy additions
(docs/tenants.md). Without the section there is one implicit tenant, `default`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from turnserver.ops.config.secret_files import read_secret_lines
from turnserver.ops.config.values import (
    ConfigError,
    StaticUser,
    check_accounts,
    check_cidr_list,
    check_str,
    check_str_list,
    check_users,
    int_between,
    one_of,
)

DEFAULT_TENANT = "default"  # the implicit tenant: top-level auth, api and peers keys
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
MONTHLY_ACTIONS = ("refuse", "warn")
MAX_TENANTS = 256  # a metrics label value each: bounded
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BYTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class TenantSettings:
    """One tenant of the `tenants:` section."""

    name: str
    realm: str
    secrets: tuple[str, ...] = ()
    users: tuple[StaticUser, ...] = ()
    accounts: tuple[tuple[str, str], ...] = ()  # Tokens-API account SID, auth token
    api_keys: tuple[str, ...] = ()
    max_allocations: int = 0  # concurrent, across workers; 0: no tenant limit
    bandwidth_kbps: int = 0  # per allocation; 0: the server's allocations.bandwidth_kbps
    monthly_bytes: int = 0  # relayed per calendar month (UTC), both ways; 0: unlimited
    monthly_action: str = "refuse"  # at the monthly quota: refuse new allocations, or warn
    allow_peers: tuple[str, ...] = ()  # added to peers.allow for this tenant
    deny_peers: tuple[str, ...] = ()  # added to peers.deny for this tenant


def parse_bytes(v: Any, key: str) -> int:
    """A byte count: an integer, or a number with a unit (500GB, 1.5TiB, 100M)."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    match = _BYTES.fullmatch(v) if isinstance(v, str) else None
    if match is None:
        raise ConfigError(f"{key}: expected a byte count (e.g. 500GB or 1TiB), got {v!r}")
    number, unit, binary = match.groups()
    scale = 1024 ** "kmgt".index(unit.lower()) * 1024 if binary and unit else _UNITS[unit.lower()]
    return int(float(number) * scale)


_TENANT_KEYS = {
    "realm",
    "secrets",
    "secrets_file",
    "users",
    "accounts",
    "api_keys",
    "quotas",
    "peers",
}
_QUOTA_KEYS = {"max_allocations", "bandwidth_kbps", "monthly_bytes", "monthly_action"}
_PEER_KEYS = {"allow", "deny"}


def _mapping(v: Any, key: str, known: set[str]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a mapping")
    for name in v:
        if name not in known:
            raise ConfigError(f"{key}.{name}: unknown key (known keys: {', '.join(sorted(known))})")
    return v


def check_tenant(name: Any, v: Any, key: str) -> TenantSettings:
    """One tenant's mapping; ConfigError names the dotted key (tenants.NAME.KEY)."""
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise ConfigError(
            f"{key}: tenant names are 1-32 of a-z 0-9 _ - (a metrics label), got {name!r}"
        )
    if name == DEFAULT_TENANT:
        raise ConfigError(f"{key}: {DEFAULT_TENANT!r} is the implicit tenant of the top-level keys")
    body = _mapping(v, key, _TENANT_KEYS)
    if "realm" not in body:
        raise ConfigError(f"{key}.realm: every tenant has its own realm")
    secrets = check_str_list(body.get("secrets", []), f"{key}.secrets")
    if "secrets_file" in body:
        path = check_str(body["secrets_file"], f"{key}.secrets_file")
        secrets += tuple(read_secret_lines(path, f"{key}.secrets_file"))
    quotas = _mapping(body.get("quotas"), f"{key}.quotas", _QUOTA_KEYS)
    peers = _mapping(body.get("peers"), f"{key}.peers", _PEER_KEYS)
    q = f"{key}.quotas"
    return TenantSettings(
        name=name,
        realm=check_str(body["realm"], f"{key}.realm"),
        secrets=secrets,
        users=check_users(body.get("users", []), f"{key}.users"),
        accounts=check_accounts(body.get("accounts", []), f"{key}.accounts"),
        api_keys=check_str_list(body.get("api_keys", []), f"{key}.api_keys"),
        max_allocations=int_between(0, 10_000_000)(
            quotas.get("max_allocations", 0), f"{q}.max_allocations"
        ),
        bandwidth_kbps=int_between(0, 10_000_000)(
            quotas.get("bandwidth_kbps", 0), f"{q}.bandwidth_kbps"
        ),
        monthly_bytes=parse_bytes(quotas.get("monthly_bytes", 0), f"{q}.monthly_bytes"),
        monthly_action=one_of(MONTHLY_ACTIONS)(
            quotas.get("monthly_action", "refuse"), f"{q}.monthly_action"
        ),
        allow_peers=check_cidr_list(peers.get("allow", []), f"{key}.peers.allow"),
        deny_peers=check_cidr_list(peers.get("deny", []), f"{key}.peers.deny"),
    )


def check_tenants(v: Any, key: str) -> tuple[TenantSettings, ...]:
    """The `tenants:` mapping: tenant name -> its keys."""
    body = {} if v is None else v
    if not isinstance(body, dict):
        raise ConfigError(f"{key}: expected a mapping of tenant name to its keys")
    if len(body) > MAX_TENANTS:
        raise ConfigError(f"{key}: at most {MAX_TENANTS} tenants")
    return tuple(check_tenant(name, item, f"{key}.{name}") for name, item in body.items())


def validate_tenants(
    tenants: tuple[TenantSettings, ...],
    realm: str,
    users: tuple[StaticUser, ...],
    accounts: tuple[tuple[str, str], ...],
    api_keys: tuple[str, ...],
) -> None:
    """What spans tenants: realms, user names, accounts and API keys each name one
    tenant (a request or an API call is mapped to its tenant by them)."""
    realms = {realm: DEFAULT_TENANT}
    user_names = {u.name: DEFAULT_TENANT for u in users}
    sids = {sid: DEFAULT_TENANT for sid, _ in accounts}
    keys = dict.fromkeys(api_keys, DEFAULT_TENANT)
    for t in tenants:
        where = f"tenants.{t.name}"
        if t.realm in realms:
            raise ConfigError(f"{where}.realm: {t.realm!r} is already {realms[t.realm]}'s realm")
        realms[t.realm] = t.name
        for u in t.users:
            if u.name in user_names:
                raise ConfigError(
                    f"{where}.users: user {u.name!r} is also {user_names[u.name]}'s "
                    "(a user name names one tenant)"
                )
            user_names[u.name] = t.name
        for sid, _ in t.accounts:
            if sid in sids:
                raise ConfigError(f"{where}.accounts: account {sid} is also {sids[sid]}'s")
            sids[sid] = t.name
        for k in t.api_keys:
            if k in keys:  # never echo a key
                raise ConfigError(f"{where}.api_keys: an API key is also {keys[k]}'s")
            keys[k] = t.name
