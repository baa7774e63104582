"""The command line as a user runs it: the installed console script, exit codes and output."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from support.proxy import RunningProxy

EXAMPLE = str(Path(__file__).parents[1] / "deploy" / "policy.yaml")


def run(cli, *args):
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60)


def test_validate_example(cli):
    done = run(cli, "validate", EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{EXAMPLE}: valid (2 accounts, 12 rules, policy ")
    assert done.stderr == ""  # an example with warnings would teach ignoring them


@pytest.mark.parametrize("target, method, exit_code, decision, rule", [
    ("https://github.com/org/repo", None, 0, "allow", f"{EXAMPLE}:18"),
    ("https://github.com/org/repo.git/git-receive-pack", "POST", 1, "deny", f"{EXAMPLE}:18"),
    ("gist.github.com", None, 1, "deny", f"{EXAMPLE}:32"),
    ("https://api.example.test/v1/items?page=2", None, 0, "allow", f"{EXAMPLE}:23"),
    ("https://api.example.test/v1/../admin", None, 1, "deny", f"{EXAMPLE}:23"),
    ("https://api.example.test/v1/..%2Fadmin", None, 1, "deny", f"{EXAMPLE}:23"),
    ("https://api.example.test/v1/@scope%2Fname", None, 0, "allow", f"{EXAMPLE}:23"),
    ("http://allowed.mirror.example.test@evil.test/", None, 1, "deny", None),
    ("pkg.mirror.example.test:443", None, 0, "allow", f"{EXAMPLE}:21"),
    ("[::ffff:192.0.2.10]:5432", None, 0, "allow", f"{EXAMPLE}:29"),
    ("3221225994:5432", None, 0, "allow", f"{EXAMPLE}:29"),
])
def test_check_json(cli, target, method, exit_code, decision, rule):
    args = ["check", "--policy", EXAMPLE, "--account", "codex", "--json", target]
    if method:
        args[1:1] = ["--method", method]
    done = run(cli, *args)
    assert done.returncode == exit_code, done.stderr
    result = json.loads(done.stdout)
    assert (result["decision"], result["rule"], result["account"]) == (decision, rule, "codex")


def test_check_prints_reason_and_next_step(cli):
    done = run(cli, "check", "--policy", EXAMPLE, "--account", "codex", "evil.test")
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "decision  deny",
        "rule      no rule matched",
        "reason    no rule matched for evil.test:443",
        "account   codex (enforce), checked at the connect stage",
        "next      to allow it, add {host: evil.test, ports: [443]} to accounts.codex.allow",
    ]


def test_check_in_learning_mode_passes_with_would_deny(cli, tmp_path):
    policy = tmp_path / "learn.yaml"
    policy.write_text("version: 1\naccounts:\n  codex:\n    match: {uids: [1001]}\n"
                      "    mode: learn\n")
    done = run(cli, "check", "--policy", str(policy), "--account", "codex", "--json",
               "https://new.example.test/")
    assert done.returncode == 0
    assert json.loads(done.stdout)["decision"] == "would_deny"


LEARNING = """version: 1
accounts:
  codex:
    match: {uids: [1001]}
    mode: learn
    allow:
      - cidr: 192.0.2.0/24
        ports: [5432]
