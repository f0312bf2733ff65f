"""RFC 6062 TCP allocations in the core: Connect, ConnectionAttempt, ConnectionBind."""

from __future__ import annotations

from tests.support.core_client import NOW, CoreClient, error_code, make_core
from turnserver.core import events as ev
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_message

PEER = ("198.51.200.7", 5000)


def tcp_client(core, port: int = 40000) -> CoreClient:  # type: ignore[no-untyped-def]
    return CoreClient(core, client=("192.0.2.50", port), transport=ClientTransport.TCP)


def test_tcp_allocation_needs_a_stream_control_connection() -> None:
    core, _ = make_core()
    udp = CoreClient(core)
    assert error_code(udp.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])) == 400
    c = tcp_client(core)
    bad = c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6), (Attr.EVEN_PORT, False)])
    assert error_code(bad) == 400
    ok = c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    assert ok.message_class == MessageClass.SUCCESS
    assert core.allocations[c.ft].is_tcp
    bind = c.request(
        Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)]
    )
    assert error_code(bind) == 400


def test_connect_then_connection_bind() -> None:
    core, opener = make_core()
    c = tcp_client(core)
    c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    relay = opener.tcp_opened[0]
    tid = b"connect-tid1"
    c.request(Method.REFRESH)  # get a nonce in place
    req = encode_message(
        Method.CONNECT,
        MessageClass.REQUEST,
        tid,
        [
            (Attr.XOR_PEER_ADDRESS, PEER),
            (Attr.USERNAME, c.username),
            (Attr.REALM, c.realm),
            (Attr.NONCE, c.nonce),
        ],
        integrity_key=c.key,
    )
    assert core.handle_message(req, c.ft, NOW) is None  # answered once the dial finishes
    ((cid, peer),) = relay.connecting
    assert peer == PEER
    again = c.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, PEER)])
    assert error_code(again) == 446
    response = core.connect_result(cid, True, NOW + 1)
    assert response is not None
    msg = decode_message(response)
    assert msg.transaction_id == tid and msg.get(Attr.CONNECTION_ID) == cid
    # The client opens a data connection and binds it
    data = tcp_client(core, port=40001)
    data.nonce = c.nonce
    wrong = data.request(Method.CONNECTION_BIND, [(Attr.CONNECTION_ID, cid + 1)])
    assert error_code(wrong) == 400
    ok = data.request(Method.CONNECTION_BIND, [(Attr.CONNECTION_ID, cid)])
    assert ok.message_class == MessageClass.SUCCESS
    bound = [e for e in core.drain_events() if isinstance(e, ev.PeerConnectionBound)]
    assert bound[0].data_five_tuple == data.ft and bound[0].five_tuple == c.ft
    twice = tcp_client(core, port=40002)
    twice.nonce = c.nonce
    assert error_code(twice.request(Method.CONNECTION_BIND, [(Attr.CONNECTION_ID, cid)])) == 400


def test_connect_failure_is_447() -> None:
    core, opener = make_core()
    c = tcp_client(core)
    c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    c.request(Method.REFRESH)  # get a nonce in place
    req = encode_message(
        Method.CONNECT,
        MessageClass.REQUEST,
        b"connect-tid2",
        [
            (Attr.XOR_PEER_ADDRESS, PEER),
            (Attr.USERNAME, c.username),
            (Attr.REALM, c.realm),
            (Attr.NONCE, c.nonce),
        ],
        integrity_key=c.key,
    )
    assert core.handle_message(req, c.ft, NOW) is None  # deferred: no answer yet
    cid = opener.tcp_opened[0].connecting[0][0]

    response = core.connect_result(cid, False, NOW + 30)
    assert response is not None and error_code(decode_message(response)) == 447
    assert not core.peer_connections


def test_connect_on_udp_allocation_and_denied_peer() -> None:
    core, _ = make_core(allow_loopback=False)
    c = tcp_client(core)
    c.allocate()  # a UDP allocation over TCP
    assert error_code(c.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, PEER)])) == 400
    t = tcp_client(core, 40003)
    t.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    assert error_code(t.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, ("10.0.0.1", 1))])) == 403


def test_inbound_peer_connection_needs_permission_and_expires() -> None:
    core, opener = make_core()
    c = tcp_client(core)
    c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    alloc = core.allocations[c.ft]
    assert core.peer_connection_received(alloc, PEER, NOW) is None
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)])
    result = core.peer_connection_received(alloc, PEER, NOW)
    assert result is not None
    cid, indication = result
    msg = decode_message(indication)
    assert msg.method == Method.CONNECTION_ATTEMPT
    assert msg.message_class == MessageClass.INDICATION
    assert msg.get(Attr.CONNECTION_ID) == cid and msg.get(Attr.XOR_PEER_ADDRESS) == PEER
    core.handle_timer(NOW + 29)
    assert cid in core.peer_connections
    core.handle_timer(NOW + 30)  # no ConnectionBind within 30 s (RFC 6062 §5.3)
    assert cid not in core.peer_connections
    assert opener.tcp_opened[0].closed_connections == [cid]


def test_deleting_a_tcp_allocation_forgets_its_connections() -> None:
    core, opener = make_core()
    c = tcp_client(core)
    c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)])
    core.peer_connection_received(core.allocations[c.ft], PEER, NOW)
    core.close_five_tuple(c.ft, NOW)
    assert not core.peer_connections and opener.tcp_opened[0].closed
    assert isinstance(c.ft, FiveTuple)
