"""The request fast path's head reader (agent_egress/http1.py) against mitmproxy's HTTP/1 reader,
on random and hostile heads: whenever the fast path takes a head, both must read the same
method, target, headers and body framing, and the head forwarded to the origin must read back
as what was decided. Everything else is left to mitmproxy, so a disagreement is only possible
where the fast path accepts."""

from __future__ import annotations

import httptools
import pytest
from h11._receivebuffer import ReceiveBuffer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.net.http.http1 import (
    connection_close,
    expected_http_body_size,
    read_request_head,
)

from agent_egress.http1 import HEAD_END, RequestHead, framing_headers, request_head

METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"get", b"CONNECT",
           b"PRI", b"TRACE", b"G\x00ET", b"GET\t"]
HOSTS = [b"web.test", b"WEB.Test", b"web.test.", b"127.0.0.1", b"2130706433", b"[::1]",
         b"[::ffff:127.0.0.1]", b"xn--bcher-kva.test", b"user@web.test", b"web.test:8080",
         b"web.test:80", b"web.test:0", b"web.test:99999", b"web.test:+80", b"web.test:",
         b":80", b"", b"web_test", b"web.test%2f", b"[v1.x]", b"web.test:08"]
PATHS = [b"/", b"/a/b", b"/a?b=c", b"/a#frag", b"/%2e%2e/x", b"/..;/x", b"/a%00b", b"/\xff",
         b"/a b", b"", b"?x", b"/a\\b", b"//x", b"/%", b"/~user/*"]
SCHEMES = [b"http://", b"HTTP://", b"https://", b"", b"http:/", b"ws://"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"http/1.1", b"HTTP/2.0", b"HTTP/1.10", b"HTTP/1.1 "]
NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding",
         b"TE", b"Expect", b"Connection", b"Upgrade", b"Proxy-Connection", b"Keep-Alive",
         b"X-A", b"X A", b"X\x00", b"", b"Cookie", b"Trailer", b"Content-Length ", b"hOsT",
         b"CONTENT-length", b"X-Content-Length", b"Content-Length-X", b"Hosts", b"X-Host",
         b"proxy-AUTHORIZATION", b"KEEP-ALIVE", b"te", b"Te", b"Upgrade-Insecure-Requests"]
VALUES = [b"web.test", b"web.test:80", b"web.test:8080", b"other.test", b"0", b"5", b"+5",
          b"5, 5", b"05", b"-1", b"99999999999999999999", b"chunked", b"chunked, identity",
          b"close", b"keep-alive", b"Upgrade", b"100-continue", b"websocket", b"", b" a ",
          b"a\tb", b"\xff", b"a\x00b", b"a\rb", b"a\nb", b"\t", b"web.test\r\n evil.test",
          b"web.test\t", b"\tweb.test", b" web.test \t", b"5\t", b"x: y", b"a\x80\xffb",
          b"x\r\nContent-Length: 5", b"x\r\nhost: evil.test", b"Host: evil.test", b"  "]
SEPARATORS = [b": ", b": ", b": ", b":", b" : ", b":\t", b":  ", b" :", b": \t"]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]
GAPS = [b" ", b" ", b" ", b"  ", b"\t"]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A request head built from parts each of which may be hostile."""
    gap = draw(st.sampled_from(GAPS))
    target = draw(st.sampled_from(SCHEMES)) + draw(st.sampled_from(HOSTS)) + draw(
        st.sampled_from(PATHS))
    line = draw(st.sampled_from(METHODS)) + gap + target + gap + draw(st.sampled_from(VERSIONS))
    lines = [line]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from([b" folded", b"\tfolded", b""])))
            continue
        value = draw(st.sampled_from(VALUES) | st.binary(max_size=12))
        lines.append(draw(st.sampled_from(NAMES)) + draw(st.sampled_from(SEPARATORS)) + value)
    ending = draw(st.sampled_from(ENDINGS))
    return ending.join(lines) + ending + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))


def typical() -> list[bytes]:
    return [
        b"GET http://web.test:8080/a?b HTTP/1.1\r\nHost: web.test:8080\r\nAccept: */*\r\n\r\n",
        b"POST http://web.test/upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: 12\r\n"
        b"Proxy-Connection: Keep-Alive\r\nX-Trailing: a \t\r\n\r\n",
        b"HEAD http://127.0.0.1/ HTTP/1.1\r\nhost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET http://[::1]:8080/ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    ]


def first_head(data: bytes) -> bytes | None:
    """The head as the fast path cuts it: up to its first blank line."""
    end = data.find(HEAD_END)
    return None if end < 0 else data[:end + len(HEAD_END)]


def mitmproxy_reads(head: bytes):
    """What mitmproxy's HTTP/1 server reads from `head`: its request and body size."""
    buffer = ReceiveBuffer()
    buffer += head
    lines = buffer.maybe_extract_lines()
    assert lines is not None
    request = read_request_head([bytes(x) for x in lines])
    return request, expected_http_body_size(request)


