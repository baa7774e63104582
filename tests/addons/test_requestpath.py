"""The request fast path (addons/requestpath.py) in-process, under asyncio's loop and uvloop:
the explicit listener's FastTunnels with the real gate in front of a scripted origin, and a
stand-in for mitmproxy that records exactly the bytes it is handed. What the fast path serves
must come back framed as a strict client (h11) reads it, each request audited once; what it
does not take must reach mitmproxy byte for byte."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.scripted import (
    LOOPS,
    Mitmproxy,
    ScriptedOrigin,
    closes,
    fast_listener,
    read_responses,
)

from agent_egress.addons import requestpath, upstreampool
from agent_egress.addons.fastpath import FastTunnels
from agent_egress.addons.origin import Upstream, UpstreamKey
from agent_egress.addons.upstreampool import UpstreamPool
from agent_egress.audit import AuditLog
from agent_egress.gate import Gate, PendingRequest


class Setup:
    def __init__(self, gate: Gate, origin: ScriptedOrigin, mitmproxy: Mitmproxy,
                 proxy_port: int, origin_port: int, audit: Path) -> None:
        self.gate, self.origin, self.mitmproxy = gate, origin, mitmproxy
        self.proxy_port, self.origin_port, self.audit = proxy_port, origin_port, audit
        self.closed_port = 0
        self.tunnels: FastTunnels | None = None

    def url(self, path: str, host: str = "web.test") -> str:
        return f"http://{host}:{self.origin_port}{path}"

    def get(self, path: str, *headers: str, method: str = "GET", body: bytes = b"",
            host: str = "web.test") -> bytes:
        lines = [f"{method} {self.url(path, host)} HTTP/1.1",
                 f"Host: {host}:{self.origin_port}", *headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def exchange(self, *messages: bytes, answers: int | None = None,
                       methods: list[str] | None = None,
                       source: str = "127.0.0.1") -> tuple[list[Any], bool]:
        """Sends `messages` on one connection from `source` (all at once: pipelined); reads
        responses with h11 until `answers` complete ones have come or the proxy closes.
        Returns the responses (h11 Response with .body) and whether the connection closed."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port,
                                                       local_addr=(source, 0))
        writer.write(b"".join(messages))
        responses = await read_responses(reader, answers or len(messages),
                                         methods or ["GET"] * len(messages))
        closed = reader.at_eof() or await closes(reader)
        writer.close()
        return responses, closed

    def events(self) -> list[dict[str, Any]]:
        self.gate.runtime.audit.close()
        audit = AuditLog(self.audit)
        self.gate.runtime.audit = audit
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


SECRET = "tripwire-secret-5c1d9e"


CREDENTIALS = """credentials:
  cloud-key:                    # referenced by no rule: a tripwire only
    env: TEST_FAST_PATH_SECRET
  api-token:
    env: TEST_FAST_PATH_SECRET
"""


def policy(ports: list[int], credentials: bool) -> str:
    rule = "credential: api-token" if credentials else "methods: [GET]"
    return f"""version: 1
{CREDENTIALS if credentials else ""}accounts:
  tester:
    match: {{sources: [127.0.0.1/32]}}
    allow:
      - host: web.test
        ports: {ports}
        methods: [GET, HEAD, POST]
      - host: api.test
        ports: {ports}
        {rule}
      - cidr: 127.0.0.1/32
        ports: {ports}
  other:
    match: {{sources: [127.0.0.2/32]}}
    allow:
      - host: web.test
        ports: {ports}
      - cidr: 127.0.0.1/32
        ports: {ports}
"""


@pytest.fixture(params=sorted(LOOPS))
def serve(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[[Callable[[Setup], Awaitable[None]]], None]]:
    """Runs a test coroutine with the listener and origin up, on each event loop."""

    monkeypatch.setenv("TEST_FAST_PATH_SECRET", SECRET)

    def run(test: Callable[[Setup], Awaitable[None]], credentials: bool = False) -> None:
        """`credentials`: the policy has some (a tripwire, and a rule that injects one)."""
        async def main() -> None:
            origin, mitmproxy = ScriptedOrigin(), Mitmproxy()
            origin_server = await asyncio.start_server(origin.serve, "127.0.0.1", 0)
            origin_port = origin_server.sockets[0].getsockname()[1]
            with socket.socket() as closed:  # a port nothing listens on
                closed.bind(("127.0.0.1", 0))
                closed_port = closed.getsockname()[1]
            (tmp_path / "policy.yaml").write_text(policy([origin_port, closed_port],
                                                         credentials))
            try:
                async with fast_listener(tmp_path / "policy.yaml", tmp_path / "audit.jsonl",
                                         mitmproxy.handle_stream) as (gate, tunnels, port):
                    setup = Setup(gate, origin, mitmproxy, port, origin_port,
                                  tmp_path / "audit.jsonl")
                    setup.closed_port = closed_port
                    setup.tunnels = tunnels
                    await test(setup)
            finally:
                origin_server.close()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(main())

    yield run


