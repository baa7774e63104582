"""Decisions over tests/rules/fixtures/engine.yaml: each case asserts result, rule and reason."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_egress.rules import Identity, Policy, Query, Result, Stage, parse_policy

FIXTURE = Path(__file__).parent / "fixtures" / "engine.yaml"
F = str(FIXTURE)
GITHUB_RO = ("host github.com ports 22,443 access read-only from preset github "
             "(builtin:github.yaml:4)")
BEFORE_EXPIRY = datetime(2026, 11, 30, 23, 59, tzinfo=UTC).timestamp()
AFTER_EXPIRY = datetime(2026, 12, 1, 0, 0, tzinfo=UTC).timestamp()
ALLOW, DENY, WOULD_DENY = Result.ALLOW, Result.DENY, Result.WOULD_DENY
DNS, CONNECT, REQUEST = Stage.DNS, Stage.CONNECT, Stage.REQUEST


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load(FIXTURE)


CASES = [
    # (account, stage, host, port, method, path, result, rule line, reason)
    ("codex", CONNECT, "a.example.test", 443, None, None, ALLOW, 17,
     "allowed by rule: host *.example.test ports 443"),
    ("codex", CONNECT, "deep.a.example.test", 443, None, None, ALLOW, 17,
     "allowed by rule: host *.example.test ports 443"),
    ("codex", CONNECT, "example.test", 443, None, None, DENY, None,
     "no rule matched for example.test:443"),
    ("codex", CONNECT, "evilexample.test", 443, None, None, DENY, None,
     "no rule matched for evilexample.test:443"),
    ("codex", CONNECT, "example.test.evil.test", 443, None, None, DENY, None,
     "no rule matched for example.test.evil.test:443"),
    ("codex", CONNECT, "a.example.test", 80, None, None, DENY, None,
     f"no rule matched for a.example.test:80 (rule {F}:17 allows only host *.example.test "
     "ports 443)"),
    ("codex", CONNECT, "SECRET.Example.Test.", 443, None, None, DENY, 29,
     "denied by rule: host secret.example.test"),
    ("codex", DNS, "secret.example.test", None, None, None, DENY, 29,
     "denied by rule: host secret.example.test"),
    ("codex", DNS, "db.example.test", None, None, None, ALLOW, 17,
     "allowed by rule: host *.example.test ports 443"),
    ("codex", CONNECT, "db.example.test", 5432, None, None, DENY, 31,
     "denied by rule: host db.example.test ports 5432"),
    ("codex", CONNECT, "db.example.test", 443, None, None, ALLOW, 17,
     "allowed by rule: host *.example.test ports 443"),
    ("codex", CONNECT, "gist.github.com", 443, None, None, DENY, 30,
     "denied by rule: host gist.github.com"),
    ("codex", CONNECT, "ci.corp.example.test", 443, None, None, ALLOW, 16,
     "allowed by rule: host ci.corp.example.test ports 443 from preset internal-ci "
     f"({F}:4)"),
    # read-only source control: inspected; fetch and clone pass, push does not
    ("codex", CONNECT, "github.com", 443, None, None, ALLOW, 14,
     "allowed by rule: host github.com ports 22,443 access read-only from preset github "
     "(builtin:github.yaml:4) (requests are inspected)"),
    ("codex", REQUEST, "github.com", 443, "GET", "/o/r.git/info/refs?service=git-upload-pack",
     ALLOW, 14, "allowed by rule: host github.com ports 22,443 access read-only from preset "
     "github (builtin:github.yaml:4)"),
    ("codex", REQUEST, "github.com", 443, "POST", "/o/r.git/git-upload-pack", ALLOW, 14,
     "allowed by rule: host github.com ports 22,443 access read-only from preset github "
     "(builtin:github.yaml:4)"),
    # Issue 14 item 9: a write under a read-only rule names that rule
    ("codex", REQUEST, "github.com", 443, "GET", "/o/r.git/info/refs?service=git-receive-pack",
     DENY, 14, f"refused by read-only rule {F}:14 ({GITHUB_RO}): github.com:443 GET "
     "/o/r.git/info/refs is a git push (git-receive-pack)"),
    ("codex", REQUEST, "github.com", 443, "POST", "/o/r.git/git-receive-pack", DENY, 14,
     f"refused by read-only rule {F}:14 ({GITHUB_RO}): github.com:443 POST "
     "/o/r.git/git-receive-pack is a git push (git-receive-pack)"),
    ("codex", REQUEST, "github.com", 443, "PUT", "/upload", DENY, 14,
     f"refused by read-only rule {F}:14 ({GITHUB_RO}): github.com:443 PUT /upload is a PUT (an "
     "upload, publish or other write)"),
    # methods and paths, on a normalised path
    ("codex", CONNECT, "api.other.test", 443, None, None, ALLOW, 19,
     "allowed by rule: host api.other.test ports 443 methods GET,HEAD paths /v1/* "
     "(requests are inspected)"),
    ("codex", REQUEST, "api.other.test", 443, "GET", "/v1/items?q=1", ALLOW, 19,
     "allowed by rule: host api.other.test ports 443 methods GET,HEAD paths /v1/*"),
    ("codex", REQUEST, "api.other.test", 443, "GET", "/v2/items", DENY, None,
     f"no rule matched for api.other.test:443 GET /v2/items (rule {F}:19 allows only paths "
     "/v1/*, not /v2/items)"),
    # a path an origin could read otherwise is refused by the rule that looks at paths
    ("codex", REQUEST, "api.other.test", 443, "GET", "/v1/../admin", DENY, 19,
     "path /v1/../admin has a dot-segment once decoded ('..'), which origins resolve "
     f"differently: refused, as rule {F}:19 looks at paths (an origin could serve another "
     "path than the one decided)"),
    ("codex", REQUEST, "api.other.test", 443, "GET", "/v1/%2e%2e/admin", DENY, 19,
     "path /v1/%2e%2e/admin has a dot-segment once decoded ('..'), which origins resolve "
     f"differently: refused, as rule {F}:19 looks at paths (an origin could serve another "
     "path than the one decided)"),
    ("codex", REQUEST, "api.other.test", 443, "POST", "/v1/items", DENY, None,
     f"no rule matched for api.other.test:443 POST /v1/items (rule {F}:19 allows only "
     "methods GET, HEAD, not POST)"),
    ("codex", REQUEST, "api.other.test", 443, "DELETE", "/v1/x", DENY, 33,
     "denied by rule: host api.other.test methods DELETE"),
    # addresses only match cidr rules, whatever their spelling
    ("codex", CONNECT, "192.0.2.10", 22, None, None, ALLOW, 25,
     "allowed by rule: cidr 192.0.2.10/32 ports 22"),
    ("codex", CONNECT, "3221225994", 22, None, None, ALLOW, 25,
     "allowed by rule: cidr 192.0.2.10/32 ports 22"),
    ("codex", CONNECT, "::ffff:192.0.2.10", 22, None, None, ALLOW, 25,
     "allowed by rule: cidr 192.0.2.10/32 ports 22"),
    ("codex", CONNECT, "192.0.2.11", 22, None, None, DENY, None,
     "no rule matched for 192.0.2.11:22; a destination given as an IP address needs a cidr "
     "rule, in every mode"),
    ("codex", CONNECT, "[2001:db8::1]", 443, None, None, ALLOW, 27,
     "allowed by rule: cidr 2001:db8::/32 ports 80,443"),
    ("codex", CONNECT, "0x7f.1", 443, None, None, DENY, None,
     "no rule matched for 127.0.0.1:443; a destination given as an IP address needs a cidr "
     "rule, in every mode"),
    # odd hosts are denied with a reason, never matched
    ("codex", CONNECT, "a..example.test", 443, None, None, DENY, None,
     "invalid host: 'a..example.test' has an empty label"),
    # learning mode: unmatched traffic would be denied but passes; deny rules still deny
    ("learner", CONNECT, "unknown.other.test", 443, None, None, WOULD_DENY, None,
     "no rule matched for unknown.other.test:443"),
    ("learner", CONNECT, "forbidden.other.test", 443, None, None, DENY, 43,
     "denied by rule: host forbidden.other.test"),
    ("learner", CONNECT, "known.other.test", 443, None, None, ALLOW, 41,
     "allowed by rule: host known.other.test ports 80,443"),
    ("default", CONNECT, "a.example.test", 443, None, None, DENY, None,
     "no rule matched for a.example.test:443"),
    ("nobody", CONNECT, "a.example.test", 443, None, None, DENY, None,
     "no account 'nobody' in the policy"),
]


@pytest.mark.parametrize("account, stage, host, port, method, path, result, line, reason", CASES)
def test_decisions(policy, account, stage, host, port, method, path, result, line, reason):
    decision = policy.decide(Query(account, host, port, stage, method, path, now=BEFORE_EXPIRY))
    assert (decision.result, decision.rule, decision.reason) == (
        result, f"{F}:{line}" if line else None, reason)


def test_denials_say_what_would_allow_them(policy):
    decision = policy.decide(Query("codex", "new.other.test", 443, CONNECT))
    assert decision.hint == "to allow it, add {host: new.other.test, ports: [443]} to " \
                            "accounts.codex.allow"


def test_expired_rules_stop_matching_at_their_time(policy):
    def at(now):
        return policy.decide(Query("codex", "status.other.test", 443, CONNECT, now=now))

    assert at(BEFORE_EXPIRY).result is ALLOW
    expired = at(AFTER_EXPIRY)
    assert (expired.result, expired.reason) == (
        DENY, f"no rule matched for status.other.test:443 (rule {F}:23 expired)")


@pytest.mark.parametrize("identity, account, reason", [
    (Identity(uid=1001), "codex", "matched by uid 1001"),
    (Identity(user="codex", uid=1001, proxy_user="codex"), "codex", "matched by uid 1001"),
    (Identity(source=ip_address("10.88.0.7")), "learner", "matched by source 10.88.0.7 in "
                                                          "10.88.0.0/24"),
    (Identity(uid=4242, user="someone"), "default",
     "no account matched; using the default account"),
    (Identity(user="codex", proxy_user="learner"), "codex", "matched by unix user codex"),
    (Identity(uid=1001, source=ip_address("10.88.0.7")), None,
     "identity conflict: uid 1001 is account codex; source 10.88.0.7 in 10.88.0.0/24 is "
     "account learner"),
])
def test_account_for(policy, identity, account, reason):
    choice = policy.account_for(identity)
    assert (choice.account, choice.reason) == (account, reason)


def test_no_default_account_means_denial(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\naccounts:\n  codex:\n    match: {uids: [1001]}\n")
    choice = Policy.load(path).account_for(Identity(uid=5, user="eve"))
    assert choice == type(choice)(None, "no account matches uid 5, unix user eve and the "
                                        "policy has no default account")


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(labels, min_size=0, max_size=3), labels, st.sampled_from(["", ".", "-", "x"]))
def test_no_lookalike_matches_a_wildcard(policy, prefix, extra, joiner):
    """*.example.test covers names below example.test and nothing else."""
    lookalikes = [
        "example.test", f"{extra}example.test", f"example.test.{extra}.test",
        f"example{joiner}test.{extra}", f"{extra}-example.test", f"example.{extra}.test",
    ]
    for host in lookalikes:
        if host.endswith(".example.test") and host != "example.test":
            continue
        decision = policy.decide(Query("codex", host, 443, CONNECT))
        assert decision.rule != f"{F}:17", host
    below = ".".join([*prefix, extra, "example.test"])
    if below not in ("secret.example.test", "db.example.test", "ci.corp.example.test"):
        assert policy.decide(Query("codex", below, 443, CONNECT)).rule == f"{F}:17"


def spellings_of(address: int) -> list[str]:
    """Ways URL parsers and inet_aton accept to write one IPv4 address."""
    a, b, c, d = address.to_bytes(4, "big")
    dotted = f"{a}.{b}.{c}.{d}"
    return [
        dotted, f"{dotted}.", str(address), hex(address), f"0{address:o}",
        f"{a}.{b}.{c * 256 + d}", f"{a}.{b * 65536 + c * 256 + d}",
        f"{hex(a)}.{hex(b)}.{hex(c)}.{hex(d)}", f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
        f"::ffff:{dotted}", f"[::ffff:{dotted}]", f"[::ffff:{a * 256 + b:x}:{c * 256 + d:x}]",
    ]


@given(st.integers(min_value=0, max_value=2**32 - 1).filter(lambda a: a != 0xC000020A))
def test_every_spelling_of_a_denied_address_is_denied(policy, address):
    for spelling in spellings_of(address):
        decision = policy.decide(Query("codex", spelling, 22, CONNECT))
        assert decision.result is DENY, spelling


@pytest.mark.parametrize("spelling", spellings_of(0xC000020A))
def test_every_spelling_of_an_allowed_address_matches_its_cidr_rule(policy, spelling):
    assert policy.decide(Query("codex", spelling, 22, CONNECT)).rule == f"{F}:25"


HARDENING = Path(__file__).parent / "fixtures" / "hardening.yaml"
H = str(HARDENING)
AMBIGUOUS = "refused, as rule {H}:{line} looks at paths (an origin could serve another path " \
            "than the one decided)"
DOTS = "has a dot-segment once decoded ('..'), which origins resolve differently"
LITERAL = "a destination given as an IP address needs a cidr rule, in every mode"

HARDENING_CASES = [
    # (account, stage, host, port, method, path, result, rule line, reason)
    # Issue 13 row 2: a path an origin decodes differently is refused by the rule that looks
    # at paths, in learning mode too, whatever the spelling
    *[("learner", REQUEST, "api.paths.test", 443, "GET", path, DENY, 7, f"path {path} {why}: "
       + AMBIGUOUS.format(H=H, line=7)) for path, why in [
        ("/v1/..%2Fadmin", DOTS), ("/v1/x/..%2F..%2Fadmin", DOTS), ("/v1/..%2fadmin", DOTS),
        ("/v1/%2e%2e/admin", DOTS), ("/v1/%2e%2e%2Fadmin", DOTS), ("/v1/..;/admin", DOTS),
        ("/v1/..%5cadmin", "encodes a backslash (%5C), which some origins read as '/'"),
        ("/v1/..\\admin", "has a backslash, which some origins read as '/'"),
        ("/v1/%c0%ae%c0%ae/admin",
         "decodes to invalid or overlong UTF-8 (as %C0%AE is an overlong '.')"),
        ("/v1/%252e%252e/admin", "is double-encoded (%25 followed by hex digits)"),
        ("/v1/admin%00.json", "encodes NUL (%00)"),
    ]],
    ("learner", REQUEST, "api.paths.test", 443, "GET", "/v1%2Fx", DENY, 7,
     "path /v1%2Fx reads as /v1/x where the origin decodes %2F, and the rule's paths match "
     "only one of the two: " + AMBIGUOUS.format(H=H, line=7)),
    ("learner", REQUEST, "api.paths.test", 443, "GET", "/v1/a%20b", ALLOW, 7,
     "allowed by rule: host api.paths.test ports 80,443 paths /v1/*"),
    ("learner", REQUEST, "api.paths.test", 443, "GET", "/v1/@scope%2fname?x=/../y", ALLOW, 7,
     "allowed by rule: host api.paths.test ports 80,443 paths /v1/*"),
    ("learner", REQUEST, "api.paths.test", 443, "GET", "/v2/x", WOULD_DENY, None,
     f"no rule matched for api.paths.test:443 GET /v2/x (rule {H}:7 allows only paths /v1/*, "
     "not /v2/x)"),
    ("enforcer", REQUEST, "api.paths.test", 443, "GET", "/v1/..%2Fadmin", DENY, 23,
     f"path /v1/..%2Fadmin {DOTS}: " + AMBIGUOUS.format(H=H, line=23)),
    # npm-style scoped names: %2F stays %2F in the rule, and both readings must agree
    ("learner", REQUEST, "registry.paths.test", 443, "GET", "/@scope%2fname/-/n-1.0.tgz",
     ALLOW, 9, "allowed by rule: host registry.paths.test ports 80,443 paths "
     "/@scope%2Fname*,/plain/*"),
    ("learner", REQUEST, "registry.paths.test", 443, "GET", "/@scope/name", DENY, 9,
     "path /@scope/name reads as /@scope/name where the origin decodes %2F, and the rule's "
     "paths match only one of the two: " + AMBIGUOUS.format(H=H, line=9)),
    # read-only rules look at paths too
    ("learner", REQUEST, "repo.paths.test", 443, "GET", "/o/r.git/..%2F..%2Fx", DENY, 11,
     f"path /o/r.git/..%2F..%2Fx {DOTS}: " + AMBIGUOUS.format(H=H, line=11)),
    ("learner", REQUEST, "repo.paths.test", 443, "GET",
     "/o/r.git/info/refs?service=git-upload-pack", ALLOW, 11,
     "allowed by rule: host repo.paths.test ports 80,443 access read-only"),
    # rules without path constraints are unaffected...
    ("learner", REQUEST, "open.paths.test", 443, "GET", "/v1/..%2Fadmin", ALLOW, 13,
     "allowed by rule: host open.paths.test ports 80,443"),
    # ...but a deny rule with paths is not passed by an ambiguous path, or by %2F
    ("learner", REQUEST, "guarded.paths.test", 443, "GET", "/x/..%2Fadmin/users", DENY, 18,
     f"path /x/..%2Fadmin/users {DOTS}: " + AMBIGUOUS.format(H=H, line=18)),
    ("learner", REQUEST, "guarded.paths.test", 443, "GET", "/admin%2Fusers", DENY, 18,
     "path /admin%2Fusers reads as /admin/users where the origin decodes %2F, and the rule's "
     "paths match only one of the two: " + AMBIGUOUS.format(H=H, line=18)),
    ("learner", REQUEST, "guarded.paths.test", 443, "GET", "/admin/users", DENY, 18,
     "denied by rule: host guarded.paths.test paths /admin/*"),
    ("learner", REQUEST, "guarded.paths.test", 443, "GET", "/public%2Fx", ALLOW, 14,
     "allowed by rule: host guarded.paths.test ports 80,443"),
    # Issue 13 row 4: IP literals need a cidr rule in learning mode too, public or internal
    *[("learner", stage, literal, port, method, path, DENY, None,
       f"no rule matched for {shown}:{port}{' GET /' if path else ''}; {LITERAL}")
      for literal, shown in [("203.0.113.7", "203.0.113.7"), ("127.0.0.1", "127.0.0.1"),
                             ("2130706433", "127.0.0.1"), ("[2001:db8::1]", "[2001:db8::1]"),
                             ("169.254.169.254", "169.254.169.254")]
      for stage, port, method, path in [(CONNECT, 443, None, None), (REQUEST, 80, "GET", "/")]],
    ("learner", CONNECT, "198.51.100.7", 443, None, None, DENY, None,
     f"no rule matched for 198.51.100.7:443 (rule {H}:15 allows only cidr 198.51.100.0/24 "
     f"ports 5432); {LITERAL}"),
    ("learner", CONNECT, "198.51.100.7", 5432, None, None, ALLOW, 15,
     "allowed by rule: cidr 198.51.100.0/24 ports 5432"),
    ("learner", CONNECT, "unknown.paths.test", 443, None, None, WOULD_DENY, None,
     "no rule matched for unknown.paths.test:443"),
    ("enforcer", CONNECT, "10.1.2.3", 443, None, None, ALLOW, 25,
     "allowed by rule: cidr 10.1.0.0/16 ports 80,443"),
    # Issue 13 row 11: an IP-shaped name is never a DNS question to forward, even one that a
    # cidr rule allows as a destination
    *[(account, DNS, name, None, None, None, DENY, None,
       f"{address} is an IP address, not a name: it is never looked up upstream")
      for account in ("learner", "enforcer")
      for name, address in [("127.0.0.2", "127.0.0.2"), ("2130706434", "127.0.0.2"),
                            ("0x7f000002", "127.0.0.2"), ("127.1", "127.0.0.1"),
                            ("10.1.2.3", "10.1.2.3"), ("::1", "[::1]")]],
]


@pytest.fixture(scope="module")
def hardening() -> Policy:
    return Policy.load(HARDENING)


@pytest.mark.parametrize("account, stage, host, port, method, path, result, line, reason",
                         HARDENING_CASES)
def test_decisions_on_what_an_origin_or_upstream_could_read_otherwise(
        hardening, account, stage, host, port, method, path, result, line, reason):
    decision = hardening.decide(Query(account, host, port, stage, method, path))
    assert (decision.result, decision.rule, decision.reason) == (
        result, f"{H}:{line}" if line else None, reason)


@given(st.integers(min_value=0, max_value=2**32 - 1), st.sampled_from([22, 443, 5432]),
       st.sampled_from(["learner", "enforcer"]))
def test_a_literal_that_passes_passes_the_address_check_too(hardening, value, port, account):
    """What `check` says for an IP literal is what the proxy does: decide, then the address
    check on the same address, never disagree."""
    address = ip_address(value)
    decision = hardening.decide(Query(account, str(address), port, CONNECT))
    if decision.passes:
        assert decision.result is ALLOW
        assert hardening.decide_address(account, str(address), address, port).passes


def test_a_deny_rule_that_looks_at_requests_makes_the_tunnel_inspected():
    """An allow rule passes TLS to a host through uninspected; a deny rule with paths or
    methods for the same host must still see the requests it names, so the CONNECT is
    inspected (and only where the deny rule's ports say)."""
    policy = Policy(parse_policy(b"""version: 1
accounts:
  codex:
    match: {uids: [1001]}
    allow:
      - host: "*.forge.test"
        ports: [443, 8443]
    deny:
      - host: code.forge.test
        ports: [443]
        paths: ["/admin/*"]
      - host: api.forge.test
        methods: [DELETE]
""", "p.yaml"))

    def decide(host: str, port: int, stage: Stage = CONNECT, method: str | None = None,
               path: str | None = None) -> tuple[Result, bool, str]:
        decision = policy.decide(Query("codex", host, port, stage, method, path))
        return decision.result, decision.inspect, decision.reason

    assert decide("code.forge.test", 443) == (
        ALLOW, True, "allowed by rule: host *.forge.test ports 443,8443 (requests are "
        "inspected: rule p.yaml:9 denies some)")
    assert decide("code.forge.test", 8443)[:2] == (ALLOW, False)  # the deny rule's ports
    assert decide("api.forge.test", 8443)[:2] == (ALLOW, True)
    assert decide("other.forge.test", 443)[:2] == (ALLOW, False)
    assert decide("code.forge.test", 443, REQUEST, "GET", "/admin/x")[0] is DENY
    for spelling in ["/Admin/x", "//admin/x", "/admin;p=1/x", "/admin"]:  # as origins read it
        assert decide("code.forge.test", 443, REQUEST, "GET", spelling)[0] is DENY, spelling
    assert decide("code.forge.test", 443, REQUEST, "GET", "/src")[0] is ALLOW
    assert decide("code.forge.test", 443, DNS)[0] is ALLOW
