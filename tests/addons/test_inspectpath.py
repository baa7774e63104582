"""Inspected HTTPS on the fast path (addons/fastpath.py, tlsterminate.py, requestpath.Inside),
in-process under asyncio's loop and uvloop: a client that CONNECTs and trusts the proxy's CA
(mitmproxy's certificate store), a TLS origin that records the SNI and what it received, and a
stand-in for mitmproxy that records what it is handed. What the fast path serves is decided,
injected and audited here; what it does not take reaches mitmproxy as the request it stands
for."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import certs
from support import origins
from support.scripted import LOOPS, Mitmproxy, ScriptedOrigin, fast_listener, read_responses

from agent_egress.addons import requestpath, tlsterminate
from agent_egress.addons.fastpath import FastTunnels
from agent_egress.addons.tlsterminate import Certificates, Inspection, upstream_context
from agent_egress.audit import AuditLog
from agent_egress.gate import Gate

SECRET = "inspected-secret-8e21f0"


def policy(port: int) -> str:
    return f"""version: 1
credentials:
  api-token:
    env: TEST_INSPECTED_SECRET
accounts:
  tester:
    match: {{sources: [127.0.0.1/32]}}
    allow:
      - host: web.test
        ports: [{port}]
        methods: [GET, HEAD]
      - host: api.test
        ports: [{port}]
        credential: api-token
        paths: ["/hello"]
      - cidr: 127.0.0.1/32
        ports: [{port}]
