from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_egress.rules import HostError, Name, normalize_host

LOOPBACK = IPv4Address("127.0.0.1")


@pytest.mark.parametrize("spelling", [
    "127.0.0.1", "2130706433", "0x7f000001", "0x7F.1", "0177.0.0.1", "0177.0.0.01", "127.1",
    "127.0.1", "127.0.0.1.", "0x7f.0.0.1", "017700000001", "::ffff:127.0.0.1", "[::ffff:7f00:1]",
    "[::ffff:127.0.0.1]", "１２７．０．０．１",
])
def test_every_spelling_of_an_address_is_that_address(spelling):
    assert normalize_host(spelling) == LOOPBACK


@pytest.mark.parametrize("spelling, address", [
    ("[::1]", "::1"), ("::1", "::1"), ("fe80::1%eth0", "fe80::1"), ("[fe80::1%25eth0]", "fe80::1"),
    ("[2001:DB8::A]", "2001:db8::a"), ("169.254.169.254", "169.254.169.254"),
    ("0xa9fea9fe", "169.254.169.254"), ("0", "0.0.0.0"),  # noqa: S104 (a spelling, not a bind)
])
def test_ipv6_and_other_literals(spelling, address):
    assert normalize_host(spelling) == ip_address(address)


@pytest.mark.parametrize("spelling, name", [
    ("Example.TEST", "example.test"), ("example.test.", "example.test"),
    ("bücher.example.test", "xn--bcher-kva.example.test"),
    ("BÜCHER.example.test", "xn--bcher-kva.example.test"),
    ("xn--bcher-kva.example.test", "xn--bcher-kva.example.test"),
    ("example。test", "example.test"), ("ｅｘａｍｐｌｅ.test", "example.test"),
    ("_dmarc.example.test", "_dmarc.example.test"), ("1.2.3.example.test", "1.2.3.example.test"),
    ("аpple.test", "xn--pple-43d.test"),  # Cyrillic a: a homograph is another name
])
def test_names_are_canonical(spelling, name):
    host = normalize_host(spelling)
    assert isinstance(host, Name) and host.text == name


@pytest.mark.parametrize("spelling, message", [
    ("", "empty host"),
    ("a..test", "has an empty label"),
    ("-a.test", "invalid label '-a'"),
    ("a b.test", "invalid label 'a b'"),
    ("a" * 64 + ".test", "invalid label"),
    (".".join(["a" * 63] * 4) + ".test", "longer than 253"),
    ("1.2.3.4.5", "ends in a number but is not an IPv4 address"),
    ("256.0.0.1", "out of range"),
    ("09.0.0.1", "ends in a number but is not an IPv4 address"),
    ("xn--zz.test", "invalid A-label"),
    ("[::1", "not a valid IPv6"),
    ("host:443", "not a valid IPv6"),
    ("%31%32%37.0.0.1", "ends in a number"),
    ("%31%32%37.example.test", "invalid label"),
    ("exa\u200dmple.test", "not a valid host name"),
])
def test_invalid_hosts_are_refused(spelling, message):
    with pytest.raises(HostError, match=None) as raised:
        normalize_host(spelling)
    assert message in str(raised.value)


def canonical_text(host):
    return f"[{host}]" if isinstance(host, IPv6Address) else str(host)


hostnames = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9_-]{0,10}(\.[a-zA-Z][a-zA-Z0-9-]{0,10}){1,4}\.?",
                          fullmatch=True).filter(lambda s: "--" not in s and "-." not in s
                                                 and not s.rstrip(".").endswith("-"))
unicode_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                        min_size=1, max_size=30)


@given(st.one_of(hostnames, unicode_names, st.ip_addresses().map(str)))
def test_normalisation_is_idempotent(raw):
    try:
        once = normalize_host(raw)
    except HostError:
        return
    assert normalize_host(canonical_text(once)) == once
