"""The gate in-process: each check that refines a decision, the refusal while the audit log
fails, the one event per decision. The real addon is driven with mitmproxy's own test helpers
(`taddons`, `tflow`); a name server is a table here, and the audit log a real file. These run in
milliseconds; the end-to-end tests with real clients are beside them."""

from __future__ import annotations

import asyncio
import errno
import json
import ssl
from ipaddress import ip_address
from pathlib import Path

import pytest
from mitmproxy import tls
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.test import taddons, tflow
from mitmproxy.tls import ClientHello

from agent_egress import auditspace
from agent_egress.addons.enforce import Enforcer
from agent_egress.audit import AuditLog
from agent_egress.auditspace import LINE_PROMISE
from agent_egress.clients import Client
from agent_egress.gate import UNRECORDED, Gate, PendingRequest
from agent_egress.metrics import Metrics
from agent_egress.rules import Identity, Result, Stage
from agent_egress.runtime import PolicyHolder, Runtime
from agent_egress.upstream import ResolveError

POLICY = """\
version: 1
accounts:
  agent:
    match:
      uids: [4242]
    allow:
      - host: allowed.test
        ports: [443, 80]
      - host: api.test
        ports: [443]
        paths: ["/v1/*"]
      - host: shared.test
        ports: [22]
      - host: rebound.test
        ports: [443]
      - cidr: 192.0.2.0/24
        ports: [22]
    deny:
      - host: denied.test
"""

NAMES = {
    "allowed.test": ["192.0.2.10"],
    "api.test": ["192.0.2.11"],
    "rebound.test": ["127.0.0.1"],
    "shared.test": ["192.0.2.12"],
}
AGENT = Identity(uid=4242, user="agent", source=ip_address("127.0.0.1"))


