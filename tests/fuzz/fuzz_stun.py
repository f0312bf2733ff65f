"""Coverage-guided fuzzing (atheris/libFuzzer) of the codec, the stream framer, the core
and the PROXY protocol parser.

The invariant: hostile bytes raise StunDecodeError from the codec and framer,
ProxyHeaderError from the PROXY parser, and nothing at all from the core. Run through
`make fuzz`, or directly:

    python tests/fuzz/fuzz_stun.py -runs=2000000 tests/fuzz/corpus
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from tests.support.core_client import decode_every_attribute
    from turnserver.core.allocation import Allocation
    from turnserver.core.auth import Authenticator, Credentials, NonceIssuer
    from turnserver.core.config import CoreConfig, RelayAddress
    from turnserver.core.five_tuple import ClientTransport, FiveTuple
    from turnserver.core.policy import DefaultPeerPolicy
    from turnserver.core.server import TurnServer
    from turnserver.io.proxy_protocol import ProxyHeaderError, parse_proxy_header
    from turnserver.stun import StunDecodeError, decode_channel_data
    from turnserver.stun.attributes import Address
    from turnserver.stun.framing import StreamFramer


class _Relay:
    address: Address = ("127.0.0.1", 50000)

    def sendto(self, data: bytes, addr: Address) -> None:
        pass

    def close(self) -> None:
        pass

    def connect(self, connection_id: int, peer: Address) -> None:
        pass

    def close_connection(self, connection_id: int) -> None:
        pass


class _Opener:
    def open_relay(
        self, allocation: Allocation, host: str, port: int, *, dont_fragment: bool
    ) -> _Relay:
        return _Relay()

    def open_tcp_relay(self, allocation: Allocation, host: str, port: int) -> _Relay:
        return _Relay()

    def has_capacity(self, sockets: int) -> bool:
        return True


def _core() -> TurnServer:
    config = CoreConfig(
        relay_addresses=(RelayAddress("127.0.0.1", "127.0.0.1", 4),), min_port=50000, max_port=50063
    )
    creds = Credentials.build("example.org", passwords={"u": "p"}, secrets=["capsecret"])
    return TurnServer(
        config,
        Authenticator(creds, NonceIssuer(b"k" * 32)),
        _Opener(),
        DefaultPeerPolicy(allow_loopback=True),
    )


CORE = _core()
UDP = FiveTuple(("127.0.0.1", 40000), ("127.0.0.1", 3478), ClientTransport.UDP)
TCP = FiveTuple(("127.0.0.1", 40001), ("127.0.0.1", 3478), ClientTransport.TCP)
NOW = 1795540000.0


def test_one_input(data: bytes) -> None:
    # 1. the codec: only StunDecodeError
    try:
        decode_every_attribute(data)
    except StunDecodeError:
        pass
    try:
        decode_channel_data(data)
    except StunDecodeError:
        pass
    # 2. the stream framer, fed in uneven pieces, its frames into the core as over TCP
    framer = StreamFramer()
    step = 1 + (data[0] % 7 if data else 0)
    try:
        for i in range(0, len(data), step):
            for frame in framer.feed(data[i : i + step]):
                if frame[0] < 0x40:
                    CORE.handle_message(frame, TCP, NOW)
                else:
                    CORE.handle_channel_data((frame[0] << 8) | frame[1], frame[4:], TCP, NOW)
    except StunDecodeError:
        pass
    # 3. the PROXY header parser: a header no longer than the input, or its one error
    for versions in (frozenset({1}), frozenset({2}), frozenset({1, 2})):
        try:
            header = parse_proxy_header(data, versions)
        except ProxyHeaderError:
            continue
        assert header is None or 0 < header.length <= len(data)
    # 4. the core: never raises, whatever arrives
    CORE.handle_message(data, UDP, NOW)
    CORE.handle_message(data, TCP, NOW)
    CORE.handle_timer(NOW + 400)  # expiry paths with whatever state the input made
    if len(CORE.allocations) > 32:
        CORE.shutdown(NOW)
    CORE.drain_events()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
