"""Logs: one line per core event, on stderr, as text or JSON.

Never logs a password, key or secret; usernames are logged (operators need them to
answer "why did alice's call fail"), 5-tuples and refusal reasons always.
"""

from __future__ import annotations

import asyncio
import errno as errno_names
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from turnserver.core import events as ev
from turnserver.core.five_tuple import format_address

LOGGER_NAME = "turnserver"
log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, the worker that wrote it (with
    --workers) and the event's fields."""

    worker: int | None = None

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _json_time(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`time level message`, the time as logging's default (local time, milliseconds),
    its seconds formatted once per second rather than once per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.asctime(record.created)

    def asctime(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((created - second) * 1000):03d}"


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The server's log on stderr. Lines are flushed together once per event-loop
    iteration (one write(2) for a burst of requests' lines), at once for warnings and
    errors and outside a running loop; `write_event` takes the event lines without the
    LogRecord machinery, a third of the cost of a line through logging
    (benchmarks/README.md)."""

    def __init__(self, stream: Any, fmt: str) -> None:
        super().__init__(stream)
        self.text = TextFormatter()
        self.json_formatter = JsonFormatter()
        self.setFormatter(self.json_formatter if fmt == "json" else self.text)
        self.json = fmt == "json"
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's contract: a bad record never raises
            self.handleError(record)
            return
        self._queue(line, record.levelno)

    def write_event(
        self, level: int, message: str, text: str, fields: dict[str, Any] | None
    ) -> None:
        """One event line, formatted as emit() would have (`fields`: for JSON only)."""
        now = time.time()
        name = logging.getLevelName(level)
        if self.json and fields is not None:
            out: dict[str, Any] = {
                "time": _json_time(now),
                "level": name.lower(),
                "msg": f"{message} {text}",
            }
            if self.json_formatter.worker is not None:
                out["worker"] = self.json_formatter.worker
            out.update(fields)
            line = json.dumps(out, separators=(",", ":"))
        else:
            line = f"{self.text.asctime(now)} {name} {message} {text}"
        self._queue(line, level)

    def _queue(self, line: str, level: int) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)
            if level < logging.WARNING and self._scheduled:
                return
        if level >= logging.WARNING or not self._schedule():
            self.flush()

    def _schedule(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: write now
            return False
        self._scheduled = True
        loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = False
            if not self._pending:
                return
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nothing to do
                pass


def _json_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + (
        f".{int(created % 1 * 1000):03d}Z"
    )


_handler: LineHandler | None = None


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """Configure the root 'turnserver' logger to write to stderr; `worker`: the index of
    the worker process, a field of every JSON line."""
    global _handler
    _handler = LineHandler(sys.stderr, fmt)
    _handler.json_formatter.worker = worker
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [_handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Nothing we log uses the caller's file and line, thread or process names: the
    # logging HOWTO's "Optimization" switches (their saving: benchmarks/README.md).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


LOOP_ERROR_INTERVAL = 60.0


def quiet_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """The loop's exception handler, once per kind of error and minute: a flood of the
    same error (accept() failing for want of descriptors) logs one line with one
    traceback (a field of JSON lines), then a count of what was left out."""
    seen: dict[str, tuple[float, int]] = {}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        key = f"{context.get('message', '')}|{type(exc).__name__}"
        now = time.monotonic()
        last, suppressed = seen.get(key, (-LOOP_ERROR_INTERVAL, 0))
        if now - last < LOOP_ERROR_INTERVAL:
            seen[key] = (last, suppressed + 1)
            return
        if len(seen) > 1000:
            seen.clear()
        seen[key] = (now, 0)
        more = f" ({suppressed} more like it in the last minute)" if suppressed else ""
        log.error(
            "event loop: %s%s%s",
            context.get("message", "error"),
            f": {exc!r}" if exc is not None else "",
            more,
            exc_info=exc if (isinstance(exc, BaseException) and not suppressed) else None,
        )

    loop.set_exception_handler(handler)


# event type -> (level, message, {log field: event attribute}); special cases below
_LINES: dict[type, tuple[int, str, dict[str, str]]] = {
    ev.AllocationCreated: (
        logging.INFO,
        "allocation created",
        {"user": "username", "tenant": "tenant", "relayed": "relayed", "lifetime": "lifetime"},
    ),
    ev.AllocationRefused: (
        logging.WARNING,
        "allocation refused",
        {
            "user": "username",
            "tenant": "tenant",
            "code": "code",
            "reason": "reason",
            "detail": "detail",
        },
    ),
    ev.AllocationEnded: (
        logging.INFO,
        "allocation ended",
        {
            "user": "username",
            "tenant": "tenant",
            "relayed": "relayed",
            "cause": "cause",
            "lifetime_s": "duration",
            "packets_to_peer": "packets_to_peer",
            "bytes_to_peer": "bytes_to_peer",
            "packets_to_client": "packets_to_client",
            "bytes_to_client": "bytes_to_client",
        },
    ),
    ev.AllocationRefreshed: (logging.DEBUG, "allocation refreshed", {"lifetime": "lifetime"}),
    ev.RequestHandled: (
        logging.INFO,
        "request refused",
        {"method": "method", "code": "code", "reason": "reason"},
    ),
    ev.AuthFailed: (
        logging.WARNING,
        "authentication failed",
        {"user": "username", "reason": "reason"},
    ),
    ev.PeerDenied: (logging.WARNING, "peer denied", {"peer": "peer_ip", "reason": "reason"}),
    ev.PermissionInstalled: (logging.DEBUG, "permission installed", {"peer": "peer_ip"}),
    ev.PermissionExpired: (logging.DEBUG, "permission expired", {"peer": "peer_ip"}),
    ev.PermissionRevoked: (
        logging.WARNING,
        "permission revoked",
        {"user": "username", "peer": "peer_ip", "reason": "reason"},
    ),
    ev.RelaySendFailed: (
        logging.WARNING,
        "relay send failed",
        {
            "user": "username",
            "peer": "peer",
            "errno": "errno",
            "detail": "detail",
            "suppressed": "suppressed",
        },
    ),
    ev.TlsHandshakeFailed: (
        logging.WARNING,
        "tls handshake failed",
        {"reason": "reason", "detail": "detail"},
    ),
    ev.ChannelBound: (logging.DEBUG, "channel bound", {"channel": "number", "peer": "peer"}),
    ev.ChannelExpired: (logging.DEBUG, "channel expired", {"channel": "number", "peer": "peer"}),
    ev.ConnectionClosed: (
        logging.INFO,
        "connection closed",
        {"reason": "reason", "detail": "detail"},
    ),
    ev.MessageDiscarded: (
        logging.DEBUG,
        "message discarded",
        {"reason": "reason", "detail": "detail"},
    ),
}


def _relayed(value: Any) -> str:
    return ",".join([format_address(a) for a in value])


def _peer(value: Any) -> Any:
    return format_address(value) if isinstance(value, tuple) else value


def _channel(value: Any) -> str:
    return f"0x{value:04x}"


def _lifetime(value: float) -> float:
    return round(value, 3)


def _errno(value: Any) -> str:
    return errno_names.errorcode.get(value, str(value))


# how a field looks in the log, when it is not the event's value as it is
_FORMATS: dict[str, Callable[[Any], Any]] = {
    "relayed": _relayed,
    "peer": _peer,
    "channel": _channel,
    "lifetime_s": _lifetime,
    "errno": _errno,
}

# event type -> ((log field, event attribute, format or None), ...), worked out once
_FIELDS: dict[type, tuple[tuple[str, str, Callable[[Any], Any] | None], ...]] = {
    kind: tuple((name, attr, _FORMATS.get(name)) for name, attr in fields.items())
    for kind, (_, _, fields) in _LINES.items()
}


def _values(event: ev.Event) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, attr, fmt in _FIELDS[type(event)]:
        value = getattr(event, attr)
        values[name] = value if fmt is None else fmt(value)
    return values


def _line(event: Any, level: int = -1) -> None:
    """The event's line as _LINES says, at `level` if given."""
    default, message, _ = _LINES[type(event)]
    level = default if level < 0 else level
    if log.isEnabledFor(level):
        _emit(level, message, event.five_tuple, **_values(event))


def _request_refused(event: ev.RequestHandled) -> None:
    # Allocate refusals and authentication failures have their own line
    if event.code and event.code not in (401, 438) and event.method != "allocate":
        _line(event)


def _allocation_refused(event: ev.AllocationRefused) -> None:
    # the normal first 401 of every allocation at debug
    _line(event, logging.DEBUG if event.reason == "unauthenticated" else -1)


def _auth_failed(event: ev.AuthFailed) -> None:
    if event.method != "allocate":  # the "allocation refused" line says it
        _line(event)


def _tls_handshake_failed(event: ev.TlsHandshakeFailed) -> None:
    key = f"tls:{event.reason}"
    level, message, _ = _LINES[ev.TlsHandshakeFailed]
    if log.isEnabledFor(level) and _throttle.allow(key):
        suppressed = _throttle.take_suppressed(key)
        _emit(level, message, event.five_tuple, **_values(event), suppressed=suppressed)


def _connection_closed(event: ev.ConnectionClosed) -> None:
    reason = event.reason
    if reason in ("tls", "handshake_timeout"):
        return  # logged as "tls handshake failed"
    if reason not in CAP_REASONS:
        _line(event)
    elif _throttle.allow(reason) and log.isEnabledFor(logging.WARNING):
        # one line per cap and interval under a flood
        suppressed = _throttle.take_suppressed(reason)
        _emit(
            logging.WARNING,
            "connection refused",
            event.five_tuple,
            reason=reason,
            suppressed=suppressed,
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

# The core's event sink: a handler per event type, most a plain line as _LINES says.
# Decides first and formats after: most events of a busy server (each request's) make
# no line.
log_event = ev.EventTable(
    {
        **{kind: _line for kind in _LINES},
        ev.RequestHandled: _request_refused,
        ev.AllocationRefused: _allocation_refused,
        ev.AuthFailed: _auth_failed,
        ev.TlsHandshakeFailed: _tls_handshake_failed,
        ev.ConnectionClosed: _connection_closed,
    }
)


def _emit(level: int, msg: str, five_tuple: object, **fields: Any) -> None:
    if fields.get("user") in QUIET_USERS:
        level = logging.DEBUG
    if not log.isEnabledFor(level):
        return
    where = str(five_tuple)
    # the text in one join; ints (counts, codes, lifetimes) need no quoting check
    text = " ".join(
        [
            f"five_tuple={_quote(where)}",
            *[f"{k}={v}" if type(v) is int else f"{k}={_quote(v)}" for k, v in fields.items()],
        ]
    )
    handler = _handler
    handlers = log.handlers
    if handler is not None and len(handlers) == 1 and handlers[0] is handler and not log.filters:
        # our own handler alone (setup_logging): the line without a LogRecord
        if not handler.filters and level >= handler.level:
            if handler.json:
                handler.write_event(level, msg, text, {"event": msg, "five_tuple": where, **fields})
            else:
                handler.write_event(level, msg, text, None)
        return
    # the fields as data for JSON logs (any other handler still sees the text)
    extra = {"fields": {"event": msg, "five_tuple": where, **fields}}
    log.log(level, "%s %s", msg, text, extra=extra)


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
