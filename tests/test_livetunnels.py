"""Open tunnels decided again (agent_egress/livetunnels.py), in-process: a reload that withdraws
a tunnel's rule, or its `expires` passing, closes it with an event saying why; nothing else
does. The end-to-end tests with real clients are in tests/test_record.py."""

from __future__ import annotations

import asyncio
import json
import time
from ipaddress import ip_address
from pathlib import Path

import pytest
from test_gate import NAMES, TableResolver

from agent_egress.audit import AuditLog
from agent_egress.clients import Client
from agent_egress.gate import Gate
from agent_egress.metrics import Metrics
from agent_egress.rules import Identity
from agent_egress.runtime import PolicyHolder, Runtime

SOON = time.time() + 3600
POLICY = f"""\
version: 1
accounts:
  agent:
    match:
      uids: [4242]
    allow:
      - host: allowed.test
        ports: [443]
      - host: api.test
        ports: [443]
        expires: {time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(SOON))}
"""


@pytest.fixture
def gate(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    audit = AuditLog(tmp_path / "audit.jsonl")
    runtime = Runtime(PolicyHolder(policy), audit, TableResolver(NAMES),  # type: ignore[arg-type]
                      None, Metrics())
    gate = Gate(runtime)
    yield gate
    gate.close()
    gate.runtime.audit.close()


def events(gate: Gate) -> list[dict]:  # type: ignore[type-arg]
    gate.runtime.audit.close()
    path = gate.runtime.audit.path
    assert path is not None
    gate.runtime.audit = AuditLog(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def opened(gate: Gate, host: str) -> tuple[Client, list[str]]:
    client = Client("127.0.0.1:50000", Identity(uid=4242, source=ip_address("127.0.0.1")))
    tunnel = asyncio.run(gate.connection(client, host, 443))
    closed: list[str] = []
    tunnel.closer = lambda: closed.append(host)
    gate.open(client, tunnel)
    return client, closed


def test_a_reload_that_withdraws_the_rule_closes_the_tunnel_with_an_event(gate):
    client, closed = opened(gate, "allowed.test")
    _, kept = opened(gate, "api.test")
    gate.live.recheck()
    assert closed == kept == []
    gate.runtime.policies.path.write_text(POLICY.replace("host: allowed.test",
                                                         "host: other.test"))
    assert gate.runtime.policies.reload()
    gate.live.recheck()
    assert (closed, kept) == (["allowed.test"], [])
    gate.finish(client)  # the adapter's close ends in finish: no second event
    [event] = events(gate)
    assert (event["host"], event["decision"]) == ("allowed.test", "deny")
    assert event["reason"].startswith("closed while open, as the policy changed (now "
                                      f"{gate.policy.digest}): no rule matched for "
                                      "allowed.test:443")
    assert event["rule"].endswith(":7") and event["rule_id"].startswith("r-")


def test_an_expiry_closes_what_its_rule_allowed_and_only_that(gate):
    _, closed = opened(gate, "api.test")
    _, kept = opened(gate, "allowed.test")
    gate.live.recheck(now=SOON - 1)
    assert closed == []
    gate.live.recheck(now=SOON + 1)
    assert (closed, kept) == (["api.test"], [])
    [event] = events(gate)
    assert event["reason"].startswith("closed while open, as rule ")
    assert " expired: no rule matched for api.test:443 (rule " in event["reason"]


def test_a_failing_audit_log_does_not_end_what_was_decided(gate):
    _, closed = opened(gate, "allowed.test")
    gate.runtime.audit.failing = True
    gate.runtime.policies.path.write_text(POLICY + "\n# touched\n")
    assert gate.runtime.policies.reload()
    gate.live.recheck()
    assert closed == []