"""


@pytest.mark.parametrize("target, exit_code, decision", [
    # Issue 13 row 4: IP literals need a cidr rule in learning mode too, public or internal
    ("203.0.113.7", 1, "deny"), ("203.0.113.7:8443", 1, "deny"),
    ("https://203.0.113.7/v1/x", 1, "deny"), ("http://3405803783/", 1, "deny"),
    ("[2001:db8::7]:443", 1, "deny"), ("127.0.0.1:5432", 1, "deny"),
    ("http://169.254.169.254/latest/meta-data/", 1, "deny"), ("0x7f.1:22", 1, "deny"),
    ("192.0.2.10:5432", 0, "allow"), ("192.0.2.10:443", 1, "deny"),
    ("new.example.test", 0, "would_deny"),
])
def test_check_in_learning_mode_denies_ip_literals_without_a_cidr_rule(cli, tmp_path, target,
                                                                        exit_code, decision):
    policy = tmp_path / "learn.yaml"
    policy.write_text(LEARNING)
    done = run(cli, "check", "--policy", str(policy), "--account", "codex", "--json", target)
    result = json.loads(done.stdout)
    assert (done.returncode, result["decision"]) == (exit_code, decision), result
    if decision == "deny":
        assert result["reason"].endswith("a destination given as an IP address needs a cidr "
                                         "rule, in every mode")
        assert result["hint"].startswith("to allow it, add {cidr: ")


def test_check_agrees_with_the_live_proxy_on_literal_addresses(cli, tmp_path, web):
    """A learning account's request to an internal address literal: the proxy refuses it, and
    `check` says so with the same reason (it used to say would_deny, exit 0)."""
    policy = LEARNING.replace("uids: [1001]", f"uids: [{os.getuid()}]")
    running = RunningProxy(cli, tmp_path, policy)
    try:
        for spelling in ("127.0.0.1", "2130706433", "[::ffff:127.0.0.1]"):
            target = f"http://{spelling}:{web.port}/x"
            served = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", running.url,
                                     "-D", "-", target], capture_output=True, text=True,
                                    timeout=30)
            checked = run(cli, "check", "--policy", str(running.policy_file), "--account",
                          "codex", "--json", target)
            verdict = json.loads(checked.stdout)
            assert served.stdout.startswith("HTTP/1.1 403"), served.stdout
            assert (checked.returncode, verdict["decision"]) == (1, "deny")
            assert f"reason:      {verdict['reason']}" in served.stdout
    finally:
        running.stop()


@pytest.mark.parametrize("args, message", [
    (["--account", "nobody", "x.test"], f"agent-egress: no account 'nobody' in {EXAMPLE}; "
                                        "expected one of codex, default"),
    (["--account", "codex", "ftp://x.test/"], "agent-egress: unsupported URL scheme 'ftp'; "
                                              "expected one of http, https, ssh, git, ws, wss"),
    (["--account", "codex", "x.test:99999"], "agent-egress: 'x.test:99999': expected a port "
                                             "from 1 to 65535 after ':'"),
])
def test_check_usage_errors_exit_2(cli, args, message):
    done = run(cli, "check", "--policy", EXAMPLE, *args)
    assert (done.returncode, done.stderr.strip()) == (2, message)


def test_check_with_a_broken_policy_exits_2(cli, tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\naccounts:\n  codex:\n    match: {uids: [1001]}\n"
                      "    allow:\n      - host: '*.com'\n")
    done = run(cli, "check", "--policy", str(policy), "--account", "codex", "x.com")
    assert done.returncode == 2
    assert done.stderr.strip() == f"{policy}:6:15: host '*.com' covers every name under the " \
                                  "public suffix 'com'; expected a wildcard under a registered " \
                                  "domain"


@pytest.mark.parametrize("target", ["foo bar", "x\x1b[31m.test", "a..b", "x_-.test:0"])
def test_check_with_a_malformed_target_exits_2(cli, target):
    done = run(cli, "check", "--policy", EXAMPLE, "--account", "codex", target)
    assert done.returncode == 2 and done.stdout == ""
    assert "\x1b" not in done.stderr and done.stderr.startswith("agent-egress: ")


GRANT_POLICY = """\
version: 1
accounts:
  codex:
    match: {uids: [1001]}
    allow:
      - host: kept.test   # a comment that stays
    deny:
      - host: gist.github.com
      - host: blocked.test
        ports: [443]
