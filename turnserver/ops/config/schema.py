"""The configuration file: its dotted keys (SCHEMA: key -> the Settings field and the
function that checks its value) and reading YAML through them; every error names the
file, line and key."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import yaml

from turnserver.core.auth import REST_USERNAME_FORMATS
from turnserver.ops.config.tenants import check_tenants, parse_bytes
from turnserver.ops.config.values import (
    Check,
    ConfigError,
    check_accounts,
    check_bool,
    check_cidr_list,
    check_host_port,
    check_host_port_or_off,
    check_http_url,
    check_impairment_list,
    check_ip_list,
    check_label,
    check_listen_list,
    check_node_name,
    check_optional_label,
    check_optional_str,
    check_redis_url,
    check_regions,
    check_str,
    check_str_list,
    check_users,
    float_between,
    int_between,
    not_utf8,
    one_of,
)

Schema = dict[str, tuple[str, Callable[[Any, str], Any]]]


def load_yaml_file(path: str, schema: Schema) -> dict[str, Any]:
    """Read a YAML file into Settings field values; ConfigError names key and line."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {not_utf8(exc)}") from None
    return parse_yaml_text(text, os.path.basename(path), schema)


def parse_yaml_text(text: str, name: str, schema: Schema) -> dict[str, Any]:
    """Parse YAML text into Settings field values."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        values: dict[str, Any] = {}
        if root is None:
            return values
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{name}:{root.start_mark.line + 1}: the top level must be a mapping")
        parts = [key.split(".") for key in schema]
        sections = {".".join(p[:i]) for p in parts for i in range(1, len(p))}
        _walk(loader, root, "", name, values, schema, sections)
        return values
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"{name}:{line}: invalid YAML: {exc.problem}") from None
    finally:
        loader.dispose()


NULL_TAG = "tag:yaml.org,2002:null"


def _walk(
    loader: yaml.SafeLoader,
    node: yaml.MappingNode,
    prefix: str,
    name: str,
    values: dict[str, Any],
    schema: Schema,
    sections: set[str],
) -> None:
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = f"{prefix}{key_node.value}"
        if key in schema:
            attr, check = schema[key]
            raw = loader.construct_object(value_node, deep=True)
            try:
                values[attr] = check(raw, key)
            except ConfigError as exc:
                line = _line_of(value_node, str(exc), key, line)
                raise ConfigError(f"{name}:{line}: {exc}") from None
        elif key in sections:
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag == NULL_TAG:
                continue  # a section whose keys are all commented out: its defaults
            if not isinstance(value_node, yaml.MappingNode):
                raise ConfigError(f"{name}:{line}: {key}: expected a mapping")
            _walk(loader, value_node, key + ".", name, values, schema, sections)
        else:
            known = sorted(k for k in schema if k.startswith(prefix))
            hint = f" (known keys: {', '.join(known)})" if prefix else ""
            raise ConfigError(f"{name}:{line}: unknown key {key!r}{hint}")


def _line_of(node: yaml.Node, message: str, key: str, line: int) -> int:
    """The line of the deepest part of a nested key the error names (its message
    starts with the dotted key, e.g. tenants.acme.quotas.monthly_bytes or
    auth.users[2].key), so an error inside a section points at its own line."""
    path = message.split(":", 1)[0].strip()
    if not path.startswith(key):
        return line
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path[len(key) :]):
        if isinstance(node, yaml.MappingNode):
            found = [v for k, v in node.value if str(k.value) == part]
            if not found:
                break
            line = next(k for k, v in node.value if v is found[0]).start_mark.line + 1
            node = found[0]
        elif isinstance(node, yaml.SequenceNode) and part.startswith("["):
            index = int(part[1:-1])
            if index >= len(node.value):
                break
            node = node.value[index]
            line = node.start_mark.line + 1
        else:
            break
    return line


LOG_LEVELS, LOG_FORMATS = ("debug", "info", "warning", "error"), ("text", "json")
# The configuration file's keys: dotted YAML key -> (Settings field, its check)
HTTP_CAPS = ("max_connections", "max_connections_per_ip")
SCHEMA: dict[str, tuple[str, Check]] = {
    "realm": ("realm", check_str),
    "listen": ("listen", check_listen_list),
    "software": ("software", check_optional_str),
    "loop": ("loop", one_of(("auto", "uvloop", "asyncio"))),
    "auth.secrets": ("secrets", check_str_list),
    "auth.users": ("users", check_users),
    "auth.secrets_file": ("secrets_file", check_optional_str),
    "auth.secrets_env": ("secrets_env", check_optional_str),
    "auth.nonce_secret": ("nonce_secret", check_optional_str),
    "auth.nonce_secret_file": ("nonce_secret_file", check_optional_str),
    "auth.rest_username_format": ("rest_username_format", one_of(REST_USERNAME_FORMATS)),
    "api.listen": ("api_listen", check_host_port),
    "api.accounts": ("accounts", check_accounts),
    "api.accounts_file": ("accounts_file", check_optional_str),
    "api.keys": ("api_keys", check_str_list),
    "api.keys_file": ("api_keys_file", check_optional_str),
    "api.default_ttl": ("api_default_ttl", int_between(1, 7 * 86400)),
    "api.max_ttl": ("api_max_ttl", int_between(1, 30 * 86400)),
    "api.rate_per_second": ("api_rate", float_between(0.01, 100000)),
    "api.rate_burst": ("api_burst", int_between(1, 100000)),
    "api.public_host": ("public_host", check_optional_str),
    "api.uris": ("uris", check_str_list),
    "api.preflight_page": ("preflight_page", check_bool),
    "api.tls": ("api_tls", check_bool),
    "admin.listen": ("admin_listen", check_host_port),
    "admin.tokens": ("admin_tokens", check_str_list),
    "admin.tokens_file": ("admin_tokens_file", check_optional_str),
    "admin.tls": ("admin_tls", check_bool),
    "admin.revocations_file": ("revocations_file", check_optional_str),
    "api.cert": ("api_tls_cert_file", check_optional_str),
    "api.key": ("api_tls_key_file", check_optional_str),
    "auth.nonce_lifetime": ("nonce_lifetime", int_between(30, 86400)),
    "auth.strict_expiry": ("strict_expiry", check_bool),
    "relay.ip": ("relay_ips", check_ip_list),
    "relay.external_ip": ("external_ips", check_ip_list),
    "relay.min_port": ("min_port", int_between(1, 65535)),
    "relay.max_port": ("max_port", int_between(1, 65535)),
    "relay.offload": ("offload", one_of(("off", "ebpf", "auto"))),
    "peers.allow_loopback": ("allow_loopback_peers", check_bool),
    "peers.allow": ("allow_peers", check_cidr_list),
    "peers.deny": ("deny_peers", check_cidr_list),
    "allocations.default_lifetime": ("default_lifetime", int_between(30, 86400)),
    "allocations.max_lifetime": ("max_lifetime", int_between(30, 86400)),
    "allocations.max_total": ("max_allocations", int_between(0, 10_000_000)),
    "allocations.max_per_user": ("max_allocations_per_user", int_between(0, 10_000_000)),
    "allocations.max_per_client_ip": ("max_allocations_per_client_ip", int_between(0, 10_000_000)),
    "allocations.max_permissions": ("max_permissions_per_allocation", int_between(0, 100_000)),
    "allocations.max_channels": ("max_channels_per_allocation", int_between(0, 16384)),
    "allocations.max_peer_connections": (
        "max_peer_connections_per_allocation",
        int_between(0, 65535),
    ),
    "allocations.max_pending_connects": (
        "max_pending_connects_per_allocation",
        int_between(0, 65535),
    ),
    "allocations.bandwidth_kbps": ("bandwidth_kbps", int_between(0, 10_000_000)),
    "limits.challenge_rate": ("challenge_rate", float_between(0.01, 1_000_000)),
    "limits.challenge_burst": ("challenge_burst", int_between(1, 1_000_000)),
    "drain.timeout": ("drain_timeout", float_between(0, 86400)),
    "drain.alternate_server": ("alternate_server", check_host_port),
    "stun.other_address": ("other_address", check_host_port),
    "workers": ("workers", int_between(1, 256)),
    "metrics.listen": ("metrics_listen", check_host_port_or_off),
    "probe.interval": ("probe_interval", float_between(0, 86400)),
    "probe.timeout": ("probe_timeout", float_between(0.1, 60)),
    "tls.cert": ("cert_file", check_optional_str),
    "tls.key": ("key_file", check_optional_str),
    "stream.idle_timeout": ("idle_timeout", int_between(1, 3600)),
    "stream.handshake_timeout": ("handshake_timeout", int_between(1, 600)),
    "stream.frame_timeout": ("frame_timeout", float_between(0.5, 600)),
    "stream.first_request_timeout": ("first_request_timeout", float_between(1, 3600)),
    "stream.write_timeout": ("write_timeout", float_between(1, 3600)),
    "stream.max_connections": ("max_stream_connections", int_between(0, 10_000_000)),
    "stream.max_connections_per_ip": ("max_stream_connections_per_ip", int_between(0, 10_000_000)),
    "stream.tls_handshake_rate": ("tls_handshake_rate", float_between(0, 1_000_000)),
    "stream.tls_handshake_burst": ("tls_handshake_burst", int_between(1, 1_000_000)),
    "stream.proxy_trusted": ("proxy_trusted", check_cidr_list),
    "stream.proxy_header_timeout": ("proxy_header_timeout", float_between(0.5, 120)),
    **{f"http.{k}": (f"http_{k}", int_between(0, 1_000_000)) for k in HTTP_CAPS},
    "http.idle_timeout": ("http_idle_timeout", float_between(1, 3600)),
    "dev.enabled": ("dev", check_bool),
    "dev.impair": ("impairments", check_impairment_list),
    "dev.seed": ("impair_seed", int_between(0, 2**32 - 1)),
    "fleet.redis": ("fleet_redis", check_redis_url),
    "fleet.redis_password_file": ("fleet_redis_password_file", check_optional_str),
    "fleet.node": ("fleet_node", check_node_name),
    "fleet.region": ("fleet_region", check_label),
    "fleet.zone": ("fleet_zone", check_label),
    "fleet.prefix": ("fleet_prefix", check_str),
    "fleet.heartbeat": ("fleet_heartbeat", float_between(0.2, 60)),
    "fleet.required": ("fleet_required", check_bool),
    "fleet.max_servers": ("fleet_max_servers", int_between(1, 64)),
    "fleet.max_allocations_per_user": ("fleet_max_allocations_per_user", int_between(0, 1_000_000)),
    "fleet.admin_url": ("fleet_admin_url", check_http_url),
    "fleet.region_header": ("fleet_region_header", check_optional_label),
    "fleet.regions": ("fleet_regions", check_regions),
    "tenants": ("tenants", check_tenants),
    "usage.state_dir": ("usage_state_dir", check_optional_str),
    "usage.interim_interval": ("usage_interim", float_between(1, 86400)),
    "usage.file": ("usage_file", check_optional_str),
    "usage.webhook.url": ("usage_webhook_url", check_http_url),
    "usage.webhook.token_file": ("usage_webhook_token_file", check_optional_str),
    "usage.webhook.batch": ("usage_webhook_batch", int_between(1, 10_000)),
    "usage.webhook.timeout": ("usage_webhook_timeout", float_between(0.1, 300)),
    "usage.webhook.retry_max": ("usage_webhook_retry_max", float_between(0.5, 3600)),
    "usage.spool_max_bytes": ("usage_spool_max_bytes", parse_bytes),
    "usage.spool_full": ("usage_spool_full", one_of(("drop", "refuse"))),
    "auth_hook.url": ("auth_hook_url", check_http_url),
    "auth_hook.token_file": ("auth_hook_token_file", check_optional_str),
    "auth_hook.timeout": ("auth_hook_timeout", float_between(0.05, 60)),
    "auth_hook.concurrency": ("auth_hook_concurrency", int_between(1, 1024)),
    "auth_hook.rate_per_second": ("auth_hook_rate", float_between(0.01, 100_000)),
    "auth_hook.rate_burst": ("auth_hook_burst", int_between(1, 100_000)),
    "auth_hook.cache_ttl": ("auth_hook_cache_ttl", float_between(1, 86400)),
    "auth_hook.negative_ttl": ("auth_hook_negative_ttl", float_between(0, 86400)),
    "auth_hook.failures_to_open": ("auth_hook_failures", int_between(1, 1000)),
    "auth_hook.open_seconds": ("auth_hook_open_time", float_between(0.1, 3600)),
    "auth_hook.fail_open": ("auth_hook_fail_open", check_bool),
    "log.level": ("log_level", one_of(LOG_LEVELS)),
    "log.format": ("log_format", one_of(LOG_FORMATS)),
}
