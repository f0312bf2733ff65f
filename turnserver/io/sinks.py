"""How relay sockets reach a client: the interface every client transport implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ClientSink(Protocol):
    """Sends STUN messages and ChannelData to one client."""

    def send(self, data: bytes) -> None: ...

    def send_channel_data(self, number: int, payload: bytes) -> None: ...
