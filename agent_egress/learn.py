"""`agent-egress learn`: allow rules proposed from what an account was denied (or, in learning
mode, would have been), with the evidence for each, and what looks dangerous flagged instead.

It streams: memory grows with the number of distinct destinations, not with the log."""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import ip_address

from .auditevent import AuditEvent
from .policyedit import NewRule
from .rules import (
    NO_RULE,
    Address,
    HostError,
    Name,
    Policy,
    Query,
    Result,
    Rule,
    Stage,
    builtin_presets,
    normalize_host,
)
from .rules.hosts import looks_encoded
from .rules.model import READ_METHODS
from .rules.operations import READS, WRITES
from .rules.suffixes import is_public_suffix
from .terminal import counted

SIBLINGS_FOR_WILDCARD = 3
MAX_PROCESSES = 3


@dataclass
class Evidence:
    count: int = 0
    first: str = ""
    last: str = ""
    processes: list[str] = field(default_factory=list)
    stages: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    reason: str = ""
    ops: set[str] = field(default_factory=set)  # recognised operations (`op`)
    other_writes: int = 0  # requests that write and are no recognised read

    def add(self, event: AuditEvent) -> None:
        ts = event.ts or ""
        self.count += 1
        self.first = min(self.first, ts) if self.first else ts
        self.last = max(self.last, ts)
        self.stages.add(event.event)
        if event.port is not None:
            self.ports.add(event.port)
        exe = (event.exe or "").rsplit("/", 1)[-1]
        if exe and exe not in self.processes and len(self.processes) < MAX_PROCESSES:
            self.processes.append(exe)
        self.reason = self.reason or (event.reason or "")
        if event.op:
            self.ops.add(event.op)
        if event.event == "request" and event.op not in READS and (
                event.method or "GET").upper() not in READ_METHODS:
            self.other_writes += 1

    @property
    def writes(self) -> list[str]:
        """What the events say was a write (op), for a loud flag."""
        return sorted(self.ops & WRITES)

    @property
    def only_read(self) -> bool:
        """Recognised reads (git fetch, LFS download) and nothing that writes."""
        return bool(self.ops) and self.ops <= READS and not self.other_writes

    def merged(self, other: Evidence) -> Evidence:
        processes = self.processes + [p for p in other.processes if p not in self.processes]
        return Evidence(self.count + other.count, min(self.first, other.first),
                        max(self.last, other.last), processes[:MAX_PROCESSES],
                        self.stages | other.stages, self.ports | other.ports,
                        self.reason or other.reason, self.ops | other.ops,
                        self.other_writes + other.other_writes)

    def describe(self) -> str:
        seen = f"{self.first} to {self.last}" if self.first != self.last else self.first
        who = f", by {', '.join(self.processes)}" if self.processes else ""
        return f"{counted(self.count, 'event')}, {seen}{who}"


@dataclass(frozen=True)
class Proposal:
    rule: NewRule
    covers: tuple[str, ...]
    evidence: Evidence


@dataclass(frozen=True)
class Flag:
    destination: str
    why: str
    evidence: Evidence


@dataclass
class Learned:
    proposals: dict[str, list[Proposal]] = field(default_factory=dict)
    flags: dict[str, list[Flag]] = field(default_factory=dict)
    used_rules: set[str] = field(default_factory=set)
    events: int = 0


def learn(policy: Policy, events: Iterable[AuditEvent], account: str | None = None,
          stale_since: timedelta | None = None) -> Learned:
    seen: dict[tuple[str, str], Evidence] = defaultdict(Evidence)
    learned = Learned()
    last_use: dict[tuple[str, str], str] = {}  # (account, rule key) -> its latest use
    rule_lines: dict[str, str] = {}  # FILE:LINE as logged -> its key, for events before ids
    latest = ""
    count = 0
    for event in events:
        count += 1
        ts = event.ts or ""
        if ts > latest:
            latest = ts
        name = event.account
        if not name or (account and name != account) or not event.host:
            continue
        if event.decision is Result.ALLOW:
            rule = event.rule
            used = f"id {event.rule_id}" if event.rule_id else None
            if used is None and rule:
                used = rule_lines.get(rule)
                if used is None:
                    used = rule_lines[rule] = f"line {_rule_line(rule)}"
            if used is not None and ts >= last_use.get((name, used), ""):
                last_use[(name, used)] = ts
            if event.ip:  # a cidr rule may have let this address through for the name
                reached = f"address {event.ip} {event.port}"
                if ts >= last_use.get((name, reached), ""):
                    last_use[(name, reached)] = ts
            continue
        seen[(name, event.host)].add(event)
    learned.events = count
    for (name, host), evidence in seen.items():
        _classify(policy, name, host, evidence, learned)
    for name in learned.proposals:
        learned.proposals[name] = _collapse(learned.proposals[name])
    learned.used_rules = _recently_used(last_use, latest, stale_since)
    return learned


