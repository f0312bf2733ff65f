"""The default-deny peer policy, address by address (RFC 8656 §21.2.3, CVE-2020-26262)."""

from __future__ import annotations

import ipaddress

import pytest

from turnserver.core.policy import DefaultPeerPolicy, canonical_ip

DENIED = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.255",
    "169.254.169.254",
    "169.254.0.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.10",
    "198.51.100.7",
    "203.0.113.99",
    "198.18.0.1",
    "198.19.255.255",
    "192.0.0.8",
    "::1",
    "::",
    "fe80::1",
    "febf::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "2001:db8::1",
    "64:ff9b::7f00:1",
    "64:ff9b::808:808",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",
    "::127.0.0.1",
    "::10.1.1.1",
    "::ffff:192.168.0.1",
    "100::1",
    "2001:2::1",
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "172.15.255.255",
    "172.32.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "169.253.255.255",
    "11.0.0.1",
    "192.167.255.255",
    "223.255.255.254",
    "198.17.255.255",
    "198.20.0.0",
    "2001:4860:4860::8888",
    "2a00:1450::1",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9c::1",
]


@pytest.mark.parametrize("address", DENIED)
def test_default_policy_denies(address: str) -> None:
    assert not DefaultPeerPolicy().is_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_default_policy_allows_public_addresses(address: str) -> None:
    assert DefaultPeerPolicy().is_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.20.0.5", True),  # the enterprise's media subnet
        ("10.20.255.255", True),
        ("::ffff:10.20.1.1", True),  # mapped form of an allowed address
        ("10.21.0.1", False),
        ("127.0.0.1", False),
        ("8.8.8.8", True),
        ("8.8.4.4", False),  # explicitly denied
        ("::ffff:8.8.4.4", False),
        ("2001:4860::1", False),  # denied IPv6 range
        ("fd00:1::5", True),  # allowed ULA
    ],
)
def test_allow_list_wins_and_deny_list_adds(address: str, allowed: bool) -> None:
    policy = DefaultPeerPolicy(
        allow=["10.20.0.0/16", "fd00:1::/64"], deny=["8.8.4.0/24", "2001:4860::/32"]
    )
    assert policy.is_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.8.9.10"])
def test_loopback_only_with_the_development_flag(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not DefaultPeerPolicy().is_allowed(ip)
    assert DefaultPeerPolicy(allow_loopback=True).is_allowed(ip)
    assert not DefaultPeerPolicy(allow_loopback=True).is_allowed(ipaddress.ip_address("10.0.0.1"))


def test_canonicalisation() -> None:
    assert str(canonical_ip(ipaddress.ip_address("::ffff:7f00:1"))) == "127.0.0.1"
    assert str(canonical_ip(ipaddress.ip_address("::7f00:1"))) == "127.0.0.1"
    assert str(canonical_ip(ipaddress.ip_address("::1"))) == "::1"  # loopback, not ::0.0.0.1


def test_bad_cidr_names_itself() -> None:
    with pytest.raises(ValueError, match="not-a-net"):
        DefaultPeerPolicy(allow=["not-a-net"])
