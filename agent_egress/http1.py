"""HTTP/1.1 message heads for the request fast path (addons/requestpath.py): read strictly by
llhttp (httptools, every leniency off), taken only when nothing about them is in doubt.

`request_head` answers None for anything the fast path should leave to mitmproxy: another
version than 1.1, a target that is not an absolute `http://` URL (on the explicit listener) or
not origin-form (inside an inspected tunnel, `origin_form`), no or several Host headers,
any Transfer-Encoding, Expect or Upgrade, framing llhttp refuses (obs-fold, bare LF, CL with
TE, two Content-Lengths), a Content-Length with leading zeros (mitmproxy's reader refuses
it), whitespace where mitmproxy's reader would read something else. What
it accepts, mitmproxy's HTTP/1 reader reads the same (tests/test_http1.py checks that on
random and hostile heads). Pure: no sockets, no event loop.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import httptools

HEAD_END = b"\r\n\r\n"
# Methods with a plain request/response exchange; anything else is mitmproxy's
METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
_METHOD = rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) "
# The request line, up to its CRLF, with a target http://host[:port]/path: a name or address
# (no userinfo, no escapes), then a path; groups: the method, the target, its authority, the
# name or the bracketed IPv6 address, the port, the path
_ABSOLUTE_LINE = re.compile(
    _METHOD + rb"(http://((?:([A-Za-z0-9.\-]+)|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?)"
    rb"(/[!-~]*)) HTTP/1\.1(?=\r\n)")
_ORIGIN_LINE = re.compile(_METHOD + rb"(/[!-~]*) HTTP/1\.1(?=\r\n)")  # inside a tunnel
# Sent to the origin by the proxy, never the client's to pass on
_PROXY_HEADERS = frozenset({b"proxy-connection", b"proxy-authorization", b"keep-alive"})
_REFUSED = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"})
_WHITESPACE = b" \t"
# The header lines of a head that llhttp (strict) has accepted are read from its bytes by one
# regular expression each, not by a Python callback per header: in such a head every line ends
# in CRLF (llhttp refuses a bare CR or LF, obs-fold, a space before the colon), so "\r\n" +
# name + ":" begins a header line and nothing else does. tests/test_http1.py checks these
# readings against llhttp's own callbacks on random and hostile heads.
# Every header line: name, value as llhttp gives it (no leading whitespace) less trailing
_HEADER_LINE = re.compile(rb"\r\n([^:\r\n]+):[ \t]*((?:[^\r\n]*[^ \t\r\n])?)[ \t]*(?=\r\n)")
# In a lowered head: the name of each line the fast path acts on, when it reads `name: value`
# (one space, the value begins visibly); b"" for any line that does not (another separator,
# an empty value, a value ending in whitespace), whose head is then read line by line. With
# none of those, the lines as received are the lines a rebuild would make, byte for byte.
_NOTED_LINE = re.compile(
    rb"\r\n(?:(?<=[ \t]\r\n)|(host|content-length|transfer-encoding|expect|upgrade|te|"
    rb"trailer|proxy-connection|proxy-authorization|keep-alive)(?=: [!-~\x80-\xff])|"
    rb"[^:\r\n]*:(?! [!-~\x80-\xff]))")


def _lines_named(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """The lines of a tidy head whose name is one of `names` (lower case), in any case."""
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"\r\n(?:" + alternatives + rb"): [^\r\n]*", re.IGNORECASE)


_PROXY_LINE = _lines_named(_PROXY_HEADERS)


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to make, once per request
class RequestHead:
    """A request head the fast path takes: what was read, and what goes to the origin."""

    method: str
    authority: str  # of the absolute-form target, as sent ("" for origin-form)
    host: str  # from the authority, as sent (the gate normalises it; "" for origin-form)
    port: int  # from the authority (0 for origin-form)
    path: str  # origin-form: path and query, as sent
    host_header: str
    content_length: int  # the body's length; 0 without Content-Length
    keep_alive: bool  # the client lets the connection be kept for another request
    raw: bytes  # the head as received, for mitmproxy when it takes over after all
    fields_at: int  # where its header lines begin in `raw` (the CRLF ending the request line)
    tidy: bool  # every header line reads `name: value` (_NOTED_LINE)
    proxy_headers: bool  # has headers meant for the proxy (dropped on the way to the origin)
    read_headers: tuple[tuple[bytes, bytes], ...] | None = field(default=None, init=False)

    @property
    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Names and values as read (values trimmed), in order: read when first asked for
        (the tripwire with secrets set, a rebuilt head), not for every request."""
        if self.read_headers is None:
            self.read_headers = tuple(_HEADER_LINE.findall(self.raw, self.fields_at))
        return self.read_headers

    def origin_form(self, injected: tuple[str, str] | None = None) -> bytes:
        """The head for the origin: the target in origin-form, the headers as read, less the
        ones that were meant for the proxy; with `injected` (a credential's header), that
        header in place of every one of its name the client sent."""
        line = f"{self.method} {self.path} HTTP/1.1".encode()
        if self.tidy:  # the common case: the lines as received, less the dropped ones
            fields = self.raw[self.fields_at:]
            if injected is None:
                return line + (_PROXY_LINE.sub(b"", fields) if self.proxy_headers else fields)
            name, value = injected
            kept = _dropped_with(name.lower()).sub(b"", fields)  # still ends in CRLF CRLF
            return line + kept[:-2] + f"{name}: {value}\r\n\r\n".encode("latin-1")
        dropped = _PROXY_HEADERS
        if injected is not None:
            dropped = dropped | {injected[0].lower().encode("ascii")}
        lines = [line + b"\r\n"]
        lines += [name + b": " + value + b"\r\n" for name, value in self.headers
                  if name.lower() not in dropped]
        if injected is not None:
            lines.append(f"{injected[0]}: {injected[1]}\r\n".encode("latin-1"))
        lines.append(b"\r\n")
        return b"".join(lines)


