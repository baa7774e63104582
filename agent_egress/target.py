"""Reads a TARGET as people write one on the command line: a URL or host[:port]."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22, "git": 9418, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str | None  # None for host[:port]: a connection, not a request
    tls: bool
    port_given: bool = True  # False for a bare host: 443 is assumed, 80 as likely


def parse_target(text: str) -> Target:
    """Raises ValueError with a message fit for the user."""
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}; expected one of "
                             f"{', '.join(DEFAULT_PORTS)}")
        host = _netloc_host(parts.netloc)
        port = _port(parts.netloc, DEFAULT_PORTS[scheme])
        path = None
        if scheme in ("http", "https", "ws", "wss"):
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(host, port, path, scheme in ("https", "wss"))
    if "/" in text:
        raise ValueError(f"{text!r}: expected a URL (scheme://host/path) or host[:port]")
    port = _port(text, 0)
    return Target(_netloc_host(text), port or 443, None, True, port_given=port != 0)


def _netloc_host(netloc: str) -> str:
    hostport = netloc.rpartition("@")[2]  # userinfo is never the destination
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError(f"{netloc!r}: unclosed '[' in an IPv6 address")
        return hostport[: end + 1]
    if hostport.count(":") > 1:
        return hostport  # a bare IPv6 address
    host = hostport.partition(":")[0]
    if not host:
        raise ValueError(f"{netloc!r}: no host")
    return host


def _port(netloc: str, default: int) -> int:
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        rest = hostport[hostport.find("]") + 1:]
    elif hostport.count(":") > 1:
        return default
    else:
        rest = hostport[len(hostport.partition(":")[0]):]
    if not rest:
        return default
    if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
        raise ValueError(f"{netloc!r}: expected a port from 1 to 65535 after ':'")
    return int(rest[1:])
