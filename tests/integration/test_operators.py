"""The operators' path: the reference config cannot drift from the settings schema,
check-config validates without starting, the health check finds this server's own
endpoint, the shipped Prometheus and Kubernetes files agree with each other."""

from __future__ import annotations

import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import WORKER_COUNTS, wait_until
from tests.support.procs import free_port, loopback_args, run_cli, turnserver_process
from turnserver.cli import build_parser
from turnserver.ops.config.nodes import cross_node_warnings
from turnserver.ops.config.schema import SCHEMA
from turnserver.ops.config.settings import Settings

ROOT = Path(__file__).parents[2]
REFERENCE = ROOT / "config" / "turnserver.yaml"
KEY = re.compile(r"^(\s*)(?:#\s*)?([a-z_]+):.*\[default: (.*?)(?:; flag: (--[\w-]+))?\]\s*$")
SPECIAL = {
    "workers": "one per CPU",
    "software": "turnserver/VERSION",
    "fleet.node": "the host name",
    "fleet.admin_url": "admin.listen",
    **{f"fleet.{k}": "none" for k in ("region", "zone", "region_header")},
}


def _shown(value: Any) -> str:
    """A default as the reference config writes it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _documented() -> dict[str, tuple[str, str | None]]:
    """key -> (default, flag) as the reference config documents them: a line that names
    a key and no default opens a section (nested sections too, e.g. usage.webhook); its
    keys are the lines whose name stands further right."""
    out: dict[str, tuple[str, str | None]] = {}
    sections: list[tuple[int, str]] = []  # (column of the name, name)
    for line in REFERENCE.read_text().splitlines():
        named = re.match(r"^(\s*(?:#\s*)?)([a-z_]+):", line)
        if not named:
            continue
        column = len(named.group(1))
        while sections and sections[-1][0] >= column:
            sections.pop()
        m = KEY.match(line)
        if m is None:
            if re.match(r"^\s*(?:#\s*)?[a-z_]+:\s*(#.*)?$", line):
                sections.append((column, named.group(2)))
            continue
        _, name, default, flag = m.groups()
        out[".".join([*(n for _, n in sections), name])] = (default, flag)
    return out


def test_the_reference_config_names_every_key_its_default_and_flag() -> None:
    documented = _documented()
    assert set(documented) == set(SCHEMA), (
        sorted(set(SCHEMA) - set(documented)),
        sorted(set(documented) - set(SCHEMA)),
    )
    defaults = Settings()
    for key, (shown, _) in documented.items():
        value = getattr(defaults, SCHEMA[key][0])
        expected = SPECIAL.get(key) or _shown(tuple(value) if key == "listen" else value)
        assert shown == expected, (key, shown, expected)
    serve = next(
        a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    ).choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings}
    for key, (_, flag) in documented.items():
        assert flag is None or flag in flags, (key, flag)
    yaml.safe_load(REFERENCE.read_text())  # and it is YAML


def test_check_config_names_the_problem_or_says_ok(tmp_path: Path) -> None:
    """The reference config as shipped names two things to fill in; check-config says
    which, then OK once they are (and the server would start)."""
    done = run_cli("check-config", str(REFERENCE))
    assert done.returncode == 2
    assert "auth.secrets_file: cannot read /etc/turnserver/secrets" in done.stderr, done.stderr
    secrets = tmp_path / "secrets"
    secrets.write_text("a-long-random-secret\n")
    edited = tmp_path / "turnserver.yaml"
    text = REFERENCE.read_text().replace("/etc/turnserver/secrets", str(secrets))
    edited.write_text(text)
    done = run_cli("check-config", str(edited))
    assert done.returncode == 2
    assert "192.0.2.10 is not an address of this host" in done.stderr, done.stderr
    edited.write_text(text.replace("ip: [192.0.2.10]", "ip: [127.0.0.1]"))
    done = run_cli("check-config", str(edited))
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("relay:\n  min_port: abc\n")
    done = run_cli("check-config", str(broken))
    assert done.returncode == 2 and "broken.yaml:2: relay.min_port" in done.stderr
    empty = tmp_path / "sections.yaml"
    empty.write_text(
        "listen: [udp://127.0.0.1:3478]\nauth:\n  secrets: [x]\ntls:\n  # none\nrelay:\n"
    )
    assert run_cli("check-config", str(empty)).returncode == 0


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnserver", "healthcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: Any) -> None:
        pass


def test_healthcheck_asks_this_servers_own_endpoint(tmp_path: Path) -> None:
    """The health check asks the endpoint this server reported (any --metrics-listen),
    and once the server is gone it fails even if something healthy answers there now
    (as under --network host, where another server may hold the port)."""
    state = tmp_path / "state.json"
    env = {**os.environ, "TURNSERVER_STATE_FILE": str(state)}
    mport = free_port(socket.SOCK_STREAM)
    lo = 29500 + os.getpid() % 400
    with turnserver_process(
        tmp_path,
        *loopback_args("s", lo, lo + 99),
        "--probe-interval",
        "0",
        workers=None,
        metrics=f"127.0.0.1:{mport}",
        env=env,
    ) as server:
        done = _healthcheck(env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"127.0.0.1:{mport}/healthz: ok" in done.stdout
        os.killpg(server.proc.pid, signal.SIGKILL)  # no clean stop: the file stays
        server.proc.wait(10)
    assert state.exists()
    impostor = http.server.HTTPServer(("127.0.0.1", mport), _Healthy)
    serving = threading.Thread(target=impostor.serve_forever, daemon=True)
    serving.start()
    try:
        done = _healthcheck(env)
        assert done.returncode == 1 and "is gone" in done.stderr, done.stdout + done.stderr
    finally:
        impostor.shutdown()
        impostor.server_close()
    state.unlink()
    done = _healthcheck(env)
    assert done.returncode == 1 and "no running server found" in done.stderr


def test_a_clean_stop_removes_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    env = {**os.environ, "TURNSERVER_STATE_FILE": str(state)}
    with turnserver_process(tmp_path, "--secret", "s", workers=1, env=env):
        assert _healthcheck(env).returncode == 0
        assert state.exists()
    assert not state.exists()


def test_alerts_match_the_podmonitors_job_naming() -> None:
    """The Prometheus Operator names a PodMonitor's job namespace/name: TurnServerDown
    must select that job (promtool runs the rule tests in test_monitoring)."""
    monitor = yaml.safe_load((ROOT / "config/kubernetes/podmonitor.yaml").read_text())
    namespace = yaml.safe_load((ROOT / "config/kubernetes/namespace.yaml").read_text())
    job = f"{namespace['metadata']['name']}/{monitor['metadata']['name']}"
    rules = yaml.safe_load((ROOT / "config/prometheus/alerts.yml").read_text())
    down = next(
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TurnServerDown"
    )
    selector = re.search(r'up\{job=~"([^"]+)"\}', down["expr"])
    assert selector and re.fullmatch(selector.group(1), job), (down["expr"], job)
    tests = (ROOT / "config/prometheus/alerts_test.yml").read_text()
    assert f'up{{job="{job}"' in tests


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_an_empty_shared_setting_is_warned_about_when_other_nodes_are_in_view(
    tmp_path: Path, workers: int | None
) -> None:
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    with turnserver_process(tmp_path, "--secret", "s", workers=workers, env=env) as server:
        wait_until(lambda: "auth.nonce_secret is empty" in server.log_path.read_text())
        assert "438 Stale Nonce" in server.log_path.read_text()
    nonce = tmp_path / "nonce"
    nonce.write_text("one-secret-for-every-node\n")
    config = tmp_path / "turnserver.yaml"
    config.write_text(f"auth:\n  nonce_secret_file: {nonce}\n")
    with turnserver_process(
        tmp_path, "--secret", "s", "--config", str(config), workers=workers, env=env
    ) as server:
        server_log = server.log_path
    assert "auth.nonce_secret" not in server_log.read_text()
    without = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    assert not cross_node_warnings(Settings(), without)
    two_lines = tmp_path / "two"
    two_lines.write_text("a\nb\n")
    config.write_text(f"auth:\n  secrets: [s]\n  nonce_secret_file: {two_lines}\n")
    done = run_cli("check-config", str(config))
    assert done.returncode == 2 and "must hold one line (it has 2)" in done.stderr


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_ready_under_the_default_peer_policy(tmp_path: Path, workers: int | None) -> None:
    """No --allow-loopback-peers, as deployed: the self-probe still relays to its echo
    socket on this host (UDP and TCP listeners) and /readyz says ready."""
    mport = free_port(socket.SOCK_STREAM)
    with turnserver_process(
        tmp_path, "--secret", "s", streams=True, workers=workers, metrics=f"127.0.0.1:{mport}"
    ):

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5) as resp:
                return resp.status == 200

        wait_until(ready, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    assert 'turn_probe_success{transport="udp"} 1.0' in text
    assert 'turn_probe_success{transport="tcp"} 1.0' in text
    assert 'turn_dropped_packets_total{reason="peer_denied"} 0.0' in text


def test_the_ci_script_stops_nothing_by_name_and_starts_no_daemon() -> None:
    """.ci/run on a contributor's machine: no pkill/killall, services refused during the
    package install (policy-rc.d, removed after), and it is valid bash."""
    script = (ROOT / ".ci" / "run").read_text()
    code = "\n".join(ln for ln in script.splitlines() if not ln.lstrip().startswith("#"))
    for word in ("pkill", "killall", "systemctl stop", "service "):
        assert word not in code, word
    assert "/usr/sbin/policy-rc.d" in code and "exit 101" in code
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")]).returncode == 0
    for package in ("podman", "runc", "debootstrap", "coturn", "prometheus", "chromium"):
        assert f"need+=({package}" in code or f" {package})" in code, package


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_link_in_the_readme_and_docs_resolves() -> None:
    """Relative links name files that exist, and anchors name headings (or ids) there."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.name}: {target}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                text = dest.read_text()
                anchors = {_slug(h) for h in re.findall(r"(?m)^#+ (.*)$", text)}
                anchors |= set(re.findall(r'<a id="([^"]+)"', text))
                if anchor not in anchors:
                    problems.append(f"{page.name}: {target}: no such anchor")
    assert not problems, problems
    # the operator's path, from the README's first screen
    first = (ROOT / "README.md").read_text().split("## For contributors")[0]
    for doc in ("install", "configure", "secure", "monitor", "scale", "troubleshooting"):
        assert f"(docs/{doc}.md)" in first, doc


def test_the_docs_name_every_shipped_alert() -> None:
    rules = yaml.safe_load((ROOT / "config/prometheus/alerts.yml").read_text())
    names = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    monitor = (ROOT / "docs" / "monitor.md").read_text()
    assert all(f"`{name}`" in monitor for name in names), names
    numbers = {6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten", 11: "eleven"}
    assert f"({numbers[len(names)]} alerts:" in monitor, len(names)


def test_the_image_installs_pinned_dependencies() -> None:
    """Every runtime dependency (and theirs) has one pinned version in constraints.txt,
    which the Dockerfile installs with."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, line
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    for dependency in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dependency)
        assert name and re.sub(r"[-_.]+", "-", name.group(0).lower()) in pins, dependency
    assert "-c constraints.txt" in (ROOT / "Dockerfile").read_text()
