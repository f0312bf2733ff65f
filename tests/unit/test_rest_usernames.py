"""TURN REST usernames: one unambiguous rule for the order of expiry and
user, never an expired credential made valid by reading the other order, ASCII digits
only (a USERNAME of '²' is a 401, not an exception out of the core)."""

from __future__ import annotations

import pytest

from tests.support.core_client import NOW, REALM, SECRET, CoreClient, error_code, make_core
from turnserver.core.auth import Credentials, parse_rest_username, rest_password
from turnserver.stun import Attr, Method

VALID = int(NOW) + 3600
EXPIRED = int(NOW) - 86400


@pytest.mark.parametrize(
    ("username", "order", "expected"),
    [
        (f"{VALID}:alice", "auto", (VALID, "alice")),
        (f"alice:{VALID}", "auto", (VALID, "alice")),
        (str(VALID), "auto", (VALID, "")),
        # a numeric user: both ends are numbers, the earlier one is the expiry
        (f"4155551234:{EXPIRED}", "auto", (EXPIRED, "4155551234")),
        (f"{EXPIRED}:4155551234", "auto", (EXPIRED, "4155551234")),
        (f"42:{VALID}", "auto", (42, str(VALID))),
        (f"42:{VALID}", "user-first", (VALID, "42")),
        (f"{VALID}:42", "expiry-first", (VALID, "42")),
        (f"alice:{VALID}", "expiry-first", None),
        (f"{VALID}:alice", "user-first", None),
        ("²", "auto", None),
        ("²:alice", "auto", None),
        ("alice:١٢٣", "auto", None),  # Arabic-Indic digits
        ("1" * 13, "auto", None),  # more digits than any expiry
        ("alice", "auto", None),
    ],
)
def test_rest_username_orders(username: str, order: str, expected: object) -> None:
    assert parse_rest_username(username, order) == expected


def _client(username: str, order: str = "auto") -> tuple[CoreClient, object]:
    core, _ = make_core()
    core.auth.credentials = Credentials.build(REALM, secrets=[SECRET], rest_order=order)
    c = CoreClient(core)
    c.username, c.password = username, rest_password(SECRET, username)
    return c, core


def test_an_expired_credential_of_a_numeric_user_stays_expired() -> None:
    c, _ = _client(f"4155551234:{EXPIRED}")  # minted user-first: user 4155551234
    assert error_code(c.allocate()) == 401
    c, _ = _client(f"4155551234:{VALID}", "user-first")
    assert error_code(c.allocate()) is None


@pytest.mark.parametrize("username", ["²", "²:alice", "alice:²", "١٢٣", "\u00b2" * 100])
def test_unicode_digits_in_a_username_are_a_401_not_an_exception(username: str) -> None:
    c, core = _client(username)
    resp = c.allocate()
    assert error_code(resp) == 401
    c.request(Method.REFRESH, [(Attr.LIFETIME, 0)])
    assert not core.allocations  # type: ignore[attr-defined]
