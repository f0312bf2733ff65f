"""Deployment artifacts: systemd unit (and sd_notify), Dockerfile, Kubernetes manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.procs import free_port, serve_command, stun_ping, wait_for_stun
from tests.support.server import missing, require_tool
from turnserver.cli import build_parser
from turnserver.cli.serve import serve_overrides
from turnserver.ops.config.settings import build_settings, parse_yaml

ROOT = Path(__file__).parents[2]
K8S = ROOT / "config" / "kubernetes"


def _unit_with_local_exec(tmp_path: Path) -> Path:
    exe = shutil.which("turnserver") or str(Path(sys.executable).parent / "turnserver")
    unit = (ROOT / "systemd/turnserver.service").read_text()
    unit = unit.replace("/opt/turnserver/bin/turnserver", exe)
    path = tmp_path / "turnserver.service"
    path.write_text(unit)
    return path


def test_systemd_unit_verifies_and_rates_well(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = _unit_with_local_exec(tmp_path)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for turnserver.service: ([\d.]+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.5, match.group(0)  # "OK" on systemd's scale
    text = (ROOT / "systemd/turnserver.service").read_text()
    for line in (
        "Type=notify",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
        "SystemCallFilter=bpf",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "WatchdogSec=",
    ):
        assert line in text


def test_sd_notify_ready_and_watchdog(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        serve_command(port, "--secret", "s"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        messages = [sock.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        assert stun_ping(("127.0.0.1", port))  # listeners were bound before READY
        messages += [sock.recv(4096).decode() for _ in range(2)]
        assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        proc.terminate()
        assert proc.wait(15) == 0
        assert sock.recv(4096).decode() == "STOPPING=1"
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_dockerfile_copies_existing_paths_and_its_command_starts(tmp_path: Path) -> None:
    """Without a container engine: what the Dockerfile copies exists and its command
    starts on the reference config (test_image.py builds and runs the image itself)."""
    text = (ROOT / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert "USER turnserver" in text and re.search(
        r"HEALTHCHECK .*\n.*turnserver.*healthcheck", text
    )
    secrets = tmp_path / "secrets"
    secrets.write_text("s\n")
    for port in ("3478/udp", "3478/tcp", "5349/tcp", "9641/tcp"):
        assert port in text
    entry = re.search(r'^ENTRYPOINT \["(\w+)"\]', text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert entry and cmd
    args = yaml.safe_load(cmd.group(1))
    # The image's config is config/turnserver.yaml; run the same command on it
    args = [
        a.replace("/etc/turnserver/turnserver.yaml", str(ROOT / "config/turnserver.yaml"))
        for a in args
    ]
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            entry.group(1),
            *args,
            "--listen",
            f"udp://127.0.0.1:{port}",
            "--relay-ip",  # the example's 192.0.2.10 is a placeholder: the host's own
            "127.0.0.1",
            "--secrets-file",  # and so is its secrets file
            str(secrets),
            "--metrics-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            wait_for_stun(proc, port)
        except RuntimeError as exc:
            raise AssertionError(proc.stderr.read() if proc.stderr else str(exc)) from exc
    finally:
        proc.terminate()
        proc.wait(15)


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kubernetes_manifests_validate_against_schemas() -> None:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        missing("kubernetes-validate not installed", "kubernetes-validate is a test dependency")
    validator = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).parent / "kubernetes-validate"
    )
    core = [str(p) for p in _manifests() if p.name != "podmonitor.yaml"]
    done = subprocess.run(
        [validator, "--strict", *core], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(core), done.stdout


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    docs = {
        yaml.safe_load(p.read_text())["kind"]: yaml.safe_load(p.read_text())
        for p in _manifests()
        if p.name != "revocations.yaml"
    }
    revocations = yaml.safe_load((K8S / "revocations.yaml").read_text())
    assert set(docs) >= {
        "DaemonSet",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "Service",
        "PodMonitor",
    }
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"] for p in container["ports"]}
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] in ports
    assert docs["PodMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == 8080
    # The admin API is on the pod, never on the public Service
    assert "admin" in ports
    assert all(p["targetPort"] != 9642 for p in docs["Service"]["spec"]["ports"])
    volumes_by_name = {v["name"]: v for v in pod["volumes"]}
    assert volumes_by_name["revocations"]["configMap"]["name"] == revocations["metadata"]["name"]
    assert json.loads(revocations["data"]["revocations.json"]) == {"revocations": []}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    labels = docs["DaemonSet"]["spec"]["selector"]["matchLabels"]
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    # The ConfigMap and the DaemonSet's flags make a valid config, every file it names
    # is a key of the Secret mounted there, and every HTTP listener is on the node's
    # address (hostNetwork: no NetworkPolicy applies; the comments say so)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_dir = tmp_path / "secrets"  # the Secret as the pod sees it
    secret_dir.mkdir()
    for name, content in docs["Secret"]["stringData"].items():
        (secret_dir / name).write_text(content)
    config_text = docs["ConfigMap"]["data"]["turnserver.yaml"]
    named = re.findall(re.escape(mounts["secrets"]) + r"/([\w.-]+)", config_text)
    assert set(named) == set(docs["Secret"]["stringData"]), named
    values = parse_yaml(config_text.replace(mounts["secrets"], str(secret_dir)), "configmap")
    node_ip = "10.0.0.5"
    args = [a.replace("$(NODE_IP)", node_ip) for a in container["args"]]
    assert container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    overrides = serve_overrides(build_parser().parse_args(args))
    settings = build_settings(values, {**overrides, "secrets": ("x",), "nonce_secret": "n"}, "k8s")
    assert settings.metrics_listen == (node_ip, 9641)
    assert settings.api_listen == (node_ip, 8080)
    assert settings.admin_listen == (node_ip, 9642)
    assert settings.relay_ips == (node_ip,)
    text = (K8S / "daemonset.yaml").read_text() + (K8S / "configmap.yaml").read_text()
    assert "0.0.0.0:9641" not in text and "0.0.0.0:8080" not in text
    assert "NetworkPolicies do not apply to hostNetwork pods" in text
    # A read-only root needs a writable /tmp (workers' bus, state file)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The kernel fast path is on by default: exactly its capabilities, nothing else
    assert settings.offload == "auto"
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert sorted(caps["add"]) == ["BPF", "NET_ADMIN", "NET_BIND_SERVICE", "PERFMON"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert mounts["tmp"] == "/tmp" and "emptyDir" in volumes_by_name["tmp"]
    # The grace period outlasts the drain
    assert pod["terminationGracePeriodSeconds"] >= settings.drain_timeout + 15
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifests())
