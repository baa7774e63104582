"""HTTP/1.1 message heads for the request fast path (addons/requestpath.py): read strictly by
llhttp (httptools, every leniency off), taken only when nothing about them is in doubt.

`request_head` answers None for anything the fast path should leave to mitmproxy: another
version than 1.1, a target that is not an absolute `http://` URL (on the explicit listener) or
not origin-form (inside an inspected tunnel, `origin_form`), no or several Host headers,
any Transfer-Encoding, Expect or Upgrade, framing llhttp refuses (obs-fold, bare LF, CL with
TE, two Content-Lengths), whitespace where mitmproxy's reader would read something else. What
it accepts, mitmproxy's HTTP/1 reader reads the same (tests/test_http1.py checks that on
random and hostile heads). Pure: no sockets, no event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools

HEAD_END = b"\r\n\r\n"
# Methods with a plain request/response exchange; anything else is mitmproxy's
METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
# http://host[:port]/path: a name or address (no userinfo, no escapes), then a path; groups:
# the authority, the name or the bracketed IPv6 address, the port, the path
_ABSOLUTE_HTTP = re.compile(
    rb"http://((?:([A-Za-z0-9.\-]+)|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?)(/[!-~]*)")
_ORIGIN_FORM = re.compile(rb"/[!-~]*")
# Sent to the origin by the proxy, never the client's to pass on
_PROXY_HEADERS = frozenset({b"proxy-connection", b"proxy-authorization", b"keep-alive"})
_SINGLE = (b"host", b"content-length")
_REFUSED = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"})
_WHITESPACE = b" \t"


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to make, once per request
class RequestHead:
    """A request head the fast path takes: what was read, and what goes to the origin."""

    method: str
    authority: str  # of the absolute-form target, as sent ("" for origin-form)
    host: str  # from the authority, as sent (the gate normalises it; "" for origin-form)
    port: int  # from the authority (0 for origin-form)
    path: str  # origin-form: path and query, as sent
    headers: tuple[tuple[bytes, bytes], ...]  # names and values as read (values trimmed)
    host_header: str
    content_length: int  # the body's length; 0 without Content-Length
    keep_alive: bool  # the client lets the connection be kept for another request
    raw: bytes  # the head as received, for mitmproxy when it takes over after all

    def origin_form(self, injected: tuple[str, str] | None = None) -> bytes:
        """The head for the origin: the target in origin-form, the headers as read, less the
        ones that were meant for the proxy; with `injected` (a credential's header), that
        header in place of every one of its name the client sent."""
        dropped = _PROXY_HEADERS
        if injected is not None:
            dropped = dropped | {injected[0].lower().encode("ascii")}
        lines = [f"{self.method} {self.path} HTTP/1.1\r\n".encode()]
        lines += [name + b": " + value + b"\r\n" for name, value in self.headers
                  if name.lower() not in dropped]
        if injected is not None:
            lines.append(f"{injected[0]}: {injected[1]}\r\n".encode("latin-1"))
        lines.append(b"\r\n")
        return b"".join(lines)


class _Collector:
    """llhttp's callbacks for one head."""

    __slots__ = ("url", "headers", "complete", "message_complete", "parser", "keep_alive")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.message_complete = False
        self.parser: httptools.HttpRequestParser | None = None
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True
        # now: once the message is complete, llhttp has forgotten `Connection: close`
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.message_complete = True


def request_head(head: bytes, origin_form: bool = False) -> RequestHead | None:
    """`head` (up to and including its blank line) as the fast path takes it, or None.
    `origin_form`: inside an inspected tunnel, where the target is a path (its destination is
    the tunnel's); else an absolute `http://` URL."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in METHODS:
        return None
    method, target, _ = parts
    match = (_ORIGIN_FORM if origin_form else _ABSOLUTE_HTTP).fullmatch(target)
    if match is None:
        return None
    collector = _Collector()
    parser = collector.parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if not collector.complete or collector.url != target or parser.get_method() != method:
        return None
    headers = []
    seen: dict[bytes, bytes] = {}
    for name, value in collector.headers:
        lower = name.lower()
        if lower in _REFUSED or (lower in _SINGLE and lower in seen):
            return None
        value = value.rstrip(_WHITESPACE)  # llhttp keeps trailing whitespace; readers drop it
        seen[lower] = value
        headers.append((name, value))
    host_header = seen.get(b"host")
    if not host_header or not host_header.isascii():
        return None
    length_text = seen.get(b"content-length")
    content_length = int(length_text) if length_text is not None else 0
    if collector.message_complete != (content_length == 0):
        return None  # llhttp reads the framing otherwise: not ours to guess
    if origin_form:
        authority, host, port, path = "", "", 0, target.decode("ascii")
    else:
        authority_raw, name, address, port_raw, path_raw = match.groups()
        authority, path = authority_raw.decode("ascii"), path_raw.decode("ascii")
        host = (name or address).decode("ascii")  # as split_host_port reads the authority
        port = 80 if port_raw is None else int(port_raw)
        if not 1 <= port <= 65535:
            return None
    return RequestHead(method.decode("ascii"), authority, host, port, path, tuple(headers),
                       host_header.decode("ascii"), content_length, collector.keep_alive,
                       head)


@dataclass(slots=True)  # not frozen: one is made per response
class ResponseFraming:
    """How an origin's response body ends."""

    status: int
    body: str  # "none", "length", "chunked" or "close" (ends when the origin closes)
    length: int  # for "length"
    keep_alive: bool  # the origin keeps the connection for another request


def response_framing(status: int, keep_alive: bool, headers: list[tuple[bytes, bytes]],
                     message_complete: bool, method: str) -> ResponseFraming | None:
    """The framing of a response head that llhttp (strict) has just read, for a request with
    `method`: its status, whether llhttp would keep the connection (asked when the head
    was read: once the message is complete llhttp has forgotten `Connection: close`), its
    headers; None for framing the fast path does not relay (two Content-Lengths, a
    Transfer-Encoding other than chunked alone, a 101)."""
    lengths, codings = [], []
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
    if status == 101 or len(lengths) > 1 or len(codings) > 1 or (lengths and codings):
        return None
    if method == "HEAD" or status < 200 or status in (204, 304) or message_complete:
        return ResponseFraming(status, "none", 0, keep_alive)
    if codings:
        if codings[0].strip(_WHITESPACE).lower() != b"chunked":
            return None
        return ResponseFraming(status, "chunked", 0, keep_alive)
    if lengths:
        return ResponseFraming(status, "length", int(lengths[0]), keep_alive)
    return ResponseFraming(status, "close", 0, False)


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