def assert_both_read_the_same(head: bytes, taken: RequestHead) -> None:
    request, body_size = mitmproxy_reads(head)  # raises if mitmproxy refuses what we took
    assert request.method == taken.method
    assert request.http_version == "HTTP/1.1"
    assert (request.scheme, request.authority) == ("http", taken.authority)
    assert (request.host, request.port, request.path) == (taken.host, taken.port, taken.path)
    assert request.headers.fields == taken.headers
    assert request.host_header == taken.host_header
    assert body_size == taken.content_length
    # never kept where mitmproxy closes; llhttp also closes on `Proxy-Connection: close` and on
    # `Connection: CLOSE`, which mitmproxy keeps: closing more is the safe side
    assert not (taken.keep_alive and connection_close(request.http_version, request.headers))
    forwarded, forwarded_size = mitmproxy_reads(taken.origin_form())
    assert (forwarded.method, forwarded.path, forwarded_size) == (
        taken.method, taken.path, taken.content_length)
    assert forwarded.host_header == taken.host_header
    assert [(k.lower(), v) for k, v in forwarded.headers.fields] == [
        (k.lower(), v) for k, v in taken.headers
        if k.lower() not in (b"proxy-connection", b"proxy-authorization", b"keep-alive")]


@pytest.mark.parametrize("head", typical())
def test_typical_heads_are_taken_and_read_alike(head):
    taken = request_head(head)
    assert taken is not None
    assert_both_read_the_same(head, taken)


@given(heads())
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_heads_are_read_alike_or_left_to_mitmproxy(data):
    head = first_head(data)
    if head is None:
        return
    taken = request_head(head)
    if taken is not None:
        assert_both_read_the_same(head, taken)


@given(st.binary(max_size=200).map(lambda b: b + HEAD_END) |
       st.lists(st.sampled_from(typical()), min_size=1).flatmap(
           lambda heads: st.tuples(st.just(b"".join(heads)), st.integers(0, 400),
                                   st.binary(min_size=1, max_size=3))).map(
           lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]))
@settings(max_examples=3000, deadline=None)
def test_random_and_mutated_heads_are_read_alike_or_left_to_mitmproxy(data):
    head = first_head(data)
    if head is None:
        return
    taken = request_head(head)
    if taken is not None:
        assert_both_read_the_same(head, taken)


@pytest.mark.parametrize("head", [
    b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n b\r\n\r\n",  # obs-fold
    b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nHost: web.test\r\n\r\n",
    b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nContent-Length: 1\r\n"
    b"Content-Length: 1\r\n\r\n",
    b"POST http://web.test/ HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nExpect: 100-continue\r\n\r\n",
    b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nUpgrade: h2c\r\n\r\n",
    b"GET http://web.test/ HTTP/1.0\r\nHost: web.test\r\n\r\n",
    b"GET /origin-form HTTP/1.1\r\nHost: web.test\r\n\r\n",
    b"GET http://web.test HTTP/1.1\r\nHost: web.test\r\n\r\n",  # no path
    b"GET http://web.test/ HTTP/1.1\r\n\r\n",  # no Host
    b"GET  http://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n",
    b"\r\nGET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n",
])
def test_heads_in_doubt_are_left_to_mitmproxy(head):
    assert request_head(head) is None


# The fast path reads header lines from the bytes llhttp accepted instead of taking a callback
# per header. The reading it replaced, kept here as the reference: every header as llhttp's
# callbacks give it. Whatever request_head takes must be exactly what this reading takes.

class _LlhttpHeaders:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def llhttp_headers(head: bytes, response: bool = False) -> list[tuple[bytes, bytes]] | None:
    """Every header of `head` as llhttp's callbacks give it (trailing whitespace dropped, as
    readers do), or None where llhttp (strict) refuses the head."""
    collected = _LlhttpHeaders()
    parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(
        collected)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if not collected.complete:
        return None
    return [(name, value.rstrip(b" \t")) for name, value in collected.headers]


