"""Faults the proxy must survive, and fail closed under: a full disk under the audit log, and
being killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request

import pytest
from support.proxy import RunningProxy


def policy(port: int) -> str:
    return f"""version: 1
accounts:
  tester:
    match: {{uids: [{os.getuid()}]}}
    allow:
      - host: web.test
        ports: [{port}]
      - cidr: 127.0.0.1/32
        ports: [{port}]
"""


def fetch(proxy: RunningProxy, url: str) -> str:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "-x", proxy.url, url],
                          capture_output=True, text=True, timeout=30).stdout


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("unshare"),
                    reason="a private tmpfs needs root and unshare")
@pytest.mark.parametrize("on_failure", ["deny", "allow"])
def test_a_full_audit_disk(cli, tmp_path, dns, web, on_failure):
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 16 KiB tmpfs in a mount namespace of the proxy's own: a few events fill it
    proxy = RunningProxy(
        cli, tmp_path, policy(web.port), "--upstream-dns", dns.address,
        "--on-audit-failure", on_failure, "--audit-log", str(disk / "audit.jsonl"),
        prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs -o size=16k tmpfs {disk} && exec \"$@\"", "sh"))
    try:
        answers = [fetch(proxy, f"http://web.test:{web.port}/{i}") for i in range(60)]
        refused = [a for a in answers if "the audit log cannot be written" in a]
        with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        errors = next(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("agent_egress_audit_write_errors_total"))
        assert errors > 0
        if on_failure == "deny":
            assert answers[0].startswith("hello") and refused
            assert all(a.startswith("hello") for a in answers[:answers.index(refused[0])])
        else:
            assert all(a.startswith("hello") for a in answers) and not refused
        assert proxy.process.poll() is None
    finally:
        proxy.stop()


def test_killed_and_restarted_the_log_stays_valid_json_lines(cli, tmp_path, dns, web):
    proxy = RunningProxy(cli, tmp_path, policy(web.port), "--upstream-dns", dns.address)
    for i in range(20):
        fetch(proxy, f"http://web.test:{web.port}/before-{i}")
    proxy.signal(signal.SIGKILL)
    proxy.stop()
    again = RunningProxy(cli, tmp_path, None, "--upstream-dns", dns.address, "--policy",
                         str(tmp_path / "policy.yaml"))
    try:
        fetch(again, f"http://web.test:{web.port}/after")
        assert again.wait_for_events(lambda e: e["path"] == "/after")
    finally:
        again.stop()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    assert {"/after"} <= {e["path"] for e in events}