def test_kept_alive_requests_share_one_upstream_and_are_each_audited(serve):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(*(s.get("/hello", "Proxy-Connection: Keep-Alive")
                                               for _ in range(3)))
        assert [(r.status_code, r.body) for r in responses] == [(200, b"hello")] * 3
        assert not closed
        assert s.origin.connections == 1
        assert [(m, t) for m, t, _, _ in s.origin.requests] == [("GET", "/hello")] * 3
        assert all("proxy-connection" not in h for _, _, h, _ in s.origin.requests)
        events = s.events()
        assert [(e["event"], e["decision"], e["path"], e["bytes_down"]) for e in events] == [
            ("request", "allow", "/hello", 5)] * 3
        assert not s.mitmproxy.handed
    serve(test)


def test_a_new_client_connection_reuses_the_upstream_another_left_idle(serve):
    async def test(s: Setup) -> None:
        for _ in range(3):  # one after another, each on a connection of its own
            responses, _ = await s.exchange(s.get("/hello", "Connection: close"))
            assert [(r.status_code, r.body) for r in responses] == [(200, b"hello")]
        assert s.origin.connections == 1
        events = s.events()
        assert [(e["decision"], e["path"]) for e in events] == [("allow", "/hello")] * 3
        assert len({e["client"] for e in events}) == 3
    serve(test)


def test_as_many_upstreams_stay_idle_as_clients_left_between_their_requests(serve):
    async def test(s: Setup) -> None:
        key = UpstreamKey("tester", False, "web.test", "127.0.0.1", s.origin_port)
        loop, pool = asyncio.get_running_loop(), UpstreamPool()
        upstreams = [(await loop.create_connection(lambda: Upstream(key), "127.0.0.1",
                                                   s.origin_port))[1] for _ in range(16)]
        for upstream in upstreams:  # 16 clients done with their responses at once
            pool.give(upstream)
        assert len(pool) == 16  # a cap per destination closed some, dialled again next round
        taken = [pool.take(key) for _ in range(16)]
        assert set(map(id, taken)) == set(map(id, upstreams)) and pool.take(key) is None
        pool.close()
        for upstream in upstreams:
            upstream.transport.close()
    serve(test)


def test_a_full_pool_makes_room_by_closing_its_stale_connections(serve, monkeypatch):
    monkeypatch.setattr(upstreampool, "TOTAL", 4)

    async def test(s: Setup) -> None:
        loop, pool = asyncio.get_running_loop(), UpstreamPool()
        old, new = (UpstreamKey("tester", False, name, "127.0.0.1", s.origin_port)
                    for name in ("old.test", "new.test"))
        stale = [(await loop.create_connection(lambda: Upstream(old), "127.0.0.1",
                                               s.origin_port))[1] for _ in range(4)]
        for upstream in stale:
            pool.give(upstream)
            upstream.idle_since -= upstreampool.IDLE_LIMIT + 1  # given back long ago
        _, fresh = await loop.create_connection(lambda: Upstream(new), "127.0.0.1",
                                                s.origin_port)
        pool.give(fresh)  # the pool is full, of connections no one would take
        assert len(pool) == 1 and pool.take(new) is fresh
        assert all(upstream.transport.is_closing() for upstream in stale)
        fresh.transport.close()
    serve(test)


def test_an_upstream_idle_too_long_is_not_reused(serve, monkeypatch):
    monkeypatch.setattr(upstreampool, "IDLE_LIMIT", 0.0)  # every idle connection is stale

    async def test(s: Setup) -> None:
        for _ in range(2):
            responses, _ = await s.exchange(s.get("/hello", "Connection: close"))
            assert [r.status_code for r in responses] == [200]
        assert s.origin.connections == 2
    serve(test)


