"""What each configuration value may be: parsers that turn YAML or flag values into
typed ones and raise ConfigError naming the key (used by ops/config/settings.py's SCHEMA)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from turnserver.io.impairment import ImpairmentError, parse_assignments
from turnserver.io.proxy_protocol import parse_versions
from turnserver.io.runtime import ListenAddress

DEFAULT_PORTS = {"udp": 3478, "tcp": 3478, "tls": 5349}


class ConfigError(ValueError):
    """A configuration problem, naming the key and where it came from."""


def not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


@dataclass(frozen=True, slots=True)
class StaticUser:
    """A static long-term credential: a password or a precomputed MD5 key."""

    name: str
    password: str | None = None
    key: bytes | None = None


Check = Callable[[Any, str], Any]


def int_between(lo: int, hi: int) -> Check:
    def check(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            try:
                v = int(str(v), 10)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {v!r}") from None
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: {v} is outside {lo}..{hi}")
        return int(v)

    return check


def check_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ConfigError(f"{key}: expected true or false, got {v!r}")


def check_str(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a non-empty string, got {v!r}")
    return v


def check_optional_str(v: Any, key: str) -> str | None:
    if v is None or v == "":
        return None
    return check_str(v, key)


def one_of(options: tuple[str, ...]) -> Check:
    def check(v: Any, key: str) -> str:
        if not isinstance(v, str) or v.lower() not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {v!r}")
        return v.lower()

    return check


def check_str_list(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{key}: expected a list of strings, got {v!r}")
    return tuple(v)


def check_ip_list(v: Any, key: str) -> tuple[str, ...]:
    out = []
    for item in check_str_list(v, key):
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an IP address") from None
    return tuple(out)


def check_cidr_list(v: Any, key: str) -> tuple[str, ...]:
    out = []
    for item in check_str_list(v, key):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not a CIDR network") from None
    return tuple(out)


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_label(v: Any, key: str) -> str:
    """A region or zone name: letters, digits, . _ - (up to 63), or empty."""
    text = check_str(v, key)
    if text and not LABEL.fullmatch(text):
        raise ConfigError(f"{key}: {text!r} is not a name (letters, digits, . _ -; 63 at most)")
    return text


def check_optional_label(v: Any, key: str) -> str:
    """An HTTP header name, or empty."""
    return check_label("" if v is None else v, key)


def check_node_name(v: Any, key: str) -> str | None:
    """A node's name; empty or absent: None (the host name is used)."""
    if v is None:
        return None
    return check_label(v, key) or None


def check_http_url(v: Any, key: str) -> str:
    """An http:// or https:// base URL, or empty."""
    text = check_str(v, key)
    if text and not (text.startswith(("http://", "https://")) and len(text) > 8):
        raise ConfigError(f"{key}: {text!r} is not an http:// or https:// URL")
    return text


SENTINEL_SCHEME = "redis+sentinel://"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """redis+sentinel://HOST[:PORT],.../SERVICE[/DB] -> sentinels, service, db
    (ValueError names what is wrong)."""
    hosts, _, path = url[len(SENTINEL_SCHEME) :].partition("/")
    service, _, db = path.partition("/")
    sentinels = []
    for part in hosts.split(","):
        part = part.strip()
        if part.startswith("["):  # [IPv6]:PORT
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else "26379"
        else:
            host, sep, port = part.rpartition(":")
            if not sep:
                host, port = port, "26379"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not HOST:PORT")
        sentinels.append((host, int(port)))
    if not service:
        raise ValueError("no service name (redis+sentinel://HOST:PORT/SERVICE)")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    return sentinels, service, int(db or 0)


def check_redis_url(v: Any, key: str) -> str | None:
    """redis://, rediss:// (TLS), unix:// (a socket path) or redis+sentinel://."""
    if v is None:
        return None
    text = check_str(v, key)
    if text.startswith("redis+sentinel://"):
        try:
            parse_sentinel_url(text)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        return text
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"{key}: {text!r} is not a Redis URL (redis://HOST:PORT/DB, rediss:// for TLS, "
            "unix:///path/to/socket, redis+sentinel://HOST:PORT,HOST:PORT/SERVICE)"
        )
    return text


