"""Benchmark of `agent-egress learn` and `agent-egress replay` over large audit logs.

    .venv/bin/python bench/bench_learn.py [--quick]

Generates 1,000,000 audit events (100,000 with --quick) as JSON lines the way
agent_egress/audit.py writes them, then runs `agent-egress learn --policy P LOG` and
`agent-egress replay --policy P2 LOG` as child processes pinned to one core, over the first
100,000 lines (10,000 with --quick) and over all of them: wall time and the child's peak RSS
(GNU time's %M). Memory should depend on the number of distinct destinations, which is nearly
the same in both logs (1,877 and 1,965 denied account-host pairs), not on the number of events.

The events: five accounts (three enforced, two in learning mode, one of them the default
account), about 45 % DNS queries, 35 % CONNECTs and 20 % inspected requests, over a week. Most
go to allowed destinations (source control, package registries, 200 package mirrors, an API
with method and path rules); the rest to 300 internal names the policy does not know, a
denied host, encoded-looking names under one parent, and addresses given literally, which are
denied (or would be, in learning mode). P is the policy the events were recorded under; the
candidate P2 for replay drops one account's mirror rule and adds a rule for part of the
internal names, so that replay finds changes both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import machine, table

from agent_egress.auditevent import KEYS

ROOT = Path(__file__).resolve().parents[1]
AGENT_EGRESS = ROOT / ".venv" / "bin" / "agent-egress"
CORE = "0"
GNU_TIME = Path("/usr/bin/time")
TARGET_SECONDS = 10.0
DIGEST = "3f9a1c0d5e7b2a64"

ACCOUNTS = [  # name, uid, mode
    ("codex", 1001, "enforce"),
    ("claude", 1002, "learn"),
    ("aider", 1003, "enforce"),
    ("ci-runner", 1004, "enforce"),
    ("default", None, "learn"),
]
GITHUB = ["github.com", "api.github.com", "codeload.github.com",
          "objects.githubusercontent.com", "raw.githubusercontent.com"]
REGISTRIES = ["pypi.mirror.test", "files.mirror.test", "npm.mirror.test"]
MIRRORS = [f"pkg{i}.mirror.example.test" for i in range(200)]
API = "api.example.test"
INTERNAL = [f"svc{i}.team{i % 30}.corp.test" for i in range(300)]
ENCODED = [f"{random.Random(i).getrandbits(160):040x}.t.exfil.test" for i in range(50)]
LITERALS = [f"198.51.100.{i}" for i in range(1, 40)]
EXES = ["/usr/bin/git", "/usr/bin/curl", "/usr/bin/python3.12", "/usr/bin/node",
        "/usr/local/bin/codex", "/usr/bin/pip"]


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    reps: int


FULL = Settings((100_000, 1_000_000), 3)
QUICK = Settings((10_000, 100_000), 1)


def policy_text(candidate: bool) -> tuple[str, dict[tuple[str, str], int]]:
    """The policy and, per (account, rule key), the line of that rule."""
    lines = ["version: 1", "accounts:"]
    where: dict[tuple[str, str], int] = {}

    def rule(account: str, key: str, *text: str) -> None:
        where[(account, key)] = len(lines) + 1
        lines.extend(text)

    for name, uid, mode in ACCOUNTS:
        lines.append(f"  {name}:")
        if uid is not None:
            lines.append(f"    match: {{uids: [{uid}]}}")
        lines += [f"    mode: {mode}", "    allow:"]
        rule(name, "github", "      - preset: github", "        access: read-only")
        for host in REGISTRIES:
            rule(name, host, f"      - host: {host}", "        ports: [443]")
        if not (candidate and name == "aider"):
            rule(name, "mirror", '      - host: "*.mirror.example.test"', "        ports: [443]")
        rule(name, API, f"      - host: {API}", "        ports: [443]",
             "        methods: [GET, HEAD]", '        paths: ["/v1/*"]')
        if candidate and name == "codex":
            rule(name, "team1", '      - host: "*.team1.corp.test"', "        ports: [443]")
        lines.append("    deny:")
        rule(name, "deny", "      - host: gist.github.com")
    return "\n".join(lines) + "\n", where


def events(count: int, policy_path: str, where: dict[tuple[str, str], int],
           seed: int = 1) -> Iterator[str]:
    """`count` audit lines, as AuditLog writes them."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 18, tzinfo=UTC)
    step = timedelta(days=7) / max(count, 1)
    for i in range(count):
        name, uid, mode = ACCOUNTS[min(int(rng.paretovariate(1.2)) - 1, len(ACCOUNTS) - 1)]
        kind = rng.random()
        event = "dns" if kind < 0.45 else "connect" if kind < 0.80 else "request"
        pick = rng.random()
        if event == "request":
            host, key = (API, API) if pick < 0.7 else (rng.choice(GITHUB[:2]), "github")
        elif pick < 0.30:
            host, key = rng.choice(GITHUB), "github"
        elif pick < 0.50:
            host = rng.choice(REGISTRIES)
            key = host
        elif pick < 0.75:
            host, key = rng.choice(MIRRORS), "mirror"
        elif pick < 0.78:
            host, key = API, API
        elif pick < 0.95:
            host, key = rng.choice(INTERNAL), ""
        elif pick < 0.96:
            host, key = "gist.github.com", "deny"
        elif pick < 0.98:
            host, key = rng.choice(ENCODED), ""
        else:
            host, key = rng.choice(LITERALS), ""
        port = None if event == "dns" else 443
        method = path = qtype = None
        if event == "request":
            method = "GET" if rng.random() < 0.9 else "POST"
            path = f"/v1/items/{rng.randrange(500)}" if host == API else \
                f"/{rng.choice(['torvalds', 'python', 'nodejs'])}/repo.git/info/refs"
        if event == "dns":
            qtype = "A" if rng.random() < 0.6 else "AAAA"
        denied = "deny" if mode == "enforce" else "would_deny"
        line = where.get((name, key))
        if key == "deny":
            decision, rule = "deny", f"{policy_path}:{line}"
            reason = "denied by rule: host gist.github.com"
        elif line is not None and not (event == "request" and method == "POST"):
            decision, rule = "allow", f"{policy_path}:{line}"
            reason = f"allowed by rule: host {host}"
        elif host in LITERALS:
            decision, rule = denied, None
            reason = (f"{host} is an address given literally; only a cidr rule can allow it")
        else:
            decision, rule = denied, None
            target = f"{host}:{port}" if port else host
            reason = f"no rule matched for {target}"
            if event == "request":
                reason += f" {method} {path}"
                if line is not None:
                    reason += f" (rule {policy_path}:{line} allows only methods GET, HEAD)"
        record = {
            "ts": (start + step * i).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event, "account": name, "client": f"127.0.0.1:{rng.randrange(32768, 61000)}",
            "uid": uid, "user": name if uid is not None else None,
            "pid": None if event == "dns" else rng.randrange(1000, 400000),
            "exe": None if event == "dns" else rng.choice(EXES),
            "cmdline": None, "host": host, "port": port,
            "ip": None if event == "dns" else f"203.0.113.{rng.randrange(1, 255)}",
            "method": method, "path": path, "qtype": qtype, "decision": decision,
            "rule": rule, "reason": reason, "mode": mode, "policy": DIGEST,
            "bytes_up": None if event == "dns" else rng.randrange(200, 20000),
            "bytes_down": None if event == "dns" else rng.randrange(500, 2_000_000),
            "duration_ms": round(rng.uniform(0.01, 900), 3)}
        assert tuple(record) == KEYS
        yield json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