class TableResolver:
    """Names resolved from a table: what the gate asks a name server, and nothing else."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = {name: list(addresses) for name, addresses in names.items()}
        self.asked: list[str] = []

    async def addresses(self, name: str) -> list:  # type: ignore[type-arg]
        self.asked.append(name)
        if name not in self.names:
            raise ResolveError(f"{name} does not resolve")
        return [ip_address(a) for a in self.names[name]]


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
    audit.close()


def events(gate: Gate) -> list[dict]:  # type: ignore[type-arg]
    gate.runtime.audit.close()  # drains the queue
    path = gate.runtime.audit.path
    assert path is not None
    gate.runtime.audit = AuditLog(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def agent() -> Client:
    return Client("127.0.0.1:50000", AGENT)


def test_an_allowed_connection_is_pinned_to_the_checked_address(gate):
    tunnel = asyncio.run(gate.connection(agent(), "allowed.test", 443))
    assert tunnel.decision.result is Result.ALLOW
    assert str(tunnel.ip) == "192.0.2.10"


def test_a_name_rebound_to_loopback_is_refused(gate):
    tunnel = asyncio.run(gate.connection(agent(), "rebound.test", 443))
    assert tunnel.decision.result is Result.DENY and tunnel.ip is None
    assert "loopback" in tunnel.decision.reason


def test_unresolvable_allowed_name_gives_an_unresolved_denial(gate):
    gate.runtime.resolver = TableResolver({})
    tunnel = asyncio.run(gate.connection(agent(), "allowed.test", 443))
    assert tunnel.unresolved and not tunnel.decision.passes
    assert tunnel.decision.rule is not None  # the rule that allowed it is kept


def test_transparent_sni_must_resolve_to_where_the_client_connected(gate):
    client = agent()
    tunnel = asyncio.run(gate.connection(client, "allowed.test", 443,
                                         original=ip_address("192.0.2.99")))
    assert not tunnel.decision.passes
    assert "does not resolve to 192.0.2.99" in tunnel.decision.reason


def test_a_kept_alive_name_keeps_its_checked_address(gate):
    """A second request to the same name on one client connection is decided on the address
    its upstream connection already goes to, not on a new answer."""
    client = agent()
    first = asyncio.run(gate.request(client, "allowed.test", 80, "GET", "/", "allowed.test"))
    gate.runtime.resolver.names["allowed.test"] = ["192.0.2.77"]
    second = asyncio.run(gate.request(client, "allowed.test", 80, "GET", "/", "allowed.test"))
    assert first[2] == second[2] == ip_address("192.0.2.10")


def test_a_request_to_a_pinned_name_is_decided_without_waiting(gate):
    """The first request to a name waits for its resolution (request_later); the next ones on
    the connection are decided to the end at once, as `request` decides them."""
    client = agent()
    first = gate.request_now(client, "allowed.test", 80, "GET", "/", "allowed.test")
    assert isinstance(first, PendingRequest)
    decided = asyncio.run(gate.request_later(first))
    again = gate.request_now(client, "allowed.test", 80, "GET", "/", "allowed.test")
    assert again == decided == asyncio.run(
        gate.request(client, "allowed.test", 80, "GET", "/", "allowed.test"))
    assert again[0].passes and again[2] == ip_address("192.0.2.10")
    gate.runtime.audit.release(client.promised)


def test_the_checks_kept_for_a_connection_follow_each_requests_spelling(gate):
    """The Host header and target checks are kept for the last spelling a connection sent:
    another spelling on the same connection is checked anew."""
    client = agent()
    asyncio.run(gate.request(client, "allowed.test", 80, "GET", "/", "allowed.test"))
    for header, authority, passes in [("allowed.test", "allowed.test", True),
                                      ("evil.test", "allowed.test", False),
                                      ("allowed.test", "allowed.test", True),
                                      ("allowed.test", "evil.test", False),
                                      ("allowed.test:81", "allowed.test", False),
                                      ("allowed.test", "allowed.test", True)]:
        decision, *_ = gate.request_now(client, "allowed.test", 80, "GET", "/", header,
                                        authority)
        assert decision.passes is passes, (header, authority)


@pytest.mark.parametrize("header, refused", [
    ("allowed.test", False),
    ("ALLOWED.test.", False),
    ("allowed.test:80", False),
    ("evil.test", True),
    ("allowed.test:80\r\n evil.test", True),
    ("allowed.test@evil.test", True),
])
def test_the_host_header_must_name_the_destination(gate, header, refused):
    decision, *_ = asyncio.run(gate.request(agent(), "allowed.test", 80, "GET", "/", header))
    assert decision.passes is not refused
    if refused:
        assert "Host header" in decision.reason


def test_nothing_passes_while_the_audit_log_fails(gate):
    gate.runtime.audit.failing = True
    decision = gate.decide(gate.policy, AGENT, "allowed.test", 443, Stage.CONNECT)
    assert decision.result is Result.DENY and decision.reason == UNRECORDED
    for stage in (Stage.DNS, Stage.REQUEST):
        assert gate.decide(gate.policy, AGENT, "allowed.test", 443, stage).reason == UNRECORDED
    gate.runtime.on_audit_failure = "allow"
    assert gate.decide(gate.policy, AGENT, "allowed.test", 443, Stage.CONNECT).passes


def test_an_unknown_client_is_denied_with_the_reason(gate):
    stranger = Identity(uid=1, user="someone", source=ip_address("127.0.0.1"))
    decision = gate.decide(gate.policy, stranger, "allowed.test", 443, Stage.CONNECT)
    assert decision.result is Result.DENY and decision.account == ""


def test_raw_tcp_needs_a_name_the_resolver_gave(gate):
    client = agent()
    address = ip_address("192.0.2.12")
    refused = gate.raw_tcp(client, address, 22)
    assert not refused.decision.passes and "for no allowed name" in refused.decision.reason
    gate.runtime.memory.remember("agent", "shared.test", address, 60)
    allowed = gate.raw_tcp(client, address, 22)
    assert allowed.decision.passes and allowed.ip == address


def test_each_decision_is_recorded_once_with_its_reason(gate):
    client = agent()
    tunnel = gate.open(client, asyncio.run(gate.connection(client, "denied.test", 443)))
    gate.finish(client)
    allowed = gate.open(client, asyncio.run(gate.connection(client, "allowed.test", 443)))
    allowed.bytes_up, allowed.bytes_down = 10, 20
    gate.finish(client)
    (denied, passed) = events(gate)
    assert denied["decision"] == "deny" and denied["reason"] == tunnel.decision.reason
    assert denied["host"] == "denied.test" and denied["bytes_up"] is None
    assert passed["decision"] == "allow" and (passed["bytes_up"], passed["bytes_down"]) == (10, 20)
    assert passed["ip"] == "192.0.2.10" and passed["uid"] == 4242


def test_the_addon_refuses_an_sni_that_is_not_the_connect_host(gate):
    """The real addon with mitmproxy's test flows: CONNECT allowed.test, then a ClientHello
    naming another host."""
    enforcer = Enforcer(gate)
    with taddons.context(enforcer) as tctx:
        flow = tflow.tflow()
        flow.request.method, flow.request.host, flow.request.port = "CONNECT", "allowed.test", 443
        client = Client("127.0.0.1:50000", AGENT)
        enforcer.clients[flow.client_conn.id] = client
        asyncio.run(enforcer.http_connect(flow))
        assert flow.response is None and client.tunnel is not None
        context = Context(flow.client_conn, tctx.options)
        data = tls.ClientHelloData(context, _hello("evil.test"))
        asyncio.run(enforcer.tls_clienthello(data))
        assert data.ignore_connection and "does not match the CONNECT host" in str(
            context.server.error)
    assert client.tunnel.decision.result is Result.DENY


def _hello(sni: str) -> ClientHello:
    """The ClientHello Python's own TLS client sends for `sni`."""
    outgoing = ssl.MemoryBIO()
    tls_client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing,
                                                       server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls_client.do_handshake()
    hello = parse_client_hello(outgoing.read())
    assert hello is not None and hello.sni == sni
    return hello


def test_no_traffic_without_room_for_its_line(gate, monkeypatch):
    """A connection is let through only once the audit log has promised room for the line it
    writes when it closes; the lines of those let through are written whatever the disk
    does meanwhile."""
    path = gate.runtime.audit.path
    gate.runtime.audit.close()
    gate.runtime.audit = AuditLog(path, slack=3 * LINE_PROMISE)

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(auditspace, "fallocate_keep_size", no_room)  # the disk fills
    clients = [Client(f"127.0.0.1:{50000 + i}", AGENT) for i in range(4)]
    tunnels = [gate.open(c, asyncio.run(gate.connection(c, "allowed.test", 443)))
               for c in clients]
    assert [t.decision.passes for t in tunnels] == [True, True, True, False]
    assert tunnels[3].decision.reason == UNRECORDED
    request = asyncio.run(gate.request(agent(), "allowed.test", 80, "GET", "/", "allowed.test"))
    assert request[0].reason == UNRECORDED
    for client in clients:
        gate.finish(client)
    allowed = [e for e in events(gate) if e["decision"] == "allow"]
    assert [e["client"] for e in allowed] == [c.address for c in clients[:3]]
