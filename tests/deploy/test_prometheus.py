"""The Prometheus rules and scrape configuration in deploy/prometheus: promtool checks them and
runs their unit tests, every alert is tested firing and quiet, the rules use only metrics that
DESIGN.md names, agent-egress exposes those metrics with bounded labels, and a real Prometheus
scraping a running agent-egress fires the denial alert once the proxy and the resolver deny."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.prometheus import (
    DEPLOY,
    METRICS,
    PROMETHEUS_METRICS,
    alert_rules,
    api,
    firing,
    get,
    load,
    metric_names,
    wait_for,
)
from support.proxy import RunningProxy

UID = os.getuid()

LABEL_VALUES = {
    "stage": {"dns", "connect", "request"},
    "decision": {"allow", "deny", "would_deny"},
    "direction": {"up", "down"},
    "result": {"ok", "error"},
    "state": {"pending", "approved", "rejected", "expired"},
}
FORBIDDEN_LABELS = {"host", "ip", "client", "address", "destination", "path", "url"}
SEVERITIES = {"critical", "warning", "info"}


def unknown_metrics(document: Any) -> set[str]:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules(document)))
    return used - METRICS.keys() - PROMETHEUS_METRICS


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed; scripts/bootstrap --test installs it"
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=DEPLOY)


def test_promtool_accepts_the_rules(promtool):
    done = run(promtool, "check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules(load('alerts.yml')))} rules found" in done.stdout


def test_promtool_accepts_the_example_configuration(promtool):
    done = run(promtool, "check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    config = load("prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "agent-egress"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]


def test_alert_unit_tests_pass(promtool):
    done = run(promtool, "test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet():
    alerts = {rule["alert"] for rule in alert_rules(load("alerts.yml"))}
    cases = [case for test in load("alerts_test.yml")["tests"]
             for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - firing == set(), "alerts without a test case where they fire"
    assert alerts - quiet == set(), "alerts without a test case where they stay quiet"
    assert (firing | quiet) - alerts == set(), "test cases for alerts that do not exist"


def test_every_alert_has_a_severity_and_says_what_to_do():
    for rule in alert_rules(load("alerts.yml")):
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert "`agent-egress " in rule["annotations"]["description"], rule["alert"]


def test_metric_names_are_read_from_expressions():
    expr = ('sum by (account, stage) (rate(agent_egress_x_total{decision="deny", a=~"b.c"}[5m]))'
            ' > 0.2 unless on (job) agent_egress_y offset 10m or up{job="a"} == bool 0 and z')
    assert metric_names(expr) == {"agent_egress_x_total", "agent_egress_y", "up", "z"}


def test_rules_use_only_metrics_that_design_names():
    rules = load("alerts.yml")
    assert unknown_metrics(rules) == set()
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules(rules)))
    assert {"agent_egress_decisions_total", "agent_egress_dns_suspicious_total", "up"} <= used
    rules["groups"][0]["rules"][0]["expr"] = "increase(agent_egress_denials_total[5m]) > 0"
    assert unknown_metrics(rules) == {"agent_egress_denials_total"}


def test_unit_tests_feed_only_metrics_that_design_names():
    names = {series["series"].split("{")[0].strip()
             for test in load("alerts_test.yml")["tests"] for series in test["input_series"]}
    assert names - METRICS.keys() - PROMETHEUS_METRICS == set()


# agent-egress and Prometheus running


def policy(web_port: int) -> str:
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - host: web.test
        ports: [{web_port}]
      - cidr: 127.0.0.1/32
        ports: [{web_port}]
    deny:
      - host: denied.test
"""


@pytest.fixture
def agent_egress(cli, tmp_path, dns, web) -> Iterator[RunningProxy]:
    (tmp_path / "agent-egress").mkdir()
    running = RunningProxy(cli, tmp_path / "agent-egress", policy(web.port),
                           "--upstream-dns", dns.address, "--control",
                           str(tmp_path / "control.sock"))
    yield running
    running.stop()


def curl(proxy: RunningProxy, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy.url, url],
                          capture_output=True, text=True, timeout=30)


def dig(proxy: RunningProxy, name: str) -> str:
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(proxy.dns_port), "+time=5",
                           "+tries=1", name], capture_output=True, text=True, timeout=30).stdout


