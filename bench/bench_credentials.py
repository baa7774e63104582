"""Benchmark of the credential tripwire: what scanning one request costs.

    .venv/bin/python bench/bench_credentials.py [--quick]

The scan the proxy runs on every visible request when credentials are configured
(`Secrets.carried`): a request head (target and headers, about 600 bytes) and the first 64 KiB
of a body that carries no secret (the worst case: every needle is looked for in all of it),
with 1 and 10 credentials, for a body without and with `%` (which adds a percent-decoded
pass). Prints a markdown table; see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import time

from agent_egress.credentials import SCANNED_BODY, Secret, Secrets, needles
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    seconds = 0.3 if parser.parse_args().quick else 2.0
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


if __name__ == "__main__":
    main()