def rebuilt(taken: RequestHead, injected: tuple[str, str] | None = None) -> bytes:
    """The head for the origin as the fast path built it before reading raw lines: the
    request line, then each header as llhttp read it, less the proxy's, plus `injected`."""
    dropped = {b"proxy-connection", b"proxy-authorization", b"keep-alive"}
    if injected is not None:
        dropped.add(injected[0].lower().encode())
    fields = llhttp_headers(taken.raw)
    assert fields is not None
    lines = [f"{taken.method} {taken.path} HTTP/1.1\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in fields
              if name.lower() not in dropped]
    if injected is not None:
        lines.append(f"{injected[0]}: {injected[1]}\r\n".encode())
    return b"".join(lines) + b"\r\n"


def assert_read_as_llhttp_reads(taken: RequestHead) -> None:
    fields = llhttp_headers(taken.raw)
    assert fields is not None
    assert list(taken.headers) == fields
    single = {name.lower(): value for name, value in fields}
    names = [name.lower() for name, _ in fields]
    assert names.count(b"host") == 1 and names.count(b"content-length") <= 1
    assert not {b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"} & set(names)
    assert taken.host_header.encode() == single[b"host"]
    assert taken.content_length == int(single.get(b"content-length", b"0"))
    assert taken.origin_form() == rebuilt(taken)
    assert taken.origin_form(("Authorization", "Bearer x")) == rebuilt(
        taken, ("Authorization", "Bearer x"))


def would_take(head: bytes) -> bool:
    """Whether the head reading it replaced would have taken `head` (its headers' part)."""
    fields = llhttp_headers(head)
    if fields is None:
        return False
    names = [name.lower() for name, _ in fields]
    host = dict(zip(names, [value for _, value in fields], strict=True)).get(b"host")
    length = dict(zip(names, [value for _, value in fields], strict=True)).get(b"content-length")
    return names.count(b"host") == 1 and names.count(b"content-length") <= 1 and not (
        {b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"} & set(names)) and \
        host is not None and host != b"" and host.isascii() and not (
            length is not None and length.startswith(b"0") and length != b"0")


@given(heads())
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_header_lines_are_read_as_llhttp_reads_them(data):
    head = first_head(data)
    if head is None:
        return
    taken = request_head(head)
    if taken is not None:
        assert_read_as_llhttp_reads(taken)


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(SEPARATORS),
                          st.sampled_from(VALUES) | st.binary(max_size=8)), max_size=6))
@settings(max_examples=3000, deadline=None)
def test_heads_are_taken_exactly_when_llhttps_headers_allow(fields):
    head = b"\r\n".join([b"GET http://web.test/ HTTP/1.1"] + [n + s + v for n, s, v in fields])
    head += HEAD_END
    if first_head(head) != head:
        return
    taken = request_head(head)
    assert (taken is not None) == would_take(head)
    if taken is not None:
        assert_read_as_llhttp_reads(taken)


def tidy_and_untidy(line: bytes) -> list[bytes]:
    """Heads around header line `line`, with a Host header before or after it."""
    first = b"GET http://web.test/ HTTP/1.1\r\n"
    return [first + b"Host: web.test\r\n" + line + HEAD_END,
            first + line + b"\r\nHost: web.test" + HEAD_END]


ODD_LINES = [
    b"X-A: a", b"X-A:a", b"X-A:\ta", b"X-A: \ta", b"X-A:  a", b"X-A: a ", b"X-A: a\t", b"X-A:",
    b"X-A: ", b"X-A:\t", b"X-A: a b", b"X-A: a\tb", b"X-A: a:b", b"X-A: a: b", b"X-A: a\x80b",
    b"X-Host: evil.test", b"Hosts: evil.test", b"X-A: host: evil.test",
    b"X-A: x\r\nHost: evil.test", b"X-A: x\r\nhost:evil.test", b"X-A: x\r\nContent-Length: 5",
    b"X-A: x\r\n content-length: 5", b"Content-Length-X: 5", b"X-Content-Length: 5",
    b"Content-Length: 0\r\ncontent-LENGTH: 0", b"Content-Length: 0\r\nContent-Length:0",
    b"content-length:\t0\t", b"CONTENT-LENGTH: 0", b"Proxy-Connection: keep-alive",
    b"proxy-connection:keep-alive", b"PROXY-AUTHORIZATION: Basic eDp5", b"Keep-Alive: 5 ",
    b"Proxy-Authorization: Basic eDp5\r\nX-B:b", b"TE: trailers", b"te:trailers",
    b"TRANSFER-ENCODING: chunked", b"Transfer-Encoding:\tidentity", b"expect:100-continue",
    b"HOST: web.test", b"host:web.test", b"Host:\tweb.test\t", b"Host: evil.test ",
    b"X-A: \xff", b"X-A: a\rb", b"X-A: a\nb", b"X-A : a", b"X-A\t: a",
    b"Content-Length: 05", b"content-length:\t00 ", b"Content-Length: 0", b"Content-Length: 10",
    b"Proxy-Connection: close", b"Connection: CLOSE", b"Connection: close",
]


