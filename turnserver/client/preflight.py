"""Preflight: which network path to a STUN/TURN server works, and why not.

A client that works against any TURN server. For each URI: STUN Binding, an allocation
over the URI's transport (the server's refusal explained), and a call's worth of media
(50 packets a second of 160 bytes) through the relay to a second allocation of ours,
every echo matched by sequence number whenever it arrives: round trip, RFC 3550 jitter,
loss, reordering and an E-model MOS with a grade and warnings (client/quality.py). Then
a verdict per path (works, works but poor, does not work) and overall, like Twilio's
preflight: which transports work, whether TURN is required (or what could not be
told), the iceServers order to use, the likely root cause.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from turnserver.client.quality import FAILS, POOR, WORKS, Quality
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.stun import (
    Attr,
    MessageClass,
    Method,
    StunDecodeError,
    StunMessage,
    decode_message,
    encode_message,
)
from turnserver.stun.attributes import Address

CHANNEL = 0x4000


@dataclass(frozen=True)
class IceUri:
    """A parsed stun:, turn: or turns: URI (RFC 7064, RFC 7065)."""

    scheme: str  # stun, turn, turns
    host: str
    port: int
    transport: str  # udp, tcp, tls
    username: str = ""
    credential: str = ""

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = (
            ""
            if self.scheme == "stun"
            else (f"?transport={'tcp' if self.transport == 'tls' else self.transport}")
        )
        return f"{self.scheme}:{host}:{self.port}{query}"


def parse_uri(uri: str, username: str = "", credential: str = "") -> IceUri:
    """stun:host[:port], turn:host[:port][?transport=udp|tcp], turns:host[:port]."""
    scheme, sep, rest = uri.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
        raise ValueError(f"not a STUN/TURN URI: {uri!r}")
    rest, _, query = rest.partition("?")
    params = urllib.parse.parse_qs(query)
    transport = params.get("transport", ["udp" if scheme in ("stun", "turn") else "tcp"])[0]
    if transport not in ("udp", "tcp"):
        raise ValueError(f"unknown transport in {uri!r}")
    secure = scheme in ("turns", "stuns")
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = rest.partition(":")
    port = int(port_text) if port_text else (5349 if secure else 3478)
    return IceUri(
        "stun" if scheme.startswith("stun") else scheme,
        host,
        port,
        "tls" if secure else transport,
        username,
        credential,
    )


def load_ice_servers(source: str, timeout: float = 10.0) -> list[IceUri]:
    """URIs and credentials from a credentials endpoint (URL) or a saved JSON file:
    Twilio's Tokens response, the TURN REST draft, or an RTCConfiguration."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ValueError(
                f"credentials endpoint answered HTTP {exc.code} {exc.reason}"
            ) from None
        except urllib.error.URLError as exc:
            raise ValueError(f"cannot reach the credentials endpoint: {exc.reason}") from None
        except (TimeoutError, json.JSONDecodeError) as exc:
            raise ValueError(f"bad answer from the credentials endpoint: {exc}") from None
    else:
        with open(source, encoding="utf-8") as fh:
            data = json.load(fh)
    out: list[IceUri] = []
    if "ice_servers" in data or "iceServers" in data:
        for entry in data.get("ice_servers") or data.get("iceServers") or []:
            urls = entry.get("urls") or entry.get("url") or []
            for url in [urls] if isinstance(urls, str) else urls:
                out.append(parse_uri(url, entry.get("username", ""), entry.get("credential", "")))
    elif "uris" in data:
        out += [
            parse_uri(u, data.get("username", ""), data.get("password", "")) for u in data["uris"]
        ]
    else:
        raise ValueError("no ice_servers, iceServers or uris in the credentials")
    return out


