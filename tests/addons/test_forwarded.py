"""What is decided is what is forwarded: a request's target authority, its Host header with its
port, and the SNI the proxy sends upstream all name the destination that was decided. Each
test is the attack that went through before (issue: absolute-form targets in tunnels, a Host
with another port, a plain-proxy https URL dialled without SNI)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from support.origins import Origin
from support.proxy import REQUEST_PATHS, RunningProxy

pytestmark = pytest.mark.e2e

UID = os.getuid()


@pytest.fixture(scope="module")
def named_origin(test_ca):
    """A TLS origin that records the SNI each client sent."""
    context = test_ca.server_context()
    seen: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: seen.append(name)
    origin = Origin(tls=context)
    origin.snis = seen  # type: ignore[attr-defined]
    yield origin
    origin.stop()


@pytest.fixture(scope="module", params=sorted(REQUEST_PATHS))
def proxy(request, cli, tmp_path_factory, dns, web, named_origin, test_ca):
    running = RunningProxy(cli, tmp_path_factory.mktemp("forwarded"), f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - host: secure.test
        ports: [{named_origin.port}]
      - cidr: 127.0.0.1/32
        ports: [{web.port}, {named_origin.port}]
""", "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file),
                           env=REQUEST_PATHS[request.param])
    yield running
    running.stop()


def exchange(proxy: RunningProxy, *messages: bytes) -> list[bytes]:
    """Sends each message on one connection to the proxy and reads one answer after each."""
    answers = []
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for message in messages:
            sock.sendall(message)
            answers.append(_read_answer(sock))
    return answers


def _read_answer(sock: socket.socket) -> bytes:
    data = bytearray()  # bytes += bytes copies: quadratic on large answers
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return bytes(head + b"\r\n\r\n" + body)


def test_an_absolute_form_target_naming_another_host_in_a_tunnel_is_refused(proxy, web):
    before = len(web.requests)
    connect = f"CONNECT web.test:{web.port} HTTP/1.1\r\nHost: web.test:{web.port}\r\n\r\n"
    smuggled = (f"GET http://evil.test:{web.port}/v1/x HTTP/1.1\r\n"
                f"Host: web.test:{web.port}\r\n\r\n")
    established, answer = exchange(proxy, connect.encode(), smuggled.encode())
    assert established.startswith(b"HTTP/1.1 200")
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert b"request target evil.test" in answer
    assert len(web.requests) == before  # nothing reached the origin


def test_a_matching_absolute_form_target_reaches_the_origin_in_origin_form(proxy, web):
    connect = f"CONNECT web.test:{web.port} HTTP/1.1\r\nHost: web.test:{web.port}\r\n\r\n"
    request = (f"GET http://web.test:{web.port}/absolute HTTP/1.1\r\n"
               f"Host: web.test:{web.port}\r\n\r\n")
    established, answer = exchange(proxy, connect.encode(), request.encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert ("GET", f"web.test:{web.port}", "/absolute") in web.requests


@pytest.mark.parametrize("host", ["web.test:1", "web.test:{other}"])
def test_a_host_header_with_another_port_is_refused(proxy, web, named_origin, host):
    before = len(web.requests)
    header = host.format(other=named_origin.port)
    done = subprocess.run(["curl", "-sS", "--max-time", "10", "-x", proxy.url, "-H",
                           f"Host: {header}", f"http://web.test:{web.port}/port"],
                          capture_output=True, text=True, timeout=30)
    assert "names another port" in done.stdout, done.stdout + done.stderr
    assert len(web.requests) == before


def test_a_plain_proxy_https_url_is_dialled_with_its_name_as_sni(proxy, named_origin):
    named_origin.snis.clear()
    request = (f"GET https://secure.test:{named_origin.port}/sni HTTP/1.1\r\n"
               f"Host: secure.test:{named_origin.port}\r\n\r\n")
    (answer,) = exchange(proxy, request.encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert named_origin.snis == ["secure.test"]


def test_fifty_kept_alive_requests_in_a_tunnel_to_a_name(proxy, web):
    """mitmproxy opens at most 5 connections per address at once: each request must reuse the
    connection its tunnel opened, not stall on the sixth."""
    connect = f"CONNECT web.test:{web.port} HTTP/1.1\r\nHost: web.test:{web.port}\r\n\r\n"
    requests = [f"GET /alive{i} HTTP/1.1\r\nHost: web.test:{web.port}\r\n\r\n".encode()
                for i in range(50)]
    established, *answers = exchange(proxy, connect.encode(), *requests)
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers[-1]
    assert answers[49].endswith(b"GET /alive49\n")


def test_fifty_kept_alive_inspected_https_requests(cli, tmp_path, dns, named_origin, test_ca):
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: secure.test
        ports: [{named_origin.port}]
        methods: [GET]
      - cidr: 127.0.0.1/32
        ports: [{named_origin.port}]
""", "--upstream-dns", dns.address, "--upstream-ca", str(test_ca.ca_file))
    try:
        ca = tmp_path / "state" / "mitmproxy" / "mitmproxy-ca-cert.pem"
        urls = [f"https://secure.test:{named_origin.port}/inspected{i}" for i in range(50)]
        done = subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", str(ca), "-x",
                               proxy.url, *urls], capture_output=True, text=True, timeout=60)
        assert done.stdout.count("hello from") == 50, done.stderr
    finally:
        proxy.stop()


