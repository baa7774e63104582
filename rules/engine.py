"""Decisions: which account a client is, and whether its destination may be reached."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .addresses import internal_kind
from .hosts import Address, Host, HostError, Name, host_text, normalize_host
from .index import DestinationIndex
from .loader import DEFAULT_ACCOUNT, gc_paused, load_policy
from .model import READ_METHODS, Account, Mode, PolicyDocument, Result, Rule, Stage
from .paths import RequestPath, deny_paths_match, normalize_path, paths_match, shown_path

NO_RULE = "no rule matched"
READ_ONLY_REFUSAL = "refused by read-only rule"


@dataclass(frozen=True, slots=True)
class Query:
    """One thing an account's process tried to reach. `path` may carry a query string: it is
    removed before matching and only consulted to tell a git push from a fetch."""

    account: str
    host: str
    port: int | None
    stage: Stage
    method: str | None = None
    path: str | None = None
    now: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    result: Result
    rule: str | None  # file:line of the deciding rule, None when no rule matched
    reason: str
    account: str
    mode: Mode
    inspect: bool = False  # allowed, but only if the proxy sees each request
    hint: str | None = None  # what would allow it, for denials a person or agent acts on
    credential: str | None = None  # a request: the credential injected, or caught (denied)
    unmatched: bool = False  # no rule matched a name: what learning passes and ask mode holds
    approval: str | None = None  # the access request whose approval let it through
    rule_id: str | None = None  # the deciding rule's stable id (DESIGN.md), beside `rule`

    @property
    def passes(self) -> bool:
        return self.result is not Result.DENY


@dataclass(frozen=True, slots=True)
class Identity:
    """What the proxy or resolver knows about a client; any part may be unknown."""

    uid: int | None = None
    user: str | None = None
    proxy_user: str | None = None
    source: Address | None = None


@dataclass(frozen=True, slots=True)
class AccountChoice:
    account: str | None  # None: the client is denied
    reason: str


@dataclass(frozen=True, slots=True)
class _Grant:
    """A rule with the decisions it makes, built once: decisions depend only on the rule and
    the account."""

    rule: Rule
    denies: bool
    decision: Decision
    inspected: Decision | None = None  # an allow rule that must see requests, at CONNECT


class _AccountRules:
    """An account's allow and deny rules in one index, so a destination is looked up once."""

    __slots__ = ("account", "expiring", "index")

    def __init__(self, account: Account) -> None:
        self.account = account
        deny = [(r, _Grant(r, True, Decision(Result.DENY, r.source, f"denied by rule: "
                                            f"{r.describe()}", account.name, account.mode,
                                            rule_id=r.id)))
                for r in account.deny]
        allow = [(r, _allow_grant(r, account)) for r in account.allow]
        self.index = DestinationIndex([*deny, *allow])
        self.expiring = any(r.expires is not None for r in (*account.allow, *account.deny))


def _allow_grant(rule: Rule, account: Account) -> _Grant:
    reason = f"allowed by rule: {rule.describe()}"
    inspected = Decision(Result.ALLOW, rule.source, f"{reason} (requests are inspected)",
                         account.name, account.mode, inspect=True,
                         rule_id=rule.id) if rule.inspects else None
    return _Grant(rule, False,
                  Decision(Result.ALLOW, rule.source, reason, account.name, account.mode,
                           credential=rule.credential, rule_id=rule.id),
                  inspected)


