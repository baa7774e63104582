"""deploy/grafana/agent-egress.json: the dashboard is well formed, uses only metrics DESIGN.md
names, and every panel's PromQL query returns data from a real Prometheus scraping a live
agent-egress after traffic — except panels over metrics that agent-egress does not expose yet,
which must return data as soon as it does."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from dnslib import DNSRecord
from support.prometheus import (
    METRICS,
    PROMETHEUS_METRICS,
    api,
    exposed_metrics,
    metric_names,
    wait_for,
)
from support.proxy import RunningProxy

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "agent-egress.json"
# Metrics DESIGN.md names that agent-egress does not expose yet, and the issue building each. A
# panel over them may return nothing while they are missing from /metrics, and must return data
# once they are there.
PLANNED = {
    "agent_egress_credential_leaks_total": "issue 15: credential injection and tripwires",
    "agent_egress_credentials_injected_total": "issue 15: credential injection and tripwires",
}
# What Grafana puts in for its own variables, as it would for a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1m", "$instance": ".*",
                     "$account": ".*"}
# Panels that must show more than zeros after the traffic below.
NONZERO = {"Decisions by account and stage", "Top denials by account and stage",
           "DNS tunnelling signals", "Audit events written", "Traffic by account", "Up"}


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def panels(document: Any) -> list[dict[str, Any]]:
    """Every panel with queries, rows' nested panels included."""
    found = []
    for panel in document["panels"]:
        found += [panel] if panel["type"] != "row" else []
        found += panel.get("panels", [])
    return found


def query_of(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda v: -len(v[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def known(name: str) -> bool:
    base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
    return name in METRICS or base in METRICS or name in PLANNED or name in PROMETHEUS_METRICS


def test_dashboard_is_well_formed():
    document = dashboard()
    assert document["uid"] == "agent-egress" and document["title"] == "agent-egress"
    every = [*document["panels"], *(p for row in document["panels"] for p in row.get("panels", []))]
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in panels(document)]
    assert len(titles) == len(set(titles))
    variables = {v["name"] for v in document["templating"]["list"]}
    assert variables == {"datasource", "instance", "account"}
    cells: set[tuple[int, int]] = set()
    for panel in every:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in panels(document):
        assert panel["description"].strip(), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            names = metric_names(target["expr"])
            assert names and all(known(name) for name in names), (panel["title"], names)


def test_the_panels_cover_what_operators_watch():
    used = {name for panel in panels(dashboard()) for target in panel["targets"]
            for name in metric_names(target["expr"])}
    assert {"agent_egress_decisions_total", "agent_egress_audit_write_errors_total",
            "agent_egress_policy_reloads_total", "agent_egress_dns_suspicious_total",
            "agent_egress_access_requests", "agent_egress_credential_leaks_total"} <= used


def test_unknown_variables_and_metrics_are_refused():
    with pytest.raises(AssertionError):
        query_of('rate(agent_egress_decisions_total{job=~"$job"}[5m])')
    assert not known("agent_egress_denials_total")
    assert known("agent_egress_decision_seconds_bucket") and known("up")


@pytest.fixture
def agent_egress(cli, tmp_path, dns, web) -> Iterator[RunningProxy]:
    (tmp_path / "agent-egress").mkdir()
    running = RunningProxy(cli, tmp_path / "agent-egress", f"""version: 1
credentials:
  web-token:
    env: DASHBOARD_WEB_TOKEN
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{web.port}]
        credential: web-token
      - cidr: 127.0.0.1/32  # where web.test is
        ports: [{web.port}]
    deny:
      - host: denied.test
""", "--upstream-dns", dns.address, "--control", str(tmp_path / "control.sock"),
                           env={"DASHBOARD_WEB_TOKEN": TOKEN})
    # an access request, so that the access-request panels have a series
    asked = subprocess.run([cli, "request", f"asked.test:{web.port}", "--control",
                            str(tmp_path / "control.sock")], capture_output=True, text=True,
                           timeout=30)
    assert asked.returncode == 0, asked.stderr
    yield running
    running.stop()


TOKEN = "dashboard-token-0123456789"


def traffic(proxy: RunningProxy, web_port: int, round: int) -> None:
    """Allowed and denied traffic at every stage (web.test gets the credential injected), a
    request carrying the credential itself (the tripwire), and a DNS tunnelling signal."""
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-x", proxy.url,
                    "-H", f"X-Copied: {TOKEN}", f"http://web.test:{web_port}/leak"],
                   capture_output=True, timeout=20)
    for url in (f"http://web.test:{web_port}/", f"http://denied.test:{web_port}/"):
        subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-x", proxy.url,
                        url], capture_output=True, timeout=20)
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-x", proxy.url,
                    f"https://other.test:{web_port}/"], capture_output=True, timeout=20)
    for name in ("other.test", f"{'a' * 45}{round}.other.test"):
        DNSRecord.question(name).send("127.0.0.1", proxy.dns_port, timeout=5)


def values(prometheus: str, expr: str) -> list[float]:
    result = api(prometheus, "query", query=query_of(expr))["result"]
    return [float(series["value"][1]) for series in result]


def test_every_panel_shows_data_from_a_live_proxy(agent_egress, web, start_prometheus):
    target = urlsplit(agent_egress.metrics_url).netloc
    prometheus, process = start_prometheus(target)
    wait_for("the first scrape", lambda: api(prometheus, "query", query="up == 1")["result"],
             timeout=20, log=process.log)
    # Series that the traffic creates need a second round to show an increase.
    traffic(agent_egress, web.port, 1)
    wait_for("two scrapes after the first round", lambda: values(
        prometheus, "count_over_time(agent_egress_dns_suspicious_total[1m])") and min(values(
            prometheus, "count_over_time(agent_egress_dns_suspicious_total[1m])")) >= 2,
        timeout=20, log=process.log)
    traffic(agent_egress, web.port, 2)

    document_panels = panels(dashboard())
    by_title = {panel["title"]: panel for panel in document_panels}
    assert NONZERO <= by_title.keys()

    def zeros() -> set[str]:
        return {title for title in NONZERO if not any(
            v > 0 for t in by_title[title]["targets"] for v in values(prometheus, t["expr"]))}

    wait_for("the traffic in Prometheus", lambda: not zeros(), timeout=20,
             log=lambda: f"only zeros: {sorted(zeros())}")

    exposed = exposed_metrics(agent_egress.metrics_url)
    missing = set(PLANNED) - exposed
    without_data = []
    for panel in document_panels:
        for query in panel["targets"]:
            if values(prometheus, query["expr"]):
                continue
            names = metric_names(query["expr"])
            if names & missing:
                continue  # its metric is not built yet (PLANNED says by which issue)
            without_data.append((panel["title"], query["expr"], sorted(names - exposed)))
    assert without_data == []
