"""Load: 500 concurrent clients through the explicit proxy and through transparent mode, and a
burst of DNS queries; every request's outcome and audit event counted, the proxy's memory
sampled every second.

    .venv/bin/python bench/bench_load.py [--quick] [--seconds S] [--queries N]

Needs nginx (nginx-light). The transparent phase needs root (a network namespace, nftables and
an agent account), and is skipped otherwise. The clients are tests/support/load.py in a process
of their own: 200 plain-HTTP keep-alive connections sending GETs one after another, 200 sending
a new CONNECT tunnel with TLS and one GET each time, 50 of each kind to denied destinations;
each request has its own path or host name, which its audit event must name.
"""

from __future__ import annotations

import argparse
import os
import pwd
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from common import Service, machine, percentile, raise_nofile, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.dnsserver import TestDNS, Zone  # noqa: E402
from support.load import (  # noqa: E402
    AUDITED,
    DENIED,
    FAILED,
    OK,
    Load,
    Outcome,
    Plan,
    dns_burst,
    dns_names,
    match_audit,
    run_elsewhere,
)
from support.netns import routed, system_user  # noqa: E402
from support.netns_servers import NAMESERVER, ORIGIN  # noqa: E402
from support.proxy import Process, RunningProxy  # noqa: E402

CLI = str(ROOT / ".venv" / "bin" / "agent-egress")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
AGENT = "egress-bench-agent"
WORKERS = {"http": 200, "tunnel": 200, "http-denied": 50, "tunnel-denied": 50}
NAMES = ["web.test", "*.secure.test", "*.ok.test"]


@dataclass
class Settings:
    seconds: float
    queries: int


FULL = Settings(seconds=60, queries=20_000)
QUICK = Settings(seconds=5, queries=5_000)


class Sampler:
    """The proxy's RSS and open descriptors, once a second, on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float, int]] = []  # (seconds, RSS MiB, descriptors)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        began = time.monotonic()
        while not self._stop.is_set():
            rss = next(int(line.split()[1]) for line in
                       Path(f"/proc/{self.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            self.samples.append((time.monotonic() - began, rss / 1024, fds))
            self._stop.wait(1)

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome]
    events: list[dict[str, object]]
    run: str
    seconds: float
    samples: list[tuple[float, float, int]]
    notes: list[str] = field(default_factory=list)

    def row(self) -> list[object]:
        results = Counter(o.result for o in self.outcomes)
        matching = match_audit(self.outcomes, self.events, self.run)
        latencies = [o.ms for o in self.outcomes if o.result != FAILED]
        rss = [(t, mib) for t, mib, _ in self.samples]
        second_half = [(t, mib) for t, mib in rss if t >= rss[-1][0] / 2] if rss else []
        return [self.name, f"{self.seconds:.0f}", f"{len(self.outcomes):,}",
                f"{len(self.outcomes) / self.seconds:,.0f}", f"{results[OK]:,}",
                f"{results[DENIED]:,}", results[FAILED],
                f"{matching.matched:,}", len(matching.missing), len(matching.duplicated),
                len(matching.wrong_decision) + len(matching.unexpected),
                f"{percentile(latencies, 50):.1f}" if latencies else "-",
                f"{percentile(latencies, 99):.1f}" if latencies else "-",
                " / ".join(f"{v:.1f}" for v in (rss[0][1], rss[-1][1],
                                                  max(m for _, m in rss))) if rss else "-",
                f"{slope(rss):+.2f} / {slope(second_half):+.2f}",
                max((fds for _, _, fds in self.samples), default=0)]


HEADERS = ["phase", "s", "requests", "req/s", "allowed ok", "denied as expected", "failed",
           "audit matched", "missing", "duplicated", "wrong/unexpected", "p50 ms", "p99 ms",
           "RSS MiB first / last / max", "RSS slope MiB/min (all / 2nd half)",
           "max open fds"]


def wait_for_events(read: Callable[[], list[dict[str, object]]], outcomes: list[Outcome],
                    run: str, timeout: float = 60) -> list[dict[str, object]]:
    """Tunnels are recorded when they close, by a thread: until every request has its event."""
    deadline = time.monotonic() + timeout
    while True:
        events = read()
        if match_audit(outcomes, events, run).matched >= len(outcomes) or \
                time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def failures(phase: Phase) -> str:
    """What the client saw of the failed requests, and the reasons in their audit events."""
    failed = {o.key: o for o in phase.outcomes if o.result == FAILED}
    broken = Counter(f"{o.kind}: {o.detail[:80]}" for o in failed.values())
    reasons = Counter(f"audit {e.get('decision')}: {str(e.get('reason'))[:100]}"
                      for e in phase.events if (e.get("path") or e.get("host")) in failed)
    return "; ".join(f"{n} x {what}" for what, n in
                     broken.most_common(5) + reasons.most_common(5))


def nginx(directory: Path, cert: trustme.LeafCert, address: str, http_port: int,
          https_port: int, prefix: tuple[str, ...] = ()) -> Service:
    """One nginx process answering every path with a 6-byte body, plain and over TLS."""
    directory.mkdir()
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    site = 'location / { return 200 "hello\\n"; }'
    temp = " ".join(f"{kind}_temp_path {directory}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (directory / "nginx.conf").write_text(f"""
        daemon off; master_process off; worker_processes 1; worker_rlimit_nofile 20000;
        pid {directory}/nginx.pid; error_log {directory}/error.log warn;
        events {{ worker_connections 8192; }}
        http {{
            access_log off; keepalive_requests 10000000; keepalive_timeout 120s; {temp}
            server {{ listen {address}:{http_port} backlog=4096; {site} }}
            server {{
                listen {address}:{https_port} ssl backlog=4096;
                ssl_certificate {directory}/cert.pem; ssl_certificate_key {directory}/key.pem;
                {site}
            }}
        }}
    """)
    return Service("nginx", [*prefix, "nginx", "-e", f"{directory}/error.log", "-c",
                             f"{directory}/nginx.conf"], directory / "output.log")


def policy(match: str, http_port: int, https_port: int, loopback: bool) -> str:
    cidr = (f"      - cidr: 127.0.0.1/32\n        ports: [{http_port}, {https_port}]\n"
            if loopback else "")
    return f"""version: 1
