"""Workers are one server: what works with one process works with the default worker
count (one per CPU, 2 in CI) — RFC 6062 across workers, readiness at start, merged
metrics that tell the truth, a drain that reads every listener socket, exact quotas,
revocations that survive reloads and restarts, a supervisor that survives descriptor
exhaustion, and a bounded /metrics cost."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import WORKER_COUNTS, eventually
from tests.support.procs import background, free_port, loopback_args, turnserver_process
from tests.support.server import EchoProtocol, require_tool
from turnserver.client.turnclient import TurnClient, TurnClientError
from turnserver.ops.dev.selfsigned import ensure_self_signed
from turnserver.ops.http.credentials import mint
from turnserver.ops.telemetry.worker_metrics import MERGE_RULES
from turnserver.stun import MessageClass, Method, decode_message, encode_message

SECRET = "one-server-secret"
pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


async def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.text()


async def _ready(mport: int, timeout: float = 15.0) -> str:
    async def check() -> str:
        status, body = await _get(mport, "/readyz")
        return body if status == 200 else ""

    return await eventually(check, timeout, what="/readyz 200")


async def _client(port: int, user: str, transport: str = "udp") -> TurnClient:
    cred = mint(SECRET, user, 600, time.time())
    return await TurnClient.connect(
        transport, ("127.0.0.1", port), cred.username, cred.password, timeout=3
    )


async def _allocate(port: int, user: str) -> TurnClient | int | None:
    c = await _client(port, user)
    try:
        await c.allocate()
        return c
    except TurnClientError as exc:
        c.close()
        return exc.code


def _lo(offset: int, width: int = 200) -> int:
    return 20000 + (os.getpid() * 13 + offset * 997) % 9000 // width * width


# ---- 1. RFC 6062 ConnectionBind on whichever worker accepts it --------------------------


async def test_rfc6062_connection_bind_reaches_the_owning_worker(tmp_path: Path) -> None:
    """uclient -T (client-to-client TCP relay) and -T -e (to a peer): the data connection
    carrying ConnectionBind lands on any worker; the worker that owns the CONNECTION-ID
    hands the peer connection over. 20 of 20 runs of each, default worker count."""
    uclient = require_tool("turnutils_uclient")
    peer_bin = require_tool("turnutils_peer")
    peer_port = free_port()
    lo = _lo(1, 1000)
    args = [*loopback_args(SECRET, lo, lo + 999), "--log-level", "info", "--probe-interval", "0"]
    with (
        background([peer_bin, "-L", "127.0.0.1", "-p", str(peer_port)]),
        turnserver_process(tmp_path, *args, streams=True, workers=None) as server,
    ):

        def run(extra: list[str]) -> str:
            cmd = [uclient, "-T", "-p", str(server.port), "-u", "user", "-W", SECRET, *extra]
            done = subprocess.run([*cmd, "127.0.0.1"], capture_output=True, text=True, timeout=90)
            return done.stdout + done.stderr

        cases = [[] for _ in range(20)] + [["-e", "127.0.0.1", "-r", str(peer_port)]] * 20
        with ThreadPoolExecutor(10) as pool:
            outputs = await asyncio.to_thread(lambda: list(pool.map(run, cases)))

        def ok(out: str) -> bool:
            totals = re.findall(r"tot_send_bytes ~ (\d+), tot_recv_bytes ~ (\d+)", out)
            return (
                "Total lost packets 0" in out
                and bool(totals)
                and int(totals[-1][0]) > 0
                and totals[-1][0] == totals[-1][1]
            )

        failed = [(i, out[-800:]) for i, out in enumerate(outputs) if not ok(out)]
        log = server.log()
        assert not failed, (failed[:2], [ln for ln in log.splitlines() if "connection_bind" in ln])
        assert "code=400" not in log and "Traceback" not in log


# ---- 2. readiness at start ---------------------------------------------------------------


async def test_ready_at_start_with_no_false_probe_failure(tmp_path: Path) -> None:
    """10 starts with the default worker count and the self-probe on: /readyz turns 200
    without a single failed probe (a worker's first probe may reach its sibling)."""
    for attempt in range(10):
        mport = free_port(socket.SOCK_STREAM)
        lo = _lo(2 + attempt)
        started = time.monotonic()
        with turnserver_process(
            tmp_path,
            *loopback_args(SECRET, lo, lo + 199),
            "--probe-interval",
            "30",
            streams=True,
            workers=None,
            metrics=f"127.0.0.1:{mport}",
        ) as server:
            body = await _ready(mport, timeout=10)
            took = time.monotonic() - started
            assert len(json.loads(body)["workers"]) >= 2, body
            log = server.log()
            assert "self-probe" not in log or "failed" not in log, (attempt, log)
            assert took < 10, took


# ---- 3. merged metrics -----------------------------------------------------------------


def _series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _family_of(sample: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in MERGE_RULES:
            return sample[: -len(suffix)]
    return sample


async def _metrics_under_load(
    tmp_path: Path, workers: int | None, echo: tuple[str, int]
) -> tuple[dict[Any, float], str]:
    """A fixed load, then the server's /metrics: allocations (two refused at the
    per-user cap), permissions, relayed packets, credentials API requests; returns the
    series and the certificate served."""
    mport = free_port(socket.SOCK_STREAM)
    api = free_port(socket.SOCK_STREAM)
    cert, key = str(tmp_path.parent / "cert.pem"), str(tmp_path.parent / "key.pem")
    ensure_self_signed(cert, key, ["localhost", "127.0.0.1"])  # the same for both runs
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / f"m{workers}.yaml"
    cfg.write_text(
        "allocations:\n  max_per_user: 10\n  max_permissions: 128\n"
        "api:\n  keys: [metrics-test-key]\n"
    )
    lo = _lo(20 + (workers or 0), 400)
    with turnserver_process(
        tmp_path,
        "--config",
        str(cfg),
        *loopback_args(SECRET, lo, lo + 399),
        "--probe-interval",
        "0",
        "--api-listen",
        f"127.0.0.1:{api}",
        "--cert",
        cert,
        "--key",
        key,
        streams=True,
        tls_port=free_port(socket.SOCK_STREAM),
        workers=workers,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        await _ready(mport)
        got = [await _allocate(server.port, "loaded-user") for _ in range(12)]
        live = [c for c in got if isinstance(c, TurnClient)]
        assert len(live) == 10 and got.count(486) == 2, got
        for n, c in enumerate(live):
            await c.create_permission(echo)
            c.send_indication(echo, b"m%d" % n)
            assert (await c.receive(3))[1] == b"m%d" % n
        for _ in range(3):
            status, _ = await _get(
                api, "/api/v1/ice-servers?username=x", {"X-API-Key": "metrics-test-key"}
            )
            assert status == 200
        status, text = await _get(mport, "/metrics")
        assert status == 200
        for c in live:
            c.close()
        return _series(text), cert


# families whose values depend on the load alone: equal with one worker and with several
_DETERMINISTIC = {
    "turn_allocations",
    "turn_allocation_failures",
    "turn_auth_failures",
    "turn_requests",
    "turn_request_failures",
    "turn_allocations_active",
    "turn_permissions_active",
    "turn_channels_active",
    "turn_relayed_packets",
    "turn_relayed_bytes",
    "turn_peer_denied",
    "turn_api_requests",
    "turn_api_rate_limited",
    "turn_tls_certificate_expiry_timestamp_seconds",
    "turn_offload_enabled",
    "turn_probe_success",
    "turn_metrics_unmerged_families",
    "turn_build_info",
    "python_info",
}


async def test_merged_metrics_match_one_process(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    """Every series of a two-worker server against a one-worker server under the same
    config and load: the same series, each family with a declared merge rule, equal
    values where they depend on the load and configuration only, limits as configured,
    the credentials API's own series present."""
    one, cert = await _metrics_under_load(tmp_path / "one", 1, echo_peer[0])
    many, _ = await _metrics_under_load(tmp_path / "many", None, echo_peer[0])
    families = {_family_of(name) for name, _ in many}
    assert families - set(MERGE_RULES) <= {"turn_metrics_unmerged_families"}, sorted(
        families - set(MERGE_RULES)
    )
    assert many[("turn_metrics_unmerged_families", ())] == 0
    # the same series (process_* and python_gc_* labels are the same too)
    assert set(one) == set(many), set(one) ^ set(many)
    for key, value in one.items():
        # (Binding requests: the harness pings until the server answers, a varying count)
        if _family_of(key[0]) in _DETERMINISTIC and ("method", "binding") not in key[1]:
            assert many[key] == value, (key, value, many[key])
    limits = {dict(k[1])["name"]: v for k, v in many.items() if k[0] == "turn_limit"}
    assert limits["permissions_per_allocation"] == 128
    assert limits["allocations_per_user"] == 10
    assert limits["allocations"] == limits["descriptors"] or limits["allocations"] <= 400
    from cryptography import x509

    expiry = x509.load_pem_x509_certificate(Path(cert).read_bytes()).not_valid_after_utc
    key = ("turn_tls_certificate_expiry_timestamp_seconds", ())
    assert many[key] == int(expiry.timestamp())
    api_key = ("turn_api_requests_total", (("endpoint", "/api/v1/ice-servers"), ("status", "200")))
    assert many[api_key] == 3
    assert many[("turn_workers", (("state", "alive"),))] >= 2


# ---- 4. the drain reads every listener socket --------------------------------------------


def _binding(port: int) -> bool:
    req = encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(req, ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
    return decode_message(data).message_class == MessageClass.SUCCESS


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_drain_answers_on_every_listener_socket(tmp_path: Path, workers: int | None) -> None:
    """SIGTERM with a live allocation: until the drain ends, Binding requests from 20
    new source ports are all answered (whichever worker's socket they hash to, idle
    workers included) and new Allocates get 508, not silence."""
    mport = free_port(socket.SOCK_STREAM)
    lo = _lo(40 + (workers or 0))
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 199),
        "--probe-interval",
        "0",
        "--drain-timeout",
        "30",
        workers=workers,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        await _ready(mport)
        held = await _allocate(server.port, "keeps-the-drain-going")
        assert isinstance(held, TurnClient)
        assert all(await asyncio.to_thread(lambda: [_binding(server.port) for _ in range(20)]))
        server.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: "draining" in server.log(), 10)
        await asyncio.sleep(0.5)  # idle workers would have exited by now
        answered = await asyncio.to_thread(lambda: [_binding(server.port) for _ in range(20)])
        assert sum(answered) == 20, answered
        refused = [await _allocate(server.port, f"late-{i}") for i in range(4)]
        assert refused == [508] * 4, refused
        status, _ = await _get(mport, "/readyz")
        assert status == 503
        assert await held.refresh(0) == 0
        held.close()
        assert server.proc.wait(20) == 0
        assert "Traceback" not in server.log()


# ---- 5. exact quotas ---------------------------------------------------------------------


async def test_quotas_are_exact_by_full_key_across_workers(tmp_path: Path) -> None:
    """max_per_user 1 with the default worker count: 300 users with one allocation each
    are all accepted (bucketed counts refused 5 % of them), a second allocation of any
    of them is refused, and releases count back."""
    cfg = tmp_path / "q.yaml"
    cfg.write_text("allocations:\n  max_per_user: 1\n  max_per_client_ip: 0\n")
    lo = _lo(60, 1000)
    mport = free_port(socket.SOCK_STREAM)
    with turnserver_process(
        tmp_path,
        "--config",
        str(cfg),
        *loopback_args(SECRET, lo, lo + 999),
        "--probe-interval",
        "0",
        workers=None,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        await _ready(mport)
        rng = random.Random(26)
        users = [f"user-{rng.getrandbits(48):012x}" for _ in range(300)]
        clients: list[TurnClient] = []
        for batch in range(0, 300, 50):
            got = await asyncio.gather(
                *(_allocate(server.port, u) for u in users[batch : batch + 50])
            )
            refused = [g for g in got if not isinstance(g, TurnClient)]
            assert refused == [], refused
            clients += [g for g in got if isinstance(g, TurnClient)]
        again = await asyncio.gather(*(_allocate(server.port, u) for u in users[:20]))
        assert again == [486] * 20, again
        for c in clients[:20]:
            assert await c.refresh(0) == 0
        back = await asyncio.gather(*(_allocate(server.port, u) for u in users[:20]))
        assert all(isinstance(b, TurnClient) for b in back), back
        for c in clients + [b for b in back if isinstance(b, TurnClient)]:
            c.close()


# ---- 6. revocations hold through reloads and restarts -----------------------------------


async def _revoke(admin: int, token: str, user: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{admin}/admin/v1/revocations",
            json={"user": user, "for": "1h", "reason": "test"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("workers", WORKER_COUNTS)
async def test_revocations_survive_sighup_and_worker_restarts(
    tmp_path: Path, workers: int | None
) -> None:
    """No revocations_file (kept in memory): a user revoked through the admin API stays
    refused after SIGHUP and after kill -9 of a worker."""
    mport = free_port(socket.SOCK_STREAM)
    admin = free_port(socket.SOCK_STREAM)
    token = "admin-token-for-revocations"
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"admin:\n  listen: 127.0.0.1:{admin}\n  tokens: [{token}]\n")
    lo = _lo(70 + (workers or 0))
    with turnserver_process(
        tmp_path,
        "--config",
        str(cfg),
        *loopback_args(SECRET, lo, lo + 199),
        "--probe-interval",
        "0",
        workers=workers,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        body = await _ready(mport)
        await _revoke(admin, token, "mallory")

        async def all_refused() -> bool:
            got = [await _allocate(server.port, "mallory") for _ in range(6)]
            assert got == [403] * 6, got
            return True

        await all_refused()
        server.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "reloaded" in server.log(), 10)
        await all_refused()
        pids = [int(p) for p in re.findall(r'"pid": (\d+)', body)]
        if pids:  # the default worker count: kill one, it is restarted
            os.kill(pids[0], signal.SIGKILL)
            await eventually(lambda: "exited with -9; restarting" in server.log(), 10)
            await _ready(mport)
            await all_refused()
        ok = await _allocate(server.port, "alice")
        assert isinstance(ok, TurnClient)
        ok.close()


# ---- 7. the supervisor under descriptor pressure ----------------------------------------


async def test_supervisor_survives_descriptor_exhaustion(tmp_path: Path) -> None:
    """The supervisor's descriptors spent (its RLIMIT_NOFILE lowered to what it holds,
    then connections to its metrics port): a worker killed meanwhile cannot be respawned;
    the supervisor keeps running, counts and retries with backoff, logs once per interval
    (no traceback per accept or spawn attempt), and the worker comes back once
    descriptors are free."""
    mport = free_port(socket.SOCK_STREAM)
    lo = _lo(80)
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 199),
        "--probe-interval",
        "0",
        workers=2,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        body = await _ready(mport)
        pids = [int(p) for p in re.findall(r'"pid": (\d+)', body)]
        sup = server.proc.pid
        limits = resource.prlimit(sup, resource.RLIMIT_NOFILE)
        held = len(os.listdir(f"/proc/{sup}/fd"))
        resource.prlimit(sup, resource.RLIMIT_NOFILE, (held + 2, limits[1]))
        idle = []
        try:
            for _ in range(50):  # accept() fails with EMFILE past the first two
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", mport))
                idle.append(s)
            os.kill(pids[0], signal.SIGKILL)
            await eventually(lambda: "cannot start worker" in server.log(), 15)
            await asyncio.sleep(2.0)  # several retries and accept failures
            assert server.proc.poll() is None, server.log()[-3000:]
        finally:
            for s in idle:
                s.close()
            resource.prlimit(sup, resource.RLIMIT_NOFILE, limits)
        await _ready(mport, timeout=40)
        text = server.log()
        assert len(text) < 20_000, len(text)
        assert text.count("cannot start worker") <= 2, text[-3000:]
        assert text.count("Traceback") <= 2, text[-3000:]
        status, metrics = await _get(mport, "/metrics")
        assert status == 200
        failures = _series(metrics)[("turn_worker_spawn_failures_total", ())]
        assert failures >= 1
        c = await _allocate(server.port, "after-pressure")
        assert isinstance(c, TurnClient)
        c.close()


# ---- 8. /metrics costs a bounded share of a core ------------------------------------------


async def test_a_scrape_flood_is_throttled(tmp_path: Path) -> None:
    """200 scrapes, 20 at a time, against the default worker count: every one answered
    with a rendering made after it arrived, at most 4 renderings a second past a burst
    of 8 (the rest share one)."""
    mport = free_port(socket.SOCK_STREAM)
    lo = _lo(90)
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 199),
        "--probe-interval",
        "0",
        workers=None,
        metrics=f"127.0.0.1:{mport}",
    ):
        await _ready(mport)
        before = _series((await _get(mport, "/metrics"))[1])
        started = time.monotonic()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=20),
            timeout=aiohttp.ClientTimeout(total=30),  # a scrape left unanswered fails here
        ) as session:

            async def one() -> int:
                async with session.get(f"http://127.0.0.1:{mport}/metrics") as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(200)))
        elapsed = time.monotonic() - started
        assert statuses == [200] * 200
        after = _series((await _get(mport, "/metrics"))[1])
        key = ("turn_metrics_scrapes_total", (("result", "rendered"),))
        shared_key = ("turn_metrics_scrapes_total", (("result", "shared"),))
        rendered = after[key] - before[key] - 1  # (this last scrape's own rendering)
        shared = after[shared_key] - before[shared_key]
        assert rendered + shared >= 200, (rendered, shared)
        assert rendered <= 8 + 4 * (elapsed + 0.5), (rendered, elapsed)


# ---- 9. start-up lines ----------------------------------------------------------------------


async def test_a_busy_metrics_port_is_one_clean_line(tmp_path: Path) -> None:
    """With workers, a metrics port that is taken stops the start as with one process:
    one line naming it, exit 1, nothing leaked."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "turnserver",
                "serve",
                "--secret",
                SECRET,
                "--listen",
                f"udp://127.0.0.1:{free_port()}",
                "--workers",
                "2",
                "--metrics-listen",
                f"127.0.0.1:{taken}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert f"cannot bind metrics on 127.0.0.1:{taken}" in text
    assert "Traceback" not in text and "leaked" not in text, text
    assert len(text.strip().splitlines()) <= 2, text


async def test_worker_json_lines_say_which_worker_and_the_api_is_logged(tmp_path: Path) -> None:
    mport = free_port(socket.SOCK_STREAM)
    api = free_port(socket.SOCK_STREAM)
    lo = _lo(95)
    with turnserver_process(
        tmp_path,
        *loopback_args(SECRET, lo, lo + 199),
        "--probe-interval",
        "0",
        "--log-format",
        "json",
        "--log-level",
        "info",
        "--api-listen",
        f"127.0.0.1:{api}",
        workers=2,
        metrics=f"127.0.0.1:{mport}",
    ) as server:
        await _ready(mport)
        c = await _allocate(server.port, "json-lines")
        assert isinstance(c, TurnClient)
        await c.refresh(0)
        c.close()
        await eventually(lambda: "allocation ended" in server.log(), 5)
        lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
        created = [ln for ln in lines if ln["msg"].startswith("allocation created")]
        assert created and all(ln["worker"] in (0, 1) for ln in created), created
        assert any(f"credentials API on http://127.0.0.1:{api}" in ln["msg"] for ln in lines)
