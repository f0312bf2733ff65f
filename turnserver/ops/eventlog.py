"""Logs: one line per core event, on stderr, as text or JSON.

Never logs a password, key or secret; usernames are logged (operators need them to
answer "why did alice's call fail"), 5-tuples and refusal reasons always.
"""

from __future__ import annotations

import errno as errno_names
import json
import logging
import re
import sys
import time
from typing import Any

from turnserver.core import events as ev
from turnserver.core.five_tuple import format_address

LOGGER_NAME = "turnserver"
log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root 'turnserver' logger to write to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _addrs(addrs: tuple[tuple[str, int], ...]) -> str:
    return ",".join(format_address(a) for a in addrs)


def log_event(event: ev.Event) -> None:
    """Write the log line for one event (the core's event sink)."""
    if isinstance(event, ev.AllocationCreated):
        _emit(
            logging.INFO,
            "allocation created",
            event.five_tuple,
            user=event.username,
            relayed=_addrs(event.relayed),
            lifetime=event.lifetime,
        )
    elif isinstance(event, ev.AllocationRefused):
        level = logging.DEBUG if event.reason == "unauthenticated" else logging.WARNING
        _emit(
            level,
            "allocation refused",
            event.five_tuple,
            user=event.username,
            code=event.code,
            reason=event.reason,
            detail=event.detail,
        )
    elif isinstance(event, ev.AllocationEnded):
        _emit(
            logging.INFO,
            "allocation ended",
            event.five_tuple,
            user=event.username,
            relayed=_addrs(event.relayed),
            cause=event.cause,
            lifetime_s=round(event.duration, 3),
            packets_to_peer=event.packets_to_peer,
            bytes_to_peer=event.bytes_to_peer,
            packets_to_client=event.packets_to_client,
            bytes_to_client=event.bytes_to_client,
        )
    elif isinstance(event, ev.AllocationRefreshed):
        _emit(logging.DEBUG, "allocation refreshed", event.five_tuple, lifetime=event.lifetime)
    elif isinstance(event, ev.RequestHandled):
        # Allocate refusals and authentication failures have their own line
        if event.code and event.code not in (401, 438) and event.method != "allocate":
            _emit(
                logging.INFO,
                "request refused",
                event.five_tuple,
                method=event.method,
                code=event.code,
                reason=event.reason,
            )
    elif isinstance(event, ev.AuthFailed):
        if event.method == "allocate":
            return  # the "allocation refused" line says it (one line per failure)
        _emit(
            logging.WARNING,
            "authentication failed",
            event.five_tuple,
            user=event.username,
            reason=event.reason,
        )
    elif isinstance(event, ev.PeerDenied):
        _emit(logging.WARNING, "peer denied", event.five_tuple, peer=event.peer_ip)
    elif isinstance(event, ev.PermissionInstalled):
        _emit(logging.DEBUG, "permission installed", event.five_tuple, peer=event.peer_ip)
    elif isinstance(event, ev.PermissionExpired):
        _emit(logging.DEBUG, "permission expired", event.five_tuple, peer=event.peer_ip)
    elif isinstance(event, ev.PermissionRevoked):
        _emit(
            logging.WARNING,
            "permission revoked",
            event.five_tuple,
            user=event.username,
            peer=event.peer_ip,
            reason=event.reason,
        )
    elif isinstance(event, ev.RelaySendFailed):
        _emit(
            logging.WARNING,
            "relay send failed",
            event.five_tuple,
            user=event.username,
            peer=format_address(event.peer),
            errno=errno_names.errorcode.get(event.errno, str(event.errno)),
            detail=event.detail,
            suppressed=event.suppressed,
        )
    elif isinstance(event, ev.TlsHandshakeFailed):
        if _throttle.allow(f"tls:{event.reason}"):
            _emit(
                logging.WARNING,
                "tls handshake failed",
                event.five_tuple,
                reason=event.reason,
                detail=event.detail,
                suppressed=_throttle.take_suppressed(f"tls:{event.reason}"),
            )
    elif isinstance(event, ev.ChannelBound):
        _emit(
            logging.DEBUG,
            "channel bound",
            event.five_tuple,
            channel=f"0x{event.number:04x}",
            peer=format_address(event.peer),
        )
    elif isinstance(event, ev.ChannelExpired):
        _emit(
            logging.DEBUG,
            "channel expired",
            event.five_tuple,
            channel=f"0x{event.number:04x}",
            peer=format_address(event.peer),
        )
    elif isinstance(event, ev.ConnectionClosed):
        if event.reason in CAP_REASONS:  # one line per cap and interval under a flood
            if _throttle.allow(event.reason):
                _emit(
                    logging.WARNING,
                    "connection refused",
                    event.five_tuple,
                    reason=event.reason,
                    suppressed=_throttle.take_suppressed(event.reason),
                )
            return
        if event.reason in ("tls", "handshake_timeout"):
            return  # logged as "tls handshake failed"
        _emit(
            logging.INFO,
            "connection closed",
            event.five_tuple,
            reason=event.reason,
            detail=event.detail,
        )
    elif isinstance(event, ev.MessageDiscarded):
        _emit(
            logging.DEBUG,
            "message discarded",
            event.five_tuple,
            reason=event.reason,
            detail=event.detail,
        )


QUIET_USERS = {"turnserver-self-probe"}  # the self-probe: debug level only
CAP_REASONS = frozenset({"stream_limit", "per_ip_limit", "fd_limit"})


class Throttle:
    """At most one log line per key and interval; counts what it held back."""

    def __init__(self, interval: float = 10.0, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if len(self.last) > 1000:  # keys are bounded labels; stay bounded regardless
            self.last.clear()
        self.last[key] = now
        return True

    def take_suppressed(self, key: str) -> int:
        return self.suppressed.pop(key, 0)


_throttle = Throttle()


def _emit(level: int, msg: str, five_tuple: object, **fields: Any) -> None:
    if fields.get("user") in QUIET_USERS:
        level = logging.DEBUG
    if not log.isEnabledFor(level):
        return
    fields = {"five_tuple": str(five_tuple), **fields}
    text = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
    log.log(level, "%s %s", msg, text, extra={"fields": {"event": msg, **fields}})


_BARE = re.compile(r"[!#-~]+")  # printable ASCII without space and '"'


def _quote(value: Any) -> str:
    """A field value for the text log: bare when it is plain printable ASCII, else a JSON
    string, so that client-supplied text (USERNAME, REALM, SOFTWARE, API parameters)
    can never break a line, forge one, or reorder it with bidi controls."""
    s = str(value)
    return s if _BARE.fullmatch(s) else json.dumps(s)


def safe_text(value: object) -> str:
    """Client-supplied text for a log message: quoted and escaped like a field value."""
    return _quote(value)