accounts:
  load:
    match: {match}
    allow:
      - host: web.test
        ports: [{http_port}]
      - host: "*.secure.test"
        ports: [{https_port}]
      - host: "*.ok.test"
{cidr}"""


def explicit_stack(stack: ExitStack, work: Path, ca: trustme.CA
                   ) -> tuple[RunningProxy, int, int]:
    """A DNS server, nginx (HTTP and HTTPS) and `agent-egress run` on the explicit listener
    for this user's account, each stopped with `stack`: the proxy and nginx's HTTP and HTTPS
    ports."""
    from common import free_port

    dns = TestDNS(Zone({name: ["127.0.0.1"] for name in NAMES}))
    stack.callback(dns.stop)
    http_port, https_port = free_port(), free_port()
    origin = nginx(work / "nginx", ca.issue_cert("web.test", "*.secure.test"),
                   "127.0.0.1", http_port, https_port)
    stack.callback(origin.stop)
    origin.wait_for_port(https_port)
    (work / "proxy").mkdir()
    proxy = RunningProxy(CLI, work / "proxy", policy(f"{{uids: [{os.getuid()}]}}",
                                                     http_port, https_port, True),
                         "--upstream-dns", dns.address)
    stack.callback(proxy.stop)
    return proxy, http_port, https_port


def explicit_and_dns(work: Path, ca: trustme.CA, settings: Settings) -> list[Phase]:

    phases = []
    with ExitStack() as stack:
        proxy, http_port, https_port = explicit_stack(stack, work, ca)
        pid = proxy.process.pid
        print(f"proxy RLIMIT_NOFILE: {limits(pid)}", flush=True)
        plan = Plan(run="explicit", proxy=("127.0.0.1", proxy.port),
                    http=("127.0.0.1", http_port), https=("127.0.0.1", https_port),
                    workers=WORKERS, seconds=settings.seconds, gate_pid=pid)
        sampler = Sampler(pid)
        with sampler.running():
            load = run_elsewhere(plan, timeout=settings.seconds + 300)
            events = wait_for_events(proxy.events, load.outcomes, plan.run)
        phases.append(phase("explicit proxy", load, events, plan.run, settings.seconds,
                            sampler))
        run = "burst"
        sampler = Sampler(pid)
        with sampler.running():
            began = time.monotonic()
            outcomes = dns_burst(("127.0.0.1", proxy.dns_port), dns_names(run, settings.queries))
            took = time.monotonic() - began
            events = wait_for_events(proxy.events, outcomes, run)
        phases.append(Phase("DNS burst", outcomes, events, run, took, sampler.samples,
                            [f"{settings.queries:,} queries from 50 sockets, 8 outstanding "
                             "each"]))
    return phases


def phase(name: str, load: Load, events: list[dict[str, object]], run: str, seconds: float,
          sampler: Sampler) -> Phase:
    notes = [f"{load.connected} first connections open at once"]
    if load.held_fds:
        notes.append(f"proxy descriptors {load.idle_fds} idle, {load.held_fds} holding them")
    return Phase(name, load.outcomes, events, run, seconds, sampler.samples, notes)


def limits(pid: int) -> str:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return f"soft {soft}, hard {hard}"


def transparent(work: Path, ca: trustme.CA, settings: Settings) -> Phase:
    """On a routed devbox (tests/support/netns.py): the proxy and the agent in one namespace,
    nginx and the DNS server beyond its default route, in another."""
    user = system_user(AGENT)
    with routed(f"ae-load-{os.getpid()}") as namespaces, ExitStack() as stack:
        inside = ("ip", "netns", "exec", namespaces.devbox)
        outside = ("ip", "netns", "exec", namespaces.outside)
        names = {"web.test": ORIGIN, "*.secure.test": ORIGIN}
        servers = Process([*outside, PYTHON, __file__, "--serve-dns", NAMESERVER, repr(names)])
        stack.callback(servers.stop)
        servers.wait_for("ready")
        origin = nginx(work / "nginx-ns", ca.issue_cert("web.test", "*.secure.test"), ORIGIN,
                       80, 443, outside)
        stack.callback(origin.stop)
        time.sleep(1)  # nginx starts in well under a second; its port is not ours to probe
        if origin.process.poll() is not None:
            raise RuntimeError(f"nginx in the namespace exited:\n{origin.output()}")
        (work / "proxy-ns").mkdir()
        proxy = RunningProxy(CLI, work / "proxy-ns", policy(f"{{uids: [{user.pw_uid}]}}", 80,
                                                            443, False),
                             "--upstream-dns", NAMESERVER, prefix=inside,
                             listen=("--proxy", "127.0.0.1:8080", "--transparent",
                                     "127.0.0.1:8081", "--dns", "127.0.0.1:5353", "--metrics",
                                     "127.0.0.1:9464"))
        stack.callback(proxy.stop)
        rules = subprocess.run([CLI, "nftables", "--policy", str(proxy.policy_file)],
                               capture_output=True, text=True, check=True).stdout
        subprocess.run([*inside, "nft", "-f", "-"], input=rules, text=True, check=True)
        ca_file = work / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ca_file.chmod(0o644)
        plan = Plan(run="transparent", http=(ORIGIN, 80), https=(ORIGIN, 443),
                    workers=WORKERS, seconds=settings.seconds, ca_file=str(ca_file))
        agent = as_agent(user)
        sampler = Sampler(proxy.process.pid)
        with sampler.running():
            load = run_elsewhere(plan, prefix=(*inside, *agent), python="/usr/bin/python3",
                                 timeout=settings.seconds + 300)
            events = wait_for_events(proxy.events, load.outcomes, plan.run)
        result = phase("transparent (routed devbox)", load, events, plan.run,
                       settings.seconds, sampler)
        moved, redirected = nat_moved_ports(inside, 8081)
        result.notes.append(f"NAT moved the client's port of {moved:,} of the {redirected:,} "
                            "redirected connections conntrack still held at the end")
        return result


def nat_moved_ports(inside: tuple[str, ...], listener: int) -> tuple[int, int]:
    """Of the connections redirected to `listener` that conntrack holds (closed ones stay
    about two minutes), how many reached it from another port than their client's own."""
    table = subprocess.run([*inside, "cat", "/proc/net/nf_conntrack"], capture_output=True,
                           text=True, check=True).stdout
    moved = redirected = 0
    for line in table.splitlines():
        # ... sport=A dport=B ... sport=C dport=D: the original direction, then the reply
        ports = [f.split("=", 1)[1] for f in line.split() if f.startswith(("sport=", "dport="))]
        if len(ports) != 4 or ports[2] != str(listener):
            continue
        redirected += 1
        moved += ports[0] != ports[3]  # the original source port, and the reply's destination
    return moved, redirected


