"""Alerting end to end with the real servers: a Prometheus running deploy/prometheus scrapes a
live agent-egress and sends to an Alertmanager running deploy/prometheus/alertmanager.yml,
which calls a webhook receiver this test runs on loopback. A burst of denials produces a
notification that names the account and no destination."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dnslib import DNSRecord
from support.prometheus import DEPLOY, api, binary, start_alertmanager, wait_for
from support.proxy import Process, RunningProxy

pytestmark = pytest.mark.e2e

SHIPPED_WEBHOOK = "http://127.0.0.1:5001/agent-egress"
# Names that appear in the audit log and nowhere in a notification.
DESTINATION_WORDS = ("denied.test", "burst-", "other.test")


class Webhook:
    """Records every notification Alertmanager POSTs."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.bodies: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                received.bodies.append(body)
                received.notifications.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/agent-egress"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        return [alert for n in self.notifications for alert in n["alerts"]
                if alert["labels"]["alertname"] == alertname and alert["status"] == "firing"]


def alertmanager_config(directory: Path, webhook: str) -> Path:
    """The shipped configuration with its waits cut to a second and its receiver here."""
    config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="1s")
    hooks = [hook for receiver in config["receivers"]
             for hook in receiver.get("webhook_configs", [])]
    assert [hook["url"] for hook in hooks] == [SHIPPED_WEBHOOK]
    hooks[0]["url"] = webhook
    path = directory / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    receiver = Webhook()
    yield receiver
    receiver.stop()


@pytest.fixture
def alertmanager(tmp_path, webhook) -> Iterator[tuple[str, Process]]:
    directory = tmp_path / "alertmanager"
    directory.mkdir()
    started: list[Process] = []
    yield start_alertmanager(directory, alertmanager_config(directory, webhook.url), started)
    for process in started:
        process.stop()


@pytest.fixture
def agent_egress(cli, tmp_path, dns) -> Iterator[RunningProxy]:
    (tmp_path / "agent-egress").mkdir()
    running = RunningProxy(cli, tmp_path / "agent-egress", f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    mode: enforce
    allow:
      - host: web.test
""", "--upstream-dns", dns.address)
    yield running
    running.stop()


def test_the_shipped_alertmanager_configuration_is_valid():
    done = subprocess.run([binary("amtool"), "check-config", str(DEPLOY / "alertmanager.yml")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_burst_of_denials_notifies_the_webhook_naming_the_account(
        agent_egress, webhook, alertmanager, start_prometheus):
    manager, manager_process = alertmanager
    target = urlsplit(agent_egress.metrics_url).netloc
    prometheus, process = start_prometheus(target, manager)

    def logs() -> str:
        return str(process.log() + manager_process.log())

    wait_for("the first scrape", lambda: api(prometheus, "query", query="up == 1")["result"],
             timeout=20, log=logs)
    wait_for("Prometheus to find the Alertmanager",
             lambda: api(prometheus, "alertmanagers")["activeAlertmanagers"], timeout=20, log=logs)
    assert webhook.notifications == []

    for i in range(120):
        reply = DNSRecord.parse(DNSRecord.question(f"burst-{i}.denied.test").send(
            "127.0.0.1", agent_egress.dns_port, timeout=5))
        assert reply.header.rcode == 3  # NXDOMAIN

    (alert,) = wait_for("the burst notification",
                        lambda: webhook.alerts("AgentEgressDenialBurst"), timeout=25, log=logs)
    assert alert["labels"] == {"alertname": "AgentEgressDenialBurst", "severity": "critical",
                               "job": "agent-egress", "instance": target, "account": "tester"}
    assert alert["annotations"]["summary"] == "Burst of egress denials for account tester"
    assert "--account tester" in alert["annotations"]["description"]
    notification = next(n for n in webhook.notifications if alert in n["alerts"])
    assert notification["path"] == "/agent-egress"
    assert notification["commonLabels"]["account"] == "tester"
    for body in webhook.bodies:
        assert not any(word in body for word in DESTINATION_WORDS), body
