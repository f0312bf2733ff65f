"""Configuration: a YAML file and command-line flags -> one frozen Settings.

Flags override the file. Every problem is a ConfigError that names the key and,
for the file, the line, e.g. `turnserver.yaml:12: relay.min_port: expected an integer`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field, fields, replace
from typing import Any

from turnserver import SOFTWARE
from turnserver.io.runtime import ListenAddress
from turnserver.ops.config.schema import SCHEMA, load_yaml_file, parse_yaml_text
from turnserver.ops.config.secret_files import external_secrets
from turnserver.ops.config.tenants import TenantSettings, validate_tenants
from turnserver.ops.config.values import (
    ConfigError,
    StaticUser,
    parse_admin_token,
)


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with."""

    realm: str = "turnserver"
    secrets: tuple[str, ...] = ()
    users: tuple[StaticUser, ...] = ()
    listen: tuple[ListenAddress, ...] = (ListenAddress("udp", "0.0.0.0", 3478),)
    relay_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    min_port: int = 49152
    max_port: int = 65535
    allow_loopback_peers: bool = False
    allow_peers: tuple[str, ...] = ()
    deny_peers: tuple[str, ...] = ()
    default_lifetime: int = 600
    max_lifetime: int = 3600
    max_allocations: int = 0  # 0: bounded only by the file descriptor budget
    max_allocations_per_user: int = 0
    max_allocations_per_client_ip: int = 0
    # Per allocation; sized for WebRTC (docs/secure.md "Limits"). 0 means unlimited.
    max_permissions_per_allocation: int = 128
    max_channels_per_allocation: int = 128
    max_peer_connections_per_allocation: int = 32
    max_pending_connects_per_allocation: int = 8
    strict_expiry: bool = False
    nonce_secret: str | None = None
    nonce_secret_file: str | None = None
    rest_username_format: str = "auto"  # core/auth.py parse_rest_username
    nonce_lifetime: int = 600
    software: str | None = SOFTWARE
    secrets_file: str | None = None
    secrets_env: str | None = None
    api_listen: tuple[str, int] | None = None
    accounts: tuple[tuple[str, str], ...] = ()
    accounts_file: str | None = None
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    # HTTPS for the API listener; None: when a certificate is configured and the API
    # does not listen on loopback. Its own certificate, or the TURN one (tls.cert).
    api_tls: bool | None = None
    api_tls_cert_file: str | None = None
    api_tls_key_file: str | None = None
    api_default_ttl: int = 86400
    api_max_ttl: int = 86400
    api_rate: float = 10.0
    api_burst: int = 20
    public_host: str | None = None
    # The admin API (off unless admin.listen): tokens "NAME:TOKEN" or "TOKEN"
    admin_listen: tuple[str, int] | None = None
    admin_tokens: tuple[str, ...] = ()
    admin_tokens_file: str | None = None
    admin_tls: bool | None = None
    revocations_file: str | None = None
    # Several servers as one service on Redis (ops/fleet/node.py); off without fleet.redis
    fleet_redis: str | None = None
    fleet_redis_password_file: str | None = None
    fleet_redis_password: str | None = field(default=None, repr=False)  # from the file
    fleet_node: str | None = None  # default: the host name
    fleet_region: str = ""
    fleet_zone: str = ""
    fleet_prefix: str = "turnserver:"
    fleet_heartbeat: float = 1.0
    fleet_required: bool = False
    fleet_max_servers: int = 3
    fleet_max_allocations_per_user: int = 0  # across the fleet (ops/fleet/quota.py); 0: off
    fleet_admin_url: str = ""  # how other nodes reach our admin API (default: admin.listen)
    fleet_region_header: str = ""
    fleet_regions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # set by the supervisor for its workers' internal admin listeners, not a config key
    internal_admin_token: str | None = None
    # The /preflight page and its anonymous 5-minute credential; None: on only when the
    # API listens on loopback (anyone who reaches the page gets a working credential)
    preflight_page: bool | None = None
    uris: tuple[str, ...] = ()
    bandwidth_kbps: int = 0
    challenge_rate: float = 1000.0
    challenge_burst: int = 2000
    drain_timeout: float = 60.0
    alternate_server: tuple[str, int] | None = None
    other_address: tuple[str, int] | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    reuse_port: bool = False  # set for worker processes, not a config key
    full_port_range: tuple[int, int] | None = None  # a worker's: the whole relay range
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9641)
    probe_interval: float = 30.0
    probe_timeout: float = 5.0
    cert_file: str | None = None
    key_file: str | None = None
    idle_timeout: float = 30.0
    handshake_timeout: float = 10.0
    frame_timeout: float = 10.0
    first_request_timeout: float = 15.0
    write_timeout: float = 30.0
    max_stream_connections: int = 0  # 0: half the file descriptor budget
    max_stream_connections_per_ip: int = 256
    tls_handshake_rate: float = 50.0  # a second, per client address, past a burst
    tls_handshake_burst: int = 200
    proxy_trusted: tuple[str, ...] = ()  # CIDRs of the proxies PROXY listeners believe
    proxy_header_timeout: float = 5.0
    http_max_connections: int = 0  # all HTTP listeners of a process; 0: ops/http/serve.py derives
    http_max_connections_per_ip: int = 32
    http_idle_timeout: float = 15.0
    log_level: str = "info"
    log_format: str = "text"
    loop: str = "auto"
    offload: str = "auto"  # the kernel fast path: off, ebpf, auto (docs/scale.md)
    dev: bool = False  # developer mode: impairment of relayed media, /dev/v1/*
    impairments: tuple[str, ...] = ()  # "udp=block", "tls=loss:5,delay:80"
    impair_seed: int = 1
    # Tenants (ops/config/tenants.py); none: one implicit tenant, "default"
    tenants: tuple[TenantSettings, ...] = ()
    # Usage records (ops/usage/): start, interim, stop of every allocation
    usage_state_dir: str | None = None  # the spool, crash ledgers and monthly counts
    usage_interim: float = 60.0
    usage_file: str | None = None  # JSON lines, reopened on SIGHUP
    usage_webhook_url: str = ""
    usage_webhook_token_file: str | None = None
    usage_webhook_token: str | None = field(default=None, repr=False)  # from the file
    usage_webhook_batch: int = 200
    usage_webhook_timeout: float = 5.0
    usage_webhook_retry_max: float = 30.0  # the longest wait between retries (backoff)
    usage_spool_max_bytes: int = 256 * 2**20
    usage_spool_full: str = "drop"  # drop new records, or refuse new allocations
    # The authorization hook (ops/auth/hook.py): asked about users we do not know
    auth_hook_url: str = ""
    auth_hook_token_file: str | None = None
    auth_hook_token: str | None = field(default=None, repr=False)  # from the file
    auth_hook_timeout: float = 2.0
    auth_hook_concurrency: int = 16
    auth_hook_rate: float = 20.0  # questions a second, for the whole server
    auth_hook_burst: int = 40
    auth_hook_cache_ttl: float = 300.0
    auth_hook_negative_ttl: float = 30.0
    auth_hook_failures: int = 5  # failures in a row that open the circuit
    auth_hook_open_time: float = 10.0  # how long the circuit stays open
    auth_hook_fail_open: bool = False  # stale answers while the hook fails
    source: str = field(default="defaults", compare=False)


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML file into Settings field values; ConfigError names key and line."""
    return load_yaml_file(path, SCHEMA)


def read_settings(path: str | None, overrides: dict[str, Any]) -> Settings:
    """The settings of the file at `path` (none: defaults) under the command line's
    overrides: what `serve` reads at start and again on SIGHUP."""
    values = load_file(path) if path else {}
    return build_settings(values, overrides, path or "flags")


def parse_yaml(text: str, name: str = "<config>") -> dict[str, Any]:
    """Parse YAML text into Settings field values."""
    return parse_yaml_text(text, name, SCHEMA)


def build_settings(file_values: dict[str, Any], overrides: dict[str, Any], source: str) -> Settings:
    """Defaults, then the file, then flags; then cross-field checks."""
    names = {f.name for f in fields(Settings)}
    merged = {k: v for k, v in {**file_values, **overrides}.items() if k in names}
    if merged.get("dev") and "workers" not in merged:
        merged["workers"] = 1  # developer mode is one process
    settings = replace(Settings(), **merged, source=source)
    settings = replace(settings, **external_secrets(settings))
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Checks that span several keys."""
    if s.impairments and not s.dev:
        raise ConfigError(
            "dev.impair: impairment is for development only; it needs --dev (dev.enabled: true)"
        )
    if s.dev and s.workers > 1:
        raise ConfigError("dev.enabled: developer mode runs one worker (workers: 1)")
    if s.min_port > s.max_port:
        raise ConfigError(f"relay.min_port: {s.min_port} is above relay.max_port {s.max_port}")
    if s.default_lifetime > s.max_lifetime:
        raise ConfigError("allocations.default_lifetime: above allocations.max_lifetime")
    if not s.secrets and not s.users and not s.tenants and not s.auth_hook_url:
        raise ConfigError(
            "auth: no credentials configured; give --secret or --user "
            "(auth.secrets or auth.users in the file)"
        )
    validate_tenants(s.tenants, s.realm, s.users, s.accounts, s.api_keys)
    validate_usage(s)
    for fam in (4, 6):
        if len([ip for ip in s.relay_ips if ipaddress.ip_address(ip).version == fam]) > 1:
            raise ConfigError(f"relay.ip: at most one IPv{fam} relay address")
        if len([ip for ip in s.external_ips if ipaddress.ip_address(ip).version == fam]) > 1:
            raise ConfigError(f"relay.external_ip: at most one IPv{fam} external address")
    if any(spec.scheme == "tls" for spec in s.listen) and not (s.cert_file and s.key_file):
        raise ConfigError(
            "tls.cert: a tls:// listener needs a certificate and key (--cert FILE --key FILE)"
        )
    proxied = [str(spec) for spec in s.listen if spec.proxy]
    if proxied and not s.proxy_trusted:
        raise ConfigError(
            f"stream.proxy_trusted: {proxied[0]} takes PROXY headers, but no proxy is "
            "trusted; give the proxies' CIDRs (--proxy-trusted CIDR)"
        )
    if s.other_address and not any(
        spec.scheme == "udp" and (spec.host, spec.port) == s.other_address for spec in s.listen
    ):
        raise ConfigError("stun.other_address: must be one of the udp:// listeners")
    primary = rfc5780_primary(s)
    if s.other_address and primary is not None and not (primary.port and s.other_address[1]):
        raise ConfigError("stun.other_address: RFC 5780 needs fixed ports (not 0)")
    if s.api_default_ttl > s.api_max_ttl:
        raise ConfigError("api.default_ttl: above api.max_ttl")
    if s.api_listen and not (s.secrets or s.api_keys or s.accounts or s.tenants):
        raise ConfigError("api.listen: the API needs auth.secrets to mint with")
    if bool(s.cert_file) != bool(s.key_file):
        raise ConfigError("tls.key: give both a certificate and its key")
    if bool(s.api_tls_cert_file) != bool(s.api_tls_key_file):
        raise ConfigError("api.key: give both a certificate and its key")
    api_certificate(s)
    if s.admin_listen:
        if not s.admin_tokens:
            raise ConfigError(
                "admin.listen: the admin API needs a token (--admin-token or admin.tokens_file)"
            )
        for text in s.admin_tokens:
            parse_admin_token(text, "admin.tokens")
        if s.admin_listen in (s.api_listen, s.metrics_listen):
            raise ConfigError("admin.listen: must differ from api.listen and metrics.listen")
    admin_certificate(s)
    if not relay_layout(s):
        raise ConfigError(
            "relay.ip: no relay address; give --relay-ip (and --external-ip "
            "behind NAT) when listening on a wildcard address"
        )


