"""What `validate` warns of beyond the loader: a valid policy that will not do what its author
meant, because of the clock, of repetition, or of this machine's users."""

from __future__ import annotations

import pwd
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from .rules import PolicyDocument, PolicyWarning, Rule


def lint(document: PolicyDocument, now: float | None = None,
         uid_of: Callable[[str], int | None] | None = None) -> list[PolicyWarning]:
    """Expired rules, duplicate rules, and one person claimed by two accounts (a user name in
    one, the same user's uid in another: each of that user's clients is then denied as an
    identity conflict). `uid_of` maps a user name to its uid (default: this machine's users)."""
    moment = time.time() if now is None else now
    return [*_expired(document, moment), *_duplicates(document),
            *_same_person(document, uid_of or _uid_of), *_cleartext_credentials(document),
            *_credentials_passed_by(document)]


def _expired(document: PolicyDocument, now: float) -> list[PolicyWarning]:
    out = []
    for name, account in document.accounts.items():
        seen = set()
        for rule in (*account.allow, *account.deny):
            if rule.expires is not None and rule.expires <= now and rule.source not in seen:
                seen.add(rule.source)  # a preset's entries share their reference's line
                when = datetime.fromtimestamp(rule.expires, UTC).isoformat().replace("+00:00",
                                                                                      "Z")
                out.append(PolicyWarning(rule.source, f"account {name}: rule expired at {when} "
                                                      "and matches nothing; remove it"))
    return out


def _cleartext_credentials(document: PolicyDocument) -> list[PolicyWarning]:
    """A rule with a credential that allows port 80 (the default ports do): the proxy would set
    the secret on plain HTTP, readable on every network between the proxy and the origin."""
    out = []
    for name, account in document.accounts.items():
        seen = set()
        for rule in account.allow:
            if rule.credential and rule.ports and 80 in rule.ports and rule.source not in seen:
                seen.add(rule.source)  # a preset's entries share their reference's line
                out.append(PolicyWarning(rule.source, f"account {name}: credential "
                                         f"{rule.credential} would be sent in cleartext on port "
                                         "80; expected ports: [443] (or another TLS port)"))
    return out


def _credentials_passed_by(document: PolicyDocument) -> list[PolicyWarning]:
    """A rule with a credential whose destination another allow rule covers without looking at
    requests: a CONNECT there is allowed by that rule and passed through uninspected, so the
    credential is never set (whatever the order of the rules)."""
    out = []
    for name, account in document.accounts.items():
        plain = [rule for rule in account.allow if rule.host and not rule.inspects]
        seen = set()
        for rule in account.allow:
            if not rule.credential or not rule.host or rule.source in seen:
                continue
            cover = next((other for other in plain if _covers(other, rule)), None)
            if cover is not None:
                seen.add(rule.source)
                out.append(PolicyWarning(rule.source, f"account {name}: credential "
                                         f"{rule.credential} is never set: rule {cover.source} "
                                         f"allows {cover.describe()} without inspecting, so "
                                         "TLS to it is passed through; narrow or remove that "
                                         "rule"))
    return out


def _covers(other: Rule, rule: Rule) -> bool:
    """Whether `other` allows every host and port that `rule` names."""
    covering, host = other.host or "", rule.host or ""
    hosts = covering == host or (covering.startswith("*.") and host.endswith(covering[1:]))
    ports = other.ports is None or (rule.ports is not None and rule.ports <= other.ports)
    return hosts and ports


def _duplicates(document: PolicyDocument) -> list[PolicyWarning]:
    out = []
    for name, account in document.accounts.items():
        for kind, rules in (("allow", account.allow), ("deny", account.deny)):
            first: dict[Rule, str] = {}
            reported = set()
            for rule in rules:
                key = replace(rule, source="", preset_source=None)
                earlier = first.setdefault(key, rule.source)
                if earlier != rule.source and (earlier, rule.source) not in reported:
                    reported.add((earlier, rule.source))
                    out.append(PolicyWarning(rule.source, f"account {name}: this {kind} rule "
                                                          f"repeats {earlier}"))
    return out


def _same_person(document: PolicyDocument,
                 uid_of: Callable[[str], int | None]) -> list[PolicyWarning]:
    claims: dict[int, list[tuple[str, str]]] = {}  # uid -> (account, how it is claimed)
    for name, account in document.accounts.items():
        for uid in sorted(account.match.uids):
            claims.setdefault(uid, []).append((name, f"uid {uid}"))
        for user in sorted(account.match.unix_users):
            if (user_uid := uid_of(user)) is not None:
                claims.setdefault(user_uid, []).append((name, f"unix user {user}"))
    out = []
    for uid, by in sorted(claims.items()):
        accounts = dict.fromkeys(account for account, _ in by)
        if len(accounts) > 1:
            first = next(iter(accounts))
            how = "; ".join(f"account {account} by {what}" for account, what in by)
            out.append(PolicyWarning(document.accounts[first].source,
                                     f"uid {uid} is claimed twice ({how}): every client of that "
                                     "user is denied as an identity conflict"))
    return out


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None
