"""Tenants in the core and the configuration: a request's tenant by the realm it names
or by the user or secret that verified it; tenant quotas, bandwidth, peer policy and the
monthly refusal; the tenants: section's errors name key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.core_client import (
    NOW,
    REALM,
    SECRET,
    CoreClient,
    error_code,
    make_core,
    rest_credential,
)
from turnserver.core.auth import Credentials
from turnserver.core.policy import DefaultPeerPolicy
from turnserver.core.quota import LocalQuotaLedger
from turnserver.core.server import TurnServer
from turnserver.core.tenants import TenantRules
from turnserver.ops.config.settings import build_settings, load_file
from turnserver.ops.config.tenants import parse_bytes
from turnserver.ops.config.values import ConfigError
from turnserver.ops.process.runtime_setup import tenant_credentials, tenant_rules
from turnserver.stun import Attr, Method

ACME_SECRET = "acme-secret"


def _tenant_core() -> TurnServer:
    core, _ = make_core()
    settings = build_settings(
        {
            "realm": REALM,
            "secrets": (SECRET,),
            "relay_ips": ("127.0.0.1",),
            "tenants": load_tenants(
                """
tenants:
  acme:
    realm: acme.example
    secrets: [acme-secret]
    users: [{name: carol, password: carol-pw}]
    quotas: {max_allocations: 2, bandwidth_kbps: 800}
    peers: {deny: [198.51.100.0/24]}
  beta:
    realm: beta.example
    secrets: [beta-secret]
