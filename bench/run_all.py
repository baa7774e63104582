"""Every benchmark, one after another, their tables collected in one results file:

    .venv/bin/python bench/run_all.py [--quick] [--out bench/results.md]

The machine and its load are written at the top: compare figures only within one file."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine

HERE = Path(__file__).resolve().parent
# (script, takes --quick, needs root)
BENCHMARKS = [
    ("bench_rules.py", True, False),
    ("bench_identity.py", True, False),
    ("bench_proxy.py", True, False),
    ("bench_transparent.py", False, True),
    ("bench_dns.py", True, False),
    ("bench_learn.py", True, False),
    ("bench_load.py", True, False),  # its transparent phase alone needs root
    ("bench_reload.py", True, False),
    ("bench_credentials.py", True, False),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    sections = [f"# Benchmark results, {time.strftime('%Y-%m-%d %H:%M %Z')}\n",
                f"{machine()}{', quick runs' if args.quick else ''}.\n"]
    failed = 0
    for script, has_quick, needs_root in BENCHMARKS:
        if needs_root and os.getuid() != 0:
            sections.append(f"## {script}\n\nskipped: needs root\n")
            continue
        command = [sys.executable, str(HERE / script)]
        if args.quick:
            command += ["--quick"] if has_quick else ["--seconds", "3"]
        print(f"bench: {script}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        failed += done.returncode != 0
        output = done.stdout if done.returncode == 0 else (
            f"failed (exit {done.returncode}):\n\n```\n{done.stderr[-3000:]}\n```")
        sections.append(f"## {script}\n\n{output}\n")
    args.out.write_text("\n".join(sections))
    print(f"bench: results in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
