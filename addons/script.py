"""agent-egress inside a mitmproxy you already run:

    mitmdump -s "$(python -c 'import agent_egress.addons.script as s; print(s.__file__)')" \\
        --set agent_egress_policy=policy.yaml --set connection_strategy=lazy

Options: agent_egress_policy (required), agent_egress_audit_log (default: standard output),
agent_egress_upstream_dns (DNS servers; default: the system's resolver). mitmproxy reloads a
script whose file changes, and runs without it if the new version fails to load: keep this
file read-only, or use `agent-egress run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx, exceptions

from agent_egress.addons.enforce import Enforcer
from agent_egress.audit import AuditLog
from agent_egress.gate import Gate
from agent_egress.identity import SocketOwners
from agent_egress.metrics import Metrics
from agent_egress.rules import PolicyError
from agent_egress.runtime import PolicyHolder, Runtime
from agent_egress.upstream import DnsServers, SystemResolver, parse_server


class StandaloneEnforcer(Enforcer):
    def load(self, loader: object) -> None:
        add = loader.add_option  # type: ignore[attr-defined]
        add("agent_egress_policy", str, "", "agent-egress policy file (required)")
        add("agent_egress_audit_log", str, "", "audit log file (default: standard output)")
        add("agent_egress_upstream_dns", Sequence[str], [],
            "DNS servers, ADDR[:PORT] (default: the system's resolver)")
        add("agent_egress_metrics", int, 0,
            "serve Prometheus metrics on this loopback port (default: off)")

    def configure(self, updated: set[str]) -> None:
        if not updated & {"agent_egress_policy", "agent_egress_audit_log",
                          "agent_egress_upstream_dns", "agent_egress_metrics"}:
            return
        options = ctx.options
        if not options.agent_egress_policy:
            raise exceptions.OptionsError("agent-egress: set agent_egress_policy=FILE")
        try:
            policies = PolicyHolder(Path(options.agent_egress_policy))
            servers = [parse_server(s) for s in options.agent_egress_upstream_dns]
        except (PolicyError, ValueError) as e:
            raise exceptions.OptionsError(f"agent-egress: {e}") from None
        previous = getattr(self, "gate", None)
        if previous is not None:
            previous.close()
            previous.runtime.audit.close()
        audit_path = options.agent_egress_audit_log
        audit = AuditLog(Path(audit_path) if audit_path else None)
        metrics = Metrics()
        metrics.watch(policies, audit)
        if options.agent_egress_metrics:
            try:
                metrics.serve(("127.0.0.1", options.agent_egress_metrics))
            except OSError as e:
                raise exceptions.OptionsError(f"agent-egress: metrics: {e.strerror}") from None
        self.gate = Gate(Runtime(policies, audit,
                                 DnsServers(servers) if servers else SystemResolver(),
                                 SocketOwners(), metrics))

    def done(self) -> None:
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.close()
            gate.runtime.audit.close()


addons = [StandaloneEnforcer()]
