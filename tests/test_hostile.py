"""Hostile clients against the real `agent-egress run`: slow and oversized request heads,
request smuggling, and proxy-password guessing. Each test holds the proxy to a property that
matters to everyone else using it: it keeps serving, it frees what a bad client holds, and
nothing reaches an origin that the policy did not decide."""

from __future__ import annotations

import base64
import http.client
import selectors
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import h11
import pytest
from support.origins import TcpOrigin
from support.proxy import REQUEST_PATHS, RunningProxy

from agent_egress.addons.limits import MAX_HEAD_BYTES, REQUEST_HEAD_SECONDS


def allow_web(*ports: int) -> str:
    return f"""version: 1
accounts:
  default:
    allow:
      - host: web.test
        ports: {list(ports)}
      - cidr: 127.0.0.1/32
        ports: {list(ports)}
"""


def curl(url: str, proxy: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy, *args, url],
                          capture_output=True, text=True, timeout=30)


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Sends `data` to the proxy; returns what it answers and whether it closed the connection,
    waiting `timeout` for an answer, then up to a second after each (keep-alive) answer. A reset
    after the proxy refused a message it had not finished reading counts as closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        received = bytearray()  # bytes += bytes copies: quadratic on large answers
        try:
            client.sendall(data)
            while chunk := client.recv(65536):
                received += chunk
                client.settimeout(1)
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            return bytes(received), False
        return bytes(received), True


def statuses(received: bytes) -> list[int]:
    return [int(line.split()[1]) for line in received.split(b"\r\n")
            if line.startswith(b"HTTP/1.1 ")]


@pytest.fixture
def start(cli, tmp_path, dns) -> Iterator[Any]:
    started = []

    def run(policy: str, *args: str, prefix: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> RunningProxy:
        proxy = RunningProxy(cli, tmp_path, policy, "--upstream-dns", dns.address, *args,
                             prefix=prefix, env=env)
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module", params=sorted(REQUEST_PATHS))
def shared_proxy(request, cli, tmp_path_factory, dns, web, recording) -> Iterator[RunningProxy]:
    proxy = RunningProxy(cli, tmp_path_factory.mktemp("hostile"),
                         allow_web(web.port, recording.port), "--upstream-dns", dns.address,
                         env=REQUEST_PATHS[request.param])
    yield proxy
    proxy.stop()


def assert_still_serving(proxy: RunningProxy, port: int) -> None:
    assert proxy.process.poll() is None
    answer = curl(f"http://web.test:{port}/still-up", proxy.url)
    assert answer.stdout == f"hello from web.test:{port} GET /still-up\n", answer.stderr


# Slowloris


@pytest.mark.parametrize("path", sorted(REQUEST_PATHS))
def test_slow_clients_neither_lock_others_out_nor_stay_forever(start, web, path):
    """300 connections sending half a request head, some a byte at a time, against a proxy
    started with an open-file soft limit of 256: another client is still served, and each slow
    connection is answered 408 and closed once its head is overdue."""
    proxy = start(allow_web(web.port), prefix=("prlimit", "--nofile=256:20000"),
                  env=REQUEST_PATHS[path])
    slow = []
    for number in range(300):
        connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        connection.sendall(f"GET http://web.test:{web.port}/slow/{number} HTTP/1.1\r\n"
                           f"Host: web.test:{web.port}\r\nX-Slow: ".encode())
        slow.append(connection)
    trickling = slow[::2]
    try:
        assert_still_serving(proxy, web.port)
        answers = {connection: b"" for connection in slow}
        open_ = set(slow)
        selector = selectors.DefaultSelector()
        for connection in slow:
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ)
        deadline = time.monotonic() + REQUEST_HEAD_SECONDS + 30
        next_byte = time.monotonic()
        while open_ and time.monotonic() < deadline:
            if time.monotonic() >= next_byte:
                for connection in open_.intersection(trickling):
                    try:
                        connection.send(b"a")
                    except OSError:
                        pass  # closed by the proxy: the read below sees it
                next_byte = time.monotonic() + 2
            for key, _ in selector.select(timeout=0.5):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    chunk = ready.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                answers[ready] += chunk
                if not chunk:
                    selector.unregister(ready)
                    open_.discard(ready)
        selector.close()
        assert not open_, f"{len(open_)} slow connections still open"
        assert {statuses(answer)[0] for answer in answers.values()} == {408}
        assert not any(path.startswith("/slow/") for _, _, path in web.requests)
        assert_still_serving(proxy, web.port)
    finally:
        for connection in slow:
            connection.close()


