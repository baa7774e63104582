"""The command line as a user runs it: the installed console script, exit codes and output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

EXAMPLE = str(Path(__file__).parents[1] / "deploy" / "policy.yaml")


def run(cli, *args):
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60)


def test_validate_example(cli):
    done = run(cli, "validate", EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{EXAMPLE}: valid (2 accounts, 12 rules, policy ")


@pytest.mark.parametrize("target, method, exit_code, decision, rule", [
    ("https://github.com/org/repo", None, 0, "allow", f"{EXAMPLE}:18"),
    ("https://github.com/org/repo.git/git-receive-pack", "POST", 1, "deny", None),
    ("gist.github.com", None, 1, "deny", f"{EXAMPLE}:32"),
    ("https://api.example.test/v1/items?page=2", None, 0, "allow", f"{EXAMPLE}:23"),
    ("https://api.example.test/v1/../admin", None, 1, "deny", None),
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