def check_regions(v: Any, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`{REGION: [CIDR, ...]}`: callers from these networks are in that region."""
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a mapping of region name to a list of CIDRs")
    return tuple(
        (check_label(name, f"{key}"), check_cidr_list(cidrs, f"{key}.{name}"))
        for name, cidrs in v.items()
    )


def check_impairment_list(v: Any, key: str) -> tuple[str, ...]:
    """Developer-mode impairments, `TRANSPORT=SPEC` each (turnserver.io.impairment)."""
    items = check_str_list(v, key)
    try:
        parse_assignments(items)
    except ImpairmentError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return items


def parse_listen(uri: str, key: str = "listen") -> ListenAddress:
    """Parse `udp://IP:PORT` (also tcp://, tls://; the port may be left out), with
    `?proxy=v1|v2|any` on tcp:// and tls:// for a listener behind a PROXY-protocol proxy."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"{key}: {uri!r} must start with udp://, tcp:// or tls://")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: {uri!r} has a bad port") from None
    if not host:
        raise ConfigError(f"{key}: {uri!r} has no IP address")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"{key}: {uri!r}: {host!r} is not an IP address") from None
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"{key}: {uri!r} has trailing parts")
    proxy = ""
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name != "proxy":
            raise ConfigError(f"{key}: {uri!r}: unknown option {name!r} (only proxy=)")
        if scheme == "udp":
            # docs/behind-a-proxy.md "UDP": no PROXY standard exists for datagrams
            raise ConfigError(
                f"{key}: {uri!r}: there is no PROXY protocol for UDP datagrams; "
                "proxy= is for tcp:// and tls:// listeners"
            )
        try:
            parse_versions(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {uri!r}: {exc}") from None
        proxy = value.strip().lower()
    if parts.query and not proxy:
        raise ConfigError(f"{key}: {uri!r} has trailing parts")
    return ListenAddress(scheme, host, port if port is not None else DEFAULT_PORTS[scheme], proxy)


def check_listen_list(v: Any, key: str) -> tuple[ListenAddress, ...]:
    items = check_str_list(v, key)
    if not items:
        raise ConfigError(f"{key}: at least one listener is needed")
    return tuple(parse_listen(u, key) for u in items)


def parse_user(text: str, key: str = "user") -> StaticUser:
    """`NAME:PASSWORD` from the command line."""
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise ConfigError(f"{key}: expected NAME:PASSWORD, got {text!r}")
    return StaticUser(name, password=password)


def check_users(v: Any, key: str) -> tuple[StaticUser, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of {{name, password}} or {{name, key}}")
    out = []
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            out.append(parse_user(item, where))
            continue
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}: expected a mapping with name and password or key")
        unknown = set(item) - {"name", "password", "key"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        name = check_str(item["name"], f"{where}.name")
        if ("password" in item) == ("key" in item):
            raise ConfigError(f"{where}: give exactly one of password or key")
        if "password" in item:
            out.append(
                StaticUser(name, password=check_str(str(item["password"]), f"{where}.password"))
            )
        else:
            raw = check_str(str(item["key"]), f"{where}.key").removeprefix("0x")
            try:
                key_bytes = bytes.fromhex(raw)
            except ValueError:
                raise ConfigError(f"{where}.key: expected 32 hex digits (MD5 key)") from None
            if len(key_bytes) != 16:
                raise ConfigError(f"{where}.key: expected 32 hex digits (MD5 key)")
            out.append(StaticUser(name, key=key_bytes))
    return tuple(out)


def parse_host_port(text: str, key: str = "api.listen") -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ip = str(ipaddress.ip_address(host))
        number = int(port)
    except ValueError:
        raise ConfigError(f"{key}: expected IP:PORT, got {text!r}") from None
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(f"{key}: expected IP:PORT, got {text!r}")
    return ip, number


def check_host_port(v: Any, key: str) -> tuple[str, int] | None:
    if v is None or v == "":
        return None
    return parse_host_port(check_str(v, key), key)


def check_host_port_or_off(v: Any, key: str) -> tuple[str, int] | None:
    if v is False or (isinstance(v, str) and v.lower() in ("off", "none", "")):
        return None
    return parse_host_port(check_str(v, key), key)


def parse_account(text: str, key: str = "api.accounts") -> tuple[str, str]:
    """`SID:AUTH_TOKEN`."""
    sid, sep, token = text.strip().partition(":")
    if not sep or not sid or not token or not sid.isalnum():
        raise ConfigError(f"{key}: expected ACCOUNT_SID:AUTH_TOKEN")  # never echo a token
    return sid, token


def check_accounts(v: Any, key: str) -> tuple[tuple[str, str], ...]:
    return tuple(parse_account(item, key) for item in check_str_list(v, key))


def float_between(lo: float, hi: float) -> Check:
    def check(v: Any, key: str) -> float:
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {v!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: {value} is outside {lo}..{hi}")
        return value

    return check


# YAML key -> (Settings field, check)


@dataclass(frozen=True)
class AdminToken:
    """A named admin token (the name goes into audit lines, never the token)."""

    name: str
    token: str


def parse_admin_token(text: str, key: str = "admin.tokens") -> AdminToken:
    """`NAME:TOKEN`, or a bare TOKEN (named "admin")."""
    name, sep, token = text.strip().partition(":")
    if not sep:
        name, token = "admin", text.strip()
    if not token or len(token) < 16:
        raise ConfigError(f"{key}: an admin token must be at least 16 characters")
    return AdminToken(name or "admin", token)