def validate_usage(s: Settings) -> None:
    """Usage records and monthly quotas keep state on disk: they need usage.state_dir."""
    needs = [
        key
        for key, on in (
            ("usage.file", bool(s.usage_file)),
            ("usage.webhook.url", bool(s.usage_webhook_url)),
            (
                "tenants.*.quotas.monthly_bytes",
                any(t.monthly_bytes for t in s.tenants),
            ),
        )
        if on
    ]
    if needs and not s.usage_state_dir:
        raise ConfigError(
            f"usage.state_dir: {needs[0]} keeps state on disk (the record spool, crash "
            "ledgers, monthly counts); give a directory the server may write"
        )
    if s.usage_webhook_token_file and not s.usage_webhook_url:
        raise ConfigError("usage.webhook.token_file: no usage.webhook.url to send it to")


def _https_certificate(
    key_name: str,
    listen: tuple[str, int] | None,
    tls: bool | None,
    cert: str | None,
    key: str | None,
) -> tuple[str, str] | None:
    """HTTPS when asked for, or by default when a certificate is configured and the
    listener is not loopback: (cert, key), or None for plain HTTP."""
    if tls is False or listen is None:
        return None
    if tls is None and ipaddress.ip_address(listen[0]).is_loopback:
        return None
    if not (cert and key):
        if tls:
            raise ConfigError(f"{key_name}: HTTPS needs a certificate and key (tls.cert/tls.key)")
        return None
    return cert, key


