"""The request fast path's head reader (agent_egress/http1.py) against mitmproxy's HTTP/1 reader,
on random and hostile heads: whenever the fast path takes a head, both must read the same
method, target, headers and body framing, and the head forwarded to the origin must read back
as what was decided. Everything else is left to mitmproxy, so a disagreement is only possible
where the fast path accepts."""

from __future__ import annotations

import pytest
from h11._receivebuffer import ReceiveBuffer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.net.http.http1 import (
    connection_close,
    expected_http_body_size,
    read_request_head,
)

from agent_egress.http1 import HEAD_END, RequestHead, request_head

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
         b"X-A", b"X A", b"X\x00", b"", b"Cookie", b"Trailer", b"Content-Length "]
VALUES = [b"web.test", b"web.test:80", b"web.test:8080", b"other.test", b"0", b"5", b"+5",
          b"5, 5", b"05", b"-1", b"99999999999999999999", b"chunked", b"chunked, identity",
          b"close", b"keep-alive", b"Upgrade", b"100-continue", b"websocket", b"", b" a ",
          b"a\tb", b"\xff", b"a\x00b", b"a\rb", b"a\nb", b"\t", b"web.test\r\n evil.test"]
SEPARATORS = [b": ", b":", b" : ", b":\t", b":  ", b" :"]
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
    assert taken.keep_alive == (not connection_close(request.http_version, request.headers))
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
