"""Benchmark of agent-egress's DNS resolver against dnslib and dnsmasq, driven by dnsperf.

    .venv/bin/python bench/bench_dns.py [--quick]

Needs `dnsperf` and `dnsmasq` (Debian: apt-get install dnsperf dnsmasq). Everything runs on
loopback. An upstream dnsmasq is authoritative for NAMES names under bench.test (an A and an
AAAA record each, TTL 300 s). Four resolvers are measured in turn, each alone on core 0:

- agent-egress: `agent-egress run --proxy off --metrics off --dns ...` with a policy that
  allows `*.bench.test` for this uid, forwarding to the upstream, writing its audit log;
- dnslib, bare: a threaded dnslib.server.DNSServer answering the same records itself;
- dnslib, forwarding: a threaded dnslib.server.DNSServer with dnslib's ProxyResolver to the
  upstream (it has no cache: every query goes upstream);
- dnsmasq: forwarding to the upstream, with its cache.

dnsperf (on core 1, with the upstream) sends the 2 x NAMES questions over and over: 4 clients,
at most 20 queries outstanding, first one pass to fill the caches, then RUNS timed runs.
Queries per second are dnsperf's; latencies are each answered query's, from `dnsperf -v`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import Service, machine, percentile, table

ROOT = Path(__file__).resolve().parents[1]
AGENT_EGRESS = ROOT / ".venv" / "bin" / "agent-egress"
NAMES = 300
PER_PARENT = 10  # names per parent domain: below the resolver's many-subdomains signal (50)
TTL = 300
CLIENTS = 4
OUTSTANDING = 20
SERVER_CORE, LOAD_CORE = "0", "1"
LIGHT_QPS = 2000  # a load every resolver here sustains, for latency without queueing
TARGET_FACTOR = 4.0  # agent-egress against bare dnslib
TARGET_P99_MS = 2.0


@dataclass(frozen=True)
class Settings:
    seconds: float  # one timed run
    runs: int


FULL = Settings(seconds=10.0, runs=3)
QUICK = Settings(seconds=3.0, runs=1)


def name(i: int) -> str:
    return f"n{i}.d{i // PER_PARENT}.bench.test"


def ipv4(i: int) -> str:
    return f"203.0.113.{i % 250 + 1}"


def ipv6(i: int) -> str:
    return f"2001:db8::{i + 1:x}"


# --- the dnslib servers, run as child processes of this script (--serve) ---------------------

def serve(kind: str, port: int, upstream: int) -> None:
    from dnslib import AAAA, QTYPE, RR, A, DNSRecord
    from dnslib.proxy import ProxyResolver
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    class Fixed(BaseResolver):  # type: ignore[misc]
        """Answers the benchmark's names from a dictionary, as the upstream does."""

        def __init__(self) -> None:
            self.records = {name(i): (ipv4(i), ipv6(i)) for i in range(NAMES)}

        def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
            reply = request.reply()
            found = self.records.get(str(request.q.qname).rstrip(".").lower())
            if found is None:
                reply.header.rcode = 3
            elif request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(found[0]), ttl=TTL))
            elif request.q.qtype == QTYPE.AAAA:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(found[1]), ttl=TTL))
            return reply

    resolver = Fixed() if kind == "fixed" else ProxyResolver("127.0.0.1", upstream, timeout=5)
    logger = DNSLogger(log="-request,-reply,-truncated,-recv,-send,-data,-error", prefix=False)
    server = DNSServer(resolver, address="127.0.0.1", port=port, logger=logger)
    print(f"dnslib {kind} on 127.0.0.1:{port}", flush=True)
    server.start()  # threaded: a thread per query (socketserver.ThreadingMixIn)


# --- set-up ------------------------------------------------------------------------------------

def udp_port() -> int:
    """A loopback port free for UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def pinned(core: str, command: Sequence[str]) -> list[str]:
    return ["taskset", "-c", core, *command] if (os.cpu_count() or 1) >= 2 else list(command)


def ask(port: int, qname: str, qtype: str = "A", timeout: float = 1.0) -> tuple[str, list[str]]:
    """rcode and answers of one query over UDP."""
    from dnslib import RCODE, DNSRecord

    reply = DNSRecord.parse(DNSRecord.question(qname, qtype).send("127.0.0.1", port,
                                                                  timeout=timeout))
    return RCODE[reply.header.rcode], [str(rr.rdata) for rr in reply.rr]


def wait_answering(service: Service, port: int, timeout: float = 60) -> None:
    """Until the server answers the first name correctly (A and AAAA)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.output()}")
        try:
            got = ask(port, name(0)), ask(port, name(0), "AAAA")
        except (OSError, ValueError) as e:
            last = e
            time.sleep(0.2)
            continue
        if got == (("NOERROR", [ipv4(0)]), ("NOERROR", [ipv6(0)])):
            return
        raise RuntimeError(f"{service.name} answers {got}, not the benchmark's records")
    raise RuntimeError(f"{service.name} does not answer on {port} ({last}):\n{service.output()}")