def api_certificate(s: Settings) -> tuple[str, str] | None:
    """(cert, key) the credentials API serves HTTPS with, or None for plain HTTP."""
    cert, key = s.api_tls_cert_file or s.cert_file, s.api_tls_key_file or s.key_file
    return _https_certificate("api.tls", s.api_listen, s.api_tls, cert, key)


def admin_certificate(s: Settings) -> tuple[str, str] | None:
    """(cert, key) the admin API serves HTTPS with, or None for plain HTTP."""
    return _https_certificate("admin.tls", s.admin_listen, s.admin_tls, s.cert_file, s.key_file)


def fleet_admin_url(s: Settings) -> str:
    """Where the other nodes of a fleet reach this node's admin API: fleet.admin_url, or
    admin.listen when it names an address (not a wildcard); "" when neither does."""
    if s.fleet_admin_url:
        return s.fleet_admin_url.rstrip("/")
    if s.admin_listen is None:
        return ""
    host, port = s.admin_listen
    if ipaddress.ip_address(host).is_unspecified:
        return ""
    scheme = "https" if admin_certificate(s) else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def preflight_page_enabled(s: Settings) -> bool:
    """api.preflight_page, or by default: on for a loopback API listener only."""
    if s.preflight_page is not None:
        return s.preflight_page
    return s.api_listen is not None and ipaddress.ip_address(s.api_listen[0]).is_loopback


