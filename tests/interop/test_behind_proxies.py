"""Behind real proxies (docs/behind-a-proxy.md, its blocks run as written): HAProxy
(PROXY v2, TLS passed through on a 443 shared with HTTPS by ALPN, and TLS terminated by
HAProxy) and nginx (PROXY v1, ssl_preread), in front of a server with the default worker
count. coturn's uclient and headless Chromium relay through each; the server's logs, caps
and admin listing show the client's address, never the proxy's."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.procs import free_port, loopback_args
from tests.support.server import CERT_FILE, KEY_FILE, require_tool
from turnserver.io.proxy_protocol import encode_v2
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message
from turnserver.testing import stop_process, wait_for_stun

DOC = Path(__file__).resolve().parents[2] / "docs" / "behind-a-proxy.md"
SECRET = "proxy-secret"
TOKEN = "proxy-admin-token"
PROXY_SOURCE = "127.0.0.3"  # the proxies connect from here; only it is trusted
CLIENT = "127.0.0.5"  # uclient's source address
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"


def doc_block(name: str) -> str:
    """The fenced block after `<!-- block: NAME -->` in the proxy guide."""
    text = DOC.read_text()
    match = re.search(rf"<!-- block: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/behind-a-proxy.md has no block {name!r}"
    return match.group(1)


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each example value; each must be in the block (the doc and the test
    cannot drift apart silently)."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the documented block"
        text = text.replace(old, new)
    return text


@dataclass
class Ports:
    udp: int
    tcp: int
    tls: int
    api: int
    admin: int
    web: int
    front_443: int
    front_3478: int
    front_5349: int


def _ports() -> Ports:
    """The proxies' and the web site's ports come from below the ephemeral range
    (32768-60999): no socket the kernel numbers for itself (a probe's, a client's) can
    take one between our check and the proxy's bind. Our server binds its own at once."""
    fixed: list[int] = []
    port = 24000 + (os.getpid() * 37 + len(_TAKEN) * 10) % 7000
    while len(fixed) < 4:
        port += 1
        if port not in _TAKEN and _free(port):
            fixed.append(port)
            _TAKEN.add(port)
    tcp = socket.SOCK_STREAM
    return Ports(
        free_port(), free_port(tcp), free_port(tcp), free_port(tcp), free_port(tcp), *fixed
    )


_TAKEN: set[int] = set()


def _free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