"""


class Setup:
    def __init__(self, gate: Gate, origin: ScriptedOrigin, mitmproxy: Mitmproxy,
                 proxy_port: int, origin_port: int, audit: Path, client_tls: ssl.SSLContext,
                 names: list[str | None]) -> None:
        self.gate, self.origin, self.mitmproxy = gate, origin, mitmproxy
        self.proxy_port, self.origin_port, self.audit = proxy_port, origin_port, audit
        self.client_tls = client_tls
        self.names = names  # the SNI of every TLS connection the origin accepted
        self.tunnels: FastTunnels | None = None  # the listener's

    def get(self, path: str, *headers: str, method: str = "GET", body: bytes = b"",
            host: str = "web.test") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{self.origin_port}", *headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def tunnel(self, host: str = "web.test", alpn: list[str] | None = None,
                     sni: str | None = None) -> tuple[asyncio.StreamReader,
                                                      asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        writer.write(f"CONNECT {host}:{self.origin_port} HTTP/1.1\r\n"
                     f"Host: {host}:{self.origin_port}\r\n\r\n".encode())
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        context = self.client_tls
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        await writer.start_tls(context, server_hostname=sni or host)
        return reader, writer

    async def exchange(self, *messages: bytes, host: str = "web.test", answers: int = 0,
                       split: float = 0.0) -> tuple[list[Any], bool]:
        """Sends `messages` inside one inspected tunnel to `host` (with `split`, each in two
        parts that far apart); reads `answers` responses (all by default)."""
        reader, writer = await self.tunnel(host)
        for message in messages:
            if split:
                writer.write(message[:10])
                await writer.drain()
                await asyncio.sleep(split)
                message = message[10:]
            writer.write(message)
        responses = await read_responses(reader, answers or len(messages),
                                         ["GET"] * len(messages))
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        except (ConnectionError, ssl.SSLError):
            closed = True
        writer.close()
        await asyncio.sleep(0.1)  # the tunnel's line is written as it closes
        return responses, closed

    async def events(self) -> list[dict[str, Any]]:
        """The audit lines so far, once the listener holds no connection (a tunnel's line is
        written as it closes: on a loaded machine, later than any fixed pause)."""
        for _ in range(200):
            if self.tunnels is None or not self.tunnels.live:
                break
            await asyncio.sleep(0.01)
        self.gate.runtime.audit.close()
        self.gate.runtime.audit = AuditLog(self.audit)
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture(params=sorted(LOOPS))
def serve(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[[Callable[[Setup], Awaitable[None]]], None]]:
    monkeypatch.setenv("TEST_INSPECTED_SECRET", SECRET)
    origin_ca = origins.TestCA(tmp_path, ["web.test", "api.test"])
    certstore = certs.CertStore.from_store(tmp_path / "mitmproxy", "mitmproxy", 2048)
    client_tls = ssl.create_default_context(
        cafile=str(tmp_path / "mitmproxy" / "mitmproxy-ca-cert.pem"))

    def run(test: Callable[[Setup], Awaitable[None]], origin_tls: ssl.SSLContext | None = None
            ) -> None:
        async def main() -> None:
            origin, mitmproxy = ScriptedOrigin(), Mitmproxy()
            names: list[str | None] = []
            context = origin_tls or origin_ca.server_context()

            def note_sni(_: Any, name: str | None, __: Any) -> None:
                names.append(name)
            context.sni_callback = note_sni
            origin_server = await asyncio.start_server(origin.serve, "127.0.0.1", 0,
                                                       ssl=context)
            origin_port = origin_server.sockets[0].getsockname()[1]
            (tmp_path / "policy.yaml").write_text(policy(origin_port))
            inspection = Inspection(Certificates(lambda: certstore),
                                    upstream_context(origin_ca.ca_file))
            try:
                async with fast_listener(tmp_path / "policy.yaml", tmp_path / "audit.jsonl",
                                         mitmproxy.handle_stream, inspection) as (
                        gate, tunnels, port):
                    setup = Setup(gate, origin, mitmproxy, port, origin_port,
                                  tmp_path / "audit.jsonl", client_tls, names)
                    setup.tunnels = tunnels
                    await test(setup)
            finally:
                origin_server.close()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(main())

    yield run


def test_a_new_tunnel_reuses_the_verified_upstream_of_one_before_but_never_for_another_name(
        serve):
    async def test(s: Setup) -> None:
        for host in ("web.test", "web.test", "api.test"):
            responses, _ = await s.exchange(s.get("/hello", host=host), host=host)
            assert [r.status_code for r in responses] == [200]
        # web.test's TLS connection, verified for that name, served the second tunnel too;
        # api.test, at the same address and port, has its own (its certificate checked)
        assert s.origin.connections == 2 and s.names == ["web.test", "api.test"]
        events = [e for e in await s.events() if e["event"] == "request"]
        assert [e["host"] for e in events] == ["web.test", "web.test", "api.test"]
    serve(test)


def test_kept_alive_inspected_requests_are_decided_and_audited_each(serve):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(*(s.get("/hello") for _ in range(3)))
        assert [(r.status_code, r.body) for r in responses] == [(200, b"hello")] * 3
        assert not closed and not s.mitmproxy.handed
        assert s.origin.connections == 1 and s.names == ["web.test"]  # one upstream, SNI
        assert [(m, t) for m, t, _, _ in s.origin.requests] == [("GET", "/hello")] * 3
        events = await s.events()
        assert [(e["event"], e["decision"], e["path"]) for e in events] == [
            ("request", "allow", "/hello")] * 3 + [("connect", "allow", None)]
        # the sum of its requests', as mitmproxy's path records an inspected tunnel
        assert (events[-1]["bytes_up"], events[-1]["bytes_down"]) == (0, 15)
    serve(test)


def test_a_method_the_rule_does_not_allow_is_refused_before_the_origin(serve):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(s.get("/hello"), s.get("/echo", method="DELETE"))
        assert [r.status_code for r in responses] == [200, 403]
        assert b"DELETE" in responses[1].body and closed
        assert [t for _, t, _, _ in s.origin.requests] == ["/hello"]
        decisions = [(e["method"], e["decision"]) for e in await s.events()
                     if e["event"] == "request"]
        assert decisions == [("GET", "allow"), ("DELETE", "deny")]
    serve(test)


def test_the_credential_is_injected_in_place_of_the_clients(serve):
    async def test(s: Setup) -> None:
        request = s.get("/hello", "Authorization: Bearer dummy", "authorization: Basic x",
                        host="api.test")
        responses, _ = await s.exchange(request, host="api.test")
        assert [r.status_code for r in responses] == [200]
        ((_, target, headers, _),) = s.origin.requests
        assert target == "/hello" and headers["authorization"] == f"Bearer {SECRET}"
        assert not s.mitmproxy.handed
        (request_event,) = [e for e in await s.events() if e["event"] == "request"]
        assert (request_event["decision"], request_event["credential"]) == ("allow",
                                                                          "api-token")
        assert SECRET not in s.audit.read_text()
    serve(test)


def test_no_credential_outside_the_rules_paths(serve):
    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(s.get("/empty", host="api.test"), host="api.test")
        assert [r.status_code for r in responses] == [403] and closed
        assert not s.origin.requests
    serve(test)


@pytest.mark.parametrize("where", ["header", "query"])
def test_a_request_carrying_the_credential_is_refused(serve, where):
    async def test(s: Setup) -> None:
        request = {"header": s.get("/hello", f"X-Token: {SECRET}"),
                   "query": s.get(f"/hello?k={SECRET}")}[where]
        responses, closed = await s.exchange(request)
        assert [r.status_code for r in responses] == [403] and closed
        assert b"carries credential api-token" in responses[0].body
        assert b"rule:        none (the reason says what was refused)" in responses[0].body
        assert not s.origin.requests
    serve(test)


@pytest.mark.parametrize("header", ["Host: evil.test", "Host: web.test:1"])
def test_a_host_header_naming_another_destination_is_refused(serve, header):
    async def test(s: Setup) -> None:
        request = f"GET /hello HTTP/1.1\r\n{header}\r\n\r\n".encode()
        responses, closed = await s.exchange(request)
        assert [r.status_code for r in responses] == [403] and closed
        assert not s.origin.requests and not s.mitmproxy.handed
    serve(test)


@pytest.mark.parametrize("line", ["GET http://evil.test:{port}/hello HTTP/1.1",
                                  "GET /hello HTTP/1.1\r\n Connection: keep-alive"])
def test_a_head_mitmproxy_could_read_otherwise_is_refused(serve, line):
    """An absolute-form target inside the tunnel; whitespace opening the first header line
    (obs-fold onto the request line)."""
    async def test(s: Setup) -> None:
        request = (line.format(port=s.origin_port) +
                   f"\r\nHost: web.test:{s.origin_port}\r\n\r\n").encode()
        responses, closed = await s.exchange(request)
        assert [r.status_code for r in responses] == [400] and closed
        assert not s.origin.requests and not s.mitmproxy.handed
    serve(test)


def test_a_split_head_is_waited_for(serve):
    async def test(s: Setup) -> None:
        responses, _ = await s.exchange(s.get("/hello"), s.get("/hello"), split=0.05)
        assert [(r.status_code, r.body) for r in responses] == [(200, b"hello")] * 2
        assert not s.mitmproxy.handed
    serve(test)


@pytest.mark.parametrize("message", [
    b"POST /v1/up HTTP/1.1\r\nHost: web.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: web.test:{port}\r\nUpgrade: websocket\r\n"
    b"Connection: upgrade\r\n\r\n",
    b"GET /hello HTTP/1.0\r\nHost: web.test:{port}\r\n\r\n",
])
def test_what_the_fast_path_does_not_take_goes_to_mitmproxy_as_an_https_request(serve,
                                                                                 message):
    async def test(s: Setup) -> None:
        port = str(s.origin_port).encode()
        data = message.replace(b"{port}", port)
        responses, _ = await s.exchange(s.get("/hello"), data)
        assert [r.status_code for r in responses] == [200, 299]
        line, rest = data.split(b"\r\n", 1)
        method, target, version = line.split(b" ")
        assert s.mitmproxy.handed == [
            b"%s https://web.test:%s%s %s\r\nConnection: close\r\n%s" % (
                method, port, target, version, rest)]
    serve(test)


def test_a_client_offering_only_h2_goes_to_mitmproxy_before_the_handshake(serve):
    async def test(s: Setup) -> None:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await s.tunnel(alpn=["h2"])
        await asyncio.sleep(0.1)
        (handed,) = s.mitmproxy.handed
        assert handed.startswith(b"CONNECT web.test:") and b"\x16\x03" in handed
        assert not s.origin.requests
    serve(test)


def test_a_wrong_sni_goes_to_mitmproxy_which_refuses_it(serve):
    async def test(s: Setup) -> None:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await s.tunnel(sni="evil.test")
        await asyncio.sleep(0.1)
        assert len(s.mitmproxy.handed) == 1 and not s.origin.requests
    serve(test)


def test_an_origin_whose_certificate_is_not_trusted_is_a_502(serve, tmp_path):
    (tmp_path / "other").mkdir()
    other = origins.TestCA(tmp_path / "other", ["web.test"])

    async def test(s: Setup) -> None:
        responses, closed = await s.exchange(s.get("/hello"))
        assert [r.status_code for r in responses] == [502] and closed
        assert b"certificate verify failed" in responses[0].body.lower()
        assert not s.origin.requests
    serve(test, origin_tls=other.server_context())


def test_a_client_that_does_not_trust_the_ca_is_recorded(serve):
    async def test(s: Setup) -> None:
        s.client_tls = ssl.create_default_context()  # not the proxy's CA
        with pytest.raises(ssl.SSLCertVerificationError):
            await s.tunnel()
        await asyncio.sleep(0.2)
        (event,) = await s.events()
        assert (event["event"], event["decision"]) == ("connect", "deny")
        assert "broke off the TLS handshake" in event["reason"]
    serve(test)


def test_a_head_that_never_ends_is_answered_408(serve, monkeypatch):
    monkeypatch.setattr(requestpath, "REQUEST_HEAD_SECONDS", 0.3)

    async def test(s: Setup) -> None:
        reader, writer = await s.tunnel()
        writer.write(b"GET /hello HTTP/1.1\r\nHost: web.test\r\nX-Slow: ")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408")
        writer.close()
        assert not s.origin.requests
    serve(test)


def test_a_handshake_that_never_ends_is_closed_and_recorded(serve, monkeypatch):
    monkeypatch.setattr(tlsterminate, "HANDSHAKE_SECONDS", 0.3)

    async def test(s: Setup) -> None:
        client = s.client_tls.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                       server_hostname="web.test")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy_port)
        writer.write(f"CONNECT web.test:{s.origin_port} HTTP/1.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(outgoing.read())  # the ClientHello, then nothing
        await asyncio.wait_for(reader.read(), 5)  # the server's flight, then the close
        writer.close()
        await asyncio.sleep(0.1)
        (event,) = await s.events()
        assert (event["event"], event["decision"]) == ("connect", "deny")
        assert "no TLS handshake within" in event["reason"]
    serve(test)


# Review (hostile): what mitmproxy is handed must be read by mitmproxy's own reader as the
# request to the tunnel's destination it stands for, and close the connection after it.


def mitmproxy_reads(handed: bytes) -> Any:
    """`handed` as mitmproxy's HTTP/1 server reads its first request head."""
    from h11._receivebuffer import ReceiveBuffer
    from mitmproxy.net.http import http1

    buffer = ReceiveBuffer()
    buffer += handed
    lines = buffer.maybe_extract_lines()
    assert lines is not None
    return http1.read_request_head([bytes(line) for line in lines])


