"""Canonical forms of destination hosts, so that one destination has one spelling.

Names become lowercase A-labels without a trailing dot (UTS-46 mapping, so full-width letters and
ideographic full stops fold too). Anything that a URL parser would read as an IPv4 address
(`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`) becomes that address, IPv4-mapped IPv6 becomes
IPv4, and brackets and zone ids are dropped: no spelling of an address can pass for a name.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import idna

Address = IPv4Address | IPv6Address

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PLAIN_NAME = re.compile(rf"(?:{_LABEL.pattern}\.)*{_LABEL.pattern}")  # no IDN labels to check
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")
MAX_NAME_LENGTH = 253


class HostError(ValueError):
    """A host that is neither a valid DNS name nor an IP address."""


@dataclass(frozen=True, slots=True)
class Name:
    """A normalised DNS name and the parents a `*.parent` rule could name, nearest first."""

    text: str
    parents: tuple[str, ...]

    def __str__(self) -> str:
        return self.text


Host = Name | Address


# Hosts normalised lately, each kept with the spelling it was asked in. An agent reaches a few
# hundred hosts; names new on every request (a load test, a tunnel through DNS names) only
# cycle through the cache. Each entry takes about 300 bytes: at 65,536 the cache alone grew the
# proxy by 27 MiB over its first ten minutes under such load.
NORMALIZED_HOSTS = 16384


@functools.lru_cache(maxsize=NORMALIZED_HOSTS)
def normalize_host(raw: str) -> Host:
    """The canonical form of a host as a client or a policy spells it; raises HostError."""
    text = raw.strip()
    if not text:
        raise HostError("empty host")
    if text.startswith("[") and text.endswith("]"):
        return _ipv6(text[1:-1], raw)
    if ":" in text:
        return _ipv6(text, raw)
    if not text.isascii():
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise HostError(f"{raw!r} is not a valid host name: {e}") from None
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    labels = text.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return _ipv4(labels, raw)
    return _name(labels, raw)


def normalize_name(raw: str) -> Name:
    """Like normalize_host, for places where only a DNS name is acceptable."""
    host = normalize_host(raw)
    if not isinstance(host, Name):
        raise HostError(f"{raw!r} is an IP address, not a name")
    return host


def _name(labels: list[str], raw: str) -> Name:
    text = ".".join(labels)
    if "xn--" not in text and _PLAIN_NAME.fullmatch(text) and len(text) <= MAX_NAME_LENGTH:
        return Name(text, _parents(text))
    out = []
    for label in labels:
        if not label:
            raise HostError(f"{raw!r} has an empty label")
        if not label.isascii():
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError) as e:
                raise HostError(f"{raw!r} is not a valid host name: {e}") from None
        elif label.startswith("xn--"):
            try:
                idna.ulabel(label)
            except (idna.IDNAError, UnicodeError) as e:
                raise HostError(f"{raw!r} has an invalid A-label {label!r}: {e}") from None
        if not _LABEL.fullmatch(label):
            raise HostError(f"{raw!r} has an invalid label {label!r} "
                            "(expected letters, digits, '-' and '_', at most 63)")
        out.append(label)
    text = ".".join(out)
    if len(text) > MAX_NAME_LENGTH:
        raise HostError(f"{raw!r} is longer than {MAX_NAME_LENGTH} characters")
    return Name(text, _parents(text))


def _parents(text: str) -> tuple[str, ...]:
    """The parents of `text`, nearest first; interned, so that the names under one parent
    share its string."""
    parents = []
    dot = text.find(".")
    while dot >= 0:
        parents.append(sys.intern(text[dot + 1:]))
        dot = text.find(".", dot + 1)
    return tuple(parents)


def _ipv4(parts: list[str], raw: str) -> IPv4Address:
    """The WHATWG URL / inet_aton reading of a dotted number with 1 to 4 parts."""
    if len(parts) > 4:
        raise HostError(f"{raw!r} ends in a number but is not an IPv4 address")
    numbers = []
    for part in parts:
        try:
            if part.startswith("0x"):
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            else:
                numbers.append(int(part, 10))
        except ValueError:
            raise HostError(f"{raw!r} ends in a number but is not an IPv4 address") from None
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise HostError(f"{raw!r} is out of range for an IPv4 address")
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return IPv4Address(value)


def _ipv6(text: str, raw: str) -> Address:
    address, _, _zone = text.partition("%")
    try:
        parsed = ip_address(address)
    except ValueError:
        raise HostError(f"{raw!r} is not a valid IPv6 address") from None
    return canonical_address(parsed)


def canonical_address(address: Address) -> Address:
    """IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 address it maps."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_text(host: Host) -> str:
    """How a host is written in messages and logs: names bare, IPv6 in brackets."""
    if type(host) is Name:
        return host.text
    text = address_text(host)
    return f"[{text}]" if isinstance(host, IPv6Address) else text


@functools.lru_cache(maxsize=4096)
def address_text(address: Address) -> str:
    """An address as the audit log spells it (no brackets): str() of one takes about 0.7 µs,
    and a connection's requests all name one."""
    return str(address)


ENCODED_LABEL_LENGTH = 16  # labels shorter than this are too short to judge by their entropy
ENCODED_LABEL_BITS = 3.8  # bits per character above which a label reads as encoded data


def looks_encoded(name: str) -> bool:
    """Whether a label of `name` looks like encoded data (long and high-entropy): the mark of
    data smuggled out through DNS names."""
    return any(len(label) >= ENCODED_LABEL_LENGTH and _entropy(label) > ENCODED_LABEL_BITS
               for label in name.split("."))


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def split_host_port(text: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` (as in URLs, CONNECT targets, Host headers
    and listener flags): the host, without brackets, and the port's text, None when there is
    none. An unbracketed name with more than one colon is a bare IPv6 address, all host.
    Raises HostError for an unclosed bracket or anything but `:port` after one."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise HostError(f"{text!r}: unclosed '[' in an IPv6 address")
        if rest and not rest.startswith(":"):
            raise HostError(f"{text!r}: expected ':PORT' after ']'")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        return text, None
    host, colon, port = text.partition(":")
    return host, port if colon else None


def parse_port(text: str, lowest: int = 1) -> int:
    """A port number written in ASCII digits, from `lowest` to 65535; HostError otherwise."""
    if not (text.isascii() and text.isdigit()) or not lowest <= int(text) <= 65535:
        raise HostError(f"{text!r}: expected a port from {lowest} to 65535")
    return int(text)
