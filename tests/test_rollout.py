"""The rollout workflow: learn from what an account did, apply, enforce, replay, grant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from support.proxy import RunningProxy

from agent_egress.auditevent import KEYS

UID = os.getuid()


def event(host, port=443, decision="would_deny", account="codex", stage="connect", **fields):
    base = dict.fromkeys(KEYS)
    base.update(ts="2026-11-25T10:00:00.000Z", event=stage, account=account, host=host,
                port=port, decision=decision, reason=f"no rule matched for {host}:{port}",
                exe="/usr/bin/curl", mode="learn")
    base.update(fields)
    return json.dumps(base)


POLICY = """# the team's agent policy
version: 1
accounts:
  codex:
    match: {uids: [1001]}   # the agent's account
    mode: learn
    allow:
      - host: known.example.test
        ports: [443]
    deny:
      - host: forbidden.example.test
"""


def run(cli, *args, stdin=None):
    return subprocess.run([cli, *args], capture_output=True, text=True, input=stdin,
                          timeout=120)


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def write_log(tmp_path, lines):
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(lines) + "\n")
    return log


def test_learn_proposes_with_evidence_collapses_siblings_and_flags_danger(cli, policy,
                                                                          tmp_path):
    log = write_log(tmp_path, [
        event("api.example.test"), event("api.example.test", ts="2026-11-25T11:00:00.000Z",
                                         exe="/usr/bin/git"),
        *(event(f"m{i}.mirror.example.test") for i in range(3)),
        event("known.example.test", decision="allow", reason="allowed by rule", rule="x:8"),
        event("forbidden.example.test", decision="deny",
              reason="denied by rule: host forbidden.example.test"),
        event("10.1.2.3", port=5432),
        event("only-resolved.example.test", port=None, stage="dns",
              reason="no rule matched for only-resolved.example.test"),
        event("mzxw6ytboi2gs3lfn5xhk4tjon2wk3dp.example.test"),
        event("a.sites.test"), event("b.sites.test"), event("c.sites.test"),
    ])
    done = run(cli, "learn", "--policy", str(policy), str(log))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if not line.startswith("# flagged")] == [
        "# account codex: 3 proposals from 13 events",
        "- {host: *.mirror.example.test, ports: [443]}  # 3 events, 2026-11-25T10:00:00.000Z, "
        "by curl; covers m0.mirror.example.test, m1.mirror.example.test, "
        "m2.mirror.example.test",
        "- {host: *.sites.test, ports: [443]}  # 3 events, 2026-11-25T10:00:00.000Z, by curl; "
        "covers a.sites.test, b.sites.test, c.sites.test",
        "- {host: api.example.test, ports: [443]}  # 2 events, 2026-11-25T10:00:00.000Z to "
        "2026-11-25T11:00:00.000Z, by curl, git",
    ]
    flagged = "\n".join(line for line in lines if line.startswith("# flagged"))
    assert "forbidden.example.test: denied for another reason: denied by rule" in flagged
    assert "10.1.2.3: an address, not a name: only a cidr rule (10.1.2.3/32)" in flagged
    assert "only-resolved.example.test: only resolved, never connected to" in flagged
    assert "mzxw6ytboi2gs3lfn5xhk4tjon2wk3dp.example.test: looks like encoded data" in flagged


def test_wildcards_never_cover_a_public_suffix(cli, policy, tmp_path):
    log = write_log(tmp_path, [event(f"site{i}.github.io") for i in range(4)])
    done = run(cli, "learn", "--policy", str(policy), str(log))
    assert "*.github.io" not in done.stdout
    assert done.stdout.count("- {host: site") == 4


def test_learn_proposes_a_preset_when_observed_names_cover_it(cli, policy, tmp_path):
    hosts = ["github.com", "api.github.com", "codeload.github.com", "raw.githubusercontent.com"]
    log = write_log(tmp_path, [event(h) for h in hosts])
    done = run(cli, "learn", "--policy", str(policy), str(log))
    assert "- {preset: github}  # 4 events, 2026-11-25T10:00:00.000Z, by curl; covers " \
           "api.github.com, codeload.github.com, github.com, raw.githubusercontent.com" \
           in done.stdout


def test_apply_keeps_comments_validates_and_is_idempotent(cli, policy, tmp_path):
    log = write_log(tmp_path, [event("api.example.test"), event("cdn.other.test", port=80)])
    first = run(cli, "learn", "--policy", str(policy), "--apply", str(log))
    assert first.returncode == 0, first.stderr
    text = policy.read_text()
    assert text.startswith(POLICY.split("    deny:")[0])  # comments and order kept
    assert "      # learned: 1 event, 2026-11-25T10:00:00.000Z, by curl\n" \
           "      - host: api.example.test\n        ports: [443]\n" in text
    assert run(cli, "validate", str(policy)).returncode == 0
    second = run(cli, "learn", "--policy", str(policy), "--apply", str(log))
    assert second.stdout.splitlines()[0].startswith("# nothing to propose")
    assert policy.read_text() == text


def test_apply_leaves_a_broken_policy_untouched(cli, policy, tmp_path):
    log = write_log(tmp_path, [event("new.example.test")])
    broken = POLICY.replace("version: 1", "version: 1\nbogus: true")
    policy.write_text(broken)
    done = run(cli, "learn", "--policy", str(policy), "--apply", str(log))
    assert (done.returncode, done.stderr) == (
        2, f"{policy}:3:1: policy: unknown key 'bogus'; expected one of version, presets, "
           "credentials, accounts\n")
    assert policy.read_text() == broken
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".policy")] == []


def test_learn_reads_damaged_logs_and_other_versions(cli, policy, tmp_path):
    log = write_log(tmp_path, [event("ok.example.test"), '{"ts": 1, "event": "connect"}',
                               '{"v": 2, "kind": "flow"}', event("other.test")[:30]])
    done = run(cli, "learn", "--policy", str(policy), str(log))
    assert done.returncode == 0
    assert f"{log}:2: ts is int, expected str; line skipped" in done.stderr
    assert f"{log}:3: not an agent-egress audit event (unknown keys ['kind', 'v'])" in done.stderr
    assert "- {host: ok.example.test, ports: [443]}" in done.stdout


def test_stale_rules(cli, policy, tmp_path):
    now = datetime.now(UTC)
    recent = (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    log = write_log(tmp_path, [event("x.test", decision="allow", ts=recent,
                                     rule=f"{policy}:8", reason="allowed by rule")])
    done = run(cli, "learn", "--policy", str(policy), "--stale", "30d", str(log))
    assert "stale" not in done.stdout
    other = write_log(tmp_path, [event("x.test", ts=recent)])
    done = run(cli, "learn", "--policy", str(policy), "--stale", "30d", str(other))
    assert f"# stale: account codex: rule {policy}:8 [r-" in done.stdout
    assert "] (host known.example.test ports 443) was not used in the last 30d" in done.stdout


def test_replay_reports_what_would_change(cli, policy, tmp_path):
    log = write_log(tmp_path, [
        event("known.example.test", decision="allow", reason="allowed by rule: ..."),
        event("new.example.test"), event("new.example.test"),
        event("10.0.0.1", decision="deny", reason="x resolves to 10.0.0.1, which is private"),
    ])
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(POLICY.replace("mode: learn", "mode: enforce"))
    done = run(cli, "replay", "--policy", str(candidate), str(log))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "account codex",
        "  newly denied:   new.example.test:443 (2 events): no rule matched for "
        "new.example.test:443",
        "2 events would newly be denied and 0 newly allowed, of 4 (1 decided by address, TLS "
        "or authentication checks were not replayed)",
    ]
    same = run(cli, "replay", "--policy", str(policy), str(log))
    assert same.returncode == 0


def test_grant_adds_an_expiring_rule(cli, policy):
    done = run(cli, "grant", "--policy", str(policy), "--account", "codex", "--for", "2h",
               "https://temporary.example.test:8443/x")
    assert done.returncode == 0, done.stderr
    check = json.loads(run(cli, "check", "--policy", str(policy), "--account", "codex",
                           "--json", "temporary.example.test:8443").stdout)
    assert check["decision"] == "allow"
    assert "expires: '" in policy.read_text()
    bad = run(cli, "grant", "--policy", str(policy), "--account", "codex", "--for", "soon",
              "x.test")
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "agent-egress: --for: 'soon' is not a duration; expected e.g. 30m, 2h, 1d12h")


def test_granted_rule_takes_effect_in_the_running_proxy_and_ends_by_itself(cli, tmp_path, web,
                                                                          dns):
    text = f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    allow:
      - cidr: 127.0.0.1/32
        ports: [{web.port}]
"""
    proxy = RunningProxy(cli, tmp_path, text, "--upstream-dns", dns.address)
    try:
        url = f"http://web.test:{web.port}/granted"

        def fetch():
            return subprocess.run(["curl", "-sS", "-x", proxy.url, url], capture_output=True,
                                  text=True, timeout=30).stdout

        assert "no rule matched" in fetch()
        done = run(cli, "grant", "--policy", str(proxy.policy_file), "--account", "tester",
                   "--for", "3s", f"web.test:{web.port}")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 3
        while "hello" not in fetch() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fetch().startswith("hello from web.test")
        time.sleep(3.5)
        assert "expired" in fetch()
    finally:
        proxy.stop()


