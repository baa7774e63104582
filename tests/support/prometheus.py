"""Prometheus and Alertmanager as the deploy tests run them: the shipped configuration in
deploy/prometheus with fast intervals, each server on its own loopback port and directory."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.proxy import Process

DEPLOY = Path(__file__).parents[2] / "deploy" / "prometheus"

# DESIGN.md "Metrics" (plus agent_egress_build_info) with their labels, as agent-egress exposes them
# today: what alerts and the dashboard may use.
METRICS: dict[str, set[str]] = {
    "agent_egress_decisions_total": {"account", "stage", "decision"},
    "agent_egress_decision_seconds": set(),
    "agent_egress_policy_reloads_total": {"result"},
    "agent_egress_policy_loaded_timestamp_seconds": set(),
    "agent_egress_audit_events_total": set(),
    "agent_egress_audit_write_errors_total": set(),
    "agent_egress_active_connections": {"account"},
    "agent_egress_bytes_total": {"account", "direction"},
    "agent_egress_dns_suspicious_total": {"account", "signal"},
    "agent_egress_exposed_listeners": {"account"},
    "agent_egress_access_requests": {"account", "state"},
    "agent_egress_credentials_injected_total": {"account", "credential"},
    "agent_egress_credential_leaks_total": {"account", "credential"},
    "agent_egress_build_info": {"version"},
}
PROMETHEUS_METRICS = {"up"}  # what Prometheus records about the scrape itself
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                "group_right", "offset", "bool"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings, label matchers,
    ranges and groupings that are neither functions, aggregations nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        if match.group() in PROMQL_WORDS or expr[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def alert_rules(document: Any) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60,
             log: Callable[[], str] = str) -> Any:
    """Polls `probe` until it returns something true; `log` says what happened if it never
    does."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.25)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def exposed_metrics(metrics_url: str) -> set[str]:
    """The series names a /metrics page declares (from its TYPE lines, so also the families that
    have no series yet), as Prometheus stores them."""
    names: set[str] = set()
    for family in text_string_to_metric_families(get(metrics_url)):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "summary": ["", "_count", "_sum"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed; scripts/bootstrap --test installs it"
    return path


def prometheus_config(directory: Path, target: str, alertmanager: str | None = None) -> Path:
    """The example configuration scraping `target` every second, with the rules as they are
    but for their `for:` durations, set to 0s; alerts go to `alertmanager` (host:port) if
    given."""
    rules = load("alerts.yml")
    for rule in alert_rules(rules):
        if "for" in rule:
            rule["for"] = "0s"
    (directory / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = load("prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    if alertmanager is None:
        config.pop("alerting", None)
    else:
        (manager,) = config["alerting"]["alertmanagers"]
        manager["static_configs"] = [{"targets": [alertmanager]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(directory: Path, config: Path, started: list[Process]) -> tuple[str, Process]:
    """Prometheus on a free loopback port (appended to `started`); its URL and process."""
    for attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = free_port()
        process = Process([binary("prometheus"), f"--config.file={config}",
                           f"--storage.tsdb.path={directory / f'data{attempt}'}",
                           f"--web.listen-address=127.0.0.1:{port}"])
        started.append(process)
        try:
            process.wait_for("Server is ready to receive web requests")
        except RuntimeError:
            if "address already in use" not in process.log() or attempt == 2:
                raise
            process.stop()
            continue
        return f"http://127.0.0.1:{port}", process
    raise AssertionError("unreachable")


def start_alertmanager(directory: Path, config: Path,
                       started: list[Process]) -> tuple[str, Process]:
    """Alertmanager on an ephemeral loopback port, without clustering; its address
    (host:port) and process."""
    process = Process([binary("prometheus-alertmanager"), f"--config.file={config}",
                       f"--storage.path={directory / 'data'}",
                       "--web.listen-address=127.0.0.1:0", "--cluster.listen-address="])
    started.append(process)
    address = process.wait_for(r'msg="Listening on" address=(127\.0\.0\.1:\d+)').group(1)
    return address, process


def api(prometheus: str, path: str, **params: str) -> Any:
    body = json.loads(get(f"{prometheus}/api/v1/{path}?{urlencode(params)}"))
    assert body["status"] == "success", body
    return body["data"]


def firing(prometheus: str, alertname: str) -> list[dict[str, Any]]:
    return [alert for alert in api(prometheus, "alerts")["alerts"]
            if alert["labels"]["alertname"] == alertname and alert["state"] == "firing"]
