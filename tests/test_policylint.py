"""`validate`'s warnings about valid policies that will not do what was meant."""

from __future__ import annotations

import os
import pwd
import subprocess

from agent_egress.policylint import lint
from agent_egress.rules import parse_policy

POLICY = """\
version: 1
accounts:
  codex:
    match: {unix_users: [codex]}
    allow:
      - host: a.test
      - host: b.test
        expires: 2026-01-01T00:00:00Z
      - host: A.test.
      - preset: github
      - preset: github
      - preset: gitlab
      - host: a.test
        ports: [443]
  other:
    match: {uids: [1001, 1002]}
    deny:
      - host: x.test
      - host: x.test
        ports: [443]
      - host: x.test
"""
NOW = 1780000000.0  # 2026-05-28, after b.test's rule expired


def warnings(text: str, users: dict[str, int]) -> list[str]:
    return [str(w) for w in lint(parse_policy(text.encode(), "p.yaml"), NOW, users.get)]


def test_expired_duplicate_and_doubly_claimed():
    assert warnings(POLICY, {"codex": 1001}) == [
        "p.yaml:7: warning: account codex: rule expired at 2026-01-01T00:00:00Z and matches "
        "nothing; remove it",
        # the same host written another way is the same rule; another port set is not
        "p.yaml:9: warning: account codex: this allow rule repeats p.yaml:6",
        "p.yaml:11: warning: account codex: this allow rule repeats p.yaml:10",
        "p.yaml:21: warning: account other: this deny rule repeats p.yaml:18",
        "p.yaml:3: warning: uid 1001 is claimed twice (account codex by unix user codex; account "
        "other by uid 1001): every client of that user is denied as an identity conflict",
    ]


def test_nothing_to_warn_of():
    assert warnings(POLICY, {"codex": 1003}) != [] and warnings(
        "version: 1\naccounts:\n  codex:\n    match: {unix_users: [codex], uids: [1001]}\n"
        "    allow:\n      - preset: github\n      - preset: gitlab\n"
        "      - host: a.test\n        expires: 2027-01-01T00:00:00Z\n",
        {"codex": 1001}) == []  # one account naming a user and its own uid is no conflict


def test_validate_prints_them_and_still_passes(cli, tmp_path):
    me = pwd.getpwuid(os.getuid()).pw_name
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\naccounts:\n  a:\n    match: {{unix_users: [{me}]}}\n"
                      f"  b:\n    match: {{uids: [{os.getuid()}]}}\n")
    done = subprocess.run([cli, "validate", str(policy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"{policy}: valid")
    assert done.stderr == (f"{policy}:3: warning: uid {os.getuid()} is claimed twice (account a "
                           f"by unix user {me}; account b by uid {os.getuid()}): every client "
                           "of that user is denied as an identity conflict\n")


CREDENTIAL_POLICY = """\
version: 1
credentials:
  token:
    env: TEST_LINT_TOKEN
accounts:
  codex:
    match: {unix_users: [codex]}
    allow:
      - host: default-ports.test
        credential: token
      - host: tls-only.test
        ports: [443, 8443]
        credential: token
      - host: plain.test
        ports: [8443, 80]
        credential: token
      - preset: github
        credential: token
      - host: no-credential.test
"""


def test_a_credential_on_port_80_is_warned_of():
    assert warnings(CREDENTIAL_POLICY, {}) == [
        f"p.yaml:{line}: warning: account codex: credential token would be sent in cleartext "
        "on port 80; expected ports: [443] (or another TLS port)" for line in (9, 14)]


def test_validate_warns_of_a_cleartext_credential(cli, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(CREDENTIAL_POLICY)
    done = subprocess.run([cli, "validate", str(policy)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TEST_LINT_TOKEN": "lint-token-123456"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("would be sent in cleartext on port 80") == 2
    assert "lint-token-123456" not in done.stdout + done.stderr


def test_a_credential_that_a_broader_rule_passes_by_is_named():
    text = """\
version: 1
credentials:
  token:
    env: LINT_TOKEN
accounts:
  codex:
    match: {uids: [1001]}
    allow:
      - host: api.test
        ports: [443]
        credential: token
        paths: ["/v1/*"]
      - host: "*.other.test"
      - host: x.other.test
        ports: [443]
        credential: token
      - host: api.test
        ports: [443, 8443]
      - host: safe.test
        ports: [443]
        credential: token
      - host: safe.test
        ports: [443]
        methods: [GET]
"""
    found = [w for w in warnings(text, {}) if "is never set" in w]
    assert found == [
        "p.yaml:9: warning: account codex: credential token is never set: rule p.yaml:17 "
        "allows host "
        "api.test ports 443,8443 without inspecting, so TLS to it is passed through; narrow or "
        "remove that rule",
        "p.yaml:14: warning: account codex: credential token is never set: rule p.yaml:13 "
        "allows host "
        "*.other.test ports 80,443 without inspecting, so TLS to it is passed through; narrow "
        "or remove that rule"]
