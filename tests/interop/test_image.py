"""The container image as an operator runs it (Dockerfile, built with podman): it
starts with the reference config, answers STUN and TURN, reports health through its
HEALTHCHECK, drains on SIGTERM with a live allocation and exits 0, falls back cleanly
with `--offload auto` and no capabilities, and runs the kernel fast path with the flags
the Dockerfile documents. Both with the default worker count and with one worker."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import WORKER_COUNTS, wait_until
from tests.support.container import (
    ENV,
    ROOT,
    Container,
    build_image,
    config_dir,
    container,
    podman,
    require_podman,
)
from turnserver.testing import free_port, stun_ping

SECRET = "image-test-secret"
CLIENT = Path(__file__).parent / "container_client.py"
CONFIG = "/etc/turnserver/turnserver.yaml"


@pytest.fixture(scope="module")
def image() -> str:
    require_podman()
    return build_image()


@pytest.fixture
def etc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """The reference config as an operator fills it in (its two placeholders: the
    relay address and the secrets file), on a free loopback port; mounted read-only."""
    port = free_port()
    text = (ROOT / "config" / "turnserver.yaml").read_text()
    text = text.replace("ip: [192.0.2.10]", "ip: [127.0.0.1]")
    text = text.replace("udp://0.0.0.0:3478", f"udp://127.0.0.1:{port}")
    text = text.replace("tcp://0.0.0.0:3478", f"tcp://127.0.0.1:{port}")
    base = Path(tmp_path_factory.mktemp("image", numbered=True))
    base.chmod(0o755)
    yield config_dir(base, text, SECRET), port


def _started(box: Container, port: int, host: str = "127.0.0.1") -> None:
    def answers() -> bool:
        status, code = box.state()
        assert status == "running", f"the container stopped ({code}):\n{box.logs()}"
        return stun_ping((host, port))

    wait_until(answers, timeout=60)


def _http(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _client(*args: str, netns: str | None = None, hold: bool = False) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(CLIENT), "--secret", SECRET, *args]
    if hold:
        cmd.append("--hold")
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    return dict(json.loads(line))


def test_the_shipped_reference_config_says_what_to_fill_in(image: str) -> None:
    """`check-config` in a fresh container: the image's own config names its
    placeholder secrets file; an operator's filled-in one is OK."""
    done = podman("run", "--rm", image, "check-config", CONFIG, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "auth.secrets_file: cannot read /etc/turnserver/secrets" in done.stderr
    inspect = podman("image", "inspect", image, "--format", "{{json .Config}}")
    config = json.loads(inspect.stdout)
    assert config["User"] == "turnserver"
    check = podman("image", "inspect", image, "--format", "{{json .HealthCheck}}")
    assert json.loads(check.stdout)["Test"][:3] == ["CMD", "turnserver", "healthcheck"]
    assert config["StopSignal"] == "SIGTERM"


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_the_image_serves_reports_health_and_drains(
    image: str, etc: tuple[Path, int], workers: int | None
) -> None:
    conf, port = etc
    mport = free_port(socket.SOCK_STREAM)
    done = podman(
        "run", "--rm", "--network", "host", "-v", f"{conf}:/etc/turnserver:ro", image,
        "check-config", CONFIG, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
    command = ["serve", "--config", CONFIG, "--metrics-listen", f"127.0.0.1:{mport}"]
    command += ["--allow-loopback-peers", "--drain-timeout", "5"]  # the echo peer is local
    if workers == 1:
        command += ["--workers", "1"]
    run = ["--network", "host", "--stop-timeout", "75", "-v", f"{conf}:/etc/turnserver:ro"]
    assert "--stop-timeout 75" in (ROOT / "Dockerfile").read_text()  # what the image says
    with container(image, *run, command=command) as box:
        _started(box, port)
        assert box.exec("id", "-un").stdout.strip() == "turnserver"
        wait_until(lambda: _http(f"http://127.0.0.1:{mport}/readyz") == 200, timeout=30)
        assert _http(f"http://127.0.0.1:{mport}/healthz") == 200
        logs = box.logs()
        expected = "2 workers serving" if workers is None else "listening on"
        assert expected in logs, logs
        # the HEALTHCHECK (`turnserver healthcheck`) finds this server's endpoint
        health = podman("healthcheck", "run", box.name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        # a TURN client we did not write relays through it, and keeps its allocation
        client = _client("--server", f"127.0.0.1:{port}", "--count", "30", hold=True)
        try:
            result = _result(client)
            assert result["stun"] is True and result["echoed"] == 30, result
            # `podman stop` with the documented --stop-timeout 75: SIGTERM, the drain
            # (5 s here) with the allocation live, exit 0; never the engine's SIGKILL
            stopping = time.monotonic()
            stop = subprocess.Popen(
                ["podman", "stop", box.name], env=ENV, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_until(lambda: _http(f"http://127.0.0.1:{mport}/readyz") == 503, timeout=10)
            assert box.state()[0] in ("running", "stopping")  # draining: allocation live
            stop.wait(90)
            took = time.monotonic() - stopping
        finally:
            client.communicate(timeout=30)
        status, code = box.state()
        logs = box.logs()
        assert (status, code) == ("exited", 0), logs
        assert 4 <= took < 15, (took, logs)  # the drain timeout, not an engine's SIGKILL
        assert "drain timeout: ending 1 allocations" in logs, logs


def test_offload_auto_without_capabilities_serves_and_says_what_is_missing(
    image: str, etc: tuple[Path, int]
) -> None:
    conf, port = etc
    command = ["serve", "--config", CONFIG, "--metrics-listen", "off", "--offload", "auto"]
    with container(
        image, "--network", "host", "-v", f"{conf}:/etc/turnserver:ro", command=command
    ) as box:
        _started(box, port)
        logs = box.logs()
    assert "kernel fast path off (auto): cannot load the BPF program" in logs, logs
    assert "this process lacks CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF" in logs, logs


def _documented_fast_path_flags() -> list[str]:
    """The `docker run` options the Dockerfile gives for the kernel fast path."""
    text = (ROOT / "Dockerfile").read_text()
    section = text[text.index("# The kernel fast path") :]
    section = section[: section.index("\n\n")]
    options = re.findall(r"--(?:user|cap-add|security-opt) \S+", section)
    assert len(options) >= 5, section
    return [part for option in options for part in option.split(" ", 1)]


def test_the_documented_flags_run_the_kernel_fast_path(image: str, etc: tuple[Path, int]) -> None:
    """In a network namespace of the test's own (the program attaches to its `lo`):
    the image with the Dockerfile's flags loads the program, and a channel's packets
    are relayed by the kernel."""
    conf, port = etc
    flags = _documented_fast_path_flags()
    assert {"--user", "root", "BPF", "NET_ADMIN", "PERFMON", "seccomp=unconfined"} <= set(flags)
    ns = f"turnimage-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        mport = free_port(socket.SOCK_STREAM)
        command = ["serve", "--config", CONFIG, "--metrics-listen", f"127.0.0.1:{mport}"]
        command += ["--allow-loopback-peers", "--offload", "ebpf"]
        run = ["--network", f"ns:/run/netns/{ns}", "-v", f"{conf}:/etc/turnserver:ro", *flags]
        with container(image, *run, command=command) as box:

            def serving() -> bool:
                status, code = box.state()
                assert status == "running", f"stopped ({code}):\n{box.logs()}"
                return "kernel fast path on" in box.logs()

            wait_until(serving, timeout=60)
            metrics = f"http://127.0.0.1:{mport}/metrics"
            client = _client(
                "--server", f"127.0.0.1:{port}", "--count", "200", "--metrics", metrics, netns=ns
            )
            result = _result(client)
            client.communicate(timeout=30)
        lines = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in result["metrics"]}  # type: ignore[attr-defined]
        assert result["echoed"] == 200, result
        assert lines["turn_offload_enabled"] == 1.0, lines
        relayed = sum(v for k, v in lines.items() if k.startswith("turn_offload_relayed_packets"))
        assert relayed >= 150, lines  # the channel's packets, after aioice's first Sends
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
