"""--workers: processes sharing the listeners (SO_REUSEPORT), quotas held across them,
metrics summed, crashed workers restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.procs import free_port, loopback_args, turnserver_process
from tests.support.server import EchoProtocol
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.http.credentials import mint
from turnserver.testing import stun_ping

SECRET = "workers-secret"
pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


async def _get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def _ready_body(mport: int) -> str:
    """The supervisor's /readyz body once every worker is ready (within 10 s)."""
    status, body = 0, ""
    for _ in range(100):
        status, body = await _get(mport, "/readyz")
        if status == 200:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz {status}: {body}")


def _two_workers(tmp_path: Path, lo: int, hi: int, mport: int) -> Any:
    """Two workers on 127.0.0.1 with relay ports lo..hi, metrics on mport, no probe."""
    return turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, hi),
        "--probe-interval",
        "0",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
        "--workers",
        "2",
    )


async def _allocate(port: int, user: str) -> TurnClient | int | None:
    cred = mint(SECRET, user, 600, time.time())
    c = await TurnClient.connect(
        "udp", ("127.0.0.1", port), cred.username, cred.password, timeout=3
    )
    try:
        await c.allocate()
        return c
    except TurnClientError as exc:
        c.close()
        return exc.code


async def test_two_workers(tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol]) -> None:
    mport = free_port(socket.SOCK_STREAM)
    cfg = tmp_path / "w.yaml"
    cfg.write_text("allocations:\n  max_total: 8\n  max_per_user: 2\n")
    lo = 38000 + os.getpid() % 500
    with turnserver_process(
        tmp_path,
        "--config",
        str(cfg),
        *loopback_args(SECRET, lo, lo + 99),
        "--probe-interval",
        "1",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
        "--workers",
        "2",
        streams=True,
    ) as server:
        body = await _ready_body(mport)
        pids = {int(p) for p in __import__("re").findall(r'"pid": (\d+)', body)}
        assert len(pids) == 2
        # Per-user quota across workers: 6 source ports, one user, at most 2 succeed
        same = await asyncio.gather(*(_allocate(server.port, "same") for _ in range(6)))
        ok_same = [c for c in same if isinstance(c, TurnClient)]
        assert len(ok_same) == 2 and sorted(c for c in same if isinstance(c, int)) == [486] * 4
        # Total quota across workers: 8 in all
        many = await asyncio.gather(*(_allocate(server.port, f"u{i}") for i in range(10)))
        ok_many = [c for c in many if isinstance(c, TurnClient)]
        assert len(ok_many) == 6, many
        # Every allocation relays, whichever worker holds it
        for i, c in enumerate(ok_same + ok_many):
            await c.create_permission(echo_peer[0])
            c.send_indication(echo_peer[0], b"w%d" % i)
            assert (await c.receive(2))[1] == b"w%d" % i
        # One /metrics for both workers
        _, text = await _get(mport, "/metrics")
        active = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("turn_allocations_active{")
        )
        assert active == 8
        quota = [
            line
            for line in text.splitlines()
            if line.startswith("turn_allocation_failures_total{") and "quota" in line
        ]
        # at least the 6 refusals (a retransmitted Allocate is refused, and counted, again)
        assert sum(float(x.split()[-1]) for x in quota) >= 6

        for c in ok_same + ok_many:
            await c.refresh(0)
            c.close()
        # A crashed worker is restarted and logged
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(100):
            status, body = await _get(mport, "/readyz")
            if status == 200 and str(victim) not in body:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and str(victim) not in body
        assert "exited with -9; restarting" in server.log()
        again = await _allocate(server.port, "after-restart")
        assert isinstance(again, TurnClient)
        again.close()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(15) == 0
        assert "all workers stopped" in server.log()


