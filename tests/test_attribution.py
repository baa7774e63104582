"""Who did it: denials and DNS queries name the client's process (pid, exe, cmdline). A denial's
line is written once the process is known (bounded in time): the client is still waiting for
its answer then, so its process still exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.proxy import RunningProxy, wait_until

pytestmark = pytest.mark.e2e

CLIENT = r"""
import socket, struct, sys
proxy, dns_port, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for n in range(100):
    with socket.create_connection(("127.0.0.1", proxy)) as s:
        s.sendall(f"CONNECT denied-{tag}-{n}.test:443 HTTP/1.1\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 403")
    with socket.create_connection(("127.0.0.1", proxy)) as s:
        s.sendall(f"GET http://denied-{tag}-{n}.test/ HTTP/1.1\r\nHost: denied-{tag}-{n}.test"
                  "\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 403")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        name = b"".join(bytes([len(l)]) + l for l in f"q{n}.{tag}.test".encode().split(b"."))
        s.settimeout(5)
        s.sendto(struct.pack("!HHHHHH", n, 0x0100, 1, 0, 0, 0) + name + b"\0\0\1\0\1",
                 ("127.0.0.1", dns_port))
        s.recv(4096)
"""


def test_denials_and_dns_queries_name_the_process(cli, tmp_path, dns):
    proxy = RunningProxy(cli, tmp_path, f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow: []
""", "--upstream-dns", dns.address)
    tag = f"who{os.getpid()}"
    try:
        subprocess.run([sys.executable, "-c", CLIENT, str(proxy.port), str(proxy.dns_port), tag],
                       check=True, timeout=120)
        def ours() -> list[dict]:  # type: ignore[type-arg]
            return [e for e in proxy.events() if tag in (e["host"] or "")]

        assert wait_until(lambda: len(ours()) >= 300, timeout=20), proxy.log()[-3000:]
        events = ours()
        for stage in ("connect", "request", "dns"):
            staged = [e for e in events if e["event"] == stage]
            assert len(staged) == 100, stage
            named = [e for e in staged if e["pid"] and e["exe"] == os.path.realpath(
                sys.executable) and tag in (e["cmdline"] or "")]
            assert len(named) >= 99, (stage, len(named), staged[0])
    finally:
        proxy.stop()