def test_idle_upstreams_are_never_shared_between_accounts(serve):
    async def test(s: Setup) -> None:
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.2"):
            responses, _ = await s.exchange(s.get("/hello", "Connection: close"),
                                            source=source)
            assert [r.status_code for r in responses] == [200]
        assert s.origin.connections == 2  # one per account, each reused once
        assert [e["account"] for e in s.events()] == ["tester", "other"] * 2
    serve(test)


def test_an_idle_upstream_its_origin_closes_leaves_the_pool(serve):
    async def test(s: Setup) -> None:
        responses, _ = await s.exchange(s.get("/idle-drop", "Connection: close"))
        assert [r.status_code for r in responses] == [200]
        assert s.tunnels is not None
        for _ in range(100):  # the origin's close reaches the idle connection
            if not len(s.tunnels.pool):
                break
            await asyncio.sleep(0.01)
        assert not len(s.tunnels.pool)
        responses, _ = await s.exchange(s.get("/hello"))
        assert [r.status_code for r in responses] == [200]
        assert s.origin.connections == 2 and s.origin.dropped == 0  # no request crossed it
    serve(test)


@pytest.mark.parametrize("path, method, status, body", [
    ("/chunked", "GET", 200, b"hello world"),
    ("/early", "GET", 200, b"ok"),
    ("/empty", "GET", 204, b""),
    ("/head", "HEAD", 200, b""),
    ("/big/3000000", "GET", 200, b"x" * 3_000_000),
])
def test_response_framings_come_back_as_a_strict_client_reads_them(serve, path, method, status,
                                                                    body):
    async def test(s: Setup) -> None:
        request = s.get(path, method=method)
        responses, closed = await s.exchange(request, s.get("/hello"),
                                             methods=[method, "GET"])
        assert [(r.status_code, r.body) for r in responses] == [(status, body), (200, b"hello")]
        assert not closed
    serve(test)


def test_a_close_delimited_response_ends_with_the_connection(serve):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(s.get("/close"), s.get("/hello"), answers=2)
        assert [(r.status_code, r.body) for r in responses] == [
            (200, b"until the origin closes")]
        assert closed
        assert [e["bytes_down"] for e in s.events()] == [len(b"until the origin closes")]
    serve(test)


@pytest.mark.parametrize("request_close, path", [
    (True, "/hello"), (False, "/close-length"), (False, "/empty-close")])
def test_connection_close_either_way_closes_the_client_after_the_response(serve, request_close,
                                                                        path):
    async def test(s: Setup) -> None:
        headers = ["Connection: close"] if request_close else []
        responses, closed = await s.exchange(s.get(path, *headers), s.get("/hello"), answers=2)
        assert len(responses) == 1 and responses[0].status_code in (200, 204)
        assert closed
        assert [t for _, t, _, _ in s.origin.requests] == [path]
    serve(test)


def test_a_request_body_reaches_the_origin_whole(serve):
    async def test(s: Setup) -> None:
        body = bytes(range(256)) * 8192  # 2 MiB: more than any buffer on the way
        responses, _ = await s.exchange(s.get("/echo", method="POST", body=body),
                                        s.get("/hello"))
        assert [(r.status_code, r.body) for r in responses] == [
            (200, str(len(body)).encode()), (200, b"hello")]
        assert s.origin.requests[0][3] == body
        assert s.events()[0]["bytes_up"] == len(body)
    serve(test)


@pytest.mark.parametrize("path", ["/two-lengths", "/switch", "/broken"])
def test_an_origin_breaking_framing_is_a_502_or_a_broken_transfer(serve, path):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(s.get(path), s.get("/hello"), answers=2)
        assert closed
        if path != "/broken":
            assert [r.status_code for r in responses] == [502]
        else:  # the head went out: the client sees the body cut short
            assert responses == []
    serve(test)


def test_bytes_after_a_response_make_the_upstream_unusable(serve):
    async def test(s: Setup) -> None:
        responses, _ = await s.exchange(s.get("/too-much"), s.get("/hello"))
        assert [(r.status_code, r.body) for r in responses] == [(200, b"ok"), (200, b"hello")]
        assert s.origin.connections == 2
    serve(test)