@dataclass
class PathResult:
    """One URI's outcome. Media figures are per round trip between us and the server:
    the test media goes out and comes back through the relay (to a second allocation of
    ours over the same path), crossing the path twice each way; see media_round_trips."""

    uri: str
    transport: str
    reachable: bool = False
    reflexive: str = ""
    relayed: str = ""
    allocation: str = ""  # "ok" or the error
    error_code: int | None = None
    explanation: str = ""
    media_ok: bool = False  # any packet came back
    verdict: str = ""  # quality.WORKS, POOR or FAILS; "" for stun: URIs
    sent: int = 0
    received: int = 0
    loss: float | None = None
    rtt_ms: float | None = None  # the average; quality.rtt_ms has min, avg and max
    jitter_ms: float | None = None
    stun_rtt_ms: float | None = None  # one Binding transaction
    quality: Quality | None = None
    seconds: float = 0.0


@dataclass
class Report:
    paths: list[PathResult] = field(default_factory=list)
    nat_mapping: str = "unknown"
    nat_filtering: str = "unknown"
    working_transports: list[str] = field(default_factory=list)
    poor_transports: list[str] = field(default_factory=list)
    turn_required: bool | None = None
    turn_required_reason: str = ""
    ice_servers_order: list[str] = field(default_factory=list)
    verdict: str = ""
    root_cause: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.working_transports)


EXPLAIN = {
    401: "credentials refused: wrong shared secret or password, wrong realm, or the "
    "credential has expired (check the minting secret and TTL)",
    438: "stale nonce: the server kept rejecting our nonce (clock skew between servers "
    "behind one name, or a load balancer moving us between servers)",
    403: "forbidden by the server",
    437: "allocation mismatch: this 5-tuple already had an allocation",
    440: "the server has no relay address of the requested family",
    441: "wrong credentials for this allocation",
    442: "the server does not support this transport",
    486: "allocation quota reached for this user or client address",
    508: "the server is out of capacity (relay ports or descriptors) or draining",
    300: "the server is draining and sent us to an alternate server",
}
# the reason phrase says more (ours carries the refusal's reason; others' their own words)
REASONS = (
    (401, "expired", "the credential has expired: mint a new one (check the TTL and clocks)"),
    (403, "revoked", "this user is revoked by the server's operator (admin API revocation)"),
    (403, "peer", "the server's peer policy refused the media peer (a private address?)"),
    (486, "client_ip", "allocation quota reached for this client address"),
    (486, "quota_user", "allocation quota reached for this user (allocations.max_per_user)"),
    (486, "quota_total", "the server's allocation limit is reached"),
    (508, "draining", "the server is draining (shutting down): try another server"),
    (508, "fd_limit", "the server is out of file descriptors"),
    (508, "relay_port", "the server has no free relay port"),
)
ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused (nothing listens there)",
    errno.ECONNRESET: "connection reset by the server or a middlebox",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "the network is unreachable",
    errno.ETIMEDOUT: "the connection timed out",
    errno.EACCES: "not permitted (a local firewall?)",
    errno.EADDRNOTAVAIL: "the address is not available",
}


def explain(exc: TurnClientError, transport: str) -> str:
    """Why a path failed, in words an operator can act on."""
    if exc.code is not None:
        phrase = exc.reason.lower()
        for code, needle, words in REASONS:
            if exc.code == code and needle in phrase:
                return words
        return EXPLAIN.get(exc.code, f"the server refused with {exc.code} {exc.reason}")
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS failed: the server's certificate is refused: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed: {cause.reason or cause}"
    if isinstance(cause, OSError) and cause.errno in ERRNO_WORDS:
        return f"{ERRNO_WORDS[cause.errno]} over {transport}"
    text = str(exc)
    if "no answer" in text or "timed out" in text.lower():
        return (
            f"no answer over {transport}: a firewall drops it, or nothing listens "
            "(UDP gives no error)"
        )
    return text


async def _echo(peer: TurnClient, to: Address) -> None:
    """Send back whatever arrives at the peer allocation (a Send indication to `to`)."""
    while True:
        try:
            _, data = await peer.receive(3600)
        except TurnClientError:
            return
        peer.send_indication(to, data)