@pytest.mark.parametrize("message", [
    # mitmproxy ends the request line at the LF and splits it at any whitespace: it would
    # read a request to evil.test, with our https:// target as a header
    b"GET\thttps://evil.test:{port}/hello\tHTTP/1.1\nX /hello HTTP/1.1\r\n"
    b"Host: evil.test:{port}\r\n\r\n",
    # a first header line that is a continuation folds into our Connection: close, whose
    # token then is no longer `close`: mitmproxy keeps the connection for the next request
    b"GET /hello HTTP/1.1\r\n X-Folded: yes\r\nHost: web.test:{port}\r\n\r\n",
    b"GET /hello HTTP/1.1\r\n\tX-Folded: yes\r\nHost: web.test:{port}\r\n\r\n",
])
def test_a_handed_over_head_is_read_by_mitmproxy_as_the_tunnels_request_or_refused(
        serve, message):
    from mitmproxy.net.http import http1

    async def test(s: Setup) -> None:
        data = message.replace(b"{port}", str(s.origin_port).encode())
        responses, _ = await s.exchange(data, answers=1)
        assert not s.origin.requests
        for handed in s.mitmproxy.handed:
            request = mitmproxy_reads(handed)
            assert (request.host, request.port) == ("web.test", s.origin_port), handed
            assert http1.connection_close(request.http_version, request.headers), handed
        if not s.mitmproxy.handed:
            assert [r.status_code for r in responses] == [400]
    serve(test)