@pytest.mark.parametrize("method, status", [("GET", 200), ("POST", 502)])
def test_a_kept_alive_upstream_closed_under_a_request_is_retried_if_that_is_safe(
        serve, method, status):
    async def test(s: Setup) -> None:
        body = b"x" if method == "POST" else b""
        responses, _ = await s.exchange(s.get("/then-drop"),
                                        s.get("/hello", method=method, body=body),
                                        methods=["GET", method], answers=2)
        assert [r.status_code for r in responses] == [200, status]
        assert s.origin.dropped == 1
        assert s.origin.connections == (2 if method == "GET" else 1)
    serve(test)


def test_a_denied_request_is_answered_403_and_the_connection_closed(serve):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(s.get("/hello", method="DELETE"),
                                             s.get("/hello"), answers=2)
        assert [r.status_code for r in responses] == [403]
        assert b"agent-egress denied" in responses[0].body
        assert closed
        assert not s.origin.requests
        assert [(e["decision"], e["method"]) for e in s.events()] == [("deny", "DELETE")]
    serve(test)


def test_an_origin_that_cannot_be_reached_is_a_502(serve):
    async def test(s: Setup) -> None:
        unreachable = s.get("/hello").replace(str(s.origin_port).encode(),
                                              str(s.closed_port).encode())
        responses, closed = await s.exchange(unreachable, answers=1)
        assert [r.status_code for r in responses] == [502]
        assert closed
        assert [(e["decision"], e["bytes_down"]) for e in s.events()] == [("allow", None)]
    serve(test)


