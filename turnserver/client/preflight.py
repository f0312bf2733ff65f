"""Preflight: which network path to a STUN/TURN server works, and why not.

A client that works against any TURN server. For each URI: STUN Binding, an allocation
over the URI's transport (the server's error code explained), and a media round trip
through the relay to a second local socket of ours (N packets at 50/s: loss, RTT,
jitter). Then a verdict per path and overall, like Twilio's preflight: which transports
work, whether TURN is required, the iceServers order to use, the likely root cause.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

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
    """One URI's outcome."""

    uri: str
    transport: str
    reachable: bool = False
    reflexive: str = ""
    relayed: str = ""
    allocation: str = ""  # "ok" or the error
    error_code: int | None = None
    explanation: str = ""
    media_ok: bool = False
    sent: int = 0
    received: int = 0
    loss: float | None = None
    rtt_ms: float | None = None
    jitter_ms: float | None = None
    seconds: float = 0.0


@dataclass
class Report:
    paths: list[PathResult] = field(default_factory=list)
    nat_mapping: str = "unknown"
    nat_filtering: str = "unknown"
    working_transports: list[str] = field(default_factory=list)
    turn_required: bool | None = None
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
    403: "the server's peer policy refused the media peer (a private address?)",
    437: "allocation mismatch: this 5-tuple already had an allocation",
    440: "the server has no relay address of the requested family",
    441: "wrong credentials for this allocation",
    442: "the server does not support this transport",
    486: "allocation quota reached for this user or the server",
    508: "the server is out of capacity (relay ports exhausted) or draining",
    300: "the server is draining and sent us to an alternate server",
}


def explain(exc: TurnClientError, transport: str) -> str:
    if exc.code is not None:
        return EXPLAIN.get(exc.code, f"the server refused with {exc.code} {exc.reason}")
    text = str(exc)
    if "cannot reach" in text and ("refused" in text.lower() or "Errno 111" in text):
        return f"nothing listens there over {transport} (connection refused)"
    if "no answer" in text or "timed out" in text.lower():
        return (
            f"no answer over {transport}: a firewall drops it, or nothing listens "
            "(UDP gives no error)"
        )
    if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
        return "TLS failed: the server's certificate is not trusted or not valid"
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
    """STUN Binding, then for turn/turns an allocation and a media round trip."""
    result = PathResult(uri.text, uri.transport)
    started = time.monotonic()
    client: TurnClient | None = None
    try:
        client = await _connect(uri, ssl_context, timeout)
        mapped = await client.binding()
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
        peer_relayed, _ = await peer_client.allocate(lifetime=120)
        await client.create_permission(peer_relayed)
        await client.channel_bind(CHANNEL, peer_relayed)
        await peer_client.create_permission(relayed)
        echo = asyncio.get_running_loop().create_task(_echo(peer_client, relayed))
        rtts: list[float] = []
        try:
            for seq in range(packets):
                stamp = time.perf_counter()
                client.send_channel(CHANNEL, seq.to_bytes(4, "big") + os.urandom(156))
                result.sent += 1
                deadline = stamp + (0.02 if seq < packets - 1 else 1.0)
                while (left := deadline - time.perf_counter()) > 0:
                    try:
                        _, data = await client.receive(left)
                    except TurnClientError:
                        break
                    if int.from_bytes(data[:4], "big") == seq:
                        rtts.append(time.perf_counter() - stamp)
                        result.received += 1
                        break
                await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - stamp)))
        finally:
            echo.cancel()
            await peer_client.refresh(0)
            peer_client.close()
        result.loss = 1 - result.received / max(1, result.sent)
        if rtts:
            result.rtt_ms = statistics.median(rtts) * 1000
            result.jitter_ms = (
                statistics.mean(abs(a - b) for a, b in itertools.pairwise(rtts)) * 1000
                if len(rtts) > 1
                else 0.0
            )
        result.media_ok = result.received > 0 and (result.loss or 0) < 0.5
        if not result.media_ok:
            result.explanation = "allocated, but media did not come back through the relay"
        await client.refresh(0)
    except TurnClientError as exc:
        result.error_code = exc.code
        result.explanation = explain(exc, uri.transport)
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


def verdict(report: Report) -> None:
    turn_paths = [p for p in report.paths if p.uri.startswith("turn")]
    working = [p for p in turn_paths if p.media_ok]
    order = {"udp": 0, "tcp": 1, "tls": 2}
    report.working_transports = sorted({p.transport for p in working}, key=order.__getitem__)
    report.ice_servers_order = [
        p.uri for p in sorted(working, key=lambda p: (order[p.transport], p.rtt_ms or 0))
    ]
    udp_ok = any(p.transport == "udp" and p.reachable for p in report.paths)
    symmetric = report.nat_mapping.startswith("address-dependent")
    # Unknown when nothing answered at all: we learned nothing about the network
    reachable = any(p.reachable for p in report.paths)
    report.turn_required = ((not udp_ok) or symmetric) if reachable else None
    if working:
        report.verdict = "media can flow through " + ", ".join(report.working_transports)
        if report.nat_filtering.startswith("address-and-port-dependent"):
            report.verdict += (
                "; this NAT filters by address and port: if the other party's does too, "
                "only TURN connects"
            )
        failed = [p for p in turn_paths if not p.media_ok]
        if failed:
            report.root_cause = "; ".join(f"{p.uri}: {p.explanation}" for p in failed)
        return
    report.verdict = "no media path works"
    codes = {p.error_code for p in turn_paths if p.error_code}
    if codes & {401, 438, 441}:
        report.root_cause = EXPLAIN[401] if 401 in codes else EXPLAIN[min(codes & {438, 441})]
    elif not any(p.reachable for p in report.paths):
        report.root_cause = (
            "the server is unreachable on every transport tried: a firewall, "
            "a wrong address, or the server is down"
        )
    elif turn_paths and all(p.allocation == "ok" for p in turn_paths):
        report.root_cause = (
            "allocations work but media does not come back: the server's "
            "advertised relay address is wrong (NAT) or its peer policy "
            "refuses us"
        )
    else:
        report.root_cause = (
            "; ".join(f"{p.uri}: {p.explanation}" for p in turn_paths) or "no TURN URI was given"
        )


async def run(
    uris: list[IceUri],
    *,
    packets: int = 50,
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
    rows = [("URI", "reach", "allocation", "media", "loss", "RTT ms", "jitter ms", "why")]
    for p in report.paths:
        rows.append(
            (
                p.uri,
                "yes" if p.reachable else "no",
                p.allocation or "-",
                "ok" if p.media_ok else ("-" if p.uri.startswith("stun") else "FAIL"),
                f"{p.loss:.0%}" if p.loss is not None else "-",
                f"{p.rtt_ms:.1f}" if p.rtt_ms is not None else "-",
                f"{p.jitter_ms:.1f}" if p.jitter_ms is not None else "-",
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
    required = {True: "yes", False: "no", None: "unknown (nothing answered)"}[report.turn_required]
    lines.append(f"TURN required: {required}   NAT mapping: {report.nat_mapping}")
    lines.append(f"NAT filtering: {report.nat_filtering}")
    if report.ice_servers_order:
        lines.append("use iceServers in this order: " + ", ".join(report.ice_servers_order))
    if report.root_cause:
        lines.append(f"likely cause: {report.root_cause}")
    return "\n".join(lines)