def test_the_tunnels_line_counts_each_byte_once(serve):
    """The tunnel's line is the sum of its requests (as mitmproxy's path records an
    inspected tunnel), not that plus the TLS records that carried them."""
    async def test(s: Setup) -> None:
        responses, _ = await s.exchange(s.get("/big/100000"))
        assert [r.status_code for r in responses] == [200]
        (connect,) = [e for e in await s.events() if e["event"] == "connect"]
        assert 100_000 <= connect["bytes_down"] < 120_000
    serve(test)


def test_a_credential_handed_to_mitmproxy_is_counted_injected_by_mitmproxy_alone(serve):
    async def test(s: Setup) -> None:
        request = s.get("/hello", method="POST", body=b"data", host="api.test")
        await s.exchange(s.get("/hello", host="api.test"), request, host="api.test")
        assert len(s.mitmproxy.handed) == 1  # a body, with credentials loaded: scanned there
        injected = s.gate.runtime.metrics.credentials_injected.labels("tester", "api-token")
        assert injected._value.get() == 1  # the first request's; mitmproxy counts its own
    serve(test)


async def hello_only(s: Setup) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A tunnel whose client sends its ClientHello, then nothing."""
    client = s.client_tls.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                   server_hostname="web.test")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy_port)
    writer.write(f"CONNECT web.test:{s.origin_port} HTTP/1.1\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    writer.write(outgoing.read())
    await asyncio.sleep(0.1)
    return reader, writer


def test_a_tunnel_withdrawn_during_its_handshake_has_one_line(serve):
    async def test(s: Setup) -> None:
        reader, writer = await hello_only(s)
        ((tunnel, client),) = s.gate.live.open.items()
        s.gate.live._end(client, tunnel, "closed while open: withdrawn")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.sleep(0.1)
        (event,) = await s.events()
        assert (event["event"], event["decision"]) == ("connect", "deny")
        assert "withdrawn" in event["reason"]
    serve(test)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TLS 1.0
def test_a_handshake_refused_at_the_first_flight_is_recorded(serve):
    """A ClientHello the TLS end refuses at once (TLS 1.0 only): closed, recorded once."""
    async def test(s: Setup) -> None:
        s.client_tls.minimum_version = ssl.TLSVersion.TLSv1
        s.client_tls.maximum_version = ssl.TLSVersion.TLSv1
        s.client_tls.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await s.tunnel()
        await asyncio.sleep(0.2)
        (event,) = await s.events()
        assert (event["event"], event["decision"]) == ("connect", "deny")
        assert not s.origin.requests
    serve(test)


def test_a_tunnel_in_its_handshake_when_the_listener_closes_is_closed_and_recorded(serve):
    async def test(s: Setup) -> None:
        reader, writer = await hello_only(s)
        assert s.tunnels is not None
        await s.tunnels.close(wait=1.0)
        assert await asyncio.wait_for(reader.read(), 1) is not None  # closed, not left open
        (event,) = await s.events()
        assert (event["event"], event["decision"]) == ("connect", "deny")
        writer.close()
    serve(test)


def test_a_client_that_ends_inside_a_head_is_closed_at_once(serve, monkeypatch):
    """close_notify after half a head: nothing more can come, so the connection is not held
    until the head's deadline."""
    monkeypatch.setattr(requestpath, "REQUEST_HEAD_SECONDS", 5.0)

    async def test(s: Setup) -> None:
        def client() -> float:
            with socket.create_connection(("127.0.0.1", s.proxy_port), timeout=10) as raw:
                raw.sendall(f"CONNECT web.test:{s.origin_port} HTTP/1.1\r\n\r\n".encode())
                assert raw.recv(4096).startswith(b"HTTP/1.1 200")
                with s.client_tls.wrap_socket(raw, server_hostname="web.test") as tls:
                    tls.sendall(b"GET /hello HTTP/1.1\r\nHost: web.te")
                    started = time.monotonic()
                    tls.unwrap()  # close_notify, then waits for the proxy's
                    return time.monotonic() - started

        assert await asyncio.to_thread(client) < 2.0
        assert not s.origin.requests
    serve(test)


def test_a_certificate_that_cannot_be_made_is_a_recorded_refusal(serve, monkeypatch):
    def broken(self: Any, name: str) -> Any:
        raise ValueError("the store is broken")

    monkeypatch.setattr(tlsterminate.Certificates, "context", broken)

    async def test(s: Setup) -> None:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await s.tunnel()
        await asyncio.sleep(0.1)
        (event,) = await s.events()
        assert (event["event"], event["decision"]) == ("connect", "deny")
        assert "cannot make a certificate" in event["reason"]
        assert not s.origin.requests
    serve(test)
