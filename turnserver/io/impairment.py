"""Developer mode: impair relayed media per client transport, reproducibly.

For testing relay-only applications against the network failures behind "media
connection failed": `block` (a firewall dropping the transport), `loss` (%), `delay` and
`jitter` (ms), `rate` (kbit/s), `duplicate` (%) and `reorder` (%). Applied to
ChannelData and Send/Data in both directions by wrapping each allocation's relay
`sendto` (client to peer) and its client sink (peer to client), so the relay fast path
is untouched when developer mode is off. One seeded random generator makes a run
reproducible. Every queue here is bounded.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from turnserver.core.allocation import SendTo
from turnserver.core.state import RelayStats
from turnserver.io.runtime_view import ClientSink
from turnserver.stun.attributes import Address

TRANSPORTS = ("udp", "tcp", "tls")
ACTIONS = ("blocked", "lost", "delayed", "duplicated", "reordered", "rate_dropped", "queue_full")
MAX_SCHEDULED = 20_000  # packets held for later at once, all allocations together
MAX_QUEUE_SECONDS = 1.0  # a rate-limited direction drops what would wait longer (tail drop)
REORDER_EXTRA = 0.02  # a reordered packet waits 20 ms more, so later ones overtake it


class ImpairmentError(ValueError):
    """A malformed impairment specification; the message names the bad part."""


@dataclass(frozen=True, slots=True)
class Impairment:
    """What happens to one client transport's relayed media."""

    block: bool = False
    loss: float = 0.0  # percent of packets dropped
    delay: float = 0.0  # ms added
    jitter: float = 0.0  # ms, uniform +/- around delay
    rate: int = 0  # kbit/s per allocation and direction; 0 = unlimited
    duplicate: float = 0.0  # percent sent twice
    reorder: float = 0.0  # percent held back so that later packets overtake them

    @property
    def active(self) -> bool:
        return self != NONE

    def describe(self) -> str:
        """The flag syntax for this impairment ("none" when there is nothing)."""
        if self.block:
            return "block"
        parts = [
            f"{f.name}:{_number(getattr(self, f.name))}"
            for f in fields(self)
            if f.name != "block" and getattr(self, f.name)
        ]
        return ",".join(parts) or "none"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


NONE = Impairment()
_LIMITS: dict[str, tuple[float, float]] = {
    "loss": (0, 100),
    "delay": (0, 10_000),
    "jitter": (0, 10_000),
    "rate": (1, 10_000_000),
    "duplicate": (0, 100),
    "reorder": (0, 100),
}
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def _number(value: float) -> str:
    return f"{value:g}"


def parse_impairment(text: str) -> Impairment:
    """`block`, `none`, or `name:value` pairs separated by commas, e.g. `loss:5,delay:80`."""
    text = text.strip()
    if text in ("block", "none", ""):
        return Impairment(block=True) if text == "block" else NONE
    values: dict[str, float] = {}
    for part in text.split(","):
        name, sep, raw = part.strip().partition(":")
        if name not in _LIMITS:
            raise ImpairmentError(
                f"unknown impairment {name!r} (block, {', '.join(_LIMITS)} or none)"
            )
        if not sep or not _NUMBER.match(raw.strip()):
            raise ImpairmentError(f"{name} needs a number, as in {name}:10")
        value = float(raw)
        lo, hi = _LIMITS[name]
        if not lo <= value <= hi:
            raise ImpairmentError(f"{name} must be between {lo:g} and {hi:g}")
        if name in values:
            raise ImpairmentError(f"{name} given twice")
        values[name] = value
    return Impairment(
        loss=values.get("loss", 0.0),
        delay=values.get("delay", 0.0),
        jitter=values.get("jitter", 0.0),
        rate=int(values.get("rate", 0)),
        duplicate=values.get("duplicate", 0.0),
        reorder=values.get("reorder", 0.0),
    )


def parse_assignment(text: str) -> tuple[str, Impairment]:
    """`transport=spec` as given to --impair (transport udp, tcp, tls or all)."""
    transport, sep, spec = text.partition("=")
    transport = transport.strip().lower()
    if not sep or transport not in (*TRANSPORTS, "all"):
        raise ImpairmentError(
            f"{text!r}: expected TRANSPORT=SPEC with TRANSPORT udp, tcp, tls or all"
        )
    return transport, parse_impairment(spec)


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, Impairment]:
    out: dict[str, Impairment] = {}
    for item in items:
        transport, spec = parse_assignment(item)
        for t in TRANSPORTS if transport == "all" else (transport,):
            out[t] = spec
    return out


class Impairments:
    """The live impairment of each transport, the random generator and the counters."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: RelayStats,
        seed: int,
        specs: dict[str, Impairment] | None = None,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.seed = seed
        self.rng = random.Random(seed)
        self.specs: dict[str, Impairment] = {t: NONE for t in TRANSPORTS}
        self.specs.update(specs or {})
        self.counts: dict[tuple[str, str], int] = {}
        self.scheduled = 0
        self.on_block: Callable[[str, bool], None] | None = None  # the runtime's hook

    def set(self, specs: dict[str, Impairment]) -> None:
        """Change some transports' impairments now (others keep theirs)."""
        for transport, spec in specs.items():
            was = self.specs[transport].block
            self.specs[transport] = spec
            if spec.block != was and self.on_block is not None:
                self.on_block(transport, spec.block)

    def blocked(self, transport: str) -> bool:
        return self.specs[transport].block

    def count(self, transport: str, action: str, n: int = 1) -> None:
        key = (transport, action)
        self.counts[key] = self.counts.get(key, 0) + n

    def describe(self) -> dict[str, str]:
        return {t: s.describe() for t, s in self.specs.items()}

    def client_to_peer(self, transport: str, sendto: SendTo) -> SendTo:
        """The relay's sendto, impaired for clients on `transport`."""
        direction = _Direction(self, transport)

        def impaired_sendto(data: bytes, addr: Address) -> None:
            direction.submit(sendto, (bytes(data), addr), len(data))

        return impaired_sendto

    def peer_to_client(self, transport: str, sink: ClientSink) -> ImpairedSink:
        return ImpairedSink(sink, _Direction(self, transport))


class _Direction:
    """One direction of one allocation: where its rate-limited queue stands."""

    __slots__ = ("impairments", "next_free", "transport")

    def __init__(self, impairments: Impairments, transport: str) -> None:
        self.impairments = impairments
        self.transport = transport
        self.next_free = 0.0

    def submit(self, send: Callable[..., object], args: tuple[Any, ...], size: int) -> None:
        imp = self.impairments
        spec = imp.specs[self.transport]
        if not spec.active:
            _send(imp, send, args)
            return
        t = self.transport
        rng = imp.rng
        if spec.block:
            imp.count(t, "blocked")
            return
        if spec.loss and rng.random() * 100 < spec.loss:
            imp.count(t, "lost")
            return
        wait = spec.delay / 1000
        if spec.jitter:
            wait = max(0.0, wait + rng.uniform(-spec.jitter, spec.jitter) / 1000)
        if spec.reorder and rng.random() * 100 < spec.reorder:
            wait += REORDER_EXTRA
            imp.count(t, "reordered")
        if spec.rate:
            now = imp.loop.time()
            departure = max(now, self.next_free) + size * 8 / (spec.rate * 1000)
            if departure - now > MAX_QUEUE_SECONDS:
                imp.count(t, "rate_dropped")
                return
            self.next_free = departure
            wait += departure - now
        copies = 2 if spec.duplicate and rng.random() * 100 < spec.duplicate else 1
        if copies == 2:
            imp.count(t, "duplicated")
        for _ in range(copies):
            if wait <= 0:
                _send(imp, send, args)
            elif imp.scheduled >= MAX_SCHEDULED:
                imp.count(t, "queue_full")
            else:
                imp.scheduled += 1
                imp.loop.call_later(wait, _send_later, imp, send, args)
        if wait > 0:
            imp.count(t, "delayed")


def _send(imp: Impairments, send: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        send(*args)
    except OSError:  # counted like any relay send error, never fatal
        imp.stats.dropped_send_error += 1


def _send_later(imp: Impairments, send: Callable[..., object], args: tuple[Any, ...]) -> None:
    imp.scheduled -= 1
    _send(imp, send, args)


class ImpairedSink:
    """A client sink whose media (ChannelData, Data indications) is impaired."""

    __slots__ = ("direction", "sink")

    def __init__(self, sink: ClientSink, direction: _Direction) -> None:
        self.sink = sink
        self.direction = direction

    def send(self, data: bytes) -> None:
        self.direction.submit(self.sink.send, (bytes(data),), len(data))

    def send_channel_data(self, number: int, payload: bytes) -> None:
        self.direction.submit(self.sink.send_channel_data, (number, bytes(payload)), len(payload))