class Policy:
    """An immutable, indexed policy: the snapshot that the proxy and the resolver share and
    replace by reference on reload."""

    def __init__(self, document: PolicyDocument, editing: str | None = None) -> None:
        """`editing`: how a person gets a file to edit, for a policy that has none (the
        embedded default); every hint says it."""
        self.document = document
        self.editing = editing
        with gc_paused():
            self._accounts = {name: _AccountRules(a) for name, a in document.accounts.items()}
        self._by_uid: dict[int, str] = {}
        self._by_user: dict[str, str] = {}
        self._by_proxy_user: dict[str, str] = {}
        sources = []
        for name, account in document.accounts.items():
            self._by_uid.update(dict.fromkeys(account.match.uids, name))
            self._by_user.update(dict.fromkeys(account.match.unix_users, name))
            self._by_proxy_user.update(dict.fromkeys(account.match.proxy_users, name))
            sources += [(net, name) for net in account.match.sources]
        self._sources = sorted(sources, key=lambda entry: -entry[0].prefixlen)
        self._expiries = sorted({r.expires for a in document.accounts.values()
                                 for r in (*a.allow, *a.deny) if r.expires is not None})

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        return cls(load_policy(path))

    @property
    def digest(self) -> str:
        return self.document.digest

    def accounts(self) -> dict[str, Account]:
        return self.document.accounts

    def next_expiry(self, now: float) -> float | None:
        """The first `expires` after `now`: when decisions may change without a reload."""
        at = bisect.bisect_right(self._expiries, now)
        return self._expiries[at] if at < len(self._expiries) else None

    def account_for(self, identity: Identity) -> AccountChoice:
        """The account of a client: every known identity must point to the same account."""
        claims: dict[str, str] = {}
        if identity.uid is not None and identity.uid in self._by_uid:
            claims.setdefault(self._by_uid[identity.uid], f"uid {identity.uid}")
        if identity.user is not None and identity.user in self._by_user:
            claims.setdefault(self._by_user[identity.user], f"unix user {identity.user}")
        if identity.proxy_user is not None and identity.proxy_user in self._by_proxy_user:
            claims.setdefault(self._by_proxy_user[identity.proxy_user],
                              f"proxy user {identity.proxy_user}")
        if identity.source is not None:
            for network, name in self._sources:
                if identity.source.version == network.version and identity.source in network:
                    claims.setdefault(name, f"source {identity.source} in {network}")
                    break
        if len(claims) > 1:
            detail = "; ".join(f"{why} is account {name}" for name, why in claims.items())
            return AccountChoice(None, f"identity conflict: {detail}")
        if claims:
            name, why = next(iter(claims.items()))
            return AccountChoice(name, f"matched by {why}")
        if DEFAULT_ACCOUNT in self._accounts:
            return AccountChoice(DEFAULT_ACCOUNT, "no account matched; using the default account")
        return AccountChoice(None, f"no account matches {_describe(identity)} and the policy "
                                   "has no default account")

    def decide_address(self, account: str, name: str, address: Address, port: int | None,
                       now: float | None = None) -> Decision:
        """Whether `address`, which `name` resolved to (or which the client gave), may be
        reached on `port` (None: on some port, as for a DNS answer). Internal addresses need a
        `cidr` rule, in every mode: learning must not open an SSRF hole. The result is never
        would_deny."""
        rules = self._accounts.get(account)
        if rules is None:
            return Decision(Result.DENY, None, f"no account {account!r} in the policy", account,
                            Mode.ENFORCE)
        mode = rules.account.mode
        moment = (now or time.time()) if rules.expiring else 0.0
        found = rules.index.network_candidates(address)
        for grant in found:
            rule = grant.rule
            if grant.denies and _active(rule, moment) and _port_matches(rule, port, deny=True):
                return Decision(Result.DENY, rule.source, f"{name} resolves to {address}, "
                                f"denied by rule: {rule.describe()}", account, mode,
                                rule_id=rule.id)
        kind = internal_kind(address)
        if kind is None:
            return Decision(Result.ALLOW, None, f"{name} resolves to {address}, a public address",
                            account, mode)
        for grant in found:
            rule = grant.rule
            if not grant.denies and _active(rule, moment) and _port_matches(rule, port,
                                                                            deny=False):
                return grant.decision
        return Decision(Result.DENY, None, f"{name} resolves to {address}, which is {kind}; "
                        "only a cidr rule can allow an internal address", account, mode,
                        hint=self._editable(
                            f"if this is intended, add {{cidr: {address}/{address.max_prefixlen}"
                            + (f", ports: [{port}]" if port is not None else "")
                            + f"}} to accounts.{account}.allow"))

    def decide(self, query: Query) -> Decision:
        rules = self._accounts.get(query.account)
        if rules is None:
            return Decision(Result.DENY, None, f"no account {query.account!r} in the policy",
                            query.account, Mode.ENFORCE)
        account = rules.account
        try:
            host = normalize_host(query.host)
        except HostError as e:
            return Decision(Result.DENY, None, f"invalid host: {e}", account.name, account.mode)
        if query.stage is Stage.DNS and not isinstance(host, Name):
            return Decision(Result.DENY, None, f"{host_text(host)} is an IP address, not a name: "
                            "it is never looked up upstream", account.name, account.mode)
        now = (query.now or time.time()) if rules.expiring else 0.0
        path = RequestPath(query.path) if query.path is not None else None

        found = rules.index.candidates(host)
        watching: Rule | None = None  # a deny rule that looks at this destination's requests
        for grant in found:
            if grant.denies and _active(grant.rule, now):
                applies = _deny_applies(grant.rule, query, path)
                if applies is True:
                    return grant.decision
                if applies is not False:  # the rule looks at paths and this one is ambiguous
                    return _ambiguous(grant.rule, applies, account)
                if watching is None and _deny_watches(grant.rule, query):
                    watching = grant.rule

        near_miss: str | None = None
        near_request: tuple[Rule, str] | None = None  # the first rule that refused the request
        ambiguous: Decision | None = None
        needs_inspection: Decision | None = None
        for grant in found:
            if grant.denies:
                continue
            rule = grant.rule
            if not _active(rule, now):
                near_miss = near_miss or f"rule {rule.source} expired"
                continue
            if query.port is not None and rule.ports is not None and query.port not in rule.ports:
                near_miss = near_miss or f"rule {rule.source} allows only {rule.describe()}"
                continue
            if query.stage is Stage.REQUEST:
                refusal = _request_refusal(rule, query.method, path or RequestPath("/"))
                if refusal is None:
                    return grant.decision
                if isinstance(refusal, _Ambiguity):
                    ambiguous = ambiguous or _ambiguous(rule, refusal, account)
                else:
                    near_request = near_request or (rule, refusal)
                    near_miss = near_miss or f"rule {rule.source} {refusal}"
            elif query.stage is Stage.CONNECT and grant.inspected is not None:
                needs_inspection = needs_inspection or grant.inspected
            elif watching is not None:  # its requests must be seen for the deny rule to hold
                return replace(grant.decision, inspect=True, reason=f"{grant.decision.reason} "
                               f"(requests are inspected: rule {watching.source} denies some)")
            else:
                return grant.decision
        if ambiguous is not None:  # no rule that ignores paths allowed it either
            return ambiguous
        if needs_inspection is not None:
            return needs_inspection

        reason = f"{NO_RULE} for {_destination(host, query)}"
        if near_miss:
            reason += f" ({near_miss})"
        if not isinstance(host, Name):  # an address check: learning does not open it
            return Decision(Result.DENY, None, f"{reason}; a destination given as an IP "
                            "address needs a cidr rule, in every mode", account.name,
                            account.mode, hint=_hint(account.name, host, query))
        result = Result.WOULD_DENY if account.mode is Mode.LEARN else Result.DENY
        if near_request is not None and near_miss == f"rule {near_request[0].source} " \
                f"{near_request[1]}":
            return _refused_by_rule(near_request, result, host, query, account, self._editable)
        return Decision(result, None, reason, account.name, account.mode,
                        hint=self._editable(_hint(account.name, host, query)), unmatched=True)

    def _editable(self, hint: str) -> str:
        return f"{hint} ({self.editing})" if self.editing else hint


