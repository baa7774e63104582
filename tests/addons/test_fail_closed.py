"""A hook that raises must deny: mitmproxy itself would log the error and let the flow go on.
These drive the real addon with mitmproxy's own test flows and a client it never saw connect,
which makes each hook fail on its first look-up."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy.flow import Error
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from agent_egress.addons.enforce import Enforcer
from agent_egress.audit import AuditLog
from agent_egress.gate import Gate
from agent_egress.metrics import Metrics
from agent_egress.runtime import PolicyHolder, Runtime
from agent_egress.upstream import SystemResolver


@pytest.fixture
def enforcer(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    yield Enforcer(Gate(Runtime(PolicyHolder(None), audit, SystemResolver(), None, Metrics())))
    audit.close()


@pytest.mark.parametrize("hook", ["http_connect", "requestheaders"])
def test_a_failing_request_hook_denies(enforcer, hook):
    flow = tflow.tflow()
    asyncio.run(getattr(enforcer, hook)(flow))
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.text == "agent-egress: internal policy error (denied; see the " \
                                 "agent-egress log)\n"


def test_a_failing_server_connect_refuses_the_dial(enforcer):
    data = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(),
                                                 client=tflow.tclient_conn())
    asyncio.run(enforcer.server_connect(data))
    assert data.server.error == "internal policy error (denied; see the agent-egress log)"


def test_a_failing_tcp_start_kills_the_flow(enforcer):
    flow = tflow.ttcpflow()
    asyncio.run(enforcer.tcp_start(flow))
    assert flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE
