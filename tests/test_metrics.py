"""The metrics the proxy keeps as plain numbers (metrics.py) expose exactly what
prometheus_client's own Counter, Gauge and Histogram would for the same changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent_egress.metrics import DECISION_BUCKETS, Metrics

# the bounds themselves (an observation equal to a bound is in that bucket), around them, beyond
VALUES = st.one_of(st.sampled_from(DECISION_BUCKETS),
                   st.sampled_from(DECISION_BUCKETS).map(lambda b: b * 1.000001),
                   st.floats(min_value=0, max_value=1.0), st.just(0.0), st.just(5.0))


def exposition(registry: CollectorRegistry, name: str) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if name in line]


@given(st.lists(VALUES, max_size=40))
def test_decision_seconds_reads_as_prometheus_clients_histogram(values: list[float]) -> None:
    metrics, reference = Metrics(), CollectorRegistry()
    histogram = Histogram("agent_egress_decision_seconds",
                          "Time the policy engine takes for one decision",
                          buckets=DECISION_BUCKETS, registry=reference)
    for value in values:
        metrics.decision_seconds.observe(value)
        histogram.observe(value)
    ours = exposition(metrics.registry, "agent_egress_decision_seconds")
    assert ours == exposition(reference, "agent_egress_decision_seconds")


@given(st.lists(st.tuples(st.sampled_from(["alice", "bob", "none"]),
                          st.sampled_from(["up", "down"]), st.integers(0, 10**9)), max_size=20),
       st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.booleans()), max_size=20))
def test_counters_and_gauges_read_as_prometheus_clients(
        added: list[tuple[str, str, int]], opened: list[tuple[str, bool]]) -> None:
    metrics, reference = Metrics(), CollectorRegistry()
    counter = Counter("agent_egress_bytes", "Bytes proxied, by account and direction (up: to "
                      "the destination, down: to the client)", ["account", "direction"],
                      registry=reference)
    gauge = Gauge("agent_egress_active_connections", "Open proxied connections, by account",
                  ["account"], registry=reference)
    for account, direction, size in added:
        metrics.bytes.labels(account, direction).inc(size)
        counter.labels(account, direction).inc(size)
    for account, opens in opened:
        if opens:
            metrics.active_connections.labels(account).inc()
            gauge.labels(account).inc()
        else:
            metrics.active_connections.labels(account).dec()
            gauge.labels(account).dec()
    for name in ("agent_egress_bytes", "agent_egress_active_connections"):
        assert sorted(exposition(metrics.registry, name)) == sorted(exposition(reference, name))


def test_a_series_with_the_wrong_number_of_labels_is_refused() -> None:
    metrics = Metrics()
    try:
        metrics.bytes.labels("alice")
    except ValueError as e:
        assert "account" in str(e)
    else:
        raise AssertionError("one label for two was taken")