@pytest.mark.parametrize("head", [h for line in ODD_LINES for h in tidy_and_untidy(line)])
def test_odd_header_lines_are_taken_only_as_llhttp_reads_them(head):
    taken = request_head(head)
    assert (taken is not None) == would_take(head)
    if taken is not None:
        assert_read_as_llhttp_reads(taken)
        assert_both_read_the_same(head, taken)


@pytest.mark.parametrize("length", [b"05", b"00", b"0000000000000000000012", b" 012"])
@pytest.mark.parametrize("at", [0, 1])
def test_a_content_length_with_leading_zeros_is_left_to_mitmproxy(length, at):
    """llhttp reads `Content-Length: 012` as 12, mitmproxy's reader refuses it (400), and an
    origin reading it as octal (10) would take the request's last two bytes for the start of
    the next request: forwarded as received, it would be a request the gate never decided."""
    lines = [b"Host: web.test", b"Content-Length: " + length]
    head = b"POST http://web.test/ HTTP/1.1\r\n" + b"\r\n".join(lines[at:] + lines[:at]) + HEAD_END
    assert llhttp_headers(head) is not None  # llhttp takes it
    assert request_head(head) is None


def test_the_proxys_headers_never_reach_the_origin_however_spelled():
    head = (b"GET http://web.test/ HTTP/1.1\r\nproxy-AUTHORIZATION: Basic eDp5\r\n"
            b"Host: web.test\r\nX-A: Proxy-Authorization: kept\r\nKEEP-ALIVE: 5\r\n"
            b"Proxy-Connection: k" + HEAD_END)
    taken = request_head(head)
    assert taken is not None
    assert taken.origin_form() == (b"GET / HTTP/1.1\r\nHost: web.test\r\n"
                                   b"X-A: Proxy-Authorization: kept\r\n\r\n")


RESPONSE_LINES = [
    b"Content-Length: 5", b"content-length:5", b"CONTENT-LENGTH:\t5\t", b"Content-Length: 5 ",
    b"Transfer-Encoding: chunked", b"transfer-encoding:CHUNKED", b"TRANSFER-ENCODING: chunked\t",
    b"Transfer-Encoding: gzip, chunked", b"X-Content-Length: 9", b"Content-Length-X: 9",
    b"X-A: x\r\nContent-Length: 7", b"X-A: content-length: 9", b"X-A: a\r\n b",
    b"Content-Length: 5\r\ncontent-length: 5", b"Server: a \t", b"X-A:", b"X-A: \xff",
]


def assert_framing_as_llhttp_reads(head: bytes) -> None:
    fields = llhttp_headers(head, response=True)
    if fields is None:
        return
    expected = [(name.lower(), value.lower()) for name, value in fields
                if name.lower() in (b"content-length", b"transfer-encoding")]
    assert framing_headers(head) == expected


@pytest.mark.parametrize("line", RESPONSE_LINES)
def test_response_framing_headers_are_read_as_llhttp_reads_them(line):
    for head in (b"HTTP/1.1 200 OK\r\n" + line + HEAD_END,
                 b"HTTP/1.1 200 OK\r\nServer: t\r\n" + line + b"\r\nDate: x" + HEAD_END):
        assert_framing_as_llhttp_reads(head)


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(SEPARATORS),
                          st.sampled_from(VALUES) | st.binary(max_size=8)), max_size=6),
       st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.0 200 OK"]))
@settings(max_examples=2000, deadline=None)
def test_random_response_heads_frame_as_llhttp_reads_them(fields, status):
    head = b"\r\n".join([status] + [n + s + v for n, s, v in fields]) + HEAD_END
    if first_head(head) == head:
        assert_framing_as_llhttp_reads(head)
