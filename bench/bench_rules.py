"""Benchmark of the policy engine: decisions per second on one core, and policy load time.

    .venv/bin/python bench/bench_rules.py [--quick]

Generates policies with 10, 1,000 and 100,000 allow rules for one account (exact hosts,
`*.parent` wildcards, cidr rules, rules with methods and paths, one expiring rule, a few deny
rules) and prints markdown tables. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent_egress.rules import Policy, Query, Result, Stage, normalize_host, parse_policy

ACCOUNT = "bench"
SIZES = (10, 1_000, 100_000)
KINDS = ("exact", "wildcard", "no-match", "cidr", "request", "spelling")
EXPECTED = {kind: Result.DENY if kind == "no-match" else Result.ALLOW for kind in KINDS}
CACHE_SIZE = normalize_host.cache_info().maxsize or 0
# Half the kinds of query can have a new host every time whatever the policy, so this many
# queries cycle through more distinct hosts than the cache holds: those always miss it.
COLD_QUERIES = 196_608  # 3 x the cache's earlier size, 12 x its size now
WARM_UP_SECONDS = 0.1


@dataclass(frozen=True)
class Settings:
    reps: int  # repetitions of the short measurements (warm decisions); medians are reported
    long_reps: int  # repetitions of the long ones (loading, cold decisions)
    warm_hosts: int  # queries cycled for the warm figures (their hosts fit in the host cache)
    warm_passes: int  # passes over them per repetition


FULL = Settings(reps=7, long_reps=3, warm_hosts=10_000, warm_passes=3)
QUICK = Settings(reps=1, long_reps=1, warm_hosts=3_000, warm_passes=1)


@dataclass(frozen=True)
class Shape:
    """How many allow rules of each kind a generated policy has."""

    exact: int
    wildcard: int
    cidr: int
    inspected: int  # with methods and paths

    @classmethod
    def of(cls, total: int) -> Shape:
        wildcard = max(1, total // 5)
        cidr = max(1, total * 9 // 100)
        inspected = max(1, total // 100)
        return cls(total - wildcard - cidr - inspected, wildcard, cidr, inspected)


# Names are under the reserved .test TLD, addresses in the benchmarking range 198.18.0.0/15.

def exact_host(i: int) -> str:
    return f"svc-{i}.team-{i % 100}.corp.test"


def wildcard_parent(i: int) -> str:
    return f"zone-{i}.corp.test"


def inspected_host(i: int) -> str:
    return f"api-{i}.corp.test"


def cidr_network(i: int) -> tuple[int, int]:
    """Every fourth cidr rule is a /28 in 198.19.0.0/16, the others /32s in 198.18.0.0/16."""
    if i % 4 == 0:
        return (198 << 24) | (19 << 16) | ((i // 4) << 4), 28
    return (198 << 24) | (18 << 16) | (i - i // 4 - 1), 32


def dotted(value: int) -> str:
    return ".".join(str(value >> shift & 255) for shift in (24, 16, 8, 0))


def policy_yaml(shape: Shape) -> bytes:
    lines = ["version: 1", "accounts:", f"  {ACCOUNT}:", "    match:",
             f"      unix_users: [{ACCOUNT}]", "    allow:",
             f"      - host: {exact_host(0)}", "        ports: [443]",
             "        expires: 2099-01-01T00:00:00Z"]
    for i in range(1, shape.exact):
        lines += [f"      - host: {exact_host(i)}", "        ports: [443]"]
    for i in range(shape.wildcard):
        lines.append(f'      - host: "*.{wildcard_parent(i)}"')
    for i in range(shape.cidr):
        address, length = cidr_network(i)
        lines += [f"      - cidr: {dotted(address)}/{length}", "        ports: [5432]"]
    for i in range(shape.inspected):
        lines += [f"      - host: {inspected_host(i)}", "        ports: [443]",
                  "        methods: [GET, HEAD]", '        paths: ["/v1/*"]']
    lines += ["    deny:", f"      - host: blocked.{wildcard_parent(0)}",
              f'      - host: "*.private.{wildcard_parent(0)}"',
              "      - cidr: 198.18.255.255/32"]
    return ("\n".join(lines) + "\n").encode()


def make_query(kind: str, i: int, shape: Shape) -> Query:
    """The i-th query of a kind; hosts are distinct in i as far as the rules allow."""
    if kind == "exact":
        return Query(ACCOUNT, exact_host(i % shape.exact), 443, Stage.CONNECT)
    if kind == "wildcard":
        below = ("", "a.", "b.a.")[i % 3]  # one to three labels below the parent
        return Query(ACCOUNT, f"h{i}.{below}{wildcard_parent(i % shape.wildcard)}", 443,
                     Stage.CONNECT)
    if kind == "no-match":
        return Query(ACCOUNT, f"unknown-{i}.team-{i % 100}.corp.test", 443, Stage.CONNECT)
    if kind == "cidr":
        address, length = cidr_network(i % shape.cidr)
        offset = (i // shape.cidr) % (1 << (32 - length))
        return Query(ACCOUNT, dotted(address + offset), 5432, Stage.CONNECT)
    if kind == "request":
        return Query(ACCOUNT, inspected_host(i % shape.inspected), 443, Stage.REQUEST,
                     method="GET", path=f"/v1/items/{i}?page=2")
    # spelling: an exact host in mixed case (as DNS 0x20 sends it), every other one with a
    # trailing dot
    host = exact_host(i % shape.exact)
    case = random.Random(i).getrandbits(len(host))
    spelled = "".join(c.upper() if case >> k & 1 else c for k, c in enumerate(host))
    return Query(ACCOUNT, spelled + "." * (i % 2), 443, Stage.CONNECT)


def queries(kinds: Sequence[str], count: int, shape: Shape) -> list[Query]:
    """`count` queries taking the kinds in turn."""
    return [make_query(kinds[i % len(kinds)], i // len(kinds), shape) for i in range(count)]


def timed[T](action: Callable[[], T], reps: int) -> tuple[float, T]:
    """The median time of `reps` calls, and what the last call returned."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        result = action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def decisions_per_second(policy: Policy, batch: list[Query], passes: int, reps: int) -> float:
    decide = policy.decide

    def run() -> None:
        for _ in range(passes):
            for query in batch:
                decide(query)

    return passes * len(batch) / timed(run, reps)[0]


