"""`run --workers N`: several processes accept on the explicit proxy listener, enforce the same
policy, write one audit stream and report one set of metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.proxy import RunningProxy

WORKERS = 3


def policy(port: int, host: str = "web.test") -> str:
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: {host}
        ports: [{port}]
      - cidr: 127.0.0.1/32  # where the test's names resolve
        ports: [{port}]
"""


def get(proxy_port: int, url: str) -> int:
    """One GET on a new connection through the proxy; the status, or 0 if it failed."""
    try:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
                         "Connection: close\r\n\r\n".encode())
            answer = bytearray()  # bytes += bytes copies: quadratic on large answers
            while chunk := sock.recv(65536):
                answer += chunk
        return int(answer.split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        return 0


def many(proxy: RunningProxy, url: str, count: int) -> list[int]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda i: get(proxy.port, f"{url}/{i}"), range(count)))


def workers_of(proxy: RunningProxy) -> list[int]:
    children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def metric(proxy: RunningProxy, name: str, **labels: str) -> float:
    with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no {name}{labels} in /metrics")


@pytest.fixture
def proxy(cli, tmp_path, dns, web):
    running = RunningProxy(cli, tmp_path, policy(web.port), "--upstream-dns", dns.address,
                           "--workers", str(WORKERS))
    yield running
    assert running.stop() == 0


def test_every_process_serves_and_every_request_is_recorded_once(proxy, web):
    assert "(3 processes)" in proxy.log()
    # held open at once, so each process must hold some: the kernel spreads connections
    # between the SO_REUSEPORT sockets by their addresses
    processes = [proxy.process.pid, *workers_of(proxy)]
    before = {pid: _sockets(pid) for pid in processes}
    tunnels = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(60)]
    for tunnel in tunnels:
        tunnel.sendall(f"CONNECT web.test:{web.port} HTTP/1.1\r\n\r\n".encode())
    for tunnel in tunnels:
        assert tunnel.recv(100).startswith(b"HTTP/1.1 200")
    holders = [pid for pid in processes if _sockets(pid) - before[pid] >= 5]
    for tunnel in tunnels:
        tunnel.close()
    assert len(holders) == WORKERS

    statuses = many(proxy, f"http://web.test:{web.port}/spread", 300)
    assert statuses == [200] * 300
    deadline = time.monotonic() + 10
    while len(paths := _request_paths(proxy.events())) < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(paths) == sorted(f"/spread/{i}" for i in range(300))
    assert metric(proxy, "agent_egress_decisions_total", account="tester",
                  stage="request", decision="allow") == 300
    assert metric(proxy, "agent_egress_audit_events_total") == len(proxy.events())


def test_a_policy_change_reaches_every_process(proxy, web):
    assert set(many(proxy, f"http://web.test:{web.port}/before", 30)) == {200}
    proxy.policy_file.write_text(policy(web.port, host="other.test"))
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while set(statuses := many(proxy, f"http://web.test:{web.port}/after", 30)) != {403}:
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)


def test_a_worker_that_dies_is_replaced(proxy, web):
    [first, *_] = workers_of(proxy)
    os.kill(first, signal.SIGKILL)
    proxy.wait_for(rf"proxy worker \d \(pid {first}\) exited")
    proxy.wait_for(r"proxy worker \d started again")  # listening, so the kernel has its socket
    current = workers_of(proxy)
    assert first not in current and len(current) == WORKERS - 1
    assert many(proxy, f"http://web.test:{web.port}/replaced", 60) == [200] * 60


def test_audit_lines_through_standard_output_stay_whole(cli, tmp_path, dns, web):
    proxy = RunningProxy(cli, tmp_path, policy(web.port), "--upstream-dns", dns.address,
                         "--workers", str(WORKERS), "--audit-log", "-")
    try:
        long_path = "x" * 6000  # longer than a pipe writes at once (PIPE_BUF, 4 KiB)
        assert many(proxy, f"http://web.test:{web.port}/{long_path}", 200) == [200] * 200
    finally:
        assert proxy.stop() == 0
    lines = [line for line in proxy.output if line.startswith("{")]
    events = [json.loads(line) for line in lines]
    assert sorted(e["path"] for e in events if e["event"] == "request") == sorted(
        f"/{long_path}/{i}" for i in range(200))


def _request_paths(events: list[dict[str, Any]]) -> list[str]:
    return [e["path"] for e in events if e["event"] == "request"]


def _sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count