@dataclass
class Timing:
    seconds: float
    max_rss_mib: float
    output: str


def run(command: Sequence[str], out: Path) -> Timing:
    """Wall time and peak RSS of a child pinned to one core. The peak RSS comes from GNU time,
    whose own child is small when it execs the command: the kernel keeps a process's peak
    across exec, so a child forked from this (large) process would report this one's size."""
    pinned = ["taskset", "-c", CORE, *command] if (os.cpu_count() or 1) >= 2 else list(command)
    rss_file = out.with_suffix(".rss")
    if GNU_TIME.exists():
        pinned = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *pinned]
    with open(out, "w") as f:
        started = time.perf_counter()
        child = subprocess.Popen(pinned, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    text = out.read_text()
    if child.returncode not in (0, 1):  # replay exits 1 when something is newly denied
        raise RuntimeError(f"{' '.join(command)} exited {child.returncode}:\n{text[-2000:]}")
    kib = int(rss_file.read_text().split()[-1]) if GNU_TIME.exists() else usage.ru_maxrss
    return Timing(seconds, kib / 1024, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller logs, one repetition")
    settings = QUICK if parser.parse_args().quick else FULL
    print(f"# bench_learn\n\n{machine()}; pinned to core {CORE}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-learn-") as tmp:
        work = Path(tmp)
        recorded, where = policy_text(candidate=False)
        policy = work / "policy.yaml"
        policy.write_text(recorded)
        candidate = work / "candidate.yaml"
        candidate.write_text(policy_text(candidate=True)[0])
        empty = work / "empty.jsonl"
        empty.write_text("")
        biggest = max(settings.sizes)
        logs = {size: work / f"audit-{size}.jsonl" for size in settings.sizes}
        started = time.perf_counter()
        with open(logs[biggest], "w") as f:
            for n, line in enumerate(events(biggest, str(policy), where)):
                f.write(line)
                if n + 1 in logs and n + 1 != biggest:
                    f.flush()
                    logs[n + 1].write_bytes(logs[biggest].read_bytes())
        print(f"generated {biggest:,} events ({logs[biggest].stat().st_size / 2**20:,.0f} MiB) "
              f"in {time.perf_counter() - started:.1f} s\n", flush=True)

        commands = {
            "learn": lambda log: [str(AGENT_EGRESS), "learn", "--policy", str(policy), str(log)],
            "replay": lambda log: [str(AGENT_EGRESS), "replay", "--policy", str(candidate),
                                   str(log)],
        }
        rows = []
        outputs: dict[str, str] = {}
        for what, command in commands.items():
            base = run(command(empty), work / "out.txt")
            rows.append([f"`{what}`, empty log (start-up)", "0", f"{base.seconds:.2f}", "",
                         f"{base.max_rss_mib:,.0f}"])
            for size in settings.sizes:
                timings = [run(command(logs[size]), work / "out.txt")
                           for _ in range(settings.reps)]
                seconds = statistics.median(t.seconds for t in timings)
                rss = max(t.max_rss_mib for t in timings)
                rows.append([f"`{what}`", f"{size:,}", f"{seconds:.2f}",
                             f"{size / seconds:,.0f}", f"{rss:,.0f}"])
                outputs[f"{what} {size}"] = timings[-1].output
                print(f"  {what} {size:,}: {seconds:.2f} s, {rss:,.0f} MiB", flush=True)
    print()
    print(table(["command", "events", "seconds", "events/s", "peak RSS MiB"], rows))
    for key, text in outputs.items():
        tail = text.strip().splitlines()
        print(f"\n{key}: {len(tail)} lines of output; last: {tail[-1] if tail else ''}")
    big = [r for r in rows if r[1] == f"{max(settings.sizes):,}"]
    met = all(float(r[2]) < TARGET_SECONDS for r in big)
    print(f"\nTarget ({max(settings.sizes):,} events in < {TARGET_SECONDS:g} s each): "
          f"{'met' if met else 'not met'}. Load average at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
