"""What promising room for every audit line costs new tunnels: scenario (b) of bench_proxy.py
(a new CONNECT, TLS handshake and one GET per request, 32 at once, hey), through this tree's
agent-egress and through another build of it (the baseline: the code before the change),
taken in turn, round after round, in one run.

    .venv/bin/python bench/bench_audit_cost.py --baseline /path/to/other/checkout [--rounds N]

The baseline is a checkout with its own `.venv` (scripts/bootstrap), e.g. a `git worktree` of
the commit before. Both write their audit log to the same kind of disk (this run's temporary
directory). Needs nginx and hey, as bench_proxy.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import trustme
from bench_proxy import (
    ENV,
    HTTP_NAME,
    TLS_NAME,
    Dns,
    Result,
    Route,
    hey_tunnels,
    start_nginx,
    write_policy,
)
from common import CpuWatch, Service, free_port, machine, table

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 10


def start(binary: Path, directory: Path, policy: Path, dns: Dns) -> tuple[Service, int]:
    directory.mkdir()
    port = free_port()
    command = [str(binary), "run", "--proxy", f"127.0.0.1:{port}", "--dns", "off",
               "--metrics", "off", "--policy", str(policy), "--state-dir", str(directory / "state"),
               "--audit-log", str(directory / "audit.jsonl"), "--upstream-dns",
               f"127.0.0.1:{dns.port}"]
    return Service(directory.name, command, directory / "output.log", ENV), port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, metavar="DIR",
                        help="a checkout of the code to compare with, with its own .venv")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=SECONDS)
    args = parser.parse_args()
    print(f"# bench_audit_cost\n\n{machine()}\n", flush=True)
    builds = {"this tree": ROOT / ".venv" / "bin" / "agent-egress",
              "baseline": args.baseline.resolve() / ".venv" / "bin" / "agent-egress"}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        dns = Dns({HTTP_NAME, TLS_NAME})
        stack.callback(dns.stop)
        nginx, http_port, https_port = start_nginx(work, trustme.CA().issue_cert(TLS_NAME))
        stack.callback(nginx.stop)
        nginx.wait_for_port(https_port)
        policy = write_policy(work, http_port, https_port)
        routes = {}
        for label, binary in builds.items():
            service, port = start(binary, work / label.replace(" ", "-"), policy, dns)
            stack.callback(service.stop)
            service.wait_for_port(port)
            routes[label] = Route(label, service, port, TLS_NAME)
        watch = CpuWatch([nginx.pid] + [r.proxy.pid for r in routes.values() if r.proxy])
        rates: dict[str, list[Result]] = {label: [] for label in routes}
        for route in routes.values():
            hey_tunnels(route, https_port, 2)  # warm up
        for n in range(args.rounds):
            order = list(routes.values()) if n % 2 == 0 else list(routes.values())[::-1]
            for route in order:
                watch.wait_quiet()
                watch.start()
                result = hey_tunnels(route, https_port, args.seconds)
                result.others = watch.stop()
                rates[route.label].append(result)
                print(f"  round {n + 1}, {route.label}: {result.rate:,.0f} tunnels/s, "
                      f"{result.errors} errors, other processes {result.others:.2f} cores",
                      flush=True)
    median = {label: statistics.median(r.rate for r in results)
              for label, results in rates.items()}
    rows = [[label, " / ".join(f"{r.rate:,.0f}" for r in results), f"{median[label]:,.0f}",
             f"{statistics.median(r.p50_ms or 0 for r in results):.1f}",
             f"{statistics.median(r.p99_ms or 0 for r in results):.1f}",
             sum(r.errors for r in results)]
            for label, results in rates.items()]
    print()
    print(table(["build", "tunnels/s, each round", "median", "p50 ms", "p99 ms", "errors"],
                rows))
    ratio = median["this tree"] / median["baseline"]
    print(f"\nthis tree / baseline: {ratio:.3f} ({(ratio - 1) * 100:+.1f} %); target: within "
          f"10 % ({'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
