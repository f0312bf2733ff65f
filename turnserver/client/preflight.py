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
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

from turnserver.client.ice_uri import IceUri, parse_uri
from turnserver.client.media import media_round_trips, send_call_media
from turnserver.client.nat import nat_filtering, nat_mapping
from turnserver.client.quality import FAILS, POOR, WORKS, Quality
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.stun.attributes import Address

CHANNEL = 0x4000


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
    (486, "quota_fleet", "this user's allocations across the fleet reached its quota"),
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
                loop = await send_call_media(client, CHANNEL, packets, timeout)
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
    mapping = report.nat_mapping
    if mapping.startswith("address-dependent"):
        return True, "yes: this NAT maps each destination apart (symmetric): direct fails"
    if mapping.startswith("endpoint-independent"):
        # ICE opens an endpoint-independent mapping whatever the filtering (both ends
        # send at once); only a peer behind a symmetric NAT would still need a relay
        return False, "no: UDP works and this NAT keeps one mapping for every destination"
    return None, f"unknown: NAT mapping is {mapping}"


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