def _worker_of(relayed_port: int, lo: int, hi: int, workers: int) -> int:
    size = (hi - lo + 1) // workers
    return min((relayed_port - lo) // size, workers - 1)


async def test_a_worker_crash_costs_other_workers_nothing(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    """kill -9 each worker in turn while clients on every worker relay: the clients of
    the surviving worker lose nothing (their packets still hash to the same socket)."""
    mport = free_port(socket.SOCK_STREAM)
    lo = 36000 + os.getpid() % 500
    hi = lo + 99
    with _two_workers(tmp_path, lo, hi, mport) as server:
        for victim_index in (0, 1):
            body = await _ready_body(mport)
            pids = {
                int(k): int(v)
                for k, v in __import__("re").findall(r'"(\d)": \{"ok": true, "pid": (\d+)', body)
            }
            clients: list[tuple[TurnClient, int]] = []
            for i in range(12):  # enough that both workers hold some
                cred = mint(SECRET, f"crash-{victim_index}-{i}", 600, time.time())
                c = await TurnClient.connect(
                    "udp", ("127.0.0.1", server.port), cred.username, cred.password, timeout=3
                )
                relayed, _ = await c.allocate()
                await c.channel_bind(0x4000, echo_peer[0])
                clients.append((c, _worker_of(relayed[1], lo, hi, 2)))
            assert {w for _, w in clients} == {0, 1}, "clients landed on one worker only"
            os.kill(pids[victim_index], signal.SIGKILL)
            lost: dict[int, int] = {}
            for round_ in range(20):  # 20 rounds over ~2 s, across the crash and restart
                for n, (c, worker) in enumerate(clients):
                    if worker == victim_index:
                        continue
                    payload = b"%d-%d" % (n, round_)
                    c.send_channel(0x4000, payload)
                    try:
                        _, data = await c.receive(1.0)
                        ok = data == payload
                    except TurnClientError:
                        ok = False
                    lost[n] = lost.get(n, 0) + (not ok)
                await asyncio.sleep(0.1)
            assert sum(lost.values()) == 0, lost
            # Survivors can still refresh (their allocation is where it was)
            for c, worker in clients:
                if worker != victim_index:
                    assert await c.refresh(600) == 600
            for c, _ in clients:
                c.close()
        assert "exited with -9; restarting" in server.log()


async def test_a_second_instance_cannot_join_the_ports(tmp_path: Path) -> None:
    port = free_port()
    with turnserver_process(
        tmp_path,
        "--secret",
        SECRET,
        "--probe-interval",
        "0",
        "--workers",
        "2",
        port=port,
        streams=True,
    ):
        for workers in ("2", "1"):
            run = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "turnserver",
                "serve",
                "--secret",
                "another-secret",
                "--listen",
                f"udp://127.0.0.1:{port}",
                "--listen",
                f"tcp://127.0.0.1:{port}",
                "--metrics-listen",
                "off",
                "--workers",
                workers,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(run.communicate(), 30)
            text = (out + err).decode()
            assert run.returncode == 1, text
            assert f"cannot bind udp://127.0.0.1:{port}" in text
            assert "Traceback" not in text and "Exception ignored" not in text


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """kill -9 of the supervisor (OOM killer, a careless script): its workers notice at
    once and stop, rather than live on as orphans holding the port and allocations."""
    mport = free_port(socket.SOCK_STREAM)
    lo = 37000 + os.getpid() % 500
    with _two_workers(tmp_path, lo, lo + 99, mport) as server:
        body = await _ready_body(mport)
        pids = [int(p) for p in __import__("re").findall(r'"pid": (\d+)', body)]
        assert len(pids) == 2, body
        c = await _allocate(server.port, "orphan")  # a live allocation on one worker
        assert isinstance(c, TurnClient)
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            alive = [p for p in pids if _running(p)]
        c.close()
        assert alive == [], f"workers {alive} outlived their supervisor"
        assert "the supervisor is gone; stopping" in server.log()
        # and the port is free for the next start
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", server.port))


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_while_starting_is_a_reload_not_an_exit(tmp_path: Path, workers: int) -> None:
    """A reload (SIGHUP) sent while the server starts, as a config-management run may do:
    from the moment our code runs (the first lines of `serve` ignore it until the event
    loop handles it) the server still comes up and serves; SIGHUP never ends it."""
    from turnserver.testing import serve_command, stop_process

    port = free_port()
    lo = 38000 + os.getpid() % 400 + workers * 100
    cmd = serve_command(
        port, *loopback_args(SECRET, lo, lo + 99), "--probe-interval", "0", workers=workers
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not _handles_sighup(proc.pid):  # the interpreter has started our code
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.002)
        hups = 0

        async def storm() -> None:  # a SIGHUP every 10 ms until the server answers
            nonlocal hups
            while True:
                proc.send_signal(signal.SIGHUP)
                hups += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(storm())
        try:
            while not await asyncio.to_thread(stun_ping, ("127.0.0.1", port)):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "did not start"
        finally:
            task.cancel()
        assert hups > 5
        await asyncio.sleep(0.5)  # the replayed reloads are done
        assert proc.poll() is None, log_path.read_text()
        c = await _allocate(port, "after-hup")
        assert isinstance(c, TurnClient), c
        c.close()
        assert "Traceback" not in log_path.read_text()
    finally:
        stop_process(proc)


def _handles_sighup(pid: int) -> bool:
    """SIGHUP is ignored or caught (/proc/PID/status SigIgn, SigCgt: bit 0 is signal 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigIgn", "SigCgt"))]
    return any(m & 1 for m in masks)


async def test_workers_run_with_the_tuned_collector(tmp_path: Path) -> None:
    """Workers get the same garbage-collector settings as one process (threshold 20,000,
    start-up frozen): with the default threshold of 700 the collector ran every few
    setups and scanned the live allocations (benchmarks/README.md). Read from each
    worker's python_gc_collections_total across 200 allocations."""
    mport = free_port(socket.SOCK_STREAM)
    lo = 37600 + os.getpid() % 300
    with _two_workers(tmp_path, lo, lo + 599, mport) as server:
        body = await _ready_body(mport)
        ports = [int(p) for p in __import__("re").findall(r'"metrics_port": (\d+)', body)]
        assert len(ports) == 2, body

        async def young_collections() -> int:
            total = 0
            for port in ports:
                _, text = await _get(port, "/metrics")
                total += sum(
                    int(float(line.split()[-1]))
                    for line in text.splitlines()
                    if line.startswith('python_gc_collections_total{generation="0"}')
                )
            return total

        before = await young_collections()
        clients: list[TurnClient] = []
        for batch in range(8):
            got = await asyncio.gather(
                *(_allocate(server.port, f"gc-{batch}-{i}") for i in range(25))
            )
            assert all(isinstance(c, TurnClient) for c in got), got
            clients += [c for c in got if isinstance(c, TurnClient)]
        after = await young_collections()
        for c in clients:
            c.close()
        # 200 setups: no young collection at a threshold of 20,000; about one per 25
        # setups (8 here) at the default of 700
        assert after - before <= 1, (before, after)