async def _connect(uri: IceUri, ssl_context: ssl.SSLContext | None, timeout: float) -> TurnClient:
    return await TurnClient.connect(
        uri.transport,
        (uri.host, uri.port),
        uri.username,
        uri.credential,
        ssl_context=ssl_context,
        server_hostname=uri.host,
        timeout=timeout,
    )


MEDIA_RATE = 50  # packets a second, 160 bytes each: a call's pace (G.711, 20 ms frames)
MEDIA_SIZE = 160


@dataclass
class MediaLoop:
    """What came back of the test media, by sequence number, whenever it arrived."""

    sent_at: dict[int, float] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    out_of_order: int = 0
    duplicates: int = 0
    jitter: float = 0.0  # RFC 3550 §6.4.1 interarrival jitter of the loop, seconds
    _transit: float | None = None
    _highest: int = -1

    def on_arrival(self, seq: int, now: float) -> None:
        if seq not in self.sent_at:
            return
        if seq in self.arrived:
            self.duplicates += 1
            return
        self.arrived[seq] = now
        if seq < self._highest:
            self.out_of_order += 1
        self._highest = max(self._highest, seq)
        transit = now - self.sent_at[seq]
        if self._transit is not None:
            self.jitter += (abs(transit - self._transit) - self.jitter) / 16
        self._transit = transit


def media_round_trips(loop: MediaLoop) -> Quality:
    """What a call between us and the server would see: the test media's loop crosses
    the path four times (to the server, to our second allocation, back to the server,
    back to us), twice each way. So a round trip is half the loop, the jitter of one
    crossing about half the loop's (independent variations add as variances), and the
    loss of one crossing 1 - (1 - p) ** (1/4) for a loop loss p."""
    rtts = [(loop.arrived[s] - loop.sent_at[s]) * 500 for s in sorted(loop.arrived)]
    sent = len(loop.sent_at)
    loop_loss = 1 - len(loop.arrived) / sent if sent else 1.0
    loss = 1 - max(0.0, 1 - loop_loss) ** 0.25
    return Quality.of(rtts, loop.jitter * 500, loss, loop.out_of_order, loop.duplicates)


async def _media(client: TurnClient, packets: int, timeout: float) -> MediaLoop:
    """Send `packets` at MEDIA_RATE through the channel and collect every echo that comes
    back until a horizon after the last one (the longer of 2 s and four times the
    slowest loop seen, at most `timeout`): a late echo still counts."""
    loop = MediaLoop()
    receiving = True

    async def receive() -> None:
        while receiving:
            try:
                _, data = await client.receive(0.25)
            except TurnClientError:
                continue
            if len(data) >= 4:
                loop.on_arrival(int.from_bytes(data[:4], "big"), time.perf_counter())

    receiver = asyncio.get_running_loop().create_task(receive())
    try:
        start = time.perf_counter()
        for seq in range(packets):
            wake = start + seq / MEDIA_RATE
            await asyncio.sleep(max(0.0, wake - time.perf_counter()))
            loop.sent_at[seq] = time.perf_counter()
            client.send_channel(CHANNEL, seq.to_bytes(4, "big") + os.urandom(MEDIA_SIZE - 4))
        last = time.perf_counter()
        while len(loop.arrived) < packets:
            slowest = max((loop.arrived[s] - loop.sent_at[s] for s in loop.arrived), default=0)
            horizon = min(max(2.0, 4 * slowest), max(timeout, 2.0))
            if time.perf_counter() - last > horizon:
                break
            await asyncio.sleep(0.05)
    finally:
        receiving = False
        await receiver
    return loop


