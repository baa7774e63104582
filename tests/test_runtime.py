"""The policy holder: a reload of a large policy is read, parsed and indexed off the event loop,
which keeps answering; the loop only swaps the reference and runs `on_change`."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import threading
import time
import weakref

import pytest
from dnslib import DNSRecord
from support.proxy import RunningProxy, wait_until

from agent_egress.runner import settle_heap
from agent_egress.runtime import PolicyHolder

RULES = 50_000  # a reload takes about a second and a half on a quiet core
IN_PROCESS_RULES = 30_000  # a second: long enough to tell a stall from a scheduling hiccup


def large_policy(rules: int, uid: int = os.getuid()) -> str:
    lines = ["version: 1", "accounts:", "  tester:", f"    match: {{uids: [{uid}]}}",
             "    allow:"]
    lines += [f"      - host: svc-{i}.team-{i % 100}.corp.test" for i in range(rules)]
    return "\n".join(lines) + "\n"


def test_the_watcher_reloads_off_the_event_loop(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(large_policy(10))
    holder = PolicyHolder(path)
    first = holder.current

    async def reload_while_ticking() -> tuple[float, float, list[threading.Thread]]:
        changed: list[threading.Thread] = []
        holder.on_change = lambda policy: changed.append(threading.current_thread())
        watcher = asyncio.create_task(holder.watch(interval=0.01))
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.05)
        path.write_text(large_policy(IN_PROCESS_RULES))
        started = last = loop.time()
        longest = 0.0
        while not changed:
            await asyncio.sleep(0.001)
            now = loop.time()
            longest, last = max(longest, now - last), now
        watcher.cancel()
        return longest, last - started, changed

    longest, took, changed = asyncio.run(reload_while_ticking())
    assert holder.current is not first and holder.reloads_ok == 1
    assert changed == [threading.main_thread()]  # on_change runs on the loop
    assert longest < took / 3, (longest, took)


def test_a_synchronous_reload_still_works(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(large_policy(10))
    holder = PolicyHolder(path)
    path.write_text("version: 1\naccounts: {}\n")
    assert holder.reload() and holder.current.accounts() == {}
    path.write_text("version: 1\naccounts: [not, a, mapping]\n")
    assert not holder.reload() and holder.reloads_failed == 1


def test_a_reload_keeps_a_settled_heap_settled(tmp_path):
    """A reload used to unfreeze what runner.settle_heap froze (full collections walked
    mitmproxy and the policy again: 48 ms pauses); garbage made before it is not frozen."""
    path = tmp_path / "policy.yaml"
    path.write_text(large_policy(10))
    holder = PolicyHolder(path)
    try:
        settle_heap()
        frozen = gc.get_freeze_count()
        cycle: list[object] = []
        cycle.append(cycle)
        gone = weakref.finalize(Garbage(cycle), lambda: None)
        del cycle
        path.write_text(large_policy(1_000))
        assert holder.reload()
        assert gc.get_freeze_count() >= frozen
        assert not gone.alive
    finally:
        gc.unfreeze()


class Garbage:
    def __init__(self, cycle: list[object]) -> None:
        cycle.append(self)


@pytest.mark.e2e
def test_the_resolver_keeps_answering_during_a_sighup_reload(cli, tmp_path, dns):
    proxy = RunningProxy(cli, tmp_path, large_policy(RULES), "--upstream-dns", dns.address)
    waits: list[float] = []
    stop = threading.Event()

    def client() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(30)
            sock.connect(("127.0.0.1", proxy.dns_port))
            n = 0
            while not stop.is_set():
                query = DNSRecord.question(f"probe-{n}.unknown.test")
                started = time.monotonic()
                sock.send(query.pack())
                while DNSRecord.parse(sock.recv(4096)).header.id != query.header.id:
                    pass
                waits.append(time.monotonic() - started)
                n += 1
                time.sleep(0.005)

    thread = threading.Thread(target=client)
    try:
        thread.start()
        assert wait_until(lambda: len(waits) > 20)
        before = len(waits)
        started = time.monotonic()
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: "policy reloaded" in proxy.log(), timeout=60)
        took = time.monotonic() - started
        stop.set()
        thread.join()
        longest = max(waits[before:])
        assert len(waits) - before > 10  # answered all along
        assert longest < took / 3, (longest, took)
    finally:
        stop.set()
        proxy.stop()

