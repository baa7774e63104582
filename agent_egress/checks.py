"""Checks that the parts of a connection or request agree with what was decided: the TLS SNI
with the CONNECT host, the Host header with the destination. Each returns the reason for a
refusal, or None; the gate turns a reason into a denial."""

from __future__ import annotations

from .rules import (
    Host,
    HostError,
    Name,
    host_text,
    normalize_host,
    parse_port,
    split_host_port,
)


def sni_refusal(sni: str | None, host: Host, port: int) -> str | None:
    """The ClientHello inside a CONNECT tunnel to `host` must name that host: no domain
    fronting. A tunnel to an address may carry no SNI."""
    if sni is None:
        if isinstance(host, Name):
            return f"TLS without SNI in a CONNECT to {host_text(host)}:{port}"
        return None
    try:
        named = normalize_host(sni)
    except HostError as e:
        return f"invalid TLS SNI: {e}"
    if named != host:
        return (f"TLS SNI {host_text(named)} does not match the CONNECT host "
                f"{host_text(host)} (domain fronting?)")
    return None


def host_header_refusal(header: str | None, host: Host, port: int) -> str | None:
    """A request's Host header, where there is one, must name the destination, and its port,
    where it gives one, the destination's port."""
    if header is None:
        return None
    try:
        named = normalize_host(host_header_name(header))
    except HostError as e:
        return f"invalid Host header: {e}"
    if named != host:
        return f"Host header {header} does not match the destination {host_text(host)}"
    _, given = split_host_port(header)
    if given is not None and int(given) != port:
        return f"Host header {header} names another port than the destination's, {port}"
    return None


def target_refusal(authority: str, host: Host, port: int) -> str | None:
    """An absolute-form request target (`GET http://name/…`) must name the destination, port
    included: an origin prefers the target's authority to the Host header (RFC 9112 3.2.2),
    so another name there would reach another virtual host on the same address."""
    if not authority:
        return None
    try:
        name, given = split_host_port(authority)
        named = normalize_host(name)
        given_port = port if given is None else parse_port(given)
    except HostError as e:
        return f"invalid request target authority {authority}: {e}"
    if named != host or given_port != port:
        return (f"request target {authority} does not match the destination "
                f"{host_text(host)}:{port}")
    return None


def host_header_name(header: str) -> str:
    """The host in a Host header, `host[:port]`. Anything else after the last colon stays part
    of the name, so that it fails to parse: an obs-folded `Host: allowed.test:80\\r\\n evil.test`
    must not pass as allowed.test and reach the origin, which may read it differently."""
    try:
        name, port = split_host_port(header)
    except HostError:
        return header
    if port is None or not (port.isascii() and port.isdigit()):
        return header  # brackets kept: normalize_host reads them
    return f"[{name}]" if ":" in name else name


def host_or_none(raw: str) -> Host | None:
    try:
        return normalize_host(raw)
    except HostError:
        return None


def host_or_name(raw: str) -> Host:
    """`raw` normalised, or kept as it is (unusable, but recordable) when it is no host."""
    return host_or_none(raw) or Name(raw, ())