HANDED_OVER_FIRST = {
    "HTTP/1.0": b"GET http://web.test:{port}/hello HTTP/1.0\r\nHost: web.test:{port}\r\n\r\n",
    "origin-form": b"GET /hello HTTP/1.1\r\nHost: web.test:{port}\r\n\r\n",
    "https URL": b"GET https://web.test:{port}/hello HTTP/1.1\r\nHost: web.test:{port}\r\n\r\n",
    "chunked body": b"POST http://web.test:{port}/echo HTTP/1.1\r\nHost: web.test:{port}\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "expect": b"POST http://web.test:{port}/echo HTTP/1.1\r\nHost: web.test:{port}\r\n"
              b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n",
    "websocket": b"GET http://web.test:{port}/ws HTTP/1.1\r\nHost: web.test:{port}\r\n"
                 b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "two hosts": b"GET http://web.test:{port}/hello HTTP/1.1\r\nHost: web.test:{port}\r\n"
                 b"Host: other.test\r\n\r\n",
    "no host": b"GET http://web.test:{port}/hello HTTP/1.1\r\n\r\n",
    "obs-fold": b"GET http://web.test:{port}/hello HTTP/1.1\r\nHost: web.test:{port}\r\n"
                b"X-Folded: a\r\n b\r\n\r\n",
    "bare LF": b"GET http://web.test:{port}/hello HTTP/1.1\nHost: web.test:{port}\n\n",
    "CL and TE": b"POST http://web.test:{port}/echo HTTP/1.1\r\nHost: web.test:{port}\r\n"
                 b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "split head": b"GET http://web.test:{port}/hello HTTP/1.1\r\nHost: web.te",
    "userinfo": b"GET http://user@web.test:{port}/hello HTTP/1.1\r\nHost: web.test:{port}"
                b"\r\n\r\n",
    "lower-case method": b"get http://web.test:{port}/hello HTTP/1.1\r\nHost: web.test:{port}"
                         b"\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("message", HANDED_OVER_FIRST.values(), ids=HANDED_OVER_FIRST.keys())
def test_what_the_fast_path_does_not_take_reaches_mitmproxy_byte_for_byte(serve, message):
    async def test(s: Setup) -> None:
        data = message.replace(b"{port}", str(s.origin_port).encode())
        responses, _ = await s.exchange(data, answers=1)
        assert [r.status_code for r in responses] == [299]
        assert s.mitmproxy.handed == [data]
        assert not s.origin.requests
    serve(test)


@pytest.mark.parametrize("message", ["chunked body", "expect", "websocket", "obs-fold",
                                     "split head"])
def test_mitmproxy_takes_over_mid_connection_from_the_request_it_must_serve(serve, message):
    async def test(s: Setup) -> None:
        later = HANDED_OVER_FIRST[message].replace(b"{port}", str(s.origin_port).encode())
        responses, _ = await s.exchange(s.get("/hello"), later, answers=2)
        assert [r.status_code for r in responses] == [200, 299]
        assert s.mitmproxy.handed == [later]
        assert [t for _, t, _, _ in s.origin.requests] == ["/hello"]
    serve(test)


@pytest.mark.parametrize("where", ["header", "header, odd spacing", "encoded header", "query",
                                   "encoded query"])
def test_a_head_carrying_a_credential_is_refused_before_the_origin(serve, where):
    async def test(s: Setup) -> None:
        encoded = "".join(f"%{b:02X}" for b in SECRET.encode())
        request = {"header": s.get("/hello", f"X-Token: {SECRET}"),
                   "header, odd spacing": s.get("/hello", f"X-Token:\t{SECRET} \t"),
                   "encoded header": s.get("/hello", f"X-Token: {encoded}"),
                   "query": s.get(f"/hello?key={SECRET}"),
                   "encoded query": s.get(f"/hello?key={encoded}")}[where]
        responses, closed = await s.exchange(request, answers=1)
        assert [r.status_code for r in responses] == [403]
        assert b"carries credential cloud-key" in responses[0].body
        assert SECRET.encode() not in responses[0].body
        assert closed and not s.origin.requests and not s.mitmproxy.handed
        (event,) = s.events()
        assert (event["decision"], event["credential"]) == ("deny", "cloud-key")
    serve(test, credentials=True)


def test_a_body_is_mitmproxys_to_scan_when_credentials_are_set(serve):
    async def test(s: Setup) -> None:
        request = s.get("/echo", method="POST", body=f"token={SECRET}".encode())
        responses, _ = await s.exchange(s.get("/hello"), request, answers=2)
        assert [r.status_code for r in responses] == [200, 299]
        assert s.mitmproxy.handed == [request]
    serve(test, credentials=True)


def test_a_request_whose_rule_injects_a_credential_goes_to_mitmproxy(serve):
    async def test(s: Setup) -> None:
        request = s.get("/hello", host="api.test")
        responses, _ = await s.exchange(request, answers=1)
        assert [r.status_code for r in responses] == [299]
        assert s.mitmproxy.handed == [request]
        assert s.events() == []  # mitmproxy's path injects and records it
    serve(test, credentials=True)


def test_an_inspected_decision_goes_to_mitmproxy(serve, monkeypatch):
    async def test(s: Setup) -> None:
        decide_now, decide_later = s.gate.request_now, s.gate.request_later

        def inspected(outcome: Any) -> Any:
            if isinstance(outcome, PendingRequest):
                return outcome
            decision, *rest = outcome
            return (replace(decision, inspect=True), *rest)

        async def later(pending: PendingRequest) -> Any:
            return inspected(await decide_later(pending))

        monkeypatch.setattr(s.gate, "request_now",
                            lambda *args, **kwargs: inspected(decide_now(*args, **kwargs)))
        monkeypatch.setattr(s.gate, "request_later", later)
        first = s.get("/hello")
        responses, _ = await s.exchange(first, answers=1)
        assert [r.status_code for r in responses] == [299]
        assert s.mitmproxy.handed == [first]
        assert s.events() == []  # mitmproxy's path records it
    serve(test)


def test_requests_are_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("AGENT_EGRESS_FAST_REQUESTS", "0")
    assert not requestpath.enabled()
    monkeypatch.delenv("AGENT_EGRESS_FAST_REQUESTS")
    assert requestpath.enabled()


def test_closing_waits_for_the_lines_of_requests_answered(serve, monkeypatch):
    """A request's line waits (briefly) for its client's process to be known; the proxy
    stopping meanwhile (SIGTERM) must still write it before the audit log shuts."""
    async def test(s: Setup) -> None:
        identify = s.gate.client

        def slow_to_find(*args: Any, **kwargs: Any) -> Any:
            client = identify(*args, **kwargs)
            client.process = concurrent.futures.Future()  # never found: waited for, bounded
            return client

        monkeypatch.setattr(s.gate, "client", slow_to_find)
        responses, _ = await s.exchange(s.get("/hello"))
        assert [r.status_code for r in responses] == [200]
        assert s.tunnels is not None
        await s.tunnels.close()
        assert [e["path"] for e in s.events()] == ["/hello"]
    serve(test)