def warm_up(policy: Policy, batch: list[Query]) -> None:
    """Fills the host cache and lets the interpreter and the CPU settle before timing."""
    deadline = time.perf_counter() + WARM_UP_SECONDS
    while time.perf_counter() < deadline:
        decisions_per_second(policy, batch, 1, 1)


def check(policy: Policy, shape: Shape) -> None:
    """Every kind of query gets the decision it is meant to, so the figures time real work."""
    for kind in KINDS:
        for query in queries([kind], 30, shape):
            result = policy.decide(query).result
            if result is not EXPECTED[kind]:
                raise SystemExit(f"{kind}: {query} was decided {result}, not {EXPECTED[kind]}")


@dataclass(frozen=True)
class Row:
    rules: int
    file_bytes: int
    parse_s: float
    index_s: float
    warm: float
    cold: float
    cold_hit_rate: float
    by_kind: dict[str, float]


def measure(total: int, settings: Settings) -> Row:
    shape = Shape.of(total)
    data = policy_yaml(shape)
    parse_s, document = timed(lambda: parse_policy(data, "bench.yaml"), settings.long_reps)
    index_s, policy = timed(lambda: Policy(document), settings.long_reps)
    check(policy, shape)

    warm = queries(KINDS, settings.warm_hosts, shape)
    warm_up(policy, warm)
    warm_rate = decisions_per_second(policy, warm, settings.warm_passes, settings.reps)
    by_kind = {}
    for kind in KINDS:
        batch = queries([kind], settings.warm_hosts // len(KINDS), shape)
        warm_up(policy, batch)
        by_kind[kind] = decisions_per_second(policy, batch, settings.warm_passes, settings.reps)

    cold = queries(KINDS, COLD_QUERIES, shape)
    before = normalize_host.cache_info()
    cold_rate = decisions_per_second(policy, cold, 1, settings.long_reps)
    after = normalize_host.cache_info()
    hits, misses = after.hits - before.hits, after.misses - before.misses
    return Row(total, len(data), parse_s, index_s, warm_rate, cold_rate, hits / (hits + misses),
               by_kind)


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} cores (pinned to core {sorted(os.sched_getaffinity(0))[0]}"
            f"), {platform.python_implementation()} {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, load average {os.getloadavg()[0]:.2f}")


def report(rows: list[Row]) -> str:
    out = ["| allow rules | file size | parse | index build | warm decisions/s "
           "| cold decisions/s | cold cache hits |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.rules:,} | {r.file_bytes / 1024:,.0f} KiB | {r.parse_s * 1000:,.1f} ms "
                   f"| {r.index_s * 1000:,.1f} ms | {r.warm:,.0f} | {r.cold:,.0f} "
                   f"| {r.cold_hit_rate:.0%} |")
    out += ["", "Warm decisions/s by kind of query:", "",
            "| query | " + " | ".join(f"{r.rules:,} rules" for r in rows) + " |",
            "|---|" + "---:|" * len(rows)]
    for kind in KINDS:
        out.append(f"| {kind} | " + " | ".join(f"{r.by_kind[kind]:,.0f}" for r in rows) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one repetition and fewer queries: a smoke run, not a measurement")
    settings = QUICK if parser.parse_args().quick else FULL
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"{time.strftime('%Y-%m-%d')}, {machine()}\n")
    print(report([measure(total, settings) for total in SIZES]))


if __name__ == "__main__":
    main()
