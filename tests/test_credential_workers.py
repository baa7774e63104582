"""Credentials with `run --workers 2`: every process reads the secrets (from a file and from
the environment), injects them and trips on them for the connections it takes, counts into the
one /metrics, and picks up a rotated file."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support.origins import Origin
from support.proxy import RunningProxy, wait_until
from test_workers import metric, workers_of

FILE_SECRET, ENV_SECRET, ROTATED = ("worker-file-secret-81c2e4", "worker-env-secret-3a7f90",
                                    "worker-file-rotated-5d66b1")
CONNECTIONS = 24  # held open at once: the kernel spreads them over both processes


class Recording:
    """An origin handler that records the Authorization header each path arrived with."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str | None]] = {}

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        self.seen.setdefault(request.path, []).extend(
            request.headers.get_all("Authorization") or [None])
        length = int(request.headers.get("Content-Length") or 0)
        if length:
            request.rfile.read(length)
        request.send_response(200)
        request.send_header("Content-Length", "3")
        request.end_headers()
        request.wfile.write(b"ok\n")


@pytest.fixture
def origin():
    recording = Recording()
    running = Origin(recording)
    yield running, recording
    running.stop()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "file-token"
    path.parent.mkdir(mode=0o700)
    path.write_text(FILE_SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def proxy(cli, tmp_path, dns, origin, secret_file):
    running_origin, _ = origin
    port = running_origin.port
    policy = f"""version: 1
credentials:
  file-token:
    file: {secret_file}
  env-token:
    env: TEST_WORKER_ENV_TOKEN
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{port}]
        paths: ["/file/*"]
        credential: file-token
      - host: web.test
        ports: [{port}]
        paths: ["/env/*"]
        credential: env-token
      - host: web.test
        ports: [{port}]
        paths: ["/plain/*"]
      - cidr: 127.0.0.1/32
        ports: [{port}]
"""
    (tmp_path / "proxy").mkdir()
    running = RunningProxy(cli, tmp_path / "proxy", policy, "--upstream-dns", dns.address,
                           "--workers", "2", env={"TEST_WORKER_ENV_TOKEN": ENV_SECRET})
    yield running
    assert running.stop() == 0


def on_many_connections(proxy: RunningProxy, requests: list[tuple[str, str]],
                        then: list[tuple[str, str]] | None = None) -> list[bytes]:
    """Each (URL, extra header lines) as one request on its own connection, all held open
    until every answer is in (checking that both processes hold some of them); then each of
    `then` on the same connections (so on the same processes). The answers of the last round."""
    processes = [proxy.process.pid, *workers_of(proxy)]
    assert len(processes) == 2
    before = {pid: _sockets(pid) for pid in processes}
    connections = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                   for _ in requests]
    try:
        answers = [_exchange(sock, *request) for sock, request in zip(connections, requests,
                                                                      strict=True)]
        holders = [pid for pid in processes if len(_sockets(pid) - before[pid]) >= 2]
        assert holders == processes, "one process took every connection"
        if then is not None:
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
            answers = [_exchange(sock, *request) for sock, request in zip(connections, then,
                                                                          strict=True)]
    finally:
        for sock in connections:
            sock.close()
    return answers


def _exchange(sock: socket.socket, url: str, extra: str) -> bytes:
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n{extra}"
                 "Authorization: Bearer dummy-held-by-the-agent\r\n\r\n".encode())
    return _response(sock)


def _response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"EOF"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0] + b"\n" + body


def leak_events(proxy):
    return [e for e in proxy.events() if "leak" in (e["path"] or "")]


def test_every_worker_injects_trips_and_counts(proxy, origin):
    running_origin, recording = origin
    base = f"http://web.test:{running_origin.port}"
    requests = [(f"{base}/{kind}/{i}", "") for i in range(CONNECTIONS // 2)
                for kind in ("file", "env")]
    answers = on_many_connections(proxy, requests)
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    for i in range(CONNECTIONS // 2):
        assert recording.seen[f"/file/{i}"] == [f"Bearer {FILE_SECRET}"]
        assert recording.seen[f"/env/{i}"] == [f"Bearer {ENV_SECRET}"]

    leaks = [(f"{base}/plain/leak{i}", f"X-Copied: {secret}\r\n")
             for i in range(CONNECTIONS // 2) for secret in (FILE_SECRET, ENV_SECRET)]
    answers = on_many_connections(proxy, [(f"{base}/plain/ok{i}", "") for i in range(
        CONNECTIONS)], then=leaks)
    assert all(a.startswith(b"HTTP/1.1 403") for a in answers), answers
    assert all(b"carries credential" in a for a in answers)
    assert not [path for path in recording.seen if "leak" in path]  # nothing reached it
    for name in ("file-token", "env-token"):
        assert metric(proxy, "agent_egress_credential_leaks_total", account="tester",
                      credential=name) == CONNECTIONS // 2
        assert metric(proxy, "agent_egress_credentials_injected_total", account="tester",
                      credential=name) == CONNECTIONS // 2
    # each process writes its own batches of lines: wait for all of them, not the first
    assert wait_until(lambda: len(leak_events(proxy)) >= CONNECTIONS)
    events = leak_events(proxy)
    assert len(events) == CONNECTIONS
    assert {(e["decision"], e["credential"]) for e in events} == {
        ("deny", "file-token"), ("deny", "env-token")}


def test_a_rotated_file_reaches_every_worker(proxy, origin, secret_file):
    running_origin, recording = origin
    base = f"http://web.test:{running_origin.port}"
    secret_file.write_text(ROTATED + "\n")
    deadline = time.monotonic() + 15
    while proxy.log().count("policy reloaded") < 2:  # the first process and the worker
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.1)
    answers = on_many_connections(proxy, [(f"{base}/file/rotated{i}", "")
                                          for i in range(CONNECTIONS)])
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    assert {recording.seen[f"/file/rotated{i}"][0] for i in range(CONNECTIONS)} == {
        f"Bearer {ROTATED}"}
    # the old value is now an ordinary string; the new one trips on every process
    answers = on_many_connections(proxy, [(f"{base}/plain/ok{i}", "") for i in range(
        CONNECTIONS)], then=[(f"{base}/plain/rotated-leak{i}", f"X-Copied: {ROTATED}\r\n")
                             for i in range(CONNECTIONS)])
    assert all(a.startswith(b"HTTP/1.1 403") for a in answers), answers
    text = urllib.request.urlopen(proxy.metrics_url, timeout=10).read().decode()
    for secret in (FILE_SECRET, ENV_SECRET, ROTATED):
        assert secret not in proxy.log() + text


def _sockets(pid: int) -> set[str]:
    """The sockets a process holds, by inode (the count alone would hide one closed for one
    opened)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:"):
            found.add(link)
    return found