def _port_matches(rule: Rule, port: int | None, deny: bool) -> bool:
    """Without a port (a DNS answer), an allow rule for any port matches, and only a deny
    rule for every port does."""
    if rule.ports is None:
        return True
    return port in rule.ports if port is not None else not deny


def _active(rule: Rule, now: float) -> bool:
    return rule.expires is None or now < rule.expires


class _Ambiguity(str):
    """Why a rule that looks at paths cannot decide on this one: an origin could read it as
    another path."""


def _deny_watches(rule: Rule, query: Query) -> bool:
    """Whether a deny rule with methods or paths names requests to this CONNECT's destination:
    the tunnel is then inspected, or the rule would never see them."""
    return query.stage is Stage.CONNECT and (rule.methods is not None or
                                            rule.paths is not None) and (
        rule.ports is None or query.port in rule.ports)


def _deny_applies(rule: Rule, query: Query, path: RequestPath | None) -> bool | _Ambiguity:
    """A deny rule with ports, methods or paths denies only what it names; at the DNS stage
    only a rule that denies the name outright applies. A path it cannot read unambiguously is
    neither denied by it nor let past it: the caller refuses it."""
    if query.stage is Stage.DNS:
        return rule.ports is None and not rule.inspects
    if rule.ports is not None and query.port not in rule.ports:
        return False
    if rule.methods is None and rule.paths is None:
        return True
    if query.stage is not Stage.REQUEST:
        return False
    if rule.methods is not None and (query.method or "GET").upper() not in rule.methods:
        return False
    if rule.paths is None:
        return True
    read = path or RequestPath("/")
    ambiguity = _path_ambiguity(read)
    if ambiguity is not None:
        return ambiguity
    matched = deny_paths_match(rule.paths, read)
    return _slash_ambiguity(read) if matched is None else matched


def _request_refusal(rule: Rule, method: str | None, path: RequestPath) -> str | None:
    """Why `rule` does not allow this request, or None when it does; an _Ambiguity when the
    rule looks at paths and this path could reach the origin as another."""
    method = (method or "GET").upper()
    if rule.methods is not None and method not in rule.methods:
        return f"allows only methods {', '.join(sorted(rule.methods))}, not {method}"
    if rule.paths is None and not rule.read_only:
        return None
    ambiguity = _path_ambiguity(path)
    if ambiguity is not None:
        return ambiguity
    if rule.paths is not None:
        matched = paths_match(rule.paths, path)
        if matched is None:
            return _slash_ambiguity(path)
        if not matched:
            return f"allows only paths {', '.join(p.text for p in rule.paths)}, " \
                   f"not {path.normalized}"
    if rule.read_only:
        write = _write_operation(method, path.normalized, path.raw) or (
            path.slashed is not path.normalized
            and _write_operation(method, path.slashed, path.raw))
        if write:
            return _WriteRefusal(f"is read-only and this is {write}")
    return None