def dnsmasq_conf(path: Path, port: int, lines: Sequence[str]) -> Path:
    common = ["no-resolv", "no-hosts", "listen-address=127.0.0.1", "bind-interfaces",
              f"port={port}", "pid-file=", "log-facility=-"]
    if os.getuid() == 0:
        common.append("user=root")  # no switch to the dnsmasq user, who may not exist
    path.write_text("\n".join([*common, *lines]) + "\n")
    return path


# --- measuring ---------------------------------------------------------------------------------

@dataclass
class Run:
    qps: float
    latencies_ms: list[float]
    sent: int
    lost: int
    codes: str
    cpu: float  # the server's CPU seconds per second of the run (1.0 = one core)
    main_us: float  # CPU microseconds per answered query: the main thread
    others_us: float  # and the other threads (agent-egress: the audit log writer)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system time of a process's main thread, and of all its threads (those that
    have ended too)."""
    def seconds(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return seconds(Path(f"/proc/{pid}/task/{pid}/stat")), seconds(Path(f"/proc/{pid}/stat"))


def dnsperf(port: int, queries: Path, out: Path, seconds: float | None,
            server_pid: int, rate: int | None = None) -> Run:
    limit = ["-l", f"{seconds:g}"] if seconds else ["-n", "1"]
    if rate:
        limit += ["-Q", str(rate)]
    command = pinned(LOAD_CORE, ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d",
                                 str(queries), "-c", str(CLIENTS), "-q", str(OUTSTANDING),
                                 "-t", "2", *limit, "-v"])
    main_before, all_before = cpu_seconds(server_pid)
    started = time.monotonic()
    with open(out, "w") as f:
        subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=True,
                       timeout=(seconds or 60) + 60)
    elapsed = time.monotonic() - started
    main_after, all_after = cpu_seconds(server_pid)
    main = main_after - main_before
    others = max(all_after - all_before - main, 0.0)
    text = out.read_text()
    summary = {key: value for key, value in re.findall(r"^[ \t]+([A-Z][\w ]+):[ \t]+(.*)$", text,
                                                       re.MULTILINE)}
    latencies = []
    for line in text.splitlines():
        # "> NOERROR name type seconds"; "> T ..." a time-out, "> I ..." cut by the time limit
        if line.startswith("> ") and line[2:4] not in ("T ", "I "):
            latencies.append(float(line.rsplit(" ", 1)[1]) * 1000)
    sent = int(summary["Queries sent"])
    lost = int(summary["Queries lost"].split()[0])
    answered = max(sent - lost, 1)
    return Run(float(summary["Queries per second"]), latencies, sent, lost,
               summary.get("Response codes", ""), (main + others) / elapsed,
               main / answered * 1e6, others / answered * 1e6)


@dataclass
class Result:
    label: str
    runs: list[Run]
    light: Run  # at LIGHT_QPS offered

    @property
    def qps(self) -> float:
        return statistics.median(r.qps for r in self.runs)

    def latency(self, q: float) -> float:
        return statistics.median(percentile(r.latencies_ms, q) for r in self.runs)

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.runs)

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    @property
    def cpu_us(self) -> str:
        main = statistics.median(r.main_us for r in self.runs)
        others = statistics.median(r.others_us for r in self.runs)
        return f"{main:.0f} + {others:.0f}"


def measure(label: str, start: Callable[[int], Service], queries: Path, work: Path,
            settings: Settings) -> Result:
    port = udp_port()
    service = start(port)
    try:
        wait_answering(service, port)
        out = work / f"dnsperf-{label.split()[0]}.txt"
        dnsperf(port, queries, out, None, service.pid)  # one pass: fills the caches
        runs = []
        for _ in range(settings.runs):
            run = dnsperf(port, queries, out, settings.seconds, service.pid)
            if re.findall(r"(\w+) \d+ \(", run.codes) != ["NOERROR"]:
                raise RuntimeError(f"{label}: unexpected response codes {run.codes}")
            runs.append(run)
            print(f"  {label}: {run.qps:,.0f} q/s, p99 {percentile(run.latencies_ms, 99):.2f} "
                  f"ms, lost {run.lost}", flush=True)
        light = dnsperf(port, queries, out, settings.seconds, service.pid, LIGHT_QPS)
        return Result(label, runs, light)
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run each (a smoke run)")
    parser.add_argument("--serve", choices=["fixed", "proxy"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream)
        return
    missing = [tool for tool in ("dnsperf", "dnsmasq", "taskset") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install dnsperf dnsmasq")
    settings = QUICK if args.quick else FULL
    header = machine()
    print(f"# bench_dns\n\n{header}\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        work = Path(tmp)
        queries = work / "queries.txt"
        queries.write_text("".join(f"{name(i)} A\n{name(i)} AAAA\n" for i in range(NAMES)))
        upstream_port = udp_port()
        upstream_conf = dnsmasq_conf(
            work / "upstream.conf", upstream_port,
            [f"local-ttl={TTL}", *(f"host-record={name(i)},{ipv4(i)},{ipv6(i)}"
                                   for i in range(NAMES))])
        upstream = Service("upstream dnsmasq", pinned(LOAD_CORE, [
            "dnsmasq", "--keep-in-foreground", f"--conf-file={upstream_conf}"]),
            work / "upstream.log")
        audit_log = work / "audit.jsonl"
        policy = work / "policy.yaml"
        policy.write_text(f"""version: 1
