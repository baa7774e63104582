"""Load, the short version (bench/bench_load.py is the long one): 500 clients hold their
connections to the explicit proxy at once, then send allowed and denied requests over plain HTTP
and through TLS tunnels; and a burst of DNS queries. Nothing the policy allows fails, everything
it denies is denied, and each request has exactly one audit event."""

from __future__ import annotations

import os
import re
import resource
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import dnsserver
from support.load import DENIED, FAILED, OK, Plan, dns_burst, dns_names, match_audit, run_elsewhere
from support.origins import Origin
from support.origins import TestCA as CertificateAuthority
from support.proxy import RunningProxy

# Lower than the 500 clients need: the proxy must raise it to the hard limit itself.
LOW_NOFILE = 256
WORKERS = {"http": 200, "tunnel": 200, "http-denied": 50, "tunnel-denied": 50}
DNS_QUERIES = 3000


@pytest.fixture(scope="module")
def wildcard_dns() -> Iterator[dnsserver.TestDNS]:
    names = ["web.test", "*.secure.test", "*.ok.test"]
    server = dnsserver.TestDNS(dnsserver.Zone({name: ["127.0.0.1"] for name in names}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    """HTTPS for any name under secure.test: every tunnel goes to a new name."""
    ca = CertificateAuthority(tmp_path_factory.mktemp("load-ca"), ["*.secure.test"])
    origin = Origin(tls=ca.server_context())
    yield origin
    origin.stop()


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE of a process."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
    assert found, limits
    return int(found.group(1)), int(found.group(2))


def test_500_concurrent_clients_and_a_dns_burst_each_served_or_denied_and_audited_once(
        cli, tmp_path, web, tls_origin, wildcard_dns):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    policy = f"""version: 1
accounts:
  load:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
      - host: "*.secure.test"
        ports: [{tls_origin.port}]
      - host: "*.ok.test"
      - cidr: 127.0.0.1/32
        ports: [{web.port}, {tls_origin.port}]
"""
    proxy = RunningProxy(cli, tmp_path, policy, "--upstream-dns", wildcard_dns.address,
                         prefix=("prlimit", f"--nofile={LOW_NOFILE}:{hard}", "--"))
    try:
        pid = proxy.process.pid
        assert open_files(pid) == (hard, hard)
        plan = Plan(run="loadtest", proxy=("127.0.0.1", proxy.port),
                    http=("127.0.0.1", web.port), https=("127.0.0.1", tls_origin.port),
                    workers=WORKERS, requests=2, gate_pid=pid)
        load = run_elsewhere(plan)
        assert load.connected == 500
        assert load.held_fds >= load.idle_fds + 500  # the proxy held them all at once
        outcomes = load.outcomes + dns_burst(("127.0.0.1", proxy.dns_port),
                                             dns_names(plan.run, DNS_QUERIES))
        assert [o for o in outcomes if o.result == FAILED] == []
        results = Counter((o.kind, o.result) for o in outcomes)
        assert results == {("http", OK): 400, ("tunnel", OK): 400, ("http-denied", DENIED): 100,
                           ("tunnel-denied", DENIED): 100, ("dns", OK): DNS_QUERIES * 3 // 4,
                           ("dns-denied", DENIED): DNS_QUERIES // 4}
        # Tunnels are recorded when they close, and events are written by a thread: wait for
        # them all, then stop the proxy so that anything else it would write is written too.
        deadline = time.monotonic() + 30
        while (match_audit(outcomes, proxy.events(), plan.run).matched < len(outcomes) and
               time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        proxy.stop()
    matching = match_audit(outcomes, proxy.events(), plan.run)
    assert (matching.missing, matching.duplicated, matching.wrong_decision,
            matching.unexpected) == ([], [], [], [])
    assert matching.matched == len(outcomes) == 2 * sum(WORKERS.values()) + DNS_QUERIES
