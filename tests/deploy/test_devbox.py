"""The devbox deployment files: the nftables ruleset that `agent-egress nftables` prints (and
deploy/ ships) is valid nftables. The systemd units are tested in test_systemd.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"


def without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_shipped_ruleset_is_what_the_command_prints(cli):
    printed = subprocess.run([cli, "nftables", "--policy", str(DEPLOY / "policy.yaml")],
                             capture_output=True, text=True, check=True).stdout
    shipped = (DEPLOY / "nftables" / "agent-egress.nft").read_text()
    assert without_comments(printed) == without_comments(shipped)
    assert "meta skuid { 1001 } jump divert_governed" in shipped


@pytest.mark.skipif(not shutil.which("nft"), reason="needs nft")
def test_rulesets_are_valid_nftables(cli, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("""version: 1
accounts:
  a:
    match: {uids: [2001, 2002]}
    allow:
      - cidr: 127.0.0.1/32
        ports: [5432]
      - cidr: ::1/128
        ports: [6379]
      - cidr: 0.0.0.0/0
  b:
    match: {uids: [2003]}
""")
    ruleset = subprocess.run([cli, "nftables", "--policy", str(policy), "--transparent",
                              "127.0.0.1:9081", "--dns", "127.0.0.1:9053"],
                             capture_output=True, text=True, check=True).stdout
    assert "meta skuid { 2001, 2002, 2003 } jump outbound_governed" in ruleset
    assert "tcp dport { 5432 } accept" in ruleset and "ip6 daddr ::1/128" in ruleset
    assert "redirect to :9081" in ruleset and "redirect to :9053" in ruleset
    for text in (ruleset, (DEPLOY / "nftables" / "agent-egress.nft").read_text()):
        path = tmp_path / "rules.nft"
        path.write_text(text)
        done = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_an_account_without_uids_is_explained(cli, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\naccounts:\n  remote:\n    match: {proxy_users: [r]}\n")
    printed = subprocess.run([cli, "nftables", "--policy", str(policy)], capture_output=True,
                             text=True, check=True).stdout
    assert printed.splitlines() == [
        "# account remote: matches no uid, so it cannot be governed here",
        "# no account to govern: nothing to do"]


def test_the_ruleset_is_in_place_before_the_network_logins_and_the_proxy():
    """The agent account never sends anything unchecked: the ruleset unit runs before any
    network and any login, after the distribution's nftables (which flushes everything)."""
    unit = (DEPLOY / "systemd" / "agent-egress-nftables.service").read_text()
    before = next(line for line in unit.splitlines() if line.startswith("Before="))
    assert set(before.split("=", 1)[1].split()) >= {
        "network-pre.target", "systemd-user-sessions.service", "agent-egress.service"}
    assert "DefaultDependencies=no" in unit and "ReloadPropagatedFrom=nftables.service" in unit
    after = next(line for line in unit.splitlines() if line.startswith("After="))
    assert "nftables.service" in after.split()
    service = (DEPLOY / "systemd" / "agent-egress.service").read_text()
    assert "After=network-online.target agent-egress-nftables.service" in service