def _classify(policy: Policy, account: str, host_text: str, evidence: Evidence,
              learned: Learned) -> None:
    def flag(why: str) -> None:
        learned.flags.setdefault(account, []).append(Flag(host_text, why, evidence))

    if account not in policy.accounts():
        flag(f"account {account} is not in the policy")
        return
    try:
        host = normalize_host(host_text)
    except HostError as e:
        flag(f"invalid host: {e}")
        return
    if not isinstance(host, Name):
        flag(f"an address, not a name: only a cidr rule ({host}/{host.max_prefixlen}) can "
             "allow it; add one by hand if it is intended")
        return
    queries = [Query(account, host.text, port, Stage.CONNECT) for port in evidence.ports] or [
        Query(account, host.text, None, Stage.DNS)]
    if all(policy.decide(q).result is Result.ALLOW for q in queries):
        return  # the policy allows it now: nothing to propose (and learn is idempotent)
    if not evidence.reason.startswith(NO_RULE):
        flag(f"denied for another reason: {evidence.reason}")
        return
    if evidence.writes:
        flag(f"WRITES: {', '.join(evidence.writes)} seen; any rule for this host would allow "
             "them: add one by hand only if this account is meant to write there (else "
             "`access: read-only`)")
        return
    if "(rule " in evidence.reason:
        flag("a rule covers this host with restrictions (methods, paths, ports, read-only or "
             "expiry); widen that rule by hand if intended")
        return
    if evidence.stages == {"dns"}:
        flag("only resolved, never connected to")
        return
    if looks_encoded(host.text):
        flag("looks like encoded data (high-entropy label): possible DNS tunnelling")
        return
    access = "read-only" if evidence.only_read else None
    learned.proposals.setdefault(account, []).append(
        Proposal(NewRule(host=host.text, ports=sorted(evidence.ports), access=access),
                 (host.text,), evidence))


def _collapse(proposals: list[Proposal]) -> list[Proposal]:
    """Siblings under one parent become `*.parent` (never over a public suffix), and names
    that cover most of a built-in preset become that preset. Only proposals of one access
    collapse together: a read-only name never becomes part of a rule that allows writes."""
    by_name = {p.covers[0]: p for p in proposals}
    out: list[Proposal] = []
    for preset, rules in sorted(builtin_presets().items()):
        hosts = {r.host for r in rules if r.host and not r.host.startswith("*.")}
        for access in (None, "read-only"):
            observed = {h for h in hosts & by_name.keys() if by_name[h].rule.access == access}
            if len(observed) >= 2 and len(observed) * 2 >= len(hosts):
                evidence = _merge([by_name.pop(h).evidence for h in sorted(observed)])
                out.append(Proposal(NewRule(preset=preset, access=access),
                                    tuple(sorted(observed)), evidence))
    families: dict[tuple[str, str | None], list[str]] = defaultdict(list)
    for name, proposal in by_name.items():
        parent = name.split(".", 1)[1] if "." in name else ""
        if "." in parent and not is_public_suffix(parent):
            families[(parent, proposal.rule.access)].append(name)
    for (parent, access), names in sorted(families.items(), key=lambda f: (f[0][0],
                                                                          f[0][1] or "")):
        if len(names) >= SIBLINGS_FOR_WILDCARD:
            members = [by_name.pop(n) for n in sorted(names)]
            evidence = _merge([m.evidence for m in members])
            out.append(Proposal(NewRule(host=f"*.{parent}", ports=sorted(evidence.ports),
                                        access=access), tuple(sorted(names)), evidence))
    out.extend(by_name[name] for name in sorted(by_name))
    return out


def _merge(evidence: list[Evidence]) -> Evidence:
    return functools.reduce(Evidence.merged, evidence)


def _rule_line(source: str) -> str:
    """`file:line` by the file's name alone: the proxy may have been given another spelling
    of the same path than learn is. Only for events written before rules had ids: a line
    moves when the file is edited above it."""
    file, _, line = source.rpartition(":")
    return f"{os.path.basename(file)}:{line}"


def _recently_used(last_use: dict[tuple[str, str], str], latest: str,
                   window: timedelta | None) -> set[str]:
    """The `account\\0rule` pairs used within `window` of the latest event (ever, if None)."""
    since = ""
    if window is not None:
        try:
            since = (datetime.fromisoformat(latest) - window).isoformat().replace("+00:00", "Z")
        except ValueError:
            pass
    return {f"{name}\0{rule}" for (name, rule), ts in last_use.items() if ts >= since}


def stale_rules(policy: Policy, used: set[str],
                account: str | None) -> list[tuple[str, str, str, str]]:
    """(account, rule, rule id, description) of allow rules no allow event used: by the
    rule's stable id (events from before ids: by its line)."""
    out = []
    for name, acct in policy.accounts().items():
        if account and name != account:
            continue
        reached = _addresses_reached(used, name)
        for rule in dict((r.id or r.source, r) for r in acct.allow).values():
            if f"{name}\0id {rule.id}" not in used and \
                    f"{name}\0line {_rule_line(rule.source)}" not in used and \
                    not _lets_through(rule, reached):
                out.append((name, rule.source, rule.id, rule.describe()))
    return out


def _addresses_reached(used: set[str], account: str) -> list[tuple[Address, int | None]]:
    """The addresses (and ports) allowed events of `account` reached."""
    prefix = f"{account}\0address "
    out = []
    for entry in used:
        if entry.startswith(prefix):
            ip, _, port = entry[len(prefix):].partition(" ")
            try:
                out.append((ip_address(ip), int(port) if port.isdigit() else None))
            except ValueError:
                continue
    return out


def _lets_through(rule: Rule, reached: list[tuple[Address, int | None]]) -> bool:
    """Whether a cidr rule covers an address that allowed traffic reached: it may have decided
    no event (a name's rule did) and still have let the name's internal address through."""
    network = rule.network
    return network is not None and any(
        ip.version == network.version and ip in network and
        (rule.ports is None or port in rule.ports) for ip, port in reached)
