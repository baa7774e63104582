"""The resolver's TCP listener under a flood of idle connections: each client (uid, else
address) holds a bounded share, idle connections are reclaimed, and others are still answered."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import struct
import subprocess
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from dnslib import DNSRecord
from support.proxy import RunningProxy, wait_until

from agent_egress.dns.resolver import PolicyResolver
from agent_egress.dns.server import MAX_TCP_CLIENTS, MAX_TCP_PER_CLIENT, DnsServer


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed this idle connection (EOF or reset)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def open_idle(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


@pytest.mark.e2e
def test_one_account_holding_idle_connections_locks_no_one_else_out(cli, tmp_path, dns,
                                                                    two_users):
    other = pwd.getpwnam(two_users[1])
    policy = f"""version: 1
accounts:
  flooder:
    match: {{uids: [{os.getuid()}]}}
    allow: []
  other:
    match: {{uids: [{other.pw_uid}]}}
    allow:
      - host: web.test
"""
    proxy = RunningProxy(cli, tmp_path, policy, "--upstream-dns", dns.address)
    flood: list[socket.socket] = []
    try:
        # more idle connections than the server has slots, from one uid, each taken in
        # before the next is opened
        for sock in open_idle(proxy.dns_port, MAX_TCP_CLIENTS + 44):
            flood.append(sock)
        assert wait_until(lambda: sum(not is_closed(s) for s in flood) <= MAX_TCP_PER_CLIENT)
        assert not any(is_closed(s) for s in flood[-MAX_TCP_PER_CLIENT:])  # the newest stay
        done = subprocess.run(["dig", "@127.0.0.1", "-p", str(proxy.dns_port), "+tcp",
                               "+time=5", "+tries=1", "web.test"], capture_output=True,
                              text=True, timeout=30, user=other.pw_uid)
        assert "status: NOERROR" in done.stdout, done.stdout + done.stderr
        assert "127.0.0.1" in done.stdout.split("ANSWER SECTION:")[-1]
    finally:
        for sock in flood:
            sock.close()
        proxy.stop()


# The listener in this process, with a resolver that answers every query at once; clients
# told apart by their source address (no socket-owner look-up)

class EchoResolver:
    runtime = SimpleNamespace(owners=None)

    def handle(self, packet: bytes, *args: Any) -> bytes:
        reply: bytes = DNSRecord.parse(packet).reply().pack()
        return reply


def echo_server(**limits: Any) -> DnsServer:
    return DnsServer(cast(PolicyResolver, EchoResolver()), **limits)


def ask(port: int, source: str) -> bool:
    """One query over a new TCP connection; whether it was answered."""
    query = DNSRecord.question("web.test").pack()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2,
                                      source_address=(source, 0)) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            return len(sock.recv(65536)) > 2
    except OSError:
        return False


async def serving(server: DnsServer, clients: Any) -> Any:
    _, port = await server.start("127.0.0.1", 0)
    try:
        return await asyncio.to_thread(clients, port)
    finally:
        await server.stop()


def test_a_client_over_its_share_closes_its_own_longest_idle_connection():
    def clients(port: int) -> tuple[list[bool], bool]:
        flood = []
        for _ in range(12):
            flood.extend(open_idle(port, 1))
            time.sleep(0.01)  # taken in one after another
        time.sleep(0.2)
        closed = [is_closed(s) for s in flood]
        answered = ask(port, "127.0.0.2")
        for sock in flood:
            sock.close()
        return closed, answered

    closed, answered = asyncio.run(serving(
        echo_server(max_tcp=8, max_tcp_per_client=4), clients))
    assert closed == [True] * 8 + [False] * 4
    assert answered


def test_when_every_slot_is_taken_the_client_holding_most_gives_one_up():
    def clients(port: int) -> tuple[int, int, bool]:
        big = open_idle(port, 4, "127.0.0.3")
        small = open_idle(port, 2, "127.0.0.4")
        time.sleep(0.2)
        answered = ask(port, "127.0.0.2")  # the seventh, with six slots
        time.sleep(0.1)
        result = (sum(is_closed(s) for s in big), sum(is_closed(s) for s in small), answered)
        for sock in big + small:
            sock.close()
        return result

    assert asyncio.run(serving(echo_server(max_tcp=6, max_tcp_per_client=4),
                               clients)) == (1, 0, True)


def test_idle_connections_are_reclaimed():
    def clients(port: int) -> tuple[bool, bool]:
        (sock,) = open_idle(port, 1)
        time.sleep(0.05)
        early = is_closed(sock)
        time.sleep(0.5)
        late = is_closed(sock)
        sock.close()
        return early, late

    assert asyncio.run(serving(echo_server(idle_seconds=0.2),
                               clients)) == (False, True)
