"""Which upstream addresses are internal, so that no allowed *name* reaches them by accident.

A name that resolves to loopback, a private or link-local network (cloud metadata), CGNAT,
multicast or an unspecified address is refused unless a `cidr` rule names the address: that is
how DNS rebinding and SSRF through an allowed name are stopped. IPv6 addresses that embed an
IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are refused outright unless allowed,
since the embedded address could be any of the above.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_network

from .hosts import Address

_RANGES = [(ip_network(net), kind) for net, kind in [
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "CGNAT (shared address space)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64 (embeds an IPv4 address)"),
    ("64:ff9b:1::/48", "NAT64 (embeds an IPv4 address)"),
    ("2001::/32", "Teredo (embeds an IPv4 address)"),
    ("2002::/16", "6to4 (embeds an IPv4 address)"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
]]


@lru_cache(maxsize=4096)  # asked for every request's pinned address: 23 networks each time
def internal_kind(address: Address) -> str | None:
    """What makes `address` internal ("private", "loopback", ...), or None if it is public."""
    for network, kind in _RANGES:
        if address.version == network.version and address in network:
            return kind
    if isinstance(address, IPv4Address | IPv6Address) and address.is_reserved:
        return "reserved"
    return None
