"""Hostile input: the decoder raises only StunDecodeError, the core never raises,
and garbage on the wire never stops a well-behaved client from relaying."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from pathlib import Path

from aioice import turn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Collector
from tests.support.core_client import NOW, CoreClient, decode_every_attribute, make_core
from tests.support.server import SECRET, EchoProtocol, RunningServer
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.ops.http.credentials import mint
from turnserver.stun import StunDecodeError, decode_channel_data, decode_message

DATA = Path(__file__).parent.parent / "data"


def _corpus() -> list[bytes]:
    out = []
    for folder in ("turn-udp-chromium", "turn-udp-uclient"):
        index = json.loads((DATA / folder / "index.json").read_text())
        out += [(DATA / folder / m["file"]).read_bytes() for m in index["messages"]]
    return out


CORPUS = _corpus()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "length" and len(data) >= 4:
            data[2:4] = draw(st.binary(min_size=2, max_size=2))
    return bytes(data)


def _decode_everything(data: bytes) -> None:
    try:
        decode_every_attribute(data)
    except StunDecodeError:
        return


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), mutated()))
def test_decoder_raises_only_its_error(data: bytes) -> None:
    _decode_everything(data)
    try:
        decode_channel_data(data)
    except StunDecodeError:
        pass


@settings(max_examples=800, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), mutated()), min_size=1, max_size=8))
def test_core_never_raises_on_hostile_messages(datagrams: list[bytes]) -> None:
    core, _ = make_core()
    good = CoreClient(core)
    good.allocate()
    hostile = FiveTuple(("192.0.2.66", 4444), good.ft.server, ClientTransport.UDP)
    for data in datagrams:
        out = core.handle_message(data, hostile, NOW)
        if out is not None:
            decode_message(out)  # whatever we answer is well-formed
        core.handle_message(data, good.ft, NOW)  # even on the good client's 5-tuple
    core.handle_timer(NOW + 5000)


async def test_garbage_does_not_disturb_a_relaying_client(
    server: RunningServer, echo_peer: tuple[tuple[str, int], EchoProtocol]
) -> None:
    peer, _ = echo_peer
    cred = mint(SECRET, "good", 600, time.time())
    transport, proto = await turn.create_turn_endpoint(
        Collector, server_addr=server.address, username=cred.username, password=cred.password
    )
    rng = random.Random(5)
    attackers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    try:
        for a in attackers:
            a.bind(("127.0.0.1", 0))
            a.setblocking(False)
        received = 0
        for i in range(60):
            for a in attackers:
                for _ in range(5):
                    kind = rng.random()
                    if kind < 0.3:
                        junk = os.urandom(rng.randint(0, 1500))
                    elif kind < 0.6:
                        junk = bytearray(rng.choice(CORPUS))
                        junk[rng.randrange(len(junk))] ^= 0xFF
                        junk = bytes(junk)
                    elif kind < 0.8:
                        junk = b"\x40\x00" + os.urandom(rng.randint(0, 100))
                    else:
                        junk = rng.choice(CORPUS)[: rng.randint(0, 40)]
                    try:
                        a.sendto(junk, server.address)
                    except BlockingIOError:
                        pass
            payload = f"good {i}".encode()
            transport.sendto(payload, peer)
            data = await asyncio.wait_for(proto.queue.get(), 3)
            assert data == payload
            received += 1
        assert received == 60
    finally:
        for a in attackers:
            a.close()
        transport.close()
        await asyncio.sleep(0.05)
    stats = server.runtime.core.stats
    assert stats.dropped_malformed + stats.dropped_no_allocation > 0


async def test_a_burst_of_requests_gets_every_answer_in_order(server: RunningServer) -> None:
    """Answers of one read batch are held and sent together (at most ANSWER_BATCH at a
    time): a burst larger than that still gets every answer, in order."""
    from turnserver.io.udp import ANSWER_BATCH
    from turnserver.stun import MessageClass, Method, encode_message

    loop = asyncio.get_running_loop()
    count = 3 * ANSWER_BATCH + 5
    tids = [os.urandom(12) for _ in range(count)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        for tid in tids:
            sock.sendto(encode_message(Method.BINDING, MessageClass.REQUEST, tid), server.address)
        answers = []
        for _ in range(count):
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
            msg = decode_message(data)
            assert msg.message_class == MessageClass.SUCCESS
            answers.append(msg.transaction_id)
    assert answers == tids
