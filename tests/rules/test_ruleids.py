"""Stable rule ids: an explicit `id:`, or one derived from the account and the rule's content,
never from its line or `expires`."""

from __future__ import annotations

from agent_egress.rules import Policy, Query, Stage, parse_policy

BASE = """version: 1
accounts:
  codex:
    match: {unix_users: [codex]}
    allow:
      - host: api.example.test
        ports: [443]
        paths: ["/v1/*"]
      - preset: github
        access: read-only
      - id: status-grant
        host: status.example.test
        expires: 2030-01-01T00:00:00Z
    deny:
      - host: gist.github.com
"""


def ids(text: str) -> list[str]:
    account = parse_policy(text.encode(), "p.yaml").accounts["codex"]
    return [r.id for r in (*account.allow, *account.deny)]


def test_ids_survive_edits_elsewhere_and_renewed_expiry():
    before = ids(BASE)
    edited = BASE.replace("accounts:\n", "# a comment\n\naccounts:\n  other:\n    match: "
                          "{unix_users: [other]}\n    allow:\n      - host: x.example.test\n")
    edited = edited.replace("2030-01-01", "2031-06-01").replace("ports: [443]",
                                                                "ports: [ 443 ]   # why")
    assert ids(edited) == before
    assert before[0].startswith("r-") and len(before[0]) == 14
    assert "status-grant" in before
    # the rules of one preset reference share the reference's id
    github = set(before[1:-2])
    assert len(github) == 1 and not github & {before[0], before[-1]}


def test_content_account_and_kind_change_the_id():
    before = ids(BASE)
    assert ids(BASE.replace('"/v1/*"', '"/v2/*"'))[0] != before[0]
    assert ids(BASE.replace("access: read-only", "expires: 2030-01-01T00:00:00Z"))[1] != \
        before[1]
    renamed = parse_policy(BASE.replace("codex", "agent").encode(), "p.yaml")
    assert renamed.accounts["agent"].allow[0].id != before[0]


def test_decisions_carry_the_rule_id():
    policy = Policy(parse_policy(BASE.encode(), "p.yaml"))
    allowed = policy.decide(Query("codex", "status.example.test", 443, Stage.CONNECT))
    assert (allowed.rule, allowed.rule_id) == ("p.yaml:11", "status-grant")
    denied = policy.decide(Query("codex", "gist.github.com", 443, Stage.CONNECT))
    assert denied.rule_id == ids(BASE)[-1]
    nothing = policy.decide(Query("codex", "else.example.test", 443, Stage.CONNECT))
    assert nothing.rule_id is None