async def check_path(
    uri: IceUri, *, packets: int, timeout: float, ssl_context: ssl.SSLContext | None
) -> PathResult:
    """STUN Binding, then for turn/turns an allocation and a call's worth of media."""
    result = PathResult(uri.text, uri.transport)
    started = time.monotonic()
    client: TurnClient | None = None
    try:
        client = await _connect(uri, ssl_context, timeout)
        stamp = time.perf_counter()
        mapped = await client.binding()
        result.stun_rtt_ms = round((time.perf_counter() - stamp) * 1000, 1)
        result.reachable = True
        result.reflexive = f"{mapped[0]}:{mapped[1]}"
        if uri.scheme == "stun":
            result.allocation = "n/a"
            return result
        relayed, _ = await client.allocate(lifetime=120)
        result.relayed = f"{relayed[0]}:{relayed[1]}"
        result.allocation = "ok"
        # The media peer: a second allocation of ours over the same transport, so both
        # legs use the path under test whatever NAT or firewall we sit behind.
        peer_client = await _connect(uri, ssl_context, timeout)
        try:
            peer_relayed, _ = await peer_client.allocate(lifetime=120)
            await client.create_permission(peer_relayed)
            await client.channel_bind(CHANNEL, peer_relayed)
            await peer_client.create_permission(relayed)
            echo = asyncio.get_running_loop().create_task(_echo(peer_client, relayed))
            try:
                loop = await _media(client, packets, timeout)
            finally:
                echo.cancel()
            await peer_client.refresh(0)
        finally:
            peer_client.close()
        result.sent, result.received = len(loop.sent_at), len(loop.arrived)
        result.media_ok = result.received > 0
        if result.media_ok:
            q = media_round_trips(loop)
            result.quality = q
            result.loss, result.rtt_ms, result.jitter_ms = q.loss, q.rtt_ms["avg"], q.jitter_ms
            result.verdict = q.verdict
            if q.warnings:
                result.explanation = "media flows, but " + ", ".join(q.warnings)
        else:
            result.loss = 1.0
            result.verdict = FAILS
            result.explanation = (
                f"allocated, but none of {result.sent} packets came back through the relay"
            )
        await client.refresh(0)
    except TurnClientError as exc:
        result.error_code = exc.code
        result.explanation = explain(exc, uri.transport)
        result.verdict = FAILS if uri.scheme != "stun" else ""
        if result.reachable:
            result.allocation = f"{exc.code} {exc.reason}" if exc.code else str(exc)
    finally:
        if client is not None:
            client.close()
        result.seconds = round(time.monotonic() - started, 3)
    return result


async def nat_mapping(uris: list[IceUri], timeout: float) -> str:
    """Compare the reflexive address one local socket gets from two server addresses: the
    server's RFC 5780 OTHER-ADDRESS when it offers one, else a second UDP URI's address."""
    targets = list(dict.fromkeys((u.host, u.port) for u in uris if u.transport == "udp"))
    if not targets:
        return "unknown (no UDP server address)"
    try:
        client = await TurnClient.connect("udp", targets[0], timeout=timeout)
        try:
            first, other = await client.binding_response()
            local = client.local
        finally:
            client.close()
        second = other or next((t for t in targets[1:] if t != targets[0]), None)
        if second is None:
            return "unknown (one UDP server address and no RFC 5780 OTHER-ADDRESS)"
        await asyncio.sleep(0.05)
        again = await TurnClient.connect("udp", second, timeout=timeout, local=local)
        try:
            mapped = await again.binding()
        finally:
            again.close()
    except (TurnClientError, OSError):
        return "unknown (binding failed)"
    if mapped == first:
        return "endpoint-independent (direct connections likely work)"
    return "address-dependent or symmetric (direct connections likely fail: TURN needed)"


