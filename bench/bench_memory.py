"""Memory over time: the explicit-proxy load of bench_load.py (500 clients) for a long run, the
proxy's RSS read every second and printed minute by minute, then clients sending endless TLS
ClientHellos, and the RSS after they are refused.

    .venv/bin/python bench/bench_memory.py [--minutes 30] [--settle 10]

The target (issue 13, row 14): over the minutes after `--settle`, RSS stays within 5 % of its
value at minute `--settle`. Needs nginx, as bench_load.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trustme
from bench_load import (
    WORKERS,
    Phase,
    Sampler,
    explicit_stack,
    failures,
    limits,
    resource_hard,
    slope,
    wait_for_events,
)
from common import machine, raise_nofile, table
from support.load import FAILED, OK, Plan, match_audit, run_elsewhere

HELLO_CLIENTS = 4
HELLO_BYTES = 4 * 1024 * 1024  # what each sends of a ClientHello announcing 16 MiB


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in text.splitlines()
                if line.startswith("VmRSS:")) / 1024


def endless_hellos(proxy_port: int, target: str) -> list[int]:
    """HELLO_CLIENTS tunnels, each then sending (with a pause after its first read, as a
    client's ClientHello arrives) a ClientHello that announces 16 MiB; the bytes each got in
    before the proxy closed it."""
    body = b"\x01\xff\xff\xff\x03\x03" + b"\x00" * HELLO_BYTES
    data = b"".join(b"\x16\x03\x01" + len(chunk).to_bytes(2) + chunk
                    for chunk in (body[i:i + 16384] for i in range(0, len(body), 16384)))
    socks = []
    for _ in range(HELLO_CLIENTS):
        sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"\r\n\r\n"):
            answer += sock.recv(1)
        sock.sendall(data[:100])
        socks.append(sock)
    time.sleep(0.5)
    sent = []
    for sock in socks:
        n = 100
        try:
            while n < len(data):
                n += sock.send(data[n:n + 65536])
        except OSError:
            pass
        sent.append(n)
        sock.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--settle", type=float, default=10,
                        help="the minute whose RSS the rest is compared with")
    args = parser.parse_args()
    raise_nofile(resource_hard())
    print(f"# bench_memory\n\n{machine()}\n", flush=True)
    seconds = args.minutes * 60
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        ca = trustme.CA()
        proxy, http_port, https_port = explicit_stack(stack, work, ca)
        pid = proxy.process.pid
        print(f"proxy RLIMIT_NOFILE: {limits(pid)}; {args.minutes:g} minutes of load",
              flush=True)
        plan = Plan(run="memory", proxy=("127.0.0.1", proxy.port),
                    http=("127.0.0.1", http_port), https=("127.0.0.1", https_port),
                    workers=WORKERS, seconds=seconds, gate_pid=pid)
        sampler = Sampler(pid)
        with sampler.running():
            load = run_elsewhere(plan, timeout=seconds + 600)
            events = wait_for_events(proxy.events, load.outcomes, plan.run)
        time.sleep(5)
        before = rss_mib(pid)
        sent = endless_hellos(proxy.port, f"memory-hello.secure.test:{https_port}")
        time.sleep(5)
        after = rss_mib(pid)
    samples = [(t, mib) for t, mib, _ in sampler.samples]
    by_minute = [(m, statistics.median(v for t, v in samples if m * 60 - 30 <= t < m * 60 + 30))
                 for m in range(1, int(args.minutes) + 1)
                 if any(m * 60 - 30 <= t < m * 60 + 30 for t, _ in samples)]
    results = [o.result for o in load.outcomes]
    matching = match_audit(load.outcomes, events, plan.run)
    print(f"\n{len(results):,} requests, {results.count(OK):,} allowed ok, "
          f"{results.count(FAILED)} failed; audit: {matching.matched:,} matched, "
          f"{len(matching.missing)} missing, {len(matching.duplicated)} duplicated")
    broken = failures(Phase("load", load.outcomes, events, plan.run, seconds, []))
    print(f"failed: {broken}\n" if broken else "")
    reference = next(v for m, v in by_minute if m == int(args.settle))
    later = [(m, v) for m, v in by_minute if m > args.settle]
    print(table(["minute", "RSS MiB (median of the minute)", "vs minute "
                 f"{args.settle:g}"],
                [[m, f"{v:.1f}", f"{(v / reference - 1) * 100:+.1f} %"] for m, v in by_minute]))
    worst = max(later, key=lambda mv: abs(mv[1] / reference - 1))
    print(f"\nafter minute {args.settle:g}: RSS {min(v for _, v in later):.1f} to "
          f"{max(v for _, v in later):.1f} MiB, at most {(worst[1] / reference - 1) * 100:+.1f} "
          f"% from minute {args.settle:g} ({reference:.1f} MiB); slope "
          f"{slope([(t, v) for t, v in samples if t >= args.settle * 60]):+.2f} MiB/min; "
          f"target within 5 %: {'met' if abs(worst[1] / reference - 1) <= 0.05 else 'NOT met'}")
    print(f"\n{HELLO_CLIENTS} endless ClientHellos: {', '.join(f'{n:,}' for n in sent)} bytes "
          f"taken each before the proxy closed them; RSS {before:.1f} -> {after:.1f} MiB")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
