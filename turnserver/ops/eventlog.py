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
from typing import Any

from turnserver.core import events as ev
from turnserver.core.five_tuple import format_address

LOGGER_NAME = "turnserver"
log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _json_time(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
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
    LogRecord machinery. 10.6 µs for an "allocation created" line through logging, 3.7
    µs this way (benchmarks/README.md)."""

    def __init__(self, stream: Any, fmt: str) -> None:
        super().__init__(stream)
        self.text = TextFormatter()
        self.setFormatter(JsonFormatter() if fmt == "json" else self.text)
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

    def write_event(self, level: int, message: str, text: str, fields: dict[str, Any]) -> None:
        """One event line, formatted as emit() would have."""
        now = time.time()
        name = logging.getLevelName(level)
        if self.json:
            out = {"time": _json_time(now), "level": name.lower(), "msg": f"{message} {text}"}
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


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root 'turnserver' logger to write to stderr."""
    global _handler
    _handler = LineHandler(sys.stderr, fmt)
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [_handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Nothing we log uses the caller's file and line, thread or process names: the
    # logging HOWTO's "Optimization" switches; 2 µs a line (benchmarks/README.md).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


# event type -> (level, message, {log field: event attribute}); special cases below
_LINES: dict[type, tuple[int, str, dict[str, str]]] = {
    ev.AllocationCreated: (
        logging.INFO,
        "allocation created",
        {"user": "username", "relayed": "relayed", "lifetime": "lifetime"},
    ),
    ev.AllocationRefused: (
        logging.WARNING,
        "allocation refused",
        {"user": "username", "code": "code", "reason": "reason", "detail": "detail"},
    ),
    ev.AllocationEnded: (
        logging.INFO,
        "allocation ended",
        {
            "user": "username",
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
    ev.PeerDenied: (logging.WARNING, "peer denied", {"peer": "peer_ip"}),
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


def _value(name: str, value: Any) -> Any:
    """How a field looks in the log."""
    if name == "relayed":
        return ",".join(format_address(a) for a in value)
    if name == "peer" and isinstance(value, tuple):
        return format_address(value)
    if name == "channel":
        return f"0x{value:04x}"
    if name == "lifetime_s":
        return round(value, 3)
    if name == "errno":
        return errno_names.errorcode.get(value, str(value))
    return value


@ev.handles(*_LINES)
def log_event(event: ev.Event) -> None:
    """Write the log line for one event (the core's event sink). Decides first and
    formats after: most events of a busy server (each request's) make no line."""
    line = _LINES.get(type(event))
    if line is None:
        return
    level, message, fields = line
    extra: dict[str, Any] = {}
    if isinstance(event, ev.RequestHandled):
        # Allocate refusals and authentication failures have their own line
        if not event.code or event.code in (401, 438) or event.method == "allocate":
            return
    elif isinstance(event, ev.AllocationRefused):
        if event.reason == "unauthenticated":
            level = logging.DEBUG  # the normal first 401 of every allocation
    elif isinstance(event, ev.AuthFailed):
        if event.method == "allocate":
            return  # the "allocation refused" line says it (one line per failure)
    elif isinstance(event, ev.TlsHandshakeFailed):
        key = f"tls:{event.reason}"
        if not log.isEnabledFor(level) or not _throttle.allow(key):
            return
        extra["suppressed"] = _throttle.take_suppressed(key)
    elif isinstance(event, ev.ConnectionClosed):
        if event.reason in ("tls", "handshake_timeout"):
            return  # logged as "tls handshake failed"
        if event.reason in CAP_REASONS:  # one line per cap and interval under a flood
            if not _throttle.allow(event.reason):
                return
            reason = event.reason
            level, message = logging.WARNING, "connection refused"
            fields = {}
            extra = {"reason": reason, "suppressed": _throttle.take_suppressed(reason)}
    if not log.isEnabledFor(level):
        return
    values = {name: _value(name, getattr(event, attr)) for name, attr in fields.items()}
    _emit(level, message, event.five_tuple, **values, **extra)


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
    handler = _handler
    if handler is not None and log.handlers == [handler] and not log.filters:
        # our own handler alone (setup_logging): the line without a LogRecord
        if not handler.filters and level >= handler.level:
            handler.write_event(level, msg, text, {"event": msg, **fields})
        return
    # the fields as data for JSON logs (any other handler still sees the text)
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
