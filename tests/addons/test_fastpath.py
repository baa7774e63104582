"""Allowed HTTPS tunnels relayed without mitmproxy's layers (addons/fastpath.py), and what the
fast path hands to mitmproxy: a CONNECT or ClientHello split over reads, bytes that are not
TLS, plain HTTP inside a tunnel. Each must end exactly as mitmproxy alone would end it."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest
from support.origins import TcpOrigin
from support.proxy import RunningProxy, wait_until

UID = os.getuid()


class RawOrigin(TcpOrigin):
    """Records what a connection sends until EOF, then answers and closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        with client:
            data = bytearray()  # bytes += bytes copies: quadratic on large answers
            while chunk := client.recv(65536):
                data += chunk
            self.received.append(bytes(data))
            client.sendall(self.answer)


@pytest.fixture(scope="module")
def raw_origin():
    origin = RawOrigin(b"answer after the client's EOF")
    yield origin
    origin.stop()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def proxy(request, cli, tmp_path_factory, dns, web, secure, raw_origin):
    """The proxy on each event loop: uvloop's transports are not asyncio's classes."""
    ports = f"[{web.port}, {secure.port}, {raw_origin.port}]"
    running = RunningProxy(cli, tmp_path_factory.mktemp("fastpath"), f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: secure.test
        ports: [{secure.port}, {raw_origin.port}]
      - host: web.test
        ports: [{web.port}]
      - cidr: 127.0.0.1/32
        ports: {ports}
""", "--upstream-dns", dns.address, "--loop", request.param)
    yield running
    running.stop()


def connect(proxy: RunningProxy, target: str, split_at: int | None = None) -> socket.socket:
    """A tunnel through the proxy; its answer to the CONNECT is read byte by byte, so that
    nothing after it is taken from the tunnel."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    if split_at is None:
        sock.sendall(head)
    else:
        sock.sendall(head[:split_at])
        time.sleep(0.2)
        sock.sendall(head[split_at:])
    answer = bytearray()  # bytes += bytes copies: quadratic on large answers
    while not answer.endswith(b"\r\n\r\n"):
        answer += sock.recv(1)
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n", answer
    return sock


def tls_get(sock: socket.socket, target: str, cafile: str,
            split_hello: int | None = None) -> bytes:
    """GET / over TLS on `sock`, the handshake driven by hand so that the ClientHello can be
    sent in two pieces."""
    context = ssl.create_default_context(cafile=cafile)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=target.split(":")[0])
    first = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = outgoing.read()
            if first and split_hello:
                sock.sendall(data[:split_hello])
                time.sleep(0.2)
                data = data[split_hello:]
            first = False
            sock.sendall(data)
            incoming.write(sock.recv(65536) or b"")
    tls.write(f"GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
    sock.sendall(outgoing.read())
    answer = bytearray()  # bytes += bytes copies: quadratic on large answers
    while True:
        try:
            answer += tls.read(65536)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            if not data:
                return bytes(answer)
            incoming.write(data)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return bytes(answer)


@pytest.mark.parametrize("split_head, split_hello", [(None, None), (10, None), (None, 3)],
                         ids=["whole", "connect-split", "hello-split"])
def test_tunnels_work_however_the_client_sends(proxy, secure, test_ca, split_head,
                                               split_hello):
    target = f"secure.test:{secure.port}"
    earlier = len(proxy.events())  # the proxy serves every case: only this one's events
    with connect(proxy, target, split_head) as sock:
        answer = tls_get(sock, target, str(test_ca.ca_file), split_hello)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(
        f"hello from {target} GET /\n".encode())
    assert wait_until(lambda: [e for e in proxy.events()[earlier:] if e["event"] == "connect"])
    (event,) = [e for e in proxy.events()[earlier:] if e["event"] == "connect"]
    assert (event["host"], event["decision"]) == ("secure.test", "allow") and event["bytes_down"]


def test_a_client_half_close_still_gets_the_answer(proxy, raw_origin):
    hello = _client_hello("secure.test")
    with connect(proxy, f"secure.test:{raw_origin.port}") as sock:
        sock.sendall(hello)
        sock.shutdown(socket.SHUT_WR)
        answer = bytearray()  # bytes += bytes copies: quadratic on large answers
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer == raw_origin.answer
    assert hello in raw_origin.received
    (event,) = proxy.wait_for_events(lambda e: e["event"] == "connect"
                                     and e["port"] == raw_origin.port
                                     and e["bytes_up"] == len(hello))
    assert event["bytes_down"] == len(raw_origin.answer) and event["decision"] == "allow"


def test_sni_naming_another_host_is_still_denied(proxy, raw_origin):
    received = len(raw_origin.received)
    with connect(proxy, f"secure.test:{raw_origin.port}") as sock:
        sock.sendall(_client_hello("web.test"))
        assert sock.recv(65536) == b""  # closed, nothing relayed
    (event,) = proxy.wait_for_events(lambda e: e["event"] == "connect"
                                     and e["decision"] == "deny"
                                     and e["port"] == raw_origin.port)
    assert "TLS SNI web.test does not match the CONNECT host secure.test" in event["reason"]
    assert len(raw_origin.received) == received


def test_plain_http_inside_a_tunnel_still_has_its_host_checked(proxy, web):
    with connect(proxy, f"web.test:{web.port}") as sock:
        sock.sendall(b"GET /inside HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
        answer = bytearray()  # bytes += bytes copies: quadratic on large answers
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403")
    assert "/inside" not in {path for _, _, path in web.requests}


def test_large_downloads_are_relayed_whole(proxy, secure, test_ca):
    size = 30_000_000  # far beyond the sockets' buffers: flow control must hold
    with connect(proxy, f"secure.test:{secure.port}") as sock:
        context = ssl.create_default_context(cafile=str(test_ca.ca_file))
        with context.wrap_socket(sock, server_hostname="secure.test") as tls:
            tls.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: secure.test\r\n"
                        "Connection: close\r\n\r\n".encode())
            answer = bytearray()  # bytes += bytes copies: quadratic on large answers
            while chunk := tls.recv(1 << 20):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == size


def test_open_tunnels_are_recorded_when_the_proxy_stops(cli, tmp_path, dns, secure, test_ca):
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: secure.test
        ports: [{secure.port}]
      - cidr: 127.0.0.1/32
        ports: [{secure.port}]
""", "--upstream-dns", dns.address)
    context = ssl.create_default_context(cafile=str(test_ca.ca_file))
    held = []
    try:
        for _ in range(5):
            tls = context.wrap_socket(connect(proxy, f"secure.test:{secure.port}"),
                                      server_hostname="secure.test")
            held.append(tls)
        proxy.signal(signal.SIGTERM)
        assert proxy.process.wait(20) == 0
    finally:
        proxy.stop()
        for tls in held:
            tls.close()
    events = [e for e in proxy.events() if e["event"] == "connect"]
    assert len(events) == 5 and all(e["bytes_up"] > 0 for e in events)


def _client_hello(name: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_refused_connect_is_decided_once(proxy, secure):
    """The fast path decides, then hands a refused CONNECT to mitmproxy with its decision: a
    name whose upstream DNS is slow is not resolved twice, and the policy asked once."""
    def decisions() -> float:
        with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return float(re.search(r"^agent_egress_decision_seconds_count (\S+)$", text,
                               re.M).group(1))  # type: ignore[union-attr]

    before = decisions()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT other.test:{secure.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 403")
    assert decisions() - before == 1


def _endless_hello(announced: int, record: int) -> bytes:
    """The start of a ClientHello announcing `announced` bytes, cut into records of `record`
    bytes each, 4 MiB of it: more than any client sends, and never finished."""
    body = b"\x01" + announced.to_bytes(3) + b"\x03\x03" + b"\x00" * (4 * 1024 * 1024)
    return b"".join(b"\x16\x03\x01" + len(chunk).to_bytes(2) + chunk
                    for chunk in (body[i:i + record] for i in range(0, len(body), record)))


@pytest.mark.parametrize(("announced", "record"), [
    (0xFFFFFF, 16384),  # announces 16 MiB
    (60 * 1024, 1),  # announces what fits, sends it a byte per record: five times as much
])
def test_an_endless_client_hello_is_refused_at_64_kib(proxy, raw_origin, announced, record):
    """mitmproxy buffers the ClientHello until it is whole: without a bound, four of these
    left the proxy 14 MiB larger for good."""
    data = _endless_hello(announced, record)
    sent = 0
    with connect(proxy, f"secure.test:{raw_origin.port}") as sock:
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.settimeout(10)
        try:
            # a first read the fast path hands to mitmproxy, then the rest once it is there
            sent = sock.send(data[:100])
            time.sleep(0.3)
            while sent < len(data):
                sent += sock.send(data[sent:sent + 65536])
            closed = sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            closed = False
    assert closed and sent < len(data) // 2, f"the proxy took {sent} bytes of a ClientHello"
    (event,) = proxy.wait_for_events(lambda e: e["event"] == "connect"
                                     and e["decision"] == "deny"
                                     and e["client"] == client
                                     and "ClientHello larger than 64 KiB" in e["reason"])
    assert event["host"] == "secure.test"


def test_plain_requests_are_served_on_one_kept_alive_connection(proxy, web):
    """The request fast path (addons/requestpath.py), driven by curl on each loop."""
    urls = [f"http://web.test:{web.port}/plain/{i}" for i in range(3)]
    done = subprocess.run(["curl", "-sS", "--max-time", "10", "-x", proxy.url, *urls],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout == "".join(f"hello from web.test:{web.port} GET /plain/{i}\n"
                                  for i in range(3)), done.stderr
    events = proxy.wait_for_events(lambda e: e["event"] == "request" and
                                   e["path"] == f"/plain/{2}")
    assert events
    served = [e for e in proxy.events() if e["event"] == "request" and
              e["path"].startswith("/plain/")]
    assert [(e["decision"], e["bytes_down"]) for e in served] == [
        ("allow", len(f"hello from web.test:{web.port} GET /plain/0\n"))] * 3
    assert len({e["client"] for e in served}) == 1  # one client connection for all three
