"""Access requests in-process: opening and joining, the caps, expiry, ask mode in the gate (held,
approved, timed out, rejected; deny rules and address checks never ask), and the control
server's rules (who reads what, who approves what, what an approval writes, what a malformed
message gets). A clock and a name table stand in for time and DNS; the policy is a real file.
The end-to-end loop with real clients and two Unix accounts is in test_control.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from ipaddress import ip_address
from pathlib import Path

import pytest

from agent_egress.approvals import (
    MAX_HELD_PER_ACCOUNT,
    MAX_OPEN_PER_ACCOUNT,
    Approvals,
    RequestError,
    State,
)
from agent_egress.audit import AuditLog
from agent_egress.auditevent import AuditEvent
from agent_egress.clients import Client
from agent_egress.control import MAX_MESSAGE, Caller, ControlServer, _Refused
from agent_egress.gate import Gate, PendingRequest
from agent_egress.metrics import Metrics
from agent_egress.rules import Decision, Identity, Mode, Result, Stage
from agent_egress.runtime import PolicyHolder, Runtime
from agent_egress.upstream import ResolveError

POLICY = """\
version: 1
accounts:
  agent:
    match:
      uids: [4242]
    mode: ask
    ask_timeout: 2s
    allow:
      # the agent's own rules
      - host: allowed.test
    deny:
      - host: denied.test
  operator:
    match:
      uids: [4343]
    allow: []