# Oversized request heads


HUGE = 1024 * 1024


@pytest.mark.parametrize("head", [
    pytest.param(lambda url: f"GET {url}/{'a' * HUGE} HTTP/1.1\r\n\r\n", id="request line"),
    pytest.param(lambda url: f"GET {url}/ HTTP/1.1\r\n" + "X-Many: 1\r\n" * (HUGE // 11) +
                 "\r\n", id="many headers"),
    pytest.param(lambda url: f"GET {url}/ HTTP/1.1\r\nX-Big: {'b' * HUGE}\r\n\r\n",
                 id="one header"),
    pytest.param(lambda url: f"GET {url}/{'a' * HUGE}", id="request line never ends"),
    pytest.param(lambda url: f"GET {url}/ HTTP/1.1\r\n" + "X-Many: 1\r\n" * (HUGE // 11),
                 id="header block never ends"),
])
def test_oversized_request_heads_are_refused(shared_proxy, web, head):
    url = f"http://web.test:{web.port}"
    served = len(web.requests)
    received, closed = exchange(shared_proxy.port, head(url).encode())
    assert closed
    assert statuses(received) in ([431], []), received[:200]  # [] : reset before reading
    assert len(web.requests) == served
    assert_still_serving(shared_proxy, web.port)


def test_large_but_reasonable_heads_pass(shared_proxy, web):
    cookie = "c" * (MAX_HEAD_BYTES // 2)
    answer = curl(f"http://web.test:{web.port}/cookie", shared_proxy.url,
                  "-H", f"Cookie: {cookie}")
    assert answer.stdout == f"hello from web.test:{web.port} GET /cookie\n", answer.stderr


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_unparseable_body_framing_is_not_buffered(shared_proxy, web):
    """A chunk-size line that never ends sat in mitmproxy's buffer without limit."""
    before = resident_bytes(shared_proxy.process.pid)
    head = (f"POST http://web.test:{web.port}/chunks HTTP/1.1\r\nHost: web.test:{web.port}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shared_proxy.port), timeout=5) as client:
        try:
            client.sendall(head.encode())
            for _ in range(64):
                client.sendall(b"1" * HUGE)
        except OSError:
            pass  # refused, or no longer read
    assert resident_bytes(shared_proxy.process.pid) - before < 16 * HUGE
    assert_still_serving(shared_proxy, web.port)


# Request smuggling


class RecordingOrigin(TcpOrigin):
    """A plain-HTTP origin that parses what it receives strictly (h11, RFC 9112) and records
    each request, every raw byte, and any framing it could not parse."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []  # (method, target, Host)
        self.raw = b""
        self.errors: list[str] = []
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        parser = h11.Connection(h11.SERVER)
        with client:
            while True:
                try:
                    event = parser.next_event()
                    if event is h11.NEED_DATA:
                        data = client.recv(65536)
                        self.raw += data
                        parser.receive_data(data)
                    elif isinstance(event, h11.Request):
                        host = dict(event.headers).get(b"host", b"").decode()
                        self.requests.append((event.method.decode(), event.target.decode(),
                                              host))
                    elif isinstance(event, h11.EndOfMessage):
                        client.sendall(parser.send(h11.Response(
                            status_code=200, headers=[("Content-Length", "2")])) +
                            parser.send(h11.Data(data=b"ok")) + parser.send(h11.EndOfMessage()))
                        if parser.our_state is h11.MUST_CLOSE:  # the request said close
                            return
                        parser.start_next_cycle()
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                except h11.RemoteProtocolError as e:
                    self.errors.append(str(e))
                    return
                except OSError:
                    return


@pytest.fixture(scope="module")
def recording() -> Iterator[RecordingOrigin]:
    origin = RecordingOrigin()
    yield origin
    origin.stop()


HIDDEN = "GET http://denied.test:{port}/hidden HTTP/1.1\r\nHost: denied.test:{port}\r\n\r\n"
SMUGGLING = {
    "content-length and chunked": "POST {url}/a HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4"
                                  "\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HIDDEN,
    "chunked and a content-length covering the next request":
        "POST {url}/a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Length: {hidden_length}\r\n\r\n0\r\n\r\n" + HIDDEN,
    "two different content-lengths": "POST {url}/a HTTP/1.1\r\nHost: {host}\r\n"
                                     "Content-Length: 0\r\nContent-Length: {hidden_length}"
                                     "\r\n\r\n0\r\n\r\n" + HIDDEN,
    "chunked, identity": "POST {url}/a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: "
                         "chunked, identity\r\n\r\n0\r\n\r\n" + HIDDEN,
    "obs-fold": "POST {url}/a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding:\r\n chunked\r\n"
                "\r\n0\r\n\r\n" + HIDDEN,
    "folded Host": "GET {url}/a HTTP/1.1\r\nHost: {host}\r\n denied.test\r\n\r\n",
    "bare LF": "GET {url}/a HTTP/1.1\nHost: {host}\n\n" + HIDDEN.replace("\r\n", "\n"),
    "bare LF inside a header": "GET {url}/a HTTP/1.1\r\nHost: {host}\nX: y\r\n\r\n" + HIDDEN,
    "pipelined behind an allowed request": "GET {url}/a HTTP/1.1\r\nHost: {host}\r\n\r\n" +
                                           HIDDEN,
    "a request line in the body": "POST {url}/a HTTP/1.1\r\nHost: {host}\r\n"
                                  "Content-Length: {hidden_length}\r\n\r\n0\r\n\r\n" + HIDDEN,
    "space before the colon": "POST {url}/a HTTP/1.1\r\nHost: {host}\r\nContent-Length : "
                              "{hidden_length}\r\n\r\n0\r\n\r\n" + HIDDEN,
    "an allowed request, then framing in doubt": "GET {url}/a HTTP/1.1\r\nHost: {host}\r\n\r\n"
                                                 "POST {url}/a HTTP/1.1\r\nHost: {host}\r\n"
                                                 "Transfer-Encoding: chunked\r\nContent-Length: 4"
                                                 "\r\n\r\n0\r\n\r\n" + HIDDEN,
    "Host naming another destination": "GET {url}/a HTTP/1.1\r\nHost: denied.test:{port}\r\n\r\n",
    "a second Host": "GET {url}/a HTTP/1.1\r\nHost: {host}\r\nHost: denied.test:{port}\r\n\r\n",
}


@pytest.mark.parametrize("attack", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_smuggled_requests_reach_no_origin_undecided(shared_proxy, recording, attack):
    port = recording.port
    host = f"web.test:{port}"
    hidden = HIDDEN.format(port=port)
    message = attack.format(url=f"http://{host}", host=host, port=port,
                            hidden_length=len("0\r\n\r\n" + hidden))
    before = len(recording.requests)
    received, _ = exchange(shared_proxy.port, message.encode())
    assert statuses(received), "the proxy answered nothing"
    reached = recording.requests[before:]
    assert all(request_host == host for _, _, request_host in reached), reached
    assert all(target.endswith("/a") for _, target, _ in reached), reached
    assert not recording.errors, "the proxy forwarded framing a strict parser refuses"
    assert shared_proxy.process.poll() is None


# The same inside an inspected tunnel: TLS terminated by the proxy (its request fast path, or
# mitmproxy for what that does not take), requests in origin-form, a TLS origin


class TlsRecordingOrigin(RecordingOrigin):
    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        try:
            wrapped = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().serve(wrapped)


@pytest.fixture(scope="module")
def tls_recording(test_ca) -> Iterator[RecordingOrigin]:
    origin = TlsRecordingOrigin(test_ca.server_context())
    yield origin
    origin.stop()


@pytest.fixture(scope="module", params=sorted(REQUEST_PATHS))
def inspecting_proxy(request, cli, tmp_path_factory, dns, tls_recording, test_ca
                     ) -> Iterator[RunningProxy]:
    port = tls_recording.port
    proxy = RunningProxy(cli, tmp_path_factory.mktemp("inspected"), f"""version: 1
accounts:
  default:
    allow:
      - host: inspect.test
        ports: [{port}]
        methods: [GET, POST]
        paths: ["/a"]
      - cidr: 127.0.0.1/32
        ports: [{port}]
""", "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file),
                         env=REQUEST_PATHS[request.param])
    yield proxy
    proxy.stop()


def exchange_inspected(proxy: RunningProxy, destination: str, data: bytes) -> bytes:
    """Sends `data` inside an inspected tunnel to `destination`; returns what came back until
    the proxy closed or stayed quiet for a second."""
    context = ssl.create_default_context(
        cafile=str(proxy.directory / "state" / "mitmproxy" / "mitmproxy-ca-cert.pem"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(f"CONNECT {destination} HTTP/1.1\r\nHost: {destination}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname=destination.split(":")[0]) as client:
            received = bytearray()
            try:
                client.sendall(data)
                while chunk := client.recv(65536):
                    received += chunk
                    client.settimeout(1)
            except (ConnectionResetError, BrokenPipeError, TimeoutError, ssl.SSLError):
                pass
            return bytes(received)


@pytest.mark.parametrize("attack", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_smuggled_requests_reach_no_origin_undecided_inside_an_inspected_tunnel(
        inspecting_proxy, tls_recording, attack):
    port = tls_recording.port
    host = f"inspect.test:{port}"
    hidden = HIDDEN.format(port=port)
    message = attack.format(url="", host=host, port=port,
                            hidden_length=len("0\r\n\r\n" + hidden))
    before = len(tls_recording.requests)
    received = exchange_inspected(inspecting_proxy, host, message.encode())
    assert statuses(received), "the proxy answered nothing"
    reached = tls_recording.requests[before:]
    assert all(request_host == host for _, _, request_host in reached), reached
    assert all(target == "/a" for _, target, _ in reached), reached
    assert not tls_recording.errors, "the proxy forwarded framing a strict parser refuses"
    assert inspecting_proxy.process.poll() is None


# Proxy-password guessing


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def failed_authentications(proxy: RunningProxy) -> list[dict[str, object]]:
    return [e for e in proxy.events()
            if (e["decision"], e["reason"]) == ("deny", "proxy authentication failed")]


def test_a_password_guesser_stalls_no_one_else(start, web, tmp_path):
    """bcrypt at cost 14 takes about a second: checked on the event loop, as mitmproxy does,
    16 guessers would hold each of the good client's requests for many seconds."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(14)).decode())
    policy = allow_web(web.port).replace("default:", "alice:\n    match: {proxy_users: [alice]}")
    proxy = start(policy, "--proxy-auth", str(htpasswd))
    good = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    url = f"http://web.test:{web.port}/good"
    good.request("GET", url, headers={"Proxy-Authorization": basic("alice", "wonderland")})
    assert good.getresponse().read().startswith(b"hello")

    stop = threading.Event()
    answers: list[int] = []

    def guess(thread: int) -> None:
        attempt = 0
        while not stop.is_set():
            attempt += 1
            guesser = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
            try:
                guesser.request("GET", url, headers={
                    "Proxy-Authorization": basic("alice", f"guess-{thread}-{attempt}")})
                answers.append(guesser.getresponse().status)
            finally:
                guesser.close()

    guessers = [threading.Thread(target=guess, args=(n,)) for n in range(16)]
    for thread in guessers:
        thread.start()
    try:
        time.sleep(1)  # the guessers are in full swing
        good.timeout = 10
        good.sock.settimeout(10)
        for _ in range(5):
            good.request("GET", url,
                         headers={"Proxy-Authorization": basic("alice", "wonderland")})
            response = good.getresponse()
            assert (response.status, response.read()) == (
                200, f"hello from web.test:{web.port} GET /good\n".encode())
        assert all(thread.is_alive() for thread in guessers)  # guessing all along
    finally:
        stop.set()
        for thread in guessers:
            thread.join(60)
        good.close()
    assert answers and set(answers) == {407}
    fresh = curl(url, proxy.url, "--proxy-user", "alice:wonderland")
    assert fresh.stdout == f"hello from web.test:{web.port} GET /good\n", fresh.stderr
    deadline = time.monotonic() + 10
    while len(failed_authentications(proxy)) < len(answers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(failed_authentications(proxy)) == len(answers)
    written = proxy.audit_log.read_text() + proxy.log()
    assert "wonderland" not in written and "guess-" not in written
