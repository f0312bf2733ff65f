"""Logs: one line per core event, on stderr, as text or JSON.

Never logs a password, key or secret; usernames are logged (operators need them to
answer "why did alice's call fail"), 5-tuples and refusal reasons always.
"""

from __future__ import annotations

import json
import logging
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
        if event.code and event.reason != "unauthenticated":
            _emit(
                logging.INFO,
                "request refused",
                event.five_tuple,
                method=event.method,
                code=event.code,
                reason=event.reason,
            )
    elif isinstance(event, ev.AuthFailed):
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


def _emit(level: int, msg: str, five_tuple: object, **fields: Any) -> None:
    if fields.get("user") in QUIET_USERS:
        level = logging.DEBUG
    if not log.isEnabledFor(level):
        return
    fields = {"five_tuple": str(five_tuple), **fields}
    text = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
    log.log(level, "%s %s", msg, text, extra={"fields": {"event": msg, **fields}})


def _quote(value: Any) -> str:
    s = str(value)
    return json.dumps(s) if (" " in s or not s or '"' in s) else s