def deny_at_every_stage(proxy: RunningProxy, port: int) -> None:
    assert "denied by rule: host denied.test" in curl(proxy, f"http://denied.test:{port}/").stdout
    assert "response 403" in curl(proxy, f"https://other.test:{port}/").stderr  # CONNECT
    assert "status: NXDOMAIN" in dig(proxy, "other.test")


def scrape(proxy: RunningProxy) -> dict[str, list[Any]]:
    """Families by their exposed name (counters with `_total`), each with its samples."""
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(get(proxy.metrics_url)):
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family.samples
    return families


def test_metrics_are_exposed_with_bounded_labels(cli, agent_egress, web):
    assert curl(agent_egress, f"http://web.test:{web.port}/").stdout.startswith("hello")
    asked = subprocess.run([cli, "request", f"asked.test:{web.port}", "--control",
                            str(agent_egress.directory.parent / "control.sock")],
                           capture_output=True, text=True, timeout=30)
    assert asked.returncode == 0, asked.stderr
    deny_at_every_stage(agent_egress, web.port)
    assert "status: NXDOMAIN" in dig(agent_egress, "a" * 45 + ".other.test")  # long_label

    def counted() -> dict[str, list[Any]] | None:
        families = scrape(agent_egress)
        wanted = ("agent_egress_decisions_total", "agent_egress_bytes_total",
                  "agent_egress_dns_suspicious_total")
        return families if all(families.get(name) for name in wanted) else None

    families = wait_for("decisions, bytes and a DNS signal on /metrics", counted, timeout=15)
    assert METRICS.keys() <= families.keys()
    assert {(s.labels["state"], s.value) for s in families["agent_egress_access_requests"]} == {
        ("pending", 1), ("approved", 0), ("rejected", 0), ("expired", 0)}
    for name, labels in METRICS.items():
        for sample in families[name]:
            bucket = sample.name.endswith("_bucket")
            assert set(sample.labels) == labels | ({"le"} if bucket else set()), sample
    for sample in (s for samples in families.values() for s in samples):
        assert not FORBIDDEN_LABELS & sample.labels.keys(), sample
        for label, values in LABEL_VALUES.items():
            assert sample.labels.get(label, "") in values | {""}, sample
        assert sample.labels.get("account", "tester") in ("tester", "none"), sample
    decisions = {(s.labels["stage"], s.labels["decision"])
                 for s in families["agent_egress_decisions_total"] if s.value > 0}
    zero_series = {(s.labels["account"], s.labels["stage"], s.labels["decision"])
                   for s in families["agent_egress_decisions_total"]}
    assert ("tester", "dns", "would_deny") in zero_series  # there before the first one
    assert {("dns", "deny"), ("connect", "deny"), ("request", "deny"),
            ("request", "allow")} <= decisions
    signals = {s.labels["signal"] for s in families["agent_egress_dns_suspicious_total"]}
    assert "long_label" in signals


def test_prometheus_scrapes_agent_egress_and_fires_the_denial_alert(agent_egress, web,
                                                                   start_prometheus):
    target = urlsplit(agent_egress.metrics_url).netloc
    prometheus, process = start_prometheus(target)
    wait_for("the first scrape", lambda: api(prometheus, "query", query="up == 1")["result"],
             log=process.log)
    assert not firing(prometheus, "AgentEgressDenied")
    deny_at_every_stage(agent_egress, web.port)
    (alert,) = wait_for("AgentEgressDenied to fire",
                        lambda: firing(prometheus, "AgentEgressDenied"), log=process.log)
    assert alert["labels"] == {"alertname": "AgentEgressDenied", "severity": "warning",
                               "job": "agent-egress", "instance": target, "account": "tester"}
    assert "--account tester" in alert["annotations"]["description"]

    def denied_stages() -> set[str]:
        result = api(prometheus, "query", query='agent_egress_decisions_total{decision="deny"}')
        stages = {series["metric"]["stage"] for series in result["result"]}
        return stages if stages >= {"dns", "connect", "request"} else set()

    assert wait_for("denials at every stage in Prometheus", denied_stages, timeout=10)
    agent_egress.stop()
    (down,) = wait_for("AgentEgressDown to fire", lambda: firing(prometheus, "AgentEgressDown"),
                       timeout=30, log=process.log)
    assert down["labels"]["instance"] == target