class _Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"web site\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Stack:
    """Our server, one proxy in front of it, coturn's echo peer."""

    kind: str
    ports: Ports
    turn: subprocess.Popen[bytes]
    log_path: Path
    peer_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client_lines(self) -> list[str]:
        """Log lines naming a client's 5-tuple, the self-probe's left out (it connects
        from the trusted address on purpose)."""
        return [
            ln
            for ln in self.log().splitlines()
            if "five_tuple=" in ln and "turnserver-self-probe" not in ln
        ]

    def allocations(self) -> list[dict[str, object]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.admin}/admin/v1/allocations",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            items: list[dict[str, object]] = json.load(resp)["allocations"]
            return items

    def uclient(self, port: int, source: str, *flags: str, count: int = 50) -> str:
        cmd = [
            require_tool("turnutils_uclient"),
            *["-p", str(port), "-r", str(self.peer_port), "-e", "127.0.0.1", "-X"],
            *["-u", "user", "-W", SECRET, "-L", source, "-c", "-n", str(count), *flags],
            "127.0.0.1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        return done.stdout + done.stderr


def _zero_loss(output: str) -> None:
    assert "Total lost packets 0" in output, output[-1500:]
    sent = re.findall(r"tot_send_bytes ~ (\d+)", output)
    received = re.findall(r"tot_recv_bytes ~ (\d+)", output)
    assert sent and int(sent[-1]) > 0 and received[-1] == sent[-1], output[-1500:]


def _turn_config(p: Ports) -> str:
    config = substitute(
        doc_block("turnserver"),
        {
            "udp://0.0.0.0:3478": f"udp://127.0.0.1:{p.udp}",
            "10.0.0.5:3478": f"127.0.0.1:{p.tcp}",
            "10.0.0.5:5349": f"127.0.0.1:{p.tls}",
            "10.0.0.2/32": f"{PROXY_SOURCE}/32",
        },
    )
    return config + (
        f"  max_connections_per_ip: {CAP}\n"  # (under stream:) the caps test below
        "api:\n  uris:\n"
        f"    - turn:127.0.0.1:{p.front_3478}?transport=tcp\n"
        f"    - turns:127.0.0.1:{p.front_443}?transport=tcp\n"
    )


def _haproxy_config(p: Ports, tmp: Path) -> str:
    combined = tmp / "turn.pem"
    combined.write_text(Path(CERT_FILE).read_text() + Path(KEY_FILE).read_text())
    main = substitute(
        doc_block("haproxy"),
        {
            "bind :443": f"bind 127.0.0.1:{p.front_443}",
            "bind :3478": f"bind 127.0.0.1:{p.front_3478}",
            "10.0.0.6:443": f"127.0.0.1:{p.web}",
            "10.0.0.5:5349": f"127.0.0.1:{p.tls}",
            "10.0.0.5:3478": f"127.0.0.1:{p.tcp}",
            "defaults\n": f"defaults\n    source {PROXY_SOURCE}  # (test: its own address)\n",
        },
    )
    terminating = substitute(
        doc_block("haproxy-terminating"),
        {
            "bind :5349": f"bind 127.0.0.1:{p.front_5349}",
            "/etc/haproxy/certs/turn.example.com.pem": str(combined),
        },
    )
    return main + "\n" + terminating


def _nginx_config(p: Ports, tmp: Path) -> str:
    stream = substitute(
        doc_block("nginx-stream"),
        {
            "listen 443;": f"listen 127.0.0.1:{p.front_443};",
            "listen 3478;": f"listen 127.0.0.1:{p.front_3478};",
            "10.0.0.6:443": f"127.0.0.1:{p.web}",
            "10.0.0.5:5349": f"127.0.0.1:{p.tls}",
            "10.0.0.5:3478": f"127.0.0.1:{p.tcp}",
            "stream {\n": f"stream {{\n    proxy_bind {PROXY_SOURCE};  # (test: its own address)\n",
        },
    )
    web = substitute(
        doc_block("nginx-web"),
        {
            "10.0.0.6:443": f"127.0.0.1:{p.web}",
            "/etc/ssl/certs/www.example.com.pem": CERT_FILE,
            "/etc/ssl/private/www.example.com.key": KEY_FILE,
            "10.0.0.2/32": f"{PROXY_SOURCE}/32",
        },
    )
    return (
        f"load_module {NGINX_STREAM};\n"
        f"error_log stderr notice;\npid {tmp}/nginx.pid;\nevents {{}}\n"
        f"{stream}\nhttp {{\n    access_log off;\n{web}}}\n"
    )


def _start_proxy(kind: str, p: Ports, tmp: Path) -> subprocess.Popen[bytes]:
    if kind == "haproxy":
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(_haproxy_config(p, tmp))
        cmd = [require_tool("haproxy", "haproxy"), "-db", "-f", str(cfg)]
        fronts = [p.front_443, p.front_3478, p.front_5349]
    else:
        require_tool("nginx", "nginx libnginx-mod-stream")
        if not Path(NGINX_STREAM).exists():
            require_tool("no-such-tool-libnginx-mod-stream", "libnginx-mod-stream")
        cfg = tmp / "nginx.conf"
        cfg.write_text(_nginx_config(p, tmp))
        cmd = ["nginx", "-e", "stderr", "-p", str(tmp), "-c", str(cfg), "-g", "daemon off;"]
        fronts = [p.front_443, p.front_3478, p.web]
    log = open(tmp / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()

    def listening() -> bool:
        assert proc.poll() is None, (tmp / f"{kind}.log").read_text()
        for port in fronts:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True

    try:
        wait_until(listening, timeout=15)
    except BaseException:
        stop_group(proc)
        raise
    return proc


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


CAP = 6  # stream.max_connections_per_ip for these servers (each worker counts its own)


@pytest.fixture(scope="module", params=["haproxy", "nginx"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    kind: str = request.param
    tmp = tmp_path_factory.mktemp(kind)
    p = _ports()
    web: http.server.ThreadingHTTPServer | None = None
    if kind == "haproxy":  # nginx serves its own web site (it must accept the header)
        web = _web_backend(p.web)
    cfg = tmp / "turnserver.yaml"
    cfg.write_text(_turn_config(p))
    lo = 36000 + (os.getpid() % 40) * 50 + (0 if kind == "haproxy" else 2000)
    peer_port = free_port()
    log_path = tmp / "turnserver.log"
    cmd = [
        *[sys.executable, "-m", "turnserver", "serve", "--config", str(cfg)],
        *loopback_args(SECRET, lo, lo + 399),
        *["--relay-ip", "127.0.0.1", "--user", "user:pass", "--cert", CERT_FILE, "--key", KEY_FILE],
        *["--api-listen", f"127.0.0.1:{p.api}", "--metrics-listen", "127.0.0.1:0"],
        *["--admin-listen", f"127.0.0.1:{p.admin}", "--admin-token", TOKEN],
        *["--log-level", "info", "--probe-interval", "5"],
    ]  # no --workers: the default count
    peer = subprocess.Popen(
        [require_tool("turnutils_peer"), "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    with open(log_path, "wb") as log:
        turn = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proxy = None
    try:
        wait_for_stun(turn, p.udp, 20)
        proxy = _start_proxy(kind, p, tmp)
        yield Stack(kind, p, turn, log_path, peer_port)
    finally:
        if proxy is not None:
            stop_group(proxy)
        stop_process(turn)
        stop_group(peer)
        if web is not None:
            web.shutdown()
            web.server_close()


def _web_backend(port: int) -> http.server.ThreadingHTTPServer:
    """The HTTPS site HAProxy shares 443 with (HAProxy sends it no PROXY header)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Web)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERT_FILE, KEY_FILE)
    ctx.set_alpn_protocols(["http/1.1"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---- the tests --------------------------------------------------------------------------


def test_uclient_relays_through_the_proxy_and_is_seen_as_itself(stack: Stack) -> None:
    """TCP through the proxy's 3478 and TLS through its shared 443 (and, with HAProxy,
    TLS it terminates itself): zero loss, and the server's log names uclient's source
    address (127.0.0.5) for each, never the proxy's (127.0.0.3)."""
    p = stack.ports
    _zero_loss(stack.uclient(p.front_3478, CLIENT, "-t"))
    _zero_loss(stack.uclient(p.front_443, "127.0.0.8", "-t", "-S"))
    lines = stack.client_lines()
    assert any(f"five_tuple=tcp:{CLIENT}:" in ln for ln in lines), lines[-10:]
    assert any("five_tuple=tls:127.0.0.8:" in ln for ln in lines), lines[-10:]
    if stack.kind == "haproxy":  # TLS ends at HAProxy: the server sees TCP from the client
        _zero_loss(stack.uclient(p.front_5349, "127.0.0.9", "-t", "-S"))
        assert any("five_tuple=tcp:127.0.0.9:" in ln for ln in stack.client_lines())
    assert not [ln for ln in stack.client_lines() if f":{PROXY_SOURCE}:" in ln]


def test_the_admin_listing_shows_the_client(stack: Stack) -> None:
    cmd = [
        require_tool("turnutils_uclient"),
        *["-p", str(stack.ports.front_3478), "-r", str(stack.peer_port), "-e", "127.0.0.1"],
        *["-X", "-u", "user", "-W", SECRET, "-L", "127.0.0.10", "-c", "-t", "-n", "300"],
        "127.0.0.1",
    ]  # 300 packets at 20 ms: about 6 s of media
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        mine = wait_until(
            lambda: [a for a in stack.allocations() if str(a["client"]).startswith("127.0.0.10:")],
            timeout=20,
        )
        assert mine[0]["transport"] == "tcp", mine
        clients = [str(a["client"]) for a in stack.allocations()]
        assert not [c for c in clients if c.startswith(f"{PROXY_SOURCE}:")], clients
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _zero_loss(out.decode(errors="replace"))


def _binding_through(port: int, source: str) -> tuple[socket.socket, object]:
    """A Binding over a new TCP connection from `source` through the proxy: the socket
    and its XOR-MAPPED-ADDRESS, or None when the server closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)))
    data = b""
    try:
        while len(data) < 20 or len(data) < 20 + int.from_bytes(data[2:4], "big"):
            chunk = sock.recv(4096)
            if not chunk:
                return sock, None
            data += chunk
    except (ConnectionResetError, TimeoutError):
        return sock, None
    return sock, decode_message(data).get(Attr.XOR_MAPPED_ADDRESS)


def test_caps_count_the_client_not_the_proxy(stack: Stack) -> None:
    """stream.max_connections_per_ip holds per client address behind the proxy: one
    client is capped while another, through the same proxy, still gets in. Each answer
    maps to the client's own address and port."""
    workers = os.cpu_count() or 1
    held: list[socket.socket] = []
    try:
        answered = 0
        for _ in range(CAP * workers + 4):
            sock, mapped = _binding_through(stack.ports.front_3478, "127.0.0.6")
            held.append(sock)
            if mapped is not None:
                assert mapped == sock.getsockname()[:2]
                answered += 1
        assert CAP <= answered <= CAP * workers, answered
        sock, mapped = _binding_through(stack.ports.front_3478, "127.0.0.7")
        held.append(sock)
        assert mapped == sock.getsockname()[:2]
    finally:
        for sock in held:
            sock.close()


def test_https_and_turn_share_443(stack: Stack) -> None:
    """ALPN h2/http/1.1 reaches the web site; stun.turn (alone, or after http/1.1 as
    coturn's client offers it) and no ALPN reach TURN."""
    ctx = ssl.create_default_context(cafile=CERT_FILE)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    url = f"https://127.0.0.1:{stack.ports.front_443}/"
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        assert resp.read() == b"web site\n"
    for alpn in (["stun.turn"], ["http/1.1", "stun.turn", "stun.nat-discovery"], None):
        tls = ssl.create_default_context(cafile=CERT_FILE)
        tls.check_hostname = False
        if alpn:
            tls.set_alpn_protocols(alpn)
        raw = socket.create_connection(
            ("127.0.0.1", stack.ports.front_443), timeout=5, source_address=("127.0.0.11", 0)
        )
        with tls.wrap_socket(raw) as sock:
            if alpn:
                assert sock.selected_alpn_protocol() == "stun.turn"
            sock.sendall(encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)))
            head = sock.recv(4096)
            assert decode_message(head).get(Attr.XOR_MAPPED_ADDRESS) == sock.getsockname()[:2]


def test_only_the_proxy_is_believed(stack: Stack) -> None:
    """A client that connects to the PROXY listener itself, header and all, is refused."""
    with socket.create_connection(
        ("127.0.0.1", stack.ports.tcp), timeout=5, source_address=(CLIENT, 0)
    ) as sock:
        header = encode_v2(("203.0.113.1", 1), ("127.0.0.1", stack.ports.tcp))
        try:  # refused at accept: the write may already find the connection gone
            sock.sendall(header + encode_message(Method.BINDING, MessageClass.REQUEST, b"x" * 12))
            assert sock.recv(4096) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass
    wait_until(lambda: f"refused a connection from {CLIENT}:" in stack.log(), timeout=5)
    assert "203.0.113.1" not in stack.log()


@pytest.mark.timeout(240)
def test_chromium_relay_only_through_the_proxy(stack: Stack) -> None:
    """Headless Chromium's relay-only calls over turn:…?transport=tcp and
    turns:…:443 through the proxy (the preflight page, uris from api.uris)."""
    from tests.support.browser import run_page

    report = asyncio.run(run_page(f"http://127.0.0.1:{stack.ports.api}/preflight"))
    assert "error" not in report, report
    by_transport = {r["transport"]: r for r in report["results"]}
    assert set(by_transport) == {"tcp", "tls"}, report
    for transport, r in by_transport.items():
        assert r["ok"], (transport, r)
        assert r["pair"]["localType"] == "relay" and r["pair"]["remoteType"] == "relay"
        assert r["audioPacketsReceived"] > 0, (transport, r)
    lines = stack.client_lines()
    assert any("five_tuple=tls:127.0.0.1:" in ln for ln in lines)
    assert any("five_tuple=tcp:127.0.0.1:" in ln for ln in lines)
    assert not [ln for ln in lines if f":{PROXY_SOURCE}:" in ln]
