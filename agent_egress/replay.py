"""`agent-egress replay`: recorded traffic evaluated against a candidate policy, so a change can
be tried on real history before it is put in force."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .auditevent import AuditEvent
from .rules import NO_RULE, Decision, Policy, Query, Result, Stage
from .rules.engine import READ_ONLY_REFUSAL
from .rules.operations import path_for

# Decisions the policy engine made (and can make again). Others came from address, TLS or
# authentication checks that need the live connection, and are not replayed.
_POLICY_REASONS = ("allowed by rule", NO_RULE, "denied by rule", READ_ONLY_REFUSAL)
_DECISIONS_KEPT = 65_536  # distinct queries remembered; memory stays flat


@dataclass
class Change:
    account: str
    destination: str
    newly: str  # "denied" or "allowed"
    events: int
    reason: str


@dataclass
class Replayed:
    changes: list[Change]
    events: int
    not_replayed: int

    @property
    def newly_denied(self) -> int:
        return sum(c.events for c in self.changes if c.newly == "denied")


def replay(policy: Policy, events: Iterable[AuditEvent]) -> Replayed:
    changes: dict[tuple[str, str, str], Change] = {}
    total = skipped = 0
    now = time.time()  # every event is decided as of the start, so decisions can be reused
    decided: dict[tuple[Any, ...], Decision] = {}
    for event in events:
        total += 1
        account, host = event.account, event.host
        if not account or not host or not (event.reason or "").startswith(
                _POLICY_REASONS):
            skipped += 1
            continue
        stage = event.event
        # the log keeps no query string: `op` says what a git request was (a push reads as a
        # fetch without it)
        key = (account, host, event.port, stage, event.method, path_for(event.op, event.path))
        decision = decided.get(key)
        if decision is None:
            if len(decided) >= _DECISIONS_KEPT:
                decided.clear()
            decision = decided[key] = policy.decide(Query(*key, now=now))
        passed = event.decision is not Result.DENY
        if decision.passes == passed:
            continue
        destination = host if event.port is None else f"{host}:{event.port}"
        if stage is Stage.REQUEST:
            destination += f" {event.method or 'GET'} {event.path or '/'}"
            if event.op:
                destination += f" ({event.op})"
        newly = "denied" if passed else "allowed"
        change = changes.get((account, destination, newly))
        if change is None:
            rule = ", ".join(r for r in (decision.rule, decision.rule_id) if r)
            reason = decision.reason + (f" ({rule})" if rule else "")
            change = changes[(account, destination, newly)] = Change(
                account, destination, newly, 0, reason)
        change.events += 1
    ordered = sorted(changes.values(), key=lambda c: (c.account, c.newly != "denied",
                                                       -c.events, c.destination))
    return Replayed(ordered, total, skipped)