class _WriteRefusal(str):
    """A read-only rule refusing a write: no hint may suggest widening it."""


def _refused_by_rule(near: tuple[Rule, str], result: Result, host: Host, query: Query,
                     account: Account, editable: Callable[[str], str]) -> Decision:
    """A request that a rule for its destination refused (read-only, methods, paths): the
    decision names that rule. A write under a read-only rule gets no hint (any rule that let
    it through would allow writes); a method or path refusal gets a hint for that method or
    path alone, never a host-wide rule."""
    rule, refusal = near
    destination = _destination(host, query)
    if isinstance(refusal, _WriteRefusal):
        what = refusal.removeprefix("is read-only and this ")
        return Decision(result, rule.source, f"{READ_ONLY_REFUSAL} {rule.source} "
                        f"({rule.describe()}): {destination} {what}",
                        account.name, account.mode, rule_id=rule.id,
                        hint=f"nothing to add: rule {rule.source} allows reading only (fetch, "
                             "clone, download); writing to this destination is for an "
                             "operator to decide on, not for a wider rule")
    target = f"host: {host_text(host)}" if isinstance(host, Name) else \
        f"cidr: {host}/{host.max_prefixlen}"
    ports = f", ports: [{query.port}]" if query.port is not None else ""
    methods = f", methods: [{(query.method or 'GET').upper()}]" if rule.methods is not None \
        else ""
    path = normalize_path(query.path or "/")
    # a path with glob or quoting characters would make a wider or broken pattern
    paths = f'paths: ["{path}"]' if not set(path) & set('*?[]"\\') and path.isprintable() \
        else "paths: [the path]"
    return Decision(result, None, f"{NO_RULE} for {destination} (rule {rule.source} "
                    f"{refusal})", account.name, account.mode,
                    hint=editable(f"to allow this path only, add {{{target}{ports}{methods}, "
                                  f"{paths}}} to accounts.{account.name}.allow"))


def _path_ambiguity(path: RequestPath) -> _Ambiguity | None:
    why = path.ambiguity
    return None if why is None else _Ambiguity(f"path {shown_path(path.raw)} {why}")


def _slash_ambiguity(path: RequestPath) -> _Ambiguity:
    return _Ambiguity(f"path {shown_path(path.raw)} reads as {shown_path(path.slashed)} where "
                      "the origin decodes %2F, and the rule's paths match only one of the two")


def _ambiguous(rule: Rule, why: str, account: Account) -> Decision:
    return Decision(Result.DENY, rule.source, f"{why}: refused, as rule {rule.source} looks "
                    "at paths (an origin could serve another path than the one decided)",
                    account.name, account.mode,
                    hint="send the path as the origin is to read it: no encoded '/' next to "
                         "dot-segments, no '\\', '%5C', dot-segments or double encoding",
                    rule_id=rule.id)


def _write_operation(method: str, path: str, raw_path: str) -> str | None:
    """What a request writes, if it writes: read-only rules refuse it."""
    if path.endswith("/git-receive-pack") or (
            path.endswith("/info/refs") and "service=git-receive-pack" in raw_path):
        return "a git push (git-receive-pack)"
    if method == "POST" and path.endswith("/git-upload-pack"):
        return None  # git fetch and clone negotiate over POST
    if method not in READ_METHODS:
        return f"a {method} (an upload, publish or other write)"
    return None


def _destination(host: Host, query: Query) -> str:
    text = host_text(host)
    if query.port is not None:
        text += f":{query.port}"
    if query.stage is Stage.REQUEST:
        text += f" {(query.method or 'GET').upper()} {normalize_path(query.path or '/')}"
    return text


def _hint(account: str, host: Host, query: Query) -> str:
    if isinstance(host, Name):
        target = f"host: {host.text}"
    else:
        target = f"cidr: {host}/{host.max_prefixlen}"
    ports = f", ports: [{query.port}]" if query.port is not None else ""
    return f"to allow it, add {{{target}{ports}}} to accounts.{account}.allow"


def _describe(identity: Identity) -> str:
    parts = []
    if identity.uid is not None:
        parts.append(f"uid {identity.uid}")
    if identity.user is not None:
        parts.append(f"unix user {identity.user}")
    if identity.proxy_user is not None:
        parts.append(f"proxy user {identity.proxy_user}")
    if identity.source is not None:
        parts.append(f"source {identity.source}")
    return ", ".join(parts) or "an unidentified client"

