"""RFC 6062 TCP connections: Connect, ConnectionAttempt, ConnectionBind, and the limits
on peer connections per allocation."""

from __future__ import annotations

import random
import secrets

from turnserver.core import events as ev
from turnserver.core.allocation import (
    Allocation,
    PeerConnection,
)
from turnserver.core.errors import (
    BadRequest,
    ConnectionAlreadyExists,
    ConnectionTimeoutOrFailure,
    InsufficientCapacity,
    TurnError,
    WrongCredentials,
)
from turnserver.core.five_tuple import ClientTransport, FiveTuple
from turnserver.core.identity import Identity
from turnserver.core.state import (
    CONNECTION_ID_OWNER_SHIFT,
    CONNECTION_TIMEOUT,
    Attributes,
    CoreState,
    DeferredResponse,
    RemoteBind,
    TimerKind,
)
from turnserver.stun.attributes import Address
from turnserver.stun.constants import (
    Attr,
    MessageClass,
    Method,
)
from turnserver.stun.message import StunMessage, encode_message


class TcpConnectionHandlers:
    """Connect and ConnectionBind (RFC 6062 §5.2-§5.4)."""

    def __init__(self, state: CoreState) -> None:
        self.state = state

    def _check_peer_connection_limits(self, alloc: Allocation, connecting: bool) -> None:
        """RFC 6062 limits per allocation: peer connections, and Connects in flight."""
        cfg = self.state.config
        conns = alloc.peer_connections
        if cfg.max_peer_connections_per_allocation and (
            len(conns) >= cfg.max_peer_connections_per_allocation
        ):
            raise InsufficientCapacity("too many peer connections", reason="quota_connections")
        if connecting and cfg.max_pending_connects_per_allocation:
            pending = sum(pc.state == PeerConnection.CONNECTING for pc in conns.values())
            if pending >= cfg.max_pending_connects_per_allocation:
                raise InsufficientCapacity(
                    "too many Connect requests in progress", reason="quota_pending_connects"
                )
        self.state.check_descriptors(1)

    def _new_connection_id(self) -> int:
        """A fresh CONNECTION-ID whose top byte is this worker's index."""
        owner = self.state.worker_index << CONNECTION_ID_OWNER_SHIFT
        while True:
            cid = owner | secrets.randbits(CONNECTION_ID_OWNER_SHIFT)
            if cid and cid not in self.state.peer_connections:
                return cid

    def connect(self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float) -> Attributes:
        """RFC 6062 §5.2: dial the peer from the relayed address; answer when it is done."""
        alloc = self.state.allocation_of(ft, ident)
        if not alloc.is_tcp:
            raise BadRequest("Connect needs a TCP allocation")
        peer: Address | None = msg.get(Attr.XOR_PEER_ADDRESS)
        if peer is None:
            raise BadRequest("Connect without XOR-PEER-ADDRESS")
        ip = self.state.check_peer(alloc, peer, ft, with_port=True)
        peer = (ip, peer[1])
        if peer in alloc.peer_connections:
            raise ConnectionAlreadyExists(f"a connection to {peer[0]}:{peer[1]} exists")
        self._check_peer_connection_limits(alloc, connecting=True)
        relay = alloc.relay_to(ip)
        assert relay is not None and relay.tcp is not None
        pc = PeerConnection(
            self._new_connection_id(),
            alloc,
            peer,
            PeerConnection.CONNECTING,
            now + CONNECTION_TIMEOUT,
        )
        pc.connect_transaction_id = msg.transaction_id
        pc.connect_fingerprint = msg.fingerprint_offset >= 0
        self.state.peer_connections[pc.id] = pc
        alloc.peer_connections[peer] = pc
        self.state.install_permission(alloc, ip, now)
        relay.tcp.connect(pc.id, peer)
        raise DeferredResponse

    def connect_result(self, connection_id: int, ok: bool, now: float) -> bytes | None:
        """The I/O layer finished dialling; returns the Connect response for the client."""
        pc = self.state.peer_connections.get(connection_id)
        if pc is None or pc.state != PeerConnection.CONNECTING:
            return None
        alloc = pc.alloc
        ft = alloc.five_tuple
        if ok:
            pc.state = PeerConnection.PENDING_BIND
            pc.expires = now + CONNECTION_TIMEOUT
            self.state.push_timer(pc.expires, TimerKind.PEER_CONNECTION, None, pc.id)
            attrs: Attributes = [(Attr.CONNECTION_ID, pc.id)]
            klass = MessageClass.SUCCESS
            self.state.events.append(ev.RequestHandled(ft, "connect", 0, "", alloc.username))
        else:
            self.state.forget_peer_connection(pc, close=False)
            err = ConnectionTimeoutOrFailure(f"could not connect to {pc.peer[0]}:{pc.peer[1]}")
            attrs = [(Attr.ERROR_CODE, (err.code, err.phrase))]
            klass = MessageClass.ERROR
            self.state.events.append(
                ev.RequestHandled(ft, "connect", err.code, err.reason, alloc.username)
            )
        if self.state.config.software:
            attrs.append((Attr.SOFTWARE, self.state.config.software))
        return encode_message(
            Method.CONNECT,
            klass,
            pc.connect_transaction_id,
            attrs,
            integrity_key=alloc.key,
            fingerprint=pc.connect_fingerprint,
        )

    def peer_connection_received(
        self, alloc: Allocation, peer: Address, now: float
    ) -> tuple[int, bytes] | None:
        """A peer connected to a TCP relayed address (RFC 6062 §5.3).

        Returns the CONNECTION-ID and the ConnectionAttempt indication for the client, or
        None when the peer has no permission (the I/O layer closes the connection)."""
        if not alloc.live or peer[0] not in alloc.permissions or peer in alloc.peer_connections:
            self.state.stats.dropped_no_permission += 1
            return None
        try:
            self._check_peer_connection_limits(alloc, connecting=False)
        except InsufficientCapacity as err:
            self.state.events.append(ev.MessageDiscarded(alloc.five_tuple, err.reason, err.detail))
            return None
        pc = PeerConnection(
            self._new_connection_id(),
            alloc,
            peer,
            PeerConnection.PENDING_BIND,
            now + CONNECTION_TIMEOUT,
        )
        self.state.peer_connections[pc.id] = pc
        alloc.peer_connections[peer] = pc
        self.state.push_timer(pc.expires, TimerKind.PEER_CONNECTION, None, pc.id)
        return pc.id, encode_message(
            Method.CONNECTION_ATTEMPT,
            MessageClass.INDICATION,
            random.randbytes(12),
            [(Attr.XOR_PEER_ADDRESS, peer), (Attr.CONNECTION_ID, pc.id)],
        )

    def connection_bind(
        self, msg: StunMessage, ft: FiveTuple, ident: Identity, now: float
    ) -> Attributes:
        """RFC 6062 §5.4: a new client connection takes over one peer connection."""
        if ft.transport == ClientTransport.UDP or ft in self.state.allocations:
            raise BadRequest("ConnectionBind must come on a new TCP connection")
        cid = msg.get(Attr.CONNECTION_ID)
        if cid is None:
            raise BadRequest("ConnectionBind without CONNECTION-ID")
        owner = cid >> CONNECTION_ID_OWNER_SHIFT
        if owner != self.state.worker_index and owner < self.state.worker_count:
            # another worker's connection: the I/O layer asks it (finish_remote_bind)
            if ft in self.state.remote_binds:
                raise BadRequest("a ConnectionBind is in progress on this connection")
            self.state.remote_binds[ft] = RemoteBind(
                cid, owner, msg.transaction_id, msg.fingerprint_offset >= 0, ident
            )
            self.state.events.append(ev.ConnectionBindForwarded(ft, cid, owner, ident.username))
            raise DeferredResponse
        self._check_bind(self.state.peer_connections.get(cid), ident.username)
        return []

    @staticmethod
    def _check_bind(pc: PeerConnection | None, username: str) -> PeerConnection:
        """RFC 6062 §5.4: a known connection waiting for its bind, of the same user."""
        if pc is None or pc.state != PeerConnection.PENDING_BIND:
            raise BadRequest("unknown or already bound CONNECTION-ID")
        if username != pc.alloc.username:
            raise WrongCredentials("username differs from the allocation's")
        return pc

    def hand_over_peer_connection(self, connection_id: int, username: str) -> int:
        """Another worker accepted the ConnectionBind for one of our peer connections:
        0 when it may take the connection over (now bound there), else the STUN error
        code to answer with. The allocation keeps counting the connection."""
        try:
            pc = self._check_bind(self.state.peer_connections.get(connection_id), username)
        except TurnError as err:
            return err.code
        pc.state = PeerConnection.BOUND
        return 0

    def finish_remote_bind(self, ft: FiveTuple, code: int) -> bytes | None:
        """The owner of a forwarded ConnectionBind answered (code 0: the connection is
        ours now); returns the response for the client's data connection."""
        rb = self.state.remote_binds.pop(ft, None)
        if rb is None:
            return None
        ident = rb.identity
        err: TurnError | None = None
        if code == WrongCredentials.code:
            err = WrongCredentials("username differs from the allocation's")
        elif code == BadRequest.code:
            err = BadRequest("unknown or already bound CONNECTION-ID")
        elif code:
            err = ConnectionTimeoutOrFailure("the connection's owner did not hand it over")
        attrs: Attributes = []
        if err is None:
            klass = MessageClass.SUCCESS
            self.state.events.append(
                ev.RequestHandled(ft, "connection_bind", 0, "", ident.username)
            )
        else:
            klass = MessageClass.ERROR
            attrs.append((Attr.ERROR_CODE, (err.code, err.phrase)))
            self.state.events.append(
                ev.RequestHandled(ft, "connection_bind", err.code, err.reason, ident.username)
            )
        if self.state.config.software:
            attrs.append((Attr.SOFTWARE, self.state.config.software))
        return encode_message(
            Method.CONNECTION_BIND,
            klass,
            rb.transaction_id,
            attrs,
            integrity_key=ident.key,
            fingerprint=rb.fingerprint,
            integrity_sha256=ident.sha256_integrity,
        )

    def finish_connection_bind(self, msg: StunMessage, ft: FiveTuple) -> None:
        pc = self.state.peer_connections[msg.get(Attr.CONNECTION_ID)]
        pc.state = PeerConnection.BOUND
        pc.data_five_tuple = ft
        self.state.events.append(ev.PeerConnectionBound(ft, pc.alloc.five_tuple, pc.id, pc.peer))

    def peer_connection_closed(self, connection_id: int) -> None:
        """The peer side or the data connection closed; forget the connection."""
        pc = self.state.peer_connections.get(connection_id)
        if pc is not None:
            self.state.forget_peer_connection(pc, close=False)