"""
NAMES = {"allowed.test": ["192.0.2.10"], "new.test": ["192.0.2.20"],
         "inside.test": ["10.1.2.3"], "denied.test": ["192.0.2.30"]}
AGENT = Identity(uid=4242, user="agent", source=ip_address("127.0.0.1"))


class TableResolver:
    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names

    async def addresses(self, name: str) -> list:  # type: ignore[type-arg]
        if name not in self.names:
            raise ResolveError(f"{name} does not resolve")
        return [ip_address(a) for a in self.names[name]]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gate(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    audit = AuditLog(tmp_path / "audit.jsonl")
    runtime = Runtime(PolicyHolder(policy), audit, TableResolver(NAMES),  # type: ignore[arg-type]
                      None, Metrics())
    gate = Gate(runtime)
    gate.approvals = Approvals()
    yield gate
    gate.close()
    audit.close()


def agent() -> Client:
    return Client("127.0.0.1:50000", AGENT)


def caller(uid: int, groups: frozenset[int] = frozenset()) -> Caller:
    return Caller(pid=1, uid=uid, gid=uid, groups=groups)


def events(gate: Gate) -> list[dict]:  # type: ignore[type-arg]
    gate.runtime.audit.close()
    path = gate.runtime.audit.path
    assert path is not None
    gate.runtime.audit = AuditLog(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


# Requests: open, join, caps, expiry


def test_a_request_is_joined_for_the_same_account_and_destination():
    approvals = Approvals()
    first, new = approvals.open("agent", "new.test", 443, None, "build needs it")
    assert new
    again, new = approvals.open("agent", "new.test", None, None, "still")  # a bare host: 443 too
    assert (again, new) == (first, False)
    assert first.reason == "build needs it; still"
    other, new = approvals.open("agent", "new.test", 8443, None)
    assert new and other is not first
    assert approvals.open("someone", "new.test", 443, None)[1]  # another account: its own


def test_a_reason_is_one_line_whatever_the_requester_sends():
    approvals = Approvals()
    request, _ = approvals.open("agent", "new.test", 443, None,
                                "fine\n# injected: true\r\x1b[31mred" + "x" * 1000)
    assert "\n" not in request.reason and "\x1b" not in request.reason
    assert len(request.reason) <= 300


def test_open_requests_are_capped_per_account():
    approvals = Approvals()
    for n in range(MAX_OPEN_PER_ACCOUNT):
        approvals.open("agent", f"n{n}.test", 443, None)
    with pytest.raises(RequestError, match="open access requests already") as raised:
        approvals.open("agent", "one-more.test", 443, None)
    assert not raised.value.usage
    approvals.open("agent", "n0.test", 443, None)  # joining is not a new one
    approvals.open("another", "one-more.test", 443, None)  # nor is another account's


def test_requests_expire_and_are_then_named_as_expired_not_unknown():
    clock = Clock()
    approvals = Approvals(lifetime=60, clock=clock)
    request, _ = approvals.open("agent", "new.test", 443, None)
    assert approvals.find(request.id) is request
    clock.now += 61
    with pytest.raises(RequestError, match=f"access request {request.id} is expired"):
        approvals.find(request.id)
    assert approvals.counts() == {("agent", "expired"): 1}
    clock.now += 24 * 3600
    assert approvals.counts() == {}
    with pytest.raises(RequestError, match="unknown id"):
        approvals.find(request.id)


def test_denials_are_evidence_of_the_request_that_covers_them():
    approvals = Approvals()
    decision = Decision(Result.DENY, None, "no rule matched for new.test:443", "agent",
                        Mode.ENFORCE, unmatched=True)
    for port in (443, 8443):
        approvals.note_denial(AuditEvent(ts="2026-12-01T00:00:00Z", event=Stage.CONNECT,
                                         account="agent", host="new.test", port=port,
                                         decision=Result.DENY, reason=decision.reason), decision)
    request, _ = approvals.open("agent", "new.test", 443, None)
    assert [a.event.port for a in request.attempts] == [443]
    approvals.note_denial(AuditEvent(ts="2026-12-01T00:00:01Z", event=Stage.DNS,
                                     account="agent", host="new.test", decision=Result.DENY),
                          decision)
    assert len(request.attempts) == 2


# Ask mode in the gate


def test_ask_mode_holds_an_unmatched_connection_until_approved(gate):
    async def scenario():
        held = asyncio.create_task(gate.connection(agent(), "new.test", 443))
        await asyncio.sleep(0.1)
        (request,) = gate.approvals.pending()
        assert request.held == 1 and (request.host, request.port) == ("new.test", 443)
        text = gate.runtime.policies.path.read_text()
        gate.runtime.policies.path.write_text(text.replace(
            "      - host: allowed.test\n",
            "      - host: allowed.test\n      - host: new.test\n"))
        assert await gate.runtime.policies.reload_off_loop()
        gate.approvals.settle(request, State.APPROVED, "operator")
        return await held

    tunnel = asyncio.run(scenario())
    assert tunnel.decision.result is Result.ALLOW and tunnel.decision.approval is not None
    assert str(tunnel.ip) == "192.0.2.20"
    gate.open(agent(), tunnel)
    gate.finish(agent())
    gate.record_connection(agent(), tunnel)
    assert events(gate)[-1]["approval"] == tunnel.decision.approval


def test_ask_mode_holds_an_unmatched_request_until_approved_then_resolves_it(gate):
    """A request in ask mode is not decided at once (Gate.request_now leaves it pending); held
    until approved, it is decided again on the new policy and its name resolved and pinned."""
    client = agent()

    async def scenario():
        pending = gate.request_now(client, "new.test", 80, "GET", "/", "new.test")
        assert isinstance(pending, PendingRequest) and not pending.asked
        held = asyncio.create_task(gate.request_later(pending))
        await asyncio.sleep(0.1)
        (request,) = gate.approvals.pending()
        approve_new_test(gate)
        assert await gate.runtime.policies.reload_off_loop()
        gate.approvals.settle(request, State.APPROVED, "operator")
        return await held

    decision, _, ip, unresolved = asyncio.run(scenario())
    assert decision.result is Result.ALLOW and decision.approval is not None
    assert str(ip) == "192.0.2.20" and not unresolved
    assert client.pinned == {("new.test", 80): ip}
    gate.runtime.audit.release(client.promised)


def approve_new_test(gate: Gate) -> None:
    """The rule `approve` writes, in short."""
    path = gate.runtime.policies.path
    assert path is not None
    path.write_text(path.read_text().replace("      - host: allowed.test\n",
                                             "      - host: allowed.test\n"
                                             "      - host: new.test\n"))


@pytest.mark.parametrize("original, passes", [("192.0.2.20", True), ("192.0.2.99", False)])
def test_a_held_transparent_connection_is_checked_against_its_original_address(
        gate, original, passes):
    """Approved, a transparent connection is decided again with its SNI checked against
    where the client dialled, as any other."""
    async def scenario():
        held = asyncio.create_task(gate.connection(agent(), "new.test", 443,
                                                   original=ip_address(original)))
        await asyncio.sleep(0.1)
        (request,) = gate.approvals.pending()
        approve_new_test(gate)
        assert await gate.runtime.policies.reload_off_loop()
        gate.approvals.settle(request, State.APPROVED, "operator")
        return await held

    tunnel = asyncio.run(scenario())
    assert tunnel.decision.passes is passes
    if not passes:
        assert "does not resolve to 192.0.2.99" in tunnel.decision.reason


def test_ask_mode_denies_after_the_timeout_saying_a_request_is_pending(gate):
    tunnel = asyncio.run(gate.connection(agent(), "new.test", 443))
    assert tunnel.decision.result is Result.DENY
    (request,) = gate.approvals.pending()
    assert f"access request {request.id} is pending (waited 2s" in tunnel.decision.reason
    assert f"agent-egress approve {request.id}" in (tunnel.decision.hint or "")


def test_a_rejection_reaches_the_held_connection_with_its_reason(gate):
    async def scenario():
        held = asyncio.create_task(gate.connection(agent(), "new.test", 443))
        await asyncio.sleep(0.1)
        (request,) = gate.approvals.pending()
        gate.approvals.settle(request, State.REJECTED, "operator", "not for this project")
        return await held

    decision = asyncio.run(scenario()).decision
    assert decision.result is Result.DENY
    assert "was rejected by operator: not for this project" in decision.reason


@pytest.mark.parametrize("host, port, why", [
    ("denied.test", 443, "denied by rule"),  # an explicit deny rule
    ("10.1.2.3", 443, "needs a cidr rule"),  # an address, not a name
])
def test_deny_rules_and_address_checks_never_ask(gate, host, port, why):
    tunnel = asyncio.run(gate.connection(agent(), host, port))
    assert tunnel.decision.result is Result.DENY and why in tunnel.decision.reason
    assert gate.approvals.pending() == []


def test_held_connections_are_capped_per_account(gate):
    async def scenario():
        held = [asyncio.create_task(gate.connection(agent(), "new.test", 443))
                for _ in range(MAX_HELD_PER_ACCOUNT)]
        await asyncio.sleep(0.1)
        refused = await gate.connection(agent(), "new.test", 443)
        for task in held:
            task.cancel()
        return refused

    decision = asyncio.run(scenario()).decision
    assert decision.result is Result.DENY
    assert f"{MAX_HELD_PER_ACCOUNT} connections of account agent wait" in decision.reason


def test_without_a_control_socket_ask_mode_denies_at_once(gate):
    gate.approvals = None
    decision = asyncio.run(gate.connection(agent(), "new.test", 443)).decision
    assert decision.result is Result.DENY and "nobody can be asked" in decision.reason


def test_a_dns_query_in_ask_mode_opens_the_request_at_once(gate):
    decision = gate.decide(gate.policy, AGENT, "new.test", None, Stage.DNS)
    assert decision.unmatched
    answered = gate.ask_later(decision, "new.test")
    (request,) = gate.approvals.pending()
    assert f"access request {request.id} is pending" in answered.reason
    assert request.port is None  # a name: ports 80 and 443 when approved


# The control server's rules


@pytest.fixture
def control(gate, tmp_path):
    return ControlServer(tmp_path / "control.sock", gate, gate.approvals, operators=None)


def test_a_governed_account_reads_only_its_own_denials(gate, control):
    tunnel = asyncio.run(gate.connection(agent(), "denied.test", 443))
    gate.open(agent(), tunnel)
    mine = asyncio.run(control.why(caller(4242), {}))
    assert [d["host"] for d in mine["denials"]] == ["denied.test"]
    assert mine["denials"][0]["request"] is None  # a deny rule: a request cannot change it
    assert asyncio.run(control.why(caller(4343), {}))["denials"] == []
    nobody = asyncio.run(control.why(caller(5555), {}))
    assert nobody["denials"] == [] and "no account the policy governs" in nobody["note"]


def test_why_gives_the_request_line_for_an_unmatched_denial(gate, control):
    gate.approvals = control.approvals = Approvals()
    gate.approvals = None  # enforce-like: denied at once
    tunnel = asyncio.run(gate.connection(agent(), "new.test", 8443))
    gate.approvals = control.approvals
    gate.open(agent(), tunnel)
    (entry,) = asyncio.run(control.why(caller(4242), {}))["denials"]
    assert entry["request"] == "agent-egress request new.test:8443 --reason 'WHY YOU NEED IT'"


def test_only_operators_see_and_answer_requests(gate, control):
    request, _ = gate.approvals.open("agent", "new.test", 443, None)
    for op in (control.pending, control.approve, control.reject):
        with pytest.raises(_Refused, match="only an operator"):
            asyncio.run(op(caller(4242), {"id": request.id}))
    control.operators, control.operators_gid = "ops", 777
    assert asyncio.run(control.pending(caller(5555, frozenset({777})), {}))["requests"]
    assert asyncio.run(control.pending(Caller(1, 5555, 777, frozenset()), {}))["requests"]


def test_nobody_approves_their_own_accounts_request(gate, control):
    request, _ = gate.approvals.open("agent", "new.test", 443, None)
    control.operators, control.operators_gid = "ops", 777
    with pytest.raises(_Refused, match="nobody approves a request of their own account"):
        asyncio.run(control.approve(caller(4242, frozenset({777})), {"id": request.id}))
    assert request.state is State.PENDING


def test_an_approval_writes_the_rule_with_its_comment_and_reloads(gate, control):
    request, _ = gate.approvals.open("agent", "new.test", 443, None, "docs\nbuild",
                                     requester="agent")
    answer = asyncio.run(control.approve(caller(0), {"id": request.id, "for": "10m"}))
    text = gate.runtime.policies.path.read_text()
    assert "      # the agent's own rules\n" in text  # comments kept
    assert f"(request {request.id}): docs build\n      - host: new.test\n" \
           f"        ports: [443]\n        expires: '{answer['until']}'\n" in text
    assert "# approved by root at " in text
    assert request.state is State.APPROVED
    assert gate.decide(gate.policy, AGENT, "new.test", 443, Stage.CONNECT).passes


@pytest.mark.parametrize("host, port, flagged", [
    ("inside.test", 443, "resolves to 10.1.2.3, which is private"),
    ("192.0.2.99", 443, "is an address, not a name"),
    ("aGVsbG8gd29ybGQgdGhpcyBpcyBlbmNvZGVk.new.test", 443, "looks like encoded data"),
])
def test_an_approval_refuses_what_learn_would_flag_unless_told(gate, control, host, port,
                                                               flagged):
    request, _ = gate.approvals.open("agent", host, port, None)
    before = gate.runtime.policies.path.read_text()
    with pytest.raises(_Refused, match=flagged):
        asyncio.run(control.approve(caller(0), {"id": request.id}))
    assert gate.runtime.policies.path.read_text() == before
    asyncio.run(control.approve(caller(0), {"id": request.id, "allow_dangerous": True}))
    assert request.state is State.APPROVED


def test_a_request_for_a_denied_destination_is_refused(gate, control):
    with pytest.raises(_Refused, match="denied by rule: host denied.test"):
        asyncio.run(control.request(caller(4242), {"target": "denied.test"}))
    allowed = asyncio.run(control.request(caller(4242), {"target": "allowed.test:443"}))
    assert allowed["allowed"]
    with pytest.raises(_Refused, match="not a URL|invalid label|expected a URL"):
        asyncio.run(control.request(caller(4242), {"target": "foo bar"}))


def test_malformed_and_oversized_messages_get_an_error_and_the_server_goes_on(gate, control):
    async def scenario():
        await control.start()
        assert os.stat(control.path).st_mode & 0o777 == 0o666
        answers = []
        for message in (b"not json\n", b"[1, 2]\n", b'{"op": "nope"}\n',
                        b"x" * (MAX_MESSAGE + 10) + b"\n", b"\xff\xfe\n",
                        b'{"op": "pending"}\n'):
            reader, writer = await asyncio.open_unix_connection(str(control.path))
            writer.write(message)
            await writer.drain()
            answers.append(json.loads(await reader.readline()))
            writer.close()
        await control.stop()
        return answers

    answers = asyncio.run(scenario())
    assert [a["ok"] for a in answers] == [False] * 5 + [True]  # the test runs as root
    assert answers[3]["error"] == f"message longer than {MAX_MESSAGE} bytes"
    assert all(a["usage"] for a in answers[:5])


def test_a_stale_socket_is_replaced_and_a_live_one_refused(gate, control, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(control.path))
    stale.close()  # the file stays, nobody listens

    async def scenario():
        await control.start()
        other = ControlServer(control.path, gate, gate.approvals)
        with pytest.raises(Exception, match="another agent-egress listens"):
            await other.start()
        await control.stop()
        assert not control.path.exists()

    asyncio.run(scenario())
