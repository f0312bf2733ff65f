"""Developer mode: impairment semantics, refusal outside --dev, `turnserver dev`, the
TurnServerFixture (both modes) and the `turn_server` pytest plugin, with aioice (a TURN
client we did not write) relaying through real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aioice import turn

from tests.support import Collector
from tests.support.procs import run_cli, turnserver_process
from tests.support.server import EchoProtocol
from turnserver.core.state import RelayStats
from turnserver.io.impairment import (
    Impairment,
    ImpairmentError,
    Impairments,
    parse_assignments,
    parse_impairment,
)
from turnserver.testing import TurnServerFixture, free_port


def test_impairment_syntax() -> None:
    assert parse_impairment("block") == Impairment(block=True)
    assert parse_impairment("none") == Impairment()
    spec = parse_impairment("loss:5,delay:80,jitter:10,rate:500,duplicate:1,reorder:2")
    assert (spec.loss, spec.delay, spec.jitter, spec.rate) == (5, 80, 10, 500)
    assert spec.describe() == "loss:5,delay:80,jitter:10,rate:500,duplicate:1,reorder:2"
    assert parse_impairment(spec.describe()) == spec
    assert parse_assignments(["all=loss:1", "udp=block"])["udp"].block
    assert parse_assignments(["all=loss:1"])["tls"].loss == 1
    for bad, words in (
        ("loss", "needs a number"),
        ("loss:101", "between 0 and 100"),
        ("latency:5", "unknown impairment 'latency'"),
        ("loss:5,loss:6", "given twice"),
        ("delay:-1", "needs a number"),
    ):
        with pytest.raises(ImpairmentError, match=words):
            parse_impairment(bad)
    with pytest.raises(ImpairmentError, match="TRANSPORT=SPEC"):
        parse_assignments(["quic=block"])


async def _run(imp: Impairments, transport: str, n: int, size: int = 100) -> list[float]:
    """Push n packets through one direction; returns the delivery times (seconds)."""
    loop = asyncio.get_running_loop()
    arrived: list[float] = []
    start = loop.time()
    send = imp.client_to_peer(transport, lambda data, addr: arrived.append(loop.time() - start))
    for _ in range(n):
        send(b"x" * size, ("192.0.2.1", 9))
    deadline = loop.time() + 5
    while imp.scheduled and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return arrived


async def test_impairment_effects_are_seeded_and_bounded() -> None:
    loop = asyncio.get_running_loop()
    specs = parse_assignments(["udp=loss:30"])
    a = await _run(Impairments(loop, RelayStats(), 7, specs), "udp", 2000)
    b = await _run(Impairments(loop, RelayStats(), 7, specs), "udp", 2000)
    assert len(a) == len(b)  # the same seed drops the same packets
    assert 0.65 < len(a) / 2000 < 0.75
    imp = Impairments(loop, RelayStats(), 1, parse_assignments(["tcp=duplicate:100"]))
    assert len(await _run(imp, "tcp", 50)) == 100
    assert imp.counts[("tcp", "duplicated")] == 50
    assert len(await _run(imp, "udp", 50)) == 50  # other transports untouched
    imp = Impairments(loop, RelayStats(), 1, parse_assignments(["tls=delay:80"]))
    times = await _run(imp, "tls", 10)
    assert len(times) == 10 and min(times) >= 0.079
    # rate 80 kbit/s and 100-byte packets: 100 a second; 1 s of queue at most
    imp = Impairments(loop, RelayStats(), 1, parse_assignments(["udp=rate:80"]))
    times = await _run(imp, "udp", 300)
    assert 95 <= len(times) <= 105
    assert imp.counts[("udp", "rate_dropped")] == 300 - len(times)
    assert 0.9 < max(times) <= 1.1
    imp = Impairments(loop, RelayStats(), 1, parse_assignments(["udp=block"]))
    assert await _run(imp, "udp", 10) == [] and imp.counts[("udp", "blocked")] == 10


def test_impairment_refused_without_dev(tmp_path: Path) -> None:
    result = run_cli("serve", "--secret", "s", "--impair", "udp=block")
    assert result.returncode == 2
    assert "impairment is for development only; it needs --dev" in result.stderr
    result = run_cli("serve", "--secret", "s", "--impair", "udp=lose:5", "--dev")
    assert result.returncode == 2 and "unknown impairment 'lose'" in result.stderr
    result = run_cli("serve", "--secret", "s", "--dev", "--workers", "2")
    assert result.returncode == 2 and "developer mode runs one worker" in result.stderr
    config = tmp_path / "c.yaml"
    config.write_text("auth:\n  secrets: [s]\ndev:\n  impair: [udp=block]\n")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2 and "dev.impair" in result.stderr


def test_dev_endpoint_absent_without_dev(tmp_path: Path) -> None:
    for dev in (False, True):
        api = free_port()
        args = ["--secret", "s", "--allow-loopback-peers", "--api-listen", f"127.0.0.1:{api}"]
        with turnserver_process(tmp_path, *args, *(["--dev"] if dev else [])) as server:
            url = f"http://127.0.0.1:{api}/dev/v1/impairment"
            if not dev:
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(url, timeout=5)
                assert err.value.code == 404
                assert "DEVELOPER MODE" not in server.log()
            else:
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
                assert body["impairment"] == {"udp": "none", "tcp": "none", "tls": "none"}
                assert "DEVELOPER MODE" in server.log()


async def _echo_rtts(
    turn_server: TurnServerFixture, transport: str, count: int, connect_timeout: float = 10
) -> list[float]:
    """aioice relays `count` datagrams to a loopback echo peer; their round-trip times
    (inf for a lost one)."""
    loop = asyncio.get_running_loop()
    echo_t, _ = await loop.create_datagram_endpoint(EchoProtocol, local_addr=("127.0.0.1", 0))
    peer = echo_t.get_extra_info("sockname")
    relay_t, proto = await asyncio.wait_for(
        turn.create_turn_endpoint(
            Collector,
            server_addr=("127.0.0.1", turn_server.port(transport)),
            username=turn_server.username,
            password=turn_server.credential,
            transport=transport,
        ),
        connect_timeout,
    )
    rtts: list[float] = []
    try:
        for i in range(count):
            sent = time.monotonic()
            relay_t.sendto(b"ping %d" % i, peer)
            try:
                await asyncio.wait_for(proto.queue.get(), 1.0)
                rtts.append(time.monotonic() - sent)
            except TimeoutError:
                rtts.append(float("inf"))
    finally:
        relay_t.close()
        echo_t.close()
    return rtts


@pytest.mark.timeout(120)
@pytest.mark.one_loop
async def test_fixture_impairs_live_over_real_sockets() -> None:
    async with TurnServerFixture() as server:
        base = await _echo_rtts(server, "udp", 5)
        assert max(base) < 0.1
        deadline = time.monotonic() + 5
        while server.allocations() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # aioice releases its allocation as it closes
        assert server.allocations() == []
        state = server.impair(udp="delay:100")
        assert state["impairment"]["udp"] == "delay:100"
        slow = await _echo_rtts(server, "udp", 5)
        # the echo crosses the relay twice (client to peer, peer to client): 200 ms
        assert min(slow) >= 0.19
        server.impair(udp="block")
        with pytest.raises((TimeoutError, ConnectionError)):
            await _echo_rtts(server, "udp", 1, 3)  # the firewall drops the Allocate
        assert min(await _echo_rtts(server, "tcp", 3)) < 0.1  # TCP still works
        counts = server.impairment()["counts"]
        assert counts["udp"]["delayed"] == 10 and counts["udp"]["blocked"] >= 1
        server.impair(all="none")
        assert max(await _echo_rtts(server, "udp", 3)) < 0.1


@pytest.mark.timeout(60)
async def test_in_process_fixture_and_allocations() -> None:
    async with TurnServerFixture(in_process=True, impair={"tcp": "duplicate:100"}) as server:
        relay_t, proto = await turn.create_turn_endpoint(
            Collector,
            server_addr=("127.0.0.1", server.port("tcp")),
            username=server.username,
            password=server.credential,
            transport="tcp",
        )
        try:
            allocations = server.allocations()
            assert len(allocations) == 1 and allocations[0]["transport"] == "tcp"
            loop = asyncio.get_running_loop()
            echo_t, _ = await loop.create_datagram_endpoint(
                EchoProtocol, local_addr=("127.0.0.1", 0)
            )
            relay_t.sendto(b"twice", echo_t.get_extra_info("sockname"))
            # duplicated on the way out and on the way back: four copies
            got = [await asyncio.wait_for(proto.queue.get(), 3) for _ in range(4)]
            assert got == [b"twice"] * 4
            echo_t.close()
        finally:
            relay_t.close()
        assert server.impairment()["counts"]["tcp"]["duplicated"] == 3


@pytest.mark.turn_impair(tls="loss:100")
def test_pytest_plugin_fixture(turn_server: TurnServerFixture) -> None:
    servers = turn_server.ice_servers()
    assert servers[0]["urls"] == [
        f"turn:127.0.0.1:{turn_server.port('udp')}?transport=udp",
        f"turn:127.0.0.1:{turn_server.port('tcp')}?transport=tcp",
        f"turns:127.0.0.1:{turn_server.port('tls')}?transport=tcp",
    ]
    assert servers[0]["username"] == turn_server.username
    assert turn_server.ice_servers(relay_only=False)[0]["urls"][0].startswith("stun:")
    assert turn_server.impairment()["impairment"]["tls"] == "loss:100"


def test_turnserver_dev_command_prints_what_a_developer_needs(tmp_path: Path) -> None:
    with TurnServerFixture(state_dir=tmp_path) as server:
        log = server.log_path.read_text()
        assert "TURN server ready on udp://127.0.0.1:" in log
        assert "username: " in log and '"iceTransportPolicy": "relay"' in log
        assert f"{server.info['api']}/preflight" in log and "curl -s -u AC" in log
        assert "--ignore-certificate-errors-spki-list=" in log
        assert f'-d \'{{"udp": "block"}}\' {server.info["impairment_url"]}' in log
        assert "DEVELOPER MODE" in log
        assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
        # the banner lists each file and its mode as they are on disk
        files = re.search(r"Files in \S+: (.*)", log)
        assert files, log
        listed = dict(item.split() for item in files.group(1).split(", "))
        on_disk = {
            p.name: f"{p.stat().st_mode & 0o777:04o}"
            for p in tmp_path.iterdir()
            if p.is_file() and p.name in listed
        }
        assert listed == on_disk and listed["key.pem"] == "0600", listed
        assert {"secret", "api-key", "account", "cert.pem", "key.pem"} <= set(listed)
        page = urllib.request.urlopen(server.info["preflight"], timeout=5)
        assert page.status == 200


@pytest.mark.one_loop
async def test_impaired_packets_are_counted_in_metrics(tmp_path: Path) -> None:
    """serve --dev with a YAML impairment: what it drops shows in /metrics."""
    config = tmp_path / "dev.yaml"
    config.write_text("dev:\n  enabled: true\n  impair: [udp=loss:100]\n  seed: 9\n")
    metrics = free_port()
    args = ["--secret", "s", "--allow-loopback-peers", "--config", str(config)]
    with turnserver_process(tmp_path, *args, "--metrics-listen", f"127.0.0.1:{metrics}") as srv:
        from turnserver.ops.http.credentials import mint

        cred = mint("s", "m", 600, time.time())
        loop = asyncio.get_running_loop()
        echo_t, _ = await loop.create_datagram_endpoint(EchoProtocol, local_addr=("127.0.0.1", 0))
        relay_t, proto = await turn.create_turn_endpoint(
            Collector,
            server_addr=("127.0.0.1", srv.port),
            username=cred.username,
            password=cred.password,
        )
        try:
            for _ in range(5):
                relay_t.sendto(b"lost", echo_t.get_extra_info("sockname"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(proto.queue.get(), 1.0)
        finally:
            relay_t.close()
            echo_t.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read()
        lines = [
            line
            for line in text.decode().splitlines()
            if line.startswith('turn_dev_impaired_packets_total{action="lost",transport="udp"}')
        ]
        assert lines and float(lines[0].split()[-1]) >= 5, lines  # all 5 (aioice may resend)
        assert "seed 9" in srv.log() and "DEVELOPER MODE" in srv.log()