accounts:
  bench:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: "*.bench.test"
""")

        def agent_egress(port: int) -> Service:
            service = Service("agent-egress", pinned(SERVER_CORE, [
                str(AGENT_EGRESS), "run", "--proxy", "off", "--metrics", "off",
                "--dns", f"127.0.0.1:{port}", "--upstream-dns", f"127.0.0.1:{upstream_port}",
                "--audit-log", str(audit_log), "--policy", str(policy),
                "--state-dir", str(work / "state")]), work / "agent-egress.log")
            return service

        def dnslib(kind: str) -> Callable[[int], Service]:
            def start(port: int) -> Service:
                return Service(f"dnslib {kind}", pinned(SERVER_CORE, [
                    sys.executable, __file__, "--serve", kind, "--port", str(port),
                    "--upstream", str(upstream_port)]), work / f"dnslib-{kind}.log")
            return start

        def dnsmasq(port: int) -> Service:
            conf = dnsmasq_conf(work / "forwarder.conf", port, [
                f"server=127.0.0.1#{upstream_port}", "cache-size=10000"])
            return Service("dnsmasq", pinned(SERVER_CORE, [
                "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"]),
                work / "dnsmasq.log")

        try:
            wait_answering(upstream, upstream_port)
            results = [
                measure("agent-egress", agent_egress, queries, work, settings),
                measure("dnslib bare (threaded)", dnslib("fixed"), queries, work, settings),
                measure("dnslib forwarding (threaded)", dnslib("proxy"), queries, work,
                        settings),
                measure("dnsmasq (forwarding, cache)", dnsmasq, queries, work, settings),
            ]
        finally:
            upstream.stop()
        audited = sum(1 for _ in open(audit_log)) if audit_log.exists() else 0

    ours, bare, dnsmasq_result = results[0], results[1], results[3]
    rows = [[r.label, f"{r.qps:,.0f}", f"{r.latency(50):.2f}", f"{r.latency(99):.2f}",
             f"{r.latency(100):.2f}", f"{r.lost:,} of {r.sent:,}", f"{r.cpu:.0%}",
             r.cpu_us, f"{r.qps / bare.qps:.2f}x", f"{r.qps / dnsmasq_result.qps:.3f}x"]
            for r in results]
    print(table(["resolver", "queries/s", "p50 ms", "p99 ms", "max ms", "lost",
                 "server CPU", "CPU us/query (main + other threads)", "vs dnslib bare",
                 "vs dnsmasq"], rows))
    print(f"\nLatency at {LIGHT_QPS:,} queries/s offered (one run of {settings.seconds:g} s):\n")
    print(table(["resolver", "p50 ms", "p99 ms", "max ms", "lost"], [
        [r.label, f"{percentile(r.light.latencies_ms, 50):.3f}",
         f"{percentile(r.light.latencies_ms, 99):.3f}",
         f"{percentile(r.light.latencies_ms, 100):.2f}", f"{r.light.lost:,} of {r.light.sent:,}"]
        for r in results]))
    answered = sum(r.sent - r.lost for r in ours.runs)
    print(f"\n{settings.runs} run(s) of {settings.seconds:g} s per resolver after a pass to "
          f"fill the caches; medians. {CLIENTS} clients, {OUTSTANDING} queries outstanding, "
          f"{NAMES} names x (A, AAAA). agent-egress wrote {audited:,} audit events for "
          f"{answered:,} timed queries (the rest: its warm-up, checks and light-load run).")
    met = ours.qps >= TARGET_FACTOR * bare.qps and ours.latency(99) < TARGET_P99_MS
    print(f"\nTarget (>= {TARGET_FACTOR:g}x bare dnslib, p99 < {TARGET_P99_MS:g} ms): "
          f"{'met' if met else 'not met'} ({ours.qps / bare.qps:.2f}x, p99 "
          f"{ours.latency(99):.2f} ms). Load average at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
