"""turnserver preflight against our server and coturn, and the failures it must name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import free_port, run_cli, turnserver_process, wait_for_stun
from tests.support.server import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    CERT_FILE,
    SECRET,
    RunningServer,
    client_ssl_context,
    missing,
    require_tool,
)
from turnserver.client.ice_uri import IceUri, parse_uri
from turnserver.client.preflight import run
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.http.credentials import mint


def _uris(server: RunningServer, secret: str = SECRET) -> list[IceUri]:
    cred = mint(secret, "preflight", 600, time.time())
    (uh, up), (th, tp), (sh, sp) = (server.address_of(s) for s in ("udp", "tcp", "tls"))
    texts = [
        f"stun:{uh}:{up}",
        f"turn:{uh}:{up}?transport=udp",
        f"turn:{th}:{tp}?transport=tcp",
        f"turns:{sh}:{sp}?transport=tcp",
    ]
    return [parse_uri(t, cred.username, cred.password) for t in texts]


def test_uri_parsing() -> None:
    u = parse_uri("turns:turn.example.com?transport=tcp", "a", "b")
    assert (u.scheme, u.host, u.port, u.transport) == ("turns", "turn.example.com", 5349, "tls")
    assert parse_uri("turn:[2001:db8::1]:3478?transport=tcp").host == "2001:db8::1"
    assert parse_uri("stun:1.2.3.4").port == 3478
    with pytest.raises(ValueError):
        parse_uri("http://x")


async def test_all_transports_pass_against_our_server(server: RunningServer) -> None:
    report = await run(_uris(server), packets=20, timeout=3, ssl_context=client_ssl_context())
    assert report.ok, report
    assert report.working_transports == ["udp", "tcp", "tls"]
    for path in report.paths[1:]:
        assert path.media_ok and path.loss == 0 and path.rtt_ms is not None, path
    assert report.ice_servers_order[0].endswith("transport=udp")
    assert report.paths[0].reflexive.startswith("127.0.0.1:")


async def test_wrong_secret_is_explained(server: RunningServer) -> None:
    report = await run(
        _uris(server, secret="not-the-secret"),
        packets=5,
        timeout=3,
        ssl_context=client_ssl_context(),
    )
    assert not report.ok
    assert {p.error_code for p in report.paths[1:]} == {401}
    assert "credentials refused" in report.root_cause
    assert report.paths[0].reachable  # STUN still answers


async def test_closed_ports_and_a_server_that_drops_udp(server: RunningServer) -> None:
    cred = mint(SECRET, "p", 600, time.time())
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads and never answers
    silent.bind(("127.0.0.1", 0))
    closed_tcp = free_port(socket.SOCK_STREAM)
    try:
        uris = [
            parse_uri(
                f"turn:127.0.0.1:{silent.getsockname()[1]}?transport=udp",
                cred.username,
                cred.password,
            ),
            parse_uri(f"turn:127.0.0.1:{closed_tcp}?transport=tcp", cred.username, cred.password),
        ]
        report = await run(uris, packets=5, timeout=1.5)
        assert not report.ok
        udp, tcp = report.paths
        assert "no answer over udp" in udp.explanation
        assert "connection refused" in tcp.explanation
        assert "unreachable" in report.root_cause
        # UDP dropped, TCP fine: TURN over TCP is the path, and TURN is required
        th, tp = server.address_of("tcp")
        uris[1] = parse_uri(f"turn:{th}:{tp}?transport=tcp", cred.username, cred.password)
        report = await run(uris, packets=5, timeout=1.5)
        assert report.ok and report.working_transports == ["tcp"]
        assert report.turn_required is True
    finally:
        silent.close()


async def test_reads_a_saved_twilio_tokens_response(server: RunningServer, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        import base64

        auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        async with session.post(
            f"{server.api_base}/2010-04-01/Accounts/{ACCOUNT_SID}/Tokens.json",
            headers={"Authorization": f"Basic {auth}"},
        ) as resp:
            saved = tmp_path / "token.json"
            saved.write_text(json.dumps(await resp.json()))
    from turnserver.client.preflight import load_ice_servers

    uris = load_ice_servers(str(saved))
    assert {u.scheme for u in uris} == {"stun", "turn", "turns"}
    report = await run(uris, packets=5, timeout=3, ssl_context=client_ssl_context())
    assert report.ok and set(report.working_transports) == {"udp", "tcp", "tls"}


def _coturn() -> str:
    uclient = require_tool("turnutils_uclient")
    exe = str(Path(uclient).parent / "turnserver")  # coturn's, not our console script
    if not os.path.exists(exe):
        missing(
            "coturn's turnserver is not installed",
            f"coturn's turnserver not found next to {uclient}",
        )
    return exe


def test_cli_against_coturn(tmp_path: Path) -> None:
    exe = _coturn()
    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    ensure_self_signed(cert, key, ["localhost", "127.0.0.1"])
    proc = subprocess.Popen(
        [
            exe,
            "-n",
            "--listening-ip=127.0.0.1",
            f"--listening-port={port}",
            f"--tls-listening-port={tls_port}",
            f"--cert={cert}",
            f"--pkey={key}",
            "--relay-ip=127.0.0.1",
            "--min-port=41000",
            "--max-port=41100",
            "--use-auth-secret",
            "--static-auth-secret=coturn-secret",
            "--realm=example.org",
            "--allow-loopback-peers",
            "--no-dtls",
            "--no-cli",
            "--log-file=/dev/null",
            "--no-stdout-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_stun(proc, port, 10)  # coturn
        base = [
            sys.executable,
            "-m",
            "turnserver",
            "preflight",
            "--secret",
            "coturn-secret",
            "--ca",
            cert,
            "--packets",
            "10",
            "--timeout",
            "3",
        ]
        uris = [
            f"stun:127.0.0.1:{port}",
            f"turn:127.0.0.1:{port}?transport=udp",
            f"turn:127.0.0.1:{port}?transport=tcp",
            f"turns:127.0.0.1:{tls_port}",
        ]
        done = subprocess.run([*base, "--json", *uris], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["working_transports"] == ["udp", "tcp", "tls"]
        table = subprocess.run([*base, *uris], capture_output=True, text=True, timeout=60)
        assert "verdict: media flows through udp, tcp, tls" in table.stdout
        wrong = run_cli(
            "preflight",
            "--secret",
            "nope",
            "--timeout",
            "2",
            f"turn:127.0.0.1:{port}?transport=udp",
            timeout=60,
        )
        assert wrong.returncode == 1
        assert "credentials refused" in wrong.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def _preflight(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("preflight", "--timeout", "0.5", *args, timeout=60)


def test_cli_input_mistakes_are_named() -> None:
    port = free_port()
    done = _preflight(f"turn:127.0.0.1:{port}?transport=udp")
    assert done.returncode == 2 and "no credentials given" in done.stderr
    done = _preflight("--secret", "s", "--password", "p", f"turn:127.0.0.1:{port}")
    assert done.returncode == 2 and "not both" in done.stderr
    done = _preflight("--credentials", f"http://127.0.0.1:{port}/creds")
    assert done.returncode == 2 and "cannot reach the credentials endpoint" in done.stderr
    assert "<urlopen" not in done.stderr


def test_nothing_reachable_says_unknown_and_duplicates_collapse() -> None:
    port = free_port()  # nothing listens there
    uri = f"turn:127.0.0.1:{port}?transport=udp"
    done = _preflight("--secret", "s", "--json", uri, uri, "--packets", "1")
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert report["turn_required"] is None
    assert len(report["paths"]) == 1
    table = _preflight("--secret", "s", uri, "--packets", "1").stdout
    assert "TURN required: unknown" in table


def test_rfc5780_filtering_against_natdiscovery_and_coturn(tmp_path: Path) -> None:
    """RFC 5780 CHANGE-REQUEST: coturn's turnutils_natdiscovery checks our server (primary
    127.0.0.1, OTHER-ADDRESS on 127.0.0.2 and another port), and our preflight checks
    coturn. On loopback there is no NAT: both must find endpoint-independent behaviour,
    which needs answers from the other IP and port to arrive."""
    natdiscovery = require_tool("turnutils_natdiscovery")
    port, other = free_port(), free_port()
    with turnserver_process(
        tmp_path,
        "--secret",
        "s",
        "--listen",
        f"udp://127.0.0.2:{other}",
        "--other-address",
        f"127.0.0.2:{other}",
        "--relay-ip",
        "127.0.0.1",
        port=port,
    ):
        found = subprocess.run(
            [natdiscovery, "-m", "-f", "-p", str(port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "NAT with Endpoint Independent Mapping" in found, found
        assert "NAT with Endpoint Independent Filtering" in found, found
        assert f"Response origin: : 127.0.0.2:{other}" in found  # answered from there
        ours = run_cli(
            "preflight", "--json", "--timeout", "1", "--packets", "1", f"stun:127.0.0.1:{port}"
        )
        assert json.loads(ours.stdout)["nat_filtering"] == "endpoint-independent"
    coturn_port = free_port()
    coturn = subprocess.Popen(
        [
            _coturn(),
            "-n",
            "--listening-ip=127.0.0.1",
            "--listening-ip=127.0.0.2",
            f"--listening-port={coturn_port}",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--no-cli",
            "--relay-ip=127.0.0.1",
            "--use-auth-secret",
            "--static-auth-secret=s",
            "--realm=r",
            "--log-file=/dev/null",
            "--no-stdout-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_stun(coturn, coturn_port, 10)
        report = run_cli(
            "preflight",
            "--json",
            "--timeout",
            "1",
            "--packets",
            "1",
            f"stun:127.0.0.1:{coturn_port}",
        )
        assert json.loads(report.stdout)["nat_filtering"] == "endpoint-independent"
    finally:
        coturn.terminate()
        coturn.wait(10)


async def test_filtering_is_unknown_without_rfc5780(server: RunningServer) -> None:
    """A server with no OTHER-ADDRESS (or one answering 420) gives no filtering verdict,
    and says why, instead of guessing."""
    from turnserver.client.ice_uri import parse_uri
    from turnserver.client.nat import nat_filtering

    host, port = server.address
    found = await nat_filtering([parse_uri(f"stun:{host}:{port}")], 1.0)
    assert found == "unknown (the server offers no RFC 5780 OTHER-ADDRESS)"


# ---- what the preflight says when things go wrong


async def test_ca_keeps_the_host_name_check(server: RunningServer, tmp_path: Path) -> None:
    """--ca trusts a certificate, as a browser would, but still checks its name: a
    certificate for another name fails with the exact reason (only --insecure skips)."""
    other_cert, other_key = str(tmp_path / "o.pem"), str(tmp_path / "o.key")
    ensure_self_signed(other_cert, other_key, ["turn.example.org"])
    import ssl

    ctx = ssl.create_default_context(cafile=CERT_FILE)  # what --ca makes
    cred = mint(SECRET, "p", 600, time.time())
    host, port = server.address_of("tls")
    good = await run([parse_uri(f"turns:{host}:{port}", cred.username, cred.password)],
                     packets=5, timeout=3, ssl_context=ctx)  # fmt: skip
    assert good.ok  # the test certificate names 127.0.0.1
    wrong = ssl.create_default_context(cafile=other_cert)
    bad = await run([parse_uri(f"turns:{host}:{port}", cred.username, cred.password)],
                    packets=5, timeout=3, ssl_context=wrong)  # fmt: skip
    assert not bad.ok
    assert "certificate is refused" in bad.paths[0].explanation, bad.paths[0]


async def test_refusals_are_explained_by_their_reason(server: RunningServer) -> None:
    """A revoked user's 403 says revoked (not "peer policy"), an expired credential's 401
    says expired."""
    server.runtime.core.revoke("banned", time.time() + 600, "test", server.runtime.now())
    cred = mint(SECRET, "banned", 600, time.time())
    uh, up = server.address
    report = await run([parse_uri(f"turn:{uh}:{up}", cred.username, cred.password)],
                       packets=5, timeout=3)  # fmt: skip
    assert report.paths[0].error_code == 403
    assert "revoked" in report.paths[0].explanation, report.paths[0]
    old = mint(SECRET, "late", 1, time.time() - 100)
    report = await run([parse_uri(f"turn:{uh}:{up}", old.username, old.password)],
                       packets=5, timeout=3)  # fmt: skip
    assert "expired" in report.paths[0].explanation, report.paths[0]


async def test_turn_required_says_what_it_could_not_tell(server: RunningServer) -> None:
    cred = mint(SECRET, "p", 600, time.time())
    (uh, up), (sh, sp) = server.address, server.address_of("tls")
    only_tls = await run([parse_uri(f"turns:{sh}:{sp}", cred.username, cred.password)],
                         packets=5, timeout=3, ssl_context=client_ssl_context())  # fmt: skip
    assert only_tls.turn_required is None
    assert only_tls.turn_required_reason.startswith("unknown: no UDP URI was tested")
    udp = await run([parse_uri(f"turn:{uh}:{up}", cred.username, cred.password)],
                    packets=5, timeout=3)  # fmt: skip
    # one UDP address, no RFC 5780 OTHER-ADDRESS: mapping and filtering unknown
    assert udp.turn_required is None and "NAT mapping is unknown" in udp.turn_required_reason


def test_socket_errors_in_words_and_no_traceback_on_a_closed_pipe() -> None:
    port = free_port(socket.SOCK_STREAM)  # nothing listens
    done = _preflight("--secret", "s", f"turn:127.0.0.1:{port}?transport=tcp", "--packets", "1")
    assert "connection refused" in done.stdout and "Errno" not in done.stdout
    piped = subprocess.run(
        f"{sys.executable} -m turnserver preflight --json --timeout 0.5 --secret s "
        f"turn:127.0.0.1:{port}?transport=tcp | true",  # the reader is gone before we write
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
