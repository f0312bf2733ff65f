"""TURN request failures: each class carries its STUN error code (RFC 8656 §18.10).

A handler raises one of these; the server turns it into an ERROR-CODE response at
exactly one place. `reason` is the bounded label used for metrics and logs.
"""

from __future__ import annotations

from turnserver.stun.constants import ERROR_REASONS, ErrorCode


class TurnError(Exception):
    """A request that must be answered with an error response."""

    code: int = ErrorCode.SERVER_ERROR
    reason: str = "server_error"

    def __init__(self, detail: str = "", *, reason: str | None = None) -> None:
        super().__init__(detail or ERROR_REASONS.get(self.code, "Error"))
        self.detail = detail or ERROR_REASONS.get(self.code, "Error")
        if reason is not None:
            self.reason = reason

    @property
    def phrase(self) -> str:
        """The reason phrase sent in ERROR-CODE: the code's words, and for refusals a
        client may act on (403, 486, 508) the bounded reason, so a client can say why
        (`Forbidden (revoked)`, `Allocation Quota Reached (quota_user)`)."""
        words = ERROR_REASONS.get(self.code, "Error")
        return f"{words} ({self.reason})" if self.code in EXPLAINED else words


EXPLAINED = frozenset({403, 486, 508})


class TryAlternate(TurnError):
    code = ErrorCode.TRY_ALTERNATE
    reason = "try_alternate"

    def __init__(self, server: tuple[str, int], detail: str = "") -> None:
        super().__init__(detail)
        self.server = server


class BadRequest(TurnError):
    code = ErrorCode.BAD_REQUEST
    reason = "bad_request"


class Unauthorized(TurnError):
    code = ErrorCode.UNAUTHORIZED
    reason = "unauthenticated"


class Forbidden(TurnError):
    code = ErrorCode.FORBIDDEN
    reason = "peer_denied"


class Revoked(Forbidden):
    """An operator revoked this user (admin API): 403 until the revocation ends."""

    reason = "revoked"

    @property
    def phrase(self) -> str:
        return "Forbidden: access revoked"


class UnknownAttribute(TurnError):
    code = ErrorCode.UNKNOWN_ATTRIBUTE
    reason = "unknown_attribute"

    def __init__(self, attributes: list[int]) -> None:
        super().__init__(
            "unknown comprehension-required attributes: "
            + ", ".join(f"0x{a:04x}" for a in attributes)
        )
        self.attributes = attributes


class AllocationMismatch(TurnError):
    code = ErrorCode.ALLOCATION_MISMATCH
    reason = "allocation_mismatch"


class StaleNonce(TurnError):
    code = ErrorCode.STALE_NONCE
    reason = "stale_nonce"


class AddressFamilyNotSupported(TurnError):
    code = ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED
    reason = "address_family_not_supported"


class WrongCredentials(TurnError):
    code = ErrorCode.WRONG_CREDENTIALS
    reason = "wrong_credentials"


class UnsupportedTransport(TurnError):
    code = ErrorCode.UNSUPPORTED_TRANSPORT_PROTOCOL
    reason = "unsupported_transport"


class PeerAddressFamilyMismatch(TurnError):
    code = ErrorCode.PEER_ADDRESS_FAMILY_MISMATCH
    reason = "peer_address_family_mismatch"


class AllocationQuotaReached(TurnError):
    code = ErrorCode.ALLOCATION_QUOTA_REACHED
    reason = "quota_user"


class InsufficientCapacity(TurnError):
    code = ErrorCode.INSUFFICIENT_CAPACITY
    reason = "no_relay_port"


class ConnectionAlreadyExists(TurnError):
    code = ErrorCode.CONNECTION_ALREADY_EXISTS
    reason = "connection_exists"


class ConnectionTimeoutOrFailure(TurnError):
    code = ErrorCode.CONNECTION_TIMEOUT_OR_FAILURE
    reason = "connection_failed"


# 401s that say why (the reason phrase): the client's credential expired, or the
# authorization hook could not vouch for the user (RFC 8489 §9.2.5: a client takes a
# 401 without integrity; a 500 we cannot sign for an unknown user it would drop)
CHALLENGE_NOTES = {
    "expired_credentials": "expired credential",
    "auth_hook_failed": "authorization hook unavailable",
    "auth_hook_busy": "authorization hook busy",
}
