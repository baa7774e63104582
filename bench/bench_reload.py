"""Benchmark of a policy reload under traffic: the longest stall a steady client sees.

    .venv/bin/python bench/bench_reload.py [--quick] [--agent-egress PATH]

Starts `agent-egress run` (proxy and resolver) on a policy of 100,000 allow rules (the shapes of
bench_rules.py) and an origin (a plain-HTTP server in its own process), then runs two clients
side by side, each one request at a time with a pause of a few milliseconds between: DNS
queries to the resolver (UDP, a name no rule allows: answered by the resolver itself, so no
upstream is involved) and HTTP GETs through the proxy (a new connection each). After a quiet
phase, SIGHUP makes the proxy reload the policy, several times. It prints each client's
longest wait (the longest stall) in the quiet phase and during the reloads, and how long a
reload took (SIGHUP to the proxy's "policy reloaded" line). `--agent-egress` measures another
build (for example `/work/main/.venv/bin/agent-egress`, before a change). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_rules import Shape, policy_yaml
from common import CpuWatch, Service, free_port, machine, percentile, table
from dnslib import QTYPE, DNSRecord

ROOT = Path(__file__).resolve().parent.parent
AGENT_EGRESS = ROOT / ".venv" / "bin" / "agent-egress"
RULES = 100_000
PAUSE = 0.005  # between one client's requests
TIMEOUT = 30.0  # a request that takes longer is a failure, not a stall
ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}

ORIGIN = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@dataclass(frozen=True)
class Settings:
    quiet: float  # seconds of traffic before the first reload
    reloads: int
    between: float  # seconds of traffic after each reload's end


FULL = Settings(quiet=5, reloads=5, between=2)
QUICK = Settings(quiet=2, reloads=2, between=1)


def write_policy(path: Path, origin_port: int) -> None:
    """bench_rules' 100,000 rules (an account no local user matches) and an account for this
    uid that may reach the origin by address."""
    client = (f"  client:\n    match:\n      uids: [{os.getuid()}]\n    allow:\n"
              f"      - cidr: 127.0.0.1/32\n        ports: [{origin_port}]\n")
    path.write_bytes(policy_yaml(Shape.of(RULES)) + client.encode())


@dataclass
class Client:
    """One request at a time, PAUSE apart; each request's start and duration."""

    name: str
    request: object  # Callable[[int], None], raising on a failed request
    samples: list[tuple[float, float]] = field(default_factory=list)
    failures: int = 0

    def run(self, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.request(n)  # type: ignore[operator]
            except OSError:
                self.failures += 1
            self.samples.append((started, time.monotonic() - started))
            n += 1
            time.sleep(PAUSE)

    def longest(self, start: float, end: float, within: bool = False) -> float:
        """The longest wait of a request under way at some point in [start, end] (`within`:
        of one that began and ended in it)."""
        return max((d for s, d in self.samples
                    if (start <= s and s + d <= end if within else s <= end and s + d >= start)),
                   default=0.0)

    def typical(self, start: float, end: float) -> float:
        waits = [d for s, d in self.samples if start <= s <= end]
        return percentile(waits, 50) if waits else 0.0


def dns_request(port: int) -> object:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))

    def ask(n: int) -> None:
        query = DNSRecord.question(f"probe-{n}.unknown.test", "A")
        sock.send(query.pack())
        while True:
            reply = DNSRecord.parse(sock.recv(4096))
            if reply.header.id == query.header.id:
                if reply.q.qtype != QTYPE.A:
                    raise OSError("a reply to another question")
                return

    return ask


def http_request(proxy_port: int, origin_port: int) -> object:
    request = (f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}"
               "\r\nConnection: close\r\n\r\n").encode()

    def get(_n: int) -> None:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        if b"".join(chunks)[8:13] != b" 200 ":
            raise OSError("not answered 200")

    return get


def wait_for_line(service: Service, text: str, count: int, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.output().count(text) >= count:
            return time.monotonic()
        if service.process.poll() is not None:
            raise RuntimeError(f"agent-egress exited:\n{service.output()[-3000:]}")
        time.sleep(0.002)
    raise RuntimeError(f"no {count}th {text!r} from agent-egress:\n{service.output()[-3000:]}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer reloads: a smoke run")
    parser.add_argument("--agent-egress", type=Path, default=AGENT_EGRESS,
                        help="the agent-egress command to measure (default: this tree's)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as temporary:
        work = Path(temporary)
        origin_port, proxy_port, dns_port = free_port(), free_port(), free_port()
        policy = work / "policy.yaml"
        write_policy(policy, origin_port)
        origin = Service("origin", [sys.executable, "-c", ORIGIN, str(origin_port)],
                         work / "origin.log", env=ENV)
        proxy = Service("agent-egress", [
            str(args.agent_egress), "run", "--policy", str(policy),
            "--proxy", f"127.0.0.1:{proxy_port}", "--dns", f"127.0.0.1:{dns_port}",
            "--metrics", "off", "--upstream-dns", "127.0.0.1:9",
            "--audit-log", str(work / "audit.jsonl"), "--state-dir", str(work / "state")],
            work / "agent-egress.log", env=ENV)
        try:
            origin.wait_for_port(origin_port)
            proxy.wait_for_port(proxy_port, timeout=120)
            wait_for_line(proxy, "resolver listening", 1)
            clients = [Client("DNS query (UDP)", dns_request(dns_port)),
                       Client("HTTP GET via the proxy", http_request(proxy_port, origin_port))]
            watch = CpuWatch([proxy.pid, origin.pid])
            watch.wait_quiet()
            watch.start()
            stop = threading.Event()
            threads = [threading.Thread(target=c.run, args=(stop,)) for c in clients]
            for thread in threads:
                thread.start()
            try:
                quiet_start = time.monotonic()
                time.sleep(settings.quiet)
                quiet_end = time.monotonic()
                reloads = []
                for number in range(1, settings.reloads + 1):
                    policy.touch()  # SIGHUP reloads anyway; the watcher sees a change too
                    started = time.monotonic()
                    proxy.process.send_signal(1)  # SIGHUP
                    ended = wait_for_line(proxy, "policy reloaded", number)
                    reloads.append((started, ended))
                    time.sleep(settings.between)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            others = watch.stop()
        finally:
            proxy.stop()
            origin.stop()
    version = "this tree" if args.agent_egress == AGENT_EGRESS else str(args.agent_egress)
    print(f"{machine()}; other processes used {others:.2f} cores during the run.\n")
    print(f"agent-egress: {version}; {RULES:,} allow rules; each client waits {ms(PAUSE)} "
          f"between requests; {len(reloads)} reloads by SIGHUP.\n")
    rows = [["reload (SIGHUP to \"policy reloaded\")", "", "",
             f"{ms(min(e - s for s, e in reloads))} to {ms(max(e - s for s, e in reloads))}",
             ""]]
    for client in clients:
        during = [client.longest(s, e) for s, e in reloads]
        rows.append([client.name, ms(client.typical(quiet_start, quiet_end)),
                     ms(client.longest(quiet_start, quiet_end, within=True)),
                     " / ".join(f"{d * 1000:,.0f}" for d in during) + " ms",
                     f"{client.failures} of {len(client.samples):,}"])
    print(table(["", "median wait, quiet", "longest, quiet", "longest during each reload",
                 "failed"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