@functools.lru_cache(maxsize=64)
def _dropped_with(name: str) -> re.Pattern[bytes]:
    """The lines of a tidy head that do not go to the origin when the credential header
    `name` (lower case) is injected: the proxy's headers and every `name` header."""
    return _lines_named(_PROXY_HEADERS | {name.encode("ascii")})


class _Collector:
    """llhttp's callbacks for one head: none per header (httptools calls only the callbacks
    its protocol object has)."""

    __slots__ = ("url", "complete", "message_complete", "parser", "keep_alive")

    def __init__(self) -> None:
        self.url = b""
        self.complete = False
        self.message_complete = False
        self.parser: httptools.HttpRequestParser | None = None
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

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
    match = (_ORIGIN_LINE if origin_form else _ABSOLUTE_LINE).match(head)
    if match is None:
        return None
    method, target = match.group(1, 2)
    collector = _Collector()
    parser = collector.parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if not collector.complete or collector.url != target or parser.get_method() != method:
        return None
    fields_at = match.end()
    lowered = head.lower()
    names = _NOTED_LINE.findall(lowered, fields_at)
    tidy = b"" not in names
    if tidy:
        if names.count(b"host") != 1 or names.count(b"content-length") > 1 or \
                not _REFUSED.isdisjoint(names):
            return None
        at = lowered.index(b"\r\nhost: ", fields_at) + 8
        host_header = head[at:head.index(b"\r\n", at)]
        length_text = None
        if b"content-length" in names:
            at = lowered.index(b"\r\ncontent-length: ", fields_at) + 18
            length_text = head[at:head.index(b"\r\n", at)]
    else:  # read line by line
        fields = _HEADER_LINE.findall(head, fields_at)
        names = [name.lower() for name, _ in fields]
        if names.count(b"host") != 1 or names.count(b"content-length") > 1 or \
                not _REFUSED.isdisjoint(names):
            return None
        values = dict(zip(names, [value for _, value in fields], strict=True))
        host_header, length_text = values[b"host"], values.get(b"content-length")
    if not host_header or not host_header.isascii():
        return None
    if length_text is not None and length_text[:1] == b"0" and len(length_text) > 1:
        return None  # leading zeros: mitmproxy's reader refuses them, an origin may misread them
    content_length = 0 if length_text is None else int(length_text)
    if collector.message_complete != (content_length == 0):
        return None  # llhttp reads the framing otherwise: not ours to guess
    if origin_form:
        authority, host, port, path = "", "", 0, target.decode("ascii")
    else:
        authority_raw, name, address, port_raw, path_raw = match.group(3, 4, 5, 6, 7)
        authority, path = authority_raw.decode("ascii"), path_raw.decode("ascii")
        host = (name or address).decode("ascii")  # as split_host_port reads the authority
        port = 80 if port_raw is None else int(port_raw)
        if not 1 <= port <= 65535:
            return None
    return RequestHead(method.decode("ascii"), authority, host, port, path,
                       host_header.decode("ascii"), content_length, collector.keep_alive,
                       head, fields_at, tidy, not _PROXY_HEADERS.isdisjoint(names))


def framing_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """The Content-Length and Transfer-Encoding headers of a response head that llhttp
    (strict) has accepted: names and values lowered, values trimmed, in order."""
    return _FRAMING_LINE.findall(head.lower())


_FRAMING_LINE = re.compile(
    rb"\r\n(content-length|transfer-encoding):[ \t]*((?:[^\r\n]*[^ \t\r\n])?)[ \t]*(?=\r\n)")


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
