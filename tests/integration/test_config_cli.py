"""Configuration files, flags and the command line."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aioice import turn

from tests.support import Collector
from tests.support.procs import free_port, run_cli, stun_ping
from tests.support.server import EchoProtocol
from turnserver.cli import main
from turnserver.ops.config.settings import ConfigError, build_settings, load_file, parse_yaml

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("realm: x\nrelay:\n  min_port: abc\n", "cfg.yaml:3: relay.min_port: expected an integer"),
        ("realm: x\nrelay:\n  minport: 3\n", "cfg.yaml:3: unknown key 'relay.minport'"),
        ("realm: x\nlisten: [ftp://1.2.3.4:5]\n", "cfg.yaml:2: listen:"),
        ("realm: x\n\npeers:\n  allow: [not-a-net]\n", "cfg.yaml:4: peers.allow:"),
        ("realm: [x\n", "cfg.yaml:2: invalid YAML"),
        ("- a\n- b\n", "cfg.yaml:1: the top level must be a mapping"),
        ("auth:\n  users:\n    - name: a\n", "cfg.yaml:3: auth.users[0]: give exactly one"),
        ("log:\n  level: loud\n", "cfg.yaml:2: log.level: expected one of"),
        ("relay: 5\n", "cfg.yaml:1: relay: expected a mapping"),
    ],
)
def test_bad_config_names_key_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "cfg.yaml")
    assert str(info.value).startswith(expected), str(info.value)


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="no credentials"):
        build_settings({}, {}, "t")
    with pytest.raises(ConfigError, match="min_port"):
        build_settings({"secrets": ("s",), "min_port": 600, "max_port": 500}, {}, "t")
    with pytest.raises(ConfigError, match=r"relay\.ip: no relay address"):
        build_settings({"secrets": ("s",)}, {}, "t")  # wildcard listener, no relay ip


def test_example_configs_parse() -> None:
    for name in ("turnserver.yaml", "dev.yaml"):
        values = load_file(str(ROOT / "config" / name))
        assert values["realm"]
    reference = load_file(str(ROOT / "config" / "turnserver.yaml"))
    with pytest.raises(ConfigError, match=r"auth\.secrets_file: cannot read /etc/turnserver"):
        build_settings(reference, {}, "x")
    example = build_settings(reference, {"secrets_file": None, "secrets": ("s",)}, "x")
    assert example.realm == "example.org" and example.relay_ips == ("192.0.2.10",)


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("realm: from-file\nauth:\n  secrets: [a]\nrelay:\n  ip: [127.0.0.1]\n")
    s = build_settings(load_file(str(cfg)), {"realm": "from-flag"}, str(cfg))
    assert s.realm == "from-flag" and s.secrets == ("a",)


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # like any argparse usage error
    assert "serve" in capsys.readouterr().err


def test_argument_errors_are_one_line_with_a_hint() -> None:
    for args, expected in (
        (["serve", "--workers", "abc"], "invalid int value"),
        (["serve", "--secret", "-abc"], "--option=VALUE"),
    ):
        done = run_cli(*args)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 2  # the error and the hint


def test_mint_for_the_make_run_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text("-dash-secret\n")
    dev = str(ROOT / "config/dev.yaml")
    assert main(["mint", "--user", "u", "--config", dev, "--secrets-file", str(secret)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "turns:127.0.0.1:5349?transport=tcp" in out["uris"]
    args = ["mint", "--user", "u", "--config", dev, "--secret", "s", "--format", "twilio"]
    assert main(args) == 0
    token = json.loads(capsys.readouterr().out)
    assert token["account_sid"].startswith("AC") and token["account_sid"] != "u"


def test_dev_yaml_is_what_make_run_serves(tmp_path: Path) -> None:
    """config/dev.yaml says it is `make run` written out: the same realm, listeners,
    relay address and range, peers, API, metrics, probe and log level."""
    from turnserver.cli import build_parser
    from turnserver.ops.config.settings import build_settings, load_file
    from turnserver.ops.dev.local_server import dev_settings

    args = build_parser().parse_args(["dev", "--state-dir", str(tmp_path)])
    made = dev_settings(args, tmp_path)
    secret = (tmp_path / "secret").read_text().strip()
    written = build_settings(
        load_file(str(ROOT / "config/dev.yaml")),
        {"secrets": (secret,), "cert_file": made.cert_file, "key_file": made.key_file},
        "f",
    )
    for name in (
        "realm",
        "workers",
        "listen",
        "relay_ips",
        "min_port",
        "max_port",
        "allow_loopback_peers",
        "api_listen",
        "api_tls",
        "metrics_listen",
        "probe_interval",
        "log_level",
    ):
        assert getattr(written, name) == getattr(made, name), name


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("realm: ok\nallocations:\n  max_lifetime: -5\n")
    done = run_cli("serve", "--config", str(cfg))
    assert done.returncode == 2
    assert "bad.yaml:3: allocations.max_lifetime: -5 is outside" in done.stderr


def test_cli_bad_flag_value_exits_2() -> None:
    done = run_cli("serve", "--secret", "s", "--listen", "udp://127.0.0.1:1", "--relay-ip", "nope")
    assert done.returncode == 2 and "--relay-ip: 'nope' is not an IP address" in done.stderr


def test_port_in_use_fails_with_clear_error() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        done = run_cli("serve", "--secret", "s", "--listen", f"udp://127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"cannot bind udp://127.0.0.1:{port}" in done.stderr


async def test_make_run_command_prints_a_working_credential(
    tmp_path: Path, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    """A developer's serve: selfsigned, then config/dev.yaml, a secret, --show-credential."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    assert main(["selfsigned", "--cert", cert, "--key", key]) == 0
    assert main(["selfsigned", "--cert", cert, "--key", key]) == 0  # kept, not remade
    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "turnserver",
        "serve",
        "--config",
        str(ROOT / "config/dev.yaml"),
        "--secret",
        "dev-secret",
        "--show-credential",
        "dev",
        "--cert",
        cert,
        "--key",
        key,
        "--listen",
        f"udp://127.0.0.1:{port}",
        "--listen",
        f"tcp://127.0.0.1:{port}",
        "--listen",
        f"tls://127.0.0.1:{tls_port}",
        "--min-port",
        "31000",
        "--max-port",
        "31099",
        "--api-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--account",
        "ACdev:dev-token",
        "--api-key",
        "dev-key",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or "RTCConfiguration: curl" not in lines[-1]:
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert line, "server exited"
            lines.append(line.decode())
        assert any("--ignore-certificate-errors-spki-list=" in x for x in lines)
        config = json.loads(next(x for x in lines if x.lstrip().startswith("{")))
        tokens_cmd = next(x for x in lines if "Tokens API" in x).split(": ", 1)[1].split()
        ice_url = lines[-1].split("'")[1]
        assert tokens_cmd[:2] == ["curl", "-s"]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                tokens_cmd[-1],
                headers={"Authorization": "Basic " + base64.b64encode(b"ACdev:dev-token").decode()},
            ) as resp:
                assert resp.status == 201
            async with session.get(ice_url) as resp:
                assert (await resp.json())["iceTransportPolicy"] == "relay"
        ice = config["iceServers"][0]
        assert ice["urls"] == [
            f"turn:127.0.0.1:{port}?transport=udp",
            f"turn:127.0.0.1:{port}?transport=tcp",
            f"turns:127.0.0.1:{tls_port}?transport=tcp",
        ]
        assert config["iceTransportPolicy"] == "relay"
        deadline = time.monotonic() + 5
        while not stun_ping(("127.0.0.1", port)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ctx = ssl.create_default_context(cafile=cert)
        ctx.check_hostname = False
        for transport_name, addr, tls in (("udp", port, None), ("tcp", tls_port, ctx)):
            transport, collector = await turn.create_turn_endpoint(
                Collector,
                server_addr=("127.0.0.1", addr),
                username=ice["username"],
                password=ice["credential"],
                transport=transport_name,
                ssl=tls,
            )
            try:
                transport.sendto(b"hello relay", echo_peer[0])
                assert await asyncio.wait_for(collector.queue.get(), 3) == b"hello relay"
            finally:
                transport.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_secrets_keys_and_accounts_from_files_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secrets").write_text("# rotated weekly\nfile-secret\n\nolder-secret\n")
    (tmp_path / "keys").write_text("file-key\n")
    (tmp_path / "accounts").write_text("ACfile:file-token\n")
    monkeypatch.setenv("TURN_SECRETS", "env-a,env-b")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "auth:\n  secrets: [inline]\n"
        f"  secrets_file: {tmp_path / 'secrets'}\n  secrets_env: TURN_SECRETS\n"
        f"api:\n  listen: 127.0.0.1:0\n  keys_file: {tmp_path / 'keys'}\n"
        f"  accounts_file: {tmp_path / 'accounts'}\nrelay:\n  ip: [127.0.0.1]\n"
    )
    s = build_settings(load_file(str(cfg)), {}, str(cfg))
    assert s.secrets == ("inline", "file-secret", "older-secret", "env-a", "env-b")
    assert s.api_keys == ("file-key",) and s.accounts == (("ACfile", "file-token"),)
    monkeypatch.delenv("TURN_SECRETS")
    with pytest.raises(ConfigError, match="TURN_SECRETS is unset"):
        build_settings(load_file(str(cfg)), {}, str(cfg))


def test_bad_account_does_not_echo_the_token() -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml("api:\n  accounts: ['AC-x:super-secret-token']\n", "c.yaml")
    assert "super-secret-token" not in str(info.value)


@pytest.mark.parametrize("fmt", ["rest", "twilio", "ice-servers"])
def test_mint_command(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    from turnserver.core.auth import rest_password

    uris = ["--uri", "stun:192.0.2.1:3478", "--uri", "turn:192.0.2.1:3478?transport=udp"]
    assert (
        main(
            [
                "mint",
                "--user",
                "alice",
                "--ttl",
                "10m",
                "--secret",
                "S",
                "--format",
                fmt,
                "--relay-only",
                *uris,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    if fmt == "rest":
        username, password = out["username"], out["password"]
        assert out["ttl"] == 600 and out["uris"] == ["turn:192.0.2.1:3478?transport=udp"]
    elif fmt == "twilio":
        username, password = out["username"], out["password"]
        assert out["ttl"] == "600" and out["ice_servers"][0] == {
            "url": "stun:192.0.2.1:3478",
            "urls": "stun:192.0.2.1:3478",
        }
    else:
        entry = out["iceServers"][1]
        username, password = entry["username"], entry["credential"]
        assert out["iceTransportPolicy"] == "relay"
    expiry, user = username.split(":")
    assert user == "alice" and abs(int(expiry) - time.time() - 600) < 5
    assert password == rest_password("S", username)


def test_mint_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mint", "--user", "a", "--ttl", "soon", "--secret", "S"]) == 2
    assert main(["mint", "--user", "a"]) == 2
    assert main(["mint", "--user", "a", "--secret", "S", "--uri", "http://x"]) == 2
    reference = str(ROOT / "config/turnserver.yaml")
    assert main(["mint", "--user", "a", "--config", reference]) == 2  # no secrets file yet
    secrets = tmp_path / "secrets"
    secrets.write_text("S\n")
    args = ["mint", "--user", "a", "--config", reference, "--secrets-file", str(secrets)]
    assert main(args) == 0
    assert "turn:192.0.2.10:3478?transport=udp" in capsys.readouterr().out


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("serve", "--secret", "s", *args)


def test_relay_address_not_on_this_host_fails_at_start() -> None:
    done = _serve("--listen", "udp://127.0.0.1:1", "--relay-ip", "192.0.2.10")
    assert done.returncode == 2, done.stderr
    assert "relay.ip: 192.0.2.10 is not an address of this host" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_certificate_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    from turnserver.ops.dev.selfsigned import ensure_self_signed

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    other_cert, other_key = tmp_path / "c2.pem", tmp_path / "k2.pem"
    ensure_self_signed(str(cert), str(key), ["localhost"])
    ensure_self_signed(str(other_cert), str(other_key), ["localhost"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    listen = ("--listen", "tls://127.0.0.1:1")
    cases = [
        ((str(tmp_path / "missing.pem"), str(key)), "missing.pem: No such file"),
        ((str(garbage), str(key)), "garbage.pem is not a PEM file"),
        ((str(cert), str(other_key)), "does not belong to the certificate"),
    ]
    for (c, k), expected in cases:
        done = _serve(*listen, "--cert", c, "--key", k)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_preflight_page_is_on_only_for_loopback_api_by_default() -> None:
    from turnserver.ops.config.settings import Settings, preflight_page_enabled

    assert preflight_page_enabled(Settings(api_listen=("127.0.0.1", 8080)))
    assert not preflight_page_enabled(Settings(api_listen=("0.0.0.0", 8080)))
    assert not preflight_page_enabled(Settings(api_listen=("10.1.2.3", 8080)))
    assert preflight_page_enabled(Settings(api_listen=("0.0.0.0", 8080), preflight_page=True))
    assert not preflight_page_enabled(Settings(api_listen=("::1", 8080), preflight_page=False))


def test_secrets_starting_with_a_dash_work_from_files(tmp_path: Path) -> None:
    """`make run` passes secrets as files (mode 0600), never on the command line."""
    secret = tmp_path / "secret"
    secret.write_text("-starts-with-a-dash\n")
    secret.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "turnserver",
            "serve",
            "--secrets-file",
            str(secret),
            "--listen",
            f"udp://127.0.0.1:{port}",
            "--metrics-listen",
            "off",
            "--workers",
            "1",
            "--show-credential",
            "dev",
            "--probe-interval",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = ""
        deadline = time.monotonic() + 15
        while "password:" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert "password:" in seen, seen
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"starts-with-a-dash" not in cmdline
    finally:
        proc.terminate()
        proc.wait(10)
    recipe = subprocess.run(
        ["make", "-n", "run", "STAMP=/dev/null"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    # `turnserver dev` keeps the secret, API key and account in 0600 files of its own
    assert "turnserver dev --state-dir" in recipe and "$(cat" not in recipe


def test_admin_flags_belong_to_serve_only() -> None:
    assert "--admin-listen" in run_cli("serve", "--help").stdout
    assert "--admin" not in run_cli("mint", "--help").stdout