def as_agent(user: pwd.struct_passwd) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            "--")


def serve_dns(address: str, names: str) -> None:
    """Inside the namespace: the test DNS server on port 53 for the wildcard names."""
    import ast

    server = TestDNS(Zone({name: [ip] for name, ip in ast.literal_eval(names).items()}),
                     address, 53)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s per phase (a smoke run)")
    parser.add_argument("--seconds", type=float, help="how long the clients keep going")
    parser.add_argument("--queries", type=int, help="DNS queries in the burst")
    parser.add_argument("--transparent-only", action="store_true",
                        help="only the transparent-mode phase")
    parser.add_argument("--serve-dns", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dns:
        serve_dns(*args.serve_dns)
        return
    settings = QUICK if args.quick else FULL
    settings = Settings(args.seconds or settings.seconds, args.queries or settings.queries)
    limit = raise_nofile(resource_hard())
    print(f"# bench_load\n\n{machine()}; RLIMIT_NOFILE {limit}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        ca = trustme.CA()
        phases = [] if args.transparent_only else explicit_and_dns(work, ca, settings)
        if os.getuid() == 0:
            phases.insert(min(1, len(phases)), transparent(work, ca, settings))
        else:
            print("transparent phase skipped: needs root (network namespace, nftables)\n")
    print(table(HEADERS, [p.row() for p in phases]))
    print()
    for p in phases:
        broken = failures(p)
        print(f"- {p.name}: {'; '.join(p.notes)}" + (f"; failed: {broken}" if broken else ""))
    kinds = Counter(o.kind for p in phases for o in p.outcomes)
    print(f"\nrequests by kind: {', '.join(f'{k} {kinds[k]:,}' for k in AUDITED)}")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def resource_hard() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


if __name__ == "__main__":
    main()
