"""Transparent mode against explicit mode and direct, side by side, in a network namespace of
its own (root needed): new plain-HTTP connections per second with p50/p99 latency, and bulk
throughput, all from an unprivileged agent account.

    .venv/bin/python bench/bench_transparent.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.netns import namespace, system_user  # noqa: E402
from support.netns_servers import NAMESERVER  # noqa: E402
from support.proxy import Process, RunningProxy  # noqa: E402

AGENT = "egress-bench-agent"
CLI = str(ROOT / ".venv" / "bin" / "agent-egress")
PYTHON = str(ROOT / ".venv" / "bin" / "python")

# Runs as the agent with the system's python: new connection per request, N threads.
CLIENT = r"""
import json, socket, sys, threading, time
host, port, path, seconds, threads, proxy = sys.argv[1], int(sys.argv[2]), sys.argv[3], \
    float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
latencies, lock, stop = [], threading.Lock(), time.monotonic() + seconds
def one():
    target = (proxy.split(":")[0], int(proxy.split(":")[1])) if proxy else (host, port)
    line = f"http://{host}:{port}{path}" if proxy else path
    started = time.monotonic()
    with socket.create_connection(target, timeout=10) as s:
        s.sendall(f"GET {line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        size = 0
        while chunk := s.recv(1 << 20):
            size += len(chunk)
    return time.monotonic() - started, size
def run():
    while time.monotonic() < stop:
        took, size = one()
        with lock:
            latencies.append((took, size))
workers = [threading.Thread(target=run) for _ in range(threads)]
began = time.monotonic()
[w.start() for w in workers]; [w.join() for w in workers]
elapsed = time.monotonic() - began
times = sorted(t for t, _ in latencies)
print(json.dumps({"requests": len(times), "rate": len(times) / elapsed,
                  "p50": times[len(times) // 2] * 1000, "p99": times[int(len(times) * .99)] * 1000,
                  "mbps": sum(s for _, s in latencies) / elapsed / 1e6}))
"""


def sh(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def measure(ns: str, user: pwd.struct_passwd, path: str, seconds: float, threads: int,
            proxy: str = "") -> dict[str, float]:
    out = sh("ip", "netns", "exec", ns, "setpriv", f"--reuid={user.pw_uid}",
             f"--regid={user.pw_gid}", "--clear-groups", "--", "/usr/bin/python3", "-c", CLIENT,
             "web.test", "80", path, str(seconds), str(threads), proxy)
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if os.getuid() != 0:
        sys.exit("bench_transparent: needs root (network namespace, nftables)")
    user = system_user(AGENT)
    work = Path(tempfile.mkdtemp(prefix="ae-bench-transparent-"))
    work.chmod(0o755)
    started: list[Process] = []
    with namespace(f"ae-bench-{os.getpid()}") as ns:
        try:
            run(ns, user, work, started, args.seconds)
        finally:
            for process in reversed(started):
                process.stop()
            shutil.rmtree(work, ignore_errors=True)


def run(ns: str, user: pwd.struct_passwd, work: Path, started: list[Process],
        seconds: float) -> None:
    servers = Process(["ip", "netns", "exec", ns, PYTHON,
                       str(ROOT / "tests" / "support" / "netns_servers.py"), str(work)])
    started.append(servers)
    servers.wait_for("ready")
    policy = (f"version: 1\naccounts:\n  agent:\n    match: {{uids: [{user.pw_uid}]}}\n"
              "    allow:\n      - host: web.test\n")
    proxy = RunningProxy(CLI, work, policy, "--upstream-dns", NAMESERVER,
                         prefix=("ip", "netns", "exec", ns),
                         listen=("--proxy", "127.0.0.1:8080", "--transparent", "127.0.0.1:8081",
                                 "--dns", "127.0.0.1:5353", "--metrics", "127.0.0.1:9464"))
    started.append(proxy)
    rows = []
    for name, path, threads in (("new connections", "/", 16),
                                ("bulk 100 MB", "/bytes/100000000", 1)):
        direct = measure(ns, user, path, seconds, threads)
        explicit = measure(ns, user, path, seconds, threads, "127.0.0.1:8080")
        rules = sh(CLI, "nftables", "--policy", str(proxy.policy_file))
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                       check=True)
        transparent = measure(ns, user, path, seconds, threads)
        sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "agent_egress")
        rows.append((name, direct, explicit, transparent))
    print_table(rows, seconds)


def print_table(rows: list[tuple[str, dict[str, float], dict[str, float], dict[str, float]]],
                seconds: float) -> None:
    load = os.getloadavg()[0]
    print(f"# bench_transparent: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, {seconds:.0f} s per "
          f"cell, load {load:.2f}, {time.strftime('%Y-%m-%d')}\n")
    print("| scenario | direct | explicit proxy | transparent | transparent / explicit | "
          "transparent / direct |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, direct, explicit, transparent in rows:
        key, unit = ("mbps", "MB/s") if name.startswith("bulk") else ("rate", "conn/s")
        cells = [f"{r[key]:,.0f} {unit}" + ("" if key == "mbps" else
                                            f" (p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms)")
                 for r in (direct, explicit, transparent)]
        print(f"| {name} | {' | '.join(cells)} | {transparent[key] / explicit[key]:.2f} | "
              f"{transparent[key] / direct[key]:.2f} |")


if __name__ == "__main__":
    main()