"""


@pytest.fixture
def grant_policy(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(GRANT_POLICY)
    return policy


def grant(cli, policy, *args):
    return run(cli, "grant", "--policy", str(policy), "--account", "codex", *args)


def check(cli, policy, target):
    return json.loads(run(cli, "check", "--policy", str(policy), "--account", "codex", "--json",
                          target).stdout)


def test_grant_of_a_bare_host_allows_ports_80_and_443_until_it_expires(cli, grant_policy):
    done = grant(cli, grant_policy, "--for", "2h", "new.example.test")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"agent-egress: account codex may reach new\.example\.test on ports 80, "
                        r"443 until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(rule added to .*\)\n",
                        done.stdout)
    for target in ("new.example.test:80", "new.example.test:443", "http://new.example.test/x"):
        assert check(cli, grant_policy, target)["decision"] == "allow"
    assert check(cli, grant_policy, "new.example.test:8443")["decision"] == "deny"
    text = grant_policy.read_text()
    assert "# a comment that stays" in text
    assert "ports" not in text.split("new.example.test")[1].split("deny:")[0]
    assert re.search(r"# granted \S+ for 2h\n\s+- host: new\.example\.test\n\s+expires: ", text)


def test_grant_with_a_port_allows_that_port_only(cli, grant_policy):
    assert grant(cli, grant_policy, "--for", "30m", "new.example.test:8443").returncode == 0
    assert check(cli, grant_policy, "new.example.test:8443")["decision"] == "allow"
    assert check(cli, grant_policy, "new.example.test:443")["decision"] == "deny"


@pytest.mark.parametrize("target, port", [("gist.github.com", 80), ("blocked.test", 443),
                                          ("https://gist.github.com/x", 443)])
def test_grant_that_a_deny_rule_overrides_exits_1_and_writes_nothing(cli, grant_policy, target,
                                                                      port):
    done = grant(cli, grant_policy, "--for", "1h", target)
    host = target.split("/")[-2] if "/" in target else target
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"agent-egress: not granted: codex would still be refused "
                                  f"{host}:{port}: denied by rule: host {host}")
    assert grant_policy.read_text() == GRANT_POLICY


def test_grant_of_a_name_that_resolves_internal_exits_1_naming_the_cidr_rule(cli, grant_policy,
                                                                            dns):
    done = grant(cli, grant_policy, "--for", "1h", "--upstream-dns", dns.address,
                 "intranet.test:8080")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        "agent-egress: not granted: codex would still be refused intranet.test:8080: "
        "intranet.test resolves to 10.1.2.3, which is private; only a cidr rule can allow an "
        "internal address",
        "agent-egress: if this is intended, add {cidr: 10.1.2.3/32, ports: [8080]} to "
        "accounts.codex.allow",
    ]
    assert grant_policy.read_text() == GRANT_POLICY
    # the system's resolver (/etc/hosts here) is asked when no server is given
    done = grant(cli, grant_policy, "--for", "1h", "localhost:8080")
    assert done.returncode == 1 and "which is loopback" in done.stderr
    # with the cidr rule the proxy would need, the grant is given
    grant_policy.write_text(GRANT_POLICY.replace(
        "    deny:", "      - cidr: 10.1.2.3/32\n        ports: [8080]\n    deny:"))
    done = grant(cli, grant_policy, "--for", "1h", "--upstream-dns", dns.address,
                 "intranet.test:8080")
    assert done.returncode == 0, done.stderr
    # check decides the same way when given the proxy's resolver
    assert check(cli, grant_policy, "intranet.test:9090")["decision"] == "deny"


@pytest.mark.parametrize("duration", ["0m", "0s", "0d0h", "=-5m", "=-1h", "soon", "=", "1y"])
def test_grant_needs_a_positive_duration(cli, grant_policy, duration):
    args = [f"--for{duration}"] if duration.startswith("=") else ["--for", duration]
    done = grant(cli, grant_policy, *args, "new.example.test")
    assert done.returncode == 2 and done.stdout == ""
    assert grant_policy.read_text() == GRANT_POLICY


def test_report_of_a_missing_file_exits_2(cli, tmp_path):
    done = run(cli, "report", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"agent-egress: {tmp_path}/missing.jsonl: cannot read: No such file " \
                          "or directory\n"
    assert run(cli, "report", str(tmp_path)).returncode == 2


def test_every_flag_of_every_command_has_help_text():
    from agent_egress.cli import _parser

    missing = []
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"run", "validate", "check", "learn", "replay", "grant",
                                     "report", "discover", "nftables", "ca", "env", "init"}
    for name, parser in commands.choices.items():
        assert parser.description, name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
