"""Benchmark of credentials: what the tripwire's scan costs per request, and what injection
costs a running proxy.

    .venv/bin/python bench/bench_credentials.py [--quick] [--scan-only]

1. The scan the proxy runs on every visible request when credentials are configured
   (`Secrets.carried`): a request head (target and headers, about 600 bytes) and the first
   64 KiB of a body that carries no secret (the worst case: every needle is looked for in all
   of it), with 1 and 10 credentials, for a body without and with `%` (which adds a
   percent-decoded pass), and the percent-decoding alone against urllib's.
2. Inspected HTTPS keep-alive GETs through one `agent-egress run` (32 connections, hey, nginx
   as the origin, as bench_proxy.py's scenario (e)): to a host whose rule inspects, and to one
   whose rule also injects a credential, the two taken in turn five times (three with
   --quick), medians compared: what injection costs, with the tripwire on in both. Beside
   requests/s, the proxy's own CPU time per request: on a machine that other work shares, the
   figure that other work disturbs least (the proxy is one process on one core, so its
   requests/s when saturated is the inverse of it).
Prints markdown tables; see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import unquote_to_bytes

import trustme
from bench_proxy import (
    INJECT_NAME,
    INSPECT_NAME,
    TLS_NAME,
    Dns,
    Route,
    hey_inspected,
    start_agent_egress,
    start_nginx,
    write_credential_policy,
)
from common import CpuWatch, machine, table

from agent_egress.credentials import SCANNED_BODY, Secret, Secrets, needles, percent_decoded
from agent_egress.rules import Credential


def secrets(count: int) -> Secrets:
    loaded = {}
    for i in range(count):
        value = os.urandom(20).hex()
        credential = Credential(f"c{i}", "bench:1", ("bench", 1, 1), env="X")
        loaded[credential.name] = Secret(credential, f"Bearer {value}", value,
                                         needles(value.encode()))
    return Secrets(loaded)


def per_call(function, seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(20):
            function()
        calls += 20
    return elapsed / calls


def scan(seconds: float) -> None:
    head = [b"/v1/items?page=2&sort=name", b"",
            b"\n".join(b"X-Header-%d: %s" % (i, os.urandom(12).hex().encode())
                       for i in range(16))]
    body = (os.urandom(SCANNED_BODY // 2).hex().encode())[:SCANNED_BODY]
    encoded = body.replace(b"a", b"%61")[:SCANNED_BODY]
    print("| credentials | request head | 64 KiB body | 64 KiB body with `%` |")
    print("|---:|---:|---:|---:|")
    for count in (1, 10):
        loaded = secrets(count)
        assert loaded.carried([body]) is None
        row = [per_call(lambda s=loaded: s.carried(head), seconds),
               per_call(lambda s=loaded: s.carried([body]), seconds),
               per_call(lambda s=loaded: s.carried([encoded]), seconds)]
        print(f"| {count} | " + " | ".join(f"{t * 1e6:,.1f} µs" for t in row) + " |")
    assert percent_decoded(encoded) == unquote_to_bytes(encoded)
    print(f"\npercent-decoding the 64 KiB body with `%` (about 3,800 escapes): "
          f"{per_call(lambda: percent_decoded(encoded), seconds) * 1e6:,.1f} µs, "
          f"urllib.parse.unquote_to_bytes "
          f"{per_call(lambda: unquote_to_bytes(encoded), seconds) * 1e6:,.1f} µs\n")


def injection(rounds: int, seconds: int) -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-cred-") as tmp:
        work = Path(tmp)
        dns = Dns({INSPECT_NAME, INJECT_NAME})
        stack.callback(dns.stop)
        ca = trustme.CA()
        ca_file = work / "origin-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        nginx, _, https_port = start_nginx(work, ca.issue_cert(TLS_NAME, INSPECT_NAME,
                                                               INJECT_NAME))
        stack.callback(nginx.stop)
        proxy, port = start_agent_egress(work / "agent-egress", write_credential_policy(
            work, https_port), dns, None, "--upstream-ca", str(ca_file))
        stack.callback(proxy.stop)
        nginx.wait_for_port(https_port)
        proxy.wait_for_port(port)
        routes = {"inspected": Route("inspected", proxy, port, INSPECT_NAME),
                  "inspected, credential injected": Route("injected", proxy, port,
                                                          INJECT_NAME)}
        watch = CpuWatch([nginx.pid, proxy.pid])
        for route in routes.values():
            hey_inspected(route, https_port, 1)  # warm-up
        rates: dict[str, list[float]] = {label: [] for label in routes}
        cpu: dict[str, list[float]] = {label: [] for label in routes}  # µs per request
        others: dict[str, list[float]] = {label: [] for label in routes}
        errors = dict.fromkeys(routes, 0)
        for _ in range(rounds):
            for label, route in routes.items():
                watch.wait_quiet()
                watch.start()
                before = _cpu_seconds(proxy.pid)
                result = hey_inspected(route, https_port, seconds)
                used = _cpu_seconds(proxy.pid) - before
                others[label].append(watch.stop())
                rates[label].append(result.rate)
                cpu[label].append(used / max(1.0, result.rate * seconds) * 1e6)
                errors[label] += result.errors
        rate = {label: statistics.median(values) for label, values in rates.items()}
        per = {label: statistics.median(values) for label, values in cpu.items()}
        print(table(["32 connections, keep-alive", "req/s (median)", "each round",
                     "proxy CPU µs/request (median)", "each round", "errors",
                     "others' CPU (max)"],
                    [[label, f"{rate[label]:,.0f}", ", ".join(f"{r:,.0f}" for r in rates[label]),
                      f"{per[label]:,.0f}", ", ".join(f"{c:,.0f}" for c in cpu[label]),
                      errors[label], f"{max(others[label]):.2f}"] for label in routes]))
        by_rate = 1 - rate["inspected, credential injected"] / rate["inspected"]
        by_cpu = 1 - per["inspected"] / per["inspected, credential injected"]
        met = "met" if by_cpu <= 0.10 and not any(errors.values()) else "NOT met"
        print(f"\ninjection costs {by_cpu:.1%} of the requests/s one proxy core serves "
              f"(CPU per request), {by_rate:.1%} by measured requests/s; target at most 10% "
              f"{met}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scan-only", action="store_true")
    args = parser.parse_args()
    print(f"# bench_credentials\n\n{machine()}\n")
    scan(0.3 if args.quick else 2.0)
    if not args.scan_only:
        injection(3 if args.quick else 5, 3 if args.quick else 10)


if __name__ == "__main__":
    main()
