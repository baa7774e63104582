"""Benchmark of the socket-owner lookup the proxy does for every loopback client connection.

    .venv/bin/python bench/bench_identity.py [--quick]

Opens 10, then 10,000 TCP connections on loopback, and times finding the uid (and inode) of
the client end of one of them, picked at random each time: netlink sock_diag's exact lookup
(agent_egress.identity.SocketOwners.owner, as the proxy calls it) against reading
/proc/net/tcp and /proc/net/tcp6 (the parser below, written for this comparison only).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType

from common import machine, percentile, raise_nofile, table

from agent_egress.identity import SocketOwner, SocketOwners

SIZES = (10, 10_000)
TARGET_US = 100.0


def _hex_v4(address: tuple[str, int]) -> str:
    """How /proc/net/tcp spells an IPv4 address and port: the address as the host-order
    32-bit word in hex, then the port."""
    packed = socket.inet_aton(address[0])
    return f"{int.from_bytes(packed, sys.byteorder):08X}:{address[1]:04X}"


def _hex_v6(address: tuple[str, int]) -> str:
    packed = socket.inet_pton(socket.AF_INET6, address[0])
    words = "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}"
                    for i in range(0, 16, 4))
    return f"{words}:{address[1]:04X}"


def proc_owner(local: tuple[str, int], remote: tuple[str, int]) -> SocketOwner | None:
    """The socket whose own address is `local` and whose peer is `remote`, from /proc/net.

    As fast as reading /proc can be made in Python: one substring search for the two addresses
    in each file, and only the matching line split. (IPv4 sockets are in tcp, IPv6 ones and
    IPv4-mapped ones in tcp6.) The kernel formats every socket on each read, whatever we do."""
    spellings = [(local, remote)] if ":" in local[0] else [
        (local, remote), ((f"::ffff:{local[0]}", local[1]), (f"::ffff:{remote[0]}", remote[1]))]
    for own, peer in spellings:
        path, spell = ("/proc/net/tcp6", _hex_v6) if ":" in own[0] else ("/proc/net/tcp", _hex_v4)
        needle = f" {spell(own)} {spell(peer)} "
        with open(path) as f:
            text = f.read()
        at = text.find(needle)
        if at < 0:
            continue
        line = text[text.rfind("\n", 0, at) + 1:text.find("\n", at)]
        fields = line.split()
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        return SocketOwner(uid=int(fields[7]), inode=int(fields[9]))
    return None


class Connections:
    """`count` loopback TCP connections; this process holds the client ends and a child process
    the server ends (so that each needs only `count` descriptors). close() closes all."""

    def __init__(self, count: int) -> None:
        self.clients: list[socket.socket] = []
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        ready, self._done = multiprocessing.Event(), multiprocessing.Event()
        self._holder = multiprocessing.get_context("fork").Process(
            target=_hold, args=(listener, count, ready, self._done), daemon=True)
        self._holder.start()
        try:
            address = listener.getsockname()
            listener.close()
            for _ in range(count):
                self.clients.append(socket.create_connection(address))
            if not ready.wait(60):
                raise RuntimeError("the child process did not accept every connection")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self.clients:  # reset, not closed: no TIME_WAIT left behind on the machine
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self._done.set()
        self._holder.join(10)
        if self._holder.is_alive():
            self._holder.kill()
            self._holder.join()


def _hold(listener: socket.socket, count: int, ready: EventType, done: EventType) -> None:
    servers = [listener.accept()[0] for _ in range(count)]
    ready.set()
    done.wait(600)
    for s in servers:
        s.close()


def _time(lookup: Callable[[tuple[str, int], tuple[str, int]], SocketOwner | None],
          pairs: list[tuple[tuple[str, int], tuple[str, int]]], budget: float,
          most: int) -> tuple[list[float], int]:
    """Microseconds per lookup of random pairs, for up to `budget` seconds or `most` lookups."""
    timings: list[float] = []
    deadline = time.perf_counter() + budget
    while len(timings) < most and time.perf_counter() < deadline:
        local, remote = random.choice(pairs)
        started = time.perf_counter()
        found = lookup(local, remote)
        timings.append((time.perf_counter() - started) * 1e6)
        assert found is not None, (local, remote)
    return timings, len(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke run)")
    args = parser.parse_args()
    budget, most = (0.5, 2_000) if args.quick else (3.0, 20_000)
    limit = raise_nofile(max(SIZES) + 1000)
    print(f"# bench_identity\n\n{machine()}; RLIMIT_NOFILE {limit}\n")
    owners = SocketOwners()
    rows = []
    try:
        for size in SIZES:
            connections = Connections(size)
            try:
                with open("/proc/net/tcp") as f:
                    on_machine = sum(1 for _ in f) - 1
                pairs = [(c.getsockname()[:2], c.getpeername()[:2])
                         for c in connections.clients]
                for local, remote in random.sample(pairs, min(20, len(pairs))):
                    assert owners.owner(local, remote) == proc_owner(local, remote), local
                for name, lookup in (("netlink sock_diag", owners.owner),
                                     ("/proc/net/tcp{,6}", proc_owner)):
                    timings, count = _time(lookup, pairs, budget, most)
                    p50, p99 = percentile(timings, 50), percentile(timings, 99)
                    verdict = "yes" if p99 < TARGET_US else "no"
                    rows.append([name, f"{size:,}", f"{on_machine:,}", f"{count:,}",
                                 f"{p50:,.1f}", f"{p99:,.1f}", verdict])
            finally:
                connections.close()
    finally:
        owners.close()
    print(table(["lookup", "connections opened", "IPv4 sockets on the machine", "lookups",
                 "median µs", "p99 µs", f"p99 < {TARGET_US:.0f} µs"], rows))


if __name__ == "__main__":
    main()
