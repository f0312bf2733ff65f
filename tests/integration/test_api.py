"""The credentials API: the real `twilio` library, the TURN REST draft, RTCConfiguration,
errors in Twilio's shape, rate limiting, and no secrets in logs."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import subprocess
import time

import aiohttp
import pytest
from aioice import turn
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from tests.support import Collector
from tests.support.server import (
    ACCOUNT_SID,
    API_KEY,
    AUTH_TOKEN,
    SECRET,
    EchoProtocol,
    RunningServer,
    require_tool,
)


async def _relays(
    server: RunningServer, peer: tuple[str, int], username: str, password: str
) -> None:
    transport, proto = await turn.create_turn_endpoint(
        Collector, server_addr=server.address, username=username, password=password
    )
    try:
        transport.sendto(b"through the relay", peer)
        assert await asyncio.wait_for(proto.queue.get(), 3) == b"through the relay"
    finally:
        transport.close()


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _twilio_client(server: RunningServer, token: str = AUTH_TOKEN) -> Client:
    client = Client(ACCOUNT_SID, token)
    client.api.base_url = server.api_base  # the one change an app makes to switch
    return client


async def test_twilio_library_creates_a_token(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    token = await asyncio.to_thread(lambda: _twilio_client(server).tokens.create(ttl=600))
    assert token.account_sid == ACCOUNT_SID
    assert token.ttl == "600"
    assert token.date_created is not None and token.date_updated is not None
    assert abs(token.date_created.timestamp() - time.time()) < 5
    assert token.username and token.password
    servers = token.ice_servers
    assert servers is not None
    stun = [s for s in servers if str(s["urls"]).startswith("stun:")]
    turns = [s for s in servers if str(s["urls"]).startswith("turn")]
    assert stun and all(set(s) == {"url", "urls"} for s in stun)
    assert all(set(s) == {"url", "urls", "username", "credential"} for s in turns)
    assert all(isinstance(s["urls"], str) and s["url"] == s["urls"] for s in servers)
    kinds = {s["urls"].split("?")[-1] for s in turns}
    assert kinds == {"transport=udp", "transport=tcp"}
    assert any(s["urls"].startswith("turns:") for s in turns)
    udp = next(s for s in turns if s["urls"].endswith("transport=udp"))
    assert udp["urls"] == f"turn:127.0.0.1:{server.address[1]}?transport=udp"
    await _relays(server, echo_peer[0], udp["username"], udp["credential"])
    # A rotated auth token works as well
    again = await asyncio.to_thread(lambda: _twilio_client(server, "rotated-token").tokens.create())
    assert again.ttl == "86400"


async def test_twilio_library_sees_auth_errors(server: RunningServer) -> None:
    with pytest.raises(TwilioRestException) as info:
        await asyncio.to_thread(lambda: _twilio_client(server, "wrong").tokens.create())
    assert info.value.status == 401 and info.value.code == 20003


@pytest.mark.parametrize(
    ("auth", "path_sid", "data", "status", "code"),
    [
        (None, ACCOUNT_SID, {}, 401, 20003),
        ((ACCOUNT_SID, "wrong"), ACCOUNT_SID, {}, 401, 20003),
        (("ACnope", AUTH_TOKEN), ACCOUNT_SID, {}, 401, 20003),
        ((ACCOUNT_SID, AUTH_TOKEN), "AC" + "f" * 32, {}, 404, 20404),
        ((ACCOUNT_SID, AUTH_TOKEN), ACCOUNT_SID, {"Ttl": "-1"}, 400, 20001),
        ((ACCOUNT_SID, AUTH_TOKEN), ACCOUNT_SID, {"Ttl": "abc"}, 400, 20001),
        ((ACCOUNT_SID, AUTH_TOKEN), ACCOUNT_SID, {"Ttl": "0"}, 400, 20001),
        ((ACCOUNT_SID, AUTH_TOKEN), ACCOUNT_SID, {"Ttl": "86401"}, 400, 20001),
        ((ACCOUNT_SID, AUTH_TOKEN), ACCOUNT_SID, {"Ttl": "x" * 100_000}, 413, 20001),
    ],
)
async def test_twilio_endpoint_errors(
    server: RunningServer,
    auth: tuple[str, str] | None,
    path_sid: str,
    data: dict[str, str],
    status: int,
    code: int,
) -> None:
    url = f"{server.api_base}/2010-04-01/Accounts/{path_sid}/Tokens.json"
    basic = _basic(*auth) if auth else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers=basic) as resp:
            assert resp.status == status
            body = await resp.json()
        assert body["code"] == code and body["status"] == status
        assert body["message"] and body["more_info"].endswith(str(code))
        # and the server keeps serving
        async with session.post(
            f"{server.api_base}/2010-04-01/Accounts/{ACCOUNT_SID}/Tokens.json",
            headers=_basic(ACCOUNT_SID, AUTH_TOKEN),
        ) as ok:
            assert ok.status == 201


async def test_turn_rest_draft_endpoint(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    url = f"{server.api_base}/api/v1/turn-credentials"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, params={"service": "turn", "username": "bob"}) as resp:
            assert resp.status == 401
            assert "error" in await resp.json()
        async with session.get(
            url, params={"service": "turn", "username": "bob", "key": "x"}
        ) as resp:
            assert resp.status == 401
        async with session.get(
            url, params={"service": "turn", "username": "bob"}, headers={"X-API-Key": API_KEY}
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        async with session.get(url, params={"username": "bob", "key": API_KEY, "ttl": "-5"}) as bad:
            assert bad.status == 400
    assert set(body) == {"username", "password", "ttl", "uris"}
    assert body["ttl"] == 86400 and body["username"].endswith(":bob")
    assert all(u.startswith(("turn:", "turns:")) for u in body["uris"])
    await _relays(server, echo_peer[0], body["username"], body["password"])


async def test_ice_servers_endpoint(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    url = f"{server.api_base}/api/v1/ice-servers"
    async with aiohttp.ClientSession() as session:
        async with session.get(
            url, params={"username": "carol", "policy": "relay", "key": API_KEY}
        ) as resp:
            assert resp.status == 200
            config = await resp.json()
        async with session.get(url, params={"username": "c", "policy": "x", "key": API_KEY}) as bad:
            assert bad.status == 400
    assert config["iceTransportPolicy"] == "relay"
    stun, turn_entry = config["iceServers"]
    assert all(isinstance(e["urls"], list) for e in config["iceServers"])
    assert stun["urls"][0].startswith("stun:")
    await _relays(server, echo_peer[0], turn_entry["username"], turn_entry["credential"])


async def test_rate_limit_per_address(server: RunningServer) -> None:
    assert server.server.api is not None
    server.server.api.limiter.burst = 5
    server.server.api.limiter.rate = 0.01
    url = f"{server.api_base}/api/v1/ice-servers?username=x&key={API_KEY}"
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(8):
            async with session.get(url) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert (await resp.json())["status"] == 429
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3
    assert server.server.api.stats.rate_limited == 3


async def test_unknown_paths_get_json(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.api_base}/nope") as resp:
            assert resp.status == 404 and (await resp.json())["status"] == 404
        async with session.get(
            f"{server.api_base}/2010-04-01/Accounts/{ACCOUNT_SID}/Tokens.json"
        ) as resp:
            assert resp.status == 405
            assert (await resp.json())["code"] == 20001


async def test_no_secret_reaches_the_logs(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("turnserver").propagate = True
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.api_base}/2010-04-01/Accounts/{ACCOUNT_SID}/Tokens.json",
            headers=_basic(ACCOUNT_SID, AUTH_TOKEN),
        ) as resp:
            body = await resp.json()
        async with session.get(
            f"{server.api_base}/api/v1/turn-credentials", params={"username": "d", "key": API_KEY}
        ) as resp:
            draft = await resp.json()
    text = caplog.text
    assert "Tokens.json -> 201" in text
    for secret in (AUTH_TOKEN, API_KEY, SECRET, body["password"], draft["password"]):
        assert secret not in text


async def test_draft_credentials_work_with_uclient(server: RunningServer, tmp_path: object) -> None:
    uclient = require_tool("turnutils_uclient")
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{server.api_base}/api/v1/turn-credentials", params={"username": "uc", "key": API_KEY}
        ) as resp,
    ):
        cred = await resp.json()
    done = await asyncio.to_thread(
        subprocess.run,
        [
            uclient,
            "-y",
            "-n",
            "3",
            "-u",
            cred["username"],
            "-w",
            cred["password"],
            "-p",
            str(server.address[1]),
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert re.search(r"Total lost packets 0 ", out), out[-1500:]
    assert int(re.findall(r"tot_recv_bytes ~ (\d+)", out)[-1]) > 0


@pytest.mark.server_settings(api_tls=True)
async def test_api_serves_https_with_the_certificate(server: RunningServer) -> None:
    from tests.support.server import client_ssl_context

    assert server.api_base.startswith("https://")
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{server.api_base}/api/v1/ice-servers",
            params={"username": "tls-user", "key": API_KEY},
            ssl=client_ssl_context(),
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["iceServers"]
        plain = server.api_base.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"{plain}/api/v1/ice-servers") as resp:
                await resp.read()


def test_api_https_defaults() -> None:
    from turnserver.ops.config.settings import Settings, api_certificate

    with_cert = {"cert_file": "c.pem", "key_file": "k.pem"}
    assert api_certificate(Settings(api_listen=("127.0.0.1", 8080), **with_cert)) is None
    assert api_certificate(Settings(api_listen=("0.0.0.0", 8080), **with_cert)) == (
        "c.pem",
        "k.pem",
    )
    assert api_certificate(Settings(api_listen=("0.0.0.0", 8080))) is None
    own = Settings(api_listen=("::", 443), api_tls_cert_file="a.pem", api_tls_key_file="b.pem")
    assert api_certificate(own) == ("a.pem", "b.pem")