"""
            ),
        },
        {},
        "test",
    )
    core.auth.configure(core.auth.credentials, tenant_credentials(settings))
    core.set_tenants(tenant_rules(settings))
    return core


def load_tenants(text: str, tmp: Path | None = None) -> object:
    path = Path(tmp or "/tmp") / "tenants-test.yaml"
    path.write_text(text)
    return load_file(str(path))["tenants"]


def _client(core: TurnServer, user: str, secret: str, port: int, realm: str = REALM) -> CoreClient:
    username, password = rest_credential(user, secret=secret)
    client = CoreClient(core, ("192.0.2.50", port), username, password)
    client.realm = realm
    return client


def test_the_secret_that_verifies_names_the_tenant_under_the_servers_realm() -> None:
    core = _tenant_core()
    assert _client(core, "a", ACME_SECRET, 40001).allocate().get(Attr.XOR_RELAYED_ADDRESS)
    assert _client(core, "d", SECRET, 40002).allocate().get(Attr.XOR_RELAYED_ADDRESS)
    tenants = sorted(a.tenant for a in core.allocations.values())
    assert tenants == ["acme", "default"]


def test_a_tenants_realm_takes_only_its_credentials() -> None:
    core = _tenant_core()
    first = _client(core, "a", ACME_SECRET, 40001, realm="acme.example")
    assert first.allocate().get(Attr.XOR_RELAYED_ADDRESS)
    first.request(Method.REFRESH, [(Attr.LIFETIME, 0)])  # (acme may hold two)
    # the server's own secret is not acme's
    wrong = _client(core, "d", SECRET, 40002, realm="acme.example").allocate()
    assert error_code(wrong) == 401
    # a static user of acme: under its realm and under the server's
    for port, realm in ((40003, "acme.example"), (40004, REALM)):
        carol = CoreClient(core, ("192.0.2.50", port), "carol", "carol-pw")
        carol.realm = realm
        assert carol.allocate().get(Attr.XOR_RELAYED_ADDRESS), realm
    assert {a.tenant for a in core.allocations.values()} == {"acme"}


def test_the_challenge_names_the_realm_the_request_named() -> None:
    core = _tenant_core()
    client = _client(core, "a", ACME_SECRET, 40001, realm="beta.example")
    first = client._send(
        Method.ALLOCATE,
        [(Attr.REQUESTED_TRANSPORT, 17), (Attr.REALM, "beta.example")],
        b"t" * 12,
        False,
        False,
    )
    assert first.get(Attr.REALM) == "beta.example"
    plain = client._send(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], b"u" * 12, False, False)
    assert plain.get(Attr.REALM) == REALM
    other = client._send(
        Method.ALLOCATE,
        [(Attr.REQUESTED_TRANSPORT, 17), (Attr.REALM, "evil")],
        b"v" * 12,
        False,
        False,
    )
    assert other.get(Attr.REALM) == REALM  # never echoes a realm that is not ours


def test_tenant_quota_bandwidth_and_peer_policy() -> None:
    core = _tenant_core()
    for port in (40001, 40002):
        assert _client(core, f"u{port}", ACME_SECRET, port).allocate().get(Attr.XOR_RELAYED_ADDRESS)
    third = _client(core, "u3", ACME_SECRET, 40003).allocate()
    assert error_code(third) == 486
    assert "quota_tenant" in third.get(Attr.ERROR_CODE)[1]
    # another tenant is not held back by acme's quota
    assert _client(core, "b", "beta-secret", 40004).allocate().get(Attr.XOR_RELAYED_ADDRESS)
    rates = {a.tenant: a.rate for a in core.allocations.values()}
    assert rates == {"acme": 100_000, "beta": 0}
    # acme's peer policy adds a denied network; beta's is the server's
    acme = next(c for c in core.allocations.values() if c.tenant == "acme")
    assert core.policy_verdict(acme, "198.51.100.7")[2] is False
    assert core.policy_verdict(acme, "8.8.8.8")[2] is True
    beta = next(c for c in core.allocations.values() if c.tenant == "beta")
    assert core.policy_verdict(beta, "8.8.8.8")[2] is True


def test_ending_allocations_free_the_tenant_quota() -> None:
    core = _tenant_core()
    clients = [_client(core, f"u{i}", ACME_SECRET, 41000 + i) for i in range(2)]
    for c in clients:
        c.allocate()
    clients[0].request(Method.REFRESH, [(Attr.LIFETIME, 0)])
    assert _client(core, "again", ACME_SECRET, 41005).allocate().get(Attr.XOR_RELAYED_ADDRESS)


def test_a_tenant_past_its_monthly_bytes_is_refused_new_allocations_only() -> None:
    core = _tenant_core()
    live = _client(core, "live", ACME_SECRET, 40001)
    live.allocate()
    core.month_exceeded = frozenset({"acme"})
    refused = _client(core, "new", ACME_SECRET, 40002).allocate()
    assert error_code(refused) == 486 and "quota_tenant_month" in refused.get(Attr.ERROR_CODE)[1]
    # the live call refreshes and keeps its allocation; other tenants allocate
    assert error_code(live.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) is None
    assert _client(core, "b", "beta-secret", 40003).allocate().get(Attr.XOR_RELAYED_ADDRESS)


def test_local_ledger_counts_tenants() -> None:
    ledger = LocalQuotaLedger()
    assert ledger.reserve("u1", "ip1", 0, 0, 0, "acme", 2) is None
    assert ledger.reserve("u2", "ip2", 0, 0, 0, "acme", 2) is None
    assert ledger.reserve("u3", "ip3", 0, 0, 0, "acme", 2) == "quota_tenant"
    assert ledger.reserve("u3", "ip3", 0, 0, 0, "", 2) is None  # the implicit tenant
    ledger.release("u1", "ip1", "acme")
    assert ledger.reserve("u3", "ip3", 0, 0, 0, "acme", 2) is None


def test_no_tenants_is_one_implicit_tenant() -> None:
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()
    (alloc,) = core.allocations.values()
    assert alloc.tenant == "default"
    assert core.auth.realms == {REALM: (core.auth.credentials,)}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tenants:\n  Acme:\n    realm: a\n", "tenants.Acme: tenant names are"),
        ("tenants:\n  default:\n    realm: a\n", "is the implicit tenant"),
        ("tenants:\n  a:\n    secrets: [x]\n", "tenants.a.realm: every tenant has its own realm"),
        (
            "tenants:\n  a:\n    realm: r\n    quotas:\n      monthly_bytes: lots\n",
            "t.yaml:5: tenants.a.quotas.monthly_bytes: expected a byte count",
        ),
        (
            "tenants:\n  a:\n    realm: r\n    quotas:\n      monthly_action: cut\n",
            "t.yaml:5: tenants.a.quotas.monthly_action",
        ),
        (
            "tenants:\n  a:\n    realm: r\n    colour: blue\n",
            "t.yaml:4: tenants.a.colour: unknown key",
        ),
        (
            "tenants:\n  a:\n    realm: r\n    peers:\n      deny: [not-a-net]\n",
            "t.yaml:5: tenants.a.peers.deny",
        ),
    ],
)
def test_bad_tenants_name_key_and_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace(".", r"\.")):
        load_file(str(path))


@pytest.mark.parametrize(
    ("tenants", "error"),
    [
        (
            "tenants:\n  a: {realm: example.org}\n",
            "tenants.a.realm: 'example.org' is already default",
        ),
        ("tenants:\n  a: {realm: r}\n  b: {realm: r}\n", "tenants.b.realm: 'r' is already a's"),
        (
            "tenants:\n  a: {realm: r1, users: [{name: alice, password: p}]}\n",
            "user 'alice' is also default's",
        ),
        (
            "tenants:\n  a: {realm: r1, quotas: {monthly_bytes: 1GB}}\n",
            "usage.state_dir: tenants.*.quotas.monthly_bytes keeps state on disk",
        ),
    ],
)
def test_tenants_that_overlap_are_refused(tmp_path: Path, tenants: str, error: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "realm: example.org\nrelay: {ip: [127.0.0.1]}\n"
        "auth: {secrets: [s], users: [{name: alice, password: pw}]}\n" + tenants
    )
    with pytest.raises(ConfigError, match=error.replace("*", r"\*").replace(".", r"\.")):
        build_settings(load_file(str(path)), {}, str(path))


def test_byte_counts() -> None:
    assert parse_bytes("500GB", "k") == 500 * 10**9
    assert parse_bytes("1.5TiB", "k") == int(1.5 * 2**40)
    assert parse_bytes("100M", "k") == 100 * 10**6
    assert parse_bytes(4096, "k") == 4096
    with pytest.raises(ConfigError):
        parse_bytes(-1, "k")


def test_tenant_rules_from_settings() -> None:
    rules = tenant_rules(
        build_settings(
            {
                "secrets": ("s",),
                "relay_ips": ("127.0.0.1",),
                "allow_peers": ("10.1.0.0/16",),
                "tenants": load_tenants(
                    "tenants:\n  a:\n    realm: r\n    quotas: {monthly_action: warn}\n"
                    "    peers: {allow: [10.2.0.0/16]}\n"
                ),
            },
            {},
            "test",
        )
    )
    rule = rules["a"]
    assert isinstance(rule, TenantRules) and not rule.monthly_refuse
    assert isinstance(rule.peer_policy, DefaultPeerPolicy)
    import ipaddress

    for ip in ("10.1.2.3", "10.2.3.4"):  # the server's allow list and the tenant's
        assert rule.peer_policy.is_allowed(ipaddress.ip_address(ip))


def test_credentials_of_tenants_twice() -> None:
    settings = build_settings(
        {
            "realm": "main",
            "secrets": ("s",),
            "relay_ips": ("127.0.0.1",),
            "tenants": load_tenants("tenants:\n  a:\n    realm: r\n    secrets: [x]\n"),
        },
        {},
        "test",
    )
    creds = tenant_credentials(settings)
    assert [(c.realm, c.tenant) for c in creds] == [("r", "a"), ("main", "a")]
    assert all(isinstance(c, Credentials) and c.secrets == ("x",) for c in creds)
    assert NOW  # (the core tests' clock)