def test_learning_mode_end_to_end(cli, tmp_path, web, dns, secure, test_ca, package_index):
    """Learn from real traffic, apply, enforce: the same traffic passes, a new one does not."""
    text = f"""version: 1
accounts:
  tester:
    match: {{uids: [{UID}]}}
    mode: learn
    allow:
      - cidr: 127.0.0.1/32   # the test origins all listen on loopback
        ports: [{web.port}, {secure.port}, {package_index.port}]
"""
    proxy = RunningProxy(cli, tmp_path, text, "--upstream-dns", dns.address)

    def traffic():
        results = [
            subprocess.run(["curl", "-sS", "-x", proxy.url, f"http://web.test:{web.port}/a"],
                           capture_output=True, text=True, timeout=30),
            subprocess.run(["curl", "-sS", "-x", proxy.url, "--cacert", str(test_ca.ca_file),
                            f"https://secure.test:{secure.port}/b"], capture_output=True,
                           text=True, timeout=30),
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d",
                            str(tmp_path / "dl"), "--index-url",
                            f"http://index.test:{package_index.port}/simple/",
                            "--trusted-host", "index.test", "--proxy", proxy.url,
                            "--no-cache-dir", "egress-probe"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PIP_CONFIG_FILE": os.devnull,
                                "PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
        ]
        return [r.returncode for r in results]

    try:
        assert traffic() == [0, 0, 0]
        assert proxy.wait_for_events(lambda e: e["host"] == "index.test")
        learned = run(cli, "learn", "--policy", str(proxy.policy_file), "--apply",
                      str(proxy.audit_log))
        assert learned.returncode == 0, learned.stderr
        assert "# applied 3 rules" in learned.stdout
        enforced = proxy.policy_file.read_text().replace("mode: learn", "mode: enforce")
        replay_candidate = tmp_path / "enforced.yaml"
        replay_candidate.write_text(enforced)
        replayed = run(cli, "replay", "--policy", str(replay_candidate), str(proxy.audit_log))
        assert replayed.returncode == 0, replayed.stdout
        proxy.policy_file.write_text(enforced)
        proxy.signal(__import__("signal").SIGHUP)
        time.sleep(0.5)
        assert traffic() == [0, 0, 0]
        new = subprocess.run(["curl", "-sS", "-x", proxy.url, f"http://other.test:{web.port}/"],
                             capture_output=True, text=True, timeout=30)
        assert "reason:      no rule matched for other.test" in new.stdout
    finally:
        proxy.stop()
