"""The Prometheus metrics, every name fixed by DESIGN.md. Labels are bounded: account, stage,
decision, direction, signal, result; never a host or an address."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .listeners import exposed_listeners
from .rules import Decision, Policy, Result, Stage

if TYPE_CHECKING:
    from .audit import AuditLog
    from .runtime import PolicyHolder

DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)


class _Tally:
    """One series of a `_LoopFamily`: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class _LoopFamily(Collector):
    """A counter or gauge family for what every proxied request changes, kept as plain numbers
    and read when /metrics is scraped. prometheus_client's own take a lock and check their
    state on every change (about 0.5 µs each, five or six per request); these are changed only
    on the event loop's thread, and the scrape only reads them."""

    def __init__(self, kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str,
                 documentation: str, labelnames: list[str], registry: CollectorRegistry) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], _Tally] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Tally:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            series = self._series[values] = _Tally()
        return series

    def collect(self) -> Iterator[Metric]:
        family = self.kind(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self._series.items()):
            family.add_metric([str(value) for value in values], series.value)
        yield family


class _LoopHistogram(Collector):
    """A histogram without labels, kept like `_LoopFamily` (one observation per decision)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; the last: +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1  # bounds are inclusive ("le")
        self._sum += value

    def collect(self) -> Iterator[Metric]:
        counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=total)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # a `_created` series per counter doubles the series for nothing
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        self._counters: dict[tuple[str, Stage, Result], _Tally] = {}
        self.decisions = _LoopFamily(
            CounterMetricFamily, "agent_egress_decisions",
            "Policy decisions, by account, stage and result", ["account", "stage", "decision"],
            self.registry)
        self.decision_seconds = _LoopHistogram(
            "agent_egress_decision_seconds", "Time the policy engine takes for one decision",
            DECISION_BUCKETS, self.registry)
        self.active_connections = _LoopFamily(
            GaugeMetricFamily, "agent_egress_active_connections",
            "Open proxied connections, by account", ["account"], self.registry)
        self.bytes = _LoopFamily(
            CounterMetricFamily, "agent_egress_bytes", "Bytes proxied, by account and "
            "direction (up: to the destination, down: to the client)", ["account", "direction"],
            self.registry)
        self.dns_suspicious = Counter(
            "agent_egress_dns_suspicious", "DNS queries that look like tunnelling, by signal",
            ["account", "signal"], registry=self.registry)
        self.credentials_injected = Counter(
            "agent_egress_credentials_injected", "Requests the proxy added a credential to, by "
            "account and credential", ["account", "credential"], registry=self.registry)
        self.credential_leaks = Counter(
            "agent_egress_credential_leaks", "Requests denied for carrying a credential's "
            "value, by account and credential", ["account", "credential"],
            registry=self.registry)
        self.build_info = Gauge(
            "agent_egress_build_info", "agent-egress version", ["version"],
            registry=self.registry)
        self.build_info.labels(__version__).set(1)
        ProcessCollector(registry=self.registry)

    def watch(self, policies: PolicyHolder, audit: AuditLog) -> None:
        """Exposes counts that the policy holder and the audit log keep themselves, and gives
        every account its decision series from the start."""
        self.registry.register(_StateCollector(policies, audit))
        self.prepare(policies.current)
        policies.on_change = self.prepare

    def watch_requests(self, counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Exposes agent_egress_access_requests{account,state} from `counts`: the access
        requests opened or answered in the last 24 hours (approvals.py)."""
        self.registry.register(_RequestsCollector(counts))

    def prepare(self, policy: Policy) -> None:
        """Zero series for every account, stage and decision: an alert on `increase()` sees
        an account's first denial, which a series created by that denial would hide."""
        for account in (*policy.accounts(), "none"):
            for stage in Stage:
                for decision in Result:
                    self.decisions.labels(account, stage.value, decision.value)
            for credential in policy.document.credentials:
                self.credential_leaks.labels(account, credential)

    def count(self, decision: Decision, stage: Stage) -> None:
        key = (decision.account, stage, decision.result)
        counter = self._counters.get(key)
        if counter is None:  # the labels' text, worked out once
            counter = self._counters[key] = self.decisions.labels(
                decision.account or "none", stage.value, decision.result.value)
        counter.inc()

    def serve(self, address: tuple[str, int], source: Collector | None = None) -> WSGIServer:
        """Starts the /metrics endpoint serving `source` (default: this registry); raises
        OSError if the address is taken."""
        server, _ = start_http_server(address[1], address[0], registry=source or self.registry)
        return server


class _StateCollector(Collector):
    def __init__(self, policies: PolicyHolder, audit: AuditLog) -> None:
        self.policies = policies
        self.audit = audit

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily("agent_egress_policy_reloads",
                                      "Policy reloads, by result (ok or error)",
                                      labels=["result"])
        reloads.add_metric(["ok"], self.policies.reloads_ok)
        reloads.add_metric(["error"], self.policies.reloads_failed)
        yield reloads
        yield GaugeMetricFamily("agent_egress_policy_loaded_timestamp_seconds",
                                "When the policy in force was loaded",
                                value=self.policies.loaded_at)
        yield CounterMetricFamily("agent_egress_audit_events", "Audit events written",
                                  value=self.audit.events)
        yield CounterMetricFamily("agent_egress_audit_write_errors",
                                  "Audit log writes that failed", value=self.audit.write_errors)
        exposed = GaugeMetricFamily("agent_egress_exposed_listeners",
                                    "Listening TCP sockets of governed accounts on non-loopback "
                                    "addresses", labels=["account"])
        try:
            counts = exposed_listeners(self.policies.current)
        except OSError:
            counts = {}  # no sock_diag here: nothing to report
        for account, count in counts.items():
            exposed.add_metric([account], count)
        yield exposed


REQUEST_STATES = ("pending", "approved", "rejected", "expired")


class _RequestsCollector(Collector):
    def __init__(self, counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("agent_egress_access_requests",
                                   "Access requests of the last 24 hours, by account and state",
                                   labels=["account", "state"])
        counts = self.counts()
        for account in sorted({account for account, _ in counts}):
            for state in REQUEST_STATES:
                family.add_metric([account, state], counts.get((account, state), 0))
        yield family