class _AnySource(asyncio.DatagramProtocol):
    """An unconnected UDP socket: answers may come from any of the server's addresses."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait((data, (addr[0], addr[1])))


async def _binding_from_anywhere(
    transport: asyncio.DatagramTransport,
    proto: _AnySource,
    server: Address,
    change: int,
    timeout: float,
) -> tuple[StunMessage, Address] | None:
    """Send a Binding with CHANGE-REQUEST flags; the answer (success or error) and where
    it came from, or None when nothing came back (three tries within the timeout)."""
    tid = os.urandom(12)
    attrs = [(Attr.CHANGE_REQUEST, change)] if change else []
    request = encode_message(Method.BINDING, MessageClass.REQUEST, tid, attrs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        transport.sendto(request, server)
        try:
            data, source = await asyncio.wait_for(
                proto.answers.get(), min(timeout / 3, deadline - loop.time())
            )
        except TimeoutError:
            continue
        try:
            msg = decode_message(data)
        except StunDecodeError:
            continue
        if msg.transaction_id == tid and msg.message_class != MessageClass.REQUEST:
            return msg, source
    return None


def _origin(answer: tuple[StunMessage, Address]) -> Address:
    msg, source = answer
    origin: Address | None = msg.get(Attr.RESPONSE_ORIGIN)
    return origin or source


async def nat_filtering(uris: list[IceUri], timeout: float) -> str:
    """RFC 5780 §4.4: does the NAT let in answers from the server's other IP and port
    (endpoint-independent), from its other port only (address-dependent), or neither
    (address-and-port-dependent)? Needs a server with OTHER-ADDRESS that answers
    CHANGE-REQUEST (ours with --other-address, coturn with two listening IPs)."""
    targets = list(dict.fromkeys((u.host, u.port) for u in uris if u.transport == "udp"))
    if not targets:
        return "unknown (no UDP server address)"
    server = targets[0]
    loop = asyncio.get_running_loop()
    family_any = "::" if ":" in server[0] else "0.0.0.0"
    transport, proto = await loop.create_datagram_endpoint(_AnySource, local_addr=(family_any, 0))
    refused = "unknown (the server does not answer CHANGE-REQUEST)"
    try:
        first = await _binding_from_anywhere(transport, proto, server, 0, timeout)
        if first is None or first[0].message_class != MessageClass.SUCCESS:
            return "unknown (binding failed)"
        if not first[0].has(Attr.OTHER_ADDRESS):
            return "unknown (the server offers no RFC 5780 OTHER-ADDRESS)"
        # change IP and port, then port only: the first answer that gets through says how
        # strict the NAT's filter is (an answer from the same address tells nothing)
        for change, behaviour in ((0x06, "endpoint-independent"), (0x02, "address-dependent")):
            answer = await _binding_from_anywhere(transport, proto, server, change, timeout)
            if answer is None:
                continue
            if answer[0].message_class != MessageClass.SUCCESS:
                return refused
            if _origin(answer) != server:
                return behaviour
        return "address-and-port-dependent"
    finally:
        transport.close()


def _turn_required(report: Report) -> tuple[bool | None, str]:
    """Whether only a relay will connect calls from here, and why; None when it could
    not be determined (and the reason says what is missing)."""
    udp = [p for p in report.paths if p.transport == "udp"]
    if not any(p.reachable for p in report.paths):
        return None, "unknown: nothing answered"
    if not udp:
        return None, "unknown: no UDP URI was tested (give a stun: or turn: over UDP)"
    if not any(p.reachable for p in udp):
        return True, "yes: UDP to the server is blocked; only TCP or TLS relays get through"
    mapping, filtering = report.nat_mapping, report.nat_filtering
    if mapping.startswith("address-dependent"):
        return True, "yes: this NAT maps each destination apart (symmetric): direct fails"
    if filtering.startswith("address-and-port-dependent"):
        return True, (
            "yes, against a peer behind the same kind of NAT: this one filters by address and port"
        )
    if mapping.startswith("endpoint-independent") and filtering.startswith(
        ("endpoint-independent", "address-dependent")
    ):
        return False, "no: UDP works and this NAT maps and filters leniently"
    missing = [
        f"NAT {name} is {value}"
        for name, value in (("mapping", mapping), ("filtering", filtering))
        if value.startswith("unknown")
    ]
    return None, "unknown: " + "; ".join(missing)


def verdict(report: Report) -> None:
    turn_paths = [p for p in report.paths if p.uri.startswith("turn")]
    working = [p for p in turn_paths if p.media_ok]
    order = {"udp": 0, "tcp": 1, "tls": 2}
    good = sorted({p.transport for p in working if p.verdict == WORKS}, key=order.__getitem__)
    poor = sorted({p.transport for p in working if p.verdict == POOR}, key=order.__getitem__)
    report.working_transports = sorted({p.transport for p in working}, key=order.__getitem__)
    report.poor_transports = [t for t in poor if t not in good]
    report.ice_servers_order = [
        p.uri
        for p in sorted(
            working, key=lambda p: (p.verdict != WORKS, order[p.transport], p.rtt_ms or 0)
        )
    ]
    report.turn_required, report.turn_required_reason = _turn_required(report)
    if working:
        parts = []
        if good:
            parts.append("media flows through " + ", ".join(good))
        if report.poor_transports:
            why = sorted({w for p in working if p.verdict == POOR for w in p.quality.warnings})  # type: ignore[union-attr]
            parts.append(f"{', '.join(report.poor_transports)} {POOR} ({', '.join(why)})")
        report.verdict = "; ".join(parts)
        failed = [p for p in turn_paths if not p.media_ok]
        if failed:
            report.root_cause = "; ".join(f"{p.uri}: {p.explanation}" for p in failed)
        return
    report.verdict = "no media path works"
    codes = {p.error_code for p in turn_paths if p.error_code}
    if codes & {401, 438, 441}:
        first = next(p for p in turn_paths if p.error_code in (401, 438, 441))
        report.root_cause = first.explanation
    elif not any(p.reachable for p in report.paths):
        report.root_cause = (
            "the server is unreachable on every transport tried: a firewall, "
            "a wrong address, or the server is down"
        )
    elif turn_paths and all(p.allocation == "ok" for p in turn_paths):
        report.root_cause = (
            "allocations work but no media came back at all: the server's advertised "
            "relay address is wrong (NAT) or its peer policy refuses us"
        )
    else:
        report.root_cause = (
            "; ".join(f"{p.uri}: {p.explanation}" for p in turn_paths) or "no TURN URI was given"
        )


async def run(
    uris: list[IceUri],
    *,
    packets: int = 150,
    timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Report:
    report = Report()
    unique = list({u.text: u for u in reversed(uris)}.values())[::-1]  # first of each URI
    report.paths = list(
        await asyncio.gather(
            *(
                check_path(u, packets=packets, timeout=timeout, ssl_context=ssl_context)
                for u in unique
            )
        )
    )
    report.nat_mapping = await nat_mapping(uris, timeout)
    report.nat_filtering = await nat_filtering(uris, timeout)
    verdict(report)
    return report


def as_json(report: Report) -> str:
    return json.dumps({**asdict(report), "ok": report.ok}, indent=2)


def as_table(report: Report) -> str:
    rows = [
        ("URI", "reach", "allocation", "media", "loss", "RTT ms min/avg/max", "jitter ms",
         "MOS", "why")
    ]  # fmt: skip
    for p in report.paths:
        q = p.quality
        rows.append(
            (
                p.uri,
                "yes" if p.reachable else "no",
                p.allocation or "-",
                p.verdict or "-",
                f"{p.loss:.1%}" if p.loss is not None else "-",
                f"{q.rtt_ms['min']:.0f}/{q.rtt_ms['avg']:.0f}/{q.rtt_ms['max']:.0f}" if q else "-",
                f"{p.jitter_ms:.1f}" if p.jitter_ms is not None else "-",
                f"{q.mos:.2f} {q.grade}" if q else "-",
                p.explanation or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    ]
    lines.append("")
    lines.append(f"verdict: {report.verdict}")
    lines.append(f"TURN required: {report.turn_required_reason}")
    lines.append(f"NAT mapping: {report.nat_mapping}")
    lines.append(f"NAT filtering: {report.nat_filtering}")
    if report.ice_servers_order:
        lines.append("use iceServers in this order: " + ", ".join(report.ice_servers_order))
    if report.root_cause:
        lines.append(f"likely cause: {report.root_cause}")
    return "\n".join(lines)