def rfc5780_primary(s: Settings) -> ListenAddress | None:
    """The UDP listener CHANGE-REQUEST answers pair with stun.other_address (RFC 5780)."""
    if s.other_address is None:
        return None
    for spec in s.listen:
        if spec.scheme == "udp" and (spec.host, spec.port) != s.other_address:
            return spec
    return None


def rfc5780_listeners(s: Settings) -> tuple[ListenAddress, ...]:
    """The UDP listeners RFC 5780 needs besides the configured ones: the primary IP with
    the other port, and the other IP with the primary port (answers to CHANGE-REQUEST
    come from them, and mapping tests are sent to them)."""
    primary = rfc5780_primary(s)
    if primary is None or s.other_address is None:
        return ()
    other_ip, other_port = s.other_address
    have = {(spec.host, spec.port) for spec in s.listen if spec.scheme == "udp"}
    extra: list[ListenAddress] = []
    for host, port in ((primary.host, other_port), (other_ip, primary.port)):
        if (host, port) not in have:
            have.add((host, port))
            extra.append(ListenAddress("udp", host, port))
    return tuple(extra)


def all_listeners(s: Settings) -> list[ListenAddress]:
    """The configured listeners, then the ones RFC 5780 adds."""
    return [*s.listen, *rfc5780_listeners(s)]


def relay_layout(s: Settings) -> list[tuple[str, str, int]]:
    """(bind ip, advertised ip, family) per address family the server relays on."""
    out: list[tuple[str, str, int]] = []
    externals = {ipaddress.ip_address(ip).version: ip for ip in s.external_ips}
    binds = {ipaddress.ip_address(ip).version: ip for ip in s.relay_ips}
    if not binds:
        for spec in s.listen:
            ip = ipaddress.ip_address(spec.host)
            if ip.version not in binds and (not ip.is_unspecified or ip.version in externals):
                binds[ip.version] = spec.host
    for fam, bind in sorted(binds.items()):
        advertised = externals.get(fam, bind)
        if ipaddress.ip_address(advertised).is_unspecified:
            continue
        out.append((bind, advertised, fam))
    return out


def check_host_addresses(s: Settings) -> None:
    """Relay addresses must be addresses of this host (or wildcards): a relay IP that
    cannot be bound would make every Allocate fail with 508, so refuse it at start."""
    for bind, _, family in relay_layout(s):
        if ipaddress.ip_address(bind).is_unspecified:
            continue
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((bind, 0))
        except OSError as exc:
            key = "relay.ip" if bind in s.relay_ips else "listen"
            raise ConfigError(
                f"{key}: {bind} is not an address of this host ({exc.strerror}); "
                "give the host's own address, and --external-ip for the public one behind NAT"
            ) from None
        finally:
            sock.close()


def check_certificate(cert_file: str, key_file: str) -> None:
    """Load the TLS certificate and key; a ConfigError names the file and the problem."""
    for key, path in (("tls.cert", cert_file), ("tls.key", key_file)):
        try:
            with open(path, "rb") as fh:
                head = fh.read(65536)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
        if b"-----BEGIN " not in head:
            raise ConfigError(f"{key}: {path} is not a PEM file (no -----BEGIN line)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".upper()
        if "KEY_VALUES_MISMATCH" in text:
            problem = f"the key in {key_file} does not belong to the certificate in {cert_file}"
        elif "PEM" in text or "NO_START_LINE" in text or "BAD_BASE64" in text:
            problem = f"{cert_file} or {key_file} is not a valid PEM certificate/key ({exc.reason})"
        else:
            problem = f"{cert_file} / {key_file}: {exc.reason or exc}"
        raise ConfigError(f"tls.cert: {problem}") from None
