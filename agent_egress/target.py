"""Reads a TARGET as people write one on the command line: a URL or host[:port]."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from .rules import HostError, parse_port, split_host_port

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
        host, port = _host_port(parts.netloc, DEFAULT_PORTS[scheme])
        path = None
        if scheme in ("http", "https", "ws", "wss"):
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(host, port, path, scheme in ("https", "wss"))
    if "/" in text:
        raise ValueError(f"{text!r}: expected a URL (scheme://host/path) or host[:port]")
    host, port = _host_port(text, 0)
    return Target(host, port or 443, None, True, port_given=port != 0)


def _host_port(netloc: str, default: int) -> tuple[str, int]:
    hostport = netloc.rpartition("@")[2]  # userinfo is never the destination
    try:
        host, port = split_host_port(hostport)
    except HostError as e:
        raise ValueError(str(e)) from None
    if not host:
        raise ValueError(f"{netloc!r}: no host")
    if hostport.startswith("["):
        host = f"[{host}]"
    if not port:
        if port == "":
            raise ValueError(f"{netloc!r}: expected a port from 1 to 65535 after ':'")
        return host, default
    try:
        return host, parse_port(port)
    except HostError:
        raise ValueError(f"{netloc!r}: expected a port from 1 to 65535 after ':'") from None
